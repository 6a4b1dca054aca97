"""Benchmark: the fused branch-block GEMMs (``crossvit_fast::linear``) and the five-kernel Block.

GEMM cases: each of a branch block's four GEMMs, at the shapes of the chosen models' small (S) and large (L)
branches, under bf16 autocast as the model runs (float32 residual stream and LayerNorm parameters, the weight cast
once to bf16 outside the timed region: the op takes it in the compute dtype):

* ``qkv``:  ``x -> LN1 -> Linear(C, 3C)``            (x float32, out bf16)
* ``proj``: ``x + drop_path(Linear(C, C)(o))``        (o bf16, x float32, out float32)
* ``fc1``:  ``x -> LN2 -> Linear(C, 3C) -> GELU``     (x float32, out bf16)
* ``fc2``:  ``x + drop_path(Linear(3C, C)(h))``       (h bf16, x float32, out float32)

Providers (GEMMs):

* ``crossvit_fast``: the op, one kernel (forward) / its backward; autotuned (its first call times every candidate
  tile, outside the timed region); the row's ``tiles`` names the tile picked for the forward / dgrad GEMM;
* ``reference``: eager PyTorch, ``F.layer_norm`` (float32) ``.to(bf16)``, ``F.linear``, ``F.gelu``,
  ``* scale``, ``+ x``: timm's ops under autocast;
* ``reference-compiled``: the same function under ``torch.compile`` (Inductor fuses the elementwise ops, the GEMM
  stays a cuBLAS call);
* ``cublas``: the bare GEMM ``F.linear(a_bf16, w_bf16)`` on a ready bf16 input, the target's yardstick (each
  fused GEMM should take at most 1.1x this).

Block cases: one L-branch and one S-branch :class:`crossvit_fast.layers.Block` (qkv_bias, mlp_ratio of the model,
eval mode) under bf16 autocast: ``crossvit_fast`` (``backend="triton"``: five kernels), ``reference``
(``backend="reference"``, eager) and ``reference-compiled`` (the reference block under ``torch.compile``).

Passes: ``forward`` (no grad) and ``forward+backward`` (``torch.autograd.grad`` w.r.t. the inputs and parameters
with a fixed random ``dout``). TFLOP/s counts ``2 M N K`` per GEMM (x3 with backward).

    python bench/bench_linear.py                       # crossvit_18_dagger_240 and crossvit_9_240, batch 256
    python bench/bench_linear.py --dry-run             # list the cases; needs no GPU
    python bench/bench_linear.py --what gemm --passes forward
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    compile_fresh,
    gemm_tiles,
    measure_ceilings,
    median,
    new_record,
    require_cuda,
    time_provider,
    timed_row,
    write_record,
)

NAME = "linear"
MODELS = ("crossvit_18_dagger_240", "crossvit_9_240")
GEMMS = ("qkv", "proj", "fc1", "fc2")
BATCHES = (256,)
PASSES = ("forward", "forward+backward")
GEMM_PROVIDERS = ("crossvit_fast", "reference", "reference-compiled", "cublas")
BLOCK_PROVIDERS = ("crossvit_fast", "reference", "reference-compiled")
EPS = 1e-6
DROP_KEEP = 0.9  # the drop-path scale timed in training-shaped calls (a per-sample mask / keep)


def branch_shapes(model_name: str) -> Dict[str, Dict[str, int]]:
    """``{"S": {...}, "L": {...}}``: tokens T, width C, heads, hidden of each branch of ``model_name``."""
    import crossvit_fast

    with torch.device("meta"):
        m = crossvit_fast.create_model(model_name)
    out = {}
    for tag, i in (("S", 0), ("L", 1)):
        blk = m.blocks[0].blocks[i][0]
        out[tag] = {"T": m.patch_embed[i].num_patches + 1, "C": blk.norm1.normalized_shape[0],
                    "heads": blk.attn.num_heads, "hidden": blk.mlp.fc1.out_features}
    return out


def gemm_dims(gemm: str, C: int, hidden: int):
    """(K, N, flags) of one GEMM."""
    return {
        "qkv": (C, 3 * C, dict(ln=True)),
        "proj": (C, C, dict(res=True)),
        "fc1": (C, hidden, dict(ln=True, gelu=True)),
        "fc2": (hidden, C, dict(res=True)),
    }[gemm]


def cases(args) -> List[Dict[str, object]]:
    out = []
    for model, batch, pass_ in itertools.product(args.models, args.batch, args.passes):
        shapes = branch_shapes(model)
        for branch in ("S", "L"):
            s = shapes[branch]
            if "gemm" in args.what:
                for gemm in args.gemms:
                    K, N, _ = gemm_dims(gemm, s["C"], s["hidden"])
                    out.append({"kind": "gemm", "model": model, "branch": branch, "gemm": gemm, "batch": batch,
                                "pass": pass_, "dtype": "bfloat16", "M": batch * s["T"], "K": K, "N": N, "T": s["T"]})
            if "block" in args.what:
                out.append({"kind": "block", "model": model, "branch": branch, "batch": batch, "pass": pass_,
                            "dtype": "bfloat16", "T": s["T"], "C": s["C"], "heads": s["heads"],
                            "mlp_ratio": s["hidden"] / s["C"]})
    return out


def _reference_gemm(x, w, b, lw, lb, scale, res, gelu):
    """timm's ops under autocast, written out: LN in float32, cast, Linear in bf16, GELU, drop-path scale, add."""
    h = F.layer_norm(x, (x.shape[-1],), lw, lb, EPS) if lw is not None else x
    y = F.linear(h.to(w.dtype), w, b.to(w.dtype))
    if gelu:
        y = F.gelu(y)
    if scale is not None:
        y = y * scale.view(-1, 1, 1)
    return res + y if res is not None else y


