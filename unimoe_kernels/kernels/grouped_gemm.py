"""Triton kernels of the grouped expert MLP with fused LoRA and activation (launchers: ops/grouped_gemm.py).

Two kernels serve every GEMM of the forward and backward pass:

grouped_mm_kernel: for each BLOCK_M tile of expert-sorted rows (tile map of the routing plan) and each
    BLOCK_N column tile, C = X[rows] @ W[e] (+ scale * XA[rows] @ B[e]) with an fp32 accumulator and
    one of three epilogues:
      EPILOGUE 0: store C                                        (xa = x A^T, dy B, dx, y)
      EPILOGUE 1: forward activation; GLU keeps two accumulators (gate columns n and up columns
                  F + n) and writes F columns of h; optionally stores the pre-activation z.
      EPILOGUE 2: backward activation: C is dh; loads z, writes dz (gate and up columns) and the
                  recomputed h = act(z), so h never has to be saved between forward and backward.
    W and B are read through strides, so [out, in] weights ("x W^T") and [in, out] ones ("dy W")
    use the same kernel without a transposed copy. The LoRA term is r more K steps into the same
    accumulator; B·A is never formed.

grouped_xty_kernel: out[e] = scale * X[rows of e]^T @ Y[rows of e] for every expert e, one program per
    (expert, output tile), looping over the expert's rows: dW, dA and dB of base and LoRA weights.
    An expert with no rows writes zeros.

LoRA dropout (PEFT semantics: dropout on the LoRA input only) is regenerated, never stored: the
keep mask of element (row, col) of an [N, C] LoRA input is tl.rand(seed, row * C + col) >= p, with
the seed read from device memory (no host sync). DROPOUT 1 applies it to the X tiles as they load
(x -> x A^T, h -> h A_d^T, and Y in the dA kernels); DROPOUT 2 applies it to the LoRA part of the
output (dx and dh), which is the transpose of the first use.

Gather on load (GATHER, GATHER_Y): X (or Y) is the token matrix [T, H] and sorted row r reads its
row gather[r], so the permuted copy x_sorted [T*k, H] is never written; dropout masks still follow
the sorted row.

Index arithmetic on rows and experts is int64 because row * stride passes 2^31 for large N*H.
"""

import triton
import triton.language as tl

# Activation codes shared with the launcher (ops/grouped_gemm.py: _ACT_CODE).
ACT_SILU = 0
ACT_GELU = 1
ACT_RELU = 2


