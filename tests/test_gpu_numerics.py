"""``tests/gpu_numerics.py``: the interpreter computes what the GPU computes (bfloat16, tf32, float32 fast math).

On the CPU the patched interpreter is checked against torch (bfloat16 rounding, exact sums) and against its own
models of tf32 (truncated operands), tf32x3 (Triton's split) and the fast-math instructions (bounded ulps). On
CUDA the same kernels run on the GPU and are checked against the same models: if a GPU check fails, the
emulation's model is what is wrong (not a kernel of the library), and ``gpu_numerics.py`` is where to mend it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

import gpu_numerics as gn  # noqa: E402
from conftest import INTERPRETED  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs a CUDA GPU or Triton's interpreter")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PRECISION: tl.constexpr):
    """c (M, N) = a (M, K) @ b (K, N), all contiguous; c stored in its own dtype."""
    om, on, ok = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + om[:, None] * K + ok[None, :])
    b = tl.load(b_ptr + ok[:, None] * N + on[None, :])
    c = tl.dot(a, b, input_precision=PRECISION)
    tl.store(c_ptr + om[:, None] * N + on[None, :], c)


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, out_ptr, cast_ptr, n, BLOCK: tl.constexpr):
    """out = where(x > y, x * y + x, -y) in x's dtype; cast = float32(x) * 1.5 stored into cast's dtype."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, tl.where(x > y, x * y + x, -y), mask=mask)
    tl.store(cast_ptr + offs, x.to(tl.float32) * 1.5, mask=mask)


def _dot(a, b, out_dtype, precision):
    M, K = a.shape
    N = b.shape[1]
    c = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    _dot_kernel[(1,)](a, b, c, M, N, K, precision)
    return c


def test_bf16_rounding_is_round_to_nearest_even():
    x = torch.randn(4096, dtype=torch.float32) * torch.logspace(-40, 38, 4096)
    specials = [0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 - 2 ** -25, float(np.float32(3.4e38)),
                float("inf"), -float("inf"), 1e-40, -3e-39]
    x = torch.cat([x, torch.tensor(specials, dtype=torch.float32)])
    bits = gn.f32_to_bf16_bits(x.numpy())
    assert np.array_equal(bits, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
    nan = gn.f32_to_bf16_bits(np.array([float("nan"), -float("nan")], dtype=np.float32))
    assert np.isnan(gn.bf16_bits_to_f32(nan)).all()
    back = gn.bf16_bits_to_f32(bits)
    assert np.array_equal(back, x.bfloat16().float().numpy())


def test_tf32_models():
    one_plus = np.float32(1 + 3 * 2 ** -12)  # between tf32's 1 and 1 + 2^-10, nearer the latter
    assert gn.tf32_truncate(np.array([one_plus]))[0] == 1.0
    assert gn.tf32_round_away(np.array([one_plus]))[0] == np.float32(1 + 2 ** -10)
    tie = np.float32(1 + 2 ** -11)  # exactly half way: ties away from zero
    assert gn.tf32_round_away(np.array([tie, -tie]))[0] == np.float32(1 + 2 ** -10)
    assert gn.tf32_round_away(np.array([-tie]))[0] == np.float32(-(1 + 2 ** -10))
    assert np.isinf(gn.tf32_round_away(np.array([np.inf], dtype=np.float32))).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32-out", "bf16-out"])
def test_bf16_dot_is_exact_products_float32_sums(out_dtype):
    """Operands on a grid of 1/8 in [-8, 8): every product and partial sum is exact in float32, so the result is
    exact, and a bfloat16 output is its round to nearest even."""
    a = (torch.randint(-64, 64, (16, 32)) / 8).to(torch.bfloat16).to(DEV)
    b = (torch.randint(-64, 64, (32, 16)) / 8).to(torch.bfloat16).to(DEV)
    exact = a.double() @ b.double()
    c = _dot(a, b, out_dtype, "ieee")
    assert torch.equal(c, exact.to(torch.float32).to(out_dtype))


def test_bf16_elementwise_and_casts():
    x = torch.randn(50, device=DEV).bfloat16()
    y = torch.randn(50, device=DEV).bfloat16()
    out = torch.full_like(x, float("nan"))
    cast = torch.full_like(x, float("nan"))
    _elementwise_kernel[(1,)](x, y, out, cast, 50, BLOCK=64)
    xf, yf = x.float(), y.float()
    fused = torch.where(xf > yf, xf * yf + xf, -yf).bfloat16()  # an fma: one rounding
    twice = torch.where(xf > yf, (xf * yf).bfloat16().float() + xf, -yf).bfloat16()  # a product, then a sum
    assert ((out == fused) | (out == twice)).all()
    assert torch.equal(cast, (xf * 1.5).bfloat16())


def test_tf32_dot_truncates_its_operands():
    """A "tf32" dot of float32 operands reads only their 10 high mantissa bits (truncation), the model in
    gpu_numerics.py. On a GPU that fails this, the hardware rounds instead: make gpu_numerics.tf32 round (the
    emulation is then less conservative than it assumed)."""
    g = torch.Generator().manual_seed(0)
    a = (1 + torch.rand(16, 16, generator=g) * 2 ** -9).to(DEV)  # low bits matter: 1 + up to 2^-9
    b = (torch.rand(16, 16, generator=g) + 0.5).to(DEV)
    trunc = torch.from_numpy(gn.tf32_truncate(a.cpu().numpy())).double() @ torch.from_numpy(
        gn.tf32_truncate(b.cpu().numpy())).double()
    rounded = torch.from_numpy(gn.tf32_round_away(a.cpu().numpy())).double() @ torch.from_numpy(
        gn.tf32_round_away(b.cpu().numpy())).double()
    c = _dot(a, b, torch.float32, "tf32").cpu().double()
    err_trunc, err_round = (c - trunc).abs().max().item(), (c - rounded).abs().max().item()
    assert err_trunc <= 1e-5, (f"the tf32 dot is {err_trunc:.2e} from the truncation model and {err_round:.2e} "
                               f"from rounding: gpu_numerics' tf32 model is wrong for this device")


def test_tf32x3_and_ieee_dots_are_float32_accurate():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g).to(DEV)
    b = torch.randn(32, 16, generator=g).to(DEV)
    exact = a.double() @ b.double()
    scale = (a.double().abs() @ b.double().abs()).max().item()
    for precision, tol in (("ieee", 2e-6), ("tf32x3", 2e-6), ("tf32", 2e-3)):
        err = (_dot(a, b, torch.float32, precision).double() - exact).abs().max().item() / scale
        assert err <= tol, f"{precision}: relative error {err:.2e} > {tol:.0e}"
    err_tf32 = (_dot(a, b, torch.float32, "tf32").double() - exact).abs().max().item() / scale
    assert err_tf32 > 1e-5  # tf32 is emulated (on the CPU) / used (on the GPU): not an exact float32 dot


