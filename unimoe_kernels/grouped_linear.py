"""Grouped linear layer of the torch path: one GEMM per expert over its block of rows, as one op.

    x [N, K]      rows grouped by expert: expert e owns rows ends[e-1] .. ends[e]-1 (ends[-1] = 0)
    w [E, M, K]   per-expert weights in nn.Linear's [out, in] layout
    ends [E]      int32 cumulative row counts (ends[E-1] = N)
    grouped_linear(x, w, ends) -> y [N, M],  y[rows of e] = x[rows of e] @ w[e]^T

    forward   unimoe::grouped_linear       y = x w[e]^T per group
    backward  unimoe::grouped_linear_bwd   dx = dy w[e] per group, dw[e] = dy_e^T x_e (zero for an
                                           empty group); dw only when w requires grad

Why custom ops: the group sizes are data. A Python loop over them (reading the counts with
.tolist()) makes torch.compile break the graph or fail with fullgraph=True, and torch.export fail,
on a data-dependent branch. As custom ops the GEMMs are single nodes that tracers see through their
fake implementations, which need shapes only ([N, M], [N, K], [E, M, K]); the group sizes are read
at run time, inside. So reference.grouped_mlp, and every layer of this package on the torch path,
traces into one graph with no data-dependent size, and compiles with fullgraph=True and exports.

Inside, torch._grouped_mm runs the groups in one call where its CPU kernel takes the operands:
fp32, bf16 or fp16, every row stride a multiple of 16 bytes and 16-byte aligned storage (the
kernel's rules; on 2 cores it is faster than a loop of mm at the `bench` shape). It is not called
from traced code directly because its meta function accepts only bf16 (torch 2.13), so tracing an
fp32 model through it fails. Other operands (fp64 of gradcheck, widths such as K = 5, CUDA tensors on
the torch path) run a loop of mm over the groups, reading the ends on the host once.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Optional

import torch

# torch._grouped_mm's CPU kernel requires 16-byte row strides and storage alignment.
_GMM_ALIGN_BYTES = 16
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gmm_takes(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm's CPU kernel accepts these operands (2-D or 3-D views)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    for t in tensors:
        # An empty operand too goes to the loop, which has nothing to do (the kernel rejects some).
        if t.device.type != "cpu" or t.dtype not in _GMM_DTYPES or t.numel() == 0:
            return False
        size = t.element_size()
        if t.data_ptr() % _GMM_ALIGN_BYTES or any((s * size) % _GMM_ALIGN_BYTES for s in t.stride() if s != 1):
            return False
        # One of the last two dimensions must be the unit-stride one (a row- or column-major matrix).
        if 1 not in (t.stride(-1), t.stride(-2)):
            return False
    return True


def _loop_groups(ends: torch.Tensor):
    """(expert, row slice) of every non-empty group; reads the ends on the host once."""
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            yield e, slice(start, end)
        start = end


def _forward(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    wt = w.transpose(1, 2)  # [E, K, M]: y = x @ wt[e]
    if _gmm_takes(x, wt):
        return torch._grouped_mm(x, wt, offs=ends)
    y = x.new_empty((x.shape[0], w.shape[1]))
    for e, rows in _loop_groups(ends):
        torch.mm(x[rows], wt[e], out=y[rows])
    return y


def _backward(dy: torch.Tensor, x: Optional[torch.Tensor], w: Optional[torch.Tensor], ends: torch.Tensor,
              need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dy = dy.contiguous()  # a broadcast gradient (e.g. of .sum()) has zero strides
    dx = dy.new_empty((0,))
    dw = dy.new_empty((0,))
    if need_dx:
        if _gmm_takes(dy, w):
            dx = torch._grouped_mm(dy, w, offs=ends)  # dy [N, M] @ w[e] [M, K]
        else:
            dx = dy.new_zeros((dy.shape[0], w.shape[2]))
            for e, rows in _loop_groups(ends):
                torch.mm(dy[rows], w[e], out=dx[rows])
    if need_dw:
        if _gmm_takes(dy.t(), x):
            # The K-grouped form: dy^T [M, N] @ x [N, K] split along N -> [E, M, K], zeros for an
            # empty group.
            dw = torch._grouped_mm(dy.t(), x, offs=ends)
        else:
            dw = dy.new_zeros((ends.shape[0], dy.shape[1], x.shape[1]))
            for e, rows in _loop_groups(ends):
                torch.mm(dy[rows].t(), x[rows], out=dw[e])
    return dx, dw


@torch.library.custom_op("unimoe::grouped_linear", mutates_args=())
def grouped_linear_op(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """y [N, M] = x [N, K] @ w[e]^T over the rows of each expert e (w [E, M, K], ends [E] int32)."""
    return _forward(x, w, ends)


@grouped_linear_op.register_fake
def _(x, w, ends):
    return x.new_empty((x.shape[0], w.shape[1]))


@torch.library.custom_op("unimoe::grouped_linear_bwd", mutates_args=())
def grouped_linear_bwd(dy: torch.Tensor, x: Optional[torch.Tensor], w: Optional[torch.Tensor], ends: torch.Tensor,
                       need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, K] or [0], dw [E, M, K] or [0]) of unimoe::grouped_linear for d(y) = dy [N, M]; w is
    needed for dx, x for dw (either may be None when its result is not asked for)."""
    return _backward(dy, x, w, ends, need_dx, need_dw)


@grouped_linear_bwd.register_fake
def _(dy, x, w, ends, need_dx, need_dw):
    return (dy.new_empty((dy.shape[0], w.shape[2])) if need_dx else dy.new_empty((0,)),
            dy.new_empty((ends.shape[0], dy.shape[1], x.shape[1])) if need_dw else dy.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, w, ends = inputs
    # As for mm: x is kept only for dw (a frozen weight keeps none of it), w only for dx.
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if need_dw else None, w if need_dx else None, ends)


def _grad(ctx, dy):
    x, w, ends = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = grouped_linear_bwd(dy, x, w, ends, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


grouped_linear_op.register_autograd(_grad, setup_context=_setup_context)


# FLOP counts for torch.utils.flop_counter (which sees these ops, not the GEMMs inside): 2 N K M
# per GEMM over all groups together, whatever the group sizes.
def _grouped_linear_flops(x_shape, w_shape, ends_shape, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[1]


def _grouped_linear_bwd_flops(dy_shape, x_shape, w_shape, ends_shape, need_dx, need_dw, out_shape=None,
                              **kwargs) -> int:
    k = w_shape[2] if w_shape is not None else x_shape[1]
    return 2 * dy_shape[0] * dy_shape[1] * k * (int(need_dx) + int(need_dw))


def _register_flop_formulas(flop_counter) -> None:
    flop_counter.register_flop_formula(torch.ops.unimoe.grouped_linear)(_grouped_linear_flops)
    flop_counter.register_flop_formula(torch.ops.unimoe.grouped_linear_bwd)(_grouped_linear_bwd_flops)


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


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """y [N, M] = x [N, K] @ w[e]^T per expert block of rows; differentiable in x and w.

    ends [E]: cumulative row counts (any integer dtype) with ends[-1] = N: every row belongs to an
    expert (rows past ends[-1] would be left unwritten). Not checked: a check would read the data.
    """
    if ends.dtype != torch.int32:
        ends = ends.to(torch.int32)
    return grouped_linear_op(x, w, ends)


__all__ = ["grouped_linear", "grouped_linear_op", "grouped_linear_bwd"]
