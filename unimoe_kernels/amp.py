"""Mixed precision: what torch.autocast means for this package's layers and ops.

Under torch.autocast(device_type, dtype=D) (D = bf16 or fp16) on the device of the input, with
parameters kept in fp32 (the master weights of a trainer's bf16 mode), SparseMoE runs:

    x [T, H] (any floating dtype), fp32 parameters
      router:  logits = x.to(fp32) @ W_r.to(fp32)^T         autocast off: logits, softmax, top-k and
                                                            the aux losses stay fp32 (router_fp32)
      experts: x.to(D), W_gu.to(D), W_d.to(D), LoRA .to(D)  casts inside the autograd graph
                                                            (autocast_operands), so gradients reach
                                                            the fp32 parameters in fp32; the GEMMs
                                                            accumulate in fp32 (tensor cores, oneDNN)
      combine: fp32 routing weights, fp32 sums, result in D (as torch.nn.Linear returns D under autocast)

Outside autocast nothing is cast: an input whose dtype differs from the layer's is an error, and
check_layer_dtype says so in the caller's terms (the input's dtype, the layer's, and the call that
fixes it). fp64 tensors are never cast, as torch.autocast leaves them alone.

The ops' public entry points take the same casts with one line at their top, e.g. in grouped_mlp:

    x_sorted, gate_up_proj, down_proj, lora = autocast_operands(x_sorted, gate_up_proj, down_proj, lora)

(x in place of x_sorted in grouped_mlp_gather and grouped_mlp_combine; their routing weights and
rank gates stay fp32 and are not passed).

A tensor already in the autocast dtype is returned as is (no copy, no graph node), so a module that
cast its operands first and an op that casts again cost one cast, not two.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

# Dtypes autocast casts to the low-precision dtype; fp64 stays, as in torch's own autocast policy.
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts GEMM inputs to on `device`, or None when autocast is off there."""
    device_type = torch.device(device).type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta): never autocast
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t, dtype: torch.dtype):
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.to(dtype) if t.dtype in _CASTABLE and t.dtype != dtype else t
    if isinstance(t, tuple):
        cast = [_cast(v, dtype) for v in t]
        # NamedTuples (types.LoRAWeights) are rebuilt as their own type.
        return type(t)(*cast) if hasattr(t, "_fields") else tuple(cast)
    return t


def autocast_operands(*operands):
    """The operands of an expert GEMM cast to the autocast dtype when autocast is on for the device of
    the first tensor, else returned unchanged; always a tuple of len(operands).

    An operand may be a tensor, None, or a (named) tuple of them such as types.LoRAWeights.
    Floating tensors of fp32, fp16 and bf16 are cast with `.to()`, inside the autograd graph, so the
    gradient of an fp32 parameter comes back to it in fp32; integer and fp64 tensors are left alone.
    """
    first = next((t for t in _tensors(operands)), None)
    dtype = autocast_dtype(first.device) if first is not None else None
    if dtype is None:
        return operands
    return tuple(_cast(t, dtype) for t in operands)


def _tensors(operands):
    for t in operands:
        if isinstance(t, torch.Tensor):
            yield t
        elif isinstance(t, tuple):
            yield from _tensors(t)


def router_fp32(device: torch.device):
    """Context in which autocast is off on `device` (a no-op when it is off already): router logits,
    their softmax and the losses made from them stay in fp32, where a bf16 logit would blur the
    top-k order and the balancing loss."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, enabled=False)


def check_layer_dtype(x: torch.Tensor, params, layer: str, var: str) -> None:
    """Outside autocast, raise a TypeError unless every tensor of `params` has x's dtype.

    layer: the class name for the message; var: how the fix names the layer ("moe", "experts").
    Under autocast the operands are cast (autocast_operands), so any mix of dtypes is fine there.
    """
    if autocast_dtype(x.device) is not None:
        return
    dtypes = sorted({p.dtype for p in params if p is not None}, key=str)
    if dtypes == [x.dtype]:
        return
    have = str(dtypes[0]) if len(dtypes) == 1 else "a mix of " + ", ".join(map(str, dtypes))
    if x.dtype not in _CASTABLE:  # fp64 input: autocast would not cast it, so only a conversion helps
        fixes = [f"convert the input with `x.to({dtypes[0]})` or the layer with `{var}.to({x.dtype})`"]
    else:
        fixes = [f"convert the layer with `{var}.to({x.dtype})`"]
        low = next((d for d in (x.dtype, *dtypes) if d in (torch.bfloat16, torch.float16)), None)
        if low is not None:  # autocast casts both sides to a low-precision dtype, so it fixes the mix
            kept = f"{dtypes[0]} " if len(dtypes) == 1 else ""
            fixes.append(f"keep the {kept}parameters and run it under "
                         f"`torch.autocast({x.device.type!r}, dtype={low})` (mixed precision)")
    raise TypeError(f"{layer} got an input of dtype {x.dtype} but its parameters are {have}: " + ", or ".join(fixes))


__all__ = ["autocast_dtype", "autocast_operands", "router_fp32", "check_layer_dtype"]
