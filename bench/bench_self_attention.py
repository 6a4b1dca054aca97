"""Benchmark: fused self-attention (``crossvit_fast::self_attention``) against the reference and PyTorch's SDPA.

Every provider starts from the same input, the qkv Linear's output ``(B, N, 3 * H * D)``, and returns
``(B, N, H * D)``, so the timed region holds what a model block pays:

* ``crossvit_fast``: the op (reads qkv in place through its strides);
* ``reference``: ``self_attention_ref`` (timm's explicit path: reshape/permute, ``q k^T``, softmax, ``@ v``);
* ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``: timm's fused path,
  ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`` then ``F.scaled_dot_product_attention``
  restricted to one backend with ``torch.nn.attention.sdpa_kernel``, then ``transpose(1, 2).reshape(B, N, C)``;
  any copy the backend makes of the permuted views, and the final reshape copy, are timed. A backend that
  refuses a shape (or runs out of memory) gets no row for it.

Passes: ``fwd`` and ``fwd+bwd`` (``torch.autograd.grad`` of the output w.r.t. qkv with a fixed random
``dout``; no gradient accumulation). TFLOP/s counts the attention matmuls only: ``4 B H N^2 D`` for the forward
(``q k^T`` and ``p v``) and ``10 B H N^2 D`` for forward + backward, i.e. the backward taken as 1.5 x the forward
(the requested convention; flash-attention's own benchmark counts the backward as 2.5 x the forward, 14 B H N^2 D
in all, and the 4 backward matmuls without recomputation are 8 B H N^2 D, 12 in all). All providers use the same
count, so the ratios between them do not depend on it. ``ceilings.bf16_matmul_tflops`` is the device's measured
dense bf16 matmul rate, for scale.

Timings are CUDA-event timings via ``bench.common.do_bench_samples`` (median reported, all samples stored);
the record is written to ``bench/results/`` and, where matplotlib is installed, a plot beside it.

    python bench/bench_self_attention.py                # the whole grid (long)
    python bench/bench_self_attention.py --dry-run      # list the cases; needs no GPU
    python bench/bench_self_attention.py --batch 64 --dtype bfloat16 --hd 6:32 6:64
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
    measure_ceilings,
    median,
    new_record,
    pyplot,
    require_cuda,
    time_provider,
    timed_row,
    write_record,
)

NAME = "self_attention"
FAMILY_N = (197, 401, 577, 1157)
FAMILY_HD = ((3, 32), (6, 32), (12, 32), (4, 32), (7, 32), (3, 64), (6, 64), (12, 64), (4, 64), (7, 64))
BATCHES = (64, 256)
PASSES = ("forward", "forward+backward")
SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
PROVIDERS = ("crossvit_fast", "reference") + tuple(SDPA_BACKENDS)


def attention_flops(B: int, N: int, H: int, D: int, pass_: str) -> float:
    fwd = 4.0 * B * H * N * N * D
    return fwd if pass_ == "forward" else 2.5 * fwd


def _sdpa_forward(backend_name: str) -> Optional[Callable[[torch.Tensor, int], torch.Tensor]]:
    """timm's fused attention from qkv, pinned to one SDPA backend; None if this torch lacks the backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[backend_name], None)
    if backend is None:
        return None

    def fn(qkv: torch.Tensor, H: int) -> torch.Tensor:
        B, N, C3 = qkv.shape
        D = C3 // (3 * H)
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D) views
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        return o.transpose(1, 2).reshape(B, N, H * D)

    return fn


def provider_fn(provider: str) -> Optional[Callable[[torch.Tensor, int], torch.Tensor]]:
    if provider == "crossvit_fast":
        from crossvit_fast.ops.self_attention import self_attention

        return self_attention
    if provider == "reference":
        from crossvit_fast.reference import self_attention_ref

        return self_attention_ref
    return _sdpa_forward(provider)


def cases(args) -> List[Dict[str, object]]:
    """``--cases`` (explicit N:H:D triples) or the product of ``--n`` and ``--hd``, times batch, dtype and pass."""
    shapes = args.cases or [(N, H, D) for (H, D), N in itertools.product(args.hd, args.n)]
    out = []
    for batch, dtype, (N, H, D), pass_ in itertools.product(args.batch, args.dtype, shapes, args.passes):
        out.append({"batch": batch, "dtype": dtype, "pass": pass_, "N": N, "heads": H, "head_dim": D})
    return out


