"""The reference math: plain PyTorch, exactly the computation of timm's and IBM's CrossViT.

These functions are

* what the models run under ``backend="reference"`` (where no fused kernel runs, ``"auto"`` runs what timm runs,
  ``"torch"``, not this),
* the oracle of every kernel test (called on float64 inputs), and
* the baseline of every benchmark.

They are written the way the released models compute, with the attention products as explicit matmuls
(so fvcore counts them), not for speed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from crossvit_fast.config import LN_EPS

__all__ = [
    "layer_norm_ref",
    "self_attention_ref",
    "cls_cross_attention_ref",
    "linear_ref",
    "block_half_ref",
]


def layer_norm_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = LN_EPS,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
):
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias`` (biased variance).

    With ``residual``, the pre-norm seam of a block: returns ``(r, LayerNorm(r))`` with ``r = x + residual``.
    ``out_dtype`` casts the normalised output (what the next Linear does under autocast).
    """
    r = x if residual is None else x + residual
    out = F.layer_norm(r, (r.shape[-1],), weight, bias, eps)
    if out_dtype is not None:
        out = out.to(out_dtype)
    return out if residual is None else (r, out)


# The shape checks below are leaves of torch.fx graphs (torch.fx.wrap): a traced model keeps them and runs them on
# real tensors, and they compile under TorchScript.
def _check_qkv(qkv: torch.Tensor, num_heads: int) -> None:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"self_attention_ref: qkv must be (B, N, 3 * num_heads * head_dim) with num_heads={num_heads}, "
            f"got shape {list(qkv.shape)}"
        )


def _check_cls_tokens(cls: torch.Tensor, tokens: torch.Tensor, num_heads: int) -> None:
    if cls.dim() != 3 or cls.shape[1] != 1:
        raise ValueError(f"cls_cross_attention_ref: cls must be (B, 1, C), got shape {list(cls.shape)}")
    if tokens.dim() != 3 or tokens.shape[0] != cls.shape[0] or tokens.shape[2] != cls.shape[2]:
        raise ValueError(
            f"cls_cross_attention_ref: tokens must be (B, N, C) = ({cls.shape[0]}, N, {cls.shape[2]}), "
            f"got shape {list(tokens.shape)}"
        )
    if cls.shape[2] % num_heads != 0:
        raise ValueError(f"cls_cross_attention_ref: dim {cls.shape[2]} is not divisible by num_heads {num_heads}")


torch.fx.wrap("_check_qkv")
torch.fx.wrap("_check_cls_tokens")


