"""`python -m unimoe_kernels altmoe {train,retrieve}`: the Alt-MoE connector end to end on the
synthetic two-encoder demo (no download).

train:    SyntheticPairs(seed) -> frozen encoders -> train / val / test embeddings
          -> train_alternating (one direction per step, tqdm bar, Recall@1/5/10 on val every
             --eval-every steps) -> test Recall@k both directions
          -> --out/ (locked for the run, checked writable before training): gallery_<modality>.pt
             (VectorStore of each modality's test embeddings), test_pairs.pt (raw test embeddings,
             the queries), then checkpoint.pt (predictor + how the data was made + the sha256 of
             those files), each renamed into place whole; report.json, recall.png (when
             matplotlib imports); a loss that stops being finite ends the job before any save
retrieve: checkpoint.pt + gallery_<tgt>.pt (+ queries), the run's files checked against the
             checkpoint's sha256 -> queries through the predictor
          -> cosine top-k in batches -> Recall@1/5/10 per direction (paired queries) and the top
             hits of the first --show queries -> retrieve.json

There is no real text-encoder option: the job downloads nothing, and no small text-embedding model
ships its weights inside a Python package. For real data, models.altmoe.encode_modalities takes any
encoder callable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch

from ..models.altmoe import (
    AltMoEConfig,
    AltMoEPredictor,
    DirectionOptim,
    SyntheticPairs,
    load_predictor,
    save_predictor,
    train_alternating,
)
from ..models.altmoe_retrieval import VectorStore, evaluate_direction
from ..models.checkpoint import replacing, sha256_of
from ..models.errors import TrainingDiverged
from . import Parser, UsageError, float_above, float_at_least, int_at_least, pick_device, run_directory, run_or_exit

DEFAULT_OUT = os.path.join("runs", "altmoe")


def _dims(text: str) -> Dict[str, int]:
    """'image=64,text=48' -> {'image': 64, 'text': 48}."""
    out = {}
    for item in text.split(","):
        name, sep, dim = item.partition("=")
        if not sep or not name.strip() or not dim.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--dims must look like 'image=64,text=48', got {text!r}")
        out[name.strip()] = int(dim)
    if len(out) < 2:
        raise argparse.ArgumentTypeError(f"--dims needs at least two modalities, got {text!r}")
    return out


def _direction_lr(text: str):
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--direction-lr must look like 'image_to_text=2e-3', got {text!r}")
    try:
        return name.strip(), float_above(0.0)(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"--direction-lr {name.strip()}: {e}") from None


def _fraction(text: str) -> float:
    value = float_at_least(0.0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `train` and `retrieve` sub-subcommands (dest `altmoe_command`) to `parser`."""
    # Not required by argparse, whose message would not list the choices: run() says them.
    sub = parser.add_subparsers(dest="altmoe_command", metavar="{train,retrieve}")

    t = sub.add_parser("train", help="alternating training on the synthetic two-encoder task, with a report")
    t.add_argument("--out", default=DEFAULT_OUT, help="run directory")
    # Demo data: small enough for a CPU run of a minute or two, big enough that the 1000-item test
    # gallery makes chance recall 0.1%.
    t.add_argument("--dims", type=_dims, default="image=64,text=48",
                   help="modality=embedding width of each frozen encoder")
    t.add_argument("--latent-dim", type=int_at_least(1), default=16, help="size of the hidden factor both encoders see")
    # 0.3: measured R@1 0.96 on the 1000-item test gallery after 600 steps against a ceiling (the
    # oracle on the raw factors) of 0.998; at 0.1 the task is solved within 100 steps.
    t.add_argument("--noise", type=float_at_least(0.0), default=0.3,
                   help="per-modality observation noise of the factor")
    t.add_argument("--n-train", type=int_at_least(1), default=8192, help="training pairs")
    t.add_argument("--n-val", type=int_at_least(1), default=512, help="validation pairs (recall during training)")
    t.add_argument("--n-test", type=int_at_least(1), default=1000, help="test pairs: the size of each test gallery")
    # Model: M3-JEPA's choices except the width, which the demo's small embeddings do not need.
    t.add_argument("--width", type=int_at_least(1), default=256, help="width of the predictor's shared space")
    t.add_argument("--ffn", type=int_at_least(1), default=None, help="expert hidden width (None: --width)")
    t.add_argument("--experts", type=int_at_least(1), default=12, help="experts of the MoE connector")
    t.add_argument("--top-k", type=int_at_least(1), default=4, help="experts per token (at most --experts)")
    t.add_argument("--renormalize", action="store_true", help="renormalise the top-k weights (M3-JEPA does not)")
    t.add_argument("--temperature", type=float_above(0.0), default=0.03, help="InfoNCE temperature")
    # Optimisation
    t.add_argument("--steps", type=int_at_least(1), default=600, help="training steps, all directions together")
    t.add_argument("--batch-size", type=int_at_least(2), default=256,
                   help="pairs per step (the other pairs of the batch are the negatives)")
    t.add_argument("--schedule", choices=("round_robin", "adaptive"), default="round_robin",
                   help="which direction trains at each step")
    t.add_argument("--lr", type=float_above(0.0), default=1.5e-3, help="peak LR of every direction")
    t.add_argument("--direction-lr", type=_direction_lr, action="append", default=[],
                   help="per-direction peak LR, e.g. image_to_text=2e-3 (repeatable)")
    t.add_argument("--warmup-frac", type=_fraction, default=0.1, help="share of the steps in linear warmup")
    t.add_argument("--final-lr-ratio", type=_fraction, default=0.01,
                   help="the cosine schedule ends at this fraction of the peak LR")
    t.add_argument("--weight-decay", type=float_at_least(0.0), default=0.01, help="AdamW weight decay")
    t.add_argument("--eval-every", type=int_at_least(1), default=50, help="validation recall every N steps")
    t.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the batches")
    t.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:index]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    # 1, measured on a 2-core machine (40 default-size steps): 3.9 s with 1 thread vs 3.3 s with 2
    # when idle, but 5.0 s vs 37.9 s with two other busy processes. Every tiny op forks an OpenMP
    # team whose threads spin at the barrier while the core they wait for is descheduled.
    t.add_argument("--threads", type=int_at_least(0), default=1,
                   help="torch CPU threads (0 = torch's default, one per core: as much as 8x slower for these "
                        "small matmuls when other processes share the cores)")

    r = sub.add_parser("retrieve", help="cross-modal search with a trained connector and saved galleries")
    r.add_argument("--run", default=None, help=f"directory of a `train` run (None: {DEFAULT_OUT})")
    r.add_argument("--checkpoint", default=None, help="predictor checkpoint (None: <run>/checkpoint.pt)")
    r.add_argument("--direction", action="append", default=None,
                   help="direction(s) to search, e.g. image_to_text (None: all of the checkpoint)")
    r.add_argument("--gallery", default=None,
                   help="VectorStore file (.pt/.npz/.safetensors) to search (None: <run>/gallery_<tgt>.pt)")
    r.add_argument("--queries", default=None,
                   help="file of query embeddings: a tensor [Q, D_src] or a dict {modality: tensor} "
                        "(torch.save); None: <run>/test_pairs.pt, paired with the default galleries")
    r.add_argument("--top-k", type=int_at_least(1), default=10, help="hits per query")
    r.add_argument("--batch-size", type=int_at_least(1), default=1024, help="queries searched per batch")
    r.add_argument("--show", type=int_at_least(0), default=3,
                   help="print the top hits of this many queries per direction")
    r.add_argument("--json", default=None, help="where to write the results (None: <run>/retrieve.json)")
    r.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:index]")
    r.add_argument("--threads", type=int_at_least(0), default=1,
                   help="torch CPU threads (0 = torch's default; 1 as for train, measured no slower here)")


