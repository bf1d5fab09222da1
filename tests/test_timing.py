"""unimoe_kernels.timing, the one timing loop of the jobs and the benchmarks: known sleeps measured
within a tolerance, warm-up calls and setup / input choice kept out of the timed region (counted
calls), interleaving order, median and percentiles against numpy, the CPU path with every CUDA
call made to fail, and the CUDA-events path's synchronize pattern on a stand-in for CUDA's events.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from unimoe_kernels import timing

SLEEP_S = 0.05  # long enough that timer resolution and call overhead are far below it
# Upper slack for a sleep on a busy 2-core machine: the scheduler may wake a sleeper late, never early.
LATE_S = 0.04
# Below this a call counts as "did not include the 50 ms sleep": ample for a no-op or a few appends.
QUICK_MS = SLEEP_S * 1e3 / 2


def test_sleep_is_measured_within_tolerance():
    t = timing.time_calls(lambda: time.sleep(SLEEP_S), 3, warmup=0)
    assert len(t.ms) == 3
    # perf_counter and sleep share the monotonic clock; 1 us of slack for float rounding only.
    assert all(SLEEP_S * 1e3 - 1e-3 <= ms <= (SLEEP_S + LATE_S) * 1e3 for ms in t.ms), t.ms


def test_stopwatch_measures_a_block():
    with timing.stopwatch() as sw:
        time.sleep(SLEEP_S)
    assert SLEEP_S - 1e-6 <= sw.seconds <= SLEEP_S + LATE_S
    assert sw.ms == pytest.approx(sw.seconds * 1e3)


def test_warmup_calls_run_first_and_are_not_timed():
    calls = []

    def fn(i):
        calls.append(i)
        if len(calls) <= 2:  # only the two warm-up calls are slow
            time.sleep(SLEEP_S)

    t = timing.time_calls(fn, 3, warmup=2, args_for=lambda i: (i,))
    assert calls == [0, 1, 0, 1, 2]  # warm-up indices 0..1, then timed indices 0..2
    assert len(t.ms) == 3 and max(t.ms) < QUICK_MS, t.ms


def test_setup_and_args_for_run_before_every_call_outside_the_timed_region():
    log = []

    def setup():
        log.append("setup")
        time.sleep(SLEEP_S)

    def args_for(i):
        log.append(f"args{i}")
        time.sleep(SLEEP_S)
        return (i,)

    t = timing.time_calls(lambda i: log.append(f"call{i}"), 2, warmup=1, args_for=args_for, setup=setup)
    assert log == ["setup", "args0", "call0", "args0", "setup", "call0", "args1", "setup", "call1"]
    assert max(t.ms) < QUICK_MS, t.ms


def test_keep_results_keeps_each_timed_calls_return_in_order():
    it = iter(range(10))
    t = timing.time_calls(lambda: next(it), 3, warmup=2, keep_results=True)
    assert t.results == [2, 3, 4]
    assert timing.time_calls(lambda: 1, 2).results == []  # not kept unless asked


def test_interleaved_rounds_order_and_attribution():
    calls = []
    seen = []

    def progress(rounds):
        seen.append(len(rounds))
        return rounds

    def slow():
        calls.append("slow")
        time.sleep(SLEEP_S)
        return 7

    def quick():
        calls.append("quick")
        return 3

    out = timing.time_interleaved({"slow": slow, "quick": quick}, 3, warmup=1, keep_results=True, progress=progress)
    assert calls == ["slow", "quick"] * 4  # one warm-up round, then 3 timed rounds, interleaved
    assert seen == [3]
    assert len(out["slow"].ms) == len(out["quick"].ms) == 3
    assert min(out["slow"].ms) >= SLEEP_S * 1e3 - 1e-3 and max(out["quick"].ms) < QUICK_MS
    assert out["slow"].results == [7, 7, 7] and out["quick"].results == [3, 3, 3]

    calls.clear()
    timing.time_interleaved({"slow": slow, "quick": quick}, 1, warmup=0)
    assert calls == ["slow", "quick"]


@pytest.mark.parametrize("n", [1, 2, 5, 10, 101])
def test_median_and_percentiles_match_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(size=n).tolist()
    t = timing.Timings(ms=values)
    assert t.median == pytest.approx(float(np.median(values)), rel=1e-12)
    assert t.min == min(values)
    for q in (0, 1, 10, 25, 50, 75, 90, 99, 100, 33.3):
        assert t.percentile(q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12), q
    assert timing.percentile(values, 50) == pytest.approx(t.median, rel=1e-12)


def test_percentile_rejects_no_values_and_q_out_of_range():
    with pytest.raises(ValueError):
        timing.percentile([], 50)
    for q in (-1, 100.5, math.nan):
        with pytest.raises(ValueError):
            timing.percentile([1.0], q)


def test_cpu_path_never_touches_cuda(monkeypatch):
    def no_cuda(*a, **k):
        raise AssertionError("CUDA call on the CPU path")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_stream", no_cuda)
    x = torch.randn(64, 64)
    for device in (None, "cpu", torch.device("cpu")):
        assert len(timing.time_calls(lambda: x @ x, 2, device=device).ms) == 2
        assert len(timing.time_interleaved({"mm": lambda: x @ x}, 2, device=device)["mm"].ms) == 2
        with timing.stopwatch(device):
            x @ x


def test_bad_arguments():
    with pytest.raises(ValueError, match="CUDA"):
        timing.time_calls(lambda: None, 1, device="cpu", clock="events")
    with pytest.raises(ValueError, match="clock"):
        timing.time_calls(lambda: None, 1, clock="sundial")
    with pytest.raises(ValueError, match="reps"):
        timing.time_calls(lambda: None, 0)
    with pytest.raises(ValueError, match="rounds"):
        timing.time_interleaved({"a": lambda: None}, 0)


class _FakeCuda:
    """Stands in for torch.cuda's synchronize / Event / current_stream: events take the host clock
    when recorded, and reading one before the next synchronize is an error (as a real event that has
    not completed would give a wrong time or raise)."""

    def __init__(self, monkeypatch, sync_sleep_on=()):
        self.syncs = 0
        self.sync_log = []  # events recorded so far at each synchronize
        self.synced_after = 0  # events recorded so far when the last synchronize ran
        self.recorded = 0
        self.sync_sleep_on = sync_sleep_on  # 1-based synchronize calls that take SLEEP_S
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None
                self.n = None

            def record(self, stream=None):
                fake.recorded += 1
                self.t, self.n = time.perf_counter(), fake.recorded

            def elapsed_time(self, end):
                assert max(self.n, end.n) <= fake.synced_after, "event read before a synchronize"
                return (end.t - self.t) * 1e3

        def synchronize(device=None):
            fake.syncs += 1
            if fake.syncs in fake.sync_sleep_on:
                time.sleep(SLEEP_S)
            fake.synced_after = fake.recorded
            fake.sync_log.append(fake.recorded)

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)


def test_events_clock_synchronizes_only_outside_the_timed_calls(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    slow = iter([False, False, True, False, True])  # 2 warm-up calls, then timed: slow, quick, slow

    def fn():
        if next(slow):
            time.sleep(SLEEP_S)

    t = timing.time_calls(fn, 3, warmup=2, device="cuda")  # auto: events on a CUDA device
    assert fake.syncs == 2  # after the warm-up, after the last timed call: none between calls
    assert fake.recorded == 6  # a start and an end event per timed call
    assert t.ms[0] >= SLEEP_S * 1e3 - 1e-3 and t.ms[1] < QUICK_MS and t.ms[2] >= SLEEP_S * 1e3 - 1e-3


def test_events_clock_interleaved(monkeypatch):
    fake = _FakeCuda(monkeypatch)
    out = timing.time_interleaved({"a": lambda: time.sleep(SLEEP_S), "b": lambda: None}, 2, warmup=1,
                                  device="cuda:0", clock="events")
    # 2 rounds x 2 callables x (start, end); one synchronize before any event, the rest after the last.
    assert fake.recorded == 8 and fake.sync_log[0] == 0 and set(fake.sync_log[1:]) == {8}
    assert min(out["a"].ms) >= SLEEP_S * 1e3 - 1e-3 and max(out["b"].ms) < QUICK_MS


def test_wall_clock_on_cuda_waits_outside_before_and_inside_at_the_end(monkeypatch):
    # The synchronize before the clock starts (work queued earlier) is not timed ...
    _FakeCuda(monkeypatch, sync_sleep_on=(1,))
    with timing.stopwatch("cuda") as sw:
        pass
    assert sw.ms < QUICK_MS
    # ... the one before it stops (completion of the block's own work) is.
    fake = _FakeCuda(monkeypatch, sync_sleep_on=(2,))
    with timing.stopwatch("cuda") as sw:
        pass
    assert sw.seconds >= SLEEP_S - 1e-6 and fake.syncs == 2
    # time_calls' wall clock on CUDA: one synchronize after the warm-up, then two per timed call.
    fake = _FakeCuda(monkeypatch)
    timing.time_calls(lambda: None, 3, warmup=1, device="cuda", clock="wall")
    assert fake.syncs == 1 + 2 * 3 and fake.recorded == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_events_time_gpu_work():
    x = torch.randn(2048, 2048, device="cuda")  # ~17 GFLOP per matmul: far above launch overhead
    one = timing.time_calls(lambda: x @ x, 5, warmup=2, device="cuda")
    four = timing.time_calls(lambda: [x @ x for _ in range(4)], 5, warmup=2, device="cuda")
    assert all(ms > 0 and math.isfinite(ms) for ms in one.ms + four.ms)
    # Four matmuls are 4x the work of one; 2x leaves room for clock boost and noise while still
    # failing if the events saw only the host's launches.
    assert four.median > 2 * one.median
