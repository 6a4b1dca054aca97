"""Ahead-of-time sm_90 (H100) compile check of every Triton kernel, on a machine without a GPU.

Usage (from the repository root; needs triton's bundled ptxas, no GPU)::

    python tests/sm90_compile.py --set smoke|ci|family [--jobs 2] [--json out.json] [--check] [--arch 90|89|86|80]

How: a stand-in Triton driver reports an active sm_90 device that compiles and never launches. Each kernel is
driven through its real launcher (``*_fwd`` / ``*_bwd`` of ``crossvit_fast.kernels``) with CPU tensors (allocated
with ``torch.empty``, never touched, so a batch of 256 costs no memory); the launcher picks its tiles, warps and
stages exactly as on the GPU, and a launch becomes a compile (``warmup``). For the tuned kernels (self-attention,
block GEMMs) every candidate of each key is compiled (every config the autotuner can pick). A compile whose shared memory is
over the device's limit raises ``OutOfResources`` as a GPU launch would, so the launchers' fallbacks run too.

Per distinct compile (deduplicated by Triton's kernel hash) it reports: kernel, config, registers, spill bytes
(stores / loads), stack frame, shared memory and the number of ``wgmma`` instructions in the PTX, read from the
ptxas ``-v`` log of Triton's own compile. ``--check`` fails (exit 1) on a compile error, on shared memory over
232,448 bytes, or on spills (stores + loads) above the kernel's budget in :data:`SPILL_BUDGET`. ``--arch 80`` (A100),
``86`` or ``89`` compile for those GPUs instead (their shared-memory limits, :data:`ARCHS`; spills reported, not
checked): what ``backend="triton"`` would run there, where ``"auto"`` takes no kernel until it is verified.

Scopes: ``smoke`` = the headline model (crossvit_18_dagger_240: C=224 and 448, 7 heads, N=401 / 197, batch 256;
bf16 and fp32; forward and backward of the three ops); ``ci`` = one shape of every kernel x dtype x width class
(self-attention head dims 32 and 64; CLS attention and LayerNorm at each power-of-two width class of the family);
``family`` = the 11 models' shapes at 240 and 408 pixels, batch 1 and 256, fp32 / fp16 / bf16 (and the bf16-autocast
LayerNorm), plus the launchers' limits (head dim 128, CLS attention at C = 1024). Each worker process compiles
into its own fresh Triton cache under a temporary directory, so counts and CPU seconds are those of cold compiles.

This file is a tool of the test suite (``tests/test_sm90_compile.py`` runs it in a subprocess): it imports nothing
from triton at module level and is not part of the installed package.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from crossvit_fast.ops.registry import OPS  # noqa: E402  (the registry imports no triton)

MAX_SHARED = 232448  # bytes of shared memory an sm_90 block may use (227 KB)

# --arch: compute capability -> (shared memory a block may opt into, SM count of a typical part, ptxas's GPU name).
# Only sm_90 has spill budgets (measured there); for the others --check fails on errors and shared memory alone.
ARCHS: Dict[int, Tuple[int, int, str]] = {
    90: (MAX_SHARED, 132, "sm_90a"),  # H100 / H200
    89: (101376, 128, "sm_89"),  # L40S, RTX 4090, L4: 99 KB
    86: (101376, 84, "sm_86"),  # A10, RTX 3090, A40: 99 KB
    80: (166912, 108, "sm_80"),  # A100: 163 KB
}

# Spill budget in bytes (spill stores + spill loads, ptxas -v) per (kernel, dtype, width class), the largest over
# every shape and config of the family scope, measured with triton 3.6.0 (the GPU machines') and 3.9.0, plus a
# margin. Width class (:func:`width_class`): ``D<head dim>`` for the self-attention kernels, ``C<next pow2 of the
# width>`` for the others; one budget per class, so a regression at C = 448 does not hide under C = 768's. A key not
# listed has a budget of 0. LayerNorm dtypes: "fp32", "fp16", "bf16" (every tensor that dtype) and "amp" (the
# float32 residual stream with bfloat16 output / gradient, as under bf16 autocast). Measured (3.6 / 3.9, st+ld B):
SPILL_BUDGET: Dict[Tuple[str, str, str], int] = {
    # CLS cross-attention backward (g/e operands from the launcher, zero padded; family scope, 3.6 / 3.9), 16-bit:
    # C = 384/448 at 8 warps, 255 registers: up to 84+72 / 88+72 (C = 448 3.6: 24+12, none in the token loop);
    # C = 768 at 16 warps, maxnreg 128: 2076+2368 / 1384+1340
    ("_bwd_tokens_kernel", "bf16", "C512"): 160,
    ("_bwd_tokens_kernel", "fp16", "C512"): 160,
    ("_bwd_tokens_kernel", "bf16", "C1024"): 4444,
    ("_bwd_tokens_kernel", "fp16", "C1024"): 4444,
    # float32: C = 192/224 0 / 20+12; C = 384/448 (16 warps) up to 1276 / 1408 (st+ld); C = 768 2364+2264 / 2756+2596
    ("_bwd_tokens_kernel", "fp32", "C256"): 32,
    ("_bwd_tokens_kernel", "fp32", "C512"): 1408,
    ("_bwd_tokens_kernel", "fp32", "C1024"): 5352,
    # forward: the LayerNorm's pivot (each row's first channel, loaded once: constant rows centre exactly) took
    # triton 3.6 from 127 to 128 registers and 16+8 B at C = 448 bf16 (0 / 0 with 3.9), and C = 768 float32 from
    # 12+8 to 100+116 (0 with 3.9)
    ("_fwd_tokens_kernel", "bf16", "C512"): 32,
    ("_fwd_tokens_kernel", "fp32", "C1024"): 256,
    # LayerNorm forward, the same pivot: fp16 C = 448 with the residual 4+4 with 3.6 (0 with 3.9)
    ("_layer_norm_fwd_kernel", "fp16", "C512"): 8,
    # self-attention, float32 (FMA dots): head dim 32 fwd 0 / 8+8 (one 32x32 tile); head dim 64 (8-warp 16x32 tile)
    # dkdv 256+256 / 276+276, dq 68+124 / 80+136; head dim 128 (beyond the family; 16x16 at 8 warps) fwd 0 / 0,
    # dkdv 248+248 / 264+264, dq 204+396 / 220+428. The float32 dq kernel's first pass over the keys (delta and
    # the row sums of P, kernels/self_attention.py) took its spills from 20+20 / 36+36 and 168+168 / 184+184.
    ("_attn_fwd_kernel", "fp32", "D32"): 48,
    ("_attn_bwd_dkdv_kernel", "fp32", "D64"): 608,
    ("_attn_bwd_dkdv_kernel", "fp32", "D128"): 576,
    ("_attn_bwd_dq_kernel", "fp32", "D64"): 256,
    ("_attn_bwd_dq_kernel", "fp32", "D128"): 704,
    # the fused block GEMMs (kernels/linear.py): with 3.6 (the GPU machines') 0 everywhere but the float32 dgrad
    # (4+4 with the bias gradient's sums); with 3.9 the float32 forward (FMA dots, 64x64x16) 8+8 at the narrow
    # widths (ragged K loop), the float32 dgrad 8+8, and the bfloat16 dgrad with the bias sums 16+8 to 44+32 on
    # 7 of its 8 tiles x flag sets (float16: 0)
    ("_linear_fwd_kernel", "fp32", "C128"): 48,
    ("_linear_fwd_kernel", "fp32", "C256"): 48,
    ("_linear_dgrad_kernel", "fp32", "C128"): 24,  # C = 96 (family scope)
    ("_linear_dgrad_kernel", "fp32", "C256"): 24,
    ("_linear_dgrad_kernel", "bf16", "C256"): 96,
    ("_linear_dgrad_kernel", "bf16", "C512"): 96,
}

DTYPES = ("fp32", "fp16", "bf16")

# (C_small, C_large, heads) of the five width pairs, and the models that use them at 408 pixels
_WIDTHS = {"tiny": (96, 192, 3), "small": (192, 384, 6), "base": (384, 768, 12), "9": (128, 256, 4),
           "18": (224, 448, 7)}
_N = {240: (401, 197), 408: (1157, 577)}  # tokens (CLS included) of the small / large branch
_MODELS = [(w, 240) for w in _WIDTHS] + [("small", 408), ("18", 408)]  # 15 and small share widths


def _job(op: str, dtype: str, C: int, H: int, N: int, B: int) -> dict:
    return {"op": op, "dtype": dtype, "C": C, "H": H, "N": N, "B": B}


def jobs_for(scope: str) -> List[dict]:
    """The launcher calls of a scope (each runs the op's forward and backward)."""
    jobs: List[dict] = []
    if scope == "smoke":
        for dt in ("bf16", "fp32"):
            for C, N in ((224, 401), (448, 197)):
                jobs.append(_job("self_attention", dt, C, 7, N, 256))
                jobs.append(_job("cls_cross_attention", dt, C, 7, N - 1, 256))
                jobs.append(_job("layer_norm", dt, C, 7, N, 256))
            # the fused block under autocast: float32 stream, bfloat16 LayerNorm output
        for C, N in ((224, 401), (448, 197)):
            jobs.append(_job("layer_norm", "amp", C, 7, N, 256))
    elif scope == "ci":
        for dt in DTYPES:
            for C, H, N in ((224, 7, 401), (448, 7, 197)):  # head dims 32 and 64
                jobs.append(_job("self_attention", dt, C, H, N, 256))
            for C, H, N in ((96, 3, 400), (224, 7, 400), (448, 7, 196), (768, 12, 196)):  # BLOCK_C 128..1024
                jobs.append(_job("cls_cross_attention", dt, C, H, N, 256))
        for dt in DTYPES + ("amp",):
            for C, N in ((96, 401), (224, 401), (448, 197), (768, 197)):
                jobs.append(_job("layer_norm", dt, C, 0, N, 256))
        for dt in DTYPES + ("amp",):  # the branch block's GEMMs: K ragged (224) and a multiple of the K tile (448)
            for C, N in ((224, 401), (448, 197)):
                for gemm in ("qkv", "proj", "fc1", "fc2"):
                    jobs.append(dict(_job("linear", dt, C, 0, N, 256), gemm=gemm))
    elif scope == "family":
        seen = set()
        for w, img in _MODELS:
            cs, cl, h = _WIDTHS[w]
            for C, N in ((cs, _N[img][0]), (cl, _N[img][1])):
                for B in (1, 256):
                    for dt in DTYPES:
                        for op, n in (("self_attention", N), ("cls_cross_attention", N - 1), ("layer_norm", N)):
                            j = _job(op, dt, C, h, n, B)
                            key = tuple(sorted(j.items()))
                            if key not in seen:
                                seen.add(key)
                                jobs.append(j)
                    j = _job("layer_norm", "amp", C, h, N, B)
                    if tuple(sorted(j.items())) not in seen:
                        seen.add(tuple(sorted(j.items())))
                        jobs.append(j)
        widths = sorted({(c, _N[img][i]) for w, img in _MODELS for i, c in enumerate(_WIDTHS[w][:2])})
        for dt in DTYPES + ("amp",):  # the branch block's GEMMs at every width and token count of the family
            for C, N in widths:
                for gemm in ("qkv", "proj", "fc1", "fc2"):
                    jobs.append(dict(_job("linear", dt, C, 0, N, 256), gemm=gemm))
        for dt in DTYPES:  # the launchers' limits beyond the family
            jobs.append(_job("self_attention", dt, 768, 6, 197, 256))  # head dim 128
            jobs.append(_job("cls_cross_attention", dt, 1024, 8, 196, 256))
    else:
        raise ValueError(f"unknown scope {scope!r}; expected smoke, ci or family")
    return jobs


def _group_key(j: dict) -> tuple:
    """Jobs that may share compiles go to one worker (its in-memory cache dedupes them)."""
    if j["op"] == "self_attention":
        return (j["op"], j["dtype"], j["C"] // j["H"])
    if j["op"] == "linear":
        return (j["op"], j["dtype"], j["C"], j["gemm"])
    return (j["op"], j["dtype"], j["C"])


# ----------------------------------------------------------------------------------------------------------------
# Worker side: stand-in driver, patched launch, recording
# ----------------------------------------------------------------------------------------------------------------

_W: dict = {}  # worker state


def _init_worker(cache_root: str, shared: bool = False, arch: int = 90) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    cache = cache_root if shared else os.path.join(cache_root, f"cache-{os.getpid()}")
    os.makedirs(cache, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = cache
    if REPO not in sys.path:
        sys.path.insert(0, REPO)

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    try:
        triton.knobs.cache.dir = cache  # triton >= 3.4 reads its knobs, set at import from the environment
    except AttributeError:
        pass
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
    except AttributeError:
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

    max_shared, sm_count, _ = ARCHS[arch]
    target = GPUTarget("cuda", arch, 32)

    class CompileOnlyDriver:
        """An active 'CUDA' device of compute capability ``arch`` that compiles; launching is never reached."""

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("sm90_compile: nothing is benchmarked (compile only)")

    driver.set_active(CompileOnlyDriver())

    class _Props:
        multi_processor_count = sm_count  # 132: H100 SXM

    torch.cuda.get_device_properties = lambda *a, **k: _Props()

    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                ck = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # reported even where a launcher skips it (the GEMM tuner skips a failed tile)
            _W["compile_errors"].append({**_W["tag"], "error": f"{self.__name__}: {type(e).__name__}: {str(e)[:1500]}"})
            e.sm90_reported = True
            raise
        _record(self, ck, buf.getvalue())
        if ck.metadata.shared > max_shared:
            raise OutOfResources(ck.metadata.shared, max_shared, "shared memory")
        return ck

    JITFunction.run = run

    import importlib

    mods = {name: importlib.import_module(spec.kernel_module) for name, spec in OPS.items() if spec.sm90}
    for mod in mods.values():
        mod.COMPILE_ONLY = True
    mods["self_attention"].AUTOTUNE = True
    mods["linear"].AUTOTUNE = True  # compile every candidate the tuners may time
    _W.update(torch=torch, triton=triton, seen=set(), records=[], tag=None, arch=arch, mods=mods)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_log(ptx: str) -> str:
    """Fallback (the kernel came from a cache, no log): ptxas -v on its PTX."""
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(_W.get("arch", 90)).path
    except Exception:  # pragma: no cover
        import triton
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name={ARCHS[_W.get('arch', 90)][2]}", f.name, "-o", os.devnull],
                             capture_output=True,
                             text=True)
    finally:
        os.unlink(f.name)
    return out.stderr + out.stdout


def _record(fn, ck, log: str) -> None:
    if ck.hash in _W["seen"]:
        return
    _W["seen"].add(ck.hash)
    name = ck.metadata.name
    if (f"'{name}'" not in log or not _RE_REGS.search(log)) and "ptx" in ck.asm:
        log = _ptxas_log(ck.asm["ptx"])  # else a hit in a packed cache, which keeps no PTX: no report
    # the log may hold other kernels' entries (a nested compile): take this kernel's section
    i = log.find(f"Compiling entry function '{name}'")
    sec = log[i:] if i >= 0 else log
    j = sec.find("Compiling entry function", 10)
    sec = sec[:j] if j > 0 else sec
    regs = _RE_REGS.search(sec)
    sp = _RE_SPILL.search(sec)
    consts = ck.src.constants
    cfg = {str(k if isinstance(k, str) else fn.arg_names[k[0]] if isinstance(k, tuple) else k): v
           for k, v in consts.items() if isinstance(v, (int, bool, str)) and not isinstance(k, tuple)}
    if not cfg:  # triton >= 3.3 keys constants by (index,) tuples
        cfg = {fn.arg_names[k[0]]: v for k, v in consts.items()
               if isinstance(k, tuple) and len(k) == 1 and isinstance(v, (int, bool, str))}
    cfg = {k: v for k, v in cfg.items() if k.isupper() or k.startswith("BLOCK")}
    ptx = ck.asm["ptx"] if "ptx" in ck.asm else ""
    _W["records"].append({
        **_W["tag"], "kernel": fn.__name__, "hash": ck.hash,
        "config": {**cfg, "warps": ck.metadata.num_warps, "stages": ck.metadata.num_stages},
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(sp.group(1)) if sp else None,
        "spill_st": int(sp.group(2)) if sp else None,
        "spill_ld": int(sp.group(3)) if sp else None,
        "shared": int(ck.metadata.shared),
        "wgmma": ptx.count("wgmma.mma_async"),
    })


def _tensor(shape, dtype):
    return _W["torch"].empty(shape, dtype=dtype)


def _drive(j: dict) -> None:
    torch = _W["torch"]
    mods = _W["mods"]
    op, C, H, N, B = j["op"], j["C"], j["H"], j["N"], j["B"]
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "amp": torch.bfloat16}[j["dtype"]]
    if op == "self_attention":
        m = mods[op]
        qkv = _tensor((B, N, 3 * C), dt)
        _W["tag"]["pass"] = "fwd"
        out, lse = m.self_attention_fwd(qkv, H)  # inference: no residual
        # training, 16-bit: the forward also writes O's rounding residual and the backward's delta reads it
        lo = _tensor((B, N, C), dt) if dt != torch.float32 else None
        if lo is not None:
            m.self_attention_fwd(qkv, H, out=out, lse=lse, out_lo=lo)
        _W["tag"]["pass"] = "bwd"
        m.self_attention_bwd(_tensor((B, N, C), dt), qkv, out, lse, H, out_lo=lo)
        if lo is not None:  # the op called without save: delta from the rounded O
            m.self_attention_bwd(_tensor((B, N, C), dt), qkv, out, lse, H)
    elif op == "cls_cross_attention":
        m = mods[op]
        w = [torch.zeros((C, C), dtype=dt) for _ in range(4)]
        v = [torch.zeros((C,), dtype=dt) for _ in range(6)]
        cls = torch.zeros((B, 1, C), dtype=dt)
        # the tokens are a view past the CLS row of a (B, 1 + N, C) sequence, as in the model's fusion
        tokens = _tensor((B, 1 + N, C), dt)[:, 1:]
        _W["tag"]["pass"] = "fwd"
        res = m.cls_cross_attention_fwd(cls, tokens, v[0], v[1], w[0], v[2], w[1], v[3], w[2], v[4], w[3], v[5], H)
        _, q, u, xbar, lse, o = res
        _W["tag"]["pass"] = "bwd"
        m.cls_cross_attention_bwd(torch.zeros((B, 1, C), dtype=dt), cls, tokens, v[0], v[1], w[0], w[1], w[2], w[3],
                                  q, u, xbar, lse, o, H)
    elif op == "linear":
        m = mods[op]
        kin, nout, flags = {g[0]: g[1:] for g in m._BLOCK_GEMMS}[j["gemm"]]
        K, NO = kin * C, nout * C
        # as the Block calls them: "amp" is bfloat16 autocast (a float32 residual stream, LayerNorm parameters and
        # biases; the weights cast to bfloat16), otherwise everything in one dtype. qkv / fc1 read the stream,
        # proj / fc2 the previous kernel's output (compute dtype) and add the stream.
        sd = torch.float32 if j["dtype"] == "amp" else dt
        w = torch.zeros((NO, K), dtype=dt)
        bias = torch.zeros((NO,), dtype=sd)
        lnw = torch.zeros((K,), dtype=sd) if flags.get("ln") else None
        scale = torch.zeros((B,), dtype=dt) if flags.get("scale") else None
        res = _tensor((B, N, NO), sd) if flags.get("res") else None
        x = _tensor((B, N, K), sd if flags.get("ln") else dt)
        gelu = bool(flags.get("gelu"))
        _W["tag"]["pass"] = "fwd"
        for save in (False, True):  # inference, and the training forward that saves for the backward
            m.linear_fwd(x, w, bias, lnw, lnw, 1e-6, gelu, scale, res, None, save)
        _W["tag"]["pass"] = "bwd"
        pre = _tensor((B * N, NO), dt) if gelu else None
        dout = _tensor((B, N, NO), torch.promote_types(sd, dt) if res is not None else dt)
        from crossvit_fast.ops.linear import dgrad  # the op's call: its dz / da dtypes and the bias gradient

        dgrad(dout, w, pre, scale, torch.float32 if lnw is not None else x.dtype)
    elif op == "layer_norm":
        m = mods[op]
        amp = j["dtype"] == "amp"
        xd = torch.float32 if amp else dt
        w = torch.zeros((C,), dtype=torch.float32 if amp else dt)
        x = _tensor((B, N, C), xd)
        y = _tensor((B, N, C), dt)
        od = dt if amp else None
        _W["tag"]["pass"] = "fwd"
        for res in (None, y):  # norm1 (no residual) and the fused add + norm2
            m.layer_norm_fwd(x, res, w, w, 1e-6, od)
        _W["tag"]["pass"] = "bwd"
        mean = torch.empty((B, N), dtype=torch.float32)
        dout = _tensor((B, N, C), dt)
        m.layer_norm_bwd(dout, None, x, w, mean, mean, xd, None)
        m.layer_norm_bwd(dout, _tensor((B, N, C), xd), x, w, mean, mean, xd, dt)
        # after the block GEMMs' LayerNorm prologue: a float32 da from the dgrad GEMM; the linear op alone, and
        # block_half, which adds the residual's gradient (in the stream's dtype) in the same kernel
        da = _tensor((B, N, C), torch.float32)
        m.layer_norm_bwd(da, None, x, w, mean, mean, xd, None)
        m.layer_norm_bwd(da, _tensor((B, N, C), xd), x, w, mean, mean, xd, None)
    else:  # pragma: no cover
        raise ValueError(op)


def _run_group(jobs: List[dict]) -> dict:
    """Worker task: drive every job of a group; returns its new compile records, errors and CPU seconds."""
    t0 = time.process_time()
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.time()
    _W["records"] = []
    _W["compile_errors"] = errors = []
    for j in jobs:
        _W["tag"] = dict(j)
        try:
            _drive(j)
        except Exception as e:  # a compile error, or a launcher that raised: reported, the check fails
            if not getattr(e, "sm90_reported", False):
                errors.append({**_W["tag"], "error": f"{type(e).__name__}: {str(e)[:1500]}"})
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (time.process_time() - t0) + (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return {"records": _W["records"], "errors": errors, "cpu_s": cpu, "wall_s": time.time() - w0}


# ----------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------


def run_scope(scope: str, jobs: int = 2, ops: Optional[List[str]] = None, cache_dir: Optional[str] = None,
              arch: int = 90) -> dict:
    """Compile a scope (only ``ops`` when given) in ``jobs`` worker processes; returns ``{"records", "errors",
    "compiles", "cpu_s", ...}``. With ``cache_dir`` every worker compiles into that one Triton cache, which is kept
    (see :func:`pack_cache`); without, each into a fresh temporary one (cold compiles, removed after)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    groups: Dict[tuple, List[dict]] = {}
    for j in jobs_for(scope):
        if ops and j["op"] not in ops:
            continue
        groups.setdefault(_group_key(j), []).append(j)
    # biggest groups first (the tuned kernels compile every candidate)
    order = sorted(groups.values(), key=lambda g: (g[0]["op"] != "self_attention", g[0]["dtype"] == "fp32"))
    root = os.path.abspath(cache_dir) if cache_dir else tempfile.mkdtemp(prefix="sm90-compile-")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(root, bool(cache_dir), arch)) as pool:
            results = list(pool.map(_run_group, order))
    finally:
        if not cache_dir:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.time() - t0
    records, errors, seen = [], [], set()
    for r in results:
        errors += r["errors"]
        for rec in r["records"]:
            if rec["hash"] not in seen:  # the same kernel compiled by two workers counts once
                seen.add(rec["hash"])
                records.append(rec)
    import triton  # only for the version in the report (after the workers, so nothing is compiled here)

    return {"scope": scope, "arch": arch, "max_shared": ARCHS[arch][0], "triton": triton.__version__,
            "records": records, "errors": errors,
            "compiles": len(records), "compiles_with_duplicates": sum(len(r["records"]) for r in results),
            "cpu_s": round(sum(r["cpu_s"] for r in results), 1), "wall_s": round(wall, 1), "jobs": jobs}


CACHE_KEEP = (".cubin", ".json")  # what a cache hit loads: the binary, its metadata and the group index


def pack_cache(cache_dir: str, tar_path: str) -> dict:
    """Pack a Triton cache for the GPU machine: only what a cache hit reads (cubin, metadata and group JSON; the IR
    and PTX stay behind), xz-compressed, member paths relative to ``cache_dir``. Triton's group index names its files
    by absolute path, so the GPU side must unpack it at the same path (``bench/gpu_run.sh`` does)."""
    import tarfile

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(cache_dir) for f in fs if f.endswith(CACHE_KEEP))
    os.makedirs(os.path.dirname(os.path.abspath(tar_path)), exist_ok=True)
    with tarfile.open(tar_path, "w:xz") as tar:
        for f in files:
            tar.add(f, arcname=os.path.relpath(f, cache_dir))
    kernels = sum(1 for f in files if os.path.basename(f).startswith("__grp__"))
    return {"kernels": kernels, "files": len(files), "bytes": os.path.getsize(tar_path)}


def _dtype_key(rec: dict) -> str:
    return rec["dtype"]


def width_class(rec: dict) -> str:
    """The register tile width a compile was made for: ``D<pow2 head dim>`` for the self-attention kernels,
    ``C<pow2 width>`` for the others (widths of one class compile alike)."""
    if rec["op"] == "self_attention":
        return f"D{1 << max(rec['C'] // rec['H'] - 1, 0).bit_length()}"
    return f"C{1 << max(rec['C'] - 1, 0).bit_length()}"


def budget(kernel: str, dtype: str, width: str) -> int:
    return SPILL_BUDGET.get((kernel, dtype, width), 0)


def problems(result: dict) -> List[str]:
    """Everything the check fails on: compile/launcher errors; on sm_90 also any compile over the shared-memory
    limit and spills over budget (measured there). Elsewhere a compile over the limit is what the launchers handle
    (the GEMM tuner skips the tile, the CLS launcher retries with one stage): only what reaches a caller, an error,
    fails."""
    max_shared = result.get("max_shared", MAX_SHARED)
    strict = result.get("arch", 90) == 90
    out = [f"ERROR {e['op']} {e['dtype']} C={e['C']} H={e['H']} N={e['N']} B={e['B']} ({e.get('pass')}): "
           f"{e['error']}" for e in result["errors"]]
    for r in result["records"]:
        where = f"{r['kernel']} {r['dtype']} C={r['C']} H={r['H']} {_cfg_str(r['config'])}"
        if r["regs"] is None:
            out.append(f"NO PTXAS REPORT {where}")
            continue
        if strict and r["shared"] > max_shared:
            out.append(f"SHARED {r['shared']} B > {max_shared} {where}")
        spill = r["spill_st"] + r["spill_ld"]
        allowed = budget(r["kernel"], _dtype_key(r), width_class(r))
        if strict and spill > allowed:
            out.append(f"SPILL {r['spill_st']}+{r['spill_ld']} B > budget {allowed} "
                       f"{where}")
    return out


def _cfg_str(cfg: dict) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_T": "T", "BLOCK_C": "C", "BLOCK_H": "H", "BLOCK_R": "R",
             "BLOCK_D": "D", "BLOCK_K": "K", "warps": "w", "stages": "s"}
    keep = [f"{short[k]}{v}" for k, v in cfg.items() if k in short]
    return " ".join(keep)


def table(result: dict) -> str:
    rows = sorted(result["records"], key=lambda r: (r["op"], r["kernel"], r["dtype"], r["C"] // max(r["H"], 1)
                                                    if r["op"] == "self_attention" else r["C"], str(r["config"])))
    lines = [f"{'kernel':<24} {'dtype':<5} {'C':>5} {'D':>4} {'config':<30} {'regs':>4} {'spill st/ld':>12} "
             f"{'stack':>6} {'smem':>7} {'wgmma':>5}"]
    for r in rows:
        d = r["C"] // r["H"] if r["H"] else 0
        lines.append(f"{r['kernel']:<24} {r['dtype']:<5} {r['C']:>5} {d:>4} {_cfg_str(r['config']):<30} "
                     f"{r['regs'] if r['regs'] is not None else '?':>4} "
                     f"{str(r['spill_st']) + '/' + str(r['spill_ld']):>12} {r['stack']!s:>6} {r['shared']:>7} "
                     f"{r['wgmma']:>5}")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """Worst case per (kernel, dtype, width class): registers, spills, stack, shared memory."""
    worst: Dict[tuple, dict] = {}
    for r in result["records"]:
        if r["regs"] is None:
            continue
        k = (r["kernel"], r["dtype"], width_class(r))
        w = worst.setdefault(k, {"n": 0, "regs": 0, "spill": 0, "stack": 0, "shared": 0, "where": ""})
        w["n"] += 1
        w["regs"] = max(w["regs"], r["regs"])
        w["stack"] = max(w["stack"], r["stack"])
        w["shared"] = max(w["shared"], r["shared"])
        s = r["spill_st"] + r["spill_ld"]
        if s > w["spill"] or not w["where"]:
            w["spill"] = s
            w["where"] = f"C={r['C']} H={r['H']} {_cfg_str(r['config'])}"
    lines = [f"{'kernel':<24} {'dtype':<5} {'width':<5} {'#':>3} {'max regs':>8} {'max spill':>9} {'budget':>6} "
             f"{'max stack':>9} {'max smem':>8}  worst spill at"]
    order = sorted(worst, key=lambda k: (k[0], k[1], k[2][0], int(k[2][1:])))
    for k, d, c in order:
        w = worst[(k, d, c)]
        lines.append(f"{k:<24} {d:<5} {c:<5} {w['n']:>3} {w['regs']:>8} {w['spill']:>9} {budget(k, d, c):>6} "
                     f"{w['stack']:>9} {w['shared']:>8}  {w['where'] if w['spill'] else ''}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="ci", choices=("smoke", "ci", "family"), help="which shapes (default ci)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(ARCHS),
                    help="compute capability to compile for (default 90: H100; 80: A100; 86 / 89: 99 KB parts); "
                         "spill budgets are checked for 90 only")
    ap.add_argument("--json", help="write every record (and the totals) to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 on errors, shared memory or spills over budget")
    ap.add_argument("--table", action="store_true", help="print every compile, not only the summary per kernel")
    ap.add_argument("--ops", nargs="+", choices=[n for n, s in OPS.items() if s.sm90],
                    help="only these ops (default all)")
    ap.add_argument("--cache-dir", help="compile into this Triton cache and keep it (default: a fresh temporary one "
                                        "per worker, removed after)")
    ap.add_argument("--pack", metavar="TAR_XZ", help="with --cache-dir: pack what a cache hit needs into this file "
                                                     "(bench/gpu_run.sh unpacks bench/.gpu-carry/triton-cache.tar.xz)")
    args = ap.parse_args(argv)
    if args.pack and not args.cache_dir:
        ap.error("--pack needs --cache-dir")
    result = run_scope(args.set, args.jobs, args.ops, args.cache_dir, args.arch)
    if args.table:
        print(table(result))
        print()
    print(summary(result))
    bad = problems(result)
    result["problems"] = bad
    print(f"\nscope {result['scope']}, sm_{args.arch}: {result['compiles']} distinct compiles "
          f"({result['compiles_with_duplicates']} with cross-worker duplicates), {result['cpu_s']} CPU s, "
          f"{result['wall_s']} s wall on {result['jobs']} workers, triton {result['triton']}")
    for p in bad:
        print(p)
    if args.pack:
        packed = pack_cache(args.cache_dir, args.pack)
        print(f"packed {packed['kernels']} compiled kernels ({packed['files']} files, {packed['bytes'] / 2**20:.1f} MiB)"
              f" of {args.cache_dir} into {args.pack}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.check and bad:
        print(f"FAILED: {len(bad)} problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
