"""Triton grouped LoRA-expert MLP (ops/grouped_gemm.py) against reference.grouped_mlp.

The oracle is reference.grouped_mlp run in fp64 on the same (upcast) inputs. fp32 must match it to
a tight tolerance (tolerance.ORACLE_FP32); fp16 and bf16 follow flash-attention's rule
(tolerance.assert_flash_rule): the kernel's error against the fp64 oracle may be at most twice the
error of torch's own same-dtype reference path, plus a small floor.
Without CUDA the kernels run in the Triton interpreter, so shapes are tiny; bigger shapes, bf16 and
TF32 run only on a GPU (@pytest.mark.gpu).
"""

from __future__ import annotations

import pytest
import torch
from tolerance import (
    FLOOR_GEMM,
    ORACLE_FP32,
    ORACLE_TF32,
    SAME_MATH_FP32,
    TOL,
    TRITON_VS_TORCH_FP32,
    assert_flash_rule,
    assert_max_err,
)

from unimoe_kernels import SparseMoE, reference
from unimoe_kernels.ops import grouped_gemm as gg
from unimoe_kernels.ops.grouped_gemm import grouped_mlp

ACTS = reference.ACTIVATIONS
HAS_CUDA = torch.cuda.is_available()


def make_case(counts, h, f, r, activation, dtype, device, *, lora=True, train_base=False, seed=0):
    """Inputs with unit-scale activations: x ~ N(0, 1), weights ~ N(0, 1/fan_in), LoRA B non-zero
    (a zero B, PEFT's init, would hide every error in the LoRA forward path)."""
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    n = sum(counts)
    f_in = 2 * f if reference.is_glu(activation) else f

    def rnd(*shape, fan_in=1):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / fan_in**0.5).to(device=device, dtype=dtype)

    case = {
        "x": rnd(n, h),
        "counts": torch.tensor(counts, dtype=torch.int32, device=device),
        "w_gu": rnd(e, f_in, h, fan_in=h).requires_grad_(train_base),
        "w_d": rnd(e, h, f, fan_in=f).requires_grad_(train_base),
        "lora": None,
    }
    case["x"].requires_grad_(True)
    if lora:
        case["lora"] = reference.LoRAWeights(
            rnd(e, r, h, fan_in=h).requires_grad_(), rnd(e, f_in, r, fan_in=r).requires_grad_(),
            rnd(e, r, f, fan_in=f).requires_grad_(), rnd(e, h, r, fan_in=r).requires_grad_(),
        )
    return case


