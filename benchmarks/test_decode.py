"""Decode sizes and host overhead: the SparseMoE forward at a few tokens per call, against the floor
of reading the touched experts' weights once, and eager against replayed from a CUDA graph.

test_decode[<size>-<shape>-T<T>-fwd-<provider>], T in configs.DECODE_T, at the qwen3-30b-a3b and
mixtral shapes (configs.decode), providers in this order so that `ours` comes last and carries its
ratio to the others:

    grouped_mm     torch._grouped_mm over expert-sorted rows (baselines.grouped_mm_moe)
    liger_kernel   Liger-Kernel's fused MoE (anchors.py; skipped without a GPU, as in test_layer.py)
    ours           SparseMoE(backend="auto")

    SparseMoE of the shape, built once per (shape, size) and kept for every T
    x: N_INPUTS sets [T, H], rotated between calls
      -> the routing of each set (baselines.route, the router every provider shares; ours' own
         router differs from it only in near-ties, which the check bounds): n_i distinct expert ids
      -> every provider's output on every set vs reference.py in fp32, under torch.inference_mode
      -> timed under torch.inference_mode (harness.measure: CUDA-event median on a GPU)
      -> floor bytes = mean_i(n_i) x (gate_up + down elements of one expert = 3*H*F for SwiGLU)
                       x the weights' element size (2 bytes in bf16)
         floor ms    = floor bytes / the copy bandwidth measured once in the run (copy_bandwidth)
         % of floor  = floor ms / provider ms x 100 (100 = the weights stream at copy speed)

The floor is what any decode step must pay: each touched expert's weights read once from memory;
activations (T rows of H) are negligible beside them at these sizes. The mean over the input sets
is the floor of the timed calls, which cycle through the sets evenly.

test_host_overhead[full-qwen3-30b-a3b-T4096-fwd] (GPU only):

    SparseMoE forward under torch.inference_mode at configs.HOST_OVERHEAD
      eager:  moe(x) from Python, every kernel launched by the host
      graph:  the same forward captured once in a torch.cuda.CUDAGraph (warm-up on a side stream
              first, as torch's docs require) and replayed after copying x into the static input
      both checked (eager vs reference.py, replay vs eager on every input set), then timed two ways:
        ms       CUDA-event median of back-to-back calls: device time when the host keeps ahead
        wall_ms  one call at a time, synchronised: launch to completion, the host's time included
      host overhead = eager - graph, in each of the two

Records: group "decode" (one per provider, the floor numbers in extra) and "host_overhead"
(providers "eager" and "graph"), saved in the JSON like every benchmark's and shown in the GPU
check's table.
"""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from unimoe_kernels import baselines, timing

from . import anchors, configs, harness
from .harness import DEVICE, HAS_CUDA, Record

PROVIDERS = ("grouped_mm", "liger_kernel", "ours")

# Bytes per buffer of the copy that sets the bandwidth. GPU: 1 GiB, 20x the H100's 50 MB L2, so
# the copy streams from HBM; source and destination together (2 GiB) fit beside mixtral's 2.6 GiB
# of bf16 weights on any lent card. CPU: 16 MiB, past the caches and copied in a few ms (the CPU
# number only exercises the path: tiny weights sit in cache and beat any floor).
COPY_BYTES = 2**30 if HAS_CUDA else 2**24
# Eager calls on the side stream before capture: torch's docs use 3 (allocator and cuBLAS
# workspaces settle; Triton kernels are compiled by the first).
GRAPH_WARMUP = 3


def _params():
    out = []
    grid = itertools.product(("tiny", "full"), configs.DECODE_BASES, configs.DECODE_T, PROVIDERS)
    for size, name, t, provider in grid:
        # Full sizes need a GPU (the weights alone are GBs); the gpu marker skips them cleanly without one.
        marks = [pytest.mark.gpu] if size == "full" else []
        out.append(pytest.param(size, name, t, provider, marks=marks, id=f"{size}-{name}-T{t}-fwd-{provider}"))
    return out


# ----------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------

_COPY_GBPS: dict = {}


