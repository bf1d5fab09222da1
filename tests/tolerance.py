"""How the tests compare numbers: flash-attention's rule against an fp64 oracle, and one table of
per-dtype tolerances for plain comparisons. The tests' tolerances live here; what stays in the
test files are exact comparisons (rtol=0, atol=0), gradcheck's own settings and a few bounds tighter
than the table (e.g. 1e-12 for an fp64 formula checked against itself).

1. flash-attention's rule (assert_flash_rule), for a result in a precision that rounds: the error
   of the op under test against a high-precision oracle (fp64) may be at most twice the error that
   torch's own computation of the same thing, in the same dtype, makes against that oracle, plus a
   floor:

       max|got - ref| <= 2 * max|same_dtype - ref| + floor.atol + floor.rtol * max|ref|

   torch's own error measures how much this dtype must lose on these very inputs; the floor (a few
   ulps of the dtype at the output's scale, FLOOR) only matters where torch's error is near 0 for
   a lucky draw while ours rounds the other way.

2. A plain comparison of two results that should agree up to reassociation:
   torch.testing.assert_close(got, want, **TOL[dtype]), elementwise
   |got - want| <= atol + rtol * |want|.

3. A norm-wise bound against an oracle (assert_max_err): max|got - want| <= atol + rtol * max|want|,
   for outputs whose small elements carry the cancellation error of large sums (GEMM outputs and
   gradients against the fp64 oracle, where an elementwise rtol would be meaningless).

Named bounds below the tables are the exceptions: each is the bound a test had before this module
existed, kept because that test needs it or because it is tighter than the table (the comment says
which and why). Moving a test onto this module never loosened it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Bound(NamedTuple):
    """atol + rtol * max|ref|: a norm-wise tolerance, or the floor of flash-attention's rule."""

    atol: float = 0.0
    rtol: float = 0.0

    def at(self, ref: torch.Tensor) -> float:
        return self.atol + self.rtol * amax(ref)


