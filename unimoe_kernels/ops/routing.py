"""Routing plan: from the top-k expert ids to the expert-sorted order and the grouped-GEMM tile map.

Data flow (T tokens, k slots per token, N = T*k flat slots t*k + j, E experts):

    ids [T, k] int  --build_routing-->  RoutingPlan (types.py), all int32:
        tokens_per_expert [E]          histogram of the ids
        expert_offsets    [E+1]        exclusive scan: expert e owns sorted rows off[e]..off[e+1]-1
        sorted_slots      [N]          sorted row -> slot, stable (slots keep flat order per expert)
        slot_rows         [N]          slot -> sorted row, the inverse permutation
        tile_expert, tile_row_start [ceil(N/block_m) + E]   one entry per block_m-row GEMM tile,
                                       -1 / N in the unused tail (the length is host-known, no sync)

permute() gathers x rows through sorted_slots // k and unpermute() reads y_sorted through
slot_rows. The package's grouped GEMMs locate their tiles from expert_offsets inside the kernel
(any tile height); the tile map is part of the plan for callers that launch their own kernels.

Capacity (optional token dropping) belongs to this stage too: expert_capacity and apply_capacity
read a slot's position in its expert off the plan.

Backends (`backend`):
    "c"       the compiled extension unimoe_kernels._C: a stable O(N + E) counting sort on CPU
              tensors, five sync-free kernels on the current stream for CUDA tensors. Exposed as
              the custom op torch.ops.unimoe.routing_plan_c so torch.compile traces it.
    "triton"  kernels/routing.py: a blocked stable counting sort in three Triton launches and a
              few small torch ops on the device (for installs built without nvcc). Custom op
              torch.ops.unimoe.routing_plan_triton.
    "torch"   reference.build_routing (scatter-add counts, torch.sort, searchsorted), the oracle.
    "auto"    "c" when _C serves the tensor's device, else "triton" on CUDA, else "torch".
All give identical plans for ids in [0, E). Ids outside that range are an error, found without a
host sync: on CPU tensors build_routing raises ValueError before any backend runs; on CUDA (and
under torch.compile) the plan kernels skip such ids, never reading or writing out of bounds, and
a device-side assert (torch._assert_async: the plan's offsets must reach N) reports them at the
next sync. The plan's fields are int32, so T*k must stay below 2^31 (ValueError otherwise).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

from .. import _ext
from ..backend import require, values_readable
from ..reference import build_routing as _build_routing_torch
from ..types import RoutingPlan, max_tiles
from .launch_utils import cdiv, next_pow2

_BACKENDS = ("auto", "torch", "c", "triton")

# Slots per block of the Triton plan: one in-register sort of 1024 keys per program, and the
# [blocks, E] count tables stay small (256 x E at the qwen3-30b-a3b shape's 262144 slots).
_PLAN_BLOCK = 1024
# Tiles located per program of the Triton tile map (each loads the E offsets once).
_TILES_PER_PROGRAM = 64
# Most slots a plan holds: its fields are int32 and the tile map marks its unused tail with N.
MAX_SLOTS = 2**31 - 1


def _c_serves(device: torch.device) -> bool:
    if device.type == "cpu":
        return _ext.has_c()
    if device.type == "cuda":
        return _ext.has_c_cuda()
    return False


@torch.library.custom_op("unimoe::routing_plan_c", mutates_args=())
def routing_plan_c(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoutingPlan fields (counts, offsets, sorted_slots, slot_rows, tile_expert, tile_row_start)
    computed by unimoe_kernels._C; arguments are validated by build_routing."""
    C = _ext.C
    if C is None:
        raise RuntimeError("unimoe::routing_plan_c needs unimoe_kernels._C, which is not built")
    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):  # _C reads int32 or int64 only
        flat = flat.to(torch.int64)
    flat = flat.contiguous()
    n = flat.numel()
    tiles = max_tiles(n, num_experts, block_m)
    dev = flat.device

    def i32(size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int32, device=dev)

    counts, offsets = i32(num_experts), i32(num_experts + 1)
    sorted_slots, slot_rows = i32(n), i32(n)
    tile_expert, tile_row_start = i32(tiles), i32(tiles)
    args = (
        flat.data_ptr(), flat.dtype == torch.int64, n, num_experts, block_m, tiles,
        counts.data_ptr(), offsets.data_ptr(), sorted_slots.data_ptr(), slot_rows.data_ptr(),
        tile_expert.data_ptr(), tile_row_start.data_ptr(),
    )
    if dev.type == "cpu":
        C.routing_plan_cpu(*args)
    elif dev.type == "cuda":
        if not C.has_cuda():
            raise RuntimeError("unimoe_kernels._C was built without CUDA (no nvcc at build time)")
        # _C launches on the current device of its own (static) CUDA runtime, which follows the
        # thread's current context: make that ids' device.
        with torch.cuda.device(dev):
            # Allocated on the current stream, so the caching allocator only reuses it after
            # the kernels queued below have run on that stream.
            workspace = torch.empty(
                C.routing_workspace_bytes(n, num_experts), dtype=torch.uint8, device=dev
            )
            stream = torch.cuda.current_stream(dev).cuda_stream
            C.routing_plan_cuda(*args, workspace.data_ptr(), workspace.numel(), stream)
    else:
        raise ValueError(f"ids: unimoe::routing_plan_c runs on cpu or cuda tensors, got {dev}")
    return counts, offsets, sorted_slots, slot_rows, tile_expert, tile_row_start


