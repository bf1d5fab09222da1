"""Per-row gate over the LoRA rank (mixture of rank-1 experts, Intuition-MoR1E; lora_rank_gate=True).

The oracle is an independent per-token loop in fp64 (its own softmax, its own gated LoRA, one token
and one expert at a time; only the activation comes from tests/loop_oracle.py). The torch path is
checked against it and by gradcheck; the Triton path (interpreter on CPU: fp32 and fp16; bf16 needs
a GPU) against the torch path, forward and every gradient including the gate routers and the bias.
Shapes are tiny because the interpreter's cost grows with programs x loop trips.
"""

from __future__ import annotations

import pytest
import torch
from loop_oracle import _act
from tolerance import FLOOR_GEMM, FLOOR_GEMM_BF16, SAME_MATH_FP32, TOL, TRITON_VS_TORCH_FP32, assert_flash_rule

from unimoe_kernels import SparseMoE, ops, reference
from unimoe_kernels.modules import GroupedExperts
from unimoe_kernels.ops import grouped_gemm as gg

# Default case: T=6 tokens, k=2 of E=4 experts (expert 3 gets no token), H=24, F=16, rank 3 (not a
# power of two, so BLOCK_R pads 3 -> 16 and r * softmax(0) = 3 * (1/3) is not exact in binary).
IDS = [[0, 2], [2, 1], [0, 2], [1, 0], [2, 1], [0, 1]]
E, H, F, R = 4, 24, 16, 3


def make_experts(activation="swiglu", *, r=R, backend="torch", dtype=torch.float32, gate=True, seed=0):
    """GroupedExperts with every LoRA and gate parameter non-zero (zeros would hide errors)."""
    torch.manual_seed(seed)
    ex = GroupedExperts(E, H, F, activation=activation, lora_rank=r, lora_alpha=2 * r, lora_rank_gate=gate,
                        backend=backend, dtype=dtype)
    with torch.no_grad():
        ex.lora_B_gate_up.normal_(0, 0.5)
        ex.lora_B_down.normal_(0, 0.5)
        if gate:
            # Logits of order 1 at unit-scale x: gates far from uniform.
            ex.lora_gate_gate_up.normal_(0, 1.0 / H**0.5)
            ex.lora_gate_down.normal_(0, 1.0 / H**0.5)
    return ex