@pytest.mark.skipif(not INTERPRETED, reason="the launchers' refusal under the interpreter")
def test_launchers_take_bf16_only_with_the_emulation(plain_interpreter):
    from crossvit_fast.config import interpreter_runs_bf16

    assert not interpreter_runs_bf16()


@pytest.mark.skipif(not INTERPRETED, reason="the launchers' refusal under the interpreter")
def test_emulation_is_installed_for_the_suite():
    from crossvit_fast.config import interpreter_runs_bf16

    assert interpreter_runs_bf16()


def test_cuda_runs_draw_their_inputs_on_the_cpu():
    """conftest's CUDA draws (here aimed at the CPU, the logic is the same): the values of a CPU draw, the size
    read from every calling form, requires_grad kept, and tensors past the limit drawn where they were asked."""
    import conftest

    randn = conftest._cpu_draw(torch.randn, conftest.DRAW_SIZES["randn"], target="cpu")
    randint = conftest._cpu_draw(torch.randint, conftest.DRAW_SIZES["randint"], target="cpu")
    like = conftest._cpu_draw_like(torch.randn_like, target="cpu")
    for call, want in ((lambda: randn(3, 5, device="cpu", dtype=torch.float16), lambda: torch.randn(3, 5).half()),
                       (lambda: randn((4, 2), device="cpu"), lambda: torch.randn(4, 2)),
                       (lambda: randint(-3, 9, (7,), device="cpu"), lambda: torch.randint(-3, 9, (7,))),
                       (lambda: like(torch.empty(2, 6), device="cpu"), lambda: torch.randn(2, 6))):
        torch.manual_seed(11)
        got = call()
        torch.manual_seed(11)
        assert torch.equal(got, want())
    assert randn(3, device="cpu", requires_grad=True).requires_grad
    assert conftest._size_of((2, 3, 4), {}) == conftest._size_of(((2, 3, 4),), {}) == 24
    assert conftest._size_of(*conftest.DRAW_SIZES["randint"]((0, 5, (6, 7)), {})) == 42
    calls = []
    big = conftest._cpu_draw(lambda *a, **k: calls.append(k["device"]) or torch.zeros(1),
                            conftest.DRAW_SIZES["randn"], "cpu")
    big(conftest.CPU_DRAW_LIMIT + 1, device="cpu:0")
    big(8, device="cpu:0")
    assert calls == ["cpu:0", "cpu"]


