"""CUDA graphs: a captured optimized model (``CUDAGraphRunner``, ``torch.compile(mode="reduce-overhead")``) gives the
logits eager gives, under the tolerance rule against float64; bad use is refused with a clear error."""

import copy

import pytest
import torch

import crossvit_fast
from crossvit_fast.graphs import CUDAGraphRunner, tuned_configs_pinned, warm_up
from crossvit_fast.testing import assert_within_rule, fill_like_fixtures_

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
NAME = "crossvit_9_dagger_240"


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_needs_cuda():
    model = crossvit_fast.create_model("crossvit_tiny_240", backend="reference").eval()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphRunner(model, torch.randn(1, 3, 240, 240))


def test_warm_up_ends_with_the_launches_a_capture_makes():
    """The last warm-up step runs with autotuning off (the tuned configs pinned), as the capture's launches: Triton's
    in-memory kernel cache is keyed by the launch options, so an autotuned launch does not load the kernel that a
    pinned launch uses, and a kernel loaded inside a capture fails it."""
    from crossvit_fast.kernels import linear as kl
    from crossvit_fast.kernels import self_attention as sa
    from crossvit_fast.kernels import tuning

    cpu, before = torch.device("cpu"), (sa.AUTOTUNE, kl.AUTOTUNE)
    seen = []
    warm_up(lambda: seen.append(tuning.is_pinned()), 2)
    assert seen == [False, False, True] and not tuning.is_pinned()
    with tuned_configs_pinned():
        assert not tuning.may_tune(True, cpu)
    assert tuning.may_tune(True, cpu) and not tuning.may_tune(False, cpu)
    with pytest.raises(KeyError):
        with tuned_configs_pinned():
            raise KeyError("restored on errors too")
    assert not tuning.is_pinned() and (sa.AUTOTUNE, kl.AUTOTUNE) == before


def _models(backend="triton"):
    ref = crossvit_fast.create_model(NAME, backend="reference").eval()
    fill_like_fixtures_(ref, 0)
    fused = crossvit_fast.create_model(NAME, backend=backend).eval()
    fused.load_state_dict(ref.state_dict())
    return ref.double().cuda(), copy.deepcopy(ref).float().cuda(), fused.cuda()


def _eager(model, x, autocast_dtype):
    with torch.no_grad(), torch.autocast("cuda", dtype=autocast_dtype or torch.float32,
                                         enabled=autocast_dtype is not None):
        return model(x)


@requires_cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_runner_matches_eager(batch, autocast_dtype):
    ref64, ref, fused = _models()
    x = torch.randn(batch, 3, 240, 240, device="cuda")
    runner = CUDAGraphRunner(fused, x, autocast_dtype=autocast_dtype)
    for trial in range(2):  # the second replay sees new values through the same buffer
        xi = x if trial == 0 else torch.randn_like(x)
        got = runner(xi).clone()
        want64 = _eager(ref64, xi.double(), None)
        assert_within_rule(got, want64, _eager(ref, xi, autocast_dtype), what=f"graph replay {trial}")
        if autocast_dtype is None:  # the same kernels as eager: equal up to the GEMM library's algorithm choice
            torch.testing.assert_close(got, _eager(fused, xi, None), rtol=1e-5, atol=1e-5)


@requires_cuda
def test_reduce_overhead_compile_matches_eager():
    ref64, ref, fused = _models()
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay; pinned: the warm-up loads the kernels the recording launches
        x = torch.randn(8, 3, 240, 240, device="cuda")
        with torch.no_grad(), tuned_configs_pinned():
            got = compiled(x).clone()
    assert_within_rule(got, _eager(ref64, x.double(), None), _eager(ref, x, None), what="reduce-overhead logits")


@requires_cuda
def test_runner_refuses_bad_use():
    _, ref, _ = _models("reference")
    x = torch.randn(2, 3, 240, 240, device="cuda")
    with pytest.raises(ValueError, match="model.eval"):
        CUDAGraphRunner(copy.deepcopy(ref).train(), x)
    with pytest.raises(ValueError, match="CUDA tensor"):
        CUDAGraphRunner(ref, x.cpu())
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphRunner(ref, x, warmup=0)
    runner = CUDAGraphRunner(ref, x)
    with pytest.raises(ValueError, match=r"captured for \(2, 3, 240, 240\)"):
        runner(torch.randn(3, 3, 240, 240, device="cuda"))
    with pytest.raises(ValueError, match="torch.float16"):
        runner(x.half())
