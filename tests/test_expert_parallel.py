"""Expert parallelism (ops.dispatch/combine, SparseMoE(ep_group=...), shard/gather state dicts).

The multi-process tests spawn gloo groups of 2 and 4 CPU processes (loopback only, file:// rendezvous
in tmp_path, every run bounded by a join timeout). Each worker builds the same full single-process
SparseMoE (backend="torch", the oracle), runs it on every rank's batch in turn (accumulating
gradients, which is what the expert-parallel layer computes in one go), then runs its own shard
with ep_group and compares: output, dx, each local expert's base and LoRA gradients (the oracle's
slice), the router gradient summed over ranks, and MoEAux.dropped_slots. One spawn per group size
runs several scenarios, because spawning costs seconds on 2 cores.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.nn as nn
from tolerance import EXPERT_PARALLEL, TOL, assert_max_err

from unimoe_kernels import SparseMoE, gather_state_dict, ops, shard_state_dict
from unimoe_kernels.parallel import is_expert_key, merge_state_dicts

SPAWN_TIMEOUT_S = 150  # whole spawn, 4 processes on 2 cores: import ~6 s each, scenarios ~1 s each
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a hung collective fails instead of waiting forever

# ----------------------------------------------------------------------------------------------
# Scenarios (run inside the spawned workers)
# ----------------------------------------------------------------------------------------------

BASE = dict(hidden=8, ffn=6, top_k=2, lora_rank=2, freeze_base=False, activation="swiglu",
            aux=0.01, zloss=1e-3, capacity_factor=None, ep_capacity=None, route=None, backend="torch",
            dtype=torch.float32)

# Comparison rule for fp16/bf16: max error <= atol + rtol * max |oracle| (tolerance.EXPERT_PARALLEL),
# because the EP layer sums an expert's rows from all ranks in one GEMM where the oracle adds
# per-rank gradients in the low precision. fp32 is compared elementwise with TOL (summation order
# only).


def _scenario(**kw):
    s = dict(BASE)
    s.update(kw)
    return s


SCENARIOS_2 = {
    # Uneven batch sizes; LoRA with a trainable base, so base and LoRA gradients are both checked;
    # aux and z losses on, so the router gradient includes them (per-rank losses).
    "uneven": _scenario(experts=4, tokens=[5, 3]),
    # Rank 0 sends nothing (empty batch) and every token avoids rank 1's experts (its experts and
    # the whole rank receive nothing); non-GLU activation without LoRA.
    "empty_and_idle": _scenario(experts=4, tokens=[0, 6], route="avoid_last_rank", activation="gelu", lora_rank=0),
    # Padded capacity mode from capacity_factor (same T on both ranks): expert 0 is hot, so it
    # overflows its capacity ceil(1.0 * 6*2 / 4) = 3 and slots are dropped.
    "capacity_factor": _scenario(experts=4, tokens=[6, 6], capacity_factor=1.0, route="hot_expert_0"),
    # Explicit ep_capacity with different batch sizes per rank (and one empty rank-expert pair), on
    # the Triton kernels (interpreter on CPU): the grouped MLP then builds its tile map from the
    # padded counts.
    "ep_capacity_uneven": _scenario(experts=4, tokens=[7, 2], ep_capacity=2, route="hot_expert_0", backend="triton"),
    # The Triton kernels (interpreter on CPU) for permute/regroup/grouped MLP inside the EP path.
    "triton": _scenario(experts=4, tokens=[4, 3], backend="triton"),
    # The Triton path with the empty edges: rank 0 has no tokens, rank 1's experts get no rows.
    "triton_empty_and_idle": _scenario(experts=4, tokens=[0, 5], backend="triton", route="avoid_last_rank"),
    # fp16 rows through gloo.
    "fp16": _scenario(experts=4, tokens=[4, 6], dtype=torch.float16),
}

SCENARIOS_4 = {
    # E=8 over 4 ranks, k=3; rank 1 sends nothing and rank 3's experts receive nothing.
    "uneven_empty_idle": _scenario(experts=8, top_k=3, ffn=4, tokens=[3, 0, 5, 1], route="avoid_last_rank"),
    # Padded capacity mode, 4 ranks, hot expert: capacity ceil(1.0 * 4*2 / 8) = 1 row per pair.
    "capacity_factor": _scenario(experts=8, tokens=[4, 4, 4, 4], capacity_factor=1.0, route="hot_expert_0"),
}


def _gpu_scenarios(world_size: int) -> dict:
    """NCCL on every visible GPU (one GPU: a group of 1, the exchange is a device copy), bf16,
    Triton kernels (backend auto on CUDA)."""
    gpu = dict(experts=4 * world_size, dtype=torch.bfloat16, backend="auto", hidden=64, ffn=32)
    return {
        "gpu_uneven": _scenario(tokens=[40 + 17 * r for r in range(world_size)], **gpu),
        "gpu_capacity": _scenario(tokens=[48] * world_size, capacity_factor=1.0, route="hot_expert_0", **gpu),
    }


def _make_full(s: dict, world_size: int, device) -> SparseMoE:
    torch.manual_seed(0)
    moe = SparseMoE(
        s["hidden"], s["ffn"], s["experts"], s["top_k"], activation=s["activation"], lora_rank=s["lora_rank"],
        freeze_base=s["freeze_base"], aux_loss_coef=s["aux"], z_loss_coef=s["zloss"], backend="torch",
    )
    with torch.no_grad():
        if s["lora_rank"]:
            # B starts at zero, which would make every A gradient zero: give B values.
            moe.experts.lora_B_gate_up.normal_(0, 0.5)
            moe.experts.lora_B_down.normal_(0, 0.5)
        # Feature 0 of every token is set to 3 (see _inputs); these router columns steer routing.
        e_local = s["experts"] // world_size
        if s["route"] == "avoid_last_rank":
            moe.router.weight[:, 0] = 5.0
            moe.router.weight[-e_local:, 0] = -5.0
        elif s["route"] == "hot_expert_0":
            moe.router.weight[:, 0] = 0.0
            moe.router.weight[0, 0] = 5.0
    return moe.to(device=device, dtype=s["dtype"]).train()


def _inputs(s: dict, device) -> tuple[list, list]:
    g = torch.Generator().manual_seed(1)
    xs, gs = [], []
    for t in s["tokens"]:
        x = torch.randn(t, s["hidden"], generator=g)
        x[:, 0] = 3.0
        xs.append(x.to(device=device, dtype=s["dtype"]))
        gs.append(torch.randn(t, s["hidden"], generator=g).to(device=device, dtype=s["dtype"]))
    return xs, gs


def _oracle(full: SparseMoE, s: dict, xs, gs):
    """Per-rank outputs, dx, dropped slots and slots per expert, and the gradients summed over ranks."""
    outs, dxs, dropped, counts = [], [], [], []
    for x, g in zip(xs, gs):
        if s["ep_capacity"] is not None:
            # The single-process layer takes a factor: pick one whose capacity is exactly ep_capacity
            # for this T (ceil(C - 0.5) = C), so the oracle applies the same per-rank capacity.
            full.capacity_factor = (s["ep_capacity"] - 0.5) * s["experts"] / max(1, x.shape[0] * s["top_k"])
        else:
            full.capacity_factor = s["capacity_factor"]
        x = x.clone().requires_grad_(True)
        y, aux = full(x, return_aux=True)
        (y * g).sum().backward()
        outs.append(y.detach())
        dxs.append(x.grad)
        dropped.append(int(aux.dropped_slots))
        counts.append(aux.tokens_per_expert.to(torch.int64))
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in full.named_parameters() if p.requires_grad}
    return outs, dxs, dropped, torch.stack(counts).sum(0), grads


def _close(what: str, got, want):
    if got.dtype not in EXPERT_PARALLEL:
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"{what}: {m}")
        return
    assert got.dtype == want.dtype, f"{what}: {got.dtype} vs {want.dtype}"
    assert_max_err(got, want, EXPERT_PARALLEL[got.dtype], what=what)


def _run_scenario(name: str, s: dict, rank: int, world_size: int, group, device) -> None:
    import torch.distributed as dist

    full = _make_full(s, world_size, device)
    full_state = {k: v.clone() for k, v in full.state_dict().items()}
    xs, gs = _inputs(s, device)
    outs, dxs, dropped, counts, grads = _oracle(full, s, xs, gs)
    e_local = s["experts"] // world_size
    # The scenario must exercise what it claims, or it could pass vacuously.
    if s["route"] == "avoid_last_rank":
        assert counts[-e_local:].sum() == 0 and counts.sum() > 0, f"{name}: routing did not avoid the last rank"
    if s["capacity_factor"] is not None or s["ep_capacity"] is not None:
        assert sum(dropped) > 0, f"{name}: no slot was dropped, the capacity test would be vacuous"

    ep = SparseMoE(
        s["hidden"], s["ffn"], s["experts"], s["top_k"], activation=s["activation"], lora_rank=s["lora_rank"],
        freeze_base=s["freeze_base"], aux_loss_coef=s["aux"], z_loss_coef=s["zloss"],
        capacity_factor=s["capacity_factor"], ep_capacity=s["ep_capacity"], ep_group=group, backend=s["backend"],
        device=device, dtype=s["dtype"],
    )
    assert ep.experts.gate_up_proj.shape[0] == e_local
    ep.load_state_dict(shard_state_dict(full_state, rank, world_size))
    ep.train()

    x = xs[rank].clone().requires_grad_(True)
    y, aux = ep(x, return_aux=True)
    _close(f"{name} rank {rank} output", y.detach(), outs[rank])
    assert int(aux.dropped_slots) == dropped[rank], (
        f"{name} rank {rank}: dropped {int(aux.dropped_slots)} != {dropped[rank]}")
    (y * gs[rank]).sum().backward()
    _close(f"{name} rank {rank} dx", x.grad, dxs[rank])

    lo, hi = rank * e_local, (rank + 1) * e_local
    for pname, p in ep.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if pname.startswith("experts."):
            _close(f"{name} rank {rank} grad {pname}", g, grads[pname][lo:hi])
        else:
            # Replicated parameters hold this rank's share: their sum over ranks is the oracle's.
            g = g.clone()
            dist.all_reduce(g, group=group)
            _close(f"{name} rank {rank} summed grad {pname}", g, grads[pname])

    # Inference (no autograd graph at all) gives the same output.
    with torch.no_grad():
        _close(f"{name} rank {rank} no_grad output", ep(xs[rank]), outs[rank])

    # The live model gathers back to the full state dict, also nested in a bigger model.
    gathered = gather_state_dict(nn.ModuleDict({"mlp": ep}))
    for key, value in full_state.items():
        torch.testing.assert_close(gathered["mlp." + key], value, atol=0, rtol=0)


class _DenseMLP(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)


def _check_from_dense(rank: int, world_size: int, group) -> None:
    # Upcycling with ep_group copies each rank's own experts out of the list of dense MLPs.
    torch.manual_seed(0)
    mlps = [_DenseMLP(8, 6) for _ in range(4)]
    full = SparseMoE.from_dense(mlps, top_k=2, backend="torch")
    ep = SparseMoE.from_dense(mlps, top_k=2, ep_group=group)
    with torch.no_grad():
        ep.router.weight.copy_(full.router.weight)  # the router is freshly initialised by both
        x = torch.randn(5 + rank, 8)
        _close(f"from_dense rank {rank}", ep(x), full(x))


def _check_errors(rank: int, world_size: int, group) -> None:
    # 3 experts cannot be split over 2 ranks.
    try:
        SparseMoE(8, 8, 3, 2, ep_group=group)
    except ValueError as err:
        assert "divisible" in str(err), err
    else:
        raise AssertionError("num_experts not divisible by the group size was accepted")
    # dispatch's own checks: capacity must be a positive int.
    plan = ops.build_routing(torch.zeros(2, 1, dtype=torch.int32), 4)
    try:
        ops.dispatch(torch.zeros(2, 8), plan, 1, group, capacity=0)
    except ValueError as err:
        assert "capacity" in str(err), err
    else:
        raise AssertionError("capacity=0 was accepted")
    # capacity_factor gives C from each rank's own T: different T on the ranks is caught before
    # the row exchange (which would abort gloo) on both ranks.
    moe = SparseMoE(8, 8, 4, 2, capacity_factor=1.0, ep_group=group)
    try:
        moe(torch.randn(4 + 4 * rank, 8))
    except RuntimeError as err:
        assert "different capacities" in str(err), err
    else:
        raise AssertionError("different capacities on the ranks were not detected")


def _worker(rank: int, world_size: int, init_method: str, table: str) -> None:
    import torch.distributed as dist

    if table == "gpu":
        backend, device = "nccl", torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        torch.set_num_threads(1)  # P processes share 2 cores
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        group = dist.new_group(list(range(world_size)))  # a sub-group, as a real EP group is
        scenarios = {"2": SCENARIOS_2, "4": SCENARIOS_4}.get(table) or _gpu_scenarios(world_size)
        for name, scenario in scenarios.items():
            try:
                _run_scenario(name, scenario, rank, world_size, group, device)
            except Exception as err:  # name the scenario in the parent's error
                raise AssertionError(f"scenario {name!r}, rank {rank}: {err}\n{traceback.format_exc()}") from err
        if table == "2":
            _check_from_dense(rank, world_size, group)
            _check_errors(rank, world_size, group)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, tmp_path, table: str, join_workers) -> None:
    mp = pytest.importorskip("torch.multiprocessing")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init = "file://" + os.path.join(str(tmp_path), "rendezvous")
    ctx = mp.start_processes(
        _worker, args=(world_size, init, table), nprocs=world_size, join=False, start_method="spawn"
    )
    join_workers(ctx, SPAWN_TIMEOUT_S, f"expert-parallel workers (world size {world_size})")


def test_expert_parallel_2_ranks(tmp_path, join_workers):
    _spawn(2, tmp_path, "2", join_workers)


def test_expert_parallel_4_ranks(tmp_path, join_workers):
    _spawn(4, tmp_path, "4", join_workers)


@pytest.mark.gpu
def test_expert_parallel_nccl_gpu(tmp_path, join_workers):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    _spawn(torch.cuda.device_count(), tmp_path, "gpu", join_workers)


# ----------------------------------------------------------------------------------------------
# Single-process tests: state dict sharding, argument checks
# ----------------------------------------------------------------------------------------------


def _full_model(**kw) -> SparseMoE:
    moe = SparseMoE(8, 6, 4, 2, lora_rank=2, backend="torch", **kw)
    with torch.no_grad():
        moe.experts.lora_B_down.normal_()
    return moe


def test_shard_then_merge_round_trip_and_reshard():
    full = _full_model().state_dict()
    for p in (1, 2, 4):
        shards = [shard_state_dict(full, r, p) for r in range(p)]
        for r, shard in enumerate(shards):
            assert shard.keys() == full.keys()
            per = 4 // p
            torch.testing.assert_close(shard["experts.down_proj"], full["experts.down_proj"][r * per:(r + 1) * per],
                                       rtol=0, atol=0)  # a slice: the very same values
            # Replicated entries are shared, not copied; expert slices are their own storage
            # (so saving a shard writes only its block).
            assert shard["router.weight"] is full["router.weight"]
            assert shard["experts.gate_up_proj"].untyped_storage().nbytes() == shard["experts.gate_up_proj"].nbytes
        merged = merge_state_dicts(shards)
        for key in full:
            torch.testing.assert_close(merged[key], full[key], atol=0, rtol=0)
    # P=4 -> P'=2 through the merged dict equals sharding the original for 2 ranks.
    four = [shard_state_dict(full, r, 4) for r in range(4)]
    for r in range(2):
        resharded = shard_state_dict(merge_state_dicts(four), r, 2)
        direct = shard_state_dict(full, r, 2)
        for key in direct:
            torch.testing.assert_close(resharded[key], direct[key], atol=0, rtol=0)


def test_shard_splits_lora_rank_gates_per_expert():
    full = _full_model(lora_rank_gate=True).state_dict()
    for key in ("experts.lora_gate_gate_up", "experts.lora_gate_down"):
        shard = shard_state_dict(full, 1, 2)[key]
        assert shard.shape == (2, 2, 8)  # [E/P, r, H]
        torch.testing.assert_close(shard, full[key][2:4], atol=0, rtol=0)


def test_merged_checkpoint_loads_in_one_process():
    src = _full_model()
    shards = [shard_state_dict(src.state_dict(), r, 2) for r in range(2)]
    dst = _full_model()
    dst.load_state_dict(merge_state_dicts(shards))
    x = torch.randn(5, 8)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


def test_shard_nested_keys_and_prefix():
    model = nn.ModuleDict({"a": _full_model(), "b": _full_model()})
    full = model.state_dict()
    # Without a prefix every SparseMoE in the model is sharded.
    shard = shard_state_dict(full, 1, 2)
    for layer in ("a", "b"):
        torch.testing.assert_close(shard[f"{layer}.experts.lora_A_down"], full[f"{layer}.experts.lora_A_down"][2:4],
                                   rtol=0, atol=0)
        assert shard[f"{layer}.router.weight"] is full[f"{layer}.router.weight"]
    # With a prefix only that module's experts are.
    shard = shard_state_dict(full, 1, 2, prefix="a.")
    assert shard["a.experts.gate_up_proj"].shape[0] == 2
    assert shard["b.experts.gate_up_proj"] is full["b.experts.gate_up_proj"]
    assert is_expert_key("model.layers.3.mlp.experts.lora_B_gate_up")
    assert not is_expert_key("model.layers.3.mlp.router.weight")
    assert not is_expert_key("model.experts_gate_up_proj")  # not a module boundary
    # load_state_dict's version metadata survives sharding.
    assert getattr(shard, "_metadata", None) is not None


def test_shard_bad_arguments():
    full = _full_model().state_dict()
    with pytest.raises(ValueError, match=r"experts\.gate_up_proj.*not divisible by world_size=3"):
        shard_state_dict(full, 0, 3)
    with pytest.raises(ValueError, match="rank must be"):
        shard_state_dict(full, 2, 2)
    with pytest.raises(ValueError, match="world_size must be"):
        shard_state_dict(full, 0, 0)
    with pytest.raises(ValueError, match="shards"):
        merge_state_dicts([])
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        gather_state_dict(full)


def test_ep_constructor_arguments():
    with pytest.raises(TypeError, match="ep_group must be a torch.distributed ProcessGroup"):
        SparseMoE(8, 8, 4, 2, ep_group=object())
    with pytest.raises(ValueError, match="ep_capacity .* needs ep_group"):
        SparseMoE(8, 8, 4, 2, ep_capacity=4)
    # A layer without ep_group keeps every expert and reports itself as one rank.
    moe = SparseMoE(8, 8, 4, 2)
    assert (moe.ep_size, moe.ep_rank, moe.num_local_experts, moe.expert_offset) == (1, 0, 4, 0)
