"""End-to-end model benchmark: images/s for inference and for a training step, per provider (``crossvit-fast bench``).

Providers: ``timm`` and ``timm-compiled`` (when timm is importable), ``reference`` (crossvit_fast's reference path),
``crossvit_fast`` (the fused Triton kernels) and ``crossvit_fast-compiled`` (the same under ``torch.compile``). A
compiled provider is compiled afresh for every case (``compile_fresh``) and checked after its warm-up
(``assert_compiled``): a case that dynamo ran eagerly stops the run instead of being timed as compiled.
Passes: ``forward`` (eval, no grad) and ``train_step`` (forward + cross-entropy + backward + AdamW step).
``bfloat16`` means bf16 autocast over float32 weights, as people train; ``float32`` means no autocast.

Each run measures the device's copy bandwidth and bf16 matmul rate, times every case with CUDA events
(``triton.testing.do_bench``, median), and writes one JSON record (``benchmark: "model"``), a markdown table and a
plot under ``bench/results/``. MFU = model FLOPs (2 x fvcore's multiply-adds; x3 for a training step) per second
over the measured bf16 matmul rate. ``--profile`` adds, for the first model, batch and dtype, a torch.profiler run of
each requested provider and pass: the time a step by kernel kind (GEMM, attention, LayerNorm, elementwise, copies,
other, and the gaps where the GPU waited for launches) in the record's ``profile`` and a ``-profile.txt`` beside it;
``--profile-only`` does that without the timings.
CUDA only: CPU timings never stand in for GPU claims.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from crossvit_fast.bench_utils import (
    EagerFallbackError,
    assert_compiled,
    bar_plot,
    compile_fresh,
    do_bench_samples,
    gemm_tiles,
    measure_ceilings,
    median,
    new_record,
    require_cuda,
    timed_row,
    write_record,
)

NAME = "model"
MODELS = ("crossvit_9_240", "crossvit_18_dagger_240", "crossvit_18_dagger_408")
BATCHES = (64, 256)
DTYPES = ("bfloat16", "float32")
PASSES = ("forward", "train_step")
PROVIDERS = ("timm", "timm-compiled", "reference", "crossvit_fast", "crossvit_fast-compiled")

def _gmacs(name: str) -> float:
    try:
        import fvcore  # noqa: F401
    except ImportError:
        from crossvit_fast.models import MODEL_GMACS

        return MODEL_GMACS[name]
    import crossvit_fast

    return crossvit_fast.flops(crossvit_fast.create_model(name, backend="reference").eval()).total() / 1e9


def _img_size(name: str) -> int:
    import crossvit_fast

    return crossvit_fast.model_config(name)["kwargs"]["img_size"]


GRAPHS = ("none", "runner", "reduce-overhead")
"""CUDA graphs: ``none``; ``runner``: an eager provider's forward captured by :class:`crossvit_fast.graphs.CUDAGraphRunner`;
``reduce-overhead``: a compiled provider under ``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA graphs)."""


def graphs_apply(provider: str, pass_: str, graphs: str) -> bool:
    """Whether the ``graphs`` variant exists for this provider and pass (graphs are for inference here)."""
    if graphs == "none":
        return True
    if pass_ != "forward":
        return False
    return provider.endswith("-compiled") == (graphs == "reduce-overhead")


def build(provider: str, name: str, graphs: str = "none") -> Optional[torch.nn.Module]:
    """The model of ``provider`` on CUDA in float32, or None when the provider is not available here."""
    import crossvit_fast

    if provider.startswith("timm"):
        try:
            import timm
        except ImportError:
            return None
        model = timm.create_model(name, pretrained=False)
    else:
        backend = "reference" if provider == "reference" else "triton"
        model = crossvit_fast.create_model(name, backend=backend)
    model = model.cuda()
    if not provider.endswith("-compiled"):
        return model
    return compile_fresh(model, mode="reduce-overhead") if graphs == "reduce-overhead" else compile_fresh(model)


def step_fn(model: torch.nn.Module, pass_: str, dtype: str, batch: int, img: int,
            graphs: str = "none") -> Callable[[], object]:
    x = torch.randn(batch, 3, img, img, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=(dtype == "bfloat16"))
    if pass_ == "forward" and graphs == "runner":
        from crossvit_fast.graphs import CUDAGraphRunner

        runner = CUDAGraphRunner(model.eval(), x, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
        return lambda: runner(x)
    if pass_ == "forward" and graphs == "reduce-overhead":
        from crossvit_fast.graphs import tuned_configs_pinned

        model.eval()
        with torch.no_grad(), autocast:  # autotune self-attention once, eagerly, outside any capture
            getattr(model, "_orig_mod", model)(x)

        def fwd_graphed():  # Inductor's CUDA graphs capture on the second call: launch the tuned configs
            with torch.no_grad(), autocast, tuned_configs_pinned():
                return model(x)

        return fwd_graphed
    if pass_ == "forward":
        model.eval()

        def fwd():
            with torch.no_grad(), autocast:
                return model(x)

        return fwd
    model.train()
    y = torch.randint(0, 1000, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train():
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def run_case(name: str, batch: int, dtype: str, pass_: str, provider: str, gmacs: float, bf16_tflops: float,
             rep_ms: float, graphs: str = "none") -> Optional[Dict[str, object]]:
    model = build(provider, name, graphs)
    if model is None:
        return None
    img = _img_size(name)
    fn = step_fn(model, pass_, dtype, batch, img, graphs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if provider.endswith("-compiled"):
        assert_compiled(fn, f"{provider} {name} batch {batch} {dtype} {pass_}")  # warm-up: compiles, autotunes
    else:
        fn()  # warm-up (autotunes)
    torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    samples = do_bench_samples(fn, warmup_ms=100, rep_ms=rep_ms)
    ms = median(samples)
    flops = 2 * gmacs * 1e9 * batch * (3 if pass_ == "train_step" else 1)
    settings = {"model": name, "batch": batch, "dtype": dtype, "pass": pass_, "img_size": img,
                "autocast": dtype == "bfloat16", "graphs": graphs}
    row = timed_row(settings, provider, samples, images_per_s=round(batch / (ms * 1e-3), 1),
                    tflops=round(flops / (ms * 1e-3) / 1e12, 2), peak_mem_mb=round(peak_mb, 1),
                    mfu=round(flops / (ms * 1e-3) / (bf16_tflops * 1e12), 4))
    del model, fn
    torch.cuda.empty_cache()
    return row


def markdown(record: Dict[str, object]) -> str:
    rows = record["rows"]
    c = record["ceilings"]
    lines = [
        f"Model benchmark on {record['device']} (torch {record['torch']}, triton {record['triton']}, commit "
        f"{record['commit']}, {record['created']}); measured ceilings: copy {c['copy_gb_per_s']} GB/s, bf16 matmul "
        f"{c['bf16_matmul_tflops']} TFLOP/s. bfloat16 = bf16 autocast; train_step = forward + backward + AdamW.",
        "",
        "| model | pass | dtype | batch | provider | CUDA graphs | ms | images/s | vs timm | MFU | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"], r["pass"], r["dtype"], r["batch"]): r["images_per_s"] for r in rows
            if r["provider"] == "timm" and r.get("graphs", "none") == "none"}
    for r in rows:
        b = base.get((r["model"], r["pass"], r["dtype"], r["batch"]))
        vs = f"{r['images_per_s'] / b:.2f}x" if b else "-"
        lines.append(f"| {r['model']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['provider']} | "
                     f"{r.get('graphs', 'none')} | {r['median_ms']:.3f} | {r['images_per_s']:.0f} | {vs} | "
                     f"{100 * r['mfu']:.1f}% | {r['peak_mem_mb']:.0f} |")
    for what, key, field in (("Out of memory (no row)", "skipped", "reason"), ("Failed", "failures", "error")):
        for r in record.get(key, []):
            lines.append(f"\n{what}: {r['model']} {r['pass']} {r['dtype']} batch {r['batch']} {r['provider']} "
                         f"(CUDA graphs {r.get('graphs', 'none')}): {r[field]}")
    return "\n".join(lines) + "\n"


def plot(record: Dict[str, object], path: str) -> Optional[str]:
    """Images/s per provider of a model record (CUDA graphs off), grouped by model, pass, dtype and batch; also the
    README's plot (``bench/report.py --plot``)."""
    rows = [r for r in record["rows"] if r.get("graphs", "none") == "none"]
    return bar_plot(
        {**record, "rows": rows}, path, PROVIDERS, (), ("model", "pass", "dtype", "batch"), "images_per_s",
        lambda k: f"{k['model'].replace('crossvit_', '')}\n{k['pass']} {k['dtype']}\nbatch {k['batch']}",
        lambda _: f"CrossViT, {record['device']} (torch {record['torch']}, triton {record['triton']}, "
                  f"{str(record['created'])[:10]})",
        "images/s")


