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

import itertools
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossvit_fast.bench_utils import OpBench, compile_fresh, pass_call, run_op_bench  # noqa: E402

NAME = "linear"
MODELS = ("crossvit_18_dagger_240", "crossvit_9_240")
GEMMS = ("qkv", "proj", "fc1", "fc2")
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


def arguments(p) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--what", nargs="+", default=["gemm", "block"], choices=["gemm", "block"])
    p.add_argument("--gemms", nargs="+", default=list(GEMMS), choices=GEMMS)


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


def case_providers(case: Dict[str, object], providers) -> List[str]:
    return [p for p in (GEMM_PROVIDERS if case["kind"] == "gemm" else BLOCK_PROVIDERS) if p in providers]


def _reference_gemm(x, w, b, lw, lb, scale, res, gelu):
    """timm's ops under autocast, written out: LN in float32, cast, Linear in bf16, GELU, drop-path scale, add."""
    h = F.layer_norm(x, (x.shape[-1],), lw, lb, EPS) if lw is not None else x
    y = F.linear(h.to(w.dtype), w, b.to(w.dtype))
    if gelu:
        y = F.gelu(y)
    if scale is not None:
        y = y * scale.view(-1, 1, 1)  # (B, 1, 1) against (B, T, N)
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


def gemm_inputs(case: Dict[str, object], device: str) -> Dict[str, object]:
    B, T, K, N = case["batch"], case["T"], case["K"], case["N"]
    flags = gemm_dims(case["gemm"], 1, 1)[2]
    bwd = case["pass"] == "forward+backward"
    torch.manual_seed(0)
    ln, res = flags.get("ln", False), flags.get("res", False)
    return {
        "x": torch.randn(B, T, K, device=device, dtype=torch.float32 if ln else torch.bfloat16).requires_grad_(bwd),
        "a16": torch.randn(B, T, K, device=device, dtype=torch.bfloat16).requires_grad_(bwd),  # cuBLAS's ready input
        "w": (torch.randn(N, K, device=device) / K ** 0.5).to(torch.bfloat16).requires_grad_(bwd),
        "b": torch.randn(N, device=device).requires_grad_(bwd),
        "lw": torch.randn(K, device=device).requires_grad_(bwd) if ln else None,
        "lb": torch.randn(K, device=device).requires_grad_(bwd) if ln else None,
        "r": torch.randn(B, T, N, device=device).requires_grad_(bwd) if res else None,
        # drop-path's per-sample scale in training (forward+backward); inference has none
        "scale": (torch.rand(B, device=device) < DROP_KEEP).to(torch.bfloat16) / DROP_KEEP if res and bwd else None,
        "gelu": flags.get("gelu", False),
    }


def gemm_setup(case: Dict[str, object], provider: str, t: Dict[str, object]) -> Callable[[], object]:
    f = gemm_provider(provider)
    cublas = provider == "cublas"
    xin, w = t["a16"] if cublas else t["x"], t["w"]
    leaves = [v for v in ((xin, w) if cublas else (t["x"], w, t["b"], t["lw"], t["lb"], t["r"])) if v is not None]
    bwd = case["pass"] == "forward+backward"
    dout = torch.randn(case["batch"], case["T"], case["N"], device=w.device,
                       dtype=torch.float32 if t["r"] is not None and not cublas else torch.bfloat16) if bwd else None
    return pass_call(lambda: f(xin, w, t["b"], t["lw"], t["lb"], t["scale"], t["r"], t["gelu"]), bwd, leaves, dout)


def block_inputs(case: Dict[str, object], device: str) -> Dict[str, object]:
    """The reference block (eval), its input x and dout."""
    from crossvit_fast.layers import Block

    B, T, C = case["batch"], case["T"], case["C"]
    torch.manual_seed(0)
    ref = Block(C, case["heads"], case["mlp_ratio"], qkv_bias=True, backend="reference").to(device).eval()
    x = torch.randn(B, T, C, device=device).requires_grad_(case["pass"] == "forward+backward")
    return {"ref": ref, "x": x, "dout": torch.randn(B, T, C, device=device)}


def block_setup(case: Dict[str, object], provider: str, t: Dict[str, object]) -> Callable[[], object]:
    from crossvit_fast.layers import Block

    ref, x = t["ref"], t["x"]
    if provider == "crossvit_fast":
        m = Block(case["C"], case["heads"], case["mlp_ratio"], qkv_bias=True, backend="triton").to(x.device).eval()
        m.load_state_dict(ref.state_dict())
    else:
        m = ref if provider == "reference" else compile_fresh(ref, dynamic=False)
    params = list(m.parameters()) if provider == "crossvit_fast" else list(ref.parameters())

    def run():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return m(x)

    return pass_call(run, case["pass"] == "forward+backward", [x] + params, t["dout"])


def inputs(case: Dict[str, object], device: str) -> Dict[str, object]:
    return (gemm_inputs if case["kind"] == "gemm" else block_inputs)(case, device)


def setup(case: Dict[str, object], provider: str, t: Dict[str, object]) -> Callable[[], object]:
    return (gemm_setup if case["kind"] == "gemm" else block_setup)(case, provider, t)


def metrics(case: Dict[str, object], ms: float, ceilings: Dict[str, float]) -> Dict[str, object]:
    if case["kind"] != "gemm":
        return {}
    flops = 2 * case["M"] * case["N"] * case["K"] * (3 if case["pass"] == "forward+backward" else 1)
    return {"tflops": round(flops / (ms * 1e-3) / 1e12, 1)}


def targets(case: Dict[str, object], rows: List[Dict[str, object]]) -> None:
    """The targets: each fused GEMM at most 1.1x cuBLAS's bare GEMM, the block 1.3x faster than compiled timm."""
    base = {r["provider"]: r["median_ms"] for r in rows}
    if "crossvit_fast" in base and "cublas" in base:
        print(f"  crossvit_fast / cublas = {base['crossvit_fast'] / base['cublas']:.2f} (target <= 1.1)")
    if case["kind"] == "block" and "crossvit_fast" in base and "reference-compiled" in base:
        print(f"  reference-compiled / crossvit_fast = {base['reference-compiled'] / base['crossvit_fast']:.2f} "
              f"(target >= 1.3)")


BENCH = OpBench(
    NAME, __doc__, GEMM_PROVIDERS, cases, inputs, setup, metrics, arguments, batches=(256,), warmup_ms=25,
    rep_ms=100, providers_help=f"subset of {GEMM_PROVIDERS} (GEMMs) / {BLOCK_PROVIDERS} (blocks)",
    case_providers=case_providers, finish=targets, tiles=lambda case: case["kind"] == "gemm",
    conventions={"flops_convention": "2 M N K per GEMM forward, x3 with backward; blocks: time only"},
)

if __name__ == "__main__":
    sys.exit(run_op_bench(BENCH))
