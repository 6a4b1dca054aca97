"""``crossvit_fast::cls_cross_attention``: CrossViT's CLS-query cross-attention as one opaque, differentiable op.

Semantics are ``crossvit_fast.reference.cls_cross_attention_ref`` without dropout: ``proj(softmax(q k^T D^-0.5) v)``
of the CLS query over ``LN(concat(cls, tokens))``, before the block's residual. The work is done by the Triton
launchers of ``crossvit_fast.kernels.cls_cross_attention``, imported on first use, so importing this module does not
import triton.

Two ops are registered, each with a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` sees ops only:

* ``crossvit_fast::cls_cross_attention`` returns ``(out, q, u, xbar, lse, o)``: ``out`` ``(B, 1, C)`` is the
  result; the rest are small fp32 tensors kept for the backward (the query ``(B, C)``, the folded keys ``u``
  ``(H, B, C)``, the weighted mean of the normalised tokens ``xbar`` ``(H, B, C)``, the log-sum-exp ``lse``
  ``(H, B)``, the heads' output ``o`` ``(B, C)``). They are marked non-differentiable.
* ``crossvit_fast::cls_cross_attention_backward`` returns the gradients of the 12 tensor inputs (every one a
  tensor; the autograd formula drops those of inputs that were None).

Dtypes: the weights' dtype is the compute dtype (every weight, bias and norm parameter has it; ``out`` is returned
in it). ``cls`` and ``tokens`` have it too, or float32 when it is 16-bit: under autocast the module passes the
float32 activations as they are and the kernels round them to the compute dtype in registers as they load them
(the same values as ``.to(dtype)`` first, without the copy). Each activation's gradient comes back in its own dtype,
a float32 activation's unrounded.

Use :func:`cls_cross_attention`, which returns ``out`` only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from crossvit_fast.config import LN_EPS
from crossvit_fast.ops import autocast_off, refuse_double_backward

__all__ = ["cls_cross_attention", "OP_NAME", "BACKWARD_OP_NAME"]

OP_NAME = "crossvit_fast::cls_cross_attention"
BACKWARD_OP_NAME = "crossvit_fast::cls_cross_attention_backward"
_REQUIRED = ("cls", "tokens", "wq", "wk", "wv", "wproj")


def _kernels():
    from crossvit_fast.kernels import cls_cross_attention as kernels

    return kernels


@torch.library.custom_op(OP_NAME, mutates_args=())
def _cls_cross_attention(
    cls: Tensor,
    tokens: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wproj: Tensor,
    bproj: Optional[Tensor],
    num_heads: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(tokens):
        return tuple(
            _kernels().cls_cross_attention_fwd(
                cls, tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wproj, bproj, num_heads, eps
            )
        )


@_cls_cross_attention.register_fake
def _cls_cross_attention_fake(
    cls, tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wproj, bproj, num_heads, eps
):
    B, _, C, H, _ = _kernels().check_inputs(
        cls, tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wproj, bproj, num_heads, eps
    )
    f32 = torch.float32
    return (
        cls.new_empty((B, 1, C), dtype=wq.dtype),
        cls.new_empty((B, C), dtype=f32),
        cls.new_empty((H, B, C), dtype=f32),
        cls.new_empty((H, B, C), dtype=f32),
        cls.new_empty((H, B), dtype=f32),
        cls.new_empty((B, C), dtype=f32),
    )


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def _cls_cross_attention_backward(
    grad_out: Tensor,
    cls: Tensor,
    tokens: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wproj: Tensor,
    q: Tensor,
    u: Tensor,
    xbar: Tensor,
    lse: Tensor,
    o: Tensor,
    num_heads: int,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with autocast_off(tokens):
        return tuple(
            _kernels().cls_cross_attention_bwd(
                grad_out, cls, tokens, norm_weight, norm_bias, wq, wk, wv, wproj, q, u, xbar, lse, o, num_heads, eps
            )
        )


@_cls_cross_attention_backward.register_fake
def _cls_cross_attention_backward_fake(
    grad_out, cls, tokens, norm_weight, norm_bias, wq, wk, wv, wproj, q, u, xbar, lse, o, num_heads, eps
):
    B, N, C, _, _ = _kernels().check_inputs(
        cls, tokens, norm_weight, norm_bias, wq, None, wk, None, wv, None, wproj, None, num_heads, eps
    )
    vec = [wq.new_empty((C,)) for _ in range(2)]
    return (
        cls.new_empty((B, 1, C)),
        tokens.new_empty((B, N, C)),
        vec[0],
        vec[1],
        wq.new_empty((C, C)),  # wq
        wq.new_empty((C,)),
        wq.new_empty((C, C)),  # wk
        wq.new_empty((C,)),
        wq.new_empty((C, C)),  # wv
        wq.new_empty((C,)),
        wq.new_empty((C, C)),  # wproj
        wq.new_empty((C,)),
    )


def _setup_context(ctx, inputs, output):
    cls, tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wproj, bproj, num_heads, eps = inputs
    _out, q, u, xbar, lse, o = output
    ctx.save_for_backward(cls, tokens, norm_weight, norm_bias, wq, wk, wv, wproj, q, u, xbar, lse, o)
    ctx.num_heads = num_heads
    ctx.eps = eps
    ctx.has_bias = tuple(t is not None for t in (bq, bk, bv, bproj))
    ctx.mark_non_differentiable(q, u, xbar, lse, o)


def _backward(ctx, grad_out, *_grads_of_saved):
    cls, tokens, norm_weight, norm_bias, wq, wk, wv, wproj, q, u, xbar, lse, o = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 14
    (d_cls, d_tokens, d_nw, d_nb, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wproj, d_bproj) = _cls_cross_attention_backward(
        grad_out, cls, tokens, norm_weight, norm_bias, wq, wk, wv, wproj, q, u, xbar, lse, o, ctx.num_heads, ctx.eps
    )
    has_bq, has_bk, has_bv, has_bproj = ctx.has_bias
    return (
        d_cls,
        d_tokens,
        d_nw if norm_weight is not None else None,
        d_nb if norm_bias is not None else None,
        d_wq,
        d_bq if has_bq else None,
        d_wk,
        d_bk if has_bk else None,
        d_wv,
        d_bv if has_bv else None,
        d_wproj,
        d_bproj if has_bproj else None,
        None,
        None,
    )


_cls_cross_attention.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_cls_cross_attention_backward, "cls_cross_attention")


def cls_cross_attention(
    cls: Tensor,
    tokens: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wproj: Tensor,
    bproj: Optional[Tensor],
    num_heads: int,
    eps: float = LN_EPS,
) -> Tensor:
    """CrossViT's CLS-query cross-attention, fused: ``cls_cross_attention_ref`` without dropout.

    Args:
        cls: ``(B, 1, C)``, the projected CLS token (token 0 of the keys and values).
        tokens: ``(B, N, C)``, the other branch's patch tokens; any strided view (e.g. ``x[:, 1:]``), read in place.
        norm_weight, norm_bias: the LayerNorm's ``(C,)`` affine (None: identity).
        wq, bq, wk, bk, wv, bv, wproj, bproj: the Linear weights ``(C, C)`` and biases ``(C,)`` (biases may be None).
        num_heads: H; ``C % H == 0``, ``C <= 1024``, ``C / H <= 128``.
        eps: the LayerNorm's eps.

    Returns:
        ``(B, 1, C)`` in the weights' dtype (fp32, fp16 or bf16: the compute dtype, which every weight, bias and
        norm parameter has; ``cls`` and ``tokens`` have it or float32, rounded to it as the kernels load them; all
        on one CUDA device), before the residual.
    """
    named = (("cls", cls), ("tokens", tokens), ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("wq", wq),
             ("bq", bq), ("wk", wk), ("bk", bk), ("wv", wv), ("bv", bv), ("wproj", wproj), ("bproj", bproj))
    for name, t in named:
        if not isinstance(t, Tensor) and not (t is None and name not in _REQUIRED):
            raise TypeError(
                f"cls_cross_attention: {name} must be a torch.Tensor{'' if name in _REQUIRED else ' or None'}, "
                f"got {type(t).__name__}"
            )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise ValueError(f"cls_cross_attention: num_heads must be an int, got {num_heads!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"cls_cross_attention: eps must be a float, got {eps!r}")
    return _cls_cross_attention(
        cls, tokens, norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, wproj, bproj, num_heads, float(eps)
    )[0]