def offsets_of(counts):
    """[E+1] int64 expert row offsets of per-expert row counts."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)


def leaves(case):
    ts = [case["x"], case["w_gu"], case["w_d"]] + (list(case["lora"]) if case["lora"] is not None else [])
    return ts


def run(case, activation, scale, *, backend, cast=None, **kw):
    """(y, grads of every leaf requiring grad) of grouped_mlp; `cast` runs it on copies in that dtype."""
    ls = leaves(case)
    if cast is not None:
        ls = [t.detach().to(cast).requires_grad_(t.requires_grad) for t in ls]
    x, w_gu, w_d, *lo = ls
    lora = reference.LoRAWeights(*lo) if lo else None
    fn = reference.grouped_mlp if backend == "reference" else grouped_mlp
    kwargs = dict(lora=lora, lora_scale=scale, **kw)
    if backend != "reference":
        kwargs["backend"] = backend
    y = fn(x, case["counts"], w_gu, w_d, activation, **kwargs)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    need = [t for t in ls if t.requires_grad]
    if y.requires_grad:
        grads = torch.autograd.grad(y, need, dy, allow_unused=True)
    else:  # empty batch on the reference path: nothing depends on the inputs
        grads = [None] * len(need)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(need, grads)]
    return y, grads


def assert_matches(case, activation, scale=2.0, **kw):
    """Triton (case's dtype) vs the fp64 oracle, forward and every gradient."""
    dtype = case["x"].dtype
    y, grads = run(case, activation, scale, backend="triton", **kw)
    y64, grads64 = run(case, activation, scale, backend="reference", cast=torch.float64, **kw)
    need_names = ["dx"] + (["dW_gu", "dW_d"] if case["w_gu"].requires_grad else [])
    need_names += ["dA_gu", "dB_gu", "dA_d", "dB_d"] if case["lora"] is not None else []
    assert len(grads) == len(need_names)
    outs = [("y", y, y64)] + list(zip(need_names, grads, grads64))
    if dtype == torch.float32:
        for name, got, want in outs:
            assert got.dtype == dtype, name
            assert_max_err(got, want, ORACLE_FP32, what=name)
    else:
        # torch's own same-dtype path sets the tolerance (flash-attention's rule).
        y16, grads16 = run(case, activation, scale, backend="reference", cast=dtype, **kw)
        for (name, got, want), same in zip(outs, [y16, *grads16]):
            assert got.dtype == dtype, name
            assert_flash_rule(got, same, want, floor=FLOOR_GEMM, what=name)


# Default shape: E=3 experts, one of them empty, H=40 and F=24 not multiples of the block, r=4.
COUNTS = [7, 0, 13]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lora,train_base", [(True, False), (True, True), (False, True)])
def test_fp32_matches_reference(activation, lora, train_base, device):
    case = make_case(COUNTS, 40, 24, 4, activation, torch.float32, device, lora=lora, train_base=train_base)
    assert_matches(case, activation)


@pytest.mark.parametrize("activation", ACTS)
def test_fp16_lora_frozen_base(activation, device):
    case = make_case(COUNTS, 40, 24, 4, activation, torch.float16, device)
    assert_matches(case, activation)


def test_fp16_trainable_base_with_lora(device):
    case = make_case(COUNTS, 40, 24, 4, "swiglu", torch.float16, device, train_base=True)
    assert_matches(case, "swiglu")


@pytest.mark.parametrize(
    "counts,h,f,r",
    [
        ([70, 0, 0, 0, 0], 16, 16, 8),  # all rows in one expert, more rows than BLOCK_M (2 tiles)
        ([0, 0, 0], 16, 16, 4),  # empty batch N=0: every tile unused, weight grads are zeros
        ([0, 1, 0], 16, 16, 4),  # a single row (N=1)
        ([3, 1, 0, 5, 2, 0, 4], 97, 24, 8),  # prime E=7, odd H=97: a masked K tail in every block size
        ([65, 1], 20, 136, 3),  # F=136 > BLOCK_N (two column tiles), odd rank, tile ending 1 row past BLOCK_M
    ],
)
def test_edge_shapes(counts, h, f, r, device):
    case = make_case(counts, h, f, r, "swiglu", torch.float32, device, train_base=True)
    assert_matches(case, "swiglu")


@pytest.fixture
def mm_config(monkeypatch):
    """set(**overrides): the grouped_mm config every launch of this test uses (tile sizes, swizzle, grid)."""
    from unimoe_kernels.ops import gemm_configs

    def set_(**overrides):
        base = gemm_configs.config("up", torch.float32, 1, 1, 1, 1, torch.device("cpu"))
        real = gemm_configs.config

        def patched(role, *args, **kwargs):
            cfg = real(role, *args, **kwargs)
            return cfg if role in gemm_configs.ROLES_XTY else dict(base, **overrides)

        monkeypatch.setattr(gemm_configs, "config", patched)

    return set_


@pytest.mark.parametrize("block_m,group_m", [(16, 1), (16, 4), (32, 8), (128, 8)])
def test_tile_heights_and_swizzle(block_m, group_m, device, mm_config):
    # Tiles are located in the kernel from the expert offsets, so any tile height works; with 16
    # rows the experts span 5, 1 and 5 tiles, with 128 one tile each. Groups of 4 leave a partial
    # last group, groups of 1 are plain column-major order; two column tiles (F=136 > BLOCK_N=128).
    mm_config(BLOCK_M=block_m, GROUP_M=group_m)
    case = make_case([65, 1, 70], 20, 136, 3, "swiglu", torch.float32, device, train_base=True)
    assert_matches(case, "swiglu")


@pytest.mark.parametrize("programs", [1, 3])
def test_persistent_programs_walk_every_tile(programs, device, mm_config, monkeypatch):
    # A grid smaller than the tile count: each program walks tiles `programs` apart (one program
    # does them all). The CPU has no SM count, so the grid is capped through the launcher's.
    from unimoe_kernels.ops import grouped_gemm_launch as launch

    mm_config(BLOCK_M=16, BLOCK_N=16, PERSISTENT=True)
    monkeypatch.setattr(launch, "_persistent_programs", lambda device: programs)
    case = make_case([20, 0, 33], 24, 40, 4, "swiglu", torch.float32, device, train_base=True)
    assert_matches(case, "swiglu")


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("activation,r,dtype,lora,train_base", [
    ("swiglu", 8, torch.float32, True, True),  # every gradient, LoRA on a trainable base
    ("swiglu", 16, torch.float16, True, False),  # frozen base: LoRA gradients only
    ("gelu", 8, torch.float32, False, True),  # no LoRA, no GLU
])
@pytest.mark.parametrize("xty_block", [16, 32], ids=["even", "ragged"])
def test_operand_paths(tma, activation, r, dtype, lora, train_base, xty_block, device, monkeypatch):
    """Each grouped GEMM with its operand tiles through TMA descriptors or through pointer loads,
    with several K steps and several row and column tiles per expert: the GLU forward's packed
    gate|up weight tile (3 column tiles of 16 outputs for F=40, the last one ragged), the LoRA A
    tile (rank 8 zero-filled to a 16-wide block, or exactly 16), and the weight-gradient loop's
    full steps and ragged tail (experts of 40 = 2 x 16 + 8, 32 = 2 x 16 and 17 rows, one empty)."""
    from unimoe_kernels.ops import gemm_configs

    real = gemm_configs.config

    def patched(role, *args, **kwargs):
        cfg = dict(real(role, *args, **kwargs), TMA=tma, BLOCK_K=16)
        if role not in gemm_configs.ROLES_XTY:
            cfg.update(BLOCK_M=16, BLOCK_N=32)
        elif role == "wgrad":
            # 16 divides 2F=80 and H=48; 32 divides neither: masked columns in the pipelined loop.
            cfg.update(BLOCK_P=xty_block, BLOCK_Q=xty_block)
        return cfg

    monkeypatch.setattr(gemm_configs, "config", patched)
    case = make_case([40, 0, 17, 32], 48, 40, r, activation, dtype, device, lora=lora, train_base=train_base)
    assert_matches(case, activation)


# Every activation kind beyond the classic five, with constants small enough that the clamps and
# caps bite on unit-scale pre-activations (both sides of each limit are exercised).
KINDS = ["geglu_tanh", "gelu_tanh", "relu2", "swiglu_clamp(alpha=1.702,beta=1.0,limit=0.5)",
         "swiglu_clamp(alpha=1.0,beta=0.0,limit=0.8)", "geglu_clamp(beta=0.0,limit=0.6)",
         "swiglu_softcap(gate_cap=0.7,up_cap=1.3)"]


@pytest.mark.parametrize("activation", KINDS)
@pytest.mark.parametrize("lora,train_base", [(True, True), (False, True)])
def test_activation_kinds(activation, lora, train_base, device):
    """The epilogues of every kind, forward (act and up_fn) and backward (their derivatives, zero
    outside a clamp), against the torch path's activations in fp64."""
    case = make_case(COUNTS, 40, 24, 4, activation, torch.float32, device, lora=lora, train_base=train_base)
    assert_matches(case, activation)


@pytest.mark.parametrize("activation", ["swiglu_clamp(alpha=1.702,beta=1.0,limit=0.5)",
                                        "swiglu_softcap(gate_cap=0.7,up_cap=1.3)"])
def test_activation_kinds_fp16(activation, device):
    case = make_case(COUNTS, 40, 24, 4, activation, torch.float16, device)
    assert_matches(case, activation)


def test_rank_one_lora_and_scale_zero(device):
    # rank 1 (BLOCK_R pads to 16) and lora_scale 0: the LoRA term must vanish, but B's gradient too.
    case = make_case([4, 5], 16, 16, 1, "silu", torch.float32, device)
    assert_matches(case, "silu", scale=0.0)


def test_plan_and_int64_counts_give_the_same_result(device):
    """The plan's expert offsets, offsets built from int64 counts and the default path agree exactly."""
    ids = torch.tensor([[0, 2], [2, 1], [0, 2], [4, 0], [2, 4], [0, 2]], device=device)
    plan = reference.build_routing(ids, 5)
    n = ids.numel()
    case = make_case(plan.tokens_per_expert.tolist(), 24, 16, 4, "swiglu", torch.float32, device)
    x, w_gu, w_d, lora = case["x"].detach(), case["w_gu"].detach(), case["w_d"].detach(), case["lora"]
    y0 = grouped_mlp(x, plan.tokens_per_expert, w_gu, w_d, lora=lora, backend="triton")
    y1 = grouped_mlp(x, plan.tokens_per_expert.long(), w_gu, w_d, lora=lora, backend="triton", plan=plan)
    y2 = grouped_mlp(x, plan.tokens_per_expert.long(), w_gu, w_d, lora=lora, backend="triton")
    assert y0.shape == (n, 24)
    y_ref = reference.grouped_mlp(x, plan.tokens_per_expert, w_gu, w_d, lora=lora)
    torch.testing.assert_close(y0, y_ref, **TOL[torch.float32])  # and the common result is right
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(y2, y0, rtol=0, atol=0)


def test_non_contiguous_inputs(device):
    # x_sorted as a column slice and weights as transposed views: the kernels read through strides.
    case = make_case([5, 6], 16, 16, 4, "gelu", torch.float32, device, train_base=True)
    x = case["x"].detach()
    wide = torch.zeros(x.shape[0], 40, device=device)
    wide[:, 3:19] = x
    x_nc = wide[:, 3:19].requires_grad_()
    w_d_t = case["w_d"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not x_nc.is_contiguous() and not w_d_t.is_contiguous()
    y = grouped_mlp(x_nc, case["counts"], case["w_gu"], w_d_t, "gelu", lora=case["lora"], backend="triton")
    y_ref = reference.grouped_mlp(x, case["counts"], case["w_gu"], case["w_d"], "gelu", lora=case["lora"])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    y.sum().backward()
    dx, dwd = x_nc.grad, w_d_t.grad
    xr = x.clone().requires_grad_()
    wdr = case["w_d"].detach().clone().requires_grad_()
    reference.grouped_mlp(xr, case["counts"], case["w_gu"], wdr, "gelu", lora=case["lora"]).sum().backward()
    torch.testing.assert_close(dx, xr.grad, **TOL[torch.float32])
    torch.testing.assert_close(dwd, wdr.grad, **TOL[torch.float32])


def test_frozen_base_gets_no_gradient_and_lora_does(device):
    case = make_case([6, 3], 16, 16, 4, "swiglu", torch.float32, device)
    y = grouped_mlp(case["x"], case["counts"], case["w_gu"], case["w_d"], lora=case["lora"], backend="triton")
    y.square().sum().backward()
    assert case["w_gu"].grad is None and case["w_d"].grad is None
    for t in case["lora"]:
        assert t.grad is not None and t.grad.abs().sum() > 0


def masked_reference(x, counts, w_gu, w_d, activation, lora, scale, m_x, m_h):
    """Independent oracle of LoRA dropout with explicit masks: m_x [N, H] scales the LoRA input x,
    m_h [N, F] the LoRA input h (PEFT: the base path sees the undropped input)."""
    outs, start = [], 0
    for e, rows in enumerate(counts.tolist()):
        sl = slice(start, start + rows)
        start += rows
        xe = x[sl]
        z = xe @ w_gu[e].T + scale * ((xe * m_x[sl]) @ lora.a_gate_up[e].T) @ lora.b_gate_up[e].T
        h = reference.apply_activation(z, activation)
        outs.append(h @ w_d[e].T + scale * ((h * m_h[sl]) @ lora.a_down[e].T) @ lora.b_down[e].T)
    return torch.cat(outs)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_lora_dropout_matches_masked_reference(activation, device):
    """Fused dropout, forward and every gradient, against the oracle fed the kernels' own masks."""
    p, scale, f = 0.3, 2.0, 24
    case = make_case(COUNTS, 40, f, 4, activation, torch.float32, device, train_base=True)
    n, h = case["x"].shape
    seeds = torch.tensor([1234, 987654321], dtype=torch.int64, device=device)
    m_x = gg.dropout_mask(seeds[0:1], n, h, p)
    m_h = gg.dropout_mask(seeds[1:2], n, f, p)
    for m in (m_x, m_h):  # a real dropout mask: only 0 and 1/(1-p), about a fraction p dropped
        assert m.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
        assert abs((m == 0).double().mean().item() - p) < 0.1  # 480+ draws: 4 standard deviations
    assert not torch.equal(m_x[:, :f], m_h)  # the two LoRA inputs get independent masks

    ls = leaves(case)
    y = gg.grouped_mlp_fwd(ls[0], offsets_of(case["counts"]), *ls[1:], activation, scale, seeds, p)[0]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ls, dy)
    ls64 = [t.detach().double().requires_grad_() for t in ls]
    y64 = masked_reference(ls64[0], case["counts"], ls64[1], ls64[2], activation,
                           reference.LoRAWeights(*ls64[3:]), scale, m_x.double(), m_h.double())
    grads64 = torch.autograd.grad(y64, ls64, dy.double())
    names = ["y", "dx", "dW_gu", "dW_d", "dA_gu", "dB_gu", "dA_d", "dB_d"]
    for name, got, want in zip(names, [y, *grads], [y64, *grads64]):
        assert_max_err(got, want, ORACLE_FP32, what=name)


def test_lora_dropout_public_path(device):
    case = make_case([6, 3], 16, 16, 4, "swiglu", torch.float32, device)
    args = (case["x"], case["counts"], case["w_gu"], case["w_d"])
    kw = dict(lora=case["lora"], lora_dropout=0.5, backend="triton")
    torch.manual_seed(5)
    y1 = grouped_mlp(*args, training=True, **kw)
    torch.manual_seed(5)
    y2 = grouped_mlp(*args, training=True, **kw)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # seeds come from torch's generator
    y_eval = grouped_mlp(*args, training=False, **kw)  # dropout is the identity outside training
    torch.testing.assert_close(y_eval, reference.grouped_mlp(*args, lora=case["lora"]), **TOL[torch.float32])
    assert (y1 - y_eval).abs().max() > 1e-3  # and inside training it does act
    with pytest.raises(ValueError, match="lora_dropout"):
        grouped_mlp(*args, training=True, **dict(kw, lora_dropout=1.0))


@pytest.mark.parametrize("activation,dropout", [("swiglu", 0.0), ("relu", 0.0), ("geglu", 0.2)])
def test_recompute_gives_identical_results(activation, dropout, device):
    """recompute=True reruns GEMM 1 in backward with the same kernel: bit-identical outputs and grads."""
    results = []
    for recompute in (False, True):
        case = make_case([5, 0, 9], 24, 16, 4, activation, torch.float32, device, train_base=True)
        torch.manual_seed(3)  # the same dropout seeds for both runs
        y = grouped_mlp(case["x"], case["counts"], case["w_gu"], case["w_d"], activation, lora=case["lora"],
                        lora_dropout=dropout, training=True, backend="triton", recompute=recompute)
        results.append([y, *torch.autograd.grad(y, leaves(case), torch.ones_like(y))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "ids",
    [
        [[0, 2], [2, 1], [0, 2], [4, 0], [2, 4], [0, 2], [1, 0]],  # T=7, k=2, expert 3 empty
        [[3]] * 70,  # k=1, every token to one expert: two tiles of one expert
        [[0, 1, 2]],  # one token, k=3
    ],
)
def test_gather_on_load_matches_permute_then_reference(ids, device):
    """grouped_mlp_gather (rows of x read through the plan inside the kernels) against the fp64
    reference of permute + grouped_mlp, forward and every gradient (dx summed back per token)."""
    ids = torch.tensor(ids, device=device)
    t, k = ids.shape
    e = 5
    plan = reference.build_routing(ids, e, block_m=64)
    case = make_case([0] * e, 40, 24, 4, "swiglu", torch.float32, device, train_base=True)
    x = torch.randn(t, 40, device=device, requires_grad=True)
    ls = [x] + leaves(case)[1:]

    def run_(fn, tensors):
        xx, w_gu, w_d, *lo = tensors
        y = fn(xx, w_gu, w_d, reference.LoRAWeights(*lo))
        dy = torch.linspace(-1, 1, y.numel(), device=device, dtype=y.dtype).view_as(y)
        return [y, *torch.autograd.grad(y, tensors, dy)]

    got = run_(lambda xx, w_gu, w_d, lo: gg.grouped_mlp_gather(
        xx, plan, k, w_gu, w_d, lora=lo, lora_scale=2.0, backend="triton"), ls)
    ls64 = [t_.detach().double().requires_grad_() for t_ in ls]
    want = run_(lambda xx, w_gu, w_d, lo: reference.grouped_mlp(
        reference.permute(xx, plan, k), plan.tokens_per_expert, w_gu, w_d, lora=lo, lora_scale=2.0), ls64)
    for name, g, w in zip(["y", "dx", "dW_gu", "dW_d", "dA_gu", "dB_gu", "dA_d", "dB_d"], got, want):
        assert_max_err(g, w, ORACLE_FP32, what=name)


def test_gather_with_dropout_equals_permuted_path(device):
    """Dropout masks follow the sorted row, so gathering on load changes nothing but the memory."""
    ids = torch.tensor([[0, 2], [2, 1], [0, 2], [1, 0], [2, 1]], device=device)
    plan = reference.build_routing(ids, 3, block_m=64)
    case = make_case([0, 0, 0], 24, 16, 4, "geglu", torch.float32, device, train_base=True)
    x = torch.randn(5, 24, device=device)
    outs = []
    for gather in (True, False):
        xx = x.clone().requires_grad_()
        torch.manual_seed(11)
        kw = dict(lora=case["lora"], lora_dropout=0.3, training=True, backend="triton")
        if gather:
            y = gg.grouped_mlp_gather(xx, plan, 2, case["w_gu"], case["w_d"], "geglu", **kw)
        else:
            y = grouped_mlp(reference.permute(xx, plan, 2), plan.tokens_per_expert, case["w_gu"], case["w_d"],
                            "geglu", plan=plan, **kw)
        outs.append([y, *torch.autograd.grad(y, [xx] + leaves(case)[1:], torch.ones_like(y))])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **SAME_MATH_FP32)


def test_bad_input_raises(device):
    case = make_case([2, 2], 16, 16, 4, "swiglu", torch.float32, device)
    x, c, w_gu, w_d, lora = case["x"], case["counts"], case["w_gu"], case["w_d"], case["lora"]
    with pytest.raises(ValueError, match="x_sorted"):
        grouped_mlp(x[:, :8], c, w_gu, w_d, backend="triton")
    with pytest.raises(ValueError, match="down_proj"):
        grouped_mlp(x, c, w_gu, w_d[:, :, :8], backend="triton")
    with pytest.raises(ValueError, match="tokens_per_expert"):
        grouped_mlp(x, c[:1], w_gu, w_d, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        grouped_mlp(x, c, w_gu, w_d, "tanh", backend="triton")
    with pytest.raises(ValueError, match="lora.b_down"):
        grouped_mlp(x, c, w_gu, w_d, lora=lora._replace(b_down=lora.b_down[:, :8]), backend="triton")
    with pytest.raises(TypeError, match="down_proj"):
        grouped_mlp(x, c, w_gu, w_d.half(), backend="triton")


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_custom_op_opcheck(dropout, device):
    case = make_case([3, 0, 2], 16, 16, 4, "swiglu", torch.float32, device, train_base=True)
    seeds = torch.tensor([7, 8], device=device) if dropout else None
    args = (case["x"], offsets_of(case["counts"]), case["w_gu"], case["w_d"], *case["lora"], "swiglu", 2.0,
            seeds, dropout, dropout == 0.0)  # also covers save_preact=False (recompute in backward)
    # Schema, fake (meta) implementation and autograd registration; the fake-vs-real comparison
    # is what torch.compile relies on.
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(gg.grouped_mlp_fwd, args, test_utils=tests)


def test_torch_compile_fullgraph(device):
    """torch.compile traces the op without graph breaks, forward and backward (aot_eager: no C++
    compiler needed on CPU; the kernels themselves stay opaque custom ops)."""
    case = make_case([4, 0, 3], 16, 16, 4, "swiglu", torch.float32, device)

    def fn(x, counts, w_gu, w_d, *lo):
        return grouped_mlp(x, counts, w_gu, w_d, lora=reference.LoRAWeights(*lo), lora_scale=2.0, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (case["x"], case["counts"], case["w_gu"], case["w_d"], *case["lora"])
    y = compiled(*args)
    grads = torch.autograd.grad(y.square().sum(), [case["x"], *case["lora"]])
    y_ref = fn(*args)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [case["x"], *case["lora"]])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=0, atol=0)


def test_torch_compile_fullgraph_gather(device):
    ids = torch.tensor([[0, 2], [2, 1], [0, 2]], device=device)
    plan = reference.build_routing(ids, 3, block_m=64)
    case = make_case([0, 0, 0], 16, 16, 4, "silu", torch.float32, device)
    x = torch.randn(3, 16, device=device, requires_grad=True)

    def fn(x, plan, w_gu, w_d, *lo):
        return gg.grouped_mlp_gather(x, plan, 2, w_gu, w_d, "silu", lora=reference.LoRAWeights(*lo), backend="triton")

    args = (x, plan, case["w_gu"], case["w_d"], *case["lora"])
    y = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    y_ref = fn(*args)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    g = torch.autograd.grad(y.square().sum(), [x, *case["lora"]])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *case["lora"]])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sparse_moe_triton_equals_torch(lora_rank, device):
    """The whole layer, forward and backward, whichever path the router and permute kernels take."""
    torch.manual_seed(0)
    kw = dict(hidden_size=24, ffn_hidden_size=16, num_experts=5, top_k=2, lora_rank=lora_rank, lora_alpha=8,
              device=device, dtype=torch.float32)
    moe_t = SparseMoE(**kw, backend="triton")
    moe_r = SparseMoE(**kw, backend="torch")
    if lora_rank:
        with torch.no_grad():  # a non-zero B so the LoRA path is exercised
            moe_t.experts.lora_B_gate_up.normal_(0, 0.3)
            moe_t.experts.lora_B_down.normal_(0, 0.3)
    moe_r.load_state_dict(moe_t.state_dict())
    x = torch.randn(3, 5, 24, device=device)
    x_t, x_r = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_t, y_r = moe_t(x_t), moe_r(x_r)
    torch.testing.assert_close(y_t, y_r, **TRITON_VS_TORCH_FP32)
    dy = torch.randn_like(y_t)
    y_t.backward(dy)
    y_r.backward(dy)
    torch.testing.assert_close(x_t.grad, x_r.grad, **TRITON_VS_TORCH_FP32)
    for (name, p_t), p_r in zip(moe_t.named_parameters(), moe_r.parameters()):
        assert (p_t.grad is None) == (p_r.grad is None), name
        if p_t.grad is not None:
            torch.testing.assert_close(p_t.grad, p_r.grad, **TRITON_VS_TORCH_FP32, msg=name)


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter does not support it), TF32, realistic tile counts, autotuning.
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision(activation, dtype):
    # Uneven experts incl. an empty one; H and F not multiples of 64 or 128.
    case = make_case([300, 0, 37, 129, 1000, 64, 1, 200], 4 * 97, 200, 8, activation, dtype, "cuda", train_base=True)
    assert_matches(case, activation)


