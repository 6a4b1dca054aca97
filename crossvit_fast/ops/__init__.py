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
