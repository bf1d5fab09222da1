"""The functional ops one by one, each against the torch sequence a framework author would write.

    topk_gating    logits [T, E] fp32 -> weights, ids      vs softmax + topk + renormalise + bincount
    build_routing  ids [T, k] -> RoutingPlan               vs stable sort + bincount + cumsum + inverse
    permute        x [T, H] -> x_sorted [T*k, H]           vs index_select
    unpermute      y_sorted [T*k, H], weights -> [T, H]    vs weighted index_add
    grouped_mlp    x_sorted [T*k, H] -> y_sorted [T*k, H]  vs the package's torch loop over experts,
                   (fwd and fwd+bwd)                           and torch._grouped_mm where it runs

`ours` calls unimoe_kernels.ops with backend="auto" (where the op takes a backend), so Triton
kernels are measured on CUDA as they land. Every provider's result is checked against reference.py
first. The first four ops are memory-bound: their metric is GB/s of the bytes they must move
(inputs read once, outputs written once; index tensors included). grouped_mlp reports TFLOP/s and
its ratio to a dense MLP of the same FLOPs. The torch baselines of build_routing and topk_gating
compute what their users need, not the tile map or the scores the package also returns.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch

from unimoe_kernels import baselines, ops, reference
from unimoe_kernels.ops import routing
from unimoe_kernels.types import ExpertBias

from . import configs, harness
from .harness import DEVICE, DTYPE, Record


def _ours(fn, *args, **kwargs):
    """Call an op with backend="auto" when it takes one (build_routing chooses among c, triton and torch)."""
    if "backend" in inspect.signature(fn).parameters:
        kwargs["backend"] = "auto"
    return fn(*args, **kwargs)


def _params(providers: dict):
    out = []
    for size, name in itertools.product(("tiny", "full"), configs.NAMES):
        marks = [pytest.mark.gpu] if size == "full" else []
        for op, provs in providers.items():
            for provider in provs:
                out.append(pytest.param(size, name, op, provider, marks=marks, id=f"{size}-{name}-{op}-{provider}"))
    return out


class _Inputs:
    """Router logits, gating, plan and activations of one config, built once and reused by all ops."""

    def __init__(self, cfg):
        self.cfg = cfg
        g = torch.Generator(device=DEVICE).manual_seed(4)
        t, e, k, h = cfg.T, cfg.E, cfg.k, cfg.H
        self.logits = [torch.randn(t, e, device=DEVICE, generator=g) for _ in range(harness.N_INPUTS)]
        gating = reference.topk_gating(self.logits[0], k)
        self.weights, self.ids = gating.weights, gating.ids
        self.plan = reference.build_routing(self.ids, e)
        self.xs = [torch.randn(t, h, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(harness.N_INPUTS)]
        self.ys_sorted = [torch.randn(t * k, h, device=DEVICE, dtype=DTYPE, generator=g)
                          for _ in range(harness.N_INPUTS)]
        self._moe = None

    def moe(self):
        """The config's SparseMoE, built on first use (only grouped_mlp needs expert weights)."""
        if self._moe is None:
            self._moe = harness.make_moe(self.cfg)
        return self._moe


_INPUTS: dict = {}


def get_inputs(cfg, size) -> _Inputs:
    key = (cfg.name, size)
    if key not in _INPUTS:
        _INPUTS.clear()  # one config alive at a time (full sizes are GBs)
        _INPUTS[key] = _Inputs(cfg)
    return _INPUTS[key]


def _check_ids(name, got, want):
    bad = int((got.to(torch.int64) != want.to(torch.int64)).any(dim=1).sum())
    allowed = int(harness.TIE_FLIP_SHARE * got.shape[0])
    assert bad <= allowed, (
        f"{name}: {bad} tokens chose other experts than reference.py ({allowed} allowed for near-ties)")


# ----------------------------------------------------------------------------------------------
# Memory-bound ops
# ----------------------------------------------------------------------------------------------


