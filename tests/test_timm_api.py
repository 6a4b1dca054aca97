"""timm's model API on crossvit_fast's models: pretrained cfgs, group_matcher, forward_intermediates / features_only,
create_model's timm keywords, head drop and in_chans adaptation, torch.fx, TorchScript, pretrained=True from a
Hub cache built here (offline).

Tests marked ``needs_timm`` compare with real timm and skip without it; ``needs_hub`` need huggingface_hub.
"""

import functools
import importlib.util
import io
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import crossvit_fast
from crossvit_fast import CheckpointError, create_model
from crossvit_fast.pretrained import PRETRAINED_CFG_KEYS, adapt_input_conv, parse_model_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TIMM = importlib.util.find_spec("timm") is not None
HAS_HUB = importlib.util.find_spec("huggingface_hub") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="needs timm (optional peer)")
needs_hub = pytest.mark.skipif(not HAS_HUB, reason="needs huggingface_hub (optional, pip install huggingface_hub)")

SMALL = "crossvit_tiny_240"
# the 17 keys timm 1.0.31's CrossVit carries, in its order
TIMM_KEYS = ["url", "hf_hub_id", "architecture", "tag", "custom_load", "input_size", "fixed_input_size",
             "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv",
             "classifier", "license"]


def _img(model, b=1):
    return torch.randn(b, model.in_chans, *model.img_size)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- pretrained cfg -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_pretrained_cfg_has_timms_keys(name):
    m = create_model(name, device="meta")
    cfg = m.pretrained_cfg
    assert list(cfg) == TIMM_KEYS
    assert m.default_cfg is cfg
    assert cfg["hf_hub_id"] == f"timm/{name}.in1k" and cfg["architecture"] == name and cfg["tag"] == "in1k"
    assert cfg["input_size"] == (3, *m.img_size) and cfg["fixed_input_size"] is True
    keys = m.state_dict().keys()
    for conv in cfg["first_conv"]:
        assert conv + ".weight" in keys
    for head in cfg["classifier"]:
        assert head + ".weight" in keys
    assert set(PRETRAINED_CFG_KEYS) >= set(cfg)


def test_pretrained_cfg_overlay_and_cfg():
    m = create_model(SMALL, pretrained_cfg_overlay=dict(input_size=(3, 264, 264), crop_pct=1.0))
    assert m.img_size == (264, 264) and m.pretrained_cfg["crop_pct"] == 1.0
    m = create_model(SMALL, pretrained_cfg_overlay=dict(num_classes=7))
    assert m.num_classes == 7 and m.head[0].out_features == 7
    m = create_model(SMALL, pretrained_cfg="in1k")
    assert m.pretrained_cfg["tag"] == "in1k"
    m = create_model(SMALL, pretrained_cfg=dict(input_size=(3, 240, 240), num_classes=5))
    assert m.num_classes == 5 and m.pretrained_cfg["architecture"] == SMALL and "hf_hub_id" not in m.pretrained_cfg
    m = create_model(f"timm/{SMALL}.in1k")
    assert m.model_name == SMALL
    m = create_model(SMALL, pretrained_cfg_overlay=dict(input_size=(3, 240, 240)), img_size=288)
    assert m.img_size == (288, 288) and m.pretrained_cfg["input_size"] == (3, 288, 288)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(pretrained_cfg="in21k"), ValueError, "no pretrained tag 'in21k'"),
        (dict(pretrained_cfg_overlay=dict(img_size=3)), ValueError, r"unknown keys \['img_size'\]"),
        (dict(pretrained_cfg=dict(bogus=1)), ValueError, r"unknown keys \['bogus'\]"),
        (dict(pretrained_cfg_overlay=[1]), TypeError, "must be a dict"),
        (dict(pretrained_cfg_overlay=dict(input_size=(240, 240))), ValueError, "input_size must be"),
        (dict(dtype=torch.int8), ValueError, "floating-point torch.dtype.*int8"),
        (dict(dtype="float17"), ValueError, "float17"),
        (dict(device="gpu:x"), ValueError, "'gpu:x'"),
        (dict(norm_layer=nn.BatchNorm1d), ValueError, "affine torch.nn.LayerNorm"),
        (dict(norm_layer=3), TypeError, "norm_layer must be a callable"),
        (dict(feature_cls="hook", features_only=True), ValueError, "feature_cls='hook'"),
        (dict(out_indices=(1,)), ValueError, "only used with features_only"),
        (dict(features_only=True, out_indices=(6,)), ValueError, "feature index 6 is out of range for 6"),
        (dict(pretrained=3.0), TypeError, "pretrained must be"),
        (dict(device="meta", pretrained="x.pth"), ValueError, "meta"),
    ],
)
def test_create_model_bad_keywords(kwargs, err, match):
    with pytest.raises(err, match=match):
        create_model(SMALL, **kwargs)


