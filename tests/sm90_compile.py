"""Ahead-of-time sm_90 (H100) compile check of every Triton kernel, on a machine without a GPU.

Usage (from the repository root; needs triton's bundled ptxas, no GPU)::

    python tests/sm90_compile.py --set smoke|ci|family [--jobs 2] [--json out.json] [--check] [--arch 90|89|86|80]
    python tests/sm90_compile.py --set ci --write-docs [--suggest-budgets]   # under the GPU image's triton (3.6.0)

How: a stand-in Triton driver reports an active sm_90 device that compiles and never launches. Each kernel is
driven through its real launcher (``*_fwd`` / ``*_bwd`` of ``crossvit_fast.kernels``) with CPU tensors (allocated
with ``torch.empty``, never touched, so a batch of 256 costs no memory); the launcher picks its tiles, warps and
stages exactly as on the GPU, and a launch becomes a compile (``warmup``). For the tuned kernels (self-attention,
block GEMMs) every candidate of each key is compiled (every config the autotuner can pick). A compile whose shared
memory is over the device's limit raises ``OutOfResources`` as a GPU launch would, so the launchers' fallbacks run
too.

Per distinct compile (deduplicated by Triton's kernel hash) it reports: kernel, config, registers, spill bytes
(stores / loads), stack frame, shared memory and the number of ``wgmma`` instructions in the PTX, read from the
ptxas ``-v`` log of Triton's own compile, and ptxas's diagnostics (its warnings and coded notes such as C7515,
"wgmma.mma_async instructions are serialized"). At the headline shapes (:data:`HEADLINE`) the cubin's SASS
(``cuobjdump -sass``) gives the instructions and HGMMA of one main-loop iteration (:func:`main_loop`), and registers,
warps and shared memory the CTAs per SM (:func:`ctas_per_sm`). ``--check`` fails (exit 1) on a compile error, on
shared memory over 232,448 bytes, on spills (stores + loads) above the kernel's budget in :data:`SPILL_BUDGET`, on
C7515 in a 16-bit GEMM or attention compile (:func:`c7515_gated`, :data:`C7515_PENDING`), and on the headline
readings past :data:`SASS_BUDGET`; ``--check-docs`` on a stale ``docs/sm90.md`` or README table (``--write-docs``
writes both; ``--suggest-budgets`` prints :data:`SASS_BUDGET`; ``--from-json`` rereads saved runs).
``--arch 80`` (A100),
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

# ptxas's C7515 ("Potential Performance Loss: wgmma.mma_async instructions are serialized ..."): --check fails on it
# in every 16-bit (fp16 / bf16 / amp) compile of these kernels and of any other kernel whose PTX issues wgmma, except
# the (kernel, variant) classes of C7515_PENDING (:func:`variant`: its true boolean constexprs).
C7515_KERNELS = frozenset({"_linear_fwd_kernel", "_linear_dgrad_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                           "_attn_bwd_dq_kernel"})

# Exemptions from the C7515 gate: none. Before the 16-bit GEMMs lost their prologues (the LayerNorm prologue of qkv /
# fc1, the dgrad's GELU' / scale prologue and bias sums), 7 (kernel, variant) classes carried it in the ci scope:
# 201 compiles with triton 3.6.0 (ptxas 12.8), 135 with 3.9.0 (ptxas 13.4). A change that must land with a known
# serialization lists its classes here, with the reason.
C7515_PENDING: frozenset = frozenset()

# Occupancy of one sm_90 SM: registers, threads, resident CTAs, shared memory (228 KB, of which each CTA's 1 KB
# is reserved by the system).
SM_REGS, SM_THREADS, SM_CTAS, SM_SHARED, CTA_RESERVED_SHARED = 65536, 2048, 32, 233472, 1024

# The headline shapes (crossvit_18_dagger_240, batch 256, bfloat16 and bfloat16 autocast): (C, N) of the launcher
# calls whose compiles get the SASS reading (cuobjdump) and its budgets.
HEADLINE = frozenset({(224, 401), (224, 400), (448, 197), (448, 196)})
HEADLINE_DTYPES = ("bf16", "amp")

# Static budgets at the headline shapes, per (kernel, dtype, width class) and triton minor version: the SASS
# instructions of one main-loop iteration (most over the variants and configs, with a margin), the HGMMA per
# iteration (fewest) and the CTAs an SM holds (fewest). Written by ``--suggest-budgets`` from a run of each version.
SASS_BUDGET: Dict[Tuple[str, str, str], Dict[str, Tuple[int, int, int]]] = {
    ('_attn_bwd_delta_kernel', 'bf16', 'D32'): {'3.6': (297, 0, 16), '3.9': (302, 0, 16)},
    ('_attn_bwd_delta_kernel', 'bf16', 'D64'): {'3.6': (476, 0, 8), '3.9': (491, 0, 10)},
    ('_attn_bwd_dkdv_kernel', 'bf16', 'D32'): {'3.6': (325, 6, 1), '3.9': (318, 6, 1)},
    ('_attn_bwd_dkdv_kernel', 'bf16', 'D64'): {'3.6': (350, 10, 1), '3.9': (353, 10, 1)},
    ('_attn_bwd_dq_kernel', 'bf16', 'D32'): {'3.6': (231, 5, 2), '3.9': (254, 5, 2)},
    ('_attn_bwd_dq_kernel', 'bf16', 'D64'): {'3.6': (249, 9, 2), '3.9': (284, 9, 2)},
    ('_attn_fwd_kernel', 'bf16', 'D32'): {'3.6': (409, 6, 1), '3.9': (416, 6, 1)},
    ('_attn_fwd_kernel', 'bf16', 'D64'): {'3.6': (418, 8, 1), '3.9': (446, 8, 1)},
    ('_bwd_tokens_kernel', 'bf16', 'C256'): {'3.6': (1780, 0, 1), '3.9': (1549, 0, 1)},
    ('_bwd_tokens_kernel', 'bf16', 'C512'): {'3.6': (2717, 0, 1), '3.9': (2722, 0, 1)},
    ('_fwd_combine_kernel', 'bf16', 'C256'): {'3.6': (324, 0, 32), '3.9': (312, 0, 32)},
    ('_fwd_combine_kernel', 'bf16', 'C512'): {'3.6': (330, 0, 16), '3.9': (319, 0, 16)},
    ('_fwd_tokens_kernel', 'bf16', 'C256'): {'3.6': (1316, 0, 2), '3.9': (1291, 0, 2)},
    ('_fwd_tokens_kernel', 'bf16', 'C512'): {'3.6': (1418, 0, 2), '3.9': (1403, 0, 2)},
    ('_layer_norm_bwd_kernel', 'amp', 'C256'): {'3.6': (489, 0, 2), '3.9': (452, 0, 2)},
    ('_layer_norm_bwd_kernel', 'amp', 'C512'): {'3.6': (485, 0, 2), '3.9': (437, 0, 2)},
    ('_layer_norm_bwd_kernel', 'bf16', 'C256'): {'3.6': (450, 0, 3), '3.9': (410, 0, 2)},
    ('_layer_norm_bwd_kernel', 'bf16', 'C512'): {'3.6': (440, 0, 2), '3.9': (396, 0, 2)},
    ('_layer_norm_fwd_kernel', 'amp', 'C256'): {'3.6': (1353, 0, 4), '3.9': (1368, 0, 4)},
    ('_layer_norm_fwd_kernel', 'amp', 'C512'): {'3.6': (1385, 0, 4), '3.9': (1376, 0, 4)},
    ('_layer_norm_fwd_kernel', 'bf16', 'C256'): {'3.6': (1149, 0, 6), '3.9': (1164, 0, 7)},
    ('_layer_norm_fwd_kernel', 'bf16', 'C512'): {'3.6': (1199, 0, 5), '3.9': (1191, 0, 5)},
    ('_linear_dgrad_kernel', 'bf16', 'C256'): {'3.6': (164, 2, 2), '3.9': (174, 2, 2)},
    ('_linear_dgrad_kernel', 'bf16', 'C512'): {'3.6': (124, 4, 2), '3.9': (145, 4, 2)},
    ('_linear_dz_kernel', 'amp', 'C256'): {'3.6': (501, 0, 8), '3.9': (503, 0, 9)},
    ('_linear_dz_kernel', 'bf16', 'C256'): {'3.6': (1850, 0, 4), '3.9': (1861, 0, 4)},
    ('_linear_fwd_kernel', 'amp', 'C256'): {'3.6': (182, 2, 1), '3.9': (194, 2, 1)},
    ('_linear_fwd_kernel', 'amp', 'C512'): {'3.6': (158, 4, 1), '3.9': (167, 4, 1)},
    ('_linear_fwd_kernel', 'bf16', 'C256'): {'3.6': (182, 2, 1), '3.9': (194, 2, 1)},
    ('_linear_fwd_kernel', 'bf16', 'C512'): {'3.6': (158, 4, 1), '3.9': (164, 4, 1)},
}

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


def _init_worker(cache_root: str, shared: bool = False, arch: int = 90, sass: bool = False) -> None:
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
    _W.update(torch=torch, triton=triton, seen=set(), records=[], tag=None, arch=arch, mods=mods, sass=sass)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_RE_DIAG = re.compile(r"^ptxas(?:-blackwell)?\s+(info|warning)\s*:\s*(?:\((C\d+)\)\s*)?(.*)$")
_RE_IN_FUNCTION = re.compile(r"in (?:the )?function '([^']+)'")


def ptxas_warnings(log: str, name: str) -> List[str]:
    """ptxas's diagnostics of kernel ``name`` in a ``-v`` log: every ``warning`` line and every coded ``info`` line
    (``(C7515) Potential Performance Loss: ...``), as ``"C7515 Potential Performance Loss: ..."`` (the code, if any,
    first). A line naming another function is another kernel's."""
    out = []
    for line in log.splitlines():
        m = _RE_DIAG.match(line.strip())
        if not m or (m.group(1) == "info" and not m.group(2)):
            continue
        f = _RE_IN_FUNCTION.search(line)
        if f and f.group(1) != name:
            continue
        out.append(" ".join(x for x in (m.group(2), m.group(3).strip()) if x))
    return out


