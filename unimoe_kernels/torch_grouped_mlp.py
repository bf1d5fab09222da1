"""The torch path's grouped expert MLP as two custom ops: the CPU kernels behind reference.grouped_mlp.

Data flow (N expert-sorted rows, expert e owns the next counts[e] rows R_e, s = lora_scale, g the
optional rank gates [N, r], x' = x or dropout(x) and m the dropout mask of h, both made outside,
b_gu [E, 2F|F] and b_d [E, H] the optional per-expert biases, 0 where absent):

    forward  unimoe::torch_grouped_mlp_fwd, per expert e (one loop, rows R_e at a time):
      xa = x'_R A_gu[e]^T                        [n, r]    side products, saved (ungated)
      z  = x_R W_gu[e]^T + s (xa * g_gu) B_gu[e]^T + b_gu[e]   pre-activation [n, 2F|F], saved for backward
      h  = act(z),  h' = h * m                    (b_gu in z's own column layout: halves or interleaved)
      ha = h'_R A_d[e]^T                          [n, r]
      y_R = h W_d[e]^T + s (ha * g_d) B_d[e]^T + b_d[e]    [n, H]
    backward unimoe::torch_grouped_mlp_bwd, per expert e, dy [N, H]:
      h = act(z) again (cheap, the block is in cache); dyb = dy_R B_d[e]
      dW_d = dy^T h, dB_d = s dy^T (ha*g_d), dA_d = s (dyb*g_d)^T h', dg_d = s dyb * ha, db_d[e] = sum_R dy
      dh = dy W_d[e] + s ((dyb*g_d) A_d[e]) * m;  dz = act'(z) dh (activations.activation_backward)
      dW_gu = dz^T x, dB_gu = s dz^T (xa*g_gu), dzb = dz B_gu[e], dA_gu = s (dzb*g_gu)^T x', db_gu[e] = sum_R dz
      dx = dz W_gu[e] (+ s (dzb*g_gu) A_gu[e] when x' is x; else that part is d(x'), and autograd
      takes it through the dropout outside), dg_gu = s dzb * xa

Why custom ops with a loop inside: the group sizes are data. Read with .tolist() in traced Python,
they make torch.compile break the graph (an error with fullgraph=True) and torch.export fail. As
custom ops the whole MLP is one node that tracers see through its fake implementation (shapes
only), so a layer on the torch path compiles into one graph and exports. The loop runs inside, at
run time, one expert's rows at a time (_OneExpert): each block's GEMM, activation and their backward
run while the block is in cache. Measured at the `bench` shape on 2 cores this is what keeps the CPU
path at the dense chain's speed: torch._grouped_mm for each GEMM (one call over all experts) with
the activation on whole [N, 2F] tensors between them was ~10% slower without LoRA and ~20% with
r=8, the elementwise passes over tensors larger than the cache costing more than the per-expert
calls. With many experts of few rows (128 experts, a few tokens each) it is the other way round,
and the same code runs once over all rows with torch._grouped_mm GEMMs (_AllExperts; _blocks picks).

Weight gradients are computed only for weights that require grad (a frozen base costs no dW GEMM)
and B·A is never formed. A bias gradient is a row sum per expert accumulated in fp32 (fp64 for
fp64), zero for idle experts; only b_gu's needs dz. Any floating dtype (fp64 for gradcheck); operands
share x's dtype (the callers cast under autocast), rank gates and biases are cast to it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Optional

import torch

from .activations import activation_backward, apply_activation
from .types import compute_dtype, is_glu


def _empty(ref: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: an absent result is a 0-element tensor.
    return ref.new_empty((0,))


class _OneExpert:
    """Expert e's block of rows: each GEMM one torch.mm on the block, so the block's GEMMs and
    elementwise work run back to back while it is in cache (blocks of many rows)."""

    def __init__(self, e: int, rows: slice):
        self.e, self.rows = e, rows

    def lin(self, a, w, out=None):  # a @ w[e]^T
        return torch.mm(a, w[self.e].t(), out=out)

    def lin_t(self, a, w, out=None):  # a @ w[e]
        return torch.mm(a, w[self.e], out=out)

    def add_lin(self, acc, a, w, alpha):  # acc += alpha a @ w[e]^T, in the GEMM's own accumulation
        acc.addmm_(a, w[self.e].t(), alpha=alpha)

    def add_lin_t(self, acc, a, w, alpha):
        acc.addmm_(a, w[self.e], alpha=alpha)

    def wgrad(self, a, b, dw, alpha=1.0):  # dw[e] = alpha a^T b
        torch.mm(a.t(), b, out=dw[self.e])
        if alpha != 1.0:
            dw[self.e].mul_(alpha)

    def add_bias(self, acc, bias):  # acc [n, C] += bias[e] [C], broadcast over the block's rows
        acc.add_(bias[self.e].to(acc.dtype))

    def bias_grad(self, d, db):  # db[e] = sum of d's rows, accumulated in fp32 whatever d's dtype
        db[self.e].copy_(d.sum(0, dtype=compute_dtype(d.dtype)))


class _AllExperts:
    """Every expert's rows at once, each GEMM one torch._grouped_mm over the groups: for blocks of
    few rows, where a Python step per expert would cost more than the GEMMs."""

    rows = slice(None)

    def __init__(self, ends: torch.Tensor):
        self.ends = ends
        self._row_expert = None

    def row_expert(self) -> torch.Tensor:
        """[N] int64, the expert of each row; only the bias steps need it, so made on first use."""
        if self._row_expert is None:
            ends = self.ends.to(torch.int64)
            counts = torch.diff(ends, prepend=ends.new_zeros(1))
            experts = torch.arange(len(counts), device=ends.device)
            self._row_expert = torch.repeat_interleave(experts, counts, output_size=int(ends[-1]))
        return self._row_expert

    @staticmethod
    def _into(result, out):
        return result if out is None else out.copy_(result)

    def lin(self, a, w, out=None):
        return self._into(torch._grouped_mm(a, w.transpose(1, 2), offs=self.ends), out)

    def lin_t(self, a, w, out=None):
        return self._into(torch._grouped_mm(a, w, offs=self.ends), out)

    def add_lin(self, acc, a, w, alpha):
        acc.add_(self.lin(a, w), alpha=alpha)

    def add_lin_t(self, acc, a, w, alpha):
        acc.add_(self.lin_t(a, w), alpha=alpha)

    def wgrad(self, a, b, dw, alpha=1.0):
        # The K-grouped form: a^T [M, N] @ b [N, K] split along N -> [E, M, K], zeros for idle experts.
        dw.copy_(torch._grouped_mm(a.t(), b, offs=self.ends))
        if alpha != 1.0:
            dw.mul_(alpha)

    def add_bias(self, acc, bias):  # acc [N, C] += bias[expert of each row]
        acc.add_(bias.to(acc.dtype).index_select(0, self.row_expert()))

    def bias_grad(self, d, db):
        # A segment sum into zeros, so idle experts get exact zeros; index_add_ on CPU adds the rows in
        # order (deterministic).
        acc = torch.zeros(db.shape, dtype=compute_dtype(d.dtype), device=d.device)
        db.copy_(acc.index_add_(0, self.row_expert(), d.to(acc.dtype)))


# torch._grouped_mm's CPU kernel takes fp32 / bf16 / fp16 operands whose strides (all but the unit
# one) are multiples of 16 bytes, on 16-byte aligned storage.
_GMM_ALIGN = 16
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# When one torch._grouped_mm per GEMM (all experts at once, activations on whole tensors) beats a
# torch.mm per expert block: with many experts of few rows, where the per-expert Python steps add
# up. Measured on 2 cores, fp32, forward+backward: with 128 experts (H 64..512) grouped is 1.2-1.9x
# faster at <= 16 rows per expert and even at 32, the per-expert path from 64 rows up (1.1-1.2x);
# with 8 experts of F=1024 the per-expert path wins at every size without LoRA.
_GROUPED_BELOW_ROWS = 32  # average rows per active expert
_GROUPED_MIN_EXPERTS = 16  # active experts


def _gmm_takes(*tensors) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or t.dtype not in _GMM_DTYPES or t.numel() == 0 or t.data_ptr() % _GMM_ALIGN:
            return False
        if 1 not in (t.stride(-1), t.stride(-2)):
            return False
        if any(s * t.element_size() % _GMM_ALIGN for s in t.stride() if s != 1):
            return False
    return True


def _blocks(counts: torch.Tensor, *operands):
    """The blocks to walk: every expert at once (_AllExperts) for many experts of few rows when
    torch._grouped_mm takes the operands, else each expert with rows (_OneExpert). Reads the counts
    on the host once; also returns the idle experts, whose weight gradients are zero."""
    cl = counts.tolist()
    idle = [e for e, n in enumerate(cl) if n == 0]
    active = len(cl) - len(idle)
    if (active >= max(_GROUPED_MIN_EXPERTS, 1) and sum(cl) <= _GROUPED_BELOW_ROWS * active
            and _gmm_takes(*operands)):
        ends = torch.cumsum(counts.to(torch.int64), 0).to(torch.int32)
        return [_AllExperts(ends)], idle
    blocks, start = [], 0
    for e, n in enumerate(cl):
        if n:
            blocks.append(_OneExpert(e, slice(start, start + n)))
        start += n
    return blocks, idle


def _gated(t: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    return t if g is None else t * g.to(t.dtype)


def _fwd_impl(x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, x_lora, mask_h, g_gu, g_d,
              bias_gu, bias_d, save_preact):
    n, hdim = x.shape
    lora = a_gu is not None
    xl = x if x_lora is None else x_lora
    y = x.new_empty((n, hdim))
    z_all = x.new_empty((n, w_gu.shape[1])) if save_preact else _empty(x)
    xa_all = x.new_empty((n, a_gu.shape[1])) if lora else _empty(x)
    ha_all = x.new_empty((n, a_d.shape[1])) if lora else _empty(x)
    blocks, _ = _blocks(counts, x, x_lora, mask_h, w_gu, w_d, a_gu, b_gu, a_d, b_d)
    for blk in blocks:
        rows = blk.rows
        z = blk.lin(x[rows], w_gu, out=z_all[rows] if save_preact else None)
        if lora:
            xa = blk.lin(xl[rows], a_gu, out=xa_all[rows])
            blk.add_lin(z, _gated(xa, None if g_gu is None else g_gu[rows]), b_gu, scale)
        if bias_gu is not None:  # into z itself, so the saved pre-activation holds it
            blk.add_bias(z, bias_gu)
        h = apply_activation(z, activation)
        blk.lin(h, w_d, out=y[rows])
        if lora:
            hl = h if mask_h is None else h * mask_h[rows]
            ha = blk.lin(hl, a_d, out=ha_all[rows])
            blk.add_lin(y[rows], _gated(ha, None if g_d is None else g_d[rows]), b_d, scale)
        if bias_d is not None:
            blk.add_bias(y[rows], bias_d)
    return y, z_all, xa_all, ha_all


def _bwd_impl(dy, x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, x_lora, mask_h, g_gu, g_d, bias_gu,
              bias_d, z_all, xa_all, ha_all, need_dx, need_dw_gu, need_dw_d, need_lora, need_gates, need_bias_gu,
              need_bias_d):
    lora = a_gu is not None
    need_lora, need_gates = need_lora and lora, need_gates and lora and g_gu is not None
    need_bias_gu, need_bias_d = need_bias_gu and bias_gu is not None, need_bias_d and bias_d is not None
    dy = dy.contiguous()  # a broadcast gradient (e.g. of .sum()) has zero strides
    xl = x if x_lora is None else x_lora
    blocks, idle = _blocks(counts, dy, x, x_lora, mask_h, w_gu, w_d, a_gu, b_gu, a_d, b_d)
    out = {}

    def result(name, like, want, per_expert=None):
        """The gradient buffer `name` shaped like `like`: every row block and every active expert's
        slice is written below, so only the slices of idle experts are zeroed here (per_expert: like's
        first dimension is the expert, by default for 3-D like)."""
        if not want:
            return None
        # Contiguous whatever like's strides (an is_transposed weight is a transposed view).
        out[name] = buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        if buf.dim() == 3 if per_expert is None else per_expert:
            for e in idle:
                buf[e].zero_()
        return buf

    dx = result("dx", x, need_dx)
    dxl = result("dx_lora", x_lora, need_dx and lora and x_lora is not None)
    dw_gu, dw_d = result("dw_gu", w_gu, need_dw_gu), result("dw_d", w_d, need_dw_d)
    da_gu, db_gu = result("da_gu", a_gu, need_lora), result("db_gu", b_gu, need_lora)
    da_d, db_d = result("da_d", a_d, need_lora), result("db_d", b_d, need_lora)
    dg_gu, dg_d = result("dg_gu", g_gu, need_gates), result("dg_d", g_d, need_gates)
    db_gu_bias = result("dbias_gu", bias_gu, need_bias_gu, per_expert=True)
    db_d_bias = result("dbias_d", bias_d, need_bias_d, per_expert=True)
    # Anything upstream of h (x, W_gu, LoRA of gate_up, gates, b_gu) needs dz.
    need_dz = need_dx or need_dw_gu or need_lora or need_gates or need_bias_gu
    for blk in blocks:
        rows = blk.rows
        dye = dy[rows]
        if db_d_bias is not None:
            blk.bias_grad(dye, db_d_bias)
        if not (need_dz or need_dw_d or lora):  # only b_d's gradient was asked for
            continue
        z = z_all[rows]
        h = apply_activation(z, activation)
        if dw_d is not None:
            blk.wgrad(dye, h, dw_d)
        dh = blk.lin_t(dye, w_d) if need_dz else None
        if lora:
            gd = None if g_d is None else g_d[rows].to(dy.dtype)
            hl = h if mask_h is None else h * mask_h[rows]
            dyb = blk.lin_t(dye, b_d)                           # [n, r]
            dyb_g = _gated(dyb, gd)
            if need_lora:
                blk.wgrad(dye, _gated(ha_all[rows], gd), db_d, scale)
                blk.wgrad(dyb_g, hl, da_d, scale)
            if need_gates:
                dg_d[rows] = (dyb * ha_all[rows]).mul_(scale)
            if need_dz:
                dhl = blk.lin_t(dyb_g, a_d).mul_(scale)          # d(h') through the LoRA term
                dh.add_(dhl if mask_h is None else dhl * mask_h[rows])
        if not need_dz:
            continue
        dz = activation_backward(z, dh, activation)
        if db_gu_bias is not None:
            blk.bias_grad(dz, db_gu_bias)
        if dw_gu is not None:
            blk.wgrad(dz, x[rows], dw_gu)
        if dx is not None:
            blk.lin_t(dz, w_gu, out=dx[rows])
        if lora:
            gg = None if g_gu is None else g_gu[rows].to(dy.dtype)
            dzb = blk.lin_t(dz, b_gu)                           # [n, r]
            dzb_g = _gated(dzb, gg)
            if need_lora:
                blk.wgrad(dz, _gated(xa_all[rows], gg), db_gu, scale)
                blk.wgrad(dzb_g, xl[rows], da_gu, scale)
            if need_gates:
                dg_gu[rows] = (dzb * xa_all[rows]).mul_(scale)
            if need_dx and dxl is None:  # x' is x: the LoRA input's gradient adds to dx
                blk.add_lin_t(dx[rows], dzb_g, a_gu, scale)
            elif need_dx:  # d(x'), which autograd takes through the dropout outside
                blk.lin_t(dzb_g, a_gu, out=dxl[rows]).mul_(scale)
    names = ("dx", "dw_gu", "dw_d", "da_gu", "db_gu", "da_d", "db_d", "dx_lora", "dg_gu", "dg_d", "dbias_gu", "dbias_d")
    return tuple(out.get(k, _empty(dy)) for k in names)


# The operands both ops take, in this order, declared once (the schema of torch.library).
_OPERANDS = ("Tensor x, Tensor counts, Tensor gate_up_proj, Tensor down_proj, Tensor? a_gate_up, Tensor? b_gate_up, "
             "Tensor? a_down, Tensor? b_down, str activation, float scale, Tensor? x_lora, Tensor? mask_h, "
             "Tensor? rank_gate_gate_up, Tensor? rank_gate_down, Tensor? bias_gate_up, Tensor? bias_down")

# (y [N, H], z [N, 2F|F] or [0] without save_preact, xa [N, r] or [0], ha [N, r] or [0]) of the grouped
# MLP over x [N, H] with counts [E] rows per expert (module docstring).
torch_grouped_mlp_fwd = torch.library.custom_op(
    "unimoe::torch_grouped_mlp_fwd", _fwd_impl, mutates_args=(),
    schema=f"({_OPERANDS}, bool save_preact) -> (Tensor, Tensor, Tensor, Tensor)")


@torch_grouped_mlp_fwd.register_fake
def _(x, counts, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down, activation, scale, x_lora, mask_h,
      rank_gate_gate_up, rank_gate_down, bias_gate_up, bias_down, save_preact):
    n = x.shape[0]
    lora = a_gate_up is not None
    return (x.new_empty((n, down_proj.shape[1])),
            x.new_empty((n, gate_up_proj.shape[1])) if save_preact else x.new_empty((0,)),
            x.new_empty((n, a_gate_up.shape[1])) if lora else x.new_empty((0,)),
            x.new_empty((n, a_down.shape[1])) if lora else x.new_empty((0,)))


# (dx, d gate_up_proj, d down_proj, dA_gu, dB_gu, dA_d, dB_d, d x_lora, d rank_gate_gate_up,
# d rank_gate_down, d bias_gate_up, d bias_down) for d(y) = dy; a result not asked for (or without its
# input) is [0].
torch_grouped_mlp_bwd = torch.library.custom_op(
    "unimoe::torch_grouped_mlp_bwd", _bwd_impl, mutates_args=(),
    schema=f"(Tensor dy, {_OPERANDS}, Tensor z, Tensor xa, Tensor ha, bool need_dx, bool need_dw_gate_up, "
           "bool need_dw_down, bool need_lora, bool need_rank_gates, bool need_bias_gate_up, bool need_bias_down) -> ("
           + ", ".join(["Tensor"] * 12) + ")")


@torch_grouped_mlp_bwd.register_fake
def _(dy, x, counts, gate_up_proj, down_proj, a_gate_up, b_gate_up, a_down, b_down, activation, scale, x_lora, mask_h,
      rank_gate_gate_up, rank_gate_down, bias_gate_up, bias_down, z, xa, ha, need_dx, need_dw_gate_up, need_dw_down,
      need_lora, need_rank_gates, need_bias_gate_up, need_bias_down):
    lora = a_gate_up is not None
    gates = need_rank_gates and lora and rank_gate_gate_up is not None

    def maybe(flag, like):
        return torch.empty_like(like) if flag and like is not None else dy.new_empty((0,))

    return (maybe(need_dx, x), maybe(need_dw_gate_up, gate_up_proj), maybe(need_dw_down, down_proj),
            maybe(need_lora and lora, a_gate_up), maybe(need_lora and lora, b_gate_up),
            maybe(need_lora and lora, a_down), maybe(need_lora and lora, b_down),
            maybe(need_dx and lora, x_lora), maybe(gates, rank_gate_gate_up), maybe(gates, rank_gate_down),
            maybe(need_bias_gate_up, bias_gate_up), maybe(need_bias_down, bias_down))


# No argument has a default: torch.library leaves an argument at its default out of the call, and
# needs_input_grad (indexed below by argument position) would then be shorter.
def _setup_context(ctx, inputs, output):
    (x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, activation, scale, x_lora, mask_h, g_gu, g_d, bias_gu, bias_d,
     _) = inputs
    _, z, xa, ha = output
    ctx.activation, ctx.scale = activation, scale
    # The biases' values are not needed (z holds b_gu); they go to the backward op for their shapes.
    ctx.save_for_backward(x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, x_lora, mask_h, g_gu, g_d, bias_gu, bias_d,
                          z, xa, ha)


def _backward(ctx, dy, _dz, _dxa, _dha):
    (x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, x_lora, mask_h, g_gu, g_d, bias_gu, bias_d, z, xa,
     ha) = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_lora, need_gates = any(need[4:8]), any(need[12:14])
    grads = torch_grouped_mlp_bwd(
        dy, x, counts, w_gu, w_d, a_gu, b_gu, a_d, b_d, ctx.activation, ctx.scale, x_lora, mask_h, g_gu, g_d,
        bias_gu, bias_d, z, xa, ha, need[0] or need[10], need[2], need[3], need_lora, need_gates, need[14], need[15],
    )
    dx, dw_gu, dw_d, da_gu, db_gu, da_d, db_d, dx_lora, dg_gu, dg_d, dbias_gu, dbias_d = grads
    keep = lambda flag, t: t if flag else None  # noqa: E731
    return (keep(need[0], dx), None, keep(need[2], dw_gu), keep(need[3], dw_d),
            keep(need[4], da_gu), keep(need[5], db_gu), keep(need[6], da_d), keep(need[7], db_d),
            None, None, keep(need[10], dx_lora), None, keep(need[12], dg_gu), keep(need[13], dg_d),
            keep(need[14], dbias_gu), keep(need[15], dbias_d), None)


torch_grouped_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


# FLOP counts for torch.utils.flop_counter, which sees these ops and not the GEMMs inside: 2 M K N
# per GEMM over all rows together, whatever the group sizes (baselines.flops' convention). The
# biases are elementwise adds and row sums: no GEMM, no count.
def _widths(gate_up_shape, down_shape, a_shape):
    f_in, hdim, fdim = gate_up_shape[1], down_shape[1], down_shape[2]
    return f_in, hdim, fdim, (a_shape[1] if a_shape is not None else 0)


def _fwd_flops(x_shape, counts_shape, gate_up_shape, down_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    n = x_shape[0]
    f_in, hdim, fdim, r = _widths(gate_up_shape, down_shape, a_shape)
    return 2 * n * (hdim * f_in + fdim * hdim) + 2 * n * r * (hdim + f_in + fdim + hdim)


def _bwd_flops(dy_shape, x_shape, counts_shape, gate_up_shape, down_shape, a_shape, b_gu_shape, a_d_shape, b_d_shape,
               activation, scale, x_lora_shape, mask_shape, g_gu_shape, g_d_shape, bias_gu_shape, bias_d_shape,
               z_shape, xa_shape, ha_shape, need_dx, need_dw_gu, need_dw_d, need_lora, need_gates, need_bias_gu,
               need_bias_d, out_shape=None, **kwargs) -> int:
    n = dy_shape[0]
    f_in, hdim, fdim, r = _widths(gate_up_shape, down_shape, a_shape)
    # As _bwd_impl decides: b_gu's gradient is a sum of dz, so it costs the dh GEMM.
    need_dz = need_dx or need_dw_gu or need_lora or need_gates or (need_bias_gu and bias_gu_shape is not None)
    flops = 2 * n * hdim * fdim * (int(need_dw_d) + int(need_dz))       # dW_d, dh
    flops += 2 * n * f_in * hdim * (int(need_dw_gu) + int(need_dx))     # dW_gu, dx
    if r:
        flops += 2 * n * hdim * r                                       # dyb = dy B_d
        flops += 2 * n * r * (hdim + fdim) * int(need_lora)             # dB_d, dA_d
        flops += 2 * n * r * fdim * int(need_dz)                        # dh += dyb A_d
        if need_dz:
            flops += 2 * n * f_in * r                                   # dzb = dz B_gu
            flops += 2 * n * r * (f_in + hdim) * int(need_lora)         # dB_gu, dA_gu
            flops += 2 * n * r * hdim * int(need_dx)                    # dx += dzb A_gu
    return flops


def _register_flop_formulas(flop_counter) -> None:
    flop_counter.register_flop_formula(torch.ops.unimoe.torch_grouped_mlp_fwd)(_fwd_flops)
    flop_counter.register_flop_formula(torch.ops.unimoe.torch_grouped_mlp_bwd)(_bwd_flops)


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers the FLOP formulas as torch.utils.flop_counter is first imported: importing it here
    would import triton (flop_counter does), and triton must not be imported before the user has
    chosen TRITON_INTERPRET (the interpreter is fixed when triton loads)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch.utils.flop_counter":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_flop_formulas(module)

        spec.loader.exec_module = exec_and_register
        return spec


if "torch.utils.flop_counter" in sys.modules:
    _register_flop_formulas(sys.modules["torch.utils.flop_counter"])
else:
    sys.meta_path.insert(0, _RegisterWhenImported())


def grouped_mlp(x, tokens_per_expert, gate_up_proj, down_proj, activation, lora, scale, x_lora, mask_h, rank_gates,
                save_preact, bias=None):
    """The forward op with autograd; returns y [N, H] (module docstring). bias: types.ExpertBias
    (gate_up [E, 2F|F], down [E, H], either may be None) or None."""
    is_glu(activation)  # raises ValueError for an unknown activation
    a_gu, b_gu, a_d, b_d = (None,) * 4 if lora is None else lora
    g_gu, g_d = (None, None) if rank_gates is None else rank_gates
    bias_gu, bias_d = (None, None) if bias is None else bias
    y, _, _, _ = torch_grouped_mlp_fwd(x, tokens_per_expert, gate_up_proj, down_proj, a_gu, b_gu, a_d, b_d, activation,
                                       float(scale), x_lora, mask_h, g_gu, g_d, bias_gu, bias_d, save_preact)
    return y


__all__ = ["torch_grouped_mlp_fwd", "torch_grouped_mlp_bwd", "grouped_mlp"]
