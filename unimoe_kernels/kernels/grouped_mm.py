"""Grouped GEMM over expert-sorted rows with the LoRA side product and the MLP epilogues fused in.

One kernel serves the four activation-sized GEMMs of the expert MLP (launchers:
ops/grouped_gemm_launch.py). For every BLOCK_M tile of rows of one expert e and every BLOCK_N column
tile, with s the LoRA scale:

    acc  = X[rows] @ W[e]                                   the base GEMM, fp32 accumulator
    side = X'[rows] @ A[e]                  [BLOCK_M, r]    LoRA side product in the same K loop
    acc += s * (side * gate) @ B[e]                         the LoRA term: r more K steps
    epilogue 0: out = acc                                   (y, dx)
    epilogue 1: z = acc (optional), out = h = act(z)        GLU: two accumulators, gate columns n
                                                            and up columns F + n of W and B
    epilogue 2: acc is dh; with z loaded: dz = dh * act'(z) (gate and up halves), h = act(z)
                recomputed, so h is never saved between forward and backward

With ROW_SCALE (the backward of the MLP fused with the weighted combine), X is d(out) [T, H]
gathered per token and dy of sorted row r is w_r d(out)[token(r)]: the kernel computes the
unscaled dh, writes sum_n dh[r, n] h[r, n] per column tile (the routing weight's gradient
<d(out), y_r>, with no copy of y or dy anywhere), then scales dz and the recomputed h by w_r;
the side product d(out) B_d stays unscaled.

The side product (x A^T, h A_d^T, dy B_d, dz B_gu) is written out by the first column tile only:
backward and the rank gates need it, and computing it here saves the separate pass over X that a
narrow [N, r] GEMM would make (X is read once per column tile anyway). X' is X under LoRA dropout
(DROPOUT 1: the LoRA input's keep mask applied to the X tiles of the side product only); DROPOUT 2
applies the mask of the LoRA input to the LoRA term of a gradient instead (dh, dx: the transpose).

W, A and B are read through strides, so [out, in] weights ("x W^T") and [in, out] ones ("dy W")
use the same kernel without a transposed copy. Gather on load (GATHER): X is the token matrix and
sorted row r reads row gather[r], so the permuted copy of X is never written.

Schedule: the tile of each program comes from the expert offsets (gemm_common._locate_tile), in
GROUP_M-swizzled order; the grid may be smaller than the tile count, and then each program walks
tiles num_programs apart (persistent: no tail of short-lived programs, tile setup amortised).
Operand tiles: the weights, and X when its rows are not gathered, come through TMA tensor
descriptors (W_DESC, X_DESC: the copy engine fills shared memory, zero past the tensor's edges, and
no 64-bit pointer tiles sit in registers beside the accumulators); otherwise pointer loads,
unmasked unless K is not a multiple of BLOCK_K, with row indices past a tile's end clamped onto
its last row and column indices past NOUT onto the last column (valid memory, never stored). Row
and expert arithmetic is int64 (row * stride passes 2^31 for large N*K).
"""

import triton
import triton.language as tl

from .gemm_common import _act, _act_and_grad, _dropout_keep, _expert_tiles, _locate_tile, _swizzle


@triton.jit
def _load_w(w_desc, expert, n0, k0, W_KMAJOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile of expert's W at (k0, n0) through its TMA descriptor."""
    if W_KMAJOR:
        return w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    else:
        return w_desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)


