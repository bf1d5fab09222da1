"""Triton kernels of the routing plan (launched by unimoe_kernels.ops.routing, backend "triton").

A stable counting sort of the N = T*k flat slots by expert, in blocks of BLOCK slots, sync-free:

    routing_histogram_kernel  ids -> block_counts [B, E]: slots of block b routed to expert e
    (torch, on the device)    counts [E] = sum over blocks, offsets [E+1] = exclusive scan,
                              block_base[b, e] = offsets[e] + slots of e in blocks before b,
                              block_first[b, e] = slots of block b routed to experts before e
    routing_scatter_kernel    each block sorts its keys id * BLOCK + local index (stable within
                              the block), so the slot at sorted position p, of expert e, lands on
                              row block_base[b, e] + p - block_first[b, e]; writes sorted_slots
                              (row -> slot) and slot_rows (slot -> row)
    routing_tile_map_kernel   tile_expert / tile_row_start of each block_m-row tile, located from
                              the offsets exactly as the grouped GEMM locates its own tiles

An id outside [0, E) counts nowhere and is never written (it is binned with the padding), so such
ids cannot make the kernels read or write out of bounds; the plan then covers fewer than N rows,
which ops.routing.build_routing turns into an error (ValueError on CPU, a device-side assert on
CUDA).

Slots keep their flat order within an expert across blocks (blocks are scanned in order) and
within a block (the local index breaks ties), so the plan equals reference.build_routing's.
"""

import triton
import triton.language as tl

from .gemm_common import _expert_tiles, _locate_tile


@triton.jit
def _in_range_or(ids, E):
    """ids as int32, E wherever an id lies outside [0, E): compared before the narrowing, so an int64
    id that only wraps into range in int32 is caught too."""
    return tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)


@triton.jit
def routing_histogram_kernel(
    ids_ptr,  # [N] int32|int64 expert of each flat slot
    counts_ptr,  # [B, E] int32 out
    N, E,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,  # power of two > E: padding slots count in bin E, which is not stored
):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ids = _in_range_or(tl.load(ids_ptr + offs, mask=offs < N, other=E), E)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + b.to(tl.int64) * E + bins, tl.histogram(ids, BINS), mask=bins < E)


@triton.jit
def routing_scatter_kernel(
    ids_ptr,  # [N] int32|int64
    base_ptr,  # [B, E] int32: first sorted row of block b's slots of expert e
    first_ptr,  # [B, E] int32: block b's slots routed to experts before e
    sorted_slots_ptr,  # [N] int32 out: sorted row -> slot
    slot_rows_ptr,  # [N] int32 out: slot -> sorted row
    N, E,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    local = tl.arange(0, BLOCK)
    offs = b.to(tl.int64) * BLOCK + local
    # Padding slots (and ids outside [0, E)) take id E: they sort after every real slot and are not written.
    ids = _in_range_or(tl.load(ids_ptr + offs, mask=offs < N, other=E), E)
    # int32 keys: E * BLOCK stays far below 2^31 for any router (E <= 2^16 at BLOCK 1024).
    key = tl.sort(ids * BLOCK + local)
    e = key // BLOCK
    real = e < E
    slot = b.to(tl.int64) * BLOCK + key % BLOCK
    row_base = b.to(tl.int64) * E + e
    base = tl.load(base_ptr + row_base, mask=real, other=0)
    first = tl.load(first_ptr + row_base, mask=real, other=0)
    row = base + local - first
    tl.store(sorted_slots_ptr + row, slot.to(tl.int32), mask=real)
    tl.store(slot_rows_ptr + slot, row.to(tl.int32), mask=real)


@triton.jit
def routing_tile_map_kernel(
    offsets_ptr,  # [E+1] int32 expert row offsets
    tile_expert_ptr,  # [max_tiles] int32 out: expert of each tile, -1 past the last
    tile_row_start_ptr,  # [max_tiles] int32 out: first row of each tile, N past the last
    num_experts, max_tiles, N,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tiles per program
):
    start, end, ntiles, cum = _expert_tiles(offsets_ptr, num_experts, BLOCK_M, E_PAD)
    total = tl.sum(ntiles, 0)
    for i in range(BLOCK_T):
        t = tl.program_id(0) * BLOCK_T + i
        if t < max_tiles:
            expert, row_start, _ = _locate_tile(t, start, end, ntiles, cum, E_PAD, BLOCK_M)
            used = t < total
            tl.store(tile_expert_ptr + t, tl.where(used, expert, -1))
            tl.store(tile_row_start_ptr + t, tl.where(used, row_start, N).to(tl.int32))
