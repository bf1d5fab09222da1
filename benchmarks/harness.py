"""Shared machinery of the benchmarks: inputs, the fp32 oracle, correctness checks, timing, metrics.

Flow of one benchmark test (one provider, one config, one mode):

    make inputs (N_INPUTS sets, rotated so no call reuses the previous call's activations)
    check(provider output [and dx] vs oracle)        oracle = reference.py in fp32; a fast wrong
                                                     provider fails here, before any timing
    measure(...)                                     GPU: CUDA events per call, median, after a
                                                     warm-up that also runs any autotuning
                                                     (unimoe_kernels.timing, the jobs' loop too);
                                                     CPU: pytest-benchmark's own rounds, median
    record(...)                                      ms, TFLOP/s, GB/s, ratio to a dense MLP of
                                                     the same FLOPs, peak memory -> extra_info and
                                                     RESULTS (the end-of-run summary, the JSON)

triton.testing.do_bench is never called: it needs a GPU, and CUDA events give the same median
while letting the per-call setup (input rotation, zeroing grads) stay outside the timed region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pytest
import torch

from unimoe_kernels import SparseMoE, baselines, reference, timing
from unimoe_kernels.types import is_glu

from .configs import ShapeConfig

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# bf16 is what MoE models train in on GPU; the CPU run checks and times fp32 (the Triton
# interpreter has no bf16, and CPU bf16 matmuls are not what anyone deploys).
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

# Input sets rotated between calls: 3 on GPU is enough that consecutive calls read different
# activations (each full-size x is >= 32 MB, past the H100's 50 MB L2 with the weights);
# 2 on CPU just proves the rotation works without costing time.
N_INPUTS = 3 if HAS_CUDA else 2
GPU_WARMUP = 3  # calls before timing: autotuning, allocator warm-up, cuBLAS heuristics
GPU_REPS = 20  # timed calls; the median of 20 is stable to about 1% on a quiet GPU
CPU_ROUNDS = 3  # pytest-benchmark rounds on CPU: a smoke test, not a measurement

# Correctness thresholds per dtype: a row fails when its max error exceeds atol + rtol * (the
# largest |value| of the oracle). bf16 carries 8 mantissa bits (eps 7.8e-3) and the baselines sum
# k expert rows in bf16, so 3e-2; fp16 has 11 bits, 1e-2; fp32 differs only in summation order.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 3e-2),
}
# Share of token rows allowed to fail on GPU: a near-tie between the k-th and (k+1)-th expert can
# flip when two implementations compute the router logits in a different order, which changes
# that token's experts. 1 in 1000 tokens; tiny CPU shapes allow none.
TIE_FLIP_SHARE = 1e-3 if HAS_CUDA else 0.0


@dataclass
class Record:
    """One measured (or skipped) provider; what the summary and the JSON writer read."""

    # "layer", "topk_gating", "build_routing", "permute", "unpermute", "grouped_mlp", "decode", "host_overhead"
    group: str
    config: str
    size: str
    mode: str  # "fwd" or "fwd+bwd"
    provider: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    vs_dense: Optional[float] = None  # dense-MLP time / this time (1.0 = as fast as dense)
    peak_mem_mb: Optional[float] = None
    skipped: Optional[str] = None
    shape: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


RESULTS: list[Record] = []


# ----------------------------------------------------------------------------------------------
# Modules and inputs
# ----------------------------------------------------------------------------------------------


def make_moe(cfg: ShapeConfig, backend: str = "auto", seed: int = 0) -> SparseMoE:
    """SparseMoE of the config in eval mode (the baselines' semantics), LoRA B made non-zero."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        moe = SparseMoE(
            cfg.H, cfg.F, cfg.E, cfg.k, activation=cfg.activation, lora_rank=cfg.r, lora_alpha=cfg.lora_alpha,
            backend=backend, device=DEVICE, dtype=DTYPE,
        ).eval()
        if cfg.r:
            # A fresh adapter has B = 0, which would let a provider that drops LoRA pass the check.
            with torch.no_grad():
                for name, p in moe.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=1.0 / cfg.r)
    finally:
        torch.random.set_rng_state(gen_state)
    return moe


def twin(moe: SparseMoE, cfg: ShapeConfig, backend: str) -> SparseMoE:
    """A second SparseMoE with the same weights and another backend (the public API only)."""
    other = make_moe(cfg, backend)
    other.load_state_dict(moe.state_dict())
    return other


