"""Token permutation into expert order and the weighted combine back.

    x [T, H] --permute(plan)--> x_sorted [T*k, H]  (row r = token sorted_slots[r] // k)
    y_sorted [T*k, H] --unpermute(plan, weights [T, k])--> out [T, H]
        out[t] = sum_j weights[t, j] * y_sorted[slot_rows[t*k + j]]   (k reads, no atomics)
"""

from __future__ import annotations

import torch

from .. import reference
from ..types import RoutingPlan


def permute(x: torch.Tensor, plan: RoutingPlan, top_k: int, *, backend: str = "auto") -> torch.Tensor:
    """Gather the rows of x [T, H] into expert-sorted order [T*k, H]."""
    if x.dim() != 2 or x.shape[0] * top_k != plan.sorted_slots.numel():
        raise ValueError(
            f"x must be [T, H] with T*top_k = {plan.sorted_slots.numel()} routed slots, got {tuple(x.shape)}"
        )
    return reference.permute(x, plan, top_k)


def unpermute(y_sorted: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Weighted combine of expert rows [T*k, H] back to tokens [T, H] with weights [T, k]."""
    if weights.dim() != 2 or weights.numel() != plan.slot_rows.numel():
        raise ValueError(f"weights must be [T, k] with T*k = {plan.slot_rows.numel()}, got {tuple(weights.shape)}")
    if y_sorted.dim() != 2 or y_sorted.shape[0] != weights.numel():
        raise ValueError(f"y_sorted must be [T*k={weights.numel()}, H], got {tuple(y_sorted.shape)}")
    return reference.unpermute(y_sorted, plan, weights)