def test_model_names():
    assert parse_model_name("crossvit_9_240") == ("crossvit_9_240", None)
    assert parse_model_name("crossvit_9_240.in1k") == ("crossvit_9_240", "in1k")
    assert parse_model_name("timm/crossvit_9_240.in1k") == ("crossvit_9_240", "in1k")
    assert parse_model_name("hf_hub:timm/crossvit_9_240.in1k") == ("crossvit_9_240", "in1k")
    with pytest.raises(ValueError, match="organisation 'ibm'"):
        parse_model_name("ibm/crossvit_9_240")
    with pytest.raises(ValueError, match="unknown pretrained tag 'xyz'"):
        create_model("crossvit_9_240.xyz")


# --- device, dtype, norm_layer, checkpoint_path -------------------------------------------------------------------
def test_device_dtype_meta_norm_layer(tmp_path):
    m = create_model(SMALL, device="meta")
    assert all(p.device.type == "meta" for p in m.parameters())
    m = create_model(SMALL, device="meta", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.is_meta for p in m.parameters())
    m = create_model(SMALL, dtype="float64")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(_img(m).double()).dtype == torch.float64
    m = create_model(SMALL, device="cpu", norm_layer=functools.partial(nn.LayerNorm, eps=1e-5))
    assert {x.eps for x in m.modules() if isinstance(x, nn.LayerNorm)} == {1e-5}
    # checkpoint_path: a strict load after building (timm's load_checkpoint)
    src = create_model(SMALL)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    m = create_model(SMALL, checkpoint_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, m.state_dict()[k])
    with pytest.raises(CheckpointError, match="mis-shaped key head.0.weight"):
        create_model(SMALL, checkpoint_path=str(path), num_classes=3)


