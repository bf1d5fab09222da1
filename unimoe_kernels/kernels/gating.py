"""Triton kernels of top-k gating (launched by unimoe_kernels.ops.gating).

Forward, one program per BLOCK_T tokens, one read of the logits and one write of each output:

    logits [T, E] --softmax|sigmoid--> scores [T, E] (stored)
    sel = scores (+ expert_bias)                      selection only, never differentiated
    (n_groups > 1) group score = sum of the group's 2 best sel (its best one when a group holds a
        single expert); keep the topk_groups best groups, the others leave the candidate set
    K rounds of argmax over the candidates (lowest index among equal maxima, like the reference's
        stable sort) -> ids [T, K] int32, raw weights gathered from the unbiased scores
    weights = scaling_factor * raw / max(sum raw, 1e-20) (or scaling_factor * raw)   [T, K] fp32

With STATS, the same pass also writes logsumexp(logits) per row [T] and per-program column sums of
the probabilities [programs, E]: the aux losses then read O(T + E) numbers instead of [T, E] twice.

Backward, same tiling: d(weights) -> d(raw weights) through the renormalisation, scattered onto the
chosen experts and added to d(scores) (the aux losses' gradient), then through softmax or sigmoid
-> d(logits) [T, E] fp32. Scores are recomputed nowhere: the forward saved them.

NaN (a NaN or inf logit upstream, an fp16 overflow is enough, or a NaN expert_bias) ranks above
every number in every selection, lowest index first, as in torch.sort / topk, which the reference
uses: the ids stay in [0, E) and the NaN reaches the token's weights, so it shows in the loss as on
the torch path. No comparison `v == max` is relied on for a NaN row (it is never true there).

The expert axis lives in one BLOCK_E tile (E padded to a power of two, padded columns masked to
-inf), which holds for every router in use (E <= 512 in qwen3-next; a larger E still works, just with
a bigger tile).
"""

import triton
import triton.language as tl

# SCORING constexpr values; ops.gating maps the scoring names onto them.
SOFTMAX = 0
SIGMOID = 1

# Floor of the renormalisation denominator, the same value as reference.topk_gating, so an all-zero
# row of sigmoid scores stays finite and the clamp's gradient mask matches.
NORM_FLOOR = tl.constexpr(1e-20)


@triton.jit
def _argmax_nan_first(v, valid, idx, NONE: tl.constexpr):
    """(best value, its index) per row of v [rows, cols] over the columns where valid holds.

    The order is torch.sort's descending one: NaN above every number (best = NaN, index = the
    lowest NaN column), then the largest number, ties to the lowest index. NaN is kept out of the
    max itself, whose NaN handling differs between the interpreter and the GPU. idx [cols] holds
    the column indices; a row without a valid column gets index NONE.
    """
    isnan = valid & (v != v)
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    m = tl.max(tl.where(valid & (v == v), v, float("-inf")), axis=1)
    hit = tl.where(has_nan[:, None], isnan, valid & (v == m[:, None]))
    i = tl.min(tl.where(hit, idx[None, :], NONE), axis=1)
    return tl.where(has_nan, float("nan"), m), i


