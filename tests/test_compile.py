"""torch.compile(fullgraph=True) of SparseMoE on the Triton and torch paths, torch.export of the
torch path, and opcheck of the custom ops.

fullgraph=True turns any graph break into an error, so a passing compile is the no-graph-break
check; the test also asserts that one graph covers the whole forward, with the kernels as custom-op
nodes and no data-dependent (unbacked) sizes.
backend="aot_eager" traces forward and backward through AOTAutograd without needing a C++ compiler;
the Triton kernels stay opaque custom ops (in the interpreter on CPU, conftest sets
TRITON_INTERPRET=1). The torch (CPU) path's expert MLP is the custom op pair
unimoe::torch_grouped_mlp_fwd / _bwd (torch_grouped_mlp.py), so it compiles into one graph too and
exports with a dynamic token count.
"""

import copy

import pytest
import torch
import torch._dynamo
from tolerance import TOL
from torch._dynamo.backends.debugging import aot_eager
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from unimoe_kernels import SparseMoE, reference

# Registered when unimoe_kernels.ops is imported (by the line above).
unimoe = torch.ops.unimoe

# The interpreter (triton 3.6, numpy 2.3) turns runtime loop bounds into ints through 1-element
# arrays, which numpy deprecates; it is the interpreter's warning, not the kernels'.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

FP32 = TOL[torch.float32]


def _moe(device, **kw):
    moe = SparseMoE(16, 8, 5, top_k=2, lora_rank=2, aux_loss_coef=0.1, z_loss_coef=0.01, backend="triton",
                    device=device, **kw).train()
    with torch.no_grad():  # B = 0 would hide a broken LoRA gradient path
        moe.experts.lora_B_gate_up.normal_(0, 0.3)
        moe.experts.lora_B_down.normal_(0, 0.3)
    return moe


def _step(moe, x, token_groups):
    """Output, MoEAux fields, gradients of x and every trainable parameter, and the group counts."""
    x = x.detach().clone().requires_grad_(True)
    y, aux = moe(x, return_aux=True, token_groups=token_groups)
    params = [p for p in moe.parameters() if p.requires_grad]
    # A random cotangent: ones would hide errors that cancel in sums. The aux losses reach the
    # router through the attached gradient, not through this loss.
    grads = torch.autograd.grad((y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
                                 .to(y.device)).sum(), [x] + params)
    return (y, *aux) + grads + (moe.routing_stats(),)


# (x shape, scoring, token groups, why)
CASES = [
    ((10, 16), "softmax", False, "2-D input, softmax router, no token groups"),
    ((2, 7, 16), "sigmoid", True, "3-D input, sigmoid router, per-group expert counts"),
]


@pytest.mark.parametrize("shape,scoring,groups,why", CASES, ids=[c[-1][:30] for c in CASES])
def test_sparse_moe_fullgraph_matches_eager(device, shape, scoring, groups, why):
    torch._dynamo.reset()
    eager = _moe(device, scoring=scoring)
    compiled_moe = copy.deepcopy(eager)  # own group_expert_counts buffer
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(compiled_moe, fullgraph=True, backend=backend)
    x = torch.randn(shape, device=device)
    tg = torch.randint(0, 3, shape[:-1], device=device) if groups else None
    ref = _step(eager, x, tg)
    got = _step(compiled, x, tg)
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    targets = {n.target for n in nodes}
    # The kernels are single opaque nodes of the one graph (no launch was traced into); the weighted
    # combine is fused into the expert MLP's op.
    assert {unimoe.topk_gating_fwd.default, unimoe.grouped_mlp_fwd.default} <= targets
    # No data-dependent size anywhere (torch.bincount traced with fullgraph=True gives one, and a
    # graph break without it): every shape follows from x's shape and the layer's config.
    for n in nodes:
        assert not free_unbacked_symbols(n.meta.get("example_value")), n.format_node()
    assert len(got) == len(ref) >= 5 + 5  # y, 5 aux fields, x, router and 4 LoRA factors
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        torch.testing.assert_close(a, b, **FP32, msg=lambda m, i=i: f"output {i}: {m}")
    if groups:
        assert int(got[-1].sum()) == x[..., 0].numel() * 2  # every (token, slot) counted once
    else:
        # A second batch size: dynamo recompiles (by default with a symbolic T), so the fakes and
        # the plan's tile count must follow the new T; the result still equals eager.
        x2 = torch.randn(13, 16, device=device)
        for a, b in zip(_step(compiled, x2, None), _step(eager, x2, None)):
            torch.testing.assert_close(a, b, **FP32)
    torch._dynamo.reset()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_torch_path_fullgraph_and_export_match_eager(lora_rank):
    """The CPU path: no Python branch on the expert counts, so one graph and an exported program."""
    torch._dynamo.reset()
    eager = SparseMoE(16, 8, 5, top_k=2, lora_rank=lora_rank, aux_loss_coef=0.1, backend="torch").train()
    if lora_rank:
        with torch.no_grad():
            eager.experts.lora_B_gate_up.normal_(0, 0.3)
            eager.experts.lora_B_down.normal_(0, 0.3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend=backend)
    for t in (10, 13):  # the second T recompiles with a symbolic T
        x = torch.randn(t, 16)
        for a, b in zip(_step(compiled, x, None), _step(eager, x, None)):
            torch.testing.assert_close(a, b, **FP32)
    targets = {n.target for n in graphs[0].graph.nodes}
    assert unimoe.torch_grouped_mlp_fwd.default in targets
    for g in graphs:
        for n in g.graph.nodes:
            assert not free_unbacked_symbols(n.meta.get("example_value")), n.format_node()
    torch._dynamo.reset()

    eager.eval()
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    exported = torch.export.export(eager, (torch.randn(10, 16),), dynamic_shapes=({0: tokens},))
    x = torch.randn(37, 16)
    torch.testing.assert_close(exported.module()(x), eager(x), **FP32)


