"""`python -m unimoe_kernels train --stage {0,1,2,3}`: one training stage of the reference Uni-MoE.

    settings = (preset, stage, steps, seed, batch size, lr, --freeze-encoders, data, the run_id of
                the checkpoint it starts from, package version)
    OUT locked for the run (a second live run into it stops with one line naming this one's pid)
    model  <- OUT/stage{s}/ when it holds this stage of a run with equal settings (resume it, or
              reuse it when finished; said on screen); a checkpoint of any other run there stops
              the job with one `error:` line naming the difference, unless --fresh (which does not
              read it, and replaces it at the first save); else the finished stage-{s-1}
              checkpoint in --init (default OUT/stage{s-1}/), else a fresh model of --preset
              (stage 0 only); a missing, damaged or other-stage checkpoint is one `error:` line
              naming the file and what to pass instead
    train_stage(model, s, --steps) with a tqdm bar, checkpoints every --save-every steps and at the
        end into OUT/stage{s}/ (model.safetensors, optimizer.safetensors, trainer.json: replaced
        as one unit); a loss that stops being finite ends the job with one `error:` line
    answer accuracy on the fixed evaluation set -> OUT/stage{s}/eval.json, printed

Stage 0 stands in for the pretrained LLM the real recipe starts from; stages 1-3 are Uni-MoE's.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch

from .. import __version__
from ..models.training import DEFAULT_LR, DEFAULT_STEPS
from ..models.unimoe import PRESETS
from . import UsageError, float_above, int_at_least, run_directory

# What __main__ adds to its one line on Ctrl-C: checkpoints are whole, so nothing is lost but the steps since.
ON_INTERRUPT = "; the last checkpoint saved is kept, and the same command resumes from it"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   help="run directory (stage checkpoints go in OUT/stageN)")
    # One intra-op thread: these layers are tiny, and on a shared 2-core machine two threads were
    # measured 7x slower per step (0.87 s vs 0.12 s for a stage-1 step) from contention.
    p.add_argument("--threads", type=int_at_least(0), default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh parameters, the data and LoRA dropout")


def set_threads(n: int) -> None:
    if n < 0:
        raise UsageError(f"--threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True,
                   help="0: LLM pretraining stand-in, 1: connector alignment, 2: modality FFNs, 3: MoE LoRA + router")
    add_common(p)
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="total steps of the stage; None: the stage's own default (" +
                        ", ".join(f"stage {s}: {n}" for s, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="examples per step")
    p.add_argument("--lr", type=float_above(0.0), default=None,
                   help="peak learning rate; None: the stage's own default (" +
                        ", ".join(f"stage {s}: {v:g}" for s, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--init", default=None, help="checkpoint directory to start from; None: OUT/stage{s-1}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size of a fresh stage-0 model")
    p.add_argument("--save-every", type=int_at_least(0), default=100,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--fresh", "--no-resume", dest="fresh", action="store_true",
                   help=FRESH_HELP + " (OUT/stage{s} only)")
    p.add_argument("--freeze-encoders", action="store_true",
                   help="stage 1 trains the connectors only (for pretrained encoders; the stand-ins are random)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--eval-examples", type=int_at_least(1), default=64, help="evaluation examples per modality")


# The rule for stage directories, shared with the demo (README, "Run directories").
FRESH_HELP = ("train from step 0, replacing the checkpoint found there; without --fresh a stage directory is "
              "resumed or reused only when it holds a run with the same settings, and any other run there "
              "stops the job")


def stage_dir(out: str, stage: int) -> str:
    return os.path.join(out, f"stage{stage}")


def stage_settings(preset: Optional[str], stage: int, steps: int, seed: int, batch_size: int, lr: float,
                   data: dict, init: Optional[str], freeze_encoders: bool = False) -> dict:
    """What names a stage's run: a checkpoint is reused only by a request with equal settings.

    init: run_id of the checkpoint the stage started from (None for a fresh stage-0 model), so a
    stage made from another run of the previous stage is not taken for this one."""
    return {"preset": preset, "stage": stage, "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
            "freeze_encoders": bool(freeze_encoders), "data": data, "init": init, "version": __version__}


def reusable_stage(here: str, settings: dict) -> Optional[dict]:
    """trainer.json of `here` when it holds this very run (resume or reuse it), None when `here` holds
    no checkpoint; a UsageError naming the first difference and --fresh when it holds another run,
    or naming the damaged file and --fresh when one of its files cannot be read."""
    from ..models.checkpoint import verify
    from ..models.errors import CheckpointError
    from ..models.training import OPTIMIZER_FILE, settings_difference

    meta = checkpoint_meta(here, redo_damaged(settings["stage"]))
    if meta is None:
        return None
    recorded = meta.get("settings")
    if recorded is None:
        diff = "it records no settings (written by an older version of the package)"
    else:
        diff = settings_difference(recorded, settings)
    if diff is not None:
        raise UsageError(f"{here} holds another run of stage {settings['stage']} ({diff}): pass --fresh to train "
                         "it again from step 0, or choose another --out")
    try:
        verify(here, meta, optional=[OPTIMIZER_FILE])  # here, where the error can name the fix
    except CheckpointError as e:
        raise UsageError(f"{e}: {redo_damaged(settings['stage'])}") from None
    return meta


def redo_damaged(stage: int) -> str:
    """The fix for a damaged checkpoint in the stage directory a job trains into."""
    return f"pass --fresh to train stage {stage} again from step 0 (the damaged checkpoint is replaced), or choose " \
           "another --out"


def checkpoint_meta(path: str, fix: str) -> Optional[dict]:
    """trainer.json of checkpoint directory `path` (None: no checkpoint there); a damaged one is a
    UsageError naming the file, then `fix`."""
    from ..models.errors import CheckpointError
    from ..models.training import read_trainer_state

    try:
        return read_trainer_state(path)
    except CheckpointError as e:
        raise UsageError(f"{e}: {fix}") from None


def load_checkpoint_model(path: str, fix: str):
    """load_model(path), with a missing or damaged checkpoint a UsageError naming the file, then `fix`."""
    from ..models.errors import CheckpointError
    from ..models.training import load_model

    try:
        return load_model(path)
    except CheckpointError as e:
        raise UsageError(f"{e}: {fix}") from None


def no_checkpoint(flag: str, path: str, stage: int, example: str) -> UsageError:
    """The error for a --init / --ckpt directory that holds no checkpoint: a run directory gets the
    stage directory inside it to pass instead, anything else an example of what to pass."""
    inner = stage_dir(path, stage)
    if not os.path.exists(path):
        return UsageError(f"{flag} {path} does not exist: pass {flag} the directory of a trained stage {stage}, "
                          f"e.g. {example}")
    if os.path.isfile(os.path.join(inner, "trainer.json")):
        hint = f"it is a run directory; pass {flag} {inner}"
    else:
        hint = f"pass {flag} the directory of a trained stage {stage}, e.g. {example}"
    return UsageError(f"{flag} {path} holds no checkpoint (no trainer.json there): {hint}")


def announce(stage: int, here: str, meta: dict) -> str:
    """The line that says a stage directory is reused, and how."""
    if meta["step"] >= meta["steps"]:
        return f"stage {stage}: reusing {here}, finished ({meta['steps']} steps, same settings; --fresh retrains it)"
    return f"stage {stage}: resuming {here} at step {meta['step']} of {meta['steps']} (same settings)"


def parent_checkpoint(args: argparse.Namespace) -> tuple:
    """(directory, trainer.json, the fix should its weights be damaged) of the finished checkpoint this
    stage starts from; (None, None, None) for a fresh stage-0 model. A UsageError, naming the directory
    and what to pass, when it is missing, damaged, of another stage than the one before this, or
    unfinished."""
    s, want = args.stage, max(args.stage - 1, 0)
    init = args.init or (stage_dir(args.out, s - 1) if s > 0 else None)
    if init is None:
        return None, None, None
    redo = f"`python -m unimoe_kernels train --stage {want} --out {args.out} --fresh`"
    fix = (f"pass --init a complete stage-{want} checkpoint" if args.init
           else f"train stage {want} again ({redo}) or pass --init")
    meta = checkpoint_meta(init, fix)
    where = f"--init {init}" if args.init else repr(init)
    if meta is None:
        if args.init:
            raise no_checkpoint("--init", init, want, stage_dir(os.path.join("runs", "demo"), want))
        raise UsageError(f"stage {s} starts from a stage-{want} checkpoint, but {where} has none: run "
                         f"`python -m unimoe_kernels train --stage {want} --out {args.out}` first or pass --init")
    if meta.get("stage") != want:
        sibling = stage_dir(os.path.dirname(os.path.normpath(init)), want)
        what = f"pass --init {sibling}" if os.path.isfile(os.path.join(sibling, "trainer.json")) and args.init else (
            f"pass --init a stage-{want} checkpoint" if args.init else f"train stage {want} into {init} ({redo})")
        raise UsageError(f"{where} holds a stage-{meta.get('stage')} checkpoint, but stage {s} starts from a "
                         f"stage-{want} one: {what}")
    if meta.get("step", 0) < meta.get("steps", 0):
        raise UsageError(f"{where} holds stage {want} interrupted at step {meta['step']} of {meta['steps']}: finish it "
                         f"first (the `train --stage {want}` command that started it resumes it)")
    return init, meta, fix


def initial_model(args: argparse.Namespace, steps: int, lr: float):
    """(model, settings of this stage's run, where the model came from) per the module docstring."""
    from ..models.unimoe import UniMoE, preset_config

    here = stage_dir(args.out, args.stage)
    init, parent, fix = parent_checkpoint(args)
    if parent is not None:
        # A later stage inherits the preset of the run it starts from (--preset sizes fresh models only).
        preset, data = (parent.get("settings") or {}).get("preset"), parent["config"]["data"]
    else:
        preset, data = args.preset, preset_config(args.preset).to_dict()["data"]
    settings = stage_settings(preset, args.stage, steps, args.seed, args.batch_size, lr, data,
                              parent.get("run_id") if parent else None, args.freeze_encoders)
    # --fresh: the checkpoint in `here` is not read at all (it may be the damaged one being replaced);
    # the first save replaces it, so a --fresh run stopped before then leaves it as it was.
    meta = None if args.fresh else reusable_stage(here, settings)
    if meta is not None:
        return load_checkpoint_model(here, redo_damaged(args.stage)), settings, announce(args.stage, here, meta)
    if parent is not None:
        return load_checkpoint_model(init, fix), settings, f"stage {args.stage}: initialised from {init}"
    torch.manual_seed(args.seed)
    return UniMoE(preset_config(args.preset)), settings, f"stage {args.stage}: fresh {args.preset!r} model"


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    steps = DEFAULT_STEPS[args.stage] if args.steps is None else args.steps
    lr = DEFAULT_LR[args.stage] if args.lr is None else args.lr
    with run_directory(args.out):
        return _train(args, steps, lr)


def _train(args: argparse.Namespace, steps: int, lr: float) -> dict:
    from ..models.training import eval_batches, train_stage
    from ..models.unimoe import answer_accuracy

    model, settings, origin = initial_model(args, steps, lr)
    if args.freeze_encoders:
        model.cfg.train_encoders = False  # saved with the checkpoint's config
    print(origin)
    here = stage_dir(args.out, args.stage)
    record = train_stage(
        model, args.stage, steps, batch_size=args.batch_size, lr=lr, seed=args.seed, out_dir=here,
        save_every=args.save_every, resume=not args.fresh, progress=not args.no_progress, settings=settings,
    )
    acc = answer_accuracy(model, eval_batches(model.cfg, args.eval_examples))
    hist = record["history"]
    tail = hist[-10:]  # mean of the last 10 steps: a single step's loss is noisy
    result = {
        "stage": args.stage, "steps": record["steps"], "final_loss": sum(tail) / max(len(tail), 1),
        "train_tokens_per_s": record["tokens"] / record["seconds"] if record["seconds"] > 0 else None,
        "eval": acc, "checkpoint": here,
    }
    with open(os.path.join(here, "eval.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"stage {args.stage}: loss {result['final_loss']:.4f}, answer accuracy {acc['accuracy']:.3f} "
          f"(chance {acc['chance']:.3f}), checkpoint {here}")
    return result
