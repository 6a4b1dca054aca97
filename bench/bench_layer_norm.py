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

import itertools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossvit_fast.bench_utils import DTYPES, OpBench, compile_fresh, pass_call, run_op_bench  # noqa: E402

NAME = "layer_norm"
FAMILY_NC = ((401, 192), (401, 224), (197, 384), (197, 448), (197, 768), (577, 384))
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


def arguments(p) -> None:
    p.add_argument("--nc", nargs="+", default=[f"{n}:{c}" for n, c in FAMILY_NC], help="tokens:channels pairs")
    p.add_argument("--residual", type=int, nargs="+", default=[1, 0], choices=[0, 1])


def cases(args) -> List[Dict[str, object]]:
    nc = [tuple(int(v) for v in s.split(":")) for s in args.nc]
    out = []
    for batch, dtype, (N, C), residual, pass_ in itertools.product(args.batch, args.dtype, nc, args.residual,
                                                                   args.passes):
        out.append({"batch": batch, "dtype": dtype, "pass": pass_, "N": N, "C": C, "residual": bool(residual)})
    return out


def inputs(case: Dict[str, object], device: str) -> Dict[str, object]:
    """x (float32 residual stream), y (the branch output, None without a residual), w, b, and the gradients of out
    and r."""
    B, N, C, residual = case["batch"], case["N"], case["C"], case["residual"]
    dtype = DTYPES[case["dtype"]]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    return {
        "x": torch.randn(B, N, C, device=device).requires_grad_(bwd),
        "y": torch.randn(B, N, C, device=device, dtype=dtype).requires_grad_(bwd) if residual else None,
        "w": torch.randn(C, device=device).requires_grad_(bwd),
        "b": torch.randn(C, device=device).requires_grad_(bwd),
        "dout": torch.randn(B, N, C, device=device, dtype=dtype),
        "dr": torch.randn(B, N, C, device=device) if residual else None,
    }


def setup(case: Dict[str, object], provider: str, t: Dict[str, object]) -> Callable[[], object]:
    f = provider_fn(provider)
    x, y, w, b, dtype = t["x"], t["y"], t["w"], t["b"], DTYPES[case["dtype"]]
    leaves = [v for v in (x, y, w, b) if v is not None]
    res = case["residual"]
    return pass_call(lambda: f(x, y, w, b, dtype), case["pass"] == "forward+backward", leaves,
                     (t["dout"], t["dr"]) if res else t["dout"],
                     outputs=(lambda r_out: (r_out[1], r_out[0])) if res else None)


def metrics(case: Dict[str, object], ms: float, ceilings: Dict[str, float]) -> Dict[str, object]:
    nbytes = moved_bytes(case["batch"], case["N"], case["C"], DTYPES[case["dtype"]], case["residual"], case["pass"])
    return {"gb_per_s": round(nbytes / (ms * 1e-3) / 1e9, 1)}


BENCH = OpBench(
    NAME, __doc__, PROVIDERS, cases, inputs, setup, metrics, arguments, dtypes=("bfloat16", "float32"),
    warmup_ms=25, rep_ms=100,
    conventions={"bytes_convention": "one fused pass: forward reads x, y and writes r, out; backward reads dout, dr, "
                                     "r and writes dx, dy (weights ignored)"},
)

if __name__ == "__main__":
    sys.exit(run_op_bench(BENCH))
