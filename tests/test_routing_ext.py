"""The compiled routing plan (unimoe_kernels._C via ops.routing, backend="c") against the torch oracle
reference.build_routing, its invariants, the custom op's registration, and the fallback when _C
is missing. Tests needing _C skip cleanly when it was not built; CUDA cases carry the gpu marker.
"""

import importlib
import os
import sys
import warnings

import pytest
import torch

from unimoe_kernels import _ext, reference
from unimoe_kernels.ops import routing
from unimoe_kernels.types import max_tiles

needs_c = pytest.mark.skipif(not _ext.has_c(), reason="unimoe_kernels._C is not built")


def needs_c_cuda(fn):
    """gpu marker (the project conftest skips it without CUDA) plus its own skips, so the file
    also runs cleanly outside the repo, against an installed wheel."""
    fn = pytest.mark.skipif(not _ext.has_c_cuda(), reason="_C built without CUDA")(fn)
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn)
    return needs_c(pytest.mark.gpu(fn))


FIELDS = ("tokens_per_expert", "expert_offsets", "sorted_slots", "slot_rows", "tile_expert",
          "tile_row_start")


def _random_ids(t, k, e, dtype=torch.int32, device="cpu", gen_seed=0):
    """k distinct experts per token, like a real top-k (k <= e)."""
    g = torch.Generator().manual_seed(gen_seed)
    ids = torch.rand(t, e, generator=g).argsort(dim=1)[:, :k]
    return ids.to(dtype=dtype, device=device)


def _check_plan(ids, e, block_m, backend="c"):
    """Plan of `backend` equals the oracle field by field, and satisfies the plan's invariants."""
    plan = routing.build_routing(ids, e, block_m, backend=backend)
    ref = reference.build_routing(ids, e, block_m)
    assert plan.block_m == block_m
    for name in FIELDS:
        got, want = getattr(plan, name), getattr(ref, name)
        assert got.dtype == torch.int32, name
        assert got.device == ids.device, name
        assert torch.equal(got.cpu(), want.cpu()), name

    p = {name: getattr(plan, name).cpu().long() for name in FIELDS}
    n = ids.numel()
    assert p["expert_offsets"][0] == 0 and p["expert_offsets"][-1] == n  # offsets sum to N
    assert torch.equal(p["expert_offsets"].diff(), p["tokens_per_expert"])
    # sorted_slots is a permutation and slot_rows its inverse, both ways.
    assert torch.equal(p["sorted_slots"].sort().values, torch.arange(n))
    assert torch.equal(p["slot_rows"][p["sorted_slots"]], torch.arange(n))
    assert torch.equal(p["sorted_slots"][p["slot_rows"]], torch.arange(n))
    flat = ids.reshape(-1).cpu().long()
    # Sorted rows are grouped by expert, and stable: slots ascend within an expert.
    assert torch.equal(flat[p["sorted_slots"]], flat.sort(stable=True).values)
    for lo, hi in zip(p["expert_offsets"][:-1], p["expert_offsets"][1:]):
        assert bool((p["sorted_slots"][lo:hi].diff() > 0).all())
    # The tile map covers every sorted row exactly once, each tile inside its expert's rows.
    te, ts = p["tile_expert"], p["tile_row_start"]
    assert te.numel() == max_tiles(n, e, block_m)
    used = te >= 0
    assert bool((ts[~used] == n).all())
    covered = torch.zeros(n, dtype=torch.long)
    for ex, start in zip(te[used].tolist(), ts[used].tolist()):
        end = min(start + block_m, int(p["expert_offsets"][ex + 1]))
        assert int(p["expert_offsets"][ex]) <= start < end
        covered[start:end] += 1
    assert bool((covered == 1).all())
    return plan


