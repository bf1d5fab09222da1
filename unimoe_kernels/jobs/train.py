"""`python -m unimoe_kernels train --stage {0,1,2,3}`: one training stage of the reference Uni-MoE.

    model  <- OUT/stage{s}/ when it holds a checkpoint of stage s (resume), else
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

import torch


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="run directory (stage checkpoints go in OUT/stageN)")
    # One intra-op thread: these layers are tiny, and on a shared 2-core machine two threads were
    # measured 7x slower per step (0.87 s vs 0.12 s for a stage-1 step) from contention.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)


def set_threads(n: int) -> None:
    if n < 0:
        raise ValueError(f"--threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), required=True,
                   help="0: LLM pretraining stand-in, 1: connector alignment, 2: modality FFNs, 3: MoE LoRA + router")
    add_common(p)
    p.add_argument("--steps", type=int, default=None, help="total steps of the stage (default: per-stage value)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per-stage value)")
    p.add_argument("--init", default=None, help="checkpoint directory to start from (default OUT/stage{s-1})")
    p.add_argument("--preset", default="demo", help="model size for a fresh stage-0 model: demo | micro")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint of this stage in OUT/stage{s}")
    p.add_argument("--freeze-encoders", action="store_true",
                   help="stage 1 trains the connectors only (for pretrained encoders; the stand-ins are random)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--eval-examples", type=int, default=64, help="evaluation examples per modality")


def stage_dir(out: str, stage: int) -> str:
    return os.path.join(out, f"stage{stage}")


def initial_model(args: argparse.Namespace):
    """The model a stage starts from (see the module docstring), and where it came from."""
    from ..models.training import load_model, read_trainer_state
    from ..models.unimoe import UniMoE, preset_config

    here = stage_dir(args.out, args.stage)
    meta = read_trainer_state(here)
    if meta is not None and not args.no_resume and meta.get("stage") == args.stage:
        return load_model(here), f"resuming {here} at step {meta['step']}"
    init = args.init or (stage_dir(args.out, args.stage - 1) if args.stage > 0 else None)
    if init is not None:
        if read_trainer_state(init) is None:
            raise FileNotFoundError(
                f"stage {args.stage} starts from a stage-{args.stage - 1} checkpoint, but {init!r} has none: "
                f"run `python -m unimoe_kernels train --stage {args.stage - 1} --out {args.out}` first or pass --init"
            )
        return load_model(init), f"initialised from {init}"
    torch.manual_seed(args.seed)
    return UniMoE(preset_config(args.preset)), f"fresh {args.preset!r} model"


def run(args: argparse.Namespace) -> dict:
    from ..models.training import eval_batches, train_stage
    from ..models.unimoe import answer_accuracy

    set_threads(args.threads)
    model, origin = initial_model(args)
    if args.freeze_encoders:
        model.cfg.train_encoders = False  # saved with the checkpoint's config
    print(f"stage {args.stage}: {origin}")
    here = stage_dir(args.out, args.stage)
    record = train_stage(
        model, args.stage, args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, out_dir=here,
        save_every=args.save_every, resume=not args.no_resume, progress=not args.no_progress,
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
