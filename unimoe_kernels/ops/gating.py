"""Top-k gating: router logits -> scores -> top-k -> (renormalised) combine weights.

    logits [T, E] fp32 --scores (softmax|sigmoid)--> [T, E]
        --(+ expert_bias, group limit) select top-k--> ids [T, k] int32 (ties: lowest index)
        --gather unbiased scores, renormalise, scale--> weights [T, k] fp32

The aux-loss statistics (load-balancing loss, z-loss) are computed from the returned scores, ids
and logits by reference.load_balancing_loss and reference.z_loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..types import GatingOutput


def check_gating_args(num_experts: int, top_k: int, n_groups: int, topk_groups: Optional[int], scoring: str) -> None:
    """Raise ValueError naming the argument for any impossible gating configuration."""
    if scoring not in reference.SCORINGS:
        raise ValueError(f"scoring must be one of {reference.SCORINGS}, got {scoring!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups must be >= 1 and divide num_experts={num_experts}, got {n_groups}")
    if topk_groups is not None:
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
        if topk_groups * (num_experts // n_groups) < top_k:
            raise ValueError(
                f"topk_groups={topk_groups} groups of {num_experts // n_groups} experts cannot hold top_k={top_k}"
            )


def topk_gating(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    normalize: bool = True,
    scaling_factor: float = 1.0,
    expert_bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: Optional[int] = None,
    backend: str = "auto",
) -> GatingOutput:
    """Differentiable top-k gating of logits [T, E]; see reference.topk_gating for the semantics."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    check_gating_args(logits.shape[1], top_k, n_groups, topk_groups, scoring)
    if expert_bias is not None and expert_bias.shape != (logits.shape[1],):
        raise ValueError(f"expert_bias must be [E={logits.shape[1]}], got {tuple(expert_bias.shape)}")
    return reference.topk_gating(
        logits, top_k, scoring=scoring, normalize=normalize, scaling_factor=scaling_factor,
        expert_bias=expert_bias, n_groups=n_groups, topk_groups=topk_groups,
    )
