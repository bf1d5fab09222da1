"""SparseMoE / GroupedExperts / TopKRouter on the torch path against the per-token oracle."""

import pytest
import torch
import torch.nn as nn
from loop_oracle import per_token_moe
from tolerance import TOL

from unimoe_kernels import GroupedExperts, MoEAux, SparseMoE, TopKRouter


def _randomise_lora(moe, scale=0.3):
    # B starts at zero, which would make every LoRA test pass even with LoRA ignored.
    with torch.no_grad():
        for name in ("lora_B_gate_up", "lora_B_down"):
            getattr(moe.experts, name).normal_(0, scale)


def _moe(h, f, e, k, dtype=torch.float32, **kw):
    moe = SparseMoE(h, f, e, k, dtype=dtype, **kw)
    if kw.get("lora_rank", 0):
        _randomise_lora(moe)
    return moe.eval()


# (T, H, F, E, k, why)
SHAPES = [
    (1, 16, 8, 4, 2, "one token"),
    (5, 97, 12, 7, 3, "odd H, prime E, k not a power of two"),
    (9, 16, 8, 5, 1, "k = 1"),
    (6, 12, 8, 4, 4, "k = E: every expert takes every token"),
    (33, 24, 16, 13, 2, "prime E with some experts left empty"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t,h,f,e,k,why", SHAPES)
def test_layer_matches_per_token_loop(dtype, t, h, f, e, k, why):
    moe = _moe(h, f, e, k, dtype=dtype, lora_rank=3, lora_alpha=6)
    x = torch.randn(t, h, dtype=dtype)
    torch.testing.assert_close(moe(x), per_token_moe(moe, x), **TOL[dtype])


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
@pytest.mark.parametrize("scoring,normalize",
                         [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)])
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_every_option_matches_loop(activation, scoring, normalize, lora_rank):
    moe = _moe(20, 12, 6, 2, dtype=torch.float64, activation=activation, scoring=scoring,
               normalize_topk=normalize, lora_rank=lora_rank)
    x = torch.randn(11, 20, dtype=torch.float64)
    torch.testing.assert_close(moe(x), per_token_moe(moe, x), **TOL[torch.float64])


def test_leading_dims_and_non_contiguous_input():
    moe = _moe(16, 8, 4, 2)
    base = torch.randn(16, 3, 5)
    x = base.permute(1, 2, 0)  # [3, 5, 16], not contiguous
    assert not x.is_contiguous()
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(-1, 16), per_token_moe(moe, x.reshape(-1, 16)), **TOL[torch.float32])