_RE_SASS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_RE_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse_sass(text: str) -> List[Tuple[int, str, str]]:
    """``cuobjdump -sass`` text (one function) -> ``[(address, opcode, operands)]`` in address order."""
    out = []
    for line in text.splitlines():
        m = _RE_SASS.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def sass_loops(ins: List[Tuple[int, str, str]]) -> List[Tuple[int, int]]:
    """The loops of a function: ``(first, last)`` address of every backward branch's range (the branch included)."""
    loops = set()
    for addr, op, args in ins:
        if op.split(".")[0] == "BRA":
            t = _RE_TARGET.search(args)
            if t and int(t.group(1), 16) < addr:
                loops.add((int(t.group(1), 16), addr))
    return sorted(loops)


def _counts(ins, lo: int, hi: int) -> Dict[str, int]:
    body = [op for a, op, _ in ins if lo <= a <= hi and op != "NOP"]
    first = [op.split(".")[0] for op in body]
    return {"sass": len(body), "hgmma": first.count("HGMMA"), "hmma": first.count("HMMA"), "ffma": first.count("FFMA")}


def main_loop(ins: List[Tuple[int, str, str]]) -> dict:
    """The main loop of a kernel's SASS and its counts per iteration: the innermost loop with the most HGMMA (wgmma
    kernels), else with the most HMMA, else the innermost loop with the most instructions (FMA dots, elementwise
    loops); a kernel without a loop reports its whole body (``"loop": "none"``). Counts exclude NOPs. Returns
    ``{"sass", "hgmma", "hmma", "ffma", "loop", "loops", "total"}``."""
    total = _counts(ins, 0, 1 << 62)
    loops = sass_loops(ins)
    info = [(lo, hi, _counts(ins, lo, hi)) for lo, hi in loops]
    pick, kind = None, "none"
    for unit in ("hgmma", "hmma"):
        best = max((c[unit] for _, _, c in info), default=0)
        if best:
            pick = min((c for _, _, c in info if c[unit] == best), key=lambda c: c["sass"])
            kind = unit
            break
    if pick is None and info:
        inner = [c for lo, hi, c in info
                 if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2, _ in info)]
        pick, kind = max(inner, key=lambda c: c["sass"]), "largest"
    res = dict(pick or total)
    res.update(loop=kind, loops=len(loops), total=total["sass"])
    return res


