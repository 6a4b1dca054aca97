"""The family against timm: fixture logits, parameter counts, state_dict keys and shapes, image sizes."""

import copy
import json
import os
import re

import pytest
import torch

import crossvit_fast
from crossvit_fast.testing import fill_like_fixtures_, fixture_input

from conftest import DATA_DIR

with open(os.path.join(DATA_DIR, "timm_crossvit_manifest.json")) as f:
    MANIFEST = json.load(f)["models"]
with open(os.path.join(DATA_DIR, "timm_crossvit_logits.json")) as f:
    CASES = json.load(f)["cases"]


def _meta_model(name, **kw):
    with torch.device("meta"):
        return crossvit_fast.create_model(name, backend="reference", **kw)


def test_family_is_the_manifest():
    assert sorted(crossvit_fast.list_models()) == sorted(MANIFEST)
    assert len(crossvit_fast.list_models(include_aliases=True)) == 22


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_params_keys_shapes_equal_timm(name):
    model = _meta_model(name)
    expected = MANIFEST[name]
    assert sum(p.numel() for p in model.parameters()) == expected["num_params"]
    sd = model.state_dict()
    assert set(sd) == set(expected["state_dict"])
    for k, shape in expected["state_dict"].items():
        assert list(sd[k].shape) == shape, k
    assert tuple(model.pretrained_cfg["input_size"]) == tuple(expected["input_size"])
    assert model.pretrained_cfg["crop_pct"] == expected["crop_pct"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_ibm_alias_builds_the_same_model(name):
    ibm = crossvit_fast.model_config(name)["ibm_name"]
    assert crossvit_fast.model_config(ibm)["name"] == name
    a, b = _meta_model(name).state_dict(), _meta_model(ibm).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="crossvit_9_240"):
        crossvit_fast.create_model("crossvit_99_240")


def _fixture_model(case):
    model = crossvit_fast.create_model(case["model"], backend="reference").eval()
    return fill_like_fixtures_(model, case["seed"])  # filled in float32, as the fixtures were


@pytest.mark.parametrize("case", CASES, ids=[c["model"] for c in CASES])
def test_logits_equal_timm(case):
    model = _fixture_model(case)
    x = fixture_input(case["seed"], case["batch"], case["input_hw"])
    with torch.no_grad():
        out64 = model.double()(x)
        out32 = model.float()(x.float())
    ref64 = torch.tensor(case["logits_float64"], dtype=torch.float64)
    ref32 = torch.tensor(case["logits_float32"], dtype=torch.float64)
    assert out64.shape == ref64.shape
    assert (out64 - ref64).abs().max().item() <= 1e-9
    assert (out32.double() - ref32).abs().max().item() <= 1e-4


def test_non_square_sizes_build_and_run():
    # timm computes H // p * W // p = ((H // p) * W) // p and fails to build these
    for name, size, grids in [
        ("crossvit_9_240", (240, 336), [(20, 28), (14, 19)]),
        ("crossvit_9_dagger_240", (240, 336), [(20, 28), (14, 20)]),
        ("crossvit_tiny_240", (252, 252), [(21, 21), (14, 14)]),
    ]:
        model = crossvit_fast.create_model(name, img_size=size, num_classes=7).eval()
        assert model.patch_grids == grids
        with torch.no_grad():
            out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_patch_grid_matches_the_convolutions():
    for name in ("crossvit_9_240", "crossvit_9_dagger_240"):
        for size in [(240, 336), (96, 160), (408, 408)]:
            model = crossvit_fast.create_model(name, img_size=size, backend="reference")
            for i, pe in enumerate(model.patch_embed):
                h, w = model.img_size_scaled[i]
                with torch.no_grad():
                    tokens = pe(torch.randn(1, 3, h, w))
                assert tokens.shape[1] == pe.num_patches == getattr(model, f"pos_embed_{i}").shape[1] - 1


def test_wrong_size_input_names_both_sizes():
    model = crossvit_fast.create_model("crossvit_tiny_240").eval()
    with pytest.raises(ValueError, match=r"240x240.*224x224"):
        model(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 240, 240))


def test_features_and_heads():
    model = crossvit_fast.create_model("crossvit_tiny_240", num_classes=0).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 240, 240))
    assert feats.shape == (2, 96 + 192)
    model.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 240, 240)).shape == (1, 5)