# --- head drop, in_chans adaptation, nothing half-loaded ----------------------------------------------------------
def test_pretrained_path_drops_head_with_warning(tmp_path):
    src = create_model(SMALL)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    with pytest.warns(UserWarning, match=r"1000 classes and the model 10: not loading the classifier "
                                         r"\(head.0.weight, head.0.bias, head.1.weight, head.1.bias\)"):
        m = create_model(SMALL, pretrained=str(path), num_classes=10)
    sd = m.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, sd[k]), k
    assert sd["head.0.weight"].shape == (10, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = create_model(SMALL, pretrained=str(path))  # same classes: no warning, everything loaded
    assert torch.equal(m.head[1].weight, src.head[1].weight)
    with pytest.warns(UserWarning, match="the model 0: not loading the classifier"):  # headless, as timm drops it
        m = create_model(SMALL, pretrained=str(path), num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = create_model(SMALL, pretrained=str(path), features_only=True)  # the head is pruned: no warning
    assert torch.equal(f.model.blocks[0].fusion[1].attn.wq.weight, src.blocks[0].fusion[1].attn.wq.weight)
    assert isinstance(m.head[0], nn.Identity)


@pytest.mark.parametrize("name", [SMALL, "crossvit_9_dagger_240"])
@pytest.mark.parametrize("in_chans", [1, 2, 6])
def test_in_chans_adapts_first_convs(tmp_path, name, in_chans):
    """1 channel, or a multiple of 3: a grey image gives what the RGB model gives for it (2: the shapes)."""
    torch.manual_seed(0)
    src = create_model(name).eval()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    m = create_model(name, pretrained=str(path), in_chans=in_chans).eval()
    assert m.pretrained_cfg["input_size"] == (in_chans, 240, 240)
    # a grey image: 1 channel, or the grey repeated over every channel, gives what the RGB model gives for it
    grey = torch.randn(1, 1, 240, 240)
    with torch.no_grad():
        want = src(grey.expand(-1, 3, -1, -1))
        got = m(grey.expand(-1, in_chans, -1, -1))
    if in_chans % 3 == 0 or in_chans == 1:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.shape == want.shape


def test_adapt_input_conv_math_and_errors():
    w = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    w5 = adapt_input_conv(w, 5)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 3 / 5)
    assert adapt_input_conv(w, 3) is w
    with pytest.raises(ValueError, match=r"expected a conv weight \(O, 3, kh, kw\), got shape \(4, 2, 2, 2\)"):
        adapt_input_conv(torch.randn(4, 2, 2, 2), 1)
    with pytest.raises(ValueError, match="in_chans must be a positive int, got 0"):
        adapt_input_conv(w, 0)


def test_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    src = create_model(SMALL).state_dict()
    src["blocks.0.fusion.0.attn.wq.weight"] = torch.zeros(5, 5)
    path = tmp_path / "bad.pth"
    torch.save(src, path)
    m = create_model(SMALL)
    before = _params(m)
    from crossvit_fast.pretrained import load_pretrained

    with pytest.raises(CheckpointError, match="mis-shaped key blocks.0.fusion.0.attn.wq.weight"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_pretrained(m, torch.load(path), m.pretrained_cfg, num_classes=10, in_chans=3)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(CheckpointError, match="mis-shaped"):
        create_model(SMALL, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="no checkpoint file at 'nowhere.pth'"):
        create_model(SMALL, pretrained="nowhere.pth")


# --- group_matcher, forward_intermediates, features_only ----------------------------------------------------------
def test_group_matcher_covers_every_parameter_but_the_head():
    m = create_model(SMALL)
    gm = m.group_matcher()
    assert gm == dict(stem=r"^cls_token|pos_embed|patch_embed",
                      blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])
    groups = {}
    for n, _ in m.named_parameters():
        if re.match(gm["stem"], n):
            groups.setdefault("stem", []).append(n)
        elif re.match(gm["blocks"][0][0], n):
            groups.setdefault(int(re.match(gm["blocks"][0][0], n).group(1)), []).append(n)
        elif re.match(gm["blocks"][1][0], n):
            groups.setdefault("norm", []).append(n)
        else:
            assert n.startswith("head."), n
    assert set(groups) == {"stem", 0, 1, 2, "norm"}


def test_forward_intermediates():
    m = create_model(SMALL).eval()
    x = _img(m, 2)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        feats = m.forward_features(x)
        assert len(inter) == 6 and len(m.feature_info) == 6
        for f, info in zip(inter, m.feature_info):
            assert f.shape[:2] == (2, info["num_chs"])
        assert inter[0].shape[-2:] == (20, 20) and inter[3].shape[-2:] == (14, 14)
        for a, b in zip(final, feats):
            torch.testing.assert_close(a, b)
        # the last feature of each branch is its tokens before the final norm
        last = m.forward_intermediates(x, indices=[2, 5], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(last[0], feats[0][:, 1:])
        torch.testing.assert_close(last[1], feats[1][:, 1:])
        early = m.forward_intermediates(x, indices=[0, 3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])
        torch.testing.assert_close(early[1], inter[3])
        assert len(m.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        m.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="feature index -7 is out of range"):
        m.forward_intermediates(x, indices=[-7])
    with pytest.raises(ValueError, match="last 7 of 6"):
        m.forward_intermediates(x, indices=7)
    with pytest.raises(TypeError, match="indices must hold ints"):
        m.forward_intermediates(x, indices=[1.0])


def test_prune_and_features_only():
    m = create_model(SMALL).eval()
    x = _img(m)
    with torch.no_grad():
        want = m.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    kept = m.prune_intermediate_layers([1, -2])
    assert kept == [1, 4] and len(m.blocks) == 2 and isinstance(m.head[0], nn.Identity)
    with torch.no_grad():
        got = m.forward_intermediates(x, indices=[1, 4], intermediates_only=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    f = create_model(SMALL, features_only=True).eval()
    assert f.feature_info.channels() == [96, 192] and f.feature_info.reduction() == [12, 17]
    assert "num_classes" not in f.pretrained_cfg and f.default_cfg is f.pretrained_cfg
    with torch.no_grad():
        outs = f(x)
    assert [o.shape for o in outs] == [(1, 96, 20, 20), (1, 192, 14, 14)]
    f = create_model(SMALL, features_only=True, out_indices=(0, 3), feature_cls="getter")
    assert len(f.model.blocks) == 1 and f.feature_info.module_name() == ["blocks.0", "blocks.0"]


# --- torch.fx and TorchScript -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", None])
def test_fx_symbolic_trace(backend):
    m = create_model("crossvit_9_dagger_240", backend=backend).eval()
    g = torch.fx.symbolic_trace(m)
    leaves = {getattr(n.target, "__name__", "") for n in g.graph.nodes if n.op == "call_function"}
    assert {"check_image", "scale_image"} <= leaves
    x = _img(m)
    with torch.no_grad():
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="CrossViT built for 240x240 .* got 224x224"):
        g(torch.randn(1, 3, 224, 224))


def test_torchscript():
    m = create_model(SMALL).eval()
    s = torch.jit.script(m)
    x = _img(m)
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))
    buf = io.BytesIO()
    torch.jit.save(s, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(torch.jit.Error, match="3 input channels"):
        s(torch.randn(1, 1, 240, 240))


# --- pretrained=True: the Hub, offline, from a cache built here ---------------------------------------------------
def _run(code, env_extra, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=600)


def _fake_hub_cache(root, repo, filename, state_dict):
    rev = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snap / filename))
    else:
        torch.save(state_dict, snap / filename)


