"""The GPU check: build, GPU tests, full-size benchmarks and one side-by-side table in one short slot.

    bash benchmarks/gpu_check.sh [options]         from the repository root
    python -m benchmarks.gpu_check [options]       the same without the shell's backstop timeout

Stages, in this order, each a subprocess under coreutils `timeout` that gets at most its cap and
what is left of the overall budget (default 465 s, inside the 8 minutes of a GPU slot). At its limit
a stage gets SIGINT, so pytest still writes its junit XML and its JSON, and SIGKILL GRACE_S later.
A failed or timed-out stage is reported and the next one runs:

    wheels     pip install --no-index --no-deps wheels/*.whl            anchors' wheels (no network there)
    build      pip install --no-index --no-build-isolation --no-deps -e .   builds _C; then has_c, has_c_cuda
    tests      pytest -m 'gpu or on_device' tests -n WORKERS                   -> junit-tests.xml
    decode     benchmarks/test_decode.py, full sizes: T in {1, 8, 64, 256} at qwen3-30b-a3b and
               mixtral (ours, torch._grouped_mm, Liger) against the weight-read floor, and the
               SparseMoE forward eager vs CUDA-graph replay at T=4096 (the host overhead)
    layer      benchmarks/test_layer.py, full sizes: ours, dense, torch._grouped_mm, Liger, moe-ops
    gmlp       benchmarks/test_ops.py grouped_mlp, full sizes: ours, torch._grouped_mm, torch loop
    sweep      python -m benchmarks.sweep_configs --out OUT/sweep       only with UNIMOE_SWEEP set (=1, or
               the shapes: UNIMOE_SWEEP=qwen3-30b-a3b,mixtral); the tuned config table lands there
    baselines  benchmarks/test_layer.py, full sizes: the other providers (naive loop, one-hot,
               PEFT delta-W, the torch path); last, because the table does not need them
    table      this run's JSON -> the tables (stdout, OUT/summary.txt), OUT/RESULTS.md: the layer
               and grouped_mlp one, then decode (% of floor) and host overhead

Every benchmark stage saves its JSON to OUT itself (benchmarks/results.py, UNIMOE_BENCH_SAVE=OUT:
device, versions, commit, one record per provider), so a stage cut short keeps what it measured.
The table reads only the JSON written during this run. Logs of every stage: OUT/logs/.

Dry mode (no CUDA, or UNIMOE_GPU_CHECK_DRY=1): nothing is installed or built, the benchmarks run
their tiny sizes on the CPU (the GPU tests skip themselves) and the JSON is saved all the same, so
the whole path to the table runs anywhere (benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DRY_ENV = "UNIMOE_GPU_CHECK_DRY"
SWEEP_ENV = "UNIMOE_SWEEP"

BUDGET_S = 465  # 8 minutes less 15 s for the driver's start, the table and the shell's backstop
GRACE_S = 20  # SIGINT -> SIGKILL: pytest writes its junit XML and JSON after KeyboardInterrupt
RESERVE_S = 5  # kept back for the table; reading a few JSON files takes well under a second
MIN_STAGE_S = 15  # a stage with less time than this left is not started (startup alone is ~5 s)
# Caps per stage. tests: the GPU tests' target is 3 minutes. decode: 2 shapes x 4 T x 3 providers
# and one graph capture, milliseconds per call, so the first calls' compilation (ours' decode tiles,
# Liger's kernels at two shapes: ~5-10 s each) and pytest's start make most of it; it runs before
# the layer, short and bounded, so a run whose build and tests take their caps still measures the
# small batches. layer: 6 shapes x 2 modes x 5 providers, each 30 calls plus the first call's
# compilation; gmlp: 3 providers. build: CMake and nvcc for one architecture. The baselines get
# whatever is left.
CAPS_S = {"wheels": 60, "build": 150, "tests": 180, "decode": 120, "layer": 240, "gmlp": 90, "sweep": 180,
          "baselines": BUDGET_S}
STAGES = tuple(CAPS_S)
# xdist workers of the GPU tests: Triton compiles on the CPU, one kernel per worker at a time, and
# the GPU machines have 16 cores; 8 leaves the rest to ptxas and the GPU's own work.
WORKERS = 8

TABLE_PROVIDERS = ("dense", "grouped_mm", "liger_kernel", "moe_ops", "ours")  # the layer stage's
BASELINES = ("gmm", "liger", "moe-ops", "dense")  # table columns, for grouped_mm, liger_kernel, moe_ops, dense
COLUMN_OF = {"grouped_mm": "gmm", "liger_kernel": "liger", "moe_ops": "moe-ops", "dense": "dense"}


@dataclass
class Stage:
    name: str
    status: str = "skipped"  # ok | FAILED | TIMEOUT | skipped | interrupted
    seconds: float = 0.0
    note: str = ""
    output: str = ""  # the last command's output (the build probe reads it)


@dataclass
class Check:
    out: Path
    dry: bool
    budget: float
    t0: float = field(default_factory=time.monotonic)
    stages: list = field(default_factory=list)
    current: Optional[subprocess.Popen] = None

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def run(self, stage: Stage, cmds: list, env: Optional[dict] = None) -> Stage:
        """Run cmds one after another in stage's log, stopping at the first failure."""
        self.stages.append(stage)
        log = self.out / "logs" / f"{stage.name}.log"
        start = time.monotonic()
        for cmd in cmds:
            limit = min(CAPS_S[stage.name] - (time.monotonic() - start), self.left() - GRACE_S - RESERVE_S)
            if limit < MIN_STAGE_S:
                stage.status, stage.note = "skipped", f"no time left ({self.left():.0f} s of the budget)"
                break
            print(f"[gpu_check] {stage.name}: {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
            with open(log, "ab") as f:
                offset = f.tell()
                f.write(f"$ {' '.join(cmd)}\n".encode())
                f.flush()
                # timeout runs cmd in a process group of its own and signals all of it (xdist workers too).
                self.current = subprocess.Popen(
                    ["timeout", "-s", "INT", "-k", str(GRACE_S), f"{limit:.0f}", *cmd], cwd=ROOT,
                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                )
                try:
                    rc = self.current.wait()
                except KeyboardInterrupt:  # the driver itself was stopped (see interrupt())
                    stage.status, stage.seconds = "interrupted", time.monotonic() - start
                    raise
                finally:
                    self.current = None
            stage.output = log.read_bytes()[offset:].decode(errors="replace").split("\n", 1)[-1]
            stage.status = "ok" if rc == 0 else "TIMEOUT" if rc in (124, 137) else f"FAILED rc={rc}"
            if rc:
                tail = stage.output.rstrip().splitlines()[-15:]
                print("\n".join(f"[gpu_check] {stage.name} | {line}" for line in tail), flush=True)
                break
        stage.seconds = time.monotonic() - start
        print(f"[gpu_check] {stage.name}: {stage.status} in {stage.seconds:.1f} s", flush=True)
        return stage

    def interrupt(self, signum, frame):
        """SIGTERM/SIGINT of the driver (the shell's backstop): stop the stage, still print the table."""
        if self.current is not None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)  # timeout's pid is its process group
            except ProcessLookupError:
                pass
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _pytest(*args: str) -> list:
    return [sys.executable, "-m", "pytest", "-q", *args]


