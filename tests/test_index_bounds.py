"""Input-side index arithmetic past 2^31 elements: operands whose rows lie STRIDE elements apart, so
that row 2 sits 2 * STRIDE > 2^31 elements past row 0, through the permute / combine kernels, the
gating kernels and the grouped GEMM's gathered (and sorted) loads, forward and backward.

STRIDE itself fits an int32 kernel argument, so only the product row * stride passes 2^31: a kernel
that forms it in int32 wraps to 2 * STRIDE - 2^32 = -(2^21 + 2) elements and reads before row 0.
LEAD elements of the same buffer sit there (never written: zero on a fresh mapping), so the wrong
read gives wrong values instead of a fault. Only three rows are ever written: the buffer is 2^32
elements of address space (8 GiB for fp16, 16 GiB for fp32 — the gating kernels read fp32 only)
of which a few pages become resident. Where that much address space cannot be had, the test skips.
Every operand of one test is a column slice of one such buffer. The result is compared with the
same op on contiguous copies of the three rows.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from tolerance import TOL

from unimoe_kernels import ops, reference
from unimoe_kernels.types import LoRAWeights

ROWS = 3
STRIDE = 2**31 - 2**20 - 1  # odd: fp16 rows are not 16-byte aligned, so the GEMMs take pointer loads, not TMA
LEAD = 2**21 + 64  # where the int32 wrap of row 2's offset lands, inside the buffer
H, F, E = 8, 8, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_construction_overflows_int32_only_in_the_product():
    assert STRIDE < 2**31 <= (ROWS - 1) * STRIDE < 2**32
    assert LEAD + (ROWS - 1) * STRIDE - 2**32 >= 0


@contextlib.contextmanager
def _unfilled():
    # Deterministic mode fills fresh memory with NaN, which would make all of the buffer resident.
    det = torch.utils.deterministic
    old = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = old


@pytest.fixture
def far_rows(device):
    """far_rows(*columns of the given widths, dtype) -> views [ROWS, width] of one buffer, rows
    STRIDE elements apart, each holding random values (also returned as contiguous copies)."""
    held = []

    def make(widths, dtype):
        total = sum(widths)
        n = LEAD + (ROWS - 1) * STRIDE + total
        try:
            with _unfilled():
                buf = torch.empty(n, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as err:
            pytest.skip(f"cannot reserve {n * dtype.itemsize / 2**30:.0f} GiB of address space: {err}")
        held.append(buf)
        wide = buf.as_strided((ROWS, total), (STRIDE, 1), LEAD)
        data = torch.randn(ROWS, total, generator=torch.Generator().manual_seed(total)).to(dtype).to(device)
        wide.copy_(data)
        views, copies, c = [], [], 0
        for w in widths:
            views.append(wide[:, c:c + w])
            copies.append(data[:, c:c + w].clone())
            c += w
        return views, copies

    yield make
    held.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _leaves(ts):
    return [t.requires_grad_(True) for t in ts]


def _same(got, want, dtype):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=f"result {i}")


def _run(fn, leaves, grads_out):
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ins = torch.autograd.grad(outs, leaves, grads_out, allow_unused=True)
    return [o.detach() for o in outs] + [g for g in ins if g is not None]


def test_permute_and_unpermute(far_rows, device):
    # k = 1: the three far rows are tokens and sorted rows at once (more rows would not fit).
    dt = torch.float16
    (x, y, w, d_out, d_sorted), copies = far_rows([H, H, 1, H, H], dt)
    plan = reference.build_routing(torch.tensor([[1], [0], [1]], device=device), E)
    assert plan.sorted_slots.tolist() == [1, 0, 2]  # row 2 is read as a token and as a sorted row

    def fn(x, y, w):
        return ops.permute(x, plan, 1, backend="triton"), ops.unpermute(y, plan, w, backend="triton")

    got = _run(fn, _leaves([x, y, w]), (d_sorted, d_out))
    want = _run(fn, _leaves(copies[:3]), (copies[4], copies[3]))
    _same(got, want, dt)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_topk_gating(far_rows, scoring):
    k = 2
    (logits, d_weights, d_scores), copies = far_rows([E + 3, k, E + 3], torch.float32)

    def fn(logits):
        out = ops.topk_gating(logits, k, scoring=scoring, backend="triton")
        return out.weights, out.scores

    got = _run(fn, _leaves([logits]), (d_weights, d_scores))
    want = _run(fn, _leaves(copies[:1]), (copies[1], copies[2]))
    _same(got, want, torch.float32)


def _expert_weights(device, dtype):
    g = torch.Generator().manual_seed(7)
    r = 2
    shapes = {"w_gu": (E, 2 * F, H), "w_d": (E, H, F), "a_gu": (E, r, H), "b_gu": (E, 2 * F, r),
              "a_d": (E, r, F), "b_d": (E, H, r)}
    return {n: (torch.randn(s, generator=g) / s[-1] ** 0.5).to(dtype).to(device).requires_grad_(True)
            for n, s in shapes.items()}


@pytest.mark.parametrize("op", ["grouped_mlp", "grouped_mlp_gather", "grouped_mlp_combine"])
def test_grouped_gemm_loads(op, far_rows, device):
    """The GEMM's gathered loads of x (forward, and the dW_gu = dz^T x gather in backward) and of
    d(out) (the fused combine's backward), the sorted loads of x_sorted and dy (grouped_mlp, three
    sorted rows), and the combine weights."""
    dt = torch.float16
    k = 1 if op == "grouped_mlp" else 2
    (x, w, d_out), copies = far_rows([H, k, H], dt)
    ids = torch.tensor([[0, 1], [1, 0], [1, 0]][:ROWS], device=device)[:, :k]
    plan = reference.build_routing(ids, E)
    p = _expert_weights(device, dt)
    names = list(p)

    def fn(x, w, *params):
        q = dict(zip(names, params))
        kw = dict(lora=LoRAWeights(q["a_gu"], q["b_gu"], q["a_d"], q["b_d"]), lora_scale=2.0, backend="triton")
        if op == "grouped_mlp":
            return ops.grouped_mlp(x, plan.tokens_per_expert, q["w_gu"], q["w_d"], plan=plan, **kw)
        if op == "grouped_mlp_gather":
            return ops.grouped_mlp_gather(x, plan, k, q["w_gu"], q["w_d"], **kw)
        return ops.grouped_mlp_combine(x, plan, w, q["w_gu"], q["w_d"], **kw)

    # The sorted-row output of the gather op has T*k rows: its gradient cannot be a far-rows view.
    g_out = d_out if op != "grouped_mlp_gather" else copies[2].repeat_interleave(k, 0)
    g_ref = copies[2] if op != "grouped_mlp_gather" else g_out
    got = _run(fn, _leaves([x, w]) + list(p.values()), (g_out,))
    want = _run(fn, _leaves(copies[:2]) + list(p.values()), (g_ref,))
    _same(got, want, dt)
