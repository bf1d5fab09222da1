"""Training stages, evaluation data and checkpoints of the reference Uni-MoE (models/unimoe.py).

    train_stage(model, stage, steps, out_dir=..., settings=...):
        params = model.setup_stage(stage)            (converts FFNs for stages 2 and 3)
        resume from out_dir/trainer.json when it holds the same stage of a run of the same total
            steps and settings (settings_difference); any other checkpoint there is an error, so a
            finished stage is never rewritten to fewer steps nor continued under another schedule
        for step: batches = stage_batches(stage, step)  (seeded by (seed, stage, step): replayable)
                  loss = model.loss(batches)  (not finite: TrainingDiverged, nothing of it saved)
                  backward; clip; AdamW with warmup + cosine lr
                  checkpoint every `save_every` steps and at the end (weights not finite:
                  TrainingDiverged instead of a save)
    checkpoint dir: model.safetensors (weights), optimizer.safetensors (AdamW moments, flattened
        as "<param index>.<key>"), trainer.json (config, ffn_mode, stage, step, loss history,
        settings, run_id: a random id of this stage's run, which the next stage records as its init;
        the files' sizes and sha256), replaced as one unit at each save (models/checkpoint.py)

Data per stage: 0 text QA + "describe"; 1 "describe" on image + video + audio (one mixed batch);
2 one modality's QA per step, round-robin (that modality's FFN copies learn); 3 QA of every
modality mixed in each batch.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from typing import Callable, List, Optional

import torch

from . import synthetic_data as sd
from .checkpoint import read_checkpoint, read_meta, write_checkpoint
from .errors import CheckpointError, TrainingDiverged
from .unimoe import UniMoE, UniMoEConfig

MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.safetensors"

MEDIA = ("image", "video", "audio")
# Per-stage defaults for the tiny model (measured on 2 CPU cores; see jobs/demo.py).
DEFAULT_STEPS = {0: 300, 1: 300, 2: 160, 3: 200}
DEFAULT_LR = {0: 3e-3, 1: 2e-3, 2: 1e-3, 3: 3e-3}
WARMUP = 10          # steps of linear warmup: AdamW's first moments are noisy
MIN_LR_RATIO = 0.1   # cosine decays to 10% of the peak, not to zero, so the last steps still learn


def _seed(seed: int, stage: int, step: int) -> int:
    # Large odd multipliers keep (seed, stage, step) triples from colliding.
    return (seed * 1_000_003 + stage * 10_007 + step) % (2**63 - 1)


def stage_batches(cfg: UniMoEConfig, stage: int, step: int, batch_size: int, seed: int = 0) -> List[sd.Batch]:
    """The batches of one training step (a list; build_inputs pads them into one sequence batch)."""
    g = torch.Generator().manual_seed(_seed(seed, stage, step))
    if stage == 0:
        return [sd.make_batch(cfg.data, "text", batch_size, g, sd.TASKS["text"] + ("describe",))]
    if stage == 1:
        per = max(batch_size // len(MEDIA), 1)
        return [sd.make_batch(cfg.data, m, per, g, ("describe",)) for m in MEDIA]
    if stage == 2:
        m = cfg.expert_modalities[step % len(cfg.expert_modalities)]
        return [sd.make_batch(cfg.data, m, batch_size, g)]
    if stage == 3:
        per = max(batch_size // len(sd.MODALITIES), 1)
        return [sd.make_batch(cfg.data, m, per, g) for m in sd.MODALITIES]
    raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")


def eval_batches(
    cfg: UniMoEConfig, per_modality: int = 64, seed: int = 12345, modalities=sd.MODALITIES
) -> List[sd.Batch]:
    """A fixed QA evaluation set, one batch per modality, from a generator no training step uses."""
    g = torch.Generator().manual_seed(seed + 2**40)  # offset: outside the range _seed produces for small seeds
    return [sd.make_batch(cfg.data, m, per_modality, g) for m in modalities]


def lr_at(step: int, steps: int, peak: float) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    t = (step - WARMUP) / max(steps - WARMUP, 1)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, list]:
    state = opt.state_dict()
    tensors = {}
    for idx, st in state["state"].items():
        for key, v in st.items():
            tensors[f"{idx}.{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def _unflat_optimizer(tensors: dict, groups: list) -> dict:
    state: dict = {}
    for name, v in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str, model: UniMoE, optimizer: Optional[torch.optim.Optimizer] = None, **trainer_state
) -> None:
    """Replace checkpoint directory `path` by model (+ optimizer) safetensors and trainer.json, as
    one unit (models/checkpoint.py): a kill at any moment leaves the old checkpoint or this one."""
    meta = {"config": model.cfg.to_dict(), "ffn_mode": model.ffn_mode, **trainer_state}
    tensors = {MODEL_FILE: model.state_dict()}
    if optimizer is not None:
        tensors[OPTIMIZER_FILE], meta["optimizer_param_groups"] = _flat_optimizer(optimizer)
    write_checkpoint(path, tensors, meta)


def read_trainer_state(path: str) -> Optional[dict]:
    """trainer.json of checkpoint directory `path` (None: no checkpoint there); a CheckpointError
    naming the file when it is damaged."""
    return read_meta(path)


def _model_from(path: str, meta: dict, weights: dict) -> UniMoE:
    f = os.path.join(path, "trainer.json")
    try:
        model = UniMoE(UniMoEConfig(**meta["config"]))
        model.set_ffn_mode(meta["ffn_mode"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{f} is damaged or of another package version (config: {e})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{os.path.join(path, MODEL_FILE)} does not fit the model {f} describes "
                              f"({str(e).splitlines()[0]})") from None
    return model


def load_model(path: str, device=None) -> UniMoE:
    """The model saved in checkpoint directory `path` (its config and stage structure, its weights).

    It is rebuilt with the stand-in encoders; a model made with custom encoders is rebuilt by its
    owner (UniMoE(cfg, image_encoder=...), set_ffn_mode) and given model.safetensors directly.
    A missing or damaged checkpoint raises CheckpointError naming the file.
    """
    meta, tensors = read_checkpoint(path, [MODEL_FILE])
    if meta is None:
        raise CheckpointError(f"{path} holds no checkpoint (no trainer.json there)")
    model = _model_from(path, meta, tensors[MODEL_FILE])
    return model.to(device) if device is not None else model


def settings_difference(recorded: Optional[dict], requested: dict) -> Optional[str]:
    """None when a checkpoint's recorded settings equal the requested ones, else the first
    difference in words, e.g. "steps: 300 there, 30 asked for"."""
    if recorded is None:
        return "the checkpoint records no settings (written by an older version of the package)"
    for key in list(requested) + [k for k in recorded if k not in requested]:
        if recorded.get(key) != requested.get(key):
            return f"{key}: {recorded.get(key)!r} there, {requested.get(key)!r} asked for"
    return None


def _check_resumable(out_dir: str, meta: dict, stage: int, steps: int, settings: Optional[dict]) -> None:
    """A checkpoint is resumed only as the run it belongs to (see the module docstring)."""
    if meta.get("stage") != stage:
        raise ValueError(f"{out_dir} holds a stage-{meta.get('stage')} checkpoint, not stage {stage}")
    if meta.get("steps", steps) != steps:
        # The cosine schedule depends on the total, and a finished stage must keep its step count.
        raise ValueError(f"{out_dir} holds stage {stage} of a {meta['steps']}-step run (at step {meta['step']}), "
                         f"not of the {steps}-step run asked for; pass resume=False to train it again from step 0")
    diff = None if settings is None else settings_difference(meta.get("settings"), settings)
    if diff is not None:
        raise ValueError(f"{out_dir} holds stage {stage} of a run with other settings ({diff}); "
                         "pass resume=False to train it again from step 0")


def _load_optimizer(path: str, optimizer: torch.optim.Optimizer, meta: dict, tensors: Optional[dict]) -> None:
    if tensors is None:
        # Deleted by hand (a save writes it with the weights): say so, the continued run differs.
        warnings.warn(f"{os.path.join(path, OPTIMIZER_FILE)} is missing: resuming with fresh AdamW moments, so the "
                      "run will differ from an uninterrupted one", stacklevel=3)
        return
    try:
        optimizer.load_state_dict(_unflat_optimizer(tensors, meta["optimizer_param_groups"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, OPTIMIZER_FILE)} does not fit this stage's optimizer "
                              f"({' '.join(str(e).split())})") from None


def _non_finite(model: UniMoE) -> list:
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def _kept(out_dir: Optional[str], saved: Optional[int]) -> str:
    if not out_dir:
        return "nothing was saved"
    if saved is None:
        return f"nothing of this run was saved in {out_dir}"
    return f"the checkpoint in {out_dir} (step {saved}) is kept"


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


def train_stage(
    model: UniMoE,
    stage: int,
    steps: Optional[int] = None,
    *,
    batch_size: int = 32,
    lr: Optional[float] = None,
    seed: int = 0,
    out_dir: Optional[str] = None,
    save_every: int = 0,
    resume: bool = True,
    progress: bool = False,
    on_step: Optional[Callable[[int, float], None]] = None,
    settings: Optional[dict] = None,
) -> dict:
    """Train `model` for stage `stage` up to `steps` total steps; returns the run's record.

    With out_dir, a checkpoint found there is resumed (weights, AdamW moments, step, loss history)
    when it is this stage of a `steps`-step run with these `settings` (a JSON-able dict the caller
    names the run by, saved in trainer.json), so an interrupted run continues exactly where it
    stopped; a checkpoint of any other run raises ValueError (resume=False trains from step 0 and
    overwrites it). A finished stage is returned as it is, nothing rewritten. Returns {"stage",
    "steps", "history" (loss per step), "tokens" (sequence positions processed by this call),
    "seconds" (of this call), "start" (the step this call began at), "run_id"}.
    """
    steps = DEFAULT_STEPS[stage] if steps is None else steps
    lr = DEFAULT_LR[stage] if lr is None else lr
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    # Seeded so a stage's fresh parameters (stage 3's routers and LoRA A) depend on `seed` only.
    torch.manual_seed(_seed(seed, stage, -1))
    params = model.setup_stage(stage)
    # beta2 0.98 (not 0.999): second moments adapt within ~50 steps, which matters for stages of a
    # few hundred steps; no weight decay, as LoRA recipes (PEFT, Uni-MoE) train adapters without it.
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    start, history, run_id = 0, [], uuid.uuid4().hex[:12]
    meta = read_trainer_state(out_dir) if (out_dir and resume) else None
    if meta is not None:
        _check_resumable(out_dir, meta, stage, steps, settings)
        # Weights and moments from the directory whose trainer.json was checked, both verified
        # against the sizes and hashes it records: never one save's weights with another's state.
        meta, tensors = read_checkpoint(out_dir, [MODEL_FILE], optional=[OPTIMIZER_FILE])
        _check_resumable(out_dir, meta, stage, steps, settings)
        try:
            model.load_state_dict(tensors[MODEL_FILE])
        except RuntimeError as e:
            raise CheckpointError(f"{os.path.join(out_dir, MODEL_FILE)} does not fit this stage's model "
                                  f"({str(e).splitlines()[0]})") from None
        _load_optimizer(out_dir, opt, meta, tensors.get(OPTIMIZER_FILE))
        start, history, run_id = meta["step"], list(meta["history"]), meta.get("run_id", run_id)
    saved = start if meta is not None else None  # the step of the checkpoint out_dir holds for this run

    def save(step: int) -> None:
        nonlocal saved
        if not out_dir:
            return
        bad = _non_finite(model)
        if bad:
            raise TrainingDiverged(f"stage {stage}: {bad[0]} (and {len(bad) - 1} more) is no longer finite after step "
                                   f"{step} of {steps} at peak learning rate {lr:g}; {_kept(out_dir, saved)}; "
                                   "train again with a lower learning rate")
        save_checkpoint(out_dir, model, opt, stage=stage, step=step, steps=steps, history=history,
                        batch_size=batch_size, lr=lr, seed=seed, settings=settings, run_id=run_id)
        saved = step

    model.train()
    it = range(start, steps)
    bar = None
    if progress and start < steps:  # a finished stage trains nothing: no bar to draw
        try:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"stage {stage}", unit="step", initial=start, total=steps)
            it = bar
        except ImportError:
            pass
    tokens, t0 = 0, time.perf_counter()
    for step in it:
        torch.manual_seed(_seed(seed, stage, step))  # LoRA dropout replays on resume
        batches = stage_batches(model.cfg, stage, step, batch_size, seed)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        embeds, labels, groups, mod, _ = model.build_inputs(batches)
        logits = model(embeds, groups, mod)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        value = loss.item()  # the trainer logs every step; not part of the layers' forward/backward
        if not math.isfinite(value):
            if bar is not None:
                bar.close()
            raise TrainingDiverged(f"stage {stage}: the loss is {value} at step {step + 1} of {steps} (peak learning "
                                   f"rate {lr:g}); {_kept(out_dir, saved)}; train again with a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # 1.0: the LLaMA / Uni-MoE recipes' clip
        opt.step()
        history.append(value)
        tokens += embeds.shape[0] * embeds.shape[1]
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}")
        if on_step is not None:
            on_step(step, value)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if start < steps or meta is None:  # a finished stage found in out_dir is left as it is
        save(steps)
    return {"stage": stage, "steps": steps, "history": history, "tokens": tokens, "seconds": seconds,
            "start": start, "run_id": run_id}


__all__ = [
    "stage_batches", "eval_batches", "lr_at", "train_stage", "save_checkpoint", "load_model",
    "read_trainer_state", "settings_difference", "DEFAULT_STEPS", "DEFAULT_LR", "CheckpointError", "TrainingDiverged",
]
