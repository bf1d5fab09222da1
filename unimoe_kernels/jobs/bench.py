"""`python -m unimoe_kernels bench`: SparseMoE forward+backward side by side with the naive loop
over experts (Mixtral / Uni-MoE v1 reference code) and a dense SwiGLU chain of the same FLOPs.

    build SparseMoE -> check every provider's output against SparseMoE's (a fast wrong provider
    fails) -> rounds of (each provider once, interleaved so machine noise hits all alike)
    -> table: median / best time, GFLOP/s, and how many times faster each provider is than the
       dense chain and than the naive loop

Speed ratios follow the package's one convention: "N.NNx faster" = baseline time / this time, so
above 1 the row's provider is faster than the baseline. The dense chain is the roofline on any
device: an MoE does the same GEMM FLOPs as a dense MLP on T*k rows, so SparseMoE near 1.00x faster
than dense means routing, permutation and combine cost almost nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform

import torch

from .. import baselines, timing
from ..modules import SparseMoE
from ..types import ACTIVATIONS
from . import UsageError, int_at_least, pick_device

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # The default shape is the package's CPU efficiency target (a few seconds per round on 2 cores).
    p.add_argument("--tokens", type=int_at_least(1), default=4096, help="tokens T in the batch")
    p.add_argument("--hidden", type=int_at_least(1), default=512, help="hidden size H")
    p.add_argument("--ffn", type=int_at_least(1), default=1024, help="expert FFN width F")
    p.add_argument("--experts", type=int_at_least(1), default=8, help="number of experts E")
    p.add_argument("--top-k", type=int_at_least(1), default=2, help="experts per token k (at most --experts)")
    p.add_argument("--lora-rank", type=int_at_least(0), default=0,
                   help="LoRA rank on every expert, frozen base (0: no LoRA, base trains)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="swiglu", help="expert activation")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of weights and activations")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:index]")
    p.add_argument("--rounds", type=int_at_least(1), default=7, help="timed rounds; each runs every provider once")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (None: do not)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")


def run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    if args.top_k > args.experts:
        raise UsageError(f"--top-k {args.top_k} is more than --experts {args.experts}")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    t, h, f, e, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    moe = SparseMoE(h, f, e, k, activation=args.activation, lora_rank=args.lora_rank, device=device,
                    dtype=dtype).train()
    if args.lora_rank:
        with torch.no_grad():  # nonzero B so the LoRA path does real work in the correctness check
            moe.experts.lora_B_gate_up.normal_(0, 0.02)
            moe.experts.lora_B_down.normal_(0, 0.02)
    x = torch.randn(t, h, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(t, h, device=device, dtype=dtype)
    # The dense chain gets its own weights of the MoE's per-expert shape, trainable like the base.
    base_trainable = not moe.experts.base_frozen
    w_gu = moe.experts.gate_up_proj[0].detach().clone().requires_grad_(base_trainable)
    w_d = moe.experts.down_proj[0].detach().clone().requires_grad_(base_trainable)
    x_rows = torch.randn(t * k, h, device=device, dtype=dtype, requires_grad=True)
    dy_rows = torch.randn(t * k, h, device=device, dtype=dtype)
    trainables = [p for p in moe.parameters() if p.requires_grad] + [x, w_gu, w_d, x_rows]

    def fwd_bwd(out: torch.Tensor, grad: torch.Tensor) -> None:
        for p in trainables:
            p.grad = None
        out.backward(grad)

    providers = {
        "unimoe": lambda: fwd_bwd(moe(x), dy),
        "naive_loop": lambda: fwd_bwd(baselines.naive_loop_moe(moe, x), dy),
        "dense_chain": lambda: fwd_bwd(baselines.dense_mlp(x_rows, w_gu, w_d, args.activation), dy_rows),
    }

    with torch.no_grad():
        ours, naive = moe(x), baselines.naive_loop_moe(moe, x)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, naive, rtol=tol, atol=tol, msg="SparseMoE and the naive loop disagree")

    progress = None
    try:
        from tqdm import tqdm

        progress = functools.partial(tqdm, desc="bench rounds", unit="round")
    except ImportError:
        pass
    # One warm-up round (allocator, Triton compilation and autotuning); wall clock, synchronized
    # around every call: the time from launch to completion, host overhead included.
    times = timing.time_interleaved(providers, args.rounds, warmup=1, device=device, clock="wall", progress=progress)

    flop = baselines.flops(t, k, h, f, args.activation, args.lora_rank, backward=True,
                           base_trainable=base_trainable).total
    med = {n: v.median for n, v in times.items()}
    rows = [
        {
            "provider": n,
            "median_ms": med[n],
            "best_ms": v.min,
            "gflops": flop / (med[n] * 1e-3) / 1e9,
            # The package's convention: "N.NNx faster" = baseline time / this time.
            "faster_than_dense": med["dense_chain"] / med[n],
            "faster_than_naive_loop": med["naive_loop"] / med[n],
        }
        for n, v in times.items()
    ]
    result = {
        "shape": dict(tokens=t, hidden=h, ffn=f, experts=e, top_k=k, lora_rank=args.lora_rank,
                      activation=args.activation),
        "dtype": args.dtype,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "flops_fwd_bwd": flop,
        "rows": rows,
    }
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def format_table(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"SparseMoE forward+backward, T={s['tokens']} H={s['hidden']} F={s['ffn']} E={s['experts']} k={s['top_k']} "
        f"r={s['lora_rank']} {s['activation']} {result['dtype']} on {result['device']}",
        "N.NNx faster = baseline median time / this provider's median time (above 1: this provider is faster)",
        f"{'provider':<12} {'median ms':>10} {'best ms':>9} {'GFLOP/s':>9} {'faster than dense':>18} "
        f"{'faster than naive':>18}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['provider']:<12} {r['median_ms']:>10.2f} {r['best_ms']:>9.2f} {r['gflops']:>9.1f} "
            f"{r['faster_than_dense']:>17.2f}x {r['faster_than_naive_loop']:>17.2f}x"
        )
    return "\n".join(lines)
