"""Which implementation runs an op: Triton kernels or the torch path of reference.py.

"auto" picks Triton for CUDA tensors and torch for everything else. The environment variable
UNIMOE_BACKEND (auto|torch|triton) replaces "auto" so a whole program can be switched without code
changes; a backend named explicitly in code wins over it. "triton" on CPU tensors is allowed only
under TRITON_INTERPRET=1, which is how CI runs the kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

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


def use_triton(requested: str, t: torch.Tensor) -> bool:
    """Whether an op on tensor t runs its Triton kernels: resolve() says "triton" and t is not fp64
    (the kernels have no fp64 tensor-core dot; the torch path is exact for gradcheck)."""
    return resolve(requested, t.device) == "triton" and t.dtype != torch.float64


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