def _print(msg: str) -> None:
    print(msg, flush=True)


def _plot(history: List[dict], path: str) -> str:
    """PNG of Recall@1 (solid) and @10 (dashed) per direction over training; a message if skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable; plot skipped (report.json has the same numbers)"
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [e["step"] for e in history]
    for d in history[0]["recall"]:
        line, = ax.plot(steps, [e["recall"][d]["R@1"] for e in history], label=f"{d} R@1")
        ax.plot(steps, [e["recall"][d]["R@10"] for e in history], "--", color=line.get_color(), label=f"{d} R@10")
    ax.set_xlabel("step")
    ax.set_ylabel("validation recall")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_train(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    if args.top_k > args.experts:
        raise UsageError(f"--top-k {args.top_k} is more than --experts {args.experts}")
    with run_directory(args.out):
        return _train(args, device)


def _save_run(args: argparse.Namespace, predictor: AltMoEPredictor, task: SyntheticPairs, seeds: dict,
              test: Dict[str, torch.Tensor]) -> tuple:
    """Galleries and test pairs first, checkpoint.pt last and naming their sha256, each file renamed
    into place whole: after a kill, retrieve finds the old checkpoint with files it did not write and
    says so, instead of searching another run's galleries."""
    bad = [n for n, p in predictor.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDiverged(f"altmoe: {bad[0]} is no longer finite after training (peak --lr {args.lr:g}); nothing "
                               "was saved: train again with a lower --lr")
    galleries = {m: os.path.join(args.out, f"gallery_{m}.pt") for m in test}
    for m, path in galleries.items():
        VectorStore(test[m], modality=m).save(path)
    pairs = os.path.join(args.out, "test_pairs.pt")
    with replacing(pairs) as tmp:
        torch.save({m: t.cpu() for m, t in test.items()}, tmp)
    files = {os.path.basename(f): sha256_of(f) for f in [*galleries.values(), pairs]}
    ckpt = os.path.join(args.out, "checkpoint.pt")
    save_predictor(predictor, ckpt, extra={"synthetic": task.spec(), "split_seeds": seeds, "files": files})
    return ckpt, galleries


def _train(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    task = SyntheticPairs(args.dims, latent_dim=args.latent_dim, noise=args.noise, seed=args.seed)
    # Distinct seeds per split so val and test items never repeat training items.
    seeds = {"train": args.seed * 3 + 1, "val": args.seed * 3 + 2, "test": args.seed * 3 + 3}
    train = task.embeddings(args.n_train, seeds["train"], device=device)
    val = task.embeddings(args.n_val, seeds["val"], device=device)
    test = task.embeddings(args.n_test, seeds["test"], device=device)

    config = AltMoEConfig(
        dims=args.dims, width=args.width, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k,
        normalize_topk=args.renormalize, temperature=args.temperature,
    )
    predictor = AltMoEPredictor(config, device=device)
    lrs = dict(args.direction_lr)
    unknown = set(lrs) - set(predictor.directions)
    if unknown:
        raise UsageError(
            f"--direction-lr names unknown directions {sorted(unknown)}; directions are {predictor.directions}")
    optim = {d: DirectionOptim(lr=lrs.get(d, args.lr), warmup_frac=args.warmup_frac,
                               final_lr_ratio=args.final_lr_ratio, weight_decay=args.weight_decay)
             for d in predictor.directions}
    _print(f"altmoe train: {sum(p.numel() for p in predictor.parameters())} parameters, directions "
           f"{predictor.directions}, {args.steps} steps ({args.schedule}) on {device}")
    start = time.perf_counter()
    history = train_alternating(
        predictor, train, val, steps=args.steps, batch_size=args.batch_size, schedule=args.schedule, optim=optim,
        eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress,
    )
    train_s = time.perf_counter() - start

    ckpt, galleries = _save_run(args, predictor, task, seeds, test)

    test_recall, oracle = {}, {}
    for (src, tgt), d in zip(config.directions, predictor.directions):
        gallery = VectorStore.load(galleries[tgt], map_location=device)
        test_recall[d] = evaluate_direction(predictor, test[src], gallery, d)
        oracle[d] = task.oracle_recall(args.n_test, seeds["test"], src, tgt)
    plot = _plot(history.evals, os.path.join(args.out, "recall.png"))

    report = {
        "job": "altmoe train", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device),
        "torch": torch.__version__, "python": platform.python_version(),
        "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "config": config.to_dict(), "parameters": sum(p.numel() for p in predictor.parameters()),
        "train_seconds": train_s, "chance_recall_at_1": 1.0 / args.n_test, "test_gallery_size": args.n_test,
        "test_recall": test_recall, "oracle_recall": oracle, "steps_per_direction": history.steps_per_direction,
        "history": history.evals, "checkpoint": ckpt, "galleries": galleries, "plot": plot,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)

    _print(f"trained in {train_s:.1f} s; test gallery {args.n_test} (chance R@1 {1.0 / args.n_test:.4f})")
    _print(f"{'direction':<20} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'steps':>6} {'oracle R@1':>11}")
    for d, r in test_recall.items():
        _print(f"{d:<20} {r['R@1']:7.3f} {r['R@5']:7.3f} {r['R@10']:7.3f} {history.steps_per_direction[d]:6d} "
               f"{oracle[d]['R@1']:11.3f}")
    _print(f"report: {os.path.join(args.out, 'report.json')}; plot: {plot}")
    return report


def _read(path: str, fix: str, load):
    """load(), with any failure to read `path` (truncated, not the format asked for) one UsageError
    naming the file, then `fix`."""
    try:
        return load()
    except Exception as e:  # torch.load alone raises RuntimeError, EOFError, UnpicklingError, BadZipFile, ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"{path} cannot be read ({type(e).__name__}: {first}): {fix}") from None


def run_retrieve(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    run_dir = args.run or DEFAULT_OUT
    ckpt = args.checkpoint or os.path.join(run_dir, "checkpoint.pt")
    retrain = f"`python -m unimoe_kernels altmoe train --out {run_dir}`"
    if not os.path.exists(ckpt):
        if args.checkpoint:
            raise UsageError(f"--checkpoint {ckpt!r} does not exist: pass the checkpoint.pt of an `altmoe train` run")
        raise UsageError(f"{ckpt!r} does not exist: run {retrain} first"
                         + ("" if args.run else ", or pass --run the directory of a train run"))
    for flag, path in (("--queries", args.queries), ("--gallery", args.gallery)):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} {path!r} does not exist")
    fix = "pass another --checkpoint" if args.checkpoint else f"train it again ({retrain})"
    predictor, extra = _read(ckpt, fix, lambda: load_predictor(ckpt, map_location=device))
    # The run's own files, when read through the run's own checkpoint, must be the ones it wrote.
    written = extra.get("files", {}) if not args.checkpoint else {}

    def run_file(path: str, flag: str, load):
        fix = f"pass another {flag}" if getattr(args, flag[2:]) else f"train again ({retrain})"
        value = _read(path, fix, load)
        want = written.get(os.path.basename(path)) if os.path.dirname(path) == os.path.dirname(ckpt) else None
        if want is not None and sha256_of(path) != want:
            raise UsageError(f"{path} is not the file {ckpt} was saved with (a train run into {run_dir} was stopped "
                             f"while saving, or the file was replaced): train again ({retrain})")
        return value

    cfg = predictor.config
    directions = args.direction or predictor.directions
    for d in directions:
        if d not in predictor.directions:
            raise UsageError(f"--direction {d!r} is not one of the checkpoint's {predictor.directions}")
    if args.gallery is not None and len(directions) != 1:
        raise UsageError("--gallery searches one target modality: give exactly one --direction with it")
    queries_path = args.queries or os.path.join(run_dir, "test_pairs.pt")
    queries = run_file(queries_path, "--queries",
                       lambda: torch.load(queries_path, map_location="cpu", weights_only=True))
    if not isinstance(queries, dict) and len(directions) != 1:
        raise UsageError("--queries holds one tensor, which has one source modality: give exactly one --direction")

    results = {}
    for d in directions:
        src, tgt = cfg.directions[predictor.directions.index(d)]
        gallery_path = args.gallery or os.path.join(run_dir, f"gallery_{tgt}.pt")
        gallery = run_file(gallery_path, "--gallery", lambda: VectorStore.load(gallery_path, map_location=device))
        q = queries[src] if isinstance(queries, dict) else queries
        if not isinstance(q, torch.Tensor):
            raise UsageError(f"--queries {queries_path} must hold a tensor or a dict of tensors by modality")
        q = q.to(device)
        entry = {"gallery": gallery_path, "gallery_size": len(gallery), "queries": int(q.shape[0])}
        # Paired queries (the default test pairs): query i's match is gallery id i, so recall is defined.
        if isinstance(queries, dict) and tgt in queries and queries[tgt].shape[0] == q.shape[0] == len(gallery):
            entry["recall"] = evaluate_direction(predictor, q, gallery, d, batch_size=args.batch_size)
            entry["chance_recall_at_1"] = 1.0 / len(gallery)
        hits = gallery.search(predictor.embed_queries(q[:args.show], d), args.top_k, batch_size=args.batch_size)
        entry["top_hits"] = [
            {"query": i, "ids": hits.ids[i].tolist(), "scores": [round(s, 4) for s in hits.scores[i].tolist()]}
            for i in range(hits.ids.shape[0])]
        results[d] = entry
        rec = entry.get("recall")
        line = f"{d:<20} gallery {len(gallery):>6}  "
        line += (f"R@1 {rec['R@1']:.3f}  R@5 {rec['R@5']:.3f}  R@10 {rec['R@10']:.3f}" if rec
                 else "(unpaired queries: no recall)")
        _print(line)
        for h in entry["top_hits"]:
            _print(f"  query {h['query']}: ids {h['ids'][:5]} scores {h['scores'][:5]}")
    out = args.json or os.path.join(run_dir, "retrieve.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"job": "altmoe retrieve", "device": str(device), "results": results}, f, indent=2)
    _print(f"results: {out}")
    return results


def run(args: argparse.Namespace) -> dict:
    if args.altmoe_command is None:
        raise UsageError("choose train or retrieve (`python -m unimoe_kernels altmoe --help` says what each does)")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.altmoe_command == "train":
        return run_train(args)
    if args.altmoe_command == "retrieve":
        return run_retrieve(args)
    raise ValueError(f"unknown altmoe subcommand {args.altmoe_command!r}")


def main(argv=None) -> int:
    """Standalone entry (`python -m unimoe_kernels.jobs.altmoe train ...`) until __main__ wires it."""
    parser = Parser(prog="python -m unimoe_kernels altmoe", description=__doc__)
    add_arguments(parser)
    run_or_exit(parser, run, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
