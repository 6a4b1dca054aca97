"""``crossvit_fast::linear``: a branch block's GEMM with its LayerNorm prologue and bias / GELU / drop-path scale /
residual epilogue, as one opaque, differentiable op.

Semantics are :func:`crossvit_fast.reference.linear_ref`: ``residual + scale * GELU(LayerNorm(x).to(ct) @ W^T + b)``
with every part optional and ``ct = weight.dtype`` the compute dtype. The Triton launchers
(:mod:`crossvit_fast.kernels.linear`) are imported the first time an op runs.

Ops (``torch.ops.crossvit_fast``), each with a fake implementation:

* ``linear(Tensor x, Tensor weight, Tensor? bias, Tensor? ln_weight, Tensor? ln_bias, float eps, bool gelu,
  Tensor? scale, Tensor? residual, ScalarType? out_dtype, bool save)
  -> (Tensor out, Tensor pre, Tensor ahat, Tensor mean, Tensor rstd)``. With ``save`` (the backward will run) the
  forward also returns what the backward reads: ``pre`` = z before GELU ``(M, N)`` in ``ct`` (GELU only),
  ``ahat`` = the rounded normalised input ``(M, K)`` in ``ct`` and float32 ``mean``/``rstd`` ``(M,)`` (LayerNorm
  only); each is an empty ``(0,)`` tensor otherwise. Only ``out`` is differentiable.
* ``linear_backward(Tensor dout, Tensor x, Tensor weight, Tensor? pre, Tensor? ahat, Tensor? ln_weight,
  Tensor? mean, Tensor? rstd, Tensor? scale) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dln_weight,
  Tensor dln_bias)``: ``dbias`` float32 ``(N,)``; ``dln_*`` empty without a LayerNorm.

The backward: ``dz = (dout * scale * GELU'(z)).to(ct)`` (written: the reference writes that gradient too) and its
column sums (``db``), then ``da = dz @ W``: in 16-bit an elementwise kernel forms dz and the sums once per element
and a Triton GEMM without prologue (or, where the autotuner times it faster, cuBLAS: ``DZ_FIRST``) computes ``da``;
in float32 one Triton GEMM forms dz and the sums in its prologue. The 16-bit forward of a LayerNorm GEMM is the
LayerNorm kernel + the GEMM (``LN_FIRST``), or timm's sequence on cuBLAS (``CUBLAS``: kernels/linear.py, Tuning);
``dW = dz^T a`` with torch (cuBLAS); no atomics, deterministic; the LayerNorm backward by the ``layer_norm`` op's
kernel. The residual's gradient is ``dout`` itself. The drop-path scale is not differentiable (a random mask).

Use :func:`linear`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossvit_fast.config import LN_EPS
from crossvit_fast.ops import autocast_off, check_one_device, refuse_double_backward

__all__ = ["linear", "OP_NAME", "BACKWARD_OP_NAME"]

OP_NAME = "crossvit_fast::linear"
BACKWARD_OP_NAME = "crossvit_fast::linear_backward"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from crossvit_fast.kernels import linear as kernels

    return kernels


def _ln_kernels():
    from crossvit_fast.kernels import layer_norm as kernels

    return kernels


def _out_dtype(weight: Tensor, residual: Optional[Tensor], out_dtype) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return weight.dtype if residual is None else torch.promote_types(residual.dtype, weight.dtype)


def _check(x, weight, bias, ln_weight, ln_bias, scale, residual, out_dtype) -> None:
    """The checks that need no device (the fakes run them too)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias),
                    ("scale", scale), ("residual", residual)):
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"linear: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    kernels = _kernels()
    K, N = kernels.check_linear_shapes(x, weight, bias, ln_weight, ln_bias)
    if ln_weight is not None and ln_weight.dtype != ln_bias.dtype:
        raise TypeError(f"linear: ln_weight is {ln_weight.dtype} and ln_bias {ln_bias.dtype}; expected one dtype "
                        f"(the LayerNorm prologue's gradients come from one kernel)")
    kernels.check_linear_epilogue(x, N, ln_weight, scale, residual, out_dtype)
    check_one_device("linear", x, (("weight", weight), ("bias", bias), ("ln_weight", ln_weight),
                                   ("ln_bias", ln_bias), ("scale", scale), ("residual", residual)))


