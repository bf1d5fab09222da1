"""The GPU check: the headline shapes' expert GEMMs and layer first, then decode and the GPU tests, in one short slot.

    bash benchmarks/gpu_check.sh [options]         from the repository root (one command in a GPU slot)
    python -m benchmarks.gpu_check [options]       the same without the shell's backstop timeout
    python -m benchmarks.gpu_check --plan          the stages, their caps and the budget, without running

Stages, in this order, each a process group of its own that gets at most its cap and what is left
of the overall budget (default 420 s). At its limit a stage gets SIGINT (pytest still writes its
junit XML and JSON) and SIGKILL GRACE_S later, and is reported TIMEOUT, whatever its exit status.
A failed or timed-out stage is reported and the next one runs:

    wheels   pip install --no-index --no-deps wheels/*.whl        the anchors (no network on the GPU host)
    build    `_C` in the background with --build (niced, 4 jobs), else skipped: the Triton routing
             plan serves without it. Its status is read at the end, with the time it finished.
    kernels  benchmarks/kernel_stage.py: the five GEMM roles at qwen3-30b-a3b and mixtral, shipped
             config and alternatives, one process per case (a sticky CUDA fault stays in its case),
             CUDA-event times beside sm90_check's compiled facts     -> kernels.json, kernels/*.json
    layer    benchmarks/test_layer.py at the headline shapes, fwd and fwd+bwd, ours first, then
             torch._grouped_mm, the dense chain, Liger                -> the layer table
    profile  benchmarks/layer_profile.py: CUDA time per kernel name of one layer fwd+bwd at
             qwen3-30b-a3b, so a slow row names its slow kernel       -> profile.json
    decode   benchmarks/test_decode.py: T in {1, 8, 64, 256} at both shapes against the weight-read
             floor, and the host overhead (eager vs CUDA-graph replay)
    tests    pytest -m 'gpu or on_device' tests -n WORKERS, CUDA_LAUNCH_BLOCKING=1, faulthandler
             (a test stuck past FAULT_S dumps every thread's stack)   -> junit-tests.xml
    then, only when named in --extra and time is left: gmlp (test_ops.py grouped_mlp), more (the
    other shapes of test_layer.py), sweep (benchmarks/sweep_configs.py), baselines (the other
    providers of test_layer.py).

Output ($OUT, else benchmarks/results/gpu_check): logs/<stage>.log, the JSON every benchmark stage
saves itself (benchmarks/results.py: device, versions, commit), summary.txt and summary.json. The
first lines printed, and the head of summary.txt and summary.json, say where the numbers come from
(device, commit, torch / triton / CUDA / Python versions) and each stage's status and why.

Dry mode (no CUDA, or UNIMOE_GPU_CHECK_DRY=1): nothing is installed or built, the kernel stage runs
Triton's interpreter at small sizes, the benchmarks their tiny sizes on the CPU, and the tests
stage selects `-m gpu` (which skips without CUDA): the whole path to the tables runs anywhere.
--plant puts a failing or hanging stage or kernel case in the run (benchmarks/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DRY_ENV = "UNIMOE_GPU_CHECK_DRY"
SWEEP_ENV = "UNIMOE_SWEEP"

# Seconds for all stages: a 10-minute slot less the machine's start, the transfer of the tree and
# its results, and the shell's backstop (benchmarks/README.md has the arithmetic).
BUDGET_S = 420
GRACE_S = 20  # SIGINT -> SIGKILL: pytest writes its junit XML and JSON after KeyboardInterrupt
RESERVE_S = 5  # kept back for the tables; reading a few JSON files takes well under a second
MIN_STAGE_S = 15  # a stage with less of the budget than this left is not started (startup alone is ~5 s)
# Caps (benchmarks/README.md has the arithmetic). wheels: two pure-Python wheels, a few seconds.
# kernels: 40 cases, 6 at a time, ~8 s each (start, compile, check, 20 timed calls) plus the
# lock-serialised timing: ~70 s expected. layer: 2 shapes x 2 modes x 4 providers, each a first
# call (compiles), a check against the fp32 oracle and 23 calls: ~100 s. profile: one layer build,
# 2 warm-up and 3 profiled calls. decode: 2 shapes x 4 T x 3 providers and a graph capture, mostly
# first-call compiles. tests: whatever is left.
CAPS_S = {"wheels": 15, "build": 0, "kernels": 90, "layer": 110, "profile": 40, "decode": 90, "tests": 180,
          "gmlp": 90, "more": 240, "sweep": 180, "baselines": BUDGET_S}
STARTUP_S = 5  # the driver's own start before the first stage: Python, torch, the provenance probe
HEADLINE_BY_S = 240  # the kernel stage and the layer rows end by then, even at their caps
# The dry run's kernel stage: 20 cases in the interpreter on 2 cores, ~10 s each two at a time.
DRY_CAPS_S = {"kernels": 150}
STAGES = ("wheels", "build", "kernels", "layer", "profile", "decode", "tests")
EXTRA = ("gmlp", "more", "sweep", "baselines")  # after the tests, only when named in --extra
# xdist workers of the GPU tests: Triton compiles on the CPU, one kernel per worker at a time, and
# the GPU machines have 16 cores; 8 leaves the rest to ptxas and the GPU's own work.
WORKERS = 8
FAULT_S = 60  # a GPU test running this long is stuck: faulthandler dumps the stacks (pytest's own timer)
BUILD_JOBS = 4  # the background build's compile jobs: the kernel stage's Triton compiles keep the other cores
HEADLINE = ("qwen3-30b-a3b", "mixtral")
# The layer stage's providers, in the order they run: ours first, so a stage cut short has it.
HEADLINE_PROVIDERS = ("ours", "grouped_mm", "dense", "liger_kernel")
MODES = ("fwd", "fwd+bwd")

TABLE_PROVIDERS = ("dense", "grouped_mm", "liger_kernel", "moe_ops", "ours")  # the "more" stage's
BASELINES = ("gmm", "liger", "moe-ops", "dense")  # table columns, for grouped_mm, liger_kernel, moe_ops, dense
COLUMN_OF = {"grouped_mm": "gmm", "liger_kernel": "liger", "moe_ops": "moe-ops", "dense": "dense"}

# What a planted stage runs instead of its commands (--plant stage:NAME=KIND): a hang ignores
# SIGINT, so only the SIGKILL after the grace stops it.
PLANTED = {
    "ok": "print('planted: ok')",
    "fail": "import sys; print('planted: failure'); sys.exit(3)",
    "hang": "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('planted: hang', flush=True); "
            "time.sleep(3600)",
}


@dataclass
class Stage:
    name: str
    status: str = "skipped"  # ok | FAILED rc=N | TIMEOUT | partial | skipped | interrupted | running
    seconds: float = 0.0
    note: str = ""
    start_s: Optional[float] = None  # seconds after the check's start
    cap_s: Optional[float] = None
    output: str = field(default="", repr=False)  # the last command's output (the build probe reads it)


@dataclass
class Check:
    out: Path
    dry: bool
    budget: float
    grace: float = GRACE_S
    caps: dict = field(default_factory=lambda: dict(CAPS_S))
    plants: dict = field(default_factory=dict)  # stage name -> ok | fail | hang
    t0: float = field(default_factory=time.monotonic)
    # The same start as a file time, less 1 s (file times have 1 s resolution on some filesystems):
    # only files written after it belong to this run.
    t0_wall: float = field(default_factory=lambda: time.time() - 1)
    stages: list = field(default_factory=list)
    current: Optional[subprocess.Popen] = None

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def skip(self, name: str, why: str) -> Stage:
        stage = Stage(name, note=why)
        self.stages.append(stage)
        return stage

    def run(self, stage: Stage, cmds: list, env: Optional[dict] = None) -> Stage:
        """Run cmds one after another in stage's log, stopping at the first failure. Each runs in a
        process group of its own; past the stage's limit the group gets SIGINT, then SIGKILL after
        the grace, and the stage is TIMEOUT (its exit status, -9 or 124 or any, is not a failure)."""
        self.stages.append(stage)
        if stage.name in self.plants:
            cmds = [[sys.executable, "-c", PLANTED[self.plants[stage.name]]]]
        log = self.out / "logs" / f"{stage.name}.log"
        start = time.monotonic()
        stage.start_s, stage.cap_s = round(start - self.t0, 1), self.caps[stage.name]
        for cmd in cmds:
            left = self.left() - self.grace - RESERVE_S
            cap_left = self.caps[stage.name] - (time.monotonic() - start)
            limit = min(cap_left, left)
            if left < MIN_STAGE_S or limit <= 0:
                stage.status, stage.note = "skipped", f"no time left ({self.left():.0f} s of the budget)"
                break
            print(f"[gpu_check] {stage.name}: {shlex.join(cmd)}  (limit {limit:.0f} s)", flush=True)
            with open(log, "ab") as f:
                offset = f.tell()
                f.write(f"$ {shlex.join(cmd)}\n".encode())
                f.flush()
                self.current = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f,
                                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                                start_new_session=True)
                try:
                    rc, timed_out = self._wait(self.current, limit)
                except KeyboardInterrupt:  # the driver itself was stopped (see interrupt())
                    stage.status, stage.seconds = "interrupted", time.monotonic() - start
                    raise
                finally:
                    self.current = None
            stage.output = log.read_bytes()[offset:].decode(errors="replace").split("\n", 1)[-1]
            if timed_out:
                stage.status = "TIMEOUT"
                stage.note = (f"stopped at its cap of {self.caps[stage.name]:.0f} s" if cap_left <= left
                              else f"stopped when the budget ran out ({limit:.0f} s left for it)")
            else:
                stage.status = "ok" if rc == 0 else f"FAILED rc={rc}"
            if rc or timed_out:
                tail = stage.output.rstrip().splitlines()[-15:]
                print("\n".join(f"[gpu_check] {stage.name} | {line}" for line in tail), flush=True)
                break
        stage.seconds = time.monotonic() - start
        print(f"[gpu_check] {stage.name}: {stage.status} in {stage.seconds:.1f} s", flush=True)
        return stage

    def _wait(self, proc: subprocess.Popen, limit: float) -> tuple[Optional[int], bool]:
        """(exit status, timed out): SIGINT to the group at the limit, SIGKILL after the grace."""
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGINT)
        try:
            return proc.wait(timeout=self.grace), True
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            return proc.wait(), True

    def interrupt(self, signum, frame):
        """SIGTERM/SIGINT of the driver (the shell's backstop): stop the stage, still print the tables."""
        if self.current is not None:
            _signal_group(self.current, signal.SIGKILL)
        raise KeyboardInterrupt


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the stage's process is its group's leader (start_new_session)
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------


def provenance(dry: bool) -> dict:
    """Where this run's numbers come from: device, its compute capability and SMs, commit, versions."""
    import torch

    from .results import _version, source_commit

    prov = {"device": "cpu", "dry": dry, "commit": source_commit(), "torch": torch.__version__,
            "triton": _version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
            "host_cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        prov.update(device=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    try:
        from unimoe_kernels import _ext

        prov["has_c"] = bool(_ext.has_c())
    except Exception as err:  # the probe reports; the check goes on (the Triton plan needs no _C)
        prov["has_c"] = f"probe failed: {type(err).__name__}"
    return prov


def provenance_line(prov: dict) -> str:
    dev = prov["device"] + (f" ({prov['capability']}, {prov['sms']} SMs)" if prov.get("capability") else "")
    return (f"{dev}, commit {_short(prov.get('commit'))}, torch {prov['torch']}, triton {prov['triton']}, "
            f"CUDA {prov['cuda']}, Python {prov['python']}, _C {'yes' if prov.get('has_c') is True else 'no'}"
            + (" (DRY: no GPU work; small sizes on the CPU)" if prov["dry"] else ""))


def plan_lines(check: Check, stages: list, extra: list, build: bool) -> list:
    """The stages this run will try, each with its cap, and the budget."""
    parts = []
    for name in [*stages, *extra]:
        if name == "build":
            parts.append("build " + ("in the background" if build else "skipped"))
        else:
            parts.append(f"{name} {check.caps[name]:.0f} s")
    return [f"[gpu_check] plan, budget {check.budget:.0f} s: " + " | ".join(parts)]


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def _pytest(*args: str) -> list:
    return [sys.executable, "-m", "pytest", "-q", *args]


def stage_wheels(check: Check) -> None:
    wheels = sorted(glob.glob(str(ROOT / "wheels" / "*.whl")))
    names = ", ".join(Path(w).name.split("-py")[0] for w in wheels)
    if "wheels" in check.plants:
        check.run(Stage("wheels"), [])
    elif not wheels:
        check.skip("wheels", "no wheels/*.whl: anchors only where already installed")
    elif check.dry:
        check.skip("wheels", f"dry: not installed: {names}")
    else:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *wheels]
        stage = check.run(Stage("wheels"), [pip])
        stage.note = names


_PROBE = ("import torch, unimoe_kernels._ext as e; "
          "print('has_c', e.has_c(), 'has_c_cuda', e.has_c_cuda(), 'torch', torch.__version__, "
          "'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())")


@dataclass
class Background:
    """The background build of _C: started first, read at the end."""

    stage: Stage
    proc: Optional[subprocess.Popen] = None
    log: Optional[object] = None
    finished_s: Optional[float] = None


def start_build(check: Check, wanted: bool) -> Optional[Background]:
    """Start `pip install -e .` (builds _C for sm_90) in the background, niced, with BUILD_JOBS jobs;
    or record why it is skipped. The stages that start after it finishes load _C."""
    if not wanted:
        check.skip("build", "skipped: the Triton routing plan serves without _C (--build builds it in the "
                            "background)")
        return None
    if check.dry:
        check.skip("build", "dry: not built")
        return None
    stage = Stage("build", status="running", start_s=round(time.monotonic() - check.t0, 1))
    check.stages.append(stage)
    env = {**os.environ, "UNIMOE_CUDA_ARCHS": os.environ.get("UNIMOE_CUDA_ARCHS", "90"),
           "UNIMOE_BUILD_JOBS": os.environ.get("UNIMOE_BUILD_JOBS", str(BUILD_JOBS))}
    # --no-index: nothing is fetched, so pip cannot wait on a network the GPU machine does not have.
    install = ("nice -n 10 {py} -m pip install --no-index --no-build-isolation --no-deps -e . && {py} -W ignore -c "
               "{probe}").format(py=shlex.quote(sys.executable), probe=shlex.quote(_PROBE))
    log = open(check.out / "logs" / "build.log", "ab")
    proc = subprocess.Popen(["bash", "-c", install], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    print(f"[gpu_check] build: started in the background (pid {proc.pid}, {BUILD_JOBS} jobs, niced)", flush=True)
    return Background(stage, proc, log)


def finish_build(check: Check, bg: Optional[Background]) -> None:
    """Read the background build's result; one still running when the stages end is stopped."""
    if bg is None:
        return
    rc = bg.proc.poll()
    if rc is None:
        _signal_group(bg.proc, signal.SIGKILL)
        bg.proc.wait()
        bg.stage.status, bg.stage.note = "TIMEOUT", "still building when the stages ended: stopped"
    else:
        bg.stage.status = "ok" if rc == 0 else f"FAILED rc={rc}"
    bg.log.close()
    text = (check.out / "logs" / "build.log").read_text(errors="replace")
    probe = [line for line in text.splitlines() if line.startswith("has_c ")]
    done = bg.finished_s if bg.finished_s is not None else time.monotonic() - check.t0
    bg.stage.seconds = done - (bg.stage.start_s or 0)
    if rc is not None:
        later = [s.name for s in check.stages if s.start_s is not None and s.start_s >= done and s is not bg.stage]
        bg.stage.note = "; ".join(filter(None, [probe[-1] if probe else "probe printed nothing",
                                                f"stages started after it: {', '.join(later) or 'none'}"]))


def poll_build(check: Check, bg: Optional[Background]) -> None:
    """Note when the background build finished (between stages)."""
    if bg is not None and bg.finished_s is None and bg.proc.poll() is not None:
        bg.finished_s = round(time.monotonic() - check.t0, 1)
        print(f"[gpu_check] build: finished at {bg.finished_s:.0f} s (exit {bg.proc.returncode})", flush=True)


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


def _join_notes(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def stage_kernels(check: Check, shapes: list, extra_args: list) -> None:
    cmd = [sys.executable, "-m", "benchmarks.kernel_stage", "--out", str(check.out), "--shapes", ",".join(shapes),
           # No case starts in the cap's last 30 s: one started then would be killed mid-way.
           "--deadline", str(max(1, check.caps["kernels"] - 30)), *(["--dry"] if check.dry else []), *extra_args]
    stage = check.run(Stage("kernels"), [cmd])
    if stage.status == "FAILED rc=2":  # kernel_stage's "every case that ran passed; some never started"
        stage.status = "partial"
    path = check.out / "kernels.json"
    if path.exists() and path.stat().st_mtime >= check.t0_wall:
        from .kernel_stage import STATUS_ORDER

        counts = json.loads(path.read_text()).get("counts", {})
        told = ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts)
        stage.note = _join_notes(stage.note, f"cases: {told}")
    elif stage.status != "skipped":
        stage.note = _join_notes(stage.note, "no kernels.json (the stage ended before writing it)")


def stage_tests(check: Check, paths: list, marker: str, workers: int) -> Optional[dict]:
    xml = check.out / "junit-tests.xml"
    args = [*paths, f"--junitxml={xml}", "-o", f"faulthandler_timeout={FAULT_S}"]
    if marker:
        args[:0] = ["-m", marker]
    note = ""
    if workers > 1:
        import importlib.util

        if importlib.util.find_spec("xdist") is None:
            note = "pytest-xdist is not installed: serial"
        else:
            args += ["-n", str(workers), "-p", "xdist"]
    # Launches wait for their kernel: a fault names the launch that made it, not a later one.
    env = {"CUDA_LAUNCH_BLOCKING": "1", "PYTHONFAULTHANDLER": "1"}
    stage = check.run(Stage("tests"), [_pytest(*args)], env=env)
    counts = junit_counts(xml)
    if stage.status != "skipped":
        stage.note = _join_notes(stage.note, _count_note(counts), note)
    return counts


def _k(size: str, config_names: list, providers: tuple, negate: bool = False) -> str:
    chosen = f"({' or '.join(providers)})"
    expr = f"{size} and {'not ' if negate else ''}{chosen}"
    return expr + (f" and ({' or '.join(config_names)})" if config_names else "")


def stage_bench(check: Check, name: str, test_args: list) -> Optional[dict]:
    xml = check.out / f"junit-{name}.xml"
    env = {"UNIMOE_BENCH_SAVE": str(check.out)}
    if check.dry:
        env["UNIMOE_BENCH_SAVE_CPU"] = "1"
    # --bench-tables: the log keeps the harness's own side-by-side summary (peak memory, every provider).
    stage = check.run(Stage(name), [_pytest(*test_args, "--bench-tables", f"--junitxml={xml}")], env=env)
    counts = junit_counts(xml)
    if stage.status != "skipped":
        stage.note = _join_notes(stage.note, _count_note(counts))
    return counts


def headline_ids(size: str, shapes: list) -> list:
    """test_layer.py's node ids of the headline rows, in the order they should run: per shape and
    mode, ours first, then torch._grouped_mm, the dense chain and Liger."""
    return [f"benchmarks/test_layer.py::test_layer[{size}-{name}-{mode}-{provider}]"
            for name in shapes for mode in MODES for provider in HEADLINE_PROVIDERS]


def stage_profile(check: Check, size: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.layer_profile", "--shape", HEADLINE[0], "--size", size,
           "--out", str(check.out)]
    check.run(Stage("profile"), [cmd])


def stage_decode(check: Check, size: str, config_names: list) -> set:
    """The decode sizes and the host overhead (test_decode.py); the failed cells of the table."""
    from .configs import DECODE_BASES

    chosen = [c for c in config_names if c in DECODE_BASES]
    if config_names and not chosen:
        check.skip("decode", f"--configs names none of {', '.join(DECODE_BASES)}")
        return set()
    # Their ids carry the base shape's name (qwen3-30b-a3b-T8, mixtral-T1, qwen3-30b-a3b-T4096).
    expr = size + (f" and ({' or '.join(chosen)})" if chosen else "")
    counts = stage_bench(check, "decode", ["benchmarks/test_decode.py", "-k", expr])
    return failed_cells(counts["failures"] if counts else [])


def stage_sweep(check: Check) -> None:
    if not os.environ.get(SWEEP_ENV):
        check.skip("sweep", f"{SWEEP_ENV} not set")
    else:
        sweep_out = check.out / "sweep"
        sweep_out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.sweep_configs", "--out", str(sweep_out)]
        shapes = [s for s in re.split(r"[,\s]+", os.environ[SWEEP_ENV]) if s and s != "1"]
        if shapes:  # UNIMOE_SWEEP=qwen3-30b-a3b,mixtral names the shapes; =1 leaves the module's default
            cmd += ["--shapes", *shapes]
        stage = check.run(Stage("sweep"), [cmd])
        stage.note = _join_notes(stage.note, f"tuned table in {sweep_out}")


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


def kernel_lines(out: Path, since: float) -> list:
    """The kernel stage's table, from this run's kernels.json (none when the stage did not write it)."""
    from .kernel_stage import render

    path = out / "kernels.json"
    if not path.exists() or path.stat().st_mtime < since:
        return []
    return render(json.loads(path.read_text()).get("cases", []))


def profile_lines(out: Path, since: float) -> list:
    """The per-kernel breakdown of one layer call, from this run's profile.json."""
    from .layer_profile import render

    path = out / "profile.json"
    if not path.exists() or path.stat().st_mtime < since:
        return []
    return render(json.loads(path.read_text()))


def summary(check: Check, prov: dict, records: list, failed: set, interrupted: bool, since: float) -> list:
    """Stages and provenance first, then the kernel table, the layer table, the per-kernel profile,
    decode and host overhead."""
    title = f" GPU check: {provenance_line(prov)} "
    lines = ["", f"{title:=^110}", f"{'stage':<10} {'status':<13} {'time':>7} {'start':>6}  note"]
    for s in check.stages:
        start = f"{s.start_s:.0f}" if s.start_s is not None else "-"
        lines.append(f"{s.name:<10} {s.status:<13} {s.seconds:>6.1f}s {start:>6}  {s.note}")
    total = time.monotonic() - check.t0
    lines.append(f"{'total':<10} {'interrupted' if interrupted else '':<13} {total:>6.1f}s {'':>6}  "
                 f"budget {check.budget:.0f} s; logs, JSON and summary.json in {check.out}")
    lines += anchor_lines(records)
    lines += kernel_lines(check.out, since)
    lines.append("")
    lines += render_table(records, failed)
    lines += profile_lines(check.out, since)
    lines += render_decode_table(records, failed) + render_host_table(records, failed)
    return lines


def write_summary_json(check: Check, prov: dict, records: list, interrupted: bool) -> Path:
    """summary.json: provenance, each stage's status, time, start, cap and note, and what the run wrote."""
    data = {
        "provenance": prov,
        "budget_s": check.budget,
        "total_s": round(time.monotonic() - check.t0, 1),
        "interrupted": interrupted,
        "stages": [{k: v for k, v in asdict(s).items() if k != "output"} for s in check.stages],
        "records": len(records),
        "files": sorted(p.name for p in check.out.iterdir() if p.is_file() and p.stat().st_mtime >= check.t0_wall),
    }
    path = check.out / "summary.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _default_out() -> Path:
    return Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu_check")


def parse_plants(spec: str) -> tuple[dict, list]:
    """--plant items: stage:NAME=ok|fail|hang (the stage runs that instead) and case:KIND=CASE
    (passed to the kernel stage as --plant KIND:CASE). Returns ({stage: kind}, kernel_stage args)."""
    stages, cases = {}, []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        what, _, rest = item.partition(":")
        name, _, kind = rest.partition("=")
        if what == "stage" and kind in PLANTED and name in (*STAGES, *EXTRA):
            stages[name] = kind
        elif what == "case" and name and kind:
            cases.append(f"{name}:{kind}")
        else:
            raise ValueError(f"--plant {item!r}: want stage:NAME=ok|fail|hang or case:fail|hang|wrong=CASE")
    return stages, (["--plant", ",".join(cases)] if cases else [])


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT, else benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all stages (default {BUDGET_S})")
    parser.add_argument("--dry", action="store_true", help=f"dry mode even with a GPU (also {DRY_ENV}=1)")
    parser.add_argument("--plan", action="store_true", help="print the stages, caps and budget; run nothing")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to leave out, of {','.join(STAGES)}")
    parser.add_argument("--extra", default="", help=f"comma-separated stages to run after the tests: {','.join(EXTRA)}")
    parser.add_argument("--build", action="store_true", default=os.environ.get("UNIMOE_GPU_CHECK_BUILD") == "1",
                        help="build _C in the background (also UNIMOE_GPU_CHECK_BUILD=1)")
    parser.add_argument("--configs", default=",".join(HEADLINE),
                        help="comma-separated shapes of the kernel, layer and decode stages (default: the headline)")
    parser.add_argument("--kernel-args", default="", help="more arguments of benchmarks.kernel_stage (quoted)")
    parser.add_argument("--tests", default="tests", help="comma-separated test paths of the tests stage")
    # on_device: every kernel test taking the `device` fixture runs on the GPU too (fp32/fp16 edge
    # cases, LoRA, dropout, gradients), not only the GPU-only ones. Dry: `gpu` only (they skip).
    parser.add_argument("--marker", default=None,
                        help="pytest -m expression of the tests stage ('' for none; default 'gpu or on_device', "
                             "dry 'gpu')")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("UNIMOE_GPU_CHECK_WORKERS", WORKERS)),
                        help=f"xdist workers of the tests stage (default {WORKERS})")
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE=S", help="override a stage's cap")
    parser.add_argument("--grace", type=float, default=GRACE_S, help="seconds from SIGINT to SIGKILL at a limit")
    parser.add_argument("--plant", action="append", default=[],
                        help="stage:NAME=ok|fail|hang or case:fail|hang|wrong=CASE (comma-separated, repeatable): a "
                             "planted failure or hang, to see it isolated")
    parser.add_argument("--table", type=Path, default=None, metavar="DIR",
                        help="only print the tables of the JSON files in DIR")
    args = parser.parse_args(argv)

    if args.table is not None:
        records, _ = load_records(args.table)
        print("\n".join(anchor_lines(records) + kernel_lines(args.table, 0) + render_table(records)
                        + profile_lines(args.table, 0) + render_decode_table(records) + render_host_table(records)))
        return 0
    skip = {s for s in args.skip.split(",") if s}
    extra = [s for s in args.extra.split(",") if s]
    if skip - set(STAGES) or set(extra) - set(EXTRA):
        parser.error(f"--skip / --extra: unknown stages {sorted((skip - set(STAGES)) | (set(extra) - set(EXTRA)))}; "
                     f"stages are {STAGES}, extras {EXTRA}")
    import torch  # after argument parsing: --help and --table need no torch

    dry = args.dry or os.environ.get(DRY_ENV, "0") not in ("", "0") or not torch.cuda.is_available()
    caps = {**CAPS_S, **(DRY_CAPS_S if dry else {})}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        if name not in caps:
            parser.error(f"--cap {item}: unknown stage")
        caps[name] = float(seconds)
    try:
        stage_plants, case_plants = parse_plants(",".join(args.plant))
    except ValueError as err:
        parser.error(str(err))
    out = (args.out or _default_out()).resolve()
    check = Check(out=out, dry=dry, budget=args.budget, grace=args.grace, caps=caps, plants=stage_plants)
    stages = [s for s in STAGES if s not in skip]
    if args.plan:
        print("\n".join(plan_lines(check, stages, extra, args.build)))
        return 0
    (out / "logs").mkdir(parents=True, exist_ok=True)
    prov = provenance(dry)
    print(f"[gpu_check] {provenance_line(prov)}", flush=True)
    print("\n".join(plan_lines(check, stages, extra, args.build)), flush=True)
    signal.signal(signal.SIGTERM, check.interrupt)
    signal.signal(signal.SIGINT, check.interrupt)
    size = "tiny" if dry else "full"
    configs = [c for c in args.configs.split(",") if c]
    marker = args.marker if args.marker is not None else ("gpu" if dry else "gpu or on_device")
    failed: set = set()
    interrupted = False
    bg = None
    try:
        for name in [*STAGES, *extra]:
            poll_build(check, bg)
            if name in skip:
                check.skip(name, "--skip")
            elif name == "wheels":
                stage_wheels(check)
            elif name == "build":
                bg = start_build(check, args.build)
            elif name == "kernels":
                stage_kernels(check, [c for c in configs if c in HEADLINE] or list(HEADLINE),
                              shlex.split(args.kernel_args) + case_plants)
            elif name == "layer":
                counts = stage_bench(check, "layer", headline_ids(size, [c for c in configs if c in HEADLINE]))
                failed |= failed_cells(counts["failures"] if counts else [])
            elif name == "profile":
                stage_profile(check, size)
            elif name == "decode":
                failed |= stage_decode(check, size, configs)
            elif name == "tests":
                stage_tests(check, [p for p in args.tests.split(",") if p], marker, args.workers)
            elif name == "sweep":
                stage_sweep(check)
            else:
                from .configs import NAMES

                others = [c for c in NAMES if c not in HEADLINE]
                test_args = {
                    "gmlp": ["benchmarks/test_ops.py", "-k", _k(size, configs, ("test_grouped_mlp",))],
                    "more": ["benchmarks/test_layer.py", "-k", _k(size, others, TABLE_PROVIDERS)],
                    "baselines": ["benchmarks/test_layer.py", "-k", _k(size, [], TABLE_PROVIDERS, negate=True)],
                }[name]
                counts = stage_bench(check, name, test_args)
                failed |= failed_cells(counts["failures"] if counts else [])
        poll_build(check, bg)
    except KeyboardInterrupt:
        interrupted = True
    finish_build(check, bg)
    records, meta = load_records(out, check.t0_wall)
    try:
        from .render_results import render_markdown

        (out / "RESULTS.md").write_text(render_markdown([{**meta, "file": "(this run)", "records": records}]))
    except Exception as err:  # the tables below matter more than the markdown copy
        print(f"[gpu_check] RESULTS.md not written: {type(err).__name__}: {err}")
    lines = summary(check, prov, records, failed, interrupted, check.t0_wall)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    write_summary_json(check, prov, records, interrupted)
    print("\n".join(lines), flush=True)
    bad = [s for s in check.stages if s.status not in ("ok", "skipped")]
    return 1 if bad or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
