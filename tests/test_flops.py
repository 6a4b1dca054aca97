"""fvcore FLOP counts equal the spec's (fvcore with explicit attention) within 1% for all 11 models."""

import pytest
import torch

pytest.importorskip("fvcore")

import crossvit_fast  # noqa: E402

SPEC_GMACS = {
    "crossvit_tiny_240": 1.57, "crossvit_small_240": 5.63, "crossvit_base_240": 21.22,
    "crossvit_9_240": 1.85, "crossvit_15_240": 5.81, "crossvit_18_240": 9.05,
    "crossvit_9_dagger_240": 1.99, "crossvit_15_dagger_240": 6.13, "crossvit_18_dagger_240": 9.50,
    "crossvit_15_dagger_408": 21.45, "crossvit_18_dagger_408": 32.47,
}


@pytest.mark.parametrize("name", sorted(SPEC_GMACS))
def test_flops_equal_the_spec(name):
    model = crossvit_fast.create_model(name).eval()
    total = crossvit_fast.flops(model).total() / 1e9
    assert abs(total - SPEC_GMACS[name]) / SPEC_GMACS[name] < 0.01, total


def test_sdpa_is_counted_like_explicit_attention():
    class Explicit(torch.nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    class Fused(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    from fvcore.nn import FlopCountAnalysis

    from crossvit_fast.flops import OP_HANDLES

    args = (torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 5))
    want = FlopCountAnalysis(Explicit(), args).total()
    got = FlopCountAnalysis(Fused(), args).set_op_handle(**OP_HANDLES).total()
    assert got == want == 2 * 3 * 7 * 11 * (8 + 5)


def test_input_size_override():
    model = crossvit_fast.create_model("crossvit_tiny_240", img_size=(240, 336)).eval()
    assert crossvit_fast.flops(model).total() > crossvit_fast.flops(crossvit_fast.create_model("crossvit_tiny_240")).total()
    with pytest.raises(ValueError, match="input_size"):
        crossvit_fast.flops(model, input_size=(1, 2, 3, 4))


def test_fused_ops_are_counted_like_the_reference():
    from crossvit_fast.backend import triton_status

    ok, why = triton_status()
    if not ok:
        pytest.skip(f"fused path cannot run here: {why}")
    ref = crossvit_fast.create_model("crossvit_tiny_240", backend="reference").eval()
    fused = crossvit_fast.create_model("crossvit_tiny_240", backend="triton").eval()
    a, b = crossvit_fast.flops(ref), crossvit_fast.flops(fused)
    assert {"cls_cross_attention", "block_half"} <= set(b.by_operator())  # self-attention inside block_half
    assert a.total() == b.total()


def test_the_cli_table_uses_these_counts():
    from crossvit_fast.models import MODEL_GMACS

    assert MODEL_GMACS == SPEC_GMACS