def self_attention_ref(
    qkv: torch.Tensor,
    num_heads: int,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head self-attention of a branch block, from the output of its ``qkv`` Linear.

    Args:
        qkv: ``(B, N, 3 * H * D)``, laid out as timm's ``Attention.qkv`` writes it: the last dimension is
            ``[q | k | v]``, each head-major ``(H, D)``. May be any strided view.
        num_heads: H.
        scale: the score scale; default ``D ** -0.5``.
        dropout_p: attention dropout on the probabilities (only pass a non-zero value in training).

    Returns:
        ``(B, N, H * D)``: the heads' outputs concatenated, the layout the output projection reads.
    """
    _check_qkv(qkv, num_heads)
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    s = D ** -0.5 if scale is None else scale
    # (B, N, 3*H*D) -> (3, B, H, N, D)
    q, k, v = qkv.reshape(B, N, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * s) @ k.transpose(-2, -1)  # (B, H, N, N)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    out = attn @ v  # (B, H, N, D)
    return out.transpose(1, 2).reshape(B, N, C)


def cls_cross_attention_ref(
    cls: torch.Tensor,
    tokens: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    wq: torch.Tensor,
    bq: Optional[torch.Tensor],
    wk: torch.Tensor,
    bk: Optional[torch.Tensor],
    wv: torch.Tensor,
    bv: Optional[torch.Tensor],
    wproj: torch.Tensor,
    bproj: Optional[torch.Tensor],
    num_heads: int,
    eps: float = LN_EPS,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """CLS-query cross-attention of CrossViT's fusion, written as the paper describes it.

    With ``x = concat(cls, tokens)`` (``(B, 1 + N, C)``) and ``y = LN(x)``::

        q = Wq y[:, :1] + bq,   k = Wk y + bk,   v = Wv y + bv     (H heads of D = C / H)
        a = softmax(q k^T * D^-0.5)                                (B, H, 1, 1 + N): one query row
        out = proj(a v)

    Args:
        cls: ``(B, 1, C)``: the CLS token of branch i projected to branch j's width (``f_i(cls_i)``).
        tokens: ``(B, N, C)``: branch j's patch tokens (its token tensor without token 0), any strided view.
        norm_weight, norm_bias: the block's ``norm1`` LayerNorm (eps ``eps``).
        wq, bq, wk, bk, wv, bv: ``attn.wq/wk/wv`` Linear weights ``(C, C)`` and biases ``(C,)`` (biases may be None).
        wproj, bproj: ``attn.proj``.
        num_heads: H.
        dropout_p: attention dropout on the probabilities (only pass a non-zero value in training).

    Returns:
        ``(B, 1, C)``: ``proj(a v)``, before the block's residual (the caller adds ``cls``).
    """
    _check_cls_tokens(cls, tokens, num_heads)
    B, _, C = cls.shape
    D = C // num_heads
    x = torch.cat((cls, tokens), dim=1)  # (B, 1 + N, C)
    T = x.shape[1]
    y = F.layer_norm(x, (C,), norm_weight, norm_bias, eps)  # layer_norm_ref(x, ...) without the residual
    q = F.linear(y[:, 0:1], wq, bq).reshape(B, 1, num_heads, D).permute(0, 2, 1, 3)  # (B, H, 1, D)
    k = F.linear(y, wk, bk).reshape(B, T, num_heads, D).permute(0, 2, 1, 3)  # (B, H, T, D)
    v = F.linear(y, wv, bv).reshape(B, T, num_heads, D).permute(0, 2, 1, 3)  # (B, H, T, D)
    attn = (q @ k.transpose(-2, -1)) * (D ** -0.5)  # (B, H, 1, T)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    out = (attn @ v).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
    return F.linear(out, wproj, bproj)


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = LN_EPS,
    gelu: bool = False,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """A branch block's GEMM as timm computes it: ``residual + scale * GELU(Linear(LayerNorm(x)))``, each part
    optional.

    The weight's dtype is the compute dtype (under autocast, the autocast dtype): the LayerNorm runs in x's dtype
    and its output is cast to it, the bias is cast to it, GELU is the exact (erf) one, ``scale`` is one value per
    index of x's first dimension (drop-path's per-sample ``mask / keep``), and the residual add promotes.
    """
    ct = weight.dtype
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if ln_weight is not None else x
    y = F.linear(h.to(ct), weight, bias.to(ct) if bias is not None else None)
    if gelu:
        y = F.gelu(y)
    if scale is not None:
        y = y * scale.reshape((-1,) + (1,) * (y.dim() - 1)).to(y.dtype)
    if residual is not None:
        y = residual + y
    return y.to(out_dtype) if out_dtype is not None else y


def block_half_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    eps: float = LN_EPS,
    scale: Optional[torch.Tensor] = None,
    num_heads: int = 0,
    attn_scale: Optional[float] = None,
) -> torch.Tensor:
    """One residual half of a branch block as timm computes it: ``x + drop_path(fc2(GELU(fc1(norm(x)))))``
    (``num_heads=0``) or ``x + drop_path(proj(attn(qkv(norm(x)))))``; the GEMMs as :func:`linear_ref` (w1's dtype
    is the compute dtype)."""
    y1 = linear_ref(x, w1, b1, ln_weight, ln_bias, eps, gelu=num_heads == 0)
    mid = self_attention_ref(y1, num_heads, attn_scale) if num_heads else y1
    return linear_ref(mid, w2, b2, scale=scale, residual=x)