KERNEL_KINDS = (  # (kind, pattern on the CUDA kernel's name); the first match wins
    ("attention", r"flash|fmha|sdpa|attention|attn|softmax|tokens_kernel|combine_kernel|cls_cross"),
    ("layer_norm", r"layer_?norm|layernorm"),
    ("elementwise", r"_linear_dz_kernel"),  # the GEMM backward's elementwise dz pass (DZ_FIRST), not a GEMM
    ("gemm", r"gemm|matmul|cutlass|xmma|nvjet|cublas|wgmma|s16816|_mm_|linear|conv|implicit_convolve"),
    ("copy", r"memcpy|memset|copy|cat_|catarray|transpose|permute|index|gather|scatter"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_poi|triton_per|triton_red|gelu|reduce|upsample|fill"),
)
"""Kinds for the time-by-kind table. GEMM includes the patch-embedding convolution; ``copy`` includes dtype casts
(torch's copy kernels) and concatenation; Inductor's fused pointwise and reduction kernels count as elementwise
unless their name says layer_norm or softmax."""


def kernel_kind(name: str) -> str:
    import re

    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def time_by_kind(kernels: Sequence[Tuple[str, float, float]], steps: int) -> Dict[str, float]:
    """Milliseconds a step per kernel kind, from ``(name, start_us, end_us)`` device intervals of ``steps`` steps.

    ``busy`` is the union of the kernel intervals (overlapping kernels count once), ``span`` the first start to the
    last end, and ``gaps`` = span - busy: the time the GPU waited for work (launch overhead, host sync).
    """
    out = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    out["other"] = 0.0
    if not kernels:
        return {**out, "busy": 0.0, "span": 0.0, "gaps": 0.0}
    for name, t0, t1 in kernels:
        out[kernel_kind(name)] += (t1 - t0) / 1e3 / steps
    busy, cur0, cur1 = 0.0, None, None
    for _, t0, t1 in sorted(kernels, key=lambda k: k[1]):
        if cur1 is None or t0 > cur1:
            if cur1 is not None:
                busy += cur1 - cur0
            cur0, cur1 = t0, t1
        else:
            cur1 = max(cur1, t1)
    busy += cur1 - cur0
    span = max(k[2] for k in kernels) - min(k[1] for k in kernels)
    out.update(busy=busy / 1e3 / steps, span=span / 1e3 / steps, gaps=(span - busy) / 1e3 / steps)
    return out


def device_kernels(events, device_type) -> List[Tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of the kernels, copies and memsets on the device timeline of a profile.

    Left out: user annotations mirrored onto the device (kineto's ``gpu_user_annotation``: ``record_function``
    ranges such as ``Optimizer.step#AdamW.step`` or Inductor's ``## Call CompiledFxGraph ... ##``), which carry
    the device type too but span other kernels: counted, they would add their whole span to ``other`` and hide
    the launch gaps inside it."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if getattr(e, "device_type", None) == device_type and not getattr(e, "is_user_annotation", False)]


def profile_markdown(rows: List[Dict[str, object]]) -> str:
    kinds = ["gemm", "attention", "layer_norm", "elementwise", "copy", "other", "gaps", "span"]
    lines = ["Milliseconds a step by kernel kind (gaps: the GPU idle inside the span, waiting for launches).", "",
             "| model | pass | dtype | batch | provider | " + " | ".join(kinds) + " |",
             "|---|---|---|---|---|" + "---|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pass']} | {r['dtype']} | {r['batch']} | {r['provider']} | "
                     + " | ".join(f"{r['ms_by_kind'][k]:.3f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def profile(name: str, batch: int, dtype: str, path: str,
            providers: Sequence[str] = ("timm", "timm-compiled", "crossvit_fast"),
            passes: Sequence[str] = PASSES) -> List[Dict[str, object]]:
    """torch.profiler over 5 steps of each provider and pass: the time by kernel kind (ms a step, see
    :func:`time_by_kind`) as rows, and the top kernels by CUDA time written to ``path``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as _profile

    steps, rows, text = 5, [], []
    for provider in providers:
        for pass_ in passes:
            model = build(provider, name)
            if model is None:
                continue
            fn = step_fn(model, pass_, dtype, batch, _img_size(name))
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with _profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            kernels = device_kernels(prof.events(), DeviceType.CUDA)
            rows.append({"model": name, "pass": pass_, "dtype": dtype, "batch": batch, "provider": provider,
                         "ms_by_kind": {k: round(v, 4) for k, v in time_by_kind(kernels, steps).items()}})
            text.append(f"== {provider} {name} {pass_} batch {batch} {dtype} ({steps} steps) ==")
            text.append(prof.key_averages().table(sort_by="device_time_total", row_limit=30))
            del model, fn
            torch.cuda.empty_cache()
    with open(path, "w") as f:
        f.write(profile_markdown(rows) + "\n" + "\n".join(text))
    return rows


def build_parser() -> argparse.ArgumentParser:
    from crossvit_fast.bench_utils import RESULTS_DIR

    p = argparse.ArgumentParser(
        prog="crossvit-fast bench",
        description="End-to-end model benchmark: images/s for inference and for a training step (forward + backward "
                    "+ AdamW), per provider (timm, timm-compiled, reference, crossvit_fast, crossvit_fast-compiled). "
                    "CUDA only; writes a JSON record, a markdown table and a plot.",
    )
    p.add_argument("models", nargs="*", default=list(MODELS), help=f"default: {' '.join(MODELS)}")
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--graphs", nargs="+", default=["none"], choices=GRAPHS,
                   help="CUDA-graph variants: none; runner (eager providers, forward); reduce-overhead (compiled "
                        "providers, forward)")
    p.add_argument("--latency", action="store_true",
                   help="small-batch latency: --batch 1 8 --passes forward --graphs none runner reduce-overhead")
    p.add_argument("--rep-ms", type=float, default=500)
    p.add_argument("--profile", action="store_true",
                   help="also profile the first model/batch/dtype: time by kernel kind per provider and pass")
    p.add_argument("--profile-only", action="store_true", help="only the profile, no timings")
    p.add_argument("--out-dir", default=None,
                   help=f"where the record goes (default here: {RESULTS_DIR}; bench/results/ in a source checkout, "
                        f"./bench_results for an installed copy)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.latency:
        args.batch, args.passes, args.graphs = [1, 8], ["forward"], list(GRAPHS)
    import crossvit_fast

    models = [crossvit_fast.model_config(m)["name"] for m in args.models]
    cases = [(m, b, d, p) for m in models for b in args.batch for d in args.dtype for p in args.passes]
    if args.profile_only:
        args.profile, cases = True, []
    if args.dry_run:
        for m, b, d, p in cases:
            runs = [f"{prov}" + ("" if g == "none" else f"+{g}") for g in args.graphs for prov in args.providers
                    if graphs_apply(prov, p, g)]
            print(f"{NAME}: {m} batch={b} dtype={d} pass={p} providers={','.join(runs)}")
        print(f"{len(cases)} cases x {len(args.providers)} providers x {len(args.graphs)} graph variants")
        if args.profile:
            print(f"profile: {models[0]} batch={args.batch[0]} dtype={args.dtype[0]} passes={','.join(args.passes)} "
                  f"providers={','.join(args.providers)}")
        return 0
    require_cuda("crossvit-fast bench")
    ceilings = measure_ceilings()
    print(f"ceilings: {ceilings}")
    record = new_record(NAME, ceilings)
    gmacs = {m: _gmacs(m) for m in models}
    for m, b, d, p in cases:
        print(f"{m} batch {b} {d} {p}", flush=True)
        for graphs, provider in [(g, prov) for g in args.graphs for prov in args.providers if graphs_apply(prov, p, g)]:
            label = provider + ("" if graphs == "none" else f"+{graphs}")
            try:
                row = run_case(m, b, d, p, provider, gmacs[m], ceilings["bf16_matmul_tflops"], args.rep_ms, graphs)
            except torch.cuda.OutOfMemoryError:  # not a failure of the code, but the record says why the row is absent
                print(f"  {label:24s} out of memory")
                record.setdefault("skipped", []).append({"model": m, "batch": b, "dtype": d, "pass": p,
                                                         "provider": provider, "graphs": graphs,
                                                         "reason": "out of memory"})
                write_record(record, args.out_dir)
                torch.cuda.empty_cache()
                continue
            except EagerFallbackError:
                raise
            except Exception as e:  # one provider's failure (a capture, a compile) does not cost the other cases
                import traceback

                traceback.print_exc()
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                print(f"  {label:24s} FAILED: {msg}", flush=True)
                record.setdefault("failures", []).append({"model": m, "batch": b, "dtype": d, "pass": p,
                                                          "provider": provider, "graphs": graphs, "error": msg})
                write_record(record, args.out_dir)
                torch.cuda.empty_cache()
                continue
            if row is None:
                print(f"  {label:24s} not available here")
                continue
            record["rows"].append(row)
            record["gemm_tiles"] = gemm_tiles()  # the block-GEMM autotuner's picks so far
            write_record(record, args.out_dir)  # a partial record survives a time limit
            print(f"  {label:24s} {row['median_ms']:9.2f} ms  {row['images_per_s']:9.1f} img/s  "
                  f"MFU {100 * row['mfu']:5.1f}%  peak {row['peak_mem_mb']:8.0f} MB", flush=True)
    path = write_record(record, args.out_dir, complete=True)
    base = os.path.splitext(path)[0]
    with open(base + ".md", "w") as f:
        f.write(markdown(record))
    if not args.no_plot:
        plot(record, base + ".png")
    if args.profile:
        record["profile"] = profile(models[0], args.batch[0], args.dtype[0], base + "-profile.txt", args.providers,
                                    args.passes)
        write_record(record, args.out_dir)
        print(profile_markdown(record["profile"]))
    print(f"record: {path}")
    print(markdown(record))
    if record.get("failures"):
        print(f"{len(record['failures'])} case(s) failed: {record['failures']}")
        return 1
    return 0
