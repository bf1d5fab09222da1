"""The torch path's grouped GEMM (unimoe_kernels/grouped_linear.py) against one mm per expert block.

Both of its inner paths are covered: torch._grouped_mm (fp32 / bf16 / fp16 with 16-byte strides) and
the loop over groups (fp64, widths whose rows are not a multiple of 16 bytes), with empty experts
first, in the middle and last; and the op contract that lets tracers through: opcheck of both custom
ops, one graph under torch.compile(fullgraph=True) and torch.export with a dynamic row count.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from unimoe_kernels import grouped_linear as gl
from unimoe_kernels.grouped_linear import grouped_linear

COUNTS = torch.tensor([0, 5, 0, 3, 4, 0])  # idle experts first, in the middle and last


def _per_expert(x, w, counts):
    outs, start = [], 0
    for e, rows in enumerate(counts.tolist()):
        outs.append(x[start:start + rows] @ w[e].t())
        start += rows
    return torch.cat(outs)


@pytest.mark.parametrize("dtype,k,m,gmm", [
    (torch.float32, 16, 8, True), (torch.bfloat16, 16, 8, True), (torch.float16, 32, 16, True),
    (torch.float32, 5, 3, False), (torch.float64, 16, 8, False),
])
def test_forward_and_grads_match_per_expert_mm(dtype, k, m, gmm):
    x = torch.randn(int(COUNTS.sum()), k, dtype=dtype, requires_grad=True)
    w = torch.randn(len(COUNTS), m, k, dtype=dtype, requires_grad=True)
    ends = torch.cumsum(COUNTS, 0)
    assert gl._gmm_takes(x, w.transpose(1, 2)) == gmm  # the inner path this case is meant to cover
    y = grouped_linear(x, w, ends)
    want = _per_expert(x, w, COUNTS)
    dy = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, (x, w), dy)
    want_grads = torch.autograd.grad(want, (x, w), dy)
    tol = dict(rtol=0, atol=0) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, want, **tol)
    for got, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(got, ref, **tol)
    assert got_grads[1][[0, 2, 5]].abs().sum() == 0  # idle experts get exact zeros


def test_frozen_weight_gets_no_gradient_and_saves_no_input():
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(len(COUNTS), 8, 16)  # frozen
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = grouped_linear(x, w, torch.cumsum(COUNTS, 0))
    # As mm does: only what the wanted gradient needs (w for dx), not the input x.
    assert not any(t.shape == x.shape for t in saved) and any(t.shape == w.shape for t in saved)
    y.backward(torch.randn_like(y))
    assert x.grad is not None and w.grad is None


def test_gradcheck_fp64():
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(COUNTS), 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_linear(a, b, torch.cumsum(COUNTS, 0)), (x, w))


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    y = grouped_linear(x, w, torch.zeros(3, dtype=torch.int64))
    assert y.shape == (0, 8)
    y.backward(torch.randn_like(y))
    assert w.grad.abs().sum() == 0 and x.grad.shape == (0, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    x = torch.randn(12, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(len(COUNTS), 8, 16, dtype=dtype, requires_grad=True)
    ends = torch.cumsum(COUNTS, 0).to(torch.int32)
    torch.library.opcheck(gl.grouped_linear_op, (x, w, ends))
    dy = torch.randn(12, 8, dtype=dtype)
    torch.library.opcheck(gl.grouped_linear_bwd, (dy, x.detach(), w.detach(), ends, True, True))
    torch.library.opcheck(gl.grouped_linear_bwd, (dy, None, w.detach(), ends, True, False))
    torch.library.opcheck(gl.grouped_linear_bwd, (dy, x.detach(), None, ends, False, True))


def test_flop_counter_counts_the_grouped_gemms():
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(len(COUNTS), 8, 16, requires_grad=True)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        grouped_linear(x, w, torch.cumsum(COUNTS, 0)).backward(torch.randn(12, 8))
    assert counter.get_total_flops() == 3 * 2 * 12 * 16 * 8  # forward, dx, dw


def test_compiles_fullgraph_and_exports_with_dynamic_rows():
    """The group sizes are data; no tracer may see them: one graph, no unbacked size, any N."""
    w = torch.randn(4, 8, 16, requires_grad=True)

    def fn(x, ids, w=w):
        counts = torch.zeros(4, dtype=torch.int64).scatter_add_(0, ids, torch.ones_like(ids))
        order = torch.sort(ids, stable=True).indices
        return grouped_linear(x[order], w, torch.cumsum(counts, 0))

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    for n in (10, 13):
        x, ids = torch.randn(n, 16, requires_grad=True), torch.randint(0, 4, (n,))
        got = compiled(x, ids)
        want = fn(x, ids)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), w)[0], torch.autograd.grad(want.sum(), w)[0])
    for g in graphs:
        for node in g.graph.nodes:
            assert not free_unbacked_symbols(node.meta.get("example_value")), node.format_node()
    torch._dynamo.reset()

    class Mod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.detach().clone())

        def forward(self, x, ids):
            return fn(x, ids, self.w)

    n = torch.export.Dim("n", min=2, max=1024)
    ep = torch.export.export(Mod(), (torch.randn(10, 16), torch.randint(0, 4, (10,))),
                             dynamic_shapes=({0: n}, {0: n}))
    x, ids = torch.randn(37, 16), torch.randint(0, 4, (37,))
    torch.testing.assert_close(ep.module()(x, ids), fn(x, ids))
