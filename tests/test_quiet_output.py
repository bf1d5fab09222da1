"""`python -m pytest -q` prints the benchmark tables only when asked (--bench-tables or -s).

One fast benchmark (the micro layer stack, about a second) runs in a pytest subprocess, once plain
and once with --bench-tables; the side-by-side summary and pytest-benchmark's timing table must
appear only in the second.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = "providers side by side"  # benchmarks/results.py's banner
TIMING = "Name (time in"            # pytest-benchmark's table header


def _pytest(*extra: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "benchmarks/test_bench_model.py::test_layer_stack_training[micro]", *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_benchmark_tables_only_when_asked():
    plain = _pytest()
    assert SUMMARY not in plain and TIMING not in plain
    assert "--bench-tables" in plain  # one line says how to get them
    assert len(plain.strip().splitlines()) <= 5, plain
    asked = _pytest("--bench-tables")
    assert SUMMARY in asked and TIMING in asked and "N.NNx faster = baseline time / our time" in asked


def test_skips_are_counted_not_listed(tmp_path):
    """A CPU run skips dozens of GPU tests: the summary counts them (one line each buried the
    result); -rs still lists each with its reason."""
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_gpu_only(i):\n    pytest.skip('needs a CUDA device')\n\n"
        "def test_runs():\n    pass\n")

    def run(*extra: str) -> str:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
               "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py"), *extra]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    plain = run()
    assert "SKIPPED" not in plain and "1 passed, 3 skipped" in plain, plain
    assert run("-rs").count("needs a CUDA device") >= 1
