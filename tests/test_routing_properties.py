"""Property tests of the routing plan (ops.build_routing) on random ids drawn by hypothesis.

For ids [T, k] with values in [0, E) and N = T*k flat slots s = t*k + j, every backend that runs on
CPU ("torch", the oracle; "c" when unimoe_kernels._C is built; "triton" in the interpreter, fewer
examples because each plan costs ~1 s there) must give a plan with:

    tokens_per_expert  the bincount of the ids, summing to T*k
    expert_offsets     its exclusive prefix sum (0 first, N last)
    sorted_slots       a permutation of 0..N-1 that groups the slots by expert, stable: within an
                       expert the slots keep their flat order; i.e. exactly sorted(range(N),
                       key=(id, slot)), written here in plain Python
    slot_rows          the inverse permutation: slot_rows[sorted_slots] = sorted_slots[slot_rows] =
                       identity, and inverting slot_rows gives back sorted_slots
    tile map           ceil(N / block_m) + E entries; the used tiles first, in expert order, one per
                       block_m rows of each non-empty expert (an empty expert gets none), covering
                       every sorted row exactly once inside its expert; unused tiles are -1 / N

and all backends give the same plan. T = 0, one expert taking every slot, empty experts, E = 1,
block_m = 1 and block_m > N are drawn on purpose (and pinned with @example).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unimoe_kernels import _ext  # noqa: E402
from unimoe_kernels.ops import build_routing  # noqa: E402
from unimoe_kernels.types import max_tiles  # noqa: E402

FIELDS = ("tokens_per_expert", "expert_offsets", "sorted_slots", "slot_rows", "tile_expert", "tile_row_start")
CPU_BACKENDS = ["torch"] + (["c"] if _ext.has_c() else [])

# No example database (it would write .hypothesis/ into the checkout); deadline off because the
# first call of a backend pays for its registration and the interpreter is slow.
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routings(draw, max_tokens=40, max_experts=9):
    """(ids [T, k] of int32 or int64, E, block_m), with the edge cases made likely: T = 0, every
    slot to one expert, only a subset of the experts used (the others empty)."""
    e = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, 4))
    t = draw(st.one_of(st.just(0), st.integers(1, max_tokens)))
    pattern = draw(st.sampled_from(["any", "one_expert", "subset"]))
    if pattern == "one_expert":
        experts = [draw(st.integers(0, e - 1))]
    elif pattern == "subset":
        experts = sorted(draw(st.sets(st.integers(0, e - 1), min_size=1)))
    else:
        experts = list(range(e))
    flat = draw(st.lists(st.sampled_from(experts), min_size=t * k, max_size=t * k))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    block_m = draw(st.sampled_from([1, 2, 3, 8, 16, 64]))
    return torch.tensor(flat, dtype=dtype).reshape(t, k), e, block_m


def check_plan(plan, ids: torch.Tensor, e: int, block_m: int) -> None:
    """Every property of the module docstring, against plain-Python oracles."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    assert plan.block_m == block_m
    for name in FIELDS:
        assert getattr(plan, name).dtype == torch.int32, name
    counts, offsets = plan.tokens_per_expert.tolist(), plan.expert_offsets.tolist()
    sorted_slots, slot_rows = plan.sorted_slots.tolist(), plan.slot_rows.tolist()
    tile_expert, tile_row_start = plan.tile_expert.tolist(), plan.tile_row_start.tolist()

    # Counts: a bincount of the ids, summing to T*k.
    assert counts == [flat.count(x) for x in range(e)]
    assert torch.equal(plan.tokens_per_expert.long(), torch.bincount(ids.reshape(-1).long(), minlength=e))
    assert sum(counts) == n == ids.shape[0] * ids.shape[1]
    # Offsets: the exclusive prefix sum.
    assert len(offsets) == e + 1 and offsets[0] == 0
    assert all(offsets[x + 1] == offsets[x] + counts[x] for x in range(e))
    # sorted_slots: a permutation, grouped by expert and stable, i.e. the stable sort by expert.
    assert sorted(sorted_slots) == list(range(n))
    assert sorted_slots == sorted(range(n), key=lambda s: (flat[s], s))
    for x in range(e):
        rows = sorted_slots[offsets[x]:offsets[x + 1]]
        assert all(flat[s] == x for s in rows), x
        assert rows == sorted(rows), x  # stable: flat order within the expert
    # slot_rows: the inverse permutation, both ways; the inverse of the inverse is sorted_slots.
    assert len(slot_rows) == n
    assert all(slot_rows[sorted_slots[r]] == r for r in range(n))
    assert all(sorted_slots[slot_rows[s]] == s for s in range(n))
    inverse_of_inverse = [0] * n
    for s, r in enumerate(slot_rows):
        inverse_of_inverse[r] = s
    assert inverse_of_inverse == sorted_slots

    # Tile map: the used tiles first, in expert order, ceil(count / block_m) per expert, each
    # block_m rows from the expert's first row on; the rest -1 / N.
    assert len(tile_expert) == len(tile_row_start) == max_tiles(n, e, block_m) == -(-n // block_m) + e
    want_expert, want_start = [], []
    for x in range(e):
        for start in range(offsets[x], offsets[x + 1], block_m):
            want_expert.append(x)
            want_start.append(start)
    unused = len(tile_expert) - len(want_expert)
    assert tile_expert == want_expert + [-1] * unused
    assert tile_row_start == want_start + [n] * unused
    covered = [0] * n
    for x, start in zip(want_expert, want_start):
        for r in range(start, min(start + block_m, offsets[x + 1])):
            covered[r] += 1
    assert covered == [1] * n


def plans_equal(a, b) -> None:
    assert a.block_m == b.block_m
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


EDGES = [
    (torch.zeros(0, 2, dtype=torch.int32), 4, 64),  # T = 0: every tile unused
    (torch.full((9, 2), 3, dtype=torch.int64), 5, 4),  # one expert takes all, the others empty
    (torch.zeros(7, 3, dtype=torch.int32), 1, 1),  # E = 1, one tile per row
    (torch.tensor([[4, 0], [0, 4], [4, 4]]), 6, 64),  # experts 1-3 and 5 empty, block_m > N
]


def _with_edges(fn):
    for ids, e, block_m in EDGES:
        fn = example(routing=(ids, e, block_m))(fn)
    return fn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=150, **SETTINGS)