def ctas_per_sm(regs: int, warps: int, shared: int) -> Tuple[int, str]:
    """Resident CTAs per sm_90 SM and what limits them (``threads``, ``ctas``, ``smem`` or ``regs``, the first of
    them on a tie): registers allocated per warp in units of 256, 1 KB of shared memory reserved per CTA."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    lim = {"regs": (SM_REGS // per_warp) // warps, "threads": SM_THREADS // (32 * warps), "ctas": SM_CTAS,
           "smem": SM_SHARED // (shared + CTA_RESERVED_SHARED)}
    by = min(("threads", "ctas", "smem", "regs"), key=lambda k: lim[k])
    return lim[by], by


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass_of(cubin: bytes) -> str:
    import subprocess

    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def is_headline(rec: dict) -> bool:
    return rec["B"] == 256 and (rec["C"], rec["N"]) in HEADLINE and rec["dtype"] in HEADLINE_DTYPES


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
    rec = {
        **_W["tag"], "kernel": fn.__name__, "hash": ck.hash,
        "config": {**cfg, "warps": ck.metadata.num_warps, "stages": ck.metadata.num_stages},
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(sp.group(1)) if sp else None,
        "spill_st": int(sp.group(2)) if sp else None,
        "spill_ld": int(sp.group(3)) if sp else None,
        "shared": int(ck.metadata.shared),
        "wgmma": ptx.count("wgmma.mma_async"),
        "warnings": ptxas_warnings(log, name),
    }
    if rec["regs"] is not None:
        rec["ctas"], rec["ctas_by"] = ctas_per_sm(rec["regs"], ck.metadata.num_warps, rec["shared"])
    if _W.get("sass") and is_headline(rec) and "cubin" in ck.asm:
        c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time()
        rec["sass"] = main_loop(parse_sass(sass_of(ck.asm["cubin"])))
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        _W["sass_s"] += time.process_time() - t0 + c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    _W["records"].append(rec)


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
    _W["sass_s"] = 0.0
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
    return {"records": _W["records"], "errors": errors, "cpu_s": cpu, "wall_s": time.time() - w0,
            "sass_s": _W["sass_s"]}


# ----------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------


def run_scope(scope: str, jobs: int = 2, ops: Optional[List[str]] = None, cache_dir: Optional[str] = None,
              arch: int = 90, sass: bool = True) -> dict:
    """Compile a scope (only ``ops`` when given) in ``jobs`` worker processes; returns ``{"records", "errors",
    "compiles", "cpu_s", ...}``. ``sass``: read the SASS (cuobjdump) of the headline compiles
    (:func:`is_headline`, sm_90 only).
    With ``cache_dir`` every worker compiles into that one Triton cache, which is kept
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
                                 initargs=(root, bool(cache_dir), arch, sass and arch == 90)) as pool:
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
            "ptxas": _ptxas_version(),
            "records": records, "errors": errors,
            "compiles": len(records), "compiles_with_duplicates": sum(len(r["records"]) for r in results),
            "cpu_s": round(sum(r["cpu_s"] for r in results), 1), "wall_s": round(wall, 1), "jobs": jobs,
            "sass_s": round(sum(r["sass_s"] for r in results), 1)}


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