def _torch_gating(logits, k):
    probs = torch.softmax(logits, dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    counts = torch.bincount(ids.reshape(-1), minlength=logits.shape[1])
    return w, ids, counts


def _torch_routing(ids, num_experts):
    flat = ids.reshape(-1).to(torch.int64)
    sorted_slots = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return counts, offsets, sorted_slots, slot_rows


def _index_add_unpermute(y_sorted, plan, weights, k):
    tokens = plan.sorted_slots.to(torch.int64) // k
    w_sorted = weights.reshape(-1)[plan.sorted_slots.to(torch.int64)]
    out = torch.zeros(weights.shape[0], y_sorted.shape[1], device=y_sorted.device, dtype=torch.float32)
    return out.index_add_(0, tokens, y_sorted.float() * w_sorted.unsqueeze(-1)).to(y_sorted.dtype)


MEMORY_BOUND = {
    "topk_gating": ("torch_sequence", "ours"),
    # Both compiled plans side by side (the default, "ours", picks _C when it serves the device).
    "build_routing": ("torch_sort", "c_plan", "triton_plan", "ours"),
    "permute": ("index_select", "ours"),
    "unpermute": ("index_add", "ours"),
}


@pytest.mark.parametrize("size, name, op, provider", _params(MEMORY_BOUND))
def test_memory_bound_op(benchmark, size, name, op, provider):
    cfg = configs.get(name, size)
    benchmark.group = f"{op} {name} {size}"
    inp = get_inputs(cfg, size)
    t, e, k, h = cfg.T, cfg.E, cfg.k, cfg.H
    n = t * k
    esize = torch.tensor([], dtype=DTYPE).element_size()
    ours = provider == "ours"

    if op == "topk_gating":
        want = reference.topk_gating(inp.logits[0], k)
        if ours:
            fn = lambda logits: _ours(ops.topk_gating, logits, k)  # noqa: E731
            got = fn(inp.logits[0])
            got_w, got_ids = got.weights, got.ids
        else:
            fn = lambda logits: _torch_gating(logits, k)  # noqa: E731
            got_w, got_ids, counts = fn(inp.logits[0])
            # Its counts must describe its own ids (the ids themselves are checked just below).
            assert torch.equal(counts, torch.bincount(got_ids.reshape(-1), minlength=e)), "bincount disagrees with ids"
        _check_ids(provider, got_ids, want.ids)
        harness.check_close(f"{provider} weights", got_w, want.weights, torch.float32)
        args_for = lambda i: (inp.logits[i % len(inp.logits)],)  # noqa: E731
        # logits read, scores written (both [T, E] fp32), weights fp32 + ids int32 written.
        bytes_moved = 2 * t * e * 4 + n * 8
    elif op == "build_routing":
        want = reference.build_routing(inp.ids, e)
        impl = {"c_plan": "c", "triton_plan": "triton"}.get(provider)
        if impl == "c" and not routing._c_serves(inp.ids.device):
            pytest.skip("unimoe_kernels._C does not serve this device")
        if ours or impl is not None:
            if ours:
                fn = lambda ids: _ours(ops.build_routing, ids, e)  # noqa: E731
            else:
                fn = lambda ids: ops.build_routing(ids, e, backend=impl)  # noqa: E731
            plan = fn(inp.ids)
            got = (plan.tokens_per_expert, plan.expert_offsets, plan.sorted_slots, plan.slot_rows)
            assert torch.equal(plan.tile_expert.cpu(), want.tile_expert.cpu()), "tile_expert differs from reference.py"
            assert torch.equal(plan.tile_row_start.cpu(), want.tile_row_start.cpu()), "tile_row_start differs"
        else:
            fn = lambda ids: _torch_routing(ids, e)  # noqa: E731
            got = fn(inp.ids)
        for label, a, b in zip(("counts", "offsets", "sorted_slots", "slot_rows"), got,
                               (want.tokens_per_expert, want.expert_offsets, want.sorted_slots, want.slot_rows)):
            assert torch.equal(a.to(torch.int64).cpu(), b.to(torch.int64).cpu()), (
                f"{provider}: {label} differs from reference.py")
        args_for = lambda i: (inp.ids,)  # noqa: E731 - one routing; ids are tiny next to the caches
        # ids read (int32), sorted_slots and slot_rows written (int32); counts/offsets are O(E).
        bytes_moved = 3 * n * 4
    elif op == "permute":
        want = reference.permute(inp.xs[0], inp.plan, k)
        if ours:
            fn = lambda x: _ours(ops.permute, x, inp.plan, k)  # noqa: E731
        else:
            tokens = inp.plan.sorted_slots.to(torch.int64) // k
            fn = lambda x: x.index_select(0, tokens)  # noqa: E731
        assert torch.equal(fn(inp.xs[0]), want), f"{provider}: permuted rows differ from reference.py"
        args_for = lambda i: (inp.xs[i % len(inp.xs)],)  # noqa: E731
        # N rows gathered and written, plus the int32 row index.
        bytes_moved = 2 * n * h * esize + n * 4
    else:  # unpermute
        want = reference.unpermute(inp.ys_sorted[0].float(), inp.plan, inp.weights)
        if ours:
            fn = lambda y: _ours(ops.unpermute, y, inp.plan, inp.weights)  # noqa: E731
        else:
            fn = lambda y: _index_add_unpermute(y, inp.plan, inp.weights, k)  # noqa: E731
        harness.check_close(provider, fn(inp.ys_sorted[0]), want, DTYPE)
        args_for = lambda i: (inp.ys_sorted[i % len(inp.ys_sorted)],)  # noqa: E731
        # N rows read, T rows written, weights fp32 and row index int32 read.
        bytes_moved = n * h * esize + t * h * esize + n * 8

    def call(*args):
        with torch.no_grad():
            return fn(*args)

    ms = harness.measure(benchmark, call, args_for)
    rec = Record(op, cfg.name, size, "fwd", provider, ms=ms, shape=cfg.as_dict(),
                 peak_mem_mb=harness.peak_memory_mb(call, args_for(0)) if ms else None)
    harness.record(benchmark, rec, bytes_moved=bytes_moved)


# ----------------------------------------------------------------------------------------------
# grouped_mlp
# ----------------------------------------------------------------------------------------------

GROUPED = ("torch", "grouped_mm", "ours")


def _grouped_params():
    out = []
    for size, name, mode, provider in itertools.product(("tiny", "full"), configs.NAMES, ("fwd", "fwd+bwd"), GROUPED):
        marks = [pytest.mark.gpu] if size == "full" else []
        out.append(pytest.param(size, name, mode, provider, marks=marks, id=f"{size}-{name}-{mode}-{provider}"))
    return out


@pytest.mark.parametrize("size, name, mode, provider", _grouped_params())
def test_grouped_mlp(benchmark, size, name, mode, provider):
    cfg = configs.get(name, size)
    benchmark.group = f"grouped_mlp {name} {size} {mode}"
    bwd = mode == "fwd+bwd"
    inp = get_inputs(cfg, size)
    moe = inp.moe()
    ex = moe.experts
    counts = inp.plan.tokens_per_expert
    xs = [reference.permute(x, inp.plan, cfg.k).requires_grad_(bwd) for x in inp.xs]
    lora = ex.lora_weights()
    kwargs = dict(lora=lora, lora_scale=ex.lora_scale)
    if provider == "ours":
        fn = lambda x: _ours(ops.grouped_mlp, x, counts, ex.gate_up_proj, ex.down_proj, ex.activation, **kwargs)  # noqa: E731
    elif provider == "torch":
        fn = lambda x: reference.grouped_mlp(x, counts, ex.gate_up_proj, ex.down_proj, ex.activation, **kwargs)  # noqa: E731
    else:
        why = baselines.grouped_mm_supported(DEVICE, DTYPE)
        if why:
            harness.record_skip("grouped_mlp", cfg, size, mode, provider, why)
        fn = lambda x: baselines.grouped_mm_mlp(x, counts, ex.gate_up_proj, ex.down_proj, ex.activation, **kwargs)  # noqa: E731

    g = torch.Generator(device=DEVICE).manual_seed(5)
    dy = torch.randn(cfg.T * cfg.k, cfg.H, device=DEVICE, dtype=DTYPE, generator=g)
    params = [p for p in moe.parameters() if p.requires_grad]

    def setup():
        for p in (*params, *xs):
            p.grad = None

    def call(x):
        if not bwd:
            with torch.no_grad():
                return fn(x)
        y = fn(x)
        y.backward(dy)
        return y

    # Oracle: reference.grouped_mlp in fp32 on fp32 copies.
    f32 = lambda t: None if t is None else t.detach().float()  # noqa: E731
    x_ref = f32(xs[0]).requires_grad_(bwd)
    lora_ref = None if lora is None else reference.LoRAWeights(*(f32(t) for t in lora))
    y_ref = reference.grouped_mlp(x_ref, counts, f32(ex.gate_up_proj), f32(ex.down_proj), ex.activation,
                                  lora=lora_ref, lora_scale=ex.lora_scale)
    setup()
    try:
        y = harness.first_call(call, (xs[0],))
    except NotImplementedError as err:
        harness.record_skip("grouped_mlp", cfg, size, mode, provider, str(err))
    if y is None:
        harness.record_skip("grouped_mlp", cfg, size, mode, provider, "CUDA out of memory at this size")
    harness.check_close(f"{provider} y", y, y_ref, DTYPE)
    if bwd:
        y_ref.backward(dy.float())
        harness.check_close(f"{provider} dx", xs[0].grad, x_ref.grad, DTYPE)

    args_for = lambda i: (xs[i % len(xs)],)  # noqa: E731
    ms = harness.measure(benchmark, call, args_for, setup)
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, cfg.r, bwd,
                                 base_trainable=not ex.base_frozen)
    rec = Record("grouped_mlp", cfg.name, size, mode, provider, ms=ms, shape=cfg.as_dict(),
                 peak_mem_mb=harness.peak_memory_mb(call, args_for(0), setup) if ms else None)
    harness.record(benchmark, rec, flop_count=flop_count.total, dense=harness.dense_ms(cfg, size, mode, bool(ms)))


