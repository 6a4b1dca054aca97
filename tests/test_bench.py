"""The benchmark scripts' CPU-side logic: case lists, the record format, the markdown table. Timing is CUDA-only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from crossvit_fast import bench_model
from crossvit_fast.bench_utils import (
    EagerFallbackError,
    assert_compiled,
    compile_fresh,
    gemm_tiles,
    new_record,
    record_path,
    timed_row,
    write_record,
)
from crossvit_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["bench_cls_cross_attention.py", "bench_self_attention.py", "bench_layer_norm.py",
                                    "bench_model.py", "bench_linear.py"])
def test_dry_run_lists_cases(script):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert " cases x " in r.stdout.splitlines()[-1]


def _load_bench(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "bench", script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OP_RUNS = [  # (script, arguments of one small run, the rate its rows carry, rows expected)
    ("bench_cls_cross_attention.py", ["--models", "crossvit_9_240", "--directions", "S->L", "--batch", "2",
                                      "--dtype", "float32", "--providers", "reference"], "gb_per_s", 2),
    ("bench_self_attention.py", ["--cases", "17:2:8", "--batch", "2", "--dtype", "float32", "--providers",
                                 "reference", "sdpa-math"], "tflops", 4),
    ("bench_layer_norm.py", ["--nc", "17:32", "--residual", "1", "0", "--batch", "2", "--dtype", "bfloat16",
                             "--providers", "reference"], "gb_per_s", 4),
    ("bench_linear.py", ["--models", "crossvit_9_240", "--gemms", "qkv", "fc2", "--batch", "1", "--passes",
                         "forward+backward", "--providers", "reference", "cublas"], "tflops", 10),
]


@pytest.mark.parametrize("script,argv,rate,n_rows", OP_RUNS, ids=[r[0] for r in OP_RUNS])
def test_op_bench_writes_its_record(script, argv, rate, n_rows, tmp_path, monkeypatch):
    """The op benchmarks through the shared runner, the CPU standing in for the GPU (each provider's callable run
    once instead of timed): a row per case and provider with the record format's fields."""
    from crossvit_fast import bench_utils

    calls = []

    def run_once(call, provider, what, warmup_ms, rep_ms):
        call()
        calls.append(provider)
        return [1.0, 2.0, 3.0], 0.5

    monkeypatch.setattr(bench_utils, "require_cuda", lambda name: None)
    monkeypatch.setattr(bench_utils, "measure_ceilings", lambda: {"copy_gb_per_s": 1.0, "bf16_matmul_tflops": 1.0})
    monkeypatch.setattr(bench_utils, "time_provider", run_once)
    bench = _load_bench(script).BENCH
    assert bench_utils.run_op_bench(bench, argv + ["--out-dir", str(tmp_path), "--no-plot"], device="cpu") == 0
    [path] = os.listdir(tmp_path)
    with open(tmp_path / path) as f:
        data = json.load(f)
    assert {"benchmark", "device", "torch", "triton", "commit", "created", "ceilings", "rows"} <= set(data)
    assert data["benchmark"] == bench.name and data["complete"] and set(bench.conventions) <= set(data)
    assert len(data["rows"]) == len(calls) == n_rows
    for row in data["rows"]:
        assert {"batch", "dtype", "pass", "provider", "median_ms", "samples_ms", "peak_mem_mb"} <= set(row)
        assert row["median_ms"] == 2.0 and row["peak_mem_mb"] == 0.5
        assert rate in row or row.get("kind") == "block"
    if script == "bench_linear.py":
        assert "gemm_tiles" in data and {r["provider"] for r in data["rows"] if r["kind"] == "block"} == {"reference"}
    if script == "bench_cls_cross_attention.py":
        assert all(r["speedup"] == 1.0 and r["bytes"] > 0 for r in data["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_no_gpu_no_timings(capsys):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", "crossvit_9_240"])


