"""Per-expert projection biases (types.ExpertBias) on the torch path: torch_grouped_mlp's custom ops,
reference.grouped_mlp and the plain-aten export forward.

The oracle is written here, independent of the package: one expert's rows at a time in fp64,
z = x_e W_gu[e]^T (+ s (x_e A_gu[e]^T) B_gu[e]^T) + b_gu[e], h = act(z) from explicit formulas (so the
":interleaved" column layout is checked against its own definition, not against activations.py),
y = h W_d[e]^T (+ LoRA) + b_d[e]. Output and every gradient (x, both weights, both biases, LoRA A and B)
must match it for a bias on both projections, on gate_up only and on down only; GLU halves, gpt-oss's
interleaved clamped SwiGLU and a non-GLU activation; idle experts and one expert taking every row;
with and without LoRA; on both inner paths (a torch.mm per expert block, one torch._grouped_mm over
all). Also: gradcheck, opcheck, the backward asks for no more than the biases need (FLOPs), one
graph under torch.compile(fullgraph=True), and experts_forward_aten (eager and torch.export).
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import ORACLE_FP32, TOL, assert_max_err
from torch._dynamo.backends.debugging import aot_eager
from torch.utils.flop_counter import FlopCounterMode
from torch_path_blocks import forced_blocks

from unimoe_kernels import baselines, reference
from unimoe_kernels import torch_grouped_mlp as tgm
from unimoe_kernels.integrations.export import experts_forward_aten
from unimoe_kernels.types import ExpertBias, LoRAWeights

CLAMP = "swiglu_clamp(alpha=1.702,beta=1.0,limit=7.0):interleaved"  # gpt-oss's experts
ACTIVATIONS = ("swiglu", CLAMP, "gelu")
# Widths multiples of 4, so fp32 operands meet torch._grouped_mm's 16-byte stride rule.
H, FF, R = 8, 4, 4
SCALE = 1.5
COUNTS = {
    "idle": torch.tensor([0, 5, 0, 3, 4, 0]),  # idle experts first, in the middle and last
    "one": torch.tensor([0, 12, 0, 0]),  # one expert takes every row
}
BIAS_KINDS = ("both", "gate_up", "down")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The activations by their definitions: [rows, 2F|F] -> [rows, F]."""
    if activation == "swiglu":  # [gate; up] halves
        g, u = z.chunk(2, dim=-1)
        return g * torch.sigmoid(g) * u
    if activation == CLAMP:  # column 2n is gate n, 2n+1 up n; gpt-oss's clamps
        g, u = z[:, 0::2].clamp(max=7.0), z[:, 1::2].clamp(-7.0, 7.0)
        return g * torch.sigmoid(1.702 * g) * (u + 1.0)
    assert activation == "gelu"
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _operands(counts, activation, bias_kind="both", lora=False, dtype=torch.float64, seed=0):
    """Leaves by name, each requiring grad: x [N, H], w_gu [E, 2F|F, H], w_d [E, H, F], b_gu [E, 2F|F],
    b_d [E, H] (as bias_kind says), LoRA a_gu [E, r, H], b_gu_l [E, 2F|F, r], a_d [E, r, F], b_d_l [E, H, r]."""
    g = torch.Generator().manual_seed(seed)
    e, n = len(counts), int(counts.sum())
    f_in = 2 * FF if reference.is_glu(activation) else FF

    def t(*shape, scale=0.5):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    o = dict(x=t(n, H), w_gu=t(e, f_in, H), w_d=t(e, H, FF))
    if bias_kind in ("both", "gate_up"):
        o["bias_gu"] = t(e, f_in, scale=1.0)
        if activation == CLAMP:
            # Gate 0 far above the limit and up 0 far below it: the clamps must see the bias (added
            # before the activation), and no element sits near a clamp's kink (gradcheck).
            o["bias_gu"][:, 0] += 20.0
            o["bias_gu"][:, 1] -= 20.0
    if bias_kind in ("both", "down"):
        o["bias_d"] = t(e, H, scale=1.0)
    if lora:
        o.update(a_gu=t(e, R, H), b_gu_l=t(e, f_in, R), a_d=t(e, R, FF), b_d_l=t(e, H, R))
    return {k: v.to(dtype).requires_grad_(True) for k, v in o.items()}


def _bias(o) -> ExpertBias:
    return ExpertBias(o.get("bias_gu"), o.get("bias_d"))


def _lora(o):
    return LoRAWeights(o["a_gu"], o["b_gu_l"], o["a_d"], o["b_d_l"]) if "a_gu" in o else None


