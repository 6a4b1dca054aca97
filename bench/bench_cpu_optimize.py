"""CPU check that ``optimize`` never makes a timm model slower where nothing runs fused (no GPU).

timm's model, the same after ``crossvit_fast.optimize`` (default backend: on a CPU, what timm runs) and after
``optimize(backend="reference")`` (the explicit math): inference (eval, no_grad) and a training step (train mode,
forward, cross-entropy backward, SGD step), interleaved, medians, timed by
``crossvit_fast.bench_utils.cpu_time_samples``: with one intra-op thread (the default here) the calling thread's CPU
time measures the work even on a shared machine; wall time is printed too. CPU numbers only: no GPU claim comes from
this script. Needs timm.

    python bench/bench_cpu_optimize.py [--model crossvit_9_240] [--batch 8] [--reps 15] [--threads 1]
"""

import argparse
import copy
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import crossvit_fast  # noqa: E402
from crossvit_fast.bench_utils import cpu_time_samples  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="crossvit_9_240")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t = timm.create_model(args.model)
    variants = {
        "timm": t,
        "optimize() [default backend]": crossvit_fast.optimize(copy.deepcopy(t)),
        "optimize(backend='reference')": crossvit_fast.optimize(copy.deepcopy(t), backend="reference"),
    }
    print("ops after optimize():", variants["optimize() [default backend]"].crossvit_fast_ops)
    h, w = t.pretrained_cfg["input_size"][1:]
    x = torch.randn(args.batch, 3, h, w)
    y = torch.randint(0, t.num_classes, (args.batch,))
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in variants.items()}

    def infer(m, _):
        m.eval()
        with torch.no_grad():
            m(x)

    def train(m, opt):
        m.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    calls = {(k, what): functools.partial(fn, m, opts[k]) for k, m in variants.items()
             for what, fn in (("infer", infer), ("train", train))}
    res = cpu_time_samples(calls, args.reps)
    med = statistics.median
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.model}, batch {args.batch}, "
          f"{args.threads} thread(s), {args.reps} reps; median ms, CPU time | wall")
    for k in variants:
        (ic, iw), (tc, tw) = res[k, "infer"], res[k, "train"]
        print(f"{k:<32} inference {med(ic):8.1f} | {med(iw):8.1f}   train step {med(tc):8.1f} | {med(tw):8.1f}")


if __name__ == "__main__":
    main()
