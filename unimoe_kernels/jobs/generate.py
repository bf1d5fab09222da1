"""`python -m unimoe_kernels generate`: greedy answers of a trained reference Uni-MoE.

    load_model(--ckpt, default OUT/stage3) -> fresh synthetic questions per --modality (seeded)
    -> model.generate (KV cache unless --no-cache; naive loop MoE with --naive)
    -> one line per example: modality, question (<image> etc. marks where the media embeddings go),
       truth, answer; then accuracy and generated tokens/s (positions decoded, after a warm-up call),
       labelled with what the FFNs are (SparseMoE, naive loop MoE, or no MoE before stage 3)
    a missing or damaged checkpoint: one `error:` line naming the file and what to pass
"""

from __future__ import annotations

import argparse
import os

import torch

from .. import timing
from ..models.synthetic_data import MODALITIES
from . import UsageError, int_at_least
from .train import add_common, checkpoint_meta, load_checkpoint_model, no_checkpoint, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)
    p.add_argument("--ckpt", default=None, help="checkpoint directory (None: OUT/stage3)")
    p.add_argument("--modality", choices=(*MODALITIES, "all"), default="all", help="which questions to ask")
    p.add_argument("-n", "--num", type=int_at_least(1), default=4, help="examples per modality")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=3, help="tokens generated per answer")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--naive", action="store_true", help="run every SparseMoE through the naive loop over experts")


def ffn_label(ffn_mode: str, naive: bool) -> str:
    """What the timed model's FFN layers are: only a stage-3 checkpoint has SparseMoE layers."""
    if ffn_mode == "moe":
        return "naive loop MoE" if naive else "SparseMoE"
    return {"dense": "dense FFN, no MoE", "modality": "modality FFNs, no MoE"}.get(ffn_mode, ffn_mode)


def run(args: argparse.Namespace) -> dict:
    from ..models import synthetic_data as sd

    set_threads(args.threads)
    mods = sd.MODALITIES if args.modality == "all" else (args.modality,)
    ckpt = args.ckpt or os.path.join(args.out, "stage3")
    if args.ckpt:
        fix = "pass --ckpt a complete checkpoint, or train that stage again with --fresh"
    else:
        fix = f"train it again (`python -m unimoe_kernels demo --out {args.out} --fresh`) or pass --ckpt"
    if checkpoint_meta(ckpt, fix) is None:
        if args.ckpt:
            raise no_checkpoint("--ckpt", ckpt, 3, os.path.join("runs", "demo", "stage3"))
        raise UsageError(f"{ckpt!r} holds no checkpoint: train one (`python -m unimoe_kernels demo --out {args.out}`) "
                         "or pass --ckpt")
    model = load_checkpoint_model(ckpt, fix).eval()
    if args.naive:
        if model.ffn_mode != "moe":
            raise UsageError(f"--naive needs a stage-3 (MoE) checkpoint; {ckpt!r} is {model.ffn_mode!r}")
        model.set_moe_impl("naive")
    g = torch.Generator().manual_seed(args.seed)
    words = lambda ids: " ".join(sd.VOCAB[i] for i in ids if i != sd.PAD)  # noqa: E731
    hits = total = new_tokens = 0
    seconds = 0.0
    rows = []
    # Warm-up call (first-call allocation and kernel selection), so tokens/s measures steady state.
    model.generate(sd.make_batch(model.cfg.data, mods[0], 1, torch.Generator().manual_seed(args.seed + 1)), 1)
    for m in mods:
        batch = sd.make_batch(model.cfg.data, m, args.num, g)
        with timing.stopwatch() as sw:  # the model lives on the CPU: nothing to synchronize
            out = model.generate(batch, max_new_tokens=args.max_new_tokens, use_cache=not args.no_cache)
        seconds += sw.seconds
        new_tokens += out.numel()
        for i in range(args.num):
            truth, pred = batch.answer[i].tolist(), out[i].tolist()
            ok = pred[: len(truth)] == truth
            hits, total = hits + ok, total + 1
            prompt = words(batch.prompt[i].tolist()).replace("<bos>", "<bos>" if m == "text" else f"<bos> <{m}>")
            rows.append({"modality": m, "prompt": prompt, "truth": words(truth), "answer": words(pred), "correct": ok})
            row = rows[-1]
            print(f"[{m:>5}] {row['prompt']:<32} truth: {row['truth']:<12} answer: {row['answer']:<12} "
                  f"{'ok' if ok else 'WRONG'}")
    result = {"accuracy": hits / total, "tokens_per_s": new_tokens / seconds if seconds > 0 else None, "rows": rows}
    print(f"accuracy {hits}/{total}, {result['tokens_per_s']:.0f} generated tokens/s "
          f"({ffn_label(model.ffn_mode, args.naive)}, {'no cache' if args.no_cache else 'KV cache'})")
    return result