def stage_wheels(check: Check) -> None:
    wheels = sorted(glob.glob(str(ROOT / "wheels" / "*.whl")))
    names = ", ".join(Path(w).name.split("-py")[0] for w in wheels)
    if not wheels:
        check.stages.append(Stage("wheels", note="no wheels/*.whl: anchors only where already installed"))
    elif check.dry:
        check.stages.append(Stage("wheels", note=f"dry: not installed: {names}"))
    else:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]
        stage = check.run(Stage("wheels"), [pip])
        stage.note = names


_PROBE = ("import torch, unimoe_kernels._ext as e; "
          "print('has_c', e.has_c(), 'has_c_cuda', e.has_c_cuda(), 'torch', torch.__version__, "
          "'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())")


def stage_build(check: Check) -> None:
    probe = [sys.executable, "-W", "ignore", "-c", _PROBE]
    if check.dry:
        stage = check.run(Stage("build"), [probe])
        note = "dry: not built"
    else:
        # H100 and H200 are both sm_90: one architecture halves nvcc's work; jobs: one per core.
        env = {"UNIMOE_CUDA_ARCHS": os.environ.get("UNIMOE_CUDA_ARCHS", "90"),
               "UNIMOE_BUILD_JOBS": os.environ.get("UNIMOE_BUILD_JOBS", str(os.cpu_count() or 2))}
        # --no-index: nothing is fetched, so pip cannot wait on a network the GPU machine does not have.
        install = [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."]
        stage = check.run(Stage("build"), [install, probe], env=env)
        note = ""
    lines = [line for line in stage.output.splitlines() if line.startswith("has_c ")]
    stage.note = "; ".join(filter(None, [note, lines[-1] if lines else "probe printed nothing"]))


def junit_counts(path: Path) -> Optional[dict]:
    """{passed, failed, errors, skipped, failures: [(test name, first line of message)]} of a junit XML."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test a KeyboardInterrupt (a stage's time limit) stopped
            continue
        bad = case.find("failure")
        err = case.find("error")
        if bad is not None or err is not None:
            node = bad if bad is not None else err
            counts["failed" if bad is not None else "errors"] += 1
            message = (node.get("message") or node.text or "").strip().splitlines()
            counts["failures"].append((case.get("name", "?"), message[0][:160] if message else ""))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _count_note(counts: Optional[dict]) -> str:
    if counts is None:
        return "no junit XML (the run ended before pytest wrote it)"
    return (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")


def stage_tests(check: Check, paths: list, marker: str, workers: int) -> Optional[dict]:
    xml = check.out / "junit-tests.xml"
    args = [*paths, f"--junitxml={xml}"]
    if marker:
        args[:0] = ["-m", marker]
    note = ""
    if workers > 1:
        import importlib.util

        if importlib.util.find_spec("xdist") is None:
            note = "; pytest-xdist is not installed: serial"
        else:
            args += ["-n", str(workers), "-p", "xdist"]
    stage = check.run(Stage("tests"), [_pytest(*args)])
    counts = junit_counts(xml)
    if stage.status != "skipped":
        stage.note = _count_note(counts) + note
    return counts


def _k(size: str, config_names: list, providers: tuple, negate: bool = False) -> str:
    chosen = f"({' or '.join(providers)})"
    expr = f"{size} and {'not ' if negate else ''}{chosen}"
    return expr + (f" and ({' or '.join(config_names)})" if config_names else "")


def stage_bench(check: Check, name: str, test: str, expr: str) -> Optional[dict]:
    xml = check.out / f"junit-{name}.xml"
    env = {"UNIMOE_BENCH_SAVE": str(check.out)}
    if check.dry:
        env["UNIMOE_BENCH_SAVE_CPU"] = "1"
    # --bench-tables: the log keeps the harness's own side-by-side summary (peak memory, every provider).
    stage = check.run(Stage(name), [_pytest(test, "-k", expr, "--bench-tables", f"--junitxml={xml}")], env=env)
    counts = junit_counts(xml)
    if stage.status != "skipped":
        stage.note = _count_note(counts)
    return counts


def stage_decode(check: Check, size: str, config_names: list) -> set:
    """The decode sizes and the host overhead (test_decode.py); the failed cells of the table."""
    from .configs import DECODE_BASES

    chosen = [c for c in config_names if c in DECODE_BASES]
    if config_names and not chosen:
        check.stages.append(Stage("decode", note=f"--configs names none of {', '.join(DECODE_BASES)}"))
        return set()
    # Their ids carry the base shape's name (qwen3-30b-a3b-T8, mixtral-T1, qwen3-30b-a3b-T4096).
    expr = size + (f" and ({' or '.join(chosen)})" if chosen else "")
    counts = stage_bench(check, "decode", "benchmarks/test_decode.py", expr)
    return failed_cells(counts["failures"] if counts else [])


def stage_sweep(check: Check) -> None:
    if not os.environ.get(SWEEP_ENV):
        check.stages.append(Stage("sweep", note=f"{SWEEP_ENV} not set"))
    elif not (ROOT / "benchmarks" / "sweep_configs.py").exists():
        check.stages.append(Stage("sweep", note="benchmarks/sweep_configs.py does not exist"))
    else:
        sweep_out = check.out / "sweep"
        sweep_out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.sweep_configs", "--out", str(sweep_out)]
        shapes = [s for s in re.split(r"[,\s]+", os.environ[SWEEP_ENV]) if s and s != "1"]
        if shapes:  # UNIMOE_SWEEP=qwen3-30b-a3b,mixtral names the shapes; =1 leaves the module's default
            cmd += ["--shapes", *shapes]
        stage = check.run(Stage("sweep"), [cmd])
        stage.note = f"tuned table in {sweep_out}"


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------


def load_records(out: Path, since: Optional[float] = None) -> tuple[list, dict]:
    """Records of the JSON runs in out (written after `since`, a time.time()), later files winning
    for the same (group, config, size, mode, provider); and the newest run's metadata."""
    from .render_results import SCHEMA

    merged: dict = {}
    meta: dict = {}
    for path in sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime):
        if since is not None and path.stat().st_mtime < since:
            continue
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict) or run.get("schema") != SCHEMA:
            continue
        meta = {k: v for k, v in run.items() if k != "records"}
        for rec in run.get("records", []):
            merged[(rec["group"], rec["config"], rec["size"], rec["mode"], rec["provider"])] = rec
    return list(merged.values()), meta


