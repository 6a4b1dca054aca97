"""Benchmark plumbing shared by ``bench/`` and ``crossvit-fast bench``: device timing, the ceilings, the records.

Record format: top-level ``benchmark, device, torch, triton, commit, created, ceilings, rows``;
each row holds its settings (``model, batch, dtype, pass`` and shape fields), ``provider``, ``median_ms``,
``samples_ms`` and, where they fit, ``images_per_s, gb_per_s, tflops, peak_mem_mb``.

Timings are GPU timings: on a machine without CUDA, :func:`require_cuda` stops a benchmark with a message, since
CPU timings never stand in for GPU claims.

Records are written as they grow: a script calls :func:`write_record` after every case (same path each time, an
atomic replace), so a run cut off by a time limit leaves a valid partial record (``"complete": false``).

Op benchmarks (``bench/bench_<op>.py``) are each an :class:`OpBench`, its cases, a setup per provider and its
bytes/FLOP formulas; :func:`run_op_bench` gives them one command line, provider selection, timing, ceilings, rows
and records. :func:`cpu_time_samples` is the CPU timing (``bench/bench_cpu_optimize.py``).

Compiled baselines: dynamo keeps its compiled graphs per code object and, past ``recompile_limit`` (8) of them,
silently runs the function eagerly. :func:`compile_fresh` gives each case its own compiled callable (the caches are
reset first) and :func:`assert_compiled` fails loudly when a call still ran any frame eagerly.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from crossvit_fast.config import env

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
    if env("CROSSVIT_FAST_COMMIT"):
        return env("CROSSVIT_FAST_COMMIT")
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


def cpu_time_samples(calls: Dict[object, Callable[[], object]], reps: int,
                     warm_calls: int = 2) -> Dict[object, Tuple[List[float], List[float]]]:
    """CPU timings: ``(cpu_ms, wall_ms)`` samples of each of ``calls``, ``reps`` interleaved rounds after
    ``warm_calls`` warm-up calls each. With one intra-op thread the calling thread's CPU time
    (``time.thread_time``) measures the work even on a shared machine; the wall time is kept beside it."""
    for call in calls.values():
        for _ in range(warm_calls):
            call()
    out: Dict[object, Tuple[List[float], List[float]]] = {k: ([], []) for k in calls}
    for _ in range(reps):
        for k, call in calls.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            call()
            out[k][0].append((time.thread_time() - c0) * 1e3)
            out[k][1].append((time.perf_counter() - w0) * 1e3)
    return out


def bar_plot(record: Dict[str, object], path: str, providers: Sequence[str], group_by: Sequence[str],
             x_by: Sequence[str], value: str, x_label: Callable[[Dict[str, object]], str],
             title: Callable[[Dict[str, object]], str], ylabel: str,
             ceiling: Optional[Tuple[float, str]] = None, annotate: Optional[str] = None) -> Optional[str]:
    """Bars of the rows' ``value`` per provider (in ``providers`` order): one panel per distinct ``group_by``
    settings (titled ``title(settings)``), one bar group per distinct ``x_by`` settings (labelled
    ``x_label(settings)``); ``ceiling`` ``(value, label)`` adds a dashed line, ``annotate`` names a row field written
    as ``x<value>`` over its bar. Saved as ``path`` with a ``.png`` suffix; None without matplotlib or rows."""
    plt = pyplot()
    rows = record["rows"]
    groups = sorted({tuple(r[k] for k in group_by) for r in rows})
    if plt is None or not groups:
        return None
    n_x = len({tuple(r[k] for k in x_by) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8.0, 0.6 * n_x), 4.0 * len(groups)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        sub = [r for r in rows if tuple(r[k] for k in group_by) == group]
        keys = sorted({tuple(r[k] for k in x_by) for r in sub})
        provs = [p for p in providers if any(r["provider"] == p for r in sub)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            by_key = {tuple(r[k] for k in x_by): r for r in sub if r["provider"] == p}
            shown = [(j, by_key[k]) for j, k in enumerate(keys) if k in by_key]
            bars = ax.bar([j + i * width for j, _ in shown], [r[value] for _, r in shown], width, label=p)
            for bar, (_, r) in zip(bars, shown):
                if annotate in r:
                    ax.annotate(f"x{r[annotate]:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6)
        if ceiling is not None:
            ax.axhline(ceiling[0], color="k", lw=0.8, ls="--", label=ceiling[1])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([x_label(dict(zip(x_by, k))) for k in keys], fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title(dict(zip(group_by, group))), fontsize=9)
        ax.legend(fontsize=7, ncol=len(provs) + (ceiling is not None))
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


PASSES = ("forward", "forward+backward")


def pass_call(run: Callable[[], object], backward: bool, leaves: Sequence[torch.Tensor] = (),
              grads: object = None, outputs: Optional[Callable[[object], object]] = None) -> Callable[[], object]:
    """The callable an op benchmark times: ``run()`` under ``no_grad`` (``forward``), or ``torch.autograd.grad`` of
    its outputs (``outputs(result)``, by default the result) w.r.t. ``leaves`` with ``grads`` (``forward+backward``:
    nothing accumulates)."""
    if not backward:
        def forward():
            with torch.no_grad():
                return run()

        return forward

    def forward_backward():
        res = run()
        return torch.autograd.grad(outputs(res) if outputs else res, list(leaves), grads)

    return forward_backward


@dataclass
class OpBench:
    """One op benchmark, what ``bench/bench_<op>.py`` gives :func:`run_op_bench`.

    ``cases(args)``: the cases, each a dict of settings that starts its rows; ``inputs(case, device)``: the tensors a
    case's providers share; ``setup(case, provider, inputs)``: the callable to time (:func:`pass_call`), or None where
    the provider is not available here; ``metrics(case, median_ms, ceilings)``: the row's rates (``gb_per_s``,
    ``tflops``, ...); ``arguments(parser)``: the op's own flags. Optional: ``case_providers(case, providers)`` (the
    providers that apply to a case, default all requested), ``finish(case, rows)`` (fields across a case's rows,
    ratios printed), ``plot(record, path)``, ``tiles(case)`` (whether a row names the GEMM tiles its provider tuned;
    set, the record keeps ``gemm_tiles``), ``conventions`` (record keys saying how bytes or FLOPs are counted).
    """

    name: str
    doc: str
    providers: Sequence[str]
    cases: Callable[[argparse.Namespace], List[Dict[str, object]]]
    inputs: Callable[[Dict[str, object], str], object]
    setup: Callable[[Dict[str, object], str, object], Optional[Callable[[], object]]]
    metrics: Callable[[Dict[str, object], float, Dict[str, float]], Dict[str, object]]
    arguments: Callable[[argparse.ArgumentParser], None]
    batches: Sequence[int] = (64, 256)
    dtypes: Optional[Sequence[str]] = None
    warmup_ms: float = 50
    rep_ms: float = 300
    conventions: Dict[str, str] = field(default_factory=dict)
    providers_help: Optional[str] = None
    case_providers: Optional[Callable[[Dict[str, object], Sequence[str]], List[str]]] = None
    finish: Optional[Callable[[Dict[str, object], List[Dict[str, object]]], None]] = None
    plot: Optional[Callable[[Dict[str, object], str], Optional[str]]] = None
    tiles: Optional[Callable[[Dict[str, object]], bool]] = None


def op_parser(bench: OpBench) -> argparse.ArgumentParser:
    """The command line every op benchmark shares, with the op's own flags; ``--dtype`` where the op has dtypes."""
    p = argparse.ArgumentParser(description=bench.doc.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    bench.arguments(p)
    p.add_argument("--batch", type=int, nargs="+", default=list(bench.batches))
    if bench.dtypes is not None:
        p.add_argument("--dtype", nargs="+", default=list(bench.dtypes), choices=sorted(DTYPES))
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(bench.providers), choices=bench.providers,
                   help=bench.providers_help)
    p.add_argument("--warmup-ms", type=float, default=bench.warmup_ms)
    p.add_argument("--rep-ms", type=float, default=bench.rep_ms)
    p.add_argument("--out-dir", default=None, help="where the JSON record goes (default bench/results/)")
    p.add_argument("--no-plot", action="store_true",
                   help=None if bench.plot else "accepted for symmetry with the other benches (no plot)")
    return p


