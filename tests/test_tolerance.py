"""The comparison helpers of tests/tolerance.py pass what they should and fail what they should."""

from __future__ import annotations

import pytest
import torch
from tolerance import FLOOR, TOL, Bound, amax, assert_flash_rule, assert_max_err, max_err


def _oracle_and_fp16():
    """(fp64 oracle, torch's own fp16 computation) of a small GEMM."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(32, 16, generator=g, dtype=torch.float64)
    return a @ b, a.half() @ b.half()


def test_flash_rule_accepts_twice_torchs_error_and_no_more():
    ref, same = _oracle_and_fp16()
    base = max_err(same, ref)
    assert base > 0
    floor = FLOOR[torch.float16].at(ref)
    assert_flash_rule(same, same, ref, what="torch itself")  # its own error passes
    # An error past twice torch's plus the floor fails (0.05 beyond it: more than the fp16 cast's
    # own rounding at these magnitudes, < 2^-7).
    far = (ref + torch.sign(ref) * (2 * base + floor + 0.05)).half()
    assert max_err(far, ref) > 2 * base + floor
    with pytest.raises(AssertionError, match=r"max error .* allowed \(torch torch.float16 error"):
        assert_flash_rule(far, same, ref, what="y")
    # A larger floor admits it.
    assert_flash_rule(far, same, ref, floor=Bound(atol=1.0), what="y")


def test_flash_rule_checks_shape_and_dtype_and_nan():
    ref, same = _oracle_and_fp16()
    with pytest.raises(AssertionError, match="shape"):
        assert_flash_rule(same[:, :8], same, ref)
    with pytest.raises(AssertionError, match="float32 vs torch's torch.float16"):
        assert_flash_rule(same.float(), same, ref)
    nan = same.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_flash_rule(nan, same, ref)
    empty = torch.zeros(0, 4, dtype=torch.float16)
    assert_flash_rule(empty, empty, torch.zeros(0, 4, dtype=torch.float64))


def test_max_err_bound_is_atol_plus_rtol_times_the_scale():
    want = torch.tensor([4.0, -2.0, 0.0])
    bound = Bound(atol=0.1, rtol=0.01)  # 0.1 + 0.01 * 4 = 0.14
    assert bound.at(want) == pytest.approx(0.14)
    assert_max_err(want + torch.tensor([0.0, 0.0, 0.139]), want, bound)
    with pytest.raises(AssertionError, match="max error 0.141 > 0.14"):
        assert_max_err(want + torch.tensor([0.0, 0.0, 0.141]), want, bound)
    with pytest.raises(AssertionError, match="shape"):
        assert_max_err(want[:2], want, bound)
    assert amax(torch.zeros(0)) == 0.0 and max_err(torch.zeros(0), torch.zeros(0)) == 0.0


def test_table_covers_every_dtype_and_orders_them():
    assert set(TOL) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]  # tighter to looser
    rtols = [TOL[dt]["rtol"] for dt in order]
    assert rtols == sorted(rtols)
    torch.testing.assert_close(torch.tensor([1.0]), torch.tensor([1.0 + 5e-6]), **TOL[torch.float32])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.tensor([1.0]), torch.tensor([1.0 + 5e-5]), **TOL[torch.float32])
