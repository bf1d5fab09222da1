"""Run Hugging Face transformers MoE models on this package's kernels: two doors.

1. `experts_implementation="unimoe"` (experts_interface.py): importing this module registers
   "unimoe" in transformers' ExpertsInterface (`register()` does it for lazy importers), so

       model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="unimoe")
       model.set_experts_implementation("unimoe")          # or switch a loaded model

   runs every experts module on the grouped kernels with its own Parameters, flags and semantics,
   including PEFT target_parameters LoRA on the expert weights (fused, never W + B·A).

2. `patch_moe(model, lora_rank=...)` swaps the experts modules for PatchedExperts, which carry this
   package's own per-expert LoRA (and export / import it as PEFT adapters, integrations.peft).

Data flow of a patched MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, any transformers v5 block):

    block(hidden_states)                          the host's own forward, unchanged
      router_logits, top_k_weights, top_k_index = block.gate(x)      host router, unchanged: its
                                                  softmax-then-top-k, norm_topk_prob, its logits
                                                  (recorded for the host's aux loss) all stay
      y = block.experts(x, top_k_index, top_k_weights)               <- swapped: PatchedExperts, a
                                                  GroupedExperts holding the host's own
                                                  gate_up_proj [E, 2F, H] / down_proj [E, H, F]
                                                  nn.Parameter objects (no copy), plus optional
                                                  LoRA lora_A_* / lora_B_* (base then frozen);
                                                  slots naming expert index E (transformers'
                                                  "expert on another rank") are skipped
      (+ shared expert with its sigmoid gate, Qwen2-MoE)             host code, unchanged

Only the experts module is replaced, so the parameter names of the host's state dict (and what
`save_pretrained` writes) are the host's, the router's logits and the block's return type are the
host's, and a model this module does not know still works as long as its experts follow the v5
experts interface: parameters gate_up_proj [E, 2F, H] (gate rows first, or alternating with
is_concatenated=False) and down_proj [E, H, F], optionally gate_up_proj_bias [E, 2F] and
down_proj_bias [E, H] (has_bias=True), a gate the kernels compute, called as
experts(hidden_states, top_k_index, top_k_weights). Weights stored transposed (is_transposed: gpt-oss)
are not swapped; `experts_implementation="unimoe"` runs those models on the same kernels.
PatchedExperts keeps the interface attributes transformers' code reads on experts
modules (config, num_experts, act_fn, _apply_gate, has_gate, has_bias, is_transposed,
is_concatenated, has_post_expert_norm, _is_expert_parallel).

The model's experts implementation stays truthful: patch_moe sets the config's
`_experts_implementation` to "unimoe" (unless some experts module under that config could not be
swapped), and a later `set_experts_implementation("grouped_mm" | "batched_mm" | "eager" | ...)`
makes the patched modules hand every call to the host module they replaced, i.e. transformers'
kernels; with patch_moe's LoRA on them that raises instead, since those kernels would silently drop
the adapter. `unpatch_moe(model, merge_lora=...)` puts the host's experts modules back (folding the
LoRA delta into the base weights when asked) and the implementation the config had before.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..backend import check_backend
from ..modules import GroupedExperts
from .experts_interface import EXPERTS_IMPLEMENTATION, experts_activation, register, skip_sentinel
from .export import experts_forward_aten, exporting

# Host experts attributes (set by transformers' @use_experts_implementation) whose non-default value
# means a layout GroupedExperts does not hold: weights stored [E, H, 2F], no gate projection, or a
# norm after each expert. Biases and an interleaved gate/up (the ":interleaved" activation) it holds:
# has_bias and is_concatenated are copied from each host.
_LAYOUT_FLAGS = {"is_transposed": False, "has_gate": True, "has_post_expert_norm": False}
_EXPERTS_CALL = ("hidden_states", "top_k_index", "top_k_weights")
# Attributes transformers' experts modules carry (expert-parallel plans, exporters and the experts
# implementations read them) that PatchedExperts keeps: copied from the host, or these defaults
# (the layout PatchedExperts holds) for a host outside transformers.
_INTERFACE_DEFAULTS = {**_LAYOUT_FLAGS, "is_concatenated": True, "has_bias": False, "_is_expert_parallel": False}
_LORA_NAMES = ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down")


def unsupported_reason(module: nn.Module, activation: Optional[str] = None) -> Optional[str]:
    """None when `module` is a transformers-v5-style experts module that can be swapped, else why not.

    Its gate must be one the kernels compute, recognised as experts_activation recognises it (or
    `activation`, confirmed against the module's own gate)."""
    if isinstance(module, PatchedExperts):
        return "already patched"
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    if gate_up is None or down is None:
        if hasattr(module, "parameter_name") or hasattr(module, "parametrizations"):
            return ("its expert weights are wrapped (a PEFT ParamWrapper or a parametrization); run the model with "
                    'set_experts_implementation("unimoe"), which reads PEFT\'s LoRA factors, or import that adapter '
                    "with integrations.peft instead")
        return "no gate_up_proj / down_proj parameters"
    for flag, ok in _LAYOUT_FLAGS.items():
        if getattr(module, flag, ok) != ok:
            return f"{flag}={getattr(module, flag)!r} (GroupedExperts needs {flag}={ok})"
    biases = sorted(n for n in module._parameters if n.endswith("_bias"))
    if biases and (not getattr(module, "has_bias", False) or biases != ["down_proj_bias", "gate_up_proj_bias"]):
        return f"expert biases {biases} without has_bias=True on gate_up_proj_bias and down_proj_bias"
    if gate_up.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not 3-D [E, ., .]"
    e, f2, h = gate_up.shape
    if f2 % 2 or tuple(down.shape) != (e, h, f2 // 2):
        return (f"shapes gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)} are not "
                "[E, 2F, H] and [E, H, F]")
    if not gate_up.is_floating_point() or gate_up.dtype != down.dtype or gate_up.device != down.device:
        return (f"gate_up_proj ({gate_up.dtype}, {gate_up.device}) and down_proj ({down.dtype}, {down.device}) "
                "differ or are not floating")
    if gate_up.device.type == "meta":
        return "weights are on the meta device (load the model first)"
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        params = []
    if tuple(params) != _EXPERTS_CALL:
        return f"forward is not experts{_EXPERTS_CALL} (got {tuple(params)})"
    try:
        experts_activation(module, activation)
    except ValueError as err:
        return str(err)
    return None


def _looks_like_experts(attr: str, module: nn.Module) -> bool:
    if isinstance(module, PatchedExperts) or {"gate_up_proj", "down_proj"} <= set(module._parameters):
        return True
    # PEFT's ParamWrapper (it has `parameter_name`) or a parametrization around the expert weights:
    # reported as unpatchable rather than walked into, so its inner module is never swapped under it.
    wrapped = hasattr(module, "parameter_name") or "gate_up_proj" in getattr(module, "parametrizations", {})
    return wrapped and attr == "experts"


def _candidates(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute name, module) for every module that looks like MoE experts.

    Does not descend into a match, so experts nested in a wrapper are seen once, as the wrapper.
    """
    for attr, child in module.named_children():
        name = f"{prefix}.{attr}" if prefix else attr
        if _looks_like_experts(attr, child):
            yield name, module, attr, child
        else:
            yield from _candidates(child, name)


class PatchedExperts(GroupedExperts):
    """GroupedExperts on a host experts module's own weight Parameters (the v5 experts call).

    Built by `from_host`; `host_experts` is the module it replaced (kept out of the module tree so
    its parameters are not registered twice), which `unpatch_moe` puts back. A slot whose expert
    index is >= num_experts is skipped, as transformers' experts skip it.

    It follows the config's experts implementation: while that is "unimoe" (or what it was right
    after patching) this package's kernels run; after set_experts_implementation to anything else
    every call goes to host_experts, i.e. transformers' kernels on the same Parameters, and with
    this module's LoRA that raises (those kernels would drop the adapter without a word).

    With LoRA, a forward that builds a graph (training mode, grad enabled) raises when any LoRA
    factor has requires_grad=False: something froze the adapters after patching (PEFT's
    get_peft_model freezes every parameter it did not create), and training on would leave the
    experts silently unadapted. mark_lora_trainable(model) undoes that; set
    `require_trainable_lora = False` on the module to freeze them on purpose.
    """

    require_trainable_lora = True
    # Not an experts module of transformers' dispatch: "unimoe"'s set-time check passes over it.
    _unimoe_patched = True
    # The config's experts implementation right after patching, and before it (set by patch_moe).
    _impl_at_patch: Optional[str] = EXPERTS_IMPLEMENTATION
    _impl_before_patch: Optional[str] = None
    _config_marked = False  # whether patch_moe set the config to "unimoe"

    def requested_implementation(self) -> Optional[str]:
        """The experts implementation the host config asks for now (None without a config)."""
        return getattr(getattr(self, "config", None), "_experts_implementation", None)

    def runs_this_package(self) -> bool:
        """False once the config was switched to another experts implementation after patching."""
        impl = self.requested_implementation()
        return impl is None or impl in (EXPERTS_IMPLEMENTATION, self._impl_at_patch)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if not self.runs_this_package():
            return self._host_forward(hidden_states, top_k_index, top_k_weights)
        if self.lora_rank and self.require_trainable_lora and self.training and torch.is_grad_enabled():
            frozen = [n for n in _LORA_NAMES if not getattr(self, n).requires_grad]
            if frozen:
                raise RuntimeError(
                    f"expert LoRA factors {frozen} have requires_grad=False while training: the experts would "
                    "not be adapted. Call unimoe_kernels.integrations.transformers.mark_lora_trainable(model) "
                    "(e.g. after peft.get_peft_model), or set require_trainable_lora = False on this module "
                    "to freeze them on purpose"
                )
        ids, weights = skip_sentinel(top_k_index, top_k_weights, self.num_experts)
        if exporting():
            self.check_input_dtype(hidden_states)
            x, gate_up, down, lora, bias = self._gemm_operands(hidden_states)
            return experts_forward_aten(x, ids, weights, gate_up, down, self.activation, lora=lora,
                                        lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                                        training=self.training, bias=bias)
        return super().forward(hidden_states, ids, weights)

    def _host_forward(self, hidden_states, top_k_index, top_k_weights):
        impl = self.requested_implementation()
        if self.lora_rank:
            raise RuntimeError(
                f'experts_implementation is {impl!r} but these experts were patched by patch_moe with '
                f"lora_rank={self.lora_rank}: transformers' kernels would run without the adapter. Call "
                'set_experts_implementation("unimoe") to keep it, or unpatch_moe(model, merge_lora=True) to fold '
                "it into the weights and use any implementation"
            )
        host = self.host_experts
        # The host is outside the module tree: it follows this module's mode and expert-parallel flag.
        host.training = self.training
        if hasattr(host, "_is_expert_parallel"):
            host._is_expert_parallel = self._is_expert_parallel
        return host(hidden_states, top_k_index, top_k_weights)

    @classmethod
    def from_host(
        cls,
        host: nn.Module,
        *,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        lora_dropout: float = 0.0,
        freeze_base: Optional[bool] = None,
        backend: str = "auto",
        activation: Optional[str] = None,
    ) -> "PatchedExperts":
        reason = unsupported_reason(host, activation)
        if reason is not None:
            raise ValueError(f"host experts module {type(host).__name__} cannot be patched: {reason}")
        gate_up, down = host.gate_up_proj, host.down_proj
        e, f2, h = gate_up.shape
        # Built on the meta device so that no [E, 2F, H] tensor is allocated only to be thrown away:
        # the base weights are the host's Parameters, assigned just below.
        self = cls(
            e, h, f2 // 2, activation=experts_activation(host, activation), lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, freeze_base=False, backend=backend, device="meta", dtype=gate_up.dtype,
            bias=bool(getattr(host, "has_bias", False)),
        )
        self.gate_up_proj = gate_up
        self.down_proj = down
        if self.has_bias:
            self.gate_up_proj_bias, self.down_proj_bias = host.gate_up_proj_bias, host.down_proj_bias
        if lora_rank:
            for name in _LORA_NAMES:
                meta = getattr(self, name)
                setattr(self, name, nn.Parameter(torch.empty(meta.shape, dtype=gate_up.dtype, device=gate_up.device)))
            self.reset_lora_parameters()
        if freeze_base is None:
            freeze_base = lora_rank > 0
        if freeze_base:
            for w in (gate_up, down, *(self.expert_bias() or ())):
                w.requires_grad_(False)
        object.__setattr__(self, "host_experts", host)
        # Attributes host code may read on its experts module (transformers' MoE utilities do); act_fn
        # and _apply_gate (the host's, bound to it) stay outside the module tree and the state dict.
        for attr in ("config", "hidden_dim", "intermediate_dim", "act_fn", "_apply_gate"):
            if hasattr(host, attr):
                object.__setattr__(self, attr, getattr(host, attr))
        for attr, default in _INTERFACE_DEFAULTS.items():
            setattr(self, attr, getattr(host, attr, default))
        return self

    def reset_lora_parameters(self) -> None:
        """PEFT's LoRA init (A like nn.Linear: kaiming uniform a=sqrt(5), B zero); the base untouched.

        GroupedExperts.reset_parameters would re-initialise the base too, which here is the host's
        trained weights.
        """
        if not self.lora_rank:
            return
        with torch.no_grad():
            for a in (self.lora_A_gate_up, self.lora_A_down):
                bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform(a=sqrt(5)) of nn.Linear = 1/sqrt(fan_in)
                a.uniform_(-bound, bound)
            self.lora_B_gate_up.zero_()
            self.lora_B_down.zero_()

    def reset_parameters(self) -> None:
        # Called by GroupedExperts.__init__ on the meta placeholders only; never re-initialise the
        # host's weights afterwards.
        if self.gate_up_proj.device.type != "meta":
            self.reset_lora_parameters()

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj + s B_gu A_gu, down_proj + s B_d A_d) per expert, detached, in the base dtype."""
        gu, d = self.gate_up_proj.detach(), self.down_proj.detach()
        if not self.lora_rank:
            return gu.clone(), d.clone()
        acc = torch.promote_types(gu.dtype, torch.float32)
        s = self.lora_scale
        gu = gu.to(acc) + s * torch.bmm(self.lora_B_gate_up.detach().to(acc), self.lora_A_gate_up.detach().to(acc))
        d = d.to(acc) + s * torch.bmm(self.lora_B_down.detach().to(acc), self.lora_A_down.detach().to(acc))
        return gu.to(self.gate_up_proj.dtype), d.to(self.down_proj.dtype)


def patch_moe(
    model: nn.Module,
    *,
    lora_rank: int = 0,
    lora_alpha: Optional[float] = None,
    lora_dropout: float = 0.0,
    backend: str = "auto",
    freeze_base: Optional[bool] = None,
    strict: bool = False,
    activation: Optional[str] = None,
) -> int:
    """Swap every transformers-v5-style experts module of `model` for PatchedExperts; returns how many.

    The swapped modules hold the host's own gate_up_proj / down_proj Parameters, so state dict names,
    `save_pretrained` and tied optimisers see the same tensors. With lora_rank > 0 each gets
    per-expert LoRA (lora_A_gate_up [E, r, H], lora_B_gate_up [E, 2F, r], lora_A_down [E, r, F],
    lora_B_down [E, H, r]; scale lora_alpha / r, alpha defaulting to r) and the expert base weights
    are frozen (freeze_base=False keeps them trainable). The host's routers, shared experts, attention
    etc. are left as they are (and trainable as they were).

    Each module's gate is recognised from its own `_apply_gate` / act_fn and constants and confirmed
    on a probe (experts_interface.experts_activation): plain SwiGLU / GeGLU (erf or tanh), clamped
    SwiGLU (DeepSeek-V4, MiniMax-M3, ...) and soft-capped SwiGLU (Inkling2) run as the activation
    strings of types.ACTIVATION_KINDS, which GroupedExperts takes as well. `activation` (such a
    string) replaces the recognition: every module's gate must agree with it on the probe, else the
    module is not swapped; use it for a gate whose constants live under names the recognition does
    not read.

    Modules that look like experts but cannot be swapped (a different layout, biases by other names, a
    gate no activation kind computes, weights wrapped by PEFT) are skipped with a warning, or raise when
    strict=True or when LoRA was asked for: LoRA on experts must never end up silently missing.
    Already patched modules are left alone (not counted) when their LoRA rank matches the request.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
    if lora_alpha is not None and lora_rank == 0:
        raise ValueError("lora_alpha was given but lora_rank is 0; pass lora_rank > 0 to add LoRA")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    check_backend(backend)

    swapped, already, skipped = [], [], []
    skipped_configs = []
    for name, parent, attr, module in list(_candidates(model)):
        if isinstance(module, PatchedExperts):
            if lora_rank and module.lora_rank != lora_rank:
                skipped.append((name, f"already patched with lora_rank={module.lora_rank}, asked for {lora_rank}; "
                                      "call unpatch_moe first"))
            else:
                already.append(name)
            continue
        reason = unsupported_reason(module, activation)
        if reason is not None:
            skipped.append((name, reason))
            skipped_configs.append(getattr(module, "config", None))
            continue
        new = PatchedExperts.from_host(
            module, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            freeze_base=freeze_base, backend=backend, activation=activation,
        )
        new.train(module.training)
        setattr(parent, attr, new)
        swapped.append((name, new))

    if skipped:
        detail = "; ".join(f"{n}: {r}" for n, r in skipped)
        if strict or lora_rank:
            raise ValueError(
                f"patch_moe could not swap {len(skipped)} experts module(s)"
                + (" and LoRA on experts was asked for, so they would train nothing" if lora_rank else "")
                + f": {detail}"
            )
        warnings.warn(f"patch_moe left {len(skipped)} experts module(s) unpatched: {detail}", stacklevel=2)
    if lora_rank:
        if not swapped and not already:
            raise ValueError(
                f"patch_moe(lora_rank={lora_rank}) found no MoE experts module in {type(model).__name__} "
                "(expected transformers-v5 experts with gate_up_proj [E, 2F, H] and down_proj [E, H, F]); "
                "no LoRA would be trained"
            )
        _check_lora_trainable(model)
    _mark_configs([m for _, m in swapped], skipped_configs)
    return len(swapped)


def _mark_configs(new: list, skipped_configs: list) -> None:
    """Set the experts implementation of the swapped modules' configs to "unimoe" and record, on each
    module, the value before and after.

    A config that also governs an experts module left unpatched keeps its value: "unimoe" would send
    that module to kernels that cannot run it. Its patched modules then treat that value as theirs.
    """
    registered = register()
    for m in new:  # every "before" first: several modules may share one config
        m._impl_before_patch = getattr(getattr(m, "config", None), "_experts_implementation", None)
    for m in new:
        config = getattr(m, "config", None)
        if (registered and hasattr(config, "_experts_implementation_internal")
                and not any(c is config for c in skipped_configs)):
            config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
            m._config_marked = True
    for m in new:
        config = getattr(m, "config", None)
        m._impl_at_patch = getattr(config, "_experts_implementation", None) or EXPERTS_IMPLEMENTATION


def _check_lora_trainable(model: nn.Module) -> None:
    """Every patched experts module carries LoRA that autograd will update; raise otherwise."""
    for name, module in model.named_modules():
        if isinstance(module, PatchedExperts):
            frozen = [n for n in _LORA_NAMES if not module.lora_rank or not getattr(module, n).requires_grad]
            if frozen:
                raise ValueError(
                    f"{name}: LoRA on experts was asked for but {frozen or 'its adapters'} would not train")


def mark_lora_trainable(model: nn.Module) -> int:
    """Set requires_grad on every expert LoRA factor of the patched experts; returns how many modules.

    For use after anything that freezes parameters it does not know, such as peft.get_peft_model
    (PEFT for attention + this package for experts in one model).
    """
    mods = [m for m in model.modules() if isinstance(m, PatchedExperts) and m.lora_rank]
    for m in mods:
        for n in _LORA_NAMES:
            getattr(m, n).requires_grad_(True)
    return len(mods)


def patched_experts(model: nn.Module) -> dict[str, PatchedExperts]:
    """{qualified name: PatchedExperts} of a patched model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PatchedExperts)}