def gemm_provider(provider: str) -> Callable:
    """The callable of ``provider``; called once per case (a compiled provider is compiled afresh for it)."""
    if provider == "crossvit_fast":
        from crossvit_fast.ops.linear import linear

        return lambda x, w, b, lw, lb, scale, res, gelu: linear(x, w, b, lw, lb, EPS, gelu, scale, res)
    if provider == "reference":
        return _reference_gemm
    if provider == "reference-compiled":
        return compile_fresh(_reference_gemm, dynamic=False, fullgraph=True)
    if provider == "cublas":
        return lambda x, w, b, lw, lb, scale, res, gelu: F.linear(x, w)
    raise ValueError(provider)


def run_gemm(case, providers, warmup_ms, rep_ms):
    B, T, K, N = case["batch"], case["T"], case["K"], case["N"]
    flags = gemm_dims(case["gemm"], 1, 1)[2]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    ln, res, gelu = flags.get("ln", False), flags.get("res", False), flags.get("gelu", False)
    x = torch.randn(B, T, K, device="cuda", dtype=torch.float32 if ln else torch.bfloat16).requires_grad_(bwd)
    a16 = torch.randn(B, T, K, device="cuda", dtype=torch.bfloat16).requires_grad_(bwd)  # cuBLAS's ready input
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16).requires_grad_(bwd)
    b = torch.randn(N, device="cuda").requires_grad_(bwd)
    lw = torch.randn(K, device="cuda").requires_grad_(bwd) if ln else None
    lb = torch.randn(K, device="cuda").requires_grad_(bwd) if ln else None
    r = torch.randn(B, T, N, device="cuda").requires_grad_(bwd) if res else None
    # drop-path's per-sample scale in training (forward+backward); inference has none
    scale = (torch.rand(B, device="cuda") < DROP_KEEP).to(torch.bfloat16) / DROP_KEEP if res and bwd else None
    flops = 2 * B * T * N * K * (3 if bwd else 1)
    rows = []
    for provider in providers:
        f = gemm_provider(provider)
        xin = a16 if provider == "cublas" else x
        leaves = [t for t in ((xin, w) if provider == "cublas" else (x, w, b, lw, lb, r)) if t is not None]
        if bwd:
            dout = torch.randn(B, T, N, device="cuda", dtype=torch.float32 if res and provider != "cublas"
                               else torch.bfloat16)

            def call(f=f, xin=xin, leaves=leaves, dout=dout):
                return torch.autograd.grad(f(xin, w, b, lw, lb, scale, r, gelu), leaves, dout)
        else:
            def call(f=f, xin=xin):
                with torch.no_grad():
                    return f(xin, w, b, lw, lb, scale, r, gelu)
        before = gemm_tiles()
        timed = time_provider(call, provider, str(case), warmup_ms, rep_ms)
        if timed is None:
            continue
        samples, peak_mb = timed
        ms = median(samples)
        row = timed_row(case, provider, samples, tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                        peak_mem_mb=round(peak_mb, 1))
        tiles = {t["kernel"]: t["tile"] for t in gemm_tiles() if t not in before}  # "fwd" / "dgrad" -> the pick
        if tiles:
            row["tiles"] = tiles
        rows.append(row)
        print(f"  {provider:20s} {ms:9.4f} ms  {row['tflops']:7.1f} TFLOP/s  peak +{peak_mb:8.1f} MB"
              f"{'  tiles ' + str(tiles) if tiles else ''}", flush=True)
    base = {r["provider"]: r["median_ms"] for r in rows}
    if "crossvit_fast" in base and "cublas" in base:
        print(f"  crossvit_fast / cublas = {base['crossvit_fast'] / base['cublas']:.2f} (target <= 1.1)")
    torch.cuda.empty_cache()
    return rows


