"""Whole models: backend="triton" logits (and gradients) equal backend="reference" under the tolerance rule.

CPU: Triton's interpreter, batch 1, two small models. CUDA: all 11 models.
"""

import copy

import pytest
import torch

import crossvit_fast
from crossvit_fast.backend import triton_status
from crossvit_fast.testing import assert_within_rule, fill_like_fixtures_

FUSED_OK, WHY = triton_status()
pytestmark = pytest.mark.skipif(not FUSED_OK, reason=f"fused path cannot run here: {WHY}")


def _models(name, dtype, device, **kw):
    """The reference in float64, the reference in ``dtype``, and the fused model in ``dtype``: same weights."""
    ref = crossvit_fast.create_model(name, backend="reference", **kw).eval()
    fill_like_fixtures_(ref, 0)
    fused = crossvit_fast.create_model(name, backend="triton", **kw).eval()
    fused.load_state_dict(ref.state_dict())
    assert {b for v in fused.backends.values() for b in v} == {"triton"}
    ref_lowp = copy.deepcopy(ref).to(device=device, dtype=dtype)
    return ref.double().to(device), ref_lowp, fused.to(device=device, dtype=dtype)


def _check(name, dtype, device, batch, grad=False, **kw):
    ref64, ref_lowp, fused = _models(name, dtype, device, **kw)
    h, w = fused.img_size
    x64 = torch.randn(batch, 3, h, w, dtype=torch.float64, device=device)
    with torch.no_grad():
        want = ref64(x64)
    with torch.no_grad():
        assert_within_rule(fused(x64.to(dtype)), want, ref_lowp(x64.to(dtype)), what=f"{name} logits")
    if grad:
        gx = x64.to(dtype).requires_grad_()
        fused(gx).float().square().sum().backward()
        x64r = x64.clone().requires_grad_()
        ref64(x64r).square().sum().backward()
        xl = x64.to(dtype).requires_grad_()
        ref_lowp(xl).float().square().sum().backward()
        assert_within_rule(gx.grad, x64r.grad, xl.grad, what=f"{name} input gradient")
        # The parameter gradients as one vector: each op's gradients meet the rule per tensor in the op tests; through
        # a whole network the fused and reference runs round along different paths, and a per-tensor max over ~300
        # tensors compares noise with noise.
        flat = lambda m: torch.cat([p.grad.double().flatten() for _, p in sorted(m.named_parameters())])  # noqa: E731
        assert_within_rule(flat(fused).to(dtype), flat(ref64), flat(ref_lowp).to(dtype), what=f"{name} parameter gradients")


@pytest.mark.slow  # 25-30 s each in the interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests below cover it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["crossvit_tiny_240", "crossvit_9_dagger_240"])
def test_interpreter_small_models_batch_1(name, dtype):
    _check(name, dtype, "cpu", batch=1, grad=True)


HEADLINE = "crossvit_18_dagger_240"  # its cases are in the first-GPU smoke set (-m smoke)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n == HEADLINE else n
                                  for n in crossvit_fast.list_models()])
def test_cuda_all_models(name, dtype):
    _check(name, dtype, "cuda", batch=3, grad=(dtype != torch.float16))