def make_inputs(cfg: ShapeConfig, requires_grad: bool = False, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [
        torch.randn(cfg.T, cfg.H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(requires_grad)
        for _ in range(N_INPUTS)
    ]


# ----------------------------------------------------------------------------------------------
# Oracle and checks
# ----------------------------------------------------------------------------------------------


def oracle_layer(moe: SparseMoE, x: torch.Tensor, grad_out: Optional[torch.Tensor] = None):
    """reference.py's layer in fp32 from moe's parameters: (y, dx or None), both fp32."""
    p = {n: t.detach().float() for n, t in moe.named_parameters()}
    xf = x.detach().float().requires_grad_(grad_out is not None)
    router, ex = moe.router, moe.experts
    logits = xf @ p["router.weight"].t()
    gating = reference.topk_gating(
        logits, moe.top_k, scoring=router.scoring, normalize=router.normalize_topk,
        scaling_factor=router.scaling_factor,
    )
    plan = reference.build_routing(gating.ids, moe.num_experts)
    lora = None
    if ex.lora_rank:
        lora = reference.LoRAWeights(*(p[f"experts.lora_{n}"] for n in ("A_gate_up", "B_gate_up", "A_down", "B_down")))
    y = reference.moe_forward(
        xf, gating.weights, plan, p["experts.gate_up_proj"], p["experts.down_proj"], ex.activation,
        lora=lora, lora_scale=ex.lora_scale,
    )
    if grad_out is None:
        return y.detach(), None
    y.backward(grad_out.float())
    return y.detach(), xf.grad


def layer_callables(fn: Callable, params: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                    grad_out: Optional[torch.Tensor], bwd: bool) -> tuple[Callable, Callable]:
    """(setup, call) to time a layer provider: setup clears every gradient; call(x) runs the forward,
    and the backward from grad_out when bwd (no autograd graph at all otherwise)."""

    def setup():
        for t in (*params, *xs):
            t.grad = None

    if bwd:
        def call(x):
            y = fn(x)
            y.backward(grad_out)
            return y
    else:
        def call(x):
            with torch.no_grad():
                return fn(x)
    return setup, call


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = None) -> None:
    """Fail (AssertionError) when more rows than TIE_FLIP_SHARE allows are off by the dtype's tolerance."""
    dtype = dtype or got.dtype
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != oracle {tuple(want.shape)}"
    got2, want2 = got.detach().float().reshape(got.shape[0], -1), want.detach().float().reshape(want.shape[0], -1)
    if got2.numel() == 0:
        return
    assert torch.isfinite(got2).all(), f"{name}: non-finite values"
    bound = atol + rtol * want2.abs().max()
    row_err = (got2 - want2).abs().amax(dim=1)
    bad = int((row_err > bound).sum())
    allowed = int(TIE_FLIP_SHARE * got2.shape[0])
    assert bad <= allowed, (
        f"{name}: {bad} of {got2.shape[0]} rows exceed {float(bound):.3g} (max error {float(row_err.max()):.3g}, "
        f"{allowed} allowed for router near-ties)"
    )


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _sync() -> None:
    timing.sync(DEVICE)


def cuda_median_ms(fn: Callable, args_for: Callable[[int], tuple], setup: Optional[Callable] = None,
                   warmup: int = GPU_WARMUP, reps: int = GPU_REPS) -> float:
    """Median CUDA-event time of fn(*args_for(i)); setup() and input choice stay outside the events."""
    return timing.time_calls(fn, reps, warmup=warmup, args_for=args_for, setup=setup, device=DEVICE,
                             clock="events").median


def cpu_median_ms(
    fn: Callable, args_for: Callable[[int], tuple], setup: Optional[Callable] = None, reps: int = CPU_ROUNDS
) -> float:
    # One warm-up call: first-call allocations, kernel selection and compilation.
    return timing.time_calls(fn, reps, warmup=1, args_for=args_for, setup=setup, device="cpu").median


def median_ms(fn, args_for, setup=None) -> float:
    return cuda_median_ms(fn, args_for, setup) if HAS_CUDA else cpu_median_ms(fn, args_for, setup)


def measure(
    benchmark, fn: Callable, args_for: Callable[[int], tuple], setup: Optional[Callable] = None
) -> Optional[float]:
    """Time fn and feed pytest-benchmark; the median in ms, or None under --benchmark-disable.

    GPU: the median comes from CUDA events (cuda_median_ms); pytest-benchmark then also times a
    few synchronised calls for its own table. CPU: pytest-benchmark's rounds are the measurement.
    """
    counter = {"i": 0}

    def pedantic_setup():
        i = counter["i"]
        counter["i"] += 1
        if setup:
            setup()
        return args_for(i), {}

    def synced(*args):
        out = fn(*args)
        _sync()
        return out

    if not benchmark.enabled:
        benchmark.pedantic(synced, setup=pedantic_setup, rounds=1)
        return None
    if HAS_CUDA:
        ms = cuda_median_ms(fn, args_for, setup)
        benchmark.pedantic(synced, setup=pedantic_setup, rounds=5, warmup_rounds=1)  # 5: its table only
        return ms
    benchmark.pedantic(synced, setup=pedantic_setup, rounds=CPU_ROUNDS, warmup_rounds=1)
    return benchmark.stats.stats.median * 1e3


def peak_memory_mb(fn: Callable, args: tuple, setup: Optional[Callable] = None) -> Optional[float]:
    """Memory allocated by one call beyond what was resident before it (GPU only, else None).

    On CPU torch has no allocator statistics and tracemalloc does not see torch's allocations, so
    nothing is reported rather than a guess.
    """
    if not HAS_CUDA:
        return None
    if setup:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_DENSE_MS: dict = {}


def dense_ms(cfg: ShapeConfig, size: str, mode: str, enabled: bool = True) -> Optional[float]:
    """Median time of baselines.dense_mlp over T*k rows (the MoE's base FLOPs, no routing); cached.

    The layer benchmark's own `dense` provider fills the cache (record()), so vs_dense and the
    summary's dense row come from the same measurement; only a run without it times the MLP here.
    """
    if not enabled:
        return None
    key = (cfg.name, size, mode)
    if key not in _DENSE_MS:
        d = dense_callable(cfg, mode)
        _DENSE_MS[key] = median_ms(d.fn, d.args_for, d.setup)
    return _DENSE_MS[key]


@dataclass
class DenseBench:
    fn: Callable  # x [T*k, H] -> y [T*k, H] (and its backward in fwd+bwd mode)
    args_for: Callable[[int], tuple]
    setup: Callable
    w_gate_up: torch.Tensor  # [2F or F, H]
    w_down: torch.Tensor  # [H, F]


def dense_callable(cfg: ShapeConfig, mode: str) -> DenseBench:
    """The dense MLP over T*k rows; its weights need a gradient iff the MoE's base trains."""
    n = cfg.T * cfg.k
    glu = is_glu(cfg.activation)
    bwd = mode == "fwd+bwd"
    g = torch.Generator(device=DEVICE).manual_seed(2)
    w_gu = (torch.randn((2 if glu else 1) * cfg.F, cfg.H, device=DEVICE, dtype=DTYPE, generator=g) * cfg.H**-0.5)
    w_d = (torch.randn(cfg.H, cfg.F, device=DEVICE, dtype=DTYPE, generator=g) * cfg.F**-0.5)
    base_trainable = not cfg.lora
    w_gu.requires_grad_(bwd and base_trainable)
    w_d.requires_grad_(bwd and base_trainable)
    xs = [torch.randn(n, cfg.H, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(bwd) for _ in range(N_INPUTS)]
    gy = torch.randn(n, cfg.H, device=DEVICE, dtype=DTYPE, generator=g)

    def fn(x):
        if not bwd:
            with torch.no_grad():
                return baselines.dense_mlp(x, w_gu, w_d, cfg.activation)
        y = baselines.dense_mlp(x, w_gu, w_d, cfg.activation)
        y.backward(gy)
        return y

    def setup():
        for t in (w_gu, w_d, *xs):
            t.grad = None

    return DenseBench(fn, lambda i: (xs[i % len(xs)],), setup, w_gu, w_d)


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


def record(benchmark, rec: Record, flop_count: Optional[int] = None, bytes_moved: Optional[int] = None,
           dense: Optional[float] = None) -> Record:
    """Fill the derived metrics, put them in benchmark.extra_info and RESULTS."""
    if rec.provider == "dense" and rec.ms:
        _DENSE_MS[(rec.config, rec.size, rec.mode)] = rec.ms
        dense = rec.ms
    if rec.ms:
        if flop_count:
            rec.tflops = flop_count / (rec.ms * 1e-3) / 1e12
        if bytes_moved:
            rec.gbps = bytes_moved / (rec.ms * 1e-3) / 1e9
        if dense:
            rec.vs_dense = dense / rec.ms
    # Ratio to each provider of the same benchmark measured before this one (the providers run in
    # the order of their parametrisation, ours last, so ours carries a ratio to every baseline).
    for other in RESULTS:
        if (other.group, other.config, other.size, other.mode) == (rec.group, rec.config, rec.size, rec.mode) \
                and other.ms and rec.ms and other.provider not in (rec.provider, "dense"):  # dense: vs_dense
            rec.extra[f"speedup_vs_{other.provider}"] = other.ms / rec.ms
    info = {
        "group": rec.group, "config": rec.config, "size": rec.size, "mode": rec.mode, "provider": rec.provider,
        "device": device_name(), "dtype": str(DTYPE).replace("torch.", ""), "median_ms": rec.ms,
        "tflops": rec.tflops, "gbps": rec.gbps, "vs_dense": rec.vs_dense, "peak_mem_mb": rec.peak_mem_mb,
        "flops": flop_count, "bytes": bytes_moved, **rec.shape, **rec.extra,
    }
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
    RESULTS.append(rec)
    return rec


def record_skip(group: str, cfg: ShapeConfig, size: str, mode: str, provider: str, reason: str) -> None:
    """Remember a skipped provider for the summary, then skip the test with the reason."""
    RESULTS.append(Record(group, cfg.name, size, mode, provider, skipped=reason, shape=cfg.as_dict()))
    pytest.skip(reason)


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    return "cpu"


def first_call(fn: Callable, args: Sequence):
    """Run fn once, turning a CUDA out-of-memory into None (the caller skips with a reason)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        pass
    # Outside the except block: the exception's frames (and the tensors they hold) are gone now,
    # so the cache can really be emptied for the next provider.
    torch.cuda.empty_cache()
    return None
