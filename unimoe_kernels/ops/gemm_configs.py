"""Kernel configs of the grouped GEMMs: shipped per-GPU tables, a heuristic fallback, tuning on request.

A config is a dict of the kernel's block sizes plus `num_warps`, `num_stages` and, for the
activation GEMMs, `PERSISTENT` (launch one program per SM that walks tiles, instead of one program
per tile). `config(role, dtype, k, nout, num_experts, rows)` picks one, in this order:

  1. the Triton interpreter: one fixed config (its cost grows with programs x loop trips);
  2. the on-disk tuning cache, when UNIMOE_AUTOTUNE=1 (filled by `tune`, see below);
  3. the table shipped for this GPU, unimoe_kernels/ops/configs/<device name>.json, at the nearest
     bucket within MAX_OCTAVES;
  4. `heuristic`, for other GPUs and shapes.

No call ever autotunes unless asked: with UNIMOE_AUTOTUNE=1, the first call at a key the cache
lacks times every candidate of `candidates(role)` on that call's own arguments (the kernels are
pure functions of their inputs, so rerunning them is harmless), keeps the fastest and writes it to
$UNIMOE_CACHE_DIR (default ~/.cache/unimoe_kernels)/tuned-<device name>.json, a file in the table
format: it can be copied into ops/configs/ as the shipped table of that GPU.

Roles (kernel and what it computes; K the reduction length, NOUT the output columns):
    up       grouped_mm, epilogue 1, no GLU: h = act(x W_gu^T)          K=H, NOUT=F
    up_glu   grouped_mm, epilogue 1, GLU: two accumulators (gate, up)   K=H, NOUT=F
    down     grouped_mm, epilogue 0: y = h W_d^T                        K=F, NOUT=H
    dact     grouped_mm, epilogue 2: dh -> dz, h                        K=H, NOUT=F
    dgrad    grouped_mm, epilogue 0: dx = dz W_gu                       K=2F|F, NOUT=H
    wgrad    grouped_xty: dW = X^T Y per expert                         K=P, NOUT=Q (rows reduce)
    lora_wgrad  grouped_xty with one side the LoRA rank                 K=P, NOUT=Q

Table format (JSON): {"device": ..., "source": ..., "configs": {key: {bucket: config}}} with key
"<dtype>|<role>|K=<k>|N=<nout>|E=<experts>" (plus "|lora" when the call carries a LoRA side
product) and bucket the rows per expert rounded up to a power of
two, as a string; a lookup takes the nearest bucket (in log scale) of its key.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import torch

from .. import backend as _backend
from .launch_utils import cdiv, next_pow2

ROLES_MM = ("up", "up_glu", "down", "dact", "dgrad")
ROLES_XTY = ("wgrad", "lora_wgrad")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TABLE_DIR = Path(__file__).with_name("configs")

# Interpreter: big N and K blocks, because its cost grows with programs x loop trips, not block
# size; 64-row tiles so that the tiny test shapes still span several tiles per expert.
_INTERPRET_MM = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=1, PERSISTENT=False)
_INTERPRET_XTY = dict(BLOCK_P=64, BLOCK_Q=128, BLOCK_K=64, GROUP_P=8, num_warps=4, num_stages=1)

# Usable shared memory per block on sm_90 (227 KiB); configs above it fail to launch.
SMEM_LIMIT_SM90 = 227 * 1024


def rank_block(r: int) -> int:
    """Block size of a LoRA-rank dimension: tl.dot needs every dimension >= 16."""
    return max(16, next_pow2(r))


def rows_bucket(rows: int, num_experts: int) -> int:
    """Rows per expert rounded up to a power of two (1 for an empty batch): the table's bucket."""
    return next_pow2(max(1, cdiv(rows, max(1, num_experts))))


def table_key(dtype: torch.dtype, role: str, k: int, nout: int, num_experts: int, rank: int = 0) -> str:
    key = f"{_DTYPE_NAMES.get(dtype, str(dtype))}|{role}|K={k}|N={nout}|E={num_experts}"
    return key + "|lora" if rank else key