# test_<group>[<size>-<config>-<mode>-<provider>]; test_host_overhead has no provider in its id:
# one test measures both of its records.
_TEST_ID = re.compile(r"^test_(layer|grouped_mlp|decode|host_overhead)\[(tiny|full)-(.+)-(fwd\+bwd|fwd)(?:-(\w+))?\]$")
HOST_PROVIDERS = ("eager", "graph")  # the records of test_host_overhead
OWN_TABLES = ("decode", "host_overhead")  # groups with a table of their own, after the main one


def failed_cells(failures: list) -> set:
    """(group, config, size, mode, provider) of benchmark tests that failed (a wrong result, a crash)."""
    cells = set()
    for name, _ in failures:
        m = _TEST_ID.match(name)
        if m:
            group, size, config, mode, provider = m.groups()
            for p in (provider,) if provider else HOST_PROVIDERS:
                cells.add((group, config, size, mode, p))
    return cells


def _num(v: Optional[float]) -> str:
    """Four significant digits up to 9999 (ms and TFLOP/s both span 0.01 to 1000)."""
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def render_table(records: list, failed: set = frozenset()) -> list:
    """One table: a row per (benchmark, shape, mode); ours' ms and TFLOP/s, the baselines' ms, and
    ours' speed-up over each (their ms / ours ms). Skip and failure reasons follow it."""
    from .configs import NAMES

    records = [rec for rec in records if rec["group"] not in OWN_TABLES]
    rows: dict = {}
    for rec in records:
        rows.setdefault((rec["group"], rec["config"], rec["size"], rec["mode"]), {})[rec["provider"]] = rec
    order = {name: i for i, name in enumerate(NAMES)}
    keys = sorted(rows, key=lambda k: (k[0] != "layer", k[2], order.get(k[1], len(order)), k[3] != "fwd"))
    head1 = f"{'':<29}{'ours':^18}|{'baselines, ms per call':^42}|{'ours N.NNx faster than':^32}"
    head2 = (f"{'bench':<6}{'shape':<15}{'mode':<8}{'ms':>9}{'TFLOP/s':>8} |"
             + "".join(f"{c:>10}" for c in BASELINES) + " |" + "".join(f"{c:>8}" for c in BASELINES))
    lines = [head1, head2, "-" * len(head2)]
    reasons: dict = {}
    for key in keys:
        group, config, size, mode = key
        by = rows[key]
        ours = by.get("ours", {})
        ours_ms = ours.get("ms")
        cells, ratios = [], []
        for provider in ("grouped_mm", "liger_kernel", "moe_ops", "dense"):
            rec = by.get(provider)
            ms = rec.get("ms") if rec else None
            if provider == "dense" and rec is None and ours_ms and ours.get("vs_dense"):
                ms = ours_ms * ours["vs_dense"]  # grouped_mlp records carry the dense time as a ratio
            if (group, config, size, mode, provider) in failed:
                cells.append("FAIL")
                ms = None  # a provider that failed its check has no time worth comparing
            elif rec and rec.get("skipped"):
                cells.append("skip")
                reasons.setdefault((provider, rec["skipped"]), []).append(f"{config} {mode}")
            else:
                cells.append(_num(ms))
            ratios.append(f"{ms / ours_ms:.2f}x" if ms and ours_ms else "-")
        if (group, config, size, mode, "ours") in failed:
            ours_cell = "FAIL"
        elif ours.get("skipped"):
            ours_cell = "skip"
            reasons.setdefault(("ours", ours["skipped"]), []).append(f"{config} {mode}")
        else:
            ours_cell = _num(ours_ms)
        tflops = ours.get("tflops")
        bench = "layer" if group == "layer" else "gmlp"
        lines.append(f"{bench:<6}{config:<15}{mode:<8}{ours_cell:>9}{_num(tflops):>8} |"
                     + "".join(f"{c:>10}" for c in cells) + " |" + "".join(f"{r:>8}" for r in ratios))
    if not keys:
        lines.append("(no benchmark records: see the stages above and OUT/logs/)")
    lines.append("gmm: torch._grouped_mm (transformers v5 experts); liger: Liger-Kernel's fused MoE; moe-ops: its")
    lines.append("grouped GEMMs; dense: one MLP over T*k rows, the same FLOPs. N.NNx = baseline ms / ours ms, above")
    lines.append("1.00x ours is faster. ms: median per call; TFLOP/s: the expert GEMMs' FLOPs / ours' time.")
    shapes: dict = {}
    for rec in records:
        d = rec.get("shape") or {}
        if "T" in d:
            lora = f" r{d['r']}" if d.get("r") else ""
            shapes[rec["config"]] = f"{rec['config']} {d['T']}x{d['H']}x{d['F']}x{d['E']}x{d['k']}{lora}"
    if shapes:
        named = "; ".join(shapes[c] for c in sorted(shapes, key=lambda c: order.get(c, len(order))))
        lines += textwrap.wrap(f"shapes (T x H x F x E x k, LoRA rank): {named}", 100, subsequent_indent="  ")
    for (provider, reason), where in sorted(reasons.items()):
        shown = ", ".join(dict.fromkeys(where))
        lines.append(f"skip {COLUMN_OF.get(provider, provider)} ({shown}): {reason}")
    return lines