@torch.library.custom_op(OP_NAME, mutates_args=())
def _linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor],
    eps: float,
    gelu: bool,
    scale: Optional[Tensor],
    residual: Optional[Tensor],
    out_dtype: Optional[torch.dtype],
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        out, pre, ahat, mean, rstd = _kernels().linear_fwd(x, weight, bias, ln_weight, ln_bias, eps, gelu, scale,
                                                           residual, out_dtype, save)
    def empty(dtype):
        return x.new_empty((0,), dtype=dtype)

    return (out, pre if pre is not None else empty(weight.dtype), ahat if ahat is not None else empty(weight.dtype),
            mean if mean is not None else empty(torch.float32), rstd if rstd is not None else empty(torch.float32))


@_linear.register_fake
def _linear_fake(x, weight, bias, ln_weight, ln_bias, eps, gelu, scale, residual, out_dtype, save):
    _check(x, weight, bias, ln_weight, ln_bias, scale, residual, out_dtype)
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // K
    out = x.new_empty(tuple(x.shape[:-1]) + (N,), dtype=_out_dtype(weight, residual, out_dtype))
    has_ln = ln_weight is not None
    pre = x.new_empty((M, N) if save and gelu else (0,), dtype=weight.dtype)
    ahat = x.new_empty((M, K) if save and has_ln else (0,), dtype=weight.dtype)
    mean = x.new_empty((M,) if save and has_ln else (0,), dtype=torch.float32)
    return out, pre, ahat, mean, torch.empty_like(mean)


