"""torch.library custom ops of crossvit_fast, one module per op (``crossvit_fast::<name>``).

Each module registers its op with ``torch.library.custom_op`` plus ``register_fake`` and ``register_autograd``,
so torch.compile sees one opaque op (``fullgraph=True`` compiles) and ``torch.library.opcheck`` passes. The Triton
launchers are imported from ``crossvit_fast.kernels`` lazily, the first time an op runs, so importing an op module
does not import triton. The modules in ``crossvit_fast.layers`` call these ops under ``backend="triton"``.
"""
