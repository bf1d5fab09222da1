"""Per-expert X^T Y over expert-sorted rows: the weight gradients of the expert MLP.

out[e] = scale * X[rows of e]^T @ Y'[rows of e] for every expert e (launcher:
ops/grouped_gemm_launch.py): dW = dz^T x, dA = s (dz B)^T x', dB = s dz^T (x A^T), and the same on
the down projection. Y' is Y under LoRA dropout when Y is a LoRA input (DROPOUT_Y), and Y's rows
may be gathered on load (GATHER_Y: Y is the token matrix). An expert with no rows writes zeros.

Launch order: one program per (expert, output tile), expert-major, the output tiles of one expert
in GROUP_P-swizzled order. Programs in flight then work on the same expert and share its rows of
X and Y in L2; with the expert on the fastest axis they would each stream another expert's rows.

K loop: the expert's rows in BLOCK_K steps, split in two. The full steps (every row inside the
expert) take unmasked loads straight into the MMA's shared-memory operands: TMA for sorted
operands, 16-byte cp.async for gathered rows (columns past the edge masked, in runs the loads keep
whole), so the compiler software-pipelines them (loads num_stages - 1
steps ahead, MMAs in flight across steps). The one ragged step at the expert's end, if any, loads
with row masks: rows of the next expert must add nothing, even when they hold inf or NaN.
"""

import triton
import triton.language as tl

from .gemm_common import _dropout_keep, _swizzle


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A tile through pointers, masked (zero) only on the axes that need it: an unmasked load, or
    one whose mask is constant along the contiguous axis, stays whole-vector."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok, other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _xty_step(acc, r0, offs_k, end, offs_p, offs_q, P, Q,
              x_ptr, stride_xm, stride_xp, x_desc, y_ptr, stride_ym, stride_yq, y_desc,
              gather_ptr, seed_ptr, drop_p, drop_scale,
              p0, q0, MASKED: tl.constexpr, DROPOUT_Y: tl.constexpr, GATHER_Y: tl.constexpr,
              DOT_PRECISION: tl.constexpr, X_DESC: tl.constexpr, Y_DESC: tl.constexpr, EVEN_P: tl.constexpr,
              EVEN_Q: tl.constexpr, SWAP: tl.constexpr):
    """acc += X[r0 : r0 + BLOCK_K]^T Y'[same rows]; MASKED: rows at or past `end` read as zero.
    Columns past P or Q read as zero: TMA fills them, pointer loads mask them (a mask constant over
    runs of 16 columns keeps the loads vectorised, where clamped indices would not)."""
    rows = r0 + offs_k
    in_k = rows < end  # used only when MASKED
    if X_DESC and not MASKED:
        xt = x_desc.load([r0.to(tl.int32), p0]).T
    else:
        xt = _load_tile(x_ptr + rows[None, :] * stride_xm + offs_p[:, None] * stride_xp, in_k[None, :],
                        (offs_p < P)[:, None], MASKED, not EVEN_P)
    if Y_DESC and not MASKED:
        yt = y_desc.load([r0.to(tl.int32), q0])
    else:
        if GATHER_Y and MASKED:
            y_rows = tl.load(gather_ptr + rows, mask=in_k, other=0).to(tl.int64)
        elif GATHER_Y:
            y_rows = tl.load(gather_ptr + rows).to(tl.int64)
        else:
            y_rows = rows
        yt = _load_tile(y_ptr + y_rows[:, None] * stride_ym + offs_q[None, :] * stride_yq, in_k[:, None],
                        (offs_q < Q)[None, :], MASKED, not EVEN_Q)
    if DROPOUT_Y:
        keep = _dropout_keep(tl.load(seed_ptr), rows, offs_q, Q, drop_p)
        yt = tl.where(keep, yt * drop_scale, 0.0).to(y_ptr.dtype.element_ty)
    if SWAP:
        acc = tl.dot(yt.T, xt.T, acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(xt, yt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def grouped_xty_kernel(
    x_ptr, stride_xm, stride_xp,  # [N, P] expert-sorted rows
    x_desc,  # X_DESC: TMA descriptor of X [N, P], block [BLOCK_K, BLOCK_P]
    y_ptr, stride_ym, stride_yq,  # [N, Q] expert-sorted rows, or [T, Q] tokens when GATHER_Y
    y_desc,  # Y_DESC: TMA descriptor of Y [N, Q], block [BLOCK_K, BLOCK_Q] (not with GATHER_Y)
    out_ptr, stride_oe, stride_op, stride_oq,  # [E, P, Q] gradient of a weight (any strides)
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    P, Q,
    scale,  # fp32 factor on the result (LoRA scale for dA, dB; 1 for dW)
    gather_ptr,  # [N] int32|int64 source row of Y for each sorted row (read only when GATHER_Y)
    seed_ptr,  # [1] int64 dropout seed of Y (read only when DROPOUT_Y)
    drop_p,  # dropout probability (fp32)
    drop_scale,  # 1 / (1 - drop_p) (fp32)
    DROPOUT_Y: tl.constexpr,
    GATHER_Y: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    X_DESC: tl.constexpr,
    Y_DESC: tl.constexpr,
    EVEN_P: tl.constexpr,  # P % BLOCK_P == 0: the pointer loads need no column mask
    EVEN_Q: tl.constexpr,  # Q % BLOCK_Q == 0
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step
    GROUP_P: tl.constexpr,
    SWAP: tl.constexpr,  # accumulate out^T = Y'^T X: a rank-wide P (< 64) is then the MMA's N, not its M
):
    n_p = tl.cdiv(P, BLOCK_P)
    n_q = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    expert = (pid // (n_p * n_q)).to(tl.int64)
    pid_p, pid_q = _swizzle(pid % (n_p * n_q), n_p, n_q, GROUP_P)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    if SWAP:
        acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    # An int32 trip count (not a range over int64 row numbers) lets the compiler pipeline the loop.
    full = ((end - start) // BLOCK_K).to(tl.int32)
    for i in range(0, full):
        acc = _xty_step(acc, start + i * BLOCK_K, offs_k, end, offs_p, offs_q, P, Q,
                        x_ptr, stride_xm, stride_xp, x_desc, y_ptr, stride_ym, stride_yq, y_desc,
                        gather_ptr, seed_ptr, drop_p, drop_scale, pid_p * BLOCK_P, pid_q * BLOCK_Q,
                        False, DROPOUT_Y, GATHER_Y, DOT_PRECISION, X_DESC, Y_DESC, EVEN_P, EVEN_Q, SWAP)
    tail = start + full.to(tl.int64) * BLOCK_K
    if tail < end:
        acc = _xty_step(acc, tail, offs_k, end, offs_p, offs_q, P, Q,
                        x_ptr, stride_xm, stride_xp, x_desc, y_ptr, stride_ym, stride_yq, y_desc,
                        gather_ptr, seed_ptr, drop_p, drop_scale, pid_p * BLOCK_P, pid_q * BLOCK_Q,
                        True, DROPOUT_Y, GATHER_Y, DOT_PRECISION, X_DESC, Y_DESC, EVEN_P, EVEN_Q, SWAP)

    out = out_ptr + expert * stride_oe + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :] * stride_oq
    if SWAP:
        acc = acc.T
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=(offs_p < P)[:, None] & (offs_q < Q)[None, :])