def run_block(case, providers, warmup_ms, rep_ms):
    from crossvit_fast.layers import Block

    B, T, C = case["batch"], case["T"], case["C"]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    ref = Block(C, case["heads"], case["mlp_ratio"], qkv_bias=True, backend="reference").cuda().eval()
    x = torch.randn(B, T, C, device="cuda").requires_grad_(bwd)
    dout = torch.randn(B, T, C, device="cuda")
    rows = []
    for provider in providers:
        if provider == "crossvit_fast":
            m = Block(C, case["heads"], case["mlp_ratio"], qkv_bias=True, backend="triton").cuda().eval()
            m.load_state_dict(ref.state_dict())
        elif provider == "reference":
            m = ref
        else:
            m = compile_fresh(ref, dynamic=False)
        params = list(ref.parameters()) if provider != "crossvit_fast" else list(m.parameters())
        if bwd:
            def call(m=m, params=params):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = m(x)
                return torch.autograd.grad(y, [x] + params, dout)
        else:
            def call(m=m):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return m(x)
        timed = time_provider(call, provider, str(case), warmup_ms, rep_ms)
        if timed is None:
            continue
        samples, peak_mb = timed
        ms = median(samples)
        row = timed_row(case, provider, samples, peak_mem_mb=round(peak_mb, 1))
        rows.append(row)
        print(f"  {provider:20s} {ms:9.4f} ms  peak +{peak_mb:8.1f} MB", flush=True)
    base = {r["provider"]: r["median_ms"] for r in rows}
    if "crossvit_fast" in base and "reference-compiled" in base:
        print(f"  reference-compiled / crossvit_fast = {base['reference-compiled'] / base['crossvit_fast']:.2f} "
              f"(target >= 1.3)")
    torch.cuda.empty_cache()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--what", nargs="+", default=["gemm", "block"], choices=["gemm", "block"])
    p.add_argument("--gemms", nargs="+", default=list(GEMMS), choices=GEMMS)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=None,
                   help=f"subset of {GEMM_PROVIDERS} (GEMMs) / {BLOCK_PROVIDERS} (blocks)")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--out-dir", default=None, help="where the JSON record goes (default bench/results/)")
    p.add_argument("--no-plot", action="store_true", help="accepted for symmetry with the other benches (no plot)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = cases(args)
    gp = [p for p in GEMM_PROVIDERS if args.providers is None or p in args.providers]
    bp = [p for p in BLOCK_PROVIDERS if args.providers is None or p in args.providers]
    if args.dry_run:
        for c in todo:
            desc = " ".join(f"{k}={v}" for k, v in c.items())
            print(f"{NAME}: {desc} providers={','.join(gp if c['kind'] == 'gemm' else bp)}")
        print(f"{len(todo)} cases x {len(gp)} (GEMM) / {len(bp)} (block) providers")
        return 0
    require_cuda(f"bench/{os.path.basename(__file__)}")
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}, ceilings {ceilings}", flush=True)
    record = new_record(NAME, ceilings)
    record["flops_convention"] = "2 M N K per GEMM forward, x3 with backward; blocks: time only"
    for c in todo:
        print(" ".join(f"{k}={v}" for k, v in c.items()), flush=True)
        if c["kind"] == "gemm":
            record["rows"].extend(run_gemm(c, gp, args.warmup_ms, args.rep_ms))
        else:
            record["rows"].extend(run_block(c, bp, args.warmup_ms, args.rep_ms))
        record["gemm_tiles"] = gemm_tiles()  # every pick so far (a row's tiles name only those its case tuned)
        write_record(record, args.out_dir)  # a partial record survives a time limit
    path = write_record(record, args.out_dir, complete=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