def _describe(case: Dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def _row_line(row: Dict[str, object]) -> str:
    parts = [f"  {row['provider']:20s} {row['median_ms']:9.4f} ms"]
    if "gb_per_s" in row:
        parts.append(f"{row['gb_per_s']:8.1f} GB/s")
    if "frac_of_copy" in row:
        parts.append(f"({100 * row['frac_of_copy']:5.1f}% of copy)")
    if "tflops" in row:
        parts.append(f"{row['tflops']:7.1f} TFLOP/s")
    parts.append(f"peak +{row['peak_mem_mb']:8.1f} MB")
    if "tiles" in row:
        parts.append(f"tiles {row['tiles']}")
    return "  ".join(parts)


def _time_case(bench: OpBench, case: Dict[str, object], providers: Sequence[str], args: argparse.Namespace,
               ceilings: Dict[str, float], device: str) -> List[Dict[str, object]]:
    shared = bench.inputs(case, device)
    rows = []
    for provider in providers:
        call = bench.setup(case, provider, shared)
        if call is None:
            continue
        tuned = gemm_tiles() if bench.tiles is not None and bench.tiles(case) else None
        timed = time_provider(call, provider, str(case), args.warmup_ms, args.rep_ms)
        if timed is None:
            continue
        samples, peak_mb = timed
        row = timed_row(case, provider, samples, **bench.metrics(case, median(samples), ceilings),
                        peak_mem_mb=round(peak_mb, 1))
        if tuned is not None:
            picks = {t["kernel"]: t["tile"] for t in gemm_tiles() if t not in tuned}
            if picks:
                row["tiles"] = picks
        rows.append(row)
        print(_row_line(row), flush=True)
    if bench.finish is not None:
        bench.finish(case, rows)
    return rows


def run_op_bench(bench: OpBench, argv: Optional[Sequence[str]] = None, device: str = "cuda") -> int:
    """An op benchmark's command line: list the cases (``--dry-run``), or measure the ceilings, time each case's
    providers on ``device`` and rewrite the record after every case; the plot beside it where the op has one."""
    args = op_parser(bench).parse_args(argv)
    plan = [(case, bench.case_providers(case, args.providers) if bench.case_providers else list(args.providers))
            for case in bench.cases(args)]
    if args.dry_run:
        for case, providers in plan:
            print(f"{bench.name}: {_describe(case)} providers={','.join(providers)}")
        counts = " / ".join(str(n) for n in dict.fromkeys(len(p) for _, p in plan)) or "0"
        print(f"{len(plan)} cases x {counts} providers")
        return 0
    require_cuda(f"bench/bench_{bench.name}.py")
    ceilings = measure_ceilings()
    record = new_record(bench.name, ceilings)
    record.update(bench.conventions)
    print(f"device {record['device']}, ceilings {ceilings}", flush=True)
    for case, providers in plan:
        print(_describe(case), flush=True)
        record["rows"].extend(_time_case(bench, case, providers, args, ceilings, device))
        torch.cuda.empty_cache()
        if bench.tiles is not None:
            record["gemm_tiles"] = gemm_tiles()
        write_record(record, args.out_dir)
    path = write_record(record, args.out_dir, complete=True)
    print(f"wrote {path}")
    if bench.plot is not None and not args.no_plot:
        png = bench.plot(record, path)
        if png:
            print(f"wrote {png}")
    return 0
