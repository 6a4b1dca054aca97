"""State-dict round trips (timm and IBM formats), position-embedding resampling, load errors."""

import pytest
import torch

import crossvit_fast
from crossvit_fast.checkpoint import CheckpointError, resample_pos_embed, to_ibm_keys


def _model(name="crossvit_tiny_240", **kw):
    torch.manual_seed(1)
    return crossvit_fast.create_model(name, backend="reference", **kw).eval()


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["timm-dict", "timm-file", "ibm-file", "ibm-wrapped", "ddp-prefix"])
def test_round_trip(tmp_path, fmt):
    src = _model("crossvit_9_dagger_240")
    dst = crossvit_fast.create_model("crossvit_9_dagger_240", backend="reference").eval()
    sd = src.state_dict()
    if fmt == "timm-dict":
        ckpt = sd
    elif fmt == "ddp-prefix":
        ckpt = {"module." + k: v for k, v in sd.items()}
    else:
        obj = {"timm-file": sd, "ibm-file": to_ibm_keys(sd), "ibm-wrapped": {"model": to_ibm_keys(sd), "epoch": 299}}[fmt]
        ckpt = tmp_path / "ckpt.pth"
        torch.save(obj, ckpt)
    if fmt == "ibm-file":
        assert "pos_embed.0" in to_ibm_keys(sd) and "pos_embed_0" not in to_ibm_keys(sd)
    res = crossvit_fast.load_checkpoint(dst, ckpt)
    assert not (res.missing_keys or res.unexpected_keys or res.mismatched_keys or res.resampled_keys)
    _same_state(src, dst)
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_timm_state_dict_loads_strict():
    src, dst = _model(), crossvit_fast.create_model("crossvit_tiny_240")
    dst.load_state_dict(src.state_dict(), strict=True)
    _same_state(src, dst)


def test_pickled_args_need_weights_only_false(tmp_path):
    import argparse

    src = _model()
    path = tmp_path / "ibm.pth"
    torch.save({"model": to_ibm_keys(src.state_dict()), "args": argparse.Namespace(lr=1e-3)}, path)
    dst = crossvit_fast.create_model("crossvit_tiny_240")
    with pytest.raises(CheckpointError, match="weights_only=False"):
        crossvit_fast.load_checkpoint(dst, path)
    crossvit_fast.load_checkpoint(dst, path, weights_only=False)
    _same_state(src, dst)


def test_resampling_pos_embed_to_another_size():
    src = _model("crossvit_9_240")  # grids 20x20 and 14x14
    dst = crossvit_fast.create_model("crossvit_9_240", img_size=(384, 336))  # grids 32x28, 22x19
    res = crossvit_fast.load_checkpoint(dst, src.state_dict())
    assert res.resampled_keys == ["pos_embed_0", "pos_embed_1"]
    assert dst.pos_embed_0.shape == (1, 1 + 32 * 28, 128) and dst.pos_embed_1.shape == (1, 1 + 22 * 19, 256)
    assert torch.equal(dst.pos_embed_0[:, 0], src.pos_embed_0[:, 0])  # CLS position kept
    with torch.no_grad():
        assert torch.isfinite(dst(torch.randn(1, 3, 384, 336))).all()


def test_resample_pos_embed_is_bicubic_and_identity_at_same_size():
    pe = torch.randn(1, 1 + 6 * 6, 8, dtype=torch.float64)
    assert resample_pos_embed(pe, (6, 6)) is pe
    out = resample_pos_embed(pe, (9, 12))
    grid = pe[:, 1:].reshape(1, 6, 6, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(9, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 108, 8))
    # a linear ramp is reproduced exactly in the interior by bicubic interpolation: sanity of orientation
    ramp = torch.arange(6, dtype=torch.float64).repeat(6).reshape(1, 36, 1)  # value = column index
    r = resample_pos_embed(torch.cat((torch.zeros(1, 1, 1, dtype=torch.float64), ramp), 1), (6, 12))
    cols = r[0, 1:, 0].reshape(6, 12)
    assert torch.allclose(cols[0], cols[5])  # constant along rows
    assert (cols[0, 1:] >= cols[0, :-1] - 1e-12).all()  # increasing along columns
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4))
    assert resample_pos_embed(torch.randn(1, 1 + 12, 4), (4, 4), old_grid=(3, 4)).shape == (1, 17, 4)