# (T, k, E, block_m), each an edge case of the plan.
CASES = [
    pytest.param(0, 2, 8, 64, id="empty-T0"),             # empty batch: only the tile-map tail
    pytest.param(1, 1, 8, 64, id="one-token"),            # one slot, T < block_m
    pytest.param(37, 4, 4, 16, id="k-equals-E"),          # every token picks every expert
    pytest.param(50, 2, 7, 8, id="prime-E-7"),            # prime E, N not a multiple of block_m
    pytest.param(129, 3, 13, 32, id="prime-E-13"),
    pytest.param(40, 1, 1, 16, id="E-1"),                 # a single expert owns every row
    pytest.param(33, 2, 8, 1, id="block_m-1"),            # one tile per row
    pytest.param(5, 2, 8, 256, id="block_m-gt-N"),        # every expert fits in one tile
    pytest.param(1000, 8, 128, 64, id="qwen3-like"),      # many experts, some empty by chance
    pytest.param(3000, 2, 8, 128, id="several-chunks"),   # N > the CUDA chunk of 512 slots
]


@needs_c
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])  # both id widths _C reads
@pytest.mark.parametrize("t,k,e,block_m", CASES)
def test_matches_reference_cpu(t, k, e, block_m, dtype):
    _check_plan(_random_ids(t, k, e, dtype), e, block_m)


@needs_c
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_all_slots_to_one_expert(dtype):
    # Every slot to expert 3 of 8: seven experts with zero tokens, one with all of them.
    ids = torch.full((300, 2), 3, dtype=dtype)
    plan = _check_plan(ids, 8, 64)
    assert plan.tokens_per_expert.tolist() == [0, 0, 0, 600, 0, 0, 0, 0]


@needs_c
def test_experts_with_zero_tokens():
    # Only even experts are used: odd ones have empty ranges and must get no tile.
    ids = (_random_ids(64, 2, 4) * 2).to(torch.int32)
    plan = _check_plan(ids, 8, 16)
    assert bool((plan.tokens_per_expert[1::2] == 0).all())
    assert not bool(((plan.tile_expert % 2 == 1) & (plan.tile_expert >= 0)).any())


@needs_c
def test_non_contiguous_and_other_int_dtypes():
    # A transposed view and an int16 tensor take the copy/convert path before _C.
    ids = _random_ids(20, 3, 9, torch.int64).t().contiguous().t()
    assert not ids.is_contiguous()
    _check_plan(ids, 9, 4)
    _check_plan(_random_ids(20, 3, 9, torch.int16), 9, 4)


@needs_c
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_large_n(dtype):
    # ~200k slots, skewed towards low experts so counts differ a lot: exercises int64 index math.
    g = torch.Generator().manual_seed(1)
    ids = (torch.rand(50_000, 4, generator=g) ** 3 * 61).to(dtype)
    plan = routing.build_routing(ids, 61, 128, backend="c")
    ref = reference.build_routing(ids, 61, 128)
    for name in FIELDS:
        assert torch.equal(getattr(plan, name), getattr(ref, name)), name


@needs_c
def test_auto_uses_c_on_cpu(monkeypatch):
    calls = []
    real = _ext.C.routing_plan_cpu
    monkeypatch.setattr(_ext.C, "routing_plan_cpu", lambda *a: calls.append(1) or real(*a))
    routing.build_routing(_random_ids(4, 2, 4), 4)
    assert calls == [1]


@needs_c
def test_out_of_range_ids_raise_on_cpu():
    with pytest.raises(ValueError, match="num_experts=4"):
        routing.build_routing(torch.tensor([[0, 4]]), 4, backend="c")
    with pytest.raises(ValueError, match="found -1"):
        routing.build_routing(torch.tensor([[-1, 2]]), 4, backend="c")


