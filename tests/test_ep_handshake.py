"""Expert-parallel ranks that disagree, or a rank that fails before the exchange: every rank raises
at once, with the same message, instead of one rank aborting inside gloo ("Received data size
doesn't match", SIGABRT) and the others waiting for the process-group timeout.

One spawn of 3 gloo processes (loopback, file:// rendezvous, a 30 s collective timeout, the whole
spawn bounded) runs every scenario; rank 2 is the odd one out. Each scenario uses a fresh group,
because a passed handshake is remembered per group. The single-process tests cover the payload
encoding.
"""

from __future__ import annotations

import datetime
import importlib
import os
import traceback

import pytest
import torch

from unimoe_kernels import SparseMoE, gather_state_dict

# The module: `unimoe_kernels.ops.dispatch` as an attribute is the function of that name.
dispatch_ops = importlib.import_module("unimoe_kernels.ops.dispatch")

WORLD = 3
SPAWN_TIMEOUT_S = 120  # 3 processes on 2 cores: ~6 s of imports each, the scenarios take ~1 s
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)  # before the fix a mismatch hung until this


def _layer(group, *, hidden=8, experts=6, dtype=torch.float32, **kw) -> SparseMoE:
    torch.manual_seed(0)
    return SparseMoE(hidden, 4, experts, top_k=2, ep_group=group, backend="torch", dtype=dtype, **kw)


def _same_everywhere(text: str) -> list:
    """Every rank's text, gathered over the world group."""
    import torch.distributed as dist

    texts = [None] * WORLD
    dist.all_gather_object(texts, text)
    return texts


def _expect_same_value_error(rank: int, call, *needles: str) -> None:
    try:
        call()
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError(f"rank {rank}: the mismatch was not detected")
    texts = _same_everywhere(message)
    assert len(set(texts)) == 1, f"the ranks raised different messages: {texts}"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def _mismatch_scenarios(rank: int):
    odd = rank == WORLD - 1
    return {
        "hidden_size": (dict(hidden=16 if odd else 8), ["hidden_size (rank 0: 8, rank 1: 8, rank 2: 16)"]),
        "num_experts": (dict(experts=3 if odd else 6), ["num_experts (rank 0: 6, rank 1: 6, rank 2: 3)"]),
        "dtype": (dict(dtype=torch.float16 if odd else torch.float32),
                  ["dtype of the exchanged rows (rank 0: torch.float32, rank 1: torch.float32, "
                   "rank 2: torch.float16)"]),
        "ep_capacity": (dict(ep_capacity=3 if odd else 2), ["ep_capacity (rank 0: 2, rank 1: 2, rank 2: 3)"]),
        "capacity_mode": (dict(ep_capacity=2) if odd else {},
                          ["capacity mode (rank 0: dropless, rank 1: dropless, rank 2: ep_capacity)",
                           "ep_capacity (rank 0: None, rank 1: None, rank 2: 2)"]),
    }


def _check_mismatches(rank: int) -> None:
    import torch.distributed as dist

    for name, (kw, needles) in _mismatch_scenarios(rank).items():
        group = dist.new_group(list(range(WORLD)))
        moe = _layer(group, **kw)
        x = torch.randn(5, moe.hidden_size, dtype=moe.router.weight.dtype)
        try:
            _expect_same_value_error(rank, lambda: moe(x), "the ranks of the expert-parallel group disagree", *needles)
        except AssertionError as err:
            raise AssertionError(f"mismatch {name!r}: {err}") from err


def _expect_failure_reaches_all(rank: int, group, moe: SparseMoE, x_good: torch.Tensor, what: str) -> None:
    bad = rank == 1
    x = torch.randn(5, moe.hidden_size + 1) if bad else x_good
    try:
        moe(x)
    except ValueError as err:
        assert bad and "hidden_size" in str(err), f"{what}, rank {rank}: {err}"
    except RuntimeError as err:
        assert not bad and "rank(s) [1] of the expert-parallel group failed before the exchange" in str(err), (
            f"{what}, rank {rank}: {err}")
    else:
        raise AssertionError(f"{what}, rank {rank}: no error; rank 1's failure did not reach this rank")


def _check_failures(rank: int) -> None:
    import torch.distributed as dist

    for what, kw, warm_up in [("first forward", {}, False), ("dropless, after a forward", {}, True),
                              ("capacity_factor, after a forward", dict(capacity_factor=2.0), True)]:
        group = dist.new_group(list(range(WORLD)))
        moe = _layer(group, **kw)
        x = torch.randn(4, 8)
        if warm_up:
            moe(x)  # the handshake passes; the failure then travels with the next exchange
        _expect_failure_reaches_all(rank, group, moe, x, what)
        # The group is still usable afterwards: every rank left the same collectives behind.
        y = moe(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def _check_gather_state_dict(rank: int) -> None:
    import torch.distributed as dist

    group = dist.new_group(list(range(WORLD)))
    moe = _layer(group, lora_rank=3 if rank == WORLD - 1 else 2)
    _expect_same_value_error(rank, lambda: gather_state_dict(moe), "gather_state_dict('module')",
                             "lora_A_gate_up (rank 0: 2x2x8:float32, rank 1: 2x2x8:float32, rank 2: 2x3x8:float32)")


def _worker(rank: int, init_method: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # 3 processes share 2 cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        for check in (_check_mismatches, _check_failures, _check_gather_state_dict):
            try:
                check(rank)
            except Exception as err:  # name the check in the parent's error
                raise AssertionError(f"{check.__name__}, rank {rank}: {err}\n{traceback.format_exc()}") from err
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_or_fail_all_raise_at_once(tmp_path, join_workers):
    mp = pytest.importorskip("torch.multiprocessing")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init = "file://" + os.path.join(str(tmp_path), "rendezvous")
    ctx = mp.start_processes(_worker, args=(init,), nprocs=WORLD, join=False, start_method="spawn")
    join_workers(ctx, SPAWN_TIMEOUT_S, f"handshake workers (world size {WORLD})")


# ----------------------------------------------------------------------------------------------
# Single process: the payload
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [
    (None, "None"), (True, "1"), (-7, "-7"), (2**40, str(2**40)), (1.25, "1.25"), (float("nan"), "nan"),
    (torch.bfloat16, "torch.bfloat16"), ("swiglu", "swiglu"), ("x" * 24, "x" * 24),
    ("a long name of more than 24 bytes", "a long name of m..."),
])
def test_settings_encode_into_four_words_and_back(value, shown):
    words = dispatch_ops._encode_setting(value)
    assert len(words) == 4 and all(-2**63 <= w < 2**63 for w in words)
    assert dispatch_ops._decode_setting(words[0], words[1:]) == shown


def test_long_texts_that_share_a_prefix_still_differ():
    a = dispatch_ops._encode_setting("a long name of more than 24 bytes, one")
    b = dispatch_ops._encode_setting("a long name of more than 24 bytes, two")
    assert a != b


def test_one_rank_group_passes_and_reports_its_own_failure_back(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(str(tmp_path), "rdv"), rank=0,
                            world_size=1, timeout=COLLECTIVE_TIMEOUT)
    try:
        group = dist.new_group([0])
        dispatch_ops.check_group_config(group, {"hidden_size": 8, "dtype": torch.float32})
        # The failing rank itself returns (it re-raises its own error); nobody else is told here.
        dispatch_ops.check_group_config(group, {}, failure=ValueError("x"))
        with pytest.raises(ValueError, match="at most 16 settings"):
            dispatch_ops.check_group_config(group, {str(i): i for i in range(17)})
    finally:
        dist.destroy_process_group()
