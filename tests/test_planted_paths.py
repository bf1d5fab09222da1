"""Paths the other tests did not reach, each one where a planted bug went unnoticed:

- the grouped GEMM's pointer loads of the weights (a config with TMA off) over several K steps, with
  and without the LoRA side product, both weight layouts, a ragged and an even last K step;
- a backward that asks for one LoRA gradient only (each factor and each rank gate alone), through
  grouped_mlp and grouped_mlp_combine;
- torch.autocast with LoRA factors through grouped_mlp_combine itself (not only the modules);
- PEFT target_parameters LoRA on a transformers model whose experts are `is_transposed` (Aria:
  weights stored [E, in, out]), on the torch path and the Triton kernels.

Against fp64 oracles or transformers / PEFT themselves; tiny shapes (the interpreter on 2 cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tolerance import (
    FLOOR_GEMM,
    HF_GRAD_FP32,
    MODEL_TRITON_FP32,
    MODEL_TRITON_GRAD_FP32,
    ORACLE_FP32,
    TOL,
    assert_flash_rule,
    assert_max_err,
)

from unimoe_kernels import ops, reference
from unimoe_kernels.ops import grouped_gemm_launch as launch

FP32 = TOL[torch.float32]


def _rnd(g, *shape, fan_in=1, device="cpu"):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5).to(device=device,
                                                                                     dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Weight pointer loads (no TMA) over several K steps
# ----------------------------------------------------------------------------------------------

# 16-wide K steps: K = 69 is four full steps and a ragged fifth (masked loads), K = 64 four even
# steps (the unmasked branch). 40 output columns: a full and a masked column tile of 32.
NO_TMA = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1, PERSISTENT=False, TMA=False)
COUNTS = [5, 0, 19]  # an empty expert, an expert across two row tiles
NOUT, RANK = 40, 3


@pytest.mark.parametrize("k", [69, 64], ids=["ragged_last_k_step", "even_k_steps"])
@pytest.mark.parametrize("kmajor", [True, False], ids=["x_WT_layout", "dy_W_layout"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
def test_weight_pointer_loads_without_tma_over_several_k_steps(device, monkeypatch, k, kmajor, with_lora):
    from unimoe_kernels.kernels import grouped_mm as k_grouped_mm

    # kernel[grid](...) calls kernel.run(...): an instance attribute records each launch's meta.
    metas: list = []
    kernel = k_grouped_mm.grouped_mm_kernel
    real_run = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *args, **kwargs: metas.append(kwargs) or real_run(*args, **kwargs),
                        raising=False)
    g = torch.Generator().manual_seed(11)
    e, n = len(COUNTS), sum(COUNTS)
    x = _rnd(g, n, k, device=device)
    # The [E, K, NOUT] view the launcher takes: a transpose of [E, NOUT, K] storage ("x W^T", K the
    # contiguous axis) or [E, K, NOUT] storage itself ("dy W").
    w = _rnd(g, e, NOUT, k, fan_in=k, device=device).transpose(1, 2) if kmajor else _rnd(g, e, k, NOUT, fan_in=k,
                                                                                         device=device)
    out = torch.full((n, NOUT), float("nan"), device=device)
    offsets = torch.tensor([0] + COUNTS, device=device).cumsum(0)
    lora = None
    if with_lora:
        a = _rnd(g, e, RANK, k, fan_in=k, device=device).transpose(1, 2) if kmajor else _rnd(g, e, k, RANK, fan_in=k,
                                                                                             device=device)
        b = _rnd(g, e, RANK, NOUT, fan_in=RANK, device=device)
        lora = launch.LoRASide(a=a, b=b, side=torch.full((n, RANK), float("nan"), device=device), scale=0.7)
    launch.grouped_mm(x, w, out, offsets, role="down", nout=NOUT, lora=lora, cfg=dict(NO_TMA))

    assert metas and all(m.get("W_DESC") is False and m.get("X_DESC") is False for m in metas), (
        "the launch did not take the pointer loads")
    want = torch.empty(n, NOUT, dtype=torch.float64)
    side = torch.empty(n, RANK, dtype=torch.float64)
    for ex, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        xe = x[lo:hi].double().cpu()
        want[lo:hi] = xe @ w[ex].double().cpu()
        if with_lora:
            side[lo:hi] = xe @ lora.a[ex].double().cpu()
            want[lo:hi] += 0.7 * side[lo:hi] @ lora.b[ex].double().cpu()
    assert_max_err(out.cpu(), want.float(), ORACLE_FP32, what="out")
    if with_lora:
        assert_max_err(lora.side.cpu(), side.float(), ORACLE_FP32, what="LoRA side product")


# ----------------------------------------------------------------------------------------------
# One LoRA gradient at a time
# ----------------------------------------------------------------------------------------------

T, K_TOP, E, H, F, R = 7, 2, 3, 16, 8, 4
ALONE = ["a_gate_up", "b_gate_up", "a_down", "b_down", "gate_gate_up", "gate_down"]


def _lora_case():
    g = torch.Generator().manual_seed(21)
    ids = torch.stack([torch.randperm(E, generator=g)[:K_TOP] for _ in range(T)])
    case = dict(
        x=_rnd(g, T, H), w_gu=_rnd(g, E, 2 * F, H, fan_in=H), w_d=_rnd(g, E, H, F, fan_in=F),
        a_gate_up=_rnd(g, E, R, H, fan_in=H), b_gate_up=_rnd(g, E, 2 * F, R, fan_in=R),
        a_down=_rnd(g, E, R, F, fan_in=F), b_down=_rnd(g, E, H, R, fan_in=R),
        gate_gate_up=1 + 0.5 * _rnd(g, T * K_TOP, R), gate_down=1 + 0.5 * _rnd(g, T * K_TOP, R),
        weights=torch.rand(T, K_TOP, generator=g),
    )
    return case, ops.build_routing(ids, E)


def _alone_grad(case, plan, name, op, backend, dtype):
    """d(loss)/d(case[name]) with only that tensor requiring grad (x, weights and the rest frozen)."""
    t = {k: v.to(dtype) for k, v in case.items()}
    t[name] = t[name].clone().requires_grad_(True)
    lora = reference.LoRAWeights(t["a_gate_up"], t["b_gate_up"], t["a_down"], t["b_down"])
    gates = (t["gate_gate_up"], t["gate_down"])
    if op == "grouped_mlp_combine":
        y = ops.grouped_mlp_combine(t["x"], plan, t["weights"], t["w_gu"], t["w_d"], lora=lora, lora_scale=1.5,
                                    rank_gates=gates, backend=backend)
    else:
        x_sorted = reference.permute(t["x"], plan, K_TOP)
        y = ops.grouped_mlp(x_sorted, plan.tokens_per_expert, t["w_gu"], t["w_d"], lora=lora, lora_scale=1.5,
                            rank_gates=gates, backend=backend, plan=plan)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad((y * cot).sum(), t[name])
    return grad


@pytest.mark.parametrize("op", ["grouped_mlp", "grouped_mlp_combine"])
@pytest.mark.parametrize("name", ALONE)
def test_each_lora_gradient_alone(op, name):
    # The kernels skip what no input asks for; with one factor (or gate) alone requiring grad, the
    # one gradient that is computed must still be the whole one.
    case, plan = _lora_case()
    got = _alone_grad(case, plan, name, op, "triton", torch.float32)
    want = _alone_grad(case, plan, name, op, "torch", torch.float64)
    assert got.dtype == torch.float32 and got.abs().sum() > 0
    assert_max_err(got, want.float(), ORACLE_FP32, what=f"d {name}")


# ----------------------------------------------------------------------------------------------
# Autocast with LoRA factors through grouped_mlp_combine
# ----------------------------------------------------------------------------------------------


def _combine_leaves(case):
    names = ("x", "w_gu", "w_d", "a_gate_up", "b_gate_up", "a_down", "b_down", "weights")
    return {k: case[k].clone().requires_grad_(True) for k in names}


def _combine(t, plan, backend, cast=None):
    c = (lambda v: v.to(cast)) if cast is not None else (lambda v: v)
    lora = reference.LoRAWeights(*(c(t[k]) for k in ("a_gate_up", "b_gate_up", "a_down", "b_down")))
    return ops.grouped_mlp_combine(c(t["x"]), plan, t["weights"], c(t["w_gu"]), c(t["w_d"]), lora=lora,
                                   lora_scale=1.5, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_with_lora_through_grouped_mlp_combine(backend):
    # fp16: the interpreter has no bf16. Under autocast the op itself must cast x, the weights and
    # the LoRA factors to fp16 inside the graph (fp32 master gradients), keep the routing weights
    # fp32, and give what the casts written by hand give.
    case, plan = _lora_case()
    auto = _combine_leaves(case)
    with torch.autocast("cpu", dtype=torch.float16):
        y = _combine(auto, plan, backend)
    hand = _combine_leaves(case)
    y_hand = _combine(hand, plan, backend, cast=torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, y_hand, rtol=0, atol=0)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    (y * cot).float().sum().backward()
    (y_hand * cot).float().sum().backward()
    for name, leaf in auto.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32, name
        assert leaf.grad.abs().sum() > 0, name
        torch.testing.assert_close(leaf.grad, hand[name].grad, rtol=0, atol=0, msg=name)
    if backend == "triton":
        # And the kernels lose no more to fp16 than torch's own fp16 path does (flash-attention's
        # rule against the fp64 oracle, output and every fp32 master gradient).
        torch_fp16 = _combine_leaves(case)
        with torch.autocast("cpu", dtype=torch.float16):
            y_torch = _combine(torch_fp16, plan, "torch")
        (y_torch * cot).float().sum().backward()
        oracle = {k: v.detach().double().requires_grad_(True) for k, v in _combine_leaves(case).items()}
        y64 = _combine(oracle, plan, "torch")
        (y64 * cot.double()).sum().backward()
        assert_flash_rule(y, y_torch, y64, floor=FLOOR_GEMM, what="out")
        for name, leaf in auto.items():
            assert_flash_rule(leaf.grad, torch_fp16[name].grad, oracle[name].grad, floor=FLOOR_GEMM, what=f"d {name}")


# ----------------------------------------------------------------------------------------------
# PEFT expert LoRA on `is_transposed` experts (Aria)
# ----------------------------------------------------------------------------------------------


def _aria_base():
    """A tiny AriaTextForCausalLM, whose AriaExperts store gate_up_proj [E, H, 2F] and down_proj
    [E, F, H] (is_transposed=True); every size distinct, so a layout mix-up cannot pass."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    if not hasattr(transformers, "AriaTextForCausalLM"):
        pytest.skip("this transformers has no Aria")
    cfg = transformers.AriaTextConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, moe_num_experts=5, moe_topk=2,
                                      moe_num_shared_experts=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = transformers.AriaTextForCausalLM(cfg).float().eval()
    experts = base.model.layers[0].mlp.experts
    assert experts.is_transposed and experts.gate_up_proj.shape == (5, 32, 48)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 1.0)  # clear top-k margins
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, p.shape[1] ** -0.5)  # unit-scale expert outputs (fan_in is dim 1 here)
    return base


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peft_expert_lora_on_transposed_experts(monkeypatch, backend):
    base = _aria_base()
    # The PEFT pair (eager vs "unimoe", random B) and the training step of the experts-interface
    # tests, on Aria's base model instead of a tiny_hf family.
    import test_experts_implementation as hf_tests

    from unimoe_kernels.integrations import experts_interface

    monkeypatch.setattr(hf_tests, "model", lambda family: copy.deepcopy(base))
    ref, ours = hf_tests._peft_pair("aria", r=3, alpha=6)
    _peft_step = hf_tests._peft_step
    calls = []
    real = experts_interface.grouped_mlp_combine
    monkeypatch.setattr(experts_interface, "grouped_mlp_combine",
                        lambda *a, **kw: calls.append(kw.get("lora") is not None) or real(*a, **kw))
    ids = torch.randint(3, 100, (1, 6) if backend == "triton" else (2, 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("UNIMOE_BACKEND", backend)
    out, grads = _peft_step(ours, ids)
    monkeypatch.setenv("UNIMOE_BACKEND", "auto")
    assert calls == [True, True]  # both layers ran on the package's fused LoRA path
    ref_out, ref_grads = _peft_step(ref, ids)
    tol, grad_tol = (FP32, HF_GRAD_FP32) if backend == "torch" else (MODEL_TRITON_FP32, MODEL_TRITON_GRAD_FP32)
    torch.testing.assert_close(out.logits, ref_out.logits, **tol)
    assert grads.keys() == ref_grads.keys() and len(grads) == 8  # lora_A / lora_B of 2 weights x 2 layers
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], **grad_tol, msg=name)
