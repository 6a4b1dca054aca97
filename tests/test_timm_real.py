"""Against timm itself, on the CPU: the README's second CI stage (an environment with torch 2.14.1, torchvision 0.29.1
and timm) runs these; without timm they skip.

* parity: every crossvit_fast model, default backend and "reference", against timm's model with the same weights, in
  float64 on fresh seeds at batch 2;
* ``optimize`` on real timm models, every model: "reference" and the default backend ("auto": on a CPU, what timm
  runs), logits and every gradient in float64 against the untouched timm model;
* ``optimize(backend="triton")`` in Triton's CPU interpreter on two small shrunk timm models, logits and every
  gradient, under the tolerance rule (timm in float32 is the low-precision reference);
* ``revert`` round trips: the same state_dict tensors, timm's own module objects back, every train/eval flag kept;
* the torch path (what ``"auto"`` runs where no kernel is fused) dispatches no aten op more often than timm does.

The weights are drawn by the fixtures' rule (``fill_like_fixtures_``) with seeds other than the fixtures' own (0), so
this checks timm's computation live, not a recording. ``CROSSVIT_FAST_TEST_SEED`` moves every seed.
"""

import copy

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (the README's ci:test-timm stage installs it)")

import crossvit_fast  # noqa: E402
from crossvit_fast.testing import assert_within_rule, fill_like_fixtures_  # noqa: E402
from conftest import SEED, DispatchLog  # noqa: E402

MODELS = crossvit_fast.list_models()
BASE_SEED = 1100 + SEED
SMALL = ["crossvit_tiny_240", "crossvit_9_dagger_240"]
# Shrunk for the interpreter: 120x120 images (10x10 and 7x7 patch grids, with and without the dagger convolutions)
# and two multi-scale blocks of one block per branch.
SHRUNK = dict(img_size=120, depth=((1, 1, 0), (1, 1, 0)))


def _seed(name: str) -> int:
    return BASE_SEED + MODELS.index(name)


def _timm(name: str, seed: int, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    t = timm.create_model(name, pretrained=False, **kw)
    return fill_like_fixtures_(t, seed)


def _input(model, seed: int, batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    h, w = model.pretrained_cfg["input_size"][1:] if not hasattr(model, "img_size") else model.img_size
    return torch.randn(batch, 3, h, w, generator=g, dtype=dtype)


def _run(model, x, grad: bool):
    """Logits, and with ``grad`` the input's and every parameter's gradient of a fixed scalar of them."""
    if not grad:
        with torch.no_grad():
            return model(x), None
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    w = torch.linspace(-1.0, 1.0, y.shape[-1], dtype=y.dtype)
    (y * w).square().sum().backward()
    grads = {"input": x.grad}
    grads.update({k: p.grad for k, p in model.named_parameters()})
    return y.detach(), grads


def _close64(got, want, what):
    scale = max(1.0, float(want.abs().max()))
    err = float((got.double() - want.double()).abs().max())
    assert err <= 1e-10 * scale, f"{what}: max abs error {err:.3e} against timm in float64 (max |timm| {scale:.3g})"


@pytest.fixture(scope="module", params=MODELS)
def timm64(request):
    """(name, seed, timm model in float64 eval mode, input, timm's logits and gradients)."""
    name = request.param
    seed = _seed(name)
    t = _timm(name, seed).double().eval()
    x = _input(t, seed)
    y, grads = _run(t, x, grad=True)
    return name, seed, t, x, y, grads


def test_parity_with_timm(timm64):
    """crossvit_fast's own model with timm's weights computes timm's logits: default backend and "reference"."""
    name, seed, t, x, want, _ = timm64
    for backend in (None, "reference"):
        ours = crossvit_fast.create_model(name, **({} if backend is None else {"backend": backend}))
        ours.load_state_dict(t.state_dict(), strict=True)
        got, _ = _run(ours.double().eval(), x, grad=False)
        _close64(got, want, f"{name} (seed {seed}, backend {backend or 'default'}) logits")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_optimize_real_timm_logits_and_every_gradient(timm64, backend):
    name, seed, t, x, want, want_grads = timm64
    fast = copy.deepcopy(t)
    out = crossvit_fast.optimize(fast, backend=backend)
    assert out is fast
    kinds = {type(m).__module__ for m in fast.modules()}
    assert "crossvit_fast.layers" in kinds
    expect = {"reference"} if backend == "reference" else ({"torch"} if not torch.cuda.is_available() else None)
    if expect is not None:
        assert {b for per in fast.crossvit_fast_ops.values() for b in per} == expect
    got, grads = _run(fast, x, grad=True)
    what = f"optimized {name} (seed {seed}, backend {backend})"
    _close64(got, want, f"{what} logits")
    assert set(grads) == set(want_grads)
    for k in want_grads:
        _close64(grads[k], want_grads[k], f"{what} gradient of {k}")


def test_revert_round_trip(timm64):
    name, seed, t, x, want, _ = timm64
    model = copy.deepcopy(t)
    before = dict(model.named_modules())
    state = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in state.items()}
    # a mixed mode: the model in training, a frozen first stage, one branch block in eval
    model.train()
    model.blocks[0].eval()
    model.blocks[1].blocks[1][0].eval()
    modes = {n: m.training for n, m in model.named_modules()}

    crossvit_fast.optimize(model, backend="auto")
    assert any(type(m).__module__ == "crossvit_fast.layers" for m in model.modules())
    assert {n: m.training for n, m in model.named_modules() if n in modes} == {
        n: modes[n] for n, m in model.named_modules() if n in modes}
    assert not any(m.training for n, m in model.named_modules() if n.startswith("blocks.0"))

    crossvit_fast.revert(model)
    after = dict(model.named_modules())
    assert list(after) == list(before)
    assert all(after[n] is before[n] for n in before), "revert did not bring timm's own module objects back"
    assert {n: m.training for n, m in after.items()} == modes
    state2 = model.state_dict()
    assert list(state2) == list(state)
    assert all(state2[k].data_ptr() == ptrs[k] and torch.equal(state2[k], state[k]) for k in state)
    assert not hasattr(model, "crossvit_fast_ops") and not hasattr(model, "_crossvit_fast_swaps")

    # train -> optimize -> eval -> revert: all of timm's modules are in eval mode, and compute timm's logits exactly
    model.train()
    crossvit_fast.optimize(model)
    model.eval()
    crossvit_fast.revert(model)
    assert not any(m.training for m in model.modules())
    if name in SMALL:
        got, _ = _run(model, x, grad=False)
        assert torch.equal(got, want)


def test_optimize_keeps_eval_with_attention_dropout():
    """A model in eval with attention dropout stays deterministic through optimize (the swapped-in modules take
    its mode)."""
    name = "crossvit_tiny_240"
    t = timm.create_model(name, pretrained=False, attn_drop_rate=0.1, drop_rate=0.1, **SHRUNK).eval()
    crossvit_fast.optimize(t)
    assert not any(m.training for m in t.modules())
    x = torch.randn(2, 3, 120, 120)
    with torch.no_grad():
        assert torch.equal(t(x), t(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_timm_parity.py runs the fused path on CUDA")
@pytest.mark.parametrize("name", SMALL)
def test_optimize_real_timm_to_triton_in_the_interpreter(name, monkeypatch):
    from crossvit_fast.backend import triton_status

    ok, why = triton_status(allow_interpreter=True)
    if not ok:
        pytest.skip(f"the fused path cannot run here: {why}")
    seed = _seed(name)
    t32 = _timm(name, seed, **SHRUNK).eval()
    t64 = copy.deepcopy(t32).double()
    fast = crossvit_fast.optimize(copy.deepcopy(t32), backend="triton")
    assert {b for per in fast.crossvit_fast_ops.values() for b in per} == {"triton"}
    x64 = _input(t64, seed, batch=2)
    y64, g64 = _run(t64, x64, grad=True)
    y32, g32 = _run(t32, x64.float(), grad=True)
    yf, gf = _run(fast, x64.float(), grad=True)
    what = f"{name} shrunk (seed {seed}), triton in the interpreter"
    assert_within_rule(yf, y64, y32, what=f"{what}: logits")
    assert set(gf) == set(g64)
    for k in g64:
        assert_within_rule(gf[k], g64[k], g32[k], what=f"{what}: gradient of {k}")


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "train"])
def test_torch_path_runs_no_op_timm_does_not(train, autocast):
    """What "auto" gives where no fused kernel runs (a CPU, a GPU not yet verified) is never more work than timm:
    every aten op the optimized model dispatches, forward and backward, at most as often as in timm's model. The
    one it runs more, ``copy_``, writes the fused CLS into the token tensor in place of a ``cat``; the GEMMs,
    attention, LayerNorm and GELU are the same calls."""
    name = "crossvit_9_dagger_240"
    t = _timm(name, _seed(name), **SHRUNK)
    fast = crossvit_fast.optimize(copy.deepcopy(t), backend="torch")  # what "auto" falls back to
    assert {b for per in fast.crossvit_fast_ops.values() for b in per} == {"torch"}
    x = torch.randn(2, 3, 120, 120)
    counts = []
    for m in (t, fast):
        m.train(train)
        torch.manual_seed(0)
        with DispatchLog() as log, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if train:
                m(x).float().square().mean().backward()
            else:
                with torch.no_grad():
                    m(x)
        counts.append(log.counts())
    ct, cf = counts
    more = {k: (ct.get(k, 0), n) for k, n in cf.items() if n > ct.get(k, 0) and k != "aten.copy_"}
    assert not more, f"ops the optimized model runs more often than timm (timm, optimized): {more}"
    assert cf.get("aten.copy_", 0) - ct.get("aten.copy_", 0) <= ct.get("aten.cat", 0) - cf.get("aten.cat", 0)
    heavy = [k for k in ct if any(s in k for s in ("mm", "scaled_dot_product", "layer_norm", "gelu", "conv"))]
    assert heavy and all(cf.get(k, 0) == ct[k] for k in heavy), {k: (ct[k], cf.get(k, 0)) for k in heavy}
