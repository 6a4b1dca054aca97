"""Constants shared by the models, the reference math and the kernels' callers, and the one table of environment
variables (:data:`SETTINGS`): nothing else in crossvit_fast, its benchmarks or its tests reads one."""

import os
from dataclasses import dataclass
from typing import Dict, Tuple

LN_EPS = 1e-6
"""eps of every LayerNorm in CrossViT (timm's ``partial(nn.LayerNorm, eps=1e-6)``)."""

TRITON_FP_FUSION = True
"""Every launch passes ``enable_fp_fusion`` explicitly: Triton contracts a*b+c into FMAs (its default up to 3.9,
which 3.10 turns off), so the kernels compile and round the same under every Triton version (and the cache key of
the default stays that of an explicit True)."""

# --- environment variables: every CROSSVIT_FAST_* variable (and TRITON_INTERPRET) is read here, and only here -------
@dataclass(frozen=True)
class Setting:
    """One environment variable: ``scope`` is who sets it (``"user"``: anyone using the library; ``"bench"``: the
    benchmark scripts; ``"test"``: the test suite), ``default`` its value when unset."""

    name: str
    default: str
    scope: str
    doc: str


_TABLE = """
CROSSVIT_FAST_BACKEND         auto   user   the default backend of modules built without backend=: reference, torch, triton or auto; read each time a module is built
CROSSVIT_FAST_AUTOTUNE        1      user   0 turns the kernels' autotuning off (a launch takes the config already tuned for its key, else the fixed default); read when a kernel module is imported
CROSSVIT_FAST_AUTOTUNE_CACHE  1      user   0 keeps autotune picks in the process only; otherwise each pick is also written to Triton's cache directory (TRITON_CACHE_DIR) and loaded by later processes on the same GPU model and versions; read at import
CROSSVIT_FAST_CACHE_DIR       -      user   where crossvit-fast verify keeps this machine's record of verified kernels (default: $XDG_CACHE_HOME/crossvit_fast, else ~/.cache/crossvit_fast); read when the record is loaded or written
XDG_CACHE_HOME                -      user   the base of the default cache directory (the freedesktop convention; default ~/.cache)
TRITON_INTERPRET              0      user   Triton's own switch: 1 runs the kernels in its CPU interpreter (tests only: correct but slow); set it before a kernel module is imported
CROSSVIT_FAST_COMMIT          -      bench  the commit a benchmark record names, where the run has no git checkout (the GPU machine)
CROSSVIT_FAST_TEST_SEED       0      test   moves every seed of the test suite (randomized tests, random weights, timm comparisons)
CROSSVIT_FAST_RANDOM_CASES    12     test   cases per op and test of tests/test_random_inputs.py
CROSSVIT_FAST_TEST_CUDA_DRAWS 0      test   1: on CUDA, draw every test tensor on the device instead of on the CPU's generator
CROSSVIT_FAST_MEMCHECK        1      test   0 leaves the interpreter's out-of-bounds memory checker out of the test session
CROSSVIT_FAST_SM90_SET        ci     test   the sm_90 compile set tests/test_sm90_compile.py checks: ci, smoke or family
CROSSVIT_FAST_TIMM_SUITE      timm   test   what timm's own test suite builds under tests/timm_suite_plugin.py: timm, models or optimize
"""

SETTINGS: Tuple[Setting, ...] = tuple(
    Setting(name, "" if default == "-" else default, scope, doc)
    for name, default, scope, doc in (line.split(None, 3) for line in _TABLE.strip().splitlines())
)
"""Every environment variable crossvit_fast, its benchmarks and its tests read; ``crossvit-fast info`` lists the
user and bench ones with their values."""

ENV_VARS: Dict[str, Setting] = {s.name: s for s in SETTINGS}

ENV_BACKEND = "CROSSVIT_FAST_BACKEND"
"""Environment variable that sets the default backend ("reference", "torch", "triton" or "auto")."""

ENV_AUTOTUNE = "CROSSVIT_FAST_AUTOTUNE"
"""Environment variable: ``0`` turns the kernels' autotuning off (each launch takes the config already tuned for its
key, else the fixed default); read once, when a kernel module is imported (its ``AUTOTUNE`` attribute)."""

ENV_AUTOTUNE_CACHE = "CROSSVIT_FAST_AUTOTUNE_CACHE"
"""Environment variable: ``0`` keeps the autotuners' picks in the process only; otherwise each pick is also written
to Triton's cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and a later process on the same GPU
model, Triton, torch and kernel source loads it instead of timing the candidates again. Read once, at import."""


ENV_CACHE_DIR = "CROSSVIT_FAST_CACHE_DIR"
"""Environment variable: the directory of the local verification record (see :func:`cache_dir`)."""


def cache_dir() -> str:
    """The directory of this machine's verification record: ``CROSSVIT_FAST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/crossvit_fast``, else ``~/.cache/crossvit_fast``."""
    explicit = env(ENV_CACHE_DIR)
    if explicit:
        return os.path.expanduser(explicit)
    base = env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "crossvit_fast")


def env(name: str) -> str:
    """The value of the environment variable ``name`` (one of :data:`SETTINGS`), stripped; its default when unset."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not one of crossvit_fast's settings ({', '.join(ENV_VARS)})")
    return os.environ.get(name, ENV_VARS[name].default).strip()


def env_raw(name: str) -> str:
    """What the environment holds for ``name`` (one of :data:`SETTINGS`): ``""`` when unset, for reports."""
    env(name)
    return os.environ.get(name, "")


def env_flag(name: str) -> bool:
    """An on/off setting: off for 0, false, no, off or an empty value; its default when unset."""
    return env(name).lower() not in ("0", "false", "no", "off", "")


def env_int(name: str) -> int:
    """An integer setting; a ``ValueError`` naming the variable when it is not one."""
    value = env(name)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return env("TRITON_INTERPRET") not in ("", "0")


def autotune_from_env() -> bool:
    """``CROSSVIT_FAST_AUTOTUNE`` unset or anything but 0 / false: autotune (CUDA only)."""
    return env_flag(ENV_AUTOTUNE)


def autotune_cache_from_env() -> bool:
    """``CROSSVIT_FAST_AUTOTUNE_CACHE`` unset or anything but 0 / false: keep autotune picks on disk (CUDA only)."""
    return env_flag(ENV_AUTOTUNE_CACHE)


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
