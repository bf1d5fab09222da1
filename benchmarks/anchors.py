"""Other projects' fused MoE kernels ("anchors") as providers of the layer benchmark.

An adapter takes what every provider of benchmarks/test_layer.py takes, a SparseMoE in eval mode
and x [..., H], and computes the same layer by calling the other project's public functions on
the module's own parameters, as they are (transformers v5 layout, gate rows first, then up):

    x2 [T, H] --baselines.route--> weights [T, k] fp32, ids [T, k]     the router all providers share
    liger_kernel  LigerFusedMoEFunction.apply(x2, gate_up_proj [E, 2F, H], down_proj [E, H, F],
                  ids int32, weights) -> [T, H]
                  one autograd Function: routing metadata, gather + gate_up GEMM + SwiGLU, down
                  GEMM, weighted combine; its backward returns dx, both dW and d(weights)
    moe_ops       permute(x2, ids int32, E) -> rows [T*k, H], row map, offsets [E+1]
                  grouped_gemm(rows, gate_up_proj) -> activation (torch) -> grouped_gemm(., down_proj)
                  unpermute(y, row map, weights, T, k) -> [T, H]
                  each op its own autograd Function (moe-ops has no activation kernel, and its
                  fused top-k softmax is left out so that every provider routes the same way)

Neither project has LoRA adapters, so LoRA configs skip them with that reason (running only the
frozen base would time less work than the other providers do). Other limits are said the same way
by unsupported(). Without a GPU the layer benchmark skips them too: their kernels do run in
Triton's interpreter, but at seconds per call, so test_anchors.py checks them there on one tiny
shape instead.

Autotuning: both projects autotune on their first call at a shape, over up to 32 configs per
kernel (Liger) or 7-16 per GEMM (moe-ops), minutes of compilation per shape in all, which a short
GPU slot cannot hold. By default their GEMMs run one config each: Liger by its own switch
LIGER_FUSED_MOE_AUTOTUNE=0 (set here before liger_kernel is imported, unless already set; it pins
every Liger kernel to a config its authors chose), moe-ops, which has no switch, by keeping the
first config its authors list for each GEMM kernel. UNIMOE_ANCHOR_AUTOTUNE=1 lets both autotune
on a GPU. Without a GPU every kernel is pinned: Triton's autotuner times configs on the device,
which the interpreter does not have. describe() records which was used, with the package version,
in every result.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Callable, Optional, Union

import torch

from unimoe_kernels import baselines, reference

AUTOTUNE_ENV = "UNIMOE_ANCHOR_AUTOTUNE"
# Every anchor the layer benchmark lists; the ones without an adapter are skipped with the reason.
NAMES = ("scattermoe", "megablocks", "liger_kernel", "moe_ops")
DISTRIBUTIONS = {"liger_kernel": "liger-kernel", "moe_ops": "moe-ops"}  # PyPI names of the adapted ones


def autotune_requested() -> bool:
    """Whether the anchors may autotune: asked for and a GPU present (see the module docstring)."""
    asked = os.environ.get(AUTOTUNE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return asked and torch.cuda.is_available()


def _routed(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., H] -> (x2 [T, H], weights [T, k] fp32, ids [T, k] int32): what both anchors take."""
    if x.shape[-1] != moe.hidden_size:
        raise ValueError(f"x must have shape [..., hidden_size={moe.hidden_size}], got {tuple(x.shape)}")
    x2 = x.reshape(-1, moe.hidden_size)
    weights, ids = baselines.route(moe, x2)
    return x2, weights, ids.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Liger-Kernel
# ----------------------------------------------------------------------------------------------


def _load_liger():
    # Liger reads its switch once, when liger_kernel.ops.fused_moe_kernels is first imported.
    os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "1" if autotune_requested() else "0")
    if not torch.cuda.is_available():
        os.environ["LIGER_FUSED_MOE_AUTOTUNE"] = "0"  # the interpreter cannot time configs
    return importlib.import_module("liger_kernel.ops.fused_moe")


def _liger_unsupported(moe) -> Optional[str]:
    if moe.experts.activation != "swiglu":
        return f"liger_kernel's fused MoE computes SwiGLU only, this config uses {moe.experts.activation}"
    return None


def _liger_forward(mod, moe, x2, weights, ids) -> torch.Tensor:
    return mod.LigerFusedMoEFunction.apply(x2, moe.experts.gate_up_proj, moe.experts.down_proj, ids, weights)


# ----------------------------------------------------------------------------------------------
# moe-ops
# ----------------------------------------------------------------------------------------------

_MOE_OPS_PINNED: Optional[list] = None  # None until moe_ops is loaded, then its kernels pinned to one config


def _load_moe_ops():
    global _MOE_OPS_PINNED
    mod = importlib.import_module("moe_ops")
    if _MOE_OPS_PINNED is None:
        _MOE_OPS_PINNED = _pin_moe_ops()
    return mod


