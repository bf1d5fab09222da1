"""Bad input gives an error that names it, or the result the torch path gives: never an id outside
[0, E), a corrupted heap or a silently wrong number.

Covered here: NaN / inf router logits through the gating kernel and the whole routed MLP, ids
outside [0, E) and 2^31 routing slots in build_routing, expert counts that do not sum to the row
count in grouped_mlp, bf16 on the Triton path in the interpreter, and NaN / inf layer coefficients.
Shapes are tiny: the kernels run in the interpreter on 2 shared cores.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import TOL

from unimoe_kernels import SparseMoE, TopKRouter, _ext, ops, reference
from unimoe_kernels.ops import grouped_gemm as grouped_gemm_ops
from unimoe_kernels.ops import routing as routing_ops

NAN, INF = float("nan"), float("inf")
# NaN and inf are the inputs here: numpy (under Triton's interpreter) and torch warn about them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]
FP32 = TOL[torch.float32]


# ----------------------------------------------------------------------------------------------
# NaN / inf router logits
# ----------------------------------------------------------------------------------------------


def _poisoned_logits(t: int, e: int, device) -> torch.Tensor:
    """Logits with a NaN, a +inf, a -inf, a row of NaN, a row of -inf and finite rows around them."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(t, e, generator=g)
    logits[1, 2] = NAN
    logits[2, e - 1] = INF
    logits[3, 0] = -INF
    logits[4] = NAN
    logits[5] = -INF
    logits[6, 1] = INF
    logits[6, 3] = INF
    return logits.to(device)


GATING_CASES = [
    dict(),
    dict(scoring="sigmoid"),
    dict(scoring="sigmoid", normalize=False, scaling_factor=2.0),
    dict(scoring="sigmoid", n_groups=4, topk_groups=2, bias=True),
    dict(n_groups=8, topk_groups=3),
    dict(bias="nan"),
]


@pytest.mark.parametrize("opts", GATING_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "softmax")
def test_gating_kernel_keeps_nan_in_its_token_like_the_torch_path(device, opts):
    # The kernel used to pick expert BLOCK_E with weight 0 for a NaN row (v == max is never true
    # there): an id outside [0, E) that the plan kernels turned into a segfault or a zeroed token.
    t, e, k = 9, 8, 3
    opts = dict(opts)
    bias = opts.pop("bias", None)
    if bias is not None:
        b = 0.3 * torch.randn(e)
        if bias == "nan":
            b[5] = NAN  # a NaN bias ranks expert 5 first in every row, on both paths
        opts["expert_bias"] = b.to(device)
    logits = _poisoned_logits(t, e, device)
    got = ops.topk_gating(logits, k, backend="triton", **opts)
    want = reference.topk_gating(logits, k, **opts)
    assert ((got.ids >= 0) & (got.ids < e)).all(), got.ids
    assert torch.equal(got.ids, want.ids), f"\n{got.ids}\n{want.ids}"
    torch.testing.assert_close(got.weights, want.weights, equal_nan=True, **FP32)
    torch.testing.assert_close(got.scores, want.scores, equal_nan=True, **FP32)
    # The poisoned softmax rows carry NaN weights: the NaN reaches the loss.
    if opts.get("scoring", "softmax") == "softmax":
        assert got.weights[[1, 2, 4, 5, 6]].isnan().all()
    assert got.weights[[0, 7, 8]].isfinite().all() or bias == "nan"


def test_nan_logits_reach_the_output_of_that_token_only(device):
    # gating -> plan -> grouped MLP -> combine on the Triton path: the poisoned tokens come out NaN
    # (as on the torch path), every other token equals the torch path's.
    t, e, k, h, f = 9, 8, 2, 16, 8
    torch.manual_seed(0)
    logits = _poisoned_logits(t, e, device)
    x = torch.randn(t, h, device=device)
    w_gu = torch.randn(e, 2 * f, h, device=device) / 4
    w_d = torch.randn(e, h, f, device=device) / 4
    outs = []
    for backend in ("triton", "torch"):
        g = ops.topk_gating(logits, k, backend=backend)
        plan = ops.build_routing(g.ids, e, backend="triton" if backend == "triton" else "torch")
        outs.append(ops.grouped_mlp_combine(x, plan, g.weights, w_gu, w_d, backend=backend))
    got, want = outs
    bad = torch.tensor([1, 2, 4, 5, 6])
    assert got[bad].isnan().all(dim=1).all() and want[bad].isnan().all(dim=1).all()
    good = torch.tensor([0, 3, 7, 8])
    torch.testing.assert_close(got[good], want[good], **FP32)


