"""Row-strided operands (unit column stride, row stride wider than the row: a slice big[:, :W] of a
wider tensor) through every public op, forward and backward, on both backends: the results equal
those of contiguous copies of the same values, and on the Triton path the view itself, not a
copy, is what the kernels receive (the launchers hand over a row stride per operand).

The columns past W in `big` hold NaN, so a kernel that steps rows by the width instead of the
stride reads NaN into the result. The kernel launches are recorded by wrapping each kernel object
of unimoe_kernels.kernels; an operand "reached a kernel" when a launch got a tensor with its data
pointer and strides.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import FP32_CANCELLING

from unimoe_kernels import ops, reference
from unimoe_kernels.kernels import gating as k_gating
from unimoe_kernels.kernels import grouped_mm as k_grouped_mm
from unimoe_kernels.kernels import grouped_xty as k_grouped_xty
from unimoe_kernels.kernels import permute as k_permute
from unimoe_kernels.types import LoRAWeights

T, H, F, E, K, R = 11, 20, 12, 4, 2, 3
# The torch path's GEMMs may block a strided operand differently (another summation order); the
# Triton kernels read the same tiles either way, so there the results are bit for bit the same.
TOL_OF = {"torch": FP32_CANCELLING, "triton": dict(rtol=0, atol=0)}
# Extra columns of the wide tensors: 4 keeps fp32 rows 16-byte aligned (TMA descriptors in the
# GEMMs), 3 does not (pointer loads).
PADS = [3, 4]

pytestmark = pytest.mark.usefixtures("one_thread")

_KERNELS = [
    (k_gating, "topk_gating_fwd_kernel"), (k_gating, "topk_gating_bwd_kernel"),
    (k_permute, "permute_gather_kernel"), (k_permute, "combine_kernel"), (k_permute, "combine_bwd_kernel"),
    (k_grouped_mm, "grouped_mm_kernel"), (k_grouped_xty, "grouped_xty_kernel"),
]


class _Recorder:
    """Stands in for a kernel object: kernel[grid](*args) records the tensor arguments, then launches."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.extend((a.data_ptr(), a.stride()) for a in args if isinstance(a, torch.Tensor))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launched(monkeypatch):
    seen: list = []
    for module, name in _KERNELS:
        monkeypatch.setattr(module, name, _Recorder(getattr(module, name), seen))
    return seen


def _reached(t: torch.Tensor, seen: list) -> bool:
    return (t.data_ptr(), t.stride()) in seen


