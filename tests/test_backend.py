"""Backend selection: argument, environment variable, context manager, explicit triton where it cannot run."""

import subprocess
import sys
import warnings

import pytest
import torch

import crossvit_fast
from crossvit_fast import backend as B
from crossvit_fast.layers import Attention
from crossvit_fast.reference import self_attention_ref


def _all_backends(model):
    return {b for v in model.backends.values() for b in v}


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CROSSVIT_FAST_BACKEND", raising=False)


def test_argument(no_interpreter):
    model = crossvit_fast.create_model("crossvit_tiny_240", backend="reference")
    assert _all_backends(model) == {"reference"}
    assert len(model.backends["self_attention"]) == 3 * (1 + 4)  # tiny: 3 multi-scale blocks of 1 + 4 blocks
    assert len(model.backends["cls_cross_attention"]) == 6


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("CROSSVIT_FAST_BACKEND", "reference")
    assert crossvit_fast.get_backend() == "reference"
    monkeypatch.setenv("CROSSVIT_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CROSSVIT_FAST_BACKEND"):
        crossvit_fast.create_model("crossvit_tiny_240")


def test_context_manager_beats_env_and_argument_beats_both(monkeypatch):
    monkeypatch.setenv("CROSSVIT_FAST_BACKEND", "triton")
    with crossvit_fast.use_backend("reference"):
        assert crossvit_fast.get_backend() == "reference"
        with crossvit_fast.use_backend("auto"):
            assert crossvit_fast.get_backend() == "auto"
        assert _all_backends(crossvit_fast.create_model("crossvit_tiny_240")) == {"reference"}
    assert crossvit_fast.get_backend() == "triton"
    assert _all_backends(crossvit_fast.create_model("crossvit_tiny_240", backend="reference")) == {"reference"}
    with pytest.raises(ValueError, match="expected one of"):
        with crossvit_fast.use_backend("cuda"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_explicit_triton_where_it_cannot_run(no_interpreter, monkeypatch):
    with pytest.raises(crossvit_fast.BackendUnavailableError, match="cannot run here"):
        crossvit_fast.create_model("crossvit_tiny_240", backend="triton")
    # with a kernel for the op but no CUDA and no interpreter: says so
    monkeypatch.setitem(B.FUSED_OPS, "self_attention", "crossvit_fast.ops.self_attention")
    with pytest.raises(crossvit_fast.BackendUnavailableError, match="no CUDA device.*TRITON_INTERPRET=1"):
        B.resolve_backend("triton", op="self_attention")
    # auto never takes the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.resolve_backend("auto", op="self_attention") == "torch"
    assert B.resolve_backend("triton", op="self_attention") == "triton"
    # and with triton missing: says that
    real_find_spec = B.importlib.util.find_spec
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a))
    with pytest.raises(crossvit_fast.BackendUnavailableError, match="triton is not installed"):
        B.resolve_backend("triton", op="self_attention")


def test_auto_falls_back_with_one_warning_and_explicit_raises(no_interpreter, monkeypatch):
    monkeypatch.setattr(B, "_warned", set())
    attn = Attention(16, 2, qkv_bias=True, backend="reference").eval()
    attn.backend, attn.backend_requested = "triton", "auto"  # as "auto" resolves on a CUDA machine
    x = torch.randn(2, 5, 16)
    want = attn.proj(self_attention_ref(attn.qkv(x), 2))
    with pytest.warns(RuntimeWarning, match="torch path"):
        out = attn(x)
    torch.testing.assert_close(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(x)  # warned once only
    attn.backend_requested = "triton"
    with pytest.raises(ValueError, match="CUDA tensors"):
        attn(x)


def test_attention_dropout_in_training_uses_torch_path_and_warns(monkeypatch):
    monkeypatch.setattr(B, "_warned", set())
    attn = Attention(16, 2, attn_drop=0.1, backend="reference").train()
    attn.backend, attn.backend_requested = "triton", "triton"
    with pytest.warns(RuntimeWarning, match="attention dropout"):
        attn(torch.randn(1, 3, 16))


def test_import_needs_no_triton_and_imports_none():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, as if not installed
        "import crossvit_fast, torch\n"
        "m = crossvit_fast.create_model('crossvit_tiny_240').eval()\n"
        "assert crossvit_fast.resolve_backend('auto') == 'torch'\n"
        "m(torch.randn(1, 3, 240, 240))\n"
        "try:\n"
        "    crossvit_fast.create_model('crossvit_tiny_240', backend='triton')\n"
        "    raise SystemExit('explicit triton did not raise')\n"
        "except crossvit_fast.BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code = "import sys, crossvit_fast; print(sorted(m for m in ('triton', 'fvcore', 'timm') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_auto_takes_only_gpu_verified_kernels(no_interpreter, monkeypatch):
    monkeypatch.setattr(B.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(B.torch.cuda, "get_device_name", lambda *a: "a CUDA device")
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", set())
    assert B.resolve_backend("auto", op="self_attention") == "torch"
    assert B.resolve_backend("triton", op="self_attention") == "triton"
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {"self_attention"})
    assert B.resolve_backend("auto", op="self_attention") == "triton"
    assert B.resolve_backend("auto", op="cls_cross_attention") == "torch"
