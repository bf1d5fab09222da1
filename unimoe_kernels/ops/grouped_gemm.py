"""Grouped expert MLP with fused LoRA and activation: the public ops and the choice of backend.

    grouped_mlp(x_sorted [N, H], tokens_per_expert [E], gate_up_proj, down_proj, ...) -> y_sorted [N, H]
    grouped_mlp_gather(x [T, H], plan, top_k, ...) -> y_sorted [T*top_k, H]   (permute fused in)
    grouped_mlp_combine(x [T, H], plan, weights [T, k], ...) -> out [T, H]    (and the weighted combine)

backend.use_triton(backend, x) runs the custom ops of grouped_mlp_ops.py (kernels in
unimoe_kernels/kernels/, launchers in grouped_gemm_launch.py, configs in gemm_configs.py); anything
else, and fp64 (gradcheck), runs reference.grouped_mlp.

grouped_mlp_gather fuses the permute: the kernels that read x (the first GEMM and its weight
gradients) gather row sorted_slots[r] // k on load, so x_sorted [T*k, H] is never materialised nor
saved; dx rows are summed back per token without atomics.

Rank gate (optional; mixture of rank-1 experts): g_gu, g_d [N, r] fp32 per row, made by
ops.lora_gates.lora_rank_gates in torch (autograd carries their gradient on to the gate weights and a
bias). The LoRA terms become s (xa * g_gu) B_gu^T and s (ha * g_d) B_d^T, applied inside the kernels.

Under torch.autocast the expert GEMM operands (x, weights, LoRA factors) are cast to the autocast
dtype inside the autograd graph (amp.autocast_operands), so fp32 master weights get fp32 gradients.

Expert biases (optional, types.ExpertBias: gate_up [E, 2F|F] in z's column layout, down [E, H]) are
added in the GEMM epilogues; their gradients are per-expert column sums (of dz from the activation
backward's epilogue, of dy from one pass over it). A GLU whose gate and up columns alternate
(gpt-oss) is the ":interleaved" form of its activation string.

The pre-activation z [N, 2F|F] is stored only when a gradient will need it (grad mode on and an
input that requires grad) and recompute=False.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from .. import reference
from ..amp import autocast_operands
from ..backend import require, values_readable
from ..types import ExpertBias, LoRAWeights, RoutingPlan, is_glu
from .grouped_gemm_launch import dropout_mask
from .grouped_mlp_ops import grouped_mlp_bwd, grouped_mlp_fwd
from .permute import unpermute

# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def _check_args(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora, bias=None):
    glu = is_glu(activation)  # raises ValueError naming `activation`
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
    if bias is not None:
        if not isinstance(bias, ExpertBias):
            raise TypeError(f"bias must be a types.ExpertBias(gate_up, down) or None, got {type(bias).__name__}")
        for name, t, shape in (("bias.gate_up", bias.gate_up, (e, f_in)), ("bias.down", bias.down, (e, h))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"{name} must be a tensor {list(shape)} (E, 2F|F, H from the weights), got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
            tensors.append((name, t))
    for name, t in tensors:
        if t.dtype != x_sorted.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x_sorted has {x_sorted.dtype}; they must match")
        if t.device != x_sorted.device:
            raise ValueError(f"{name} is on {t.device} but x_sorted is on {x_sorted.device}")


def _check_counts(tokens_per_expert: torch.Tensor, n: int, plan: Optional[RoutingPlan]) -> None:
    """tokens_per_expert [E] must be >= 0 and sum to N = x_sorted's rows; a plan must plan N slots.

    Wrong counts send rows to the wrong experts (torch path) or make the kernels' tiles reach past
    the rows (Triton path: a corrupted heap). Read on the host where that is free (CPU); elsewhere a
    device-side assert (no host sync). A plan's own counts are right by construction (build_routing
    checked its ids) and are not checked again.
    """
    if plan is not None:
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"plan must be a RoutingPlan or None, got {type(plan).__name__}")
        if plan.sorted_slots.numel() != n:
            raise ValueError(f"plan must describe the N={n} rows of x_sorted, but it plans "
                             f"{plan.sorted_slots.numel()} slots")
        if tokens_per_expert is plan.tokens_per_expert:
            return
    if n == 0 and tokens_per_expert.numel() == 0:
        return
    what = f"tokens_per_expert must be >= 0 and sum to N={n} (the rows of x_sorted)"
    if values_readable(tokens_per_expert):
        counts = tokens_per_expert.to(torch.int64)
        if bool((counts < 0).any()):
            raise ValueError(f"{what}, got {counts.tolist()}")
        total = int(counts.sum())
        if total != n:
            raise ValueError(f"{what}, got counts summing to {total}")
        return
    # Six tiny launches on E numbers; a negative count could hide in a right sum, so both parts.
    require((tokens_per_expert.sum() == n) & (tokens_per_expert.min() >= 0), what)


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
    bias: Optional[ExpertBias] = None,
) -> torch.Tensor:
    """Expert MLP over expert-grouped rows x_sorted [N, H] -> y_sorted [N, H].

    Semantics of reference.grouped_mlp; tokens_per_expert [E] must be >= 0 and sum to N: a
    ValueError on CPU, a device-side assert on CUDA (no host sync) otherwise. `plan` (optional) lends
    its expert offsets to the Triton path so they are not rebuilt; it must describe these rows.
    recompute=True (Triton path) saves no pre-activation for backward and runs GEMM 1 again there
    instead: N*(2F|F) fewer elements of activation memory for one more GEMM 1.
    rank_gates (g_gate_up [N, r], g_down [N, r], e.g. ops.lora_rank_gates) gate the rank-1
    pieces of both LoRA terms; their gradient flows back through autograd. bias (types.ExpertBias)
    adds bias.gate_up[e] to the first projection and bias.down[e] to the second.
    """
    x_sorted, gate_up_proj, down_proj, lora, bias = autocast_operands(x_sorted, gate_up_proj, down_proj, lora, bias)
    _check_args(x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation, lora, bias)
    _check_counts(tokens_per_expert, x_sorted.shape[0], plan)
    _check_rank_gates(rank_gates, lora, x_sorted.shape[0], x_sorted.device)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not _backend.use_triton(backend, x_sorted):
        return reference.grouped_mlp(
            x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation,
            lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, training=training, rank_gates=rank_gates,
            bias=bias,
        )
    return _triton_grouped_mlp(
        x_sorted, x_sorted.shape[0], tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora,
        lora_scale, lora_dropout, training, recompute, rank_gates=rank_gates, bias=bias,
    )


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_grouped_mlp(x, n, tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora, lora_scale,
                        lora_dropout, training, recompute, top_k=None, rank_gates=None, weights=None, bias=None):
    """The Triton path of grouped_mlp (top_k None), grouped_mlp_gather (x [T, H], plan required) and
    grouped_mlp_combine (also weights [T, k])."""
    if plan is not None:
        offsets = plan.expert_offsets
    else:
        counts = tokens_per_expert.to(torch.int64)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
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
        # fp32 gates whatever x's dtype: the kernels multiply the side products by them in fp32.
        g_gu, g_d = (g.to(torch.float32).contiguous() for g in rank_gates)
    bias_gu, bias_d = bias if bias is not None else (None, None)
    grads = _needs_grad(x, gate_up_proj, down_proj, weights, bias_gu, bias_d, *(lora or ()), *(rank_gates or ()))
    y, _, _, _ = grouped_mlp_fwd(
        x, offsets, gate_up_proj, down_proj, a_gu, b_gu, a_d, b_d, activation, float(lora_scale), seeds, p,
        grads and not recompute, gather, slot_rows, top_k or 1, g_gu, g_d, weights, bias_gu, bias_d,
    )
    return y


def _check_gather_args(x, plan, top_k, gate_up_proj, down_proj, activation, lora, rank_gates, lora_dropout, bias):
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    _check_args(x, plan.tokens_per_expert, gate_up_proj, down_proj, activation, lora, bias)
    if x.shape[0] * top_k != plan.sorted_slots.numel():
        raise ValueError(
            f"x must be [T, H] with T*top_k = {plan.sorted_slots.numel()} routed slots, got {tuple(x.shape)}")
    _check_rank_gates(rank_gates, lora, plan.sorted_slots.numel(), x.device)
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")


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
    bias: Optional[ExpertBias] = None,
) -> torch.Tensor:
    """permute + grouped_mlp in one op: tokens x [T, H] and the plan of their T*top_k slots ->
    y_sorted [T*top_k, H] in expert order (ready for unpermute). rank_gates as in grouped_mlp, one
    row per sorted row [T*top_k, r].

    The Triton path gathers the rows of x inside the GEMM kernels (gather on load), so the permuted
    copy x_sorted [T*k, H] is neither written nor saved for backward; dx is summed back per token
    in fp32 without atomics. The torch path is reference.permute followed by reference.grouped_mlp.
    """
    x, gate_up_proj, down_proj, lora, bias = autocast_operands(x, gate_up_proj, down_proj, lora, bias)
    _check_gather_args(x, plan, top_k, gate_up_proj, down_proj, activation, lora, rank_gates, lora_dropout, bias)
    if not _backend.use_triton(backend, x):
        return reference.grouped_mlp(
            reference.permute(x, plan, top_k), plan.tokens_per_expert, gate_up_proj, down_proj, activation,
            lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, training=training, rank_gates=rank_gates,
            bias=bias,
        )
    return _triton_grouped_mlp(
        x, plan.sorted_slots.numel(), plan.tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora,
        lora_scale, lora_dropout, training, recompute, top_k=top_k, rank_gates=rank_gates, bias=bias,
    )


def grouped_mlp_combine(
    x: torch.Tensor,
    plan: RoutingPlan,
    weights: torch.Tensor,
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
    bias: Optional[ExpertBias] = None,
) -> torch.Tensor:
    """The whole routed expert MLP: tokens x [T, H], the plan of their T*k slots and the combine
    weights [T, k] -> out [T, H], out[t] = sum_j weights[t, j] * mlp_{expert(t, j)}(x[t]).

    Equal to unpermute(grouped_mlp_gather(x, plan, k, ...), plan, weights). The Triton path keeps
    neither the expert outputs y_sorted nor a weighted copy of d(out): backward gathers d(out) per
    token inside the activation-backward GEMM, scales its rows by the routing weights there and
    computes d(weights)[t, j] = <d(out)[t], y of slot (t, j)> from the tile it already holds.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or not weights.is_floating_point():
        raise TypeError(f"weights must be a floating tensor [T, k], got {getattr(weights, 'shape', weights)!r}")
    if weights.shape[0] != x.shape[0] or weights.device != x.device:
        raise ValueError(f"weights must be [T={x.shape[0]}, k] on {x.device}, got {tuple(weights.shape)} on "
                         f"{weights.device}")
    top_k = weights.shape[1]
    x, gate_up_proj, down_proj, lora, bias = autocast_operands(x, gate_up_proj, down_proj, lora, bias)
    if not _backend.use_triton(backend, x):
        y_sorted = grouped_mlp_gather(x, plan, top_k, gate_up_proj, down_proj, activation, lora=lora,
                                      lora_scale=lora_scale, lora_dropout=lora_dropout, training=training,
                                      backend=backend, recompute=recompute, rank_gates=rank_gates, bias=bias)
        return unpermute(y_sorted, plan, weights, backend=backend)
    _check_gather_args(x, plan, top_k, gate_up_proj, down_proj, activation, lora, rank_gates, lora_dropout, bias)
    return _triton_grouped_mlp(
        x, plan.sorted_slots.numel(), plan.tokens_per_expert, plan, gate_up_proj, down_proj, activation, lora,
        lora_scale, lora_dropout, training, recompute, top_k=top_k, rank_gates=rank_gates, weights=weights,
        bias=bias,
    )


__all__ = [
    "grouped_mlp", "grouped_mlp_gather", "grouped_mlp_combine", "grouped_mlp_fwd", "grouped_mlp_bwd", "dropout_mask",
]