def test_record_format_and_markdown(tmp_path):
    rec = new_record("model", {"copy_gb_per_s": 3000.0, "bf16_matmul_tflops": 700.0})
    for prov, ms in (("timm", 20.0), ("crossvit_fast", 10.0)):
        settings = {"model": "crossvit_9_240", "batch": 64, "dtype": "bfloat16", "pass": "forward", "img_size": 240}
        rec["rows"].append(timed_row(settings, prov, [ms, ms * 1.1, ms * 0.9], images_per_s=64 / (ms * 1e-3),
                                     peak_mem_mb=100.0, mfu=0.1))
    path = write_record(rec, str(tmp_path))
    with open(path) as f:
        data = json.load(f)
    assert {"benchmark", "device", "torch", "triton", "commit", "created", "ceilings", "rows"} <= set(data)
    row = data["rows"][1]
    assert row["provider"] == "crossvit_fast" and row["median_ms"] == 10.0 and len(row["samples_ms"]) == 3
    table = bench_model.markdown(data)
    assert "| crossvit_9_240 | forward | bfloat16 | 64 | crossvit_fast | none | 10.000 | 6400 | 2.00x |" in table
    case = {"model": "crossvit_18_dagger_408", "batch": 256, "dtype": "float32", "pass": "train_step",
            "provider": "reference", "graphs": "none"}
    data["skipped"] = [{**case, "reason": "out of memory"}]
    data["failures"] = [{**case, "provider": "timm-compiled", "error": "RuntimeError: boom"}]
    table = bench_model.markdown(data)  # an absent row says why
    assert "Out of memory (no row): crossvit_18_dagger_408 train_step float32 batch 256 reference" in table
    assert "Failed: crossvit_18_dagger_408 train_step float32 batch 256 timm-compiled (CUDA graphs none): " \
           "RuntimeError: boom" in table


def test_records_are_written_as_they_grow(tmp_path):
    """Every case rewrites the same file; a run cut off after a case leaves a valid record marked incomplete."""
    rec = new_record("layer_norm", {"copy_gb_per_s": 1.0, "bf16_matmul_tflops": 1.0})
    first = write_record(rec, str(tmp_path))
    rec["rows"].append(timed_row({"batch": 1, "dtype": "float32", "pass": "forward"}, "reference", [1.0]))
    assert write_record(rec, str(tmp_path)) == first == record_path(rec, str(tmp_path))
    with open(first) as f:
        partial = json.load(f)
    assert partial["complete"] is False and len(partial["rows"]) == 1
    write_record(rec, str(tmp_path), complete=True)
    with open(first) as f:
        assert json.load(f)["complete"] is True
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]  # no temporary file left behind


def _scaled_sin(x):
    return (x * 2).sin()


def test_compile_fresh_gives_every_case_a_compiled_callable():
    """More cases than dynamo's recompile limit (8): each still runs compiled."""
    for n in range(1, 12):
        f = compile_fresh(_scaled_sin, backend="eager", dynamic=False, fullgraph=True)
        x = torch.randn(n)
        assert_compiled(lambda: f(x), f"case {n}")


def test_assert_compiled_fails_loudly_on_eager_fallback():
    """One compiled callable fed many static shapes: past the recompile limit dynamo runs it eagerly, and the check
    says so instead of letting the eager time stand for the compiled baseline."""
    f = compile_fresh(_scaled_sin, backend="eager", dynamic=False)
    with pytest.raises(EagerFallbackError, match="recompile limit"):
        for n in range(1, 12):
            x = torch.randn(n)
            assert_compiled(lambda: f(x), f"shape {n}")
    assert n == 9


def test_assert_compiled_refuses_a_reused_graph():
    f = compile_fresh(_scaled_sin, backend="eager", dynamic=False)
    x = torch.randn(3)
    assert_compiled(lambda: f(x), "first")
    with pytest.raises(EagerFallbackError, match="compiled nothing"):
        assert_compiled(lambda: f(x), "the same case again, without compile_fresh")


