"""crossvit_fast: CrossViT (Chen, Fan, Panda, ICCV 2021) with fused Triton kernels and a pure-PyTorch reference.

Computes what timm's and IBM's released models compute and loads their weights. Importing this package never
imports triton (nor fvcore, nor timm).
"""

from crossvit_fast.backend import (
    BACKENDS,
    BackendUnavailableError,
    get_backend,
    op_backends,
    resolve_backend,
    triton_status,
    use_backend,
)
from crossvit_fast.convert import optimize, revert
from crossvit_fast.checkpoint import CheckpointError, load_checkpoint, resample_pos_embed
from crossvit_fast.flops import flops
from crossvit_fast.models import ALIASES, CrossViT, create_model, list_models, model_config
from crossvit_fast.reference import cls_cross_attention_ref, layer_norm_ref, self_attention_ref

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "CheckpointError",
    "CrossViT",
    "ALIASES",
    "create_model",
    "list_models",
    "model_config",
    "load_checkpoint",
    "resample_pos_embed",
    "flops",
    "optimize",
    "revert",
    "get_backend",
    "op_backends",
    "resolve_backend",
    "triton_status",
    "use_backend",
    "cls_cross_attention_ref",
    "layer_norm_ref",
    "self_attention_ref",
]
