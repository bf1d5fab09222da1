"""Benchmark-only hooks: single-threaded CPU runs, the side-by-side summary at the end of the run,
and the optional JSON save (UNIMOE_BENCH_SAVE=1 on a GPU).

The repo-root conftest.py (interpreter mode, gpu marker, device fixture) applies here too.
"""

from __future__ import annotations

import os

import pytest

from . import harness, results


@pytest.fixture(autouse=True)
def _one_cpu_thread(request):
    # The CPU run is a smoke test on tiny shapes (see the root conftest's one_thread).
    if not harness.HAS_CUDA:
        request.getfixturevalue("one_thread")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not harness.RESULTS:
        return
    for line in results.summary_lines(harness.RESULTS):
        terminalreporter.write_line(line)
    if os.environ.get(results.SAVE_ENV, "0") not in ("", "0"):
        terminalreporter.write_line(results.save_from_env(harness.RESULTS))
