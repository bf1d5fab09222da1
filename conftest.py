"""Test scaffolding shared by tests/ and benchmarks/ (this root conftest applies to both).

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET=1 must be set before triton
is first imported, which is why it happens here, at collection, before any test module loads.
GPU-only tests carry @pytest.mark.gpu and skip cleanly without CUDA.

Benchmark tables (benchmarks/: this package's side-by-side summary and pytest-benchmark's own
timing tables) are printed only when asked, with --bench-tables or -s; a plain `pytest -q` keeps
its output to the progress dots and the summary.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--bench-tables", action="store_true",
                     help="print the benchmarks' side-by-side tables and pytest-benchmark's timing tables "
                          "at the end of the run (-s does too)")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's pytest_configure reads --benchmark-quiet
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "on_device: takes the `device` fixture, so it runs the kernels on the GPU "
                                       "when there is one (set by this conftest; the GPU check selects them)")
    if config.getoption("capture") == "no":
        config.option.bench_tables = True  # -s: the user is watching the output
    if not config.option.bench_tables:
        config.option.benchmark_quiet = True  # pytest-benchmark's tables; timings still recorded


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when present, else the CPU (Triton in the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """Run a test with one intra-op CPU thread.

    Tiny shapes gain nothing from threads, and on a busy 2-core machine OpenMP's hand-offs swamp
    the work (measured here: index_add_ on [8, 64] rows took 160 ms with 2 threads, 4 us with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def join_workers():
    """join_workers(ctx, timeout_s, what): wait for torch.multiprocessing workers, killing them and
    failing the test after timeout_s so a hung collective cannot stall the whole run."""
    import time

    def join(ctx, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                pytest.fail(f"{what} did not finish in {timeout_s} s")

    return join


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
