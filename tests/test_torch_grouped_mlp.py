"""The torch path's grouped MLP ops (unimoe_kernels/torch_grouped_mlp.py) against autograd.

The oracle is the expert MLP written as plain autograd code, one expert's block of rows at a time,
with the LoRA dropout masks and rank gates given explicitly so both sides use the same ones: its
output and every gradient (x, the LoRA input x' = dropout(x), base weights, A and B of both
projections, both rank gates) must match, for every activation, with idle experts first, in the
middle and last. Also: a frozen base gets no gradient and no dW GEMM, fp64 gradcheck, opcheck of both
ops, the FLOP formulas against baselines.flops, and one graph under torch.compile(fullgraph=True)
plus torch.export with a dynamic row count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import FLOOR, FLOOR_TORCH_GROUPED_MLP_BF16, TOL, assert_flash_rule
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils.flop_counter import FlopCounterMode
from torch_path_blocks import forced_blocks

from unimoe_kernels import baselines, reference
from unimoe_kernels import torch_grouped_mlp as tgm

COUNTS = torch.tensor([0, 5, 0, 3, 4, 0])  # idle experts first, in the middle and last
# Every width a multiple of 4, so fp32 operands meet torch._grouped_mm's 16-byte stride rule and
# both inner paths can run (the mode fixture picks one).
E, H, FF, R = len(COUNTS), 8, 4, 4
N = int(COUNTS.sum())


def _operands(activation="swiglu", lora=True, gates=False, dropout=False, dtype=torch.float64, base_grad=True):
    g = torch.Generator().manual_seed(0)
    f_in = 2 * FF if reference.is_glu(activation) else FF

    def t(*shape, grad=True, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(grad)

    ops = dict(x=t(N, H), w_gu=t(E, f_in, H, grad=base_grad), w_d=t(E, H, FF, grad=base_grad))
    ops.update(a_gu=t(E, R, H), b_gu=t(E, f_in, R), a_d=t(E, R, FF), b_d=t(E, H, R)) if lora else None
    if gates:
        ops.update(g_gu=t(N, R, scale=1.0), g_d=t(N, R, scale=1.0))
    if dropout:  # x' and the mask of h as reference.grouped_mlp draws them (keep 0.6)
        ops["x_lora"] = F.dropout(ops["x"], 0.4, True)
        ops["mask_h"] = torch.bernoulli(torch.full((N, FF), 0.6, dtype=dtype), generator=g) / 0.6
    return ops


def _oracle(o, activation, scale):
    """Plain autograd, one expert block at a time."""
    outs, start = [], 0
    for e, n in enumerate(COUNTS.tolist()):
        rows = slice(start, start + n)
        start += n
        x = o["x"][rows]
        z = x @ o["w_gu"][e].t()
        if "a_gu" in o:
            xa = o.get("x_lora", o["x"])[rows] @ o["a_gu"][e].t()
            z = z + scale * (xa * o["g_gu"][rows] if "g_gu" in o else xa) @ o["b_gu"][e].t()
        h = reference.apply_activation(z, activation)
        y = h @ o["w_d"][e].t()
        if "a_d" in o:
            hl = h * o["mask_h"][rows] if "mask_h" in o else h
            ha = hl @ o["a_d"][e].t()
            y = y + scale * (ha * o["g_d"][rows] if "g_d" in o else ha) @ o["b_d"][e].t()
        outs.append(y)
    return torch.cat(outs)


def _ours(o, activation, scale):
    lora = reference.LoRAWeights(o["a_gu"], o["b_gu"], o["a_d"], o["b_d"]) if "a_gu" in o else None
    gates = (o["g_gu"], o["g_d"]) if "g_gu" in o else None
    return tgm.grouped_mlp(o["x"], COUNTS, o["w_gu"], o["w_d"], activation, lora, scale, o.get("x_lora"),
                           o.get("mask_h"), gates, save_preact=True)


def _grads(y, o, dy):
    leaves = [t for t in o.values() if t.requires_grad and t.is_leaf]
    return torch.autograd.grad(y, leaves, dy, allow_unused=True, retain_graph=True)  # x_lora is shared


@pytest.fixture(params=["per_expert", "grouped"])
def mode(request, monkeypatch):
    """Which inner path runs: a torch.mm per expert block, or one torch._grouped_mm per GEMM (fp32
    only); the fixture's value is (dtype, tolerance) for that path, and it checks the path ran."""
    grouped = request.param == "grouped"
    dtype = torch.float32 if grouped else torch.float64
    with forced_blocks(monkeypatch, grouped):
        yield dtype, TOL[dtype]


