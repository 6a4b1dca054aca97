"""``crossvit_fast::layer_norm``: residual add + LayerNorm as one opaque, differentiable op.

Semantics are :func:`crossvit_fast.reference.layer_norm_ref`: ``r = x + residual`` (when given) and
``out = LayerNorm(r)`` in ``out_dtype``. The Triton launchers (:mod:`crossvit_fast.kernels.layer_norm`) are
imported the first time an op runs.

Ops (``torch.ops.crossvit_fast``), each with a fake implementation:

* ``layer_norm(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps, ScalarType? out_dtype)
  -> (Tensor out, Tensor r, Tensor mean, Tensor rstd)``. ``r`` is ``x + residual``; without a residual it is an
  empty ``(0,)`` tensor (an op's output may not alias its input). ``mean``/``rstd`` (float32, ``x.shape[:-1]``)
  are kept for the backward and are not differentiable.
* ``layer_norm_backward(Tensor dout, Tensor? dr, Tensor xin, Tensor weight, Tensor mean, Tensor rstd,
  ScalarType x_dtype, ScalarType? y_dtype) -> (Tensor dx, Tensor dy, Tensor dweight, Tensor dbias)``; ``dy`` is
  empty ``(0,)`` without a residual.

Use :func:`layer_norm`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from crossvit_fast.config import LN_EPS
from crossvit_fast.ops import autocast_off, check_one_device, refuse_double_backward

__all__ = ["layer_norm", "OP_NAME", "BACKWARD_OP_NAME"]

OP_NAME = "crossvit_fast::layer_norm"
BACKWARD_OP_NAME = "crossvit_fast::layer_norm_backward"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from crossvit_fast.kernels import layer_norm as kernels

    return kernels


def _check(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, out_dtype) -> None:
    """The checks that need no device (the fakes run them too)."""
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"layer_norm: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    _kernels().check_layer_norm_shapes(x, residual, weight, bias)
    if weight.dtype != bias.dtype:
        raise TypeError(f"layer_norm: weight is {weight.dtype} and bias {bias.dtype}; expected one dtype, as "
                        f"torch's LayerNorm")
    check_one_device("layer_norm", x, (("residual", residual), ("weight", weight), ("bias", bias)))
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise TypeError(f"layer_norm: out_dtype {out_dtype}; expected float16, bfloat16 or float32")


@torch.library.custom_op(OP_NAME, mutates_args=())
def _layer_norm(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float, out_dtype: Optional[torch.dtype]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        out, r, mean, rstd = _kernels().layer_norm_fwd(x, residual, weight, bias, eps, out_dtype)
    if r is None:
        r = x.new_empty((0,))
    return out, r, mean, rstd


@_layer_norm.register_fake
def _layer_norm_fake(x, residual, weight, bias, eps, out_dtype):
    _check(x, residual, weight, bias, out_dtype)
    r_dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    out = x.new_empty(x.shape, dtype=out_dtype or r_dtype)
    r = x.new_empty(x.shape if residual is not None else (0,), dtype=r_dtype)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return out, r, stats, torch.empty_like(stats)


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _layer_norm_backward(
    dout: Tensor,
    dr: Optional[Tensor],
    xin: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    x_dtype: torch.dtype,
    y_dtype: Optional[torch.dtype],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(xin):
        dx, dy, dw, db = _kernels().layer_norm_bwd(dout, dr, xin, weight, mean, rstd, x_dtype, y_dtype)
    if dy is None:
        dy = xin.new_empty((0,))
    return dx, dy, dw, db


@_layer_norm_backward.register_fake
def _layer_norm_backward_fake(dout, dr, xin, weight, mean, rstd, x_dtype, y_dtype):
    if dout.shape != xin.shape:
        raise ValueError(f"layer_norm_backward: dout has shape {tuple(dout.shape)}, expected {tuple(xin.shape)}")
    dx = xin.new_empty(xin.shape, dtype=x_dtype)
    dy = xin.new_empty(xin.shape if y_dtype is not None else (0,), dtype=y_dtype or xin.dtype)
    return dx, dy, torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype = inputs
    out, r, mean, rstd = output
    has_residual = residual is not None
    ctx.save_for_backward(r if has_residual else x, weight, mean, rstd)
    ctx.has_residual = has_residual
    ctx.x_dtype = x.dtype
    ctx.y_dtype = residual.dtype if has_residual else None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, dr, dmean, drstd):
    xin, weight, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual or (dr is not None and dr.numel() == 0):
        dr = None
    dx, dy, dw, db = torch.ops.crossvit_fast.layer_norm_backward(
        dout, dr, xin, weight, mean, rstd, ctx.x_dtype, ctx.y_dtype
    )
    return dx, (dy if ctx.has_residual else None), dw, db, None, None


_layer_norm.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_layer_norm_backward, "layer_norm")


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = LN_EPS,
    residual: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused (residual add +) LayerNorm over the last dimension: same contract as ``layer_norm_ref``.

    Args:
        x: ``(..., C)``, float16/bfloat16/float32, any strides; CUDA (CPU only under ``TRITON_INTERPRET=1``).
        weight, bias: ``(C,)``.
        eps: LayerNorm's eps (CrossViT's 1e-6 by default).
        residual: None, or a tensor of x's shape added to x first (the residual branch).
        out_dtype: dtype of the normalised output (default: that of ``x + residual``, or x's). Under autocast, the
            autocast dtype when the output only feeds a Linear (which would cast it to that dtype anyway).

    Returns:
        Without a residual, the normalised ``x``. With one, ``(r, out)``: ``r = x + residual`` in
        ``torch.result_type(x, residual)`` and ``out = LayerNorm(r)``. Differentiable in x, residual, weight, bias.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"layer_norm: x must be a torch.Tensor, got {type(x).__name__}")
    if residual is not None and not isinstance(residual, Tensor):
        raise TypeError(f"layer_norm: residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise TypeError("layer_norm: weight and bias must be tensors (a LayerNorm with elementwise_affine=True)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"layer_norm: eps must be a float >= 0, got {eps!r}")
    _check(x, residual, weight, bias, out_dtype)
    out, r, _, _ = torch.ops.crossvit_fast.layer_norm(x, residual, weight, bias, float(eps), out_dtype)
    return out if residual is None else (r, out)
