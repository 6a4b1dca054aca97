"""Benchmark plumbing shared by ``bench/`` and ``crossvit-fast bench``: device timing, the ceilings, the records.

Record format (DEVELOPERS.md): top-level ``benchmark, device, torch, triton, commit, created, ceilings, rows``;
each row holds its settings (``model, batch, dtype, pass`` and shape fields), ``provider``, ``median_ms``,
``samples_ms`` and, where they fit, ``images_per_s, gb_per_s, tflops, peak_mem_mb``.

Timings are GPU timings: on a machine without CUDA, :func:`require_cuda` stops a benchmark with a message, since
CPU timings never stand in for GPU claims.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

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
        "rows": [],
    }


def timed_row(settings: Dict[str, object], provider: str, samples_ms: Sequence[float], **extra) -> Dict[str, object]:
    row = dict(settings)
    row["provider"] = provider
    row["median_ms"] = median(samples_ms)
    row["samples_ms"] = [round(s, 5) for s in samples_ms]
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def write_record(record: Dict[str, object], out_dir: Optional[str] = None) -> str:
    """Write ``record`` as ``bench/results/<benchmark>-<device>-<created>.json``; returns the path."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    dev = str(record["device"]).replace(" ", "_").replace("/", "_")
    stamp = str(record["created"]).replace(":", "").replace("+0000", "Z")
    path = os.path.join(out_dir, f"{record['benchmark']}-{dev}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
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