def test_argument_validation():
    ids = torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="2-D"):
        routing.build_routing(ids.reshape(-1), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        routing.build_routing(ids.float(), 4)
    with pytest.raises(TypeError, match="integer dtype"):
        routing.build_routing(ids.bool(), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        routing.build_routing([[0, 1]], 4)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        routing.build_routing(ids, 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        routing.build_routing(ids, 4.0)
    with pytest.raises(ValueError, match="block_m must be >= 1"):
        routing.build_routing(ids, 4, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        routing.build_routing(ids, 4, backend="cuda")
    with pytest.raises(ValueError, match="cpu or cuda"):
        routing.build_routing(ids.to("meta"), 4, backend="c")


@needs_c
def test_c_checks_its_arguments():
    # Raw calls bypass the Python checks: _C validates sizes itself and raises ValueError.
    buf = torch.zeros(64, dtype=torch.int32)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="block_m must be >= 1"):
        _ext.C.routing_plan_cpu(p, False, 4, 2, 0, 10, p, p, p, p, p, p)
    with pytest.raises(ValueError, match="num_slots must be >= 0"):
        _ext.C.routing_plan_cpu(p, False, -1, 2, 4, 10, p, p, p, p, p, p)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        _ext.C.routing_plan_cpu(p, False, 4, 0, 4, 10, p, p, p, p, p, p)
    with pytest.raises(ValueError, match="max_tiles must be >= "):
        _ext.C.routing_plan_cpu(p, False, 4, 2, 4, 2, p, p, p, p, p, p)
    with pytest.raises(ValueError, match="non-null"):
        _ext.C.routing_plan_cpu(p, False, 4, 2, 4, 3, 0, p, p, p, p, p)


@needs_c
def test_opcheck():
    for ids, e, bm in [
        (_random_ids(17, 2, 5), 5, 4),
        (_random_ids(1, 1, 3, torch.int64), 3, 64),
        (torch.zeros(0, 2, dtype=torch.int32), 4, 8),
    ]:
        torch.library.opcheck(torch.ops.unimoe.routing_plan_c.default, (ids, e, bm))


@needs_c
def test_torch_compile_fullgraph():
    fn = torch.compile(lambda ids: routing.build_routing(ids, 6, 8, backend="c"), fullgraph=True)
    ids = _random_ids(21, 2, 6)
    got, want = fn(ids), reference.build_routing(ids, 6, 8)
    for name in FIELDS:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@needs_c
@pytest.mark.skipif(os.environ.get("UNIMOE_REQUIRE_EXT") != "1",
                    reason="only where the build must have produced the CUDA part")
def test_built_with_cuda():
    # nvcc is present on every machine of this project, so a required build carries CUDA.
    assert _ext.has_c_cuda()


@needs_c_cuda
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t,k,e,block_m", CASES)
def test_matches_reference_cuda(t, k, e, block_m, dtype):
    _check_plan(_random_ids(t, k, e, dtype, device="cuda"), e, block_m)


@needs_c_cuda
def test_cuda_large_and_deterministic():
    # ~200k slots over 1027 experts (> one scan block of 256 threads), twice: identical plans.
    ids = (torch.rand(50_000, 4, device="cuda") ** 2 * 1027).to(torch.int32)
    a = routing.build_routing(ids, 1027, 64, backend="c")
    b = routing.build_routing(ids, 1027, 64, backend="c")
    ref = reference.build_routing(ids, 1027, 64)
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(ref, name)), name
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_fallback_without_c(monkeypatch):
    # A failed `from . import _C` must give one warning and leave a working torch path.
    import unimoe_kernels

    monkeypatch.setitem(sys.modules, "unimoe_kernels._C", None)  # makes the import raise
    monkeypatch.delattr(unimoe_kernels, "_C", raising=False)  # else `from . import` finds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = importlib.reload(_ext)
    try:
        msgs = [str(w.message) for w in caught if "unimoe_kernels._C" in str(w.message)]
        assert len(msgs) == 1 and "runs as Triton kernels on CUDA tensors and in torch on CPU tensors" in msgs[0]
        assert ext.C is None and not ext.has_c() and not ext.has_c_cuda()
        ids = _random_ids(10, 2, 5)
        plan = routing.build_routing(ids, 5, 4)  # auto -> torch
        ref = reference.build_routing(ids, 5, 4)
        for name in FIELDS:
            assert torch.equal(getattr(plan, name), getattr(ref, name)), name
        with pytest.raises(RuntimeError, match="not built"):
            routing.build_routing(ids, 5, 4, backend="c")
    finally:
        monkeypatch.undo()
        importlib.reload(_ext)  # restore the real module object for later tests
