"""Alt-MoE's alternating optimisation: which direction trains next, each direction's optimiser
settings and LR schedule, and the training loop that ties them to the losses and to retrieval.

Data flow of train_alternating(predictor, train, val, steps=...):

    train / val: paired embeddings {modality: [N, D_m]} (altmoe_data.encode_modalities)
    per direction d: its own AdamW over predictor.direction_parameters(d), LR from lr_lambda on
                     the global step, its own epoch permutation of the train pairs
    every step:  d = DirectionSampler.next()  (round-robin, or at random favouring the direction
                 with the lower validation Recall@1)
                 batch idx -> out = predictor(train[src][idx], d)
                 -> altmoe_loss(out, train[tgt][idx]) (altmoe_losses) -> backward -> AdamW_d.step()
    every eval_every steps and at the end:
                 altmoe_retrieval.evaluate_directions(predictor, val) -> Recall@1/5/10 per direction
                 -> sampler.update, mean losses since the last eval -> TrainHistory.evals
                 (a mean loss that is not finite: TrainingDiverged)

Loss = InfoNCE(tau=0.03, symmetric, L2-normalised) + smooth-L1, 1:1.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .altmoe_losses import altmoe_loss
from .altmoe_model import AltMoEConfig, AltMoEPredictor
from .altmoe_retrieval import evaluate_directions
from .errors import TrainingDiverged


class DirectionSampler:
    """Which direction trains next.

    round_robin: d0, d1, ..., d0, ... . adaptive: random, p_d proportional to
    (1 - R@1_d + smoothing), mixed with a uniform floor, re-weighted at every update() from
    validation recall: the direction that lags gets more steps, none is ever starved.
    """

    def __init__(self, directions: Sequence[str], mode: str = "round_robin", *, seed: int = 0,
                 smoothing: float = 0.05, floor: float = 0.1):
        if mode not in ("round_robin", "adaptive"):
            raise ValueError(f"schedule must be 'round_robin' or 'adaptive', got {mode!r}")
        if not directions:
            raise ValueError("directions must not be empty")
        if not 0.0 <= floor <= 1.0 or smoothing <= 0:
            raise ValueError(f"need 0 <= floor <= 1 and smoothing > 0, got {floor}, {smoothing}")
        self.directions, self.mode, self.smoothing, self.floor = list(directions), mode, smoothing, floor
        self.probs = [1.0 / len(self.directions)] * len(self.directions)
        self._rng = random.Random(seed)
        self._i = 0

    def next(self) -> str:
        if self.mode == "round_robin":
            d = self.directions[self._i % len(self.directions)]
            self._i += 1
            return d
        return self._rng.choices(self.directions, weights=self.probs)[0]

    def update(self, recall_at_1: Mapping[str, float]) -> None:
        if self.mode != "adaptive":
            return
        need = [max(0.0, 1.0 - float(recall_at_1[d])) + self.smoothing for d in self.directions]
        total, n = sum(need), len(self.directions)
        self.probs = [(1 - self.floor) * x / total + self.floor / n for x in need]


def lr_lambda(step: int, total_steps: int, warmup_steps: int, final_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to final_ratio at total_steps (held after)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class DirectionOptim:
    """One direction's optimiser settings (M3-JEPA gives each direction its own)."""

    lr: float = 1.5e-3          # M3-JEPA's peak LR for both directions
    warmup_frac: float = 0.1    # of the run's steps; M3-JEPA warms up t2i for 10% of its run
    final_lr_ratio: float = 0.01  # cosine floor, 1% of peak (M3-JEPA goes 1.5e-3 -> 5.5e-6; on a
                                  # short run a slightly higher floor keeps the last steps useful)
    weight_decay: float = 0.01


@dataclass
class TrainHistory:
    """Everything train_alternating measured. evals: one dict per evaluation with step, recall
    ({direction: {"R@1": .., "R@5": .., "R@10": ..}}), mean losses since the last eval, the
    sampler's probabilities and each direction's LR; steps_per_direction: how often each trained."""

    evals: List[dict] = field(default_factory=list)
    steps_per_direction: Dict[str, int] = field(default_factory=dict)
    schedule: str = "round_robin"

    def final_recall(self) -> Dict[str, Dict[str, float]]:
        return self.evals[-1]["recall"] if self.evals else {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_paired(emb: Mapping[str, torch.Tensor], config: AltMoEConfig, name: str) -> int:
    n = None
    for m, d in config.dims.items():
        if m not in emb:
            raise ValueError(f"{name} lacks modality {m!r}; it has {sorted(emb)}")
        e = emb[m]
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[1] != d or not e.is_floating_point():
            got = f"{e.dtype} {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name}[{m!r}] must be a floating [N, {d}] tensor, got {got}")
        if n is not None and e.shape[0] != n:
            raise ValueError(f"{name} must be paired (the same N for every modality), got {e.shape[0]} and {n}")
        n = e.shape[0]
    if not n:
        raise ValueError(f"{name} is empty")
    return n


