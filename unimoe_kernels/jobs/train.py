"""`python -m unimoe_kernels train --stage {0,1,2,3}`: one training stage of the reference Uni-MoE.

    settings = (preset, stage, steps, seed, batch size, lr, --freeze-encoders, data, the run_id of
                the checkpoint it starts from, package version)
    model  <- OUT/stage{s}/ when it holds this stage of a run with equal settings (resume it, or
              reuse it when finished; said on screen); a checkpoint of any other run there stops
              the job with one `error:` line naming the difference, unless --fresh; else
              --init (default OUT/stage{s-1}/), else a fresh model of --preset (stage 0 only)
    train_stage(model, s, --steps) with a tqdm bar, checkpoints every --save-every steps and at the
        end into OUT/stage{s}/ (model.safetensors, optimizer.safetensors, trainer.json)
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
from . import UsageError, float_above, int_at_least


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
    no checkpoint; a UsageError naming the first difference and --fresh when it holds another run."""
    from ..models.training import read_trainer_state, settings_difference

    meta = read_trainer_state(here)
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
    return meta


def clear_stage(here: str) -> None:
    """Forget the checkpoint in `here` (for --fresh): without trainer.json nothing there is resumed,
    and the next save overwrites the weight files."""
    path = os.path.join(here, "trainer.json")
    if os.path.exists(path):
        os.remove(path)


def announce(stage: int, here: str, meta: dict) -> str:
    """The line that says a stage directory is reused, and how."""
    if meta["step"] >= meta["steps"]:
        return f"stage {stage}: reusing {here}, finished ({meta['steps']} steps, same settings; --fresh retrains it)"
    return f"stage {stage}: resuming {here} at step {meta['step']} of {meta['steps']} (same settings)"


def initial_model(args: argparse.Namespace, steps: int, lr: float):
    """(model, settings of this stage's run, where the model came from) per the module docstring."""
    from ..models.training import load_model, read_trainer_state
    from ..models.unimoe import UniMoE, preset_config

    here = stage_dir(args.out, args.stage)
    if args.fresh:
        clear_stage(here)
    init = args.init or (stage_dir(args.out, args.stage - 1) if args.stage > 0 else None)
    parent = None
    if init is not None:
        parent = read_trainer_state(init)
        if parent is None:
            raise UsageError(
                f"stage {args.stage} starts from a stage-{args.stage - 1} checkpoint, but {init!r} has none: "
                f"run `python -m unimoe_kernels train --stage {args.stage - 1} --out {args.out}` first or pass --init"
            )
        # A later stage inherits the preset of the run it starts from (--preset sizes fresh models only).
        preset, data = (parent.get("settings") or {}).get("preset"), parent["config"]["data"]
    else:
        preset, data = args.preset, preset_config(args.preset).to_dict()["data"]
    settings = stage_settings(preset, args.stage, steps, args.seed, args.batch_size, lr, data,
                              parent.get("run_id") if parent else None, args.freeze_encoders)
    meta = reusable_stage(here, settings)
    if meta is not None:
        return load_model(here), settings, announce(args.stage, here, meta)
    if parent is not None:
        return load_model(init), settings, f"stage {args.stage}: initialised from {init}"
    torch.manual_seed(args.seed)
    return UniMoE(preset_config(args.preset)), settings, f"stage {args.stage}: fresh {args.preset!r} model"


def run(args: argparse.Namespace) -> dict:
    from ..models.training import eval_batches, train_stage
    from ..models.unimoe import answer_accuracy

    set_threads(args.threads)
    steps = DEFAULT_STEPS[args.stage] if args.steps is None else args.steps
    lr = DEFAULT_LR[args.stage] if args.lr is None else args.lr
    model, settings, origin = initial_model(args, steps, lr)
    if args.freeze_encoders:
        model.cfg.train_encoders = False  # saved with the checkpoint's config
    print(origin)
    here = stage_dir(args.out, args.stage)
    record = train_stage(
        model, args.stage, steps, batch_size=args.batch_size, lr=lr, seed=args.seed, out_dir=here,
        save_every=args.save_every, resume=True, progress=not args.no_progress, settings=settings,
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
