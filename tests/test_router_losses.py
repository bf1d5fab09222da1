"""ops.gating.router_losses (losses from the gating pass's statistics) equals ops.load_balancing_loss
and ops.z_loss in value and in every gradient, on the Triton and torch paths."""

from __future__ import annotations

import pytest
import torch
from tolerance import ROUTER_LOSS_GRAD_FP32, TOL

from unimoe_kernels import ops, reference
from unimoe_kernels.ops import build_routing
from unimoe_kernels.ops.gating import router_losses, topk_gating


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("t", [0, 1, 37, 130])  # empty, one token, partial and several programs
def test_equals_the_reference_losses(backend, scoring, t, device):
    e, k = 12, 3
    g = torch.Generator().manual_seed(t)
    logits = (3 * torch.randn(t, e, generator=g, dtype=torch.float64)).float().to(device).requires_grad_()
    gating, stats = topk_gating(logits, k, scoring=scoring, backend=backend, return_stats=True)
    plan = build_routing(gating.ids, e)
    lbl, z = router_losses(gating, stats, plan.tokens_per_expert, e, scoring)
    w_lbl, w_z = 0.7, 0.3
    grad = torch.autograd.grad(w_lbl * lbl + w_z * z, logits, allow_unused=True)[0]

    ref_logits = logits.detach().double().requires_grad_()
    ref = reference.topk_gating(ref_logits, k, scoring=scoring)
    ref_lbl = ops.load_balancing_loss(ref.scores, ref.ids, e, scoring)
    ref_z = ops.z_loss(ref.logits)
    assert torch.equal(gating.ids.cpu().long(), ref.ids.cpu().long())
    torch.testing.assert_close(lbl.double(), ref_lbl, **TOL[torch.float32])  # fp32 losses against fp64
    torch.testing.assert_close(z.double(), ref_z, **TOL[torch.float32])
    if t == 0:
        assert lbl.item() == 0.0 and z.item() == 0.0
        return
    ref_grad = torch.autograd.grad(w_lbl * ref_lbl + w_z * ref_z, ref_logits)[0]
    torch.testing.assert_close(grad.double(), ref_grad, **ROUTER_LOSS_GRAD_FP32)


def test_stats_of_one_pass(device):
    """The statistics themselves: logsumexp per row and column sums of the probabilities."""
    logits = torch.randn(70, 9, device=device)
    for scoring in ("softmax", "sigmoid"):
        gating, stats = topk_gating(logits, 2, scoring=scoring, backend="triton", return_stats=True)
        probs = gating.scores if scoring == "softmax" else gating.scores / gating.scores.sum(-1, keepdim=True)
        torch.testing.assert_close(stats.lse, torch.logsumexp(logits, -1), **TOL[torch.float32])
        torch.testing.assert_close(stats.prob_sums, probs.sum(0), **TOL[torch.float32])
