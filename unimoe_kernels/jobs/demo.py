"""`python -m unimoe_kernels demo`: stages 0-3 of the reference Uni-MoE on the tiny default, then a report.

    for stage in 0..3: train_stage (checkpoints in OUT/stageN) -> answer accuracy
        OUT/stageN is reused (finished) or resumed (interrupted) only when it holds a run with the
        settings of this request (jobs/train.py stage_settings: preset, steps, seed, batch size, lr,
        data, the stage it started from, package version), and the screen says so; a directory
        holding any other run stops the demo with one `error:` line naming the difference, and
        --fresh trains every stage again from step 0
    throughput, stage-3 model, interleaved rounds, same weights and batch:
        training tokens/s   (forward + backward + AdamW)  SparseMoE layers vs baselines.naive_loop_moe
        generation tokens/s (greedy, KV cache)            SparseMoE layers vs baselines.naive_loop_moe
    expert load per token modality: routing_stats() of the MoE layers over the evaluation set
    layer stack (--stack): a residual stack of LoRA SparseMoE layers at uni-moe-8e proportions,
        forward + backward tokens/s, SparseMoE vs the naive loop (where the kernels matter: in the
        tiny model the encoders and attention dominate, so the model-level ratio is diluted)
    -> OUT/report.json, OUT/*.png (when matplotlib imports), a summary on stdout

Speed ratios follow the package's convention, "N.NNx faster" = baseline time / our time (for rates:
our tokens/s / the baseline's), so above 1.00x SparseMoE is faster than the naive loop.

Throughput timings turn LoRA dropout off in both variants: the naive loop cannot draw the same
dropout masks, and the comparison should time the same work. The naive variant has no balancing
loss (as in the Uni-MoE v1 code it stands for); ours computes it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from .. import timing
from ..models.unimoe import PRESETS
from . import float_above, int_at_least, pick_device, run_directory
from .train import (  # noqa: F401 (ON_INTERRUPT: read by __main__)
    FRESH_HELP,
    ON_INTERRUPT,
    add_common,
    announce,
    checkpoint_meta,
    load_checkpoint_model,
    redo_damaged,
    reusable_stage,
    set_threads,
    stage_dir,
    stage_settings,
)

SPEED_NOTE = "N.NNx faster = baseline time / our time (above 1.00x: SparseMoE is faster)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.epilog = ("A stage directory in OUT is reused (finished) or resumed (interrupted) only when it holds a run "
                "with the same settings; any other run there stops the demo, and --fresh trains every stage again.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model size")
    p.add_argument("--steps-scale", type=float_above(0.0), default=1.0,
                   help="multiply every stage's default step count")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="examples per training step")
    p.add_argument("--eval-examples", type=int_at_least(1), default=64, help="evaluation examples per modality")
    p.add_argument("--bench-rounds", type=int_at_least(1), default=5, help="timed rounds per variant (median reported)")
    p.add_argument("--bench-steps", type=int_at_least(1), default=4,
                   help="training steps (or generate calls) per round")
    p.add_argument("--fresh", action="store_true", help=FRESH_HELP + " (every stage of OUT)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--no-plots", action="store_true", help="write report.json only, no PNG plots")
    p.add_argument("--stack", default="auto", choices=("auto", "none", *STACK_SHAPES),
                   help="layer-stack shape to time (auto: cpu-small on CPU, uni-moe-8e on CUDA)")
    p.add_argument("--stack-device", default="auto", help="auto (cuda when present), cpu or cuda[:index]")


# Residual stacks of SparseMoE layers (LoRA r=8 on every expert, frozen base, top-2 of 8), timed
# forward + backward. uni-moe-8e is the benchmark suite's named config (H=4096, F=11008); cpu-small keeps its
# F/H ratio at 1/16 of the width so a CPU round takes about a second.
STACK_SHAPES = {
    "cpu-small": dict(tokens=1024, hidden=256, ffn=704, experts=8, top_k=2, lora_rank=8, layers=2),
    "uni-moe-8e": dict(tokens=8192, hidden=4096, ffn=11008, experts=8, top_k=2, lora_rank=8, layers=2),
    "micro": dict(tokens=64, hidden=32, ffn=48, experts=4, top_k=2, lora_rank=4, layers=1),  # tests only
}


def _median_rate(fns: dict, rounds: int, device: torch.device = None) -> dict:
    """fns: name -> callable returning the tokens it processed. Interleaved rounds after one warm-up
    round (allocator, first-call kernel selection), median tokens/s."""
    timed = timing.time_interleaved(fns, rounds, warmup=1, device=device, clock="wall", keep_results=True)
    # The median of the rounds' rates, as the report has always given; with an even round count it
    # is not tokens / median time.
    return {n: statistics.median(tokens / (ms * 1e-3) for tokens, ms in zip(t.results, t.ms)) for n, t in timed.items()}


def measure_throughput(model, cfg, batch_size: int, rounds: int, steps: int, eval_set) -> dict:
    from ..models.training import stage_batches

    batches = stage_batches(cfg, 3, 0, batch_size, seed=987)  # not a step any run trains on

    # Sequence positions per step (media + words, padded), counted once from the real inputs.
    with torch.no_grad():
        positions = model.build_inputs(batches)[0].shape[:2].numel()

    def trainer(impl: str):
        m = copy.deepcopy(model)
        m.set_moe_impl(impl)
        for moe in m.sparse_moes():
            moe.experts.lora_dropout = 0.0
        params = m.setup_stage(3)
        opt = torch.optim.AdamW(params, lr=1e-4)
        m.train()

        def run():
            for _ in range(steps):
                loss = m.loss(batches)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return positions * steps

        return run

    fns = {impl: trainer(impl) for impl in ("fused", "naive")}
    train = _median_rate(fns, rounds)

    gen = {}
    for impl in ("fused", "naive"):
        m = copy.deepcopy(model).eval()
        m.set_moe_impl(impl)

        def run(m=m):
            n = 0
            for b in eval_set:
                n += m.generate(b, max_new_tokens=3).numel()
            return n

        gen[impl] = run
    generate = _median_rate(gen, rounds)
    # Ratios of tokens/s, ours / naive = naive time / our time: the package's "N.NNx faster".
    return {
        "train_tokens_per_s": train, "train_speedup_vs_naive": train["fused"] / train["naive"],
        "generate_tokens_per_s": generate, "generate_speedup_vs_naive": generate["fused"] / generate["naive"],
        "train_positions_per_step": positions,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def measure_layer_stack(shape: str, device: torch.device, rounds: int) -> dict:
    """Training tokens/s of a residual SparseMoE stack: ours vs baselines.naive_loop_moe, same weights."""
    from .. import baselines
    from ..models.unimoe import RMSNorm
    from ..modules import SparseMoE

    c = STACK_SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    # lora_dropout 0: the naive loop cannot replay dropout masks, and both should do the same work.
    moes = [SparseMoE(c["hidden"], c["ffn"], c["experts"], c["top_k"], lora_rank=c["lora_rank"],
                      lora_alpha=2.0 * c["lora_rank"], device=device, dtype=dtype) for _ in range(c["layers"])]
    norms = [RMSNorm(c["hidden"], 1e-6).to(device, dtype) for _ in range(c["layers"])]
    with torch.no_grad():
        for m in moes:  # nonzero B, so the LoRA terms are real work in both variants
            m.experts.lora_B_gate_up.copy_(0.02 * torch.randn(m.experts.lora_B_gate_up.shape, generator=gen))
            m.experts.lora_B_down.copy_(0.02 * torch.randn(m.experts.lora_B_down.shape, generator=gen))
    x0 = torch.randn(c["tokens"], c["hidden"], generator=gen).to(device, dtype)

    def step(naive: bool):
        x = x0.clone().requires_grad_(True)
        h = x
        for m, n in zip(moes, norms):
            h = h + (baselines.naive_loop_moe(m, n(h)) if naive else m(n(h)))
        h.float().pow(2).mean().backward()
        return c["tokens"]

    with torch.no_grad():
        h = norms[0](x0)
        ours, ref = moes[0](h).float(), baselines.naive_loop_moe(moes[0], h).float()
        rel_err = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    # The naive loop accumulates the combine in bf16 and ours in fp32, so bf16 agrees to ~1e-2 of
    # the output's scale; a wrong fast path would be off by O(1).
    if rel_err > (5e-2 if dtype == torch.bfloat16 else 1e-4):
        raise RuntimeError(
            f"layer stack: SparseMoE and the naive loop disagree (max error {rel_err:.3g} of the output scale)")
    rates = _median_rate({"fused": lambda: step(False), "naive": lambda: step(True)}, rounds, device)
    return {"shape": shape, **c, "dtype": str(dtype).replace("torch.", ""), "device": _device_name(device),
            "max_rel_err": rel_err, "train_tokens_per_s": rates, "speedup_vs_naive": rates["fused"] / rates["naive"]}


@torch.no_grad()
def expert_load(model, eval_set) -> dict:
    """Fraction of each token modality's expert slots that went to each expert (rows sum to 1)."""
    from ..models import synthetic_data as sd

    was = model.training
    model.eval()
    model.reset_routing_stats()
    for b in eval_set:
        embeds, _, groups, mod, _ = model.build_inputs(b)
        model(embeds, groups, mod)
    counts = model.routing_stats().double()
    model.train(was)
    frac = counts / counts.sum(1, keepdim=True).clamp_min(1)
    return {"token_modalities": list(sd.MODALITIES), "experts": [f"{m} FFN" for m in model.cfg.expert_modalities],
            "counts": counts.long().tolist(), "fraction": frac.tolist()}


