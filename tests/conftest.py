"""Test session set-up.

Without a CUDA device the fused kernels run in Triton's CPU interpreter, which must be switched on before the
module defining the ``@triton.jit`` functions is imported: it is switched on here, before any test module loads.
Tests that need CUDA skip with a reason. The interpreter is also given the GPU's bfloat16 and tf32 rounding
(``tests/gpu_numerics.py``), so the kernel tests run their bfloat16 cases on the CPU too, and a memory checker
(``tests/memcheck.py``): a load or store outside the launch's tensor arguments fails the test, as an illegal address
would fail it on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "CROSSVIT_FAST_CACHE_DIR" not in os.environ:  # the suite never reads nor writes this machine's own record
    import tempfile

    os.environ["CROSSVIT_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="crossvit_fast-test-cache-")
from crossvit_fast.config import env_flag, env_int, interpreter_enabled  # noqa: E402

INTERPRETED = interpreter_enabled()
if INTERPRETED:
    import gpu_numerics
    import memcheck

    gpu_numerics.install()
    memcheck.install()

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
cpu_only = pytest.mark.skipif(CUDA, reason="CPU-interpreter variant; the CUDA tests cover this on a GPU")
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_compiled_like_eager(f, args, backend="aot_eager"):
    """``torch.compile(f, fullgraph=True)`` gives eager's output and input gradients (of its sum) on ``args``."""
    y = torch.compile(f, fullgraph=True, backend=backend)(*args)
    g = torch.autograd.grad(y.sum(), args)
    y_eager = f(*args)
    g_eager = torch.autograd.grad(y_eager.sum(), args)
    torch.testing.assert_close(y, y_eager, rtol=1e-6, atol=1e-6)
    for a, c in zip(g, g_eager):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


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


class DispatchLog(TorchDispatchMode):
    """Records the name of every aten (or custom) op dispatched while it is active, in order (``names``);
    ``counts()`` tallies them. For tests of which ops a path runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)
        self.names.append(str(packet) if packet is not None else str(func))
        return func(*args, **(kwargs or {}))

    def counts(self):
        out = {}
        for n in self.names:
            out[n] = out.get(n, 0) + 1
        return out


@pytest.fixture
def plain_interpreter(monkeypatch):
    """Triton's interpreter as it comes, without ``gpu_numerics``: for the tests of the launchers' bfloat16
    refusal there."""
    if INTERPRETED:
        from triton.runtime import interpreter

        monkeypatch.setattr(interpreter.InterpreterBuilder, gpu_numerics.MARK, False)
    yield


SEED = env_int("CROSSVIT_FAST_TEST_SEED")
"""Every test starts from ``torch.manual_seed(SEED)``. CUDA draws other numbers than the CPU from one seed, so a
test whose tolerance holds only for the CPU's draw fails on a GPU: ``CROSSVIT_FAST_TEST_SEED=1 2 3 ...`` runs the
suite on other draws (``bench/seed_sweep.sh``) to find such tests here."""


RANDOM_CASES = env_int("CROSSVIT_FAST_RANDOM_CASES")
"""Cases per op of ``tests/test_random_inputs.py`` (each test: the judged cases and the bad-input cases). CI runs
the default; a sweep sets a few hundred, over several ``CROSSVIT_FAST_TEST_SEED`` values."""


CPU_DRAW_LIMIT = 1 << 24
"""On CUDA, ``torch.randn`` / ``torch.rand`` / ``torch.randint`` and their ``_like`` forms asked for a CUDA tensor of
at most this many elements draw it from the CPU generator and move it (``_draws_on_the_cpu``): a CUDA run of a test
sees the very inputs its CPU run (interpreter, GPU rounding) checked, not CUDA's other numbers from the same seed.
Larger tensors (the 64-bit offset tests) are drawn on the device. ``CROSSVIT_FAST_TEST_CUDA_DRAWS=1`` draws every
tensor on the device."""


def _size_of(args, kwargs):
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size))
                      else args)
    n = 1
    for d in size:
        n *= int(d)
    return n


DRAW_SIZES = {
    "randn": lambda a, k: (a, k),
    "rand": lambda a, k: (a, k),
    "randint": lambda a, k: ((k["size"],) if "size" in k else (a[-1],), {}),
}
"""Where each drawing function takes its size: the (args, kwargs) that ``_size_of`` reads."""


def _cpu_draw(fn, size_at, target="cuda"):
    def draw(*args, **kwargs):
        device = kwargs.get("device")
        if device is None or torch.device(device).type != target or kwargs.get("generator") is not None \
                or kwargs.get("out") is not None or _size_of(*size_at(args, kwargs)) > CPU_DRAW_LIMIT:
            return fn(*args, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        kwargs["device"] = "cpu"
        return fn(*args, **kwargs).to(device).requires_grad_(requires_grad)
    return draw


def _cpu_draw_like(fn, target="cuda"):
    def draw(t, **kwargs):
        device = kwargs.get("device", t.device)
        if torch.device(device).type != target or t.numel() > CPU_DRAW_LIMIT:
            return fn(t, **kwargs)
        kwargs.update(device="cpu", dtype=kwargs.get("dtype", t.dtype))
        return fn(torch.empty(t.shape, dtype=kwargs["dtype"]), **kwargs).to(device)
    return draw


@pytest.fixture(autouse=True)
def _draws_on_the_cpu(monkeypatch):
    if torch.cuda.is_available() and not env_flag("CROSSVIT_FAST_TEST_CUDA_DRAWS"):
        for name, size_at in DRAW_SIZES.items():
            monkeypatch.setattr(torch, name, _cpu_draw(getattr(torch, name), size_at))
        for name in ("randn_like", "rand_like"):
            monkeypatch.setattr(torch, name, _cpu_draw_like(getattr(torch, name)))
    yield


@pytest.fixture(autouse=True)
def _seed(_draws_on_the_cpu):
    torch.manual_seed(SEED)
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
