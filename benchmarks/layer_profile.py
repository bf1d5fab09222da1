"""Per-kernel breakdown of one SparseMoE forward+backward: which kernel a slow layer row spends its time in.

    python -m benchmarks.layer_profile [--shape qwen3-30b-a3b] [--size full|tiny] [--out DIR] [--top 15]

Flow: the layer of benchmarks/test_layer.py (harness.make_moe, bf16 on a GPU, eval mode, every
parameter trainable), WARMUP forward+backward calls (Triton compiles, the allocator settles), then
PROFILED calls under torch.profiler. Device time is summed per kernel name (CUDA activity on a GPU;
without one the CPU time per operator, a smoke test of the path) and divided by the calls, so each
row is per layer call; a row's share is of the summed kernel time. Printed as a table and written
to DIR/profile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

WARMUP = 2  # the first call compiles; the second settles the caching allocator
PROFILED = 3  # enough to average a launch's jitter, few enough that the trace stays small
TOP = 15  # the layer's forward+backward runs about a dozen distinct kernels; the rest is noise


def profile(shape: str = "qwen3-30b-a3b", size: str = "full", calls: int = PROFILED) -> dict:
    """{"device", "rows": [{"name", "ms", "count", "share"}] per layer call, "total_ms", ...}."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from . import configs, harness

    cfg = configs.get(shape, size)
    moe = harness.make_moe(cfg, "auto")
    params = [p for p in moe.parameters() if p.requires_grad]
    x = harness.make_inputs(cfg, requires_grad=True)[0]
    g = torch.Generator(device=harness.DEVICE).manual_seed(3)
    grad_out = torch.randn(cfg.T, cfg.H, device=harness.DEVICE, dtype=harness.DTYPE, generator=g)
    setup, call = harness.layer_callables(moe, params, [x], grad_out, bwd=True)
    cuda = harness.DEVICE.type == "cuda"
    for _ in range(WARMUP):
        setup()
        call(x)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=activities) as prof:
        for _ in range(calls):
            setup()
            call(x)
        if cuda:
            torch.cuda.synchronize()
    totals: dict = {}
    for ev in prof.events():
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and ev.cpu_parent is not None:  # CPU: top-level operators only, not their children
            continue
        # A kernel's own span on the device (a CPU operator's span, children included, without CUDA).
        t, n = totals.get(ev.name, (0.0, 0))
        totals[ev.name] = (t + ev.time_range.elapsed_us(), n + 1)
    total_ms = sum(t for t, _ in totals.values()) / 1e3 / calls
    rows = [{"name": name, "ms": t / 1e3 / calls, "count": n / calls, "share": (t / 1e3 / calls) / total_ms}
            for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    return {"shape": cfg.as_dict(), "size": size, "device": harness.device_name(), "calls": calls,
            "clock": "CUDA time per kernel" if cuda else "CPU time per top-level operator (no GPU)",
            "total_ms": total_ms, "rows": rows}


def render(result: dict, top: int = TOP) -> list:
    """The breakdown as lines: the heaviest `top` kernels, then what the rest adds up to."""
    s = result["shape"]
    lines = ["", f"profile: one SparseMoE forward+backward at {s['name']} ({s['T']}x{s['H']}x{s['F']}x{s['E']}x"
                 f"{s['k']}, {result['size']}) on {result['device']}: {result['clock']}, per layer call",
             f"{'ms':>9}{'share':>7}{'calls':>6}  kernel"]
    for row in result["rows"][:top]:
        lines.append(f"{row['ms']:>9.3f}{row['share']:>7.1%}{row['count']:>6.0f}  {row['name'][:100]}")
    rest = result["rows"][top:]
    if rest:
        ms = sum(r["ms"] for r in rest)
        lines.append(f"{ms:>9.3f}{ms / result['total_ms']:>7.1%}{'':>6}  ({len(rest)} more)")
    lines.append(f"{result['total_ms']:>9.3f}{'':>13}  total")
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--size", choices=("full", "tiny"), default=None, help="default: full on a GPU, else tiny")
    parser.add_argument("--out", type=Path, default=None, help="write DIR/profile.json")
    parser.add_argument("--top", type=int, default=TOP)
    args = parser.parse_args(argv)
    import torch

    size = args.size or ("full" if torch.cuda.is_available() else "tiny")
    result = profile(args.shape, size)
    print("\n".join(render(result, args.top)), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
