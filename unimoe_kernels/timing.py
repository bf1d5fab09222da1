"""The package's one timing loop: what the jobs (bench, demo, generate) and the benchmarks measure with.

    time_calls(fn, reps, warmup=..., args_for=..., setup=..., device=...)   one callable, back to back
    time_interleaved({name: fn}, rounds, ...)                               several, one call each per round
        -> Timings per callable: ms of every timed call, .median / .min / .percentile(q)
    stopwatch(device)                                                       one block of code, wall time

Flow of one timed call:

    setup() and args_for(i)        outside the timed region (clearing gradients, rotating inputs)
    clock start                    "events": a CUDA event on the device's current stream
                                   "wall":   synchronize the device, then perf_counter
    fn(*args)
    clock stop                     "events": a second event; no synchronize, so back-to-back calls
                                             queue on the GPU as they would in a model
                                   "wall":   synchronize the device, then perf_counter (launch to
                                             completion, host overhead included)
    after the last call            "events": one synchronize, then the events' elapsed times

clock="auto" is "events" on a CUDA device and "wall" elsewhere (a CPU has nothing to synchronize).
Warm-up calls run the same way (setup, args_for, fn) before any clock starts and are never timed:
they absorb first-call allocation, kernel selection, Triton compilation and autotuning.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

DeviceLike = Union[torch.device, str, None]
CLOCKS = ("auto", "events", "wall")


def _device(device: DeviceLike) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def sync(device: DeviceLike = None) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100), interpolated linearly between the closest ranks: the
    same definition as numpy.percentile's default, without needing numpy at run time."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timings:
    """The times of one callable's timed calls, in call order, and (on request) what each call returned."""

    ms: list[float] = field(default_factory=list)
    results: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def min(self) -> float:
        return min(self.ms)

    def percentile(self, q: float) -> float:
        return percentile(self.ms, q)


class Stopwatch:
    """Elapsed wall time of a `with stopwatch(...)` block; `seconds` and `ms` are set when it exits."""

    seconds: float = float("nan")

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


@contextmanager
def stopwatch(device: DeviceLike = None) -> Iterator[Stopwatch]:
    """Wall time of the block, launch to completion: the device is synchronized before the clock
    starts (work queued earlier is not counted) and again before it stops (work the block queued is)."""
    sw = Stopwatch()
    sync(device)
    start = time.perf_counter()
    try:
        yield sw
    finally:
        sync(device)
        sw.seconds = time.perf_counter() - start


class _Clock:
    """Times the calls of one callable with one clock; `finish` turns what it recorded into Timings."""

    def __init__(self, device: DeviceLike, clock: str, keep_results: bool):
        self.device = _device(device)
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
        if clock == "auto":
            clock = "events" if self.device.type == "cuda" else "wall"
        if clock == "events" and self.device.type != "cuda":
            raise ValueError(f"clock='events' needs a CUDA device, got {self.device}")
        self.events = clock == "events"
        self.keep_results = keep_results
        self.timings = Timings()
        self._pending: list = []  # (start, end) event pairs not yet read

    def call(self, fn: Callable, args: tuple) -> Any:
        if self.events:
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            out = fn(*args)
            end.record(stream)
            self._pending.append((start, end))
        else:
            with stopwatch(self.device) as sw:
                out = fn(*args)
            self.timings.ms.append(sw.ms)
        if self.keep_results:
            self.timings.results.append(out)
        return out

    def finish(self) -> Timings:
        if self._pending:
            # The one synchronize of the events clock, after every timed call has been queued.
            sync(self.device)
            self.timings.ms.extend(s.elapsed_time(e) for s, e in self._pending)
            self._pending.clear()
        return self.timings


def _no_args(i: int) -> tuple:
    return ()


def time_calls(fn: Callable, reps: int, *, warmup: int = 1, args_for: Callable[[int], tuple] = _no_args,
               setup: Optional[Callable[[], None]] = None, device: DeviceLike = None, clock: str = "auto",
               keep_results: bool = False) -> Timings:
    """Time `reps` calls fn(*args_for(i)), i = 0 .. reps-1, after `warmup` untimed calls (i = 0 ..
    warmup-1). setup() runs before every call, warm-up ones included, outside the timed region.
    keep_results: also keep what each timed call returned (Timings.results)."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    c = _Clock(device, clock, keep_results)
    for i in range(warmup):
        if setup:
            setup()
        fn(*args_for(i))
    # Warm-up work still queued on the GPU must not land inside the first timed call.
    sync(device)
    for i in range(reps):
        args = args_for(i)
        if setup:
            setup()
        c.call(fn, args)
    return c.finish()


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
                     device: DeviceLike = None, clock: str = "auto", keep_results: bool = False,
                     progress: Optional[Callable[[Iterable[int]], Iterable[int]]] = None) -> dict[str, Timings]:
    """Time several callables in rounds, each called once per round in the mapping's order, so
    machine noise (clock changes, other processes) hits all of them alike rather than one's block of
    calls. `warmup` untimed rounds come first. progress: wraps the rounds' iterable (a tqdm bar)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    clocks = {name: _Clock(device, clock, keep_results) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    it: Iterable[int] = range(rounds)
    if progress is not None:
        it = progress(it)
    for _ in it:
        for name, fn in fns.items():
            clocks[name].call(fn, ())
    return {name: c.finish() for name, c in clocks.items()}


__all__ = ["CLOCKS", "Stopwatch", "Timings", "percentile", "stopwatch", "sync", "time_calls", "time_interleaved"]