# ----------------------------------------------------------------------------------------------
# Routing plans: ids outside [0, E), 2^31 slots
# ----------------------------------------------------------------------------------------------

PLAN_BACKENDS = ["auto", "torch", "triton"] + (["c"] if _ext.has_c() else [])


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
@pytest.mark.parametrize("bad", [4, -1, 2**32 + 1], ids=["E", "-1", "wraps_to_1_in_int32"])
def test_build_routing_refuses_ids_outside_the_experts_on_cpu(backend, bad):
    # The torch backend used to fail with torch's generic index error, the Triton one to scatter
    # out of bounds, and an int64 id that wraps into range in int32 was taken as expert 1.
    ids = torch.tensor([[0, 1], [2, 3], [1, bad]], dtype=torch.int64)
    with pytest.raises(ValueError, match=rf"ids must lie in \[0, num_experts=4\), found {bad} at flat slot 5"):
        ops.build_routing(ids, 4, backend=backend)


def test_build_routing_without_a_host_read_still_refuses_bad_ids(monkeypatch):
    # Where ids cannot be read for free (CUDA, tracing) the plan is built first and its offsets,
    # which skip a bad id, are checked on the device (torch._assert_async); here the CPU stands in
    # for that path.
    monkeypatch.setattr(routing_ops, "values_readable", lambda t: False)
    ids = torch.tensor([[0, 1], [2, 3], [1, 4]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"build_routing: ids must lie in \[0, num_experts=4\)"):
        ops.build_routing(ids, 4, backend="triton")


def test_triton_plan_kernels_skip_ids_outside_the_experts():
    # Memory safety without any check: the plan kernels bin a bad id with the padding, so they
    # neither read nor write out of bounds, and the valid slots are planned as without it.
    ids = torch.tensor([[0, -1], [2, 3], [1, 4], [3, 0]], dtype=torch.int32)
    counts, offsets, sorted_slots, slot_rows, _, _ = routing_ops.routing_plan_triton(ids, 4, 16)
    assert counts.tolist() == [2, 1, 1, 2] and offsets.tolist() == [0, 2, 3, 4, 6]
    assert sorted_slots[:6].tolist() == [0, 7, 4, 2, 3, 6]
    assert slot_rows[[0, 2, 3, 4, 6, 7]].tolist() == [0, 3, 4, 2, 5, 1]


@pytest.mark.parametrize("backend", PLAN_BACKENDS)
def test_build_routing_refuses_2_to_the_31_slots(backend):
    # The plan is int32: 2^31 slots used to come back as a wrapped plan. Meta ids hold no data, so
    # the check must come from the shape, before any backend runs (a CPU tensor of 2^31 ids would
    # make a build_routing without the check allocate tens of GiB).
    ids = torch.empty(2**30, 2, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"T\*k = 2147483648 routing slots.*at most 2\^31 - 1"):
        ops.build_routing(ids, 4, backend=backend)


# ----------------------------------------------------------------------------------------------
# grouped_mlp: expert counts that do not describe the rows
# ----------------------------------------------------------------------------------------------


def _mlp_operands(n=6, e=3, h=8, f=4):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, h, generator=g), torch.randn(e, 2 * f, h, generator=g) / 3,
            torch.randn(e, h, f, generator=g) / 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("counts,why", [([2, 2, 1], "sum 5 < 6 rows"), ([3, 3, 3], "sum 9 > 6 rows"),
                                        ([-2, 4, 4], "negative count, right sum")], ids=lambda v: str(v))
def test_grouped_mlp_refuses_counts_that_do_not_sum_to_the_rows(backend, counts, why):
    # Rows used to go to the wrong experts (torch) or the kernels' tiles ran past them (Triton: a
    # glibc abort from the corrupted heap).
    x, w_gu, w_d = _mlp_operands()
    with pytest.raises(ValueError, match=r"tokens_per_expert must be >= 0 and sum to N=6"):
        ops.grouped_mlp(x, torch.tensor(counts, dtype=torch.int32), w_gu, w_d, backend=backend)