def train_alternating(
    predictor: AltMoEPredictor,
    train: Mapping[str, torch.Tensor],
    val: Mapping[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int = 128,
    schedule: str = "round_robin",
    optim: Optional[Mapping[str, DirectionOptim]] = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = False,
    on_eval: Optional[Callable[[dict], None]] = None,
) -> TrainHistory:
    """Alternating training of `predictor` on paired embeddings {modality: [N, D_m]}.

    Each of `steps` steps trains one direction (schedule "round_robin" or "adaptive"), on a batch of
    `batch_size` pairs drawn without replacement within an epoch. Every `eval_every` steps (and at
    the end) Recall@1/5/10 of every direction is measured on `val` (queries through the predictor,
    gallery = the target modality's val embeddings); the adaptive sampler re-weights from it.
    Host syncs happen only at evaluations, so on a GPU the steps between them queue freely.
    """
    cfg = predictor.config
    n_train = _check_paired(train, cfg, "train")
    _check_paired(val, cfg, "val")
    if steps < 1 or batch_size < 2 or eval_every < 1:
        raise ValueError(f"need steps >= 1, batch_size >= 2 (InfoNCE needs negatives), eval_every >= 1; "
                         f"got {steps}, {batch_size}, {eval_every}")
    batch_size = min(batch_size, n_train)
    directions = predictor.directions
    optim = dict(optim or {})
    unknown = set(optim) - set(directions)
    if unknown:
        raise ValueError(f"optim names unknown directions {sorted(unknown)}; directions are {directions}")
    settings = {d: optim.get(d, DirectionOptim()) for d in directions}
    device = predictor.task_embed.device
    train = {m: t.to(device) for m, t in train.items()}
    val = {m: t.to(device) for m, t in val.items()}

    optimizers = {}
    for d in directions:
        # Each direction has its own AdamW state even for the shared MoE: the directions' gradients
        # differ in scale, and one set of moments would let the louder direction shrink the
        # other's effective step.
        optimizers[d] = torch.optim.AdamW(predictor.direction_parameters(d), lr=settings[d].lr,
                                          weight_decay=settings[d].weight_decay)

    def set_lrs(step: int) -> None:
        # The schedules run on the global step (not on each direction's own count) so an adaptive
        # sampler that rarely picks a direction does not leave it stuck in warm-up; each
        # direction keeps its own peak, warm-up and floor. Set by hand rather than with LambdaLR,
        # which warns when a direction's scheduler advances on a step its optimiser skipped.
        for d in directions:
            s = settings[d]
            lr = s.lr * lr_lambda(step, steps, int(s.warmup_frac * steps), s.final_lr_ratio)
            for group in optimizers[d].param_groups:
                group["lr"] = lr

    set_lrs(0)
    sampler = DirectionSampler(directions, schedule, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    # Index permutations live on the data's device: one copy per epoch, none per step.
    perms = {d: torch.randperm(n_train, generator=gen).to(device) for d in directions}
    cursor = {d: 0 for d in directions}
    loss_sums = {d: torch.zeros(3, device=device) for d in directions}
    loss_counts = {d: 0 for d in directions}
    history = TrainHistory(steps_per_direction={d: 0 for d in directions}, schedule=schedule)

    def evaluate(step: int) -> None:
        losses = {}
        for d in directions:
            if loss_counts[d]:
                tot, con, pre = (loss_sums[d] / loss_counts[d]).tolist()
                if not math.isfinite(tot):
                    # Checked here, where the losses reach the host anyway: no sync per step.
                    raise TrainingDiverged(
                        f"altmoe {d}: the mean loss of steps {history.evals[-1]['step'] + 1}-{step} of {steps} is "
                        f"{tot} (peak learning rate {settings[d].lr:g}); training stopped before anything was saved: "
                        "train again with a lower learning rate")
                losses[d] = {"total": tot, "contrastive": con, "prediction": pre}
            loss_sums[d].zero_()
            loss_counts[d] = 0
        recall = evaluate_directions(predictor, val)
        sampler.update({d: recall[d]["R@1"] for d in directions})
        record = {
            "step": step, "recall": recall, "loss": losses,
            "probs": dict(zip(directions, sampler.probs)),
            "lr": {d: optimizers[d].param_groups[0]["lr"] for d in directions},
        }
        history.evals.append(record)
        if on_eval is not None:
            on_eval(record)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"altmoe train ({schedule})", unit="step")
    predictor.train()
    evaluate(0)
    try:  # the bar is closed on a TrainingDiverged too, so the error line is not glued to it
        for step in range(1, steps + 1):
            d = sampler.next()
            src, tgt = predictor.config.directions[directions.index(d)]
            if cursor[d] + batch_size > n_train:
                perms[d] = torch.randperm(n_train, generator=gen).to(device)
                cursor[d] = 0
            idx = perms[d][cursor[d]:cursor[d] + batch_size]
            cursor[d] += batch_size

            set_lrs(step - 1)
            predictor.zero_grad(set_to_none=True)
            out = predictor(train[src].index_select(0, idx), d)
            loss = altmoe_loss(out, train[tgt].index_select(0, idx), cfg)
            loss.total.backward()
            optimizers[d].step()
            loss_sums[d] += torch.stack([loss.total, loss.contrastive, loss.prediction]).detach()
            loss_counts[d] += 1
            history.steps_per_direction[d] += 1
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == steps:
                evaluate(step)
                predictor.train()
                if bar is not None:
                    bar.set_postfix({f"R@1 {k}": f"{v['R@1']:.2f}" for k, v in history.evals[-1]["recall"].items()})
    finally:
        if bar is not None:
            bar.close()
    predictor.eval()
    return history



__all__ = ["DirectionSampler", "lr_lambda", "DirectionOptim", "TrainHistory", "train_alternating"]