def _plots(report: dict, out: str) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: report.json only (pip install matplotlib for the PNG plots)")
        return []
    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for s in report["stages"]:
        h = s["history"]
        line, = ax.plot(range(offset, offset + len(h)), h, linewidth=0.5, alpha=0.35)
        # Running mean over 8 steps: stage 2 alternates modalities step by step (4 expert FFNs), so
        # its raw curve zigzags between easy and hard data.
        w = min(8, len(h))
        smooth = [sum(h[max(0, i - w + 1): i + 1]) / len(h[max(0, i - w + 1): i + 1]) for i in range(len(h))]
        ax.plot(range(offset, offset + len(h)), smooth, color=line.get_color(), linewidth=1.5,
                label=f"stage {s['stage']}")
        offset += len(h)
    ax.set_yscale("log")
    ax.set_xlabel("step (stages back to back)")
    ax.set_ylabel("answer cross-entropy")
    ax.legend()
    ax.set_title("Uni-MoE reference: training loss per stage")
    fig.tight_layout()
    files.append(os.path.join(out, "loss_curves.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    mods = list(report["stages"][-1]["eval"]["per_modality"])
    width = 0.8 / len(report["stages"])
    for i, s in enumerate(report["stages"]):
        heights = [s["eval"]["per_modality"][m] for m in mods]
        ax.bar([j + i * width for j in range(len(mods))], heights, width, label=f"after stage {s['stage']}")
    ax.axhline(report["stages"][-1]["eval"]["chance"], color="k", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mods))], mods)
    ax.set_ylabel("answer accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(os.path.join(out, "accuracy.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    thr = report["throughput"]
    panels = [(thr["train_tokens_per_s"], thr["train_speedup_vs_naive"], "model: training tokens/s"),
              (thr["generate_tokens_per_s"], thr["generate_speedup_vs_naive"], "model: generation tokens/s")]
    if report.get("layer_stack"):
        st = report["layer_stack"]
        panels.append((st["train_tokens_per_s"], st["speedup_vs_naive"],
                       f"{st['shape']} MoE stack ({st['device']}):\nfwd+bwd tokens/s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, (vals, ratio, title) in zip(axes, panels):
        bars = ax.bar(["SparseMoE", "naive loop"], [vals["fused"], vals["naive"]], color=["tab:blue", "tab:gray"])
        # The numbers themselves, as the summary prints them: bar heights alone hide a 3% difference.
        ax.bar_label(bars, labels=[f"{vals['fused']:.0f}", f"{vals['naive']:.0f}"], fontsize=8, padding=2)
        ax.margins(y=0.15)
        ax.set_ylabel("tokens/s", fontsize=8)
        ax.set_title(f"{title}\nSparseMoE {ratio:.2f}x faster", fontsize=9)
    fig.suptitle(f"this package's layers vs the naive loop over experts (model on {report['device']})", fontsize=10)
    fig.tight_layout()
    files.append(os.path.join(out, "throughput.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    load = report["expert_load"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    im = ax.imshow(load["fraction"], cmap="viridis", vmin=0)
    ax.set_xticks(range(len(load["experts"])), load["experts"], rotation=30, ha="right")
    ax.set_yticks(range(len(load["token_modalities"])), [f"{m} tokens" for m in load["token_modalities"]])
    for i, row in enumerate(load["fraction"]):
        for j, v in enumerate(row):
            dark = v < 0.5 * max(max(r) for r in load["fraction"])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if dark else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label="share of the modality's expert slots")
    ax.set_title("expert load per modality (all MoE layers)")
    fig.tight_layout()
    files.append(os.path.join(out, "expert_load.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    return files


def summary_lines(report: dict) -> list:
    """The report's numbers as the demo prints them: accuracy, then every speed as "SparseMoE <ours>
    vs naive loop <theirs> (SparseMoE <ratio>x faster)" in the package's convention, then expert load."""
    final, thr, stack, load = report["stages"][-1]["eval"], report["throughput"], report["layer_stack"], \
        report["expert_load"]
    lines = [f"final answer accuracy {final['accuracy']:.3f} = {report['accuracy_over_chance']:.1f}x chance "
             f"({final['chance']:.3f})", f"speed, {SPEED_NOTE}:"]

    def versus(rates: dict, ratio: float) -> str:
        return (f"SparseMoE {rates['fused']:.0f} vs naive loop {rates['naive']:.0f} "
                f"(SparseMoE {ratio:.2f}x faster)")

    lines.append(f"training tokens/s: {versus(thr['train_tokens_per_s'], thr['train_speedup_vs_naive'])}")
    lines.append(f"generation tokens/s: {versus(thr['generate_tokens_per_s'], thr['generate_speedup_vs_naive'])}")
    if stack is not None:
        lines.append(f"{stack['shape']} layer stack ({stack['layers']} layers, T={stack['tokens']} H={stack['hidden']} "
                     f"F={stack['ffn']} E={stack['experts']} k={stack['top_k']} r={stack['lora_rank']}, "
                     f"{stack['dtype']} on {stack['device']}) fwd+bwd tokens/s: "
                     f"{versus(stack['train_tokens_per_s'], stack['speedup_vs_naive'])}")
    lines.append(f"expert load per token modality (rows: {', '.join(load['token_modalities'])}; "
                 f"cols: {', '.join(load['experts'])}):")
    lines += [f"  {m:>5}: " + " ".join(f"{v:.2f}" for v in row)
              for m, row in zip(load["token_modalities"], load["fraction"])]
    return lines


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    stack_device = pick_device(args.stack_device, "--stack-device") if args.stack != "none" else None
    with run_directory(args.out):
        return _demo(args, stack_device)


def _demo(args: argparse.Namespace, stack_device) -> dict:
    from ..models.training import DEFAULT_LR, DEFAULT_STEPS, eval_batches, train_stage
    from ..models.unimoe import UniMoE, answer_accuracy, preset_config

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = UniMoE(preset_config(args.preset))
    eval_set = eval_batches(model.cfg, args.eval_examples)
    data = model.cfg.to_dict()["data"]

    def settings_of(stage: int, init):
        steps = max(1, round(DEFAULT_STEPS[stage] * args.steps_scale))
        return stage_settings(args.preset, stage, steps, args.seed, args.batch_size, DEFAULT_LR[stage], data, init)

    # Every stage directory checked before any training, so a later stage holding another run stops
    # the demo now, not after the stages before it trained (the link to the stage it started from,
    # init, is checked in the loop, once that stage's run is known). --fresh reads none of them: each
    # is replaced at its stage's first save.
    for stage in range(4 if not args.fresh else 0):
        here = stage_dir(args.out, stage)
        meta = checkpoint_meta(here, redo_damaged(stage))
        if meta is not None:
            reusable_stage(here, settings_of(stage, (meta.get("settings") or {}).get("init")))
    stages, init = [], None  # init: run_id of the checkpoint the next stage starts from
    for stage in range(4):
        here = stage_dir(args.out, stage)
        settings = settings_of(stage, init)
        steps = settings["steps"]
        meta = None if args.fresh else reusable_stage(here, settings)  # stops the demo when `here` holds another run
        if meta is not None:
            print(announce(stage, here, meta))
            model = load_checkpoint_model(here, redo_damaged(stage))
        t0 = time.perf_counter()
        rec = train_stage(model, stage, steps, batch_size=args.batch_size, seed=args.seed, out_dir=here,
                          save_every=max(steps // 3, 1), resume=not args.fresh, progress=not args.no_progress,
                          settings=settings)
        init = rec["run_id"]
        acc = answer_accuracy(model, eval_set)
        stages.append({"stage": stage, "steps": steps, "seconds": time.perf_counter() - t0,
                       "reused_from_step": rec["start"] if meta is not None else None,
                       "train_tokens_per_s": rec["tokens"] / rec["seconds"] if rec["tokens"] else None,
                       "history": rec["history"], "eval": acc})
        # Means of the first and last 10 steps: single steps are noisy (and stage 2 alternates modalities).
        first, last = statistics.mean(rec["history"][:10]), statistics.mean(rec["history"][-10:])
        print(f"stage {stage}: loss {first:.3f} -> {last:.3f}, "
              f"answer accuracy {acc['accuracy']:.3f} (chance {acc['chance']:.3f}) {acc['per_modality']}")
    t_train = time.perf_counter() - t_start

    print("timing the stage-3 model: SparseMoE layers vs the naive loop over experts ...")
    throughput = measure_throughput(model, model.cfg, args.batch_size, args.bench_rounds, args.bench_steps, eval_set)
    load = expert_load(model, eval_set)
    stack = None
    if stack_device is not None:
        dev = stack_device
        shape = args.stack if args.stack != "auto" else ("uni-moe-8e" if dev.type == "cuda" else "cpu-small")
        print(f"timing a {shape} SparseMoE layer stack on {dev} ...")
        if dev.type == "cuda":
            # The first call compiles the Triton kernels for this GPU (cached on disk afterwards);
            # configs come from the shipped table, so nothing is autotuned here.
            print("  compiling the Triton kernels for this GPU on first use (seconds; cached for later runs) ...")
        stack = measure_layer_stack(shape, dev, args.bench_rounds)
    final = stages[-1]["eval"]
    report = {
        "preset": args.preset, "config": model.cfg.to_dict(), "speed_convention": SPEED_NOTE,
        "device": _device_name(torch.device("cpu")),  # the tiny model always trains on the CPU
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "stages": stages, "final_accuracy": final["accuracy"], "chance": final["chance"],
        "accuracy_over_chance": final["accuracy"] / final["chance"],
        "throughput": throughput, "layer_stack": stack, "expert_load": load,
        "seconds": {"training": t_train},
    }
    report["seconds"]["total"] = time.perf_counter() - t_start
    report["plots"] = [] if args.no_plots else _plots(report, args.out)
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    for line in summary_lines(report):
        print(line)
    print(f"demo took {report['seconds']['total']:.0f} s; report in {os.path.join(args.out, 'report.json')}")
    return report
