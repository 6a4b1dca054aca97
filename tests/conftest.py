"""Test session set-up.

Without a CUDA device the fused kernels run in Triton's CPU interpreter, which must be switched on before the
module defining the ``@triton.jit`` functions is imported: it is switched on here, before any test module loads.
Tests that need CUDA skip with a reason.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