@pytest.mark.parametrize("size", [pytest.param("tiny"), pytest.param("full", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "ours-bias"])
def test_expert_bias(benchmark, size, mode, provider):
    """gpt-oss-20b's experts (interleaved clamped SwiGLU) with and without its per-expert biases on
    both projections, trainable: what the bias epilogues and the bias gradients' per-expert sums
    cost beside the same layer without them. Checked against reference.grouped_mlp in fp32."""
    cfg = configs.get("gpt-oss-20b", size)
    benchmark.group = f"expert_bias gpt-oss-20b {size} {mode}"
    bwd = mode == "fwd+bwd"
    inp = get_inputs(cfg, size)
    moe = inp.moe()
    ex = moe.experts
    counts = inp.plan.tokens_per_expert
    g = torch.Generator(device=DEVICE).manual_seed(6)
    bias = None
    if provider == "ours-bias":
        bias = ExpertBias(*(torch.randn(cfg.E, n, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(bwd)
                            for n in (ex.gate_up_proj.shape[1], cfg.H)))
    xs = [reference.permute(x, inp.plan, cfg.k).requires_grad_(bwd) for x in inp.xs]
    dy = torch.randn(cfg.T * cfg.k, cfg.H, device=DEVICE, dtype=DTYPE, generator=g)
    leaves = [t for t in (*xs, *(bias or ()), *moe.parameters()) if t.requires_grad]

    def setup():
        for t in leaves:
            t.grad = None

    def call(x):
        with torch.set_grad_enabled(bwd):
            y = _ours(ops.grouped_mlp, x, counts, ex.gate_up_proj, ex.down_proj, ex.activation, bias=bias)
            if bwd:
                y.backward(dy)
        return y

    f32 = lambda t: None if t is None else t.detach().float().requires_grad_(bwd)  # noqa: E731
    bias_ref = None if bias is None else ExpertBias(*(f32(t) for t in bias))
    x_ref = f32(xs[0])
    y_ref = reference.grouped_mlp(x_ref, counts, f32(ex.gate_up_proj), f32(ex.down_proj), ex.activation,
                                  bias=bias_ref)
    setup()
    y = harness.first_call(call, (xs[0],))
    if y is None:
        harness.record_skip("expert_bias", cfg, size, mode, provider, "CUDA out of memory at this size")
    harness.check_close(f"{provider} y", y, y_ref, DTYPE)
    if bwd:
        y_ref.backward(dy.float())
        harness.check_close(f"{provider} dx", xs[0].grad, x_ref.grad, DTYPE)
        if bias is not None:
            for name, got, want in zip(("dbias.gate_up", "dbias.down"), bias, bias_ref):
                harness.check_close(f"{provider} {name}", got.grad, want.grad, DTYPE)

    args_for = lambda i: (xs[i % len(xs)],)  # noqa: E731
    ms = harness.measure(benchmark, call, args_for, setup)
    flop_count = baselines.flops(cfg.T, cfg.k, cfg.H, cfg.F, cfg.activation, 0, bwd, base_trainable=not ex.base_frozen)
    rec = Record("expert_bias", cfg.name, size, mode, provider, ms=ms, shape=cfg.as_dict())
    harness.record(benchmark, rec, flop_count=flop_count.total)
