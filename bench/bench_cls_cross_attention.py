"""Benchmark: fused CLS-query cross-attention (``crossvit_fast::cls_cross_attention``) against the reference.

The shapes are the fusion layers of real models, both directions (see the spec's "cross-attention fusion"):

* ``S->L``: the small branch's projected CLS queries the large branch's patch tokens: ``C = dim_L``,
  ``N = N_L`` (196, or 576 at 408), ``H = heads_L``;
* ``L->S``: the large branch's projected CLS queries the small branch's patch tokens: ``C = dim_S``,
  ``N = N_S`` (400, or 1156 at 408), ``H = heads_S``.

Every provider gets the same inputs: ``cls`` ``(B, 1, C)`` and ``tokens = x[:, 1:]``, a view of the other branch's
``(B, 1 + N, C)`` token tensor, plus the block's LayerNorm and Linear parameters; it returns ``(B, 1, C)``:

* ``crossvit_fast``: the op (reads the tokens in place, one pass; K and V are never formed);
* ``reference``: ``cls_cross_attention_ref``, timm's module as written: ``torch.cat``, LayerNorm over the
  concatenation, the ``wq``/``wk``/``wv`` Linears, explicit softmax, ``@ v``, ``proj``;
* ``reference-compiled``: ``torch.compile`` of the same function (default mode, static shapes, ``fullgraph``), a
  fresh compiled callable per case; the run stops with ``EagerFallbackError`` if dynamo ran any of it eagerly.

Passes: ``fwd`` (under ``no_grad``) and ``fwd+bwd`` (``torch.autograd.grad`` of the output w.r.t. cls, tokens and
all ten parameters with a fixed random ``dout``; nothing accumulates).

``gb_per_s`` counts the bytes the op cannot avoid, in the input dtype: forward ``B N C`` (the tokens, read once)
``+ 2 B C`` (cls, out) ``+ 4 C^2 + 6 C`` (the weights, biases and LayerNorm affine); forward + backward adds a
second read of the tokens and the write of their gradient (``2 B N C``), ``2 B C`` (dout, dcls) and the
parameters read again and their gradients written (``2 (4 C^2 + 6 C)``). ``frac_of_copy`` is that rate over the
device's measured copy bandwidth (``ceilings.copy_gb_per_s``, bytes read + written), the roof for a streaming
kernel. ``speedup`` is the ``reference`` time over the provider's time in the same case.

Timings are CUDA-event timings via ``bench.common.do_bench_samples`` (median reported, all samples stored);
the record is written to ``bench/results/`` and, where matplotlib is installed, a plot beside it.

    python bench/bench_cls_cross_attention.py                  # the whole grid
    python bench/bench_cls_cross_attention.py --dry-run        # list the cases; needs no GPU
    python bench/bench_cls_cross_attention.py --batch 64 --dtype bfloat16 --models crossvit_9_240
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    DTYPES,
    compile_fresh,
    measure_ceilings,
    median,
    new_record,
    pyplot,
    require_cuda,
    time_provider,
    timed_row,
    write_record,
)

NAME = "cls_cross_attention"
# name -> (dims (S, L), heads (S, L), patch tokens (S, L)); from the spec's model table
MODELS = {
    "crossvit_9_240": ((128, 256), (4, 4), (400, 196)),
    "crossvit_18_dagger_240": ((224, 448), (7, 7), (400, 196)),
    "crossvit_18_dagger_408": ((224, 448), (7, 7), (1156, 576)),
}
DIRECTIONS = ("S->L", "L->S")
BATCHES = (64, 256)
PASSES = ("forward", "forward+backward")
PROVIDERS = ("crossvit_fast", "reference", "reference-compiled")
PARAM_NAMES = ("norm_weight", "norm_bias", "wq", "bq", "wk", "bk", "wv", "bv", "wproj", "bproj")


def fusion_shape(model: str, direction: str) -> Dict[str, int]:
    """``C, N, heads`` of the fusion in ``direction``: the CLS of one branch over the other branch's tokens."""
    dims, heads, tokens = MODELS[model]
    j = 1 if direction == "S->L" else 0  # the branch whose tokens are the keys
    return {"C": dims[j], "N": tokens[j], "heads": heads[j]}


def ideal_bytes(B: int, N: int, C: int, elt: int, pass_: str) -> int:
    params = 4 * C * C + 6 * C
    fwd = B * N * C + 2 * B * C + params
    return elt * (fwd if pass_ == "forward" else fwd + 2 * B * N * C + 2 * B * C + 2 * params)


def cases(args) -> List[Dict[str, object]]:
    out = []
    for model, direction, batch, dtype, pass_ in itertools.product(
        args.models, args.directions, args.batch, args.dtype, args.passes
    ):
        out.append({"model": model, "direction": direction, "batch": batch, "dtype": dtype, "pass": pass_,
                    **fusion_shape(model, direction)})
    return out


def provider_fn(provider: str) -> Callable:
    """The callable of ``provider``; called once per case (a compiled provider is compiled afresh for it)."""
    from crossvit_fast.reference import cls_cross_attention_ref

    if provider == "crossvit_fast":
        from crossvit_fast.ops.cls_cross_attention import cls_cross_attention

        return cls_cross_attention
    if provider == "reference":
        return cls_cross_attention_ref
    if provider == "reference-compiled":
        return compile_fresh(cls_cross_attention_ref, dynamic=False, fullgraph=True)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


