"""What the ops, the modules and the torch path share: containers and the tables of names.

Containers (gating output, routing plan, aux statistics, LoRA factors) are NamedTuples so that
torch.compile traces through them and autograd.Functions can return their fields without wrapping.
The tables (activations, router scorings) and compute_dtype are the vocabulary every layer checks
its arguments against; they live here so no layer has to import another's implementation for them.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
GLU_ACTIVATIONS = ("swiglu", "geglu")
SCORINGS = ("softmax", "sigmoid")

# Every activation kind the expert MLP computes: kind -> (GLU, its constants). An activation is a
# string, "kind" or "kind(name=value,...)" with every constant named (activation_name writes the
# canonical form), so it passes through custom ops, compiled graphs and configs unchanged. With
# gate g and up u (GLU), h =
#   swiglu          silu(g) * u                  geglu, geglu_tanh   gelu(g) * u (erf; tanh form)
#   swiglu_clamp    gc * sigmoid(alpha * gc) * (clamp(u, -limit, limit) + beta), gc = min(g, limit)
#   geglu_clamp     gelu(gc) * (clamp(u, -limit, limit) + beta) (erf gelu; DeepSeek-V4's gate with a gelu act_fn)
#   swiglu_softcap  gate_cap tanh(g / gate_cap) * sigmoid(g) * up_cap tanh(u / up_cap)
#   silu, gelu (erf), gelu_tanh, relu, relu2 = relu(g)^2   (no GLU: h = act(g))
# A GLU's first projection holds the gate columns, then the up columns ([gate; up], 2F). The
# suffix ":interleaved" ("swiglu:interleaved") says they alternate instead: column 2n is gate n,
# column 2n+1 up n (gpt-oss). The layout is part of the string because it is part of how z [2F]
# becomes h [F]: every path that computes the activation reads it from there.
ACTIVATION_KINDS = {
    "swiglu": (True, ()), "geglu": (True, ()), "geglu_tanh": (True, ()),
    "swiglu_clamp": (True, ("alpha", "beta", "limit")), "geglu_clamp": (True, ("beta", "limit")),
    "swiglu_softcap": (True, ("gate_cap", "up_cap")),
    "silu": (False, ()), "gelu": (False, ()), "gelu_tanh": (False, ()), "relu": (False, ()), "relu2": (False, ()),
}
# Constants that must be positive (they divide or bound).
_POSITIVE = ("limit", "gate_cap", "up_cap")


_INTERLEAVED = ":interleaved"


def activation_name(kind: str, *, interleaved: bool = False, **constants: float) -> str:
    """The canonical activation string of a kind and its constants, e.g.
    activation_name("swiglu_clamp", alpha=1.702, beta=1.0, limit=7.0); interleaved=True for a GLU whose
    gate and up columns alternate. Checked by parse_activation."""
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"activation kind must be one of {tuple(ACTIVATION_KINDS)}, got {kind!r}")
    names = ACTIVATION_KINDS[kind][1]
    name = kind if not names else kind + "(" + ",".join(f"{n}={float(constants.get(n, 'nan'))!r}"
                                                         for n in names) + ")"
    name += _INTERLEAVED if interleaved else ""
    parse_activation(name)
    return name


# Parsed activations by string. A plain dict, not functools.lru_cache: dynamo warns on every
# compile that traces through an lru_cache, and importing torch._dynamo to mark the function
# constant would import triton with the package.
_PARSED: dict = {}


def parse_activation(activation: str) -> tuple[str, tuple[float, ...]]:
    """(kind, constants in ACTIVATION_KINDS' order) of an activation string; a ValueError naming what
    is wrong for an unknown kind, a missing, unknown or non-finite constant, or ":interleaved" on an
    activation without a gate. Parsed once per string (the layout: is_interleaved)."""
    parsed = _PARSED.get(activation) if isinstance(activation, str) else None
    if parsed is None:
        parsed = _parse_activation(activation)
        _PARSED[activation] = parsed
    return parsed


def _parse_activation(activation: str) -> tuple[str, tuple[float, ...]]:
    body = activation
    if isinstance(activation, str) and activation.rstrip().endswith(_INTERLEAVED):
        body = activation.rstrip()[:-len(_INTERLEAVED)]
    m = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", body) if isinstance(activation, str) else None
    if m is None or m.group(1) not in ACTIVATION_KINDS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATION_KINDS)} (with its constants, e.g. "
                         f"'swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0)'), got {activation!r}")
    kind, names = m.group(1), ACTIVATION_KINDS[m.group(1)][1]
    given = {}
    for part in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
        key, _, value = part.partition("=")
        try:
            given[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"activation {activation!r}: {part!r} is not name=number") from None
    if set(given) != set(names):
        raise ValueError(f"activation {kind!r} takes the constants {names}, got {tuple(given)} in {activation!r}")
    for key, value in given.items():
        if not math.isfinite(value) or (key in _POSITIVE and value <= 0):
            raise ValueError(f"activation {activation!r}: {key} must be a finite"
                             f"{' positive' if key in _POSITIVE else ''} number, got {value}")
    if body is not activation and not ACTIVATION_KINDS[kind][0]:
        raise ValueError(f"activation {activation!r}: {_INTERLEAVED!r} is a layout of gate and up columns, and "
                         f"{kind!r} has no gate")
    return kind, tuple(given[n] for n in names)


def is_interleaved(activation: str) -> bool:
    """Whether a GLU activation's gate and up columns alternate (":interleaved"); ValueError as
    parse_activation for a string that is no activation."""
    parse_activation(activation)
    return activation.rstrip().endswith(_INTERLEAVED)


def is_glu(activation: str) -> bool:
    """Whether GEMM 1 of the expert MLP is [gate; up] (2F columns) for this activation; ValueError
    naming the choices for an unknown one."""
    return ACTIVATION_KINDS[parse_activation(activation)[0]][0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Router math and reductions run in fp32, or fp64 when the input is fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class LoRAWeights(NamedTuple):
    """Per-expert LoRA factors in the layout of SparseMoE's parameters."""

    a_gate_up: torch.Tensor  # [E, r, H]
    b_gate_up: torch.Tensor  # [E, 2F or F, r]
    a_down: torch.Tensor  # [E, r, F]
    b_down: torch.Tensor  # [E, H, r]


class ExpertBias(NamedTuple):
    """Per-expert biases of the two projections (gpt-oss's gate_up_proj_bias, down_proj_bias); either
    may be None. gate_up is added to the first projection's output z, in its column layout (the
    activation's: [gate; up] halves or interleaved), before the activation; down to each expert's
    output before the weighted combine."""

    gate_up: "torch.Tensor | None"  # [E, 2F or F]
    down: "torch.Tensor | None"  # [E, H]


class GatingOutput(NamedTuple):
    """What the router hands to the experts, for T tokens, E experts and k slots per token.

    weights: [T, k] fp32, the combine weight of each chosen expert (renormalised when asked).
    ids: [T, k] int32, the chosen experts, best first; ties go to the lowest expert index.
    scores: [T, E] fp32, softmax or sigmoid of the logits (before any selection bias).
    logits: [T, E] fp32, the router logits the scores came from.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    scores: torch.Tensor
    logits: torch.Tensor


class RoutingPlan(NamedTuple):
    """Where every (token, slot) pair goes in expert-sorted order, for N = T*k slots.

    A slot is the flat index t*k + j of token t's j-th choice. Within an expert, slots keep their
    flat order (a stable sort), so the plan is deterministic.

    tokens_per_expert: [E] int32, how many slots chose each expert.
    expert_offsets: [E+1] int32, exclusive prefix sum of tokens_per_expert; expert e owns sorted
        rows expert_offsets[e] .. expert_offsets[e+1]-1.
    sorted_slots: [N] int32, sorted row -> slot (token = slot // k).
    slot_rows: [N] int32, slot -> sorted row; the inverse permutation of sorted_slots.
    tile_expert: [max_tiles] int32, the expert of each BLOCK_M-row tile of the grouped GEMM, -1 for
        the unused tail. max_tiles = ceil(N / block_m) + E is known on the host without a sync.
    tile_row_start: [max_tiles] int32, first sorted row of each tile (tile_row_start of unused tiles
        is N); a tile covers rows up to min(start + block_m, expert_offsets[e+1]).
    block_m: the tile height the map was built for.
    """

    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    block_m: int


class MoEAux(NamedTuple):
    """Losses and routing statistics of one SparseMoE call, for logging and custom trainers.

    load_balancing_loss: scalar fp32, E * sum_e f_e * P_e with f_e the fraction of the T*k slots sent
        to expert e and P_e the mean router probability of e (1.0 when perfectly balanced). Hugging
        Face's Mixtral loss is k times this value. Not multiplied by aux_loss_coef.
    z_loss: scalar fp32, mean over tokens of logsumexp(logits)^2. Not multiplied by z_loss_coef.
    tokens_per_expert: [E] int32, slots routed to each expert (before capacity dropping).
    router_logits: [T, E] fp32, for hosts that compute their own losses.
    dropped_slots: scalar int64, (token, slot) pairs dropped by the capacity limit (0 when dropless).
    """

    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    router_logits: torch.Tensor
    dropped_slots: torch.Tensor


def max_tiles(num_slots: int, num_experts: int, block_m: int) -> int:
    """Host-known upper bound on the number of BLOCK_M tiles over all experts.

    Each expert with n rows needs ceil(n / block_m) <= n / block_m + 1 tiles; summed over experts
    that is at most N / block_m + E, and ceil(N / block_m) + E bounds it as an integer.
    """
    # + and // only (no unary minus on the quotient), so it also works on SymInts under torch.compile.
    return (num_slots + block_m - 1) // block_m + num_experts


__all__ = [
    "GatingOutput", "RoutingPlan", "ExpertBias", "MoEAux", "LoRAWeights", "max_tiles", "ACTIVATIONS", "GLU_ACTIVATIONS",
    "SCORINGS",
    "ACTIVATION_KINDS", "activation_name", "parse_activation", "is_interleaved",
    "is_glu", "compute_dtype",
]