def copy_bandwidth_gbps() -> float:
    """GB/s of a large device-to-device copy (bytes read + written over its median time); once per run."""
    if "gbps" not in _COPY_GBPS:
        src = torch.ones(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
        dst = torch.empty_like(src)
        ms = harness.median_ms(dst.copy_, lambda i: (src,))
        _COPY_GBPS["gbps"] = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
        del src, dst
        if HAS_CUDA:
            torch.cuda.empty_cache()  # give the 2 GiB back before the full-size weights are built
    return _COPY_GBPS["gbps"]


def expert_bytes(moe) -> int:
    """Bytes of one expert's weights: gate_up [2F, H] and down [H, F] rows, 3*H*F elements for SwiGLU."""
    ex = moe.experts
    return (ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()) * ex.gate_up_proj.element_size()


def touched_experts(moe, x: torch.Tensor) -> int:
    """Distinct experts the routing of x's tokens uses (the ids of the timed call, counted)."""
    with torch.inference_mode():
        _, ids = baselines.route(moe, x)
    return int(ids.unique().numel())


def floor_numbers(moe, touched: list, ms) -> dict:
    """The floor of one (shape, T) from the experts each input set touches and, given a time, the
    provider's share of it (see the module docstring)."""
    floor_bytes = statistics.mean(touched) * expert_bytes(moe)
    gbps = copy_bandwidth_gbps()
    floor_ms = floor_bytes / (gbps * 1e9) * 1e3
    out = {"touched_experts": statistics.mean(touched), "touched_experts_per_input": touched,
           "floor_bytes": int(floor_bytes), "copy_gbps": gbps, "floor_ms": floor_ms}
    if ms:
        out["pct_of_floor"] = 100.0 * floor_ms / ms
    return out


# ----------------------------------------------------------------------------------------------
# Decode sizes
# ----------------------------------------------------------------------------------------------


class _Shape:
    """The SparseMoE of one (shape, size), kept for every T; inputs and oracle answers per T."""

    def __init__(self, name: str, size: str):
        self.moe = harness.make_moe(configs.get(name, size), "auto")
        self.per_t: dict = {}

    def inputs(self, cfg):
        """(input sets, the oracle's y for each, the experts each touches) of cfg.T tokens."""
        if cfg.T not in self.per_t:
            xs = harness.make_inputs(cfg)
            self.per_t[cfg.T] = (xs, [harness.oracle_layer(self.moe, x)[0] for x in xs],
                                 [touched_experts(self.moe, x) for x in xs])
        return self.per_t[cfg.T]


_SHAPE: dict = {}


def get_shape(name: str, size: str) -> _Shape:
    key = (name, size)
    if key not in _SHAPE:
        _SHAPE.clear()  # one shape alive at a time: mixtral's weights are 2.6 GiB in bf16
        if HAS_CUDA:
            torch.cuda.empty_cache()
        _SHAPE[key] = _Shape(name, size)
    return _SHAPE[key]


def _provider_fn(provider: str, moe):
    """provider name -> callable x -> y, or a string saying why it cannot run here."""
    if provider == "ours":
        return moe
    if provider == "liger_kernel":
        return anchors.provider(provider, moe)
    # Probed here, outside inference_mode: the probe runs a backward, which inference tensors refuse.
    why = baselines.grouped_mm_supported(DEVICE, moe.router.weight.dtype)
    return why or (lambda x: baselines.grouped_mm_moe(moe, x))


def _inference(fn):
    def call(x):
        with torch.inference_mode():
            return fn(x)
    return call


@pytest.mark.parametrize("size, name, T, provider", _params())
def test_decode(benchmark, size, name, T, provider):
    cfg = configs.decode(name, T, size)
    benchmark.group = f"decode {cfg.name} {size} fwd"
    shape = get_shape(name, size)
    moe = shape.moe
    xs, y_refs, touched = shape.inputs(cfg)
    fn = _provider_fn(provider, moe)
    if isinstance(fn, str):
        harness.record_skip("decode", cfg, size, "fwd", provider, fn)
    call = _inference(fn)

    # Correctness first, on every input set: at T=1 one set is one token's experts only.
    for i, (x, y_ref) in enumerate(zip(xs, y_refs)):
        y = harness.first_call(call, (x,))
        if y is None:
            harness.record_skip("decode", cfg, size, "fwd", provider, "CUDA out of memory at this size")
        harness.check_close(f"{provider} y (input set {i})", y, y_ref, harness.DTYPE)

    args_for = lambda i: (xs[i % len(xs)],)  # noqa: E731 - rotation of the input sets
    ms = harness.measure(benchmark, call, args_for)
    extra = floor_numbers(moe, touched, ms)
    if provider in anchors.NAMES:
        extra.update(anchors.describe(provider))
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, 0, False)
    rec = Record("decode", cfg.name, size, "fwd", provider, ms=ms, shape=cfg.as_dict(), extra=extra,
                 peak_mem_mb=harness.peak_memory_mb(call, args_for(0)) if ms else None)
    # GB/s of the record: the floor's bytes over this provider's time (the copy bandwidth at 100%).
    harness.record(benchmark, rec, flop_count=flop_count.total, bytes_moved=extra["floor_bytes"])


