"""Constants shared by the models, the reference math and the kernels' callers."""

LN_EPS = 1e-6
"""eps of every LayerNorm in CrossViT (timm's ``partial(nn.LayerNorm, eps=1e-6)``)."""

TRITON_FP_FUSION = True
"""Every launch passes ``enable_fp_fusion`` explicitly: Triton contracts a*b+c into FMAs (its default up to 3.9,
which 3.10 turns off), so the kernels compile and round the same under every Triton version (and the cache key of
the default stays that of an explicit True)."""

ENV_BACKEND = "CROSSVIT_FAST_BACKEND"
"""Environment variable that sets the default backend ("reference", "triton" or "auto")."""

ENV_AUTOTUNE = "CROSSVIT_FAST_AUTOTUNE"
"""Environment variable: ``0`` turns the kernels' autotuning off (each launch takes the config already tuned for its
key, else the fixed default); read once, when a kernel module is imported (its ``AUTOTUNE`` attribute)."""


def autotune_from_env() -> bool:
    """``CROSSVIT_FAST_AUTOTUNE`` unset or anything but 0 / false: autotune (CUDA only)."""
    return _switch_on(ENV_AUTOTUNE)


def _switch_on(name: str) -> bool:
    """An on/off environment variable: unset or anything but 0 / false / empty is on."""
    import os

    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "")


ENV_AUTOTUNE_CACHE = "CROSSVIT_FAST_AUTOTUNE_CACHE"
"""Environment variable: ``0`` keeps the autotuners' picks in the process only; otherwise each pick is also written
to Triton's cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and a later process on the same GPU
model, Triton, torch and kernel source loads it instead of timing the candidates again. Read once, at import."""


def autotune_cache_from_env() -> bool:
    """``CROSSVIT_FAST_AUTOTUNE_CACHE`` unset or anything but 0 / false: keep autotune picks on disk (CUDA only)."""
    return _switch_on(ENV_AUTOTUNE_CACHE)

# Limits of the fused kernels: their launchers refuse anything else, and the modules consult them when they choose
# a backend (an "auto" module outside them takes the "torch" path, what timm runs; an explicit "triton" one raises).
FUSED_DTYPES = ("float16", "bfloat16", "float32")
"""Input dtypes (torch names) every fused kernel takes; they accumulate in float32."""

CLS_CROSS_ATTENTION_MAX_DIM = 1024
"""Largest channel count C of the fused CLS cross-attention (a token row is held whole in registers)."""

CLS_CROSS_ATTENTION_MAX_HEAD_DIM = 128

SELF_ATTENTION_HEAD_DIMS = tuple(range(16, 129, 16))
"""Head dims of the fused self-attention: every multiple of 16 up to 128."""

LAYER_NORM_MAX_DIM = 8192
"""Largest width of the fused residual-add + LayerNorm (a row is held whole in registers)."""


def interpreter_runs_bf16() -> bool:
    """True once ``tests/gpu_numerics.py`` has given Triton's CPU interpreter the GPU's bfloat16 rounding (its own
    computes bfloat16 dots on bit patterns and truncates bfloat16 stores): the launchers then take bfloat16 CPU
    tensors under the interpreter instead of refusing them. Never true outside the test suite."""
    import sys

    interp = sys.modules.get("triton.runtime.interpreter")
    return bool(getattr(getattr(interp, "InterpreterBuilder", None), "_crossvit_fast_gpu_numerics", False))
