"""Grouped GEMM over expert-sorted rows with the LoRA side product and the MLP epilogues fused in.

One kernel serves the four activation-sized GEMMs of the expert MLP (launchers:
ops/grouped_gemm_launch.py). For every BLOCK_M tile of rows of one expert e and every BLOCK_N column
tile, with s the LoRA scale:

    acc  = X[rows] @ W[e]                                   the base GEMM, fp32 accumulator
    side = X'[rows] @ A[e]                  [BLOCK_M, r]    LoRA side product in the same K loop
    acc += s * (side * gate) @ B[e]                         the LoRA term: r more K steps
    acc += bias[e]                                          HAS_BIAS, epilogues 0 and 1
    epilogue 0: out = acc                                   (y, dx)
    epilogue 1: z = acc (optional), out = h = act(z)        GLU: h = act(gate) * up_fn(up), one accumulator of BLOCK_N
                                                            columns, gate columns n0 .. n0+BLOCK_N/2
                                                            of W and B beside the same up columns
                                                            (F + n; GLU_PACK), or the BLOCK_N columns
                                                            from 2 n0 where gate and up alternate
                                                            (INTERLEAVED), split in registers at the end
    epilogue 2: acc is dh; with z loaded: dz = dh * act'(z) (gate and up halves), h = act(z)
                recomputed, so h is never saved between forward and backward; done a quarter of
                the tile's columns at a time, so few z values are live beside the accumulator.
                BIAS_GRAD: the tile's column sums of dz to row pid_m of dbias (every tile lies in
                one expert, so expert_colsum.py adds up an expert's tiles: the bias gradient
                without another pass over dz and without atomics)

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
tiles num_programs apart (persistent: no tail of short-lived programs, tile setup amortised). A
persistent launch flattens the tile loop and the K loop into one software-pipelined loop
(FLATTEN), so the first K steps of a program's next tile are loaded while the current tile's
epilogue runs: at qwen3-30b-a3b a tile has only 12 K steps, and a pipeline drained and refilled
per tile would leave the copy engine idle through every epilogue.
Operand tiles: the weights, and X when its rows are not gathered, come through TMA tensor
descriptors (W_DESC, X_DESC: the copy engine fills shared memory, zero past the tensor's edges, and
no 64-bit pointer tiles sit in registers beside the accumulators). The GLU up-projection's weight
descriptor views W as [E, 2, F, K]: one box of [2, BLOCK_N/2, BLOCK_K] brings a tile's gate rows
and up rows together, so one n = BLOCK_N warp-group MMA covers both halves (two n = BLOCK_N/2
MMAs would read each X tile from shared memory twice). Otherwise pointer loads,
unmasked unless K is not a multiple of BLOCK_K, with row indices past a tile's end clamped onto
its last row and column indices past NOUT onto the last column (valid memory, never stored). Row
and expert arithmetic is int64 (row * stride passes 2^31 for large N*K).
"""

import triton
import triton.language as tl

from .gemm_common import _act, _act_and_grad, _dropout_keep, _expert_tiles, _locate_tile, _swizzle, _up_and_grad