_NOT_VARIANT = ("IDX64", "EVEN_K", "EVEN_N", "EVEN_D")


def variant(rec: dict) -> str:
    """A compile's specialisation: its true boolean constexprs, lower case (``has_ln,has_bias``), or ``-``."""
    return ",".join(k.lower() for k, v in rec["config"].items() if v is True and k not in _NOT_VARIANT) or "-"


def sixteen_bit(rec: dict) -> bool:
    return rec["dtype"] in ("fp16", "bf16", "amp")


def c7515(rec: dict) -> bool:
    return any(w.startswith("C7515 ") for w in rec.get("warnings", ()))


def c7515_gated(rec: dict) -> bool:
    """A compile C7515 fails: 16-bit, a GEMM or attention kernel (or any kernel whose PTX issues wgmma), its class
    not pending."""
    return (sixteen_bit(rec) and (rec["kernel"] in C7515_KERNELS or rec["wgmma"] > 0)
            and (rec["kernel"], variant(rec)) not in C7515_PENDING)


def triton_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def static_readings(result: dict) -> Dict[Tuple[str, str, str], Tuple[int, int, int]]:
    """Per (kernel, dtype, width class) of the headline compiles with a SASS reading: the most SASS instructions per
    main-loop iteration, the fewest HGMMA per iteration and the fewest CTAs per SM over its variants and configs."""
    out: Dict[Tuple[str, str, str], Tuple[int, int, int]] = {}
    for r in result["records"]:
        if "sass" not in r or r.get("ctas") is None:
            continue
        k = (r["kernel"], r["dtype"], width_class(r))
        s, h, c = out.get(k, (0, 1 << 30, 1 << 30))
        out[k] = (max(s, r["sass"]["sass"]), min(h, r["sass"]["hgmma"]), min(c, r["ctas"]))
    return out


