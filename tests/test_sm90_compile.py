"""Every Triton kernel compiles for sm_90 (H100) within its register-spill budget and the shared-memory limit.

Runs ``tests/sm90_compile.py --set ci --check`` in a subprocess without ``TRITON_INTERPRET`` (conftest sets it in
this process, and kernels imported under the interpreter cannot compile); nothing from triton is imported here.
No GPU is needed, only the ptxas that ships in the triton wheel. ``CROSSVIT_FAST_SM90_SET=family`` (or smoke)
selects another scope.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

from crossvit_fast.config import env as setting

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
REPO = os.path.dirname(os.path.dirname(TOOL))


def _ptxas():
    """The ptxas triton would use (TRITON_PTXAS_PATH, else the wheel's), or None; found without importing triton."""
    override = os.environ.get("TRITON_PTXAS_PATH")
    if override:
        return override if os.access(override, os.X_OK) else None
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "backends", "nvidia", "bin", "ptxas")
        if os.access(path, os.X_OK):
            return path
    return None


_NO_PTXAS = ("no ptxas: triton is not installed, or its wheel has no triton/backends/nvidia/bin/ptxas (or "
             "TRITON_PTXAS_PATH is not executable); the sm_90 compile check needs it (no GPU needed)")


@pytest.mark.skipif(_ptxas() is None, reason=_NO_PTXAS)
def test_sm90_compile(tmp_path):
    scope = setting("CROSSVIT_FAST_SM90_SET")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TMPDIR"] = str(tmp_path)  # the workers' fresh Triton caches live (and die) here
    report = tmp_path / "sm90.json"
    proc = subprocess.run(
        [sys.executable, TOOL, "--set", scope, "--jobs", "2", "--check", "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"sm_90 compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.skipif(_ptxas() is None, reason=_NO_PTXAS)
def test_sm80_compile_headline_model(tmp_path):
    """An A100 (sm_80, 163 KB of shared memory a block) runs crossvit_18_dagger_240's kernels under an explicit
    ``backend="triton"``: every one compiles for sm_80 and launches in the shared memory there (through the
    launchers' fallbacks: the GEMM tuner skips the tiles that need more, the CLS launcher drops to one stage).
    Wider models are another matter: the float32 CLS backward at C = 768 needs 196 KB (``--set ci --arch 80``; the
    16-bit one 135 KB)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, TOOL, "--set", "smoke", "--arch", "80", "--jobs", "2", "--check"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, f"sm_80 compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "scope smoke, sm_80:" in proc.stdout


@pytest.mark.skipif(_ptxas() is None, reason=_NO_PTXAS)
def test_packed_cache_is_hit(tmp_path):
    """``--cache-dir`` + ``--pack`` (the prebuilt cache bench/gpu_run.sh unpacks on the GPU): unpacked at the path it
    was built at, a second compile of the same kernels finds every one of them there and compiles nothing."""
    import tarfile

    cache, tar = tmp_path / "cache", tmp_path / "triton-cache.tar.xz"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, TOOL, "--set", "smoke", "--ops", "layer_norm", "--jobs", "1", "--cache-dir", str(cache)]

    def groups():
        return sorted(p.name + p.parent.name for p in cache.rglob("__grp__*"))

    first = subprocess.run(cmd + ["--pack", str(tar)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    built = groups()
    assert built and "packed %d compiled kernels" % len(built) in first.stdout
    with tarfile.open(tar) as t:
        assert not [n for n in t.getnames() if not n.endswith((".cubin", ".json"))]
    import shutil

    shutil.rmtree(cache)
    with tarfile.open(tar) as t:
        t.extractall(cache, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert groups() == built, "kernels were compiled again: the packed cache was not hit"
