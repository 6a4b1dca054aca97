"""crossvit_fast.verify and this machine's record: Triton's CPU interpreter stands in for the GPU (tiny shapes,
float32), through ``crossvit_fast.device.INTERPRETER_ARCH``."""

import json
import os
import subprocess
import sys

import pytest
import torch

import crossvit_fast.backend as B
import crossvit_fast.device as D
from crossvit_fast import record
from crossvit_fast.cli import main
from crossvit_fast.layers import Attention, Block, CrossAttentionBlock
from crossvit_fast.verify import Branch, Case, VerifyUnavailableError, branches, cases, verify

ARCH = "interp"
TINY = [Branch(32, 2, 5)]


def _fixed(fused_ms=1.0, torch_ms=1.0):
    return lambda fn, timing: fused_ms if timing.backend == "triton" else torch_ms


@pytest.fixture
def device(monkeypatch, tmp_path):
    """The interpreter as a device of architecture ``interp``, with an empty cache directory."""
    if not B.interpreter_enabled():
        pytest.skip("the interpreter stands in for the GPU")
    monkeypatch.setattr(D, "INTERPRETER_ARCH", ARCH)
    monkeypatch.setattr(D, "_warned", set())
    monkeypatch.setenv("CROSSVIT_FAST_CACHE_DIR", str(tmp_path / "cache"))
    record.forget()
    yield tmp_path / "cache"
    record.forget()


def _entry(op="self_attention", dims=None, dtype="float32", verdict="verified"):
    dims = dims or {"head_dim": 16}
    return {"class": record.class_name(op, dtype, dims), "op": op, "dtype": dtype, "dims": dims, "verdict": verdict,
            "err_ratio": 0.1, "worst": "output", "tokens": [5], "fused_ms": {}, "torch_ms": {}, "case": ""}


def test_shapes_come_from_the_model_configs():
    assert branches("crossvit_18_dagger_240") == [Branch(224, 7, 401, 3.0), Branch(448, 7, 197, 3.0)]
    cs = cases(["crossvit_18_dagger_240"], ["float32"])
    assert Case("cls_cross_attention", "float32", 448, 7, 196, 3.0) in cs
    assert {c.shape_class for c in cs if c.op == "self_attention"} == {
        "self_attention[float32, head_dim=32]", "self_attention[float32, head_dim=64]"}
    with pytest.raises(ValueError, match="not a CrossViT"):
        branches(torch.nn.Linear(2, 2))


def test_the_whole_flow_writes_a_record_that_auto_honours(device, capsys):
    assert B.resolve_backend("auto", op="self_attention", dims={"head_dim": 16}) == "torch"
    report = verify([TINY], device="cpu", dtypes=["float32"], timer=_fixed(1.0, 2.0), seed=0)
    assert [c["verdict"] for c in report.classes] == ["verified"] * 4, report.table()
    assert report.exit_code == 0 and report.path == record.record_path(ARCH)
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # a progress line per case
    data = json.load(open(report.path))
    assert data["format"] == 1 and data["key"] == record.system_key(ARCH)
    attn = Attention(32, 2, qkv_bias=True)
    assert attn.backend == "triton"
    assert "local record" in B.authority("self_attention", ARCH, {"head_dim": 16}, "float32")
    assert Block(32, 2).backends == {"layer_norm": "triton", "linear": "triton"}
    assert CrossAttentionBlock(32, 2).backend == "triton"
    assert Attention(64, 2).backend == "torch"  # head_dim 32: a shape class not verified
    assert attn._fused_call("self_attention", torch.randn(2, 5, 96))
    with pytest.warns(RuntimeWarning, match=r"record verified self_attention\[float16, head_dim=16\]"):
        assert not attn._fused_call("self_attention", torch.randn(2, 5, 96, dtype=torch.float16))
    authorities = B.op_authorities(torch.nn.Sequential(attn, Attention(64, 2)))
    assert list(authorities["self_attention"].values()) == [1, 1]


