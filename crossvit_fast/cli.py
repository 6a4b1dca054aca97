"""``crossvit-fast`` (also ``python -m crossvit_fast``): list, info, flops, check, verify, bench."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from typing import List, Optional

import torch

from crossvit_fast.record import package_version as _version

DEFAULT_MODEL = "crossvit_18_dagger_240"


class CLIError(Exception):
    """A user error the CLI reports as one line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``crossvit-fast CMD: error: ...; see crossvit-fast CMD --help``."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _device(name: Optional[str]) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, checked before anything runs."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"device {name!r} is not supported: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise CLIError(f"--device {name} was asked for but {why}; run with --device cpu (or without --device)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def _table(rows: List[List[str]], header: List[str]) -> str:
    cols = [header] + rows
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def cmd_list(args) -> int:
    from crossvit_fast.model_registry import MODEL_CONFIGS, MODEL_GMACS
    from crossvit_fast.models import create_model

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
                "%.2f" % MODEL_GMACS[name],
            ]
        )
    print(_table(rows, ["model", "IBM name", "image", "dims (S, L)", "heads (S, L)", "M", "mlp", "dagger", "params",
                        "GMACs (fvcore)"]))
    return 0


def cmd_info(args) -> int:
    import crossvit_fast
    from crossvit_fast.backend import (
        FUSED_OPS,
        authority,
        backend_request,
        device_arch,
        resolve_backend,
        triton_status,
        verified_archs,
        verified_on,
    )
    from crossvit_fast.config import (
        ENV_AUTOTUNE,
        ENV_AUTOTUNE_CACHE,
        ENV_BACKEND,
        SETTINGS,
        autotune_cache_from_env,
        autotune_from_env,
        env_raw,
    )
    from crossvit_fast.record import status as record_status

    print(f"crossvit_fast {crossvit_fast.__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    print(f"torch         {torch.__version__}")
    for pkg in ("triton", "fvcore", "numpy", "timm"):
        print(f"{pkg:<13} {_version(pkg)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}        {torch.cuda.get_device_name(i)} ({device_arch(i)})")
    else:
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        print(f"devices       cpu only (torch.cuda.is_available() is False; {build})")
    env = env_raw(ENV_BACKEND)
    try:
        asked, source = backend_request()
        print(f"default backend asked for: {asked!r} (from {source}; {ENV_BACKEND}={env!r})")
    except ValueError as e:
        asked = None
        print(f"default backend asked for: none valid: {e}; modules built without backend= will raise until it is fixed")
    tune = "on" if autotune_from_env() else "off (fixed default tiles)"
    print(f"autotuning: {tune} ({ENV_AUTOTUNE}={env_raw(ENV_AUTOTUNE)!r}; CUDA only: the self-attention "
          "and block-GEMM tiles, timed on the first call of each shape)")
    if autotune_cache_from_env():
        where = os.environ.get("TRITON_CACHE_DIR") or os.path.join("~", ".triton", "cache")
        cache = f"on (each pick also kept in Triton's cache dir {where}, loaded by later processes)"
    else:
        cache = "off (picks kept in the process only)"
    print(f"autotune cache: {cache} ({ENV_AUTOTUNE_CACHE}={env_raw(ENV_AUTOTUNE_CACHE)!r})")
    print("backends:")
    print("  reference    can run (plain PyTorch: the explicit math, the tests' oracle)")
    print("  torch        can run (what timm runs: SDPA, PyTorch's LayerNorm)")
    ok_any, why_any = triton_status()
    print(f"  triton       {'can run: ' if ok_any else 'cannot run: '}{why_any}")
    for op in FUSED_OPS:
        ok, why = triton_status(op)
        if ok:
            state = "fused kernel runs here"
        elif not ok_any:
            state = "no (as above)"
        else:
            state = f"no: {why}"
        print(f"    {op:<22} {state}")
    arch = device_arch()
    if arch is not None:
        print(f"verification record ({arch}): {record_status(arch)}")
    for op in FUSED_OPS:
        took = resolve_backend("auto", op=op)
        note = f" (on the authority of: {authority(op, arch)})" if took == "triton" else ""
        if took != "triton" and not verified_on(op, arch) and triton_status(op)[0]:
            note = (f" (its kernel has not passed its parity tests on {arch or 'this device'}; verified on: "
                    f"{verified_archs(op)}; no shape class of it verified by this machine's record; "
                    f"crossvit-fast verify checks it here, or ask for 'triton' to run it)")
        elif took != "triton" and not ok_any:
            note = " (the fused kernels cannot run here: see triton above)"
        print(f"  auto         takes {took} here for {op}{note}")
    if asked == "triton" and not ok_any:
        print(f"note: {ENV_BACKEND}=triton asks for the fused kernels, which cannot run here: models built without "
              f"backend= will raise; unset it or set it to 'auto'")
    print("\n".join(fused_ops_lines()))
    print("environment variables (unset: the default):")
    for s in SETTINGS:
        if s.scope != "test":
            value = repr(env_raw(s.name)) if env_raw(s.name) else f"unset ({s.default!r})"
            print(f"  {s.name:<29} {value}: {s.doc}")
    return 0


def fused_ops_lines() -> List[str]:
    """Per op, whether a model built now with the default backend runs it fused, and what runs where it does not."""
    from crossvit_fast.backend import FUSED_OPS, TORCH_PATH, BackendUnavailableError, get_backend, resolve_backend

    try:
        requested = get_backend()
    except ValueError as e:  # a bad CROSSVIT_FAST_BACKEND: reported above, and the report goes on
        return [f"ops of a model built now: none, a model cannot be built until it is fixed ({e})"]
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
    from crossvit_fast.flops import flops
    from crossvit_fast.models import create_model

    kwargs = {"backend": args.backend} if args.backend else {}
    if args.img_size:
        if len(args.img_size) > 2:
            raise CLIError(f"--img-size takes H or H W, got {len(args.img_size)} numbers: {' '.join(map(str, args.img_size))}")
        kwargs["img_size"] = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    if args.backend == "triton":
        from crossvit_fast.backend import triton_status

        ok, why = triton_status()
        if not ok:
            raise CLIError(f"--backend triton cannot run here: {why}; the counts are the same for every backend: "
                           f"drop --backend")
    model = create_model(args.model, **kwargs).eval()  # the arguments' errors first, then the missing dependency
    try:
        from fvcore.nn import flop_count_table
    except ImportError:
        raise CLIError(
            "FLOP counts need fvcore, which is not installed: pip install 'crossvit_fast[flops]' (or pip install fvcore)"
        ) from None
    analysis = flops(model)
    # fvcore labels its column "#flops"; it counts one multiply-add as one: call them what they are.
    print(flop_count_table(analysis, max_depth=args.depth).replace("#flops", "#MACs ", 1))
    h, w = model.img_size
    print(f"\n{model.model_name} at {h}x{w}: {analysis.total() / 1e9:.3f} GMACs per image "
          f"(fvcore; the #MACs column and the paper's \"FLOPs\" count one multiply-add as one)")
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
    from crossvit_fast.config import interpreter_enabled
    from crossvit_fast.models import create_model
    from crossvit_fast.testing import default_atol, fill_seeded_

    device = _device(args.device)
    interpreter = False
    triton_installed = importlib.util.find_spec("triton") is not None
    if device.type == "cpu" and FUSED_OPS and triton_installed and not interpreter_enabled():
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        interpreter = True

    base = create_model(args.model, backend="reference").eval()
    fill_seeded_(base, args.seed)
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
        if ok and backend == "triton" and device.type == "cpu" and importlib.util.find_spec("numpy") is None:
            ok, why = False, "Triton's CPU interpreter needs numpy (pip install numpy); on a CUDA device it does not"
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
    if interpreter and any(r[0] == "triton" and r[1] != "-" for r in rows):
        print("(no CUDA device: TRITON_INTERPRET=1 was set for this run, so the triton row ran in Triton's CPU interpreter)")
    elif device.type == "cpu" and not triton_installed:
        print("(triton is not installed: only the reference path ran; pip install 'crossvit_fast[triton]' to add "
              "the fused kernels, which run on an NVIDIA GPU)")
    return 1 if failed else 0


def cmd_verify(args) -> int:
    from crossvit_fast.model_registry import MODEL_CONFIGS, model_config
    from crossvit_fast.verify import verify

    if args.all and args.models:
        raise CLIError("give model names or --all, not both")
    models = list(MODEL_CONFIGS) if args.all else (args.models or [DEFAULT_MODEL])
    for name in models:
        model_config(name)  # an unknown name: a usage error before anything runs
    report = verify(models, batch=args.batch, timing_batch=args.timing_batch, budget_s=args.budget_s,
                    dtypes=args.dtype, ops=args.op, json_path=args.json, progress=lambda line: print(line, flush=True))
    print(f"\nverify on {report.device}: {', '.join(models)}")
    print(report.table())
    if report.not_run:
        print(f"{len(report.not_run)} cases not run: the budget of {args.budget_s:g} s was spent")
    if report.path:
        print(f"record: {report.path} ('auto' takes the verified shape classes' kernels from now on)")
    if args.json:
        print(f"JSON: {args.json}")
    counts = {v: sum(c['verdict'] == v for c in report.classes) for v in ('verified', 'slower', 'failed')}
    print(f"{counts['verified']} verified, {counts['slower']} slower (stay on the torch path), {counts['failed']} "
          f"failed; took {report.seconds:.1f} s")
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    from crossvit_fast.models import list_models
    from crossvit_fast.ops.registry import op_names

    p = _Parser(prog="crossvit-fast", description="CrossViT with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the model family").set_defaults(fn=cmd_list)
    sub.add_parser("info", help="versions, devices, which backends can run here").set_defaults(fn=cmd_info)
    f = sub.add_parser("flops", help="fvcore FLOP table of a model (one image; needs crossvit_fast[flops])",
                       description="fvcore's table of multiply-adds (the paper's 'FLOPs') for one image. "
                                   "Needs fvcore: pip install 'crossvit_fast[flops]'.")
    f.add_argument("model", help="a model name (crossvit-fast list), timm's or IBM's")
    f.add_argument("--img-size", type=_positive_int, nargs="+", metavar="H [W]", help="H or H W (default: the model's)")
    f.add_argument("--backend", choices=["reference", "torch", "triton", "auto"],
                   help="the backend the model is built with (the counts are the same for every backend)")
    f.add_argument("--depth", type=int, default=3, help="module depth of the table (default 3)")
    f.set_defaults(fn=cmd_flops)
    c = sub.add_parser("check", help="parity and timing of every backend that can run here",
                       description="Build a model with seeded weights, run it under every backend that can run here, "
                                   "and print each one's error against the reference path in float64, and timing.")
    c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"a model name (default {DEFAULT_MODEL}; crossvit-fast list shows them all: "
                        f"{', '.join(list_models()[:3])}, ...)")
    c.add_argument("--batch", type=_positive_int, default=None, help="images per batch (default 8 on CUDA, 1 on CPU)")
    c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    c.add_argument("--seed", type=int, default=0, help="seed of the weights and of the input (default 0)")
    c.add_argument("--reps", type=_positive_int, default=5,
                   help="timed runs per row, the median is shown (default 5; the CPU interpreter runs once)")
    c.set_defaults(fn=cmd_check)
    v = sub.add_parser("verify", help="prove the fused kernels on this GPU: parity and speed per op and shape",
                       description="For every fused op at the models' shapes, forward and backward, in each dtype "
                                   "the GPU takes: parity against the float64 reference under the tolerance rule, "
                                   "then timing against the torch path. Writes this machine's record, from which "
                                   "'auto' takes the kernels found verified. Exit code 0: none failed; 1: some "
                                   "failed; 2: usage error or no CUDA device.")
    v.add_argument("models", nargs="*", metavar="MODEL", help=f"model names (default {DEFAULT_MODEL})")
    v.add_argument("--all", action="store_true", help="the whole family")
    v.add_argument("--json", metavar="PATH", help="also write the record to PATH")
    v.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="start no case after S seconds (the rest is reported as not run)")
    v.add_argument("--batch", type=_positive_int, default=4, help="images per parity case (default 4)")
    v.add_argument("--timing-batch", type=_positive_int, default=32, help="images per timed case (default 32)")
    v.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="only this dtype (repeatable; default every dtype the GPU takes)")
    v.add_argument("--op", action="append", choices=list(op_names()),
                   help="only this op (repeatable; default every fused op)")
    v.set_defaults(fn=cmd_verify)
    sub.add_parser("bench", help="end-to-end images/s benchmark (CUDA; see crossvit-fast bench --help)", add_help=False)
    return p


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    first, _, rest = text.partition("\n")
    return first + (f" [{len(rest.splitlines())} more lines of detail omitted]" if rest else "")


def _run(argv: List[str]) -> int:
    if argv[:1] == ["bench"]:  # its own parser: crossvit-fast bench --help
        from crossvit_fast.bench_model import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from crossvit_fast.backend import BackendUnavailableError

    try:
        if getattr(args, "batch", 0) is None:
            args.batch = 8 if _device(args.device).type == "cuda" else 1
        return args.fn(args)
    except BackendUnavailableError as e:
        print(f"crossvit-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, ImportError) as e:
        print(f"crossvit-fast {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rc = _run(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:  # crossvit-fast info | head -3: the reader has gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