# ----------------------------------------------------------------------------------------------
# Host overhead: eager vs CUDA-graph replay
# ----------------------------------------------------------------------------------------------


def capture_forward(fn, static_x: torch.Tensor):
    """(graph, static output) of fn(static_x) captured in a CUDA graph; fn is warmed up on a side
    stream first (torch.cuda.graphs' recipe), so compilation and lazy allocations stay out of it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)
    return graph, static_y


def wall_median_ms(fn, args_for, reps: int = harness.GPU_REPS) -> float:
    """Median host wall time of one synchronised call: launch to completion, host overhead included."""
    return timing.time_calls(fn, reps, warmup=harness.GPU_WARMUP, args_for=args_for, device="cuda",
                             clock="wall").median


@pytest.mark.gpu
@pytest.mark.parametrize("size", [pytest.param("full", id=f"full-{configs.HOST_OVERHEAD.name}-fwd")])
def test_host_overhead(benchmark, size):
    cfg = configs.HOST_OVERHEAD
    benchmark.group = f"host_overhead {cfg.name} {size} fwd"
    _SHAPE.clear()  # the decode shapes' weights are not needed any more
    moe = harness.make_moe(cfg, "auto")
    xs = harness.make_inputs(cfg)
    eager = _inference(moe)
    static_x = xs[0].clone()
    graph, static_y = capture_forward(eager, static_x)

    def replay(i):  # the new input goes into the static buffer; replay reads it from there
        static_x.copy_(xs[i % len(xs)])
        graph.replay()
        return static_y

    harness.check_close("eager y", eager(xs[0]), harness.oracle_layer(moe, xs[0])[0], harness.DTYPE)
    for i in (1, 2, 0):  # other inputs first: a replay that ignored the copy would still show set 0
        harness.check_close(f"graph replay y (input set {i % len(xs)})", replay(i).clone(), eager(xs[i % len(xs)]),
                            harness.DTYPE)

    args_for = lambda i: (xs[i % len(xs)],)  # noqa: E731 - rotation of the input sets
    eager_ms = harness.measure(benchmark, eager, args_for)
    timed = {"eager": eager_ms, "graph": None}
    walls = {}
    if eager_ms:
        # The copy into the static input is made by args_for, before the start event: not timed.
        copy_in = lambda i: (static_x.copy_(xs[i % len(xs)]),)  # noqa: E731
        timed["graph"] = harness.cuda_median_ms(lambda _: graph.replay(), copy_in)
        walls = {"eager": wall_median_ms(eager, args_for), "graph": wall_median_ms(lambda _: graph.replay(), copy_in)}
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, 0, False).total
    for provider in ("eager", "graph"):
        extra = {}
        if walls:
            extra = {"wall_ms": walls[provider], "host_overhead_ms": timed["eager"] - timed["graph"],
                     "host_overhead_wall_ms": walls["eager"] - walls["graph"]}
        rec = Record("host_overhead", cfg.name, size, "fwd", provider, ms=timed[provider], shape=cfg.as_dict(),
                     extra=extra)
        harness.record(benchmark, rec, flop_count=flop_count)
