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

Timings are CUDA-event timings via ``crossvit_fast.bench_utils.do_bench_samples`` (median reported, all samples stored);
the record is written to ``bench/results/`` and, where matplotlib is installed, a plot beside it.

    python bench/bench_self_attention.py                # the whole grid (long)
    python bench/bench_self_attention.py --dry-run      # list the cases; needs no GPU
    python bench/bench_self_attention.py --batch 64 --dtype bfloat16 --hd 6:32 6:64
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crossvit_fast.bench_utils import DTYPES, OpBench, bar_plot, pass_call, run_op_bench  # noqa: E402

NAME = "self_attention"
FAMILY_N = (197, 401, 577, 1157)
FAMILY_HD = ((3, 32), (6, 32), (12, 32), (4, 32), (7, 32), (3, 64), (6, 64), (12, 64), (4, 64), (7, 64))
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


def arguments(p) -> None:
    p.add_argument("--n", type=int, nargs="+", default=list(FAMILY_N), help="sequence lengths")
    p.add_argument("--hd", nargs="+", default=[f"{h}:{d}" for h, d in FAMILY_HD], help="heads:head_dim pairs")
    p.add_argument("--cases", nargs="+", default=None,
                   help="tokens:heads:head_dim triples instead of the product of --n and --hd (e.g. 401:7:32 197:7:64)")


def cases(args) -> List[Dict[str, object]]:
    """``--cases`` (explicit N:H:D triples) or the product of ``--n`` and ``--hd``, times batch, dtype and pass."""
    hd = [tuple(int(x) for x in s.split(":")) for s in args.hd]
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.cases or []] or \
        [(N, H, D) for (H, D), N in itertools.product(hd, args.n)]
    out = []
    for batch, dtype, (N, H, D), pass_ in itertools.product(args.batch, args.dtype, shapes, args.passes):
        out.append({"batch": batch, "dtype": dtype, "pass": pass_, "N": N, "heads": H, "head_dim": D})
    return out


def inputs(case: Dict[str, object], device: str) -> Dict[str, torch.Tensor]:
    """qkv ``(B, N, 3 H D)``, the qkv Linear's output, and dout ``(B, N, H D)``."""
    B, N, H, D = case["batch"], case["N"], case["heads"], case["head_dim"]
    dtype = DTYPES[case["dtype"]]
    torch.manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype).requires_grad_(case["pass"] == "forward+backward")
    return {"qkv": qkv, "dout": torch.randn(B, N, H * D, device=device, dtype=dtype)}


def setup(case: Dict[str, object], provider: str, t: Dict[str, torch.Tensor]) -> Optional[Callable[[], object]]:
    f = provider_fn(provider)
    if f is None:
        return None
    qkv, H = t["qkv"], case["heads"]
    return pass_call(lambda: f(qkv, H), case["pass"] == "forward+backward", [qkv], t["dout"])


def metrics(case: Dict[str, object], ms: float, ceilings: Dict[str, float]) -> Dict[str, object]:
    flops = attention_flops(case["batch"], case["N"], case["heads"], case["head_dim"], case["pass"])
    return {"tflops": round(flops / (ms * 1e-3) / 1e12, 2)}


def plot(record: Dict[str, object], path: str) -> Optional[str]:
    ceiling = record["ceilings"].get("bf16_matmul_tflops")
    return bar_plot(
        record, path, PROVIDERS, ("batch", "dtype", "pass"), ("N", "heads", "head_dim"), "tflops",
        lambda k: f"N{k['N']}\nH{k['heads']}D{k['head_dim']}",
        lambda g: f"self-attention {g['pass']}, batch {g['batch']}, {g['dtype']} (bf16 matmul ceiling {ceiling} "
                  f"TFLOP/s)",
        "TFLOP/s")


BENCH = OpBench(
    NAME, __doc__, PROVIDERS, cases, inputs, setup, metrics, arguments, dtypes=("bfloat16", "float16"), plot=plot,
    conventions={"flops_convention": "fwd: 4*B*H*N^2*D; fwd+bwd: 10*B*H*N^2*D (attention matmuls only)"},
)

if __name__ == "__main__":
    sys.exit(run_op_bench(BENCH))
