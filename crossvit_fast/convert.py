"""``optimize`` / ``revert``: put crossvit_fast's modules into an existing CrossViT, in place.

Works on timm's ``CrossVit``, IBM/CrossViT's ``VisionTransformer`` and crossvit_fast's own ``CrossViT``, recognised
by structure (no import of timm or IBM's code): a branch attention has ``qkv`` and ``proj`` Linears and
``num_heads``; a branch block has affine LayerNorms ``norm1``/``norm2``, ``attn.qkv`` and ``mlp.fc1``; a fusion
block has ``norm1`` and ``attn.wq/wk/wv/proj``; a multi-scale block has ``blocks``, ``projs``, ``fusion`` and
``revert_projs``. The swapped-in modules hold the very same parameter tensors under the
same names: the state_dict is unchanged and an existing optimizer keeps working. ``revert`` puts every original
module back.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from crossvit_fast.backend import op_authorities, op_backends
from crossvit_fast.layers import Attention, Block, CrossAttentionBlock, MultiScaleBlock, _is_affine_layer_norm

__all__ = ["optimize", "revert"]

_SWAPS = "_crossvit_fast_swaps"
OPS_ATTR = "crossvit_fast_ops"
"""The attribute ``optimize`` sets on the model it returns: :func:`crossvit_fast.op_backends` at that moment."""
AUTHORITY_ATTR = "crossvit_fast_authority"
"""The attribute ``optimize`` sets beside it: :func:`crossvit_fast.op_authorities`, on whose authority each op's
modules run fused."""


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_branch_attention(m: nn.Module) -> bool:
    return (
        not isinstance(m, Attention)
        and _is_linear(getattr(m, "qkv", None))
        and _is_linear(getattr(m, "proj", None))
        and isinstance(getattr(m, "num_heads", None), int)
    )


def _is_branch_block(m: nn.Module) -> bool:
    return (
        not isinstance(m, Block)
        and _is_affine_layer_norm(getattr(m, "norm1", None))
        and _is_affine_layer_norm(getattr(m, "norm2", None))
        and _is_linear(getattr(getattr(m, "attn", None), "qkv", None))
        and _is_linear(getattr(getattr(m, "mlp", None), "fc1", None))
    )


def _is_fusion_block(m: nn.Module) -> bool:
    a = getattr(m, "attn", None)
    return (
        not isinstance(m, CrossAttentionBlock)
        and isinstance(getattr(m, "norm1", None), nn.LayerNorm)
        and a is not None
        and all(_is_linear(getattr(a, n, None)) for n in ("wq", "wk", "wv", "proj"))
    )


def _is_multiscale_block(m: nn.Module) -> bool:
    return not isinstance(m, MultiScaleBlock) and all(
        isinstance(getattr(m, n, None), nn.ModuleList) for n in ("blocks", "projs", "fusion", "revert_projs")
    )


def _keep_mode(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give ``new`` and every module of it that ``old`` does not share the train/eval flag of ``old``: what is
    shared keeps its own flag, what is created in the swap starts in ``old``'s mode, not in training mode."""
    shared = {id(m) for m in old.modules()}
    for m in new.modules():
        if id(m) not in shared:
            m.training = old.training
    return new


def _children_to_swap(model: nn.Module, pred) -> List[Tuple[nn.Module, str, nn.Module]]:
    out = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if pred(child):
                out.append((parent, name, child))
    return out


def optimize(model: nn.Module, backend: Optional[str] = None, verify: bool = False) -> nn.Module:
    """Swap crossvit_fast's fused-capable modules into ``model`` in place and return it.

    ``backend`` as everywhere ("reference", "torch", "triton", "auto"; None: the current default). Where an op
    does not run fused, its module runs what timm runs ("torch": SDPA, PyTorch's LayerNorm), so the model is never
    slower than before. The returned model says which ops run fused: ``model.crossvit_fast_ops`` is
    ``{op: {resolved backend: number of modules}}`` (``"triton"``: fused), e.g.
    ``{"self_attention": {"torch": 15}, ...}``, and ``model.crossvit_fast_authority`` on whose authority
    (:func:`crossvit_fast.op_authorities`). Every module keeps its train/eval flag; the modules created in
    the swap take the flag of the one they replace. Calling it again on an optimized model only re-chooses the
    backend.

    ``verify=True`` first runs :func:`crossvit_fast.verify.verify` at this model's shapes (small batches, quietly),
    so that ``"auto"`` takes the kernels that pass on this GPU; it raises
    :class:`crossvit_fast.verify.VerifyUnavailableError` where there is no CUDA device to verify on.
    """
    if verify:
        from crossvit_fast.verify import verify as verify_here

        verify_here([model], batch=2, timing_batch=8, progress=None)
    swaps: List[Tuple[nn.Module, str, nn.Module]] = list(getattr(model, _SWAPS, None) or [])
    new_swaps: List[Tuple[nn.Module, str, nn.Module]] = []
    previous = []
    makers = (
        (_is_branch_attention, lambda m: Attention.from_module(m, backend)),
        (_is_branch_block, lambda m: Block.from_module(m, backend)),
        (_is_fusion_block, lambda m: CrossAttentionBlock.from_module(m, backend)),
        (_is_multiscale_block, MultiScaleBlock.from_module),
    )
    try:
        for pred, make in makers:
            for parent, name, child in _children_to_swap(model, pred):
                setattr(parent, name, _keep_mode(make(child), child))
                new_swaps.append((parent, name, child))
        # crossvit_fast's own seams (and those just swapped in): re-choose the backend
        for m in model.modules():
            if isinstance(m, (Attention, Block, CrossAttentionBlock)):
                previous.append((m, m.backend_requested, dict(m.backends)))
                m.set_backend(backend)
    except Exception:  # nothing half-way: the model is left as it was given
        for m, requested, resolved in previous:
            m.backend_requested, m.backends = requested, resolved
        for parent, name, child in reversed(new_swaps):
            setattr(parent, name, child)
        raise
    swaps += new_swaps
    if not swaps and not previous:
        raise ValueError(
            f"optimize: found no CrossViT attention, fusion or multi-scale block in {type(model).__name__}"
        )
    object.__setattr__(model, _SWAPS, swaps)
    if not hasattr(model, "_crossvit_fast_backends"):
        object.__setattr__(model, "_crossvit_fast_backends", previous)
    object.__setattr__(model, OPS_ATTR, op_backends(model))
    object.__setattr__(model, AUTHORITY_ATTR, op_authorities(model))
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: the original modules (and backends) come back, in the train/eval mode of the modules
    they replace; parameters are untouched."""
    swaps = getattr(model, _SWAPS, None)
    if swaps is None:
        raise ValueError("revert: this model was not optimized by crossvit_fast.optimize")
    for parent, name, child in reversed(swaps):
        # the swapped-in module's flag is the current one (model.eval() after optimize reached it, not `child`)
        setattr(parent, name, _keep_mode(child, getattr(parent, name)))
    for m, requested, resolved in getattr(model, "_crossvit_fast_backends", []):
        m.backend_requested, m.backends = requested, resolved
    object.__delattr__(model, _SWAPS)
    for attr in (OPS_ATTR, AUTHORITY_ATTR):
        if attr in model.__dict__:
            object.__delattr__(model, attr)
    if hasattr(model, "_crossvit_fast_backends"):
        object.__delattr__(model, "_crossvit_fast_backends")
    return model
