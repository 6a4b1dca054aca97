"""torch.library custom ops of crossvit_fast, one module per op (``crossvit_fast::<name>``).

Each module registers its op with ``torch.library.custom_op`` plus ``register_fake`` and ``register_autograd``,
so torch.compile sees one opaque op (``fullgraph=True`` compiles) and ``torch.library.opcheck`` passes. The Triton
launchers are imported from ``crossvit_fast.kernels`` lazily, the first time an op runs, so importing an op module
does not import triton. The modules in ``crossvit_fast.layers`` call these ops under ``backend="triton"``.
"""

import contextlib

import torch


@contextlib.contextmanager
def autocast_off(t: torch.Tensor):
    """Autocast off for ``t``'s device type while an op's implementation runs.

    A custom op without an autocast registration falls through autocast's dispatch key, but autocast stays on for
    what its implementation calls: the launchers' float32 torch math (the CLS op's projections, weight gradients,
    cuBLAS paths) would run in the autocast dtype. The modules cast the op's inputs to the autocast dtype before
    the call, as timm's Linears would; inside, every op computes in the dtypes it was written for."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            yield
    else:
        yield


def check_one_device(op: str, x: torch.Tensor, named) -> None:
    """Refuse tensors that are not all on ``x``'s device, meta included: the dispatcher sends a call with one meta
    argument to the op's fake implementation, which would return uninitialised memory on ``x``'s device. ``named``:
    ``(name, tensor or None)`` pairs. The fakes run this too, where a FakeTensor carries its real device."""
    other = [f"{name} ({t.device})" for name, t in named if t is not None and t.device != x.device]
    if other:
        raise ValueError(f"{op}: every tensor must be on x's device {x.device}; these are not: {', '.join(other)}")


def refuse_double_backward(backward_op, op: str) -> None:
    """Give ``backward_op`` (an op's ``*_backward`` custom op) an autograd formula that refuses, in crossvit_fast's
    words, to be differentiated: a gradient of the fused op's gradient (``autograd.grad(..., create_graph=True)``
    and then a backward through the result, as gradient penalties do) is not implemented. The first-order gradient
    with ``create_graph=True`` still works; the refusal comes where the second backward reaches this op. Without
    it torch says only that no autograd formula was registered."""

    def _backward(ctx, *grads):
        raise RuntimeError(
            f"crossvit_fast: the fused {op} op has no double backward (a backward through its gradient, as "
            f"torch.autograd.grad(..., create_graph=True) followed by a backward computes); build the model or module "
            f"with backend='torch' (what timm runs) for such training, or backend='reference'")

    backward_op.register_autograd(_backward)
