"""When the kernels that tune (the self-attention, the block GEMMs) may time candidates: one switch for both.

Each of those kernel modules keeps its own ``AUTOTUNE`` flag (``CROSSVIT_FAST_AUTOTUNE``, read at import) and its own
record of the configs it picked. Whether a launch may time candidates now is decided here, the same way for both:
the module's flag is on, no :func:`pinned` block is open, and the launch's stream is not being captured into a CUDA
graph (a capture must not compile, load or time kernels). Imports no triton.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["pinned", "is_pinned", "capturing", "may_tune"]

_state = threading.local()


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Within the block (in this thread), every tuned kernel launches the config already picked for its key, or its
    default, and never times candidates: what a CUDA-graph capture launches. Run a step under it before a capture so
    that the capture meets only kernels compiled and loaded already."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def is_pinned() -> bool:
    """Whether a :func:`pinned` block is open in this thread."""
    return getattr(_state, "depth", 0) > 0


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def may_tune(enabled: bool, device: torch.device) -> bool:
    """Whether a launch on ``device`` may time candidates: its module's ``enabled`` flag, no :func:`pinned` block,
    no capture."""
    return enabled and not is_pinned() and not capturing(device)