def device_file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3.json' (vLLM's naming of its tables)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


# ----------------------------------------------------------------------------------------------
# Heuristic
# ----------------------------------------------------------------------------------------------


def heuristic(role: str, dtype: torch.dtype, k: int, nout: int, num_experts: int, rows: int, rank: int = 0) -> dict:
    """A config from the shape alone, for sm_90-class GPUs (H100/H200; also valid on sm_80).

    Tiles are 128 rows when experts average at least 96 rows (one tile then wastes under 1/4 of
    its rows), else 64: the M of one warpgroup's wgmma. 128-row tiles take 8 warps (two
    warpgroups). Column widths are the widest that compile without register spills for sm_90
    (python -m unimoe_kernels.ops.sm90_check): 256 for the plain GEMMs and the weight gradients
    (a 128x256 fp32 accumulator is 128 registers a thread; a LoRA term accumulates into it), 128
    accumulator columns (64 gate + 64 up) for the GLU forward, whose epilogue holds the split
    halves and h, and 128 for the activation backward, whose epilogue loads two z tiles a quarter
    at a time. Every one of them issues n128 or wider warp-group MMAs. 16-bit operands
    take BLOCK_K 64 (128-byte rows, the widest swizzle), fp32 ones BLOCK_K 32 and narrower tiles,
    within shared memory at their stage count.
    """
    wide = dtype != torch.float32
    per_expert = cdiv(rows, max(1, num_experts))
    if role in ROLES_XTY:
        if role == "lora_wgrad":
            # One side is the rank: one small tile there; a bandwidth-bound pass over the rows.
            return dict(BLOCK_P=128 if k > 64 else rank_block(k), BLOCK_Q=128 if nout > 64 else rank_block(nout),
                        BLOCK_K=64, GROUP_P=8, num_warps=4, num_stages=3)
        return dict(BLOCK_P=128, BLOCK_Q=256 if wide else 64, BLOCK_K=64 if wide else 32, GROUP_P=8,
                    num_warps=8, num_stages=3)
    if per_expert < 32 and wide:
        # Decode-sized batches (a few rows per expert): the cost is reading each touched expert's
        # weights once, so 16-row tiles (the smallest MMA) keep the wasted rows off the tensor
        # cores and out of registers, and narrow, deep tiles keep many weight loads in flight. The
        # GLU forward's 128 accumulator columns are 64 output columns, as wide as the others.
        # The activation backward's epilogue takes one stage's registers (the softcapped gate spills
        # at 4 stages).
        return dict(BLOCK_M=16, BLOCK_N=128 if role == "up_glu" else 64, BLOCK_K=128, GROUP_M=1, num_warps=4,
                    num_stages=3 if role == "dact" else 4, PERSISTENT=False)
    block_m = 128 if per_expert >= 96 else 64
    warps = 8 if block_m == 128 else 4
    if not wide:
        block_n = 64
    elif role in ("up_glu", "dact", "up"):
        # The activation epilogues (the ungated up's too) hold the activation's temporaries.
        block_n = 128
    elif block_m == 128 and nout >= 256:
        block_n = 256
    else:
        block_n = 128
    stages = 4 if role == "up_glu" and wide else 3
    # Compute-bound 16-bit tiles run persistent: one program per SM, whose flattened loop loads the
    # next tile while the current one's epilogue runs (kernels/grouped_mm.py, FLATTEN). Not the
    # activation backward with LoRA: the next tile's state beside its epilogue and the side
    # product spills there (8 bytes with the softcapped gate at mixtral; 249 registers unflattened).
    persistent = wide and block_m == 128 and not (role == "dact" and rank)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64 if wide else 32, GROUP_M=8, num_warps=warps,
                num_stages=stages, PERSISTENT=persistent)


