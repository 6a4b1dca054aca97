"""The rounding of an NVIDIA GPU in Triton's CPU interpreter: bfloat16 runs, tf32 rounds, on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a kernel in numpy, where bfloat16 is a ``uint16`` bit pattern.
Out of the box that costs the CPU tests every bfloat16 path and every tf32 rounding:

* ``tl.dot`` on bfloat16 operands multiplies the bit patterns as integers (garbage);
* a float32 -> bfloat16 cast (an explicit ``.to`` or the cast of a ``tl.store``) truncates;
* arithmetic and comparisons on bfloat16 values act on the bit patterns;
* ``input_precision`` is ignored: a ``"tf32"`` dot of float32 operands is an exact float32 product.

``install`` replaces those methods of the interpreter's builder with what the GPU computes:

* a dot converts 16-bit operands exactly to float32 and sums float32 products in float32 (the tensor cores'
  exact products, float32 accumulation); a bfloat16 accumulator or result is rounded to nearest even;
* float32 -> bfloat16 rounds to nearest even (``cvt.rn.bf16.f32``), with the carry into the exponent; NaN stays NaN;
* bfloat16 arithmetic (binary, unary, fma) runs in float32 and rounds the result to bfloat16 (one rounding for
  +, -, *: float32 holds more than twice bfloat16's digits); comparisons compare values;
* ``"tf32"`` on float32 operands drops the 13 low mantissa bits of each operand: the tensor cores read the float32
  bit pattern and ignore them, and Triton converts nothing first (truncation: up to 2^-10 relative, the
  conservative choice if it rounded instead). ``"tf32x3"`` follows Triton's F32DotTC rewrite: ``big =
  cvt.rna.tf32(a)`` (round to nearest, ties away), ``small = a - big`` (truncated again by the tensor core),
  ``dot(big, small_b) + dot(small_a, big_b) + dot(big, big)``, the small x small product dropped.
  ``"ieee"`` is exact float32, as before.

* float32 fast math, as Triton (3.6 and 3.9) compiles it for sm_90 (read off the PTX): ``tl.exp2`` is
  ``ex2.approx.ftz.f32``; ``tl.exp`` is ``ex2.approx.f32`` of ``fl(x * log2 e)``; ``tl.sqrt`` / ``tl.rsqrt`` are
  ``sqrt.approx.ftz.f32`` / ``rsqrt.approx.ftz.f32``; ``/`` is ``div.full.f32``; ``tl.log`` / ``tl.log2`` are
  libdevice polynomials. None is correctly rounded. The model rounds the exact value to float32, then moves it by
  ``k`` ulps, ``k`` in ``[-APPROX_ULPS[op], APPROX_ULPS[op]]`` drawn from a hash of the operands' bits
  (deterministic: the same inputs give the same result in every kernel, as on the GPU), and flushes subnormal
  ``exp2`` results to zero. The rounding of ``x * log2 e`` alone moves ``exp(x)`` by up to ``|x| / 2`` ulps: the
  model multiplies as the GPU does. The bounds are the documented order of these instructions' errors (about 2
  ulp for ex2, div.full and the approximate square roots; 1 for libdevice's logs): a conservative model, not the
  hardware's exact error. Exact cases stay exact (``2^n``, zeros, division by a power of two); ``tl.div_rn`` /
  ``tl.sqrt_rn`` (``div.rn`` / ``sqrt.rn``) stay correctly rounded. ``test_gpu_numerics.py`` checks the model
  against the GPU.

One fix is not about rounding: triton 3.6's interpreter fails under numpy 2.4+ on loops with runtime bounds
(``int()`` of a 1-element array); ``install`` gives it triton 3.7's squeeze.

Left as the interpreter has them: the order of a dot's sums, reductions over bfloat16 values (the kernels here
reduce in float32), libdevice functions (``erf``).
``conftest.py`` installs it in every test session under the interpreter, so the kernel tests run their bfloat16 cases on the CPU;
the launchers' bfloat16 refusal under the interpreter yields to it (``crossvit_fast.config.interpreter_runs_bf16``).
"""

from __future__ import annotations

import numpy as np

MARK = "_crossvit_fast_gpu_numerics"
"""Set on the interpreter's builder class once :func:`install` has run: what the launchers check."""


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (``uint16``), round to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) -> float32, exact."""
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """What a tensor core reads of a float32 operand in a tf32 product: the 13 low mantissa bits cleared."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return (bits & np.uint32(0xFFFFE000)).view(np.float32)


