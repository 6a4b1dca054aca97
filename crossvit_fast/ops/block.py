"""``crossvit_fast::block_half``: one residual half of a branch block (pre-norm, two GEMMs) as one differentiable op.

Semantics, with ``ct = w1.dtype`` the compute dtype and every GEMM as the ``linear`` op computes it::

    a   = LayerNorm(x).to(ct)                                 (float32 statistics, affine)
    y1  = a @ w1^T + b1                                        (N1 = w1's rows)
    mid = GELU(y1)                        if num_heads == 0    the MLP half:       x + drop_path(fc2(GELU(fc1(norm2(x)))))
        = self_attention(y1, num_heads)   if num_heads > 0     the attention half: x + drop_path(proj(attn(norm1(x))))
    out = x + scale * (mid @ w2^T + b2)                        in promote(x.dtype, ct); scale: drop-path's (B,) or None

Forward: the launches of the separate ops, nothing more: ``linear`` (LayerNorm -- in 16-bit the ``layer_norm``
kernel, then the GEMM --, bias, GELU for the MLP),
``self_attention`` for the attention half, ``linear`` (bias, scale and the residual add in the epilogue).

Why one op: the backward. ``x`` feeds two uses, the LayerNorm and the residual; as separate ops autograd adds their
gradients with an extra elementwise pass over the residual stream (the float32 ``(B, N, C)`` gradient read twice
and written once, twice per block). Here the LayerNorm backward kernel takes the residual's gradient (``dout``) as
its ``dr`` input and adds it while it writes ``dx``: that pass is gone. The rest is the ``linear`` op's backward:
``linear_dgrad`` for each GEMM (drop-path scale, GELU' and the bias gradient's partial sums: in 16-bit by the
elementwise dz kernel, once per element, before a GEMM without prologue; in float32 in the GEMM's prologue),
``dW = dz^T a`` with torch, the ``self_attention`` backward kernels in between for the attention half.

Ops (``torch.ops.crossvit_fast``), each with a fake implementation:

* ``block_half(Tensor x, Tensor ln_weight, Tensor ln_bias, float eps, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2,
  Tensor? scale, int num_heads, float? attn_scale, bool save) -> (Tensor out, Tensor y1, Tensor pre, Tensor o,
  Tensor o_lo, Tensor lse, Tensor ahat, Tensor mean, Tensor rstd)``. With ``save`` the forward also returns what
  the backward reads: ``y1`` (the MLP's GELU output / the attention's qkv), ``pre`` (the MLP's z before GELU,
  ``(M, N1)``), ``o``, ``o_lo`` and ``lse`` (the attention's output ``(B, N, N1 / 3)``, its rounding residual
  for a 16-bit compute dtype (the ``self_attention`` op's ``out_lo``) and float32 log-sum-exp ``(B, H, N)``), ``ahat``
  (the rounded normalised input ``(M, C)``) and float32 ``mean`` / ``rstd`` ``(M,)``; each is an empty ``(0,)``
  tensor where it does not apply or without ``save``. Only ``out`` is differentiable.
* ``block_half_backward(Tensor dout, Tensor x, Tensor ln_weight, Tensor w1, Tensor w2, Tensor y1, Tensor pre,
  Tensor o, Tensor o_lo, Tensor lse, Tensor ahat, Tensor mean, Tensor rstd, Tensor? scale, int num_heads,
  float? attn_scale) -> (Tensor dx, Tensor dln_weight, Tensor dln_bias, Tensor dw1, Tensor db1, Tensor dw2,
  Tensor db2)``: ``db1``, ``db2`` float32.

Use :func:`block_half`.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
from torch import Tensor

from crossvit_fast.config import LN_EPS
from crossvit_fast.ops import autocast_off, check_one_device, refuse_double_backward
from crossvit_fast.ops.linear import _check as _check_linear
from crossvit_fast.ops.linear import _kernels as _linear_kernels
from crossvit_fast.ops.linear import _DTYPES, _ln_kernels, dgrad
from crossvit_fast.ops.self_attention import SUPPORTED_HEAD_DIMS, _saves_residual

__all__ = ["block_half", "OP_NAME", "BACKWARD_OP_NAME"]

OP_NAME = "crossvit_fast::block_half"
BACKWARD_OP_NAME = "crossvit_fast::block_half_backward"


def _check(x, ln_weight, ln_bias, w1, b1, w2, b2, scale, num_heads) -> Tuple[int, int, int]:
    """The checks that need no device (the fakes run them too); returns ``(C, N1, K2)``."""
    if x.dim() != 3:
        raise ValueError(f"block_half: x must be (B, N, C), got shape {tuple(x.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 0:
        raise ValueError(f"block_half: num_heads must be an int >= 0 (0: the MLP half), got {num_heads!r}")
    try:
        _check_linear(x, w1, b1, ln_weight, ln_bias, None, None, None)
    except (TypeError, ValueError) as err:  # in block_half's words: its names for the first GEMM's arguments
        msg = re.sub(r"\bbias\b", "b1", re.sub(r"\bweight\b", "w1", str(err).removeprefix("linear: ")))
        raise type(err)(f"block_half: {msg}") from None
    C, N1 = x.shape[-1], w1.shape[0]
    if num_heads:
        D = N1 // (3 * num_heads)
        if N1 % (3 * num_heads) != 0 or D not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"block_half: w1 has {N1} rows, expected 3 * num_heads * head_dim (a qkv Linear) with "
                             f"num_heads={num_heads} and a head_dim in {SUPPORTED_HEAD_DIMS}")
    K2 = N1 // 3 if num_heads else N1
    if w2.dim() != 2 or tuple(w2.shape) != (C, K2):
        raise ValueError(f"block_half: w2 has shape {tuple(w2.shape)}, expected ({C}, {K2}) (back to x's width "
                         f"from {'the attention output' if num_heads else 'the hidden layer'})")
    if w2.dtype != w1.dtype:
        raise TypeError(f"block_half: w1 is {w1.dtype} and w2 {w2.dtype}; expected one compute dtype")
    for name, t, shape in (("b2", b2, (C,)), ("scale", scale, (x.shape[0],))):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"block_half: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
        if t.numel() != shape[0] or (t.dim() > 0 and t.shape[0] != shape[0]) or t.dim() > 1:
            raise ValueError(f"block_half: {name} has shape {tuple(t.shape)}, expected {shape}")
    check_one_device("block_half", x, (("w2", w2), ("b2", b2), ("scale", scale)))
    return C, N1, K2


@torch.library.custom_op(OP_NAME, mutates_args=())
def _block_half(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    eps: float,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    scale: Optional[Tensor],
    num_heads: int,
    attn_scale: Optional[float],
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        return _block_half_impl(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, scale, num_heads, attn_scale, save)


def _block_half_impl(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, scale, num_heads, attn_scale, save):
    k = _linear_kernels()
    y1, pre, ahat, mean, rstd = k.linear_fwd(x, w1, b1, ln_weight, ln_bias, eps, num_heads == 0, save=save)
    o = o_lo = lse = None
    if num_heads:
        from crossvit_fast.kernels.self_attention import self_attention_fwd

        if _saves_residual(y1, save):
            o_lo = y1.new_empty(y1.shape[:-1] + (y1.shape[-1] // 3,))
        o, lse = self_attention_fwd(y1, num_heads, attn_scale, out_lo=o_lo)  # (B, N, N1 / 3), (B, H, N)
    out = k.linear_fwd(o if num_heads else y1, w2, b2, scale=scale, residual=x)[0]

    def kept(t, dtype):
        return t if save and t is not None else x.new_empty((0,), dtype=dtype)

    ct, f32 = w1.dtype, torch.float32
    return (out, kept(y1, ct), kept(pre, ct), kept(o, ct), kept(o_lo, ct), kept(lse, f32), kept(ahat, ct),
            kept(mean, f32), kept(rstd, f32))


@_block_half.register_fake
def _block_half_fake(x, ln_weight, ln_bias, eps, w1, b1, w2, b2, scale, num_heads, attn_scale, save):
    C, N1, K2 = _check(x, ln_weight, ln_bias, w1, b1, w2, b2, scale, num_heads)
    B, N = x.shape[0], x.shape[1]
    M = B * N
    ct, f32 = w1.dtype, torch.float32

    def saved(shape, dtype):
        return x.new_empty(shape if save else (0,), dtype=dtype)

    out = x.new_empty((B, N, C), dtype=torch.promote_types(x.dtype, ct))
    return (out, saved((B, N, N1), ct), saved((M, N1) if not num_heads else (0,), ct),
            saved((B, N, K2) if num_heads else (0,), ct),
            saved((B, N, K2) if num_heads and ct != f32 else (0,), ct),
            saved((B, num_heads, N) if num_heads else (0,), f32),
            saved((M, C), ct), saved((M,), f32), saved((M,), f32))


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _block_half_backward(
    dout: Tensor,
    x: Tensor,
    ln_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    y1: Tensor,
    pre: Tensor,
    o: Tensor,
    o_lo: Tensor,
    lse: Tensor,
    ahat: Tensor,
    mean: Tensor,
    rstd: Tensor,
    scale: Optional[Tensor],
    num_heads: int,
    attn_scale: Optional[float],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        return _block_half_backward_impl(dout, x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale,
                                         num_heads, attn_scale)


def _block_half_backward_impl(dout, x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale, num_heads,
                              attn_scale):
    B, N, C = x.shape
    M, N1, K2 = B * N, w1.shape[0], w2.shape[1]
    ct = w1.dtype
    mid = o if num_heads else y1  # the second GEMM's input, (B, N, K2)
    dmid, dz2, db2 = dgrad(dout, w2, None, scale, ct)
    dw2 = torch.mm(dz2.t(), mid.reshape(M, K2)) if M > 0 else w2.new_zeros(w2.shape)
    if num_heads:
        from crossvit_fast.kernels.self_attention import self_attention_bwd

        dy1 = self_attention_bwd(dmid, y1, o, lse, num_heads, attn_scale,
                                 out_lo=o_lo if o_lo.numel() else None)  # (B, N, N1)
        da, dz1, db1 = dgrad(dy1, w1, None, None, torch.float32)
    else:
        da, dz1, db1 = dgrad(dmid, w1, pre, None, torch.float32)  # GELU' (16-bit: the dz kernel; float32: prologue)
    dw1 = torch.mm(dz1.t(), ahat) if M > 0 else w1.new_zeros(w1.shape)
    # dx = dout (the residual's gradient) + the LayerNorm's backward, one kernel (its dr input)
    dx, _, dlw, dlb = _ln_kernels().layer_norm_bwd(da, dout, x, ln_weight, mean.reshape(B, N), rstd.reshape(B, N),
                                                   x.dtype)
    return dx, dlw, dlb, dw1, db1, dw2, db2


@_block_half_backward.register_fake
def _block_half_backward_fake(dout, x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale, num_heads,
                              attn_scale):
    if tuple(dout.shape) != tuple(x.shape):
        raise ValueError(f"block_half_backward: dout has shape {tuple(dout.shape)}, expected {tuple(x.shape)}")
    f32 = torch.float32
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(ln_weight),
            torch.empty_like(ln_weight), torch.empty_like(w1), w1.new_empty((w1.shape[0],), dtype=f32),
            torch.empty_like(w2), w2.new_empty((w2.shape[0],), dtype=f32))


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, w1, b1, w2, b2, scale, num_heads, attn_scale, save = inputs
    out, y1, pre, o, o_lo, lse, ahat, mean, rstd = output
    ctx.unsaved = not save
    if not save:
        return
    ctx.save_for_backward(x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale)
    ctx.num_heads, ctx.attn_scale = num_heads, attn_scale
    ctx.dtypes = (ln_bias.dtype, b1.dtype if b1 is not None else None, b2.dtype if b2 is not None else None)
    ctx.mark_non_differentiable(y1, pre, o, o_lo, lse, ahat, mean, rstd)


def _backward(ctx, dout, *_):
    if ctx.unsaved:
        raise RuntimeError("crossvit_fast::block_half: backward through a call made with save=False (the forward did "
                           "not keep what the backward reads); call crossvit_fast.ops.block.block_half(), which sets "
                           "it")
    x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale = ctx.saved_tensors
    dx, dlw, dlb, dw1, db1, dw2, db2 = torch.ops.crossvit_fast.block_half_backward(
        dout, x, ln_weight, w1, w2, y1, pre, o, o_lo, lse, ahat, mean, rstd, scale, ctx.num_heads, ctx.attn_scale)
    lb_dt, b1_dt, b2_dt = ctx.dtypes
    return (dx, dlw, dlb.to(lb_dt), None, dw1, db1.to(b1_dt) if b1_dt is not None else None, dw2,
            db2.to(b2_dt) if b2_dt is not None else None, None, None, None, None)


_block_half.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_block_half_backward, "block_half")


def block_half(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    eps: float = LN_EPS,
    scale: Optional[Tensor] = None,
    num_heads: int = 0,
    attn_scale: Optional[float] = None,
) -> Tensor:
    """``x + scale * (mid(LayerNorm(x).to(ct) @ w1^T + b1) @ w2^T + b2)``: a branch block's MLP half
    (``num_heads=0``, mid = GELU) or attention half (mid = multi-head self-attention over the qkv).

    Args:
        x: ``(B, N, C)`` residual stream, float16/bfloat16/float32, any strides; CUDA (CPU only under
            ``TRITON_INTERPRET=1``).
        ln_weight, ln_bias, eps: the half's affine LayerNorm over C (float32 math).
        w1, b1: fc1 ``(hidden, C)`` or qkv ``(3C', C)``; w1's dtype is the compute dtype (under autocast pass
            ``weight.to(autocast dtype)``). b1 may be None.
        w2, b2: fc2 ``(C, hidden)`` or proj ``(C, C')``, in the compute dtype; b2 may be None.
        scale: None or drop-path's per-sample ``mask / keep`` ``(B,)``; not differentiable.
        num_heads: 0 for the MLP half; the attention's heads for the attention half (head dim ``C' / num_heads``,
            a size the ``self_attention`` kernels take).
        attn_scale: the attention's score scale (default ``head_dim ** -0.5``).

    Returns:
        ``(B, N, C)`` in ``promote(x.dtype, ct)``. Differentiable in x, the LayerNorm's and both Linears' parameters.
    """
    for name, t in (("x", x), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("w1", w1), ("w2", w2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"block_half: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("b1", b1), ("b2", b2), ("scale", scale)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"block_half: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"block_half: eps must be a float >= 0, got {eps!r}")
    _check(x, ln_weight, ln_bias, w1, b1, w2, b2, scale, num_heads)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, ln_weight, ln_bias, w1, b1, w2, b2))
    if scale is not None:
        scale = scale.detach()
    return torch.ops.crossvit_fast.block_half(x, ln_weight, ln_bias, float(eps), w1, b1, w2, b2, scale,
                                              int(num_heads), None if attn_scale is None else float(attn_scale),
                                              save)[0]