_LOAD = """
import torch, crossvit_fast
ref = torch.load({ref!r})
m = crossvit_fast.create_model({name!r}, pretrained=True, {kwargs})
sd = m.state_dict()
bad = [k for k, v in ref.items() if not k.startswith("head.") and not torch.equal(v, sd[k])]
print("LOADED", len(sd), "BAD", bad, "HEAD", tuple(sd["head.0.weight"].shape))
"""


@needs_hub
@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.safetensors"])
@pytest.mark.parametrize("how", ["cache_dir", "HF_HUB_CACHE"])
def test_pretrained_true_from_offline_hub_cache(tmp_path, filename, how):
    if filename.endswith(".safetensors") and importlib.util.find_spec("safetensors") is None:
        pytest.skip("needs safetensors for a .safetensors cache")
    name = "crossvit_tiny_240"
    src = create_model(name).state_dict()
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, f"timm/{name}.in1k", filename, src)
    torch.save(src, tmp_path / "ref.pth")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    kwargs = "num_classes=10"
    if how == "cache_dir":
        kwargs += f", cache_dir={str(cache)!r}"
    else:
        env["HF_HUB_CACHE"] = str(cache)
    r = _run(_LOAD.format(ref=str(tmp_path / "ref.pth"), name=name, kwargs=kwargs), env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED" in r.stdout and "BAD []" in r.stdout and "HEAD (10, 96)" in r.stdout, r.stdout + r.stderr
    assert "not loading the classifier (head.0.weight" in r.stderr  # the warning names the dropped head


@needs_hub
def test_pretrained_true_offline_without_the_file_says_which_file(tmp_path):
    code = ("import crossvit_fast\n"
            f"crossvit_fast.create_model('crossvit_9_240', pretrained=True, cache_dir={str(tmp_path / 'empty')!r})")
    r = _run(code, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}, tmp_path)
    assert r.returncode != 0
    err = r.stderr
    assert "timm/crossvit_9_240.in1k" in err and "pytorch_model.bin" in err and "HF_HUB_OFFLINE is set" in err
    assert "https://huggingface.co/timm/crossvit_9_240.in1k" in err and "pretrained=PATH" in err


