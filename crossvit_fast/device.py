"""The device a tensor runs on, as the backend choice names it, and the warn-once messages of crossvit_fast.

Below :mod:`crossvit_fast.backend` and :mod:`crossvit_fast.record`, which both read it; imports nothing else of the
package but its configuration.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch

from crossvit_fast.config import interpreter_enabled

__all__ = ["device_arch", "warn_once", "INTERPRETER_ARCH"]

INTERPRETER_ARCH: Optional[str] = None
"""For tests only: the architecture name CPU tensors count as under Triton's CPU interpreter, so that
``crossvit_fast.verify`` and ``"auto"`` run their whole flow (record included) on CPU tensors. None outside tests:
then a CPU device has no architecture and ``"auto"`` never takes the interpreter."""

_archs: Dict[int, Optional[str]] = {}


def device_arch(device=None) -> Optional[str]:
    """The architecture of a CUDA device, as :data:`crossvit_fast.backend.GPU_VERIFIED_OPS` names it: ``"sm_90"`` for NVIDIA compute
    capability 9.0, the ROCm architecture (``"gfx942"``) on a ROCm build; None for a non-CUDA device or without
    CUDA. ``device``: a ``torch.device``, an index, or None (the current CUDA device)."""
    if INTERPRETER_ARCH is not None and interpreter_enabled() and not isinstance(device, int):
        if (torch.device(device).type == "cpu") if device is not None else not torch.cuda.is_available():
            return INTERPRETER_ARCH
    if device is None:
        if not torch.cuda.is_available():
            return None
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _archs:  # every device at once: a compiled model then meets only filled entries
        for i in sorted({index, *range(torch.cuda.device_count())}):
            props = torch.cuda.get_device_properties(i)
            if torch.version.hip is not None:
                _archs[i] = str(getattr(props, "gcnArchName", "rocm")).split(":")[0]
            else:
                _archs[i] = f"sm_{props.major}{props.minor}"
    return _archs[index]


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
