"""Per-expert column sums of expert-grouped rows: the gradients of the per-expert biases.

    out[e, c] = sum over the rows r of expert e of scale[r] * src[gather[r], c]

One program per (expert, BLOCK_C columns) walks its expert's rows in order, so the sums are
deterministic (no atomics) and an expert with no rows gets zeros. The rows of expert e are
offsets[e] .. offsets[e+1]-1 of src, or, with TILE_M > 0, the rows of src that hold one partial
sum per TILE_M-row tile of those rows (grouped_mm's BIAS_GRAD epilogue: tile t of the tile order
of gemm_common._expert_tiles is row t). Launcher: ops/grouped_gemm_launch.expert_colsum.
"""

import triton
import triton.language as tl

from .gemm_common import _expert_tiles


@triton.jit
def expert_colsum_kernel(
    src_ptr, stride_sm, stride_sc,  # [rows, C] (or [T, C] tokens with GATHER); any float dtype
    out_ptr, stride_oe, stride_oc,  # [E, C] out, any float dtype (sums in fp32)
    offsets_ptr,  # [E+1] int32|int64 expert row offsets
    num_experts, C,
    gather_ptr,  # [N] int32|int64 source row of each grouped row (GATHER)
    scale_ptr,  # [N] fp32 factor of each grouped row (ROW_SCALE)
    TILE_M: tl.constexpr,  # 0: src rows are the grouped rows; > 0: src rows are TILE_M-row tiles of them
    GATHER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    E_PAD: tl.constexpr,  # num_experts rounded up to a power of two
):
    e = tl.program_id(0)
    if TILE_M > 0:
        _start, _end, ntiles, cum = _expert_tiles(offsets_ptr, num_experts, TILE_M, E_PAD)
        mine = tl.arange(0, E_PAD) == e
        end = tl.sum(tl.where(mine, cum, 0), 0)
        start = end - tl.sum(tl.where(mine, ntiles, 0), 0)
    else:
        start = tl.load(offsets_ptr + e).to(tl.int64)
        end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = rows < end
        if GATHER:
            src_rows = tl.load(gather_ptr + rows, mask=mask_r, other=0).to(tl.int64)
        else:
            src_rows = rows
        v = tl.load(src_ptr + src_rows[:, None] * stride_sm + cols[None, :] * stride_sc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if ROW_SCALE:
            v *= tl.load(scale_ptr + rows, mask=mask_r, other=0.0)[:, None]
        acc += tl.sum(v, 0)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + cols * stride_oc, acc.to(out_ptr.dtype.element_ty), mask=mask_c)
