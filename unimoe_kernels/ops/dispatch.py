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

Handshake: ranks that disagree on the hidden size, E, the dtype or the capacity would send row blocks
of different sizes, which aborts gloo ("Received data size doesn't match") or hangs NCCL. So the
first dispatch on a group in a process runs check_group_config: an all_gather of a fixed-size int64
payload of the settings (the same bytes on every rank whatever the settings, one host read), after
which every rank raises the same ValueError naming each setting the ranks disagree on. A rank that
fails before the exchange can tell the others through the collective they are about to enter
(abandon_exchange: the handshake, or a status column of the dropless count exchange, or a status of
the capacity check), so they raise too instead of waiting for the process-group timeout.
"""

from __future__ import annotations

import struct
import weakref
import zlib
from typing import List, Mapping, NamedTuple, Optional

import torch

from .. import reference
from ..backend import values_readable
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


# ----------------------------------------------------------------------------------------------
# Handshake: settings checked on the group before the first exchange
# ----------------------------------------------------------------------------------------------

# The payload has one size on every rank, whatever the settings, so the all_gather itself cannot
# mismatch: a header (magic, settings count, failed flag, 40 bytes of the failure's text) and
# _HS_SLOTS slots of (crc32 of the name, kind, 3 words of value).
_HS_MAGIC = 0x756E696D6F65  # "unimoe"
_HS_TEXT_WORDS = 5
_HS_HEADER = 3 + _HS_TEXT_WORDS
_HS_SLOTS = 16
_HS_WORDS = 5
_NONE, _INT, _FLOAT, _STR, _LONG_STR = range(5)
# Groups whose handshake passed in this process; weak, so a destroyed group is forgotten with it.
_GREETED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _text_words(text: str, words: int) -> list:
    raw = text.encode("utf-8")[: 8 * words].ljust(8 * words, b"\0")
    return [int.from_bytes(raw[8 * i: 8 * i + 8], "little", signed=True) for i in range(words)]


def _words_text(words) -> str:
    raw = b"".join(int(w).to_bytes(8, "little", signed=True) for w in words)
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def _encode_setting(value) -> list:
    """[kind, w0, w1, w2] of a setting value: None, bool, int, float, str or torch.dtype."""
    if value is None:
        return [_NONE, 0, 0, 0]
    if isinstance(value, (bool, int)):
        return [_INT, int(value), 0, 0]
    if isinstance(value, float):
        return [_FLOAT, struct.unpack("<q", struct.pack("<d", value))[0], 0, 0]
    text = str(value)
    if len(text.encode("utf-8")) <= 24:
        return [_STR, *_text_words(text, 3)]
    # A longer text is compared by its first 16 bytes and its crc32.
    return [_LONG_STR, *_text_words(text, 2), zlib.crc32(text.encode("utf-8"))]


def _decode_setting(kind: int, words) -> str:
    if kind == _NONE:
        return "None"
    if kind == _INT:
        return str(words[0])
    if kind == _FLOAT:
        return repr(struct.unpack("<d", struct.pack("<q", words[0]))[0])
    if kind == _STR:
        return _words_text(words)
    return _words_text(words[:2]) + "..."


def check_group_config(group, settings: Mapping[str, object], *, device: Optional[torch.device] = None,
                       what: str = "expert parallelism", failure: Optional[BaseException] = None) -> None:
    """Collective: check that every rank of `group` has the same settings, before an exchange.

    settings: at most 16 named values (None, bool, int, float, str or torch.dtype; texts over 24
    bytes are compared by their first 16 bytes and a checksum), the same names in the same order on
    every rank. Every rank gathers every rank's settings (an all_gather of 88 int64 on `device`, one
    host read) and raises the same ValueError naming each setting the ranks disagree on, with each
    rank's value. failure: this rank's own error, when it failed before the exchange; the other
    ranks then raise a RuntimeError naming it (this rank returns and re-raises its own).
    """
    dist = _dist()
    names = list(settings)
    if len(names) > _HS_SLOTS:
        raise ValueError(f"check_group_config takes at most {_HS_SLOTS} settings, got {len(names)}")
    size, rank = group_size_and_rank(group)
    words = [_HS_MAGIC, len(names), int(failure is not None)]
    words += _text_words(f"{type(failure).__name__}: {failure}" if failure is not None else "", _HS_TEXT_WORDS)
    for name in names:
        words += [zlib.crc32(name.encode("utf-8")), *_encode_setting(settings[name])]
    words += [0] * (_HS_HEADER + _HS_SLOTS * _HS_WORDS - len(words))
    mine = torch.tensor(words, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).tolist()  # the handshake's one host read

    if any(row[0] != _HS_MAGIC for row in table):
        raise RuntimeError(f"{what}: a rank of the group answered the settings handshake with another collective; "
                           "every rank must run the same sequence of expert-parallel calls")
    failed = [r for r, row in enumerate(table) if row[2]]
    if failed:
        if failure is not None:
            return
        why = "; ".join(f"rank {r}: {_words_text(table[r][3:_HS_HEADER])}" for r in failed)
        raise RuntimeError(f"{what}: rank(s) {failed} of the expert-parallel group failed before the exchange "
                           f"({why}); this rank stops too instead of waiting for them")
    name_hashes = [row[_HS_HEADER::_HS_WORDS] for row in table]
    if any(row[1] != len(names) or hashes != name_hashes[rank] for row, hashes in zip(table, name_hashes)):
        raise ValueError(f"{what}: the ranks of the group compare different lists of settings; every rank must "
                         "run the same version of unimoe_kernels")
    wrong = []
    for i, name in enumerate(names):
        lo = _HS_HEADER + i * _HS_WORDS + 1
        values = [tuple(row[lo: lo + 4]) for row in table]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {_decode_setting(v[0], v[1:])}" for r, v in enumerate(values))
            wrong.append(f"{name} ({shown})")
    if wrong:
        raise ValueError(f"{what}: the ranks of the expert-parallel group disagree on {'; '.join(wrong)}. Every rank "
                         "must build and call the layer with the same settings")


def _exchange_settings(x: torch.Tensor, num_experts: int, top_k: int, capacity: Optional[int],
                       check_capacity: bool) -> dict:
    """The settings every rank's exchange must agree on, by the names SparseMoE users know them."""
    mode = "dropless" if capacity is None else "capacity_factor" if check_capacity else "ep_capacity"
    return {
        "hidden_size": x.shape[1],
        "num_experts": num_experts,
        "top_k": top_k,
        "dtype of the exchanged rows": x.dtype,
        "capacity mode": mode,
        "ep_capacity": capacity if mode == "ep_capacity" else None,
    }