def _gating_args(device, t=6, e=6, k=2, bias=False, n_groups=1, topk_groups=1):
    logits = torch.randn(t, e, device=device, requires_grad=True)
    b = 0.1 * torch.randn(e, device=device) if bias else None
    return logits, b, k, "softmax", True, 1.5, n_groups, topk_groups


@pytest.mark.parametrize("variant", ["plain", "bias_groups", "sigmoid_unnormalised", "empty", "stats",
                                     "stats_empty"])
def test_opcheck_topk_gating_fwd(device, variant):
    if variant == "plain":
        args = _gating_args(device)
    elif variant == "bias_groups":
        args = _gating_args(device, bias=True, n_groups=3, topk_groups=2)
    elif variant == "sigmoid_unnormalised":
        logits, b, k, _, _, _, g, tg = _gating_args(device, k=3)
        args = (logits, b, k, "sigmoid", False, 1.0, g, tg)
    elif variant == "stats":  # also the aux-loss statistics (lse, probability column sums)
        args = (*_gating_args(device, t=70), True)
    elif variant == "stats_empty":
        args = (*_gating_args(device, t=0), True)
    else:  # T = 0: no launch
        args = _gating_args(device, t=0)
    torch.library.opcheck(unimoe.topk_gating_fwd.default, args)


@pytest.mark.parametrize("grads", ["weights", "scores", "both"])
def test_opcheck_topk_gating_bwd(device, grads):
    logits, *rest = _gating_args(device)
    _, ids, scores, _, _ = unimoe.topk_gating_fwd(logits.detach(), *rest)
    dw = torch.randn(ids.shape, device=device) if grads != "scores" else None
    ds = torch.randn(scores.shape, device=device) if grads != "weights" else None
    torch.library.opcheck(unimoe.topk_gating_bwd.default, (dw, ds, scores, ids, "softmax", True, 1.5))


def _plan(t, e, k, device):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32).to(device)
    return reference.build_routing(ids, e)


def test_opcheck_permute_fwd(device):
    t, k, h = 5, 2, 12
    plan = _plan(t, 4, k, device)
    x = torch.randn(t, h, device=device, requires_grad=True)
    torch.library.opcheck(unimoe.permute_fwd.default, (x, plan.sorted_slots, plan.slot_rows, k))


@pytest.mark.parametrize("weights", ["fp32", "fp16", "none"])
def test_opcheck_combine_fwd(device, weights):
    t, k, h = 5, 2, 12
    plan = _plan(t, 4, k, device)
    y = torch.randn(t * k, h, device=device, requires_grad=True)
    w = None if weights == "none" else torch.rand(t, k, device=device).to(
        torch.float16 if weights == "fp16" else torch.float32).requires_grad_(True)
    torch.library.opcheck(unimoe.combine_fwd.default, (y, plan.slot_rows, w, k))


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_combine_bwd(device, need):
    t, k, h = 5, 2, 12
    plan = _plan(t, 4, k, device)
    d_out, y = torch.randn(t, h, device=device), torch.randn(t * k, h, device=device)
    w = torch.rand(t, k, device=device)
    torch.library.opcheck(unimoe.combine_bwd.default, (d_out, y, plan.slot_rows, w, k, *need))
    if not need[1]:  # the permute's backward path: no weights (all 1), no y
        torch.library.opcheck(unimoe.combine_bwd.default, (d_out, None, plan.slot_rows, None, k, *need))
