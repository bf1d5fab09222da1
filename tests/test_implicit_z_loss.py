"""The router losses SparseMoE attaches while training reach the router (and x) with exactly the
gradient of coef * load_balancing_loss + z_coef * z_loss, for every combination of the two
coefficients, z-loss alone included: the reference gradient is made by hand from the plain-torch
naive loop (baselines) plus ops.gating's plain losses on logits computed here, not by the layer."""

from __future__ import annotations

import pytest
import torch
from tolerance import BASELINES_FP32

from unimoe_kernels import baselines
from unimoe_kernels.modules import SparseMoE
from unimoe_kernels.ops.gating import load_balancing_loss, z_loss

H, F, E, K, T = 16, 24, 4, 2, 20

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_hand(moe: SparseMoE, x: torch.Tensor, g: torch.Tensor, aux_coef: float, z_coef: float):
    """(d router.weight, d x) of sum(y * g) + aux_coef * lbl + z_coef * z, all in plain torch."""
    xr = x.detach().clone().requires_grad_(True)
    w = moe.router.weight
    main = (baselines.naive_loop_moe(moe, xr) * g).sum()
    logits = xr @ w.t()
    scores = torch.softmax(logits, -1)
    ids = torch.topk(scores, K, -1).indices
    total = main + aux_coef * load_balancing_loss(scores, ids, E) + z_coef * z_loss(logits)
    dw, dx = torch.autograd.grad(total, (w, xr), retain_graph=True)
    # The part the losses alone contribute, to show it is far above the comparison's tolerance.
    dw_main = torch.autograd.grad(main, w)[0]
    return dw, dx, dw - dw_main


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("aux_coef, z_coef", [(0.0, 0.5), (0.0, 0.0), (0.3, 0.0), (0.3, 0.5)])
def test_attached_losses_give_the_hand_made_router_gradient(backend, aux_coef, z_coef):
    torch.manual_seed(3)
    moe = SparseMoE(H, F, E, K, aux_loss_coef=aux_coef, z_loss_coef=z_coef, backend=backend).train()
    with torch.no_grad():
        moe.router.weight.mul_(4.0)  # logits of a few units: a z-loss gradient well above rounding
    x = torch.randn(T, H, requires_grad=True)
    g = torch.randn(T, H)

    (moe(x) * g).sum().backward()  # the caller's loss ignores the aux losses: they come implicitly
    want_dw, want_dx, losses_dw = _by_hand(moe, x, g, aux_coef, z_coef)

    torch.testing.assert_close(moe.router.weight.grad, want_dw, **BASELINES_FP32)
    torch.testing.assert_close(x.grad, want_dx, **BASELINES_FP32)
    if aux_coef or z_coef:
        assert losses_dw.abs().max() > 100 * BASELINES_FP32["atol"], "the losses' share must be measurable"
    else:
        assert losses_dw.abs().max() == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_z_loss_alone_trains_a_router_the_output_ignores(backend):
    """With the main loss independent of the router (g = 0), the router's gradient is the z-loss
    gradient alone: z_coef * d z_loss(x W^T) / dW, and nothing of the balancing loss."""
    torch.manual_seed(4)
    z_coef = 0.25
    moe = SparseMoE(H, F, E, K, aux_loss_coef=0.0, z_loss_coef=z_coef, backend=backend).train()
    x = torch.randn(T, H)
    moe(x).mul(0.0).sum().backward()
    w = moe.router.weight.detach().clone().requires_grad_(True)
    want = z_coef * torch.autograd.grad(z_loss(x @ w.t()), w)[0]
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(moe.router.weight.grad, want, **BASELINES_FP32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_attached_gradient_outside_training_or_without_coefficients(backend):
    """Eval mode, or both coefficients zero: the router's gradient is that of the output alone."""
    torch.manual_seed(5)
    x = torch.randn(T, H)
    g = torch.randn(T, H)
    for coefs, train in (((0.0, 0.0), True), ((0.3, 0.5), False)):
        moe = SparseMoE(H, F, E, K, aux_loss_coef=coefs[0], z_loss_coef=coefs[1], backend=backend).train(train)
        (moe(x) * g).sum().backward()
        want = _by_hand(moe, x, g, 0.0, 0.0)[0]
        torch.testing.assert_close(moe.router.weight.grad, want, **BASELINES_FP32)
