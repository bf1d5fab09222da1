"""Triton top-k gating (ops.topk_gating with backend="triton") against reference.topk_gating.

Under no CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors in the
interpreter; with a GPU the same tests run on it. Every test forces backend="triton" and compares
ids exactly and values and gradients (torch.autograd.grad of a random weighted sum of weights and
scores, the latter standing in for the aux losses) with the torch path.
"""

import os
import subprocess
import sys

import pytest
import torch
from tolerance import TOL

from unimoe_kernels import ops, reference

# Router math runs in fp32 on both paths, so fp32 and fp16 logits share the fp32 tolerance for
# values; gradients to fp16 (bf16) logits are rounded to fp16 (bf16) by the cast's backward on both
# paths, so they may differ by one ulp of that dtype where the fp32 values straddle a rounding
# boundary: TOL[dtype of the logits].
FP32 = TOL[torch.float32]


def _both(logits, k, **kw):
    """(triton GatingOutput, reference GatingOutput) on two independent leaves holding the same logits."""
    a = logits.detach().clone().requires_grad_(True)
    b = logits.detach().clone().requires_grad_(True)
    return a, ops.topk_gating(a, k, backend="triton", **kw), b, reference.topk_gating(b, k, **kw)


def _check(logits, k, *, grad_dtype=torch.float32, **kw):
    a, out, b, ref = _both(logits, k, **kw)
    assert out.ids.dtype == torch.int32 and out.weights.dtype == torch.float32 and out.scores.dtype == torch.float32
    assert torch.equal(out.ids, ref.ids), f"ids differ:\n{out.ids}\n{ref.ids}"
    torch.testing.assert_close(out.scores, ref.scores, **FP32)
    torch.testing.assert_close(out.weights, ref.weights, **FP32)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    if logits.shape[0] == 0:
        return out
    # Random cotangents: a structured one (e.g. all ones) would hide errors that cancel in sums.
    gw = torch.randn_like(ref.weights)
    gs = torch.randn_like(ref.scores)
    (da,) = torch.autograd.grad((out.weights * gw).sum() + (out.scores * gs).sum(), a)
    (db,) = torch.autograd.grad((ref.weights * gw).sum() + (ref.scores * gs).sum(), b)
    assert da.dtype == logits.dtype
    torch.testing.assert_close(da, db, **TOL[grad_dtype])
    return out