PHASES = ["smoke", "tests-ops", "tests-models", "bench-cls", "bench-sa", "bench-ln", "bench-model", "bench-models",
          "profile", "graphs", "bench-linear"]


@pytest.mark.parametrize("phase", PHASES)
def test_gpu_run_phases_are_ready(phase):
    """Each phase of bench/gpu_run.sh, dry (no GPU): its pytest selections collect and its bench cases list, so the
    GPU's first minutes are not lost to a typo."""
    env = {**os.environ, "CVF_BENCH_DRY": "1", "OUT": ""}
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_run.sh"), phase], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"phase {phase} done" in r.stdout and "(dry)" in r.stdout
    if phase == "smoke":
        import re

        picked = sum(int(n) for n in re.findall(r"(\d+)/\d+ tests collected", r.stdout))
        assert picked >= 21, r.stdout[-2000:]  # 3 ops x 2 shapes x 3 dtypes + 3 model cases


def test_gpu_run_reads_its_documented_old_names():
    """GPU_RUN_DRY and PHASE_BUDGET (the names the README and older sessions use) still work where the CVF_BENCH_
    names are unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVF_BENCH_")}
    env.update(GPU_RUN_DRY="1", PHASE_BUDGET="300", OUT="")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_run.sh"), "bench-ln"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "bench_layer_norm (dry)" in r.stdout and "phase bench-ln done" in r.stdout, \
        r.stdout[-3000:] + r.stderr[-2000:]


def _cache_sh(*args, env):
    return subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_cache.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_gpu_cache_round_trip(tmp_path):
    """bench/gpu_cache.sh: pack takes only what was written after the marker, add numbers the archives in the carry,
    unpack restores them; an archive made under other source keeps its kernels and FX graphs but not its
    AOTAutograd entries (their key does not cover a custom op's backward formula)."""
    gpu, here, carry = tmp_path / "gpu", tmp_path / "here", tmp_path / "carry"
    env = {**os.environ, "CVF_BENCH_CACHE_BASE": str(gpu), "CVF_BENCH_CARRY_DIR": str(carry)}
    old = gpu / "crossvit_fast-triton-cache" / "aaa" / "old.cubin"
    old.parent.mkdir(parents=True)
    old.write_text("old")
    os.utime(old, (1e9, 1e9))  # unpacked from the prebuilt cache: older than the marker
    marker = tmp_path / "marker"
    marker.write_text("")
    r = _cache_sh("pack", str(tmp_path / "none.tar.xz"), str(marker), env=env)
    assert r.returncode == 0 and "nothing new" in r.stdout and not (tmp_path / "none.tar.xz").exists()
    ir = gpu / "crossvit_fast-triton-cache" / "bbb" / "k.ptx"  # IR and PTX stay behind
    ir.parent.mkdir(parents=True)
    ir.write_text("ptx")
    new = {"crossvit_fast-triton-cache/bbb/k.cubin": "kernel",
           "crossvit_fast-triton-cache/bbb/__grp__k.json": "group",
           "crossvit_fast-triton-cache/ccc/__triton_launcher.cpython-312-x86_64-linux-gnu.so": "launcher",
           "crossvit_fast-triton-cache/ddd/crossvit_fast-linear-fwd.autotune.json": "pick",
           "crossvit_fast-inductor-cache/fxgraph/xy/entry": "graph",
           "crossvit_fast-inductor-cache/aotautograd/key/entry": "joint"}
    for rel, text in new.items():
        (gpu / rel).parent.mkdir(parents=True, exist_ok=True)
        (gpu / rel).write_text(text)
    out = tmp_path / "cache-bench-model.tar.xz"
    r = _cache_sh("pack", str(out), str(marker), env=env)
    assert r.returncode == 0 and "6 new files" in r.stdout, r.stdout + r.stderr
    names = subprocess.run(["tar", "tJf", str(out)], capture_output=True, text=True).stdout.split()
    assert sorted(names) == sorted([*new, "crossvit_fast-cache-source.txt"])
    for _ in range(2):
        r = _cache_sh("add", str(out), env=env)
        assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(carry)) == ["run-001-cache-bench-model.tar.xz", "run-002-cache-bench-model.tar.xz"]
    os.remove(carry / "run-002-cache-bench-model.tar.xz")

    env_here = {**env, "CVF_BENCH_CACHE_BASE": str(here)}
    here.mkdir()
    r = _cache_sh("unpack", env=env_here)
    assert r.returncode == 0 and "1 run archive(s)" in r.stdout, r.stdout + r.stderr
    assert all((here / rel).read_text() == text for rel, text in new.items())
    assert not (here / "crossvit_fast-cache-source.txt").exists()

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "crossvit_fast-cache-source.txt").write_text("0123456789abcdef\n")
    subprocess.run(["tar", "xJf", str(out), "-C", str(stale), "--exclude=crossvit_fast-cache-source.txt"], check=True)
    os.remove(carry / "run-001-cache-bench-model.tar.xz")
    subprocess.run(["tar", "cJf", str(carry / "run-001-old.tar.xz"), "-C", str(stale), "crossvit_fast-cache-source.txt",
                    "crossvit_fast-triton-cache", "crossvit_fast-inductor-cache"], check=True)
    other = tmp_path / "other"
    other.mkdir()
    r = _cache_sh("unpack", env={**env, "CVF_BENCH_CACHE_BASE": str(other)})
    assert r.returncode == 0 and "made under source 0123456789abcdef" in r.stdout, r.stdout + r.stderr
    assert "aotautograd entries are left out" in r.stdout
    assert (other / "crossvit_fast-triton-cache/bbb/k.cubin").exists()
    assert (other / "crossvit_fast-inductor-cache/fxgraph/xy/entry").exists()
    assert not (other / "crossvit_fast-inductor-cache/aotautograd").exists()


