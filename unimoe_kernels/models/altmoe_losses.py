"""Alt-MoE's training losses: symmetric InfoNCE and the per-direction objective built from it.

Data flow of altmoe_loss(out, target [N, D_tgt], config) for one direction's batch:

    out.contrastive [N, D_tgt] ──info_nce(tau=config.temperature)──┐ (L2-normalised, fp32,
                                                                   │  both ways round)
    out.prediction  [N, D_tgt] ──smooth_l1(target)─────────────────┤
                                                                   └─> total = contrastive_weight
                                                                       * InfoNCE + prediction_weight
                                                                       * smooth-L1  (1:1 default)

The MoE's load-balancing loss stays out of `total`: SparseMoE feeds it to the router itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .altmoe_model import AltMoEConfig, AltMoEOutput


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.03) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs: pred [N, D], target [N, D], row i of each a pair.

    Both sides are L2-normalised; logits = cos / temperature; the loss averages cross-entropy of
    pred -> target (which target is mine) and target -> pred (which prediction is mine). fp32.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be [N, D] of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    logits = p @ t.t() / temperature
    labels = torch.arange(p.shape[0], device=p.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class AltMoELoss(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    prediction: torch.Tensor


def altmoe_loss(out: AltMoEOutput, target: torch.Tensor, config: AltMoEConfig) -> AltMoELoss:
    """InfoNCE on the contrastive output + smooth-L1 of the prediction output against the target
    embedding [N, D_tgt], weighted by the config (1:1 by default). The MoE's balancing loss is not
    in `total`: SparseMoE already feeds it to the router through backward."""
    if target.shape != out.prediction.shape:
        raise ValueError(f"target must be [N, D_tgt] = {tuple(out.prediction.shape)}, got {tuple(target.shape)}")
    contr = info_nce(out.contrastive, target, config.temperature)
    pred = F.smooth_l1_loss(out.prediction.float(), target.float())
    total = config.contrastive_weight * contr + config.prediction_weight * pred
    return AltMoELoss(total, contr, pred)


__all__ = ["info_nce", "AltMoELoss", "altmoe_loss"]