def _cell(rec: Optional[dict], failed: bool, value: Optional[float]) -> str:
    """A provider's cell in the decode and host-overhead tables: FAIL, skip, its number or '-'."""
    if failed:
        return "FAIL"
    if rec and rec.get("skipped"):
        return "skip"
    return _num(value)


def _rows_of(records: list, group: str) -> dict:
    """{(config, size): {provider: record}} of one benchmark group."""
    rows: dict = {}
    for rec in records:
        if rec["group"] == group:
            rows.setdefault((rec["config"], rec["size"]), {})[rec["provider"]] = rec
    return rows


def render_decode_table(records: list, failed: set = frozenset()) -> list:
    """Decode sizes: a row per (shape, T) with the floor (touched experts' weights read once at the
    measured copy bandwidth), ours' time and share of that floor, the baselines' times and ours'
    speed-up over each, then the skip reasons. Empty when the run has no decode records."""
    from .configs import DECODE_BASES

    rows = _rows_of(records, "decode")
    if not rows:
        return []

    def extra(rec):
        return (rec or {}).get("extra") or {}

    def tokens(by):
        return next(iter(by.values())).get("shape", {}).get("T")

    def sort_key(key):
        base = key[0].rsplit("-T", 1)[0]
        order = DECODE_BASES.index(base) if base in DECODE_BASES else len(DECODE_BASES)
        return key[1], order, tokens(rows[key]) or 0

    gbps = next((extra(r)["copy_gbps"] for by in rows.values() for r in by.values() if "copy_gbps" in extra(r)), None)
    names = {"grouped_mm": "gmm", "liger_kernel": "liger"}  # the baselines, in their columns' order
    # Column widths: shape 26, T 5, experts 8, floor 8 | ours 9 + 8 | 9 per baseline | 8 per ratio.
    head1 = (f"{'':<39}{'floor':>8} |{'ours':^17} |{'baselines':^18} |{'ours N.NNx faster':^16}")
    head2 = (f"{'shape':<26}{'T':>5}{'experts':>8}{'us':>8} |{'us':>9}{'% floor':>8} |"
             + "".join(f"{c + ' us':>9}" for c in names.values()) + " |" + "".join(f"{c:>8}" for c in names.values()))
    lines = ["", f"decode: SparseMoE forward under torch.inference_mode; floor = the touched experts' weights read "
                 f"once at the copy bandwidth ({_num(gbps)} GB/s)", head1, head2, "-" * len(head2)]
    reasons: dict = {}
    for key in sorted(rows, key=sort_key):
        config, size = key
        by = rows[key]
        floor = next((extra(r) for r in by.values() if "floor_ms" in extra(r)), {})
        experts = f"{floor['touched_experts']:.1f}" if "touched_experts" in floor else "-"
        floor_us = floor["floor_ms"] * 1e3 if "floor_ms" in floor else None
        times, cells = {}, {}
        for provider in ("ours", *names):
            rec = by.get(provider)
            bad = ("decode", config, size, "fwd", provider) in failed
            times[provider] = None if bad or not rec else rec.get("ms")
            cells[provider] = _cell(rec, bad, times[provider] * 1e3 if times[provider] else None)
            if rec and rec.get("skipped"):
                reasons.setdefault((names.get(provider, provider), rec["skipped"]), []).append(config)
        ours_ms = times["ours"]
        pct = f"{100 * floor['floor_ms'] / ours_ms:.0f}%" if ours_ms and floor_us else "-"
        ratios = [f"{times[p] / ours_ms:.2f}x" if times[p] and ours_ms else "-" for p in names]
        label = config + (" (tiny)" if size == "tiny" else "")
        lines.append(f"{label:<26}{tokens(by) or '-':>5}{experts:>8}{_num(floor_us):>8} |{cells['ours']:>9}{pct:>8} |"
                     + "".join(f"{cells[p]:>9}" for p in names) + " |" + "".join(f"{r:>8}" for r in ratios))
    lines += textwrap.wrap("experts: distinct experts the routing touches (mean over the input sets); floor us = "
                           "experts x the bytes of one expert's weights / the copy bandwidth; % floor = floor / ours' "
                           "time (100% = the weights stream at copy speed); N.NNx = baseline us / ours us.", 110)
    for (column, reason), where in sorted(reasons.items()):
        lines.append(f"skip {column} ({', '.join(where)}): {reason}")
    return lines


