"""The benchmark baselines (unimoe_kernels.baselines) against SparseMoE, forward and gradients.

SparseMoE's CPU path (reference.py) is the oracle; every baseline is an independent rewrite in
another codebase's style, so agreement here is what lets the benchmarks compare their timings.
All in fp32 on CPU with tiny shapes (plain torch, no Triton), so the whole file takes seconds.
"""

import pytest
import torch
from tolerance import BASELINES_FP32
from torch.utils.flop_counter import FlopCounterMode

from unimoe_kernels import SparseMoE, baselines, reference

PROVIDERS = sorted(baselines.PROVIDERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes; see conftest.py
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")


def make_moe(h=16, f=8, e=5, k=2, *, lora_rank=0, **kwargs):
    moe = SparseMoE(h, f, e, k, lora_rank=lora_rank, backend="torch", **kwargs).eval()
    if lora_rank:
        # B starts at zero, which would hide a wrong LoRA term; give it values.
        with torch.no_grad():
            for name, p in moe.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
    return moe


def run(fn, moe, x):
    """Output and gradients of x, router weight and every trainable expert parameter."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    (y * g).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in moe.named_parameters() if p.grad is not None})
    return y.detach(), grads


def assert_matches(provider, moe, x):
    y_ref, g_ref = run(moe, moe, x)
    y, g = run(lambda t: baselines.PROVIDERS[provider](moe, t), moe, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, **BASELINES_FP32)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], **BASELINES_FP32, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_provider_matches_sparse_moe(provider, activation, lora_rank):
    # H=16, F=8, r=4 in fp32 keep every stride a multiple of 16 bytes, so grouped_mm runs too.
    moe = make_moe(activation=activation, lora_rank=lora_rank)
    x = torch.randn(3, 7, 16)  # leading dims are flattened and restored
    assert_matches(provider, moe, x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "t, e, k, kwargs",
    [
        (1, 5, 2, {}),  # one token: most experts get nothing
        (3, 7, 1, {}),  # k = 1, prime E: experts with no tokens
        (6, 4, 4, {}),  # k = E: every expert gets every token
        (9, 6, 3, {"scoring": "sigmoid"}),  # sigmoid scores, renormalised
        (9, 6, 3, {"normalize_topk": False}),  # raw softmax weights
        (5, 8, 2, {"lora_rank": 8, "lora_alpha": 16.0}),  # Uni-MoE LoRA (alpha = 2r, scale 2)
    ],
)
def test_provider_edge_routing(provider, t, e, k, kwargs):
    moe = make_moe(e=e, k=k, **kwargs)
    assert_matches(provider, moe, torch.randn(t, 16))


def test_every_token_to_one_expert():
    # A router that sends every token to experts 2 then 3: two busy experts, two idle. Distinct
    # weights per expert avoid ties (their order is each implementation's own), and logits of
    # order 1 keep the softmax gradient well conditioned.
    moe = make_moe(e=4, k=2)
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([0.0, 0.01, 0.1, 0.05]).unsqueeze(1).expand(4, 16))
    x = torch.rand(6, 16) + 0.1  # positive, so the logits keep the weights' order for every token
    for provider in PROVIDERS:
        assert_matches(provider, moe, x)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "grouped_mm"])
def test_odd_hidden_size(provider):
    # H=97, F=13: not 16-byte aligned, which only torch._grouped_mm cares about.
    moe = make_moe(h=97, f=13, e=3, k=2, lora_rank=3)
    assert_matches(provider, moe, torch.randn(5, 97))


def test_grouped_mm_rejects_misaligned_strides():
    moe = make_moe(h=97, f=13, e=3, k=2)
    with pytest.raises(NotImplementedError, match="16-byte"):
        baselines.grouped_mm_moe(moe, torch.randn(4, 97))


def test_grouped_mm_probe_reports_reason(monkeypatch):
    # fp32 on CPU runs in this torch (the providers above run it): no reason.
    baselines._grouped_mm_probe.cache_clear()
    assert baselines.grouped_mm_supported(torch.device("cpu"), torch.float32) is None
    # Where the probe fails, the reason names the op, the device, the dtype and the failure.
    def fails(device_type, dtype):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(baselines, "_grouped_mm_tiny", fails)
    baselines._grouped_mm_probe.cache_clear()
    try:
        why = baselines.grouped_mm_supported(torch.device("cpu"), torch.float32)
        assert why is not None and "torch._grouped_mm" in why and "cpu" in why and "float32" in why
        assert "RuntimeError: no kernel for this dtype" in why
        monkeypatch.delattr(torch, "_grouped_mm")
        baselines._grouped_mm_probe.cache_clear()
        why = baselines.grouped_mm_supported(torch.device("cpu"), torch.float32)
        assert why is not None and "has no torch._grouped_mm" in why
    finally:
        baselines._grouped_mm_probe.cache_clear()  # no cached failure for the tests after this one


@pytest.mark.parametrize("provider", PROVIDERS)
def test_empty_batch(provider):
    moe = make_moe()
    y = baselines.PROVIDERS[provider](moe, torch.randn(0, 16))
    assert y.shape == (0, 16)


def test_non_contiguous_input():
    moe = make_moe()
    x = torch.randn(16, 10).t()  # [10, 16] with strides (1, 10)
    assert not x.is_contiguous()
    for provider in PROVIDERS:
        torch.testing.assert_close(baselines.PROVIDERS[provider](moe, x), moe(x), **BASELINES_FP32)


def test_bad_input():
    moe = make_moe()
    with pytest.raises(TypeError, match="x"):
        baselines.naive_loop_moe(moe, torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="hidden_size=16"):
        baselines.onehot_dispatch_moe(moe, torch.randn(3, 15))
    dropping = SparseMoE(16, 8, 4, 2, capacity_factor=1.0).eval()
    with pytest.raises(ValueError, match="capacity_factor"):
        baselines.peft_delta_w_moe(dropping, torch.randn(3, 16))
    jittery = SparseMoE(16, 8, 4, 2, router_jitter=0.1).train()
    with pytest.raises(ValueError, match="eval"):
        baselines.naive_loop_moe(jittery, torch.randn(3, 16))
    biased = SparseMoE(16, 8, 4, 2, router_kwargs={"use_expert_bias": True}).eval()
    with pytest.raises(NotImplementedError, match="expert_bias"):
        baselines.naive_loop_moe(biased, torch.randn(3, 16))


def test_dense_mlp():
    n, h, f = 12, 16, 8
    x, w_gu, w_d = torch.randn(n, h), torch.randn(2 * f, h), torch.randn(h, f)
    gate, up = (x @ w_gu.t()).split(f, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ w_d.t()
    torch.testing.assert_close(baselines.dense_mlp(x, w_gu, w_d), expected)
    with pytest.raises(ValueError, match="w_down"):
        baselines.dense_mlp(x, w_gu, torch.randn(h, f + 1))


def test_flops_formula():
    T, k, H, F = 8, 2, 16, 8
    assert baselines.flops(T, k, H, F).total == 6 * T * k * H * F
    assert baselines.flops(T, k, H, F, backward=True).total == 18 * T * k * H * F
    assert baselines.flops(T, k, H, F, "relu").total == 4 * T * k * H * F
    assert baselines.flops(T, k, H, F, "gelu", backward=True).total == 12 * T * k * H * F
    with_lora = baselines.flops(T, k, H, F, lora_rank=4)
    assert with_lora.base == 6 * T * k * H * F and with_lora.lora > 0
    with pytest.raises(ValueError, match="activation"):
        baselines.flops(T, k, H, F, "tanh")


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("backward", [False, True])
def test_flops_match_torch_flop_counter(activation, lora_rank, backward):
    # Count what torch actually executes for the reference grouped MLP (router excluded), forward
    # or forward+backward with x needing a gradient: base trainable without LoRA, frozen with it.
    T, k, H, F, E = 8, 2, 16, 8, 4
    moe = make_moe(h=H, f=F, e=E, k=k, activation=activation, lora_rank=lora_rank)
    ex = moe.experts
    counts = torch.tensor([5, 0, 7, 4])  # sums to T*k = 16; one idle expert
    x_sorted = torch.randn(T * k, H, requires_grad=backward)
    with FlopCounterMode(display=False) as counter:
        y = reference.grouped_mlp(x_sorted, counts, ex.gate_up_proj, ex.down_proj, activation,
                                  lora=ex.lora_weights(), lora_scale=ex.lora_scale)
        if backward:
            y.backward(torch.ones_like(y))
    expected = baselines.flops(T, k, H, F, activation, lora_rank, backward, base_trainable=not ex.base_frozen)
    assert counter.get_total_flops() == expected.total


def test_grouped_mm_works_under_no_grad():
    # The support probe runs a backward; it must not be fooled by a first call made under no_grad.
    baselines._grouped_mm_probe.cache_clear()
    moe = make_moe()
    x = torch.randn(5, 16)
    with torch.no_grad():
        y = baselines.grouped_mm_moe(moe, x)
    torch.testing.assert_close(y, moe(x), **BASELINES_FP32)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_grouped_mm_mlp_matches_reference(lora_rank):
    # The op-level grouped_mm chain against reference.grouped_mlp, with an idle expert in the middle.
    moe = make_moe(e=4, lora_rank=lora_rank)
    ex = moe.experts
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    kwargs = dict(lora=ex.lora_weights(), lora_scale=ex.lora_scale)
    got = baselines.grouped_mm_mlp(x, counts, ex.gate_up_proj, ex.down_proj, "swiglu", **kwargs)
    want = reference.grouped_mlp(x, counts, ex.gate_up_proj, ex.down_proj, "swiglu", **kwargs)
    torch.testing.assert_close(got, want, **BASELINES_FP32)
    g = torch.randn_like(want)
    (dx_got,) = torch.autograd.grad(got, x, g)
    (dx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(dx_got, dx_want, **BASELINES_FP32)