class _CountCat(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.cats = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.cat:
            self.cats += 1
        return func(*args, **(kwargs or {}))


def test_multiscale_inference_writes_cls_in_place():
    """Without autograd the multi-scale block writes each branch's new CLS into the blocks' output instead of
    concatenating: the same logits, two torch.cat fewer per multi-scale block; with autograd it concatenates."""
    m = crossvit_fast.create_model("crossvit_tiny_240", backend="reference").eval()
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad(), _CountCat() as no_grad_count:
        a = m(x)
    with _CountCat() as grad_count:
        b = m(x)
    assert torch.equal(a, b)
    assert grad_count.cats - no_grad_count.cats == 2 * len(m.blocks)
    b.sum().backward()  # the concatenating path keeps autograd intact
    frozen = copy.deepcopy(m).requires_grad_(False)
    with torch.no_grad():
        c_ref = frozen(x)
    with _CountCat() as frozen_count:
        c = frozen(x)  # grad mode on, but nothing requires grad: in place
    assert torch.equal(c, c_ref) and frozen_count.cats == no_grad_count.cats


@pytest.mark.parametrize(
    "spelling", ["crossvit_9_240.in1k", "timm/crossvit_9_240.in1k", "hf_hub:timm/crossvit_9_240",
                 "hf-hub:timm/crossvit_9_240.in1k", "timm/crossvit_9_224"]
)
def test_timm_name_spellings_map_to_the_model(spelling):
    assert crossvit_fast.models.parse_model_name(spelling)[0] == "crossvit_9_240"
    assert crossvit_fast.model_config(spelling)["name"] == "crossvit_9_240"


@pytest.mark.parametrize(
    "name, hint",
    [("crossvit_9_240.garbage", "did you mean 'crossvit_9_240.in1k'"), ("crossvit_9_240.in1", "did you mean 'in1k'"),
     ("crossvit_9_24", "did you mean 'crossvit_9_240'"), ("hf_hub:someone/crossvit_9_240", "timm's CrossViT")],
)
def test_garbage_names_are_refused_with_a_hint(name, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        crossvit_fast.create_model(name)


def test_wrong_input_dtype_is_named():
    model = crossvit_fast.create_model("crossvit_tiny_240", backend="reference").eval()
    with pytest.raises(ValueError, match=r"floating-point image.*torch.uint8.*x.float\(\)"):
        model(torch.zeros(1, 3, 240, 240, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weights are torch.float32 and the input is torch.float64.*x.to"):
        model(torch.zeros(1, 3, 240, 240, dtype=torch.float64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast takes float32 into bf16
        assert model(torch.zeros(1, 3, 240, 240)).dtype == torch.bfloat16


def test_backends_print_as_a_count_per_op():
    model = crossvit_fast.create_model("crossvit_9_240", backend="reference")
    b = model.backends
    assert b["self_attention"] == ["reference"] * 12  # still a dict of lists
    assert repr(b) == ("{layer_norm: 12 x reference; linear: 12 x reference; self_attention: 12 x reference; "
                       "cls_cross_attention: 6 x reference}")
    assert b.summary()["cls_cross_attention"] == {"reference": 6}


def test_registry_tables_are_the_ones_reexported():
    from crossvit_fast import model_registry as reg
    from crossvit_fast import models, pretrained

    for name in ("MODEL_CONFIGS", "MODEL_GMACS", "ALIASES", "TAGS", "parse_model_name", "model_config", "list_models"):
        assert getattr(models, name) is getattr(reg, name), name
    assert pretrained.PRETRAINED_TAGS is reg.TAGS and pretrained.parse_model_name is reg.parse_model_name
    assert crossvit_fast.ALIASES is reg.ALIASES and crossvit_fast.list_models is reg.list_models


def _package_imports():
    """Module -> the crossvit_fast modules it imports anywhere (functions included), by the source's import lines."""
    import ast
    import pathlib

    root = pathlib.Path(crossvit_fast.__file__).parent
    mods = {p.stem: p for p in root.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "crossvit_fast":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crossvit_fast."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("crossvit_fast."))
        graph[name] = sorted((deps & set(mods)) - {name})
    return graph


def test_model_modules_import_no_cycle():
    graph = _package_imports()
    assert graph["model_registry"] == []
    state = {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for dep in graph[name]:
            visit(dep, path + [name])
        state[name] = "done"

    for name in ("model_registry", "checkpoint", "pretrained", "models", "convert", "flops"):
        visit(name, [])
