"""Top-k gating: router logits -> scores -> top-k -> (renormalised) combine weights.

    logits [T, E] (any float; computed in fp32) --scores (softmax|sigmoid)--> scores [T, E] fp32
        --(+ expert_bias, group limit) select top-k--> ids [T, k] int32 (ties: lowest index)
        --gather unbiased scores, renormalise, scale--> weights [T, k] fp32

Backend "triton" (CUDA tensors under "auto", or CPU tensors under TRITON_INTERPRET=1) runs all of it
in one kernel, one read of the logits (kernels/gating.py), and the backward in one more kernel:
d(weights) [T, k] and d(scores) [T, E] (from the aux losses) -> d(logits) [T, E]. Backend "torch"
runs reference.topk_gating, which is the contract: both give the same ids and the same values and
gradients up to fp32 rounding. The two kernels are the custom ops unimoe::topk_gating_fwd and
unimoe::topk_gating_bwd, with fakes and autograd registered, so torch.compile(fullgraph=True)
traces them as single nodes.

The aux losses (load-balancing loss, z-loss) are defined here in plain torch (load_balancing_loss,
z_loss: from the [T, E] scores and logits). With return_stats=True the same kernel pass also writes
logsumexp per row and column sums of the probabilities (RouterStats), and router_losses makes both
losses from them and the plan's expert counts, O(T + E) work; their gradient reaches the logits
through d(scores) here and through the returned logits tensor, as the plain versions' would.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch

from .. import reference
from ..backend import use_triton as _use_triton
from ..types import SCORINGS, GatingOutput, compute_dtype
from .launch_utils import cdiv, next_pow2, row_block, unit_inner

# Elements of the [BLOCK_T, BLOCK_E] fp32 tile one program keeps live: 16 per thread at 4 warps,
# which leaves registers for the half-dozen tiles (p, sel, masks) the selection loop carries.
_TILE_ELEMS = 2048
# Most tokens per program; more only adds masked rows for small T.
_MAX_BLOCK_T = 64
# Floor of a sigmoid row sum when scores are normalised into probabilities (reference's value).
_PROB_FLOOR = 1e-20


class _RouterLogits16(torch.autograd.Function):
    """logits = x @ weight^T in fp32 from 16-bit x and weight of the same dtype, read as they are.

    A bf16 x bf16 product is exact in fp32 (8 + 8 significant bits < 24), and cuBLAS accumulates in
    fp32, so this equals x.float() @ weight.float().t() up to summation order without writing the
    fp32 copy of x (T*H*4 bytes: 32 MiB at T=4096, H=2048). Backward is the fp32 products the
    upcast path's autograd would form: dx = (g @ W) cast to x's dtype, dW = (g^T @ x) cast to W's,
    the fp32 copy of x made there only when W needs a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _mm_fp32_out(x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight.to(g.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (g.t() @ x.to(g.dtype)).to(weight.dtype)
        return dx, dw


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch.mm's out_dtype overload: fp16/bf16 in, fp32 out, on CUDA (and meta, for shape checks).
    return torch.mm(a, b, out_dtype=torch.float32)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] in fp32 (fp64 for fp64 input) from x [T, H] and weight [E, H].

    Equal to x.to(fp32) @ weight.to(fp32).t(). When x and weight share a 16-bit dtype on CUDA the
    GEMM reads them in that dtype and writes fp32 directly (no fp32 copy of x); other combinations
    (fp32 master weights under autocast, CPU) upcast first. Differentiable in both arguments.
    """
    low = x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
    if low and x.device.type in ("cuda", "meta") and not torch.compiler.is_compiling():
        return _RouterLogits16.apply(x, weight)
    acc = compute_dtype(x.dtype)
    return x.to(acc) @ weight.to(acc).t()


def load_balancing_loss(
    scores: torch.Tensor, ids: torch.Tensor, num_experts: int, scoring: str = "softmax"
) -> torch.Tensor:
    """E * sum_e f_e * P_e: f_e = share of the T*k slots routed to e, P_e = mean probability of e.

    scores [T, E] (softmax or sigmoid of the logits), ids [T, k] the chosen experts. Sigmoid scores
    are normalised per token into probabilities first. The value is 1.0 for a perfectly balanced
    router (Megatron's normalisation; Hugging Face's Mixtral loss is k times it). An empty batch
    gives 0. Only P carries a gradient (f is a count), as in Switch Transformer.
    """
    t = scores.shape[0]
    probs = scores
    if scoring == "sigmoid":
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(_PROB_FLOOR)
    p_mean = probs.sum(0) / max(t, 1)
    counts = reference.expert_counts(ids, num_experts)
    f = counts.to(probs.dtype) / max(ids.numel(), 1)
    return num_experts * (f * p_mean).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits[t])^2 (ST-MoE router z-loss) of logits [T, E]; 0 for an empty batch."""
    lse = torch.logsumexp(logits, dim=-1)
    return (lse * lse).sum() / max(logits.shape[0], 1)


class RouterStats(NamedTuple):
    """What the aux losses need from a gating pass, without their gradient (RouterLosses routes it
    through the scores and logits): lse [T] fp32, logsumexp of each row of logits; prob_sums [E]
    fp32, column sums of the routing probabilities (softmax scores, or sigmoid scores normalised
    per token)."""

    lse: torch.Tensor
    prob_sums: torch.Tensor


class _RouterLosses(torch.autograd.Function):
    """(load-balancing loss, z-loss) from RouterStats and the expert counts, with the gradients
    load_balancing_loss and z_loss would give, to scores and logits:

        lbl = E * sum_e (counts_e / N) * (prob_sums_e / T)   d lbl / d probs[t, e] = E counts_e / (N T)
        z   = sum_t lse_t^2 / T                              d z / d logits[t] = 2 lse_t softmax(logits[t]) / T
    """

    @staticmethod
    def forward(ctx, scores, logits, lse, prob_sums, counts, num_experts: int, num_slots: int, scoring: str):
        t = scores.shape[0]
        f = counts.to(torch.float32) / max(num_slots, 1)
        lbl = num_experts * (f * prob_sums).sum() / max(t, 1)
        z = (lse * lse).sum() / max(t, 1)
        ctx.save_for_backward(scores, logits, lse, f)
        ctx.cfg = (num_experts, scoring)
        return lbl, z

    @staticmethod
    def backward(ctx, d_lbl, d_z):
        scores, logits, lse, f = ctx.saved_tensors
        num_experts, scoring = ctx.cfg
        t = max(scores.shape[0], 1)
        d_scores = d_logits = None
        if ctx.needs_input_grad[0]:
            c = (d_lbl * num_experts / t) * f  # [E]: d lbl / d probs of any token
            if scoring == "softmax":
                d_scores = c.expand_as(scores)
            else:
                # probs = scores / max(S, floor), S = row sum: the quotient rule, the floor's
                # gradient zero where it binds (as clamp_min's).
                s = scores.sum(-1, keepdim=True)
                s_c = s.clamp_min(_PROB_FLOOR)
                corr = ((c * scores).sum(-1, keepdim=True) / s_c) * (s >= _PROB_FLOOR)
                d_scores = (c - corr) / s_c
        if ctx.needs_input_grad[1]:
            d_logits = (d_z * 2.0 / t) * lse[:, None] * torch.exp(logits - lse[:, None])
        return d_scores, d_logits, None, None, None, None, None, None


def router_losses(gating: GatingOutput, stats: RouterStats, tokens_per_expert: torch.Tensor, num_experts: int,
                  scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """(load_balancing_loss, z_loss), scalar fp32, equal to load_balancing_loss(gating.scores,
    gating.ids, ...) and z_loss(gating.logits) in value and gradient, from the statistics
    of the gating pass (topk_gating(..., return_stats=True)) and the plan's tokens_per_expert: no
    further pass over the [T, E] scores or logits in the forward."""
    return _RouterLosses.apply(gating.scores, gating.logits, stats.lse.detach(), stats.prob_sums.detach(),
                               tokens_per_expert, num_experts, gating.ids.numel(), scoring)


def check_gating_args(num_experts: int, top_k: int, n_groups: int, topk_groups: Optional[int], scoring: str) -> None:
    """Raise ValueError naming the argument for any impossible gating configuration."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups must be >= 1 and divide num_experts={num_experts}, got {n_groups}")
    if topk_groups is not None:
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
        if topk_groups * (num_experts // n_groups) < top_k:
            raise ValueError(
                f"topk_groups={topk_groups} groups of {num_experts // n_groups} experts cannot hold top_k={top_k}"
            )


def _blocks(num_experts: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_E): all E scores of a row in one tile, as many rows as the tile holds."""
    return row_block(num_experts, _TILE_ELEMS, max_rows=_MAX_BLOCK_T)


def _stats_rows(t: int, e: int) -> int:
    """Rows of the per-program column sums: one per program of the forward kernel (1 when T = 0)."""
    return max(1, cdiv(t, _blocks(e)[0]))


def _topk_gating_fwd_impl(logits, expert_bias, top_k, scoring, normalize, scaling_factor, n_groups, topk_groups,
                          stats=False):
    """Launches the forward kernel; the body of unimoe::topk_gating_fwd."""
    from ..kernels import gating as kern  # lazy: importing triton is deferred to first launch

    t, e = logits.shape
    dev = logits.device
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    scores = torch.empty((t, e), dtype=torch.float32, device=dev)
    lse = torch.empty((t if stats else 0,), dtype=torch.float32, device=dev)
    # Zeros: an empty batch launches nothing and must still sum to zero probability.
    psum = torch.zeros((_stats_rows(t, e), e) if stats else (0,), dtype=torch.float32, device=dev)
    if t > 0:
        logits_c = unit_inner(logits)
        block_t, block_e = _blocks(e)
        kern.topk_gating_fwd_kernel[(cdiv(t, block_t),)](
            logits_c, expert_bias if expert_bias is not None else scores, scores, weights, ids,
            lse if stats else scores, psum if stats else scores,
            t, e, logits_c.stride(0), float(scaling_factor),
            K=top_k, SCORING=_scoring_id(kern, scoring), NORMALIZE=bool(normalize),
            HAS_BIAS=expert_bias is not None, STATS=bool(stats), N_GROUPS=n_groups, TOPK_GROUPS=topk_groups,
            GROUP_SIZE=e // n_groups, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=next_pow2(top_k),
            BLOCK_G=next_pow2(n_groups), num_warps=4,
        )
    return weights, ids, scores, lse, psum


def _topk_gating_bwd_impl(d_weights, d_scores, scores, ids, scoring, normalize, scaling_factor):
    """Launches the backward kernel; the body of unimoe::topk_gating_bwd."""
    from ..kernels import gating as kern

    t, e = scores.shape
    d_logits = torch.empty_like(scores)
    if t > 0:
        dw = unit_inner(d_weights.float()) if d_weights is not None else None
        ds = unit_inner(d_scores.float()) if d_scores is not None else None
        block_t, block_e = _blocks(e)
        kern.topk_gating_bwd_kernel[(cdiv(t, block_t),)](
            scores, ids, dw if dw is not None else scores, ds if ds is not None else scores, d_logits,
            t, e, dw.stride(0) if dw is not None else 0, ds.stride(0) if ds is not None else 0,
            float(scaling_factor),
            K=ids.shape[1], SCORING=_scoring_id(kern, scoring), NORMALIZE=bool(normalize),
            HAS_DW=dw is not None, HAS_DS=ds is not None, BLOCK_T=block_t, BLOCK_E=block_e,
            num_warps=4,
        )
    return d_logits


def _scoring_id(kern, scoring: str) -> int:
    return kern.SOFTMAX if scoring == "softmax" else kern.SIGMOID


# Custom ops rather than an autograd.Function: torch.compile cannot trace a raw Triton launch (nor
# the lazy import before it), but treats a custom op as one opaque node traced through its fake.


@torch.library.custom_op("unimoe::topk_gating_fwd", mutates_args=())
def topk_gating_fwd(
    logits: torch.Tensor,
    expert_bias: Optional[torch.Tensor],
    top_k: int,
    scoring: str,
    normalize: bool,
    scaling_factor: float,
    n_groups: int,
    topk_groups: int,
    stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 (unit column stride not required), expert_bias [E] fp32 contiguous or None
    -> (weights [T, k] fp32, ids [T, k] int32, scores [T, E] fp32, lse [T] fp32, probability column
    sums [programs, E] fp32); the last two only with stats (else [0]), not differentiable (the
    losses made from them route their gradient through scores and logits: RouterLosses).
    Arguments checked by topk_gating."""
    return _topk_gating_fwd_impl(logits, expert_bias, top_k, scoring, normalize, scaling_factor, n_groups, topk_groups,
                                 stats)


@topk_gating_fwd.register_fake
def _(logits, expert_bias, top_k, scoring, normalize, scaling_factor, n_groups, topk_groups, stats=False):
    t, e = logits.shape
    return (
        logits.new_empty((t, top_k), dtype=torch.float32),
        logits.new_empty((t, top_k), dtype=torch.int32),
        logits.new_empty((t, e), dtype=torch.float32),
        logits.new_empty((t if stats else 0,), dtype=torch.float32),
        logits.new_empty((_stats_rows(t, e), e) if stats else (0,), dtype=torch.float32),
    )


@torch.library.custom_op("unimoe::topk_gating_bwd", mutates_args=())
def topk_gating_bwd(
    d_weights: Optional[torch.Tensor],
    d_scores: Optional[torch.Tensor],
    scores: torch.Tensor,
    ids: torch.Tensor,
    scoring: str,
    normalize: bool,
    scaling_factor: float,
) -> torch.Tensor:
    """d(logits) [T, E] fp32 from d(weights) [T, k] and d(scores) [T, E] (either may be None) and the
    forward's scores [T, E] fp32 and ids [T, k] int32 (both contiguous, as the forward returns them)."""
    return _topk_gating_bwd_impl(d_weights, d_scores, scores, ids, scoring, normalize, scaling_factor)


@topk_gating_bwd.register_fake
def _(d_weights, d_scores, scores, ids, scoring, normalize, scaling_factor):
    return torch.empty_like(scores)


def _gating_setup_context(ctx, inputs, output):
    _logits, _bias, _top_k, scoring, normalize, scaling_factor, _n_groups, _topk_groups, _stats = inputs
    _weights, ids, scores, lse, psum = output
    ctx.mark_non_differentiable(ids, lse, psum)
    ctx.save_for_backward(scores, ids)
    ctx.cfg = (scoring, bool(normalize), float(scaling_factor))
    # Unused outputs (no aux loss: no d(scores)) come back as None and the kernel skips reading them.
    ctx.set_materialize_grads(False)


def _gating_backward(ctx, d_weights, _d_ids, d_scores, _d_lse, _d_psum):
    if d_weights is None and d_scores is None:
        return (None,) * 9
    scores, ids = ctx.saved_tensors
    d_logits = topk_gating_bwd(d_weights, d_scores, scores, ids, *ctx.cfg)
    return (d_logits,) + (None,) * 8


topk_gating_fwd.register_autograd(_gating_backward, setup_context=_gating_setup_context)


def topk_gating(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    normalize: bool = True,
    scaling_factor: float = 1.0,
    expert_bias: Optional[torch.Tensor] = None,
    n_groups: int = 1,
    topk_groups: Optional[int] = None,
    backend: str = "auto",
    return_stats: bool = False,
):
    """Differentiable top-k gating of logits [T, E]; see reference.topk_gating for the semantics.

    backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton". fp64 logits
    always take the torch path, which keeps fp64 end to end (gradcheck); the kernels compute in fp32.
    return_stats=True returns (GatingOutput, RouterStats): what router_losses needs, made in the
    same pass by the Triton path (the torch path computes it from scores and logits).
    A NaN selection score (from a NaN or inf logit, or a NaN expert_bias) ranks above every number,
    lowest index first, as in torch.sort: on both paths the ids stay in [0, E) and the NaN stays in
    that token's weights, where it shows in the loss.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    try:
        # operator.index accepts numpy / 0-d integer types but not floats or bools-as-configs.
        top_k, n_groups = operator.index(top_k), operator.index(n_groups)
        topk_groups = None if topk_groups is None else operator.index(topk_groups)
    except TypeError:
        raise TypeError(
            f"top_k, n_groups and topk_groups must be ints, got {top_k!r}, {n_groups!r}, {topk_groups!r}"
        ) from None
    check_gating_args(logits.shape[1], top_k, n_groups, topk_groups, scoring)
    if expert_bias is not None:
        if expert_bias.shape != (logits.shape[1],):
            raise ValueError(f"expert_bias must be [E={logits.shape[1]}], got {tuple(expert_bias.shape)}")
        if expert_bias.device != logits.device:
            raise ValueError(f"expert_bias is on {expert_bias.device} but logits are on {logits.device}")
    # The kernel reads the logits in fp32 whatever their dtype (bf16 ones too, in the interpreter).
    if not _use_triton(backend, logits, kernel_dtype=torch.float32):
        out = reference.topk_gating(
            logits, top_k, scoring=scoring, normalize=normalize, scaling_factor=scaling_factor,
            expert_bias=expert_bias, n_groups=n_groups, topk_groups=topk_groups,
        )
        if not return_stats:
            return out
        with torch.no_grad():
            lse = torch.logsumexp(out.logits, dim=-1)
            probs = out.scores
            if scoring == "sigmoid":
                probs = probs / probs.sum(-1, keepdim=True).clamp_min(_PROB_FLOOR)
            return out, RouterStats(lse, probs.sum(0))
    logits32 = logits.to(torch.float32)
    bias32 = None if expert_bias is None else expert_bias.detach().to(torch.float32).contiguous()
    topk_groups = n_groups if topk_groups is None else topk_groups
    weights, ids, scores, lse, psum = topk_gating_fwd(
        logits32, bias32, top_k, scoring, bool(normalize), float(scaling_factor), n_groups, topk_groups,
        bool(return_stats),
    )
    out = GatingOutput(weights=weights, ids=ids, scores=scores, logits=logits32)
    return (out, RouterStats(lse, psum.sum(0))) if return_stats else out