@triton.jit
def grouped_mm_kernel(
    x_ptr, stride_xm, stride_xk,  # [N, K] sorted rows, or [T, K] tokens when GATHER; fp32/fp16/bf16
    x_desc,  # X_DESC: tensor descriptor of X [N, K], block [BLOCK_M, BLOCK_K]
    w_ptr, stride_we, stride_wk, stride_wn,  # [E, K, NOUT] view of the weight (strides may be transposed)
    w_desc,  # W_DESC: descriptor of W's storage, [E, NOUT, K] (W_KMAJOR) or [E, K, NOUT]
    a_ptr, stride_ae, stride_ak, stride_ar,  # [E, K, R] view of the LoRA factor applied to X
    b_ptr, stride_be, stride_br, stride_bn,  # [E, R, NOUT] view of the LoRA factor applied to the side product
    side_ptr, stride_sm, stride_sr,  # [N, R] out: side product X' A (ungated), X's dtype
    gate_ptr, stride_gm, stride_gr,  # [N, R] fp32 rank gate of the side product (HAS_GATE)
    out_ptr, stride_om, stride_on,  # [N, NOUT] (EPILOGUE 0/1) or dz [N, 2F|F] (EPILOGUE 2)
    z_ptr, stride_zm, stride_zn,  # [N, 2F|F] pre-activation: stored (EPILOGUE 1, STORE_Z) or read (2)
    h_ptr, stride_hm, stride_hn,  # [N, F] recomputed activation (EPILOGUE 2)
    rowscale_ptr,  # [N] fp32 per-row factor of dy (ROW_SCALE: the routing weight of each sorted row)
    rowdot_ptr, stride_dm,  # [N, column tiles] fp32 out (ROW_SCALE): per-tile sums of dh_unscaled * h
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    num_experts,
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
    HAS_LORA: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DROPOUT: tl.constexpr,  # 0 none, 1 on the side product's X tiles (columns: K), 2 on the LoRA term (NOUT)
    GATHER: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    GLU: tl.constexpr,
    STORE_Z: tl.constexpr,
    ROW_SCALE: tl.constexpr,  # EPILOGUE 2 with X = d(out) gathered per token: see the module docstring
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 when torch disallows TF32, else "tf32"
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the K loop
    X_DESC: tl.constexpr,  # X's tiles come through its TMA descriptor (sorted, aligned X)
    W_DESC: tl.constexpr,  # W's tiles come through its TMA descriptor (aligned storage)
    W_KMAJOR: tl.constexpr,  # W's storage is [E, NOUT, K] ("x W^T"), else [E, K, NOUT] ("dy W")
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,  # row tiles that sweep the column tiles together (L2 reuse)
    E_PAD: tl.constexpr,  # num_experts rounded up to a power of two
):
    dtype = x_ptr.dtype.element_ty
    e_start, e_end, e_tiles, e_cum = _expert_tiles(offsets_ptr, num_experts, BLOCK_M, E_PAD)
    num_m = tl.sum(e_tiles, 0).to(tl.int32)  # tile counts fit int32 (TMA coordinates are int32)
    num_n = tl.cdiv(NOUT, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for t in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        pid_m, pid_n = _swizzle(t, num_m, num_n, GROUP_M)
        expert, row_start, expert_end = _locate_tile(pid_m, e_start, e_end, e_tiles, e_cum, E_PAD, BLOCK_M)
        e64 = expert.to(tl.int64)
        row_end = tl.minimum(row_start + BLOCK_M, expert_end)
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = rows < row_end
        rows_in = tl.minimum(rows, row_end - 1)
        if GATHER:
            x_rows = tl.load(gather_ptr + rows_in).to(tl.int64)
        else:
            x_rows = rows_in
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < NOUT
        offs_n_in = tl.minimum(offs_n, NOUT - 1)

        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + e64 * stride_we + offs_k[:, None].to(tl.int64) * stride_wk + offs_n_in[None, :] * stride_wn
        a_ptrs = a_ptr + e64 * stride_ae + offs_k[:, None].to(tl.int64) * stride_ak + offs_r[None, :] * stride_ar
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        side = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            in_k = offs_k < K - k0
            if X_DESC:
                # Rows past the tile's end belong to the next expert (or are zero past N): never stored.
                xt = x_desc.load([row_start.to(tl.int32), k0])
            elif EVEN_K:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
            if W_DESC:
                # Out-of-range rows and columns of the storage are zero-filled by the copy engine;
                # columns past NOUT inside it (the next expert's or the up half's) are never stored.
                wt = _load_w(w_desc, expert, n0, k0, W_KMAJOR, BLOCK_N, BLOCK_K)
            elif EVEN_K:
                wt = tl.load(w_ptrs)
            else:
                wt = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
            if GLU and EPILOGUE == 1:
                if W_DESC:
                    # The up half of W starts NOUT (= F) rows after the gate half.
                    wu = _load_w(w_desc, expert, n0 + NOUT, k0, W_KMAJOR, BLOCK_N, BLOCK_K)
                elif EVEN_K:
                    wu = tl.load(w_ptrs + w_up_off)
                else:
                    wu = tl.load(w_ptrs + w_up_off, mask=in_k[:, None], other=0.0)
                acc_up = tl.dot(xt, wu, acc_up, input_precision=DOT_PRECISION)
            if HAS_LORA:
                at = tl.load(a_ptrs, mask=in_k[:, None] & mask_r[None, :], other=0.0)
                if DROPOUT == 1:
                    keep = _dropout_keep(tl.load(seed_ptr), rows, k0 + offs_k, K, drop_p)
                    xs = tl.where(keep, xt * drop_scale, 0.0).to(dtype)
                else:
                    xs = xt
                side = tl.dot(xs, at, side, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # Tile-local offsets (int32: BLOCK_M rows times a row stride) from per-tile base pointers,
        # so the epilogue holds 32-bit offset tiles instead of 64-bit pointer tiles.
        loc_m = tl.arange(0, BLOCK_M)
        if HAS_LORA:
            # Rounded to X's dtype first, as a stored side product read back would be.
            side_x = side.to(dtype)
            mask_mr = mask_m[:, None] & mask_r[None, :]
            if pid_n == 0:
                tl.store(side_ptr + row_start * stride_sm + loc_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         side_x, mask=mask_mr)
            if HAS_GATE:
                g = tl.load(gate_ptr + row_start * stride_gm + loc_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                            mask=mask_mr, other=0.0)
                side_x = (side_x.to(tl.float32) * g).to(dtype)
            b_ptrs = b_ptr + e64 * stride_be + offs_r[:, None] * stride_br + offs_n_in[None, :].to(tl.int64) * stride_bn
            bt = tl.load(b_ptrs, mask=mask_r[:, None], other=0.0)
            lora_acc = tl.dot(side_x, bt, input_precision=DOT_PRECISION)
            if DROPOUT == 2:
                keep = _dropout_keep(tl.load(seed_ptr), rows, offs_n, NOUT, drop_p)
                lora_acc = tl.where(keep, lora_acc * drop_scale, 0.0)
            acc += scale * lora_acc
            if GLU and EPILOGUE == 1:
                bu = tl.load(b_ptrs + b_up_off, mask=mask_r[:, None], other=0.0)
                acc_up += scale * tl.dot(side_x, bu, input_precision=DOT_PRECISION)

        mask_mn = mask_m[:, None] & mask_n[None, :]
        out_ptrs = out_ptr + row_start * stride_om + (loc_m[:, None] * stride_om + offs_n[None, :] * stride_on)
        if EPILOGUE == 0:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)
        elif EPILOGUE == 1:
            z_ptrs = z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + offs_n[None, :] * stride_zn)
            if STORE_Z:
                tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask_mn)
                if GLU:
                    tl.store(z_ptrs + z_up_off, acc_up.to(z_ptr.dtype.element_ty), mask=mask_mn)
            h = _act(acc, ACT)
            if GLU:
                h = h * acc_up
            tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=mask_mn)
        else:
            # acc is dh; z columns n (gate) and F + n (up) give dz for both halves.
            z_ptrs = z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + offs_n[None, :] * stride_zn)
            zg = tl.load(z_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
            a, da = _act_and_grad(zg, ACT)
            if GLU:
                zu = tl.load(z_ptrs + z_up_off, mask=mask_mn, other=0.0).to(tl.float32)
                h = a * zu
            else:
                h = a
            if ROW_SCALE:
                # d(routing weight) of each row is <d(out), y> = <d(out) W_d + LoRA, h>: this tile's
                # part of the row sum (columns past NOUT have h = 0). Then dy = w * d(out).
                tl.store(rowdot_ptr + rows * stride_dm + pid_n, tl.sum(acc * h, 1), mask=mask_m)
                wrow = tl.load(rowscale_ptr + rows, mask=mask_m, other=0.0)[:, None]
                acc = acc * wrow
                h = h * wrow
            if GLU:
                tl.store(out_ptrs, (acc * zu * da).to(out_ptr.dtype.element_ty), mask=mask_mn)
                tl.store(out_ptrs + out_up_off, (acc * a).to(out_ptr.dtype.element_ty), mask=mask_mn)
            else:
                tl.store(out_ptrs, (acc * da).to(out_ptr.dtype.element_ty), mask=mask_mn)
            h_ptrs = h_ptr + row_start * stride_hm + (loc_m[:, None] * stride_hm + offs_n[None, :] * stride_hn)
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_mn)
