"""The inference path of SparseMoE does no training work: no aux losses unless asked for, and the
Triton expert MLP stores no pre-activation when no gradient will need it."""

from __future__ import annotations

import pytest
import torch

from unimoe_kernels import SparseMoE
from unimoe_kernels import modules as moe_modules
from unimoe_kernels.ops import grouped_mlp_ops


@pytest.fixture
def loss_calls(monkeypatch):
    """Calls of the aux-loss computation made by SparseMoE, and whether gating was asked for its
    loss statistics."""
    calls = []
    real = moe_modules.router_losses

    def counted(*a, **kw):
        calls.append("router_losses")
        return real(*a, **kw)

    monkeypatch.setattr(moe_modules, "router_losses", counted)
    real_gating = moe_modules.TopKRouter.forward

    def gating(self, x, return_stats=False):
        if return_stats:
            calls.append("stats")
        return real_gating(self, x, return_stats)

    monkeypatch.setattr(moe_modules.TopKRouter, "forward", gating)
    return calls


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode", "train without coefficients"])
def test_no_aux_losses_unless_needed(mode, loss_calls, one_thread):
    coef = 0.0 if mode == "train without coefficients" else 0.01
    moe = SparseMoE(16, 8, 4, top_k=2, aux_loss_coef=coef, z_loss_coef=coef)
    moe.train(mode != "eval")
    x = torch.randn(6, 16)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(mode, torch.enable_grad())
    with ctx:
        y = moe(x)
        assert loss_calls == []
        y2, aux = moe(x, return_aux=True)  # asked for: computed, and the output is the same
    assert sorted(loss_calls) == ["router_losses", "stats"]
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert aux.load_balancing_loss.dtype == torch.float32 and aux.z_loss.dtype == torch.float32


def test_training_still_attaches_the_losses(loss_calls, one_thread):
    x = torch.randn(6, 16)
    grads = []
    for coef in (0.0, 0.01):
        torch.manual_seed(0)  # the same weights for both
        moe = SparseMoE(16, 8, 4, top_k=2, aux_loss_coef=coef).train()
        moe(x).sum().backward()
        grads.append(moe.router.weight.grad.clone())
        assert ("router_losses" in loss_calls) == (coef > 0)
    # The attached loss reaches the router through backward: the gradient is not that of y alone.
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("grad", [False, True])
def test_preactivation_stored_only_for_a_gradient(grad, monkeypatch, device):
    seen = []
    real = grouped_mlp_ops._fwd_impl

    def spy(*args):
        seen.append(args[12])  # save_preact
        return real(*args)

    monkeypatch.setattr(grouped_mlp_ops, "_fwd_impl", spy)
    moe = SparseMoE(16, 8, 4, top_k=2, lora_rank=2, backend="triton").to(device).eval()
    x = torch.randn(6, 16, device=device, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        moe(x)
    assert seen == [grad]