def make_inputs(B: int, N: int, C: int, dtype: torch.dtype, requires_grad: bool):
    """(cls, tokens view, params in PARAM_NAMES order): realistic scales, tokens = x[:, 1:] of a (B, 1+N, C)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device="cuda", dtype=torch.float32, generator=g) * scale + shift
        return t.to(dtype).requires_grad_(requires_grad)

    cls = rnd(B, 1, C)
    x = rnd(B, 1 + N, C)
    params = [rnd(C, scale=0.1, shift=1.0), rnd(C, scale=0.1)]
    for _ in range(4):
        params += [rnd(C, C, scale=0.05), rnd(C, scale=0.05)]
    return cls, x[:, 1:], params


def run_case(case: Dict[str, object], providers, warmup_ms: float, rep_ms: float, copy_gbs: float):
    B, N, C, H = case["batch"], case["N"], case["C"], case["heads"]
    dtype = DTYPES[case["dtype"]]
    bwd = case["pass"] == "forward+backward"
    cls, tokens, params = make_inputs(B, N, C, dtype, bwd)
    dout = torch.randn(B, 1, C, device="cuda", dtype=dtype)
    nbytes = ideal_bytes(B, N, C, torch.finfo(dtype).bits // 8, case["pass"])
    rows = []
    for provider in providers:
        f = provider_fn(provider)
        if bwd:
            def call(f=f):
                out = f(cls, tokens, *params, H)
                return torch.autograd.grad(out, [cls, tokens, *params], dout)
        else:
            def call(f=f):
                with torch.no_grad():
                    return f(cls, tokens, *params, H)
        timed = time_provider(call, provider, str(case), warmup_ms, rep_ms)
        if timed is None:
            continue
        samples, peak_mb = timed
        ms = median(samples)
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = timed_row(case, provider, samples, gb_per_s=round(gbs, 1), frac_of_copy=round(gbs / copy_gbs, 3),
                        images_per_s=round(B / (ms * 1e-3), 1), peak_mem_mb=round(peak_mb, 1), bytes=nbytes)
        rows.append(row)
    ref = {r["provider"]: r["median_ms"] for r in rows}
    for row in rows:
        if "reference" in ref:
            row["speedup"] = round(ref["reference"] / row["median_ms"], 3)
        if "reference-compiled" in ref:
            row["speedup_vs_compiled"] = round(ref["reference-compiled"] / row["median_ms"], 3)
        print(f"  {row['provider']:20s} {row['median_ms']:9.4f} ms  {row['gb_per_s']:8.1f} GB/s "
              f"({100 * row['frac_of_copy']:5.1f}% of copy)  x{row.get('speedup', float('nan')):6.2f} "
              f"peak +{row['peak_mem_mb']:8.1f} MB", flush=True)
    del cls, tokens, params, dout
    torch.cuda.empty_cache()
    return rows


def plot(record: Dict[str, object], path: str) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    rows = record["rows"]
    groups = sorted({(r["pass"], r["dtype"]) for r in rows})
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.8 * len(groups)), squeeze=False)
    copy = record["ceilings"].get("copy_gb_per_s")
    for ax, (pass_, dtype) in zip(axes[:, 0], groups):
        sub = [r for r in rows if (r["pass"], r["dtype"]) == (pass_, dtype)]
        keys = sorted({(r["model"], r["direction"], r["batch"]) for r in sub})
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in sub)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            val = {(r["model"], r["direction"], r["batch"]): r for r in sub if r["provider"] == p}
            xs = [j + i * width for j, k in enumerate(keys) if k in val]
            ys = [val[k]["gb_per_s"] for k in keys if k in val]
            bars = ax.bar(xs, ys, width, label=p)
            for bar, k in zip(bars, [k for k in keys if k in val]):
                if "speedup" in val[k]:
                    ax.annotate(f"x{val[k]['speedup']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6)
        if copy:
            ax.axhline(copy, color="k", lw=0.8, ls="--", label=f"copy {copy} GB/s")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{m.replace('crossvit_', '')}\n{d} B{b}" for m, d, b in keys], fontsize=6)
        ax.set_ylabel("GB/s (unavoidable bytes)")
        ax.set_title(f"CLS cross-attention {pass_}, {dtype} (labels: speedup over reference)")
        ax.legend(fontsize=7, ncol=len(provs) + 1)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"], choices=sorted(DTYPES))
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--warmup-ms", type=float, default=50)
    p.add_argument("--rep-ms", type=float, default=300)
    p.add_argument("--out-dir", default=None, help="where the JSON record goes (default bench/results/)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = cases(args)
    if args.dry_run:
        for c in todo:
            elt = torch.finfo(DTYPES[c["dtype"]]).bits // 8
            nbytes = ideal_bytes(c["batch"], c["N"], c["C"], elt, c["pass"])
            print(f"{NAME}: {c['model']} {c['direction']} batch={c['batch']} dtype={c['dtype']} pass={c['pass']} "
                  f"C={c['C']} N={c['N']} H={c['heads']} bytes={nbytes} providers={','.join(args.providers)}")
        print(f"{len(todo)} cases x {len(args.providers)} providers")
        return 0
    require_cuda(f"bench/{os.path.basename(__file__)}")
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}, ceilings {ceilings}", flush=True)
    record = new_record(NAME, ceilings)
    record["bytes_convention"] = (
        "fwd: elt*(B*N*C + 2*B*C + 4*C^2 + 6*C); fwd+bwd: fwd + elt*(2*B*N*C + 2*B*C + 2*(4*C^2 + 6*C))"
    )
    for c in todo:
        print(f"{c['model']} {c['direction']} batch={c['batch']} {c['dtype']} {c['pass']} "
              f"C={c['C']} N={c['N']} H={c['heads']}", flush=True)
        record["rows"].extend(run_case(c, args.providers, args.warmup_ms, args.rep_ms, ceilings["copy_gb_per_s"]))
        write_record(record, args.out_dir)  # a partial record survives a time limit
    path = write_record(record, args.out_dir, complete=True)
    print(f"wrote {path}")
    if not args.no_plot:
        png = plot(record, path)
        if png:
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
