"""The Triton grouped expert MLP as custom ops with autograd: forward and backward bodies.

Data flow (N expert-sorted rows, expert e owns rows offsets[e] .. offsets[e+1]-1, s = lora_scale,
g the optional rank gates; every line is one grouped_mm launch unless it says otherwise):

    forward (unimoe::grouped_mlp_fwd)
      z = x W_gu[e]^T + s (xa*g_gu) B_gu[e]^T + b_gu[e], h = act(z)    up / up_glu: xa = x' A_gu^T is
                                                            the side product of the same K loop
      y = h W_d[e]^T + s (ha*g_d) B_d[e]^T + b_d[e]         down: ha = h' A_d^T likewise

    backward (unimoe::grouped_mlp_bwd), dy [N, H]
      dh = dy W_d[e] + s (dyb*g_d) A_d[e] -> dz = dh act'(z), h = act(z)   dact: dyb = dy B_d;
      db_gu[e] = sum of dz over e's rows                                   its epilogue + expert_colsum
      db_d[e] = sum of dy over e's rows                                    expert_colsum
      dW_d = dy^T h, dA_d = s (dyb*g_d)^T h', dB_d = s dy^T (ha*g_d)       grouped_xty each
      dx = dz W_gu[e] + s (dzb*g_gu) A_gu[e]                               dgrad: dzb = dz B_gu
      dW_gu = dz^T x, dA_gu = s (dzb*g_gu)^T x', dB_gu = s dz^T (xa*g_gu)  grouped_xty each
      dg_gu = s dzb * xa, dg_d = s dyb * ha                                torch, [N, r]

The biases b_gu [E, 2F|F], b_d [E, H] are optional. With an ":interleaved" activation, z, dz,
W_gu, B_gu and b_gu hold gate and up columns alternately: the epilogues of the up projection and
of dact read and write them in column pairs, and as dz has W_gu's layout, dgrad and dW_gu never
see it.

x' and h' are the LoRA inputs under LoRA dropout (PEFT semantics: dropout on the LoRA input only).
Its masks are never stored: two philox seeds are drawn on the device per call and every kernel that
reads a LoRA input or writes its gradient regenerates the mask of element (row, col) from (seed,
row * cols + col); xa and ha saved for backward already include it.

Saved between forward and backward: x (the input; with gather_index the token matrix, so the
permuted copy is never saved), z [N, 2F|F] only when save_preact (with recompute, or when no
gradient is wanted, z is neither stored nor saved and backward reruns the first GEMM), xa and ha
([N, r] each) and the rank gates. Base weight gradients are computed only when the base requires
grad; with a frozen base no dW kernel runs and B·A is never materialised.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..types import is_interleaved
from .grouped_gemm_launch import LoRASide, act_code, expert_colsum, grouped_mm, grouped_xty, narrow_config
from .permute import _combine_impl


def _empty(ref: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an absent result is a 0-element tensor.
    return ref.new_empty((0,))


def _seed_pair(seeds, p):
    """Dropout descriptors (seed, p) of the LoRA inputs x and h, or (None, None) without dropout."""
    if seeds is None or p <= 0.0:
        return None, None
    return (seeds[0:1], p), (seeds[1:2], p)


def _with_mode(drop: Optional[tuple], mode: int) -> Optional[tuple]:
    return None if drop is None else (*drop, mode)


def _gated(t: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    """t [N, r] times the rank gate g [N, r] (fp32 product, t's dtype out), or t without a gate."""
    if g is None:
        return t
    return (t * g).to(t.dtype)


def _gemm1(x, w_gu, a_gu, b_gu, xa, g_gu, offsets, activation, scale, hid, z, gather, drop_x, bias=None):
    """hid = act(x W_gu^T + s (xa g) B_gu^T + bias) [N, F], with xa = x' A_gu^T written into xa when
    LoRA is on; the pre-activation goes to z [N, 2F|F] unless z is None."""
    act, glu, consts = act_code(activation)
    fdim = hid.shape[1]
    # W_gu [E, 2F|F, H] read as [E, K=H, 2F|F]; GLU: columns n (gate) and F + n (up).
    w1 = w_gu.transpose(1, 2)
    lora = None
    if a_gu is not None:
        # A_gu [E, r, H] read as [E, K=H, R]; B_gu [E, 2F|F, r] as [E, R, 2F|F].
        lora = LoRASide(a_gu.transpose(1, 2), b_gu.transpose(1, 2), xa, scale, g_gu)
    z_ = z if z is not None else hid
    grouped_mm(
        x, w1, hid, offsets, role="up_glu" if glu else "up", nout=fdim, lora=lora, epilogue=1, act=act,
        act_consts=consts, glu=glu, z=z_, store_z=z is not None, up_offsets=(fdim * z_.stride(1), 0),
        interleaved=is_interleaved(activation),
        dropout=_with_mode(drop_x, 1) if lora is not None else None, gather=gather, bias=bias,
    )


def _fwd_impl(x, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, seeds, dropout_p, save_preact,
              gather, g_gu=None, g_d=None, slot_rows=None, top_k=1, weights=None, bias_gu=None, bias_d=None):
    hdim = x.shape[1]
    n = gather.numel() if gather is not None else x.shape[0]
    fdim = w_d.shape[2]
    has_lora = a_gu is not None
    drop_x, drop_h = _seed_pair(seeds, dropout_p)
    # Without save_preact z is the [0] placeholder and backward recomputes it (1-D marks that).
    z = x.new_empty((n, w_gu.shape[1])) if save_preact else _empty(x)
    hid = x.new_empty((n, fdim))
    y = x.new_empty((n, hdim))
    # Distinct placeholders: a custom op's outputs may not alias each other.
    xa = x.new_empty((n, a_gu.shape[1])) if has_lora else _empty(x)
    ha = x.new_empty((n, a_d.shape[1])) if has_lora else _empty(x)
    _gemm1(x, w_gu, a_gu, b_gu, xa, g_gu, offsets, activation, scale, hid, z if save_preact else None, gather,
           drop_x, bias_gu)
    lora2 = LoRASide(a_d.transpose(1, 2), b_d.transpose(1, 2), ha, scale, g_d) if has_lora else None
    grouped_mm(hid, w_d.transpose(1, 2), y, offsets, role="down", nout=hdim, lora=lora2,
               dropout=_with_mode(drop_h, 1) if has_lora else None, bias=bias_d)
    if weights is not None:
        # Fused with the weighted combine: y_sorted is a temporary, neither returned nor saved.
        y = _combine_impl(y, slot_rows, weights, top_k)
    return y, z, xa, ha


def _narrow(x, w, offsets, role):
    """x [N, K] times the rank-wide w ([E, K, r]): a side product computed on its own, for when the
    GEMM it is normally fused into does not run."""
    n, r = x.shape[0], w.shape[2]
    out = x.new_empty((n, r))
    cfg = narrow_config(role, x.dtype, x.shape[1], r, w.shape[0], n, x.device)
    grouped_mm(x, w, out, offsets, role=role, nout=r, cfg=cfg)
    return out


def _bwd_impl(dy, x, z, xa, ha, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, seeds, dropout_p,
              need_dx, need_dw_gu, need_dw_d, need_lora, gather, slot_rows, top_k, g_gu=None, g_d=None,
              need_gates=False, weights=None, need_dweights=False, bias_gu=None, bias_d=None, need_dbias_gu=False,
              need_dbias_d=False):
    hdim = x.shape[1]
    n = dy.shape[0]
    fdim = w_d.shape[2]
    act, glu, consts = act_code(activation)
    has_lora = a_gu is not None
    drop_x, drop_h = _seed_pair(seeds, dropout_p)
    # The kernels read dy through its strides, so a row-strided gradient (a slice of a wider one)
    # is not copied; a non-unit column stride or a broadcast row (stride 0) is materialised, as
    # before, rather than handed to the TMA descriptors.
    if dy.stride(-1) != 1 or dy.stride(0) == 0:
        dy = dy.contiguous()
    # With weights, dy is d(out) [T, H] of the combined output: the dact kernel gathers its rows per
    # token and scales them by the routing weight of each sorted row (w_sorted[slot_rows[s]] = w[s]).
    w_sorted = None
    if weights is not None:
        w_flat = weights.reshape(-1).to(torch.float32)
        w_sorted = torch.empty_like(w_flat).index_put_((slot_rows.to(torch.int64),), w_flat)
    n = w_sorted.numel() if w_sorted is not None else n
    if z.dim() == 1:
        # Pre-activation not saved: the first GEMM again. Its h and side product are scratch (the
        # dact kernel recomputes h from z; xa was saved).
        z = x.new_empty((n, w_gu.shape[1]))
        scratch = x.new_empty(xa.shape) if has_lora else None
        _gemm1(x, w_gu, a_gu, b_gu, scratch, g_gu, offsets, activation, scale, x.new_empty((n, fdim)), z, gather,
               drop_x, bias_gu)
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d = (_empty(x) for _ in range(7))
    dg_gu, dg_d, dweights, dbias_gu, dbias_d = (_empty(x) for _ in range(5))
    if need_dbias_d and bias_d is not None:
        dbias_d = torch.empty_like(bias_d)
        # With weights, dy of sorted row r is w_r d(out)[token(r)]: gathered and scaled in the sum.
        expert_colsum(dy, offsets, dbias_d, gather=gather if w_sorted is not None else None, row_scale=w_sorted)

    lora2 = dyb = None
    if has_lora:
        dyb = x.new_empty((n, a_d.shape[1]))
        # dy B_d as the side product: B_d [E, H, r] is [E, K=H, R]; A_d [E, r, F] is [E, R, NOUT].
        lora2 = LoRASide(b_d, a_d, dyb, scale, g_d)
    dz = x.new_empty(z.shape)
    hid = x.new_empty((n, fdim))
    want_dbias_gu = need_dbias_gu and bias_gu is not None
    if want_dbias_gu:
        dbias_gu = torch.empty_like(bias_gu)
    # dy W_d: W_d [E, H, F] is already [E, K=H, NOUT=F]. With weights, hid is h scaled by the
    # routing weight of its row and dyb = d(out) B_d unscaled.
    ds = grouped_mm(
        dy, w_d, dz, offsets, role="dact", nout=fdim, lora=lora2, epilogue=2, act=act, act_consts=consts, glu=glu,
        z=z, h=hid, up_offsets=(fdim * z.stride(1), fdim * dz.stride(1)), interleaved=is_interleaved(activation),
        dropout=_with_mode(drop_h, 2) if has_lora else None,
        gather=gather if w_sorted is not None else None, row_scale=w_sorted,
        dbias=dbias_gu if want_dbias_gu else None,
    )
    if w_sorted is not None and need_dweights:
        dweights = ds[slot_rows.to(torch.int64)].view(-1, top_k)
        if bias_d is not None:
            # y of a slot also holds b_d[e]: <d(out)[t], b_d[e]> from one [T, H] x [H, E] product,
            # each slot's expert found from its sorted row and the offsets.
            expert = torch.searchsorted(offsets, slot_rows, right=True) - 1
            dweights = dweights + (dy.float() @ bias_d.float().T).gather(1, expert.view(-1, top_k).long())
        dweights = dweights.to(weights.dtype)
    if has_lora and g_d is not None and need_gates:
        dg_d = torch.mul(dyb.to(torch.float32), ha).mul_(scale)
        if w_sorted is not None:
            dg_d.mul_(w_sorted[:, None])
    if need_dw_d:
        dw_d = torch.empty_like(w_d)
        if w_sorted is None:
            grouped_xty(dy, hid, dw_d, offsets)
        else:
            # dW_d[e] = sum_r w_r d(out)[t_r]^T h_r: written transposed, (w h)^T d(out) gathered.
            grouped_xty(hid, dy, dw_d.transpose(1, 2), offsets, gather_y=gather)
    if has_lora and need_lora:
        da_d = torch.empty_like(a_d)
        # s (g dyb)^T h' is the same with (unscaled dyb, scaled h) as with (scaled dyb, h).
        grouped_xty(_gated(dyb, g_d), hid, da_d, offsets, scale, dropout=drop_h)
        db_d = torch.empty_like(b_d)
        if w_sorted is None:
            grouped_xty(dy, _gated(ha, g_d), db_d, offsets, scale)
        else:
            u = ha.to(torch.float32) * w_sorted[:, None]
            if g_d is not None:
                u = u * g_d
            grouped_xty(u.to(ha.dtype), dy, db_d.transpose(1, 2), offsets, scale, gather_y=gather)

    dzb = None
    if has_lora:
        dzb = x.new_empty((n, a_gu.shape[1]))
    if need_dx:
        dx = x.new_empty((n, hdim))
        # dz W_gu: W_gu [E, 2F|F, H] = [E, K, H]; dz B_gu as the side product, B_gu [E, 2F|F, r] = [E, K, R].
        lora1 = LoRASide(b_gu, a_gu, dzb, scale, g_gu) if has_lora else None
        grouped_mm(dz, w_gu, dx, offsets, role="dgrad", nout=hdim, lora=lora1,
                   dropout=_with_mode(drop_x, 2) if has_lora else None)
        if gather is not None:
            # dx[t] = sum_j dx_sorted[slot_rows[t*k + j]]: the combine kernel with unit weights
            # (fp32 sums, one writer per token, no atomics, no gathered copy).
            dx = _combine_impl(dx, slot_rows, None, top_k)
    elif has_lora and (need_lora or need_gates):
        dzb = _narrow(dz, b_gu, offsets, "dgrad")
    if has_lora and g_gu is not None and need_gates:
        dg_gu = torch.mul(dzb.to(torch.float32), xa).mul_(scale)
    if need_dw_gu:
        dw_gu = torch.empty_like(w_gu)
        grouped_xty(dz, x, dw_gu, offsets, gather_y=gather)
    if has_lora and need_lora:
        da_gu = torch.empty_like(a_gu)
        grouped_xty(_gated(dzb, g_gu), x, da_gu, offsets, scale, dropout=drop_x, gather_y=gather)
        db_gu = torch.empty_like(b_gu)
        grouped_xty(dz, _gated(xa, g_gu), db_gu, offsets, scale)
    return dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d, dg_gu, dg_d, dweights, dbias_gu, dbias_d


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, traced through their fake implementations)
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("unimoe::grouped_mlp_fwd", mutates_args=())
def grouped_mlp_fwd(
    x: torch.Tensor,
    offsets: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    a_gate_up: Optional[torch.Tensor],
    b_gate_up: Optional[torch.Tensor],
    a_down: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    scale: float,
    seeds: Optional[torch.Tensor],
    dropout_p: float,
    save_preact: bool = True,
    gather_index: Optional[torch.Tensor] = None,
    slot_rows: Optional[torch.Tensor] = None,
    top_k: int = 1,
    rank_gate_gate_up: Optional[torch.Tensor] = None,
    rank_gate_down: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    bias_gate_up: Optional[torch.Tensor] = None,
    bias_down: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [N, H], z [N, 2F|F] or [0] when not save_preact, xa [N, r] or [0], ha [N, r] or [0]).

    With weights [T, k] (and gather_index), y is the weighted combine out [T, H] instead:
    out[t] = sum_j weights[t, j] y_sorted[slot_rows[t*k + j]], and y_sorted is never kept.

    offsets [E+1]: expert e owns sorted rows offsets[e] .. offsets[e+1]-1. With gather_index [N]
    (and slot_rows [N], top_k for backward), x is the token matrix [T, H] and sorted row r reads
    x[gather_index[r]]; otherwise x is x_sorted [N, H]. rank_gate_* [N, r] fp32 (sorted rows; both
    or neither, LoRA only) gate the rank-1 pieces of the LoRA terms; xa and ha are returned ungated.
    bias_gate_up [E, 2F|F] (z's column layout) and bias_down [E, H] are added to z and y.
    """
    return _fwd_impl(x, offsets, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down, activation, scale,
                     seeds, dropout_p, save_preact, gather_index, rank_gate_gate_up, rank_gate_down, slot_rows, top_k,
                     weights, bias_gate_up, bias_down)


@grouped_mlp_fwd.register_fake
def _(x, offsets, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down, activation, scale, seeds, dropout_p,
      save_preact=True, gather_index=None, slot_rows=None, top_k=1, rank_gate_gate_up=None, rank_gate_down=None,
      weights=None, bias_gate_up=None, bias_down=None):
    n = gather_index.shape[0] if gather_index is not None else x.shape[0]
    lora = a_gate_up is not None
    return (
        x.new_empty((weights.shape[0] if weights is not None else n, down_proj.shape[1])),
        x.new_empty((n, gate_up_proj.shape[1])) if save_preact else x.new_empty((0,)),
        x.new_empty((n, a_gate_up.shape[1])) if lora else x.new_empty((0,)),
        x.new_empty((n, a_down.shape[1])) if lora else x.new_empty((0,)),
    )


@torch.library.custom_op("unimoe::grouped_mlp_bwd", mutates_args=())
def grouped_mlp_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    xa: torch.Tensor,
    ha: torch.Tensor,
    offsets: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    a_gate_up: Optional[torch.Tensor],
    b_gate_up: Optional[torch.Tensor],
    a_down: Optional[torch.Tensor],
    b_down: Optional[torch.Tensor],
    activation: str,
    scale: float,
    seeds: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_dw_gate_up: bool,
    need_dw_down: bool,
    need_lora: bool,
    gather_index: Optional[torch.Tensor] = None,
    slot_rows: Optional[torch.Tensor] = None,
    top_k: int = 1,
    rank_gate_gate_up: Optional[torch.Tensor] = None,
    rank_gate_down: Optional[torch.Tensor] = None,
    need_rank_gates: bool = False,
    weights: Optional[torch.Tensor] = None,
    need_weights: bool = False,
    bias_gate_up: Optional[torch.Tensor] = None,
    bias_down: Optional[torch.Tensor] = None,
    need_bias_gate_up: bool = False,
    need_bias_down: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d gate_up_proj, d down_proj, dA_gu, dB_gu, dA_d, dB_d, d rank_gate_gate_up [N, r] fp32,
    d rank_gate_down [N, r] fp32, d weights [T, k], d bias_gate_up, d bias_down); results not asked
    for are [0]. With weights, dy is d(out) [T, H] of the combined output."""
    return _bwd_impl(dy, x, z, xa, ha, offsets, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down,
                     activation, scale, seeds, dropout_p, need_dx, need_dw_gate_up, need_dw_down, need_lora,
                     gather_index, slot_rows, top_k, rank_gate_gate_up, rank_gate_down, need_rank_gates, weights,
                     need_weights, bias_gate_up, bias_down, need_bias_gate_up, need_bias_down)


@grouped_mlp_bwd.register_fake
def _(dy, x, z, xa, ha, offsets, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down, activation, scale,
      seeds, dropout_p, need_dx, need_dw_gate_up, need_dw_down, need_lora, gather_index=None, slot_rows=None,
      top_k=1, rank_gate_gate_up=None, rank_gate_down=None, need_rank_gates=False, weights=None, need_weights=False,
      bias_gate_up=None, bias_down=None, need_bias_gate_up=False, need_bias_down=False):
    def maybe(flag, like):
        return torch.empty_like(like) if flag and like is not None else x.new_empty((0,))

    lora = need_lora and a_gate_up is not None
    gates = need_rank_gates and a_gate_up is not None
    return (
        maybe(need_dx, x), maybe(need_dw_gate_up, gate_up_proj), maybe(need_dw_down, down_proj),
        maybe(lora, a_gate_up), maybe(lora, b_gate_up), maybe(lora, a_down), maybe(lora, b_down),
        maybe(gates, rank_gate_gate_up), maybe(gates, rank_gate_down), maybe(need_weights, weights),
        maybe(need_bias_gate_up, bias_gate_up), maybe(need_bias_down, bias_down),
    )


def _setup_context(ctx, inputs, output):
    (x, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, seeds, dropout_p, _save_preact, gather_index,
     slot_rows, top_k, g_gu, g_d, weights, bias_gu, bias_d) = inputs
    _, z, xa, ha = output
    ctx.activation, ctx.scale, ctx.dropout_p, ctx.top_k = activation, scale, dropout_p, top_k
    ctx.has_lora = a_gu is not None
    ctx.has_gates = g_gu is not None
    ctx.save_for_backward(x, z, xa, ha, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, seeds, gather_index, slot_rows,
                          g_gu, g_d, weights, bias_gu, bias_d)


def _backward(ctx, dy, _dz, _dxa, _dha):
    (x, z, xa, ha, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, seeds, gather_index, slot_rows, g_gu,
     g_d, weights, bias_gu, bias_d) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_lora = ctx.has_lora and any(need[4:8])
    need_gates = ctx.has_lora and ctx.has_gates and any(need[16:18])
    grads = grouped_mlp_bwd(
        dy, x, z, xa, ha, offsets, w_gu, w_d, a_gu, b_gu, a_d, b_d, ctx.activation, ctx.scale, seeds, ctx.dropout_p,
        need[0], need[2], need[3], need_lora, gather_index, slot_rows, ctx.top_k, g_gu, g_d, need_gates,
        weights, weights is not None and need[18], bias_gu, bias_d, bias_gu is not None and need[19],
        bias_d is not None and need[20],
    )
    dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d, dg_gu, dg_d, dweights, dbias_gu, dbias_d = grads
    return (
        dx if need[0] else None, None,
        dw_gu if need[2] else None, dw_d if need[3] else None,
        da_gu if need_lora and need[4] else None, db_gu if need_lora and need[5] else None,
        da_d if need_lora and need[6] else None, db_d if need_lora and need[7] else None,
        None, None, None, None, None, None, None, None,
        dg_gu if need_gates and need[16] else None, dg_d if need_gates and need[17] else None,
        dweights if weights is not None and need[18] else None,
        dbias_gu if bias_gu is not None and need[19] else None,
        dbias_d if bias_d is not None and need[20] else None,
    )


grouped_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["grouped_mlp_fwd", "grouped_mlp_bwd"]
