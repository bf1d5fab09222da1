"""The GPU check's kernel stage: the expert GEMMs at the headline shapes, one process per case.

    python -m benchmarks.kernel_stage --out DIR [--shapes qwen3-30b-a3b,mixtral] [--alternatives 3]
                                      [--roles up_glu,down,...] [--jobs N] [--case-timeout S] [--plant SPEC]
    python -m benchmarks.kernel_stage --compile-times [--shapes ...]   sm_90 compile seconds per case, no GPU

A case is one grouped GEMM launch of one role of one layer (up_glu, down, dact, dgrad, wgrad, as
ops/grouped_mlp_ops.py launches them: gathered x, z stored, the weighted combine's backward in
dact, dW_gate_up for wgrad) with one config: the shipped one (gemm_configs.config's answer for this
GPU: its table or the heuristic) or an alternative taken from gemm_configs.candidates (persistent,
wider N, other stage count; those that fit in shared memory and differ from the shipped one).

Flow of a case, in a process of its own (a sticky CUDA fault, an illegal address, ends that
process and nothing else; a hang is killed at --case-timeout and reported TIMEOUT):

    inputs at the shape (full on a GPU, small in the dry run), routing with expert 0 empty and
    expert 1 ragged (a row count that no tile size divides); outputs pre-filled with NaN, so any
    row the kernel forgets to write shows up
    first launch (Triton compiles here) through the public launcher with cfg=
    check: every output finite; on experts {empty, ragged, middle, last} against a bf16 torch
    reference (fp32 elementwise epilogue), the weight gradient of the empty expert exactly zero
    timing: CUDA events (unimoe_kernels.timing), median of REPS calls; TFLOP/s from the role's FLOPs.
    The timed part holds a file lock, so no two cases time at once while others compile and check.

The driver runs --jobs cases at a time (Triton's compile is CPU work: the GPU host's cores run
several at once) and, while they run, compiles each case's launch at the full shape for sm_90 with
sm90_check.compile_launch: the compiled facts (registers, spills, shared memory, warp-group MMA:
whatever its report holds) beside the times. It writes DIR/kernels/<case>.json per case and
DIR/kernels.json, and prints a table.
Without CUDA (or with --dry) the cases run Triton's interpreter at the tiny sizes in fp32: a test
of the plumbing, not a measurement.

--plant SPEC (comma-separated KIND:CASE, KIND one of fail, hang, wrong) makes a case raise, sleep
forever or corrupt one checked row of its output, to show that it stops only itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent

HEADLINE = ("qwen3-30b-a3b", "mixtral")
ROLES = ("up_glu", "down", "dact", "dgrad", "wgrad")
ALTERNATIVES = 3  # beyond the shipped config: persistent, wider N, stages (the 2-3)
# The dry run: one alternative. A case there is a Python start (~3 s on 2 cores) and two
# interpreter launches (~1-2 s each): 20 cases two at a time take ~1.5 minutes, 40 twice that.
DRY_ALTERNATIVES = 1
# Cases at once on a GPU host: it has 16 cores and each case compiles on one; 6 leaves cores for
# ptxas's own threads and the parent, and keeps six full-size mixtral case inputs (~5 GB each)
# well inside 80 GB.
GPU_JOBS = 6
CPU_JOBS = 2  # the dry run: one per core of a 2-core CI machine
# A case on the GPU: interpreter start and imports ~5 s, Triton's compile 0.5-4 s (measured for
# sm_90 on a 2-core CPU, benchmarks/NOTES.md), inputs and the bf16 check a second or two, the
# timing well under one. 60 s is several times that; a case past it is hung, not slow.
GPU_CASE_TIMEOUT_S = 60
CPU_CASE_TIMEOUT_S = 120  # the interpreter at the small sizes on 2 busy cores: ~10 s a case
WARMUP, REPS = 3, 20  # as benchmarks/harness.py: the median of 20 is stable to ~1% on a quiet GPU
DRY_WARMUP, DRY_REPS = 0, 1  # the interpreter: the timing path runs, its numbers mean nothing
# bf16 output against a bf16 reference: each rounds to 8 significant bits (2^-8 relative), the
# kernel and cuBLAS sum in different orders, and the GLU epilogue multiplies two rounded values;
# 2^-5 of the checked block's largest magnitude leaves room for that and none for a wrong tile.
BF16_TOL = 2.0**-5
FP32_TOL = 1e-4  # the dry run's fp32 interpreter against fp32 torch: summation order only
# The dry run's sizes: benchmarks.configs' tiny ones with at most DRY_MAX_E experts and DRY_MAX_T
# tokens. The interpreter's cost grows with the programs (N / BLOCK_M + E row tiles per column
# tile), each searching an E-wide vector for its tile: at qwen3-30b-a3b's tiny size (E=128) one
# launch took 7-12 s on 2 cores, at E=16 about one.
DRY_MAX_E, DRY_MAX_T = 16, 128
RAGGED_SHORT = 37  # expert 1 gets this many rows fewer than its even share: no tile size divides it
LOCK_NAME = "gpu-timing.lock"
PLANT_KINDS = ("fail", "hang", "wrong")
STATUS_ORDER = ("ok", "FAILED", "TIMEOUT", "not run")  # a case's statuses, in the order counts are told


# ----------------------------------------------------------------------------------------------
# Plan: the cases and their configs
# ----------------------------------------------------------------------------------------------


def _shape(name: str) -> tuple:
    from unimoe_kernels.ops.sm90_check import NAMED_SHAPES

    return NAMED_SHAPES[name]


def _role_key(role: str, shape: tuple) -> tuple:
    """(role, K, NOUT) of a role's launch in a layer of `shape`: the call that gemm_configs.config
    and sm90_check's recorded launches carry. wgrad is dW_gate_up (P=2F, Q=H), the larger of the two."""
    _, h, f, _, _, _ = shape
    return {"up_glu": ("up_glu", h, f), "down": ("down", f, h), "dact": ("dact", h, f),
            "dgrad": ("dgrad", 2 * f, h), "wgrad": ("wgrad", 2 * f, h)}[role]