def test_gpu_cache_splits_what_one_returned_file_cannot_hold(tmp_path):
    """An archive over the part size comes back in parts (NAME.part-a, -b, ...); add joins them into one archive."""
    gpu, carry = tmp_path / "gpu", tmp_path / "carry"
    env = {**os.environ, "CVF_BENCH_CACHE_BASE": str(gpu), "CVF_BENCH_CARRY_DIR": str(carry),
           "CVF_BENCH_CACHE_PART_BYTES": "40000"}
    marker = tmp_path / "marker"
    marker.write_text("")
    blob = gpu / "crossvit_fast-inductor-cache" / "fxgraph" / "blob"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(os.urandom(100_000))  # incompressible: three parts of at most 40,000 bytes
    out = tmp_path / "ret" / "cache-tests-ops.tar.xz"
    out.parent.mkdir()
    r = _cache_sh("pack", str(out), str(marker), env=env)
    assert r.returncode == 0 and "3 parts" in r.stdout, r.stdout + r.stderr
    parts = sorted(os.listdir(out.parent))
    assert parts == ["cache-tests-ops.tar.xz.part-a", "cache-tests-ops.tar.xz.part-b", "cache-tests-ops.tar.xz.part-c"]
    assert all(os.path.getsize(out.parent / p) <= 40000 for p in parts)
    r = _cache_sh("add", *[str(out.parent / p) for p in parts], env={**env, "CARRY_WARN_MIB": "0"})
    assert r.returncode == 0 and os.listdir(carry) == ["run-001-cache-tests-ops.tar.xz"], r.stdout + r.stderr
    assert "over 0 MiB" in r.stdout  # the older name of CVF_BENCH_CARRY_WARN_MIB, documented, still read
    r = _cache_sh("unpack", env={**env, "CVF_BENCH_CACHE_BASE": str(tmp_path / "here")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "here" / "crossvit_fast-inductor-cache" / "fxgraph" / "blob").read_bytes() == blob.read_bytes()


def test_time_by_kind():
    """Kernel kinds from names, and busy time as the union of intervals: the rest of the span is launch gaps."""
    kernels = [  # (name, start_us, end_us) over 2 steps
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 0.0, 100.0),
        ("void at::native::vectorized_layer_norm_kernel<float, float>", 90.0, 150.0),  # overlaps the GEMM
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 200.0, 260.0),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", 300.0, 320.0),
        ("triton_poi_fused_add_gelu_3", 320.0, 325.0),
        ("_linear_dz_kernel", 325.0, 330.0),
        ("_fwd_tokens_kernel", 330.0, 340.0),
        ("Memcpy DtoD (Device -> Device)", 340.0, 350.0),
        ("some_unknown_kernel", 350.0, 400.0),
    ]
    t = bench_model.time_by_kind(kernels, steps=2)
    want = {"gemm": 0.05, "layer_norm": 0.03, "attention": 0.035, "elementwise": 0.015, "copy": 0.005,
            "other": 0.025, "span": 0.2, "busy": 0.155, "gaps": 0.045}
    assert t == pytest.approx(want, abs=1e-12)
    assert bench_model.time_by_kind([], 1)["span"] == 0.0
    table = bench_model.profile_markdown([{"model": "m", "pass": "forward", "dtype": "bfloat16", "batch": 8,
                                           "provider": "timm", "ms_by_kind": t}])
    assert "| m | forward | bfloat16 | 8 | timm | 0.050 | 0.035 | 0.030 | 0.015 | 0.005 | 0.025 | 0.045 | 0.200 |" in table


