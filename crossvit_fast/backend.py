"""Choosing between the reference math, what timm runs ("torch") and the fused Triton kernels.

A backend is chosen when a module is built, from (first that is set):

1. the ``backend=`` argument of the module / model / ``create_model``,
2. the innermost ``with crossvit_fast.use_backend(name):`` block,
3. the environment variable ``CROSSVIT_FAST_BACKEND``,
4. ``"auto"``.

``"reference"`` is the explicit math of :mod:`crossvit_fast.reference` (attention as explicit matmuls): the oracle
of the tests, runs everywhere, not tuned for speed. ``"torch"`` is what timm runs, op for op: the branch
self-attention through ``F.scaled_dot_product_attention``, PyTorch's LayerNorm, and the fusion's CLS-query
attention as timm writes it (explicit matmuls: timm's ``CrossAttention`` does not call SDPA). ``"triton"`` is the
fused kernels: asking for it where it cannot run raises :class:`BackendUnavailableError` saying why. ``"auto"``
takes the fused path only where it can run at full speed (a CUDA device, triton installed, a kernel for the op that
has passed its parity tests on a GPU of the device's architecture: ``GPU_VERIFIED_OPS``) and ``"torch"`` otherwise,
so a model is never slower than timm's: a kernel verified on an H100 (``sm_90``) is not taken by default on an A100
(``sm_80``, less shared memory per block, other tiles) or a ROCm device. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) counts as "can run" for an explicit ``"triton"`` only: it is for tests.

Nothing here imports triton.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

import torch

from crossvit_fast.config import ENV_BACKEND, env_raw, interpreter_enabled
from crossvit_fast import device as _device
from crossvit_fast import record as _record
from crossvit_fast.device import device_arch, warn_once
from crossvit_fast.ops.registry import OPS

__all__ = [
    "BACKENDS",
    "RESOLVED_BACKENDS",
    "FUSED_OPS",
    "GPU_VERIFIED_OPS",
    "device_arch",
    "verified_on",
    "verified_archs",
    "authority",
    "op_authorities",
    "BackendUnavailableError",
    "use_backend",
    "get_backend",
    "backend_request",
    "resolve_backend",
    "triton_status",
    "interpreter_enabled",
    "fused_runs_on",
    "op_backends",
    "module_backends",
    "count_backends",
    "describe_op_backends",
    "TORCH_PATH",
    "warn_once",
]

BACKENDS = ("reference", "torch", "triton", "auto")
"""What ``backend=`` takes. A module resolves it to one of ``RESOLVED_BACKENDS`` when it is built."""

RESOLVED_BACKENDS = ("reference", "torch", "triton")

FUSED_OPS: Dict[str, str] = {name: spec.op_modules[0] for name, spec in OPS.items()}
"""Ops with a fused Triton kernel in this version: op name -> the ``crossvit_fast.ops`` module that registers it
(a view of :data:`crossvit_fast.ops.registry.OPS`)."""

TORCH_PATH: Dict[str, str] = {name: spec.torch_path for name, spec in OPS.items()}
"""What each op runs on the ``"torch"`` backend (where it does not run fused): what timm runs (a view of the
registry)."""

GPU_VERIFIED_OPS: Dict[str, FrozenSet[str]] = {}
"""Fused op -> the GPU architectures (:func:`device_arch` names: ``"sm_90"`` for H100 / H200) on which its CUDA
parity tests have passed from this repository (with a committed benchmark record). ``"auto"`` takes an op's kernel
only on a device of one of these architectures: a kernel tested in Triton's CPU interpreter alone, or on another
architecture, runs when asked for explicitly (``backend="triton"``), never by default. ``"linear"`` is the whole
fused-GEMM block path: its CUDA tests are tests/test_linear.py and tests/test_block.py (the ``block_half`` op the
Block runs)."""

def verified_on(op: Optional[str], arch: Optional[str], dims: Optional[Dict[str, int]] = None,
                dtype: Optional[str] = None) -> bool:
    """Whether ``op``'s kernel (any op's, when None) may run under ``"auto"`` on ``arch``: it has passed its CUDA
    parity tests there (the shipped :data:`GPU_VERIFIED_OPS`), or this machine's record (``crossvit-fast verify``,
    :mod:`crossvit_fast.record`) calls its shape class ``verified``: ``dims`` as the registry's ``supports`` takes
    them, ``dtype`` a torch name (None: any)."""
    if arch is None:
        return False
    if op is None:
        if any(arch in archs for archs in GPU_VERIFIED_OPS.values()):
            return True
    elif arch in GPU_VERIFIED_OPS.get(op, ()):
        return True
    return _record.verified_date(op, arch, dims, dtype) is not None


def authority(op: str, arch: Optional[str], dims: Optional[Dict[str, int]] = None, dtype: Optional[str] = None,
              requested: str = "auto") -> str:
    """On whose authority ``op``'s kernel runs fused for a module asking for ``requested``: an explicit
    ``backend="triton"``, the shipped table, this machine's record (with its date), or ``"not verified"``. The
    order is that of :func:`resolve_backend`: explicit > shipped > local record > the torch path."""
    if requested == "triton":
        return "explicit backend='triton'"
    if arch is not None and arch in GPU_VERIFIED_OPS.get(op, ()):
        return f"shipped GPU_VERIFIED_OPS ({arch})"
    date = _record.verified_date(op, arch, dims, dtype)
    if date is not None:
        return f"local record of {date} (crossvit-fast verify)"
    return "not verified"


def op_authorities(model: torch.nn.Module) -> Dict[str, Dict[str, int]]:
    """Per op, on whose authority its modules run fused (:func:`authority`; ``"not fused"`` for those that do not):
    ``{op: {authority: number of modules}}``, e.g. ``{"self_attention": {"local record of 2026-12-07T19:30:00Z
    (crossvit-fast verify)": 15}}``."""
    arch = device_arch()
    out: Dict[str, List[str]] = {}
    for m in model.modules():
        chosen = m.__dict__.get("backends")
        if isinstance(chosen, dict):
            dims = m._dims() if hasattr(m, "_dims") else None
            for op, resolved in chosen.items():
                why = (authority(op, arch, dims, None, getattr(m, "backend_requested", "auto"))
                       if resolved == "triton" else "not fused")
                out.setdefault(op, []).append(why)
    return count_backends(out)


def verified_archs(op: str) -> str:
    """The architectures ``op`` is verified on, for messages: ``"sm_90"``, or ``"none yet"``."""
    return ", ".join(sorted(GPU_VERIFIED_OPS.get(op, ()))) or "none yet"


_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("crossvit_fast_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was asked for where the fused kernels cannot run."""


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown crossvit_fast backend {name!r} (from {source}); expected one of {BACKENDS}")
    return name.lower()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Within the block, modules built without an explicit ``backend=`` use ``name``."""
    name = _check_name(name, "use_backend()")
    token = _context_backend.set(name)
    try:
        yield name
    finally:
        _context_backend.reset(token)


def get_backend() -> str:
    """The backend a module built now without ``backend=`` asks for (before resolving ``"auto"``)."""
    return backend_request()[0]


def backend_request() -> Tuple[str, str]:
    """``(name, source)``: the backend a module built now without ``backend=`` asks for, and where that came from
    (``"use_backend()"``, ``"the environment variable CROSSVIT_FAST_BACKEND"`` or ``"the default"``)."""
    ctx = _context_backend.get()
    if ctx is not None:
        return ctx, "use_backend()"
    env = env_raw(ENV_BACKEND).strip()
    if env:
        return _check_name(env, f"environment variable {ENV_BACKEND}"), f"the environment variable {ENV_BACKEND}"
    return "auto", "the default"


def triton_status(op: Optional[str] = None, allow_interpreter: bool = True) -> Tuple[bool, str]:
    """Whether the fused path for ``op`` (any op when None) can run here, and if not, why.

    Returns ``(ok, reason)``; ``reason`` says where it runs when ``ok``.
    """
    if op is not None and op not in FUSED_OPS:
        return False, f"this version of crossvit_fast has no fused Triton kernel for {op!r} yet"
    if op is None and not FUSED_OPS:
        return False, "this version of crossvit_fast has no fused Triton kernels yet (reference path only)"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if allow_interpreter and interpreter_enabled():
        return True, "Triton's CPU interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return False, (
        "no CUDA device (torch.cuda.is_available() is False); the fused kernels need an NVIDIA GPU, "
        "or TRITON_INTERPRET=1 set before start-up to run them in Triton's CPU interpreter (slow, for tests)"
    )


def resolve_backend(requested: Optional[str] = None, op: Optional[str] = None,
                    dims: Optional[Dict[str, int]] = None) -> str:
    """Resolve a request (None: the current default) to ``"reference"``, ``"torch"`` or ``"triton"`` for ``op``.

    ``"auto"`` takes ``"triton"`` where the kernel can run and :func:`verified_on` the current device for ``dims``
    (the module's sizes, as the registry's ``supports`` takes them; None: any) in some dtype; the dtype of each
    call is checked when it runs. On a GPU where neither the shipped table nor a local record covers the op, it
    says once that ``crossvit-fast verify`` would.

    Raises:
        BackendUnavailableError: ``"triton"`` was asked for and cannot run here.
    """
    if requested is None:
        name, source = backend_request()
    else:
        name, source = _check_name(requested, "backend= argument"), "the backend= argument"
    if name in ("reference", "torch"):
        return name
    if name == "triton":
        ok, why = triton_status(op, allow_interpreter=True)
        if not ok:
            fix = (
                f"unset {ENV_BACKEND} or set it to 'auto'"
                if source.endswith(ENV_BACKEND)
                else "ask for backend='auto' (the fused kernels where they can run) or 'reference'"
            )
            raise BackendUnavailableError(
                f"backend='triton' was asked for (by {source}) but cannot run here: {why}; {fix}"
            )
        return "triton"
    ok, _ = triton_status(op, allow_interpreter=_device.INTERPRETER_ARCH is not None)
    if not ok:
        return "torch"
    arch = device_arch()
    if verified_on(op, arch, dims):
        return "triton"
    _hint_verify(op, arch)
    return "torch"


def _hint_verify(op: Optional[str], arch: Optional[str]) -> None:
    """Once per process: where no valid local record exists for this GPU, say that ``crossvit-fast verify`` would
    let ``"auto"`` take the kernels that pass here (or why the record there is not used)."""
    if arch is None or (op is not None and arch in GPU_VERIFIED_OPS.get(op, ())):
        return
    data, why = _record.load(arch)
    if data is None:
        warn_once("verify-hint", f"crossvit_fast: 'auto' runs the torch path for the kernels not verified on this "
                  f"{arch} GPU ({why}); `crossvit-fast verify` would enable the fused kernels that pass here")


def module_backends(model: torch.nn.Module) -> Dict[str, List[str]]:
    """The one report of what runs fused: op -> the resolved backend of each module that can run it, in module
    order (``"triton"``: fused; ``"torch"``: what timm runs; ``"reference"``: the explicit math). Every op a module
    chooses a backend for is listed (a branch Block: ``layer_norm`` and ``linear``). ``CrossViT.backends``,
    :func:`op_backends` and ``optimize``'s ``crossvit_fast_ops`` are this report."""
    out: Dict[str, List[str]] = {}
    for m in model.modules():
        chosen = m.__dict__.get("backends")
        if isinstance(chosen, dict):
            for op, resolved in chosen.items():
                out.setdefault(op, []).append(resolved)
    return out


def op_backends(model: torch.nn.Module) -> Dict[str, Dict[str, int]]:
    """:func:`module_backends` counted: ``{op: {resolved backend: number of modules}}``, e.g.
    ``{"self_attention": {"torch": 15}, "linear": {"torch": 15}, ...}``."""
    return count_backends(module_backends(model))


def count_backends(report: Dict[str, List[str]]) -> Dict[str, Dict[str, int]]:
    """A :func:`module_backends` report as ``{op: {resolved backend: number of modules}}``."""
    return {op: {b: names.count(b) for b in dict.fromkeys(names)} for op, names in report.items()}


def describe_op_backends(counts: Dict[str, Dict[str, int]]) -> List[str]:
    """One line per op of :func:`op_backends`' result: fused or not, and what runs instead."""
    lines = []
    for op, per in counts.items():
        total = sum(per.values())
        parts = []
        for resolved, n in sorted(per.items(), key=lambda kv: RESOLVED_BACKENDS.index(kv[0]), reverse=True):
            what = {"triton": "fused (triton)", "torch": f"not fused: torch ({TORCH_PATH.get(op, 'PyTorch')})",
                    "reference": "not fused: reference (explicit math)"}[resolved]
            parts.append(f"{what} in {n} of {total} modules")
        lines.append(f"{op}: " + "; ".join(parts))
    return lines


def fused_runs_on(t: torch.Tensor) -> bool:
    """Whether a fused kernel can take ``t`` where it is (a CUDA tensor, or any CPU tensor under the interpreter)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreter_enabled())
