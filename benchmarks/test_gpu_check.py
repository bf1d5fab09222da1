"""The GPU check without a GPU: its plan and budget, each stage's isolation, a dry run with planted
failures through benchmarks/gpu_check.sh, and the tables' arithmetic on made-up records.

The dry run here is cut down to stay a few tens of seconds on 2 cores: the kernel stage runs three
cases of one role (one real, one planted failure, one planted hang), the other stages are planted
stand-ins (a planted stage replaces its commands, so the layer and decode benchmarks are not rerun:
their own tests in benchmarks/ cover them). The full dry run is `UNIMOE_GPU_CHECK_DRY=1 bash
benchmarks/gpu_check.sh` (benchmarks/README.md).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from . import gpu_check, kernel_stage

ROOT = Path(__file__).resolve().parent.parent


def test_plan_order_and_budget(capsys):
    assert gpu_check.main(["--plan", "--dry"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    names = [part.split()[0] for part in line.split(": ", 1)[1].split(" | ")]
    assert names == ["wheels", "build", "kernels", "layer", "profile", "decode", "tests"]
    assert names == list(gpu_check.STAGES)
    caps = gpu_check.CAPS_S
    # The headline (the kernel stage and the layer rows) ends within 240 s of the start even when
    # each of its stages runs to its cap and pytest takes its whole grace to exit.
    worst = gpu_check.STARTUP_S + caps["wheels"] + caps["kernels"] + caps["layer"] + gpu_check.GRACE_S
    assert worst <= gpu_check.HEADLINE_BY_S == 240
    assert gpu_check.BUDGET_S == 420
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert 'UNIMOE_GPU_CHECK_BUDGET:-420' in script


def test_stage_isolation(tmp_path, monkeypatch):
    """A hang that ignores SIGINT is TIMEOUT (not FAILED rc=-9), a failure is FAILED with its exit
    status, and each stage after them still runs."""
    (tmp_path / "logs").mkdir()
    check = gpu_check.Check(out=tmp_path, dry=True, budget=60, grace=1,
                            caps={**gpu_check.CAPS_S, "kernels": 2, "layer": 30, "profile": 30},
                            plants={"kernels": "hang", "layer": "fail", "profile": "ok"})
    start = time.monotonic()
    for name in ("kernels", "layer", "profile"):
        check.run(gpu_check.Stage(name), [["false"]])  # the plants replace the command
    took = time.monotonic() - start
    assert [(s.name, s.status) for s in check.stages] == [
        ("kernels", "TIMEOUT"), ("layer", "FAILED rc=3"), ("profile", "ok")]
    assert "cap of 2 s" in check.stages[0].note
    assert 2 <= check.stages[0].seconds < 10 and took < 20
    assert "planted: hang" in (tmp_path / "logs" / "kernels.log").read_text()
    # A stage whose cap is beyond what is left of the budget stops when the budget runs out (3 s here).
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 1)
    short = gpu_check.Check(out=tmp_path, dry=True, budget=gpu_check.RESERVE_S + 1 + 3, grace=1,
                            plants={"decode": "hang"})
    stage = short.run(gpu_check.Stage("decode"), [["false"]])
    assert stage.status == "TIMEOUT" and "budget ran out" in stage.note, stage


def test_dry_run_with_planted_failures(tmp_path):
    cases = kernel_stage.plan(("mixtral",), ("down",), 2)
    assert len(cases) == 3 and cases[0]["label"] == "shipped"
    failing, hanging = cases[1]["id"], cases[2]["id"]
    env = {**os.environ, gpu_check.DRY_ENV: "1", "PYTHON": sys.executable}
    env.pop(gpu_check.SWEEP_ENV, None)
    env.pop("TRITON_INTERPRET", None)  # as in a GPU slot: the check sets it for the dry cases itself
    # All three cases start at once; the hang is killed at 25 s, the real case takes ~10 s on 2 cores.
    kernel_args = "--shapes mixtral --roles down --alternatives 2 --jobs 3 --case-timeout 25 --facts-for shipped"
    args = ["--out", str(tmp_path), "--grace", "1", "--cap", "profile=2", f"--kernel-args={kernel_args}",
            "--plant", f"case:fail={failing},case:hang={hanging}",
            "--plant", "stage:layer=ok,stage:profile=hang,stage:decode=fail,stage:tests=ok"]
    # 150 s: the run takes ~40 s on 2 cores; the rest is room for a busy machine.
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=150)
    out = done.stdout
    assert done.returncode == 1, out[-3000:] + done.stderr[-3000:]  # stages failed: the exit says so

    # The first lines: where the numbers come from, then the plan in the new order.
    first, second = out.splitlines()[:2]
    assert re.match(r"\[gpu_check\] cpu, commit \S+, torch \S+, triton \S+, CUDA \S+, Python \S+", first), first
    assert re.search(r"wheels .* \| build skipped \| kernels .* \| layer .* \| profile .* \| decode .* \| tests",
                     second), second

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"device", "commit", "torch", "triton", "cuda", "python", "dry"} <= set(summary["provenance"])
    assert summary["provenance"]["dry"] is True and summary["budget_s"] == 420
    statuses = [(s["name"], s["status"]) for s in summary["stages"]]
    assert statuses == [("wheels", "skipped"), ("build", "skipped"), ("kernels", "FAILED rc=1"), ("layer", "ok"),
                        ("profile", "TIMEOUT"), ("decode", "FAILED rc=3"), ("tests", "ok")], statuses
    assert all(s["note"] for s in summary["stages"] if s["status"] != "ok"), summary["stages"]
    starts = [s["start_s"] for s in summary["stages"] if s["start_s"] is not None]
    assert starts == sorted(starts)

    # The kernel stage: the planted failure and hang stopped only themselves.
    kernels = {c["id"]: c for c in json.loads((tmp_path / "kernels.json").read_text())["cases"]}
    shipped = kernels[cases[0]["id"]]
    assert shipped["status"] == "ok" and shipped["ms"] > 0 and shipped["check"]["y"] < kernel_stage.FP32_TOL
    assert shipped["facts"].get("registers", 0) > 0 or "error" in shipped["facts"]
    assert kernels[failing]["status"] == "FAILED" and "planted failure" in kernels[failing]["error"]
    assert kernels[hanging]["status"] == "TIMEOUT"
    assert "cases: 1 ok, 1 FAILED, 1 TIMEOUT" in next(s["note"] for s in summary["stages"] if s["name"] == "kernels")

    # summary.txt starts with the provenance and the stages; the kernel table follows them.
    text = (tmp_path / "summary.txt").read_text()
    head = text.strip().splitlines()
    assert "GPU check: cpu, commit" in head[0] and head[1].startswith("stage ")
    assert [line.split()[0] for line in head[2:9]] == list(gpu_check.STAGES)
    assert re.search(r"^mixtral +down +shipped .* ok$", text, re.M), text
    assert text.strip().endswith(out.strip().splitlines()[-1])


def _rec(group, config, mode, provider, ms=None, **kw):
    return {"group": group, "config": config, "size": "full", "mode": mode, "provider": provider, "ms": ms,
            "shape": {"T": 8, "H": 16, "F": 8, "E": 4, "k": 2, "r": 0}, **kw}


def test_table_ratios_skips_and_failures():
    records = [
        _rec("layer", "mixtral", "fwd", "ours", 2.0, tflops=100.0),
        _rec("layer", "mixtral", "fwd", "grouped_mm", 3.0),
        _rec("layer", "mixtral", "fwd", "liger_kernel", 1.0),
        _rec("layer", "mixtral", "fwd", "moe_ops", skipped="no LoRA in moe_ops"),
        _rec("layer", "mixtral", "fwd", "dense", 1.5),
        # grouped_mlp has no dense record: its dense time is ours' times ours' vs_dense.
        _rec("grouped_mlp", "mixtral", "fwd", "ours", 4.0, vs_dense=0.5),
        _rec("grouped_mlp", "mixtral", "fwd", "grouped_mm", 5.0),
    ]
    failed = gpu_check.failed_cells([("test_grouped_mlp[full-mixtral-fwd-grouped_mm]", "AssertionError: y")])
    assert failed == {("grouped_mlp", "mixtral", "full", "fwd", "grouped_mm")}
    lines = gpu_check.render_table(records, failed)
    rows = {line.split()[0]: line.replace("|", " ").split() for line in lines if line.startswith(("layer ", "gmlp "))}
    # bench shape mode | ours ms, TFLOP/s | gmm liger moe-ops dense (ms) | ours' speed-up over each
    assert rows["layer"][3:] == ["2.000", "100.0", "3.000", "1.000", "skip", "1.500", "1.50x", "0.50x", "-", "0.75x"]
    # grouped_mlp: the dense time is ours' 4.0 ms times vs_dense 0.5; a failed provider shows no ratio.
    assert rows["gmlp"][3:] == ["4.000", "-", "FAIL", "-", "-", "2.000", "-", "-", "-", "0.50x"]
    assert "skip moe-ops (mixtral fwd): no LoRA in moe_ops" in lines
    assert "shapes (T x H x F x E x k, LoRA rank): mixtral 8x16x8x4x2" in lines


def test_decode_and_host_overhead_tables():
    floor = {"touched_experts": 8.0, "floor_ms": 0.025, "copy_gbps": 3000.0}
    shape = {"T": 1, "H": 2048, "F": 768, "E": 128, "k": 8, "r": 0}
    host_shape = {**shape, "T": 4096}
    records = [
        _rec("decode", "qwen3-30b-a3b-T1", "fwd", "grouped_mm", 0.1, shape=shape, extra=floor),
        _rec("decode", "qwen3-30b-a3b-T1", "fwd", "liger_kernel", skipped="liger is not importable here", shape=shape),
        _rec("decode", "qwen3-30b-a3b-T1", "fwd", "ours", 0.05, shape=shape, extra=floor),
        _rec("host_overhead", "qwen3-30b-a3b-T4096", "fwd", "eager", 2.0, shape=host_shape, extra={"wall_ms": 2.5}),
        _rec("host_overhead", "qwen3-30b-a3b-T4096", "fwd", "graph", 1.5, shape=host_shape, extra={"wall_ms": 1.6}),
    ]
    # Neither group leaks into the layer table.
    assert not any(line.startswith(("layer ", "gmlp ")) for line in gpu_check.render_table(records))
    decode = gpu_check.render_decode_table(records)
    assert "(3000 GB/s)" in decode[1]
    row = next(line for line in decode if line.startswith("qwen3-30b-a3b-T1 ")).replace("|", " ").split()
    # shape T experts floor-us | ours us, % floor | gmm us, liger us | ours' speed-up over each
    assert row == ["qwen3-30b-a3b-T1", "1", "8.0", "25.00", "50.00", "50%", "100.0", "skip", "2.00x", "-"]
    assert "skip liger (qwen3-30b-a3b-T1): liger is not importable here" in decode
    host = gpu_check.render_host_table(records)
    row = next(line for line in host if line.startswith("qwen3-30b-a3b-T4096 ")).split()
    assert row[1:7] == ["2.000", "1.500", "0.500", "2.500", "1.600", "0.900"]
    # A failed host-overhead test (its id names no provider) fails both of its cells.
    failed = gpu_check.failed_cells([("test_host_overhead[full-qwen3-30b-a3b-T4096-fwd]", "AssertionError"),
                                     ("test_decode[full-qwen3-30b-a3b-T1-fwd-ours]", "AssertionError")])
    assert failed == {("host_overhead", "qwen3-30b-a3b-T4096", "full", "fwd", "eager"),
                      ("host_overhead", "qwen3-30b-a3b-T4096", "full", "fwd", "graph"),
                      ("decode", "qwen3-30b-a3b-T1", "full", "fwd", "ours")}
    row = next(line for line in gpu_check.render_host_table(records, failed) if line.startswith("qwen3"))
    assert row.split()[1:7] == ["FAIL", "FAIL", "-"] * 2
    row = next(line for line in gpu_check.render_decode_table(records, failed) if line.startswith("qwen3"))
    assert row.replace("|", " ").split()[4:6] == ["FAIL", "-"]
    assert gpu_check.render_decode_table([]) == [] and gpu_check.render_host_table([]) == []


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase name="a"/><testcase name="b"><skipped/></testcase>'
        '<testcase name="c"><failure message="AssertionError: off by one&#10;more">trace</failure></testcase>'
        '<testcase name="d"><error message="fixture broke"/></testcase>'
        '<testcase time="0.000"/>'  # what pytest writes for the test a KeyboardInterrupt stopped
        "</testsuite></testsuites>"
    )
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert counts["failures"] == [("c", "AssertionError: off by one"), ("d", "fixture broke")]
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None