def test_every_token_to_one_expert():
    moe = _moe(8, 8, 4, 1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 5.0  # positive inputs make expert 2 win for every token
    x = torch.rand(10, 8) + 0.1
    y, aux = moe(x, return_aux=True)
    assert aux.tokens_per_expert.tolist() == [0, 0, 10, 0]
    torch.testing.assert_close(y, per_token_moe(moe, x), **TOL[torch.float32])


def test_all_ties_pick_lowest_experts():
    moe = _moe(8, 8, 5, 2)
    with torch.no_grad():
        moe.router.weight.zero_()  # all logits equal
    x = torch.randn(4, 8)
    _, aux = moe(x, return_aux=True)
    assert aux.tokens_per_expert.tolist() == [4, 4, 0, 0, 0]


def test_empty_batch():
    moe = _moe(8, 8, 4, 2).train()
    x = torch.zeros(0, 8, requires_grad=True)
    y, aux = moe(x, return_aux=True)
    assert y.shape == (0, 8)
    assert aux.load_balancing_loss.item() == 0 and aux.z_loss.item() == 0
    assert aux.tokens_per_expert.tolist() == [0, 0, 0, 0]
    (y.sum() + aux.load_balancing_loss + aux.z_loss).backward()
    # No tokens: x's gradient is empty and every parameter gets a gradient of zeros.
    assert x.grad.shape == (0, 8)
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any(), name


def test_grouped_experts_transformers_call():
    experts = GroupedExperts(4, 16, 8, lora_rank=2)
    moe = _moe(16, 8, 4, 2, lora_rank=2)
    experts.load_state_dict(moe.experts.state_dict())
    x = torch.randn(7, 16)
    gating = moe.router(x)
    torch.testing.assert_close(experts(x, gating.ids.long(), gating.weights), moe(x), **TOL[torch.float32])


@pytest.mark.parametrize(
    "names",
    [
        (),
        ("router.weight",),
        ("experts.gate_up_proj", "experts.down_proj"),
        ("experts.lora_A_gate_up", "experts.lora_B_gate_up", "experts.lora_A_down", "experts.lora_B_down"),
    ],
    ids=["x", "router", "base", "lora"],
)
def test_gradcheck(names):
    moe = _moe(6, 4, 3, 2, dtype=torch.float64, lora_rank=2, freeze_base=False)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = dict(moe.named_parameters())

    def fn(x, *tensors):
        return torch.func.functional_call(moe, {**params, **dict(zip(names, tensors))}, (x,))

    inputs = [x] + [params[n].detach().clone().requires_grad_() for n in names]
    torch.autograd.gradcheck(fn, inputs)


def test_aux_loss_reaches_router_through_backward():
    x = torch.randn(32, 16)
    grads, outs = [], []
    for coef in (0.0, 0.5):
        torch.manual_seed(1)
        moe = SparseMoE(16, 8, 4, 2, aux_loss_coef=coef).train()
        y = moe(x)
        y.pow(2).sum().backward()
        grads.append(moe.router.weight.grad.clone())
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(grads[0], grads[1])

    # The attached gradient is exactly that of coef * lbl + z_coef * z added to the loss.
    torch.manual_seed(1)
    moe = SparseMoE(16, 8, 4, 2, aux_loss_coef=0.5, z_loss_coef=0.1).train()
    y, aux = moe(x, return_aux=True)
    (y.pow(2).sum()).backward()
    implicit = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_coef = moe.z_loss_coef = 0.0
    y, aux = moe(x, return_aux=True)
    (y.pow(2).sum() + 0.5 * aux.load_balancing_loss + 0.1 * aux.z_loss).backward()
    torch.testing.assert_close(implicit, moe.router.weight.grad)


def test_aux_values():
    moe = _moe(16, 8, 4, 2)
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(6, 16)
    _, aux = moe(x, return_aux=True)
    assert isinstance(aux, MoEAux)
    # Uniform probabilities: P_e = 1/4; ties send every token to experts 0 and 1, so f = (1/2, 1/2, 0, 0).
    assert aux.load_balancing_loss.item() == pytest.approx(4 * (0.5 * 0.25 + 0.5 * 0.25))
    assert aux.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    assert aux.router_logits.shape == (6, 4) and aux.router_logits.dtype == torch.float32
    assert aux.dropped_slots.item() == 0


def test_capacity_drops_later_tokens():
    moe = _moe(8, 8, 4, 2, capacity_factor=0.5)
    x = torch.randn(16, 8)
    y, aux = moe(x, return_aux=True)
    capacity = 4  # ceil(0.5 * 16 * 2 / 4)
    over = (aux.tokens_per_expert - capacity).clamp(min=0).sum()
    assert aux.dropped_slots.item() == over.item() > 0
    torch.testing.assert_close(y, per_token_moe(moe, x, capacity=capacity), **TOL[torch.float32])


def test_token_groups_statistics():
    moe = _moe(8, 8, 4, 2, max_token_groups=3)
    x = torch.randn(2, 10, 8)
    groups = torch.randint(0, 3, (2, 10))
    _, aux = moe(x, return_aux=True, token_groups=groups)
    ids = moe.router(x.reshape(-1, 8)).ids.long()
    expected = torch.zeros(3, 4, dtype=torch.int64)
    for g, row in zip(groups.reshape(-1).tolist(), ids.tolist()):
        for e in row:
            expected[g, e] += 1
    assert torch.equal(moe.routing_stats(), expected)
    moe.reset_routing_stats()
    assert moe.routing_stats().sum() == 0
    with pytest.raises(RuntimeError, match="token_groups"):
        moe(x, token_groups=torch.full((2, 10), 3))
    with pytest.raises(ValueError, match="token_groups"):
        moe(x, token_groups=torch.zeros(20, dtype=torch.long))


def test_lora_defaults_freeze_base_and_train_adapters():
    moe = SparseMoE(16, 8, 4, 2, lora_rank=4)
    ex = moe.experts
    assert not ex.gate_up_proj.requires_grad and not ex.down_proj.requires_grad
    assert ex.lora_scale == 1.0 and torch.count_nonzero(ex.lora_B_gate_up) == 0
    assert ex.lora_A_gate_up.shape == (4, 4, 16) and ex.lora_B_gate_up.shape == (4, 16, 4)
    assert ex.lora_A_down.shape == (4, 4, 8) and ex.lora_B_down.shape == (4, 16, 4)
    moe.train()(torch.randn(10, 16)).sum().backward()
    assert ex.gate_up_proj.grad is None and ex.lora_B_gate_up.grad.abs().sum() > 0
    assert moe.router.weight.grad.abs().sum() > 0
    assert SparseMoE(16, 8, 4, 2, lora_rank=4, freeze_base=False).experts.gate_up_proj.requires_grad
    assert SparseMoE(16, 8, 4, 2, lora_rank=4, lora_alpha=16).experts.lora_scale == 4.0


def test_lora_dropout_only_in_training():
    moe = _moe(16, 8, 4, 2, lora_rank=4, lora_dropout=0.5)
    x = torch.randn(12, 16)
    torch.testing.assert_close(moe(x), per_token_moe(moe, x), **TOL[torch.float32])
    moe.train()
    assert not torch.allclose(moe(x), moe(x))


def test_parameter_layout_is_transformers_v5():
    moe = SparseMoE(16, 8, 4, 2, activation="gelu")
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {"router.weight": (4, 16), "experts.gate_up_proj": (4, 8, 16), "experts.down_proj": (4, 16, 8)}
    assert SparseMoE(16, 8, 4, 2).experts.gate_up_proj.shape == (4, 16, 16)


class _LlamaMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _MixtralExpert(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.w1, self.w3 = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.w2 = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("mlp_cls", [_LlamaMLP, _MixtralExpert])
def test_from_dense_copies_equal_the_dense_mlp(mlp_cls):
    mlp = mlp_cls(16, 24)
    moe = SparseMoE.from_dense(mlp, num_experts=4, top_k=2).eval()
    x = torch.randn(9, 16)
    torch.testing.assert_close(moe(x), mlp(x), **TOL[torch.float32])


def test_from_dense_list_builds_one_expert_per_mlp():
    mlps = [_LlamaMLP(16, 24) for _ in range(3)]
    moe = SparseMoE.from_dense(mlps, top_k=1).eval()
    x = torch.randn(9, 16)
    ids = moe.router(x).ids[:, 0]
    expected = torch.stack([mlps[e](x[t]) for t, e in enumerate(ids.tolist())])
    torch.testing.assert_close(moe(x), expected, **TOL[torch.float32])
    with pytest.raises(ValueError, match="num_experts=4 but 3 MLPs"):
        SparseMoE.from_dense(mlps, num_experts=4)
    with pytest.raises(ValueError, match="needs num_experts"):
        SparseMoE.from_dense(mlps[0])


def test_router_options():
    r = TopKRouter(8, 8, 2, n_groups=4, topk_groups=1, use_expert_bias=True)
    x = torch.randn(5, 8)
    g = r(x)
    assert torch.equal(g.ids // 2, g.ids[:, :1].expand(-1, 2) // 2)  # both picks from one group of 2
    with torch.no_grad():
        r.expert_bias[7] = 10.0  # selection bias forces expert 7 but the weight stays its score
    r2 = TopKRouter(8, 8, 1, use_expert_bias=True)
    r2.load_state_dict(r.state_dict())
    g2 = r2(x)
    assert (g2.ids[:, 0] == 7).all()
    torch.testing.assert_close(g2.weights[:, 0], torch.ones(5))  # renormalised single pick
    r3 = TopKRouter(8, 8, 2, normalize_topk=False, router_jitter=0.1)
    r3.load_state_dict({"weight": r.weight})
    torch.testing.assert_close(r3.eval()(x).weights, r3(x).weights)  # no jitter in eval
    assert not torch.equal(r3.train()(x).logits, r3.eval()(x).logits)


# Bad input: (kwargs or call, exception, message fragment)
@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(top_k=0), ValueError, "top_k must be in"),
        (dict(top_k=5), ValueError, "top_k must be in"),
        (dict(lora_rank=-1), ValueError, "lora_rank"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
        (dict(scoring="max"), ValueError, "scoring must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
        (dict(aux_loss_coef=-1.0), ValueError, "aux_loss_coef"),
        (dict(lora_rank=2, lora_dropout=1.0), ValueError, "lora_dropout"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, msg):
    args = dict(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        SparseMoE(**args)


def test_bad_forward_input():
    moe = SparseMoE(8, 8, 4, 2)
    with pytest.raises(ValueError, match=r"hidden_size=8"):
        moe(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating"):
        moe(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="meta"):
        moe(torch.randn(3, 8, device="meta"))
    with pytest.raises(ValueError, match="top_k_weights"):
        moe.experts(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1))
    with pytest.raises(TypeError, match="ep_group"):
        SparseMoE(8, 8, 4, 2, ep_group=object())
