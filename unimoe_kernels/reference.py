"""Plain PyTorch version of every op of the MoE data flow: the CPU path and the test oracle.

Data flow of one layer (x: [T, H] after flattening, E experts, k slots per token, N = T*k):

    logits = x @ router.weight.T                      [T, E] fp32
    topk_gating(logits)        -> weights [T, k], ids [T, k] int32, scores [T, E]
    load_balancing_loss / z_loss from scores, ids, logits
    build_routing(ids)         -> RoutingPlan (counts, offsets, sorted order, inverse, tile map)
    permute(x, plan)           -> x_sorted [N, H]      (row r holds token sorted_slots[r] // k)
    grouped_mlp(x_sorted, ...) -> y_sorted [N, H]      (one matmul per expert, LoRA, activation)
    unpermute(y_sorted, ...)   -> out [T, H]           (out[t] = sum_j w[t, j] y_sorted[row(t, j)])

Everything here is differentiable through torch autograd. It is written for speed on CPU: the
expert ids are sorted once, each expert does one matmul on a contiguous block of rows, and the
combine is a k-way gather and batched dot, so there is no Python loop over tokens. The per-expert
loop reads the counts on the host (one sync), which is free on CPU; the GPU path avoids it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .types import GatingOutput, RoutingPlan, max_tiles

# ----------------------------------------------------------------------------------------------
# Routing plan
# ----------------------------------------------------------------------------------------------


def build_routing(ids: torch.Tensor, num_experts: int, block_m: int = 64) -> RoutingPlan:
    """Routing plan of RoutingPlan's docstring from expert ids [T, k] (any integer dtype).

    Ids outside [0, num_experts) are an error for the caller; they are not checked here because a
    check would sync the host on GPU tensors.
    """
    device = ids.device
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    sorted_slots = torch.sort(flat, stable=True).indices
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(n, device=device)

    # Tile map: expert e owns tiles tile_offsets[e] .. tile_offsets[e+1]-1, one per block_m rows.
    n_tiles_max = max_tiles(n, num_experts, block_m)
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    torch.cumsum(tiles_per_expert, 0, out=tile_offsets[1:])
    tile_idx = torch.arange(n_tiles_max, device=device)
    # For each tile, the expert whose tile range contains it (experts with no tiles are skipped
    # because searchsorted with right=True lands past every equal offset).
    tile_expert = torch.searchsorted(tile_offsets[1:], tile_idx, right=True)
    used = tile_idx < tile_offsets[-1]
    safe_expert = tile_expert.clamp(max=num_experts - 1)
    tile_row_start = offsets[safe_expert] + (tile_idx - tile_offsets[safe_expert]) * block_m
    tile_expert = torch.where(used, tile_expert, torch.full_like(tile_expert, -1))
    tile_row_start = torch.where(used, tile_row_start, torch.full_like(tile_row_start, n))

    i32 = torch.int32
    return RoutingPlan(
        tokens_per_expert=counts.to(i32),
        expert_offsets=offsets.to(i32),
        sorted_slots=sorted_slots.to(i32),
        slot_rows=slot_rows.to(i32),
        tile_expert=tile_expert.to(i32),
        tile_row_start=tile_row_start.to(i32),
        block_m=block_m,
    )