def unpatch_moe(model: nn.Module, *, merge_lora: bool = False) -> int:
    """Put the host's experts modules back; returns how many.

    merge_lora=True first adds s * B @ A into the host's gate_up_proj / down_proj (in place, in fp32
    then cast back), so the model keeps the adapted function in the host's own format. Without it an
    adapter is dropped (export it first with integrations.peft.export_*). The base weights get back
    the requires_grad they had before patching only if LoRA had not frozen them: frozen stays frozen.
    """
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if not isinstance(child, PatchedExperts):
                continue
            host = child.host_experts
            if merge_lora and child.lora_rank:
                gu, d = child.merged_weights()
                with torch.no_grad():
                    child.gate_up_proj.copy_(gu)
                    child.down_proj.copy_(d)
            host.train(child.training)
            if hasattr(host, "_is_expert_parallel"):
                host._is_expert_parallel = child._is_expert_parallel
            config = getattr(child, "config", None)
            # The implementation the config had before patch_moe, unless it was switched since.
            if child._config_marked and config._experts_implementation == EXPERTS_IMPLEMENTATION:
                config._experts_implementation_internal = child._impl_before_patch
            setattr(parent, attr, host)
            count += 1
    return count


# Importing this module makes experts_implementation="unimoe" available to transformers.
register()

__all__ = ["patch_moe", "unpatch_moe", "patched_experts", "mark_lora_trainable", "PatchedExperts", "unsupported_reason",
           "register", "EXPERTS_IMPLEMENTATION"]