def test_a_wrong_kernel_fails_and_auto_stays_on_torch(device, monkeypatch):
    import crossvit_fast.ops.self_attention as op

    real = op.self_attention
    monkeypatch.setattr(op, "self_attention", lambda *a, **k: real(*a, **k) + 1e-3 * torch.randn(1))
    report = verify([TINY], device="cpu", dtypes=["float32"], ops=["self_attention"], timer=_fixed(), seed=0,
                    progress=None)
    (entry,) = report.classes
    assert entry["verdict"] == "failed" and entry["err_ratio"] > 1 and "C=32 heads=2 N=5" in entry["case"]
    assert report.exit_code == 1 and "failed" in report.table()
    assert Attention(32, 2).backend == "torch"


def test_a_slower_kernel_stays_on_torch(device):
    report = verify([TINY], device="cpu", dtypes=["float32"], ops=["layer_norm"], timer=_fixed(2.0, 1.0), seed=0,
                    progress=None)
    assert [c["verdict"] for c in report.classes] == ["slower"] and report.exit_code == 0
    assert Block(32, 2).backends == {"layer_norm": "torch", "linear": "torch"}


@pytest.mark.parametrize("field", ["triton", "torch", "kernel_sources", "gpu"])
def test_a_record_of_another_system_is_ignored(device, field, capsys):
    record.save(ARCH, [_entry()], ["tiny"])
    assert B.verified_on("self_attention", ARCH, {"head_dim": 16}, "float32")
    path = record.record_path(ARCH)
    data = json.load(open(path))
    data["key"][field] = "something else"
    json.dump(data, open(path, "w"))
    record.forget()
    assert not B.verified_on("self_attention", ARCH, {"head_dim": 16})
    assert Attention(32, 2).backend == "torch"
    assert main(["info"]) == 0
    assert f"made on another system: {field} 'something else'" in capsys.readouterr().out


def test_a_changed_kernel_source_invalidates_the_record(device, monkeypatch):
    record.save(ARCH, [_entry()], ["tiny"])
    monkeypatch.setattr(record, "_hash", "sha256:changed")
    record.forget()
    assert not B.verified_on("self_attention", ARCH, {"head_dim": 16})