def _oracle(o, counts, activation):
    """Plain autograd, one expert block at a time."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        x = o["x"][start:start + n]
        start += n
        z = x @ o["w_gu"][e].T
        if "a_gu" in o:
            z = z + SCALE * (x @ o["a_gu"][e].T) @ o["b_gu_l"][e].T
        if "bias_gu" in o:
            z = z + o["bias_gu"][e]
        h = _act(z, activation)
        y = h @ o["w_d"][e].T
        if "a_d" in o:
            y = y + SCALE * (h @ o["a_d"][e].T) @ o["b_d_l"][e].T
        if "bias_d" in o:
            y = y + o["bias_d"][e]
        outs.append(y)
    return torch.cat(outs)


def _ours(o, counts, activation):
    return reference.grouped_mlp(o["x"], counts, o["w_gu"], o["w_d"], activation, lora=_lora(o), lora_scale=SCALE,
                                 bias=_bias(o))


def _fp64(o):
    return {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in o.items()}


def _grads(y, o, dy):
    leaves = [v for v in o.values() if v.requires_grad]
    return dict(zip([k for k, v in o.items() if v.requires_grad], torch.autograd.grad(y, leaves, dy)))


@pytest.fixture(params=["per_expert", "grouped"])
def mode(request, monkeypatch):
    """Which inner path runs (_OneExpert blocks in fp64, or _AllExperts in fp32, which
    torch._grouped_mm needs); its value is the dtype, and it checks the path ran."""
    grouped = request.param == "grouped"
    with forced_blocks(monkeypatch, grouped):
        yield torch.float32 if grouped else torch.float64


def _assert_matches(got, want, what):
    """fp64 against the fp64 oracle up to reassociation; fp32 norm-wise against it."""
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, **TOL[torch.float64], msg=lambda m: f"{what}: {m}")
    else:
        assert got.dtype == torch.float32, what
        assert_max_err(got, want, ORACLE_FP32, what=what)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("counts", list(COUNTS), ids=list(COUNTS))
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=["swiglu", "clamp_interleaved", "gelu"])
@pytest.mark.parametrize("bias_kind", BIAS_KINDS)
def test_output_and_every_gradient_match_the_loop(bias_kind, activation, counts, lora, mode):
    counts = COUNTS[counts]
    o = _operands(counts, activation, bias_kind, lora, dtype=mode)
    o64 = _fp64(o)
    y, want = _ours(o, counts, activation), _oracle(o64, counts, activation)
    assert y.dtype == mode
    _assert_matches(y, want, "y")
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, ref = _grads(y, o, dy.to(mode)), _grads(want, o64, dy)
    assert got.keys() == ref.keys() and {"bias_gu", "bias_d"} & got.keys()
    for name in ref:
        assert got[name].dtype == mode, name
        _assert_matches(got[name], ref[name], f"d {name}")
    idle = (counts == 0).nonzero().flatten()
    for name in ("bias_gu", "bias_d"):  # idle experts' biases get exact zeros, not leftovers
        if name in got:
            assert got[name][idle].abs().sum() == 0, name


def test_bias_none_fields_are_no_bias():
    """ExpertBias(None, None) and bias=None give the same output as each other, bit for bit."""
    counts = COUNTS["idle"]
    o = _operands(counts, "swiglu", bias_kind="none")
    base = reference.grouped_mlp(o["x"], counts, o["w_gu"], o["w_d"], "swiglu")
    empty = reference.grouped_mlp(o["x"], counts, o["w_gu"], o["w_d"], "swiglu", bias=ExpertBias(None, None))
    torch.testing.assert_close(empty, base, rtol=0, atol=0)


@pytest.mark.parametrize("trained", ["bias_gu", "bias_d"])
def test_only_a_bias_trains(trained, mode):
    """Everything else frozen: the bias still gets its gradient, and the backward runs only the
    GEMM it needs (b_gu's gradient is a sum of dz, which needs dh = dy W_d; b_d's is a sum of dy)."""
    counts = COUNTS["idle"]
    o = _operands(counts, CLAMP, "both", lora=True, dtype=mode)
    for k, v in o.items():
        v.requires_grad_(k == trained)
    o64 = _fp64(o)
    y = _ours(o, counts, CLAMP)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        got = _grads(y, o, dy.to(mode))
    want = _grads(_oracle(o64, counts, CLAMP), o64, dy)
    assert got.keys() == want.keys() == {trained}
    _assert_matches(got[trained], want[trained], f"d {trained}")
    n = int(counts.sum())
    dyb = 2 * n * H * R  # dy B_d: the LoRA backward runs it whatever is asked (as the formula says)
    dh = 2 * n * H * FF + 2 * n * R * FF  # dy W_d and the LoRA term of dh
    dzb = 2 * n * 2 * FF * R  # dz B_gu, computed with dz
    assert counter.get_total_flops() == dyb + (dh + dzb if trained == "bias_gu" else 0)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("lora_rank", [0, R])
def test_biases_add_no_flops(activation, lora_rank):
    counts = COUNTS["idle"]
    n = int(counts.sum())
    o = _operands(counts, activation, "both", bool(lora_rank), dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        reference.grouped_mlp(o["x"], counts, o["w_gu"], o["w_d"], activation, lora=_lora(o), lora_scale=SCALE,
                              bias=_bias(o)).backward(torch.ones(n, H))
    want = baselines.flops(n, 1, H, FF, activation, lora_rank, backward=True)
    assert counter.get_total_flops() == want.total


@pytest.mark.parametrize("activation", [CLAMP, "swiglu:interleaved", "gelu"])
def test_gradcheck_fp64(activation):
    counts = torch.tensor([2, 0, 3])
    o = _operands(counts, activation, "both", lora=True)
    names = list(o)

    def fn(*tensors):
        return _ours(dict(zip(names, tensors)), counts, activation)

    assert torch.autograd.gradcheck(fn, tuple(o.values()))


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_opcheck_with_biases(lora, mode):
    """Schema, fake implementations and autograd registration of both ops with the bias operands."""
    counts = COUNTS["idle"]
    o = _operands(counts, "swiglu", "both", lora, dtype=torch.float32)
    lo = (o.get("a_gu"), o.get("b_gu_l"), o.get("a_d"), o.get("b_d_l"))
    args = (o["x"], counts, o["w_gu"], o["w_d"], *lo, "swiglu", SCALE, None, None, None, None, o["bias_gu"],
            o["bias_d"], True)
    torch.library.opcheck(tgm.torch_grouped_mlp_fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    y, z, xa, ha = tgm.torch_grouped_mlp_fwd(*plain)
    bwd = (torch.randn_like(y), *plain[:-1], z, xa, ha)
    for needs in ((True,) * 7, (False, False, False, False, False, True, False),
                  (False, False, False, False, False, False, True)):
        torch.library.opcheck(tgm.torch_grouped_mlp_bwd, (*bwd, *needs))


def test_compiles_fullgraph_and_matches_eager():
    """The biases are two more operands of the one custom-op node: still one graph, same numbers."""
    counts = COUNTS["idle"]
    o = _operands(counts, CLAMP, "both", lora=True, dtype=torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def fn(x, counts, w_gu, w_d, b_gu, b_d, lora):
        return reference.grouped_mlp(x, counts, w_gu, w_d, CLAMP, lora=lora, lora_scale=SCALE,
                                     bias=ExpertBias(b_gu, b_d))

    args = (o["x"], counts, o["w_gu"], o["w_d"], o["bias_gu"], o["bias_d"], _lora(o))
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    finally:
        torch._dynamo.reset()
    want = fn(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(graphs) == 1
    assert torch.ops.unimoe.torch_grouped_mlp_fwd.default in {n.target for n in graphs[0].graph.nodes}
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_grads(got, o, dy).values(), _grads(want, o, dy).values()):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _routed(activation, lora, t=6, k=2, e=4, seed=0):
    """Tokens x [T, H], distinct expert ids [T, k], combine weights [T, k] and expert operands."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(e, dtype=torch.int64)  # only the operand shapes read it
    o = _operands(counts, activation, "both", lora, seed=seed)
    o["x"] = torch.randn(t, H, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.rand(t, k, generator=g, dtype=torch.float64)
    return o, ids, weights


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("activation", [CLAMP, "gelu"], ids=["clamp_interleaved", "gelu"])
def test_export_forward_matches_reference(activation, lora):
    """experts_forward_aten with biases, output and gradients, against permute -> reference.grouped_mlp
    -> unpermute (the torch path of the same layer)."""
    o, ids, weights = _routed(activation, lora)
    e = o["w_gu"].shape[0]
    got = experts_forward_aten(o["x"], ids, weights, o["w_gu"], o["w_d"], activation, lora=_lora(o),
                               lora_scale=SCALE, bias=_bias(o))
    plan = reference.build_routing(ids, e)
    want = reference.moe_forward(o["x"], weights, plan, o["w_gu"], o["w_d"], activation, lora=_lora(o),
                                 lora_scale=SCALE, bias=_bias(o))
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    dy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got_g, want_g = _grads(got, o, dy), _grads(want, o, dy)
    for name in o:
        torch.testing.assert_close(got_g[name], want_g[name], **TOL[torch.float64],
                                   msg=lambda m, name=name: f"d {name}: {m}")


def test_export_forward_exports_with_biases():
    """torch.export of experts_forward_aten with biases: no custom op in the program, and the program
    gives eager's output."""

    class Experts(torch.nn.Module):
        def __init__(self, o):
            super().__init__()
            for k in ("w_gu", "w_d", "bias_gu", "bias_d"):
                setattr(self, k, torch.nn.Parameter(o[k].detach().float()))

        def forward(self, x, ids, weights):
            return experts_forward_aten(x, ids, weights, self.w_gu, self.w_d, CLAMP,
                                        bias=ExpertBias(self.bias_gu, self.bias_d))

    o, ids, weights = _routed(CLAMP, lora=False)
    m = Experts(o)
    x = o["x"].detach().float()
    ep = torch.export.export(m, (x, ids, weights.float()))
    targets = {str(n.target) for n in ep.graph.nodes}
    assert not any("unimoe" in t for t in targets), targets
    o2, ids2, weights2 = _routed(CLAMP, lora=False, seed=1)
    x2 = o2["x"].detach().float()
    torch.testing.assert_close(ep.module()(x2, ids2, weights2.float()), m(x2, ids2, weights2.float()), rtol=0, atol=0)