def _wide(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t's values as a row-strided view [:, :W] of a NaN-padded [rows, W + pad] tensor."""
    big = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype)
    big[:, : t.shape[1]] = t
    view = big[:, : t.shape[1]]
    assert view.stride() == (t.shape[1] + pad, 1) and not view.is_contiguous()
    return view


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _run(fn, inputs: dict, grads_out):
    """fn(**inputs) -> outputs; backward with the given output gradients; (outputs, input grads)."""
    outs = fn(**inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return [o.detach() for o in outs], {n: v.grad for n, v in inputs.items() if v.grad is not None}


def _check(fn, inputs: dict, strided: set, grads_out: list, strided_grads: set, pad: int, backend: str, seen):
    """fn on contiguous inputs and on strided views of the same values (the names in `strided`, and
    the output gradients whose indices are in strided_grads): equal outputs and input gradients,
    and on Triton every strided operand handed to a kernel as it is."""
    want_out, want_grad = _run(fn, {n: _leaf(v) for n, v in inputs.items()}, grads_out)
    views = {n: (_wide(v, pad) if n in strided else v) for n, v in inputs.items()}
    gviews = [_wide(g, pad) if i in strided_grads else g for i, g in enumerate(grads_out)]
    seen.clear()
    got_out, got_grad = _run(fn, {n: _leaf(v) for n, v in views.items()}, gviews)
    for got, want in zip(got_out, want_out):
        torch.testing.assert_close(got, want, **TOL_OF[backend])
    assert got_grad.keys() == want_grad.keys()
    for name in want_grad:
        assert got_grad[name].shape == want_grad[name].shape, name
        torch.testing.assert_close(got_grad[name], want_grad[name], **TOL_OF[backend], msg=f"d {name}")
    if backend == "triton":
        missing = [n for n in strided if not _reached(views[n], seen)]
        missing += [f"d(output {i})" for i in strided_grads if not _reached(gviews[i], seen)]
        assert not missing, f"copied before reaching a kernel: {missing}"


def _plan(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    return reference.build_routing(ids, E)


def _rnd(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", PADS)
def test_topk_gating(backend, pad, launched):
    def fn(logits):
        out = ops.topk_gating(logits, K, backend=backend)
        return out.weights, out.scores

    _check(fn, {"logits": _rnd(T, E + 3, seed=1)}, {"logits"}, [_rnd(T, K, seed=2), _rnd(T, E + 3, seed=3)],
           {0, 1}, pad, backend, launched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", PADS)
def test_permute(backend, pad, launched):
    plan = _plan()
    _check(lambda x: ops.permute(x, plan, K, backend=backend), {"x": _rnd(T, H, seed=1)}, {"x"},
           [_rnd(T * K, H, seed=2)], {0}, pad, backend, launched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", PADS)
def test_unpermute(backend, pad, launched):
    plan = _plan()
    _check(lambda y, w: ops.unpermute(y, plan, w, backend=backend),
           {"y": _rnd(T * K, H, seed=1), "w": torch.rand(T, K)}, {"y", "w"}, [_rnd(T, H, seed=2)], {0}, pad,
           backend, launched)


def _weights(seed: int) -> dict:
    f_in = 2 * F
    return {"w_gu": _rnd(E, f_in, H, seed=seed, scale=H**-0.5), "w_d": _rnd(E, H, F, seed=seed + 1, scale=F**-0.5),
            "a_gu": _rnd(E, R, H, seed=seed + 2, scale=H**-0.5), "b_gu": _rnd(E, f_in, R, seed=seed + 3, scale=R**-0.5),
            "a_d": _rnd(E, R, F, seed=seed + 4, scale=F**-0.5), "b_d": _rnd(E, H, R, seed=seed + 5, scale=R**-0.5)}


# op -> (rows of x, rows of the output): the expert MLP ops take sorted rows or tokens.
EXPERT_OPS = {"grouped_mlp": (T * K, T * K), "grouped_mlp_gather": (T, T * K), "grouped_mlp_combine": (T, T)}


def _expert_op(op: str, plan, backend: str):
    """The op as fn(x, w, w_gu, w_d, a_gu, b_gu, a_d, b_d), LoRA on (scale 1.5); w is used by the combine only."""

    def fn(x, w, w_gu, w_d, a_gu, b_gu, a_d, b_d):
        kw = dict(lora=LoRAWeights(a_gu, b_gu, a_d, b_d), lora_scale=1.5, backend=backend)
        if op == "grouped_mlp":
            return ops.grouped_mlp(x, plan.tokens_per_expert, w_gu, w_d, plan=plan, **kw)
        if op == "grouped_mlp_gather":
            return ops.grouped_mlp_gather(x, plan, K, w_gu, w_d, **kw)
        return ops.grouped_mlp_combine(x, plan, w, w_gu, w_d, **kw)

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", PADS)
@pytest.mark.parametrize("op", EXPERT_OPS)
def test_expert_mlp_ops(op, backend, pad, launched):
    x_rows, out_rows = EXPERT_OPS[op]
    inputs = {"x": _rnd(x_rows, H, seed=1), "w": torch.rand(T, K), **_weights(10)}
    strided = {"x", "w"} if op == "grouped_mlp_combine" else {"x"}
    _check(_expert_op(op, _plan(), backend), inputs, strided, [_rnd(out_rows, H, seed=2)], {0}, pad, backend,
           launched)


@pytest.mark.parametrize("op", [*EXPERT_OPS, "unpermute"])
def test_broadcast_row_gradient(op):
    """d(out) with row stride 0 (the gradient of out.sum(0) @ v): every row the same vector."""
    plan = _plan()
    x_rows = EXPERT_OPS[op][0] if op in EXPERT_OPS else T * K
    v = _rnd(H, seed=3)

    def grads(backend, d_out_of):
        x = _leaf(_rnd(x_rows, H, seed=1))
        w = _leaf(torch.rand(T, K, generator=torch.Generator().manual_seed(4)))
        if op == "unpermute":
            out = ops.unpermute(x, plan, w, backend=backend)
        else:
            out = _expert_op(op, plan, backend)(x, w, **_weights(20))
        out.backward(d_out_of(out))
        return x.grad, w.grad

    expanded = lambda out: v.expand(out.shape)  # noqa: E731
    assert expanded(torch.empty(T, H)).stride() == (0, 1)
    for backend in BACKENDS:
        got = grads(backend, expanded)
        want = grads(backend, lambda out: v.expand(out.shape).contiguous())
        for a, b in zip(got, want):
            if b is not None:
                torch.testing.assert_close(a, b, **TOL_OF[backend])
