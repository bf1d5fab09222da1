"""Token permutation into expert order and the weighted combine back.

    x [T, H] --permute(plan)--> x_sorted [T*k, H]  (row r = token sorted_slots[r] // k)
    y_sorted [T*k, H] --unpermute(plan, weights [T, k])--> out [T, H] in y_sorted's dtype
        out[t] = sum_j weights[t, j] * y_sorted[slot_rows[t*k + j]]   (k reads, fp32 sums, no atomics)

Backward (Triton path, kernels/permute.py), still no atomics and deterministic:
    permute:   dx[t] = sum_j dx_sorted[slot_rows[t*k + j]]          (the combine kernel with w = 1)
    unpermute: dy_sorted[slot_rows[t*k + j]] = weights[t, j] * dout[t] (one writer per row)
               d(weights)[t, j] = <dout[t], y_sorted[slot_rows[t*k + j]]> in fp32, cast to weights' dtype

Backend "triton" (CUDA tensors under "auto", or CPU tensors under TRITON_INTERPRET=1) runs the
kernels; "torch" runs reference.permute / reference.unpermute, the contract. fp64 tensors always
take the torch path so that gradcheck keeps fp64 sums.

The Triton path is the custom ops unimoe::permute_fwd, unimoe::combine_fwd (the combine; also the
permute's backward) and unimoe::combine_bwd, with fakes and autograd registered, so
torch.compile(fullgraph=True) traces them as single nodes.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backend import use_triton as _use_triton
from ..types import RoutingPlan
from .launch_utils import cdiv, next_pow2, row_block, unit_inner

# Elements of one program's [rows, BLOCK_H] tile: 16 per thread at 4 warps. Measured with ptxas for
# sm_90 (triton 3.6): 4096 made the backward kernel spill at H=97 (255 registers); 2048 fits in
# <= 212 registers without spills for fp32/fp16/bf16, H=97 and H=4096, k=8.
_TILE_ELEMS = 2048
# Widest H chunk: 512 fp32 = 2 KiB per row, 16-byte vector loads across 128 threads in one pass.
_MAX_BLOCK_H = 512


def _blocks(h: int) -> tuple[int, int]:
    """(rows per program, BLOCK_H) for a row width h (wider rows loop over BLOCK_H chunks)."""
    return row_block(h, _TILE_ELEMS, max_width=_MAX_BLOCK_H)


def _permute_impl(x, sorted_slots, top_k):
    """x [T, H] -> x_sorted [T*k, H], row r = x[sorted_slots[r] // k]; the body of unimoe::permute_fwd."""
    from ..kernels import permute as kern  # lazy: importing triton is deferred to first launch

    h = x.shape[1]
    n = sorted_slots.numel()
    out = torch.empty((n, h), dtype=x.dtype, device=x.device)
    if n > 0 and h > 0:
        x_c = unit_inner(x)
        block_r, block_h = _blocks(h)
        kern.permute_gather_kernel[(cdiv(n, block_r),)](
            x_c, sorted_slots, out, n, h, x_c.stride(0),
            K=top_k, BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4,
        )
    return out


def _combine_impl(y, slot_rows, weights, top_k):
    """out[t] = sum_j (weights[t, j] or 1) * y[slot_rows[t*k + j]], fp32 sums, y's dtype [T, H];
    the body of unimoe::combine_fwd."""
    from ..kernels import permute as kern

    num_tokens, h = slot_rows.numel() // top_k, y.shape[1]
    out = torch.empty((num_tokens, h), dtype=y.dtype, device=y.device)
    if num_tokens == 0 or h == 0:
        return out
    y = unit_inner(y)
    if weights is not None:
        weights = unit_inner(weights)
    block_t, block_h = _blocks(h)
    kern.combine_kernel[(cdiv(num_tokens, block_t),)](
        y, slot_rows, weights if weights is not None else y, out,
        num_tokens, h, y.stride(0), weights.stride(0) if weights is not None else 0,
        K=top_k, HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )
    return out


def _combine_bwd_impl(d_out, y_sorted, slot_rows, weights, top_k, need_dy, need_dw):
    """(dy_sorted [N, H] or [0], d(weights) [T, k] in weights' dtype or [0]); the body of
    unimoe::combine_bwd."""
    from ..kernels import permute as kern

    n, h = slot_rows.numel(), d_out.shape[1]
    t = n // top_k
    if weights is None:
        # The combine without weights (permute's backward) has w = 1: a gather of dout rows.
        weights = torch.ones((t, top_k), dtype=torch.float32, device=d_out.device)
    dy = torch.empty((n, h), dtype=d_out.dtype, device=d_out.device) if need_dy else d_out.new_empty((0,))
    dw = torch.zeros((t, top_k), dtype=torch.float32, device=d_out.device) if need_dw else None
    if t > 0 and h > 0 and (need_dy or need_dw):
        d_out = unit_inner(d_out)
        w = unit_inner(weights)
        y = unit_inner(y_sorted) if need_dw else None
        block_t, block_h = _blocks(h)
        kern.combine_bwd_kernel[(cdiv(t, block_t),)](
            d_out, y if y is not None else d_out, slot_rows, w,
            dy if need_dy else d_out, dw if dw is not None else w,
            t, h, d_out.stride(0), y.stride(0) if y is not None else 0, w.stride(0),
            K=top_k, HAS_DY=need_dy, HAS_DW=need_dw, BLOCK_T=block_t, BLOCK_H=block_h,
            BLOCK_K=next_pow2(top_k), num_warps=4,
        )
    if dw is None:
        dw = d_out.new_empty((0,))
    elif dw.dtype != weights.dtype:
        dw = dw.to(weights.dtype)
    return dy, dw


# Custom ops rather than autograd.Functions: torch.compile cannot trace a raw Triton launch (nor the
# lazy import before it), but treats a custom op as one opaque node traced through its fake.


@torch.library.custom_op("unimoe::permute_fwd", mutates_args=())
def permute_fwd(x: torch.Tensor, sorted_slots: torch.Tensor, slot_rows: torch.Tensor, top_k: int) -> torch.Tensor:
    """x [T, H] -> x_sorted [T*k, H]; sorted_slots, slot_rows [T*k] int32 contiguous (slot_rows is
    for the backward: dx[t] = sum of token t's k gradient rows)."""
    return _permute_impl(x, sorted_slots, top_k)


@permute_fwd.register_fake
def _(x, sorted_slots, slot_rows, top_k):
    return x.new_empty((sorted_slots.numel(), x.shape[1]))


def _permute_setup_context(ctx, inputs, output):
    _x, _sorted_slots, slot_rows, top_k = inputs
    ctx.save_for_backward(slot_rows)
    ctx.top_k = top_k
    ctx.set_materialize_grads(False)


def _permute_backward(ctx, d_sorted):
    if d_sorted is None:
        return None, None, None, None
    (slot_rows,) = ctx.saved_tensors
    # d_sorted has x's dtype (autograd casts gradients to the output's), so dx comes back in it.
    return combine_fwd(d_sorted, slot_rows, None, ctx.top_k), None, None, None


permute_fwd.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("unimoe::combine_fwd", mutates_args=())
def combine_fwd(
    y_sorted: torch.Tensor, slot_rows: torch.Tensor, weights: Optional[torch.Tensor], top_k: int
) -> torch.Tensor:
    """y_sorted [T*k, H], slot_rows [T*k] int32 contiguous, weights [T, k] (any float) or None (all 1)
    -> out [T, H] in y_sorted's dtype."""
    return _combine_impl(y_sorted, slot_rows, weights, top_k)


@combine_fwd.register_fake
def _(y_sorted, slot_rows, weights, top_k):
    return y_sorted.new_empty((slot_rows.numel() // top_k, y_sorted.shape[1]))


@torch.library.custom_op("unimoe::combine_bwd", mutates_args=())
def combine_bwd(
    d_out: torch.Tensor,
    y_sorted: Optional[torch.Tensor],
    slot_rows: torch.Tensor,
    weights: Optional[torch.Tensor],
    top_k: int,
    need_dy: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d y_sorted [T*k, H] in d_out's dtype, d weights [T, k] in weights' dtype) of combine_fwd; a
    result not asked for is [0]. y_sorted is read only for d(weights), weights only for d(y_sorted)
    (None: all 1)."""
    return _combine_bwd_impl(d_out, y_sorted, slot_rows, weights, top_k, need_dy, need_dw)


@combine_bwd.register_fake
def _(d_out, y_sorted, slot_rows, weights, top_k, need_dy, need_dw):
    n = slot_rows.numel()
    dy = d_out.new_empty((n, d_out.shape[1])) if need_dy else d_out.new_empty((0,))
    dw = weights.new_empty((n // top_k, top_k)) if need_dw else d_out.new_empty((0,))
    return dy, dw


def _combine_setup_context(ctx, inputs, output):
    y_sorted, slot_rows, weights, top_k = inputs
    # y is kept only when d(weights) will be asked for (it is the expert output: big).
    need_dw = weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(y_sorted if need_dw else None, slot_rows, weights)
    ctx.top_k = top_k
    ctx.set_materialize_grads(False)


def _combine_backward(ctx, d_out):
    if d_out is None:
        return None, None, None, None
    y_sorted, slot_rows, weights = ctx.saved_tensors
    need_dy = ctx.needs_input_grad[0]
    need_dw = weights is not None and ctx.needs_input_grad[2]
    if not (need_dy or need_dw):
        return None, None, None, None
    dy, dw = combine_bwd(d_out, y_sorted, slot_rows, weights, ctx.top_k, need_dy, need_dw)
    return dy if need_dy else None, None, dw if need_dw else None, None


combine_fwd.register_autograd(_combine_backward, setup_context=_combine_setup_context)


def _check_plan(plan: RoutingPlan, argument: str = "plan") -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{argument} must be a RoutingPlan (from ops.build_routing), got {type(plan).__name__}")


def permute(x: torch.Tensor, plan: RoutingPlan, top_k: int, *, backend: str = "auto") -> torch.Tensor:
    """Gather the rows of x [T, H] into expert-sorted order [T*k, H] (differentiable in x)."""
    _check_plan(plan)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.shape[0] * top_k != plan.sorted_slots.numel():
        raise ValueError(
            f"x must be [T, H] with T*top_k = {plan.sorted_slots.numel()} routed slots, got {tuple(x.shape)}"
        )
    if plan.sorted_slots.device != x.device:
        raise ValueError(f"plan is on {plan.sorted_slots.device} but x is on {x.device}")
    if not _use_triton(backend, x):
        return reference.permute(x, plan, top_k)
    return permute_fwd(x, _index32(plan.sorted_slots), _index32(plan.slot_rows), top_k)


def unpermute(
    y_sorted: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Weighted combine of expert rows [T*k, H] back to tokens [T, H] with weights [T, k].

    Differentiable in y_sorted and weights; the output has y_sorted's dtype, sums run in fp32.
    """
    _check_plan(plan)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = getattr(weights, "dtype", type(weights).__name__)
        raise TypeError(f"weights must be a floating torch.Tensor, got {got}")
    if not isinstance(y_sorted, torch.Tensor) or not y_sorted.is_floating_point():
        got = getattr(y_sorted, "dtype", type(y_sorted).__name__)
        raise TypeError(f"y_sorted must be a floating torch.Tensor, got {got}")
    if weights.dim() != 2 or weights.numel() != plan.slot_rows.numel():
        raise ValueError(f"weights must be [T, k] with T*k = {plan.slot_rows.numel()}, got {tuple(weights.shape)}")
    if y_sorted.dim() != 2 or y_sorted.shape[0] != weights.numel():
        raise ValueError(f"y_sorted must be [T*k={weights.numel()}, H], got {tuple(y_sorted.shape)}")
    if weights.device != y_sorted.device or plan.slot_rows.device != y_sorted.device:
        raise ValueError(
            f"y_sorted ({y_sorted.device}), weights ({weights.device}) and plan ({plan.slot_rows.device}) "
            "must be on one device"
        )
    # k = 0 leaves T unrecoverable from the plan's T*k slots; its output (zeros) needs no kernel.
    if not _use_triton(backend, y_sorted) or weights.dtype == torch.float64 or weights.shape[1] == 0:
        return reference.unpermute(y_sorted, plan, weights)
    return combine_fwd(y_sorted, _index32(plan.slot_rows), weights, weights.shape[1])


def _index32(idx: torch.Tensor) -> torch.Tensor:
    """Plan indices as contiguous int32 (what build_routing gives; a cast only for hand-made plans)."""
    if idx.dtype != torch.int32:
        idx = idx.to(torch.int32)
    return idx.contiguous()