def tf32_round_away(x: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32``: float32 rounded to 10 mantissa bits, ties away from zero; Inf / NaN unchanged."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(special, bits, rounded).view(np.float32)


APPROX_ULPS = {"exp2": 2, "exp": 2, "log2": 1, "log": 1, "sqrt": 2, "rsqrt": 2, "div": 2}
"""The model's largest error, in float32 ulps, of each fast-math instruction (see the module docstring)."""


def _hash_k(key: np.ndarray, ulps: int) -> np.ndarray:
    """A deterministic ``k`` in ``[-ulps, ulps]`` per element, from 32-bit keys."""
    h = (key.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return ((h >> np.uint64(13)) % np.uint64(2 * ulps + 1)).astype(np.int64) - ulps


def approx_f32(out: np.ndarray, key: np.ndarray, ulps: int, ftz: bool = False) -> np.ndarray:
    """float32 ``out`` moved by ``k`` ulps (``k`` from :func:`_hash_k` of ``key``); zeros, Inf and NaN unchanged;
    ``ftz``: results below float32's smallest normal become zero."""
    out = np.ascontiguousarray(out, dtype=np.float32)
    bits = out.view(np.uint32).astype(np.int64)
    sign, mag = bits & 0x80000000, bits & 0x7FFFFFFF
    moved = np.clip(mag + _hash_k(np.broadcast_to(key, out.shape), ulps), 1, 0x7F7FFFFF)
    regular = np.isfinite(out) & (out != 0)
    res = np.where(regular, sign | moved, bits).astype(np.uint32).view(np.float32).reshape(out.shape)
    if ftz:
        res = np.where(np.abs(res) < np.float32(2.0 ** -126), np.float32(0.0), res).astype(np.float32)
    return res


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def fast_math(name: str, x: np.ndarray) -> np.ndarray:
    """float32 ``name(x)`` as sm_90 computes it, in the model (module docstring): ``exp(x) = ex2(fl(x * log2 e))``,
    every result moved by up to ``APPROX_ULPS[name]`` ulps."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        if name in ("exp2", "exp"):
            t = x if name == "exp2" else (x * np.float32(1.4426950408889634)).astype(np.float32)
            exact = np.exp2(t.astype(np.float64)).astype(np.float32)  # correctly rounded, then moved
            out = approx_f32(exact, _bits(t), APPROX_ULPS[name], ftz=name == "exp2")
            return np.where(t == np.round(t), exact, out).astype(np.float32)  # 2^n exact
        if name in ("log2", "log", "sqrt"):
            f = {"log2": np.log2, "log": np.log, "sqrt": np.sqrt}[name]
            return approx_f32(f(x.astype(np.float64)).astype(np.float32), _bits(x), APPROX_ULPS[name])
    raise KeyError(name)


def install() -> None:
    """Patch the interpreter's builder (idempotent). Call before or after the kernel modules are imported."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, MARK, False):
        return
    Handle = interp.TensorHandle
    orig_cast, orig_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    orig_binary, orig_unary, orig_fma = builder.binary_op, builder.unary_op, builder.create_fma

    def is_bf16(h):
        return h.dtype.scalar == tl.bfloat16

    def to_f32(h):
        """A float operand as float32 values (16-bit exactly; float32 as it is)."""
        if is_bf16(h):
            return bf16_bits_to_f32(h.data)
        return h.data.astype(np.float32) if h.data.dtype != np.float32 else h.data

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.bfloat16 and s != tl.bfloat16:
            f32 = src.data if s == tl.float32 else orig_cast(self, src, tl.float32).data
            return Handle(f32_to_bf16_bits(f32).reshape(np.shape(src.data)), tl.bfloat16)
        if s == tl.bfloat16 and d != tl.bfloat16 and d != tl.float32:
            return orig_cast(self, Handle(bf16_bits_to_f32(src.data).reshape(np.shape(src.data)), tl.float32),
                             dst_type)
        return orig_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32 and rounding_mode != getattr(
                interp._ir.ROUNDING_MODE, "RTZ", object()):
            return cast_impl(self, src, dst_type)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    def binary_op(self, lhs, rhs, op):
        if not (is_bf16(lhs) or is_bf16(rhs)):
            return orig_binary(self, lhs, rhs, op)
        out = op(to_f32(lhs), to_f32(rhs))
        if out.dtype == np.bool_:
            return Handle(out, tl.int1)
        return Handle(f32_to_bf16_bits(out.astype(np.float32)).reshape(out.shape), tl.bfloat16)

    fast = {np.exp2: "exp2", np.exp: "exp", np.log2: "log2", np.log: "log", np.sqrt: "sqrt"}

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            out = orig_unary(self, arg, op)
            name = fast.get(op)
            if name is None or out.dtype.scalar != tl.float32:
                return out
            x = np.asarray(arg.data, dtype=np.float32)
            return Handle(fast_math(name, x).reshape(np.shape(out.data)), tl.float32)
        out = np.asarray(op(to_f32(arg)), dtype=np.float32)
        return Handle(f32_to_bf16_bits(out).reshape(out.shape), tl.bfloat16)

    def create_fma(self, x, y, z):
        if not (is_bf16(x) or is_bf16(y) or is_bf16(z)):
            return orig_fma(self, x, y, z)
        out = (to_f32(x).astype(np.float64) * to_f32(y) + to_f32(z)).astype(np.float32)
        return Handle(f32_to_bf16_bits(out).reshape(out.shape), tl.bfloat16)

    def precision_name(p) -> str:
        name = getattr(p, "name", p)
        return str(name).lower().replace("input_precision.", "")

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar.primitive_bitwidth == 8 or b.dtype.scalar.primitive_bitwidth == 8:
            raise NotImplementedError("tests/gpu_numerics.py: 8-bit dot operands are not emulated")
        fa, fb, acc = to_f32(a), to_f32(b), to_f32(d)
        both32 = a.dtype.scalar == tl.float32 and b.dtype.scalar == tl.float32
        prec = precision_name(input_precision) if both32 else "ieee"
        if prec == "tf32":
            prod = np.matmul(tf32_truncate(fa), tf32_truncate(fb), dtype=np.float32)
        elif prec == "tf32x3":
            ba, bb = tf32_round_away(fa), tf32_round_away(fb)
            sa, sb = tf32_truncate(fa - ba), tf32_truncate(fb - bb)
            prod = np.matmul(sa, bb, dtype=np.float32)
            prod = prod + np.matmul(ba, sb, dtype=np.float32)
            prod = prod + np.matmul(ba, bb, dtype=np.float32)
        elif prec == "ieee":
            prod = np.matmul(fa, fb, dtype=np.float32)
        else:
            raise NotImplementedError(f"tests/gpu_numerics.py: input_precision {input_precision!r} is not emulated")
        out = prod + acc
        if is_bf16(d):
            return Handle(f32_to_bf16_bits(out).reshape(out.shape), tl.bfloat16)
        return Handle(out.astype(d.data.dtype), d.dtype.scalar)

    orig_rsqrt, orig_fdiv = builder.create_rsqrt, builder.create_fdiv

    def create_precise_sqrt(self, arg):  # sqrt.rn: correctly rounded, no model error
        if is_bf16(arg):
            return unary_op(self, arg, np.sqrt)
        return orig_unary(self, arg, np.sqrt)

    def create_rsqrt(self, arg):
        if arg.dtype.scalar != tl.float32:
            return orig_rsqrt(self, arg)
        x = np.asarray(arg.data, dtype=np.float32)
        with np.errstate(all="ignore"):
            exact = (1.0 / np.sqrt(x.astype(np.float64))).astype(np.float32)
        moved = approx_f32(exact, _bits(x), APPROX_ULPS["rsqrt"])
        return Handle(moved.reshape(np.shape(x)), tl.float32)

    def create_fdiv(self, lhs, rhs):
        out = orig_fdiv(self, lhs, rhs)
        if out.dtype.scalar != tl.float32:
            return out
        a, b = np.broadcast_arrays(np.asarray(lhs.data, dtype=np.float32), np.asarray(rhs.data, dtype=np.float32))
        bb = _bits(b)
        key = _bits(a) ^ ((bb << np.uint32(7)) | (bb >> np.uint32(25)))
        pow2 = (bb & np.uint32(0x007FFFFF)) == 0  # a power of two (or zero, Inf): div.full is exact
        moved = np.where(pow2, out.data, approx_f32(out.data, key, APPROX_ULPS["div"])).astype(np.float32)
        return Handle(moved.reshape(np.shape(out.data)), tl.float32)

    # Not rounding, compatibility: triton < 3.7's interpreter takes a scalar's index as int(data) of a 1-element
    # array, a TypeError from numpy 2.4 on (loops with runtime bounds); 3.7+ squeezes first, as here.
    orig_patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if orig_patch_tensor is not None:
        def patch_lang_tensor(tensor, scope):
            orig_patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

        interp._patch_lang_tensor = patch_lang_tensor

    builder.create_precise_sqrt = create_precise_sqrt
    builder.create_rsqrt = create_rsqrt
    builder.create_fdiv = create_fdiv
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    builder.create_fma = create_fma
    builder.create_dot = create_dot
    setattr(builder, MARK, True)
