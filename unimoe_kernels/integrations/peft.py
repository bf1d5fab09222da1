"""LoRA adapters on MoE experts in and out of PEFT's formats, for models patched by patch_moe.

Two layouts on disk / in a state dict (keys as PEFT saves them: "base_model.model." + module path,
no adapter name; an adapter name segment such as ".default." is accepted on input):

target_parameters  PEFT's ParamWrapper on the 3-D v5 expert tensors (LoraConfig(target_parameters=
                   ["...experts.gate_up_proj", "...experts.down_proj"])). Per experts module N:
                     N.base_layer.lora_A.weight [r*E, H]   N.base_layer.lora_B.weight [2F, r*E]  (gate_up_proj,
                     N.lora_A.weight            [r*E, F]   N.lora_B.weight            [H, r*E]   down_proj)
                   (the wrapper of the first target parameter is the inner one, "base_layer"; which is
                   which is also told apart by shape). Expert e's factors: A_e = lora_A[e*r:(e+1)*r]
                   (expert-major rows) and B_e = lora_B[:, e::E] (rank-major columns), delta_e = s B_e A_e.
per_expert         one nn.Linear LoRA per expert and projection, as Uni-MoE's code trains it:
                     N.{e}.gate_proj.lora_A.weight [r, H]  .lora_B.weight [F, r]   (also up_proj)
                     N.{e}.down_proj.lora_A.weight [r, F]  .lora_B.weight [H, r]
                   (Mixtral-v4 names w1 / w3 / w2 with names=("w1", "w3", "w2")).

In this package (GroupedExperts): lora_A_gate_up [E, R, H], lora_B_gate_up [E, 2F, R], lora_A_down
[E, R, F], lora_B_down [E, H, R], one scale s = alpha / R. target_parameters maps one to one (R = r).
per_expert's separate gate and up adapters share no A, so they are imported exactly at R = 2r:
A_gate_up = [A_gate; A_up], B_gate_up = blockdiag(B_gate, B_up), and down's factors padded with zero
rank rows / columns (which stay zero in training: their gradients are zero). Export finds that block
form again and writes rank r back, so import -> export returns the same tensors; any other R exports
as rank R with A shared by gate and up (the same delta weights).

    load_peft_adapter(model, adapter_dir or state_dict, config=...)   -> patch (if needed) and fill LoRA
    export_peft_adapter(model, save_directory=None, layout=...)       -> (state_dict, adapter config)
A live PeftModel: load_peft_adapter(model, get_peft_model_state_dict(pm), config=pm.peft_config[name]).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Mapping, Optional, Union

import torch

from .transformers import PatchedExperts, patch_moe, patched_experts

LAYOUTS = ("target_parameters", "per_expert")
_PEFT_PREFIX = "base_model.model."
# "<module>.lora_A.weight" or "<module>.lora_A.<adapter name>.weight" (PEFT's in-memory state dict).
_KEY = re.compile(r"^(?P<module>.*)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG_NAME = "adapter_config.json"


# ------------------------------------------------------------------------------------------------
# Pure tensor conversions (also what a serving engine needs)
# ------------------------------------------------------------------------------------------------


def param_wrapper_to_grouped(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ParamWrapper factors -> per-expert (A [E, r, in], B [E, out, r]).

    lora_a: [r*E, in], rows expert-major (expert e owns rows e*r .. e*r+r-1).
    lora_b: [out, r*E], columns rank-major (column j*E + e is rank j of expert e).
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] % num_experts:
        raise ValueError(f"lora_A [r*E, in] and lora_B [out, r*E] with E={num_experts} expected, got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    r = lora_a.shape[0] // num_experts
    a = lora_a.reshape(num_experts, r, lora_a.shape[1])
    b = lora_b.reshape(lora_b.shape[0], r, num_experts).permute(2, 0, 1)
    return a.contiguous(), b.contiguous()


def grouped_to_param_wrapper(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert (A [E, r, in], B [E, out, r]) -> PEFT ParamWrapper (lora_A [r*E, in], lora_B [out, r*E])."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(f"A [E, r, in] and B [E, out, r] expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    e, r, d_in = a.shape
    return a.reshape(e * r, d_in).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], r * e).contiguous()


# ------------------------------------------------------------------------------------------------
# Adapter config
# ------------------------------------------------------------------------------------------------


def _config_dict(config) -> dict:
    if config is None:
        raise ValueError("config is required with a state dict: a peft LoraConfig or its dict (r, lora_alpha, ...)")
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a peft LoraConfig or a dict, got {type(config).__name__}")
    config = dict(config)
    peft_type = str(config.get("peft_type", "LORA")).upper().replace("PEFTTYPE.", "")
    if peft_type != "LORA":
        raise ValueError(f"config: only LoRA adapters can be imported, got peft_type={peft_type}")
    for key, plain in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if config.get(key, plain) != plain:
            raise ValueError(f"config: {key}={config[key]!r} is not supported for expert LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("config: rank_pattern / alpha_pattern are not supported (one rank and alpha for all experts)")
    if "r" not in config:
        raise ValueError("config needs the LoRA rank 'r'")
    return config


def _scale(config: dict) -> float:
    r, alpha = int(config["r"]), float(config.get("lora_alpha", 8))  # PEFT's default lora_alpha is 8
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def _read_adapter(path: str) -> tuple[dict, dict]:
    with open(os.path.join(path, _CONFIG_NAME)) as f:
        config = json.load(f)
    for name in _WEIGHTS_NAMES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file), config
            return torch.load(file, map_location="cpu", weights_only=True), config
    raise FileNotFoundError(f"adapter: none of {_WEIGHTS_NAMES} in {path}")


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------


def _group_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path without the PEFT prefix: {"A": tensor, "B": tensor}} for every LoRA key."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            continue
        module = m["module"]
        if module.startswith(_PEFT_PREFIX):
            module = module[len(_PEFT_PREFIX):]
        groups.setdefault(module, {})[m["ab"]] = value
    return groups


def _target_parameters_factors(name: str, ex: PatchedExperts, groups: dict) -> Optional[dict]:
    """Our four [E, ...] factors of experts module `name` from ParamWrapper keys, or None if absent."""
    found = {k: v for k, v in ((f"{name}.base_layer", groups.get(f"{name}.base_layer")), (name, groups.get(name))) if v}
    if not found:
        return None
    e, f2, h = ex.gate_up_proj.shape
    out = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = param_wrapper_to_grouped(ab["A"], ab["B"], e)
        if (a.shape[2], b.shape[1]) == (h, f2):
            target = "gate_up"
        elif (a.shape[2], b.shape[1]) == (f2 // 2, h):
            target = "down"
        else:
            raise ValueError(f"adapter: {module}.lora_A {tuple(ab['A'].shape)} / lora_B {tuple(ab['B'].shape)} "
                             "fit neither "
                             f"gate_up_proj [E={e}, {f2}, {h}] nor down_proj [E, {h}, {f2 // 2}]")
        if target in out:
            raise ValueError(f"adapter: two ParamWrappers of {name} both adapt {target}")
        out[target] = (a, b)
    return out


def _per_expert_factors(name: str, ex: PatchedExperts, groups: dict, names: tuple[str, str, str]) -> Optional[dict]:
    e, f2, h = ex.gate_up_proj.shape
    f = f2 // 2
    found = {p: [groups.get(f"{name}.{i}.{p}") for i in range(e)] for p in names}
    if not any(v for lst in found.values() for v in lst):
        return None
    ranks = set()
    for p, lst in found.items():
        for i, ab in enumerate(lst):
            if ab is None or set(ab) != {"A", "B"}:
                raise ValueError(f"adapter: {name}.{i}.{p} needs lora_A and lora_B for every expert and projection "
                                 f"({names}); a missing one would leave that expert unadapted")
            ranks.add(ab["A"].shape[0])
    if len(ranks) != 1:
        raise ValueError(f"adapter: {name} mixes LoRA ranks {sorted(ranks)}")
    r = ranks.pop()
    expect = {names[0]: ((r, h), (f, r)), names[1]: ((r, h), (f, r)), names[2]: ((r, f), (h, r))}
    for p, lst in found.items():
        for i, ab in enumerate(lst):
            if (tuple(ab["A"].shape), tuple(ab["B"].shape)) != expect[p]:
                raise ValueError(f"adapter: {name}.{i}.{p} lora_A {tuple(ab['A'].shape)} / "
                                 f"lora_B {tuple(ab['B'].shape)}, "
                                 f"expected {expect[p][0]} / {expect[p][1]}")
    g, u, d = (found[p] for p in names)
    a_gu = torch.stack([torch.cat([g[i]["A"], u[i]["A"]]) for i in range(e)])  # [E, 2r, H]
    b_gu = torch.zeros(e, f2, 2 * r, dtype=g[0]["B"].dtype)
    a_d = torch.zeros(e, 2 * r, f, dtype=d[0]["A"].dtype)
    b_d = torch.zeros(e, h, 2 * r, dtype=d[0]["B"].dtype)
    for i in range(e):
        b_gu[i, :f, :r], b_gu[i, f:, r:] = g[i]["B"], u[i]["B"]
        a_d[i, :r], b_d[i, :, :r] = d[i]["A"], d[i]["B"]
    return {"gate_up": (a_gu, b_gu), "down": (a_d, b_d), "rank": 2 * r}


def load_peft_adapter(
    model: torch.nn.Module,
    adapter: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    config=None,
    layout: Optional[str] = None,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    rename: Optional[Callable[[str], str]] = None,
    strict: bool = True,
    backend: str = "auto",
) -> int:
    """Load a PEFT LoRA adapter of MoE experts into the model's patched experts; returns how many modules.

    adapter: a directory PEFT saved (adapter_config.json + adapter_model.safetensors) or a state dict
    (then `config`, a LoraConfig or its dict, gives r / lora_alpha / use_rslora). layout: None detects
    it from the keys. names: the per-expert projection names (gate, up, down). rename(name) maps this
    model's experts module path (e.g. "model.layers.0.mlp.experts") to the adapter's, for adapters of
    a model whose modules are named differently.

    An unpatched model is patched first (patch_moe with the adapter's rank and alpha). Every patched
    experts module must receive an adapter, and with strict=True every LoRA key of the adapter must
    be used (non-expert LoRA, e.g. on attention, cannot live in these modules: load those with PEFT).
    When the model's LoRA scale differs from the adapter's, B is rescaled so the delta is the same.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    if isinstance(adapter, (str, os.PathLike)):
        state_dict, file_config = _read_adapter(os.fspath(adapter))
        config = file_config if config is None else config
    elif isinstance(adapter, Mapping):
        state_dict = adapter
    else:
        raise TypeError(f"adapter must be a directory path or a state dict, got {type(adapter).__name__}")
    config = _config_dict(config)
    src_scale, src_rank = _scale(config), int(config["r"])
    groups = _group_keys(state_dict)
    if not groups:
        raise ValueError("adapter holds no LoRA keys (*.lora_A.weight / *.lora_B.weight)")
    rename = rename or (lambda n: n)

    targets = patched_experts(model)
    if not targets:
        rank = _needed_rank(groups, layout, names, src_rank)
        patch_moe(model, lora_rank=rank, lora_alpha=src_scale * rank, backend=backend)
        targets = patched_experts(model)

    used, loaded = set(), 0
    for name, ex in targets.items():
        src = rename(name)
        factors = None
        if layout in (None, "target_parameters"):
            factors = _target_parameters_factors(src, ex, groups)
            if factors is not None:
                used |= {f"{src}.base_layer", src}
        if factors is None and layout in (None, "per_expert"):
            factors = _per_expert_factors(src, ex, groups, names)
            if factors is not None:
                used |= {f"{src}.{i}.{p}" for i in range(ex.num_experts) for p in names}
        if factors is None:
            raise ValueError(f"adapter has no LoRA for experts module {name!r} (looked for {src!r}); "
                             "it would stay unadapted")
        if set(factors) - {"rank"} != {"gate_up", "down"}:
            raise ValueError(f"adapter: {src} adapts only {sorted(set(factors) - {'rank'})}; GroupedExperts LoRA "
                             "needs gate_up_proj and down_proj")
        _assign(name, ex, factors, src_scale)
        loaded += 1
    unused = sorted(set(groups) - used)
    if unused and strict:
        raise ValueError(f"adapter has LoRA for modules that are not patched experts ({len(unused)}, e.g. "
                         f"{unused[:3]}); load those with PEFT, or pass strict=False to ignore them")
    return loaded


def _needed_rank(groups: dict, layout: Optional[str], names: tuple[str, str, str], src_rank: int) -> int:
    """The GroupedExperts rank an unpatched model needs for this adapter: r, or 2r for per_expert."""
    pattern = re.compile(rf"\.\d+\.({'|'.join(map(re.escape, names))})$")
    per_expert = layout == "per_expert" or (layout is None and any(pattern.search(k) for k in groups))
    return 2 * src_rank if per_expert else src_rank


def _assign(name: str, ex: PatchedExperts, factors: dict, src_scale: float) -> None:
    (a_gu, b_gu), (a_d, b_d) = factors["gate_up"], factors["down"]
    if a_gu.shape[1] != ex.lora_rank or a_d.shape[1] != ex.lora_rank:
        raise ValueError(f"{name}: the adapter needs LoRA rank {a_gu.shape[1]} here but the module was patched with "
                         f"lora_rank={ex.lora_rank}; unpatch_moe and patch again (or let load_peft_adapter patch)")
    # Same delta with a different scale: s_src B A = s_ours (B s_src / s_ours) A.
    ratio = src_scale / ex.lora_scale
    with torch.no_grad():
        for param, value in ((ex.lora_A_gate_up, a_gu), (ex.lora_A_down, a_d),
                             (ex.lora_B_gate_up, b_gu * ratio if ratio != 1.0 else b_gu),
                             (ex.lora_B_down, b_d * ratio if ratio != 1.0 else b_d)):
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name}: adapter factor {tuple(value.shape)} does not fit {tuple(param.shape)}")
            param.copy_(value)


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def _compact_rank(ex: PatchedExperts) -> Optional[int]:
    """r when the module's LoRA is the exact block form a per_expert import builds at R = 2r, else None."""
    big_r, f = ex.lora_rank, ex.ffn_hidden_size
    if big_r % 2:
        return None
    r = big_r // 2
    b_gu, a_d, b_d = ex.lora_B_gate_up, ex.lora_A_down, ex.lora_B_down
    zero = lambda t: not bool(t.detach().any())  # noqa: E731 (offline export: a host sync is fine here)
    if zero(b_gu[:, :f, r:]) and zero(b_gu[:, f:, :r]) and zero(a_d[:, r:]) and zero(b_d[:, :, r:]):
        return r
    return None


