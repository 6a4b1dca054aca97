"""tests/memcheck.py: under the interpreter, a load or store outside a launch's tensor arguments fails, and so does
one program touching bytes another program of the same launch wrote (or, for a store, read)."""

import pytest
import torch

from conftest import INTERPRETED
from crossvit_fast.config import env_flag

pytestmark = [
    pytest.mark.skipif(not INTERPRETED, reason="the memory checker is for Triton's CPU interpreter"),
    # the cases below make the out-of-bounds accesses the checker refuses: without it they would touch real memory
    pytest.mark.skipif(not env_flag("CROSSVIT_FAST_MEMCHECK"),
                       reason="CROSSVIT_FAST_MEMCHECK=0 leaves the memory checker out"),
]

if INTERPRETED:
    import memcheck
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(X, Y, n, stride_x, LOAD_EXTRA: tl.constexpr, STORE_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        # Y[i] = X[i * stride_x] for i < n; the masks let LOAD_EXTRA / STORE_EXTRA more lanes through
        offs = tl.arange(0, BLOCK)
        v = tl.load(X + offs * stride_x, mask=offs < n + LOAD_EXTRA, other=0.0)
        tl.store(Y + offs, v, mask=offs < n + STORE_EXTRA)

    @triton.jit
    def _shifted(X, Y, n, load_step, store_step, BLOCK: tl.constexpr):
        # program p: Y[p * store_step + i] = X[p * load_step + i] + 1 for i < n
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        v = tl.load(X + pid * load_step + offs, mask=offs < n, other=0.0)
        tl.store(Y + pid * store_step + offs, v + 1, mask=offs < n)


def _run(x, y, n, stride_x=1, load_extra=0, store_extra=0):
    _copy[(1,)](x, y, n, stride_x, LOAD_EXTRA=load_extra, STORE_EXTRA=store_extra, BLOCK=16)


def test_installed_in_the_session():
    from triton.runtime import interpreter

    assert getattr(interpreter.InterpreterBuilder, memcheck.MARK, False), "conftest.py did not install memcheck"


def test_in_bounds_access_passes():
    x = torch.randn(3, 10)
    y = torch.full((10,), float("nan"))
    _run(x[1], y, 10)
    torch.testing.assert_close(y, x[1], rtol=0, atol=0)
    y2 = torch.full((3,), float("nan"))
    _run(x[:, 4], y2, 3, stride_x=10)  # a strided column: every lane on an element of the view
    torch.testing.assert_close(y2, x[:, 4], rtol=0, atol=0)


def test_masked_off_lanes_are_not_checked():
    x = torch.randn(5)
    y = torch.empty(5)
    _run(x, y, 5)  # lanes 5..15 point past both tensors, masked off


def test_load_one_past_the_end_is_refused():
    x = torch.randn(2, 10)
    y = torch.empty(10)
    with pytest.raises(Exception, match=r"memcheck: kernel _copy program \(0, 0, 0\): a load of 1 of 11 .*'X'"):
        _run(x[0], y, 10, load_extra=1)  # x[0, 10] is x[1, 0]: allocated, not an element of the view


def test_store_past_the_end_is_refused_before_it_writes():
    buf = torch.zeros(12)
    x = torch.randn(12)
    with pytest.raises(Exception, match=r"a store of 2 of 12 masked-in lanes .* at \+10 elements .*'Y'"):
        _run(x, buf[:10], 10, load_extra=2, store_extra=2)
    assert torch.all(buf[10:] == 0), "the checker let the store through"


def test_view_gaps_and_neighbours_are_refused():
    x = torch.randn(4, 6)
    y = torch.empty(4)
    with pytest.raises(Exception, match=r"memcheck: .*a load of 3 of 4 .*'X' \(shape \(4,\), strides \(6,\)\)"):
        _run(x[:, 2], y, 4, stride_x=1)  # reads x[0, 2:6]: the column's storage, not its elements
    with pytest.raises(Exception, match=r"a load of 1 of 6 .*outside the view"):
        _run(x[1:, 1:][0], torch.empty(6), 5, load_extra=1)  # x[1, 6] == x[2, 0]


def test_outside_every_argument_names_the_nearest():
    x = torch.randn(8)
    y = torch.empty(8)
    with pytest.raises(Exception, match=r"outside every tensor argument; the nearest is"):
        _run(x, y, 8, stride_x=1 << 20)


def _shift(x, y, n, load_step, store_step, programs=2):
    _shifted[(programs,)](x, y, n, load_step, store_step, BLOCK=8)


def test_each_program_on_its_own_elements_passes():
    buf = torch.randn(16)
    want = buf + 1
    _shift(buf, buf, 8, 8, 8)  # in place, program p on elements [8p, 8p + 8)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)
    x = torch.randn(8)
    _shift(x, torch.empty(16), 8, 0, 8)  # every program reads the same elements: no race


def test_two_programs_storing_the_same_bytes_is_a_race():
    with pytest.raises(Exception, match=r"program \(1, 0, 0\): a store of bytes that program 0 \(linear id\) wrote"):
        _shift(torch.randn(16), torch.empty(8), 8, 8, 0)


def test_a_load_of_another_programs_store_is_a_race():
    buf = torch.randn(24)  # program 0: buf[0:8] -> buf[8:16]; program 1 reads buf[8:16]
    with pytest.raises(Exception, match=r"program \(1, 0, 0\): a load of bytes that program 0 .* wrote .*'Y'"):
        _shift(buf, buf[8:], 8, 8, 8)


def test_a_store_over_another_programs_load_is_a_race():
    buf = torch.randn(24)  # program 0 reads buf[8:16]; program 1 writes there
    with pytest.raises(Exception, match=r"program \(1, 0, 0\): a store of bytes that program 0 .* read"):
        _shift(buf[8:], buf, 8, 8, 8)