def candidates(role: str, dtype: torch.dtype) -> list[dict]:
    """What tuning tries for a role after the heuristic, most promising first (`tune` times the first
    few): persistence, a wider or narrower output tile, a stage more or less. Every 16-bit entry
    compiles for sm_90 without spills (python -m unimoe_kernels.ops.sm90_check)."""
    wide = dtype != torch.float32
    bk = 64 if wide else 32
    if role in ROLES_XTY:
        if role == "lora_wgrad":
            return [dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_K=kk, GROUP_P=8, num_warps=w, num_stages=s)
                    for p, q, kk, w, s in ((128, 128, 64, 4, 3), (64, 64, 64, 4, 3), (128, 128, 128, 8, 3))]
        # 128 x 256 on 8 warps: 128 accumulator registers a thread, the widest the K loop holds.
        return [dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_K=bk, GROUP_P=8, num_warps=w, num_stages=s)
                for p, q, w, s in ((128, 256 if wide else 64, 8, 3), (128, 128, 8, 4), (128, 128, 8, 3),
                                   (64, 128, 4, 4))]
    if not wide:
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=3, PERSISTENT=p)
                for bm, bn, w, p in ((128, 64, 8, False), (64, 128, 4, False), (128, 64, 8, True),
                                     (64, 64, 4, False))]
    # (BLOCK_M, BLOCK_N, warps, stages, persistent); GLU forward: BLOCK_N accumulator columns = BLOCK_N/2
    # gate + BLOCK_N/2 up; 128 x 256 spills there and in the activation backward.
    if role in ("up_glu", "dact"):
        grid = ((128, 128, 8, 4, False), (64, 128, 4, 4, False), (128, 128, 8, 3, True), (128, 64, 8, 4, True))
    else:
        grid = ((128, 256, 8, 3, False), (64, 128, 4, 4, False), (128, 128, 8, 4, True), (128, 256, 8, 4, True))
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s, PERSISTENT=p)
            for bm, bn, w, s, p in grid]


def smem_estimate(role: str, dtype: torch.dtype, cfg: dict, rank: int = 0) -> int:
    """Bytes of shared memory the pipelined operand buffers take (the compiler adds a little for
    the epilogue); used to prune candidates before compiling them."""
    size = torch.empty((), dtype=dtype).element_size()
    if role in ROLES_XTY:
        per_stage = (cfg["BLOCK_P"] + cfg["BLOCK_Q"]) * cfg["BLOCK_K"]
    else:
        per_stage = cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
        if rank:
            per_stage += cfg["BLOCK_K"] * rank_block(rank)
    return per_stage * size * cfg["num_stages"]


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def cache_path(device_name: str) -> Path:
    root = Path(os.environ.get("UNIMOE_CACHE_DIR", Path.home() / ".cache" / "unimoe_kernels"))
    return root / f"tuned-{device_file_name(device_name)}"


@functools.lru_cache(maxsize=None)
def _load_table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    with p.open() as f:
        return json.load(f).get("configs", {})


# A table entry stands for buckets within this many octaves of its own (4x fewer or more rows per
# expert); further away the tile shape that won may be the wrong kind (decode vs prefill), so the
# heuristic decides instead.
MAX_OCTAVES = 2


def lookup(table: dict, key: str, bucket: int) -> Optional[dict]:
    """The entry of `key` at the bucket nearest to `bucket` (log scale), or None when there is none
    within MAX_OCTAVES."""
    entries = table.get(key)
    if not entries:
        return None
    best = min(entries, key=lambda b: abs(math.log2(int(b)) - math.log2(bucket)))
    if abs(math.log2(int(best)) - math.log2(bucket)) > MAX_OCTAVES:
        return None
    return dict(entries[best])


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device) -> str:
    """torch's name of a CUDA device, e.g. 'NVIDIA H100 80GB HBM3' (the table's file name)."""
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def config(role: str, dtype: torch.dtype, k: int, nout: int, num_experts: int, rows: int,
           device: torch.device, run=None, rank: int = 0) -> dict:
    """The config of one kernel call (see the module docstring for the order of sources). `run`
    launches the kernel with a config: with UNIMOE_AUTOTUNE=1 and no cached entry for this key and
    bucket, `tune` times the candidates through it."""
    if _backend.interpreting():
        return dict(_INTERPRET_XTY if role in ROLES_XTY else _INTERPRET_MM)
    name = _device_name(device)
    key = table_key(dtype, role, k, nout, num_experts, rank)
    bucket = rows_bucket(rows, num_experts)
    if autotune_enabled():
        tuned = _load_table(str(cache_path(name))).get(key, {})
        if str(bucket) in tuned:
            return dict(tuned[str(bucket)])
        if run is not None:
            return tune(role, dtype, k, nout, num_experts, rows, device, run, rank)
    hit = lookup(_load_table(str(_TABLE_DIR / device_file_name(name))), key, bucket)
    return hit if hit is not None else heuristic(role, dtype, k, nout, num_experts, rows, rank)


