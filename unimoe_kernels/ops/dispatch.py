"""Expert-parallel dispatch and combine: all-to-all exchange of expert rows over torch.distributed.

With an expert-parallel group of P ranks and E global experts, rank p owns the contiguous experts
p*E/P .. (p+1)*E/P - 1 (E_l = E/P of them). One layer on one rank (T local tokens, k slots, N = T*k):

  dispatch (dropless, the default)
    counts [E] = plan.tokens_per_expert, viewed [P, E_l]: row p = my slots for rank p's experts
    all_to_all_single(counts)        -> recv_counts [P, E_l]: row p = rank p's slots for my experts
    splits = row sums of both, read on the host      (the one host sync of a layer; see below)
    x_sorted = permute(x, plan)      [N, H]  expert-sorted, so rank p's rows are one contiguous block:
                                             this IS the send buffer, no second copy
    all_to_all_single(x_sorted)      -> x_recv [R, H], grouped by (source rank, local expert)
    regroup: a stable sort by local expert (a RoutingPlan over E_l experts, top_k = 1)
                                     -> x_local [R, H] grouped by local expert, ready for grouped_mlp
  combine (the exact reverse)
    y_local [R, H] --inverse regroup--> y_recv [R, H] --all_to_all_single--> y_sorted [N, H]
    out = unpermute(y_sorted, plan, weights)          [T, H]

  padded (capacity=C, no host sync): every (source rank, global expert) pair moves exactly C rows.
    send buffer [E*C, H]: row e*C + c = the c-th slot (in token order) of this rank for expert e, or
        zeros when expert e got fewer than C slots; slots past C are dropped (routing.apply_capacity's
        rule: a slot's position in its expert is its sorted row minus the expert's offset)
    equal splits E_l*C, so nothing is read on the host; x_recv [P*E_l*C, H] viewed [P, E_l, C, H] and
    transposed to [E_l, P, C, H] is the local-expert order (a fixed permutation, no index needed);
    each local expert computes P*C rows (padding rows included: fixed shapes are the point).
    combine reads y back through slot -> e*C + position; dropped slots must carry zero weight
    (SparseMoE zeroes them with routing.apply_capacity, the same rule), so they add nothing.

Backward: all_to_all_single is wrapped in autograd.Functions whose backward is the same exchange with
the splits swapped (no new host sync: the splits of the forward are kept). Collectives must be called
by every rank in the same order, so both exchanges are always part of the autograd graph while grad
mode is on (a zero-size anchor that requires grad is an input of each), and the combine exchange hands
a zero-size token to the dispatch exchange so its backward is reached even on a rank whose experts
received no rows (their grouped MLP output then does not depend on x_local). Every rank must therefore
run backward through the layer whenever one does, as with DDP.

Host sync of variable splits: all_to_all_single takes its split sizes as Python ints, so the dropless
path reads the [2P] row sums of the exchanged counts once per forward (one device->host copy after the
count exchange). The padded path needs none but computes and moves padding, and drops overflow.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .. import reference
from ..types import RoutingPlan
from .permute import permute, unpermute
from .routing import build_routing


class DispatchState(NamedTuple):
    """What combine() needs to undo dispatch(); returned by dispatch().

    group: the expert-parallel process group; world_size P; num_local_experts E_l = E / P.
    plan: the routing plan of this rank's tokens over the E global experts (dispatch's input).
    tokens_per_local_expert: [E_l] int32, rows x_local holds per local expert (grouped_mlp's counts).
    local_plan: RoutingPlan of the received rows over the E_l local experts (dropless), whose expert
        offsets grouped_mlp can reuse; None in padded mode.
    send_splits, recv_splits: rows sent to / received from each rank (dropless); None in padded mode.
    capacity: rows per (source rank, expert) pair in padded mode; None when dropless.
    padded_rows: [T*k] int64, slot -> row of the padded send buffer (padded mode), else None.
    token: zero-size tensor that links the two exchanges in autograd (module docstring); internal.
    """

    group: object
    world_size: int
    num_local_experts: int
    plan: RoutingPlan
    tokens_per_local_expert: torch.Tensor
    local_plan: Optional[RoutingPlan]
    send_splits: Optional[List[int]]
    recv_splits: Optional[List[int]]
    capacity: Optional[int]
    padded_rows: Optional[torch.Tensor]
    token: Optional[torch.Tensor]


def _dist():
    # Imported here so that `import unimoe_kernels` works on torch builds without distributed.
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("expert parallelism needs torch.distributed, which this torch build lacks")
    return dist


def group_size_and_rank(group, argument: str = "group") -> tuple[int, int]:
    """(size, rank in group) of a torch.distributed process group; TypeError for anything else."""
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{argument} must be a torch.distributed ProcessGroup (e.g. dist.new_group(...)), "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(f"{argument}: torch.distributed is not initialised (call init_process_group first)")
    rank = dist.get_rank(group)
    if rank < 0:  # get_rank returns -1 on processes outside the group
        raise ValueError(f"{argument}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return dist.get_world_size(group), rank


def _a2a(x: torch.Tensor, out_splits: Optional[List[int]], in_splits: Optional[List[int]], group) -> torch.Tensor:
    """all_to_all_single of the rows of x [n, H]; equal chunks when the splits are None."""
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    _dist().all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _DispatchA2A(torch.autograd.Function):
    """x [n_in, H] -> (rows received [n_out, H], a zero-size token for the combine exchange).

    Backward sends the row gradients back along the swapped splits. It always runs the collective,
    also when no gradient reached the rows (zeros are sent), because the other ranks wait for it.
    """

    @staticmethod
    def forward(ctx, x, anchor, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        ctx.needs_x = ctx.needs_input_grad[0]
        return _a2a(x, out_splits, in_splits, group), x.new_empty((0,))

    @staticmethod
    def backward(ctx, grad_rows, _grad_token):
        dx = _a2a(grad_rows, ctx.in_splits, ctx.out_splits, ctx.group)
        return (dx if ctx.needs_x else None), None, None, None, None


class _CombineA2A(torch.autograd.Function):
    """y [n_in, H] -> rows received [n_out, H]; takes dispatch's token so that, in backward, the
    dispatch exchange is reached after this one on every rank."""

    @staticmethod
    def forward(ctx, y, token, anchor, group, out_splits, in_splits):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        ctx.token_meta = (token.dtype, token.device) if token is not None else None
        return _a2a(y, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        dy = _a2a(grad_out, ctx.in_splits, ctx.out_splits, ctx.group)
        dtoken = None
        if ctx.token_meta is not None and ctx.needs_input_grad[1]:
            dtoken = torch.empty((0,), dtype=ctx.token_meta[0], device=ctx.token_meta[1])
        return (dy if ctx.needs_input_grad[0] else None), dtoken, None, None, None, None


def _anchor(device: torch.device) -> Optional[torch.Tensor]:
    # A zero-size leaf requiring grad keeps the exchanges in the graph on every rank (module docstring).
    return torch.empty((0,), device=device, requires_grad=True) if torch.is_grad_enabled() else None


def _check_plan_args(x: torch.Tensor, plan: RoutingPlan, top_k: int, world_size: int) -> int:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan (from ops.build_routing), got {type(plan).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.shape[0] * top_k != plan.sorted_slots.numel():
        raise ValueError(
            f"x must be [T, H] with T*top_k = {plan.sorted_slots.numel()} routed slots, got {tuple(x.shape)}")
    num_experts = plan.tokens_per_expert.numel()
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size {world_size}")
    return num_experts // world_size


def dispatch(
    x: torch.Tensor,
    plan: RoutingPlan,
    top_k: int,
    group,
    *,
    capacity: Optional[int] = None,
    check_capacity: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, DispatchState]:
    """Send this rank's expert rows to the ranks owning the experts; returns (x_local, state).

    x: [T, H] this rank's tokens; plan: build_routing of their ids [T, top_k] over all E experts;
    group: the expert-parallel ProcessGroup (size P, E divisible by P). x_local: [R, H], the rows
    every rank routed to this rank's experts, grouped by local expert (state.tokens_per_local_expert
    rows each), in the order (local expert, source rank, source slot order). capacity=None is
    dropless (one host sync for the split sizes); capacity=C moves exactly C rows per (source rank,
    expert) pair with no host sync (module docstring); every rank must pass the same C, which
    check_capacity=True verifies on the device with one tiny extra all-to-all (a mismatch would
    otherwise abort gloo or hang NCCL in the row exchange). Differentiable in x.
    """
    world_size, _ = group_size_and_rank(group)
    e_local = _check_plan_args(x, plan, top_k, world_size)
    anchor = _anchor(x.device)
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int (rows per rank and expert) or None, got {capacity!r}")
        if check_capacity:
            _check_same_capacity(capacity, world_size, group, x.device)
        return _dispatch_padded(x, plan, top_k, group, world_size, e_local, capacity, anchor)

    counts = plan.tokens_per_expert.view(world_size, e_local)
    recv_counts = _a2a(counts, None, None, group)  # [P, E_l]: rank p's slots for my experts
    # The one host sync: split sizes of all_to_all_single are Python ints.
    sizes = torch.cat([counts.sum(1), recv_counts.sum(1)]).tolist()
    send_splits, recv_splits = sizes[:world_size], sizes[world_size:]
    n_recv = sum(recv_splits)

    x_sorted = permute(x, plan, top_k, backend=backend)  # the send buffer (module docstring)
    x_recv, token = _DispatchA2A.apply(x_sorted, anchor, group, recv_splits, send_splits)
    # Local expert of each received row: rows come as (source rank, local expert) blocks.
    block_expert = torch.arange(e_local, device=x.device).repeat(world_size)
    local_ids = torch.repeat_interleave(block_expert, recv_counts.reshape(-1).to(torch.int64), output_size=n_recv)
    local_plan = build_routing(local_ids.view(n_recv, 1), e_local)
    x_local = permute(x_recv, local_plan, 1, backend=backend)
    state = DispatchState(
        group=group, world_size=world_size, num_local_experts=e_local, plan=plan,
        tokens_per_local_expert=local_plan.tokens_per_expert, local_plan=local_plan,
        send_splits=send_splits, recv_splits=recv_splits, capacity=None, padded_rows=None, token=token,
    )
    return x_local, state


def _check_same_capacity(capacity: int, world_size: int, group, device: torch.device) -> None:
    theirs = _a2a(torch.full((world_size,), capacity, dtype=torch.int64, device=device), None, None, group)
    # Asynchronous on GPU (a device-side assert at the next sync), immediate on CPU; no host read.
    torch._assert_async(
        (theirs == capacity).all(),
        "dispatch: the ranks of the group use different capacities (with capacity_factor, C comes from each "
        "rank's token count: give every rank the same batch size, or a fixed ep_capacity)",
    )


def _dispatch_padded(x, plan, top_k, group, world_size, e_local, capacity, anchor):
    num_experts = world_size * e_local
    t, h = x.shape
    n = t * top_k
    dev = x.device
    offsets = plan.expert_offsets.to(torch.int64)
    counts = plan.tokens_per_expert.to(torch.int64)
    # Sender side: row e*C + c of the buffer is sorted row offsets[e] + c when c < counts[e].
    c_idx = torch.arange(capacity, device=dev)
    valid = (c_idx.unsqueeze(0) < counts.unsqueeze(1)).reshape(-1, 1)  # [E*C, 1]
    if n > 0:
        src_rows = (offsets[:-1].unsqueeze(1) + c_idx.unsqueeze(0)).clamp(max=n - 1).reshape(-1)
        tokens = plan.sorted_slots.to(torch.int64)[src_rows] // top_k
        send = torch.where(valid, x.index_select(0, tokens), x.new_zeros(()))
    else:
        send = x.new_zeros((num_experts * capacity, h))
    # Row of every slot in the padded buffer: expert * C + its position in the expert (the rule of
    # routing.apply_capacity); dropped slots (position >= C) point at the expert's last row and
    # must carry zero weight.
    slot_rows = plan.slot_rows.to(torch.int64)
    slot_expert = torch.searchsorted(offsets[1:], slot_rows, right=True)
    position = slot_rows - offsets[slot_expert]
    padded_rows = slot_expert * capacity + position.clamp(max=capacity - 1)

    x_recv, token = _DispatchA2A.apply(send, anchor, group, None, None)
    # [P, E_l, C, H] -> [E_l, P, C, H]: local-expert order, a fixed permutation.
    x_local = x_recv.view(world_size, e_local, capacity, h).transpose(0, 1).reshape(-1, h)
    tokens_local = torch.full((e_local,), world_size * capacity, dtype=torch.int32, device=dev)
    state = DispatchState(
        group=group, world_size=world_size, num_local_experts=e_local, plan=plan,
        tokens_per_local_expert=tokens_local, local_plan=None, send_splits=None, recv_splits=None,
        capacity=capacity, padded_rows=padded_rows, token=token,
    )
    return x_local, state


def combine(
    y_local: torch.Tensor,
    state: DispatchState,
    weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Send expert outputs back and combine them per token: y_local [R, H] -> out [T, H].

    y_local: the grouped MLP's output over dispatch()'s x_local (same row order); weights: [T, k]
    combine weights of this rank's tokens (in padded mode the weights of dropped slots must be zero,
    as routing.apply_capacity makes them). out[t] = sum_j weights[t, j] * expert_j(x[t]).
    Differentiable in y_local and weights.
    """
    if not isinstance(state, DispatchState):
        raise TypeError(f"state must be the DispatchState returned by dispatch(), got {type(state).__name__}")
    if not isinstance(y_local, torch.Tensor) or not y_local.is_floating_point():
        got = getattr(y_local, "dtype", type(y_local).__name__)
        raise TypeError(f"y_local must be a floating torch.Tensor, got {got}")
    rows = _local_rows(state)
    if y_local.dim() != 2 or y_local.shape[0] != rows:
        raise ValueError(f"y_local must be [R={rows}, H] (the rows of dispatch's x_local), got {tuple(y_local.shape)}")
    plan = state.plan
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2 or weights.numel() != plan.slot_rows.numel():
        raise ValueError(f"weights must be [T, k] with T*k = {plan.slot_rows.numel()}, got "
                         f"{tuple(getattr(weights, 'shape', ()))}")
    h = y_local.shape[1]
    anchor = _anchor(y_local.device)
    if state.capacity is None:
        lp = state.local_plan
        # The inverse of the regroup gather is the gather by the inverse permutation.
        inverse = lp._replace(sorted_slots=lp.slot_rows, slot_rows=lp.sorted_slots)
        y_recv = permute(y_local, inverse, 1, backend=backend)
        y_sorted = _CombineA2A.apply(y_recv, state.token, anchor, state.group, state.send_splits, state.recv_splits)
        return unpermute(y_sorted, plan, weights, backend=backend)
    p, e_local, c = state.world_size, state.num_local_experts, state.capacity
    y_recv = y_local.view(e_local, p, c, h).transpose(0, 1).reshape(-1, h)
    y_pad = _CombineA2A.apply(y_recv, state.token, anchor, state.group, None, None)
    # reference.unpermute gathers through slot_rows, which here index the padded buffer [E*C, H].
    return reference.unpermute(y_pad, plan._replace(slot_rows=state.padded_rows), weights)


def _local_rows(state: DispatchState) -> int:
    """Rows of x_local, known on the host (no sync): the received split sizes or P * E_l * C."""
    if state.capacity is None:
        return sum(state.recv_splits)
    return state.world_size * state.num_local_experts * state.capacity


__all__ = ["dispatch", "combine", "DispatchState", "group_size_and_rank"]
