"""The "unimoe" experts implementation of transformers' ExpertsInterface: this package's kernels
behind `from_pretrained(..., experts_implementation="unimoe")` / `set_experts_implementation("unimoe")`.

transformers v5 experts modules (classes decorated with @use_experts_implementation: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, ...) look their forward up in ALL_EXPERTS_FUNCTIONS by the config's
`_experts_implementation` and call it as fn(module, hidden_states, top_k_index, top_k_weights).
unimoe_experts_forward is that function; data flow for hidden_states [T, H], top_k_* [T, k]:

    layout and activation from the module's flags (has_gate, has_bias, is_transposed,
      is_concatenated, has_post_expert_norm, _apply_gate, act_fn): one it cannot run -> ValueError
    W_gu [E, 2F, H] (or up_proj [E, F, H] without a gate), W_d [E, H, F]   the module's own
      Parameters (transposed views when is_transposed); with PEFT target_parameters LoRA on them,
      the base Parameter and PEFT's factors A, B and scale (peft_lora_factors), never W + s B A
    ids, weights = skip_sentinel(top_k_index, top_k_weights, E)   index >= E (transformers' "expert
      on another rank") -> expert 0 with weight 0: it adds nothing and gets no gradient, no host sync
    plan = build_routing(ids, E)
    out = grouped_mlp_combine(x, plan, weights, W_gu, W_d, act, lora=..., lora_scale=s)   [T, H]
      (Triton kernels on CUDA, the torch path of reference.py on CPU; both trace into one graph)

Everything the function reads from the module is Python-level state (flags, Parameters, the
activation probed once per act_fn), so torch.compile(fullgraph=True) and torch.export trace it.
`register()` adds "unimoe" to the registry; importing unimoe_kernels.integrations.transformers
calls it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ..amp import autocast_operands, check_layer_dtype
from ..ops.grouped_gemm import grouped_mlp_combine
from ..ops.routing import build_routing
from ..types import LoRAWeights

EXPERTS_IMPLEMENTATION = "unimoe"

# The activations the kernels compute, by what act_fn evaluates to: elementwise name -> GLU name.
_ELEMENTWISE = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
_GLU_OF = {"silu": "swiglu", "gelu": "geglu"}

# transformers' default gate (act_fn(gate) * up over the concatenated [gate; up] rows), looked up by
# register(); a module whose class overrides _apply_gate computes something else (gpt-oss's clamped
# gate) and is refused.
_DEFAULT_APPLY_GATE = None

_probed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _probe_activation(act_fn) -> Optional[str]:
    """'silu', 'gelu' (the exact, erf form) or 'relu' when act_fn computes it, else None.

    Decided by evaluating it rather than by class name, so any module or function that computes the
    same thing qualifies and a look-alike (gelu with the tanh approximation) does not.
    """
    if not callable(act_fn):
        return None
    # Points on both sides of 0 and in the tails, in fp64 so that the tanh approximation of gelu
    # (off by up to ~1e-3) cannot pass for the exact form.
    probe = torch.linspace(-6.0, 6.0, 49, dtype=torch.float64)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # an activation that cannot run on a CPU fp64 tensor is not one we know
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return None
    for name, ref in _ELEMENTWISE.items():
        if torch.allclose(out, ref(probe), rtol=0.0, atol=1e-12):
            return name
    return None


@torch._dynamo.assume_constant_result
def elementwise_activation(act_fn) -> str:
    """_probe_activation(act_fn) or "" , probed once per act_fn object.

    Traced code sees the result as a constant: torch.compile evaluates this once at trace time
    (assume_constant_result), and the probe runs with the tracer's modes (fake tensors, proxies of
    torch.export) switched off, so it computes on real tensors and records nothing in the graph.
    """
    try:
        return _probed[act_fn]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (then probed every call)
        pass
    with _disable_current_modes():
        name = _probe_activation(act_fn) or ""
    try:
        _probed[act_fn] = name
    except TypeError:
        pass
    return name


def glu_activation(act_fn) -> Optional[str]:
    """'swiglu' or 'geglu' when act_fn computes silu or exact gelu (the gate of a GLU), else None."""
    return _GLU_OF.get(elementwise_activation(act_fn))


def experts_activation(module: torch.nn.Module) -> str:
    """The kernels' activation name for a transformers v5 experts module, or a ValueError naming the
    flag or function of the module that the kernels cannot run."""
    name = type(module).__name__
    has_gate = getattr(module, "has_gate", True)
    for flag, ok, why in (
        ("has_bias", False, "the grouped GEMM kernels have no bias term"),
        ("is_concatenated", True, "interleaved gate/up rows are not the [gate; up] layout the kernels read"),
        ("has_post_expert_norm", False, "a norm between the expert output and the weighted combine cannot "
                                        "run inside the fused combine"),
    ):
        if getattr(module, flag, ok) != ok:
            raise ValueError(f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {name}: {flag}='
                             f'{getattr(module, flag)!r} ({why}); use "grouped_mm" or "eager" for this model')
    gate_fn = getattr(type(module), "_apply_gate", None)
    if has_gate and gate_fn is not None and _DEFAULT_APPLY_GATE is not None and gate_fn is not _DEFAULT_APPLY_GATE:
        raise ValueError(f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {name}: it overrides '
                         "_apply_gate (a gate other than act_fn(gate) * up), which the kernels do not compute")
    act_fn = getattr(module, "act_fn", None)
    act = elementwise_activation(act_fn)
    act = _GLU_OF.get(act) if has_gate else act
    if not act:
        kinds = "silu or exact gelu" if has_gate else "silu, exact gelu or relu"
        raise ValueError(f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {name}: its act_fn '
                         f"{act_fn!r} computes none of {kinds}")
    return act


def skip_sentinel(top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) with every slot naming an expert index >= num_experts sent to expert 0 with
    weight 0.

    transformers' experts skip such a slot (num_experts marks a token whose expert lives on another
    rank under its expert parallelism). Routed at weight 0 it adds nothing to the output, and
    masked_fill gives its routing weight a zero gradient, as transformers' kernels do; the cost is
    the slot's rows in expert 0's GEMMs, with no host sync and no data-dependent shape.
    """
    skip = top_k_index >= num_experts
    return top_k_index.masked_fill(skip, 0), top_k_weights.masked_fill(skip, 0)


