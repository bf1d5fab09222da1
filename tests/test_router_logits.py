"""ops.router_logits: fp32 router logits from x and the router weight, reading 16-bit operands in
their own dtype on CUDA (no fp32 copy of x), equal to the upcast product in value and gradient."""

from __future__ import annotations

import pytest
import torch
from tolerance import FLOOR_ROUTER_LOGITS, FP32_CANCELLING, assert_flash_rule

from unimoe_kernels import SparseMoE
from unimoe_kernels.ops import gating
from unimoe_kernels.ops.gating import router_logits


def _upcast(x, w):
    return x.double() @ w.double().t()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_matches_upcast_product(dtype):
    torch.manual_seed(0)
    x = torch.randn(33, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 40, dtype=dtype, requires_grad=True)
    out = router_logits(x, w)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out.double(), _upcast(x, w), **FP32_CANCELLING)
    out.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


def test_sixteen_bit_path_skips_the_fp32_copy_on_meta():
    """On CUDA-like devices (meta stands in for shapes) 16-bit x and weight go through one fp32-out
    GEMM: the graph has the custom Function, not a .to(float32) of x."""
    x = torch.empty(4096, 2048, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.empty(128, 2048, dtype=torch.bfloat16, device="meta", requires_grad=True)
    out = router_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (4096, 128)
    assert type(out.grad_fn).__name__ == "_RouterLogits16Backward"
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # Mixed dtypes (fp32 master weights under autocast) keep the upcast path.
    mixed = router_logits(x.detach(), w.detach().float())
    assert mixed.dtype == torch.float32 and mixed.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_function_value_and_gradients(monkeypatch, dtype):
    """The Function's forward and hand-written backward against autograd of the upcast product, on
    CPU with its fp32-out GEMM stood in by the upcast product (the CUDA overload computes that)."""
    monkeypatch.setattr(gating, "_mm_fp32_out", lambda a, b: a.float() @ b.float())
    torch.manual_seed(1)
    x = torch.randn(50, 64, dtype=dtype)
    w = torch.randn(9, 64, dtype=dtype)
    g = torch.randn(50, 9)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = gating._RouterLogits16.apply(xa, wa)
    out.backward(g)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = xb.float() @ wb.float().t()
    ref.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(wa.grad, wb.grad)
    # Only what needs a gradient is computed.
    xc = x.clone().requires_grad_()
    gating._RouterLogits16.apply(xc, w).backward(g)
    assert xc.grad is not None and w.grad is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sixteen_bit_router_equals_upcast(dtype):
    torch.manual_seed(2)
    x = torch.randn(512, 256, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(64, 256, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(512, 64, device="cuda")
    out = router_logits(x, w)
    assert type(out.grad_fn).__name__ == "_RouterLogits16Backward"
    out.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = xr.float() @ wr.float().t()
    ref.backward(g)
    exact = _upcast(x.detach(), w.detach())
    # Both are fp32 sums of exact products; only the summation order differs.
    assert_flash_rule(out, ref, exact, floor=FLOOR_ROUTER_LOGITS, what="logits")
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_sparse_moe_router_uses_router_logits(monkeypatch):
    calls = []
    real = gating.router_logits

    def spy(x, w):
        calls.append((x.dtype, w.dtype))
        return real(x, w)

    import unimoe_kernels.modules as modules
    monkeypatch.setattr(modules, "router_logits", spy)
    moe = SparseMoE(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2)
    moe(torch.randn(5, 16))
    assert calls == [(torch.float32, torch.float32)]