def run_case(case: Dict[str, object], providers, warmup_ms: float, rep_ms: float,
             device: str = "cuda") -> List[Dict[str, object]]:
    B, N, H, D = case["batch"], case["N"], case["heads"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype).requires_grad_(bwd)
    dout = torch.randn(B, N, H * D, device=device, dtype=dtype)
    flops = attention_flops(B, N, H, D, case["pass"])
    rows = []
    for provider in providers:
        f = provider_fn(provider)
        if f is None:
            continue
        if bwd:
            def call(f=f):
                return torch.autograd.grad(f(qkv, H), qkv, dout)
        else:
            def call(f=f):
                with torch.no_grad():
                    return f(qkv, H)
        timed = time_provider(call, provider, str(case), warmup_ms, rep_ms)  # a refused shape or OOM: no row
        if timed is None:
            continue
        samples, peak_mb = timed
        ms = median(samples)
        row = timed_row(case, provider, samples, tflops=round(flops / (ms * 1e-3) / 1e12, 2),
                        peak_mem_mb=round(peak_mb, 1))
        rows.append(row)
        print(f"  {provider:15s} {ms:9.4f} ms  {row['tflops']:7.1f} TFLOP/s  peak +{peak_mb:8.1f} MB", flush=True)
    del qkv, dout
    torch.cuda.empty_cache()
    return rows


def plot(record: Dict[str, object], path: str) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    rows = record["rows"]
    groups = sorted({(r["batch"], r["dtype"], r["pass"]) for r in rows})
    if not groups:
        return None
    n_shapes = max(len({(r["N"], r["heads"], r["head_dim"]) for r in rows}), 1)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(8.0, 0.45 * n_shapes), 3.6 * len(groups)), squeeze=False)
    for ax, (batch, dtype, pass_) in zip(axes[:, 0], groups):
        sub = [r for r in rows if (r["batch"], r["dtype"], r["pass"]) == (batch, dtype, pass_)]
        shapes = sorted({(r["N"], r["heads"], r["head_dim"]) for r in sub})
        labels = [f"N{n}\nH{h}D{d}" for n, h, d in shapes]
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in sub)]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            val = {(r["N"], r["heads"], r["head_dim"]): r["tflops"] for r in sub if r["provider"] == p}
            xs = [j + i * width for j, s in enumerate(shapes) if s in val]
            ys = [val[s] for s in shapes if s in val]
            ax.bar(xs, ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("TFLOP/s")
        ceiling = record["ceilings"].get("bf16_matmul_tflops")
        ax.set_title(f"self-attention {pass_}, batch {batch}, {dtype} (bf16 matmul ceiling {ceiling} TFLOP/s)")
        ax.legend(fontsize=7, ncol=len(provs))
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    p.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float16"], choices=sorted(DTYPES))
    p.add_argument("--n", type=int, nargs="+", default=list(FAMILY_N), help="sequence lengths")
    p.add_argument("--hd", nargs="+", default=[f"{h}:{d}" for h, d in FAMILY_HD], help="heads:head_dim pairs")
    p.add_argument("--cases", nargs="+", default=None,
                   help="tokens:heads:head_dim triples instead of the product of --n and --hd (e.g. 401:7:32 197:7:64)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--warmup-ms", type=float, default=50)
    p.add_argument("--rep-ms", type=float, default=300)
    p.add_argument("--out-dir", default=None, help="where the JSON record goes (default bench/results/)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.hd = [tuple(int(x) for x in s.split(":")) for s in args.hd]
    args.cases = [tuple(int(x) for x in s.split(":")) for s in args.cases] if args.cases else None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    todo = cases(args)
    if args.dry_run:
        for c in todo:
            print(f"{NAME}: batch={c['batch']} dtype={c['dtype']} pass={c['pass']} N={c['N']} H={c['heads']} "
                  f"D={c['head_dim']} providers={','.join(args.providers)}")
        print(f"{len(todo)} cases x {len(args.providers)} providers")
        return 0
    require_cuda(f"bench/{os.path.basename(__file__)}")
    ceilings = measure_ceilings()
    print(f"device {torch.cuda.get_device_name()}, ceilings {ceilings}", flush=True)
    record = new_record(NAME, ceilings)
    record["flops_convention"] = "fwd: 4*B*H*N^2*D; fwd+bwd: 10*B*H*N^2*D (attention matmuls only)"
    for c in todo:
        print(f"batch={c['batch']} {c['dtype']} {c['pass']} N={c['N']} H={c['heads']} D={c['head_dim']}", flush=True)
        record["rows"].extend(run_case(c, args.providers, args.warmup_ms, args.rep_ms))
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
