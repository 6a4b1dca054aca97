"""Benchmark plumbing shared by ``bench/`` and ``crossvit-fast bench``: device timing, the ceilings, the records.

Record format (DEVELOPERS.md): top-level ``benchmark, device, torch, triton, commit, created, ceilings, rows``;
each row holds its settings (``model, batch, dtype, pass`` and shape fields), ``provider``, ``median_ms``,
``samples_ms`` and, where they fit, ``images_per_s, gb_per_s, tflops, peak_mem_mb``.

Timings are GPU timings: on a machine without CUDA, :func:`require_cuda` stops a benchmark with a message, since
CPU timings never stand in for GPU claims.

Records are written as they grow: a script calls :func:`write_record` after every case (same path each time, an
atomic replace), so a run cut off by a time limit leaves a valid partial record (``"complete": false``).

Compiled baselines: dynamo keeps its compiled graphs per code object and, past ``recompile_limit`` (8) of them,
silently runs the function eagerly. :func:`compile_fresh` gives each case its own compiled callable (the caches are
reset first) and :func:`assert_compiled` fails loudly when a call still ran any frame eagerly.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO_BENCH = os.path.join(os.path.dirname(_HERE), "bench")
RESULTS_DIR = os.path.join(_REPO_BENCH, "results") if os.path.isdir(_REPO_BENCH) else os.path.join(os.getcwd(), "bench_results")
"""``bench/results/`` of a source checkout; ``./bench_results`` for an installed copy."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_cuda(name: str) -> None:
    """Exit with a clear message when there is no CUDA device."""
    if not torch.cuda.is_available():
        sys.exit(f"{name}: needs a CUDA GPU (CPU timings never stand in for GPU claims); none is available here")


def _git_commit() -> str:
    """The checkout's commit (``-dirty`` when tracked files changed); ``CROSSVIT_FAST_COMMIT`` when set (a copy of the
    tree without ``.git``, such as the GPU machine's)."""
    if os.environ.get("CROSSVIT_FAST_COMMIT", "").strip():
        return os.environ["CROSSVIT_FAST_COMMIT"].strip()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=_HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except Exception:  # not a checkout (an installed copy, or git missing)
        return "unknown"


def do_bench_samples(fn: Callable[[], object], warmup_ms: float = 50, rep_ms: float = 300) -> List[float]:
    """All timings (ms) of ``fn`` with CUDA events after warm-up, via ``triton.testing.do_bench``."""
    import triton.testing

    samples = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return [float(s) for s in samples]


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def measure_ceilings(nbytes: int = 1 << 30) -> Dict[str, float]:
    """Measured copy bandwidth (GB/s, bytes read + written) and dense bf16 matmul rate (TFLOP/s) of this device."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = median(do_bench_samples(lambda: dst.copy_(src)))
    copy_gbs = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median(do_bench_samples(lambda: a @ b))
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    return {"copy_gb_per_s": round(copy_gbs, 1), "bf16_matmul_tflops": round(tflops, 1)}


class EagerFallbackError(RuntimeError):
    """A ``*-compiled`` provider ran (part of) its function eagerly: its timing would not be a compiled baseline."""


def compile_fresh(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, **kwargs)`` after resetting dynamo's caches: one compiled callable per benchmark case.

    Without the reset, every shape or model instance adds a graph to the same code object's cache, and past dynamo's
    recompile limit the "compiled" baseline silently runs eagerly.
    """
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def _dynamo_counts() -> Dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "frames": counters["frames"].get("total", 0) - counters["frames"].get("ok", 0),
        "frames_ok": counters["frames"].get("ok", 0),
        "graphs": counters["stats"].get("unique_graphs", 0),
        "limit_hits": sum(v for k, v in counters["unimplemented"].items() if "recompile limit" in k.lower()
                          or "cache_size_limit" in k or "recompile_limit" in k),
    }


