"""``crossvit_fast::self_attention``: fused multi-head self-attention from a qkv Linear's output.

Ops (``torch.ops.crossvit_fast``):

* ``self_attention(Tensor qkv, int num_heads, float? scale=None, bool save=False) -> (Tensor out, Tensor lse,
  Tensor out_lo)``: ``out`` ``(B, N, H * D)`` in qkv's dtype (what :func:`crossvit_fast.reference.self_attention_ref`
  returns), ``lse`` ``(B, H, N)`` float32, the log-sum-exp of each query row's scaled scores, saved for the backward
  (not differentiable); ``out_lo``: with ``save`` and a 16-bit qkv, the rounding residual ``out_fp32 - out``
  ``(B, N, H * D)`` that makes the backward's ``delta = rowsum(dout * out)`` exact (the kernel header says why),
  else an empty ``(0,)`` tensor (not differentiable). :func:`self_attention` sets ``save`` when autograd will need
  the backward; without it the backward still runs, from the rounded ``out``.
* ``self_attention_backward(Tensor dout, Tensor qkv, Tensor out, Tensor lse, Tensor out_lo, int num_heads,
  float? scale=None) -> Tensor dqkv``: ``(B, N, 3 * H * D)``, the gradient of the qkv Linear's output; ``out_lo``
  the forward's (empty: none).

Both have fake (meta) implementations and the forward has an autograd formula that calls the backward op, so
``torch.compile(fullgraph=True)`` sees two opaque ops. The Triton launchers
(:mod:`crossvit_fast.kernels.self_attention`) are imported the first time an op runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from crossvit_fast.config import FUSED_DTYPES, SELF_ATTENTION_HEAD_DIMS
from crossvit_fast.ops import autocast_off, refuse_double_backward

__all__ = ["self_attention", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = SELF_ATTENTION_HEAD_DIMS
_DTYPES = tuple(getattr(torch, n) for n in FUSED_DTYPES)


def _check(qkv: torch.Tensor, num_heads: int) -> Tuple[int, int, int, int]:
    """Shape/dtype checks that need no device (the fakes run them too); returns ``(B, N, H, D)``."""
    if qkv.dim() != 3:
        raise ValueError(f"self_attention: qkv must be 3-D (B, N, 3 * num_heads * head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    if num_heads < 1 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(f"self_attention: qkv's last dimension {qkv.shape[-1]} is not 3 * num_heads * head_dim "
                         f"for num_heads={num_heads}")
    D = qkv.shape[-1] // (3 * num_heads)
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"self_attention: head_dim {D} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"self_attention: qkv has dtype {qkv.dtype}; expected float16, bfloat16 or float32")
    return qkv.shape[0], qkv.shape[1], num_heads, D


def _saves_residual(qkv: torch.Tensor, save: bool) -> bool:
    return save and qkv.dtype != torch.float32


@torch.library.custom_op("crossvit_fast::self_attention", mutates_args=())
def _self_attention_op(
    qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None, save: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from crossvit_fast.kernels.self_attention import self_attention_fwd

    B, N, H, D = _check(qkv, num_heads)
    out_lo = qkv.new_empty((B, N, H * D) if _saves_residual(qkv, save) else (0,))
    with autocast_off(qkv):
        out, lse = self_attention_fwd(qkv, num_heads, scale, out_lo=out_lo if out_lo.numel() else None)
    return out, lse, out_lo


@_self_attention_op.register_fake
def _self_attention_fake(qkv, num_heads, scale=None, save=False):
    B, N, H, D = _check(qkv, num_heads)
    out = qkv.new_empty((B, N, H * D))
    lse = qkv.new_empty((B, H, N), dtype=torch.float32)
    out_lo = qkv.new_empty((B, N, H * D) if _saves_residual(qkv, save) else (0,))
    return out, lse, out_lo


@torch.library.custom_op("crossvit_fast::self_attention_backward", mutates_args=())
def _self_attention_backward_op(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    out_lo: torch.Tensor,
    num_heads: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    from crossvit_fast.kernels.self_attention import self_attention_bwd

    with autocast_off(qkv):
        return self_attention_bwd(dout, qkv, out, lse, num_heads, scale, out_lo=out_lo if out_lo.numel() else None)


@_self_attention_backward_op.register_fake
def _self_attention_backward_fake(dout, qkv, out, lse, out_lo, num_heads, scale=None):
    B, N, H, D = _check(qkv, num_heads)
    if tuple(dout.shape) != (B, N, H * D):
        raise ValueError(f"self_attention_backward: dout has shape {tuple(dout.shape)}, expected {(B, N, H * D)}")
    if out_lo.numel() and tuple(out_lo.shape) != (B, N, H * D):
        raise ValueError(f"self_attention_backward: out_lo has shape {tuple(out_lo.shape)}, expected "
                         f"{(B, N, H * D)} or an empty (0,) tensor")
    return qkv.new_empty((B, N, 3 * H * D))


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, _ = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(qkv, out, lse, out_lo)
    ctx.num_heads = num_heads
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, out_lo)


def _backward(ctx, dout, dlse, dout_lo):
    if dout is None:
        return None, None, None, None
    qkv, out, lse, out_lo = ctx.saved_tensors
    dqkv = torch.ops.crossvit_fast.self_attention_backward(dout, qkv, out, lse, out_lo, ctx.num_heads, ctx.scale)
    return dqkv, None, None, None


_self_attention_op.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(_self_attention_backward_op, "self_attention")


def self_attention(qkv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """Multi-head self-attention of a branch block, fused: same contract as ``self_attention_ref``.

    Args:
        qkv: ``(B, N, 3 * H * D)`` from timm's ``Attention.qkv`` (``[q | k | v]``, head-major), any strides;
            float16, bfloat16 or float32; CUDA (CPU only under ``TRITON_INTERPRET=1``).
        num_heads: H. The head dim ``D`` must be a multiple of 16 up to 128.
        scale: the score scale; default ``D ** -0.5``.

    Returns:
        ``(B, N, H * D)`` in qkv's dtype: softmax(q k^T * scale) v per head, heads concatenated. Differentiable
        with respect to ``qkv``.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"self_attention: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"self_attention: num_heads must be an int, got {type(num_heads).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"self_attention: scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
    _check(qkv, num_heads)
    save = torch.is_grad_enabled() and qkv.requires_grad
    return torch.ops.crossvit_fast.self_attention(qkv, num_heads, scale, save)[0]
