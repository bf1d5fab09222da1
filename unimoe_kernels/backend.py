"""Which implementation runs an op: Triton kernels or the torch path of reference.py.

"auto" picks Triton for CUDA tensors and torch for everything else. The environment variable
UNIMOE_BACKEND (auto|torch|triton) replaces "auto" so a whole program can be switched without code
changes; a backend named explicitly in code wins over it. "triton" on CPU tensors is allowed only
under TRITON_INTERPRET=1, which is how CI runs the kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "UNIMOE_BACKEND"


def check_backend(name: str, argument: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once without importing triton; a constant (not an lru_cache) so torch.compile traces it.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether triton can be imported."""
    return _TRITON_FOUND


def resolve(requested: str, device: torch.device) -> str:
    """The backend ("torch" or "triton") that runs an op on tensors of `device`."""
    check_backend(requested)
    if requested == "auto":
        requested = check_backend(os.environ.get(ENV_VAR, "auto"), ENV_VAR)
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got device {device}), or TRITON_INTERPRET=1 "
                "set before triton is imported to run the kernels on CPU"
            )
    return requested


def use_triton(requested: str, t: torch.Tensor, *, kernel_dtype: Optional[torch.dtype] = None) -> bool:
    """Whether an op on tensor t runs its Triton kernels: resolve() says "triton" and t is not fp64
    (the kernels have no fp64 tensor-core dot; the torch path is exact for gradcheck).

    kernel_dtype: the dtype the kernels will read, when the op converts t first (default t's).
    bf16 kernels on CPU tensors in Triton's interpreter are a ValueError: the interpreter has no
    bf16 (its dots return values like 9e9 where the truth is 0.3, and its casts truncate).
    """
    if resolve(requested, t.device) != "triton" or t.dtype == torch.float64:
        return False
    if (kernel_dtype or t.dtype) == torch.bfloat16 and t.device.type == "cpu":
        raise ValueError(
            "bf16 tensors cannot take the Triton path on CPU: Triton's interpreter (TRITON_INTERPRET=1) has no "
            "bf16 and would return wrong numbers; use backend='torch' (the default on CPU), fp16 or fp32, or a GPU"
        )
    return True


def values_readable(t: torch.Tensor) -> bool:
    """Whether t's values can be read on the host for free: a real CPU tensor outside torch.compile
    and torch.export tracing. Elsewhere a read is a host sync (CUDA) or a data-dependent trace."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def require(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the bool scalar tensor ok is True.

    Read at once where that is free (values_readable); otherwise torch._assert_async, which on CUDA
    is a device-side assert reported at the next sync (no host sync) and under tracing stays in the
    graph (a RuntimeError on CPU when it runs).
    """
    if values_readable(ok):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)
