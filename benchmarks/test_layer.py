"""The whole SparseMoE layer, forward and forward+backward, side by side with what users run instead.

Providers (one test each, in this order so that `ours` comes last and carries its ratio to all):

    dense            baselines.dense_mlp over T*k rows: the MoE's FLOPs with no routing (roofline)
    naive_loop       Mixtral / Uni-MoE v1 loop over experts           (baselines.naive_loop_moe)
    onehot_dispatch  DeepSpeed-MoE / Uni-MoE 8e one-hot einsums        (baselines.onehot_dispatch_moe)
    peft_delta_w     PEFT target_parameters, W + s*B@A materialised    (LoRA configs only)
    grouped_mm       torch._grouped_mm over sorted rows                (where this torch runs it)
    torch            SparseMoE(backend="torch"): the package's own torch path (reference.py)
    scattermoe, megablocks, liger_kernel, moe_ops   other projects' fused MoE kernels (anchors.py):
                     Liger's and moe-ops' run where installed; the others skip with the reason
    ours             SparseMoE(backend="auto"): Triton kernels on CUDA as they land, torch on CPU

Each test checks the provider's output (and dx for fwd+bwd) against reference.py in fp32 before it
times anything. The layers run in eval mode: the baselines have no aux-loss gradient or dropout,
so training mode would time different work. "fwd" runs under torch.no_grad (inference); "fwd+bwd"
backpropagates a fixed random dy into x and every trainable parameter (LoRA only, base frozen, for
LoRA configs). TFLOP/s counts the expert GEMMs (baselines.flops; router and dispatch overheads are
not counted, so every provider is credited the same useful work).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from unimoe_kernels import baselines, reference

from . import anchors, configs, harness
from .harness import DEVICE, DTYPE, Record

ANCHORS = anchors.NAMES
PROVIDERS = ("dense", "naive_loop", "onehot_dispatch", "peft_delta_w", "grouped_mm", "torch", *ANCHORS, "ours")
MODES = ("fwd", "fwd+bwd")


def _params():
    out = []
    for size, name, mode, provider in itertools.product(("tiny", "full"), configs.NAMES, MODES, PROVIDERS):
        # Full sizes need a GPU (minutes and GBs on CPU); the gpu marker skips them cleanly without one.
        marks = [pytest.mark.gpu] if size == "full" else []
        out.append(pytest.param(size, name, mode, provider, marks=marks, id=f"{size}-{name}-{mode}-{provider}"))
    return out


class _Case:
    """Module, inputs and the oracle's answer for one (config, size, mode), reused by its providers."""

    def __init__(self, cfg, size, mode):
        self.cfg, self.size, self.mode = cfg, size, mode
        self.bwd = mode == "fwd+bwd"
        self.moe = harness.make_moe(cfg, "auto")
        self.xs = harness.make_inputs(cfg, requires_grad=self.bwd)
        g = torch.Generator(device=DEVICE).manual_seed(3)
        self.grad_out = torch.randn(cfg.T, cfg.H, device=DEVICE, dtype=DTYPE, generator=g) if self.bwd else None
        self.y_ref, self.dx_ref = harness.oracle_layer(self.moe, self.xs[0], self.grad_out)


_CASE: dict = {}


def get_case(cfg, size, mode) -> _Case:
    key = (cfg.name, size, mode)
    if key not in _CASE:
        _CASE.clear()  # one case alive at a time: full-size weights and inputs are GBs on the GPU
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _CASE[key] = _Case(cfg, size, mode)
    return _CASE[key]


def _provider_fn(provider: str, case: _Case):
    """provider name -> callable x -> y, or a string saying why it cannot run here."""
    cfg, moe = case.cfg, case.moe
    if provider == "ours":
        return moe
    if provider == "torch":
        return harness.twin(moe, cfg, "torch")
    if provider in ANCHORS:
        return anchors.provider(provider, moe)
    if provider == "peft_delta_w" and not cfg.lora:
        return "no LoRA in this config (the delta-W baseline is PEFT's LoRA path)"
    if provider == "grouped_mm":
        why = baselines.grouped_mm_supported(DEVICE, DTYPE)
        if why:
            return why
    fn = baselines.PROVIDERS[provider]
    return lambda x: fn(moe, x)


def _run_dense(benchmark, cfg, size, mode):
    d = harness.dense_callable(cfg, mode)
    # The dense chain is checked against reference.grouped_mlp with all rows given to one expert.
    (x0,) = d.args_for(0)
    d.setup()
    y = d.fn(x0)
    want = reference.grouped_mlp(
        x0.detach().float(), torch.tensor([x0.shape[0]], device=DEVICE), d.w_gate_up.detach().float()[None],
        d.w_down.detach().float()[None], cfg.activation,
    )
    harness.check_close("dense", y, want, DTYPE)
    ms = harness.measure(benchmark, d.fn, d.args_for, d.setup)
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, 0, mode == "fwd+bwd",
                                 base_trainable=not cfg.lora)
    rec = Record("layer", cfg.name, size, mode, "dense", ms=ms, shape=cfg.as_dict(),
                 peak_mem_mb=harness.peak_memory_mb(d.fn, d.args_for(0), d.setup) if ms else None)
    harness.record(benchmark, rec, flop_count=flop_count.total, dense=ms)


@pytest.mark.parametrize("size, name, mode, provider", _params())
def test_layer(benchmark, size, name, mode, provider):
    cfg = configs.get(name, size)
    benchmark.group = f"layer {name} {size} {mode}"
    if provider == "dense":
        return _run_dense(benchmark, cfg, size, mode)
    case = get_case(cfg, size, mode)
    fn = _provider_fn(provider, case)
    if isinstance(fn, str):
        harness.record_skip("layer", cfg, size, mode, provider, fn)
    moe, bwd = case.moe, case.bwd
    params = [p for p in moe.parameters() if p.requires_grad]
    setup, call = harness.layer_callables(fn, params, case.xs, case.grad_out, bwd)

    # Correctness first: a fast wrong provider fails here.
    setup()
    try:
        y = harness.first_call(call, (case.xs[0],))
    except NotImplementedError as err:  # e.g. grouped_mm's stride rule on this shape
        harness.record_skip("layer", cfg, size, mode, provider, str(err))
    if y is None:
        harness.record_skip("layer", cfg, size, mode, provider, "CUDA out of memory at this size")
    harness.check_close(f"{provider} y", y, case.y_ref, DTYPE)
    if bwd:
        harness.check_close(f"{provider} dx", case.xs[0].grad, case.dx_ref, DTYPE)

    args_for = lambda i: (case.xs[i % len(case.xs)],)  # noqa: E731 - rotation of the input sets
    ms = harness.measure(benchmark, call, args_for, setup)
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, cfg.r, bwd,
                                 base_trainable=not moe.experts.base_frozen)
    extra = {"lora_flops": flop_count.lora} if flop_count.lora else {}
    if provider in ANCHORS:
        extra.update(anchors.describe(provider))
    rec = Record("layer", cfg.name, size, mode, provider, ms=ms, shape=cfg.as_dict(),
                 peak_mem_mb=harness.peak_memory_mb(call, args_for(0), setup) if ms else None, extra=extra)
    harness.record(benchmark, rec, flop_count=flop_count.total, dense=harness.dense_ms(cfg, size, mode, bool(ms)))
