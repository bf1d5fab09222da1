"""Device helpers shared by the grouped GEMM kernels (grouped_mm.py, grouped_xty.py).

- _locate_tile: the expert and rows of the t-th BLOCK_M-row tile in expert order, derived inside
  the kernel from the expert offsets alone. Any BLOCK_M works without a host-built tile map, so a
  launcher may pick 64 or 128 rows per tile per call without another pass over the routing plan.
- _act / _act_and_grad / _up_and_grad: the activations of the MLP epilogues and their derivatives,
  in fp32 (every kind of types.ACTIVATION_KINDS; the same functions as activations.py).
- _dropout_keep and dropout_mask_kernel: LoRA dropout (PEFT semantics: dropout on the LoRA input
  only), regenerated, never stored. The keep mask of element (row, col) of an [N, C] LoRA input is
  tl.rand(seed, row * C + col) >= p, with the seed read from device memory (no host sync).
"""

import triton
import triton.language as tl

# Activation codes shared with the launchers (ops/grouped_gemm_launch.py: act_code). With GLU the
# code names act of h = act(gate) * up_fn(up); up_fn is the identity but for CLAMP and SOFTCAP.
ACT_SILU = 0
ACT_GELU = 1  # exact (erf)
ACT_RELU = 2
ACT_GELU_TANH = 3
ACT_RELU2 = 4  # relu(g)^2
ACT_CLAMP = 5  # constants (alpha, beta, limit): gc sigmoid(alpha gc), gc = min(g, limit); up_fn clamp + beta
ACT_SOFTCAP = 6  # constants (gate_cap, up_cap): gate_cap tanh(g / gate_cap) sigmoid(g); up_fn up_cap tanh(u / up_cap)
ACT_GELU_CLAMP = 7  # constants (-, beta, limit): gelu(min(g, limit)); up_fn as CLAMP's


@triton.jit
def _expert_tiles(offsets_ptr, num_experts, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Per-expert vectors [E_PAD] (first row, end row, tiles, inclusive tile prefix sum); padding
    lanes are empty experts. Loaded once per program and reused for every tile it handles."""
    e = tl.arange(0, E_PAD)
    valid = e < num_experts
    start = tl.load(offsets_ptr + e, mask=valid, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + e + 1, mask=valid, other=0).to(tl.int64)
    ntiles = (end - start + BLOCK_M - 1) // BLOCK_M
    return start, end, ntiles, tl.cumsum(ntiles, 0)


@triton.jit
def _locate_tile(tile, start, end, ntiles, cum, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row of the expert) of tile `tile` (< cum[-1]): the expert is the
    number of experts whose tiles all come before it, so empty experts are skipped for free."""
    expert = tl.sum((cum <= tile).to(tl.int32), 0)
    mine = tl.arange(0, E_PAD) == expert
    row_start = tl.sum(tl.where(mine, start + (tile - (cum - ntiles)) * BLOCK_M, 0), 0)
    row_end = tl.sum(tl.where(mine, end, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _swizzle(t, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear id t in groups of GROUP_M row tiles: the programs in
    flight share GROUP_M x tiles and a few weight tiles in L2, instead of streaming all of x once
    per column tile (row-major order) or all of W once per row tile (column-major order)."""
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (t % per_group) % group_m
    pid_n = (t % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _tanh(x):
    """tanh in fp32 within ~8 ulp: an odd series near 0, where (1 - e) / (1 + e), e = exp(-2|x|),
    would cancel (the softcaps divide by their cap, so small arguments are common), that form
    elsewhere (exp of a negative number: no overflow)."""
    ax = tl.abs(x)
    x2 = x * x
    # Terms to x^5: the first one left out, 17/315 x^7, is < 1e-8 relative below 1/16, where the
    # quotient's cancellation costs at most ~8 ulp.
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0)))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    return tl.where(ax < 0.0625, small, tl.where(x < 0, -big, big))


@triton.jit
def _act(g, ACT: tl.constexpr, c0, c1, c2):
    """act(g) in fp32 (the gate factor of a GLU); c0..c2 the kind's constants."""
    out, _grad = _act_and_grad(g, ACT, c0, c1, c2)
    return out


@triton.jit
def _gelu_and_grad(g):
    """(gelu(g), gelu'(g)) in fp32, exact (erf) gelu as torch.nn.functional.gelu's default."""
    # 0.7071... = 1/sqrt(2); d/dg g*Phi(g) = Phi(g) + g*phi(g), 0.3989... = 1/sqrt(2*pi).
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    return g * cdf, cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, c0, c1, c2):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        out = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        out, grad = _gelu_and_grad(g)
    elif ACT == 2:
        out = tl.maximum(g, 0.0)
        grad = tl.where(g > 0.0, 1.0, 0.0)
    elif ACT == 3:
        # gelu's tanh form (approximate="tanh"): 0.7978... = sqrt(2/pi), 0.044715 its cubic term.
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = _tanh(inner)
        out = 0.5 * g * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    elif ACT == 4:
        r = tl.maximum(g, 0.0)
        out = r * r
        grad = 2.0 * r
    elif ACT == 5:
        # c0 = alpha, c2 = limit; the clamp passes no gradient above the limit (torch.clamp's rule).
        gc = tl.minimum(g, c2)
        sig = tl.sigmoid(c0 * gc)
        out = gc * sig
        grad = tl.where(g <= c2, sig + c0 * gc * sig * (1.0 - sig), 0.0)
    elif ACT == 7:
        out, grad = _gelu_and_grad(tl.minimum(g, c2))
        grad = tl.where(g <= c2, grad, 0.0)
    else:
        # c0 = gate_cap: the cap bounds the linear factor, the sigmoid sees the raw gate.
        t = _tanh(g / c0)
        sig = tl.sigmoid(g)
        out = c0 * t * sig
        grad = (1.0 - t * t) * sig + c0 * t * sig * (1.0 - sig)
    return out, grad


@triton.jit
def _up_and_grad(u, ACT: tl.constexpr, c0, c1, c2):
    """(up_fn(u), up_fn'(u)) of a GLU in fp32: the identity but for the clamped and soft-capped kinds."""
    if ACT == 5 or ACT == 7:
        # c1 = beta, c2 = limit.
        out = tl.minimum(tl.maximum(u, -c2), c2) + c1
        grad = tl.where((u >= -c2) & (u <= c2), 1.0, 0.0)
    elif ACT == 6:
        t = _tanh(u / c1)  # c1 = up_cap
        out = c1 * t
        grad = 1.0 - t * t
    else:
        out = u
        grad = tl.full(u.shape, 1.0, tl.float32)
    return out, grad


@triton.jit
def _dropout_keep(seed, rows, cols, ncols, p):
    """Keep mask [len(rows), len(cols)] of LoRA dropout for an input with ncols columns."""
    return tl.rand(seed, rows[:, None] * ncols + cols[None, :]) >= p


@triton.jit
def dropout_mask_kernel(
    seed_ptr,  # [1] int64
    out_ptr,  # [N, C] fp32: 1 / (1 - p) where kept, 0 where dropped
    N, C, drop_p, drop_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The LoRA dropout mask the GEMM kernels regenerate, written out (tests and debugging)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = _dropout_keep(tl.load(seed_ptr), rows, cols, C, drop_p)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], tl.where(keep, drop_scale, 0.0), mask=mask)
