"""Triton kernels of crossvit_fast, installed as ``crossvit_fast.kernels``.

Only ``@triton.jit`` kernels and their launchers (input checks, grid, launch) live here; the torch.library ops,
autograd, modules and reference math live in ``crossvit_fast``. Importing a kernel module imports triton: nothing
in ``crossvit_fast`` imports one at package import time. To run a kernel in Triton's CPU interpreter, set
``TRITON_INTERPRET=1`` before the kernel module is imported.
"""