@triton.jit
def _fast_math_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Rows of out (8, n): exp2(x), exp(x), log2|y|, log|y|, sqrt|y|, rsqrt|y|, x / y, div_rn(x, y); float32."""
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    y = tl.abs(tl.load(y_ptr + offs, mask=mask, other=1.0)) + 1e-3
    tl.store(out_ptr + offs, tl.math.exp2(x), mask=mask)
    tl.store(out_ptr + n + offs, tl.exp(x), mask=mask)
    tl.store(out_ptr + 2 * n + offs, tl.math.log2(y), mask=mask)
    tl.store(out_ptr + 3 * n + offs, tl.log(y), mask=mask)
    tl.store(out_ptr + 4 * n + offs, tl.sqrt(y), mask=mask)
    tl.store(out_ptr + 5 * n + offs, tl.rsqrt(y), mask=mask)
    tl.store(out_ptr + 6 * n + offs, x / y, mask=mask)
    tl.store(out_ptr + 7 * n + offs, tl.div_rn(x, y), mask=mask)


def _fast_math(x, y):
    n = x.numel()
    out = torch.full((8, n), float("nan"), device=DEV)
    _fast_math_kernel[(1,)](x, y, out, n, BLOCK=triton.next_power_of_2(n))
    return out.cpu().double()


def _ulp_err(got, want64):
    """|got - want| in float32 ulps at want (float64 in, float64 out)."""
    spacing = torch.from_numpy(np.spacing(np.abs(want64.float().numpy())).astype(np.float64))
    return ((got - want64) / spacing).abs()


def test_fast_math_within_the_model():
    """float32 exp2 / exp / log2 / log / sqrt / rsqrt / division within the model's ulps (``APPROX_ULPS``, one more
    for the correct rounding the model starts from and the ulp's size changing across a power of two) of what
    the model says the instruction approximates: exp2(fl(x log2 e)) for exp. div_rn is
    correctly rounded. On CUDA this checks the model against the hardware: a failure there means the model (and
    so what the CPU tests predict for float32 kernels on a GPU) is wrong."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(3000, generator=g) * 40 - 30).to(DEV)  # exp2 results from 2^-30 to 2^10
    y = (torch.randn(3000, generator=g) * 3).to(DEV)
    out = _fast_math(x, y)
    x64 = x.cpu().double()
    y64 = y.cpu().abs().add(1e-3).double()  # the kernel's y, rounded in float32 as there
    t64 = (x.cpu() * 1.4426950408889634).double()  # fl(x * log2 e)
    want = {"exp2": torch.exp2(x64), "exp": torch.exp2(t64), "log2": torch.log2(y64), "log": torch.log(y64),
            "sqrt": y64.sqrt(), "rsqrt": y64.rsqrt(), "div": x64 / y64}
    for row, (name, w) in enumerate(want.items()):
        err = _ulp_err(out[row], w)
        bound = gn.APPROX_ULPS[name] + 1.0
        assert float(err.max()) <= bound, (name, float(err.max()), bound)
        if INTERPRETED:  # the model is in force for every instruction (else the bound above proves nothing)
            assert float(err.max()) > gn.APPROX_ULPS[name] - 0.5, (name, float(err.max()))
    assert float(_ulp_err(out[7], x64 / y64).max()) <= 0.5


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's model")
def test_fast_math_model_is_deterministic_with_exact_cases():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(500, generator=g) * 20 - 10
    x[:6] = torch.tensor([0.0, 1.0, -3.0, 7.0, -200.0, -126.5])  # integers exact; 2^-200 and 2^-126.5 flushed
    y = torch.randn(500, generator=g)
    y[:3] = torch.tensor([2.0, -0.5, 1.0]) - 1e-3 * torch.tensor([1.0, -1.0, 1.0])  # |y| + 1e-3 = 2, 0.5, 1
    a, b = _fast_math(x, y), _fast_math(x, y)
    assert torch.equal(a, b)
    assert a[0, :6].tolist() == [1.0, 2.0, 0.125, 128.0, 0.0, 0.0]
    yk = y.abs() + 1e-3
    assert torch.equal(a[6, :3], (x[:3] / yk[:3]).double())  # by a power of two: exact
    moved = _ulp_err(a[0, 6:], torch.exp2(x[6:].double()))
    assert float(moved.max()) > 1.0  # the model moves results (else the test above proves nothing)