def test_mismatch_names_every_key():
    src = _model("crossvit_tiny_240").state_dict()
    src.pop("head.0.bias")
    src["extra.weight"] = torch.zeros(3)
    dst = crossvit_fast.create_model("crossvit_tiny_240", num_classes=10)
    with pytest.raises(CheckpointError) as e:
        crossvit_fast.load_checkpoint(dst, src)
    msg = str(e.value)
    assert "missing keys (1): head.0.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "mis-shaped key head.0.weight: checkpoint (1000, 96), model (10, 96)" in msg
    assert "head.1.bias" in msg
    res = crossvit_fast.load_checkpoint(dst, src, strict=False)
    assert res.missing_keys == ["head.0.bias"] and res.unexpected_keys == ["extra.weight"]
    assert {k for k, _, _ in res.mismatched_keys} == {"head.0.weight", "head.1.weight", "head.1.bias"}
    assert torch.equal(dst.norm[0].weight, src["norm.0.weight"])


def test_wrong_model_and_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="mis-shaped"):
        crossvit_fast.load_checkpoint(crossvit_fast.create_model("crossvit_small_240"), _model().state_dict())
    with pytest.raises(CheckpointError, match="wrapper keys"):
        crossvit_fast.load_checkpoint(_model(), {"optimizer": {"lr": 1}})


def test_create_model_pretrained_path(tmp_path):
    src = _model()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    _same_state(src, crossvit_fast.create_model("crossvit_tiny_224", pretrained=str(path)))
    # pretrained=True fetches timm's weights from the Hub: tests/test_timm_api.py (offline, against a built cache)


def test_create_model_passes_weights_only_and_strict(tmp_path):
    import argparse

    src = _model()
    path = tmp_path / "ibm.pth"
    torch.save({"model": to_ibm_keys(src.state_dict()), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        crossvit_fast.create_model("crossvit_tiny_240", pretrained=str(path))
    _same_state(src, crossvit_fast.create_model("crossvit_tiny_240", pretrained=str(path), weights_only=False))

    # a 1000-class checkpoint into a 10-class model: load_checkpoint's error leads with the head and the way out;
    # create_model drops the head with a warning naming it, as timm does
    ten = crossvit_fast.create_model("crossvit_tiny_240", num_classes=10)
    with pytest.raises(CheckpointError) as e:
        crossvit_fast.load_checkpoint(ten, str(path), weights_only=False)
    first = str(e.value).splitlines()[0]
    assert "only the classifier head differs" in first and "1000 classes" in first and "strict=False" in first
    with pytest.warns(UserWarning, match="not loading the classifier"):
        m = crossvit_fast.create_model("crossvit_tiny_240", pretrained=str(path), weights_only=False, num_classes=10)
    assert m.head[0].weight.shape == (10, 96) and torch.equal(m.norm[0].weight, src.norm[0].weight)


def test_another_models_checkpoint_is_summarised_in_one_line():
    src = crossvit_fast.create_model("crossvit_15_240", backend="reference").state_dict()
    with pytest.raises(CheckpointError) as e:
        crossvit_fast.load_checkpoint(crossvit_fast.create_model("crossvit_9_240", backend="reference"), src)
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert "looks like crossvit_15_240" in first and "widths 192, 384" in first and "no dagger" in first
    assert "5 L blocks" in first and "create_model('crossvit_15_240')" in first
    assert len(msg) < 3000 and len(msg.splitlines()) <= 14, (len(msg), len(msg.splitlines()))
    assert "and 256 more mis-shaped keys" in msg
    assert len(e.value.result.mismatched_keys) == 266  # all of them, for code
    dagger = crossvit_fast.create_model("crossvit_18_dagger_408", backend="reference").state_dict()
    with pytest.raises(CheckpointError, match=r"looks like crossvit_18_dagger_408 \(widths 224, 448; 6 L .*; dagger"):
        crossvit_fast.load_checkpoint(crossvit_fast.create_model("crossvit_9_240", backend="reference"), dagger)