@triton.jit
def topk_gating_fwd_kernel(
    logits_ptr,  # [T, E] fp32, row stride stride_l, unit column stride
    bias_ptr,  # [E] fp32 contiguous; read only when HAS_BIAS
    scores_ptr,  # [T, E] fp32 contiguous, written
    weights_ptr,  # [T, K] fp32 contiguous, written
    ids_ptr,  # [T, K] int32 contiguous, written
    lse_ptr,  # [T] fp32 written when STATS: logsumexp of each row of logits (z-loss)
    psum_ptr,  # [programs, E] fp32 written when STATS: this program's column sums of probabilities
    T,
    E,
    stride_l,
    scaling_factor,  # fp32 scalar
    K: tl.constexpr,
    SCORING: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STATS: tl.constexpr,
    N_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 rows: row * E passes 2^31 once T*E does (e.g. T=4M tokens with E=512).
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]

    # Rows past T load 0 rather than -inf so that their (never stored) softmax stays finite.
    x = tl.load(logits_ptr + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    x = tl.where(cmask[None, :], x, float("-inf"))
    m = tl.max(x, axis=1)
    ex = tl.exp(x - m[:, None])
    ex_sum = tl.sum(ex, axis=1)
    if SCORING == 0:
        p = ex / ex_sum[:, None]
    else:
        p = tl.sigmoid(x)
    tl.store(scores_ptr + rows[:, None] * E + cols[None, :], p, mask=mask)
    if STATS:
        # What the aux losses need, from the tile already in registers: logsumexp per row (z-loss)
        # and this program's column sums of the probabilities (load-balancing loss; sigmoid scores
        # are normalised per token first, with ops.gating.load_balancing_loss's floor).
        tl.store(lse_ptr + rows, m + tl.log(ex_sum), mask=rmask)
        if SCORING == 0:
            probs = p
        else:
            probs = p / tl.maximum(tl.sum(tl.where(cmask[None, :], p, 0.0), axis=1), NORM_FLOOR)[:, None]
        col = tl.sum(tl.where(mask, probs, 0.0), axis=0)
        tl.store(psum_ptr + pid.to(tl.int64) * E + cols, col, mask=cmask)

    sel = p
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        sel = sel + b[None, :]
    # Candidates are tracked by a mask, not by writing -inf into sel, so that a genuine -inf
    # selection score still ranks exactly as in the reference's sort.
    cand = tl.broadcast_to(cmask[None, :], (BLOCK_T, BLOCK_E))

    if N_GROUPS > 1:
        grp = cols // GROUP_SIZE
        gcols = tl.arange(0, BLOCK_G)
        gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in range(N_GROUPS):
            ing = cand & (grp == g)[None, :]
            m1, i1 = _argmax_nan_first(sel, ing, cols, BLOCK_E)
            if GROUP_SIZE > 1:
                # Remove one occurrence of the best so that a tied second best still counts.
                m2, _i2 = _argmax_nan_first(sel, ing & (cols[None, :] != i1[:, None]), cols, BLOCK_E)
                s = m1 + m2
            else:
                s = m1
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        gfree = tl.broadcast_to((gcols < N_GROUPS)[None, :], (BLOCK_T, BLOCK_G))
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for _r in range(TOPK_GROUPS):
            _gm, gi = _argmax_nan_first(gscore, gfree, gcols, BLOCK_G)
            gfree = gfree & (gcols[None, :] != gi[:, None])
            keep = tl.where(grp[None, :] == gi[:, None], 1, keep)
        cand = cand & (keep != 0)

    kcols = tl.arange(0, BLOCK_K)
    wts = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    idt = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for j in range(K):
        # Lowest index among the equal maxima: the tie rule of the reference's stable sort.
        _m, i = _argmax_nan_first(sel, cand, cols, BLOCK_E)
        hit = cols[None, :] == i[:, None]
        w = tl.sum(tl.where(hit, p, 0.0), axis=1)
        wts = tl.where(kcols[None, :] == j, w[:, None], wts)
        idt = tl.where(kcols[None, :] == j, i[:, None], idt)
        cand = cand & (cols[None, :] != i[:, None])

    kmask = kcols < K
    if NORMALIZE:
        total = tl.sum(tl.where(kmask[None, :], wts, 0.0), axis=1)
        wts = wts / tl.maximum(total, NORM_FLOOR)[:, None]
    wts = wts * scaling_factor
    omask = rmask[:, None] & kmask[None, :]
    tl.store(weights_ptr + rows[:, None] * K + kcols[None, :], wts, mask=omask)
    tl.store(ids_ptr + rows[:, None] * K + kcols[None, :], idt, mask=omask)


@triton.jit
def topk_gating_bwd_kernel(
    scores_ptr,  # [T, E] fp32 contiguous, saved by the forward
    ids_ptr,  # [T, K] int32 contiguous, saved by the forward
    dweights_ptr,  # [T, K] fp32, row stride stride_dw, unit column stride; read only when HAS_DW
    dscores_ptr,  # [T, E] fp32, row stride stride_ds, unit column stride; read only when HAS_DS
    dlogits_ptr,  # [T, E] fp32 contiguous, written
    T,
    E,
    stride_dw,
    stride_ds,
    scaling_factor,  # fp32 scalar
    K: tl.constexpr,
    SCORING: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    mask = rmask[:, None] & cmask[None, :]

    # Padded columns load p = 0 and g = 0, so they add nothing to the row sums below.
    p = tl.load(scores_ptr + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    if HAS_DS:
        g = tl.load(dscores_ptr + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
    else:
        g = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)

    if HAS_DW:
        # weights_j = c * w_j / S with S = max(sum_i w_i, floor), so
        # d w_j = (c / S) * (dW_j - [sum >= floor] * sum_i dW_i w_i / S)  (c without renormalisation).
        if NORMALIZE:
            total = tl.zeros((BLOCK_T,), tl.float32)
            dot = tl.zeros((BLOCK_T,), tl.float32)
            for j in range(K):
                i = tl.load(ids_ptr + rows * K + j, mask=rmask, other=0)
                w = tl.sum(tl.where(cols[None, :] == i[:, None], p, 0.0), axis=1)
                dw = tl.load(dweights_ptr + rows * stride_dw + j, mask=rmask, other=0.0)
                total += w
                dot += dw * w
            denom = tl.maximum(total, NORM_FLOOR)
            scale = scaling_factor / denom
            corr = tl.where(total >= NORM_FLOOR, dot / denom, 0.0)
        for j in range(K):
            i = tl.load(ids_ptr + rows * K + j, mask=rmask, other=0)
            dw = tl.load(dweights_ptr + rows * stride_dw + j, mask=rmask, other=0.0)
            if NORMALIZE:
                dw = scale * (dw - corr)
            else:
                dw = scaling_factor * dw
            g += tl.where(cols[None, :] == i[:, None], dw[:, None], 0.0)

    if SCORING == 0:
        dl = p * (g - tl.sum(g * p, axis=1)[:, None])
    else:
        dl = g * p * (1.0 - p)
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :], dl, mask=mask)
