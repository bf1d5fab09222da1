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
    assert len(runs) == 3  # one per benchmark stage: layer, gmlp, baselines
    assert all(run["device"] == "cpu" and "commit" in run for run in runs)
    provided = {(r["group"], r["provider"]) for run in runs for r in run["records"]}
    assert {("layer", "ours"), ("layer", "grouped_mm"), ("layer", "dense"), ("layer", "naive_loop"),
            ("grouped_mlp", "ours")} <= provided

    table = out[out.index("ours N.NNx faster than"):]
    assert re.search(r"^layer mixtral +fwd\+bwd .*\|.*\d\.\d\dx", table, re.M), table
    assert re.search(r"^gmlp  mixtral +fwd ", table, re.M), table
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
