"""The fused ops of crossvit_fast, one entry each: the single list every other part reads.

An entry names, for one op, the files that make it (kernel, op, reference, tests, benchmark), what the ``"torch"``
backend runs instead (what timm runs), the dtypes and shape limits of its kernel, and its fvcore FLOP handles.
``crossvit_fast.backend`` (which ops can run fused), ``crossvit_fast.flops``, the modules' shape checks, ``crossvit-fast
info``, ``bench/report.py``, ``bench/verified_ops.py``, ``tests/sm90_compile.py`` and the registration tests all
read :data:`OPS`. Adding an op is a kernel file, an op file, a test, a benchmark and one entry here.

This module imports only :mod:`crossvit_fast.config`: no op module, no kernel, no triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Tuple

from crossvit_fast.config import (
    CLS_CROSS_ATTENTION_MAX_DIM,
    CLS_CROSS_ATTENTION_MAX_HEAD_DIM,
    FUSED_DTYPES,
    LAYER_NORM_MAX_DIM,
    SELF_ATTENTION_HEAD_DIMS,
)

__all__ = ["OpSpec", "OPS", "op_names", "get", "custom_op_names"]


@dataclass(frozen=True)
class OpSpec:
    """One fused op.

    ``name``: the op's one name, from which the rest follows unless given: ``kernels/<name>.py`` (``kernel_module``),
    ``crossvit_fast/ops/<name>.py`` (the first of ``op_modules``, the ``crossvit_fast.ops`` modules that register its
    custom ops), ``crossvit_fast::<name>`` (``custom_ops``: forward ops, each with a ``*_backward`` beside it),
    ``crossvit_fast.reference:<name>_ref`` (``reference``: the explicit math the tests compare against),
    ``tests/test_<name>.py`` (``tests``: the test modules whose CUDA run verifies the op), ``bench/bench_<name>.py``
    (``bench``), ``crossvit_fast.flops.<name>_flop_jit`` (``flop_handles``: traced op -> the function counting it).
    ``torch_path``: what the ``"torch"`` backend runs where the op does not run fused. ``limits``: the kernel's shape
    limits in words; ``unsupported(**dims)`` the same as a check (``""`` where the kernel takes the shape, else why
    not). ``dtypes``: input dtypes (torch names). ``sm90``: whether ``tests/sm90_compile.py`` compiles its kernels."""

    name: str
    torch_path: str
    limits: str
    unsupported: Callable[..., str]
    op_modules: Tuple[str, ...] = ()
    custom_ops: Tuple[str, ...] = ()
    tests: Tuple[str, ...] = ()
    flop_handles: Dict[str, str] = field(default_factory=dict)
    reference: str = ""
    kernel_module: str = ""
    bench: str = ""
    dtypes: Tuple[str, ...] = FUSED_DTYPES
    sm90: bool = True

    def __post_init__(self):
        n = self.name
        defaults = dict(op_modules=(f"crossvit_fast.ops.{n}",), custom_ops=(f"crossvit_fast::{n}",),
                        tests=(f"test_{n}",), reference=f"crossvit_fast.reference:{n}_ref",
                        kernel_module=f"crossvit_fast.kernels.{n}", bench=f"bench/bench_{n}.py")
        for key, value in defaults.items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        if not self.flop_handles:
            object.__setattr__(self, "flop_handles", {op: f"{op.split('::')[1]}_flop_jit" for op in self.custom_ops})

    def supports(self, dtype: str, **dims: int) -> str:
        """``""`` when the kernel takes ``dtype`` (a torch name: ``"bfloat16"``) at these dims, else why not."""
        if dtype not in self.dtypes:
            return f"dtype {dtype} (the fused {self.name} takes {', '.join(self.dtypes)})"
        return self.unsupported(**dims)


def _self_attention(head_dim: int, **_) -> str:
    if head_dim not in SELF_ATTENTION_HEAD_DIMS:
        return f"head_dim {head_dim} is not one of the fused self-attention's {SELF_ATTENTION_HEAD_DIMS}"
    return ""


def _cls_cross_attention(dim: int, head_dim: int, **_) -> str:
    if dim > CLS_CROSS_ATTENTION_MAX_DIM or head_dim > CLS_CROSS_ATTENTION_MAX_HEAD_DIM:
        return (f"dim {dim} / head_dim {head_dim} is above the fused cross-attention's limits "
                f"({CLS_CROSS_ATTENTION_MAX_DIM} / {CLS_CROSS_ATTENTION_MAX_HEAD_DIM})")
    return ""


def _layer_norm(dim: int, **_) -> str:
    if dim > LAYER_NORM_MAX_DIM:
        return f"width {dim} is over the fused LayerNorm's {LAYER_NORM_MAX_DIM}"
    return ""


def _linear(dim: int, **_) -> str:
    if dim > LAYER_NORM_MAX_DIM:
        return f"width {dim} is over the LayerNorm prologue's {LAYER_NORM_MAX_DIM}"
    return ""


OPS: Dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("cls_cross_attention",
               torch_path="timm's CrossAttention math: LayerNorm, the CLS query's scores, softmax, weighted sum",
               limits=f"C <= {CLS_CROSS_ATTENTION_MAX_DIM}, head dim <= {CLS_CROSS_ATTENTION_MAX_HEAD_DIM}, C > 0",
               unsupported=_cls_cross_attention),
        OpSpec("self_attention", torch_path="F.scaled_dot_product_attention, as timm's Attention",
               limits=f"head dim in {SELF_ATTENTION_HEAD_DIMS[0]}..{SELF_ATTENTION_HEAD_DIMS[-1]}, a multiple of 16",
               unsupported=_self_attention),
        OpSpec("layer_norm", torch_path="torch.nn.LayerNorm, as timm's Block", limits=f"C <= {LAYER_NORM_MAX_DIM}",
               unsupported=_layer_norm),
        OpSpec("linear", torch_path="the block's nn.Linear layers, GELU and residual adds, as timm's Block",
               limits=f"K <= {LAYER_NORM_MAX_DIM} with the LayerNorm prologue; the block half (block_half) also the "
                      f"self-attention's head dims",
               unsupported=_linear,
               op_modules=("crossvit_fast.ops.linear", "crossvit_fast.ops.block"),
               custom_ops=("crossvit_fast::linear", "crossvit_fast::block_half"),
               tests=("test_linear", "test_block")),
    )
}
"""op name -> :class:`OpSpec`, in the order reports list them."""


def op_names() -> Tuple[str, ...]:
    """The fused ops' names."""
    return tuple(OPS)


def get(name: str) -> OpSpec:
    """The entry of ``name``; ``KeyError`` naming the ops there are otherwise."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no fused op {name!r}; the ops are {', '.join(OPS)}") from None


def custom_op_names() -> Iterator[str]:
    """Every forward custom op the registry's ops register (``crossvit_fast::<name>``)."""
    for spec in OPS.values():
        yield from spec.custom_ops