def render_host_table(records: list, failed: set = frozenset()) -> list:
    """Host overhead: the SparseMoE forward eager vs replayed from a CUDA graph, CUDA-event medians
    of back-to-back calls and synchronised wall times. Empty when the run has no such records."""
    rows = _rows_of(records, "host_overhead")
    if not rows:
        return []
    lines = ["", "host overhead: SparseMoE forward under torch.inference_mode, eager vs replayed from a CUDA graph",
             f"{'':<26}{'CUDA events, ms':>28}  {'synchronised wall, ms':>28}",
             f"{'shape':<26}" + f"{'eager':>10}{'graph':>10}{'host':>10}" * 2]
    lines.append("-" * len(lines[-1]))
    shapes = []
    for (config, size), by in sorted(rows.items()):
        cells = []
        for key in ("ms", "wall_ms"):
            values = {}
            for provider in HOST_PROVIDERS:
                rec = by.get(provider) or {}
                bad = ("host_overhead", config, size, "fwd", provider) in failed
                value = rec.get("ms") if key == "ms" else (rec.get("extra") or {}).get(key)
                values[provider] = None if bad else value
                cells.append(_cell(rec, bad, values[provider]))
            cells.append(_num(values["eager"] - values["graph"]) if values["eager"] and values["graph"] else "-")
        lines.append(f"{config:<26}" + "".join(f"{c:>10}" for c in cells))
        d = next(iter(by.values())).get("shape") or {}
        if "T" in d:
            shapes.append(f"{config} {d['T']}x{d['H']}x{d['F']}x{d['E']}x{d['k']}")
    note = ("host = eager - graph: what the host's launches add to a call (events: calls back to back, where the "
            "host may run ahead; wall: one call at a time, launch to completion).")
    if shapes:
        note += f" Shapes (T x H x F x E x k): {'; '.join(shapes)}."
    return lines + textwrap.wrap(note, 110)


