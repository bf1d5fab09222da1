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
expert ids are sorted once, the expert MLP walks the experts' contiguous blocks of rows inside one
custom op (torch_grouped_mlp.py: each block's GEMMs and activation while it is in cache), and the
combine is a k-way gather and batched dot, so there is no Python loop over tokens. Nothing in traced
Python branches on data, so torch.compile(fullgraph=True) and torch.export trace every op here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import torch_grouped_mlp
from .types import GatingOutput, RoutingPlan, max_tiles

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

SCORINGS = ("softmax", "sigmoid")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math runs in fp32, or fp64 when the input is fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


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


def load_balancing_loss(
    scores: torch.Tensor, ids: torch.Tensor, num_experts: int, scoring: str = "softmax"
) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e = share of the T*k slots routed to e, P_e = mean probability of e.

    Sigmoid scores are normalised per token into probabilities first. The value is 1.0 for a
    perfectly balanced router (Megatron's normalisation; Hugging Face's Mixtral loss is k times it).
    An empty batch gives 0. Only P carries a gradient (f is a count), as in Switch Transformer.
    """
    t = scores.shape[0]
    probs = scores
    if scoring == "sigmoid":
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    p_mean = probs.sum(0) / max(t, 1)
    counts = expert_counts(ids, num_experts)
    f = counts.to(probs.dtype) / max(ids.numel(), 1)
    return num_experts * (f * p_mean).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits[t])^2 (ST-MoE router z-loss); 0 for an empty batch."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse * lse).sum() / max(logits.shape[0], 1)


# ----------------------------------------------------------------------------------------------
# Capacity (optional token dropping)
# ----------------------------------------------------------------------------------------------


def expert_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert may take: ceil(capacity_factor * N / E), at least 1; from shapes only."""
    return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def apply_capacity(
    weights: torch.Tensor, ids: torch.Tensor, plan: RoutingPlan, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of slots past an expert's capacity; earlier tokens keep their place.

    A slot's position in its expert is its sorted row minus the expert's offset, so with the plan's
    stable order the first `capacity` slots in token order are kept. Returns (weights, number of
    dropped slots as an int64 scalar tensor). Dropped rows are still computed by the experts; their
    output is multiplied by zero, so the output equals a dropping implementation's.
    """
    rows = plan.slot_rows.view_as(ids).to(torch.int64)
    position = rows - plan.expert_offsets.to(torch.int64)[ids.to(torch.int64)]
    keep = position < capacity
    return weights * keep.to(weights.dtype), (~keep).sum()


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

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
GLU_ACTIVATIONS = ("swiglu", "geglu")


def is_glu(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation in GLU_ACTIVATIONS


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """[rows, 2F] -> [rows, F] for GLU activations (gate first, then up); elementwise otherwise.

    gelu is the exact (erf) form in both gelu and geglu.
    """
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(z: torch.Tensor, dh: torch.Tensor, activation: str) -> torch.Tensor:
    """d(apply_activation)/dz applied to dh: z [rows, 2F|F], dh [rows, F] -> dz [rows, 2F|F].

    Through the derivative kernels autograd itself uses (silu_backward, gelu_backward,
    threshold_backward), so the numbers are autograd's.
    """
    aten = torch.ops.aten
    if activation in GLU_ACTIVATIONS:
        gate, up = z.chunk(2, dim=-1)
        act = F.silu(gate) if activation == "swiglu" else F.gelu(gate)
        d_act = dh * up
        d_gate = aten.silu_backward(d_act, gate) if activation == "swiglu" else aten.gelu_backward(d_act, gate)
        return torch.cat([d_gate, dh * act], dim=-1)
    if activation == "gelu":
        return aten.gelu_backward(dh, z)
    if activation == "relu":
        return aten.threshold_backward(dh, z, 0)
    if activation == "silu":
        return aten.silu_backward(dh, z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class LoRAWeights(NamedTuple):
    """Per-expert LoRA factors in the layout of SparseMoE's parameters."""

    a_gate_up: torch.Tensor  # [E, r, H]
    b_gate_up: torch.Tensor  # [E, 2F or F, r]
    a_down: torch.Tensor  # [E, r, F]
    b_down: torch.Tensor  # [E, H, r]


def lora_rank_gates(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mixture-of-rank-1-experts gate (Intuition-MoR1E) of N rows: g [N, r] in fp32 (fp64 for fp64 x).

    Row n is token t = token_index[n] routed to expert e = expert_index[n]:
    g[n] = r * softmax(x[t] @ gate_weight[e]^T + bias[t]) over the r rank-1 pieces of e's LoRA.
    The factor r makes a uniform gate exactly 1 per piece, so a zero gate_weight (the init) gives
    plain LoRA and lora_alpha keeps its meaning. x [T, H]; gate_weight [E, r, H]; token_index,
    expert_index [N] integers; bias [T, r] (already broadcast per token) or None.

    The logits of every (token, expert) pair come from one dense GEMM [T, H] x [H, E*r] and the N
    routed ones are gathered: no per-expert loop, so no host sync and nothing torch.compile breaks
    on; it costs 2*T*H*E*r FLOPs, small next to the expert MLP while E*r << k*F. Autograd carries
    the gradient to x, gate_weight and bias.
    """
    e, r, h = gate_weight.shape
    acc = compute_dtype(x.dtype)
    logits = (x.to(acc) @ gate_weight.reshape(e * r, h).to(acc).t()).view(-1, e, r)
    if bias is not None:
        # Added per token before the gather: bias's gradient is then a plain sum over experts, not
        # an index_add over the k rows of each token (float atomics on GPU, run-to-run noise).
        logits = logits + bias.to(acc).unsqueeze(1)
    # With top-k routing a (token, expert) pair is routed at most once, so the gather's backward
    # writes each element of d(logits) once: deterministic although it is an indexed accumulate.
    rows = logits[token_index.to(torch.int64), expert_index.to(torch.int64)]
    return torch.softmax(rows, dim=-1) * r


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
) -> torch.Tensor:
    """Expert MLP over rows already grouped by expert: x_sorted [N, H] -> y_sorted [N, H].

    Expert e takes the next tokens_per_expert[e] rows (the counts must sum to N): h = act(x W_gu[e]^T
    + s (x A_gu[e]^T) B_gu[e]^T), y = h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T with s = lora_scale.
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
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x_sorted, gate_up_proj, down_proj, *(lora or ()), *(rank_gates or ())))
    return torch_grouped_mlp.grouped_mlp(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora,
                                         lora_scale, x_lora, mask_h, rank_gates, save_preact=grads)


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