@routing_plan_c.register_fake
def _routing_plan_c_fake(ids, num_experts, block_m):
    n = ids.numel()
    tiles = max_tiles(n, num_experts, block_m)

    def i32(size) -> torch.Tensor:
        return ids.new_empty((size,), dtype=torch.int32)

    return i32(num_experts), i32(num_experts + 1), i32(n), i32(n), i32(tiles), i32(tiles)


@torch.library.custom_op("unimoe::routing_plan_triton", mutates_args=())
def routing_plan_triton(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoutingPlan fields (counts, offsets, sorted_slots, slot_rows, tile_expert, tile_row_start)
    computed by the Triton kernels of kernels/routing.py; arguments are validated by build_routing."""
    from ..kernels import routing as kern

    flat = ids.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int64)
    flat = flat.contiguous()
    n, e = flat.numel(), num_experts
    dev = flat.device
    blocks = max(1, cdiv(n, _PLAN_BLOCK))
    block_counts = torch.empty((blocks, e), dtype=torch.int32, device=dev)
    kern.routing_histogram_kernel[(blocks,)](flat, block_counts, n, e, BLOCK=_PLAN_BLOCK,
                                             BINS=next_pow2(e + 1))
    counts = block_counts.sum(0, dtype=torch.int32)
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=dev)
    torch.cumsum(counts, 0, dtype=torch.int32, out=offsets[1:])
    base = offsets[:-1] + (torch.cumsum(block_counts, 0, dtype=torch.int32) - block_counts)
    first = torch.cumsum(block_counts, 1, dtype=torch.int32) - block_counts
    sorted_slots = torch.empty(n, dtype=torch.int32, device=dev)
    slot_rows = torch.empty(n, dtype=torch.int32, device=dev)
    kern.routing_scatter_kernel[(blocks,)](flat, base, first, sorted_slots, slot_rows, n, e, BLOCK=_PLAN_BLOCK)
    tiles = max_tiles(n, e, block_m)
    tile_expert = torch.empty(tiles, dtype=torch.int32, device=dev)
    tile_row_start = torch.empty(tiles, dtype=torch.int32, device=dev)
    kern.routing_tile_map_kernel[(cdiv(tiles, _TILES_PER_PROGRAM),)](
        offsets, tile_expert, tile_row_start, e, tiles, n, BLOCK_M=block_m, E_PAD=max(2, next_pow2(e)),
        BLOCK_T=_TILES_PER_PROGRAM)
    return counts, offsets, sorted_slots, slot_rows, tile_expert, tile_row_start


routing_plan_triton.register_fake(_routing_plan_c_fake)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def build_routing(
    ids: torch.Tensor, num_experts: int, block_m: int = 64, *, backend: str = "auto", impl: Optional[str] = None
) -> RoutingPlan:
    """Routing plan (types.RoutingPlan) of expert ids [T, k], its tile map in block_m-row tiles.

    ids: [T, k] integer tensor (int32 from the gating op; any integer dtype is accepted), values
    in [0, num_experts), T*k at most MAX_SLOTS = 2^31 - 1. backend: "auto" | "c" | "triton" |
    "torch" (see the module docstring); impl is its former name, still accepted with a
    DeprecationWarning. No host sync. An id outside [0, num_experts) is a ValueError naming it for
    CPU tensors, a device-side assert for CUDA tensors (module docstring).
    """
    if impl is not None:
        warnings.warn("build_routing(impl=...) is deprecated; use backend=...", DeprecationWarning, stacklevel=2)
        if backend != "auto" and backend != impl:
            raise ValueError(f"build_routing got backend={backend!r} and impl={impl!r}; pass backend only")
        backend = impl
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"ids must be 2-D [tokens, top_k], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must have an integer dtype (int32 or int64), got {ids.dtype}")
    _check_int("num_experts", num_experts, 1)
    _check_int("block_m", block_m, 1)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    n = ids.numel()
    if n > MAX_SLOTS:
        raise ValueError(f"ids: T*k = {n} routing slots, but a RoutingPlan is int32 and holds at most 2^31 - 1; "
                         "route the tokens in smaller batches")
    checked = n == 0 or values_readable(ids)
    if n and checked:
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_experts:
            flat = ids.reshape(-1)
            slot = int(((flat < 0) | (flat >= num_experts)).nonzero()[0])
            raise ValueError(f"build_routing: ids must lie in [0, num_experts={num_experts}), found {int(flat[slot])} "
                             f"at flat slot {slot}")
    plan = _build_plan(ids, num_experts, block_m, backend)
    if not checked:
        # The Triton and C plans count an id outside [0, E) nowhere, so the offsets fall short of N
        # (torch's scatter-add asserts on such an index by itself).
        require(plan.expert_offsets[num_experts] == n,
                f"build_routing: ids must lie in [0, num_experts={num_experts})")
    return plan


def _build_plan(ids: torch.Tensor, num_experts: int, block_m: int, backend: str) -> RoutingPlan:
    """The plan from the backend build_routing chose, its arguments already checked."""
    if backend == "auto":
        backend = "c" if _c_serves(ids.device) else "triton" if ids.device.type == "cuda" else "torch"
    if backend == "torch":
        return _build_routing_torch(ids, num_experts, block_m)
    if backend == "triton":
        fields = torch.ops.unimoe.routing_plan_triton(ids, num_experts, block_m)
        return RoutingPlan(*fields, block_m=block_m)

    if ids.device.type not in ("cpu", "cuda"):
        raise ValueError(f"ids: backend='c' needs a cpu or cuda tensor, got device {ids.device}")
    if not _c_serves(ids.device):
        what = "is not built" if not _ext.has_c() else "was built without CUDA"
        raise RuntimeError(f"backend='c' on {ids.device.type} tensors: unimoe_kernels._C {what}")
    counts, offsets, sorted_slots, slot_rows, tile_expert, tile_row_start = (
        torch.ops.unimoe.routing_plan_c(ids, num_experts, block_m)
    )
    return RoutingPlan(
        tokens_per_expert=counts,
        expert_offsets=offsets,
        sorted_slots=sorted_slots,
        slot_rows=slot_rows,
        tile_expert=tile_expert,
        tile_row_start=tile_row_start,
        block_m=block_m,
    )


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert may take: ceil(capacity_factor * N / E), at least 1; from shapes only.

    ValueError for a capacity_factor that is not a finite number > 0 (NaN would compare False
    everywhere and inf has no ceiling).
    """
    if not isinstance(capacity_factor, (int, float)) or not math.isfinite(capacity_factor) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def apply_capacity(
    weights: torch.Tensor, ids: torch.Tensor, plan: RoutingPlan, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights [T, k] of slots past an expert's capacity; earlier tokens keep their place.

    A slot's position in its expert is its sorted row minus the expert's offset, so with the plan's
    stable order the first `capacity` slots in token order are kept. Returns (weights, number of
    dropped slots as an int64 scalar tensor). Dropped rows are still computed by the experts; their
    output is multiplied by zero, so the output equals a dropping implementation's.
    """
    rows = plan.slot_rows.view_as(ids).to(torch.int64)
    position = rows - plan.expert_offsets.to(torch.int64)[ids.to(torch.int64)]
    keep = position < capacity
    return weights * keep.to(weights.dtype), (~keep).sum()


__all__ = ["build_routing", "expert_capacity", "apply_capacity", "routing_plan_c", "routing_plan_triton"]