@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32."""
    if ACT == 0:
        out = g * tl.sigmoid(g)
    elif ACT == 1:
        # Exact (erf) gelu, as torch.nn.functional.gelu's default; 0.7071... = 1/sqrt(2).
        out = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        out = tl.maximum(g, 0.0)
    return out


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        out = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        out = g * cdf
        # d/dg g*Phi(g) = Phi(g) + g*phi(g); 0.3989... = 1/sqrt(2*pi).
        grad = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        out = tl.maximum(g, 0.0)
        grad = tl.where(g > 0.0, 1.0, 0.0)
    return out, grad


@triton.jit
def _dropout_keep(seed, rows, cols, ncols, p):
    """Keep mask [len(rows), len(cols)] of LoRA dropout for an input with ncols columns."""
    return tl.rand(seed, rows[:, None] * ncols + cols[None, :]) >= p


@triton.jit
def grouped_mm_kernel(
    x_ptr, stride_xm, stride_xk,  # [N, K] expert-sorted rows, any float dtype
    w_ptr, stride_we, stride_wk, stride_wn,  # [E, K, NOUT] view of the weight (strides may be transposed)
    xa_ptr, stride_xam, stride_xar,  # [N, R] LoRA input projection (x A^T or dy B), x's dtype
    b_ptr, stride_be, stride_br, stride_bn,  # [E, R, NOUT] view of the second LoRA factor
    out_ptr, stride_om, stride_on,  # [N, NOUT] (EPILOGUE 0/1) or dz [N, 2F|F] (EPILOGUE 2)
    z_ptr, stride_zm, stride_zn,  # [N, 2F|F] pre-activation: stored (EPILOGUE 1, STORE_Z) or read (2)
    h_ptr, stride_hm, stride_hn,  # [N, F] recomputed activation (EPILOGUE 2)
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    tile_expert_ptr,  # [max_tiles] int32, -1 for unused tiles
    tile_row_start_ptr,  # [max_tiles] int32|int64
    K, NOUT, R,  # reduction length, output columns (F for GLU), LoRA rank
    # GLU: element distance from a gate column to its up column (F columns on): in W and B
    # (EPILOGUE 1) and in z and dz (EPILOGUE 1 and 2); precomputed on the host so that a product
    # past 2^31 arrives as an int64 argument.
    w_up_off, b_up_off, z_up_off, out_up_off,
    scale,  # LoRA scale (fp32)
    gather_ptr,  # [N] int32|int64 source row of X for each sorted row (read only when GATHER)
    seed_ptr,  # [1] int64 dropout seed (read only when DROPOUT > 0)
    drop_p,  # dropout probability (fp32)
    drop_scale,  # 1 / (1 - drop_p) (fp32)
    n_bucket,  # unused in the body: part of the autotune key (rows rounded to a power of two)
    HAS_LORA: tl.constexpr,
    DROPOUT: tl.constexpr,  # 0 none, 1 on the X tiles (columns: K), 2 on the LoRA term (columns: NOUT)
    GATHER: tl.constexpr,  # X rows are gathered on load (X is the unpermuted token matrix)
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    STORE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 when torch disallows TF32, else "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles that sweep the column tiles together (L2 reuse)
):
    # 1-D grid over (row tile, column tile), swizzled in groups of GROUP_M row tiles: the programs
    # in flight share GROUP_M x tiles and a few weight tiles in L2, instead of streaming all of x
    # once per column tile (row-major order) or all of W once per row tile (column-major order).
    # Tiles of one group may belong to different experts; each tile reads its own expert.
    num_m = tl.num_programs(0) // tl.cdiv(NOUT, BLOCK_N)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    pid = tl.program_id(0)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_m
    pid_n = (pid % (GROUP_M * num_n)) // group_m
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:
        return
    e64 = expert.to(tl.int64)
    row_start = tl.load(tile_row_start_ptr + pid_m).to(tl.int64)
    row_end = tl.minimum(row_start + BLOCK_M, tl.load(offsets_ptr + e64 + 1).to(tl.int64))

    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = rows < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NOUT

    if GATHER:
        x_rows = tl.load(gather_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    else:
        x_rows = rows
    w_e = w_ptr + e64 * stride_we
    # Forward GLU: gate and up tiles share the x tile; the up rows of W sit w_up_off further on.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(
            x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if DROPOUT == 1:
            keep = _dropout_keep(tl.load(seed_ptr), rows, offs_k, K, drop_p)
            xt = tl.where(keep, xt * drop_scale, 0.0).to(x_ptr.dtype.element_ty)
        w_off = offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn
        w_mask = mask_k[:, None] & mask_n[None, :]
        wt = tl.load(w_e + w_off, mask=w_mask, other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        if GLU and EPILOGUE == 1:
            wu = tl.load(w_e + w_up_off + w_off, mask=w_mask, other=0.0)
            acc_up = tl.dot(xt, wu, acc_up, input_precision=DOT_PRECISION)

    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        xat = tl.load(
            xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        b_e = b_ptr + e64 * stride_be
        b_off = offs_r[:, None] * stride_br + offs_n[None, :].to(tl.int64) * stride_bn
        b_mask = mask_r[:, None] & mask_n[None, :]
        bt = tl.load(b_e + b_off, mask=b_mask, other=0.0)
        lora_acc = tl.dot(xat, bt, input_precision=DOT_PRECISION)
        if DROPOUT == 2:
            keep = _dropout_keep(tl.load(seed_ptr), rows, offs_n, NOUT, drop_p)
            lora_acc = tl.where(keep, lora_acc * drop_scale, 0.0)
        acc += scale * lora_acc
        if GLU and EPILOGUE == 1:
            bu = tl.load(b_e + b_up_off + b_off, mask=b_mask, other=0.0)
            acc_up += scale * tl.dot(xat, bu, input_precision=DOT_PRECISION)

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if EPILOGUE == 0:
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
    elif EPILOGUE == 1:
        z_off = rows[:, None] * stride_zm + offs_n[None, :] * stride_zn
        if STORE_Z:
            tl.store(z_ptr + z_off, acc.to(z_ptr.dtype.element_ty), mask=mask_mn)
            if GLU:
                tl.store(z_ptr + z_off + z_up_off, acc_up.to(z_ptr.dtype.element_ty), mask=mask_mn)
        h = _act(acc, ACT)
        if GLU:
            h = h * acc_up
        tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on,
                 h.to(out_ptr.dtype.element_ty), mask=mask_mn)
    else:
        # acc is dh; z columns n (gate) and F + n (up) give dz for both halves.
        z_off = rows[:, None] * stride_zm + offs_n[None, :] * stride_zn
        zg = tl.load(z_ptr + z_off, mask=mask_mn, other=0.0).to(tl.float32)
        a, da = _act_and_grad(zg, ACT)
        dz_off = rows[:, None] * stride_om + offs_n[None, :] * stride_on
        if GLU:
            zu = tl.load(z_ptr + z_off + z_up_off, mask=mask_mn, other=0.0).to(tl.float32)
            tl.store(out_ptr + dz_off, (acc * zu * da).to(out_ptr.dtype.element_ty), mask=mask_mn)
            tl.store(out_ptr + dz_off + out_up_off, (acc * a).to(out_ptr.dtype.element_ty), mask=mask_mn)
            h = a * zu
        else:
            tl.store(out_ptr + dz_off, (acc * da).to(out_ptr.dtype.element_ty), mask=mask_mn)
            h = a
        tl.store(h_ptr + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn,
                 h.to(h_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def grouped_xty_kernel(
    x_ptr, stride_xm, stride_xp,  # [N, P] expert-sorted rows
    y_ptr, stride_ym, stride_yq,  # [N, Q] expert-sorted rows
    out_ptr, stride_oe, stride_op, stride_oq,  # [E, P, Q] gradient of a weight (any strides)
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    P, Q,
    scale,  # fp32 factor on the result (LoRA scale for dA, dB; 1 for dW)
    gather_ptr,  # [N] int32|int64 source row of Y for each sorted row (read only when GATHER_Y)
    seed_ptr,  # [1] int64 dropout seed of Y (read only when DROPOUT_Y)
    drop_p,  # dropout probability (fp32)
    drop_scale,  # 1 / (1 - drop_p) (fp32)
    n_bucket,  # unused in the body: part of the autotune key
    DROPOUT_Y: tl.constexpr,  # Y is a LoRA input under dropout (dA = s (dy B)^T dropout(h))
    GATHER_Y: tl.constexpr,  # Y rows are gathered on load (Y is the unpermuted token matrix)
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_Q)
    offs_p = (pid // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = (pid % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    start = tl.load(offsets_ptr + expert).to(tl.int64)
    end = tl.load(offsets_ptr + expert + 1).to(tl.int64)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = rows < end
        # X^T tile read straight from X's rows: [BLOCK_P, BLOCK_K].
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_p[:, None] * stride_xp,
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        if GATHER_Y:
            y_rows = tl.load(gather_ptr + rows, mask=mask_k, other=0).to(tl.int64)
        else:
            y_rows = rows
        yt = tl.load(y_ptr + y_rows[:, None] * stride_ym + offs_q[None, :] * stride_yq,
                     mask=mask_k[:, None] & mask_q[None, :], other=0.0)
        if DROPOUT_Y:
            keep = _dropout_keep(tl.load(seed_ptr), rows, offs_q, Q, drop_p)
            yt = tl.where(keep, yt * drop_scale, 0.0).to(y_ptr.dtype.element_ty)
        acc = tl.dot(xt, yt, acc, input_precision=DOT_PRECISION)

    out = out_ptr + expert * stride_oe + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :] * stride_oq
    tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


@triton.jit
def dropout_mask_kernel(
    seed_ptr,  # [1] int64
    out_ptr,  # [N, C] fp32: 1 / (1 - p) where kept, 0 where dropped
    N, C, drop_p, drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The LoRA dropout mask the GEMM kernels regenerate, written out (tests and debugging)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = _dropout_keep(tl.load(seed_ptr), rows, cols, C, drop_p)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], tl.where(keep, drop_scale, 0.0), mask=mask)
