"""The suite's own output: skips are counted once per reason, pytest's final line stays last (CI reads it)."""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_skips_are_summarised_per_reason(tmp_path):
    for name in ("conftest.py", "gpu_numerics.py", "memcheck.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    shutil.copy(os.path.join(os.path.dirname(HERE), "pytest.ini"), tmp_path / "pytest.ini")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\n"
        "@pytest.mark.parametrize('i', range(30))\n"
        "def test_cuda(i): pass\n"
        "def test_other(): pytest.skip('timm is not installed')\n"
        "def test_ok(): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert "s" not in lines[0].split("[")[0], lines[0]  # no letter per skip in the progress line
    assert "   30 skipped: needs a CUDA GPU" in lines and "    1 skipped: timm is not installed" in lines, r.stdout
    assert lines[-1].startswith("1 passed, 31 skipped"), lines[-1]
