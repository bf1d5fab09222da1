"""Benchmark results: the side-by-side text summary, the JSON writer, and loading for render_results.py.

    harness.RESULTS (list of Record) --summary_lines--> terminal table at the end of `pytest benchmarks`
                                     --save (GPU, UNIMOE_BENCH_SAVE=1)--> benchmarks/results/<date>_<device>.json
    benchmarks/results/*.json --render_results.py--> RESULTS.md (+ results.png)

A JSON file holds one run: {"schema", "device", "torch", "triton", "cuda", "date", "commit", "records"}.
Only GPU runs are saved: CPU timings of the tiny shapes are smoke tests, not results. The GPU
check's dry run (benchmarks/gpu_check.py) saves its CPU run anyway, with UNIMOE_BENCH_SAVE_CPU=1,
to test the path from records to its table; such a file says "device": "cpu".
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

import torch

from .configs import ANCHOR_CLAIMS

SAVE_ENV = "UNIMOE_BENCH_SAVE"  # "1": save to benchmarks/results/; any other non-"0" value: that directory
SAVE_CPU_ENV = "UNIMOE_BENCH_SAVE_CPU"  # "1": save a run without a GPU too (the GPU check's dry run)
COMMIT_ENV = "UNIMOE_COMMIT"  # the commit to record when the tree is a copy without its .git
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA = 1


def _fmt(v: Optional[float], width: int, prec: int, unit: str = "") -> str:
    """v in `width` characters (then `unit`), or a dash where there is no value."""
    return f"{'-':>{width}}{' ' * len(unit)}" if v is None else f"{v:{width}.{prec}f}{unit}"


def _groups(records) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault((r.group, r.config, r.size, r.mode), []).append(r)
    return groups


def summary_lines(records: Iterable) -> list[str]:
    """Side-by-side table per (group, config, size, mode): time, TFLOP/s, GB/s, ratios, peak memory.

    Ratios follow the package's convention, "N.NNx faster" = baseline time / our time: "faster than
    dense" is the dense MLP's time / the row's time, "ours faster" the row's time / ours (how many
    times faster ours is than that provider).
    """
    records = list(records)
    lines = ["", "=" * 30 + " unimoe_kernels benchmarks: providers side by side " + "=" * 30,
             "N.NNx faster = baseline time / our time (above 1.00x: faster)"]
    if not any(r.ms for r in records):
        lines.append("timing disabled (--benchmark-disable): every provider below was checked against reference.py "
                     "only")
    groups = _groups(records)
    # A reason that skips a provider in every group (an anchor that does not import) is said once.
    everywhere = {
        (r.provider, r.skipped) for r in records if r.skipped
        if all(any(o.provider == r.provider and o.skipped == r.skipped for o in rows) for rows in groups.values())
    }
    for provider, reason in sorted(everywhere):
        lines.append(f"skipped {provider} everywhere: {reason}")
    header = (f"  {'provider':<16} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'faster than dense':>17} "
              f"{'ours faster':>11} {'peak MB':>8}")
    for (group, config, size, mode), rows in groups.items():
        ours = next((r for r in rows if r.provider == "ours" and r.ms), None)
        ran = [r for r in rows if not r.skipped]
        lines.append("")
        lines.append(f"[{group}] {config} ({size}) {mode}")
        claim = ANCHOR_CLAIMS.get((config, mode)) if (group, size) == ("layer", "full") else None
        if claim:
            lines.append(f"  {claim}")
        floor = next((r.extra for r in ran if "floor_ms" in r.extra), None)
        if floor:  # decode sizes (test_decode.py): the weight-read floor and each provider's share of it
            shares = ", ".join(f"{r.provider} {r.extra['pct_of_floor']:.0f}%" for r in ran if "pct_of_floor" in r.extra)
            lines.append(f"  floor: {floor['touched_experts']:.1f} experts' weights "
                         f"({floor['floor_bytes'] / 1e6:.3g} MB) read once at {floor['copy_gbps']:.0f} GB/s = "
                         f"{floor['floor_ms']:.4f} ms"
                         + (f"; % of floor: {shares}" if shares else ""))
        if any(r.ms for r in ran):
            lines.append(header)
            for r in ran:
                ratio = r.ms / ours.ms if (ours and r.ms) else None
                lines.append(
                    f"  {r.provider:<16} {_fmt(r.ms, 9, 3)} {_fmt(r.tflops, 8, 3)} {_fmt(r.gbps, 8, 2)} "
                    f"{_fmt(r.vs_dense, 16, 2, 'x')} {_fmt(ratio, 10, 2, 'x')} {_fmt(r.peak_mem_mb, 8, 1)}"
                )
        elif ran:
            lines.append("  checked against reference.py: " + ", ".join(r.provider for r in ran))
        reasons: dict = {}
        for r in rows:
            if r.skipped and (r.provider, r.skipped) not in everywhere:
                reasons.setdefault(r.skipped, []).append(r.provider)
        for reason, names in reasons.items():
            lines.append(f"  skipped {', '.join(names)}: {reason}")
    lines.append("")
    lines.append("ms: median per call; TFLOP/s: expert-GEMM FLOPs (baselines.flops, router and dispatch "
                 "not counted); N.NNx faster = baseline time / our time: faster than dense = dense-MLP time "
                 "of the same FLOPs / this time, ours faster = this time / ours; peak MB: allocated beyond "
                 "the resident inputs.")
    if not torch.cuda.is_available():
        lines.append("")
        lines.append("CPU run: tiny shapes, fp32, a smoke test of the harness; 'ours' is the torch path on CPU "
                     "(Triton runs only on CUDA tensors); peak memory is measured on GPU only.")
    return lines


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_commit() -> Optional[str]:
    """The git commit of the source tree, "+dirty" when tracked files differ from it; UNIMOE_COMMIT
    wins (a copy of the tree without .git); None when neither tells."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # no git on PATH, or a hung filesystem
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def run_metadata() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "schema": SCHEMA,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
    }


def save(records: Iterable, directory: Path, metadata: Optional[dict] = None) -> Path:
    """Write one run's records to directory/<date>_<device>.json and return the path."""
    meta = dict(metadata or run_metadata())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower() or "device"
    stamp = meta["date"].replace(":", "").replace("+0000", "Z")[:17]
    path = directory / f"{stamp}_{slug}.json"
    meta["records"] = [asdict(r) for r in records]
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return path


def save_from_env(records: Iterable) -> str:
    """Save when UNIMOE_BENCH_SAVE asks and a GPU ran the benchmarks; returns a line for the terminal."""
    value = os.environ.get(SAVE_ENV, "0")
    if not torch.cuda.is_available() and os.environ.get(SAVE_CPU_ENV, "0") in ("", "0"):
        return f"{SAVE_ENV}={value}: nothing saved, no GPU (CPU timings of tiny shapes are not results)"
    directory = RESULTS_DIR if value == "1" else Path(value)
    timed = [r for r in records if r.ms or r.skipped]
    if not any(r.ms for r in timed):
        return f"{SAVE_ENV}={value}: nothing saved, no timings (--benchmark-disable?)"
    return f"benchmark results saved to {save(timed, directory)}"