def export_peft_adapter(
    model: torch.nn.Module,
    save_directory: Optional[Union[str, os.PathLike]] = None,
    *,
    layout: str = "target_parameters",
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    rename: Optional[Callable[[str], str]] = None,
    base_model_name_or_path: Optional[str] = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's expert LoRA as a PEFT adapter: (state dict with PEFT's keys, adapter config dict).

    With save_directory, also writes adapter_config.json and adapter_model.safetensors there, which
    `PeftModel.from_pretrained(unpatched_base_model, save_directory)` loads for the target_parameters
    layout. LoRA dropout is not exported (PEFT's ParamWrapper has none); the scale is kept exactly by
    writing lora_alpha = scale * r.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    targets = {n: m for n, m in patched_experts(model).items() if m.lora_rank}
    if not targets:
        raise ValueError("model has no patched experts with LoRA (patch_moe(model, lora_rank=r) first)")
    rename = rename or (lambda n: n)
    ranks, scales = set(), set()
    state: dict[str, torch.Tensor] = {}
    target_parameters = []
    for name, ex in targets.items():
        src = _PEFT_PREFIX + rename(name)
        a_gu, b_gu = ex.lora_A_gate_up.detach(), ex.lora_B_gate_up.detach()
        a_d, b_d = ex.lora_A_down.detach(), ex.lora_B_down.detach()
        f = ex.ffn_hidden_size
        if layout == "target_parameters":
            # gate_up_proj listed first, so PEFT makes its wrapper the inner one ("base_layer").
            for mod, (a, b) in ((f"{src}.base_layer", (a_gu, b_gu)), (src, (a_d, b_d))):
                state[f"{mod}.lora_A.weight"], state[f"{mod}.lora_B.weight"] = grouped_to_param_wrapper(a, b)
            target_parameters += [f"{rename(name)}.gate_up_proj", f"{rename(name)}.down_proj"]
            rank = ex.lora_rank
        else:
            r = _compact_rank(ex)
            if r is not None:
                parts = {names[0]: (a_gu[:, :r], b_gu[:, :f, :r]), names[1]: (a_gu[:, r:], b_gu[:, f:, r:]),
                         names[2]: (a_d[:, :r], b_d[:, :, :r])}
            else:
                r = ex.lora_rank  # gate and up share A: each exports it with its half of B's rows
                parts = {names[0]: (a_gu, b_gu[:, :f]), names[1]: (a_gu, b_gu[:, f:]), names[2]: (a_d, b_d)}
            for p, (a, b) in parts.items():
                for i in range(ex.num_experts):
                    state[f"{src}.{i}.{p}.lora_A.weight"] = a[i].contiguous().clone()
                    state[f"{src}.{i}.{p}.lora_B.weight"] = b[i].contiguous().clone()
            rank = r
        ranks.add(rank)
        scales.add(ex.lora_scale)
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"experts modules differ in LoRA rank {sorted(ranks)} or scale {sorted(scales)}; one adapter "
                         "config cannot describe them")
    rank, scale = ranks.pop(), scales.pop()
    alpha = scale * rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": 0.0,
        "use_rslora": False, "bias": "none", "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }
    if layout == "target_parameters":
        config.update(target_modules=[], target_parameters=target_parameters)
    else:
        config.update(target_modules=sorted(set(names)))
    if save_directory is not None:
        _save(save_directory, state, config)
    return state, config


def _save(directory, state: dict, config: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    try:  # Through peft's own class when it is installed, so every field it expects is present.
        from peft import LoraConfig

        LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}).save_pretrained(os.fspath(directory))
    except ImportError:
        with open(os.path.join(directory, _CONFIG_NAME), "w") as fh:
            json.dump(config, fh, indent=2)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, _WEIGHTS_NAMES[0]),
              metadata={"format": "pt"})


__all__ = [
    "load_peft_adapter", "export_peft_adapter", "param_wrapper_to_grouped", "grouped_to_param_wrapper", "LAYOUTS",
]
