"""nn.Modules: TopKRouter, GroupedExperts and SparseMoE.

SparseMoE.forward for x [..., H]:

    x2 = x.reshape(-1, H)                                  [T, H]
    gating = router(x2)                                    weights [T, k] fp32, ids [T, k] int32
    plan = build_routing(gating.ids)                       counts, offsets, sorted order, tile map
    (capacity_factor: weights of overflowing slots zeroed)
    y = experts.forward_routed(x2, plan, weights)          grouped MLP gathering rows on load -> combine
    y = attach_aux_loss(y, coef * lbl + z_coef * z)        value unchanged, gradient reaches router
    return y.view_as(x) (and MoEAux when asked)

With ep_group (expert parallelism, ops/dispatch.py, docs/expert_parallel.md) the experts step becomes

    x_local, state = dispatch(x2, plan, k, ep_group)       permute into the send buffer, all-to-all,
                                                           regroup by local expert
    y_local = experts.mlp(x_local, state...)               this rank's E/P experts only
    y = combine(y_local, state, weights)                   reverse regroup, all-to-all, combine

Parameter names and shapes follow Hugging Face transformers v5 (nn.Linear's [out, in] layout), so
state dicts move between this package and the host model without renaming.

Mixed precision (amp.py): under torch.autocast the router, its softmax and the aux losses run in
fp32 and the expert GEMMs in the autocast dtype, the operands cast with .to() inside the graph so
fp32 parameters get fp32 gradients; outside autocast an input whose dtype is not the layer's is a
TypeError that names both dtypes and the fix.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .amp import autocast_operands, check_layer_dtype, router_fp32
from .backend import check_backend
from .ops.dispatch import abandon_exchange_quietly, combine, dispatch, group_size_and_rank
from .ops.gating import check_gating_args, router_logits, router_losses, topk_gating
from .ops.grouped_gemm import grouped_mlp, grouped_mlp_combine
from .ops.lora_gates import lora_rank_gates
from .ops.routing import apply_capacity, build_routing, expert_capacity
from .types import ExpertBias, LoRAWeights, MoEAux, RoutingPlan, is_glu


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_number(name: str, value, *, minimum: float, allow_min: bool = True) -> None:
    """ValueError naming the argument unless value is a finite real >= minimum (> with allow_min=False).

    NaN passes every comparison-based check (nan < 0 is False) and used to switch a loss or the jitter
    off silently; inf made capacity overflow deep in the forward.
    """
    bound = f">= {minimum}" if allow_min else f"> {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
            value >= minimum if allow_min else value > minimum):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _check_input(x: torch.Tensor, hidden_size: int, param: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16 or fp64), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name} must have shape [..., hidden_size={hidden_size}], got {tuple(x.shape)}")
    if x.device != param.device:
        raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {param.device}")


def _check_rank_gate_bias(bias, lead_shape: torch.Size, r: int, param: torch.Tensor) -> torch.Tensor:
    """rank_gate_bias broadcast per token: [..., r] broadcastable to lead_shape + (r,) -> [T, r]."""
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"rank_gate_bias must be a torch.Tensor, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(f"rank_gate_bias must be a floating tensor, got {bias.dtype}")
    want = tuple(lead_shape) + (r,)
    try:
        ok = bias.dim() >= 1 and bias.shape[-1] == r and torch.broadcast_shapes(bias.shape, want) == want
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"rank_gate_bias must be [..., r={r}] broadcastable to the tokens' shape {want} "
                         f"(e.g. [r], or [B, 1, r] for one bias per sample), got {tuple(bias.shape)}")
    if bias.device != param.device:
        raise ValueError(f"rank_gate_bias is on {bias.device} but the layer's parameters are on {param.device}")
    return bias.expand(want).reshape(-1, r)


class _AttachAuxLoss(torch.autograd.Function):
    """Returns `out` unchanged; in backward, gives `aux` the gradient 1 so it joins the loss.

    This is how the balancing loss trains the router even when the caller's loss ignores it
    (Megatron-Core's aux-loss autoscaler does the same).
    """

    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_out.device)


def attach_aux_loss(out: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    """`out` with `aux_loss` added to whatever loss is later backpropagated through it."""
    return _AttachAuxLoss.apply(out, aux_loss)


class TopKRouter(nn.Module):
    """Linear router + top-k gating. weight: [E, H]; forward(x [T, H]) -> GatingOutput.

    Logits are computed in fp32 (fp64 for fp64 input) whatever the parameter dtype, with autocast
    off (amp.router_fp32), so the softmax and the top-k see fp32 logits under autocast too. router_jitter
    multiplies the input by U(1 - j, 1 + j) noise while training (Switch Transformer). With
    use_expert_bias a buffer `expert_bias` [E] is added to the scores for selection only
    (DeepSeek-V3 aux-loss-free balancing; the caller updates it).

    Arguments (ValueError naming the argument for an impossible value):
        hidden_size, num_experts: H and E (positive ints).
        top_k: k, an int with 1 <= k <= E (default 2).
        scoring: "softmax" (default) or "sigmoid" scores of the logits.
        normalize_topk: divide the k chosen scores by their sum (default True).
        scaling_factor: multiplies the combine weights, after the normalisation (default 1.0).
        router_jitter: j >= 0 (default 0.0, no noise), the jitter above.
        n_groups: expert groups of group-limited routing, >= 1 and dividing E (default 1: off).
        topk_groups: only experts of the topk_groups best groups (a group's score: the sum of its two
            best selection scores) can be chosen; 1 <= topk_groups <= n_groups and
            topk_groups * E / n_groups >= k (default None: all n_groups).
        use_expert_bias: register the fp32 buffer expert_bias [E], zeros at first (default False).
        backend: "auto" (default), "triton" or "torch", passed to ops.topk_gating.
        device, dtype: of weight, as for nn.Linear.
    forward(x [T, H], return_stats=False) -> GatingOutput (weights [T, k] fp32, ids [T, k] int32,
    scores and logits [T, E] fp32; fp64 for fp64 x), and ops.gating.RouterStats with return_stats.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        scoring: str = "softmax",
        normalize_topk: bool = True,
        scaling_factor: float = 1.0,
        router_jitter: float = 0.0,
        n_groups: int = 1,
        topk_groups: Optional[int] = None,
        use_expert_bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive("hidden_size", hidden_size)
        _check_positive("num_experts", num_experts)
        if not isinstance(top_k, int):
            raise ValueError(f"top_k must be an int, got {top_k!r}")
        check_gating_args(num_experts, top_k, n_groups, topk_groups, scoring)
        _check_number("router_jitter", router_jitter, minimum=0.0)
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.scoring, self.normalize_topk, self.scaling_factor = scoring, normalize_topk, scaling_factor
        self.router_jitter, self.n_groups, self.topk_groups = router_jitter, n_groups, topk_groups
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        if use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, so a router built here matches one built by a host model.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        """x [T, H] -> GatingOutput; with return_stats, (GatingOutput, ops.gating.RouterStats) for
        ops.gating.router_losses."""
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            x = x * noise
        with router_fp32(x.device):
            logits = router_logits(x, self.weight)
            return topk_gating(
                logits, self.top_k, scoring=self.scoring, normalize=self.normalize_topk,
                scaling_factor=self.scaling_factor, expert_bias=self.expert_bias,
                n_groups=self.n_groups, topk_groups=self.topk_groups, backend=self.backend,
                return_stats=return_stats,
            )


class GroupedExperts(nn.Module):
    """E expert MLPs with optional per-expert LoRA, stored as stacked 3-D tensors.

    Parameters (transformers v5 layout): gate_up_proj [E, 2F, H] (rows 0..F-1 gate, F..2F-1 up;
    [E, F, H] for non-GLU activations), down_proj [E, H, F]; with lora_rank r > 0 also
    lora_A_gate_up [E, r, H], lora_B_gate_up [E, 2F|F, r], lora_A_down [E, r, F], lora_B_down [E, H, r]
    (B starts at zero so a fresh adapter leaves the output unchanged). The base is frozen by default
    iff LoRA is on. forward(x [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H] is the
    transformers v5 experts call.

    lora_rank_gate=True (needs lora_rank > 0) makes each rank-1 piece of an expert's LoRA an expert
    of its own (mixture of rank-1 experts, Intuition-MoR1E, arXiv 2404.08985): the LoRA terms become
    s B((A x) * g) with g = r * softmax(x_t @ G[e]^T + bias_t) over the r pieces, per routed row
    (token t, expert e). Parameters lora_gate_gate_up [E, r, H] and lora_gate_down [E, r, H] are the
    routers G of the two LoRA sites; both read the token's input x_t (the down site too, not h, so
    the gate stays outside the fused GEMM 2, as MoR1E routes on the token). They start at zero, so
    g = 1 per piece: the factor r makes a fresh gate exactly plain LoRA, lora_alpha keeps its
    meaning, and turning the option on changes nothing until the gate trains. An optional
    rank_gate_bias [..., r] (a task or sample embedding, broadcast per token) is added to the
    logits of both sites.

    Under torch.autocast the GEMM operands (x, the base weights and the LoRA factors) are cast to the
    autocast dtype and the output comes back in it; the rank-gate logits stay fp32 (amp.py).

    Arguments (ValueError naming the argument for an impossible value):
        num_experts, hidden_size, ffn_hidden_size: E, H and F (positive ints).
        activation: a string of types.ACTIVATION_KINDS, its constants written in (default "swiglu"):
            GLU "swiglu", "geglu" (erf), "geglu_tanh", "swiglu_clamp(alpha=..,beta=..,limit=..)",
            "geglu_clamp(beta=..,limit=..)",
            "swiglu_softcap(gate_cap=..,up_cap=..)"; elementwise "silu", "gelu", "gelu_tanh", "relu",
            "relu2" (types.activation_name writes one). The torch path computes every kind. A GLU
            ending in ":interleaved" ("swiglu:interleaved", gpt-oss) holds gate n and up n in rows 2n
            and 2n+1 of gate_up_proj (and of lora_B_gate_up, gate_up_proj_bias) instead of halves.
        bias: per-expert biases of both projections (default False), Parameters gate_up_proj_bias
            [E, 2F|F] and down_proj_bias [E, H] (transformers' names), initialised as nn.Linear's and
            frozen with the base.
        lora_rank: r, an int >= 0 (default 0: no LoRA).
        lora_alpha: the LoRA scale is lora_alpha / r (default None: r, so the scale is 1).
        lora_dropout: in [0, 1) (default 0.0): dropout of the LoRA inputs only, while training.
        freeze_base: requires_grad False on gate_up_proj, down_proj and their biases (default None: True
            iff r > 0).
        lora_rank_gate: the per-token gate of the rank-1 pieces above (default False; needs r > 0).
        backend: "auto" (default), "triton" or "torch".
        device, dtype: of the parameters.
    forward(hidden_states [T, H], top_k_index [T, k] integer, top_k_weights [T, k] floating,
    rank_gate_bias=None) -> [T, H]: TypeError for a non-floating input or, outside autocast, one whose
    dtype is not the parameters'; ValueError for other shapes, another device, or rank_gate_bias
    without lora_rank_gate. Ids must lie in [0, E); they are not checked (that would sync the host).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        *,
        activation: str = "swiglu",
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        freeze_base: Optional[bool] = None,
        lora_rank_gate: bool = False,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive("num_experts", num_experts)
        _check_positive("hidden_size", hidden_size)
        _check_positive("ffn_hidden_size", ffn_hidden_size)
        if not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if lora_rank_gate and not lora_rank:
            raise ValueError("lora_rank_gate=True gates the rank-1 pieces of LoRA and needs lora_rank > 0")
        glu = is_glu(activation)
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation, self.lora_rank, self.lora_dropout = activation, lora_rank, lora_dropout
        self.lora_alpha = float(lora_rank if lora_alpha is None else lora_alpha)
        self.lora_scale = self.lora_alpha / lora_rank if lora_rank else 0.0
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        f_in = 2 * ffn_hidden_size if glu else ffn_hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, f_in, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size, **factory))
        self.has_bias = bool(bias)
        if self.has_bias:
            # transformers' names (gpt-oss): the state dict of such a model loads as it is.
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, f_in, **factory))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size, **factory))
        if lora_rank:
            r = lora_rank
            self.lora_A_gate_up = nn.Parameter(torch.empty(num_experts, r, hidden_size, **factory))
            self.lora_B_gate_up = nn.Parameter(torch.empty(num_experts, f_in, r, **factory))
            self.lora_A_down = nn.Parameter(torch.empty(num_experts, r, ffn_hidden_size, **factory))
            self.lora_B_down = nn.Parameter(torch.empty(num_experts, hidden_size, r, **factory))
        self.lora_rank_gate = bool(lora_rank_gate)
        if self.lora_rank_gate:
            self.lora_gate_gate_up = nn.Parameter(torch.empty(num_experts, lora_rank, hidden_size, **factory))
            self.lora_gate_down = nn.Parameter(torch.empty(num_experts, lora_rank, hidden_size, **factory))
        self.reset_parameters()
        if freeze_base is None:
            freeze_base = lora_rank > 0
        for w in (self.gate_up_proj, self.down_proj, *(self.expert_bias() or ())):
            w.requires_grad_(not freeze_base)

    def reset_parameters(self) -> None:
        # Per expert, nn.Linear's default bound 1/sqrt(fan_in), as the dense FFNs being replaced use,
        # for the weights and (as nn.Linear) their biases.
        for w, b in ((self.gate_up_proj, "gate_up_proj_bias"), (self.down_proj, "down_proj_bias")):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if self.has_bias:
                nn.init.uniform_(getattr(self, b), -bound, bound)
        if self.lora_rank:
            # PEFT's LoRA init: A like nn.Linear (kaiming uniform, a=sqrt(5)), B zero.
            for a in (self.lora_A_gate_up, self.lora_A_down):
                bound = 1.0 / math.sqrt(a.shape[-1])
                nn.init.uniform_(a, -bound, bound)
            nn.init.zeros_(self.lora_B_gate_up)
            nn.init.zeros_(self.lora_B_down)
        if self.lora_rank_gate:
            # Zero routers: a uniform gate, which (with the factor r) is plain LoRA.
            nn.init.zeros_(self.lora_gate_gate_up)
            nn.init.zeros_(self.lora_gate_down)

    @property
    def base_frozen(self) -> bool:
        return not (self.gate_up_proj.requires_grad or self.down_proj.requires_grad)

    def expert_bias(self) -> Optional[ExpertBias]:
        """(gate_up_proj_bias [E, 2F|F], down_proj_bias [E, H]), or None without bias."""
        if not self.has_bias:
            return None
        return ExpertBias(self.gate_up_proj_bias, self.down_proj_bias)

    def lora_weights(self) -> Optional[LoRAWeights]:
        if not self.lora_rank:
            return None
        return LoRAWeights(self.lora_A_gate_up, self.lora_B_gate_up, self.lora_A_down, self.lora_B_down)

    def check_input_dtype(self, x: torch.Tensor, layer: Optional[str] = None, var: str = "experts") -> None:
        """Outside autocast, a TypeError in the caller's terms unless x has the GEMM parameters' dtype."""
        lora = self.lora_weights() or ()
        check_layer_dtype(x, (self.gate_up_proj, self.down_proj, *lora, *(self.expert_bias() or ())),
                          layer or type(self).__name__, var)

    def _gemm_operands(self, x: torch.Tensor):
        """(x, gate_up_proj, down_proj, lora, bias) in the autocast dtype under autocast, else as they are."""
        return autocast_operands(x, self.gate_up_proj, self.down_proj, self.lora_weights(), self.expert_bias())

    def rank_gates(self, x: torch.Tensor, token_index: torch.Tensor, expert_offsets: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(g_gate_up, g_down) [N, r] fp32 for N expert-sorted rows (row n reads token x[token_index[n]]
        and belongs to the expert whose range of expert_offsets [E+1] holds n), or None without
        lora_rank_gate. bias: [T, r] or None."""
        if not self.lora_rank_gate:
            return None
        n = token_index.shape[0]
        # Expert of each sorted row from the offsets, on the device (no per-expert host loop).
        rows = torch.arange(n, device=token_index.device)
        expert_index = torch.searchsorted(expert_offsets[1:].to(torch.int64), rows, right=True)
        with router_fp32(x.device):  # gate logits and softmax in fp32, as the token router's
            return tuple(
                lora_rank_gates(x, g, token_index, expert_index, bias)
                for g in (self.lora_gate_gate_up, self.lora_gate_down)
            )

    def mlp(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, plan: Optional[RoutingPlan] = None
    ) -> torch.Tensor:
        """Expert MLPs over rows grouped by expert: x_sorted [N, H], tokens_per_expert [E] -> [N, H].

        `plan` (optional) lends its expert offsets to the Triton path (ops.grouped_mlp). With
        lora_rank_gate the gates are computed from the rows themselves (no bias)."""
        gates = None
        if self.lora_rank_gate:
            offsets = torch.cat([tokens_per_expert.new_zeros(1, dtype=torch.int64),
                                 torch.cumsum(tokens_per_expert.to(torch.int64), 0)])
            gates = self.rank_gates(x_sorted, torch.arange(x_sorted.shape[0], device=x_sorted.device), offsets)
        x_sorted, gate_up_proj, down_proj, lora, bias = self._gemm_operands(x_sorted)
        return grouped_mlp(
            x_sorted, tokens_per_expert, gate_up_proj, down_proj, self.activation,
            lora=lora, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
            training=self.training, backend=self.backend, plan=plan, rank_gates=gates, bias=bias,
        )

    def forward_routed(self, x: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor,
                       rank_gate_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, H], a routing plan of its T*k slots and combine weights [T, k] -> [T, H].

        rank_gate_bias ([..., r] broadcastable to [T, r]; needs lora_rank_gate) shifts the rank-gate
        logits of each token."""
        k = weights.shape[1]
        gates = None
        if rank_gate_bias is not None:
            if not self.lora_rank_gate:
                raise ValueError("rank_gate_bias needs lora_rank_gate=True")
            rank_gate_bias = _check_rank_gate_bias(rank_gate_bias, x.shape[:-1], self.lora_rank, self.gate_up_proj)
        if self.lora_rank_gate:
            token_index = torch.div(plan.sorted_slots.to(torch.int64), k, rounding_mode="floor")
            gates = self.rank_gates(x, token_index, plan.expert_offsets, rank_gate_bias)
        # Gather on load: the Triton path never writes (or saves) the permuted copy of x.
        x, gate_up_proj, down_proj, lora, bias = self._gemm_operands(x)
        # The weighted combine too: neither y_sorted nor a weighted copy of d(out) is kept.
        return grouped_mlp_combine(
            x, plan, weights, gate_up_proj, down_proj, self.activation,
            lora=lora, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
            training=self.training, backend=self.backend, rank_gates=gates, bias=bias,
        )

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                rank_gate_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_input(hidden_states, self.hidden_size, self.gate_up_proj, "hidden_states")
        self.check_input_dtype(hidden_states)
        if hidden_states.dim() != 2:
            raise ValueError(f"hidden_states must be [T, H], got {tuple(hidden_states.shape)}")
        t = hidden_states.shape[0]
        if top_k_index.dim() != 2 or top_k_index.shape[0] != t or top_k_index.is_floating_point():
            raise ValueError(
                f"top_k_index must be an integer tensor [T={t}, k], got {top_k_index.dtype} {tuple(top_k_index.shape)}")
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(f"top_k_weights must have top_k_index's shape {tuple(top_k_index.shape)}, "
                             f"got {tuple(top_k_weights.shape)}")
        plan = build_routing(top_k_index, self.num_experts)
        return self.forward_routed(hidden_states, plan, top_k_weights, rank_gate_bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"activation={self.activation!r}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha}, "
            f"base_frozen={self.base_frozen}" + (", lora_rank_gate=True" if self.lora_rank_gate else "")
            + (", bias=True" if self.has_bias else "")
        )


def _dense_mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [F, H], up [F, H], down [H, F]) of a LLaMA-style (gate/up/down_proj) or Mixtral-style
    (w1/w3/w2) SwiGLU MLP."""
    for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        if all(hasattr(mlp, n) for n in (gate, up, down)):
            layers = [getattr(mlp, n) for n in (gate, up, down)]
            if any(getattr(layer, "bias", None) is not None for layer in layers):
                raise ValueError(f"from_dense: {type(mlp).__name__} has biases, which SparseMoE experts do not support")
            return tuple(layer.weight for layer in layers)  # type: ignore[return-value]
    raise TypeError(
        "from_dense needs SwiGLU MLPs with gate_proj/up_proj/down_proj or w1/w3/w2 linear layers, "
        f"got {type(mlp).__name__}"
    )


class SparseMoE(nn.Module):
    """Drop-in sparse MoE FFN: TopKRouter + GroupedExperts.

    forward(x [..., H], *, return_aux=False, token_groups=None, rank_gate_bias=None) -> y with x's
    shape and dtype (the autocast dtype under torch.autocast), and MoEAux when return_aux. While
    training (grad mode on) with aux_loss_coef > 0 or z_loss_coef > 0 the weighted losses reach the
    router through backward even if the caller ignores them. token_groups (an integer per token,
    e.g. a modality id in [0, max_token_groups)) accumulates per-group expert loads, read with
    routing_stats(). With lora_rank_gate=True (GroupedExperts' docstring) the rank-1 pieces of each
    expert's LoRA are gated per token; rank_gate_bias shifts the gate logits.

    Expert parallelism: with ep_group (a torch.distributed ProcessGroup of P ranks, E divisible by P)
    rank r holds experts r*E/P .. (r+1)*E/P - 1 (experts.* parameters are [E/P, ...]) and the router
    whole; the forward is collective over the group (every rank must call it, and backward through
    it, even with an empty batch). Dropless by default (one host sync per forward for the all-to-all
    split sizes); with capacity_factor, or ep_capacity (rows per source rank and expert, which also
    serves ranks with different batch sizes), each (rank, expert) pair moves a fixed number of rows
    and no host sync happens. The router's gradient holds only this rank's tokens: sum or average it
    over the group (DDP/FSDP over the data-parallel ranks) and never all-reduce the expert parameters
    over the EP group. Aux losses and MoEAux statistics are per rank. See docs/expert_parallel.md.

    Constructor arguments (ValueError naming the argument for an impossible value or combination;
    TypeError for an ep_group that is not a ProcessGroup):
        hidden_size, ffn_hidden_size: H and F of each expert MLP (positive ints).
        num_experts: E, the global expert count (positive; divisible by the ep_group size).
        top_k: k experts per token, an int with 1 <= k <= E (default 2).
        activation: "swiglu" (default), "geglu", "gelu" (exact erf), "relu" or "silu"; the GLU ones
            make gate_up_proj [E, 2F, H] (gate rows first), the others [E, F, H].
        scoring: "softmax" (default) or "sigmoid" router scores.
        normalize_topk: renormalise the k chosen scores to sum to 1 (default True).
        lora_rank: r >= 0 of a per-expert LoRA on both GEMMs (default 0: none).
        lora_alpha: the LoRA scale is lora_alpha / r (default None: r, so the scale is 1).
        lora_dropout: in [0, 1) (default 0.0), dropout of the LoRA inputs only, while training.
        freeze_base: requires_grad False on the expert base weights (default None: True iff r > 0).
        lora_rank_gate: gate each rank-1 piece of the LoRA per token (default False; needs r > 0).
        aux_loss_coef: >= 0 (default 0.01), weight of the load-balancing loss attached while training.
        z_loss_coef: >= 0 (default 0.0), weight of the router z-loss attached while training.
        router_jitter: j >= 0 (default 0.0): while training the router input is multiplied by
            U(1 - j, 1 + j) noise.
        capacity_factor: None (default, dropless) or > 0: each expert keeps its first
            ceil(capacity_factor * T * k / E) slots (at least 1) in token order, the others get weight
            0 (MoEAux.dropped_slots counts them). With ep_group every rank must then get the same
            capacity, so bring the same T (dispatch checks the capacities agree, on the device).
        ep_group: a torch.distributed ProcessGroup for expert parallelism (default None: all local);
            torch.distributed must be initialised and this process a member.
        ep_capacity: a positive int, rows per (source rank, expert) in the padded exchange (default
            None); needs ep_group, not with capacity_factor.
        backend: "auto" (default: Triton on CUDA, torch elsewhere), "triton" or "torch", for the
            router and the experts (the routing plan always picks its own, ops.build_routing).
        max_token_groups: a positive int (default 16), rows of the per-group expert-load statistics.
        router_kwargs: a dict of further TopKRouter arguments (scaling_factor, n_groups, topk_groups,
            use_expert_bias; TopKRouter's docstring), default None.
        device, dtype: of the parameters, as for nn.Linear.

    forward arguments:
        x: [..., H] floating tensor on the parameters' device (else TypeError / ValueError);
            outside autocast its dtype must be the expert parameters' (else a TypeError naming the
            fix). T is the product of the leading dimensions.
        return_aux: also return MoEAux (losses unscaled by their coefficients, tokens_per_expert,
            router_logits, dropped_slots) (default False).
        token_groups: None (default) or an integer tensor of shape x.shape[:-1] (else ValueError) with
            values in [0, max_token_groups) (asserted on the device, without a host sync).
        rank_gate_bias: None (default) or a floating [..., r] tensor broadcastable to
            x.shape[:-1] + (r,) (e.g. [r], or [B, 1, r] for one task or sample embedding per
            sequence), added to the rank-gate logits of both LoRA sites; ValueError without
            lora_rank_gate or with ep_group.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        *,
        activation: str = "swiglu",
        scoring: str = "softmax",
        normalize_topk: bool = True,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        freeze_base: Optional[bool] = None,
        lora_rank_gate: bool = False,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        router_jitter: float = 0.0,
        capacity_factor: Optional[float] = None,
        ep_group=None,
        ep_capacity: Optional[int] = None,
        backend: str = "auto",
        max_token_groups: int = 16,
        router_kwargs: Optional[dict] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        ep_size, ep_rank = 1, 0
        if ep_group is not None:
            ep_size, ep_rank = group_size_and_rank(ep_group, "ep_group")
            if not isinstance(num_experts, int) or num_experts % ep_size:
                raise ValueError(f"num_experts={num_experts!r} must be divisible by the size of ep_group ({ep_size}): "
                                 "every rank holds num_experts / ep_size experts")
        if ep_capacity is not None:
            if ep_group is None:
                raise ValueError("ep_capacity (rows per source rank and expert) needs ep_group")
            if isinstance(ep_capacity, bool) or not isinstance(ep_capacity, int) or ep_capacity < 1:
                raise ValueError(f"ep_capacity must be a positive int or None, got {ep_capacity!r}")
            if capacity_factor is not None:
                raise ValueError("give capacity_factor or ep_capacity, not both: both set the per-expert capacity")
        _check_number("aux_loss_coef", aux_loss_coef, minimum=0.0)
        _check_number("z_loss_coef", z_loss_coef, minimum=0.0)
        if capacity_factor is not None:
            _check_number("capacity_factor (None: dropless)", capacity_factor, minimum=0.0, allow_min=False)
        _check_positive("max_token_groups", max_token_groups)
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef, self.capacity_factor = aux_loss_coef, z_loss_coef, capacity_factor
        self.ep_group, self.ep_size, self.ep_rank, self.ep_capacity = ep_group, ep_size, ep_rank, ep_capacity
        self.num_local_experts = num_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts  # global id of this rank's first expert
        self.router = TopKRouter(
            hidden_size, num_experts, top_k, scoring=scoring, normalize_topk=normalize_topk,
            router_jitter=router_jitter, backend=backend, device=device, dtype=dtype, **(router_kwargs or {}),
        )
        self.experts = GroupedExperts(
            self.num_local_experts, hidden_size, ffn_hidden_size, activation=activation, lora_rank=lora_rank,
            lora_alpha=lora_alpha, lora_dropout=lora_dropout, freeze_base=freeze_base,
            lora_rank_gate=lora_rank_gate, backend=backend, device=device, dtype=dtype,
        )
        # Not persistent: statistics, not weights, so state dicts stay those of the host model.
        self.register_buffer(
            "group_expert_counts", torch.zeros(max_token_groups, num_experts, dtype=torch.int64, device=device),
            persistent=False
        )

    @classmethod
    def from_dense(
        cls,
        mlp: Union[nn.Module, Sequence[nn.Module]],
        num_experts: Optional[int] = None,
        top_k: int = 2,
        **kwargs,
    ) -> "SparseMoE":
        """Upcycle SwiGLU MLP(s) into a SparseMoE: one MLP copied into every expert, or a list of
        MLPs, expert e from mlps[e] (Uni-MoE builds its experts from modality-specialised FFNs).

        Device and dtype follow the MLP weights unless given. The router is freshly initialised.
        """
        mlps = list(mlp) if isinstance(mlp, (list, tuple, nn.ModuleList)) else None
        if mlps is None:
            if num_experts is None:
                raise ValueError("from_dense with a single MLP needs num_experts")
            mlps = [mlp] * num_experts
        elif num_experts is not None and num_experts != len(mlps):
            raise ValueError(f"num_experts={num_experts} but {len(mlps)} MLPs were given")
        if not mlps:
            raise ValueError("from_dense needs at least one MLP")
        weights = [_dense_mlp_weights(m) for m in mlps]
        f, h = weights[0][0].shape
        for gate, up, down in weights:
            if gate.shape != (f, h) or up.shape != (f, h) or down.shape != (h, f):
                raise ValueError(f"from_dense: every MLP must have gate/up [F={f}, H={h}] and down [H, F], got "
                                 f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
        if kwargs.get("activation", "swiglu") != "swiglu":
            raise ValueError("from_dense builds SwiGLU experts; activation must be 'swiglu'")
        kwargs.setdefault("device", weights[0][0].device)
        kwargs.setdefault("dtype", weights[0][0].dtype)
        moe = cls(h, f, len(mlps), top_k, **kwargs)
        first = moe.expert_offset  # with ep_group, only this rank's experts are copied
        with torch.no_grad():
            for e in range(moe.num_local_experts):
                gate, up, down = weights[first + e]
                moe.experts.gate_up_proj[e, :f].copy_(gate)
                moe.experts.gate_up_proj[e, f:].copy_(up)
                moe.experts.down_proj[e].copy_(down)
        return moe

    def forward(self, x: torch.Tensor, *, return_aux: bool = False, token_groups: Optional[torch.Tensor] = None,
                rank_gate_bias: Optional[torch.Tensor] = None):
        try:
            rank_gate_bias = self._check_forward_args(x, rank_gate_bias)
        except (TypeError, ValueError) as err:
            if self.ep_group is not None:
                # The other ranks are heading into the exchange: tell them, so they raise too
                # instead of waiting for the process-group timeout.
                mode = ("capacity_factor" if self.capacity_factor is not None
                        else "ep_capacity" if self.ep_capacity is not None else "dropless")
                abandon_exchange_quietly(self.ep_group, self.num_experts, err, device=self.router.weight.device,
                                         mode=mode)
            raise
        shape = x.shape
        x2 = x.reshape(-1, self.hidden_size)
        # The losses are made only when returned or trained through (in inference, and in training
        # without either coefficient, nothing of them runs); their statistics come from the gating
        # pass itself.
        attach = self.training and torch.is_grad_enabled() and (self.aux_loss_coef > 0 or self.z_loss_coef > 0)
        need_losses = attach or return_aux
        gating, stats = self.router(x2, return_stats=True) if need_losses else (self.router(x2), None)
        plan = build_routing(gating.ids, self.num_experts)
        weights = gating.weights
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        capacity = self.ep_capacity
        if self.capacity_factor is not None:
            capacity = expert_capacity(gating.ids.numel(), self.num_experts, self.capacity_factor)
        if capacity is not None:
            weights, dropped = apply_capacity(weights, gating.ids, plan, capacity)
        if self.ep_group is None:
            y = self.experts.forward_routed(x2, plan, weights, rank_gate_bias)
        else:
            # Capacity-limited layers move exactly `capacity` rows per (rank, expert): no host sync.
            # capacity_factor's capacity comes from this rank's T, so all ranks need the same T
            # then; dispatch verifies it on the device (ep_capacity is the same C everywhere).
            # Cast before the all-to-all under autocast: half the bytes on the wire for bf16.
            x_send, = autocast_operands(x2)
            x_local, state = dispatch(
                x_send, plan, self.top_k, self.ep_group, capacity=capacity,
                check_capacity=self.capacity_factor is not None, backend=self.experts.backend,
            )
            y_local = self.experts.mlp(x_local, state.tokens_per_local_expert, plan=state.local_plan)
            y = combine(y_local, state, weights, backend=self.experts.backend)

        if need_losses:
            with router_fp32(x.device):
                lbl, zl = router_losses(gating, stats, plan.tokens_per_expert, self.num_experts, self.router.scoring)
        if attach:
            y = attach_aux_loss(y, self.aux_loss_coef * lbl + self.z_loss_coef * zl)
        if token_groups is not None:
            self._count_groups(token_groups, gating.ids, shape[:-1])
        y = y.view(shape)
        if not return_aux:
            return y
        return y, MoEAux(
            load_balancing_loss=lbl, z_loss=zl, tokens_per_expert=plan.tokens_per_expert,
            router_logits=gating.logits, dropped_slots=dropped,
        )

    def _check_forward_args(self, x: torch.Tensor, rank_gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """forward's argument checks (TypeError / ValueError naming the argument); returns the rank
        gate bias as [T, r] rows of the flattened tokens (or None)."""
        _check_input(x, self.hidden_size, self.router.weight)
        self.experts.check_input_dtype(x, type(self).__name__, "moe")
        if rank_gate_bias is None:
            return None
        if not self.experts.lora_rank_gate:
            raise ValueError("rank_gate_bias needs lora_rank_gate=True")
        if self.ep_group is not None:
            raise ValueError("rank_gate_bias is not supported with ep_group (the bias would have to travel "
                             "with the tokens through the all-to-all)")
        # [..., r] per token (or per sample) -> [T, r] rows of the flattened tokens.
        return _check_rank_gate_bias(rank_gate_bias, x.shape[:-1], self.experts.lora_rank, self.router.weight)

    @torch.no_grad()
    def _count_groups(self, token_groups: torch.Tensor, ids: torch.Tensor, token_shape: torch.Size) -> None:
        if token_groups.shape != token_shape or token_groups.is_floating_point():
            raise ValueError(f"token_groups must be an integer tensor of shape {tuple(token_shape)}, got "
                             f"{token_groups.dtype} {tuple(token_groups.shape)}")
        g_max, e = self.group_expert_counts.shape
        groups = token_groups.reshape(-1, 1).to(device=ids.device, dtype=torch.int64)
        # Asynchronous on GPU: an out-of-range group fails at the next sync instead of stalling here.
        torch._assert_async(((groups >= 0) & (groups < g_max)).all(), "token_groups must be in [0, max_token_groups)")
        flat = (groups * e + ids.to(torch.int64)).reshape(-1)
        self.group_expert_counts.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def routing_stats(self) -> torch.Tensor:
        """[max_token_groups, E] int64: slots of each token group routed to each expert so far."""
        return self.group_expert_counts.clone()

    def reset_routing_stats(self) -> None:
        self.group_expert_counts.zero_()