@triton.jit
def _load_w(w_desc, expert, n0, k0, W_KMAJOR: tl.constexpr, GLU_PACK: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile of expert's W (or LoRA A, B) at (k0, n0) through its TMA descriptor; GLU_PACK: the
    descriptor is over [E, 2, F, K] (or [E, K, 2, F]) and the tile is BLOCK_N/2 gate columns from
    n0 followed by the same up columns."""
    if GLU_PACK:
        if W_KMAJOR:
            tile = w_desc.load([expert, 0, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        else:
            tile = w_desc.load([expert, k0, 0, n0]).reshape(BLOCK_K, BLOCK_N)
    elif W_KMAJOR:
        tile = w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
    else:
        tile = w_desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    return tile


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(columns 0 .. BLOCK_N/2 - 1, the rest) of a [BLOCK_M, BLOCK_N] tile. Each thread of a
    warp-group MMA holds the same column positions in both halves, so this moves no data."""
    return t.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()


@triton.jit
def _bias_row(bias_ptr, cols, limit):
    """[1, len(cols)] fp32 bias row at contiguous columns cols (< limit), zero past it: contiguous
    masked offsets let the load vectorise (it runs once per tile, inside a persistent loop)."""
    return tl.load(bias_ptr + cols, mask=cols < limit, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _act_cols(gate, up, z_ptrs, z_up_off, h_ptrs, mask, c0, c1, c2, bias_ptr, offs_c, NOUT, ACT: tl.constexpr,
              GLU: tl.constexpr, STORE_Z: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Epilogue 1 on a block of columns: the bias added (HAS_BIAS: bias_ptr is expert e's row, gate
    columns at offs_c, up columns NOUT on), z stored (STORE_Z), h = act(gate) (* up_fn(up) with GLU)."""
    if HAS_BIAS:
        gate += _bias_row(bias_ptr, offs_c, NOUT)
        if GLU:
            up += _bias_row(bias_ptr + NOUT, offs_c, NOUT)
    if STORE_Z:
        tl.store(z_ptrs, gate.to(z_ptrs.dtype.element_ty), mask=mask)
        if GLU:
            tl.store(z_ptrs + z_up_off, up.to(z_ptrs.dtype.element_ty), mask=mask)
    h = _act(gate, ACT, c0, c1, c2)
    if GLU:
        up_f, _up_grad = _up_and_grad(up, ACT, c0, c1, c2)
        h = h * up_f
    tl.store(h_ptrs, h.to(h_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _dact_cols(dh, a, da, u, du, wrow, GLU: tl.constexpr, ROW_SCALE: tl.constexpr):
    """Epilogue 2 on a block of columns, from dh and the activation's parts at z (a, da = act and
    act' of the gate; u, du = up_fn and its derivative with GLU): (row sums of dh * h before dh and
    h are scaled by wrow (d routing weight, ROW_SCALE), dz of the gate columns, dz of the up columns
    (GLU), h)."""
    h = a * u if GLU else a
    rowdot = tl.sum(dh * h, 1)
    if ROW_SCALE:
        dh = dh * wrow
        h = h * wrow
    if GLU:
        return rowdot, dh * u * da, dh * a * du, h
    dz = dh * da
    return rowdot, dz, dz, h


@triton.jit
def grouped_mm_kernel(
    x_ptr, stride_xm, stride_xk,  # [N, K] sorted rows, or [T, K] tokens when GATHER; fp32/fp16/bf16
    x_desc,  # X_DESC: tensor descriptor of X [N, K], block [BLOCK_M, BLOCK_K]
    w_ptr, stride_we, stride_wk, stride_wn,  # [E, K, NOUT] view of the weight (strides may be transposed)
    w_desc,  # W_DESC: descriptor of W's storage, [E, NOUT, K] (W_KMAJOR) or [E, K, NOUT]
    a_ptr, stride_ae, stride_ak, stride_ar,  # [E, K, R] view of the LoRA factor applied to X
    a_desc,  # A_DESC: descriptor of A's storage, [E, R, K] (A_KMAJOR) or [E, K, R]
    b_ptr, stride_be, stride_br, stride_bn,  # [E, R, NOUT] view of the LoRA factor applied to the side product
    b_desc,  # B_DESC: descriptor of B's storage, [E, NOUT, R] (B_KMAJOR) or [E, R, NOUT]; GLU_PACK as W's
    side_ptr, stride_sm, stride_sr,  # [N, R] out: side product X' A (ungated), X's dtype
    gate_ptr, stride_gm, stride_gr,  # [N, R] fp32 rank gate of the side product (HAS_GATE)
    out_ptr, stride_om, stride_on,  # [N, NOUT] (EPILOGUE 0/1) or dz [N, 2F|F] (EPILOGUE 2)
    z_ptr, stride_zm, stride_zn,  # [N, 2F|F] pre-activation: stored (EPILOGUE 1, STORE_Z) or read (2)
    h_ptr, stride_hm, stride_hn,  # [N, F] recomputed activation (EPILOGUE 2)
    bias_ptr, stride_be_bias,  # [E, NOUT | 2F] bias (HAS_BIAS), columns as W's, contiguous rows
    dbias_ptr, stride_dbm,  # [row tiles, 2F|F] fp32 out (BIAS_GRAD): column sums of dz per row tile, dz's layout
    rowscale_ptr,  # [N] fp32 per-row factor of dy (ROW_SCALE: the routing weight of each sorted row)
    rowdot_ptr, stride_dm,  # [N, column tiles] fp32 out (ROW_SCALE): per-tile sums of dh_unscaled * h
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    num_experts,
    K, NOUT,  # reduction length, output columns (F for GLU)
    R: tl.constexpr,  # LoRA rank: a constant, so a rank under BLOCK_R masks whole vectors of A's rows
    # GLU: element distance from a gate column to its up column (F columns on) in z (EPILOGUE 1
    # and 2) and dz (EPILOGUE 2); precomputed on the host so that a product past 2^31 arrives as
    # an int64 argument.
    z_up_off, out_up_off,
    scale,  # LoRA scale (fp32)
    act_c0, act_c1, act_c2,  # the activation's constants (fp32; gemm_common's ACT codes say which)
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
    # GLU in halves and EPILOGUE 1: the accumulator holds BLOCK_N/2 gate columns, then the same up ones
    GLU_PACK: tl.constexpr,
    # GLU whose gate and up columns alternate in W, B, bias, z and dz (":interleaved"): EPILOGUE 1
    # reads BLOCK_N columns of W from 2 n0, epilogue 2 reads and writes z, dz in column pairs
    INTERLEAVED: tl.constexpr,
    STORE_Z: tl.constexpr,
    ROW_SCALE: tl.constexpr,  # EPILOGUE 2 with X = d(out) gathered per token: see the module docstring
    HAS_BIAS: tl.constexpr,  # EPILOGUE 0 / 1
    BIAS_GRAD: tl.constexpr,  # EPILOGUE 2
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 when torch disallows TF32, else "tf32"
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks in the K loop
    X_DESC: tl.constexpr,  # X's tiles come through its TMA descriptor (sorted, aligned X)
    W_DESC: tl.constexpr,  # W's tiles come through its TMA descriptor (aligned storage)
    W_KMAJOR: tl.constexpr,  # W's storage is [E, NOUT, K] ("x W^T"), else [E, K, NOUT] ("dy W")
    A_DESC: tl.constexpr,  # A's tiles come through its TMA descriptor (zero past the rank)
    A_KMAJOR: tl.constexpr,
    B_DESC: tl.constexpr,  # B's tiles through its TMA descriptor (zero past the rank)
    B_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # accumulator columns; GLU epilogue 1: BLOCK_N/2 output columns (gate + up)
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FLATTEN: tl.constexpr,  # persistent launch: one software-pipelined loop over (tile, K step)
    GROUP_M: tl.constexpr,  # row tiles that sweep the column tiles together (L2 reuse)
    E_PAD: tl.constexpr,  # num_experts rounded up to a power of two
):
    dtype = x_ptr.dtype.element_ty
    # The GLU forward's accumulator holds gate and up columns: BLOCK_N / 2 output columns per tile.
    PAIRED: tl.constexpr = GLU and EPILOGUE == 1
    BLOCK_O: tl.constexpr = BLOCK_N // 2 if PAIRED else BLOCK_N
    e_start, e_end, e_tiles, e_cum = _expert_tiles(offsets_ptr, num_experts, BLOCK_M, E_PAD)
    num_m = tl.sum(e_tiles, 0).to(tl.int32)  # tile counts fit int32 (TMA coordinates are int32)
    num_n = tl.cdiv(NOUT, BLOCK_O)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # Accumulator column j reads weight column (j mod BLOCK_O) of its half; the up half is F on.
    acc_cols = tl.arange(0, BLOCK_N)
    if GLU_PACK:
        col_in_half = acc_cols % BLOCK_O
        up_half = (acc_cols >= BLOCK_O).to(tl.int64)
    else:
        col_in_half = acc_cols
        up_half = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for t in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
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
        n0 = pid_n * BLOCK_O
        # Weight columns of the accumulator, clamped onto the last valid one (never stored).
        if PAIRED and INTERLEAVED:
            w_n0 = 2 * n0
            w_cols = tl.minimum(w_n0 + acc_cols, 2 * NOUT - 1).to(tl.int64)
        else:
            w_n0 = n0
            w_cols = tl.minimum(n0 + col_in_half, NOUT - 1).to(tl.int64) + up_half * NOUT

        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + e64 * stride_we + offs_k[:, None].to(tl.int64) * stride_wk + w_cols[None, :] * stride_wn
        a_ptrs = a_ptr + e64 * stride_ae + offs_k[:, None].to(tl.int64) * stride_ak + offs_r[None, :] * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
                wt = _load_w(w_desc, expert, w_n0, k0, W_KMAJOR, GLU_PACK, BLOCK_N, BLOCK_K)
            elif EVEN_K:
                wt = tl.load(w_ptrs)
            else:
                wt = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
            if HAS_LORA:
                if A_DESC:
                    at = _load_w(a_desc, expert, 0, k0, A_KMAJOR, False, BLOCK_R, BLOCK_K)
                elif EVEN_K:
                    at = tl.load(a_ptrs, mask=mask_r[None, :], other=0.0)
                else:
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
            # Rounded to X's dtype first, as the stored side product that backward reads is.
            side_x = side.to(dtype)
            mask_mr = mask_m[:, None] & mask_r[None, :]
            if pid_n == 0:
                tl.store(side_ptr + row_start * stride_sm + loc_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         side_x, mask=mask_mr)
            factor = side_x.to(tl.float32)
            if HAS_GATE:
                factor *= tl.load(gate_ptr + row_start * stride_gm + loc_m[:, None] * stride_gm
                                  + offs_r[None, :] * stride_gr, mask=mask_mr, other=0.0)
            if B_DESC:
                bt = _load_w(b_desc, expert, w_n0, 0, B_KMAJOR, GLU_PACK, BLOCK_N, BLOCK_R)
            else:
                b_ptrs = b_ptr + e64 * stride_be + offs_r[:, None] * stride_br + w_cols[None, :] * stride_bn
                bt = tl.load(b_ptrs, mask=mask_r[:, None], other=0.0)
            if DROPOUT == 2:
                # The mask falls on the LoRA term's columns: it needs a tile of its own.
                lora_acc = tl.dot(factor.to(dtype), bt, input_precision=DOT_PRECISION)
                keep = _dropout_keep(tl.load(seed_ptr), rows, n0 + acc_cols, NOUT, drop_p)
                acc += scale * tl.where(keep, lora_acc * drop_scale, 0.0)
            else:
                # The scale joins the gate in the side product's one rounding to X's dtype (exact for
                # a power-of-two scale), so the LoRA term accumulates into acc: a second fp32
                # [BLOCK_M, BLOCK_N] tile would cost as many registers as the accumulator.
                acc = tl.dot((factor * scale).to(dtype), bt, acc, input_precision=DOT_PRECISION)

        bias_row = bias_ptr + e64 * stride_be_bias
        if EPILOGUE == 0:
            offs_o = n0 + tl.arange(0, BLOCK_O)
            if HAS_BIAS:
                acc += _bias_row(bias_row, offs_o, NOUT)
            out_ptrs = out_ptr + row_start * stride_om + (loc_m[:, None] * stride_om + offs_o[None, :] * stride_on)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_o < NOUT)[None, :])
        elif EPILOGUE == 1:
            # Half of the output columns at a time: the activation's temporaries (the softcap's
            # tanh, the clamps) for half the tile live beside the accumulator, not for all of it.
            HALF_O: tl.constexpr = BLOCK_O // 2
            if INTERLEAVED:
                if HAS_BIAS:
                    acc += _bias_row(bias_row, w_n0 + acc_cols, 2 * NOUT)
                if STORE_Z:
                    # z's columns are the accumulator's: one contiguous store, not two strided ones.
                    z_cols = w_n0 + acc_cols
                    tl.store(z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + z_cols[None, :] * stride_zn),
                             acc.to(z_ptr.dtype.element_ty), mask=mask_m[:, None] & (z_cols < 2 * NOUT)[None, :])
                # Gate and up alternate: each thread holds column pairs, so this split moves no data.
                gate, up = acc.reshape(BLOCK_M, BLOCK_O, 2).split()
                u0, u1 = _halves(up, BLOCK_M, BLOCK_O)
            elif GLU:
                gate, up = _halves(acc, BLOCK_M, BLOCK_N)
                u0, u1 = _halves(up, BLOCK_M, BLOCK_O)
            else:
                gate = acc
            g0, g1 = _halves(gate, BLOCK_M, BLOCK_O)
            for half in tl.static_range(2):
                offs_c = n0 + half * HALF_O + tl.arange(0, HALF_O)
                mask_c = mask_m[:, None] & (offs_c < NOUT)[None, :]
                z_ptrs = z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + offs_c[None, :] * stride_zn)
                h_ptrs = out_ptr + row_start * stride_om + (loc_m[:, None] * stride_om + offs_c[None, :] * stride_on)
                # The interleaved layout's bias and z went with the whole accumulator above.
                split_bias = HAS_BIAS and not INTERLEAVED
                if GLU:
                    _act_cols(g0 if half == 0 else g1, u0 if half == 0 else u1, z_ptrs, z_up_off, h_ptrs, mask_c,
                              act_c0, act_c1, act_c2, bias_row, offs_c, NOUT, ACT, GLU, STORE_Z and not INTERLEAVED,
                              split_bias)
                else:
                    g = g0 if half == 0 else g1
                    _act_cols(g, g, z_ptrs, z_up_off, h_ptrs, mask_c, act_c0, act_c1, act_c2, bias_row, offs_c, NOUT,
                              ACT, GLU, STORE_Z, split_bias)
        else:
            # acc is dh; z columns n (gate) and F + n (up) give dz for both halves. A quarter of the
            # tile's columns at a time (an eighth when interleaved) keeps that part of the z tiles
            # live beside the accumulator.
            # Interleaved z is read as [BLOCK_M, 2 CHUNK] pairs, split in registers: eighths keep that
            # tile and its split as small as the quarters' two tiles (a quarter spills at 128x128).
            NCHUNK: tl.constexpr = 8 if INTERLEAVED else 4
            CHUNK: tl.constexpr = BLOCK_N // NCHUNK
            if ROW_SCALE:
                wrow = tl.load(rowscale_ptr + rows, mask=mask_m, other=0.0)[:, None]
            else:
                wrow = 1.0
            dh_lo, dh_hi = _halves(acc, BLOCK_M, BLOCK_N)
            dh0, dh1 = _halves(dh_lo, BLOCK_M, BLOCK_N // 2)
            dh2, dh3 = _halves(dh_hi, BLOCK_M, BLOCK_N // 2)
            cols = tl.arange(0, CHUNK)
            rowdot = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for q in tl.static_range(NCHUNK):
                offs_c = n0 + q * CHUNK + cols
                mask_c = mask_m[:, None] & (offs_c < NOUT)[None, :]
                h_ptrs = h_ptr + row_start * stride_hm + (loc_m[:, None] * stride_hm + offs_c[None, :] * stride_hn)
                qq = q * 4 // NCHUNK  # the quarter chunk q lies in
                dh = dh0 if qq == 0 else (dh1 if qq == 1 else (dh2 if qq == 2 else dh3))
                if NCHUNK == 8:
                    dh_a, dh_b = _halves(dh, BLOCK_M, BLOCK_N // 4)
                    dh = dh_a if q % 2 == 0 else dh_b
                if INTERLEAVED:
                    # The chunk's gate and up columns are 2 CHUNK contiguous ones of z and dz.
                    pair = 2 * (n0 + q * CHUNK) + tl.arange(0, 2 * CHUNK)
                    mask_p = mask_m[:, None] & (pair < 2 * NOUT)[None, :]
                    z_pairs = z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + pair[None, :] * stride_zn)
                    # Split in z's own dtype, then widened: half the registers of an fp32 split.
                    zg, zu = tl.load(z_pairs, mask=mask_p, other=0.0).reshape(BLOCK_M, CHUNK, 2).split()
                    a, da = _act_and_grad(zg.to(tl.float32), ACT, act_c0, act_c1, act_c2)
                    u, du = _up_and_grad(zu.to(tl.float32), ACT, act_c0, act_c1, act_c2)
                else:
                    # The up half is loaded after the gate's parts are computed: fewer values live.
                    zg_ptrs = z_ptr + row_start * stride_zm + (loc_m[:, None] * stride_zm + offs_c[None, :] * stride_zn)
                    a, da = _act_and_grad(tl.load(zg_ptrs, mask=mask_c, other=0.0).to(tl.float32), ACT, act_c0,
                                          act_c1, act_c2)
                    if GLU:
                        u, du = _up_and_grad(tl.load(zg_ptrs + z_up_off, mask=mask_c, other=0.0).to(tl.float32), ACT,
                                             act_c0, act_c1, act_c2)
                    else:
                        u, du = a, da  # unused without GLU
                part, dz_g, dz_u, h = _dact_cols(dh, a, da, u, du, wrow, GLU, ROW_SCALE)
                rowdot += part
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_c)
                dz_base = out_ptr + row_start * stride_om + loc_m[:, None] * stride_om
                if INTERLEAVED:
                    dz_dtype = out_ptr.dtype.element_ty
                    tl.store(dz_base + pair[None, :] * stride_on,
                             tl.join(dz_g.to(dz_dtype), dz_u.to(dz_dtype)).reshape(BLOCK_M, 2 * CHUNK), mask=mask_p)
                else:
                    tl.store(dz_base + offs_c[None, :] * stride_on, dz_g.to(out_ptr.dtype.element_ty), mask=mask_c)
                    if GLU:
                        tl.store(dz_base + offs_c[None, :] * stride_on + out_up_off, dz_u.to(out_ptr.dtype.element_ty),
                                 mask=mask_c)
                if BIAS_GRAD:
                    # Masked rows hold another expert's (or clamped) rows, and dz of a zero z need
                    # not be zero. dbias rows are contiguous rows in dz's column layout.
                    sum_g = tl.sum(tl.where(mask_c, dz_g, 0.0), 0)
                    db_row = dbias_ptr + pid_m.to(tl.int64) * stride_dbm
                    if INTERLEAVED:
                        sum_u = tl.sum(tl.where(mask_c, dz_u, 0.0), 0)
                        tl.store(db_row + pair, tl.join(sum_g, sum_u).reshape(2 * CHUNK), mask=pair < 2 * NOUT)
                    else:
                        tl.store(db_row + offs_c, sum_g, mask=offs_c < NOUT)
                        if GLU:
                            tl.store(db_row + NOUT + offs_c, tl.sum(tl.where(mask_c, dz_u, 0.0), 0),
                                     mask=offs_c < NOUT)
            if ROW_SCALE:
                # d(routing weight) of each row is <d(out), y> = <d(out) W_d + LoRA, h> (+ <d(out),
                # b_d[e]> with a bias, added by the launcher): this tile's part of the row sum
                # (columns past NOUT have h = 0). Then dy = w * d(out).
                tl.store(rowdot_ptr + rows * stride_dm + pid_n, rowdot, mask=mask_m)