def test_a_corrupt_record_warns_and_is_replaced(device):
    os.makedirs(device)
    with open(record.record_path(ARCH), "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert Attention(32, 2).backend == "torch"
    data, path = record.save(ARCH, [_entry()], ["tiny"])
    assert path and json.load(open(path))["classes"] == data["classes"]


def test_a_read_only_cache_dir_warns(device, monkeypatch):
    os.makedirs(device)
    os.chmod(device, 0o500)
    try:
        if os.access(device, os.W_OK):  # root: chmod does not stop it; the write is refused as it would be
            def refuse(*a, **k):
                raise PermissionError(13, "Permission denied", str(device))

            monkeypatch.setattr(record.tempfile, "mkstemp", refuse)
        with pytest.warns(RuntimeWarning, match="could not write"):
            assert record.save(ARCH, [_entry()], ["tiny"])[1] == ""
        assert not B.verified_on("self_attention", ARCH)
    finally:
        os.chmod(device, 0o700)


def test_two_writers_at_once_leave_a_valid_file(device):
    code = ("import sys; from crossvit_fast import record\n"
            "for i in range(15):\n"
            "    e = {'class': f'{sys.argv[1]}{i}', 'op': 'layer_norm', 'dtype': 'float32', 'dims': {'dim': i},"
            " 'verdict': 'verified'}\n"
            "    record.save('interp', [e], ['m'])\n")
    env = {**os.environ, "CROSSVIT_FAST_CACHE_DIR": str(device)}
    procs = [subprocess.Popen([sys.executable, "-c", code, tag], env=env) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    data = json.load(open(record.record_path(ARCH)))
    assert data["format"] == 1 and len(data["classes"]) >= 15
    assert not [n for n in os.listdir(device) if n.endswith(".tmp")]


def test_verify_without_cuda_exits_2_naming_what_is_missing(capsys):
    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    assert main(["verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err
    with pytest.raises(VerifyUnavailableError, match="not a CUDA device"):
        verify(device="cpu")
    assert main(["verify", "no_such_model"]) == 2


def test_verify_json_path(device, tmp_path):
    out = tmp_path / "out.json"
    verify([TINY], device="cpu", dtypes=["float32"], ops=["layer_norm"], timer=_fixed(), seed=0, progress=None,
           json_path=str(out))
    assert json.load(open(out)) == json.load(open(record.record_path(ARCH)))


def test_optimize_verifies_first(monkeypatch):
    import crossvit_fast
    import crossvit_fast.verify as V

    calls = []
    monkeypatch.setattr(V, "verify", lambda models, **kw: calls.append((models, kw)))
    model = crossvit_fast.create_model("crossvit_tiny_240", backend="reference")
    crossvit_fast.optimize(model, backend="torch", verify=True)
    assert calls and calls[0][0] == [model] and calls[0][1]["batch"] <= 8


def test_cli_prints_the_summary_and_exits_by_the_verdicts(device, monkeypatch, capsys, tmp_path):
    import crossvit_fast.verify as V

    real = V.verify
    timers = iter([_fixed(1.0, 2.0), _fixed(3.0, 2.0)])

    def tiny(models, **kw):
        assert models == ["crossvit_9_240"]
        return real([TINY], device="cpu", timer=next(timers), seed=0,
                    **{k: v for k, v in kw.items() if k != "dtypes"}, dtypes=["float32"])

    monkeypatch.setattr(V, "verify", tiny)
    out = tmp_path / "verify.json"
    assert main(["verify", "crossvit_9_240", "--op", "layer_norm", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[1/1] layer_norm float32 C=32 heads=2 N=5" in text and "layer_norm[float32, dim=32]  verified" in text
    assert "1 verified, 0 slower" in text and "took" in text and json.load(open(out))["format"] == 1
    assert main(["verify", "crossvit_9_240", "--op", "layer_norm"]) == 0  # slower is not a failure
    assert "0 verified, 1 slower" in capsys.readouterr().out


def test_optimize_reports_the_authority(device):
    import crossvit_fast

    record.save(ARCH, [_entry()], ["tiny"])
    model = crossvit_fast.optimize(torch.nn.Sequential(Attention(32, 2, backend="torch"), Attention(64, 2)))
    report = model.crossvit_fast_authority["self_attention"]
    assert sorted(report.values()) == [1, 1] and any(k.startswith("local record of") for k in report)
    assert crossvit_fast.op_authorities(model)["self_attention"] == report
    crossvit_fast.revert(model)
    assert not hasattr(model, "crossvit_fast_authority")


def test_a_spent_budget_runs_nothing_more(device):
    report = verify([TINY], device="cpu", dtypes=["float32"], timer=_fixed(), budget_s=0.0, progress=None)
    assert len(report.not_run) == 4 and not report.classes and report.path == "" and report.exit_code == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_verify_of_the_headline_shapes_writes_a_record_auto_reads(monkeypatch, tmp_path):
    """The real path on a GPU: parity, device-event timing and the record, at crossvit_18_dagger_240's shapes (one
    op, bfloat16, to keep it short); no class may fail, and whatever is verified "auto" then takes."""
    monkeypatch.setenv("CROSSVIT_FAST_CACHE_DIR", str(tmp_path))
    record.forget()
    try:
        report = verify(["crossvit_18_dagger_240"], dtypes=["bfloat16"], ops=["layer_norm"], budget_s=300)
        assert report.exit_code == 0, report.table()
        assert os.path.exists(report.path)
        for c in report.classes:
            taken = B.resolve_backend("auto", op=c["op"], dims=c["dims"])
            assert taken == ("triton" if c["verdict"] == "verified" else "torch"), c
    finally:
        record.forget()
