"""Plain PyTorch version of every kernel op of the MoE data flow: the CPU path and the test oracle.

The ops in ops/ call into this module when they run on the torch backend, and the tests compare the
kernels against it; outside ops/ only the baselines use it (the modules and integrations go through
ops/). Helpers that have no kernel (aux losses, capacity, LoRA rank gates) live in the op file of
their stage.

Data flow of one layer (x: [T, H] after flattening, E experts, k slots per token, N = T*k):

    logits = x @ router.weight.T                      [T, E] fp32
    topk_gating(logits)        -> weights [T, k], ids [T, k] int32, scores [T, E]
    (aux losses: ops.gating.load_balancing_loss / z_loss from scores, ids, logits)
    build_routing(ids)         -> RoutingPlan (counts, offsets, sorted order, inverse, tile map)
    permute(x, plan)           -> x_sorted [N, H]      (row r holds token sorted_slots[r] // k)
    grouped_mlp(x_sorted, ...) -> y_sorted [N, H]      (one matmul per expert, LoRA, activation)
    unpermute(y_sorted, ...)   -> out [T, H]           (out[t] = sum_j w[t, j] y_sorted[row(t, j)])

Everything here is differentiable through torch autograd. It is written for speed on CPU: the
expert ids are sorted once, the expert MLP walks the experts' contiguous blocks of rows inside one
custom op (torch_grouped_mlp.py: each block's GEMMs and activation while it is in cache), and the
combine is a k-way gather and batched dot, so there is no Python loop over tokens. Nothing in traced
Python branches on data, so torch.compile(fullgraph=True) and torch.export trace every op here.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import torch_grouped_mlp
from .activations import activation_backward, apply_activation  # noqa: F401  (the torch path's, named here too)
from .types import (  # noqa: F401  (ACTIVATIONS, GLU_ACTIVATIONS, SCORINGS, is_glu: names of this module too)
    ACTIVATIONS,
    GLU_ACTIVATIONS,
    SCORINGS,
    ExpertBias,
    GatingOutput,
    LoRAWeights,
    RoutingPlan,
    compute_dtype,
    is_glu,
    max_tiles,
)

# ----------------------------------------------------------------------------------------------
# Routing plan
# ----------------------------------------------------------------------------------------------


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many of the ids (any shape, values in [0, E)) name each expert.

    A scatter-add into E zeros rather than torch.bincount: bincount's output length depends on the
    data, which syncs the host on GPU and makes torch.compile break the graph (or trace an unbacked
    size); here the length is E, known from the arguments.
    """
    flat = ids.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def build_routing(ids: torch.Tensor, num_experts: int, block_m: int = 64) -> RoutingPlan:
    """Routing plan of RoutingPlan's docstring from expert ids [T, k] (any integer dtype).

    Ids outside [0, num_experts) are an error for the caller; they are not checked here because a
    check would sync the host on GPU tensors.
    """
    device = ids.device
    flat = ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    counts = expert_counts(flat, num_experts)
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


# ----------------------------------------------------------------------------------------------
# Gating
# ----------------------------------------------------------------------------------------------

def router_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[T, E] logits -> [T, E] scores: softmax over experts, or an independent sigmoid per expert."""
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")


def _group_limited_mask(sel: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep only experts of the topk_groups best groups (DeepSeek-V3 group-limited routing).

    A group's score is the sum of its two best selection scores (its best one when a group holds a
    single expert), as in DeepSeek-V3. Returns sel with experts of other groups set to -inf.
    """
    t, e = sel.shape
    per_group = e // n_groups
    grouped = sel.view(t, n_groups, per_group)
    best = min(2, per_group)
    group_score = grouped.topk(best, dim=-1).values.sum(-1)  # [T, n_groups]
    # Stable sort so that tied groups resolve to the lowest group index, like expert ties.
    keep_groups = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    group_mask = torch.zeros(t, n_groups, dtype=torch.bool, device=sel.device)
    group_mask.scatter_(1, keep_groups, True)
    expert_mask = group_mask.repeat_interleave(per_group, dim=1)
    return sel.masked_fill(~expert_mask, float("-inf"))


