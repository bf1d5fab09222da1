"""Benchmark-only hooks: single-threaded CPU runs, the side-by-side summary at the end of the run
(with --bench-tables or -s; one line otherwise), and the optional JSON save (UNIMOE_BENCH_SAVE=1 on
a GPU).

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
    if config.option.bench_tables:  # set by --bench-tables or -s (root conftest)
        for line in results.summary_lines(harness.RESULTS):
            terminalreporter.write_line(line)
    else:
        timed = sum(1 for r in harness.RESULTS if r.ms)
        terminalreporter.write_line(f"benchmarks: {timed} provider timings recorded; --bench-tables (or -s) "
                                    "prints them side by side")
    if os.environ.get(results.SAVE_ENV, "0") not in ("", "0"):
        terminalreporter.write_line(results.save_from_env(harness.RESULTS))
