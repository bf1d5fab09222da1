"""Mixed precision: SparseMoE, GroupedExperts and the ops under torch.autocast with fp32 parameters.

The oracle is the same computation written out by hand: router logits, gating and aux losses in
fp32 from the input as given, the expert MLP on x.to(D) with every expert weight .to(D) (D the
autocast dtype), combine with the fp32 weights, all outside autocast. On the torch path the layer
under autocast must equal it exactly, output and every gradient (the casts sit in the autograd graph,
so the fp32 parameters get fp32 gradients). bf16 autocast runs on CPU; the Triton interpreter has no
bf16, so the Triton path is checked there in fp16 and in bf16 on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import AUTOCAST_FP16_TRITON, AUTOCAST_FP16_TRITON_GRAD, AUTOCAST_GPU, AUTOCAST_GPU_GRAD

from unimoe_kernels import GroupedExperts, SparseMoE, amp, ops, reference

LORA_NAMES = ("lora_A_gate_up", "lora_B_gate_up", "lora_A_down", "lora_B_down")


def _moe(lora_rank=0, lora_rank_gate=False, backend="torch", z_loss_coef=0.0, **kw):
    moe = SparseMoE(16, 24, 5, 2, lora_rank=lora_rank, lora_rank_gate=lora_rank_gate, backend=backend,
                    z_loss_coef=z_loss_coef, freeze_base=False if lora_rank else None, **kw)
    with torch.no_grad():  # nonzero B and rank-gate routers, so every LoRA term is real work
        for name in ("lora_B_gate_up", "lora_B_down", "lora_gate_gate_up", "lora_gate_down"):
            if hasattr(moe.experts, name):
                getattr(moe.experts, name).normal_(0, 0.3)
    return moe.train()


def _by_hand(moe: SparseMoE, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The layer's output with its aux loss attached, each cast written out (outside autocast)."""
    ex, k = moe.experts, moe.top_k
    x2 = x.reshape(-1, moe.hidden_size)
    logits = x2.float() @ moe.router.weight.float().t()
    g = reference.topk_gating(logits, k)
    plan = reference.build_routing(g.ids, moe.num_experts)
    lora = gates = None
    if ex.lora_rank:
        lora = reference.LoRAWeights(*(getattr(ex, n).to(dt) for n in LORA_NAMES))
    if ex.lora_rank_gate:
        token = plan.sorted_slots.to(torch.int64) // k
        expert = torch.searchsorted(plan.expert_offsets[1:].to(torch.int64), torch.arange(token.numel()), right=True)
        gates = tuple(ops.lora_rank_gates(x2, w, token, expert) for w in (ex.lora_gate_gate_up, ex.lora_gate_down))
    y_sorted = reference.grouped_mlp(
        reference.permute(x2.to(dt), plan, k), plan.tokens_per_expert, ex.gate_up_proj.to(dt), ex.down_proj.to(dt),
        ex.activation, lora=lora, lora_scale=ex.lora_scale, rank_gates=gates)
    y = reference.unpermute(y_sorted, plan, g.weights)
    aux = moe.aux_loss_coef * ops.load_balancing_loss(g.scores, g.ids, moe.num_experts) \
        + moe.z_loss_coef * ops.z_loss(g.logits)
    return y.view(x.shape), aux