def suggest_budgets(results: List[dict], margin: float = 0.05, slack: int = 8) -> Dict[tuple, Dict[str, tuple]]:
    """:data:`SASS_BUDGET` from runs of one or more triton versions: SASS per iteration plus ``max(slack, margin)``,
    HGMMA per iteration and CTAs per SM as measured."""
    out: Dict[tuple, Dict[str, tuple]] = {}
    for result in results:
        v = triton_minor(result["triton"])
        for k, (s, h, c) in static_readings(result).items():
            out.setdefault(k, {})[v] = (s + max(slack, -(-s * int(margin * 100) // 100)), h, c)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2][0], int(kv[0][2][1:]))))


def format_budgets(budgets: Dict[tuple, Dict[str, tuple]]) -> str:
    lines = ["SASS_BUDGET: Dict[Tuple[str, str, str], Dict[str, Tuple[int, int, int]]] = {"]
    for k, per in budgets.items():
        vals = ", ".join(f"{v!r}: {t!r}" for v, t in sorted(per.items()))
        lines.append(f"    {k!r}: {{{vals}}},")
    lines.append("}")
    return "\n".join(lines)


def problems(result: dict) -> List[str]:
    """Everything the check fails on: compile/launcher errors; on sm_90 also any compile over the shared-memory
    limit, spills over budget (measured there), C7515 in a gated compile (:func:`c7515_gated`), and at the headline
    shapes SASS per main-loop iteration over, or HGMMA per iteration or CTAs per SM under, :data:`SASS_BUDGET` for
    this triton version (a version without budgets is not checked there). Elsewhere a compile over the limit is what
    the launchers handle (the GEMM tuner skips the tile, the CLS launcher retries with one stage): only what reaches
    a caller, an error, fails."""
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
        if strict and c7515(r) and c7515_gated(r):
            out.append(f"C7515 (wgmma serialized) {where} [{variant(r)}]")
    if strict:
        v = triton_minor(result.get("triton", ""))
        for k, (s, h, c) in static_readings(result).items():
            b = SASS_BUDGET.get(k, {}).get(v)
            if b is None:
                if any(v in per for per in SASS_BUDGET.values()):
                    out.append(f"NO SASS BUDGET {k} for triton {v} (--suggest-budgets)")
                continue
            if s > b[0]:
                out.append(f"SASS {s} instructions per main-loop iteration > budget {b[0]} {k}")
            if h < b[1]:
                out.append(f"HGMMA {h} per main-loop iteration < budget {b[1]} {k}")
            if c < b[2]:
                out.append(f"CTAS {c} per SM < budget {b[2]} {k}")
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


DOCS = os.path.join(REPO, "docs", "sm90.md")
README = os.path.join(REPO, "README.md")
README_BEGIN, README_END = "<!-- sm90-table:begin -->", "<!-- sm90-table:end -->"
_RE_GENERATED = re.compile(r"<!-- generated by `([^`]*)` with triton (\S+) and (ptxas [^\s:]+)")


def _rng(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _tile(r: dict) -> str:
    c = r["config"]
    dims = [str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T", "BLOCK_C", "BLOCK_R", "BLOCK_D", "ROWS")
            if k in c]
    even = "".join(f"/{k.lower()}" for k in _NOT_VARIANT if k != "IDX64" and c.get(k) is True)
    return f"{'x'.join(dims) or '-'}/w{c['warps']}/s{c['stages']}{even}"


def _md(header: List[str], rows: List[List[str]], keys: int, tid: str) -> str:
    """A Markdown table; the first ``keys`` columns name a row (the structure the docs check compares across
    triton versions)."""
    lines = [f"<!-- table:{tid} keys={keys} -->", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < keys else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _width_order(w: str) -> Tuple[str, int]:
    return w[0], int(w[1:])


def perf_rows(result: dict) -> List[List[str]]:
    """One row per headline compile with a SASS reading: kernel, dtype, C, variant, tile, registers, spills,
    shared memory, CTAs per SM (limited by), SASS and HGMMA per main-loop iteration, the loop picked, C7515."""
    rows = []
    for r in result["records"]:
        if "sass" not in r:
            continue
        sp = r["sass"]
        rows.append([r["kernel"], r["dtype"], str(r["C"]), variant(r), _tile(r), str(r["regs"]),
                     f"{r['spill_st']}/{r['spill_ld']}", str(r["shared"]), f"{r['ctas']} ({r['ctas_by']})",
                     str(sp["sass"]), str(sp["hgmma"]), sp["loop"], "yes" if c7515(r) else ""])
    return [list(x) for x in sorted({tuple(x) for x in rows}, key=lambda x: (x[0], x[1], int(x[2]), x[3:]))]


def resource_rows(result: dict) -> List[List[str]]:
    """Per (kernel, dtype, width class) over the scope: distinct compiles, registers, spills (worst), its budget,
    stack, shared memory, wgmma in the PTX, compiles with C7515."""
    groups: Dict[tuple, List[dict]] = {}
    for r in result["records"]:
        if r["regs"] is not None:
            groups.setdefault((r["kernel"], r["dtype"], width_class(r)), []).append(r)
    rows = []
    for k in sorted(groups, key=lambda k: (k[0], k[1], _width_order(k[2]))):
        g = groups[k]
        worst = max(g, key=lambda r: (r["spill_st"] + r["spill_ld"], r["spill_st"]))
        rows.append([*k, str(len(g)), _rng(r["regs"] for r in g), f"{worst['spill_st']}/{worst['spill_ld']}",
                     str(budget(*k)), _rng(r["stack"] for r in g), _rng(r["shared"] for r in g),
                     _rng(r["wgmma"] for r in g), _rng(r.get("ctas") for r in g), str(sum(map(c7515, g)))])
    return rows


def readme_rows(result: dict) -> List[List[str]]:
    """Per kernel over its headline compiles (bf16 and amp, C = 224 and 448, every variant and config)."""
    groups: Dict[str, List[dict]] = {}
    for r in result["records"]:
        if "sass" in r:
            groups.setdefault(r["kernel"], []).append(r)
    return [[k, str(len(g)), _rng(r["regs"] for r in g), _rng(r["ctas"] for r in g),
             _rng(r["sass"]["sass"] for r in g), _rng(r["sass"]["hgmma"] for r in g), str(sum(map(c7515, g)))]
            for k, g in sorted(groups.items())]


def _ptxas_version() -> str:
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception:  # pragma: no cover
        return "ptxas ?"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return f"ptxas {m.group(1) if m else '?'}"


def _label(result: dict) -> str:
    return (f"static reading of the sm_90 compile (triton {result['triton']}, {result.get('ptxas', 'ptxas')}), "
            f"not a measurement")


def render_readme_table(result: dict) -> str:
    return "\n".join([
        README_BEGIN,
        f"Per kernel at the headline shapes (crossvit_18_dagger_240, batch 256, bf16 and bf16 autocast, C = 224 and "
        f"448, every variant and config): a {_label(result)}. Details: [docs/sm90.md](docs/sm90.md).",
        "",
        _md(["kernel", "compiles", "registers", "CTAs/SM", "SASS/iteration", "HGMMA/iteration", "C7515"],
            readme_rows(result), 1, "readme"),
        README_END])


def render_docs(result: dict) -> str:
    cmd = "python tests/sm90_compile.py --set ci --write-docs"
    flagged = sorted({(r["kernel"], r["dtype"], str(r["C"]), variant(r), _tile(r), "pending" if not c7515_gated(r)
                       else "fails") for r in result["records"] if c7515(r)},
                     key=lambda x: (x[0], x[1], int(x[2]), x[3:]))
    parts = [
        "# Static sm_90 readings of the kernels",
        "",
        f"<!-- generated by `{cmd}` with triton {result['triton']} and {result.get('ptxas', 'ptxas ?')}: "
        "do not edit by hand -->",
        "",
        f"Everything here is a **{_label(result)}**: what ptxas makes of each kernel for an H100 (sm_90a), read on a "
        "machine without a GPU. No kernel has been timed on a GPU yet. The file is written by "
        f"`{cmd}` (the README's table too) under the GPU image's triton; `tests/test_sm90_compile.py` fails when "
        "it is stale: against the same triton version every table must match, under another one (CI's) the rows "
        "of the tables must (registers, spills and SASS differ between versions).",
        "",
        "Scope `ci`: batch 256; self-attention at head dims 32 and 64 (C = 224 / 448, 7 heads), CLS attention and "
        "LayerNorm at C = 96, 224, 448, 768, the block GEMMs at C = 224 and 448; every config the pruner or the GEMM "
        "tuner may pick is compiled. `amp` is bfloat16 autocast (a float32 residual stream, bfloat16 GEMM inputs).",
        "",
        "## At the headline shapes",
        "",
        "crossvit_18_dagger_240, batch 256, bf16 and amp, C = 224 (401 tokens) and 448 (197): one row per compile. "
        "*variant*: the compile's true boolean constexprs. *tile*: its block sizes (M x N x K for the GEMMs) / warps "
        "/ stages (/even_k, /even_n, /even_d: the loop's dimension a multiple of its block, unmasked). "
        "*CTAs/SM*: resident CTAs per SM from registers (allocated per warp in units of 256, 65,536 per "
        "SM), threads (2,048), CTAs (32) and shared memory (233,472 B per SM, 1 KB reserved per CTA), and which of "
        "them limits. *SASS/iter*: instructions (NOPs excluded) in one iteration of the main loop in "
        "`cuobjdump -sass`: the innermost loop with the most HGMMA (*loop* `hgmma`), else the innermost loop with "
        "the most instructions (`largest`); `none`: the kernel has no loop and the count is its whole body. "
        "*HGMMA/iter*: wgmma instructions in that loop (per warpgroup). *C7515*: ptxas reports the wgmma "
        "pipeline serialized. `--check` holds these to `SASS_BUDGET` in `tests/sm90_compile.py` (per kernel, "
        "dtype and width class, per triton version; `--suggest-budgets` writes it).",
        "",
        _md(["kernel", "dtype", "C", "variant", "tile", "regs", "spill st/ld", "smem (B)", "CTAs/SM", "SASS/iter",
             "HGMMA/iter", "loop", "C7515"], perf_rows(result), 5, "headline"),
        "",
        "## C7515",
        "",
        "Compiles for which ptxas reports C7515 (`Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized`), over the whole scope; `--check` fails on each 16-bit GEMM and attention compile (and any "
        "other that issues wgmma) unless its (kernel, variant) is in `C7515_PENDING` (*pending*):",
        "",
        _md(["kernel", "dtype", "C", "variant", "tile", "gate"], [list(x) for x in flagged], 0, "c7515")
        if flagged else "None.",
        "",
        "## Resources per kernel",
        "",
        "Per kernel, dtype and width class (`D<head dim>` for self-attention, `C<next power of two>` otherwise) over "
        "the scope: distinct compiles, ranges of registers, stack (B), shared memory (B, limit 232,448), wgmma in "
        "the PTX and CTAs/SM; spills as the worst compile, against `SPILL_BUDGET`.",
        "",
        _md(["kernel", "dtype", "width", "compiles", "regs", "spill st/ld", "budget", "stack", "smem (B)", "wgmma",
             "CTAs/SM", "C7515"], resource_rows(result), 3, "resources"),
        "",
    ]
    return "\n".join(parts)


def _tables(text: str) -> Dict[str, List[List[str]]]:
    out: Dict[str, List[List[str]]] = {}
    tid, keys = None, 0
    for line in text.splitlines():
        m = re.match(r"<!-- table:(\w+) keys=(\d+) -->", line)
        if m:
            tid, keys = m.group(1), int(m.group(2))
            out[tid] = []
            continue
        if tid and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-:"):
                out[tid].append(cells[:keys])
        elif tid:
            tid = None
    return out


def readme_block(text: str) -> Optional[str]:
    i, j = text.find(README_BEGIN), text.find(README_END)
    return text[i:j + len(README_END)] if 0 <= i < j else None


def docs_problems(result: dict, docs: str, readme: str) -> List[str]:
    """docs/sm90.md and the README's table against what ``--write-docs`` would write: the same text where the
    running triton is the one that wrote them, else the same rows (each table's key columns)."""
    m = _RE_GENERATED.search(docs)
    if not m:
        return ["DOCS docs/sm90.md carries no generated-by line: run --write-docs"]
    block = readme_block(readme)
    if block is None:
        return [f"DOCS README.md has no {README_BEGIN} ... {README_END} block"]
    new_docs, new_block = render_docs(result), render_readme_table(result)
    exact = m.group(2) == result["triton"] and m.group(3) == result.get("ptxas")
    out = []
    for name, old, new in (("docs/sm90.md", docs, new_docs), ("README.md's sm90 table", block, new_block)):
        if exact:
            if old.strip() != new.strip():
                out.append(f"DOCS {name} is stale (triton {m.group(2)}): run --set ci --write-docs")
            continue
        a, b = _tables(old), _tables(new)
        a.pop("c7515", None), b.pop("c7515", None)
        if a != b:
            diff = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
            out.append(f"DOCS {name}: the rows of table(s) {', '.join(diff)} differ from triton {result['triton']}'s "
                       f"(written with {m.group(2)}): rerun --set ci --write-docs with triton {m.group(2)}")
    return out


def write_docs(result: dict) -> None:
    with open(DOCS, "w") as f:
        f.write(render_docs(result))
    with open(README) as f:
        text = f.read()
    block = readme_block(text)
    if block is None:
        raise SystemExit(f"README.md has no {README_BEGIN} ... {README_END} block")
    with open(README, "w") as f:
        f.write(text.replace(block, render_readme_table(result)))


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
    ap.add_argument("--perf-table", action="store_true",
                    help="print the headline compiles' static readings (SASS and HGMMA per main-loop iteration, CTAs "
                         "per SM, C7515)")
    ap.add_argument("--suggest-budgets", action="store_true",
                    help="print SASS_BUDGET from this run (or the --from-json runs, one per triton version)")
    ap.add_argument("--write-docs", action="store_true",
                    help="with --set ci: write docs/sm90.md and the README's sm90 table from this run")
    ap.add_argument("--check-docs", action="store_true",
                    help="with --set ci: fail when docs/sm90.md or the README's table differ from what --write-docs "
                         "would write (the rows only, under another triton version than theirs)")
    ap.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="read the run(s) from --json files instead of compiling (the first is checked and written)")
    ap.add_argument("--no-sass", action="store_true", help="skip the SASS reading (cuobjdump) of the headline compiles")
    ap.add_argument("--pack", metavar="TAR_XZ", help="with --cache-dir: pack what a cache hit needs into this file "
                                                     "(bench/gpu_run.sh unpacks bench/.gpu-carry/triton-cache.tar.xz)")
    args = ap.parse_args(argv)
    if args.pack and not args.cache_dir:
        ap.error("--pack needs --cache-dir")
    if args.from_json:
        runs = []
        for path in args.from_json:
            with open(path) as f:
                runs.append(json.load(f))
        result = runs[0]
        args.set, args.arch = result["scope"], result["arch"]
    else:
        result = run_scope(args.set, args.jobs, args.ops, args.cache_dir, args.arch, not args.no_sass)
        runs = [result]
    if (args.write_docs or args.check_docs) and (args.set != "ci" or args.ops or args.arch != 90 or args.no_sass):
        ap.error("--write-docs / --check-docs need the whole ci scope on sm_90 with the SASS reading")
    if args.table:
        print(table(result))
        print()
    print(summary(result))
    if args.perf_table:
        print()
        print(_md(["kernel", "dtype", "C", "variant", "tile", "regs", "spill st/ld", "smem (B)", "CTAs/SM",
                   "SASS/iter", "HGMMA/iter", "loop", "C7515"], perf_rows(result), 5, "headline"))
    bad = problems(result)
    if args.check_docs:
        with open(DOCS) as f, open(README) as g:
            bad += docs_problems(result, f.read(), g.read())
    result["problems"] = bad
    print(f"\nscope {result['scope']}, sm_{args.arch}: {result['compiles']} distinct compiles "
          f"({result['compiles_with_duplicates']} with cross-worker duplicates), {result['cpu_s']} CPU s, "
          f"{result['wall_s']} s wall on {result['jobs']} workers (the SASS reading "
          f"{result.get('sass_s', 0)} CPU s of them), "
          f"triton {result['triton']}, {result.get('ptxas', '')}")
    flagged = [r for r in result["records"] if c7515(r)]
    print(f"C7515 in {len(flagged)} compiles ({sum(map(c7515_gated, flagged))} gated, the others 32-bit, not GEMM / "
          f"attention, or pending)")
    if args.suggest_budgets:
        print(format_budgets(suggest_budgets(runs)))
    if args.write_docs:
        write_docs(result)
        print(f"wrote {os.path.relpath(DOCS, REPO)} and README.md's sm90 table")
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