@_with_edges
@given(routing=routings())
def test_plan_properties(backend, routing):
    ids, e, block_m = routing
    check_plan(build_routing(ids, e, block_m, backend=backend), ids, e, block_m)


@st.composite
def large_routings(draw):
    """Bigger batches for the field-by-field comparison: ids from a seeded generator (drawing each
    of thousands of ids would swamp hypothesis), skewed towards low experts so some stay empty."""
    e = draw(st.integers(1, 300))
    k = draw(st.integers(1, 8))
    t = draw(st.integers(0, 3000))
    skew = draw(st.sampled_from([1.0, 3.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = (torch.rand(t, k, generator=g) ** skew * e).to(draw(st.sampled_from([torch.int32, torch.int64])))
    return ids, e, draw(st.sampled_from([1, 16, 64, 128]))


@pytest.mark.skipif(not _ext.has_c(), reason="unimoe_kernels._C is not built")
@settings(max_examples=60, **SETTINGS)
@_with_edges
@given(routing=st.one_of(routings(), large_routings()))
def test_c_plan_equals_the_torch_plan(routing):
    ids, e, block_m = routing
    plans_equal(build_routing(ids, e, block_m, backend="c"), build_routing(ids, e, block_m, backend="torch"))


@settings(max_examples=6, **SETTINGS)
@_with_edges
@given(routing=routings())
def test_triton_plan_properties(routing):
    """The Triton plan in the interpreter (on a GPU when there is one): the same properties, and
    the same plan as the torch oracle."""
    ids, e, block_m = routing
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = build_routing(ids.to(device), e, block_m, backend="triton")
    plan = type(plan)(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in plan))
    check_plan(plan, ids, e, block_m)
    plans_equal(plan, build_routing(ids, e, block_m, backend="torch"))


@settings(max_examples=100, **SETTINGS)
@given(routing=routings())
def test_plan_of_a_permuted_batch(routing):
    """Reordering the tokens permutes the plan the same way: counts and offsets stay, and each
    expert's rows hold the same tokens, now in the new token order (the sort is by (expert, slot))."""
    ids, e, block_m = routing
    t, k = ids.shape
    perm = torch.randperm(t, generator=torch.Generator().manual_seed(t * 31 + e))
    a = build_routing(ids, e, block_m, backend="torch")
    b = build_routing(ids[perm], e, block_m, backend="torch")
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    assert torch.equal(a.expert_offsets, b.expert_offsets)
    new_token = torch.empty_like(perm)
    new_token[perm] = torch.arange(t)  # old token index -> its row in ids[perm]
    offsets = a.expert_offsets.tolist()
    for x in range(e):
        rows = slice(offsets[x], offsets[x + 1])
        old = a.sorted_slots[rows].long()
        moved = new_token[old // k] * k + old % k  # the same (token, choice) pairs, renumbered
        assert torch.equal(moved.sort().values, b.sorted_slots[rows].long()), x
