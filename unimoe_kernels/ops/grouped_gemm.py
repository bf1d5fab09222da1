"""Grouped expert MLP with fused LoRA and activation.

    x_sorted [N, H] (rows grouped by expert, tokens_per_expert [E])
      --GEMM 1: x W_gu[e]^T + s (x A_gu[e]^T) B_gu[e]^T, activation--> h [N, F]
      --GEMM 2: h W_d[e]^T + s (h A_d[e]^T) B_d[e]^T--> y_sorted [N, H]
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..reference import LoRAWeights


def grouped_mlp(
    x_sorted: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    activation: str = "swiglu",
    *,
    lora: Optional[LoRAWeights] = None,
    lora_scale: float = 1.0,
    lora_dropout: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Expert MLP over expert-grouped rows; see reference.grouped_mlp for the semantics."""
    e, _, h = gate_up_proj.shape
    if x_sorted.dim() != 2 or x_sorted.shape[1] != h:
        raise ValueError(f"x_sorted must be [N, H={h}], got {tuple(x_sorted.shape)}")
    if tokens_per_expert.shape != (e,):
        raise ValueError(f"tokens_per_expert must be [E={e}], got {tuple(tokens_per_expert.shape)}")
    return reference.grouped_mlp(
        x_sorted, tokens_per_expert, gate_up_proj, down_proj, activation,
        lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, training=training,
    )
