"""Per-expert X^T Y over expert-sorted rows: the weight gradients of the expert MLP.

out[e] = scale * X[rows of e]^T @ Y'[rows of e] for every expert e (launcher:
ops/grouped_gemm_launch.py): dW = dz^T x, dA = s (dz B)^T x', dB = s dz^T (x A^T), and the same on
the down projection. Y' is Y under LoRA dropout when Y is a LoRA input (DROPOUT_Y), and Y's rows
may be gathered on load (GATHER_Y: Y is the token matrix). An expert with no rows writes zeros.

Launch order: one program per (expert, output tile), expert-major, the output tiles of one expert
in GROUP_P-swizzled order. Programs in flight then work on the same expert and share its rows of
X and Y in L2; with the expert on the fastest axis they would each stream another expert's rows.
"""

import triton
import triton.language as tl

from .gemm_common import _dropout_keep, _swizzle


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
    # Clamped for the loads (valid memory, never stored), masked on the store.
    offs_p_in = tl.minimum(offs_p, P - 1)
    offs_q_in = tl.minimum(offs_q, Q - 1)
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)

    # X^T tile read straight from X's rows: [BLOCK_P, BLOCK_K]. An int32 trip count (not a range
    # over int64 row numbers) lets the compiler software-pipeline the loads.
    x_ptrs = x_ptr + (start + offs_k)[None, :] * stride_xm + offs_p_in[:, None] * stride_xp
    if SWAP:
        acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for i in range(0, tl.cdiv(end - start, BLOCK_K).to(tl.int32)):
        rows = start + i * BLOCK_K + offs_k
        in_k = rows < end
        if X_DESC:
            # Rows past the expert's end (the next expert's, or zeros past N) are zeroed here, so
            # they add nothing whatever Y holds there.
            xt = x_desc.load([(start + i * BLOCK_K).to(tl.int32), pid_p * BLOCK_P]).T
            xt = tl.where(in_k[None, :], xt, 0.0)
        else:
            xt = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
        if Y_DESC:
            yt = y_desc.load([(start + i * BLOCK_K).to(tl.int32), pid_q * BLOCK_Q])
            yt = tl.where(in_k[:, None], yt, 0.0)
        else:
            if GATHER_Y:
                y_rows = tl.load(gather_ptr + rows, mask=in_k, other=0).to(tl.int64)
            else:
                y_rows = rows
            yt = tl.load(y_ptr + y_rows[:, None] * stride_ym + offs_q_in[None, :] * stride_yq,
                         mask=in_k[:, None], other=0.0)
        if DROPOUT_Y:
            keep = _dropout_keep(tl.load(seed_ptr), rows, offs_q, Q, drop_p)
            yt = tl.where(keep, yt * drop_scale, 0.0).to(y_ptr.dtype.element_ty)
        if SWAP:
            acc = tl.dot(yt.T, xt.T, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(xt, yt, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xm

    out = out_ptr + expert * stride_oe + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :] * stride_oq
    if SWAP:
        acc = acc.T
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=(offs_p < P)[:, None] & (offs_q < Q)[None, :])