def amax(t: torch.Tensor) -> float:
    """Largest magnitude (in fp64), 0 for an empty tensor."""
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| in fp64, 0 for empty tensors."""
    return amax(got.detach().double() - want.detach().double())


def _check_like(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"


# ----------------------------------------------------------------------------------------------
# 1. flash-attention's rule
# ----------------------------------------------------------------------------------------------

# Default floors, per dtype of the result under test.
FLOOR = {
    # fp32 (a path that sums in another order than torch, e.g. per-expert blocks vs one GEMM):
    # 1e-5 of the output's scale, ~80 fp32 ulps. (torch grouped MLP)
    torch.float32: Bound(rtol=1e-5),
    # fp16: 2^-10, half an fp16 ulp at magnitude 2-4, where torch's own error can be 0 for a lucky
    # draw while ours rounds the other way. (permute / combine)
    torch.float16: Bound(atol=2.0**-10),
    # bf16: 2^-7, half a bf16 ulp at magnitude 2-4. (permute / combine)
    torch.bfloat16: Bound(atol=2.0**-7),
}


def assert_flash_rule(got: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor, *,
                      floor: Optional[Bound] = None, what: str = "") -> None:
    """flash-attention's rule: max|got - ref| <= 2 * max|same_dtype - ref| + floor.

    got: the op under test; same_dtype: torch's own computation of the same quantity in got's dtype;
    ref: the oracle in high precision (fp64, or fp32 where the host model only runs in fp32).
    floor: FLOOR[got.dtype] unless a test keeps its own (the named floors below).
    """
    _check_like(got, ref, what)
    _check_like(same_dtype, ref, what)
    assert got.dtype == same_dtype.dtype, f"{what}: {got.dtype} vs torch's {same_dtype.dtype}"
    if not got.numel():
        return
    floor = FLOOR[got.dtype] if floor is None else floor
    err, base = max_err(got, ref), max_err(same_dtype, ref)
    bound = 2 * base + floor.at(ref)
    assert err <= bound, (f"{what}: max error {err:.3g} > {bound:.3g} allowed (torch {got.dtype} error "
                          f"{base:.3g}, max |ref| {amax(ref):.3g})")


# Floors that tests keep from before this module, each looser than FLOOR's entry at some scale:
# GEMM outputs and gradients (grouped GEMM kernels, rank-gated LoRA in fp16): 1e-3, fp16's ulp at
# unit scale, plus 1e-3 of the output's scale (sums of H or F products reach |values| of ~10).
# The grouped GEMM tests use it for bf16 too, where it is tighter than bf16's own ulp.
FLOOR_GEMM = Bound(atol=1e-3, rtol=1e-3)
# The rank-gated LoRA layer in bf16 (GPU only): the same at bf16's ulp, 8e-3.
FLOOR_GEMM_BF16 = Bound(atol=8e-3, rtol=8e-3)
# The torch grouped MLP in bf16: 3e-2 of the output's scale, ~4 bf16 ulps, because its per-expert
# blocks and plain autograd round the bf16 GEMM chain (two GEMMs, LoRA and gates) in another order.
FLOOR_TORCH_GROUPED_MLP_BF16 = Bound(rtol=3e-2)
# The fp32 router logits of 16-bit operands on a GPU: fp32 sums of exact products in another order
# than torch's upcast GEMM, 1e-5 at unit scale (GPU only, so not re-measured).
FLOOR_ROUTER_LOGITS = Bound(atol=1e-5)
# Whole transformers models (fp16 / bf16) against their fp32 selves: a few ulps of logits of size
# ~1 after several layers (fp16 eps ~1e-3, bf16 eps ~8e-3).
FLOOR_HF_LOGITS = {torch.float16: Bound(atol=1e-3), torch.bfloat16: Bound(atol=1e-2)}


# ----------------------------------------------------------------------------------------------
# 2. Plain elementwise comparisons: torch.testing.assert_close(got, want, **TOL[dtype])
# ----------------------------------------------------------------------------------------------

TOL = {
    # fp64: only the order of sums differs; 1e-10 relative is ~1e6 fp64 ulps of margin.
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    # fp32: sums of up to a few hundred terms in another order (Triton tiles vs torch's GEMMs),
    # ~80 ulps relative; 1e-6 absolute for elements that cancel to ~0.
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # fp16 / bf16: one ulp of the dtype (2^-10, 2^-7) where two paths round the same fp32 value
    # on either side of a rounding boundary.
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}

# Comparisons that keep the bound they had, which differs from TOL's (looser at some scale unless
# said otherwise), with the reason:
# fp32 results with elements that cancel to ~0 (weight gradients summed over rows, outputs of a
# whole layer): those keep the absolute rounding of the large terms they cancel, ~1e-6 measured
# for the fused vs unfused combine, so 1e-5 absolute where TOL[fp32] has 1e-6.
FP32_CANCELLING = dict(rtol=1e-5, atol=1e-5)
# The baselines (per-token loops, one-hot dispatch, PEFT's delta-W, grouped_mm) against the layer,
# gradients included: other GEMM shapes sum in other orders; measured here up to 3.4e-6 absolute
# and 8.4e-5 relative on single elements (TOL[fp32] fails), so 1e-4 relative and 1e-5 absolute.
BASELINES_FP32 = dict(rtol=1e-4, atol=1e-5)
# Gradients of a whole transformers model (fp32) through our experts against its own eager ones:
# backward through attention, norms and several MoE layers reassociates every sum, ~1e-4 relative.
HF_GRAD_FP32 = dict(rtol=1e-4, atol=1e-6)
# A whole model with its MoE layers on the Triton kernels (fp32; the interpreter on CPU) against
# the host's own experts, PEFT's merged W + s B A or a naive loop, logits and LoRA gradients: the
# kernels' tiles reassociate every sum of every layer, and the differences compound through the
# layers (and through backward for the gradients).
MODEL_TRITON_FP32 = dict(rtol=1e-4, atol=1e-4)
MODEL_TRITON_GRAD_FP32 = dict(rtol=1e-3, atol=1e-5)
# Two fp32 paths through the same arithmetic that differ in one rounding (r * (1/r) for a uniform
# rank gate, the gather inside the GEMM vs a permuted copy): tighter than TOL[fp32] in rtol.
# (Tighter, not looser: kept so those tests stay as strict as they were.)
SAME_MATH_FP32 = dict(rtol=1e-6, atol=1e-6)
# The Triton path against the torch path through a whole layer (router, GEMMs, combine and their
# backward, each reassociated): errors compound over the chain, 2e-5 in both.
TRITON_VS_TORCH_FP32 = dict(rtol=2e-5, atol=2e-5)
# Under fp16 autocast, the Triton kernels against the torch path: both round the fp32 sums of the
# same fp16 operands to fp16, so outputs may differ by ~2 fp16 ulps, and the fp32 master
# gradients, summed from those fp16 values, by 10x that.
AUTOCAST_FP16_TRITON = dict(rtol=2e-3, atol=2e-3)
AUTOCAST_FP16_TRITON_GRAD = dict(rtol=2e-2, atol=2e-2)
# On a GPU under autocast, the kernels against the casts written by hand (cuBLAS): a few ulps of
# the dtype in the output, 10x in the gradients (GPU only, so not re-measured).
AUTOCAST_GPU = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=3e-3, atol=3e-3)}
AUTOCAST_GPU_GRAD = {dt: dict(rtol=10 * t["rtol"], atol=10 * t["atol"]) for dt, t in AUTOCAST_GPU.items()}
# d(routing weights) in fp16 (top_k_weights in the model dtype): a sum over H products rounded
# once to fp16 on each path, so ~2 fp16 ulps relative and 1e-3 absolute near 0.
FP16_WEIGHT_GRAD = dict(rtol=2e-3, atol=1e-3)
# The last rows of a 2^31-element bf16 combine on a GPU (GPU only, so not re-measured).
BF16_LARGE_GPU = dict(rtol=1e-2, atol=1e-2)
# The router's gradient of the aux losses (fp32) against fp64: a softmax Jacobian product summed
# over all tokens, 1e-4 relative as the test had (1e-5 also holds on CPU; the GPU's reductions are
# not re-measured); 1e-7 absolute (tighter than TOL[fp32]) for the many elements near 0.
ROUTER_LOSS_GRAD_FP32 = dict(rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 3. Norm-wise bounds: max|got - want| <= atol + rtol * max|want|
# ----------------------------------------------------------------------------------------------


def assert_max_err(got: torch.Tensor, want: torch.Tensor, bound: Bound, *, what: str = "") -> None:
    """max|got - want| <= bound.atol + bound.rtol * max|want| (and equal shapes)."""
    _check_like(got, want, what)
    err, tol = max_err(got, want), bound.at(want)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} allowed (max |want| {amax(want):.3g})"


# An fp32 kernel (Triton's fp32 dots, fp32 accumulation) against the fp64 oracle: 2e-5 at unit
# scale and of the output's scale.
ORACLE_FP32 = Bound(atol=2e-5, rtol=2e-5)
# TF32 keeps 10 mantissa bits: relative error about 1e-3 at unit-scale outputs, 1e-2 allowed.
ORACLE_TF32 = Bound(atol=1e-2, rtol=1e-2)
# A CUDA graph replay against an eager call in bf16: the order of atomic sums (a few bf16 ulps,
# eps 7.8e-3) of the output's scale; a stale replay is off by the scale itself.
GRAPH_REPLAY_BF16 = Bound(rtol=2e-2)
# Expert parallelism in fp16 / bf16 against the single-process layer: the EP layer sums an
# expert's rows from all ranks in one GEMM where the oracle adds per-rank gradients in the low
# precision (benchmarks/harness.py's rule). bf16 keeps 8 mantissa bits, fp16 11.
EXPERT_PARALLEL = {torch.float16: Bound(atol=1e-3, rtol=1e-2), torch.bfloat16: Bound(atol=1e-2, rtol=3e-2)}