def oracle(ex, x, ids, weights, bias=None):
    """out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) with the gated LoRA, one token at a time."""
    f64 = torch.float64
    s, r = ex.lora_scale, ex.lora_rank

    def gate(g_weight, e, t):
        logits = g_weight[e].to(f64) @ x[t]
        if bias is not None:
            logits = logits + bias[t]
        p = torch.exp(logits - logits.max())
        return r * p / p.sum()

    out = torch.zeros(x.shape, dtype=f64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            xt = x[t]
            g_gu, g_d = gate(ex.lora_gate_gate_up, e, t), gate(ex.lora_gate_down, e, t)
            z = ex.gate_up_proj[e].to(f64) @ xt
            z = z + s * (ex.lora_B_gate_up[e].to(f64) @ (g_gu * (ex.lora_A_gate_up[e].to(f64) @ xt)))
            a = _act(z, ex.activation)
            y = ex.down_proj[e].to(f64) @ a
            y = y + s * (ex.lora_B_down[e].to(f64) @ (g_d * (ex.lora_A_down[e].to(f64) @ a)))
            out[t] += weights[t, j] * y
    return out


def routing(device, dtype=torch.float32):
    ids = torch.tensor(IDS, device=device)
    g = torch.Generator().manual_seed(3)
    w = torch.rand(ids.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return ids, w


def grads_of(module, inputs, y, dy):
    """Gradients of (y * dy).sum() w.r.t. inputs and every trainable parameter, in name order."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(y, list(inputs) + [p for _, p in params], dy)
    return dict(zip([f"input{i}" for i in range(len(inputs))] + [n for n, _ in params], got))


# ----------------------------------------------------------------------------------------------
# Torch path: independent oracle, gradcheck, init property
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_path_matches_per_token_oracle(activation, with_bias):
    ex = make_experts(activation).double()
    ids, w = routing("cpu", torch.float64)
    x = torch.randn(len(IDS), H, dtype=torch.float64)
    bias = torch.randn(len(IDS), R, dtype=torch.float64) if with_bias else None
    y = ex(x, ids, w, rank_gate_bias=bias)
    want = oracle(ex, x, ids, w, bias)
    torch.testing.assert_close(y, want, **TOL[torch.float64])
    # The gate really acts: the ungated layer with the same weights gives another output.
    plain = GroupedExperts(E, H, F, activation=activation, lora_rank=R, lora_alpha=2 * R, dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in ex.state_dict().items() if "lora_gate" not in k})
    assert (plain(x, ids, w) - y).abs().max() > 1e-3


def test_gates_helper_is_r_times_softmax_of_the_routed_expert():
    x = torch.randn(5, H, dtype=torch.float64)
    gw = torch.randn(E, R, H, dtype=torch.float64)
    bias = torch.randn(5, R, dtype=torch.float64)
    tok = torch.tensor([4, 0, 0, 2, 3, 1, 4])  # rows of tokens in any order, a token used twice
    exp = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    g = ops.lora_rank_gates(x, gw, tok, exp, bias)
    for n in range(len(tok)):
        t, e = int(tok[n]), int(exp[n])
        want = R * torch.softmax(gw[e] @ x[t] + bias[t], dim=0)
        torch.testing.assert_close(g[n], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.sum(-1), torch.full((len(tok),), float(R), dtype=torch.float64))


def test_gradcheck_gate_parameters_and_bias():
    """fp64 gradcheck of the gated layer w.r.t. both gate routers, the bias, x and the LoRA factors."""
    ex = make_experts("swiglu", r=2).double()
    ids, w = routing("cpu", torch.float64)
    ids, w = ids[:3], w[:3]  # T=3: gradcheck perturbs every element, keep it small
    x = torch.randn(3, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    plan = reference.build_routing(ids, E)
    names = ["lora_gate_gate_up", "lora_gate_down", "lora_A_gate_up", "lora_B_down"]
    params = [getattr(ex, n).detach().clone().requires_grad_() for n in names]

    def fn(x, bias, g_gu, g_d, a_gu, b_d):
        tok = torch.div(plan.sorted_slots.long(), 2, rounding_mode="floor")
        rows = torch.searchsorted(plan.expert_offsets[1:].long(), torch.arange(tok.numel()), right=True)
        gates = tuple(ops.lora_rank_gates(x, g, tok, rows, bias) for g in (g_gu, g_d))
        lora = reference.LoRAWeights(a_gu, ex.lora_B_gate_up.detach(), ex.lora_A_down.detach(), b_d)
        y = gg.grouped_mlp_gather(x, plan, 2, ex.gate_up_proj.detach(), ex.down_proj.detach(), lora=lora,
                                  lora_scale=ex.lora_scale, rank_gates=gates, backend="torch")
        return reference.unpermute(y, plan, w)

    assert torch.autograd.gradcheck(fn, (x, bias, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_gate_init_equals_plain_lora(backend, device):
    """A fresh gate is uniform, r * (1/r) = 1 per piece: the layer equals plain LoRA (documented choice)."""
    ex = make_experts(backend=backend, gate=False).to(device)
    gated = GroupedExperts(E, H, F, lora_rank=R, lora_alpha=2 * R, lora_rank_gate=True, backend=backend,
                           device=device)
    assert gated.lora_gate_gate_up.abs().sum() == 0 and gated.lora_gate_down.abs().sum() == 0
    gated.load_state_dict({**ex.state_dict(), "lora_gate_gate_up": gated.lora_gate_gate_up.detach(),
                           "lora_gate_down": gated.lora_gate_down.detach()})
    ids, w = routing(device)
    x = torch.randn(len(IDS), H, device=device)
    torch.testing.assert_close(gated(x, ids, w), ex(x, ids, w), **SAME_MATH_FP32)


# ----------------------------------------------------------------------------------------------
# Triton path against the torch path
# ----------------------------------------------------------------------------------------------


def _run_both(activation, dtype, device, *, bias_shape=None, recompute=False, oracle_dtype=None):
    """{"torch" | "triton" | "oracle": (y, gradients by name)}: the gated experts on the torch path
    and the Triton path in `dtype` (and the torch path in oracle_dtype), with the same weights,
    inputs and output gradient."""
    ex_r = make_experts(activation, backend="torch", dtype=dtype).to(device)
    runs = {"torch": ex_r, "triton": make_experts(activation, backend="triton", dtype=dtype).to(device)}
    if oracle_dtype is not None:
        runs["oracle"] = make_experts(activation, backend="torch", dtype=oracle_dtype).to(device)
    for ex in runs.values():
        ex.load_state_dict(ex_r.state_dict())
    ids = torch.tensor(IDS, device=device)
    w0 = routing(device, torch.float64)[1]
    x0 = torch.randn(len(IDS), H, device=device)
    bias = torch.randn(bias_shape, device=device) if bias_shape is not None else None
    dy0 = torch.randn(len(IDS), H, device=device)
    res = {}
    for key, ex in runs.items():
        dt = ex.gate_up_proj.dtype
        w, dy = w0.to(dt), dy0.to(dt)
        inputs = [x0.to(dt).requires_grad_()]
        b = None
        if bias is not None:
            b = bias.to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
            inputs.append(b)
        if key == "triton" and recompute:
            plan = reference.build_routing(ids, E)
            gates = ex.rank_gates(inputs[0], torch.div(plan.sorted_slots.long(), 2, rounding_mode="floor"),
                                  plan.expert_offsets, b)
            ys = gg.grouped_mlp_gather(inputs[0], plan, 2, ex.gate_up_proj, ex.down_proj, activation,
                                       lora=ex.lora_weights(), lora_scale=ex.lora_scale, rank_gates=gates,
                                       backend="triton", recompute=True)
            y = reference.unpermute(ys, plan, w)
        else:
            y = ex(inputs[0], ids, w, rank_gate_bias=b)
        res[key] = (y, grads_of(ex, inputs, y, dy))
    g_r, g_t = res["torch"][1], res["triton"][1]
    assert res["triton"][0].dtype == dtype
    assert g_t.keys() == g_r.keys() and "lora_gate_gate_up" in g_t and "lora_gate_down" in g_t
    for name in g_r:
        assert g_r[name].abs().max() > 0, name  # every gradient is really exercised
    return res


def _compare_backends(activation, dtype, device, **kw):
    """The Triton path against the torch path in fp32 (TRITON_VS_TORCH_FP32), output and every gradient."""
    res = _run_both(activation, dtype, device, **kw)
    (y_r, g_r), (y_t, g_t) = res["torch"], res["triton"]
    torch.testing.assert_close(y_t, y_r, **TRITON_VS_TORCH_FP32)
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], **TRITON_VS_TORCH_FP32, msg=name)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_triton_fp32_equals_torch_with_bias(activation, device):
    # bias [T, r]: one row per token (both LoRA sites share it).
    _compare_backends(activation, torch.float32, device, bias_shape=(len(IDS), R))


def test_triton_fp32_no_bias_recompute(device):
    # recompute=True: GEMM 1 runs again in backward, with the gated x A^T.
    _compare_backends("geglu", torch.float32, device, recompute=True)


def _assert_flash_rule_against_fp64(res, floor):
    """The Triton path's error against the fp64 torch path is at most twice the torch path's own
    error in the same dtype, plus the floor (tolerance.assert_flash_rule): output and every gradient."""
    (y16, g16), (yt, gt), (y64, g64) = res["torch"], res["triton"], res["oracle"]
    assert gt.keys() == g64.keys()
    for name, got, same, want in [("y", yt, y16, y64)] + [(n, gt[n], g16[n], g64[n]) for n in g64]:
        assert_flash_rule(got, same, want, floor=floor, what=name)


def test_triton_fp16_flash_attention_rule(device):
    """fp16 with a per-piece bias [r] broadcast to every token, floor of an fp16 ulp at unit scale."""
    res = _run_both("swiglu", torch.float16, device, bias_shape=(R,), oracle_dtype=torch.float64)
    _assert_flash_rule_against_fp64(res, FLOOR_GEMM)


@pytest.mark.gpu
def test_gpu_bf16_flash_attention_rule():
    """bf16 (the interpreter cannot run it): the same rule as fp16 with a bf16 floor."""
    res = _run_both("swiglu", torch.bfloat16, torch.device("cuda"), bias_shape=(len(IDS), R),
                    oracle_dtype=torch.float64)
    _assert_flash_rule_against_fp64(res, FLOOR_GEMM_BF16)


def test_grouped_mlp_rank_gates_sorted_rows_triton_equals_torch(device):
    """The functional op on already-permuted rows: gates [N, r] given directly, their gradient returned."""
    counts = torch.tensor([5, 0, 4], device=device)  # expert 1 empty
    n = 9
    ex = make_experts(backend="torch")
    x = torch.randn(n, H, device=device)
    g_gu = torch.rand(n, R, device=device) * 2
    g_d = torch.rand(n, R, device=device) * 2
    lora = reference.LoRAWeights(*(t.detach()[:3].to(device) for t in ex.lora_weights()))
    res = []
    for backend in ("torch", "triton"):
        ts = [t.clone().requires_grad_() for t in (x, g_gu, g_d, *lora)]
        y = gg.grouped_mlp(ts[0], counts, ex.gate_up_proj.detach()[:3].to(device), ex.down_proj.detach()[:3].to(device),
                           lora=reference.LoRAWeights(*ts[3:]), lora_scale=1.5, rank_gates=(ts[1], ts[2]),
                           backend=backend)
        res.append([y, *torch.autograd.grad(y, ts, torch.ones_like(y))])
    for name, a, b in zip(["y", "dx", "dg_gu", "dg_d", "dA_gu", "dB_gu", "dA_d", "dB_d"], *res):
        torch.testing.assert_close(a, b, **TRITON_VS_TORCH_FP32, msg=name)


def test_sparse_moe_end_to_end_triton_equals_torch(device):
    """SparseMoE(lora_rank_gate=True) with a per-sample bias [B, 1, r]: output and every gradient."""
    torch.manual_seed(0)
    kw = dict(hidden_size=H, ffn_hidden_size=F, num_experts=5, top_k=2, lora_rank=4, lora_alpha=8,
              lora_rank_gate=True, device=device, dtype=torch.float32)
    moe_t = SparseMoE(**kw, backend="triton")
    moe_r = SparseMoE(**kw, backend="torch")
    with torch.no_grad():
        for name, p in moe_t.named_parameters():
            if "lora_B" in name or "lora_gate" in name:
                p.normal_(0, 0.3)
    moe_r.load_state_dict(moe_t.state_dict())
    x = torch.randn(2, 4, H, device=device)
    bias = torch.randn(2, 1, 4, device=device)  # one bias per sample (e.g. a task embedding)
    dy = torch.randn(2, 4, H, device=device)
    out = []
    for moe in (moe_t, moe_r):
        xx, bb = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = moe(xx, rank_gate_bias=bb)
        assert y.shape == x.shape
        out.append((y, grads_of(moe, [xx, bb], y, dy)))
    (y_t, g_t), (y_r, g_r) = out
    torch.testing.assert_close(y_t, y_r, **TRITON_VS_TORCH_FP32)
    assert g_t.keys() == g_r.keys()
    assert "experts.lora_gate_gate_up" in g_t and "experts.lora_gate_down" in g_t
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], **TRITON_VS_TORCH_FP32, msg=name)
    assert g_t["input1"].abs().max() > 0  # the bias is trained


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch_with_gate_and_bias(backend, device):
    # x [2, 0, H]: no tokens; the output is empty, backward runs, the bias [2, 1, r] and every
    # trainable parameter get gradients of zeros.
    moe = SparseMoE(H, F, E, 2, lora_rank=R, lora_rank_gate=True, backend=backend, device=device)
    x = torch.randn(2, 0, H, device=device, requires_grad=True)
    bias = torch.randn(2, 1, R, device=device, requires_grad=True)
    y = moe(x, rank_gate_bias=bias)
    assert y.shape == x.shape
    params = dict((n, p) for n, p in moe.named_parameters() if p.requires_grad)
    gx, gb, *gp = torch.autograd.grad(y.sum(), [x, bias, *params.values()], allow_unused=True)
    assert gx is not None and gx.shape == x.shape
    assert gb is not None and gb.shape == bias.shape and not gb.any()
    assert "experts.lora_gate_gate_up" in params
    for (name, p), g in zip(params.items(), gp):
        assert g is not None and g.shape == p.shape and not g.any(), name


def test_mlp_on_sorted_rows_equals_forward_routed():
    """GroupedExperts.mlp (the expert-parallel path: gates from the rows themselves) = forward_routed."""
    ex = make_experts()
    ids, w = routing("cpu")
    x = torch.randn(len(IDS), H)
    plan = reference.build_routing(ids, E)
    y_sorted = ex.mlp(reference.permute(x, plan, 2), plan.tokens_per_expert)
    torch.testing.assert_close(reference.unpermute(y_sorted, plan, w), ex(x, ids, w), **SAME_MATH_FP32)


def test_custom_op_opcheck_with_gates(device):
    ex = make_experts(backend="triton")
    offsets = torch.tensor([0, 3, 3, 5, 6], device=device)  # 3, 0, 2 and 1 rows: one expert empty
    x = torch.randn(6, H, device=device, requires_grad=True)
    g_gu = torch.rand(6, R, device=device, requires_grad=True)
    g_d = torch.rand(6, R, device=device, requires_grad=True)
    args = (x, offsets, ex.gate_up_proj, ex.down_proj, *ex.lora_weights(), "swiglu",
            2.0, None, 0.0, True, None, None, 1, g_gu, g_d)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(gg.grouped_mlp_fwd, args, test_utils=tests)


def test_torch_compile_fullgraph_with_gates(device):
    """The whole SparseMoE with rank gates and a per-sample bias compiles into one graph (no graph
    break) and gives bit-identical outputs and gradients (aot_eager: no C++ compiler needed)."""
    torch.manual_seed(0)
    moe = SparseMoE(H, F, E, 2, lora_rank=R, lora_rank_gate=True, backend="triton", device=device)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if "lora_B" in name or "lora_gate" in name:
                p.normal_(0, 0.3)
    x = torch.randn(2, 3, H, device=device, requires_grad=True)
    bias = torch.randn(2, 1, R, device=device, requires_grad=True)

    def fn(x, bias):
        return moe(x, rank_gate_bias=bias)

    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, bias)
    y_ref = fn(x, bias)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    wrt = [x, bias, moe.experts.lora_gate_gate_up, moe.experts.lora_gate_down]
    g = torch.autograd.grad(y.square().sum(), wrt)
    g_ref = torch.autograd.grad(y_ref.square().sum(), wrt)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_raises():
    with pytest.raises(ValueError, match="lora_rank_gate"):
        GroupedExperts(E, H, F, lora_rank=0, lora_rank_gate=True)
    with pytest.raises(ValueError, match="lora_rank_gate"):
        SparseMoE(H, F, E, 2, lora_rank_gate=True)
    moe = SparseMoE(H, F, E, 2, lora_rank=R, lora_rank_gate=True)
    x = torch.randn(2, 3, H)
    for bad in (torch.zeros(2, 3, R + 1), torch.zeros(3, 2, R), torch.zeros(6, R)):  # wrong r; not broadcastable
        with pytest.raises(ValueError, match="rank_gate_bias"):
            moe(x, rank_gate_bias=bad)
    with pytest.raises(TypeError, match="rank_gate_bias"):
        moe(x, rank_gate_bias=torch.zeros(2, 3, R, dtype=torch.int64))
    plain = SparseMoE(H, F, E, 2, lora_rank=R)
    with pytest.raises(ValueError, match="rank_gate_bias needs lora_rank_gate"):
        plain(x, rank_gate_bias=torch.zeros(R))
    ex = make_experts(gate=False)
    xs, counts = torch.randn(5, H), torch.tensor([2, 3, 0, 0])
    g = torch.ones(5, R)
    with pytest.raises(ValueError, match="need lora"):
        gg.grouped_mlp(xs, counts, ex.gate_up_proj, ex.down_proj, rank_gates=(g, g))
    with pytest.raises(ValueError, match=r"rank_gates\[1\]"):
        gg.grouped_mlp(xs, counts, ex.gate_up_proj, ex.down_proj, lora=ex.lora_weights(), rank_gates=(g, g[:4]))
