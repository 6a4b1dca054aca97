"""The crossvit-fast command line: list, info, flops, check."""

import subprocess
import sys

import pytest

from crossvit_fast.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "crossvit_18_dagger_408" in out and "crossvit_18_dagger_384" in out and "44,606,560" in out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference    can run" in out and "triton" in out and "auto" in out


def test_flops(capsys):
    pytest.importorskip("fvcore")
    assert main(["flops", "crossvit_9_240", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "| model" in out and "1.849 GMACs" in out


def test_check_reports_parity_and_the_fused_status(capsys):
    assert main(["check", "crossvit_tiny_240", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "reference  float32" in out and "parity against the reference in float64" in out
    from crossvit_fast.backend import triton_status

    ok, _ = triton_status()
    if ok:  # CUDA, or the interpreter that tests/conftest.py switches on: the fused row passes the parity check
        assert "FAIL" not in out and any(line.startswith("triton") and " ok" in line for line in out.splitlines())
    else:
        assert "triton     -" in out and "not available" in out


def test_errors_are_reported_not_raised(capsys):
    assert main(["check", "crossvit_99_240"]) == 2
    assert "unknown CrossViT model" in capsys.readouterr().err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "crossvit_fast", "list"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "crossvit_tiny_240" in r.stdout


def test_info_says_which_ops_run_fused(capsys, monkeypatch):
    monkeypatch.delenv("CROSSVIT_FAST_BACKEND", raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ops of a model built now (backend 'auto')" in out
    for op in ("self_attention", "cls_cross_attention", "layer_norm"):
        assert any(line.split()[:1] == [op] and ("fused (Triton kernel)" in line or "not fused: runs what timm runs" in line)
                   for line in out.splitlines())