def test_model_bench_goes_on_after_a_failed_case(tmp_path, monkeypatch, capsys):
    """A provider that fails (a capture, a compile) is reported and recorded; the other cases still run."""
    def fake_case(name, batch, dtype, pass_, provider, gmacs, bf16_tflops, rep_ms, graphs="none"):
        if provider == "crossvit_fast" and graphs == "runner":
            raise RuntimeError("operation not permitted when stream is capturing")
        settings = {"model": name, "batch": batch, "dtype": dtype, "pass": pass_, "img_size": 240, "graphs": graphs}
        return timed_row(settings, provider, [1.0], images_per_s=batch / 1e-3, tflops=1.0, peak_mem_mb=1.0, mfu=0.1)

    monkeypatch.setattr(bench_model, "require_cuda", lambda name: None)
    monkeypatch.setattr(bench_model, "measure_ceilings", lambda: {"copy_gb_per_s": 1.0, "bf16_matmul_tflops": 1.0})
    monkeypatch.setattr(bench_model, "run_case", fake_case)
    rc = bench_model.main(["crossvit_9_240", "--batch", "1", "--dtype", "bfloat16", "--passes", "forward",
                           "--providers", "timm", "crossvit_fast", "--graphs", "none", "runner",
                           "--out-dir", str(tmp_path), "--no-plot"])
    assert rc == 1 and "FAILED: RuntimeError: operation not permitted" in capsys.readouterr().out
    [path] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    with open(tmp_path / path) as f:
        data = json.load(f)
    assert data["complete"] and len(data["rows"]) == 3
    assert data["failures"][0]["provider"] == "crossvit_fast" and data["failures"][0]["graphs"] == "runner"


