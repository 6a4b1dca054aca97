"""Benchmark: fused residual add + LayerNorm (``crossvit_fast::layer_norm``) against eager and compiled PyTorch.

The timed region is a branch block's pre-norm seam as the model runs it. ``dtype`` names the compute dtype:

* ``bfloat16`` / ``float16``: the autocast seam. The residual stream ``x`` is float32, the branch output ``y``
  is 16-bit, the normalised output is written in the 16-bit dtype (what the next Linear reads);
* ``float32``: everything float32.

Providers:

* ``crossvit_fast``: the op (``r, out = layer_norm(x, w, b, residual=y, out_dtype=...)``);
* ``reference``: eager PyTorch, ``r = x + y; out = F.layer_norm(r, ...).to(dtype)`` (what timm's block does under
  autocast: the add, LayerNorm in float32, the Linear's cast);
* ``reference-compiled``: the same function under ``torch.compile`` (Inductor fuses it into one kernel), a fresh
  compiled callable per case (static shapes, ``fullgraph``); the run stops with ``EagerFallbackError`` if dynamo
  ran any of it eagerly.

``residual`` = 0 times the block's first norm (no add). Passes: ``forward`` and ``forward+backward``
(``torch.autograd.grad`` of ``out`` and ``r`` with fixed random gradients, w.r.t. x, y, weight and bias).
``gb_per_s`` counts the bytes a single fused pass must move (forward: x, y read, r, out written; backward adds
dout, dr, r read, dx, dy written; weights ignored), the same count for every provider.

    python bench/bench_layer_norm.py               # the family grid
    python bench/bench_layer_norm.py --dry-run     # list the cases; needs no GPU
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    DTYPES,
    compile_fresh,
    measure_ceilings,
    median,
    new_record,
    require_cuda,
    time_provider,
    timed_row,
    write_record,
)

NAME = "layer_norm"
FAMILY_NC = ((401, 192), (401, 224), (197, 384), (197, 448), (197, 768), (577, 384))
BATCHES = (64, 256)
PASSES = ("forward", "forward+backward")
PROVIDERS = ("crossvit_fast", "reference", "reference-compiled")
EPS = 1e-6


def _reference(x, y, w, b, out_dtype):
    r = x + y if y is not None else x
    out = F.layer_norm(r, (r.shape[-1],), w, b, EPS).to(out_dtype)
    return (r, out) if y is not None else out


def provider_fn(provider: str) -> Optional[Callable]:
    """The callable of ``provider``; called once per case (a compiled provider is compiled afresh for it)."""
    if provider == "crossvit_fast":
        from crossvit_fast.ops.layer_norm import layer_norm

        return lambda x, y, w, b, out_dtype: layer_norm(x, w, b, EPS, residual=y, out_dtype=out_dtype)
    if provider == "reference":
        return _reference
    if provider == "reference-compiled":
        return compile_fresh(_reference, dynamic=False, fullgraph=True)
    return None


def moved_bytes(B: int, N: int, C: int, dtype: torch.dtype, residual: bool, pass_: str) -> int:
    e = B * N * C
    lo = torch.empty((), dtype=dtype).element_size()
    fwd = e * (4 + lo + (4 + lo if residual else 0)) if dtype != torch.float32 else e * 4 * (4 if residual else 2)
    if pass_ == "forward":
        return fwd
    if dtype == torch.float32:
        bwd = e * 4 * (5 if residual else 3)  # dout, (dr,) xin read; dx, (dy) written
    else:
        bwd = e * ((lo + 4 + 4 + 4 + lo) if residual else (lo + 4 + 4))
    return fwd + bwd


def cases(args) -> List[Dict[str, object]]:
    out = []
    for batch, dtype, (N, C), residual, pass_ in itertools.product(
        args.batch, args.dtype, args.nc, args.residual, args.passes
    ):
        out.append({"batch": batch, "dtype": dtype, "pass": pass_, "N": N, "C": C, "residual": bool(residual)})
    return out


def run_case(case: Dict[str, object], providers, warmup_ms: float, rep_ms: float) -> List[Dict[str, object]]:
    B, N, C, residual = case["batch"], case["N"], case["C"], case["residual"]
    dtype = DTYPES[case["dtype"]]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    x = torch.randn(B, N, C, device="cuda").requires_grad_(bwd)
    y = torch.randn(B, N, C, device="cuda", dtype=dtype).requires_grad_(bwd) if residual else None
    w = torch.randn(C, device="cuda").requires_grad_(bwd)
    b = torch.randn(C, device="cuda").requires_grad_(bwd)
    dout = torch.randn(B, N, C, device="cuda", dtype=dtype)
    dr = torch.randn(B, N, C, device="cuda") if residual else None
    leaves = [t for t in (x, y, w, b) if t is not None]
    nbytes = moved_bytes(B, N, C, dtype, residual, case["pass"])
    rows = []
    for provider in providers:
        f = provider_fn(provider)
        if bwd:
            def call(f=f):
                res = f(x, y, w, b, dtype)
                outs, grads = ((res[1], res[0]), (dout, dr)) if residual else ((res,), (dout,))
                return torch.autograd.grad(outs, leaves, grads)
        else:
            def call(f=f):
                with torch.no_grad():
                    return f(x, y, w, b, dtype)
        timed = time_provider(call, provider, str(case), warmup_ms, rep_ms)
        if timed is None:
            continue
        samples, peak_mb = timed
        ms = median(samples)
        row = timed_row(case, provider, samples, gb_per_s=round(nbytes / (ms * 1e-3) / 1e9, 1),
                        peak_mem_mb=round(peak_mb, 1))
        rows.append(row)
        print(f"  {provider:20s} {ms:9.4f} ms  {row['gb_per_s']:8.1f} GB/s  peak +{peak_mb:8.1f} MB", flush=True)
    torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=sorted(DTYPES))
    p.add_argument("--nc", nargs="+", default=[f"{n}:{c}" for n, c in FAMILY_NC], help="tokens:channels pairs")
    p.add_argument("--residual", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--out-dir", default=None, help="where the JSON record goes (default bench/results/)")
    p.add_argument("--no-plot", action="store_true", help="accepted for symmetry with the other benches (no plot)")
    args = p.parse_args(argv)
    args.nc = [tuple(int(v) for v in s.split(":")) for s in args.nc]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = cases(args)
    if args.dry_run:
        for c in todo:
            print(f"{NAME}: batch={c['batch']} dtype={c['dtype']} pass={c['pass']} N={c['N']} C={c['C']} "
                  f"residual={c['residual']} providers={','.join(args.providers)}")
        print(f"{len(todo)} cases x {len(args.providers)} providers")
        return 0
    require_cuda(f"bench/{os.path.basename(__file__)}")
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}, ceilings {ceilings}", flush=True)
    record = new_record(NAME, ceilings)
    record["bytes_convention"] = ("one fused pass: forward reads x, y and writes r, out; backward reads dout, dr, r "
                                  "and writes dx, dy (weights ignored)")
    for c in todo:
        print(f"batch={c['batch']} {c['dtype']} {c['pass']} N={c['N']} C={c['C']} residual={c['residual']}",
              flush=True)
        record["rows"].extend(run_case(c, args.providers, args.warmup_ms, args.rep_ms))
        write_record(record, args.out_dir)  # a partial record survives a time limit
    path = write_record(record, args.out_dir, complete=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