def _grads(moe, x):
    return {"x": x.grad, **{n: p.grad for n, p in moe.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lora_rank,rank_gate", [(0, False), (3, False), (3, True)], ids=["base", "lora", "rank_gate"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_sparse_moe_under_autocast_equals_the_casts_by_hand(dt, lora_rank, rank_gate, x_dtype, one_thread):
    moe = _moe(lora_rank, rank_gate, z_loss_coef=1e-3)
    x0 = torch.randn(2, 7, 16).to(x_dtype)
    dy = torch.randn(2, 7, 16)

    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dt):
        y, aux = moe(x, return_aux=True)
    assert y.dtype == dt and y.shape == x.shape
    assert aux.router_logits.dtype == aux.load_balancing_loss.dtype == aux.z_loss.dtype == torch.float32
    (y.float() * dy).sum().backward()
    got = _grads(moe, x)

    moe.zero_grad(set_to_none=True)
    xr = x0.clone().requires_grad_(True)
    y_ref, aux_ref = _by_hand(moe, xr, dt)
    ((y_ref.float() * dy).sum() + aux_ref).backward()
    want = _grads(moe, xr)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(aux.router_logits, xr.detach().reshape(-1, 16).float() @ moe.router.weight.float().t(),
                               rtol=0, atol=0)
    assert got.keys() == want.keys() and len(got) >= 3
    for name in got:
        # Master weights get their gradient in their own dtype (fp32), the input in its own.
        assert got[name].dtype == (x_dtype if name == "x" else torch.float32), name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_grouped_experts_call_under_autocast_equals_the_casts_by_hand(one_thread):
    ex = GroupedExperts(4, 16, 24, lora_rank=2, backend="torch")
    with torch.no_grad():
        ex.lora_B_gate_up.normal_(0, 0.3)
        ex.lora_B_down.normal_(0, 0.3)
    x = torch.randn(9, 16, requires_grad=True)
    ids = torch.randint(0, 4, (9, 2))
    w = torch.rand(9, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, ids, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    got = [x.grad] + [getattr(ex, n).grad for n in LORA_NAMES]

    ex.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    plan = reference.build_routing(ids, 4)
    bf = torch.bfloat16
    lora = reference.LoRAWeights(*(getattr(ex, n).to(bf) for n in LORA_NAMES))
    y_ref = reference.unpermute(reference.grouped_mlp(
        reference.permute(xr.to(bf), plan, 2), plan.tokens_per_expert, ex.gate_up_proj.to(bf), ex.down_proj.to(bf),
        lora=lora, lora_scale=ex.lora_scale), plan, w)
    y_ref.float().sum().backward()
    want = [xr.grad] + [getattr(ex, n).grad for n in LORA_NAMES]
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, r in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_autocast_operands_casts_inside_the_graph():
    w = torch.randn(3, 4, requires_grad=True)
    lora = reference.LoRAWeights(*(torch.randn(2, 2, requires_grad=True) for _ in range(4)))
    ids, x64 = torch.arange(3), torch.randn(3, dtype=torch.float64)
    # Outside autocast: the very same objects back.
    assert all(a is b for a, b in zip(amp.autocast_operands(w, lora, ids, None), (w, lora, ids, None)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cw, clora, cids, cnone, c64 = amp.autocast_operands(w, lora, ids, None, x64)
        again, = amp.autocast_operands(cw)
    assert cw.dtype == torch.bfloat16 and cw.grad_fn is not None and again is cw
    assert isinstance(clora, reference.LoRAWeights) and all(t.dtype == torch.bfloat16 for t in clora)
    assert cids is ids and cnone is None and c64 is x64  # integers and fp64 are never cast (torch's policy)
    cw.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad, torch.ones_like(w))


def test_router_and_gating_stay_fp32_under_autocast():
    moe = _moe()
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = moe.router(x)
        g2 = ops.topk_gating(torch.randn(6, 5).bfloat16(), 2)
    for t in (g.logits, g.scores, g.weights, g2.weights, g2.scores):
        assert t.dtype == torch.float32
    torch.testing.assert_close(g.logits, x @ moe.router.weight.t(), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["grouped_mlp", "grouped_mlp_gather", "grouped_mlp_combine"])
def test_grouped_mlp_ops_follow_autocast(op, one_thread):
    ex = GroupedExperts(4, 16, 24, backend="torch")
    x = torch.randn(8, 16).bfloat16()  # bf16 activations, fp32 weights: what a bf16 trainer hands over
    plan = reference.build_routing(torch.randint(0, 4, (8, 2)), 4)
    w = torch.rand(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if op == "grouped_mlp":
            y = ops.grouped_mlp(reference.permute(x, plan, 2), plan.tokens_per_expert, ex.gate_up_proj, ex.down_proj)
        elif op == "grouped_mlp_gather":
            y = ops.grouped_mlp_gather(x, plan, 2, ex.gate_up_proj, ex.down_proj)
        else:
            y = ops.grouped_mlp_combine(x, plan, w, ex.gate_up_proj, ex.down_proj)
    want = reference.grouped_mlp(reference.permute(x, plan, 2), plan.tokens_per_expert,
                                 ex.gate_up_proj.bfloat16(), ex.down_proj.bfloat16())
    if op == "grouped_mlp_combine":  # routing weights stay fp32, as the layer's are
        want = reference.unpermute(want, plan, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["moe", "experts"])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float32)])
def test_dtype_mismatch_outside_autocast_names_the_fix(layer, x_dtype, w_dtype):
    moe = _moe(lora_rank=2).to(w_dtype)
    x = torch.randn(4, 16, dtype=x_dtype)
    low = x_dtype if x_dtype != torch.float32 else w_dtype
    var, cls = ("moe", "SparseMoE") if layer == "moe" else ("experts", "GroupedExperts")
    with pytest.raises(TypeError) as err:
        if layer == "moe":
            moe(x)
        else:
            moe.experts(x, torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2))
    msg = str(err.value)
    assert msg.startswith(f"{cls} got an input of dtype {x_dtype} but its parameters are {w_dtype}")
    assert f"`{var}.to({x_dtype})`" in msg and f"`torch.autocast('cpu', dtype={low})`" in msg
    assert "x_sorted" not in msg and "gate_up_proj" not in msg  # no internal names
    with torch.autocast("cpu", dtype=low):  # the fix it names works
        assert (moe(x) if layer == "moe" else moe.experts(x, torch.zeros(4, 2, dtype=torch.long),
                                                          torch.ones(4, 2))).dtype == low