def test_profile_counts_kernels_not_annotations():
    """A record_function range mirrored onto the GPU timeline (Inductor's compiled-graph call, the optimizer step)
    has the CUDA device type too; it is not a kernel and must not count as one."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def ev(name, t0, t1, device_type=DeviceType.CUDA, annotation=False):
        return NS(name=name, time_range=NS(start=t0, end=t1), device_type=device_type, is_user_annotation=annotation)

    events = [ev("aten::linear", 0.0, 5.0, DeviceType.CPU), ev("sm90_xmma_gemm_bf16", 10.0, 20.0),
              ev("## Call CompiledFxGraph abc ##", 0.0, 100.0, annotation=True),
              ev("Optimizer.step#AdamW.step", 50.0, 100.0, annotation=True), ev("triton_poi_fused_add_0", 90.0, 100.0)]
    kernels = bench_model.device_kernels(events, DeviceType.CUDA)
    assert [k[0] for k in kernels] == ["sm90_xmma_gemm_bf16", "triton_poi_fused_add_0"]
    t = bench_model.time_by_kind(kernels, steps=1)
    assert t["other"] == 0.0 and t["gaps"] == pytest.approx(0.07)


def _load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_keeps_linear_cases_apart(tmp_path):
    """qkv and fc1 (N = 3C), proj and fc2 (N = C), and a branch's GEMMs and block: one row each in the table."""
    report = _load_report()
    rec = new_record("linear", {"copy_gb_per_s": 3000.0, "bf16_matmul_tflops": 700.0})
    base = {"model": "crossvit_18_dagger_240", "branch": "L", "batch": 256, "pass": "forward", "dtype": "bfloat16"}
    for gemm, K, N, ms in (("qkv", 448, 1344, 1.0), ("fc1", 448, 1344, 2.0), ("proj", 448, 448, 3.0),
                           ("fc2", 1344, 448, 4.0)):
        case = {"kind": "gemm", **base, "gemm": gemm, "M": 256 * 197, "K": K, "N": N, "T": 197}
        rec["rows"] += [timed_row(case, "crossvit_fast", [ms]), timed_row(case, "cublas", [ms / 2])]
    block = {"kind": "block", **base, "T": 197, "C": 448, "heads": 7, "mlp_ratio": 3.0}
    rec["rows"].append(timed_row(block, "crossvit_fast", [5.0]))
    write_record(rec, str(tmp_path))
    text = report.summary(report.load_records(str(tmp_path)), str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| gemm |") or line.startswith("| block |")]
    assert len(rows) == 5, text
    assert sorted(float(r.split("|")[-3]) for r in rows) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_readme_results_come_from_the_committed_records():
    report = _load_report()
    with open(os.path.join(ROOT, "README.md")) as f:
        doc = f.read()
    block = doc.split(report.BEGIN, 1)[1].split(report.END, 1)[0].strip()
    assert block == report.summary(report.load_records()).strip(), "run: python bench/report.py --readme --plot"


def test_report_tables(tmp_path):
    report = _load_report()
    ceil = {"copy_gb_per_s": 3000.0, "bf16_matmul_tflops": 700.0}
    old = new_record("model", ceil)
    old["created"], old["device"], old["commit"] = "2026-01-01T00:00:00+00:00", "NVIDIA H100 80GB HBM3", "older"
    old["rows"] = [timed_row({"model": "crossvit_9_240", "batch": 256, "dtype": "bfloat16", "pass": "forward"},
                             "timm", [99.0], images_per_s=1.0)]
    rec = new_record("model", ceil)
    rec["device"], rec["created"] = "NVIDIA H100 80GB HBM3", "2026-02-01T00:00:00+00:00"
    base = {"model": "crossvit_18_dagger_240", "batch": 256, "dtype": "bfloat16", "pass": "forward", "graphs": "none"}
    for prov, ips in (("timm", 10000.0), ("crossvit_fast", 15000.0), ("timm-compiled", 12500.0)):
        rec["rows"].append(timed_row(base, prov, [256 / ips * 1e3], images_per_s=ips))
    rec["rows"].append(timed_row({**base, "graphs": "runner"}, "crossvit_fast", [1.0], images_per_s=1e6))
    later = new_record("model", ceil)  # same commit, a second run (another phase): merged with the first
    later["device"], later["created"], later["commit"] = rec["device"], "2026-02-01T00:05:00+00:00", rec["commit"]
    later["rows"] = [timed_row({**base, "pass": "train_step"}, "timm", [1.0], images_per_s=3000.0)]
    big = {**base, "model": "crossvit_18_dagger_408", "dtype": "float32", "pass": "train_step"}
    later["skipped"] = [{**big, "provider": "timm", "reason": "out of memory"},
                        {**base, "provider": "timm", "reason": "out of memory"}]  # measured in another run: not listed
    op = new_record("layer_norm", ceil)
    op["device"], op["complete"] = "NVIDIA H100 80GB HBM3", False
    case = {"batch": 256, "dtype": "bfloat16", "pass": "forward", "N": 401, "C": 224, "residual": True}
    op["rows"] = [timed_row(case, "crossvit_fast", [0.1]), timed_row(case, "reference", [0.3]),
                  timed_row(case, "reference-compiled", [0.12])]
    for r in (old, rec, later, op):
        write_record(r, str(tmp_path))
    text = report.summary(report.load_records(str(tmp_path)), str(tmp_path))
    assert "| model | pass | dtype | batch | timm | timm-compiled | crossvit_fast | crossvit_fast vs timm |" in text
    assert "| crossvit_18_dagger_240 | forward | bfloat16 | 256 | 10000 | 12500 | 15000 | 1.50x |" in text
    assert "crossvit_9_240" not in text  # the older commit's record of the same device is not used
    assert "| crossvit_18_dagger_240 | train_step | bfloat16 | 256 | 3000 | - | - | - |" in text
    assert "Out of memory, so not in the table: crossvit_18_dagger_408 train_step float32 batch 256 (timm)." in text
    assert "| 256 | bfloat16 | forward | 401 | 224 | True | 0.1000 | 3.00x | 1.20x |" in text
    assert "incomplete record" in text and "NVIDIA H100 80GB HBM3, torch" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.rewrite_readme(text, str(readme))
    assert readme.read_text() == f"intro\n{report.BEGIN}\n{text.rstrip()}\n{report.END}\nrest\n"


def test_cpu_time_samples_interleaves_after_the_warm_up():
    from crossvit_fast.bench_utils import cpu_time_samples

    order = []
    res = cpu_time_samples({"a": lambda: order.append("a"), ("b", 1): lambda: order.append("b")}, reps=3)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert all(len(cpu) == len(wall) == 3 and min(cpu + wall) >= 0 for cpu, wall in res.values())


def test_time_provider_skips_a_failing_provider(capsys):
    """A provider that cannot run a case (a compile or launch error, OOM) gets no row and the benchmark goes on; an
    eager fallback of a compiled provider still ends the run (its timing would be a wrong baseline)."""
    from crossvit_fast.bench_utils import EagerFallbackError, time_provider

    def broken():
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory\nmore")

    assert time_provider(broken, "crossvit_fast", "case", 1, 1) is None
    out = capsys.readouterr().out
    assert "crossvit_fast" in out and "skipped (RuntimeError)" in out and "shared memory" in out and "more" not in out

    def falls_back():
        raise EagerFallbackError("recompiled")

    with pytest.raises(EagerFallbackError):
        time_provider(falls_back, "reference", "case", 1, 1)


def test_readme_plot_is_the_model_benchmarks_plot(tmp_path):
    """bench/report.py --plot draws the newest model record with bench_model.plot, CUDA-graph rows left out."""
    pytest.importorskip("matplotlib")
    report = _load_report()
    rows = [{"model": "crossvit_9_240", "pass": "forward", "dtype": "bfloat16", "batch": 256, "provider": p,
             "graphs": g, "images_per_s": v, "median_ms": 1.0, "samples_ms": [1.0]}
            for p, v in (("timm", 1000.0), ("crossvit_fast", 1500.0)) for g in ("none", "runner")]
    rec = {"benchmark": "model", "device": "GPU", "torch": "2.11", "triton": "3.6.0", "commit": "abc",
           "created": "2026-11-23T00:00:00+00:00", "ceilings": {}, "rows": rows, "_path": "model.json"}
    path = report.plot([rec], str(tmp_path / "model.png"))
    assert path and os.path.getsize(path) > 0
    assert bench_model.plot({**rec, "rows": [r for r in rows if r["graphs"] == "runner"]}, str(tmp_path / "x.png")) \
        is None


def test_gemm_tiles_names_the_autotuners_picks(monkeypatch):
    kl = pytest.importorskip("crossvit_fast.kernels.linear", reason="triton is not installed")
    x = torch.randn(2, 5, 16)
    w = torch.randn(48, 16, dtype=torch.float16)
    o = torch.empty(2, 5, 48, dtype=torch.float16)
    fwd = kl._tune_key("fwd", 10, 48, 16, (True, True, False, False, False, True), [x, w], [o])
    dgrad = kl._tune_key("dgrad", 10, 48, 16, (True, False, True), [o, w], [x])
    monkeypatch.setattr(kl.TUNER, "chosen", {fwd: (128, 128, 64, 8, 3), dgrad: (64, 64, 64, 4, 4)})
    assert gemm_tiles() == [
        {"kernel": "fwd", "rows_bucket": 16, "N": 48, "K": 16, "parts": ["ln", "bias", "save"], "dtype": "float16",
         "tile": "128x128x64/w8/s3"},
        {"kernel": "dgrad", "rows_bucket": 16, "N": 48, "K": 16, "parts": ["gelu", "store_dz"], "dtype": "float16",
         "tile": "64x64x64/w4/s4"},
    ]
    json.dumps(gemm_tiles())


def test_verified_ops_reads_the_junit_reports(tmp_path):
    """bench/verified_ops.py: an op is verified when each of its test files reported, none failed, some passed."""
    def report(name, cases):
        body = "".join(f'<testcase classname="tests.{name}" name="t{i}">{kind}</testcase>'
                       for i, kind in enumerate(cases))
        path = tmp_path / f"junit-{name}.xml"
        path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
        return str(path)

    ok, skip, fail, err = "", '<skipped message="x"/>', '<failure message="x"/>', '<error message="x"/>'
    no_gpu = '<skipped message="needs a CUDA GPU"/>'
    paths = [report("test_cls_cross_attention", [ok, ok, skip]), report("test_self_attention", [ok, fail]),
             report("test_layer_norm", [skip]), report("test_linear", [ok]), report("test_block", [ok, err])]
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "verified_ops.py")
    r = subprocess.run([sys.executable, script, *paths, "--arch", "sm_90"], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines()}
    cls = lines["cls_cross_attention"]
    assert "verified on sm_90" in cls and "2 passed / 0 failed / 1 skipped" in cls
    assert "NOT verified: 1 failed in test_self_attention.py" in lines["self_attention"]
    assert "NOT verified: nothing passed in test_layer_norm.py" in lines["layer_norm"]
    assert "NOT verified: 1 failed in test_block.py" in lines["linear"]
    assert r.stdout.strip().endswith('GPU_VERIFIED_OPS entry for sm_90: {"cls_cross_attention": frozenset({"sm_90"})}')
    r = subprocess.run([sys.executable, script, paths[3], str(tmp_path / "cut-off.xml"), "--arch", "sm_90"],
                       capture_output=True, text=True)
    assert "NOT verified: no report of test_block.py" in r.stdout and "cut-off.xml left out" in r.stderr
    paths[4] = report("test_block", [ok, no_gpu])
    r = subprocess.run([sys.executable, script, paths[3], paths[4], "--arch", "sm_90"], capture_output=True, text=True)
    assert "NOT verified: 1 CUDA tests skipped in test_block.py (no GPU seen)" in r.stdout
