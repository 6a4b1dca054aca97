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

Left as the interpreter has them: float32 transcendentals (the GPU's ``ex2.approx`` / ``rsqrt.approx`` differ by an
ulp or two), the order of a dot's sums, reductions over bfloat16 values (the kernels here reduce in float32).
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

    def unary_op(self, arg, op):
        if not is_bf16(arg):
            return orig_unary(self, arg, op)
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

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.binary_op = binary_op
    builder.unary_op = unary_op
    builder.create_fma = create_fma
    builder.create_dot = create_dot
    setattr(builder, MARK, True)
