"""``crossvit-fast`` (also ``python -m crossvit_fast``): list, info, flops, check."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
from typing import List, Optional

import torch

DEFAULT_MODEL = "crossvit_18_dagger_240"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _table(rows: List[List[str]], header: List[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def cmd_list(args) -> int:
    from crossvit_fast.models import MODEL_CONFIGS, create_model

    rows = []
    for name, cfg in MODEL_CONFIGS.items():
        kw = cfg["kwargs"]
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name, backend="reference").parameters())
        rows.append(
            [
                name,
                cfg["ibm_name"],
                str(kw["img_size"]),
                "%d, %d" % tuple(kw["embed_dim"]),
                "%d, %d" % tuple(kw["num_heads"]),
                str(kw["depth"][0][1]),
                "%g" % kw["mlp_ratio"][0],
                "yes" if kw["multi_conv"] else "no",
                f"{params:,}",
            ]
        )
    print(_table(rows, ["model", "IBM name", "image", "dims (S, L)", "heads (S, L)", "M", "mlp", "dagger", "params"]))
    return 0


def cmd_info(args) -> int:
    import crossvit_fast
    from crossvit_fast.backend import FUSED_OPS, GPU_VERIFIED_OPS, get_backend, resolve_backend, triton_status

    print(f"crossvit_fast {crossvit_fast.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    print(f"torch         {torch.__version__}")
    for pkg in ("triton", "fvcore", "timm"):
        print(f"{pkg:<13} {_version(pkg)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}        {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("devices       cpu only (torch.cuda.is_available() is False)")
    print(f"default backend asked for: {get_backend()!r} (CROSSVIT_FAST_BACKEND={os.environ.get('CROSSVIT_FAST_BACKEND', '')!r})")
    print("backends:")
    print("  reference    can run (plain PyTorch: the explicit math, the tests' oracle)")
    print("  torch        can run (what timm runs: SDPA, PyTorch's LayerNorm)")
    ok, why = triton_status()
    print(f"  triton       {'can run: ' if ok else 'cannot run: '}{why}")
    for op in FUSED_OPS:
        ok, why = triton_status(op)
        print(f"    {op:<22} {'fused' if ok else 'not fused'}: {why}")
    for op in FUSED_OPS:
        print(f"  auto         takes {resolve_backend('auto', op=op)} here for {op}"
              + ("" if op in GPU_VERIFIED_OPS else " (its kernel is not yet verified on a GPU: ask for 'triton')"))
    print("\n".join(fused_ops_lines()))
    return 0


def fused_ops_lines() -> List[str]:
    """Per op, whether a model built now with the default backend runs it fused, and what runs where it does not."""
    from crossvit_fast.backend import FUSED_OPS, TORCH_PATH, BackendUnavailableError, get_backend, resolve_backend

    requested = get_backend()
    lines = [f"ops of a model built now (backend {requested!r}):"]
    for op in FUSED_OPS:
        try:
            resolved = resolve_backend(requested, op=op)
        except BackendUnavailableError as e:
            lines.append(f"  {op:<22} cannot build: {e}")
            continue
        what = {
            "triton": "fused (Triton kernel)",
            "torch": f"not fused: runs what timm runs ({TORCH_PATH[op]})",
            "reference": "not fused: the explicit reference math (backend='reference')",
        }[resolved]
        lines.append(f"  {op:<22} {what}")
    return lines


def cmd_flops(args) -> int:
    from fvcore.nn import flop_count_table

    from crossvit_fast.flops import flops
    from crossvit_fast.models import create_model

    kwargs = {"backend": args.backend} if args.backend else {}
    if args.img_size:
        kwargs["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    model = create_model(args.model, **kwargs).eval()
    analysis = flops(model)
    print(flop_count_table(analysis, max_depth=args.depth))
    h, w = model.img_size
    print(f"\n{model.model_name} at {h}x{w}: {analysis.total() / 1e9:.3f} GMACs per image (fvcore; one multiply-add = one FLOP)")
    return 0


def _time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def cmd_check(args) -> int:
    from crossvit_fast.backend import FUSED_OPS, BackendUnavailableError, triton_status
    from crossvit_fast.models import create_model
    from crossvit_fast.testing import default_atol, fill_like_fixtures_

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    interpreter = False
    if device.type == "cpu" and FUSED_OPS and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        interpreter = True

    base = create_model(args.model, backend="reference").eval()
    fill_like_fixtures_(base, args.seed)
    state = base.state_dict()
    h, w = base.img_size
    g = torch.Generator().manual_seed(args.seed + 1)
    x64 = torch.randn(args.batch, 3, h, w, generator=g, dtype=torch.float64).to(device)
    with torch.no_grad():
        ref = base.double().to(device)(x64)
    ref_max = float(ref.abs().max())
    del base

    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    print(f"check {args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"batch {args.batch}, {h}x{w}; parity against the reference in float64, max |logit| {ref_max:.3g}")

    rows, failed = [], False
    ref_err = {}
    for backend in ("reference", "triton"):
        ok, why = triton_status(allow_interpreter=True) if backend == "triton" else (True, "plain PyTorch")
        if not ok:
            rows.append([backend, "-", "-", "-", "-", f"not available: {why}"])
            continue
        batch = args.batch
        xb = x64
        note = why if backend == "triton" else ""
        if backend == "triton" and device.type == "cpu":
            batch, xb = 1, x64[:1]
            note = "Triton CPU interpreter, batch 1 (slow: timing is not a speed figure)"
        for dt in dtypes:
            try:
                model = create_model(args.model, backend=backend).eval()
            except BackendUnavailableError as e:
                rows.append([backend, "-", "-", "-", "-", f"not available: {e}"])
                break
            model.load_state_dict(state)
            model = model.to(device=device, dtype=dt)
            xd = xb.to(dt)
            with torch.no_grad():
                t0 = time.perf_counter()
                out = model(xd)
                ms = (time.perf_counter() - t0) * 1e3
                if not (backend == "triton" and device.type == "cpu"):  # the interpreter runs once: it is slow
                    ms = _time_ms(lambda: model(xd), device, args.reps)
            err = float((out.double() - ref[:batch]).abs().max())
            status = ""
            if backend == "reference":
                ref_err[dt] = err
            else:
                bound = 2 * ref_err[dt] + default_atol(dt) * max(1.0, ref_max)
                status = "ok" if err <= bound else "FAIL"
                failed |= status == "FAIL"
            rows.append([backend, str(dt).replace("torch.", ""), f"{err:.2e}", f"{err / max(ref_max, 1e-30):.2e}",
                         f"{ms:.2f}", " ".join(s for s in (status, note) if s)])
    if not FUSED_OPS:
        rows.append(["", "", "", "", "", "the fused Triton path is not available yet in this version"])
    print(_table(rows, ["backend", "dtype", "max abs err", "rel err", "ms/batch", "notes"]))
    if interpreter:
        print("(TRITON_INTERPRET=1 was set for this run: no CUDA device)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossvit-fast", description="CrossViT with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the model family").set_defaults(fn=cmd_list)
    sub.add_parser("info", help="versions, devices, which backends can run here").set_defaults(fn=cmd_info)
    f = sub.add_parser("flops", help="fvcore FLOP table of a model (one image)")
    f.add_argument("model")
    f.add_argument("--img-size", type=int, nargs="+", help="H or H W (default: the model's)")
    f.add_argument("--backend", choices=["reference", "torch", "triton", "auto"])
    f.add_argument("--depth", type=int, default=3, help="module depth of the table (default 3)")
    f.set_defaults(fn=cmd_flops)
    c = sub.add_parser("check", help="parity and timing of every backend that can run here")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    c.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    c.add_argument("--device", help="cpu or cuda (default: cuda when there is one)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--reps", type=int, default=5)
    c.set_defaults(fn=cmd_check)
    sub.add_parser("bench", help="end-to-end images/s benchmark (CUDA; see crossvit-fast bench --help)", add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: crossvit-fast bench --help
        from crossvit_fast.bench_model import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "batch", 0) is None:
        use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.batch = 8 if use_cuda else 1
    try:
        return args.fn(args)
    except (ValueError, ImportError) as e:
        print(f"crossvit-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
