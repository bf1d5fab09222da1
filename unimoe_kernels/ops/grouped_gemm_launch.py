"""Launchers of the grouped GEMM kernels: arguments, configs (gemm_configs.py) and grids.

grouped_mm: kernels/grouped_mm.py, the activation-sized GEMMs (roles up, up_glu, down, dact, dgrad)
    with the LoRA side product fused in; grid = every (row tile, column tile), or one program per
    SM walking the tiles when the config says PERSISTENT. The row-tile count is bounded on the host
    by types.max_tiles (no sync); the kernel finds its tiles from the expert offsets and programs
    beyond the real count exit at once.
grouped_xty: kernels/grouped_xty.py, per-expert X^T Y (weight gradients), expert-major.
expert_colsum: kernels/expert_colsum.py, per-expert column sums (bias gradients).
dropout_mask: the LoRA dropout mask the kernels regenerate, written out (tests, debugging).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from .. import backend as _backend
from ..types import ACTIVATION_KINDS, max_tiles, parse_activation
from . import gemm_configs
from .launch_utils import cdiv, next_pow2


@functools.lru_cache(maxsize=None)
def _act_codes() -> dict:
    """Activation kind -> the kernels' activation code (kernels/gemm_common.py's ACT_*), imported on
    first use so that importing the package does not import triton."""
    from ..kernels import gemm_common as k

    return {"swiglu": k.ACT_SILU, "silu": k.ACT_SILU, "geglu": k.ACT_GELU, "gelu": k.ACT_GELU, "relu": k.ACT_RELU,
            "geglu_tanh": k.ACT_GELU_TANH, "gelu_tanh": k.ACT_GELU_TANH, "relu2": k.ACT_RELU2,
            "swiglu_clamp": k.ACT_CLAMP, "geglu_clamp": k.ACT_GELU_CLAMP, "swiglu_softcap": k.ACT_SOFTCAP}


# The kernels' constant slot (c0, c1, c2) of each named constant (gemm_common's ACT_* comments).
_SLOTS = {"alpha": 0, "gate_cap": 0, "beta": 1, "up_cap": 1, "limit": 2}


def act_code(activation: str) -> tuple[int, bool, tuple[float, float, float]]:
    """(kernel activation code, GLU, its three constants) of an activation string (types.py)."""
    kind, consts = parse_activation(activation)
    glu, names = ACTIVATION_KINDS[kind]
    slots = [0.0, 0.0, 0.0]
    for name, value in zip(names, consts):
        slots[_SLOTS[name]] = float(value)
    return _act_codes()[kind], glu, tuple(slots)


class LoRASide(NamedTuple):
    """The LoRA term of one grouped_mm call: out += scale * ((X' a) * gate) b, with X' a written to side.

    a: [E, K, R] view of the factor applied to X; b: [E, R, NOUT] view of the second factor;
    side: [N, R] output in X's dtype; gate: [N, R] fp32 rank gate or None.
    """

    a: torch.Tensor
    b: torch.Tensor
    side: torch.Tensor
    scale: float
    gate: Optional[torch.Tensor] = None


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own CUDA matmul setting, so the Triton path is as exact as the torch path.

    torch.backends.cuda.matmul.fp32_precision is "tf32" when TF32 is allowed by any of torch's
    switches (itself, torch.backends.fp32_precision, the legacy allow_tf32 or
    set_float32_matmul_precision); reading allow_tf32 instead raises once the new API has been used.
    """
    if dtype != torch.float32:
        return "tf32"  # unused: 16-bit dots are exact products with fp32 accumulation
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "tf32" if precision == "tf32" else "ieee"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_programs(device: torch.device) -> Optional[int]:
    """Programs of a persistent launch: one per SM (None off CUDA: no cap)."""
    if device.type != "cuda":
        return None
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _use_tma(device: torch.device) -> bool:
    """TMA tensor descriptors: Hopper and later, and the interpreter (which emulates them); meta
    tensors stand for the GPU in sm90_check."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return device.type == "meta" or _backend.interpreting()


def _aligned(t: torch.Tensor) -> bool:
    # TMA needs a 16-byte aligned base and 16-byte multiples for every stride but the last (1).
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def _w_descriptor(w: torch.Tensor, block_n: int, block_k: int, glu_pack: bool = False):
    """(descriptor of W's storage or None, k-major) for a weight view w [E, K, NOUT]: the storage is
    [E, NOUT, K] when K is the contiguous axis ("x W^T"), else [E, K, NOUT] ("dy W"). glu_pack: the
    NOUT axis is gate | up (2F) and is split into [2, F], so that one box holds block_n / 2 gate
    columns and the same up columns."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    kmajor = w.stride(1) == 1 and w.shape[1] > 1
    e, k, nout = w.shape
    half = block_n // 2
    if kmajor and glu_pack:
        storage, block = w.transpose(1, 2).view(e, 2, nout // 2, k), [1, 2, half, block_k]
    elif kmajor:
        storage, block = w.transpose(1, 2), [1, block_n, block_k]
    elif glu_pack:
        storage, block = w.view(e, k, 2, nout // 2), [1, block_k, 2, half]
    else:
        storage, block = w, [1, block_k, block_n]
    # The split view's strides include the unsplit storage's, so one check covers both.
    if not _aligned(storage):
        return None, kmajor
    return TensorDescriptor.from_tensor(storage, block), kmajor


def _x_descriptor(x: torch.Tensor, block_m: int, block_k: int):
    """Descriptor of a row-major [N, K] activation with [block_m, block_k] blocks, or None."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if x.shape[0] == 0 or not _aligned(x):
        return None
    return TensorDescriptor.from_tensor(x, [block_m, block_k])


def _dropout_args(dropout: Optional[tuple], dummy: torch.Tensor) -> tuple:
    """(seed pointer, p, 1 / (1 - p)) kernel arguments; a dummy pointer when there is no dropout."""
    if dropout is None:
        return dummy, 0.0, 1.0
    seed, p = dropout[0], float(dropout[1])
    return seed, p, 1.0 / (1.0 - p)


def grouped_mm(
    x: torch.Tensor,  # [N, K], or [T, K] with gather
    w: torch.Tensor,  # [E, K, NOUT] view (strides may be transposed)
    out: torch.Tensor,  # [N, NOUT] or dz [N, 2F|F]
    offsets: torch.Tensor,  # [E+1] expert row offsets
    *,
    role: str,
    nout: int,
    lora: Optional[LoRASide] = None,
    epilogue: int = 0,
    act: int = 0,
    act_consts: tuple = (0.0, 0.0, 0.0),  # the activation's constants (act_code)
    glu: bool = False,
    z: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None,
    store_z: bool = False,
    up_offsets: tuple = (0, 0),  # GLU: element distance from a gate column to its up column in z, dz
    interleaved: bool = False,  # GLU: gate and up columns alternate (W, B, bias in epilogue 1; z, dz in 1 and 2)
    bias: Optional[torch.Tensor] = None,  # [E, NOUT], or [E, 2F] in W's column layout (GLU epilogue 1)
    dbias: Optional[torch.Tensor] = None,  # epilogue 2: [E, 2F|F] out, per-expert column sums of dz (dz's layout)
    dropout: Optional[tuple] = None,  # (seed [1] int64, p, mode 1: side product's X tiles | 2: LoRA term)
    gather: Optional[torch.Tensor] = None,  # [N] source row of x for each sorted row
    row_scale: Optional[torch.Tensor] = None,  # [N] fp32 routing weight per sorted row (dact with gathered d(out))
    cfg: Optional[dict] = None,  # a config instead of gemm_configs.config's (sweeps, narrow outputs)
) -> Optional[torch.Tensor]:
    """Launch one grouped GEMM; with row_scale, returns the per-row d(routing weight) [N] fp32.

    With dbias, `out` (dz) must have the rows of a contiguous [N, dbias.shape[1]] tensor: the
    per-tile sums are written in its row layout."""
    from ..kernels.grouped_mm import grouped_mm_kernel

    k = x.shape[1]
    n = out.shape[0]
    e = offsets.numel() - 1
    side = lora.side if lora is not None else out
    a, b = (lora.a, lora.b) if lora is not None else (w, w)
    gate = lora.gate if lora is not None and lora.gate is not None else side
    r = side.shape[1] if lora is not None else 1
    z_ = z if z is not None else out
    h_ = h if h is not None else out

    if dbias is not None and out.stride(0) != dbias.shape[1]:
        raise ValueError(f"dbias {tuple(dbias.shape)} needs out in the row layout of a contiguous "
                         f"[N, {dbias.shape[1]}] tensor, got strides {out.stride()}")
    # The bias rows are read as contiguous vectors (a [E, C] bias is small: a copy if need be).
    bias_ = bias.contiguous() if bias is not None else offsets

    def kernel_args(x_desc, w_desc, a_desc, b_desc, rowdot: torch.Tensor, partial: torch.Tensor) -> tuple:
        """The kernel's arguments in its order (the descriptors and row sums depend on the config)."""
        return (
            x, x.stride(0), x.stride(1), x_desc,
            w, w.stride(0), w.stride(1), w.stride(2), w_desc,
            a, a.stride(0), a.stride(1), a.stride(2), a_desc,
            b, b.stride(0), b.stride(1), b.stride(2), b_desc,
            side, side.stride(0), side.stride(1),
            gate, gate.stride(0), gate.stride(1),
            out, out.stride(0), out.stride(1),
            z_, z_.stride(0), z_.stride(1),
            h_, h_.stride(0), h_.stride(1),
            bias_, bias_.stride(0) if bias is not None else 0,
            partial, partial.stride(0),
            row_scale if row_scale is not None else offsets, rowdot, rowdot.stride(0),
            offsets, e, k, nout, r, *up_offsets, float(lora.scale if lora is not None else 0.0),
            *(float(c) for c in act_consts),
            gather if gather is not None else offsets, *_dropout_args(dropout, offsets),
        )

    meta = dict(
        HAS_LORA=lora is not None, HAS_GATE=lora is not None and lora.gate is not None,
        DROPOUT=dropout[2] if dropout is not None else 0, GATHER=gather is not None, EPILOGUE=epilogue,
        ACT=act, GLU=glu, GLU_PACK=glu and epilogue == 1 and not interleaved, INTERLEAVED=glu and interleaved,
        STORE_Z=store_z,
        ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, BIAS_GRAD=dbias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=gemm_configs.rank_block(r), E_PAD=max(2, next_pow2(e)),
    )

    tma = _use_tma(x.device)
    paired = glu and epilogue == 1  # the accumulator holds gate and up columns

    def launch(c: dict) -> torch.Tensor:
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        # The GLU forward's BLOCK_N accumulator columns are bn / 2 output columns (gate and up).
        tiles = max_tiles(n, e, bm) * cdiv(nout, bn // 2 if paired else bn)
        cap = _persistent_programs(x.device) if c.get("PERSISTENT") else None
        if cap:
            tiles = min(tiles, cap)
        use_tma = tma and c.get("TMA", True)
        w_desc, kmajor = _w_descriptor(w, bn, bk, meta["GLU_PACK"]) if use_tma else (None, False)
        a_desc, a_kmajor, b_desc, b_kmajor = None, False, None, False
        if use_tma and lora is not None:
            a_desc, a_kmajor = _w_descriptor(a, meta["BLOCK_R"], bk)
            # b [E, R, NOUT]: its K is the rank; packed like W in the GLU forward.
            b_desc, b_kmajor = _w_descriptor(b, bn, meta["BLOCK_R"], meta["GLU_PACK"])
        x_desc = _x_descriptor(x, bm, bk) if use_tma and gather is None else None
        # Per-column-tile row sums, added up afterwards: deterministic, unlike atomics.
        rowdot = (torch.empty((n, cdiv(nout, bn)), dtype=torch.float32, device=x.device) if row_scale is not None
                  else offsets)
        # One row of column sums per row tile; tiles that do not exist leave theirs unwritten and
        # expert_colsum never reads them.
        partial = (torch.empty((max_tiles(n, e, bm), dbias.shape[1]), dtype=torch.float32, device=x.device)
                   if dbias is not None else offsets)
        grouped_mm_kernel[(max(1, tiles),)](
            *kernel_args(x_desc, w_desc, a_desc, b_desc, rowdot, partial), **meta, EVEN_K=k % bk == 0,
            X_DESC=x_desc is not None, W_DESC=w_desc is not None, W_KMAJOR=kmajor, A_DESC=a_desc is not None,
            A_KMAJOR=a_kmajor, B_DESC=b_desc is not None, B_KMAJOR=b_kmajor,
            FLATTEN=bool(c.get("PERSISTENT")), **gemm_configs.kernel_meta(c))
        if dbias is not None:
            expert_colsum(partial, offsets, dbias, tile_m=bm)
        return rowdot

    if cfg is None:
        cfg = gemm_configs.config(role, x.dtype, k, nout, e, n, x.device, run=launch, rank=r if lora else 0)
    rowdot = launch(cfg)
    return rowdot.sum(1) if row_scale is not None else None


def narrow_config(role: str, dtype: torch.dtype, k: int, nout: int, num_experts: int, rows: int,
                  device: torch.device) -> dict:
    """Config of a grouped_mm whose output is only rank-wide (nout <= 64): one column tile."""
    cfg = dict(gemm_configs.config(role, dtype, k, max(nout, 256), num_experts, rows, device))
    cfg["BLOCK_N"] = gemm_configs.rank_block(nout)
    cfg["PERSISTENT"] = False
    return cfg


def grouped_xty(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, offsets: torch.Tensor, scale: float = 1.0,
                dropout: Optional[tuple] = None, gather_y: Optional[torch.Tensor] = None,
                cfg: Optional[dict] = None) -> None:
    """out[e] = scale * x[rows of e]^T @ dropout(y[rows of e]); x [N, P], y [N, Q], out [E, P, Q].

    dropout: (seed [1] int64, p) when y is a LoRA input under dropout; gather_y [N]: y is [T, Q]
    and sorted row r reads y[gather_y[r]]."""
    from ..kernels.grouped_xty import grouped_xty_kernel

    e, p, q = out.shape
    n = x.shape[0]

    def kernel_args(x_desc, y_desc) -> tuple:
        return (
            x, x.stride(0), x.stride(1), x_desc,
            y, y.stride(0), y.stride(1), y_desc,
            out, out.stride(0), out.stride(1), out.stride(2),
            offsets, p, q, float(scale), gather_y if gather_y is not None else offsets,
            *_dropout_args(dropout, offsets),
        )

    meta = dict(DROPOUT_Y=dropout is not None, GATHER_Y=gather_y is not None, DOT_PRECISION=dot_precision(x.dtype))

    tma = _use_tma(x.device)

    def launch(c: dict) -> None:
        bp, bq, bk = c["BLOCK_P"], c["BLOCK_Q"], c["BLOCK_K"]
        use = tma and c.get("TMA", True)
        x_desc = _x_descriptor(x, bk, bp) if use else None
        y_desc = _x_descriptor(y, bk, bq) if use and gather_y is None else None
        grid = (e * cdiv(p, bp) * cdiv(q, bq),)
        grouped_xty_kernel[grid](*kernel_args(x_desc, y_desc), **meta, X_DESC=x_desc is not None,
                                 Y_DESC=y_desc is not None, EVEN_P=p % bp == 0, EVEN_Q=q % bq == 0,
                                 SWAP=bp < 64 <= bq, **gemm_configs.kernel_meta(c))

    if cfg is None:
        role = "lora_wgrad" if min(p, q) <= 64 else "wgrad"
        cfg = gemm_configs.config(role, x.dtype, p, q, e, n, x.device, run=launch)
        if _backend.interpreting():
            # Tiny test shapes: blocks no larger than the operands keep the interpreter quick.
            cfg["BLOCK_P"] = min(cfg["BLOCK_P"], gemm_configs.rank_block(p))
            cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], gemm_configs.rank_block(q))
    launch(cfg)


def expert_colsum(src: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor, *, tile_m: int = 0,
                  gather: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None) -> None:
    """out[e] = sum of row_scale[r] * src[gather[r]] over expert e's rows r (offsets [E+1]); out [E, C].

    tile_m > 0: src holds one row per tile_m-row tile of the grouped rows (grouped_mm's dbias
    partials) and expert e sums its tiles' rows. Deterministic: no atomics."""
    from ..kernels.expert_colsum import expert_colsum_kernel

    e, c = out.shape
    # 64 columns x 32 rows: a [32, 64] fp32 tile per step (16 values a thread at 4 warps), and
    # E * C / 64 programs (at gpt-oss-20b, 32 x 2880 / 64 = 1440) fill the GPU without a split over
    # rows; 3 stages keep two row blocks' loads in flight while one is summed.
    block_c, block_r = 64, 32
    expert_colsum_kernel[(e, cdiv(c, block_c))](
        src, src.stride(0), src.stride(1), out, out.stride(0), out.stride(1), offsets, e, c,
        gather if gather is not None else offsets, row_scale if row_scale is not None else offsets,
        TILE_M=tile_m, GATHER=gather is not None, ROW_SCALE=row_scale is not None, BLOCK_R=block_r,
        BLOCK_C=block_c, E_PAD=max(2, next_pow2(e)), num_warps=4, num_stages=3)


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """[rows, cols] fp32 LoRA dropout mask (0 or 1 / (1 - p)) that the kernels use for `seed` [1] int64.

    Row r of a LoRA input of the forward (x_sorted for seeds[0], h for seeds[1]) is multiplied by
    row r of this mask; for tests and debugging, the kernels never store it.
    """
    from ..kernels.gemm_common import dropout_mask_kernel

    out = torch.empty((rows, cols), device=seed.device, dtype=torch.float32)
    block_m, block_c = 64, 64  # any size works; the mask depends only on (seed, row, col)
    dropout_mask_kernel[(cdiv(rows, block_m), cdiv(cols, block_c))](
        seed, out, rows, cols, float(p), 1.0 / (1.0 - p), BLOCK_M=block_m, BLOCK_C=block_c)
    return out


__all__ = ["grouped_mm", "grouped_xty", "expert_colsum", "narrow_config", "dropout_mask", "dot_precision", "LoRASide",
           "act_code"]