def _pin_moe_ops() -> list:
    from triton.runtime.autotuner import Autotuner

    gpu = torch.cuda.is_available()
    pinned = []
    for name, module in list(sys.modules.items()):
        if name != "moe_ops" and not name.startswith("moe_ops."):
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, Autotuner) or len(obj.configs) < 2:
                continue
            # On a GPU only the GEMMs (configs tiling K) are pinned: their 7-16 configs of large
            # tiles are most of the compile time, while the row-copy kernels' 5-6 small configs
            # compile in seconds and autotune as moe-ops does by default.
            if gpu and (autotune_requested() or "BLOCK_SIZE_K" not in obj.configs[0].kwargs):
                continue
            obj.configs = obj.configs[:1]
            pinned.append(obj.base_fn.__name__)
    return sorted(pinned)


# moe-ops builds its expert offsets with tl.histogram(ids, E) over a block of 2048 ids, and
# Triton block sizes are powers of two: E must be one, at most 2048.
_MOE_OPS_MAX_E = 2048


def _moe_ops_unsupported(moe) -> Optional[str]:
    e = moe.num_experts
    if e & (e - 1) or e > _MOE_OPS_MAX_E:
        return f"moe_ops's routing histogram needs a power-of-two expert count <= {_MOE_OPS_MAX_E}, got E={e}"
    return None


def _moe_ops_forward(mod, moe, x2, weights, ids) -> torch.Tensor:
    ex = moe.experts
    rows, row_map, offsets = mod.permute(x2, ids, E=moe.num_experts)  # offsets [E+1], from 0
    h = mod.grouped_gemm(rows, ex.gate_up_proj, offsets, trans_b=True)  # trans_b: weights are [E, out, in]
    y = mod.grouped_gemm(reference.apply_activation(h, ex.activation), ex.down_proj, offsets, trans_b=True)
    return mod.unpermute(y, row_map, weights, x2.shape[0], moe.top_k)


# ----------------------------------------------------------------------------------------------
# The providers
# ----------------------------------------------------------------------------------------------

_ADAPTERS = {
    # name: (load() -> module, unsupported(moe) -> reason or None, forward(module, moe, *_routed(x)) -> y [T, H])
    "liger_kernel": (_load_liger, _liger_unsupported, _liger_forward),
    "moe_ops": (_load_moe_ops, _moe_ops_unsupported, _moe_ops_forward),
}


def unsupported(name: str, moe) -> Optional[str]:
    """Why anchor `name` cannot compute this SparseMoE's layer, or None when it can."""
    if name not in _ADAPTERS:
        return f"{name}: no adapter is written"
    if moe.experts.lora_rank:
        return f"{name} has no LoRA adapters (the frozen base alone would be less work than the layer)"
    return _ADAPTERS[name][1](moe)


def adapter(name: str, moe) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> y running anchor `name` on moe's parameters, on any device (CPU: Triton's interpreter).

    Raises ImportError when the package does not import, ValueError when it cannot compute this
    layer (the reason of unsupported()).
    """
    why = unsupported(name, moe)
    if why:
        raise ValueError(why)
    load, _, forward = _ADAPTERS[name]
    mod = load()
    return lambda x: forward(mod, moe, *_routed(moe, x)).view(x.shape)


def provider(name: str, moe) -> Union[Callable[[torch.Tensor], torch.Tensor], str]:
    """The layer benchmark's provider: adapter(), or a string saying why the anchor is not timed here."""
    if name not in NAMES:
        raise ValueError(f"anchor must be one of {NAMES}, got {name!r}")
    if importlib.util.find_spec(name) is None:
        return f"{name} is not importable here"
    if name not in _ADAPTERS:
        return f"{name} imports, but no adapter is written (its API has not been run against this harness)"
    why = unsupported(name, moe)
    if why:
        return why
    if not torch.cuda.is_available():
        # Measured on a 2-core CPU: 5-20 s per call at the tiny shapes, in the interpreter.
        return f"{name} runs in the Triton interpreter without a GPU (seconds per call): test_anchors.py checks it"
    try:
        return adapter(name, moe)
    except Exception as err:  # an install that imports partly: say why, the other providers go on
        return f"{name} failed to import: {type(err).__name__}: {err}"


def describe(name: str) -> dict:
    """Version and config choice of an adapted anchor, for the result records (empty otherwise)."""
    dist = DISTRIBUTIONS.get(name)
    if dist is None:
        return {}
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    configs = None
    if name == "liger_kernel" and "liger_kernel.ops.fused_moe_kernels" in sys.modules:
        pinned = getattr(sys.modules["liger_kernel.ops.fused_moe_kernels"], "_AUTOTUNE_DISABLED", False)
        configs = "one pinned config per kernel (LIGER_FUSED_MOE_AUTOTUNE=0)" if pinned else "autotuned"
    elif name == "moe_ops" and _MOE_OPS_PINNED is not None:
        others = "; the others autotuned" if torch.cuda.is_available() else ""
        configs = f"first listed config of {', '.join(_MOE_OPS_PINNED)}{others}" if _MOE_OPS_PINNED else "autotuned"
    return {"anchor_version": version, "anchor_configs": configs}


__all__ = ["AUTOTUNE_ENV", "NAMES", "autotune_requested", "unsupported", "adapter", "provider", "describe"]
