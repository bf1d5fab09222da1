"""Benchmark-only hooks: single-threaded CPU runs, the side-by-side summary at the end of the run,
and the optional JSON save (UNIMOE_BENCH_SAVE=1 on a GPU).

The repo-root conftest.py (interpreter mode, gpu marker, device fixture) applies here too.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import harness, results


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # The CPU run is a smoke test on tiny shapes: threads buy nothing there, and on a busy 2-core
    # machine OpenMP's hand-offs swamp the work (index_add_ on [8, 64] rows measured 160 ms with
    # 2 threads against 4 us with 1), which made the naive baseline alone take 30 s.
    if harness.HAS_CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not harness.RESULTS:
        return
    for line in results.summary_lines(harness.RESULTS):
        terminalreporter.write_line(line)
    if os.environ.get(results.SAVE_ENV, "0") not in ("", "0"):
        terminalreporter.write_line(results.save_from_env(harness.RESULTS))
