"""Loader of the optional compiled extension unimoe_kernels._C.

_C is built by setup.py (CMake + pybind11) when a compiler is available; without it every op
falls back to its torch / Triton path. The import is attempted once, here; a failure gives one
warning naming the reason. Nothing here touches the GPU: has_c_cuda() reports how _C was compiled,
not whether a GPU is present.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional


def _load() -> Optional[ModuleType]:
    try:
        # import_module rather than `from . import _C`: while the package is still initialising
        # the latter reports a missing _C as a "circular import", which misleads.
        _C = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        warnings.warn(
            f"unimoe_kernels._C could not be imported ({exc}); the routing plan runs as Triton "
            "kernels on CUDA tensors and in torch on CPU tensors instead (build it with `pip "
            "install -e .`, which needs cmake and a C++ compiler).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _C


C: Optional[ModuleType] = _load()


def has_c() -> bool:
    """Whether the compiled extension imported."""
    return C is not None


def has_c_cuda() -> bool:
    """Whether the compiled extension carries its CUDA kernels (compile-time fact, no GPU query)."""
    return C is not None and bool(C.has_cuda())


__all__ = ["C", "has_c", "has_c_cuda"]