def dgrad(dout: Tensor, weight: Tensor, pre: Optional[Tensor], scale: Optional[Tensor],
          da_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """``(da, dz, db)`` of one GEMM's backward (the ``linear_dgrad`` kernel): ``dz`` as an ``(M, N)`` tensor in the
    compute dtype for ``dW = dz^T a`` (when it is ``dout`` itself -- no GELU, no scale, ``dout`` already in the
    compute dtype and laid out as ``(M, N)`` -- the kernel writes no copy) and the bias gradient ``db`` (float32
    ``(N,)``, summed from the kernel's per-row-tile partial sums: no second pass over dz)."""
    N = weight.shape[0]
    M = dout.numel() // N
    dout2 = dout.reshape(M, N) if dout.dtype == weight.dtype else None
    store_dz = pre is not None or scale is not None or dout2 is None or not dout2.is_contiguous()
    da, dz, db = _kernels().linear_dgrad(dout, weight, pre, scale, da_dtype, store_dz, bias_grad=True)
    return da, dz if dz is not None else dout2, db


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _linear_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    pre: Optional[Tensor],
    ahat: Optional[Tensor],
    ln_weight: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Optional[Tensor],
    scale: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(x):
        return _linear_backward_impl(dout, x, weight, pre, ahat, ln_weight, mean, rstd, scale)


def _linear_backward_impl(dout, x, weight, pre, ahat, ln_weight, mean, rstd, scale):
    ct = weight.dtype
    N, K = weight.shape
    M = x.numel() // K
    has_ln = ln_weight is not None
    da, dz, dbias = dgrad(dout, weight, pre, scale, torch.float32 if has_ln else x.dtype)
    if has_ln:
        a = ahat
        dx, _, dlw, dlb = _ln_kernels().layer_norm_bwd(da, None, x, ln_weight, mean.reshape(x.shape[:-1]),
                                                       rstd.reshape(x.shape[:-1]), x.dtype)
    else:
        a = (x if x.dtype == ct else x.to(ct)).reshape(M, K)
        dx = da
        dlw, dlb = x.new_empty((0,)), x.new_empty((0,))
    dweight = torch.mm(dz.t(), a) if M > 0 else weight.new_zeros(weight.shape)
    return dx, dweight, dbias, dlw, dlb


@_linear_backward.register_fake
def _linear_backward_fake(dout, x, weight, pre, ahat, ln_weight, mean, rstd, scale):
    N, K = weight.shape
    if dout.shape[-1] != N or dout.numel() // N != x.numel() // K:
        raise ValueError(f"linear_backward: dout has shape {tuple(dout.shape)}, expected {tuple(x.shape[:-1]) + (N,)}")
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    if ln_weight is not None:
        dlw, dlb = torch.empty_like(ln_weight), torch.empty_like(ln_weight)
    else:
        dlw, dlb = x.new_empty((0,)), x.new_empty((0,))
    return dx, torch.empty_like(weight), weight.new_empty((N,), dtype=torch.float32), dlw, dlb


def _setup_context(ctx, inputs, output):
    x, weight, bias, ln_weight, ln_bias, eps, gelu, scale, residual, out_dtype, save = inputs
    out, pre, ahat, mean, rstd = output
    if not save:
        ctx.unsaved = True
        return
    ctx.unsaved = False
    ctx.save_for_backward(x, weight, pre, ahat, ln_weight, mean, rstd, scale)
    ctx.gelu = bool(gelu)
    ctx.has_ln = ln_weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.ln_bias_dtype = ln_bias.dtype if ln_bias is not None else None
    ctx.res_dtype = residual.dtype if residual is not None else None
    ctx.mark_non_differentiable(pre, ahat, mean, rstd)


def _backward(ctx, dout, dpre, dahat, dmean, drstd):
    if ctx.unsaved:
        raise RuntimeError("crossvit_fast::linear: backward through a call made with save=False (the forward did not "
                           "keep what the backward reads); call crossvit_fast.ops.linear.linear(), which sets it")
    x, weight, pre, ahat, ln_weight, mean, rstd, scale = ctx.saved_tensors
    dx, dw, db, dlw, dlb = torch.ops.crossvit_fast.linear_backward(
        dout, x, weight, pre if ctx.gelu else None, ahat if ctx.has_ln else None,
        ln_weight if ctx.has_ln else None, mean if ctx.has_ln else None, rstd if ctx.has_ln else None, scale,
    )
    dbias = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
    dres = dout.to(ctx.res_dtype) if ctx.res_dtype is not None else None
    dlw = dlw if ctx.has_ln else None
    dlb = dlb.to(ctx.ln_bias_dtype) if ctx.has_ln else None
    return dx, dw, dbias, dlw, dlb, None, None, None, dres, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_linear_backward, "linear")


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    ln_weight: Optional[Tensor] = None,
    ln_bias: Optional[Tensor] = None,
    eps: float = LN_EPS,
    gelu: bool = False,
    scale: Optional[Tensor] = None,
    residual: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``residual + scale * GELU(LayerNorm(x).to(ct) @ weight^T + bias)``, each part optional; ``ct = weight.dtype``.

    Args:
        x: ``(..., K)``, float16/bfloat16/float32, any strides; CUDA (CPU only under ``TRITON_INTERPRET=1``).
        weight: ``(N, K)`` (nn.Linear's layout); its dtype is the compute dtype. Under autocast pass
            ``weight.to(autocast dtype)`` (the cast autocast itself makes).
        bias: None or ``(N,)``; rounded to the compute dtype, as autocast does.
        ln_weight, ln_bias, eps: an affine LayerNorm over K applied to x first (float32 math, whatever x's dtype).
        gelu: apply exact (erf) GELU after the bias.
        scale: None or one value per index of x's first dimension (drop-path's ``mask / keep``); not differentiable.
        residual: None or a tensor of the output's shape added last (the residual stream).
        out_dtype: default the compute dtype, or ``promote(residual, compute)`` with a residual.

    Returns:
        ``x.shape[:-1] + (N,)``. Differentiable in x, weight, bias, ln_weight, ln_bias and residual.
    """
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("linear: x and weight must be torch.Tensors")
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("scale", scale),
                    ("residual", residual)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"linear: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"linear: eps must be a float >= 0, got {eps!r}")
    _check(x, weight, bias, ln_weight, ln_bias, scale, residual, out_dtype)
    tensors = (x, weight, bias, ln_weight, ln_bias, residual)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if scale is not None:
        scale = scale.detach()
    out = torch.ops.crossvit_fast.linear(x, weight, bias, ln_weight, ln_bias, float(eps), bool(gelu), scale,
                                         residual, out_dtype, save)[0]
    return out
