"""Test scaffolding shared by tests/ and benchmarks/ (this root conftest applies to both).

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before triton
is first imported, which is why it happens here, at collection, before any test module loads.
GPU-only tests carry @pytest.mark.gpu and skip cleanly without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when present, else the CPU (Triton in the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
