"""crossvit_fast: CrossViT with fused Triton kernels and a pure-PyTorch reference path.

The repository's top-level ``kernels/`` folder is installed as ``crossvit_fast.kernels`` (``package_dir``):
nothing named ``kernels`` is installed at the top level of site-packages, where that import name belongs to
another project. In a source checkout, ``crossvit_fast/kernels`` is a link to ``../kernels``.
"""

from setuptools import setup

setup(
    name="crossvit_fast",
    version="0.1.0",
    description="CrossViT (ICCV 2021) with fused Triton kernels; timm/IBM weight compatible",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["crossvit_fast", "crossvit_fast.ops", "crossvit_fast.kernels"],
    package_dir={"crossvit_fast": "crossvit_fast", "crossvit_fast.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.2"],
        "flops": ["fvcore"],
        "test": ["pytest", "pytest-benchmark", "numpy", "fvcore", "triton>=3.2"],
        # optional peers, never imported unless used: timm (needs torchvision) for timm's models beside ours and
        # for tests/test_timm_real.py; huggingface_hub for fetching released weights
        "timm": ["timm>=1.0"],
        "hub": ["huggingface_hub"],
    },
    entry_points={"console_scripts": ["crossvit-fast=crossvit_fast.cli:main"]},
)