def assert_compiled(call: Callable[[], object], what: str, warm_calls: int = 2) -> None:
    """Run ``call`` ``warm_calls`` times (the first compiles) and raise :class:`EagerFallbackError` if dynamo hit its
    recompile limit, failed to convert a frame, produced no graph on the first call, or was still compiling on the
    last call (a recompile on every call is no steady state to time)."""
    before = _dynamo_counts()
    call()
    first = _dynamo_counts()
    for _ in range(warm_calls - 1):
        call()
    after = _dynamo_counts()
    problems = []
    if after["limit_hits"] > before["limit_hits"]:
        problems.append("dynamo hit its recompile limit and ran the function eagerly")
    if after["frames"] > before["frames"]:
        problems.append(f"{after['frames'] - before['frames']} frame(s) were not converted (ran eagerly)")
    if first["graphs"] == before["graphs"] and first["frames_ok"] == before["frames_ok"]:
        problems.append("the first call compiled nothing (a cached graph from another case, or eager)")
    if warm_calls > 1 and (after["graphs"] > first["graphs"] or after["frames_ok"] > first["frames_ok"]):
        problems.append("it recompiled after the first call")
    if problems:
        raise EagerFallbackError(f"{what}: not a compiled baseline: " + "; ".join(problems))


def new_record(benchmark: str, ceilings: Dict[str, float]) -> Dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "benchmark": benchmark,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "ceilings": ceilings,
        "complete": False,
        "rows": [],
    }


def time_provider(call: Callable[[], object], provider: str, what: str, warmup_ms: float,
                  rep_ms: float) -> Optional[Tuple[List[float], float]]:
    """``(samples_ms, peak_mb)`` of one provider's ``call``, or None where it cannot run the case (out of memory, a
    compile or launch failure: printed, no row, the benchmark goes on to the next provider). A ``*-compiled``
    provider's warm-up must show that dynamo compiled it (:func:`assert_compiled`); an
    :class:`EagerFallbackError` ends the run, as a timed eager baseline would be a wrong record. ``peak_mb`` is the
    memory one call allocates beyond what was allocated before it."""
    try:
        if provider.endswith("-compiled"):
            assert_compiled(call, f"{provider} {what}")
        else:
            call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        return do_bench_samples(call, warmup_ms=warmup_ms, rep_ms=rep_ms), peak_mb
    except EagerFallbackError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        print(f"  {provider:20s} skipped ({type(e).__name__}): {msg}", flush=True)
        torch.cuda.empty_cache()
        return None


_GEMM_FLAGS = {"fwd": ("ln", "bias", "gelu", "scale", "res", "save"), "dgrad": ("gelu", "scale", "store_dz", "db")}


def gemm_tiles() -> List[Dict[str, object]]:
    """What the block-GEMM autotuner picked so far in this process, one dict per key (kernel, the power-of-two row
    bucket, N, K, the fused parts, the compute dtype, the tile); [] without triton. Benchmarks put it in their
    records: which tile wins where is what the next tile list is pruned from."""
    try:
        from crossvit_fast.kernels import linear as kl
    except ImportError:
        return []
    out = []
    for key, cfg in kl.tuned_configs().items():
        kind, rows, n, k, flags, ins = key[:6]
        out.append({"kernel": kind, "rows_bucket": rows, "N": n, "K": k,
                    "parts": [f for f, on in zip(_GEMM_FLAGS[kind], flags) if on],
                    "dtype": str(ins[1][0]).replace("torch.", ""), "tile": kl.config_name(cfg)})
    return out


def timed_row(settings: Dict[str, object], provider: str, samples_ms: Sequence[float], **extra) -> Dict[str, object]:
    row = dict(settings)
    row["provider"] = provider
    row["median_ms"] = median(samples_ms)
    row["samples_ms"] = [round(s, 5) for s in samples_ms]
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def record_path(record: Dict[str, object], out_dir: Optional[str] = None) -> str:
    """``<out_dir>/<benchmark>-<device>-<created>.json`` (default ``bench/results/``)."""
    dev = str(record["device"]).replace(" ", "_").replace("/", "_")
    stamp = str(record["created"]).replace(":", "").replace("+0000", "Z")
    return os.path.join(out_dir or RESULTS_DIR, f"{record['benchmark']}-{dev}-{stamp}.json")


def write_record(record: Dict[str, object], out_dir: Optional[str] = None, complete: Optional[bool] = None) -> str:
    """Write ``record`` to :func:`record_path` (an atomic replace, so a reader never sees half a file); call it after
    every case and once more with ``complete=True`` at the end. Returns the path."""
    if complete is not None:
        record["complete"] = bool(complete)
    path = record_path(record, out_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt
