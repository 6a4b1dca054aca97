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


def _tool():
    spec = importlib.util.spec_from_file_location("sm90_compile_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ptxas -v logs as triton 3.6.0 (ptxas 12.8) and 3.9.0 (ptxas-blackwell 13.4) print them
LOG_36 = """ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
non wgmma \
instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function \
'_linear_fwd_kernel'
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence \
of Extern calls in the function 'other_kernel'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_linear_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _linear_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compile time = 199.133 ms
""".replace("\\\n", "")
LOG_39 = """ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_linear_fwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _linear_fwd_kernel
    8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas-blackwell warning : Registers are spilled to local memory in function '_linear_fwd_kernel', 8 bytes spill \
stores, 8 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
""".replace("\\\n", "")


def test_ptxas_warnings():
    t = _tool()
    w36 = t.ptxas_warnings(LOG_36, "_linear_fwd_kernel")
    assert len(w36) == 1 and w36[0].startswith("C7515 Potential Performance Loss: wgmma.mma_async")
    assert t.ptxas_warnings(LOG_36, "other_kernel")[0].endswith("Extern calls in the function 'other_kernel'")
    w39 = t.ptxas_warnings(LOG_39, "_linear_fwd_kernel")
    assert w39 == ["Registers are spilled to local memory in function '_linear_fwd_kernel', 8 bytes spill stores, "
                   "8 bytes spill loads"]
    assert t.ptxas_warnings(LOG_39, "another") == []
    assert t.c7515({"warnings": w36}) and not t.c7515({"warnings": w39})


def _sass(body):
    """cuobjdump -sass layout: ``/*addr*/ [pred] OPCODE operands ;  /* encoding */`` and an encoding line."""
    lines = ["\tcode for sm_90a", "\t\tFunction : k"]
    for i, ins in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {ins} ;   /* 0x000000000000 */")
        lines.append("                                                   /* 0x000fe20000000a00 */")
    return "\n".join(lines)


def test_sass_main_loop():
    t = _tool()
    # 0-1 setup; 2-4 a prologue loop (FFMA); 5-14 the main loop, an inner HGMMA loop at 7-11; 15-16 the exit
    body = ["LDC R1, c[0x0][0x28]", "S2R R6, SR_CTAID.X",
            "FFMA R2, R3, R4, R2", "IADD3 R5, R5, 0x1, RZ", "@!P0 BRA 0x20",
            "LDS R8, [R9]", "NOP",
            "WARPGROUP.ARRIVE", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24", "HGMMA.64x128x16.F32.BF16 R24, "
            "gdesc[UR8], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "@P1 BRA 0x70",
            "FMUL R2, R2, R3", "ISETP.GE.AND P2, PT, R5, R6, PT", "@!P2 BRA 0x50",
            "EXIT", "BRA 0x100"]
    ins = t.parse_sass(_sass(body))
    assert len(ins) == len(body) and ins[4] == (0x40, "BRA", "0x20") and ins[8][1] == "HGMMA.64x128x16.F32.BF16"
    assert t.sass_loops(ins) == [(0x20, 0x40), (0x50, 0xe0), (0x70, 0xb0)]  # the closing BRA 0x100: no loop
    m = t.main_loop(ins)
    assert (m["sass"], m["hgmma"], m["loop"], m["loops"], m["total"]) == (5, 2, "hgmma", 3, 16)
    # no HGMMA / HMMA: the largest innermost loop
    fma = [b.replace("HGMMA.64x128x16.F32.BF16", "FFMA") for b in body]
    m = t.main_loop(t.parse_sass(_sass(fma)))
    assert (m["sass"], m["ffma"], m["loop"]) == (5, 2, "largest")
    # no loop: the whole body
    m = t.main_loop(t.parse_sass(_sass(["LDC R1, c[0x0][0x28]", "FADD R1, R1, R2", "EXIT", "BRA 0x30"])))
    assert (m["sass"], m["loop"], m["loops"]) == (4, "none", 0)


def test_ctas_per_sm():
    t = _tool()
    assert t.ctas_per_sm(168, 8, 98816) == (1, "regs")  # 5,376 registers a warp: 12 warps
    assert t.ctas_per_sm(128, 4, 49152) == (4, "smem")  # 16 warps by registers; 233,472 // 50,176 = 4
    assert t.ctas_per_sm(30, 2, 8) == (32, "threads")
    assert t.ctas_per_sm(32, 1, 0) == (32, "ctas")
    assert t.ctas_per_sm(64, 4, 131072) == (1, "smem")


def _rec(kernel="_linear_fwd_kernel", dtype="bf16", C=224, wgmma=4, warnings=(), sass=(300, 4), regs=168, **cfg):
    r = {"op": "linear", "dtype": dtype, "C": C, "H": 0, "N": 401, "B": 256, "kernel": kernel, "hash": str(cfg),
         "config": {"HAS_LN": True, "HAS_BIAS": True, "GELU": False, "EVEN_K": False, "BLOCK_M": 128, "BLOCK_N": 128,
                    "BLOCK_K": 64, **cfg, "warps": 8, "stages": 3},
         "regs": regs, "stack": 0, "spill_st": 0, "spill_ld": 0, "shared": 98816, "wgmma": wgmma,
         "warnings": list(warnings), "ctas": 1, "ctas_by": "regs"}
    if sass:
        r["sass"] = {"sass": sass[0], "hgmma": sass[1], "hmma": 0, "ffma": 0, "loop": "hgmma", "loops": 2,
                     "total": 2000}
    return r


def _result(records, version="3.6.0"):
    return {"scope": "ci", "arch": 90, "triton": version, "ptxas": "ptxas 12.8", "records": records, "errors": []}


C7515_LINE = "C7515 Potential Performance Loss: wgmma.mma_async instructions are serialized"


def test_c7515_gate(monkeypatch):
    t = _tool()
    monkeypatch.setattr(t, "SASS_BUDGET", {})
    bad = _rec(warnings=[C7515_LINE])
    assert t.variant(bad) == "has_ln,has_bias"
    monkeypatch.setattr(t, "C7515_PENDING", frozenset())
    assert [p.split()[0] for p in t.problems(_result([bad]))] == ["C7515"]
    assert t.problems(_result([_rec(dtype="fp32", wgmma=0, warnings=[C7515_LINE])])) == []
    assert t.problems(_result([_rec(kernel="_other", wgmma=0, warnings=[C7515_LINE])])) == []
    assert len(t.problems(_result([_rec(kernel="_cls", wgmma=2, dtype="fp16", warnings=[C7515_LINE])]))) == 1
    monkeypatch.setattr(t, "C7515_PENDING", frozenset({("_linear_fwd_kernel", "has_ln,has_bias")}))
    assert t.problems(_result([bad])) == []
    assert len(t.problems(_result([_rec(GELU=True, warnings=[C7515_LINE])]))) == 1  # another class


def test_sass_budgets(monkeypatch):
    import ast

    t = _tool()
    recs = [_rec(sass=(300, 4)), _rec(sass=(280, 2), BLOCK_K=32, regs=128)]
    budgets = t.suggest_budgets([_result(recs), _result(recs, "3.9.0")])
    key = ("_linear_fwd_kernel", "bf16", "C256")
    assert budgets == {key: {"3.6": (315, 2, 1), "3.9": (315, 2, 1)}}
    text = t.format_budgets(budgets)
    assert ast.literal_eval(text.split("= ", 1)[1]) == budgets
    monkeypatch.setattr(t, "SASS_BUDGET", budgets)
    assert t.problems(_result(recs)) == []
    worse = [_rec(sass=(316, 4)), _rec(sass=(280, 0), BLOCK_K=32)]
    assert sorted(p.split()[0] for p in t.problems(_result(worse))) == ["HGMMA", "SASS"]
    low = [dict(_rec(), ctas=0)]
    assert [p.split()[0] for p in t.problems(_result(low))] == ["CTAS"]
    assert t.problems(_result(recs, "3.7.1")) == []  # a version without budgets: not checked
    new = _rec(kernel="_linear_dgrad_kernel")
    assert t.problems(_result([*recs, new]))[0].startswith("NO SASS BUDGET ('_linear_dgrad_kernel'")


def test_docs_check():
    t = _tool()
    recs = [_rec(), _rec(BLOCK_K=32, sass=(280, 2), warnings=[C7515_LINE]), _rec(dtype="fp32", wgmma=0, sass=None)]
    res = _result(recs)
    docs, block = t.render_docs(res), t.render_readme_table(res)
    readme = "# x\n\n" + block + "\n\nmore\n"
    assert "triton 3.6.0" in docs and "not a measurement" in block
    assert t.docs_problems(res, docs, readme) == []
    changed = _result([_rec(regs=170), *recs[1:]])
    assert [p.split()[1] for p in t.docs_problems(changed, docs, readme)] == ["docs/sm90.md", "README.md's"]
    other = dict(changed, triton="3.9.0", ptxas="ptxas 13.4")  # another version: the rows only
    assert t.docs_problems(other, docs, readme) == []
    fewer = dict(other, records=recs[:1])
    assert [p.split()[1] for p in t.docs_problems(fewer, docs, readme)] == ["docs/sm90.md:"]  # README: same kernels
    assert t.docs_problems(res, "# hand-written\n", readme)[0].startswith("DOCS docs/sm90.md carries no")


_NO_PTXAS = ("no ptxas: triton is not installed, or its wheel has no triton/backends/nvidia/bin/ptxas (or "
             "TRITON_PTXAS_PATH is not executable); the sm_90 compile check needs it (no GPU needed)")


@pytest.mark.skipif(_ptxas() is None, reason=_NO_PTXAS)
def test_sm90_compile(tmp_path):
    """The ci scope also checks C7515, the static budgets at the headline shapes and that docs/sm90.md and the
    README's table are what ``--write-docs`` would write."""
    scope = setting("CROSSVIT_FAST_SM90_SET")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TMPDIR"] = str(tmp_path)  # the workers' fresh Triton caches live (and die) here
    report = tmp_path / "sm90.json"
    docs = ["--check-docs"] if scope == "ci" else []
    proc = subprocess.run(
        [sys.executable, TOOL, "--set", scope, "--jobs", "2", "--check", "--json", str(report), *docs],
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
