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


@pytest.mark.parametrize("var,env,want", [
    ("CROSSVIT_FAST_AUTOTUNE", None, "autotuning: on"), ("CROSSVIT_FAST_AUTOTUNE", "0", "autotuning: off"),
    ("CROSSVIT_FAST_AUTOTUNE_CACHE", None, "autotune cache: on"),
    ("CROSSVIT_FAST_AUTOTUNE_CACHE", "0", "autotune cache: off"),
])
def test_info_says_whether_kernels_autotune_and_keep_their_picks(capsys, monkeypatch, var, env, want):
    if env is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, env)
    assert main(["info"]) == 0
    assert want in capsys.readouterr().out


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
    for op in ("self_attention", "cls_cross_attention", "layer_norm", "linear"):
        assert any(line.split()[:1] == [op] and ("fused (Triton kernel)" in line or "not fused: runs what timm runs" in line)
                   for line in out.splitlines())


# --- a new user's first hour: the CLI through its entry point, in a subprocess -------------------------------------

import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = "import sys; from crossvit_fast.cli import main; sys.exit(main())"  # what the console script runs
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the case is a machine without CUDA")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CROSSVIT_FAST_BACKEND")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _cli(*args, env=None, python=(sys.executable,)):
    return subprocess.run([*python, "-c", ENTRY, *args], capture_output=True, text=True, env=env or _env(), cwd=REPO)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _site_without_numpy(tmp_path_factory, *roots):
    """A site dir holding ``roots`` and their requirements only: no numpy, no fvcore (unless asked for); run with
    ``python -S`` so the system site-packages stay out. Returns the environment for it."""
    site = tmp_path_factory.mktemp("site")
    absent = ("numpy", "fvcore") + (() if "triton" in roots else ("triton",))

    def closure(name, seen):
        key = name.lower().replace("_", "-")
        if key in seen or key in absent:  # a CUDA build of torch requires triton: left out all the same
            return
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return
        seen[key] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                closure(re.split(r"[ ;<>=!~\[(]", req, 1)[0], seen)

    dists = {}
    for root in roots:
        closure(root, dists)
    for dist in dists.values():
        tops = set()
        for f in dist.files or []:
            top = f.parts[0]
            if top.endswith(".dist-info") or top == ".." or top == "__pycache__" or top.endswith(".pth"):
                continue
            tops.add(top)
        tops.add(str(dist._path.name))  # its .dist-info, for importlib.metadata
        for top in tops:
            src = os.path.join(os.path.dirname(str(dist._path)), top)
            dst = site / top
            if os.path.exists(src) and not dst.exists():
                os.symlink(src, dst)
    env = _env(PYTHONPATH=REPO + os.pathsep + str(site))
    probe = subprocess.run([sys.executable, "-S", "-c", "import torch, importlib.util as u; "
                            f"assert not any(u.find_spec(m) for m in {absent!r})"],
                           capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        pytest.skip(f"could not build a site dir of {roots} here: {probe.stderr.strip()[-300:]}")
    return env


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    """``pip install .``: torch and what it requires, no numpy, fvcore nor triton."""
    return _site_without_numpy(tmp_path_factory, "torch")


@NO_CUDA
def test_check_with_triton_but_no_numpy_says_why(tmp_path_factory):
    """``pip install '.[triton]'`` on a CPU machine: the interpreter needs numpy; the triton row says so."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here")
    env = _site_without_numpy(tmp_path_factory, "torch", "triton")
    r = _cli("check", "crossvit_tiny_240", "--reps", "1", env=env, python=(sys.executable, "-S"))
    assert r.returncode == 0, r.stderr
    assert "interpreter needs numpy" in r.stdout and "TRITON_INTERPRET=1 was set" not in r.stdout


def test_plain_install_runs_list_info_check(plain_install):
    py = (sys.executable, "-S")
    r = _cli("list", env=plain_install, python=py)
    assert r.returncode == 0, r.stderr
    assert "GMACs" in r.stdout and "32.47" in r.stdout
    r = _cli("info", env=plain_install, python=py)
    assert r.returncode == 0, r.stderr
    assert re.search(r"numpy\s+not installed", r.stdout) and "triton is not installed" in r.stdout
    r = _cli("check", "crossvit_tiny_240", "--reps", "1", env=plain_install, python=py)
    assert r.returncode == 0, r.stderr
    assert "reference  float32" in r.stdout and "triton is not installed" in r.stdout
    assert "TRITON_INTERPRET=1 was set" not in r.stdout
    assert "Failed to initialize NumPy" not in r.stderr, r.stderr


def test_plain_install_flops_names_the_extra(plain_install):
    r = _cli("flops", "crossvit_9_240", env=plain_install, python=(sys.executable, "-S"))
    _one_line_error(r, "crossvit_fast[flops]")
    assert "Failed to initialize NumPy" not in r.stderr


@pytest.mark.parametrize(
    "args, env, needles",
    [
        (["flops", "crossvit_9_240", "--backend", "triton"], {}, ["--backend triton cannot run here", "drop --backend"]),
        (["flops", "crossvit_9_240"], {"CROSSVIT_FAST_BACKEND": "triton"},
         ["environment variable CROSSVIT_FAST_BACKEND", "unset CROSSVIT_FAST_BACKEND"]),
        (["check", "--device", "cuda"], {}, ["--device cuda", "--device cpu"]),
    ],
    ids=["flops-triton", "env-triton", "check-cuda"],
)
@NO_CUDA
def test_cpu_machine_errors_are_one_line(args, env, needles):
    _one_line_error(_cli(*args, env=_env(**env)), *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["check", "--device", "gpu"], ["unknown device 'gpu'", "cpu, cuda"]),
        (["flops", "crossvit_9_240", "--img-size", "1", "2", "3"], ["--img-size takes H or H W"]),
        (["check", "crossvit_9_24"], ["did you mean 'crossvit_9_240'"]),
        (["check", "crossvit_9_240.garbage"], ["did you mean 'crossvit_9_240.in1k'"]),
        (["list", "--bogus"], ["unrecognized arguments", "--help"]),
        (["flops"], ["model", "crossvit-fast flops --help"]),
        (["check", "--reps", "0"], ["--reps", "1 or more"]),
    ],
    ids=["device-gpu", "img-size-3", "model-typo", "bad-tag", "bad-option", "no-model", "reps-0"],
)
def test_errors_are_one_line_with_the_next_step(args, needles):
    _one_line_error(_cli(*args), *needles)


def test_info_into_a_closed_pipe_is_quiet():
    p = subprocess.Popen([sys.executable, "-c", ENTRY, "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(), cwd=REPO)
    p.stdout.close()  # the reader is gone before anything is written (crossvit-fast info | head -0)
    err = p.stderr.read().decode()
    assert p.wait() == 0 and "BrokenPipeError" not in err and "Traceback" not in err, err


@NO_CUDA
def test_info_on_a_cpu_machine_says_each_thing_once():
    r = _cli("info")
    assert r.returncode == 0, r.stderr
    reason = "the fused kernels need an NVIDIA GPU"
    assert r.stdout.count(reason) == 1, r.stdout
    assert "reference:" not in r.stdout and "ask for 'triton'" not in r.stdout
    r = _cli("info", env=_env(CROSSVIT_FAST_BACKEND="bogus"))
    assert r.returncode == 0, r.stderr
    assert "'bogus'" in r.stdout and "CROSSVIT_FAST_BACKEND" in r.stdout
    assert "auto         takes torch here for layer_norm" in r.stdout  # the report goes on to the end
    r = _cli("info", env=_env(CROSSVIT_FAST_BACKEND="triton"))
    assert "from the environment variable CROSSVIT_FAST_BACKEND" in r.stdout and "unset it" in r.stdout


def test_help_texts(capsys, monkeypatch):
    from crossvit_fast.bench_utils import RESULTS_DIR
    from crossvit_fast.cli import DEFAULT_MODEL

    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps (and breaks long words) at the terminal's width

    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    assert DEFAULT_MODEL in out and "--seed" in out and "seed of the weights" in out and "timed runs" in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and RESULTS_DIR in out


def test_flops_calls_its_column_macs(capsys):
    pytest.importorskip("fvcore")
    assert main(["flops", "crossvit_tiny_240", "--depth", "0"]) == 0
    out = capsys.readouterr().out
    assert "#MACs" in out and "#flops" not in out and "GMACs per image" in out


def test_list_has_the_docs_gmacs_column(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    doc = open(os.path.join(REPO, "docs", "models.md"), encoding="utf-8").read()
    checked = 0
    for line in doc.splitlines():
        if line.startswith("| crossvit_") and line.count("|") == 11:
            cells = [c.strip() for c in line.strip("|").split("|")]
            row = next(r for r in out.splitlines() if r.startswith(cells[0] + " "))
            assert row.split()[-1] == cells[-1], (row, cells)
            checked += 1
    assert checked == 11, f"docs/models.md's model table has {checked} rows, not 11"
