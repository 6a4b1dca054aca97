"""Backend selection: argument, environment variable, context manager, explicit triton where it cannot run."""

import subprocess
import sys
import warnings

import pytest
import torch

import crossvit_fast
from crossvit_fast import backend as B
from crossvit_fast import device as D
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
    monkeypatch.setattr(D, "_warned", set())
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
    monkeypatch.setattr(D, "_warned", set())
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
    monkeypatch.setattr(B, "device_arch", lambda device=None: "sm_90")
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {})
    assert B.resolve_backend("auto", op="self_attention") == "torch"
    assert B.resolve_backend("triton", op="self_attention") == "triton"
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {"self_attention": frozenset({"sm_90"})})
    assert B.resolve_backend("auto", op="self_attention") == "triton"
    assert B.resolve_backend("auto", op="cls_cross_attention") == "torch"
    # verified on another architecture only: "auto" does not take it here; an explicit "triton" still does
    monkeypatch.setattr(B, "device_arch", lambda device=None: "sm_80")
    assert B.resolve_backend("auto", op="self_attention") == "torch"
    assert B.resolve_backend("triton", op="self_attention") == "triton"
    assert not B.verified_on(None, "sm_80") and B.verified_on(None, "sm_90")
    assert not B.verified_on("self_attention", None)
    assert B.verified_archs("self_attention") == "sm_90" and B.verified_archs("linear") == "none yet"


def test_device_arch(monkeypatch):
    assert B.device_arch(torch.device("cpu")) is None and B.device_arch("meta") is None
    if not torch.cuda.is_available():
        assert B.device_arch() is None
    monkeypatch.setattr(D, "_archs", {})

    class Props:
        major, minor, gcnArchName = 9, 0, "gfx942:sramecc+:xnack-"

    monkeypatch.setattr(B.torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(B.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(B.torch.version, "hip", None)
    assert B.device_arch(torch.device("cuda", 3)) == "sm_90" and B.device_arch(3) == "sm_90"
    assert sorted(D._archs) == [0, 1, 3]  # every device filled at the first call
    monkeypatch.setattr(D, "_archs", {})
    monkeypatch.setattr(B.torch.version, "hip", "6.2")  # a ROCm build: named by its own architecture, never sm_*
    assert B.device_arch(torch.device("cuda", 3)) == "gfx942"


def test_auto_module_on_an_unverified_architecture_takes_the_torch_path(monkeypatch):
    """A model built where its kernels were verified ("auto" took them) meets a GPU of another architecture: those
    calls take the torch path with one warning; an explicit "triton" still runs the kernel."""
    import crossvit_fast.layers as L
    from crossvit_fast.layers import Block

    if not B.interpreter_enabled():
        pytest.skip("runs the fused path on CPU tensors in Triton's interpreter")
    monkeypatch.setattr(D, "_warned", set())
    calls = []
    monkeypatch.setattr(L, "device_arch", lambda device: calls.append(device) or "sm_80")
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {op: frozenset({"sm_90"}) for op in B.FUSED_OPS})
    attn = Attention(16, 2, qkv_bias=True, backend="reference").eval()
    attn.backend, attn.backend_requested = "triton", "auto"  # as "auto" resolves on an H100
    x = torch.randn(2, 5, 16)
    with pytest.warns(RuntimeWarning, match=r"sm_80\), an architecture the self_attention kernel has not passed"):
        assert not attn._fused_call("self_attention", attn.qkv(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not attn._fused_call("self_attention", attn.qkv(x))  # warned once only
    monkeypatch.setattr(L, "device_arch", lambda device: "sm_90")
    assert attn._fused_call("self_attention", attn.qkv(x))
    monkeypatch.setattr(L, "device_arch", lambda device: "sm_80")
    attn.backend_requested = "triton"
    assert attn._fused_call("self_attention", attn.qkv(x))  # explicit: the user's choice, no architecture check

    # a Block: its LayerNorm seam and its GEMMs ("linear") are checked each for its own op
    blk = Block(16, 2, backend="reference").eval()
    for m in (blk, blk.attn):
        m.backend, m.backend_requested = "triton", "auto"
    blk.linear_backend = "triton"
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {"layer_norm": frozenset({"sm_80"})})
    with pytest.warns(RuntimeWarning, match="the linear kernel has not passed"):
        assert blk._fused_call("layer_norm", x) and not blk._fused_call("linear", x)
    monkeypatch.setattr(B, "GPU_VERIFIED_OPS", {"layer_norm": frozenset({"sm_80"}), "linear": frozenset({"sm_80"})})
    assert blk._fused_call("linear", x)
    ref = Block(16, 2, backend="reference").eval()
    ref.load_state_dict(blk.state_dict())
    # GEMMs fused, self-attention not verified here: the attention between them is the torch path (SDPA), not the
    # explicit math, and the block computes what timm's does
    seen = []
    monkeypatch.setattr(L, "self_attention_sdpa", lambda *a, **k: seen.append(1) or L.self_attention_ref(*a, **k))
    with pytest.warns(RuntimeWarning, match="the self_attention kernel has not passed"):
        torch.testing.assert_close(blk(x), ref(x))
    assert seen == [1]
