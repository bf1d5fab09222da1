"""Triton permute / unpermute (ops.permute, ops.unpermute with backend="triton") against reference.py.

The permute is a copy, so its forward must be bitwise equal to the reference. The combine and the
backwards sum in fp32: fp32 results match to ~1e-5 (tolerance.TOL); fp16 results follow
flash-attention's rule (tolerance.assert_flash_rule: error against an fp64 reference at most 2x the
fp16 torch path's own error plus a small floor).
Gradients come from torch.autograd.grad of a random weighted sum of the outputs. Without CUDA the
kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1).
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch
from tolerance import BF16_LARGE_GPU, FLOOR, FP16_WEIGHT_GRAD, TOL, assert_flash_rule

from unimoe_kernels import SparseMoE, ops, reference

# The interpreter (triton 3.6, numpy 2.3) turns the runtime bound of `range(0, H, BLOCK_H)` into an
# int through a 1-element array, which numpy deprecates; it is the interpreter's, not the kernels'.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

FP32 = TOL[torch.float32]


def _ids(t, e, k, mode="random", generator=None):
    """Expert ids [t, k] (distinct per token, like a top-k), for the routing patterns under test."""
    if t == 0:
        return torch.empty(0, k, dtype=torch.int32)
    if mode == "random":
        return torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32)
    if mode == "one_expert":  # every token's first choice is expert 2, the rest random
        rest = torch.stack([torch.randperm(e - 1)[: k - 1] for _ in range(t)])
        rest = rest + (rest >= 2).to(rest.dtype)  # skip expert 2
        return torch.cat([torch.full((t, 1), 2), rest], 1).to(torch.int32)
    if mode == "two_experts":  # only experts 1 and e-2 get tokens: the others are empty
        pair = torch.tensor([1, e - 2])
        return torch.stack([pair[torch.randperm(2)][:k] for _ in range(t)]).to(torch.int32)
    raise ValueError(mode)


def _plan(t, e, k, mode="random", device="cpu"):
    return reference.build_routing(_ids(t, e, k, mode).to(device), e)


def _run(x, y, w, plan, k, backend):
    """permute x, unpermute y with w, and the grads of a fixed random weighted sum of both outputs."""
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    if backend == "ref64":
        xs = reference.permute(x.double(), plan, k)
        out = reference.unpermute(y.double(), plan, w.double())
    else:
        xs = ops.permute(x, plan, k, backend=backend)
        out = ops.unpermute(y, plan, w, backend=backend)
    g = torch.Generator().manual_seed(1)
    cx = torch.randn(xs.shape, generator=g).to(xs.device)
    co = torch.randn(out.shape, generator=g).to(out.device)
    loss = (xs.double() * cx.double()).sum() + (out.double() * co.double()).sum()
    grads = torch.autograd.grad(loss, (x, y, w))
    return (xs, out) + tuple(grads)


# (T, E, k, H, routing, why)
CASES = [
    (1, 4, 1, 8, "random", "one token, k = 1"),
    (5, 7, 3, 97, "random", "prime E, odd H = 97 (masked tail of a 128 chunk), T < BLOCK_T"),
    (6, 5, 5, 33, "random", "k = E: every expert takes every token"),
    (9, 6, 2, 16, "one_expert", "every token to expert 2"),
    (8, 8, 2, 24, "two_experts", "six experts with no tokens"),
    (13, 13, 4, 600, "random", "prime E, H = 600 > BLOCK_H = 512 (two H chunks), T > BLOCK_T = 4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,e,k,h,mode,why", CASES, ids=[c[-1][:40] for c in CASES])
def test_matches_reference(device, dtype, t, e, k, h, mode, why):
    plan = _plan(t, e, k, mode, device)
    x = torch.randn(t, h, device=device).to(dtype)
    y = torch.randn(t * k, h, device=device).to(dtype)
    w = torch.rand(t, k, device=device)
    got = _run(x, y, w, plan, k, "triton")
    ref = _run(x, y, w, plan, k, "torch")
    names = ("x_sorted", "out", "dx", "dy_sorted", "dweights")
    for name, a, b in zip(names, got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
    # A gather is a copy and d(y_sorted) = w * dout is one rounding of the same fp32 product.
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0)
    if dtype == torch.float32:
        for name, a, b in zip(names, got, ref):
            torch.testing.assert_close(a, b, **FP32, msg=name)
    else:
        ref64 = _run(x, y, w, plan, k, "ref64")
        for i in (1, 2, 4):
            # The fp16 floor (half an fp16 ulp at 2-4) for dweights too, which is fp32 like w.
            assert_flash_rule(got[i], ref[i], ref64[i], floor=FLOOR[dtype], what=names[i])


def test_combine_is_deterministic(device):
    # No atomics: two runs give identical bits, forward and backward.
    plan = _plan(12, 5, 3, device=device)
    x, y, w = torch.randn(12, 40, device=device), torch.randn(36, 40, device=device), torch.rand(12, 3, device=device)
    a = _run(x, y, w, plan, 3, "triton")
    b = _run(x, y, w, plan, 3, "triton")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_permute_backward_sums_the_k_rows(device):
    # Independent of reference.py: d(x)[t] must be the sum of the k gradient rows of token t.
    t, e, k, h = 4, 6, 3, 5
    plan = _plan(t, e, k, device=device)
    x = torch.randn(t, h, device=device, requires_grad=True)
    xs = ops.permute(x, plan, k, backend="triton")
    g = torch.randn_like(xs)
    (dx,) = torch.autograd.grad(xs, x, g)
    tokens = plan.sorted_slots.long() // k
    expect = torch.zeros_like(x).index_add_(0, tokens, g)
    torch.testing.assert_close(dx, expect, **FP32)


def test_empty_batch(device):
    # T = 0: empty outputs and gradients, no launch (a grid of 0 programs is an error on GPU).
    plan = _plan(0, 4, 2, device=device)
    got = _run(torch.empty(0, 8, device=device), torch.empty(0, 8, device=device), torch.empty(0, 2, device=device),
               plan, 2, "triton")
    assert [tuple(g.shape) for g in got] == [(0, 8), (0, 8), (0, 8), (0, 8), (0, 2)]


def test_non_contiguous_inputs(device):
    # x with a column stride of 2, y a transposed view, weights a column slice of a wider tensor.
    t, e, k, h = 7, 5, 2, 33
    plan = _plan(t, e, k, device=device)
    x = torch.randn(t, 2 * h, device=device)[:, ::2]
    y = torch.randn(h, t * k, device=device).t()
    w = torch.rand(t, 2 * k, device=device)[:, 1::2]
    assert not (x.is_contiguous() or y.is_contiguous() or w.is_contiguous())
    got = _run(x, y, w, plan, k, "triton")
    ref = _run(x, y, w, plan, k, "torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **FP32)


def test_expanded_output_gradient(device):
    # out.sum() sends back a stride-0 gradient; the backward must read it correctly.
    t, e, k, h = 6, 4, 2, 10
    plan = _plan(t, e, k, device=device)
    y = torch.randn(t * k, h, device=device, requires_grad=True)
    w = torch.rand(t, k, device=device, requires_grad=True)
    ga = torch.autograd.grad(ops.unpermute(y, plan, w, backend="triton").sum(), (y, w))
    gb = torch.autograd.grad(reference.unpermute(y, plan, w).sum(), (y, w))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("grad_of", ["y", "w"])
def test_partial_gradients(device, grad_of):
    # Only one of y_sorted / weights needs a gradient: the kernel skips the other output.
    t, e, k, h = 5, 4, 2, 12
    plan = _plan(t, e, k, device=device)
    y = torch.randn(t * k, h, device=device, requires_grad=grad_of == "y")
    w = torch.rand(t, k, device=device, requires_grad=grad_of == "w")
    leaf = y if grad_of == "y" else w
    co = torch.randn(t, h, device=device)
    (a,) = torch.autograd.grad((ops.unpermute(y, plan, w, backend="triton") * co).sum(), leaf)
    (b,) = torch.autograd.grad((reference.unpermute(y, plan, w) * co).sum(), leaf)
    torch.testing.assert_close(a, b, **FP32)


def test_fp16_weights_keep_their_dtype(device):
    # transformers hosts may pass top_k_weights in the model dtype: d(weights) comes back in it.
    t, e, k, h = 5, 4, 2, 12
    plan = _plan(t, e, k, device=device)
    y = torch.randn(t * k, h, device=device, dtype=torch.float16)
    w = torch.rand(t, k, device=device, dtype=torch.float16, requires_grad=True)
    out = ops.unpermute(y, plan, w, backend="triton")
    (dw,) = torch.autograd.grad(out.float().sum(), w)
    (dw_ref,) = torch.autograd.grad(reference.unpermute(y, plan, w).float().sum(), w)
    assert out.dtype == torch.float16 and dw.dtype == torch.float16
    torch.testing.assert_close(dw, dw_ref, **FP16_WEIGHT_GRAD)


def test_bad_arguments():
    plan = _plan(4, 4, 2)
    with pytest.raises(ValueError, match="x must be"):
        ops.permute(torch.randn(3, 8), plan, 2, backend="triton")
    with pytest.raises(TypeError, match="x must be"):
        ops.permute(torch.zeros(4, 8, dtype=torch.int64), plan, 2, backend="triton")
    with pytest.raises(TypeError, match="plan"):
        ops.permute(torch.randn(4, 8), "plan", 2, backend="triton")
    with pytest.raises(ValueError, match="weights"):
        ops.unpermute(torch.randn(8, 8), plan, torch.rand(4, 3), backend="triton")
    with pytest.raises(ValueError, match="y_sorted"):
        ops.unpermute(torch.randn(7, 8), plan, torch.rand(4, 2), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.permute(torch.randn(4, 8), plan, 2, backend="cuda")


def _count_launches(monkeypatch):
    """Counts of forward launches of the gating / permute / combine custom ops, keyed by op name.

    The ops' Python bodies call these module-level launchers, so patching them counts real launches.
    """
    counts = {}
    for mod_name, fn_name, op_name in (
        ("gating", "_topk_gating_fwd_impl", "topk_gating_fwd"),
        ("permute", "_permute_impl", "permute_fwd"),
        ("permute", "_combine_impl", "combine_fwd"),
    ):
        mod = importlib.import_module(f"unimoe_kernels.ops.{mod_name}")
        original = getattr(mod, fn_name)

        def counted(*args, _original=original, _name=op_name):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args)

        monkeypatch.setattr(mod, fn_name, counted)
    return counts


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_sparse_moe_end_to_end(scoring, monkeypatch):
    # SparseMoE(backend="triton") runs the gating and combine kernels, and the grouped GEMM that
    # gathers rows on load in place of the permute kernel, on CPU under the interpreter; forward, aux losses and every
    # gradient equal backend="torch". Training mode so the aux loss reaches the router through
    # the gating kernel's d(scores) input.
    kw = dict(top_k=2, scoring=scoring, lora_rank=2, aux_loss_coef=0.1, z_loss_coef=0.01)
    ref = SparseMoE(16, 8, 5, **kw, backend="torch").train()
    with torch.no_grad():
        ref.experts.lora_B_gate_up.normal_(0, 0.3)  # B = 0 would hide a broken LoRA gradient path
        ref.experts.lora_B_down.normal_(0, 0.3)
    tri = SparseMoE(16, 8, 5, **kw, backend="triton").train()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 16)  # 10 tokens, leading dims flattened by the layer
    launches = _count_launches(monkeypatch)
    outs = []
    for moe in (ref, tri):
        xi = x.clone().requires_grad_(True)
        y, aux = moe(xi, return_aux=True)
        params = [p for p in moe.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 16)).sum(), [xi] + params)
        outs.append((y, aux.load_balancing_loss, aux.z_loss, aux.tokens_per_expert) + grads)
    # Once, from the triton layer: the torch layer must not touch the kernels, the layer must not
    # write a permuted copy of x (the grouped GEMM gathers on load), and the weighted combine runs
    # inside the expert MLP's own op (grouped_mlp_combine), not as a separate combine op.
    assert launches == {"topk_gating_fwd": 1}
    assert len(outs[0]) == len(outs[1]) >= 5  # x, router, and the LoRA factors get gradients
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **FP32)


_COMPILE_CHECK = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unimoe_kernels.kernels import gating, permute
target = GPUTarget("cuda", 90, 32)  # H100
def build(fn, args, consts):
    sig = dict(args); sig.update({k: "constexpr" for k in consts})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options={"num_warps": 4})
i32, f32 = "i32", "fp32"
build(gating.topk_gating_fwd_kernel,
      dict(logits_ptr="*fp32", bias_ptr="*fp32", scores_ptr="*fp32", weights_ptr="*fp32", ids_ptr="*i32",
           lse_ptr="*fp32", psum_ptr="*fp32", T=i32, E=i32, stride_l=i32, scaling_factor=f32),
      dict(K=3, SCORING=1, NORMALIZE=True, HAS_BIAS=True, STATS=True, N_GROUPS=4, TOPK_GROUPS=2, GROUP_SIZE=4,
           BLOCK_T=64, BLOCK_E=16, BLOCK_K=4, BLOCK_G=4))
build(gating.topk_gating_bwd_kernel,
      dict(scores_ptr="*fp32", ids_ptr="*i32", dweights_ptr="*fp32", dscores_ptr="*fp32", dlogits_ptr="*fp32",
           T=i32, E=i32, stride_dw=i32, stride_ds=i32, scaling_factor=f32),
      dict(K=3, SCORING=0, NORMALIZE=True, HAS_DW=True, HAS_DS=True, BLOCK_T=64, BLOCK_E=16))
dt = "*bf16"  # bf16 is what the GPU runs and what the interpreter cannot test
build(permute.permute_gather_kernel, dict(x_ptr=dt, sorted_slots_ptr="*i32", out_ptr=dt, N=i32, H=i32, stride_x=i32),
      dict(K=2, BLOCK_R=16, BLOCK_H=128))
build(permute.combine_kernel,
      dict(y_ptr=dt, slot_rows_ptr="*i32", w_ptr="*fp32", out_ptr=dt, T=i32, H=i32, stride_y=i32, stride_w=i32),
      dict(K=2, HAS_WEIGHTS=True, BLOCK_T=16, BLOCK_H=128))
build(permute.combine_bwd_kernel,
      dict(dout_ptr=dt, y_ptr=dt, slot_rows_ptr="*i32", w_ptr="*fp32", dy_ptr=dt, dw_ptr="*fp32",
           T=i32, H=i32, stride_do=i32, stride_y=i32, stride_w=i32),
      dict(K=2, HAS_DY=True, HAS_DW=True, BLOCK_T=16, BLOCK_H=128, BLOCK_K=2))
print("compiled")
"""


