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

import contextlib
import functools
import inspect
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ..activations import apply_activation
from ..amp import autocast_operands, check_layer_dtype
from ..ops.grouped_gemm import grouped_mlp_combine
from ..ops.routing import build_routing
from ..types import ExpertBias, LoRAWeights, activation_name, is_glu, is_interleaved
from .export import experts_forward_aten, exporting

EXPERTS_IMPLEMENTATION = "unimoe"

# The elementwise activations an act_fn is compared with (exact gelu and its tanh form apart), and
# the GLU kind each one gates: the vocabulary of elementwise_activation / glu_activation.
_ELEMENTWISE = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
                "relu": F.relu, "relu2": lambda x: F.relu(x).square()}
_GLU_OF = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}

_probed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _probe_activation(act_fn) -> Optional[str]:
    """The elementwise kind act_fn computes (silu, gelu (erf), gelu_tanh, relu, relu2), else None.

    Decided by evaluating it rather than by class name, so any module or function that computes the
    same thing qualifies and a look-alike does not.
    """
    if not callable(act_fn):
        return None
    # Points on both sides of 0 and in the tails, in fp64 so that the tanh approximation of gelu
    # (off by up to ~1e-3) cannot pass for the exact form; on the CPU whatever device is ambient
    # (a model built under `with torch.device("meta")` probes too).
    probe = torch.linspace(-6.0, 6.0, 49, dtype=torch.float64, device="cpu")
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
    torch.export, an ambient device) switched off, so it computes on real tensors and records
    nothing in the graph.
    """
    try:
        return _probed[act_fn]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable (then probed every call)
        pass
    with _real_tensors():
        name = _probe_activation(act_fn) or ""
    try:
        _probed[act_fn] = name
    except TypeError:
        pass
    return name


def glu_activation(act_fn) -> Optional[str]:
    """'swiglu', 'geglu' or 'geglu_tanh' when act_fn computes silu, exact gelu or gelu's tanh form
    (the gate of a GLU), else None."""
    return _GLU_OF.get(elementwise_activation(act_fn))


@contextlib.contextmanager
def _real_tensors():
    """Plain eager torch on CPU tensors: without the dispatch modes of a tracer (fake tensors, export's
    proxies) and the torch-function modes (an ambient `torch.device("meta")`, export's handlers)."""
    with _disable_current_modes(), torch._C.DisableTorchFunction(), torch.no_grad():
        yield


# --- recognising an experts module's gate -----------------------------------------------------------
#
# A module's gate is what its `_apply_gate` (has_gate) or `act_fn` (no gate) computes on the output
# of the first projection. It is never guessed from a class or a name: candidate activation strings
# are built from the kinds without constants and from the constants the module holds, and each is
# compared with the module's own function on a probe (_confirm); the first that agrees is the one
# the kernels run, and when none does the module is refused.

# Kinds without constants, GLU and not.
_PLAIN = {True: ("swiglu", "geglu", "geglu_tanh"), False: ("silu", "gelu", "gelu_tanh", "relu", "relu2")}
# Where transformers' experts keep the constants of their gate, looked up on the module, its act_fn
# and its config: gpt-oss alpha / limit, MiniMax-M3 swiglu_alpha / swiglu_limit, DeepSeek-V4 limit,
# HY-V4 / GLM-5-Next swiglu_limit, Inkling2's act_fn gate_softcap / up_softcap (modules holding
# .softcap) and its config's mlp_gate_softcap / mlp_up_softcap.
_CONSTANTS = {"limit": ("limit", "swiglu_limit"), "alpha": ("alpha", "swiglu_alpha"),
              "gate_cap": ("gate_softcap", "mlp_gate_softcap"), "up_cap": ("up_softcap", "mlp_up_softcap")}
# A candidate agrees when |module - candidate| <= _RTOL (1 + |candidate|) at every probe point: a
# gate computed in fp32 inside (beam, Inkling2) is off by ~1e-7 relative and passes; gelu's tanh
# form, off by up to 4e-4 relative at |x| ~ 2, does not pass for the exact one, nor the reverse.
_RTOL = 1e-5

_recognised: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _number(value) -> Optional[float]:
    value = getattr(value, "softcap", value)  # Inkling2's Softcap modules hold their cap
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def gate_constants(module: torch.nn.Module) -> dict[str, tuple[float, ...]]:
    """{constant: the distinct finite values found for it} on an experts module, its act_fn and its
    config, under the names of _CONSTANTS; what the candidate gates are built from."""
    owners = [o for o in (module, getattr(module, "act_fn", None), getattr(module, "config", None)) if o is not None]
    found = {}
    for key, names in _CONSTANTS.items():
        values = [_number(getattr(owner, n, None)) for owner in owners for n in names]
        found[key] = tuple(dict.fromkeys(v for v in values if v is not None))
    return found


def _named(kind: str, interleaved: bool = False, **constants: float) -> Optional[str]:
    try:
        return activation_name(kind, interleaved=interleaved, **constants)
    except ValueError:  # a constant the kind cannot take (a limit <= 0): no candidate
        return None


def gate_candidates(glu: bool, constants: dict, activation: Optional[str] = None,
                    interleaved: bool = False) -> list[str]:
    """The activation strings a gate is compared with, in order: only `activation` when the caller
    names one; else the kinds without constants, then swiglu_clamp for every limit x alpha (the
    module's and 1) x beta (0 and 1), geglu_clamp for every limit x beta, and swiglu_softcap for
    every gate cap x up cap the module holds.
    A GLU's candidates come in the layout the module declares (`interleaved`: is_concatenated=False)
    first, then in the other: what the gate function reads is what decides, and the probe tells."""
    if activation:
        return [activation]
    out = []
    for il in ((interleaved, not interleaved) if glu else (False,)):
        out += [_named(kind, interleaved=il) for kind in _PLAIN[glu]]
        if glu:
            for limit in constants["limit"]:
                for alpha in (*constants["alpha"], 1.0):
                    out += [_named("swiglu_clamp", il, alpha=alpha, beta=beta, limit=limit) for beta in (0.0, 1.0)]
                out += [_named("geglu_clamp", il, beta=beta, limit=limit) for beta in (0.0, 1.0)]
            out += [_named("swiglu_softcap", il, gate_cap=g, up_cap=u) for g in constants["gate_cap"]
                    for u in constants["up_cap"]]
    return [c for c in dict.fromkeys(out) if c is not None]


def _probe_points(constants: dict, dtype: torch.dtype) -> torch.Tensor:
    """Sorted CPU points, both signs: a grid over [-8, 8], tails out to 50 and each constant's
    neighbourhood (c and c +- 1/4, 2c), so a clamp or a cap is seen on both of its sides."""
    extra = [12.0, 20.0, 50.0] + [p for values in constants.values() for c in values
                                  for p in (c - 0.25, c, c + 0.25, 2 * c)]
    extra = torch.tensor(extra, dtype=dtype, device="cpu")
    grid = torch.linspace(-8.0, 8.0, 33, dtype=dtype, device="cpu")
    return torch.unique(torch.cat([grid, extra, -extra]))


def _gate_probe(points: torch.Tensor, glu: bool, interleaved: bool = False) -> torch.Tensor:
    """The first projection's output to feed the gate: [1, n] points without a gate; with one
    [n, 2n] whose row i has every point in the gate columns and point i in every up column, so the
    gate sees every (gate, up) pair of points and a swap of the halves or a read in the other layout
    shows. The gate columns are the first half, or the even columns when interleaved."""
    if not glu:
        return points.unsqueeze(0)
    n = points.numel()
    gate, up = points.expand(n, n), points.unsqueeze(1).expand(n, n)
    if interleaved:
        return torch.stack([gate, up], dim=-1).flatten(1).contiguous()
    return torch.cat([gate, up], dim=1).contiguous()


def _gate_function(module: torch.nn.Module, glu: bool):
    if not glu:
        return getattr(module, "act_fn", None)
    gate = getattr(module, "_apply_gate", None)
    if gate is None and callable(getattr(module, "act_fn", None)):
        def gate(gate_up):  # transformers' default, for a module outside its decorator
            g, u = gate_up.chunk(2, dim=-1)
            return module.act_fn(g) * u
    return gate


def _confirm(fn, candidates: list[str], constants: dict, glu: bool) -> Optional[str]:
    """The first candidate fn agrees with on the probe of its layout, in fp64 (fp32 if fn cannot
    take fp64), or None; fn runs once per layout."""
    if not callable(fn):
        return None
    for dtype in (torch.float64, torch.float32):
        points = _probe_points(constants, dtype)
        runs = {}  # layout -> (probe, fn's output or None when it fails there)
        for candidate in candidates:
            il = glu and is_interleaved(candidate)
            if il not in runs:
                probe = _gate_probe(points, glu, il)
                try:
                    out = fn(probe)
                except Exception:  # a gate that cannot run on a CPU tensor of this dtype
                    out = None
                runs[il] = (probe, out)
            probe, out = runs[il]
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not bool(torch.isfinite(out).all()):
                return None
            ref = apply_activation(probe, candidate)
            if out.shape == ref.shape and bool(((out.to(dtype) - ref).abs() <= _RTOL * (1 + ref.abs())).all()):
                return candidate
        if any(out is not None for _, out in runs.values()):
            return None
    return None


def _identity(obj):
    """What the recognition cache compares obj by: obj itself through a weak reference (a replaced
    act_fn or gate is noticed, a dead one not kept alive), a bound method as its function and owner."""
    if inspect.ismethod(obj):
        return (_identity(obj.__func__), _identity(obj.__self__))
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj if obj is None or isinstance(obj, (bool, int, float, str)) else id(obj)


@torch._dynamo.assume_constant_result
def recognised_activation(module: torch.nn.Module, activation: Optional[str] = None) -> str:
    """The activation string the kernels run for an experts module's gate, confirmed against the
    module's own `_apply_gate` / `act_fn` on a probe (gate_candidates, _confirm), or "" when no
    candidate agrees. `activation`: the string the caller expects, the only candidate then (confirmed
    all the same).

    Probed once per module and kept while its gate function, act_fn, has_gate and constants stay
    the same objects and values. A constant under torch.compile (evaluated at trace time, as
    elementwise_activation is); the probe runs on real CPU tensors whatever the tracer or ambient
    device, with no host sync in the forward it serves.
    """
    glu = bool(getattr(module, "has_gate", True))
    interleaved = not getattr(module, "is_concatenated", True)
    constants = gate_constants(module)
    fn = _gate_function(module, glu)
    key = (glu, interleaved, _identity(fn), _identity(getattr(module, "act_fn", None)), tuple(constants.items()),
           activation)
    try:
        cached = _recognised.get(module)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    with _real_tensors():
        name = _confirm(fn, gate_candidates(glu, constants, activation, interleaved), constants, glu) or ""
    try:
        _recognised[module] = (key, name)
    except TypeError:
        pass
    return name


# Layout flags of @use_experts_implementation the kernels cannot read: (flag, the value they read, why).
_REFUSED_FLAGS = (
    ("has_post_expert_norm", False, "a norm of each expert's output row before the weighted combine: its "
                                    "forward could ride the combine's pass (row sums of squares from the down "
                                    "GEMM's tiles), but its backward needs each expert's output row y (the "
                                    "norm's gradient takes <d, y> over the row), which the fused layer neither "
                                    "keeps nor recomputes: a second pass over [T*k, H] expert outputs, saved "
                                    "(activation memory) or recomputed (a third GEMM)"),
)


def _refused(name: str, why: str) -> str:
    return (f'experts_implementation="{EXPERTS_IMPLEMENTATION}" cannot run {name}: {why}; use "grouped_mm" or '
            '"eager" for this model')


def experts_activation(module: torch.nn.Module, activation: Optional[str] = None) -> str:
    """The kernels' activation string for a transformers v5 experts module, or a ValueError naming the
    flag or function of the module that the kernels cannot run.

    The gate is recognised by recognised_activation (candidates confirmed against the module's own
    function, never by name). `activation` (a types.ACTIVATION_KINDS string, e.g. from patch_moe)
    is then the only candidate: it too must agree with the module's gate, else the module is refused.
    """
    name = type(module).__name__
    if activation is not None:
        is_glu(activation)  # a ValueError naming the choices for a string that is no activation
    for flag, ok, why in _REFUSED_FLAGS:
        if getattr(module, flag, ok) != ok:
            raise ValueError(_refused(name, f"{flag}={getattr(module, flag)!r} ({why})"))
    act = recognised_activation(module, activation)
    if not act:
        glu = bool(getattr(module, "has_gate", True))
        fn = _gate_function(module, glu)
        what = f"_apply_gate ({getattr(fn, '__qualname__', fn)!r})" if glu else f"act_fn {fn!r}"
        tried = ", ".join(gate_candidates(glu, gate_constants(module), activation,
                                          not getattr(module, "is_concatenated", True)))
        raise ValueError(_refused(name, f"its {what} computes none of the activations it was compared with on a "
                                        f"probe ({tried})"))
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
    """transformers' experts call on this package's kernels: [T, H] -> [T, H] in hidden_states' dtype.

    While an exporter traces it, the same function in plain aten ops (export.py) instead."""
    activation = experts_activation(self)
    transposed = bool(getattr(self, "is_transposed", False))
    first = "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj"
    w1, lora1 = peft_lora_factors(self, first, transposed)
    w2, lora2 = peft_lora_factors(self, "down_proj", transposed)
    lora, scale = _joint_lora(lora1, lora2, w1, w2)
    # Biases are [E, out] whatever is_transposed says of the weights (gpt-oss: gate_up_proj_bias in
    # gate_up_proj's interleaved column order, which the activation string carries).
    bias = ExpertBias(getattr(self, first + "_bias"), self.down_proj_bias) if getattr(self, "has_bias", False) else None
    check_layer_dtype(hidden_states, (w1, w2, *(lora or ()), *(bias or ())), type(self).__name__, "model")
    ids, weights = skip_sentinel(top_k_index, top_k_weights, w1.shape[0])
    x, w1, w2, lora, bias = autocast_operands(hidden_states, w1, w2, lora, bias)
    if exporting():
        out = experts_forward_aten(x, ids, weights, w1, w2, activation, lora=lora, lora_scale=scale, bias=bias)
    else:
        plan = build_routing(ids, w1.shape[0])
        out = grouped_mlp_combine(x, plan, weights, w1, w2, activation, lora=lora, lora_scale=scale,
                                  training=self.training, bias=bias)
    # transformers' kernels return hidden_states' dtype also under autocast.
    return out.to(hidden_states.dtype)


# --- refusing at set time ---------------------------------------------------------------------------


def dispatched_experts(model: torch.nn.Module, config=None):
    """(qualified name, module) of every experts module under `model` whose forward transformers'
    ExpertsInterface picks (built by @use_experts_implementation), governed by `config` (identity)
    or, without one, by a config asking for "unimoe". PatchedExperts (patch_moe) run their own
    GroupedExperts and are not among them."""
    for name, module in model.named_modules():
        if getattr(type(module), "_unimoe_patched", False):
            continue
        if not (hasattr(module, "has_gate") and hasattr(module, "_is_expert_parallel")):
            continue
        cfg = getattr(module, "config", None)
        if cfg is None:
            continue
        if cfg is config if config is not None else (
                getattr(cfg, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION):
            yield name, module


def check_experts(model: torch.nn.Module, config=None) -> None:
    """Raise the ValueError of experts_activation for the first experts module of `model` that
    "unimoe" cannot run (dispatched_experts(model, config)), naming where it is and how many others
    are refused; nothing when all can run."""
    refused = []
    for name, module in dispatched_experts(model, config):
        try:
            experts_activation(module)
        except ValueError as err:
            refused.append((name, err))
    if refused:
        name, err = refused[0]
        more = f" and {len(refused) - 1} other experts module(s)" if len(refused) > 1 else ""
        raise ValueError(f"{err} [{name or type(model).__name__}{more}]") from None


def _install_set_time_check(modeling_utils) -> None:
    """Make transformers refuse "unimoe" when it is set on a model it cannot run, as it refuses
    "grouped_mm" (idempotent).

    transformers checks an experts implementation in PreTrainedModel.get_correct_experts_implementation
    (called by set_experts_implementation, and by PreTrainedModel.__init__ before any layer exists);
    "unimoe" runs the check of each experts module the config governs there, and in post_init (the
    end of every model's __init__, the layers built: from_pretrained and Model(config) with
    experts_implementation="unimoe"). Both wrap transformers' own method and return what it returns.
    """
    cls = modeling_utils.PreTrainedModel
    get_correct = cls.get_correct_experts_implementation
    if not getattr(get_correct, "_unimoe_check", False):
        @functools.wraps(get_correct)
        def get_correct_experts_implementation(self, requested_experts):
            applicable = get_correct(self, requested_experts)
            if applicable == EXPERTS_IMPLEMENTATION:
                check_experts(self, self.config)
            return applicable

        get_correct_experts_implementation._unimoe_check = True
        cls.get_correct_experts_implementation = get_correct_experts_implementation
    post_init = cls.post_init
    if not getattr(post_init, "_unimoe_check", False):
        @functools.wraps(post_init)
        def checked_post_init(self):
            post_init(self)
            if getattr(getattr(self, "config", None), "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
                check_experts(self)

        checked_post_init._unimoe_check = True
        cls.post_init = checked_post_init


def register() -> bool:
    """Add "unimoe" to transformers' ExpertsInterface and its set-time check to PreTrainedModel
    (idempotent); False when transformers (v5, with transformers.integrations.moe) is not installed.

    For code that imports this package lazily: call it before from_pretrained(...,
    experts_implementation="unimoe"). Importing unimoe_kernels.integrations.transformers does it.
    """
    try:
        from transformers import modeling_utils
        from transformers.integrations import moe
    except ImportError:
        return False
    moe.ExpertsInterface.register(EXPERTS_IMPLEMENTATION, unimoe_experts_forward)
    _install_set_time_check(modeling_utils)
    return True


__all__ = ["EXPERTS_IMPLEMENTATION", "register", "unimoe_experts_forward", "skip_sentinel", "experts_activation",
           "recognised_activation", "gate_constants", "gate_candidates", "check_experts", "dispatched_experts",
           "peft_lora_factors", "glu_activation", "elementwise_activation"]
