"""Host-side arithmetic every kernel launch in ops/ shares: grid sizes, power-of-two block widths,
the row-tile shape of the row-wise kernels, and the stride rule of their operands.

All of it runs on Python ints (or SymInts under torch.compile), never on tensor data, so none of it
syncs the host.
"""

from __future__ import annotations

import torch


def cdiv(a, b):
    """ceil(a / b) for a >= 0, b > 0; + and // only, so SymInts trace through it."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1): tl.arange and tl.dot want power-of-two extents."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block(
    width: int, tile_elems: int, max_width: int | None = None, max_rows: int | None = None
) -> tuple[int, int]:
    """(rows per program, BLOCK_W) of a row-wise kernel over rows of `width` elements.

    BLOCK_W is width rounded up to a power of two (capped at max_width: wider rows loop over
    chunks); the rows fill a tile of about tile_elems elements, the register budget each caller
    sizes for its kernel, at least 1 and at most max_rows.
    """
    block_w = next_pow2(width)
    if max_width is not None:
        block_w = min(block_w, max_width)
    rows = max(1, tile_elems // block_w)
    if max_rows is not None:
        rows = min(rows, max_rows)
    return rows, block_w


def unit_inner(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension has unit stride, else a contiguous copy: the row-wise
    kernels take one row stride per operand (any value, 0 included) and assume unit column stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


__all__ = ["cdiv", "next_pow2", "row_block", "unit_inner"]