@pytest.mark.gpu
def test_gpu_fp32_tf32():
    case = make_case([300, 0, 37, 129, 500], 256, 192, 8, "swiglu", torch.float32, "cuda", train_base=True)
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert_matches(case, "swiglu")  # ieee dot: fp32 accuracy
        matmul.fp32_precision = "tf32"
        y, _ = run(case, "swiglu", 2.0, backend="triton")
        y64, _ = run(case, "swiglu", 2.0, backend="reference", cast=torch.float64)
        assert_max_err(y, y64, ORACLE_TF32, what="y (TF32)")
    finally:
        matmul.fp32_precision = old


def test_fp32_dot_precision_follows_torch():
    """Every way torch allows or forbids TF32, legacy and new API, in the order a program may use
    them (after the new API, torch refuses to read the legacy allow_tf32). In a subprocess: the
    settings are process-wide."""
    import subprocess
    import sys

    script = """
import torch
from unimoe_kernels.ops.grouped_gemm_launch import dot_precision
m = torch.backends.cuda.matmul
steps = [
    ("default", lambda: None, "ieee"),
    ("allow_tf32=True", lambda: setattr(m, "allow_tf32", True), "tf32"),
    ("allow_tf32=False", lambda: setattr(m, "allow_tf32", False), "ieee"),
    ("precision high", lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    ("precision highest", lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    ("matmul tf32", lambda: setattr(m, "fp32_precision", "tf32"), "tf32"),
    ("matmul ieee", lambda: setattr(m, "fp32_precision", "ieee"), "ieee"),
    ("global tf32, matmul inherits", lambda: (setattr(torch.backends, "fp32_precision", "tf32"),
                                              setattr(m, "fp32_precision", "none")), "tf32"),
]
for name, apply, want in steps:
    apply()
    got = dot_precision(torch.float32)
    assert got == want, (name, got, want)
    assert dot_precision(torch.bfloat16) == "tf32"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


@pytest.mark.gpu
def test_gpu_all_rows_one_expert_many_tiles():
    case = make_case([0, 5000, 0], 512, 256, 16, "swiglu", torch.bfloat16, "cuda")
    assert_matches(case, "swiglu")