# (T, E, k, options, why)
CASES = [
    (1, 8, 2, dict(), "one token, Mixtral-style softmax + renormalised top-2"),
    (5, 7, 3, dict(), "prime E (padded to 8 with -inf), k not a power of two, T < BLOCK_T"),
    (70, 13, 1, dict(scoring="sigmoid"), "T > BLOCK_T=64 (two programs, masked tail), k = 1"),
    (9, 13, 13, dict(), "k = E: every expert chosen, renormalised weights = softmax"),
    (9, 13, 13, dict(normalize=False, scaling_factor=0.5), "k = E without renormalisation"),
    (17, 97, 5, dict(scoring="sigmoid", expert_bias=True), "E = 97 (padded to 128), bias for selection only"),
    (11, 6, 4, dict(normalize=False), "no renormalisation: weights are raw softmax scores"),
    (11, 6, 2, dict(scaling_factor=2.5), "scaling_factor after renormalisation"),
    (12, 16, 4, dict(scoring="sigmoid", expert_bias=True, n_groups=4, topk_groups=2, scaling_factor=2.5),
     "DeepSeek-V3 style: sigmoid + bias, 4 groups of 4, best 2 groups"),
    (10, 256, 8, dict(scoring="sigmoid", expert_bias=True, n_groups=8, topk_groups=4, scaling_factor=2.5),
     "DeepSeek-V3 router: E=256, 8 groups, best 4, k=8; BLOCK_T=8 so two programs"),
    (12, 12, 3, dict(n_groups=12, topk_groups=5), "groups of one expert: group score is that expert's"),
    (12, 12, 4, dict(expert_bias=True, n_groups=3, topk_groups=1), "one group kept: all k from it"),
    (12, 15, 2, dict(n_groups=5), "n_groups without topk_groups keeps every group (odd group size 3)"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,e,k,opts,why", CASES, ids=[c[-1][:40] for c in CASES])
def test_matches_reference(device, dtype, t, e, k, opts, why):
    opts = dict(opts)
    if opts.pop("expert_bias", False):
        # Bias comparable to the score gaps so that it really changes the choice.
        opts["expert_bias"] = 0.3 * torch.randn(e, device=device)
    logits = (2 * torch.randn(t, e, device=device)).to(dtype)
    _check(logits, k, grad_dtype=dtype, **opts)


def test_bias_changes_selection_but_not_weights(device):
    # Guards the property the bias exists for: a huge bias on expert 0 makes it always chosen, but
    # its weight is its unbiased score.
    logits = torch.randn(8, 6, device=device)
    bias = torch.zeros(6, device=device)
    bias[0] = 100.0
    out = _check(logits, 2, expert_bias=bias, normalize=False)
    assert torch.all(out.ids[:, 0] == 0)
    torch.testing.assert_close(out.weights[:, 0], torch.softmax(logits, -1)[:, 0], **FP32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_ties_go_to_lowest_index(device, scoring, k):
    # All-equal logits (7 experts, padded to 8): every score ties, ids must be 0..k-1 in order.
    logits = torch.full((5, 7), 0.25, device=device)
    out = _check(logits, k, scoring=scoring)
    assert torch.equal(out.ids.cpu(), torch.arange(k, dtype=torch.int32).expand(5, k))


def test_group_ties_go_to_lowest_group(device):
    # 4 groups of 2 with equal group scores: the best 2 groups are 0 and 1, so ids come from 0..3.
    logits = torch.zeros(3, 8, device=device)
    out = _check(logits, 2, n_groups=4, topk_groups=2)
    assert torch.equal(out.ids.cpu(), torch.tensor([[0, 1]] * 3, dtype=torch.int32))


def test_tied_second_best_counts_in_group_score(device):
    # Group 0 = (5, 5), group 1 = (6, 0): top-2 sums 10 vs 6, so group 0 wins even though group 1
    # holds the single best expert. A group score that dropped every copy of the max would pick 1.
    logits = torch.tensor([[5.0, 5.0, 6.0, 0.0]], device=device)
    out = _check(logits, 1, scoring="sigmoid", n_groups=2, topk_groups=1)
    assert out.ids.item() == 0


def test_every_token_to_one_expert(device):
    # Expert 3 dominates every row: all first choices are 3.
    logits = torch.randn(10, 5, device=device)
    logits[:, 3] += 20.0
    out = _check(logits, 2)
    assert torch.all(out.ids[:, 0] == 3)


def test_empty_batch(device):
    # T = 0: empty outputs of the right shapes and dtypes, and no kernel launch.
    logits = torch.empty(0, 6, device=device)
    out = _check(logits, 2)
    assert out.weights.shape == (0, 2) and out.ids.shape == (0, 2) and out.scores.shape == (0, 6)
    a = logits.clone().requires_grad_(True)
    o = ops.topk_gating(a, 2, backend="triton")
    (g,) = torch.autograd.grad(o.weights.sum() + o.scores.sum(), a)
    assert g.shape == (0, 6)


def test_non_contiguous_logits(device):
    # Column stride 2 (every other expert of a wider tensor) and a transposed view.
    wide = torch.randn(9, 14, device=device)
    _check(wide[:, ::2], 3)
    tall = torch.randn(7, 9, device=device)
    _check(tall.t(), 2, scoring="sigmoid")


# The interpreter's numpy exp(200) overflows to inf on the way to sigmoid(-200) = 0, as on a GPU.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_all_zero_sigmoid_row(device):
    # sigmoid(-200) underflows to 0 in fp32: renormalisation divides by the 1e-20 floor on both
    # paths, weights stay 0 and finite, and the clamp blocks the denominator's gradient.
    logits = torch.randn(4, 6, device=device)
    logits[1] = -200.0
    out = _check(logits, 2, scoring="sigmoid")
    assert torch.isfinite(out.weights).all() and torch.all(out.weights[1] == 0)


@pytest.mark.parametrize("which", ["weights", "scores"])
def test_one_cotangent_only(device, which):
    # Only d(weights) or only d(scores) reaches the backward (the other is None in the Function).
    logits = torch.randn(6, 7, device=device)
    a, out, b, ref = _both(logits, 3, scoring="sigmoid")
    (da,) = torch.autograd.grad(getattr(out, which).pow(2).sum(), a)
    (db,) = torch.autograd.grad(getattr(ref, which).pow(2).sum(), b)
    torch.testing.assert_close(da, db, **FP32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_aux_losses_backprop_through_kernel(device, scoring):
    # The aux losses of reference.py applied to the kernel's outputs train the router like the
    # torch path: load-balancing loss through the scores, z-loss through the returned logits.
    logits = torch.randn(20, 7, device=device)
    a, out, b, ref = _both(logits, 2, scoring=scoring)
    loss_a = ops.load_balancing_loss(out.scores, out.ids, 7, scoring) + 0.1 * ops.z_loss(out.logits)
    loss_b = ops.load_balancing_loss(ref.scores, ref.ids, 7, scoring) + 0.1 * ops.z_loss(ref.logits)
    torch.testing.assert_close(loss_a, loss_b, **FP32)
    (da,) = torch.autograd.grad(loss_a + out.weights.sum(), a)
    (db,) = torch.autograd.grad(loss_b + ref.weights.sum(), b)
    torch.testing.assert_close(da, db, **FP32)


def test_fp64_takes_torch_path(device):
    # fp64 logits keep fp64 end to end (gradcheck relies on it), so they bypass the fp32 kernel.
    logits = torch.randn(3, 5, dtype=torch.float64, device=device)
    out = ops.topk_gating(logits, 2, backend="triton")
    ref = reference.topk_gating(logits, 2)
    assert out.weights.dtype == out.scores.dtype == torch.float64
    assert torch.equal(out.ids, ref.ids)
    for name in ("weights", "scores", "logits"):  # the torch path itself: the very same values
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=7), ValueError, "top_k"),
        (dict(top_k=2, scoring="relu"), ValueError, "scoring"),
        (dict(top_k=2, n_groups=4), ValueError, "n_groups"),
        (dict(top_k=2, n_groups=3, topk_groups=4), ValueError, "topk_groups"),
        (dict(top_k=2, expert_bias=torch.zeros(5)), ValueError, "expert_bias"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ops.topk_gating(torch.randn(4, 6), backend="triton", **kwargs)


def test_integer_like_arguments(device):
    # numpy integers (e.g. from a config parsed with numpy) are ints; a float top_k is not.
    np = pytest.importorskip("numpy")
    logits = torch.randn(4, 6, device=device)
    out = ops.topk_gating(logits, np.int64(2), n_groups=np.int64(3), topk_groups=np.int64(2), backend="triton")
    ref = reference.topk_gating(logits, 2, n_groups=3, topk_groups=2)
    assert torch.equal(out.ids, ref.ids)
    with pytest.raises(TypeError, match="top_k"):
        ops.topk_gating(logits, 2.0, backend="triton")


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        ops.topk_gating(torch.randn(4), 1, backend="triton")
    with pytest.raises(TypeError, match="logits"):
        ops.topk_gating(torch.zeros(4, 6, dtype=torch.int64), 1, backend="triton")


def test_import_does_not_import_triton():
    code = "import sys, unimoe_kernels; print('triton' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,opts,why", CASES, ids=[c[-1][:40] for c in CASES])
def test_bf16_logits_on_gpu(t, e, k, opts, why):
    # bf16 only on a GPU: the interpreter mis-handles bf16 silently.
    opts = dict(opts)
    if opts.pop("expert_bias", False):
        opts["expert_bias"] = 0.3 * torch.randn(e, device="cuda")
    logits = (2 * torch.randn(t, e, device="cuda")).to(torch.bfloat16)
    a, out, b, ref = _both(logits, k, **opts)
    assert torch.equal(out.ids, ref.ids)
    torch.testing.assert_close(out.weights, ref.weights, **FP32)
    gw = torch.randn_like(ref.weights)
    (da,) = torch.autograd.grad((out.weights * gw).sum(), a)
    (db,) = torch.autograd.grad((ref.weights * gw).sum(), b)
    torch.testing.assert_close(da, db, **TOL[torch.bfloat16])  # one bf16 ulp (2^-7 relative)


@pytest.mark.gpu
def test_large_batch_on_gpu():
    # A realistic router batch (qwen3-30b-a3b: E=128, k=8) with many programs.
    logits = torch.randn(8192, 128, device="cuda")
    _check(logits, 8)