def test_pretrained_true_without_huggingface_hub_says_what_to_install(tmp_path):
    code = ("import sys\n"
            "sys.modules['huggingface_hub'] = None  # as if not installed\n"
            "import crossvit_fast\n"
            "try:\n"
            "    crossvit_fast.create_model('crossvit_9_240', pretrained=True)\n"
            "except ImportError as e:\n"
            "    print('IMPORT-ERROR', e)\n")
    r = _run(code, {}, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IMPORT-ERROR" in r.stdout and "pip install huggingface_hub" in r.stdout
    assert "timm/crossvit_9_240.in1k" in r.stdout


def test_importing_crossvit_fast_imports_no_hub():
    r = subprocess.run([sys.executable, "-c", "import sys, crossvit_fast; crossvit_fast.create_model('crossvit_9_240');"
                        "print(sorted(m for m in ('huggingface_hub', 'safetensors', 'timm') if m in sys.modules))"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# --- against real timm --------------------------------------------------------------------------------------------
@needs_timm
@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_pretrained_cfg_equals_timms(name):
    import timm

    t = timm.create_model(name, pretrained=False, device="meta")
    assert create_model(name, device="meta").pretrained_cfg == t.pretrained_cfg
    assert create_model(name, device="meta").feature_info == t.feature_info


@needs_timm
def test_group_matcher_and_layer_decay_as_timm():
    import timm
    from timm.optim import create_optimizer_v2

    t = timm.create_model(SMALL)
    m = create_model(SMALL)
    assert m.group_matcher() == t.group_matcher() and m.group_matcher(True) == t.group_matcher(True)

    def groups(model):
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
        names = {id(p): n for n, p in model.named_parameters()}
        return sorted((round(g["lr_scale"], 8), g["weight_decay"], tuple(sorted(names[id(p)] for p in g["params"])))
                      for g in opt.param_groups)

    assert groups(m) == groups(t)
    assert len({g[0] for g in groups(m)}) == 5  # stem, 3 blocks, then norm and head: layer decay does something


@needs_timm
@pytest.mark.parametrize("name", [SMALL, "crossvit_9_dagger_240"])
def test_intermediates_and_features_equal_timms(name):
    import timm

    t = timm.create_model(name).eval()
    m = create_model(name).eval()
    m.load_state_dict(t.state_dict())
    x = _img(m)
    with torch.no_grad():
        for kw in (dict(), dict(indices=[0, 4], norm=True, output_fmt="NLC"), dict(indices=2, stop_early=True)):
            a, b = m.forward_intermediates(x, **kw), t.forward_intermediates(x, **kw)
            for u, v in zip(a[0] + a[1], b[0] + b[1]):
                torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
    tf = timm.create_model(name, features_only=True).eval()
    mf = create_model(name, features_only=True).eval()
    assert mf.feature_info.channels() == tf.feature_info.channels()
    assert mf.feature_info.reduction() == tf.feature_info.reduction()
    assert mf.pretrained_cfg == tf.pretrained_cfg and mf.out_indices == list(tf.out_indices)
    mf.load_state_dict(tf.state_dict())
    with torch.no_grad():
        for u, v in zip(mf(x), tf(x)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


@needs_timm
def test_optimized_timm_model_scripts_and_traces():
    import timm
    from timm.models import get_notrace_functions, get_notrace_modules

    t = timm.create_model("crossvit_9_dagger_240").eval()
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        want = t(x)
    crossvit_fast.optimize(t)
    s = torch.jit.script(t)
    with torch.no_grad():
        torch.testing.assert_close(s(x), want, rtol=1e-4, atol=1e-4)
    tracer = torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions()))
    tracer.is_leaf_module = lambda mod, qn: type(mod) in set(get_notrace_modules()) or torch.fx.Tracer.is_leaf_module(
        tracer, mod, qn)
    g = torch.fx.GraphModule(t, tracer.trace(t))
    with torch.no_grad():
        torch.testing.assert_close(g(x), want, rtol=1e-4, atol=1e-4)
    if importlib.util.find_spec("torchvision") is not None:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
        _, nodes = get_graph_node_names(t, tracer_kwargs=kw)
        fe = create_feature_extractor(t, return_nodes=[nodes[-1]], tracer_kwargs=kw)
        with torch.no_grad():
            torch.testing.assert_close(list(fe(x).values())[0], want, rtol=1e-4, atol=1e-4)
