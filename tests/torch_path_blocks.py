"""Which inner path the torch path's grouped MLP (torch_grouped_mlp.py) runs, forced for a test:
_OneExpert blocks (a torch.mm per expert block) or _AllExperts (one torch._grouped_mm per GEMM,
fp32 only)."""

from __future__ import annotations

import contextlib

from unimoe_kernels import torch_grouped_mlp as tgm


@contextlib.contextmanager
def forced_blocks(monkeypatch, grouped: bool):
    """Inside, the torch path runs _AllExperts when `grouped`, else _OneExpert blocks; on leaving,
    asserts that the chosen path is the one that ran."""
    calls = []
    real = tgm._AllExperts.__init__
    monkeypatch.setattr(tgm._AllExperts, "__init__", lambda self, ends: calls.append(1) or real(self, ends))
    monkeypatch.setattr(tgm, "_GROUPED_BELOW_ROWS", 10**9 if grouped else 0)
    monkeypatch.setattr(tgm, "_GROUPED_MIN_EXPERTS", 0)
    yield
    assert bool(calls) == grouped