@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("lora,gates,dropout", [(False, False, False), (True, False, False), (True, True, True)])
def test_output_and_every_gradient_match_autograd(activation, lora, gates, dropout, mode):
    dtype, tol = mode
    o = _operands(activation, lora, gates, dropout, dtype=dtype)
    y = _ours(o, activation, 1.5)
    want = _oracle(o, activation, 1.5)
    torch.testing.assert_close(y, want, **tol)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = _grads(y, o, dy)
    for got, ref in zip(grads, _grads(want, o, dy)):
        torch.testing.assert_close(got, ref, **tol)
    if lora:  # idle experts' LoRA factors get exact zeros
        assert grads[list(o).index("a_gu")][[0, 2, 5]].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_within_twice_autograds(dtype):
    """In fp32 / bf16, our error against the fp64 truth is at most twice plain autograd's in the same
    dtype, plus a floor of a few ulps (the rounding order of the two differs): flash-attention's rule."""
    o64 = _operands("geglu", lora=True, gates=True)
    o = {k: v.detach().to(dtype).requires_grad_(v.requires_grad) for k, v in o64.items()}
    dy64 = torch.randn(N, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    truth = (_oracle(o64, "geglu", 2.0), *_grads(_oracle(o64, "geglu", 2.0), o64, dy64))
    y, want = _ours(o, "geglu", 2.0), _oracle(o, "geglu", 2.0)
    ours = (y, *_grads(y, o, dy64.to(dtype)))
    plain = (want, *_grads(want, o, dy64.to(dtype)))
    floor = FLOOR[torch.float32] if dtype == torch.float32 else FLOOR_TORCH_GROUPED_MLP_BF16
    assert len(ours) == len(plain) == len(truth)
    for i, (a, b, t) in enumerate(zip(ours, plain, truth)):
        assert a.dtype == dtype, i
        assert_flash_rule(a, b, t, floor=floor, what=f"output {i}")


def test_frozen_base_gets_no_gradient_and_no_weight_gemm(mode):
    o = _operands(base_grad=False, dtype=torch.float32)
    y = _ours(o, "swiglu", 1.0)
    with FlopCounterMode(display=False) as counter:
        y.backward(torch.ones_like(y))
    assert o["w_gu"].grad is None and o["w_d"].grad is None and o["a_gu"].grad is not None
    want = baselines.flops(N, 1, H, FF, "swiglu", R, backward=True, base_trainable=False)
    fwd = baselines.flops(N, 1, H, FF, "swiglu", R)
    assert counter.get_total_flops() == want.total - fwd.total  # the backward alone


def test_gradcheck_fp64():
    o = _operands("swiglu", lora=True, gates=True)
    names = list(o)

    def fn(*tensors):
        return _ours(dict(zip(names, tensors)), "swiglu", 1.5)

    assert torch.autograd.gradcheck(fn, tuple(o.values()))


def test_no_rows():
    x = torch.randn(0, H, requires_grad=True)
    w_gu, w_d = torch.randn(3, 2 * FF, H, requires_grad=True), torch.randn(3, H, FF, requires_grad=True)
    y = reference.grouped_mlp(x, torch.zeros(3, dtype=torch.int64), w_gu, w_d)
    assert y.shape == (0, H)
    y.backward(torch.randn_like(y))
    assert not w_gu.grad.any() and not w_d.grad.any() and x.grad.shape == (0, H)


@pytest.mark.parametrize("lora", [False, True])
def test_opcheck(lora, mode):
    o = _operands(lora=lora, gates=lora, dropout=lora, dtype=torch.float32)
    if lora:  # a leaf: opcheck runs backward several times
        o["x_lora"] = o["x_lora"].detach().requires_grad_(True)
    args = (o["x"], COUNTS, o["w_gu"], o["w_d"], *(o.get(k) for k in ("a_gu", "b_gu", "a_d", "b_d")), "swiglu", 1.5,
            o.get("x_lora"), o.get("mask_h"), o.get("g_gu"), o.get("g_d"), None, None, True)
    torch.library.opcheck(tgm.torch_grouped_mlp_fwd, args)
    y, z, xa, ha = tgm.torch_grouped_mlp_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    bwd = (torch.randn_like(y), *(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]), z, xa, ha)
    need_sets = ((True, True, True, True, True, True, True), (True, False, False, lora, False, False, False),
                 (False, False, True, False, False, False, False))
    for needs in need_sets:
        torch.library.opcheck(tgm.torch_grouped_mlp_bwd, (*bwd, *needs))


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_flop_formulas_match_baselines(activation, lora_rank):
    o = _operands(activation, lora=bool(lora_rank), dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        _ours(o, activation, 1.0).backward(torch.ones(N, H))
    want = baselines.flops(N, 1, H, FF, activation, R if lora_rank else 0, backward=True)
    assert counter.get_total_flops() == want.total


def test_compiles_fullgraph_and_exports_with_dynamic_rows():
    """The group sizes are data; no tracer may see them: one graph, no unbacked size, any N."""
    torch.manual_seed(0)

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_gu = torch.nn.Parameter(torch.randn(4, 2 * FF, H))
            self.w_d = torch.nn.Parameter(torch.randn(4, H, FF))

        def forward(self, x, ids):
            counts = reference.expert_counts(ids, 4)
            order = torch.sort(ids, stable=True).indices
            return reference.grouped_mlp(x[order], counts, self.w_gu, self.w_d)

    eager = Experts()
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, backend=backend)
    for n in (10, 13):
        x, ids = torch.randn(n, H, requires_grad=True), torch.randint(0, 4, (n,))
        got, want = compiled(x, ids), eager(x, ids)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), eager.w_gu)[0],
                                   torch.autograd.grad(want.sum(), eager.w_gu)[0])
    for g in graphs:
        for node in g.graph.nodes:
            assert not free_unbacked_symbols(node.meta.get("example_value")), node.format_node()
    torch._dynamo.reset()
    n = torch.export.Dim("n", min=2, max=1024)
    ep = torch.export.export(eager, (torch.randn(10, H), torch.randint(0, 4, (10,))), dynamic_shapes=({0: n}, {0: n}))
    x, ids = torch.randn(37, H), torch.randint(0, 4, (37,))
    torch.testing.assert_close(ep.module()(x, ids), eager(x, ids))