def test_grouped_mlp_count_check_without_a_host_read(monkeypatch):
    # Where counts cannot be read for free (CUDA, tracing) the check is a device-side assert; the
    # CPU stands in for that path here.
    monkeypatch.setattr(grouped_gemm_ops, "values_readable", lambda t: False)
    x, w_gu, w_d = _mlp_operands()
    with pytest.raises(ValueError, match=r"tokens_per_expert must be >= 0 and sum to N=6"):
        ops.grouped_mlp(x, torch.tensor([-2, 4, 4], dtype=torch.int32), w_gu, w_d, backend="triton")
    y = ops.grouped_mlp(x, torch.tensor([1, 2, 3]), w_gu, w_d, backend="triton")
    torch.testing.assert_close(y, ops.grouped_mlp(x, torch.tensor([1, 2, 3]), w_gu, w_d, backend="torch"), **FP32)


def test_grouped_mlp_refuses_a_plan_of_other_rows():
    x, w_gu, w_d = _mlp_operands()
    plan = ops.build_routing(torch.tensor([[0], [1], [2], [2], [1]]), 3)
    with pytest.raises(ValueError, match=r"plan must describe the N=6 rows of x_sorted, but it plans 5 slots"):
        ops.grouped_mlp(x, torch.tensor([2, 2, 2]), w_gu, w_d, plan=plan, backend="triton")


# ----------------------------------------------------------------------------------------------
# bf16 on the Triton path in the interpreter
# ----------------------------------------------------------------------------------------------

BF16_REFUSED = r"bf16 tensors cannot take the Triton path on CPU: Triton's interpreter .* has no bf16"


def test_interpreter_refuses_bf16_kernels_instead_of_returning_garbage():
    # The grouped GEMM used to return values near 9e9 where the truth is 0.3.
    x, w_gu, w_d = (t.bfloat16() for t in _mlp_operands())
    counts = torch.tensor([1, 2, 3])
    plan = ops.build_routing(torch.tensor([[0], [1], [1], [2], [2], [2]]), 3)
    w = torch.ones(6, 1)
    calls = {
        "grouped_mlp": lambda: ops.grouped_mlp(x, counts, w_gu, w_d, backend="triton"),
        "grouped_mlp_gather": lambda: ops.grouped_mlp_gather(x, plan, 1, w_gu, w_d, backend="triton"),
        "grouped_mlp_combine": lambda: ops.grouped_mlp_combine(x, plan, w, w_gu, w_d, backend="triton"),
        "permute": lambda: ops.permute(x, plan, 1, backend="triton"),
        "unpermute": lambda: ops.unpermute(x, plan, w, backend="triton"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=BF16_REFUSED):
            call()
            pytest.fail(f"{name} ran bf16 kernels in the interpreter")


def test_bf16_autocast_on_cpu_triton_path_is_refused_and_fp32_gating_still_runs():
    moe = SparseMoE(8, 4, 3, top_k=2, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match=BF16_REFUSED):
        moe(torch.randn(5, 8))
    # The gating kernel reads its logits in fp32, so bf16 logits are fine there.
    logits = torch.randn(5, 6).bfloat16()
    got = ops.topk_gating(logits, 2, backend="triton")
    want = reference.topk_gating(logits, 2)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.weights, want.weights, **FP32)
    # And the torch path, CPU's default, runs bf16 autocast.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SparseMoE(8, 4, 3, top_k=2)(torch.randn(5, 8)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# NaN / inf layer coefficients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(capacity_factor=NAN), "capacity_factor"),
    (dict(capacity_factor=INF), "capacity_factor"),
    (dict(aux_loss_coef=NAN), "aux_loss_coef"),
    (dict(aux_loss_coef=INF), "aux_loss_coef"),
    (dict(z_loss_coef=NAN), "z_loss_coef"),
    (dict(router_jitter=NAN), "router_jitter"),
    (dict(router_jitter=INF), "router_jitter"),
], ids=lambda v: str(v))
def test_layer_refuses_nan_and_inf_coefficients(kwargs, name):
    # NaN passed the `< 0` checks: aux_loss_coef NaN and router_jitter NaN silently switched the
    # loss and the jitter off (`> 0` is False), capacity_factor NaN/inf failed deep in the forward.
    with pytest.raises(ValueError, match=rf"^{name}.* must be a finite number"):
        SparseMoE(8, 4, 4, top_k=2, **kwargs)


def test_router_and_capacity_refuse_nan():
    with pytest.raises(ValueError, match=r"^router_jitter must be a finite number >= 0.0, got nan"):
        TopKRouter(8, 4, 2, router_jitter=NAN)
    for bad in (NAN, INF, 0.0):
        with pytest.raises(ValueError, match=r"^capacity_factor must be a finite number > 0"):
            ops.expert_capacity(16, 4, bad)
    assert ops.expert_capacity(16, 4, 1.25) == 5