def anchor_lines(records: list) -> list:
    """How each anchor ran (version, pinned or autotuned configs), from its records."""
    seen: dict = {}
    for rec in records:
        extra = rec.get("extra") or {}
        if "anchor_version" in extra:
            seen[rec["provider"]] = f"anchor {rec['provider']} {extra['anchor_version']}: {extra.get('anchor_configs')}"
    return [seen[name] for name in sorted(seen)]


def _short(commit: Optional[str]) -> Optional[str]:
    return commit and re.sub(r"^([0-9a-f]{12})[0-9a-f]{28}", r"\1", commit)


def summary(check: Check, records: list, meta: dict, failed: set, interrupted: bool) -> list:
    import torch

    from .results import source_commit

    device = meta.get("device") or ("cpu" if check.dry else "?")
    meta = {"torch": torch.__version__, "commit": source_commit(), **{k: v for k, v in meta.items() if v}}
    title = (f" GPU check{' (DRY: tiny shapes on CPU, nothing built)' if check.dry else ''}: {device}, "
             f"torch {meta['torch']}, triton {meta.get('triton', '?')}, commit {_short(meta['commit'])} ")
    lines = ["", f"{title:=^110}", f"{'stage':<10} {'status':<13} {'time':>7}  note"]
    for s in check.stages:
        lines.append(f"{s.name:<10} {s.status:<13} {s.seconds:>6.1f}s  {s.note}")
    total = time.monotonic() - check.t0
    lines.append(f"{'total':<10} {'interrupted' if interrupted else '':<13} {total:>6.1f}s  "
                 f"budget {check.budget:.0f} s; logs, junit XML and JSON in {check.out}")
    lines += anchor_lines(records)
    lines.append("")
    lines += render_table(records, failed)
    lines += render_decode_table(records, failed) + render_host_table(records, failed)
    return lines


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _default_out() -> Path:
    return Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu_check")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all stages (default {BUDGET_S})")
    parser.add_argument("--dry", action="store_true", help=f"dry mode even with a GPU (also {DRY_ENV}=1)")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to leave out, of {','.join(STAGES)}")
    parser.add_argument("--configs", default="", help="comma-separated shape names to benchmark (default: all)")
    parser.add_argument("--tests", default="tests", help="comma-separated test paths of the tests stage")
    # on_device: every kernel test taking the `device` fixture runs on the GPU too (fp32/fp16 edge
    # cases, LoRA, dropout, gradients), not only the GPU-only ones.
    parser.add_argument("--marker", default="gpu or on_device",
                        help="pytest -m expression of the tests stage ('' for none)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("UNIMOE_GPU_CHECK_WORKERS", WORKERS)),
                        help=f"xdist workers of the tests stage (default {WORKERS})")
    parser.add_argument("--table", type=Path, default=None, metavar="DIR",
                        help="only print the table of the JSON files in DIR")
    args = parser.parse_args(argv)

    if args.table is not None:
        records, _ = load_records(args.table)
        print("\n".join(anchor_lines(records) + render_table(records) + render_decode_table(records)
                        + render_host_table(records)))
        return 0
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        parser.error(f"--skip: unknown stages {sorted(skip - set(STAGES))}; stages are {STAGES}")
    import torch  # after argument parsing: --help and --table need no torch

    dry = args.dry or os.environ.get(DRY_ENV, "0") not in ("", "0") or not torch.cuda.is_available()
    out = (args.out or _default_out()).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    check = Check(out=out, dry=dry, budget=args.budget)
    since = time.time() - 1  # file times have 1 s resolution on some filesystems
    signal.signal(signal.SIGTERM, check.interrupt)
    signal.signal(signal.SIGINT, check.interrupt)
    size = "tiny" if dry else "full"
    configs = [c for c in args.configs.split(",") if c]
    failed: set = set()
    interrupted = False
    try:
        for name in STAGES:
            if name in skip:
                check.stages.append(Stage(name, note="--skip"))
            elif name == "wheels":
                stage_wheels(check)
            elif name == "build":
                stage_build(check)
            elif name == "tests":
                stage_tests(check, [p for p in args.tests.split(",") if p], args.marker, args.workers)
            elif name == "sweep":
                stage_sweep(check)
            elif name == "decode":
                failed |= stage_decode(check, size, configs)
            else:
                test, expr = {
                    "layer": ("benchmarks/test_layer.py", _k(size, configs, TABLE_PROVIDERS)),
                    "gmlp": ("benchmarks/test_ops.py", _k(size, configs, ("test_grouped_mlp",))),
                    "baselines": ("benchmarks/test_layer.py", _k(size, configs, TABLE_PROVIDERS, negate=True)),
                }[name]
                counts = stage_bench(check, name, test, expr)
                failed |= failed_cells(counts["failures"] if counts else [])
    except KeyboardInterrupt:
        interrupted = True
    records, meta = load_records(out, since)
    try:
        from .render_results import render_markdown

        (out / "RESULTS.md").write_text(render_markdown([{**meta, "file": "(this run)", "records": records}]))
    except Exception as err:  # the table below matters more than the markdown copy
        print(f"[gpu_check] RESULTS.md not written: {type(err).__name__}: {err}")
    lines = summary(check, records, meta, failed, interrupted)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    bad = [s for s in check.stages if s.status not in ("ok", "skipped")]
    return 1 if bad or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
