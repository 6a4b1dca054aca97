"""Inference through a captured CUDA graph: one launch replays the whole forward.

At small batches a CrossViT's forward is a few hundred short kernels, and the CPU that launches them, not the GPU,
sets the latency. :class:`CUDAGraphRunner` captures ``model(x)`` once for a fixed input shape, dtype and device and
replays it: each call copies the new input into the captured input buffer and launches the graph.

What the capture needs, and what the runner does for it:

* no compilation, module loading or autotuning inside the capture: the runner runs the model ``warmup`` times on a
  side stream first (Triton compiles, the self-attention and GEMM autotuners pick their configs; during capture
  they never tune), then once more with the tuned configs pinned (:func:`tuned_configs_pinned`): exactly the
  launches the capture makes, so every kernel it launches is compiled and loaded already (a module load inside the
  capture, ``cuModuleLoadData``, is refused: "operation not permitted when stream is capturing"). The tuners time
  the same raw launches, so the pinned run is a guard more than a necessity; it also covers a key first met after
  the warm-up;
* inference only (``torch.no_grad``; the model should be in eval mode, and the runner refuses a model in training
  mode, whose dropout would be frozen into the graph);
* autocast without its weight-cast cache (``cache_enabled=False``), so the casts are captured too.

The output is the graph's own buffer, overwritten by the next call: clone it to keep it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

__all__ = ["CUDAGraphRunner", "tuned_configs_pinned", "warm_up"]


@contextlib.contextmanager
def tuned_configs_pinned() -> Iterator[None]:
    """Launch the autotuned kernels (self-attention, the block GEMMs) with the configs already tuned (or the
    defaults), never autotuning: the launches a CUDA-graph capture makes (``crossvit_fast.kernels.tuning.pinned``).
    Run a step under it before capturing (``CUDAGraphRunner`` does; for ``torch.compile(mode="reduce-overhead")``
    run every call under it, after one autotuned eager step), so that the kernels the capture launches are compiled
    and loaded outside it."""
    from crossvit_fast.kernels.tuning import pinned

    with pinned():
        yield


def warm_up(forward: Callable[[], object], warmup: int) -> None:
    """``warmup`` steps as they come (compiles, autotunes), then one with the tuned configs pinned (what a capture
    launches)."""
    for _ in range(warmup):
        forward()
    with tuned_configs_pinned():
        forward()


class CUDAGraphRunner:
    """Capture ``model(example)`` in a CUDA graph and replay it for inputs of the same shape, dtype and device.

    Args:
        model: a module in eval mode whose parameters are on ``example``'s CUDA device.
        example: an input of the shape, dtype and device every later call will have (its values do not matter).
        autocast_dtype: run the forward under ``torch.autocast("cuda", dtype=autocast_dtype)`` (e.g. bf16), or None.
        warmup: eager runs on a side stream before the capture (compiles and autotunes outside it).
    """

    def __init__(self, model: torch.nn.Module, example: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None,
                 warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device; torch.cuda.is_available() is False")
        if not isinstance(example, torch.Tensor) or not example.is_cuda:
            where = example.device if isinstance(example, torch.Tensor) else type(example).__name__
            raise ValueError(f"CUDAGraphRunner: the example input must be a CUDA tensor, got {where}")
        if model.training:
            raise ValueError("CUDAGraphRunner captures inference: call model.eval() first (dropout and drop-path "
                             "in training mode would be frozen into the graph)")
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}")
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 (compiles and autotunes outside the capture), got {warmup}")
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.static_input = example.detach().clone()
        side = torch.cuda.Stream(device=example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            warm_up(self._forward, warmup)
        torch.cuda.current_stream(example.device).wait_stream(side)
        torch.cuda.synchronize(example.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self._forward()

    def _forward(self) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                                             enabled=self.autocast_dtype is not None, cache_enabled=False):
            return self.model(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.static_input
        if not isinstance(x, torch.Tensor) or x.shape != s.shape or x.dtype != s.dtype or x.device != s.device:
            got = (f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, torch.Tensor)
                   else type(x).__name__)
            raise ValueError(f"CUDAGraphRunner was captured for {tuple(s.shape)} {s.dtype} on {s.device}, got {got}; "
                             f"capture another runner for this shape")
        s.copy_(x)
        self.graph.replay()
        return self.static_output