def test_fp64_input_into_fp32_layer_names_the_conversion():
    with pytest.raises(TypeError, match=r"torch.float64 but its parameters are torch.float32: convert the input "
                                        r"with `x.to\(torch.float32\)` or the layer with `moe.to\(torch.float64\)`"):
        _moe()(torch.randn(3, 16, dtype=torch.float64))


def test_triton_path_under_autocast_matches_torch_path(one_thread):
    """fp16 (the interpreter has no bf16): the kernels see fp16 operands and give fp32 master grads."""
    torch.manual_seed(0)
    ours = _moe(lora_rank=2, backend="triton")
    torch_path = _moe(lora_rank=2, backend="torch")
    torch_path.load_state_dict(ours.state_dict())
    x = torch.randn(12, 16)
    outs = []
    for moe in (ours, torch_path):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = moe(xi)
        y.float().pow(2).sum().backward()
        outs.append((y, _grads(moe, xi)))
    (y, g), (y_ref, g_ref) = outs
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, y_ref, **AUTOCAST_FP16_TRITON)
    assert g.keys() == g_ref.keys() and len(g) >= 3
    for name in g_ref:
        assert g[name].dtype == torch.float32
        torch.testing.assert_close(g[name], g_ref[name], **AUTOCAST_FP16_TRITON_GRAD, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_cuda_triton_under_autocast_equals_the_casts_by_hand(dt):
    moe = _moe(lora_rank=4, backend="triton").cuda()
    x = torch.randn(256, 16, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dt):
        y = moe(x)
    y.float().pow(2).sum().backward()
    got = _grads(moe, x)
    moe.zero_grad(set_to_none=True)
    xr = x.detach().clone().requires_grad_(True)
    y_ref, aux = _by_hand(moe, xr, dt)
    (y_ref.float().pow(2).sum() + aux).backward()
    assert y.dtype == dt
    # Kernels and cuBLAS round their fp32 sums differently.
    torch.testing.assert_close(y, y_ref, **AUTOCAST_GPU[dt])
    want = _grads(moe, xr)
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], g, **AUTOCAST_GPU_GRAD[dt], msg=name)
