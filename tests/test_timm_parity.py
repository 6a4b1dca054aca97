"""Parity with timm itself (GPU machines, where timm is installed): timm model -> optimize -> same logits/gradients.

timm needs torchvision, which has no CPU build on the CPU machines: there these tests skip, and
tests/test_convert.py converts models laid out as timm's instead.
"""

import copy

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")

import crossvit_fast  # noqa: E402
from crossvit_fast.testing import assert_within_rule, fill_like_fixtures_  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_timm_state_dict_loads_into_crossvit_fast(name):
    t = timm.create_model(name, pretrained=False)
    ours = crossvit_fast.create_model(name)
    ours.load_state_dict(t.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_optimized_timm_matches_timm(name, dtype):
    torch.manual_seed(0)
    t = timm.create_model(name, pretrained=False).eval()
    fill_like_fixtures_(t, 0)
    t64 = copy.deepcopy(t).double().cuda()
    t_lowp = copy.deepcopy(t).to(device="cuda", dtype=dtype)
    fast = crossvit_fast.optimize(copy.deepcopy(t).to(device="cuda", dtype=dtype), backend="triton")
    h, w = t.pretrained_cfg["input_size"][1:]
    x64 = torch.randn(2, 3, h, w, dtype=torch.float64, device="cuda")
    outs = []
    for m, x in ((t64, x64), (t_lowp, x64.to(dtype)), (fast, x64.to(dtype))):
        x = x.clone().requires_grad_()
        y = m(x)
        y.float().square().mean().backward()
        outs.append((y.detach(), x.grad, dict(m.named_parameters())))
    (y64, g64, p64), (yl, gl, pl), (yf, gf, pf) = outs
    assert_within_rule(yf, y64, yl, what=f"{name} logits")
    assert_within_rule(gf, g64, gl, what=f"{name} input gradient")
    for k in p64:
        assert_within_rule(pf[k].grad, p64[k].grad, pl[k].grad, what=f"{name} grad {k}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n == "crossvit_18_dagger_240" else n
                                  for n in crossvit_fast.list_models()])
def test_optimized_timm_matches_timm_under_bf16_autocast(name):
    """How people train and serve: float32 weights, bf16 autocast. timm under the same autocast is the rule's
    low-precision reference; the fused LayerNorm writes the autocast dtype, the attention ops run in it."""
    torch.manual_seed(0)
    t = timm.create_model(name, pretrained=False).eval()
    fill_like_fixtures_(t, 0)
    t64 = copy.deepcopy(t).double().cuda()
    t32 = copy.deepcopy(t).cuda()
    fast = crossvit_fast.optimize(copy.deepcopy(t).cuda(), backend="triton")
    h, w = t.pretrained_cfg["input_size"][1:]
    x64 = torch.randn(2, 3, h, w, dtype=torch.float64, device="cuda")
    outs = []
    for m, x, ac in ((t64, x64, False), (t32, x64.float(), True), (fast, x64.float(), True)):
        x = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ac):
            y = m(x)
        y.float().square().mean().backward()
        outs.append((y.detach(), x.grad))
    (y64, g64), (yl, gl), (yf, gf) = outs
    assert_within_rule(yf, y64, yl, what=f"{name} logits (bf16 autocast)")
    assert_within_rule(gf, g64, gl, what=f"{name} input gradient (bf16 autocast)")
