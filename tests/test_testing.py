"""The tolerance rule of crossvit_fast.testing: what it lets through and what it catches."""

import pytest
import torch

from crossvit_fast.testing import assert_within_rule, default_atol, half_ulp, max_abs_err, poison_, rule_check

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
    """The float32 ulps share is tiny next to a 16-bit reference's error; the half-ulp floor of the reference's
    error changes nothing where the reference's own rounding reaches half an ulp at the largest magnitude."""
    ref64 = values()
    ref64[0] = 12.0 + half_ulp(dtype, 12.0)  # a tie: rounds exactly half an ulp off
    low = ref64.to(dtype)
    assert max_abs_err(low, ref64) == half_ulp(dtype, 12.0)
    fixed = 2 * max_abs_err(low, ref64) + default_atol(dtype)
    bound = assert_within_rule(low, ref64, low)["bound"]
    assert fixed <= bound <= fixed * 1.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_error_floor_is_half_an_ulp(dtype):
    """A reference that by chance rounds closer than half an ulp (few elements) does not shrink the bound below
    what the exact result rounded once needs: a correctly rounded result passes, one ulp further fails."""
    ref64 = torch.tensor([10.0 + 0.3 * 2 * half_ulp(dtype, 10.0), -7.0, 12.5], dtype=torch.float64)
    lucky = ref64.clone()
    lucky[0] = 10.0  # a reference 0.3 ulp off where the exact value rounds 0.3 ulp off too
    lucky = lucky.to(dtype)
    assert half_ulp(dtype, 12.5) == half_ulp(dtype, 10.0) and half_ulp(dtype, 16.0) == 2 * half_ulp(dtype, 12.5)
    nearest = (ref64 + torch.tensor([0.0, 0.0, half_ulp(dtype, 12.5)], dtype=torch.float64)).to(dtype)
    r = rule_check(nearest, ref64, lucky, ulps=0)
    assert r["err_ref"] == half_ulp(dtype, 12.5) > max_abs_err(lucky, ref64) and r["ratio"] <= 1
    off = nearest.clone()
    off[2] = off[2].double() + 3 * 2 * half_ulp(dtype, 12.5)
    with pytest.raises(AssertionError, match="exceeds the rule's bound"):
        assert_within_rule(off, ref64, lucky, atol=0.0, ulps=0)


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