def _handshake_once(group, settings: dict, device: torch.device) -> None:
    """check_group_config on the first dispatch of this process on `group` (the same call on every
    rank, so every rank takes part or none does)."""
    if group in _GREETED:
        return
    check_group_config(group, settings, device=device, what="dispatch")
    _GREETED[group] = True


def abandon_exchange(group, num_experts: int, error: BaseException, *, device: torch.device,
                     mode: str = "dropless") -> None:
    """Tell the other ranks of `group` that this rank failed before dispatch, through the collective
    they are about to enter, so they raise too instead of waiting for the process-group timeout.

    Call it where a rank gives up before dispatch (SparseMoE does for its argument checks), then
    re-raise. mode: the dispatch the others run, "dropless" (capacity=None), "capacity_factor"
    (check_capacity=True) or "ep_capacity" (a fixed capacity). Covered: the first dispatch on the
    group (the handshake), dropless dispatch (a status column of the count exchange) and
    capacity_factor's capacity check. A fixed capacity has no collective before its row exchange:
    the others then wait for the process-group timeout (docs/expert_parallel.md says how to set it).
    """
    size, _ = group_size_and_rank(group)
    if group not in _GREETED:
        check_group_config(group, {}, device=device, what="dispatch", failure=error)
    elif mode == "dropless":
        status = torch.zeros((size, num_experts // size + 1), dtype=torch.int64, device=device)
        status[:, -1] = 1
        _a2a(status, None, None, group)
    elif mode == "capacity_factor":
        _a2a(torch.tensor([[-1, 1]] * size, dtype=torch.int64, device=device), None, None, group)


def abandon_exchange_quietly(group, num_experts: int, error: BaseException, **kwargs) -> None:
    """abandon_exchange on a best-effort basis: a failure to reach the others (a broken group, a
    device error) must not hide `error`, which the caller re-raises."""
    try:
        abandon_exchange(group, num_experts, error, **kwargs)
    except Exception:  # noqa: BLE001 - the caller's error is the one to report
        pass


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
    otherwise abort gloo or hang NCCL in the row exchange). The first dispatch on a group in this
    process runs the settings handshake (check_group_config: hidden size, E, top_k, dtype, capacity
    mode and fixed capacity; the same ValueError on every rank when they differ). A rank that fails
    before calling dispatch should call abandon_exchange so the others raise too. Differentiable in x.
    """
    world_size, _ = group_size_and_rank(group)
    e_local = _check_plan_args(x, plan, top_k, world_size)
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ValueError(f"capacity must be a positive int (rows per rank and expert) or None, got {capacity!r}")
    _handshake_once(group, _exchange_settings(x, world_size * e_local, top_k, capacity, check_capacity), x.device)
    anchor = _anchor(x.device)
    if capacity is not None:
        if check_capacity:
            _check_same_capacity(capacity, world_size, group, x.device)
        return _dispatch_padded(x, plan, top_k, group, world_size, e_local, capacity, anchor)

    # [P, E_l + 1]: row p = my slots for rank p's experts, then my status (1: abandon_exchange).
    counts = plan.tokens_per_expert.view(world_size, e_local).to(torch.int64)
    recv = _a2a(torch.cat([counts, counts.new_zeros((world_size, 1))], dim=1), None, None, group)
    recv_counts = recv[:, :e_local]  # rank p's slots for my experts
    # The one host sync: split sizes of all_to_all_single are Python ints (the statuses come along).
    sizes = torch.cat([counts.sum(1), recv_counts.sum(1), recv[:, e_local]]).tolist()
    send_splits, recv_splits = sizes[:world_size], sizes[world_size:2 * world_size]
    failed = [r for r, status in enumerate(sizes[2 * world_size:]) if status]
    if failed:
        raise RuntimeError(f"dispatch: rank(s) {failed} of the expert-parallel group failed before the exchange "
                           "(their own errors say why); this rank stops too instead of waiting for them")
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
    # [P, 2]: (capacity, status); status 1 comes from a rank that abandoned the exchange.
    mine = torch.tensor([capacity, 0], dtype=torch.int64, device=device).expand(world_size, 2)
    theirs = _a2a(mine, None, None, group)
    if values_readable(theirs) and bool(theirs[:, 1].any()):
        failed = theirs[:, 1].nonzero().flatten().tolist()
        raise RuntimeError(f"dispatch: rank(s) {failed} of the expert-parallel group failed before the exchange "
                           "(their own errors say why); this rank stops too instead of waiting for them")
    # Asynchronous on GPU (a device-side assert at the next sync), immediate on CPU; no host read.
    torch._assert_async(
        (theirs == mine).all(),
        "dispatch: the ranks of the group use different capacities (with capacity_factor, C comes from each "
        "rank's token count: give every rank the same batch size, or a fixed ep_capacity), or a rank failed "
        "before the exchange",
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


__all__ = ["dispatch", "combine", "DispatchState", "group_size_and_rank", "check_group_config", "abandon_exchange",
           "abandon_exchange_quietly"]