def topk_gating(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    normalize: bool = True,
    scaling_factor: float = 1.0,
    expert_bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: Optional[int] = None,
) -> GatingOutput:
    """Scores, top-k selection and combine weights from router logits [T, E].

    expert_bias [E] is added to the scores for the selection only (DeepSeek-V3's aux-loss-free
    balancing): the weights are gathered from the unbiased scores. With n_groups > 1 only experts
    of the topk_groups best groups can be chosen. Ties go to the lowest expert index (stable sort).
    weights = scaling_factor * (chosen scores, divided by their sum when normalize).
    """
    logits = logits.to(compute_dtype(logits.dtype))
    scores = router_scores(logits, scoring)
    sel = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    if n_groups > 1:
        sel = _group_limited_mask(sel, n_groups, topk_groups if topk_groups is not None else n_groups)
    ids = torch.sort(sel.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if normalize:
        # The floor keeps an all-zero row of sigmoid scores finite; softmax rows are never zero.
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return GatingOutput(weights=weights, ids=ids.to(torch.int32), scores=scores, logits=logits)


# ----------------------------------------------------------------------------------------------
# Permutation and combine
# ----------------------------------------------------------------------------------------------


def permute(x: torch.Tensor, plan: RoutingPlan, top_k: int) -> torch.Tensor:
    """x [T, H] -> x_sorted [T*k, H], row r holding token sorted_slots[r] // k."""
    tokens = plan.sorted_slots.to(torch.int64) // top_k
    return x.index_select(0, tokens)


def unpermute(y_sorted: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y_sorted[slot_rows[t*k + j]], in y_sorted's dtype.

    The k rows of a token are gathered and reduced together, accumulating in at least fp32, so the
    result is deterministic and needs no atomics.
    """
    t, k = weights.shape
    h = y_sorted.shape[-1]
    acc = compute_dtype(y_sorted.dtype)
    gathered = y_sorted.index_select(0, plan.slot_rows.to(torch.int64)).view(t, k, h)
    # A broadcast multiply-and-sum, not bmm: CPU bmm loops over T tiny [1, k] x [k, H] products.
    out = (gathered.to(acc) * weights.to(acc).unsqueeze(-1)).sum(1)
    return out.to(y_sorted.dtype)


# ----------------------------------------------------------------------------------------------
# Expert MLP
# ----------------------------------------------------------------------------------------------

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
    rank_gates: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    bias: Optional[ExpertBias] = None,
) -> torch.Tensor:
    """Expert MLP over rows already grouped by expert: x_sorted [N, H] -> y_sorted [N, H].

    Expert e takes the next tokens_per_expert[e] rows (the counts must sum to N): h = act(x W_gu[e]^T
    + s (x A_gu[e]^T) B_gu[e]^T + b_gu[e]), y = h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T + b_d[e] with
    s = lora_scale and bias = ExpertBias(b_gu [E, 2F|F], b_d [E, H]) (either may be None, meaning 0);
    b_gu is in z's own column layout (the activation's: [gate; up] halves, or interleaved).
    rank_gates (g_gu [N, r], g_d [N, r], rows in x_sorted's order, e.g. from lora_rank_gates) gate
    the rank-1 pieces of each LoRA term: s ((x A_gu^T) * g_gu) B_gu^T and s ((h A_d^T) * g_d) B_d^T.
    LoRA dropout acts on the LoRA input only, as in PEFT: x' = dropout(x) here, and h's mask drawn
    here too, so the op itself is deterministic.

    The per-expert loop and its backward are the custom ops of torch_grouped_mlp.py: no Python
    branch on the counts is visible to a tracer, so torch.compile(fullgraph=True) and torch.export
    trace it as one node with no data-dependent size.
    """
    x_lora = mask_h = None
    if lora is not None and lora_dropout > 0 and training:
        x_lora = F.dropout(x_sorted, lora_dropout, True)
        keep = 1.0 - lora_dropout
        mask_h = torch.empty((x_sorted.shape[0], down_proj.shape[2]), dtype=x_sorted.dtype,
                             device=x_sorted.device).bernoulli_(keep).div_(keep)
    operands = (x_sorted, gate_up_proj, down_proj, *(lora or ()), *(rank_gates or ()), *(bias or ()))
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in operands)
    return torch_grouped_mlp.grouped_mlp(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora,
                                         lora_scale, x_lora, mask_h, rank_gates, save_preact=grads, bias=bias)


def moe_forward(
    x: torch.Tensor,
    weights: torch.Tensor,
    plan: RoutingPlan,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "swiglu",
    **mlp_kwargs,
) -> torch.Tensor:
    """permute -> grouped_mlp -> unpermute for x [T, H] and combine weights [T, k]."""
    x_sorted = permute(x, plan, weights.shape[1])
    y_sorted = grouped_mlp(x_sorted, plan.tokens_per_expert, gate_up_proj, down_proj, activation, **mlp_kwargs)
    return unpermute(y_sorted, plan, weights)


# Helpers that are not the torch path of a kernel op live with the op of their stage; their old
# names here still resolve (with a DeprecationWarning) so code written against them keeps working.
_MOVED = {
    "load_balancing_loss": "unimoe_kernels.ops.gating",
    "z_loss": "unimoe_kernels.ops.gating",
    "expert_capacity": "unimoe_kernels.ops.routing",
    "apply_capacity": "unimoe_kernels.ops.routing",
    "lora_rank_gates": "unimoe_kernels.ops.lora_gates",
}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"unimoe_kernels.reference.{name} moved to {_MOVED[name]}.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