def _factors_proxy(module: torch.nn.Module, name: str):
    """(base Parameter, the single parametrization on it) of a parametrized parameter, or None."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or name not in parametrizations or len(parametrizations[name]) != 1:
        return None
    return parametrizations[name].original, parametrizations[name][0]


def peft_lora_factors(module: torch.nn.Module, name: str, transposed: bool):
    """(W, (A [E, r, in], B [E, out, r], scale) or None) of the module's expert weight `name`, W in
    the [E, out, in] layout (a transposed view when `transposed`).

    While PEFT's ParamWrapper (LoraConfig(target_parameters=[...])) runs the module, the weight is a
    parametrization whose one module holds the low-rank factors (lhs, rhs, scaling: the delta is
    scaling * lhs @ rhs in the stored layout). Those are returned with the base Parameter, so the
    kernels run the LoRA terms through the rank-r intermediate and the gradients reach PEFT's
    lora_A / lora_B through the views. Any other parametrization (PEFT's materialised delta for
    several adapters or fp8 weights, a user's own) is evaluated as it is and carries no factors.
    """
    found = _factors_proxy(module, name)
    if found is not None:
        base, proxy = found
        lhs, rhs, scaling = (getattr(proxy, a, None) for a in ("lhs", "rhs", "scaling"))
        if isinstance(lhs, torch.Tensor) and isinstance(rhs, torch.Tensor) and isinstance(scaling, (int, float)):
            # stored [E, in, out] = base + s lhs rhs when transposed: in [E, out, in], B = rhs^T, A = lhs^T
            a, b = (lhs.transpose(1, 2), rhs.transpose(1, 2)) if transposed else (rhs, lhs)
            # PEFT's B is a permuted view with no unit-stride matrix axis; the factors are small
            # ([E, r, in], [E, out, r]), and a contiguous copy is what the GEMMs read fastest.
            return (base.transpose(1, 2) if transposed else base), (a.contiguous(), b.contiguous(), float(scaling))
    weight = getattr(module, name)
    return (weight.transpose(1, 2) if transposed else weight), None


def _joint_lora(first, second, w1: torch.Tensor, w2: torch.Tensor):
    """(LoRAWeights, scale) for the kernels from the two projections' (A, B, scale) or None each.

    The kernels take one rank and one scale for both: a projection without an adapter gets zero
    factors, a lower rank is padded with zero rank rows / columns (they stay zero: their gradient
    is zero), and a different scale is folded into that projection's B.
    """
    if first is None and second is None:
        return None, 1.0
    r = max(f[0].shape[1] for f in (first, second) if f is not None)
    scale = (first or second)[2]
    out = []
    for f, w in ((first, w1), (second, w2)):
        if f is None:
            e, n_out, n_in = w.shape
            out += [w.new_zeros((e, r, n_in)), w.new_zeros((e, n_out, r))]
            continue
        a, b, s = f
        if a.shape[1] < r:
            pad = r - a.shape[1]
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
        if s != scale:
            b = b * (s / scale)
        out += [a, b]
    return LoRAWeights(*out), scale


def unimoe_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts call on this package's kernels: [T, H] -> [T, H] in hidden_states' dtype."""
    activation = experts_activation(self)
    transposed = bool(getattr(self, "is_transposed", False))
    first = "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj"
    w1, lora1 = peft_lora_factors(self, first, transposed)
    w2, lora2 = peft_lora_factors(self, "down_proj", transposed)
    lora, scale = _joint_lora(lora1, lora2, w1, w2)
    check_layer_dtype(hidden_states, (w1, w2, *(lora or ())), type(self).__name__, "model")
    ids, weights = skip_sentinel(top_k_index, top_k_weights, w1.shape[0])
    plan = build_routing(ids, w1.shape[0])
    x, w1, w2, lora = autocast_operands(hidden_states, w1, w2, lora)
    out = grouped_mlp_combine(x, plan, weights, w1, w2, activation, lora=lora, lora_scale=scale,
                              training=self.training)
    # transformers' kernels return hidden_states' dtype also under autocast.
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Add "unimoe" to transformers' ExpertsInterface (idempotent); False when transformers (v5,
    with transformers.integrations.moe) is not installed.

    For code that imports this package lazily: call it before from_pretrained(...,
    experts_implementation="unimoe"). Importing unimoe_kernels.integrations.transformers does it.
    """
    global _DEFAULT_APPLY_GATE
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    _DEFAULT_APPLY_GATE = getattr(moe, "_default_apply_gate", None)
    moe.ExpertsInterface.register(EXPERTS_IMPLEMENTATION, unimoe_experts_forward)
    return True


__all__ = ["EXPERTS_IMPLEMENTATION", "register", "unimoe_experts_forward", "skip_sentinel", "experts_activation",
           "peft_lora_factors", "glu_activation", "elementwise_activation"]
