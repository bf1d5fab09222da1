"""Grouped expert MLP with fused LoRA and activation: dispatch, Triton launchers, custom ops, autograd.

Data flow (N expert-sorted rows, expert e owns rows offsets[e] .. offsets[e+1]-1, s = lora_scale):

    forward (custom op unimoe::grouped_mlp_fwd)
      xa = x A_gu[e]^T                               [N, r]   grouped_mm, tiny
      z  = x W_gu[e]^T + s xa B_gu[e]^T              [N, 2F|F] pre-activation, stored for backward
      h  = act(z)  (swiglu: silu(z_gate) * z_up)     [N, F]   epilogue of the same kernel
      ha = h A_d[e]^T                                [N, r]
      y  = h W_d[e]^T + s ha B_d[e]^T                [N, H]   -> y_sorted

    backward (custom op unimoe::grouped_mlp_bwd), dy [N, H]
      dyb = dy B_d[e]                                [N, r]
      dh  = dy W_d[e] + s dyb A_d[e]  -> epilogue: dz = dh * act'(z), h = act(z) recomputed
      dW_d = dy^T h, dA_d = s dyb^T h, dB_d = s dy^T ha        (grouped X^T Y per expert)
      dzb = dz B_gu[e]                               [N, r]
      dx  = dz W_gu[e] + s dzb A_gu[e]               [N, H]
      dW_gu = dz^T x, dA_gu = s dzb^T x, dB_gu = s dz^T xa

Saved between forward and backward: x (the input, alive anyway as the permute output), z [N, 2F|F]
in x's dtype (needed to differentiate the activation; h = act(z) is recomputed in the backward
epilogue instead of being saved, which saves N*F elements; with recompute=True z is not saved either
and GEMM 1 runs again in backward), xa, ha ([N, r] each, tiny) and, with LoRA dropout, two int64
seeds (the masks are regenerated, never stored). Base weight gradients are computed only when the
base requires grad; with a frozen base (the LoRA recipe) no dW kernel runs and B·A is never
materialised.

Rank gate (optional; mixture of rank-1 experts, Intuition-MoR1E): g_gu, g_d [N, r] fp32 per row, made
by reference.lora_rank_gates in torch (autograd carries their gradient on to the gate weights and a
bias). The LoRA terms become s (xa * g_gu) B_gu^T and s (ha * g_d) B_d^T: xa and ha are separate
[N, r] tensors, so the gate is one elementwise [N, r] product before the main GEMM reads them, and
nothing in the big kernels changes. Backward (u = xa * g, dzb = dz B_gu as above):
      dB_gu = s dz^T u, dA_gu = s (dzb * g)^T x, dx LoRA part s (dzb * g) A_gu, dg_gu = s dzb * xa
(the same with dyb, ha, h on the down side); xa and ha are saved ungated, u is recomputed, and the
gates themselves are saved ([N, r] fp32 each). The gate logits (a [T, H] x [H, E*r] GEMM per site,
then a gather of the N routed rows) and their softmax run in torch outside the op.

LoRA dropout (training, p > 0) acts on the LoRA inputs x and h only, as in PEFT. Its masks are never
stored: two philox seeds are drawn on the device per call and every kernel that reads a LoRA input
(x A^T, h A_d^T, dA) or writes its gradient (the LoRA part of dx and dh) regenerates the mask of
element (row, col) from (seed, row * cols + col). xa and ha saved for backward already include it.
The masks differ from torch's F.dropout draws (another generator), not in distribution.

Dispatch: backend.resolve(backend, device) == "triton" runs the kernels, anything else (and fp64,
for gradcheck) runs reference.grouped_mlp.

grouped_mlp_gather(x [T, H], plan, top_k, ...) fuses the permute: the kernels that read x (x A^T,
GEMM 1, and dW_gu, dA_gu in backward) gather row sorted_slots[r] // k on load, so x_sorted [T*k, H]
is never materialised nor saved; dx rows are summed back per token without atomics.

The tile map (which expert and first row each BLOCK_M tile has) comes from the routing plan when its
block_m matches the kernel's, else it is built on the device from tokens_per_expert with no host sync.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import backend as _backend
from .. import reference
from ..reference import LoRAWeights
from ..types import RoutingPlan, max_tiles

# Row tiles swizzled together in the grouped GEMM's launch order (the Triton matmul tutorial's
# GROUP_SIZE_M): 8 x tiles of 64 rows x H=4096 bf16 are 4 MiB, far below H100's 50 MiB L2.
GROUP_M = 8

# Tile height of the grouped GEMM; equal to reference.build_routing's default block_m so the plan
# built by SparseMoE is used as is. Autotuning varies BLOCK_N/BLOCK_K/warps/stages, not BLOCK_M,
# because the tile map depends on it.
BLOCK_M = 64

# Activation name -> (kernel activation code of kernels/grouped_gemm.py, GLU).
_ACT_CODE = {"swiglu": (0, True), "geglu": (1, True), "silu": (0, False), "gelu": (1, False), "relu": (2, False)}


def _pinned() -> bool:
    """One fixed config instead of autotuning: required in the interpreter, optional on GPU."""
    return _backend.interpreting() or os.environ.get("UNIMOE_PIN_CONFIG", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rank_block(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, _next_pow2(r))


def _n_bucket(n: int) -> int:
    # Rows rounded up to a power of two (at least 1024) so the autotune cache holds a few entries
    # per (H, F), not one per batch size.
    return max(1024, _next_pow2(n))


# ----------------------------------------------------------------------------------------------
# Kernel configs
# ----------------------------------------------------------------------------------------------

# Interpreter: big blocks, because its cost grows with programs x loop trips, not block size.
_MM_INTERPRET = dict(BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=1)
_XTY_INTERPRET = dict(BLOCK_P=64, BLOCK_Q=128, BLOCK_K=64, num_warps=4, num_stages=1)
# GPU with UNIMOE_PIN_CONFIG=1: a config that is good on H100 for H, F in the thousands.
_MM_PINNED = dict(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
_XTY_PINNED = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=32, num_warps=8, num_stages=3)
# Autotune candidates (BLOCK_N, BLOCK_K, warps, stages); two fp32 64x128 accumulators (GLU) fit 4 warps.
_MM_TUNE = [(128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 4), (128, 32, 4, 4), (128, 64, 8, 3), (64, 32, 4, 5)]
_XTY_TUNE = [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 64, 8, 3)]


@functools.lru_cache(maxsize=None)
def _kernels(pinned: bool):
    """(grouped_mm, grouped_xty, raw grouped_mm, raw grouped_xty); autotuned unless pinned."""
    import triton

    from ..kernels import grouped_gemm as kern

    mm, xty = kern.grouped_mm_kernel, kern.grouped_xty_kernel
    if pinned:
        return mm, xty, mm, xty
    mm_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in _MM_TUNE],
        key=["n_bucket", "K", "NOUT", "EPILOGUE", "GLU", "HAS_LORA", "DROPOUT", "GATHER"],
    )(mm)
    xty_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for p, q, k, w, s in _XTY_TUNE
        ],
        key=["n_bucket", "P", "Q", "DROPOUT_Y", "GATHER_Y"],
    )(xty)
    return mm_tuned, xty_tuned, mm, xty


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so the Triton path is as exact as the torch path.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _grouped_mm(
    x: torch.Tensor,  # [N, K]
    w: torch.Tensor,  # [E, K, NOUT] view (strides may be transposed)
    out: torch.Tensor,  # [N, NOUT] or dz
    tiles: tuple,  # (offsets, tile_expert, tile_row_start)
    *,
    nout: int,
    lora: Optional[tuple] = None,  # (xa [N, R], b [E, R, NOUT] view, scale)
    epilogue: int = 0,
    act: int = 0,
    glu: bool = False,
    z: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None,
    store_z: bool = False,
    up_offsets: tuple = (0, 0, 0, 0),
    small_n: bool = False,
    dropout: Optional[tuple] = None,  # (seed [1] int64, p, mode 1: on X tiles | 2: on the LoRA term)
    gather: Optional[torch.Tensor] = None,  # [N] source row of x for each sorted row (x is [T, K])
) -> None:
    offsets, tile_expert, tile_row_start = tiles
    k = x.shape[1]
    n = out.shape[0]
    pinned = _pinned()
    tuned, _, raw, _ = _kernels(pinned)
    xa, b, scale = lora if lora is not None else (x, w, 0.0)
    r = xa.shape[1] if lora is not None else 1
    z_ = z if z is not None else out
    h_ = h if h is not None else out
    args = (
        x, x.stride(0), x.stride(1),
        w, w.stride(0), w.stride(1), w.stride(2),
        xa, xa.stride(0), xa.stride(1),
        b, b.stride(0), b.stride(1), b.stride(2),
        out, out.stride(0), out.stride(1),
        z_, z_.stride(0), z_.stride(1),
        h_, h_.stride(0), h_.stride(1),
        offsets, tile_expert, tile_row_start,
        k, nout, r, *up_offsets, float(scale),
        gather if gather is not None else offsets, *_dropout_args(dropout, offsets), _n_bucket(n),
    )
    meta = dict(
        HAS_LORA=lora is not None, DROPOUT=dropout[2] if dropout is not None else 0, GATHER=gather is not None,
        EPILOGUE=epilogue,
        ACT=act, GLU=glu, STORE_Z=store_z, DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=BLOCK_M,
        BLOCK_R=_rank_block(r), GROUP_M=GROUP_M,
    )
    n_tiles = tile_expert.numel()
    interp = _backend.interpreting()
    if small_n:
        # Rank-sized outputs (x A^T, dy B): one column tile of the rank, no autotuning needed; a
        # bandwidth-bound pass over x, so BLOCK_K 64 with 3 stages keeps loads in flight on GPU.
        cfg = dict(BLOCK_N=_rank_block(nout), BLOCK_K=128 if interp else 64, num_warps=4, num_stages=1 if interp else 3)
        raw[(n_tiles,)](*args, **meta, **cfg)
    elif pinned:
        cfg = _MM_INTERPRET if interp else _MM_PINNED
        raw[(n_tiles * -(-nout // cfg["BLOCK_N"]),)](*args, **meta, **cfg)
    else:
        tuned[lambda m: (n_tiles * -(-nout // m["BLOCK_N"]),)](*args, **meta)


def _dropout_args(dropout: Optional[tuple], dummy: torch.Tensor) -> tuple:
    """(seed pointer, p, 1 / (1 - p)) kernel arguments; a dummy pointer when there is no dropout."""
    if dropout is None:
        return dummy, 0.0, 1.0
    seed, p = dropout[0], float(dropout[1])
    return seed, p, 1.0 / (1.0 - p)


def _grouped_xty(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, scale: float = 1.0,
                 dropout: Optional[tuple] = None, gather_y: Optional[torch.Tensor] = None) -> None:
    """out[e] = scale * x[rows of e]^T @ dropout(y[rows of e]); x [N, P], y [N, Q], out [E, P, Q].

    dropout: (seed [1] int64, p) when y is a LoRA input under dropout; gather_y [N]: y is [T, Q]
    and sorted row r reads y[gather_y[r]]."""
    e, p, q = out.shape
    n = x.shape[0]
    pinned = _pinned()
    _, tuned, _, raw = _kernels(pinned)
    args = (
        x, x.stride(0), x.stride(1),
        y, y.stride(0), y.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        offsets, p, q, float(scale), gather_y if gather_y is not None else offsets,
        *_dropout_args(dropout, offsets), _n_bucket(n),
    )
    prec = _dot_precision(x.dtype)
    drop = dict(DROPOUT_Y=dropout is not None, GATHER_Y=gather_y is not None)
    interp = _backend.interpreting()
    if min(p, q) <= 64 and not interp:
        # A LoRA gradient: one side is the rank, so that side gets one small tile.
        bp = _rank_block(p) if p <= 64 else 128
        bq = _rank_block(q) if q <= 64 else 128
        raw[(e, -(-p // bp) * -(-q // bq))](
            *args, **drop, DOT_PRECISION=prec, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_K=64, num_warps=4, num_stages=3)
    elif pinned:
        cfg = dict(_XTY_INTERPRET if interp else _XTY_PINNED)
        if interp:
            cfg["BLOCK_P"] = min(cfg["BLOCK_P"], max(16, _next_pow2(p)))
            cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], max(16, _next_pow2(q)))
        grid = (e, -(-p // cfg["BLOCK_P"]) * -(-q // cfg["BLOCK_Q"]))
        raw[grid](*args, **drop, DOT_PRECISION=prec, **cfg)
    else:
        tuned[lambda m: (e, -(-p // m["BLOCK_P"]) * -(-q // m["BLOCK_Q"]))](*args, **drop, DOT_PRECISION=prec)


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """[rows, cols] fp32 LoRA dropout mask (0 or 1 / (1 - p)) that the kernels use for `seed` [1] int64.

    Row r of a LoRA input of the forward (x_sorted for seeds[0], h for seeds[1]) is multiplied by
    row r of this mask; for tests and debugging, the kernels never store it.
    """
    from ..kernels import grouped_gemm as kern

    out = torch.empty((rows, cols), device=seed.device, dtype=torch.float32)
    block_m, block_c = 64, 64  # any size works; the mask depends only on (seed, row, col)
    kern.dropout_mask_kernel[(-(-rows // block_m), -(-cols // block_c))](
        seed, out, rows, cols, float(p), 1.0 / (1.0 - p), BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def tile_map(tokens_per_expert: torch.Tensor, num_rows: int, block_m: int = BLOCK_M):
    """(offsets [E+1] int64, tile_expert [max_tiles] int32, tile_row_start [max_tiles] int64) on the
    device of tokens_per_expert, without a host sync; same definition as reference.build_routing."""
    counts = tokens_per_expert.to(torch.int64)
    e = counts.numel()
    device = counts.device
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(tiles_per_expert, 0)])
    tile_idx = torch.arange(max_tiles(num_rows, e, block_m), device=device)
    tile_expert = torch.searchsorted(tile_offsets[1:], tile_idx, right=True)
    used = tile_idx < tile_offsets[-1]
    safe = tile_expert.clamp(max=e - 1)
    tile_row_start = offsets[safe] + (tile_idx - tile_offsets[safe]) * block_m
    tile_expert = torch.where(used, tile_expert, torch.full_like(tile_expert, -1)).to(torch.int32)
    tile_row_start = torch.where(used, tile_row_start, torch.full_like(tile_row_start, num_rows))
    return offsets, tile_expert, tile_row_start


# ----------------------------------------------------------------------------------------------
# Forward and backward bodies (plain functions, wrapped as custom ops below)
# ----------------------------------------------------------------------------------------------


def _empty(ref: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an absent result is a 0-element tensor.
    return ref.new_empty((0,))


def _seed_pair(seeds, p):
    """Dropout descriptors (seed, p) of the LoRA inputs x and h, or (None, None) without dropout."""
    if seeds is None or p <= 0.0:
        return None, None
    return (seeds[0:1], p), (seeds[1:2], p)


def _gemm1(x, xa, w_gu, b_gu, tiles, act, glu, scale, hid, z, gather):
    """hid = act(x W_gu^T + s xa B_gu^T) ([N, F]); also the pre-activation into z [N, 2F|F] unless z is None."""
    fdim = hid.shape[1]
    # W_gu [E, 2F|F, H] read as [E, K=H, 2F|F]; GLU: columns n (gate) and F + n (up).
    w1 = w_gu.transpose(1, 2)
    lora1 = (xa, b_gu.transpose(1, 2), scale) if b_gu is not None else None
    b1 = lora1[1] if lora1 is not None else w1
    z_ = z if z is not None else hid
    _grouped_mm(
        x, w1, hid, tiles, nout=fdim, lora=lora1, epilogue=1, act=act, glu=glu, z=z_, store_z=z is not None,
        up_offsets=(fdim * w1.stride(2), fdim * b1.stride(2), fdim * z_.stride(1), 0), gather=gather,
    )


def _gated(t: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    """t [N, r] times the rank gate g [N, r] (fp32 product, t's dtype out), or t without a gate."""
    if g is None:
        return t
    # t (x's dtype) * g (fp32) promotes to fp32 in one kernel; then one cast back.
    return (t * g).to(t.dtype)


def _fwd_impl(x, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale,
              seeds, dropout_p, save_preact, gather, g_gu=None, g_d=None):
    hdim = x.shape[1]
    n = gather.numel() if gather is not None else x.shape[0]
    fdim = w_d.shape[2]
    act, glu = _ACT_CODE[activation]
    has_lora = a_gu is not None
    tiles = (offsets, tile_expert, tile_row_start)
    drop_x, drop_h = _seed_pair(seeds, dropout_p)
    # Without save_preact z is the [0] placeholder and backward recomputes it (1-D marks that).
    z = x.new_empty((n, w_gu.shape[1])) if save_preact else _empty(x)
    hid = x.new_empty((n, fdim))
    y = x.new_empty((n, hdim))
    xa, ha = _empty(x), _empty(x)  # distinct: a custom op's outputs may not alias each other
    lora2 = None
    if has_lora:
        r = a_gu.shape[1]
        xa = x.new_empty((n, r))
        # x A^T: A [E, r, H] read as [E, K=H, r].
        _grouped_mm(x, a_gu.transpose(1, 2), xa, tiles, nout=r, small_n=True,
                    dropout=None if drop_x is None else (*drop_x, 1), gather=gather)
    _gemm1(x, _gated(xa, g_gu), w_gu, b_gu, tiles, act, glu, scale, hid, z if save_preact else None, gather)
    if has_lora:
        ha = x.new_empty((n, a_d.shape[1]))
        _grouped_mm(hid, a_d.transpose(1, 2), ha, tiles, nout=a_d.shape[1], small_n=True,
                    dropout=None if drop_h is None else (*drop_h, 1))
        lora2 = (_gated(ha, g_d), b_d.transpose(1, 2), scale)
    _grouped_mm(hid, w_d.transpose(1, 2), y, tiles, nout=hdim, lora=lora2)
    return y, z, xa, ha


def _sum_slots(dx_sorted: torch.Tensor, slot_rows: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """dx [T, H] of gathered x: dx[t] = sum_j dx_sorted[slot_rows[t*k + j]], in fp32, no atomics
    (deterministic, unlike index_add)."""
    # The width named explicitly: view(..., -1) is ambiguous for an empty batch (0 elements).
    rows = dx_sorted.index_select(0, slot_rows.to(torch.int64)).view(tokens, top_k, dx_sorted.shape[1])
    return rows.sum(1, dtype=torch.float32).to(dx_sorted.dtype)


def _bwd_impl(dy, x, z, xa, ha, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d,
              activation, scale, seeds, dropout_p, need_dx, need_dw_gu, need_dw_d, need_lora,
              gather, slot_rows, top_k, g_gu=None, g_d=None, need_gates=False):
    hdim = x.shape[1]
    n = dy.shape[0]
    fdim = w_d.shape[2]
    act, glu = _ACT_CODE[activation]
    has_lora = a_gu is not None
    tiles = (offsets, tile_expert, tile_row_start)
    drop_x, drop_h = _seed_pair(seeds, dropout_p)
    dy = dy.contiguous()
    if z.dim() == 1:
        # Pre-activation not saved (recompute=True): GEMM 1 again, its h output discarded here
        # because the dh kernel below recomputes h from z anyway.
        z = x.new_empty((n, w_gu.shape[1]))
        _gemm1(x, _gated(xa, g_gu), w_gu, b_gu, tiles, act, glu, scale, x.new_empty((n, fdim)), z, gather)
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d = (_empty(x) for _ in range(7))
    dg_gu, dg_d = _empty(x), _empty(x)

    lora2 = None
    if has_lora:
        r = a_d.shape[1]
        # dy B_d: B_d [E, H, r] is already [E, K=H, r].
        dyb = x.new_empty((n, r))
        _grouped_mm(dy, b_d, dyb, tiles, nout=r, small_n=True)
        if g_d is not None and need_gates:
            dg_d = torch.mul(dyb.to(torch.float32), ha).mul_(scale)
        lora2 = (_gated(dyb, g_d), a_d, scale)  # A_d [E, r, F] is [E, R, NOUT].
    dz = x.new_empty(z.shape)
    hid = x.new_empty((n, fdim))
    # dy W_d: W_d [E, H, F] is already [E, K=H, NOUT=F].
    _grouped_mm(
        dy, w_d, dz, tiles, nout=fdim, lora=lora2, epilogue=2, act=act, glu=glu, z=z, h=hid,
        up_offsets=(0, 0, fdim * z.stride(1), fdim * dz.stride(1)),
        dropout=None if drop_h is None else (*drop_h, 2),
    )
    if need_dw_d:
        dw_d = torch.empty_like(w_d)
        _grouped_xty(dy, hid, dw_d, offsets)
    if has_lora and need_lora:
        da_d = torch.empty_like(a_d)
        _grouped_xty(lora2[0], hid, da_d, offsets, scale, dropout=drop_h)
        db_d = torch.empty_like(b_d)
        _grouped_xty(dy, _gated(ha, g_d), db_d, offsets, scale)

    lora1 = None
    if has_lora:
        r = a_gu.shape[1]
        dzb = x.new_empty((n, r))
        _grouped_mm(dz, b_gu, dzb, tiles, nout=r, small_n=True)  # B_gu [E, 2F|F, r] = [E, K, r]
        if g_gu is not None and need_gates:
            dg_gu = torch.mul(dzb.to(torch.float32), xa).mul_(scale)
        lora1 = (_gated(dzb, g_gu), a_gu, scale)  # A_gu [E, r, H] = [E, R, NOUT]
    if need_dx:
        dx = x.new_empty((n, hdim))
        # W_gu [E, 2F|F, H] = [E, K, H]
        _grouped_mm(dz, w_gu, dx, tiles, nout=hdim, lora=lora1,
                    dropout=None if drop_x is None or lora1 is None else (*drop_x, 2))
        if gather is not None:
            dx = _sum_slots(dx, slot_rows, x.shape[0], top_k)
    if need_dw_gu:
        dw_gu = torch.empty_like(w_gu)
        _grouped_xty(dz, x, dw_gu, offsets, gather_y=gather)
    if has_lora and need_lora:
        da_gu = torch.empty_like(a_gu)
        _grouped_xty(lora1[0], x, da_gu, offsets, scale, dropout=drop_x, gather_y=gather)
        db_gu = torch.empty_like(b_gu)
        _grouped_xty(dz, _gated(xa, g_gu), db_gu, offsets, scale)
    return dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d, dg_gu, dg_d


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, traced through their fake implementations)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("unimoe::grouped_mlp_fwd", mutates_args=())
def grouped_mlp_fwd(
    x: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row_start: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    a_gate_up: Optional[torch.Tensor],
    b_gate_up: Optional[torch.Tensor],
    a_down: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    scale: float,
    seeds: Optional[torch.Tensor],
    dropout_p: float,
    save_preact: bool = True,
    gather_index: Optional[torch.Tensor] = None,
    slot_rows: Optional[torch.Tensor] = None,
    top_k: int = 1,
    rank_gate_gate_up: Optional[torch.Tensor] = None,
    rank_gate_down: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [N, H], z [N, 2F|F] or [0] when not save_preact, xa [N, r] or [0], ha [N, r] or [0]).

    With gather_index [N] (and slot_rows [N], top_k for backward), x is the token matrix [T, H]
    and sorted row r reads x[gather_index[r]]; otherwise x is x_sorted [N, H]. rank_gate_* [N, r]
    fp32 (sorted rows; both or neither, LoRA only) gate the rank-1 pieces of the LoRA terms; xa
    and ha are returned ungated.
    """
    return _fwd_impl(x, offsets, tile_expert, tile_row_start, gate_up_proj, down_proj,
                     a_gate_up, b_gate_up, a_down, b_down, activation, scale, seeds, dropout_p, save_preact,
                     gather_index, rank_gate_gate_up, rank_gate_down)


@grouped_mlp_fwd.register_fake
def _(x, offsets, tile_expert, tile_row_start, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down,
      activation, scale, seeds, dropout_p, save_preact=True, gather_index=None, slot_rows=None, top_k=1,
      rank_gate_gate_up=None, rank_gate_down=None):
    n = gather_index.shape[0] if gather_index is not None else x.shape[0]
    lora = a_gate_up is not None
    return (
        x.new_empty((n, down_proj.shape[1])),
        x.new_empty((n, gate_up_proj.shape[1])) if save_preact else x.new_empty((0,)),
        x.new_empty((n, a_gate_up.shape[1])) if lora else x.new_empty((0,)),
        x.new_empty((n, a_down.shape[1])) if lora else x.new_empty((0,)),
    )


@torch.library.custom_op("unimoe::grouped_mlp_bwd", mutates_args=())
def grouped_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    xa: torch.Tensor,
    ha: torch.Tensor,
    offsets: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row_start: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    a_gate_up: Optional[torch.Tensor],
    b_gate_up: Optional[torch.Tensor],
    a_down: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    scale: float,
    seeds: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_dw_gate_up: bool,
    need_dw_down: bool,
    need_lora: bool,
    gather_index: Optional[torch.Tensor] = None,
    slot_rows: Optional[torch.Tensor] = None,
    top_k: int = 1,
    rank_gate_gate_up: Optional[torch.Tensor] = None,
    rank_gate_down: Optional[torch.Tensor] = None,
    need_rank_gates: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(dx, d gate_up_proj, d down_proj, dA_gu, dB_gu, dA_d, dB_d, d rank_gate_gate_up [N, r] fp32,
    d rank_gate_down [N, r] fp32); results not asked for are [0]."""
    return _bwd_impl(dy, x, z, xa, ha, offsets, tile_expert, tile_row_start, gate_up_proj, down_proj,
                     a_gate_up, b_gate_up, a_down, b_down, activation, scale, seeds, dropout_p,
                     need_dx, need_dw_gate_up, need_dw_down, need_lora, gather_index, slot_rows, top_k,
                     rank_gate_gate_up, rank_gate_down, need_rank_gates)


@grouped_mlp_bwd.register_fake
def _(dy, x, z, xa, ha, offsets, tile_expert, tile_row_start, gate_up_proj, down_proj, a_gate_up, b_gate_up,
      a_down, b_down, activation, scale, seeds, dropout_p, need_dx, need_dw_gate_up, need_dw_down, need_lora,
      gather_index=None, slot_rows=None, top_k=1, rank_gate_gate_up=None, rank_gate_down=None,
      need_rank_gates=False):
    def maybe(flag, like):
        return torch.empty_like(like) if flag and like is not None else x.new_empty((0,))

    lora = need_lora and a_gate_up is not None
    gates = need_rank_gates and a_gate_up is not None
    return (
        maybe(need_dx, x), maybe(need_dw_gate_up, gate_up_proj), maybe(need_dw_down, down_proj),
        maybe(lora, a_gate_up), maybe(lora, b_gate_up), maybe(lora, a_down), maybe(lora, b_down),
        maybe(gates, rank_gate_gate_up), maybe(gates, rank_gate_down),
    )


def _setup_context(ctx, inputs, output):
    (x, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, seeds,
     dropout_p, _save_preact, gather_index, slot_rows, top_k, g_gu, g_d) = inputs
    _, z, xa, ha = output
    ctx.activation, ctx.scale, ctx.dropout_p, ctx.top_k = activation, scale, dropout_p, top_k
    ctx.has_lora = a_gu is not None
    ctx.has_gates = g_gu is not None
    ctx.save_for_backward(x, z, xa, ha, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d,
                          seeds, gather_index, slot_rows, g_gu, g_d)


def _backward(ctx, dy, _dz, _dxa, _dha):
    (x, z, xa, ha, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d, seeds, gather_index,
     slot_rows, g_gu, g_d) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_lora = ctx.has_lora and any(need[6:10])
    need_gates = ctx.has_lora and ctx.has_gates and any(need[18:20])
    grads = grouped_mlp_bwd(
        dy, x, z, xa, ha, offsets, tile_expert, tile_row_start, w_gu, w_d, a_gu, b_gu, a_d, b_d,
        ctx.activation, ctx.scale, seeds, ctx.dropout_p, need[0], need[4], need[5], need_lora,
        gather_index, slot_rows, ctx.top_k, g_gu, g_d, need_gates,
    )
    dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d, dg_gu, dg_d = grads
    return (
        dx if need[0] else None, None, None, None,
        dw_gu if need[4] else None, dw_d if need[5] else None,
        da_gu if need_lora and need[6] else None, db_gu if need_lora and need[7] else None,
        da_d if need_lora and need[8] else None, db_d if need_lora and need[9] else None,
        None, None, None, None, None, None, None, None,
        dg_gu if need_gates and need[18] else None, dg_d if need_gates and need[19] else None,
    )


grouped_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def _check_args(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora):
    glu = reference.is_glu(activation)  # raises ValueError naming `activation`
    for name, t in (("x_sorted", x_sorted), ("tokens_per_expert", tokens_per_expert),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if gate_up_proj.dim() != 3:
        raise ValueError(f"gate_up_proj must be [E, 2F|F, H], got {tuple(gate_up_proj.shape)}")
    e, f_in, h = gate_up_proj.shape
    f = f_in // 2 if glu else f_in
    if glu and f_in % 2:
        raise ValueError(
            f"gate_up_proj must be [E, 2F, H] for activation={activation!r}, got {tuple(gate_up_proj.shape)}")
    if x_sorted.dim() != 2 or x_sorted.shape[1] != h:
        raise ValueError(f"x_sorted must be [N, H={h}], got {tuple(x_sorted.shape)}")
    if not x_sorted.is_floating_point():
        raise TypeError(f"x_sorted must be a floating tensor, got {x_sorted.dtype}")
    if tokens_per_expert.shape != (e,) or tokens_per_expert.is_floating_point():
        raise ValueError(f"tokens_per_expert must be an integer tensor [E={e}], got "
                         f"{tokens_per_expert.dtype} {tuple(tokens_per_expert.shape)}")
    if down_proj.shape != (e, h, f):
        raise ValueError(f"down_proj must be [E={e}, H={h}, F={f}], got {tuple(down_proj.shape)}")
    if lora is not None:
        a_gu, b_gu, a_d, b_d = lora
        r = a_gu.shape[1] if a_gu.dim() == 3 else -1
        for name, t, shape in (("lora.a_gate_up", a_gu, (e, r, h)), ("lora.b_gate_up", b_gu, (e, f_in, r)),
                               ("lora.a_down", a_d, (e, r, f)), ("lora.b_down", b_d, (e, h, r))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} (E, r, H, F from the weights), got {tuple(t.shape)}")
    tensors = [("gate_up_proj", gate_up_proj), ("down_proj", down_proj)]
    if lora is not None:
        tensors += list(zip(("lora.a_gate_up", "lora.b_gate_up", "lora.a_down", "lora.b_down"), lora))
    for name, t in tensors:
        if t.dtype != x_sorted.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x_sorted has {x_sorted.dtype}; they must match")
        if t.device != x_sorted.device:
            raise ValueError(f"{name} is on {t.device} but x_sorted is on {x_sorted.device}")


def _check_rank_gates(rank_gates, lora, n: int, device: torch.device):
    """rank_gates must be (g_gate_up [N, r], g_down [N, r]) floating tensors on x's device, with LoRA."""
    if rank_gates is None:
        return
    if lora is None:
        raise ValueError("rank_gates gate the LoRA rank-1 pieces and need lora (lora_rank > 0)")
    if not isinstance(rank_gates, (tuple, list)) or len(rank_gates) != 2:
        raise TypeError(f"rank_gates must be a pair (g_gate_up [N, r], g_down [N, r]), got {type(rank_gates).__name__}")
    r = lora[0].shape[1]
    for name, g in zip(("rank_gates[0]", "rank_gates[1]"), rank_gates):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if tuple(g.shape) != (n, r):
            raise ValueError(f"{name} must be [N={n}, r={r}] (one gate row per routed row), got {tuple(g.shape)}")
        if g.device != device:
            raise ValueError(f"{name} is on {g.device} but x is on {device}")


def grouped_mlp(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "swiglu",
    *,
    lora: Optional[LoRAWeights] = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    plan: Optional[RoutingPlan] = None,
    recompute: bool = False,
    rank_gates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Expert MLP over expert-grouped rows x_sorted [N, H] -> y_sorted [N, H].

    Semantics of reference.grouped_mlp; tokens_per_expert [E] must sum to N. `plan` (optional) lends
    its expert offsets and tile map to the Triton path so they are not rebuilt; it must describe
    these rows. recompute=True (Triton path) saves no pre-activation for backward and runs GEMM 1
    again there instead: N*(2F|F) fewer elements of activation memory for one more GEMM 1.
    rank_gates (g_gate_up [N, r], g_down [N, r], e.g. reference.lora_rank_gates) gate the rank-1
    pieces of both LoRA terms; their gradient flows back through autograd.
    """
    _check_args(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora)
    _check_rank_gates(rank_gates, lora, x_sorted.shape[0], x_sorted.device)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    use_triton = _backend.resolve(backend, x_sorted.device) == "triton"
    if not use_triton or x_sorted.dtype == torch.float64:
        # fp64 (gradcheck) has no tensor-core dot; the reference path is exact for it.
        return reference.grouped_mlp(
            x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation,
            lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, training=training, rank_gates=rank_gates,
        )
    return _triton_grouped_mlp(
        x_sorted, x_sorted.shape[0], tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora,
        lora_scale, lora_dropout, training, recompute, rank_gates=rank_gates,
    )


def _triton_grouped_mlp(x, n, tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora, lora_scale,
                        lora_dropout, training, recompute, top_k=None, rank_gates=None):
    """The Triton path of grouped_mlp (top_k None) and grouped_mlp_gather (x [T, H], plan required)."""
    e = gate_up_proj.shape[0]
    if plan is not None and plan.block_m == BLOCK_M and plan.tile_expert.numel() == max_tiles(n, e, BLOCK_M):
        offsets, tile_expert, tile_row_start = plan.expert_offsets, plan.tile_expert, plan.tile_row_start
    else:
        offsets, tile_expert, tile_row_start = tile_map(tokens_per_expert, n)
    a_gu, b_gu, a_d, b_d = lora if lora is not None else (None, None, None, None)
    seeds, p = None, 0.0
    if lora is not None and lora_dropout > 0 and training:
        # Two philox seeds (LoRA inputs x and h) drawn from torch's generator on the device: no
        # host sync, reproducible under torch.manual_seed; the masks are regenerated in backward.
        seeds, p = torch.randint(0, 2**62, (2,), device=x.device, dtype=torch.int64), float(lora_dropout)
    gather = slot_rows = None
    if top_k is not None:
        gather = torch.div(plan.sorted_slots, top_k, rounding_mode="floor")  # sorted row -> token
        slot_rows = plan.slot_rows
    g_gu = g_d = None
    if rank_gates is not None:
        # fp32 gates whatever x's dtype: the op multiplies [N, r] tensors by them in fp32.
        g_gu, g_d = (g.to(torch.float32).contiguous() for g in rank_gates)
    y, _, _, _ = grouped_mlp_fwd(
        x, offsets, tile_expert, tile_row_start, gate_up_proj, down_proj, a_gu, b_gu, a_d, b_d,
        activation, float(lora_scale), seeds, p, not recompute, gather, slot_rows, top_k or 1, g_gu, g_d,
    )
    return y


def grouped_mlp_gather(
    x: torch.Tensor,
    plan: RoutingPlan,
    top_k: int,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "swiglu",
    *,
    lora: Optional[LoRAWeights] = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    recompute: bool = False,
    rank_gates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """permute + grouped_mlp in one op: tokens x [T, H] and the plan of their T*top_k slots ->
    y_sorted [T*top_k, H] in expert order (ready for unpermute). rank_gates as in grouped_mlp, one
    row per sorted row [T*top_k, r].

    The Triton path gathers the rows of x inside the GEMM kernels (gather on load), so the permuted
    copy x_sorted [T*k, H] is neither written nor saved for backward; dx is summed back per token
    in fp32 without atomics. The torch path is reference.permute followed by reference.grouped_mlp.
    """
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    _check_args(x, plan.tokens_per_expert, gate_up_proj, down_proj, activation, lora)
    if x.shape[0] * top_k != plan.sorted_slots.numel():
        raise ValueError(
            f"x must be [T, H] with T*top_k = {plan.sorted_slots.numel()} routed slots, got {tuple(x.shape)}")
    _check_rank_gates(rank_gates, lora, plan.sorted_slots.numel(), x.device)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    use_triton = _backend.resolve(backend, x.device) == "triton"
    if not use_triton or x.dtype == torch.float64:
        return reference.grouped_mlp(
            reference.permute(x, plan, top_k), plan.tokens_per_expert, gate_up_proj, down_proj, activation,
            lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, training=training, rank_gates=rank_gates,
        )
    return _triton_grouped_mlp(
        x, plan.sorted_slots.numel(), plan.tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora,
        lora_scale, lora_dropout, training, recompute, top_k=top_k, rank_gates=rank_gates,
    )


__all__ = [
    "grouped_mlp", "grouped_mlp_gather", "grouped_mlp_fwd", "grouped_mlp_bwd", "tile_map", "dropout_mask", "BLOCK_M",
]