def _clean(cfg: dict) -> dict:
    """A config as the launcher uses it: the kernel's keywords (gemm_configs.kernel_meta) and the
    launcher's own switches (PERSISTENT, TMA); a table entry's annotations (its ms, why it was
    chosen) dropped, so that equal launches compare equal."""
    from unimoe_kernels.ops import gemm_configs

    out = dict(gemm_configs.kernel_meta(cfg))
    out.update({k: cfg[k] for k in ("PERSISTENT", "TMA") if k in cfg})
    if "BLOCK_M" in out:
        out.setdefault("PERSISTENT", False)
    return out


def _recorded(shape: tuple, device_name: str, override: Optional[tuple] = None) -> tuple[list, dict]:
    """sm90_check's launches of one layer at `shape` (the configs that GPU would get), and the
    config dict each (role, K, NOUT) was given; override (key, cfg) replaces one role's config."""
    from unimoe_kernels.ops import gemm_configs, sm90_check

    real = gemm_configs.config
    given: dict = {}

    def spy(role, dtype, k, nout, e, rows, device, run=None, rank=0):
        key = (role, k, nout)
        cfg = dict(override[1]) if override and key == override[0] else real(role, dtype, k, nout, e, rows, device,
                                                                              run=run, rank=rank)
        given[key] = _clean(cfg)
        return cfg

    with mock.patch.object(gemm_configs, "config", spy):
        launches = sm90_check.layer_launches(shape, device_name=device_name)
    return launches, given


