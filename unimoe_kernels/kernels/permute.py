"""Triton kernels of token permutation and the weighted combine (launched by unimoe_kernels.ops.permute).

With N = T*K slots, slot s = t*K + j, plan.sorted_slots (sorted row -> slot) and plan.slot_rows
(slot -> sorted row), a permutation of 0..N-1:

    permute_gather_kernel   x [T, H] -> x_sorted [N, H]; x_sorted[r] = x[sorted_slots[r] // K]
    combine_kernel          y_sorted [N, H] -> out [T, H]; out[t] = sum_j w[t, j] y_sorted[slot_rows[t*K + j]]
                            (w = 1 without weights: this is also the backward of the permute)
    combine_bwd_kernel      dout [T, H] -> dy_sorted[slot_rows[t*K + j]] = w[t, j] dout[t]  and
                            d(w)[t, j] = <dout[t], y_sorted[slot_rows[t*K + j]]>

Every output row is written by exactly one program and every reduction runs over a token's K rows
inside one program, so nothing needs atomics and the results are bitwise deterministic. Sums run in
fp32 whatever the storage dtype. H is walked in BLOCK_H chunks with unit-stride, masked loads (any
H, odd ones included); row offsets are int64 because N * H passes 2^31 at real sizes
(T=32768, K=10, H=2048 already gives 6.7e8 elements; x4 bytes in pointer math of larger models).
"""

import triton
import triton.language as tl


@triton.jit
def permute_gather_kernel(
    x_ptr,  # [T, H] fp32/fp16/bf16, row stride stride_x, unit column stride
    sorted_slots_ptr,  # [N] int32, sorted row -> slot
    out_ptr,  # [N, H] x's dtype, contiguous, written
    N,
    H,
    stride_x,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    slot = tl.load(sorted_slots_ptr + rows, mask=rmask, other=0)
    tok = (slot // K).to(tl.int64)
    src = x_ptr + tok[:, None] * stride_x
    dst = out_ptr + rows[:, None] * H
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = rmask[:, None] & (cols < H)[None, :]
        v = tl.load(src + cols[None, :], mask=m, other=0.0)
        tl.store(dst + cols[None, :], v, mask=m)


@triton.jit
def combine_kernel(
    y_ptr,  # [N, H] fp32/fp16/bf16, row stride stride_y, unit column stride
    slot_rows_ptr,  # [T*K] int32, slot -> sorted row
    w_ptr,  # [T, K] any float, row stride stride_w, unit column stride; read only when HAS_WEIGHTS
    out_ptr,  # [T, H] contiguous, written in its own dtype (y's for the combine, x's for d(x))
    T,
    H,
    stride_y,
    stride_w,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    toks = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = tmask[:, None] & (cols < H)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
        # The K row indices and weights are re-read per H chunk: they are a few bytes per token and
        # stay in L1/L2, while holding a whole [BLOCK_T, H] accumulator would not fit in registers.
        for j in range(K):
            r = tl.load(slot_rows_ptr + toks * K + j, mask=tmask, other=0).to(tl.int64)
            v = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(w_ptr + toks * stride_w + j, mask=tmask, other=0.0).to(tl.float32)
                acc += w[:, None] * v
            else:
                acc += v
        tl.store(out_ptr + toks[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def combine_bwd_kernel(
    dout_ptr,  # [T, H] y's dtype, row stride stride_do (0 for an expanded gradient), unit column stride
    y_ptr,  # [N, H] row stride stride_y, unit column stride; read only when HAS_DW
    slot_rows_ptr,  # [T*K] int32, slot -> sorted row
    w_ptr,  # [T, K] any float, row stride stride_w, unit column stride; read only when HAS_DY
    dy_ptr,  # [N, H] y's dtype, contiguous; written only when HAS_DY
    dw_ptr,  # [T, K] fp32 contiguous; written only when HAS_DW
    T,
    H,
    stride_do,
    stride_y,
    stride_w,
    K: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    toks = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    kcols = tl.arange(0, BLOCK_K)
    dw_acc = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    # H outside, K inside: each dout chunk is read once and serves all K rows of its token.
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        m = tmask[:, None] & (cols < H)[None, :]
        g = tl.load(dout_ptr + toks[:, None] * stride_do + cols[None, :], mask=m, other=0.0).to(tl.float32)
        for j in range(K):
            r = tl.load(slot_rows_ptr + toks * K + j, mask=tmask, other=0).to(tl.int64)
            if HAS_DY:
                w = tl.load(w_ptr + toks * stride_w + j, mask=tmask, other=0.0).to(tl.float32)
                dy = (w[:, None] * g).to(dy_ptr.dtype.element_ty)
                tl.store(dy_ptr + r[:, None] * H + cols[None, :], dy, mask=m)
            if HAS_DW:
                v = tl.load(y_ptr + r[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
                d = tl.sum(g * v, axis=1)
                dw_acc += tl.where(kcols[None, :] == j, d[:, None], 0.0)
    if HAS_DW:
        tl.store(dw_ptr + toks[:, None] * K + kcols[None, :], dw_acc, mask=tmask[:, None] & (kcols < K)[None, :])
