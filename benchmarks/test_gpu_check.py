"""The GPU check without a GPU: its dry run end to end, and the table's arithmetic on made-up records.

The dry run goes through benchmarks/gpu_check.sh like a GPU session does, at the tiny size of one
shape, with one quick test standing in for the GPU tests, into pytest's tmp_path.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_end_to_end(tmp_path):
    env = {**os.environ, gpu_check.DRY_ENV: "1", "PYTHON": sys.executable}
    env.pop(gpu_check.SWEEP_ENV, None)
    # The tests stage runs one test of this file: quick, and with a known count (1 passed).
    junit_test = "benchmarks/test_gpu_check.py::test_junit_counts"
    args = ["--out", str(tmp_path), "--configs", "mixtral", "--tests", junit_test, "--marker", ""]
    # 120 s: the run takes about 30 s on 2 cores; the rest is room for a busy machine.
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]

    runs = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(runs) == 4  # one per benchmark stage: decode, layer, gmlp, baselines
    assert all(run["device"] == "cpu" and "commit" in run for run in runs)
    provided = {(r["group"], r["provider"]) for run in runs for r in run["records"]}
    assert {("layer", "ours"), ("layer", "grouped_mm"), ("layer", "dense"), ("layer", "naive_loop"),
            ("grouped_mlp", "ours"), ("decode", "ours"), ("decode", "grouped_mm")} <= provided

    table = out[out.index("ours N.NNx faster than"):]
    assert re.search(r"^layer mixtral +fwd\+bwd .*\|.*\d\.\d\dx", table, re.M), table
    assert re.search(r"^gmlp  mixtral +fwd ", table, re.M), table
    for t in (1, 8, 64, 256):  # the decode table: floor, ours and its share of the floor, gmm and the ratio
        row = rf"^mixtral-T{t} \(tiny\) +{t} +[\d.]+ +[\d.]+ \| +[\d.]+ +\d+% \| +[\d.]+ +skip \| +\d\.\d\dx"
        assert re.search(row, table, re.M), table
    assert re.search(r"^tests +ok .* 1 passed, 0 failed", out, re.M), out
    for stage in gpu_check.STAGES:
        assert re.search(rf"^{stage} ", out, re.M), f"stage {stage} missing from the summary"
    assert (tmp_path / "summary.txt").read_text().strip().endswith(out.strip().splitlines()[-1])
    assert (tmp_path / "logs" / "layer.log").stat().st_size > 0 and (tmp_path / "RESULTS.md").exists()


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