def _same_tile(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_Q", "BLOCK_K"))


def _width(cfg: dict) -> int:
    return cfg.get("BLOCK_N", cfg.get("BLOCK_Q", 0))


def alternatives(role: str, shipped: dict, count: int = ALTERNATIVES, rank: int = 0) -> list[tuple[str, dict]]:
    """Up to `count` (label, config) from gemm_configs.candidates(role) that fit in sm_90's shared
    memory and differ from the shipped config: first the shipped tile with the other schedule
    ("persistent", or "per-tile" when the shipped one is persistent), a wider tile, the shipped tile
    at another stage count (each where the candidates have one), then the remaining candidates in
    their own order ("cand<n>", n its place in the list)."""
    import torch

    from unimoe_kernels.ops import gemm_configs

    dtype = torch.bfloat16
    pool = [_clean(c) for c in gemm_configs.candidates(role, dtype)]
    pool = [c for c in pool if c != shipped and gemm_configs.smem_estimate(role, dtype, c, rank)
            <= gemm_configs.SMEM_LIMIT_SM90]
    pool = list({json.dumps(c, sort_keys=True): c for c in pool}.values())  # candidates may repeat
    flip = "per-tile" if shipped.get("PERSISTENT") else "persistent"
    wanted = [
        (flip, lambda c: "PERSISTENT" in c and c["PERSISTENT"] != shipped.get("PERSISTENT")
         and _same_tile(c, shipped) and c["num_stages"] == shipped["num_stages"]),
        (flip, lambda c: "PERSISTENT" in c and c["PERSISTENT"] != shipped.get("PERSISTENT")),
        ("wider-N", lambda c: _width(c) > _width(shipped) and c.get("PERSISTENT") == shipped.get("PERSISTENT")),
        ("wider-N", lambda c: _width(c) > _width(shipped)),
        ("stages", lambda c: _same_tile(c, shipped) and c["num_stages"] != shipped["num_stages"]
         and c.get("PERSISTENT") == shipped.get("PERSISTENT")),
    ]
    picked: list = []
    for label, fits in wanted:
        if len(picked) >= count or label in (lb for lb, _ in picked):
            continue
        hit = next((c for c in pool if fits(c) and all(c != p for _, p in picked)), None)
        if hit is not None:
            picked.append((label, hit))
    for c in pool:
        if len(picked) >= count:
            break
        if all(c != p for _, p in picked):
            picked.append((f"cand{len(picked) + 1}", c))  # numbered: a case id names one config
    return picked


def case_id(shape: str, role: str, label: str) -> str:
    return f"{shape}/{role}/{label}"


def plan(shapes: tuple = HEADLINE, roles: tuple = ROLES, count: int = ALTERNATIVES,
         device_name: Optional[str] = None) -> list[dict]:
    """The cases: per shape and role, the shipped config for `device_name` (default: this GPU, or
    the H100 without one) and up to `count` alternatives. Each case is a JSON-able dict."""
    from unimoe_kernels.ops import sm90_check

    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else sm90_check.H100
    cases = []
    for name in shapes:
        shape = _shape(name)
        _, given = _recorded(shape, device_name)
        for role in roles:
            key = _role_key(role, shape)
            shipped = given[key]
            for label, cfg in [("shipped", shipped)] + alternatives(role, shipped, count, rank=shape[5]):
                cases.append({"id": case_id(name, role, label), "shape": name, "role": role, "label": label,
                              "cfg": cfg, "device_name": device_name})
    return cases


# ----------------------------------------------------------------------------------------------
# One case: inputs, launch, reference, timing
# ----------------------------------------------------------------------------------------------


def compiled_facts(case: dict) -> dict:
    """sm90_check's report of this case's launch at the full shape, compiled for sm_90 (a dict of
    whatever fields its Facts holds, its problems, and describe()); {"error": ...} if it fails."""
    from unimoe_kernels.ops import sm90_check

    shape = _shape(case["shape"])
    key = _role_key(case["role"], shape)
    try:
        launches, _ = _recorded(shape, case["device_name"], override=(key, case["cfg"]))
        launch = next(la for la in launches if (la.call[0], la.call[2], la.call[3]) == key)
        t0 = time.perf_counter()
        res = _compile(launch)
        facts = _as_dict(res)
        facts["compile_s"] = round(time.perf_counter() - t0, 3)
        problems = getattr(res, "problems", None)
        if callable(problems):
            facts["problems"] = list(problems(small_mma=sm90_check.small_tile(launch)))
        facts["describe"] = sm90_check.describe(launch)
        return facts
    except Exception as err:  # facts are context for the timing: a failure here is reported, not fatal
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def _compile(launch):
    """sm90_check.compile_launch: the one compile that the facts and --compile-times both make."""
    from unimoe_kernels.ops import sm90_check

    return sm90_check.compile_launch(launch)


def _as_dict(res) -> dict:
    """A report object as a dict, whatever its kind (named tuple, dataclass, dict, plain object)."""
    import dataclasses

    if hasattr(res, "_asdict"):
        return dict(res._asdict())
    if dataclasses.is_dataclass(res):
        return dataclasses.asdict(res)
    if isinstance(res, dict):
        return dict(res)
    return {k: v for k, v in vars(res).items() if not k.startswith("_")}


def routing(n: int, num_experts: int, tokens: int, top_k: int, device) -> tuple:
    """(offsets [E+1] int32, gather [N] int32 token of each sorted row, counts): expert 0 empty,
    expert 1 ragged (RAGGED_SHORT rows fewer than an even share), the rest of the rows spread evenly;
    the sorted rows visit the token slots in a fixed random order (each token appears top_k times)."""
    import torch

    share = n // num_experts
    counts = [share] * num_experts
    counts[0] = 0
    if num_experts > 1:
        counts[1] = max(1, share - RAGGED_SHORT) if share > RAGGED_SHORT else max(1, share // 2 + 1)
    spare = n - sum(counts)
    for i in range(spare):  # what the empty and ragged experts gave up, to the others in turn
        counts[2 + i % (num_experts - 2)] += 1
    assert sum(counts) == n and min(counts[2:]) > 0
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    g = torch.Generator().manual_seed(5)
    gather = (torch.randperm(tokens * top_k, generator=g) // top_k).to(torch.int32).to(device)
    return offsets, gather, counts


def checked_experts(num_experts: int) -> list:
    """The experts the reference covers: the empty one, the ragged one, one in the middle, the last."""
    return sorted({0, 1, num_experts // 2, num_experts - 1})


def _nan(*size, dtype, device):
    import torch

    return torch.full(size, float("nan"), dtype=dtype, device=device)


class Built(NamedTuple):
    """One role's launch on its inputs, with what the check needs."""

    launch: Callable[[], None]  # the public launcher with the case's cfg
    outs: dict  # {name: output tensor}, NaN before the first launch
    ref: Callable  # ref(expert, sorted row indices) -> {name: the bf16 torch reference}
    flops: int
    offsets: object  # [E+1] expert row offsets
    returned: Optional[dict] = None  # outputs the launcher returns, filled by each launch


def build(role: str, dims: tuple, cfg: dict, dtype, device) -> Built:
    """One role at dims (T, H, F, E, k), with the launcher called as grouped_mlp_ops calls it for
    that role (swiglu, no LoRA)."""
    import torch

    from unimoe_kernels.ops.grouped_gemm_launch import act_code, grouped_mm, grouped_xty

    t, h, f, e, k = dims
    n = t * k
    act, glu, _consts = act_code("swiglu")
    offsets, gather, _ = routing(n, e, t, k, device)
    g = torch.Generator(device=device).manual_seed(11)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=g) * scale).to(dtype)

    mm = torch.matmul  # in the operands' dtype: cuBLAS's bf16 GEMM (fp32 accumulate) on a GPU

    def silu_parts(zg):
        s = torch.sigmoid(zg)
        return zg * s, s * (1 + zg * (1 - s))

    if role == "up_glu":
        x, w_gu = randn(t, h), randn(e, 2 * f, h, scale=h**-0.5)
        hid, z = _nan(n, f, dtype=dtype, device=device), _nan(n, 2 * f, dtype=dtype, device=device)
        w1 = w_gu.transpose(1, 2)

        def launch():
            grouped_mm(x, w1, hid, offsets, role="up_glu", nout=f, epilogue=1, act=act, glu=glu, z=z, store_z=True,
                       up_offsets=(f * z.stride(1), 0), gather=gather, cfg=cfg)

        def ref(ex, rows):
            ze = mm(x[gather[rows].long()], w_gu[ex].T).float()
            a, _ = silu_parts(ze[:, :f])
            return {"z": ze, "h": a * ze[:, f:]}

        return Built(launch, {"z": z, "h": hid}, ref, 2 * n * h * 2 * f, offsets)
    if role == "down":
        hid, w_d = randn(n, f), randn(e, h, f, scale=f**-0.5)
        y = _nan(n, h, dtype=dtype, device=device)

        def launch():
            grouped_mm(hid, w_d.transpose(1, 2), y, offsets, role="down", nout=h, cfg=cfg)

        return Built(launch, {"y": y}, lambda ex, rows: {"y": mm(hid[rows], w_d[ex].T).float()}, 2 * n * f * h, offsets)
    if role == "dact":
        dout, w_d, z = randn(t, h), randn(e, h, f, scale=h**-0.5), randn(n, 2 * f)
        w_sorted = torch.rand(n, device=device, generator=g, dtype=torch.float32)
        dz, hid = _nan(n, 2 * f, dtype=dtype, device=device), _nan(n, f, dtype=dtype, device=device)
        ds = {}

        def launch():
            ds["ds"] = grouped_mm(dout, w_d, dz, offsets, role="dact", nout=f, epilogue=2, act=act, glu=glu, z=z,
                                  h=hid, up_offsets=(f * z.stride(1), f * dz.stride(1)), gather=gather,
                                  row_scale=w_sorted, cfg=cfg)

        def ref(ex, rows):
            dh = mm(dout[gather[rows].long()], w_d[ex]).float()
            zg, zu = z[rows, :f].float(), z[rows, f:].float()
            a, da = silu_parts(zg)
            hh = a * zu
            w = w_sorted[rows, None]
            return {"dz": torch.cat([w * dh * zu * da, w * dh * a], 1), "h": hh * w, "ds": (dh * hh).sum(1)}

        return Built(launch, {"dz": dz, "h": hid}, ref, 2 * n * h * f, offsets, ds)
    if role == "dgrad":
        dz, w_gu = randn(n, 2 * f), randn(e, 2 * f, h, scale=(2 * f) ** -0.5)
        dx = _nan(n, h, dtype=dtype, device=device)

        def launch():
            grouped_mm(dz, w_gu, dx, offsets, role="dgrad", nout=h, cfg=cfg)

        return Built(launch, {"dx": dx}, lambda ex, rows: {"dx": mm(dz[rows], w_gu[ex]).float()}, 2 * n * 2 * f * h,
                     offsets)
    if role == "wgrad":
        dz, x = randn(n, 2 * f, scale=n**-0.5), randn(t, h)
        dw = _nan(e, 2 * f, h, dtype=dtype, device=device)

        def launch():
            grouped_xty(dz, x, dw, offsets, gather_y=gather, cfg=cfg)

        def ref(ex, rows):
            return {"dw": mm(dz[rows].T, x[gather[rows].long()]).float()}

        return Built(launch, {"dw": dw}, ref, 2 * n * 2 * f * h, offsets)
    raise ValueError(f"unknown role {role!r}; roles are {ROLES}")


def check(role: str, outs: dict, ref, offsets, num_experts: int, tol: float, extra: Optional[dict] = None) -> dict:
    """{output: worst error over the checked experts, relative to the reference block's largest
    magnitude}; raises AssertionError on a non-finite output anywhere or an error above tol."""
    import torch

    outs = {**outs, **(extra or {})}
    for name, t in outs.items():
        if t is None or not torch.isfinite(t).all():
            bad = "no result" if t is None else f"{int((~torch.isfinite(t)).sum())} non-finite values (NaN prefill)"
            raise AssertionError(f"{role}: {name}: {bad}")
    bounds = offsets.tolist()
    worst: dict = {}
    for ex in checked_experts(num_experts):
        rows = torch.arange(bounds[ex], bounds[ex + 1], device=offsets.device)
        want = ref(ex, rows)
        for name, w in want.items():
            got = outs[name][ex] if role == "wgrad" else outs[name][rows]
            got = got.float()
            if rows.numel() == 0:
                if role == "wgrad":  # an expert without rows: its weight gradient is exactly zero
                    assert bool((got == 0).all()), f"{role}: {name} of the empty expert {ex} is not zero"
                    worst.setdefault(name, 0.0)
                continue
            scale = float(w.abs().max()) or 1.0
            err = float((got - w).abs().max()) / scale
            worst[name] = max(worst.get(name, 0.0), err)
            assert err <= tol, f"{role}: {name} of expert {ex} ({rows.numel()} rows): error {err:.3g} > {tol:.3g}"
    return worst


def case_dims(shape: str, dry: bool) -> tuple:
    """(T, H, F, E, k) a case runs at: the full size on a GPU, a small one in the dry run."""
    from . import configs

    c = configs.get(shape, "tiny" if dry else "full")
    if dry:
        return min(c.T, DRY_MAX_T), c.H, c.F, min(c.E, DRY_MAX_E), c.k
    return c.T, c.H, c.F, c.E, c.k


@contextlib.contextmanager
def _timing_lock(out_dir: Path):
    """One case times at a time (a file lock beside the results), others compile and check meanwhile."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_case(case: dict, out_dir: Path, dry: bool, plant: Optional[str] = None) -> dict:
    """Run one case in this process (see the module docstring) and return its result dict; any
    exception propagates (the caller's process reports it)."""
    import torch

    from unimoe_kernels import timing

    res = {k: case[k] for k in ("id", "shape", "role", "label", "cfg")}
    if plant == "hang":
        while True:  # planted: a case that never returns, for the driver's timeout
            time.sleep(60)
    dims = case_dims(case["shape"], dry)
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    res.update(size="tiny" if dry else "full", dims=dict(zip("THFEk", dims)), dtype=str(dtype).split(".")[-1])
    b = build(case["role"], dims, case["cfg"], dtype, device)
    if plant == "fail":
        raise RuntimeError("planted failure (--plant fail)")
    t0 = time.perf_counter()
    b.launch()
    timing.sync(device)
    res["first_call_s"] = round(time.perf_counter() - t0, 3)  # Triton's compile, or its disk cache
    if plant == "wrong":
        first = next(iter(b.outs.values()))
        rows = b.offsets.tolist()
        target = first[1] if case["role"] == "wgrad" else first[rows[1]]  # the ragged expert
        target.add_(1.0)
    res["check"] = check(case["role"], b.outs, b.ref, b.offsets, dims[3], FP32_TOL if dry else BF16_TOL, b.returned)
    warmup, reps = (DRY_WARMUP, DRY_REPS) if dry else (WARMUP, REPS)
    with _timing_lock(out_dir):
        times = timing.time_calls(b.launch, reps, warmup=warmup, device=device)
    res["ms"] = times.median
    res["tflops"] = b.flops / (times.median * 1e-3) / 1e12
    res["status"] = "ok"
    return res


# ----------------------------------------------------------------------------------------------
# Driver: cases in processes of their own
# ----------------------------------------------------------------------------------------------


def _file_name(cid: str) -> str:
    return cid.replace("/", "__")


def parse_plants(spec: str) -> dict:
    """'fail:ID,hang:ID' -> {ID: kind}."""
    plants = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, cid = item.partition(":")
        if kind not in PLANT_KINDS or not cid:
            raise ValueError(f"--plant item {item!r}: want KIND:CASE with KIND one of {PLANT_KINDS}")
        plants[cid] = kind
    return plants


def _stop(proc: subprocess.Popen) -> None:
    """Kill a case's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class _Runner:
    """run_all's state: cases waiting, running (id -> process, start, case, log), finished."""

    def __init__(self, cases, out, dry, jobs, case_timeout, plants, deadline, facts):
        self.pending = list(cases)
        self.running: dict = {}
        self.results: dict = {}
        self.to_compile = [c for c in cases if facts == "all" or (facts == "shipped" and c["label"] == "shipped")]
        self.facts_of: dict = {}
        self.out, self.dry, self.jobs, self.case_timeout = out, dry, jobs, case_timeout
        self.plants, self.deadline = plants, deadline
        self.case_dir, self.log_dir = out / "kernels", out / "logs" / "kernels"
        self.case_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        if dry:
            self.env["TRITON_INTERPRET"] = "1"

    def late(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def start(self, case: dict) -> None:
        if self.late():
            self.results[case["id"]] = {**case, "status": "not run", "error": "the stage's time ran out first"}
            return
        (self.case_dir / f"{_file_name(case['id'])}.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "benchmarks.kernel_stage", "--case", json.dumps(case), "--out", str(self.out)]
        if self.dry:
            cmd.append("--dry")
        if case["id"] in self.plants:
            cmd += ["--plant", f"{self.plants[case['id']]}:{case['id']}"]
        log = open(self.log_dir / f"{_file_name(case['id'])}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.running[case["id"]] = (proc, time.monotonic(), case, log)

    def collect(self, cid: str) -> None:
        """Read a case that exited or ran past its timeout (then killed)."""
        proc, start, case, log = self.running.pop(cid)
        elapsed = time.monotonic() - start
        timed_out = proc.poll() is None
        if timed_out:
            _stop(proc)
        log.close()
        result_path = self.case_dir / f"{_file_name(cid)}.json"
        if timed_out:
            res = {**case, "status": "TIMEOUT", "error": f"killed after {self.case_timeout:.0f} s"}
        elif result_path.exists():
            res = json.loads(result_path.read_text())
        else:
            lines = Path(log.name).read_text(errors="replace").strip().splitlines()
            res = {**case, "status": "FAILED",
                   "error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"[:300]}
        res["seconds"] = round(elapsed, 1)
        self.results[cid] = res
        print(f"[kernels] {cid:36s} {res['status']:8s} {elapsed:5.1f} s  {res.get('error') or _brief(res)}",
              flush=True)

    def loop(self) -> None:
        while self.pending or self.running:
            while self.pending and len(self.running) < self.jobs:
                self.start(self.pending.pop(0))
            if self.to_compile and not self.late():
                # A compile takes 0.5-4 s: the polls below wait that long at most, well inside a case's timeout.
                case = self.to_compile.pop(0)
                self.facts_of[case["id"]] = compiled_facts(case)
            else:
                time.sleep(0.1)
            for cid, (proc, start, _, _) in list(self.running.items()):
                if proc.poll() is not None or time.monotonic() - start > self.case_timeout:
                    self.collect(cid)

    def stop_all(self, why: str) -> None:
        """The stage's cap: stop the running cases (TIMEOUT) and mark the waiting ones not run."""
        for cid, (proc, start, case, log) in list(self.running.items()):
            _stop(proc)
            log.close()
            self.results[cid] = {**case, "status": "TIMEOUT", "error": why,
                                 "seconds": round(time.monotonic() - start, 1)}
        self.running.clear()
        for case in self.pending:
            self.results[case["id"]] = {**case, "status": "not run", "error": why}


def run_all(cases: list, out: Path, dry: bool, jobs: int, case_timeout: float, plants: dict,
            deadline: Optional[float] = None, facts: str = "all") -> list:
    """Every case in its own process, `jobs` at a time; returns the result dicts in plan order.
    A case past case_timeout is TIMEOUT, one that exits nonzero FAILED (its last error line), one
    not started before `deadline` (a time.monotonic()) "not run". Between polls this process
    compiles the launches of the cases `facts` names (all, shipped or none) for sm90_check's report
    (a persistent twin is the same kernel on another grid: Triton's cache answers it at once).
    SIGINT (the GPU check's stage cap) stops the running cases and still returns every result."""
    runner = _Runner(cases, out, dry, jobs, case_timeout, plants, deadline, facts)
    try:
        runner.loop()
    except KeyboardInterrupt:
        runner.stop_all("stopped at the stage's cap")
    for c in cases:
        if c["id"] in runner.facts_of:
            runner.results[c["id"]]["facts"] = runner.facts_of[c["id"]]
    return [runner.results[c["id"]] for c in cases]


def _brief(res: dict) -> str:
    ms = res.get("ms")
    return f"{ms:.3f} ms  {res.get('tflops', 0):.1f} TFLOP/s" if ms else ""


def _cfg_text(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_P": "P", "BLOCK_Q": "Q", "BLOCK_K": "K", "num_warps": "w",
             "num_stages": "s"}
    text = " ".join(f"{short[k]}{cfg[k]}" for k in short if k in cfg)
    return text + (" pers" if cfg.get("PERSISTENT") else "")


def render(results: list) -> list:
    """The kernel table: a row per case, its time, TFLOP/s, speed against the shipped config of the
    same role, the sm_90 facts (registers, spills, shared memory, warp-group MMA) and the check."""
    head = (f"{'shape':<14}{'role':<8}{'config':<11}{'tile':<25}{'ms':>9}{'TFLOP/s':>9}{'vs ship':>8} |"
            f"{'regs':>5}{'spill':>6}{'smem KB':>8}{'wgmma':>6} | {'check (max rel err)':<34}status")
    lines = ["", "kernels: the expert GEMMs one launch at a time (CUDA events), beside sm90_check's compile of "
                 "the same launch", head, "-" * len(head)]
    shipped = {(r["shape"], r["role"]): r.get("ms") for r in results if r.get("label") == "shipped"}
    for r in results:
        ms = r.get("ms")
        base = shipped.get((r["shape"], r["role"]))
        vs = f"{base / ms:.2f}x" if ms and base and r.get("label") != "shipped" else ""
        f = r.get("facts") or {}
        smem = f.get("shared_bytes")
        facts = (f"{f.get('registers', '-'):>5}{f.get('spill_bytes', '-'):>6}"
                 f"{(f'{smem / 1024:.0f}' if smem is not None else '-'):>8}"
                 f"{('yes' if f.get('warp_group_dot') else 'no') if 'warp_group_dot' in f else '-':>6}")
        chk = " ".join(f"{k} {v:.0e}" for k, v in (r.get("check") or {}).items())
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        ms_text, tf_text = (f"{ms:.3f}", f"{r['tflops']:.1f}") if ms else ("-", "-")
        lines.append(f"{r['shape']:<14}{r['role']:<8}{r['label']:<11}{_cfg_text(r['cfg']):<25}"
                     f"{ms_text:>9}{tf_text:>9}{vs:>8} |{facts} | {chk:<34}{status}"[:260])
    lines.append("vs ship: the shipped config's time / this config's (above 1.00x this one is faster). check: max |out"
                 " - ref| / max |ref| on the empty, ragged, middle and last experts.")
    return lines


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--shapes", default=",".join(HEADLINE), help="comma-separated named shapes")
    parser.add_argument("--roles", default=",".join(ROLES), help="comma-separated roles")
    parser.add_argument("--alternatives", type=int, default=None,
                        help=f"configs beyond the shipped one (default {ALTERNATIVES}, dry {DRY_ALTERNATIVES})")
    parser.add_argument("--jobs", type=int, default=0, help=f"cases at once (default {GPU_JOBS}, dry {CPU_JOBS})")
    parser.add_argument("--case-timeout", type=float, default=0, help="seconds per case (default: GPU "
                        f"{GPU_CASE_TIMEOUT_S}, dry {CPU_CASE_TIMEOUT_S})")
    parser.add_argument("--deadline", type=float, default=0, help="seconds after which no case starts (0: none)")
    parser.add_argument("--dry", action="store_true", help="the interpreter at the tiny sizes (also without CUDA)")
    parser.add_argument("--facts-for", choices=("all", "shipped", "none"), default="all",
                        help="cases whose launch this process compiles for sm90_check's report")
    parser.add_argument("--plant", default="", help="KIND:CASE,...: fail, hang or wrong in the named cases")
    parser.add_argument("--list", action="store_true", help="print the plan's case ids and configs; run nothing")
    parser.add_argument("--compile-times", action="store_true",
                        help="compile each case for sm_90 twice (cold, then from the cache); print seconds")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (the driver's children)
    args = parser.parse_args(argv)
    plants = parse_plants(args.plant)

    if args.case:
        case = json.loads(args.case)
        res = run_case(case, args.out, args.dry, plants.get(case["id"]))
        path = args.out / "kernels" / f"{_file_name(case['id'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        return 0
    shapes = tuple(s for s in args.shapes.split(",") if s)
    roles = tuple(r for r in args.roles.split(",") if r)
    if args.compile_times:
        return compile_times(shapes, roles, ALTERNATIVES if args.alternatives is None else args.alternatives, args.out)

    # This process compiles for sm_90 (the facts): Triton must not be in interpreter mode here. The
    # cases get TRITON_INTERPRET=1 back in the dry run (run_all).
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    dry = args.dry or not torch.cuda.is_available()
    t0 = time.monotonic()
    count = args.alternatives if args.alternatives is not None else DRY_ALTERNATIVES if dry else ALTERNATIVES
    facts = args.facts_for
    cases = plan(shapes, roles, count)
    if args.list:
        print("\n".join(f"{c['id']:36s} {_cfg_text(c['cfg'])}" for c in cases))
        return 0
    unknown = set(plants) - {c["id"] for c in cases}
    if unknown:
        parser.error(f"--plant names no case of the plan: {sorted(unknown)}")
    jobs = args.jobs or (CPU_JOBS if dry else GPU_JOBS)
    timeout = args.case_timeout or (CPU_CASE_TIMEOUT_S if dry else GPU_CASE_TIMEOUT_S)
    print(f"[kernels] {len(cases)} cases ({', '.join(shapes)}; {', '.join(roles)}; shipped + up to "
          f"{count} alternatives), {jobs} at a time, {timeout:.0f} s each, sm_90 facts for {facts}"
          f"{' (DRY: interpreter, tiny sizes, fp32)' if dry else ''}", flush=True)
    results = run_all(cases, args.out, dry, jobs, timeout, plants,
                      deadline=t0 + args.deadline if args.deadline else None, facts=facts)
    counts = {s: n for s in STATUS_ORDER if (n := sum(r["status"] == s for r in results))}
    summary = {"dry": dry, "seconds": round(time.monotonic() - t0, 1), "counts": counts, "cases": results}
    (args.out / "kernels.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print("\n".join(render(results)), flush=True)
    print(f"[kernels] {', '.join(f'{n} {s}' for s, n in counts.items())} in {summary['seconds']} s", flush=True)
    if counts.get("FAILED") or counts.get("TIMEOUT"):
        return 1
    return 2 if counts.get("ok", 0) < len(results) else 0  # 2: some cases never started (the deadline)


# ----------------------------------------------------------------------------------------------
# Compile times (CPU, no GPU): the budget's numbers
# ----------------------------------------------------------------------------------------------


def compile_times(shapes: tuple, roles: tuple, count: int, out: Path) -> int:
    """Compile each case's launch for sm_90 with sm90_check.compile_launch in a fresh Triton cache,
    then again from that cache; print both per case and write out/compile_times.json. The cold
    number is what a case costs the GPU host's CPU when nothing is cached; cold - warm is what a
    cache that hit would save."""
    from unimoe_kernels.ops import sm90_check

    os.environ.pop("TRITON_INTERPRET", None)
    cases = plan(shapes, roles, count, device_name=sm90_check.H100)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # triton reads it at each compile
        for passno in ("cold", "warm"):
            for i, case in enumerate(cases):
                shape = _shape(case["shape"])
                key = _role_key(case["role"], shape)
                launches, _ = _recorded(shape, case["device_name"], override=(key, case["cfg"]))
                launch = next(la for la in launches if (la.call[0], la.call[2], la.call[3]) == key)
                t0 = time.perf_counter()
                _compile(launch)
                dt = time.perf_counter() - t0
                if passno == "cold":
                    rows.append({"id": case["id"], "cfg": case["cfg"], "cold_s": round(dt, 3)})
                else:
                    rows[i]["warm_s"] = round(dt, 3)
                print(f"{passno} {case['id']:36s} {_cfg_text(case['cfg']):<25} {dt:6.2f} s", flush=True)
    cold = sorted(r["cold_s"] for r in rows)
    warm = sum(r["warm_s"] for r in rows)
    summary = {"cases": rows, "cold_total_s": round(sum(cold), 1), "warm_total_s": round(warm, 1),
               "cold_median_s": cold[len(cold) // 2], "cold_max_s": cold[-1], "cpus": os.cpu_count(),
               "load_avg": os.getloadavg()[0]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_times.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(rows)} launches: cold {summary['cold_total_s']} s in all (median {summary['cold_median_s']} s, "
          f"max {summary['cold_max_s']} s), from the cache {summary['warm_total_s']} s; {os.cpu_count()} CPUs, "
          f"load average {summary['load_avg']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
