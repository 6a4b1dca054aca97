"""The op registry: every entry names files that exist, ops that register, and is what the rest of the package reads."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from crossvit_fast.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = list(registry.OPS.values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_entry_names_files_that_exist(spec):
    name = spec.name
    for path in (f"kernels/{name}.py", f"crossvit_fast/ops/{name}.py", f"tests/test_{name}.py", spec.bench,
                 *(f"tests/{t}.py" for t in spec.tests)):
        assert os.path.isfile(os.path.join(ROOT, path)), path
    assert spec.kernel_module == f"crossvit_fast.kernels.{name}"
    assert spec.op_modules[0] == f"crossvit_fast.ops.{name}"
    module, fn = spec.reference.split(":")
    assert callable(getattr(importlib.import_module(module), fn))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_op_modules_register_their_ops_and_backwards(spec):
    for module in spec.op_modules:
        importlib.import_module(module)
    for qualified in spec.custom_ops:
        ns, op = qualified.split("::")
        assert hasattr(getattr(torch.ops, ns), op), qualified
        assert hasattr(getattr(torch.ops, ns), f"{op}_backward"), f"{qualified}_backward"


def test_importing_every_op_module_imports_no_triton():
    modules = [m for spec in SPECS for m in spec.op_modules]
    code = ("import sys, importlib, torch\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert 'triton' not in sys.modules, 'triton was imported'")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_package_reads_the_registry():
    from crossvit_fast.backend import FUSED_OPS, TORCH_PATH
    from crossvit_fast.flops import OP_HANDLES

    assert list(FUSED_OPS) == list(TORCH_PATH) == list(registry.OPS)
    traced = {t for spec in SPECS for t in spec.flop_handles}
    assert traced == set(registry.custom_op_names()) and traced <= set(OP_HANDLES)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import verified_ops
    finally:
        sys.path.pop(0)
    assert verified_ops.OP_TEST_FILES == {s.name: list(s.tests) for s in SPECS}


def test_supports_names_what_is_out_of_reach():
    sa, cls, ln = registry.get("self_attention"), registry.get("cls_cross_attention"), registry.get("layer_norm")
    assert sa.supports("bfloat16", head_dim=64) == ""
    assert "head_dim 24" in sa.supports("float32", head_dim=24)
    assert "float64" in sa.supports("float64", head_dim=64)
    assert cls.supports("float16", dim=448, head_dim=64) == ""
    assert "dim 2048" in cls.supports("float16", dim=2048, head_dim=64)
    assert "width 9000" in ln.supports("float32", dim=9000)
    with pytest.raises(KeyError, match="the ops are cls_cross_attention"):
        registry.get("softmax")
