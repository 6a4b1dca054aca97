"""The tolerance rule of crossvit_fast.testing: what it lets through and what it catches."""

import pytest
import torch

from crossvit_fast.testing import assert_within_rule, default_atol, max_abs_err, poison_

ULP10 = 2.0 ** -20  # float32 spacing in [8, 16)


def values(n=64):
    return 8.0 + 4.0 * torch.rand(n, dtype=torch.float64)  # float32 ulp = ULP10 everywhere


def test_float32_reordering_noise_passes():
    """A correct float32 result 3 ulp off at magnitude ~10, against a float32 reference that happens to be
    exact: the fixed atol (1e-6, about one ulp there) alone would fail it, the magnitude share does not."""
    ref64 = values()
    ref32 = ref64.float()
    out = (ref32.double() + 3 * ULP10).float()
    assert max_abs_err(out, ref64) > 2 * max_abs_err(ref32, ref64) + default_atol(torch.float32)
    with pytest.raises(AssertionError, match="exceeds the rule's bound"):
        assert_within_rule(out, ref64, ref32, ulps=0)
    res = assert_within_rule(out, ref64, ref32)
    assert res["bound"] < 2 * max_abs_err(ref32, ref64) + default_atol(torch.float32) + 8 * ULP10


def test_float32_real_error_fails():
    ref64 = values()
    out = (ref64 * (1 + 1e-5)).float()  # ~100 ulp
    with pytest.raises(AssertionError, match=r"4 ulp x 1\.[0-9]+e\+01"):
        assert_within_rule(out, ref64, ref64.float(), what="out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_bound_barely_moves(dtype):
    ref64 = values()
    low = ref64.to(dtype)
    fixed = 2 * max_abs_err(low, ref64) + default_atol(dtype)
    bound = assert_within_rule(low, ref64, low)["bound"]
    assert fixed <= bound <= fixed * 1.01


def test_float64_uses_its_own_eps():
    ref64 = values()
    out = ref64 + 1e-9  # far below float32 resolution, far above float64's
    with pytest.raises(AssertionError):
        assert_within_rule(out, ref64, ref64)


def test_nan_and_unwritten_elements_fail():
    ref64 = values()
    out = ref64.float().clone()
    poison_(out[5:7])
    with pytest.raises(AssertionError, match="inf"):
        assert_within_rule(out, ref64, ref64.float())
    empty = torch.empty(0)
    assert assert_within_rule(empty, empty.double(), empty)["err"] == 0.0
