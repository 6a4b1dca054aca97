"""crossvit_fast: CrossViT (Chen, Fan, Panda, ICCV 2021) with fused Triton kernels and a pure-PyTorch reference.

Computes what timm's and IBM's released models compute and loads their weights. Importing this package never
imports triton (nor fvcore, nor timm).
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # crossvit_fast needs no numpy; without it, torch's first import warns "Failed to initialize NumPy" (only here,
    # where this package is what imports torch).
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from crossvit_fast.backend import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    get_backend,
    op_authorities,
    op_backends,
    resolve_backend,
    triton_status,
    use_backend,
)
from crossvit_fast.convert import optimize, revert  # noqa: E402
from crossvit_fast.checkpoint import CheckpointError, load_checkpoint, resample_pos_embed  # noqa: E402
from crossvit_fast.flops import flops  # noqa: E402
from crossvit_fast.models import ALIASES, CrossViT, create_model, list_models, model_config  # noqa: E402
from crossvit_fast.reference import cls_cross_attention_ref, layer_norm_ref, self_attention_ref  # noqa: E402

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
    "op_authorities",
    "resolve_backend",
    "triton_status",
    "use_backend",
    "cls_cross_attention_ref",
    "layer_norm_ref",
    "self_attention_ref",
]
