"""Benchmark: fused CLS-query cross-attention (``crossvit_fast::cls_cross_attention``) against the reference.

The shapes are the fusion layers of real models, both directions (CrossViT's cross-attention fusion: the CLS of
one branch against the other's patch tokens):

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

Timings are CUDA-event timings via ``crossvit_fast.bench_utils.do_bench_samples`` (median reported, all samples stored);
the record is written to ``bench/results/`` and, where matplotlib is installed, a plot beside it.

    python bench/bench_cls_cross_attention.py                  # the whole grid
    python bench/bench_cls_cross_attention.py --dry-run        # list the cases; needs no GPU
    python bench/bench_cls_cross_attention.py --batch 64 --dtype bfloat16 --models crossvit_9_240
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossvit_fast.bench_utils import DTYPES, OpBench, bar_plot, compile_fresh, pass_call, run_op_bench  # noqa: E402

NAME = "cls_cross_attention"
# name -> (dims (S, L), heads (S, L), patch tokens (S, L)); from the model configs (crossvit_fast.model_registry)
MODELS = {
    "crossvit_9_240": ((128, 256), (4, 4), (400, 196)),
    "crossvit_18_dagger_240": ((224, 448), (7, 7), (400, 196)),
    "crossvit_18_dagger_408": ((224, 448), (7, 7), (1156, 576)),
}
DIRECTIONS = ("S->L", "L->S")
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


def arguments(p) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)


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


def inputs(case: Dict[str, object], device: str) -> Dict[str, object]:
    """cls, the tokens view, the params in PARAM_NAMES order (realistic scales; tokens = x[:, 1:] of a
    (B, 1+N, C)) and dout."""
    B, N, C = case["batch"], case["N"], case["C"]
    dtype = DTYPES[case["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=device, dtype=torch.float32, generator=g) * scale + shift
        return t.to(dtype).requires_grad_(case["pass"] == "forward+backward")

    cls = rnd(B, 1, C)
    x = rnd(B, 1 + N, C)
    params = [rnd(C, scale=0.1, shift=1.0), rnd(C, scale=0.1)]
    for _ in range(4):
        params += [rnd(C, C, scale=0.05), rnd(C, scale=0.05)]
    dout = torch.randn(B, 1, C, device=device, dtype=dtype)
    return {"cls": cls, "tokens": x[:, 1:], "params": params, "dout": dout}


def setup(case: Dict[str, object], provider: str, t: Dict[str, object]) -> Callable[[], object]:
    f = provider_fn(provider)
    args = (t["cls"], t["tokens"], *t["params"], case["heads"])
    return pass_call(lambda: f(*args), case["pass"] == "forward+backward", args[:-1], t["dout"])


def metrics(case: Dict[str, object], ms: float, ceilings: Dict[str, float]) -> Dict[str, object]:
    nbytes = ideal_bytes(case["batch"], case["N"], case["C"], DTYPES[case["dtype"]].itemsize, case["pass"])
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {"gb_per_s": round(gbs, 1), "frac_of_copy": round(gbs / ceilings["copy_gb_per_s"], 3),
            "images_per_s": round(case["batch"] / (ms * 1e-3), 1), "bytes": nbytes}


def speedups(case: Dict[str, object], rows: List[Dict[str, object]]) -> None:
    """``speedup`` (and ``speedup_vs_compiled``): the reference's (compiled reference's) time over each row's."""
    ref = {r["provider"]: r["median_ms"] for r in rows}
    for row in rows:
        if "reference" in ref:
            row["speedup"] = round(ref["reference"] / row["median_ms"], 3)
        if "reference-compiled" in ref:
            row["speedup_vs_compiled"] = round(ref["reference-compiled"] / row["median_ms"], 3)
    if "reference" in ref:
        print("  speedup over reference: " + ", ".join(f"{r['provider']} x{r['speedup']:.2f}" for r in rows),
              flush=True)


def plot(record: Dict[str, object], path: str) -> Optional[str]:
    copy = record["ceilings"].get("copy_gb_per_s")
    return bar_plot(
        record, path, PROVIDERS, ("pass", "dtype"), ("model", "direction", "batch"), "gb_per_s",
        lambda k: f"{k['model'].replace('crossvit_', '')}\n{k['direction']} B{k['batch']}",
        lambda g: f"CLS cross-attention {g['pass']}, {g['dtype']} (labels: speedup over reference)",
        "GB/s (unavoidable bytes)", ceiling=(copy, f"copy {copy} GB/s") if copy else None, annotate="speedup")


BENCH = OpBench(
    NAME, __doc__, PROVIDERS, cases, inputs, setup, metrics, arguments,
    dtypes=("bfloat16", "float16", "float32"), plot=plot, finish=speedups,
    conventions={"bytes_convention": "fwd: elt*(B*N*C + 2*B*C + 4*C^2 + 6*C); "
                                     "fwd+bwd: fwd + elt*(2*B*N*C + 2*B*C + 2*(4*C^2 + 6*C))"},
)

if __name__ == "__main__":
    sys.exit(run_op_bench(BENCH))
