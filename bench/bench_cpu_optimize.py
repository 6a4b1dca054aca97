"""CPU check that ``optimize`` never makes a timm model slower where nothing runs fused (no GPU).

timm's model, the same after ``crossvit_fast.optimize`` (default backend: on a CPU, what timm runs) and after
``optimize(backend="reference")`` (the explicit math): inference (eval, no_grad) and a training step (train mode,
forward, cross-entropy backward, SGD step), interleaved, medians. With one intra-op thread (the default here) the
calling thread's CPU time (``time.thread_time``) measures the work even on a shared machine; wall time is printed
too. CPU numbers only: no GPU claim comes from this script. Needs timm.

    python bench/bench_cpu_optimize.py [--model crossvit_9_240] [--batch 8] [--reps 15] [--threads 1]
"""

import argparse
import copy
import statistics
import time

import torch

import crossvit_fast


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

    res = {k: {"infer": ([], []), "train": ([], [])} for k in variants}
    for k, m in variants.items():  # warm-up
        for _ in range(2):
            infer(m, None)
            train(m, opts[k])
    for _ in range(args.reps):
        for k, m in variants.items():
            for what, fn in (("infer", infer), ("train", train)):
                c0, w0 = time.thread_time(), time.perf_counter()
                fn(m, opts[k])
                res[k][what][0].append((time.thread_time() - c0) * 1e3)
                res[k][what][1].append((time.perf_counter() - w0) * 1e3)
    med = statistics.median
    print(f"torch {torch.__version__}, timm {timm.__version__}, {args.model}, batch {args.batch}, "
          f"{args.threads} thread(s), {args.reps} reps; median ms, CPU time | wall")
    for k, r in res.items():
        print(f"{k:<32} inference {med(r['infer'][0]):8.1f} | {med(r['infer'][1]):8.1f}"
              f"   train step {med(r['train'][0]):8.1f} | {med(r['train'][1]):8.1f}")


if __name__ == "__main__":
    main()
