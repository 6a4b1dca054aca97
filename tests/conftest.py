"""Test session set-up.

Without a CUDA device the fused kernels run in Triton's CPU interpreter, which must be switched on before the
module defining the ``@triton.jit`` functions is imported: it is switched on here, before any test module loads.
Tests that need CUDA skip with a reason.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _NoLaunch:
    """Stands in for a kernel (``kernel[grid](...)``) or a launcher (``launch(...)``): using it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for bad input")

    def __call__(self, *args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")


def forbid_launches(monkeypatch, module, *names):
    """Replace ``module``'s kernels or launchers ``names`` so that a launch fails the test: bad input must raise
    before any launch."""
    for name in names:
        monkeypatch.setattr(module, name, _NoLaunch())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def pytest_report_teststatus(report, config):
    """No letter per skipped test in the progress line (without a GPU hundreds skip for one reason): the reasons are
    counted once each at the end, by pytest_terminal_summary below."""
    if report.skipped and not hasattr(report, "wasxfail") and config.get_verbosity() <= 0:
        return "skipped", "", "SKIPPED"
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per skip reason, with its count, before pytest's own final line."""
    counts = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    if counts:
        terminalreporter.write_sep("-", "skipped, by reason")
        for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{n:5d} skipped: {reason}")