def _ptxas_present() -> bool:
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        return spec is not None and os.path.exists(
            os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")
        )
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_present(), reason="triton's bundled ptxas is absent")
def test_kernels_compile_for_h100():
    # The interpreter never compiles: a kernel can pass every test above and still fail to build
    # on the GPU (it did once: a non-constexpr global). Compile each kernel for sm_90 to a cubin,
    # with bf16 pointers, in a process without TRITON_INTERPRET. Needs no GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,h,mode,why", CASES, ids=[c[-1][:40] for c in CASES])
def test_bf16_on_gpu(t, e, k, h, mode, why):
    # bf16 only on a GPU (the interpreter mis-handles bf16 silently); flash-attention rule with
    # the bf16 floor (half a bf16 ulp at magnitude 2-4).
    plan = _plan(t, e, k, mode, "cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    y = torch.randn(t * k, h, device="cuda").to(torch.bfloat16)
    w = torch.rand(t, k, device="cuda")
    got = _run(x, y, w, plan, k, "triton")
    ref = _run(x, y, w, plan, k, "torch")
    ref64 = _run(x, y, w, plan, k, "ref64")
    assert torch.equal(got[0], ref[0])
    names = ("x_sorted", "out", "dx", "dy_sorted", "dweights")
    for i in (1, 2, 3, 4):
        assert_flash_rule(got[i], ref[i], ref64[i], floor=FLOOR[torch.bfloat16], what=names[i])


@pytest.mark.gpu
def test_large_shape_on_gpu():
    # int64 row offsets: N * H = 2^31 + a bit, past what int32 pointer arithmetic can address.
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 20 GiB of GPU memory")
    t, k, h = 2**17 + 64, 2, 2**13
    plan = reference.build_routing(torch.randint(0, 8, (t, k), device="cuda"), 8)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    xs = ops.permute(x, plan, k, backend="triton")
    assert torch.equal(xs[-5:], x[plan.sorted_slots[-5:].long() // k])
    del xs
    y = torch.randn(t * k, h, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(t, k, device="cuda")
    out = ops.unpermute(y, plan, w, backend="triton")
    torch.testing.assert_close(out[-5:], reference.unpermute(y, plan, w)[-5:], **BF16_LARGE_GPU)