def autotune_enabled() -> bool:
    return os.environ.get("UNIMOE_AUTOTUNE", "0") == "1"


def tune(role: str, dtype: torch.dtype, k: int, nout: int, num_experts: int, rows: int, device: torch.device,
         run, rank: int = 0) -> dict:
    """Time `run(cfg)` for the heuristic and the next candidates that fit in shared memory (at most
    4 configs in all), keep the fastest, record it in the on-disk cache and return it. `run`
    launches the kernel with a config. Only a config that fails to compile or to fit the GPU's
    resources is skipped: any other error, a CUDA fault above all, propagates, because an illegal
    address is sticky (every later candidate would fail too and the heuristic would win silently)."""
    import triton.testing
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    # Tuning runs inside a user's first call at a key: a handful of compiles (seconds each for
    # sm_90), not the whole grid of candidates.
    max_tried = 4
    # An MLIR pass that rejects a config surfaces as a bare RuntimeError with this text; CUDA
    # faults are RuntimeErrors too, so the text is what tells them apart.
    mlir_failure = "PassManager::run failed"
    name = _device_name(device)
    base = heuristic(role, dtype, k, nout, num_experts, rows, rank)
    fitting = [c for c in [base] + [c for c in candidates(role, dtype) if c != base]
               if smem_estimate(role, dtype, c, rank) <= SMEM_LIMIT_SM90]
    best, best_ms, base_ms = None, float("inf"), float("nan")
    for cfg in fitting[:max_tried]:
        try:
            ms = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except (CompilationError, OutOfResources, PTXASError):
            continue
        except RuntimeError as err:
            if mlir_failure not in str(err):
                raise
            continue
        if cfg is base:
            base_ms = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        best = base
    record(cache_path(name), name, table_key(dtype, role, k, nout, num_experts, rank), rows_bucket(rows, num_experts),
           best, best_ms, heuristic_ms=base_ms)
    return best


def record(path: Path, device_name: str, key: str, bucket: int, cfg: dict, ms: float, **extra: float) -> None:
    """Add one tuned entry to a table file (created when missing), with its measured time (and
    `extra` numbers, such as the heuristic's time for the same launch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"device": device_name, "source": "tuned on the device", "configs": {}}
    if path.is_file():
        with path.open() as f:
            data = json.load(f)
    entry = dict(cfg)
    entry["ms"] = round(ms, 5)
    entry.update({k: round(v, 5) for k, v in extra.items()})
    data.setdefault("configs", {}).setdefault(key, {})[str(bucket)] = entry
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    tmp.replace(path)
    _load_table.cache_clear()


def kernel_meta(cfg: dict) -> dict:
    """The kernel's launch keywords of a config (entries also carry ms, heuristic_ms, reason, PERSISTENT and TMA:
    use the copy engine for contiguous operands when the GPU has one, default on)."""
    return {k: v for k, v in cfg.items() if k not in ("ms", "heuristic_ms", "reason", "PERSISTENT", "TMA")}


__all__ = [
    "config", "heuristic", "candidates", "tune", "record", "lookup", "table_key", "rows_bucket", "device_file_name",
    "smem_estimate", "rank_block", "next_pow2", "kernel_meta", "autotune_enabled", "ROLES_MM", "ROLES_XTY",
]
