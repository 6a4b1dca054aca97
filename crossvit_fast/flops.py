"""FLOP counts with fvcore, with handles for every attention op the project uses.

fvcore counts one multiply-add as one FLOP (the paper's convention). It has no handle for
``aten::scaled_dot_product_attention`` nor for crossvit_fast's fused ops, so left alone it would silently drop
the attention products; the handles here count exactly what the explicit-matmul (reference) path counts, so
``flops(model).total()`` is the same whatever the backend. fvcore is imported only when FLOPs are asked for.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from crossvit_fast.ops.registry import OPS

__all__ = ["flops", "OP_HANDLES", "sdpa_flop_jit", "self_attention_flop_jit", "cls_cross_attention_flop_jit",
           "layer_norm_flop_jit", "linear_flop_jit", "block_half_flop_jit"]


def _shape(v: Any) -> Optional[List[int]]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(v)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``q k^T`` and ``a v`` of ``aten::scaled_dot_product_attention``: q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv)."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch = _prod(q[:-2])
    nq, d = q[-2], q[-1]
    nk, dv = k[-2], v[-1]
    return batch * nq * nk * (d + dv)


def self_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``crossvit_fast::self_attention`` on qkv (B, N, 3C): ``q k^T`` and ``a v``, ``2 B N^2 C``."""
    B, N, C3 = _shape(inputs[0])
    return 2 * B * N * N * (C3 // 3)


def cls_cross_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``crossvit_fast::cls_cross_attention``, counted as the explicit module is (T = 1 + N keys):
    LayerNorm ``5 B T C`` (4 without affine), ``wq`` and ``proj`` ``B C^2`` each, ``wk`` and ``wv`` ``B T C^2``
    each, ``q k^T`` and ``a v`` ``B T C`` each."""
    B, _, C = _shape(inputs[0])
    N = _shape(inputs[1])[1]
    T = 1 + N
    ln = B * T * C * (5 if _shape(inputs[2]) is not None else 4)
    return ln + 2 * B * C * C + 2 * B * T * C * C + 2 * B * T * C


def layer_norm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``crossvit_fast::layer_norm``: fvcore's LayerNorm count, ``5`` per input element (affine); the residual add
    is not counted, as fvcore does not count ``aten::add``."""
    return 5 * _prod(_shape(inputs[0]))


def linear_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``crossvit_fast::linear`` on x (..., K) and weight (N, K): fvcore's Linear count ``M N K`` plus, with the
    LayerNorm prologue (``ln_weight`` given), its LayerNorm count ``5 M K``; bias, GELU, scale and the residual
    add are not counted, as fvcore does not count them in the reference path."""
    x = _shape(inputs[0])
    N, K = _shape(inputs[1])
    M = _prod(x[:-1])
    ln = 5 * M * K if _shape(inputs[3]) is not None else 0
    return M * N * K + ln


def block_half_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``crossvit_fast::block_half`` on x (B, N, C), w1 (N1, C), w2 (C, K2): its two Linears and LayerNorm as
    :func:`linear_flop_jit` counts them, plus the self-attention's ``2 B N^2 K2`` for the attention half (K2 =
    N1 / 3; the MLP half has K2 = N1)."""
    B, N, C = _shape(inputs[0])
    N1, _ = _shape(inputs[4])
    _, K2 = _shape(inputs[6])
    M = B * N
    attn = 2 * B * N * N * K2 if K2 != N1 else 0
    return 5 * M * C + M * N1 * C + attn + M * C * K2


OP_HANDLES: Dict[str, Callable[[List[Any], List[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    **{traced: globals()[fn] for spec in OPS.values() for traced, fn in spec.flop_handles.items()},
}
"""fvcore handles by traced op name (the fused ops' from the registry); each fused op's handle counts what its
reference computation counts."""


def _input_shape(model: torch.nn.Module, input_size) -> tuple:
    in_chans = getattr(model, "in_chans", 3)
    if input_size is None:
        img = getattr(model, "img_size", None)
        if img is None:
            raise ValueError("flops: the model has no img_size attribute; pass input_size=(C, H, W)")
        img = (img, img) if isinstance(img, int) else tuple(img)
        return (in_chans, *img)
    if isinstance(input_size, int):
        return (in_chans, input_size, input_size)
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 2:
        return (in_chans, *input_size)
    if len(input_size) == 3:
        return input_size
    raise ValueError(f"flops: input_size must be H, (H, W) or (C, H, W), got {input_size!r}")


def flops(model: torch.nn.Module, input_size: Union[None, int, Sequence[int]] = None):
    """fvcore's ``FlopCountAnalysis`` of ``model`` on one image (default: the model's own size).

    ``.total()`` is in multiply-adds (the paper's "FLOPs"); ``.by_module()``, ``.by_operator()`` and
    ``fvcore.nn.flop_count_table(analysis)`` break it down.
    """
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as e:
        raise ImportError("crossvit_fast.flops needs fvcore: pip install fvcore") from e
    shape = _input_shape(model, input_size)
    p = next(model.parameters())
    x = torch.randn(1, *shape, dtype=p.dtype, device=p.device)
    analysis = FlopCountAnalysis(model, x)
    analysis.set_op_handle(**OP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis
