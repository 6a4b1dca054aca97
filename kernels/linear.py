"""Fused branch-block GEMM: LayerNorm prologue, bias / GELU / drop-path scale / residual epilogue (Triton).

What it computes
----------------
For rows ``x`` (M rows of K channels; a ``(B, T, K)`` view of any strides) and a Linear ``weight`` ``(N, K)`` whose
dtype is the compute dtype ``ct``::

    a   = LayerNorm(x) (float32 statistics, affine)  if LN  else  x          (prologue / the layer_norm kernel)
    z   = a.to(ct) @ weight^T  (float32 accumulation) + bias.to(ct)          (bias optional)
    h   = GELU(z)  (exact: 0.5 z (1 + erf(z / sqrt 2)), as nn.GELU())         if GELU
    out = residual + scale[row // RPG] * h,  stored in out_dtype              (scale, residual optional)

which is timm's ``x + drop_path(proj(attn))``, ``qkv(norm1(x))``, ``act(fc1(norm2(x)))`` and ``x + drop_path(fc2(h))``
under ``torch.autocast`` (LayerNorm in float32, its output cast to the autocast dtype, the Linear in that dtype with
float32 accumulation, the residual add in the residual stream's dtype). The fused kernel rounds once, at the store;
the reference rounds the Linear's output to ``ct`` before GELU / the residual add, so the fused result is as close
or closer to the float64 value.

Backward (``linear_dgrad``), with ``g = dout * scale * GELU'(z)`` (``z`` saved by the forward in ``ct``)::

    dz = g.to(ct)         (written once: the reference writes it too, as GELU's / the cast's gradient)
    da = dz @ weight      (16-bit: a GEMM with no prologue on the dz of an elementwise pass; float32: the GELU
                           derivative and the scale applied in this GEMM's prologue)
    db = sum_rows(dz)     (float32 column sums of the rounded dz, one row per row tile, summed by the launcher)

and the op (crossvit_fast/ops/linear.py) finishes with ``dW = dz^T a`` (torch matmul) and the LayerNorm backward
(the ``layer_norm`` op's kernel) on ``da``.

Algorithm
---------
One program per (BLOCK_M x BLOCK_N) output tile, tiles ordered in groups of GROUP_M row tiles so that a group's
rows of x stay in L2 while it sweeps N. A 16-bit LayerNorm GEMM runs as the ``layer_norm`` kernel (each row
normalised once, written in ``ct``: ``ahat``) followed by this GEMM without prologue (``LN_FIRST``; why: Tuning).
With the LayerNorm prologue (float32) a program first walks its BLOCK_M rows over K
once for the statistics of ``x - p``, ``p`` the row's first element (per-chunk mean and M2 by the ``layer_norm``
kernel's ``row_moments``, merged as Chan et al.: one pass; the centred row ``(x - p) - mean`` keeps the precision
of the row's spread, so constant rows normalise to exactly the bias), then walks
K again normalising each (BLOCK_M x BLOCK_K) chunk in float32 in registers, rounding it to ``ct`` and feeding
``tl.dot`` (the second read hits L2: the row block was just read). Weight chunks are ``(BLOCK_K, BLOCK_N)`` views of
the ``(N, K)`` Linear weight (no transpose copy). The epilogue is applied to the float32 accumulator in registers.
When the backward will be needed the forward also writes ``z`` (GELU only), the rounded normalised input ``a``
(LayerNorm only; the reference writes LayerNorm's output too) and the float32 row statistics, from the programs of
the first column tile.

The dgrad kernel is the same GEMM over N. 16-bit: the elementwise ``_linear_dz_kernel`` first forms dz once per
element (GELU' and the scale in float32, rounded to ``ct``, stored) and the bias gradient's column sums (one row of a
``(cdiv(M, DZ_ROWS), N)`` float32 buffer per program row, summed by the launcher), then the GEMM reads dz (or dout
itself where it is dz) with no prologue (``DZ_PASS``; why: Tuning). float32: each program's prologue loads
``dout`` (and ``z``) chunks, applies the scale and GELU' in float32, and the programs of the first K-column tile
store ``dz`` and each chunk's column sums (one (BLOCK_K,) row of a ``(cdiv(M, BLOCK_M), N)`` buffer per row tile).
Deterministic: no atomics, no split-K.

Limits
------
* x: ``(..., K)``, any strides for 2-D and 3-D (read in place); other ranks reshaped. residual / out: x's leading
  shape and N. weight ``(N, K)``, any strides. 1 <= K, N; no upper bound (K is looped over).
* dtypes: float16, bfloat16, float32 for every tensor. float32 dots run with ``input_precision="ieee"`` (true
  float32 products); 16-bit dots on tensor cores. The weight's dtype is the compute dtype: under autocast the caller
  casts the float32 parameter once per call (as autocast itself does; an N x K copy, small beside the activations).
  Triton's CPU interpreter computes garbage for bfloat16 dots and truncates bfloat16 stores: refused there.
* Offsets are 32-bit unless a tensor spans 2**31 elements or more (then the 64-bit specialisation IDX64).

Tuning
------
On CUDA each launch goes through this module's :data:`TUNER`, the one autotuner class of the package
(``kernels/tuning.py``, shared with the self-attention; not ``triton.autotune``: the K-loop's evenness ``EVEN_K``
depends on the tile, and some candidates are not one Triton kernel): the first launch with a new key -- kernel,
``next_power_of_2(M)``, N, K, the fused parts, every tensor's dtype, whether each input is row-contiguous, the
device -- times every tile of
``TUNE_CONFIGS`` for the compute dtype (``triton.testing.do_bench``, median, a short budget), keeps the fastest in
``TUNER.chosen`` and in Triton's cache dir (``AUTOTUNE_CACHE``; a later process with the same GPU model, software and
candidates loads the pick instead of timing), then launches it once more, so the result is the winner's. A tile that
cannot launch is skipped. No timing (the pick for the key, from memory or disk, else :func:`pick_config`'s default):
``CROSSVIT_FAST_AUTOTUNE=0``, CUDA-graph capture or a ``kernels.tuning.pinned()`` block (``kernels/tuning.py``
decides both, for this module and the self-attention's), an explicit ``config=``, an output that shares memory with an
input (``out=`` the residual: the timed launches would add the branch again and again). float32 has one tile. The
interpreter runs one large tile. :func:`tuned_configs` lists the picks (the GEMM benchmark records them per row).

Why no 16-bit GEMM keeps a prologue (a static reading of sm_90a compiles, triton 3.6.0, ptxas -v and cuobjdump
-sass at the headline shapes: C = 448, M = 256 x 401; "instr" = SASS instructions per warp in one K step of the
loop that holds the HGMMAs; not a measurement). The plain GEMM at 128x128x64/w8/s3 runs 112 instr, 118 registers,
2 CTAs per SM. The LayerNorm prologue (the row block normalised in registers and fed to ``tl.dot``) made Triton
take wgmma's A operand from registers: 288-309 instr with a float32 x (autocast), 336-399 with a bfloat16 one, up to
227 registers, 1-2 CTAs per SM, and ptxas serialized the wgmma pipeline (warning C7515) on nearly every tile. Tried,
with the row statistics from a separate pass: the normalised tile carried to the next iteration (Triton then stages
A in shared memory, SS wgmma, no C7515): 250 (float32 x) / 309 (bfloat16 x) instr; with the LayerNorm's gamma and
beta also folded into the weight and bias and no masks: 150 / 206. Only the last, for a float32 x, is within 1.5x of
the plain GEMM, and it cannot win on paper: it reads the float32 row block twice (statistics pass and GEMM, 8 bytes
per element from DRAM, against LN_FIRST's 4 + 2 + 2), rounds ``gamma * W`` instead of the normalised row, and
training writes ``ahat`` (what ``dW`` multiplies) anyway. So every 16-bit LayerNorm GEMM runs ``LN_FIRST`` (the
candidates are ``tile + (LN_FIRST,)``; a bare tile runs that way too) and the prologue is float32's only (FMA loops,
no wgmma). The dgrad likewise: GELU' in its prologue cost 3,198-3,225 instr per K step (1,663 at BLOCK_K = 32; the
erf and exp of every dz element recomputed by each of the ``K / BLOCK_N`` column tiles), and the bias gradient's
column sums alone 253-292 with C7515 on most tiles; without either the dgrad GEMM runs 83-116 instr. So a 16-bit
dgrad forms dz once per element in ``_linear_dz_kernel`` (``tile + (DZ_PASS,)``; dz is written anyway, for ``dW``:
the split costs one more 2-byte read of dz, and where dz is dout itself (qkv's dgrad) one read of dout for the
bias sums) and the GEMM has no prologue. One more serialization, ptxas's "non wgmma instructions defining accumulator
registers": the 128x128 tiles at 8 warps (128x128x64/w8/s3: 95-105 instr) when the float32 accumulator is stored as
is (a float32 ``da``, i.e. the LayerNorm GEMMs' dgrad, or a float32 output without epilogue); those GEMMs skip
:data:`F32_STORE_SERIALIZED` and default to ``16bit-small``.

The 16-bit tiles (:data:`TUNE_CONFIGS`) are the ones no other tile dominates on that reading; the defaults
(:func:`pick_config`) are ``128x128x64/w8/s3`` (the fewest instructions per MMA, 2 CTAs per SM) where there are two
waves of its tiles, else ``64x128x64/w4/s3`` (3 CTAs per SM). A 16-bit LayerNorm GEMM key times 5 candidates (4
``LN_FIRST`` tiles and ``CUBLAS``; 17 before), another forward key 5 (9), a dgrad key 5, or 4 with a float32 ``da``
(9). The LayerNorm-first GEMM trades the prologue's L2 re-reads of the row block for one DRAM round trip of the
normalised rows (about 4 bytes a channel in inference, 2 in training, where ``ahat`` is written either way).

Every 16-bit forward key also times :data:`CUBLAS`: timm's sequence (the LayerNorm kernel, ``torch.addmm``, GELU
/ scale / residual as torch elementwise ops; z rounded to the compute dtype as the reference does). It costs one
or two extra passes over the output, so it wins only where the Triton GEMM itself trails cuBLAS: a guard, so that a
key never runs slower than the sequence the fused kernel replaced.

For a 16-bit dgrad the candidates also include ``DZ_FIRST`` (:func:`dgrad_candidates`): the same dz pass, then
cuBLAS computes ``da = dz @ W`` (``torch.mm``, float32 accumulation; into a float32 ``da`` through ``mm``'s
``out_dtype``): the tuner decides per key whether the Triton GEMM or cuBLAS reads dz.

Ahead-of-time compile for sm_90 (triton 3.6.0, the GPU machines' version; sm_90a ptxas -v through the stand-in
driver of ``tests/sm90_compile.py``): every case of ``aot_cases()``, i.e. every config the autotuner may time x the
flag sets of qkv / proj / fc1 / fc2 (fc2 compiles to the same specialisation as proj) x inference and training
(SAVE) x float16 / bfloat16 / float32, at K, N of the family's widths (896 cases, 2,044 before the 16-bit prologues
went); CI compiles the ``ci`` scope (C = 224 and 448, batch 256) under every change: 160 distinct compiles (497
before). All compile; every 16-bit dot lowers to Hopper's warp-group MMA (``wgmma`` in the PTX, forward and dgrad);
with 3.6 no compile of the ci scope has its wgmma pipeline serialized (no C7515; bfloat16 and autocast read) and no
16-bit one spills; the float32 fc1 forward (LayerNorm prologue) spills 28 bytes; registers, shared memory and
instructions per K step per tile in docs/sm90.md. (triton 3.9, same scope: 160 compiles, 497 before; no 16-bit
spill, where the bfloat16 dgrad with its prologue spilled up to 76 bytes; the float32 dgrad 16 bytes; no C7515 at
C = 448, bfloat16 and autocast.) float32 (``ieee``) dots are FMA loops (no wgmma, by design); the float32 tile
was shrunk to BLOCK_K = 16 after BLOCK_K = 32 spilled 4 bytes in the dgrad.

Not yet timed on a GPU: which tiles win (the GEMM benchmark's ``tiles`` field will say), what the LayerNorm kernel's
and the dz kernel's extra passes cost against the fused prologues they replace, and whether CUBLAS / DZ_FIRST ever
win a key (they are there so that no key runs slower than cuBLAS would).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from crossvit_fast.config import LAYER_NORM_MAX_DIM
from crossvit_fast.config import TRITON_FP_FUSION as FP_FUSION, interpreter_enabled, interpreter_runs_bf16
from crossvit_fast.config import autotune_cache_from_env, autotune_from_env
from crossvit_fast.kernels import tuning

from .layer_norm import _as3d, _device_of, _span, _unit_stride, layer_norm_fwd, row_moments, rstd_of

__all__ = ["linear_fwd", "linear_dgrad", "check_linear_inputs", "check_linear_shapes", "check_linear_epilogue",
           "SUPPORTED_DTYPES", "AUTOTUNE", "CONFIGS", "TUNE_CONFIGS", "F32_STORE_SERIALIZED", "LN_FIRST", "DZ_PASS",
           "DZ_FIRST", "pick_config",
           "tune_configs", "fwd_candidates", "dgrad_candidates", "tuned_configs", "config_name", "aot_cases"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = interpreter_enabled()
COMPILE_ONLY = False
"""tests/sm90_compile.py sets it: CPU tensors pass the device check so that a stand-in sm_90 driver compiles the
kernels through these launchers (nothing is launched)."""
_INT32_MAX = 2**31 - 1

AUTOTUNE = autotune_from_env()
"""Module switch (CUDA only): False never autotunes; a launch takes the config already tuned for its key, if any,
else the fixed default of :func:`pick_config`."""

Config = Tuple[int, int, int, int, int]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). For dgrad BLOCK_N counts output columns (of K) and BLOCK_K the
# reduction over N, the same roles. CONFIGS: the fixed defaults (no tuning); TUNE_CONFIGS: every tile the autotuner
# times, per compute-dtype class (the defaults among them).
CONFIGS: Dict[str, Config] = {
    "16bit-large": (128, 128, 64, 8, 3),
    "16bit-small": (64, 128, 64, 4, 3),
    "fp32": (64, 64, 16, 4, 2),
}
TUNE_CONFIGS: Dict[str, List[Config]] = {
    # The 16-bit tiles every 16-bit GEMM now runs (no prologue in the K loop: see Tuning in the header), read from
    # sm_90 compiles (triton 3.6, C = 448, M = 102656; SASS instructions per warp per K step of the HGMMA loop,
    # CTAs per SM from registers and shared memory, no C7515 serialization):
    #   128x128x64/w8/s3  112 instr, 118 regs,  96 KB, 2 CTAs (the fewest instructions per MMA)
    #   64x128x64/w4/s3   137 instr, 117 regs,  72 KB, 3 CTAs
    #   128x64x64/w8/s4    98 instr,  74 regs,  96 KB, 2 CTAs (N = 448 = 7 x 64: no ragged column tile)
    #   64x128x32/w4/s4    89 instr (2 HGMMA), 102 regs, 48 KB, 4 CTAs
    # Dropped as unable to win on paper (each is dominated by a kept tile: as many or fewer CTAs per SM and more
    # instructions per MMA): 128x128x64/w8/s4 (1 CTA, 128 KB), 64x128x64/w4/s4 (2 CTAs), 128x128x32/w8/s4 (142
    # instructions per 64 of K, 2 CTAs), 64x64x64/w4/s4 (112 instructions for half the MMA of 128x64x64).
    # Tried earlier and left out for spilling with 3.6: 128x128x64 at 4 warps, 128x256x64 and 256x128x64 at 8
    # warps, 128x64x64/w4/s4, 128x128x128/w8/s2; with 3.9: 64x256x64/w8/s3.
    "16bit": [
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 3),
        (128, 64, 64, 8, 4),
        (64, 128, 32, 4, 4),
    ],
    "fp32": [(64, 64, 16, 4, 2)],
}
F32_STORE_SERIALIZED = ((128, 128, 8),)
"""(BLOCK_M, BLOCK_N, warps) of the 16-bit tiles whose wgmma loop ptxas serializes (warning C7515: "non wgmma
instructions defining accumulator registers") when the float32 accumulator is stored as is, with no epilogue
arithmetic: the dgrad into a float32 ``da`` (the LayerNorm GEMMs') and a float32-output forward with no GELU /
scale / residual. Those GEMMs neither time nor default to them."""
LN_FIRST = "ln"
"""The sixth element of a 16-bit LayerNorm GEMM's forward configs, ``tile + (LN_FIRST,)``: the ``layer_norm``
kernel normalises each row once and writes it in the compute dtype, then the GEMM (no prologue) reads it. Every
16-bit LayerNorm GEMM runs this way (a bare tile too); only float32 keeps the in-GEMM prologue (see Tuning)."""
DZ_PASS = "dz"
"""The sixth element of a 16-bit dgrad's configs where dz is not dout itself (GELU', a scale, a dtype cast) or the
bias gradient is wanted, ``tile + (DZ_PASS,)``: ``_linear_dz_kernel`` forms dz once per element (and the bias
gradient's partial sums), then the dgrad GEMM (no prologue) reads it. Every such 16-bit dgrad runs this way (a bare
tile too); only float32 keeps the in-GEMM prologue (see Tuning)."""
CUBLAS = ("cublas",)
"""A forward config: timm's own sequence -- the ``layer_norm`` kernel (LayerNorm-prologue GEMMs), the GEMM and bias
by cuBLAS (``torch.addmm``, z rounded to the compute dtype), GELU / drop-path scale / residual add as torch
elementwise ops -- that the autotuner times beside the fused tiles, so a key where the Triton GEMM loses to cuBLAS
by more than the epilogue passes cost gets cuBLAS (see Tuning in the header)."""
DZ_FIRST = ("dz", "cublas")
"""A dgrad config: the elementwise ``_linear_dz_kernel`` writes dz and the bias gradient's partial sums, then
cuBLAS (``torch.mm``) computes ``da = dz @ W``, instead of the fused GEMM's prologue; the autotuner times both ways
(see Tuning in the header)."""
DZ_ROWS, DZ_BLOCK_M, DZ_BLOCK_N, DZ_WARPS = 256, 32, 128, 4
"""The elementwise dz kernel's program: DZ_ROWS rows (in DZ_BLOCK_M-row steps) x DZ_BLOCK_N columns, so the bias
gradient's partial sums have ``cdiv(M, DZ_ROWS)`` rows."""
GROUP_M = 8
# The interpreter's cost is per program: large tiles. Tests shrink it to walk several tiles and ragged edges.
_INTERPRETER_CONFIG = (128, 128, 128, 1, 1)
_SM_COUNT_DEFAULT = 132


# (No @triton.jit helpers below: under Triton's CPU interpreter every call of a jitted helper costs ~20 ms of
# re-patching, more than the arithmetic; GELU, the tile order and the row offsets are written inline.)


@triton.jit
def _linear_fwd_kernel(
    X, W, Bias, LnW, LnB, Scale, Res, Out, Pre, Ahat, Mean, Rstd,  # unused pointers are placeholders
    M, N, K, T, RPG, eps,  # T: rows per leading index of the 3-D views; RPG: rows per scale entry
    sx0, sx1, sxk,  # x strides, (B, T, K) view
    swn, swk,  # weight strides, (N, K)
    sr0, sr1, srn,  # residual strides, (B, T, N)
    so0, so1, son,  # out strides, (B, T, N)
    HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr, SAVE: tl.constexpr,  # SAVE: write z (GELU), a and the row statistics (LN)
    EVEN_K: tl.constexpr, IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    CT: tl.constexpr = W.dtype.element_ty
    # tile order: GROUP row tiles sweep the column tiles together (their rows of x stay in L2)
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    in_group = GROUP * ((N + BLOCK_N - 1) // BLOCK_N)
    first_m = (pid // in_group) * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % size
    pid_n = (pid % in_group) // size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:  # (M - 1) * a row stride, or (N - 1) * a column stride, may pass 2**31
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < M
    nmask = cols < N
    bt, tt = rows // T, rows % T  # (b, t) of each row in the (B, T, .) views
    first_col_tile = (tl.zeros((BLOCK_M,), dtype=tl.int32) + pid_n) == 0  # (BLOCK_M,) of one value
    x_ptrs = X + (bt * sx0 + tt * sx1)[:, None] + ks[None, :] * sxk  # (BLOCK_M, BLOCK_K), advanced along K
    w_ptrs = W + cols[None, :] * swn + ks[:, None] * swk  # (BLOCK_K, BLOCK_N)

    if HAS_LN:
        # one pass over the row block for the statistics of x - p, p = the row's first element (exact for rows
        # within a factor of two of p; row_moments): per-chunk mean and M2 merged (Chan et al.), so the centred row
        # keeps the precision of the row's spread, not of its mean
        piv = tl.load(X + bt * sx0 + tt * sx1, mask=rmask, other=0.0).to(tl.float32)  # (BLOCK_M,)
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)  # of x - p
        m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        p = x_ptrs
        for k0 in range(0, K, BLOCK_K):
            kmask = ks < K - k0
            xk = tl.load(p, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            xk = tl.where(kmask[None, :], xk - piv[:, None], 0.0)
            cnt = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
            # plain division: the pivot, not the rounding of these means, keeps the centred row exact
            cmean, cm2, _ = row_moments(xk, kmask[None, :], cnt, 1, False)
            tot = k0 + cnt
            delta = cmean - mean
            mean += delta * (cnt / tot)
            m2 += cm2 + delta * delta * (k0 * cnt / tot)
            p += BLOCK_K * sxk
        rstd = rstd_of(m2, K, eps)
        shift = -mean * rstd  # LayerNorm(x) = ((x - p) * rstd + shift) * g + b
        if SAVE:
            tl.store(Mean + rows, piv + mean, mask=rmask & first_col_tile)
            tl.store(Rstd + rows, rstd, mask=rmask & first_col_tile)
        if SAVE:
            ahat_ptrs = Ahat + rows[:, None] * K + ks[None, :]
            save_rows = (rmask & first_col_tile)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        if EVEN_K:
            a = tl.load(x_ptrs, mask=rmask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=nmask[None, :], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=nmask[None, :] & kmask[:, None], other=0.0)
        if HAS_LN:
            g = tl.load(LnW + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            bb = tl.load(LnB + k0 + ks, mask=kmask, other=0.0).to(tl.float32)
            a = ((a.to(tl.float32) - piv[:, None]) * rstd[:, None] + shift[:, None]) * g[None, :] + bb[None, :]
        a = a.to(CT)
        if HAS_LN:
            if SAVE:
                tl.store(ahat_ptrs, a, mask=save_rows & kmask[None, :])
                ahat_ptrs += BLOCK_K
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk

    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=nmask, other=0.0).to(CT).to(tl.float32)[None, :]
    omask = rmask[:, None] & nmask[None, :]
    if GELU:
        if SAVE:
            tl.store(Pre + rows[:, None] * N + cols[None, :], acc.to(CT), mask=omask)
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU
    if HAS_SCALE:
        s = tl.load(Scale + rows // RPG, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    if HAS_RES:
        res = tl.load(Res + (bt * sr0 + tt * sr1)[:, None] + cols[None, :] * srn, mask=omask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(Out + (bt * so0 + tt * so1)[:, None] + cols[None, :] * son, acc.to(Out.dtype.element_ty), mask=omask)


@triton.jit
def _linear_dgrad_kernel(
    DOut, Pre, Scale, W, DA, DZ, DB,  # Pre / Scale / DB unused without GELU / HAS_SCALE / HAS_DB
    M, N, K, T, RPG,
    sd0, sd1, sdn,  # dout strides, (B, T, N)
    swn, swk,  # weight strides, (N, K)
    sa0, sa1, sak,  # da strides, (B, T, K)
    GELU: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_DZ: tl.constexpr, HAS_DB: tl.constexpr,
    EVEN_N: tl.constexpr, IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    # Output tile: BLOCK_M rows x BLOCK_N columns of da (K wide); the reduction runs over the GEMM's N in chunks of
    # BLOCK_K.
    CT: tl.constexpr = W.dtype.element_ty
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    in_group = GROUP * ((K + BLOCK_N - 1) // BLOCK_N)
    first_m = (pid // in_group) * GROUP
    size = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % size
    pid_k = (pid % in_group) // size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    kcols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        rows = rows.to(tl.int64)
        kcols = kcols.to(tl.int64)
    ns = tl.arange(0, BLOCK_K)
    rmask = rows < M
    kmask = kcols < K
    bt, tt = rows // T, rows % T
    if HAS_SCALE:
        s = tl.load(Scale + rows // RPG, mask=rmask, other=0.0).to(tl.float32)
    first_col_tile = (tl.zeros((BLOCK_M,), dtype=tl.int32) + pid_k) == 0  # (BLOCK_M,) of one value
    d_ptrs = DOut + (bt * sd0 + tt * sd1)[:, None] + ns[None, :] * sdn  # (BLOCK_M, BLOCK_K), along N
    w_ptrs = W + ns[:, None] * swn + kcols[None, :] * swk  # (BLOCK_K, BLOCK_N)
    if GELU:
        z_ptrs = Pre + rows[:, None] * N + ns[None, :]
    if STORE_DZ:
        dz_ptrs = DZ + rows[:, None] * N + ns[None, :]
        dz_rows = (rmask & first_col_tile)[:, None]
    if HAS_DB:  # (BLOCK_K,): this row tile's column sums of dz, row pid_m of the (num_m, N) partials, along N
        db_ptrs = DB + (pid_m.to(tl.int64) if IDX64 else pid_m) * N + ns

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        nmask = ns < N - n0
        if EVEN_N:
            m = rmask[:, None]
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
        else:
            m = rmask[:, None] & nmask[None, :]
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
        g = tl.load(d_ptrs, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * s[:, None]
        if GELU:
            z = tl.load(z_ptrs, mask=m, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            g = g * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)  # GELU'(z) = Phi(z) + z phi(z)
            z_ptrs += BLOCK_K
        dz = g.to(CT)
        if STORE_DZ:
            tl.store(dz_ptrs, dz, mask=dz_rows & nmask[None, :])
            dz_ptrs += BLOCK_K
        if HAS_DB:
            if pid_k == 0:  # the bias gradient's partial sums, from the rounded dz (what dW multiplies)
                tl.store(db_ptrs, tl.sum(dz.to(tl.float32), axis=0), mask=nmask)
            db_ptrs += BLOCK_K
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        d_ptrs += BLOCK_K * sdn
        w_ptrs += BLOCK_K * swn
    tl.store(DA + (bt * sa0 + tt * sa1)[:, None] + kcols[None, :] * sak, (acc + 0.0).to(DA.dtype.element_ty),
             mask=rmask[:, None] & kmask[None, :])


@triton.jit
def _linear_dz_kernel(
    DOut, Pre, Scale, W, DZ, DB,  # Pre / Scale / DZ / DB unused without GELU / HAS_SCALE / STORE_DZ / HAS_DB
    M, N, T, RPG,
    sd0, sd1, sdn,  # dout strides, (B, T, N)
    GELU: tl.constexpr, HAS_SCALE: tl.constexpr, STORE_DZ: tl.constexpr, HAS_DB: tl.constexpr,
    IDX64: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # DZ_FIRST's elementwise pass: dz = (dout * scale * GELU'(z)).to(ct) for ROWS rows x BLOCK_N columns (W only
    # names ct), stored (M, N) contiguous, and the columns' sums of the rounded dz as row pid_m of DB.
    CT: tl.constexpr = W.dtype.element_ty
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if IDX64:
        cols = cols.to(tl.int64)
    nmask = cols < N
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_M):
        rows = pid_m * ROWS + r0 + tl.arange(0, BLOCK_M)
        if IDX64:
            rows = rows.to(tl.int64)
        rmask = rows < M
        m = rmask[:, None] & nmask[None, :]
        bt, tt = rows // T, rows % T
        g = tl.load(DOut + (bt * sd0 + tt * sd1)[:, None] + cols[None, :] * sdn, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(Scale + rows // RPG, mask=rmask, other=0.0).to(tl.float32)
            g = g * s[:, None]
        if GELU:
            z = tl.load(Pre + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
            g = g * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)  # GELU'(z) = Phi(z) + z phi(z)
        dz = g.to(CT)
        if STORE_DZ:
            tl.store(DZ + rows[:, None] * N + cols[None, :], dz, mask=m)
        if HAS_DB:
            colsum += tl.sum(dz.to(tl.float32), axis=0)
    if HAS_DB:
        tl.store(DB + (pid_m.to(tl.int64) if IDX64 else pid_m) * N + cols, colsum, mask=nmask)


# --------------------------------------------------------------------------------------------------------------
# Launchers (the device guard, the (B, T, C) view and the span check are layer_norm's)
# --------------------------------------------------------------------------------------------------------------


def _dtype_name(d) -> str:
    return str(d).replace("torch.", "")


def _sm_count(t: torch.Tensor) -> int:
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return _SM_COUNT_DEFAULT


def pick_config(M: int, N: int, dtype: torch.dtype, sms: int = _SM_COUNT_DEFAULT,
                f32_store: bool = False) -> Tuple[int, int, int, int, int]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tile for an (M x N) output in compute dtype ``dtype``;
    ``f32_store``: the float32 accumulator is stored as is (never a tile of :data:`F32_STORE_SERIALIZED`)."""
    if _INTERPRETED:
        return _INTERPRETER_CONFIG
    if dtype == torch.float32:
        return CONFIGS["fp32"]
    big = CONFIGS["16bit-large"]
    tiles = triton.cdiv(M, big[0]) * triton.cdiv(N, big[1])
    if tiles >= 2 * sms and not (f32_store and _serializes(big)):
        return big
    return CONFIGS["16bit-small"]


def _serializes(cfg) -> bool:
    """Whether a 16-bit tile is one of :data:`F32_STORE_SERIALIZED`."""
    return (cfg[0], cfg[1], cfg[3]) in F32_STORE_SERIALIZED


def tune_configs(dtype: torch.dtype, f32_store: bool = False) -> List[Config]:
    """Every tile the autotuner times for compute dtype ``dtype`` (``f32_store``: without the tiles of
    :data:`F32_STORE_SERIALIZED`)."""
    if dtype == torch.float32:
        return TUNE_CONFIGS["fp32"]
    return [c for c in TUNE_CONFIGS["16bit"] if not (f32_store and _serializes(c))]


def fwd_candidates(dtype: torch.dtype, has_ln: bool, K: int = 0, f32_store: bool = False) -> list:
    """Every forward config the autotuner times. float32: its tiles (the LayerNorm in the GEMM's prologue; no
    cuBLAS: its float32 GEMM follows torch's TF32 switch). 16-bit: the tiles, each as ``tile + (LN_FIRST,)`` for a
    LayerNorm GEMM (the LayerNorm kernel, then the GEMM), and :data:`CUBLAS`. ``f32_store``: a float32 output with
    no GELU / scale / residual (see :data:`F32_STORE_SERIALIZED`). ``K`` is kept for callers; the LayerNorm's width
    limit is checked before any launch."""
    tiles = tune_configs(dtype, f32_store)
    if dtype == torch.float32:
        return tiles
    return ([c + (LN_FIRST,) for c in tiles] if has_ln else tiles) + [CUBLAS]


def _cublas_writes(ct: torch.dtype, da_dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` on ``ct`` operands can write ``da_dtype`` directly: the compute dtype itself, or float32
    from a 16-bit one (``mm``'s ``out_dtype``; CUDA, torch >= 2.8)."""
    return da_dtype == ct or (da_dtype == torch.float32 and ct in (torch.float16, torch.bfloat16)
                              and hasattr(torch.ops.aten.mm, "dtype_out"))


def dgrad_candidates(dtype: torch.dtype, da_dtype: Optional[torch.dtype] = None, dz_pass: bool = True) -> list:
    """Every dgrad config the autotuner times: the tiles (16-bit: each as ``tile + (DZ_PASS,)`` where ``dz_pass``,
    i.e. dz is formed by the elementwise kernel first; without the tiles of :data:`F32_STORE_SERIALIZED` for a
    float32 ``da``) and, for a 16-bit compute dtype whose ``da`` dtype cuBLAS can write (``dtype`` or float32),
    :data:`DZ_FIRST` (a strided ``da`` costs it a copy, which its timing includes). float32 has one tile and no
    alternative (cuBLAS's float32 GEMM would follow torch's TF32 switch, the kernel never rounds to TF32)."""
    if dtype == torch.float32:
        return tune_configs(dtype)
    f32 = (da_dtype or dtype) == torch.float32
    tiles = [c + (DZ_PASS,) if dz_pass else c for c in tune_configs(dtype, f32)]
    if _cublas_writes(dtype, da_dtype or dtype):
        return tiles + [DZ_FIRST]
    return tiles


AUTOTUNE_CACHE = autotune_cache_from_env()
"""Module switch (CUDA only): True keeps each pick on disk too (:class:`~crossvit_fast.kernels.tuning.Tuner`), so a
later process loads it instead of timing the candidates; ``CROSSVIT_FAST_AUTOTUNE_CACHE=0`` sets it False."""


class CublasUnsupported(RuntimeError):
    """A cuBLAS candidate's GEMM is not available here (e.g. ``mm``'s ``out_dtype`` on this torch / device)."""


def _tuned_kernels():
    from .layer_norm import _layer_norm_fwd_kernel

    return (_linear_fwd_kernel, _linear_dgrad_kernel, _linear_dz_kernel, _layer_norm_fwd_kernel)


TUNER = tuning.Tuner("linear", _tuned_kernels, skippable=(CublasUnsupported,))
"""This module's autotuner (the one :class:`~crossvit_fast.kernels.tuning.Tuner` class, shared with the
self-attention): its picks, its disk entries (the kernels' source, with the LayerNorm kernel a LayerNorm-first config
launches, in their key)."""


def tuned_configs() -> Dict[tuple, Config]:
    """A copy of what the autotuner picked so far (key -> config), e.g. for a benchmark record."""
    return TUNER.picks()


def config_name(config) -> str:
    """``128x128x64/w8/s3``; a LayerNorm-kernel-first forward config (``tile + (LN_FIRST,)``) as ``ln+128x...``, a
    dz-pass dgrad config (``tile + (DZ_PASS,)``) as ``dz+128x...``; :data:`CUBLAS` as ``cublas``, :data:`DZ_FIRST`
    as ``dz+cublas``."""
    if tuple(config) in (CUBLAS, DZ_FIRST):
        return "+".join(config)
    bm, bn, bk, w, s = config[:5]
    return (f"{config[5]}+" if len(config) == 6 else "") + f"{bm}x{bn}x{bk}/w{w}/s{s}"


def _tune_key(kind: str, M: int, N: int, K: int, flags, ins, outs) -> tuple:
    """(kernel, M bucket, N, K, flags, the inputs' dtypes and whether each is row-contiguous, the outputs' dtypes,
    device): a new batch size in the same power-of-two bucket of rows reuses the tuned config."""
    return (kind, triton.next_power_of_2(M), N, K, tuple(flags), tuple((t.dtype, t.stride(-1) == 1) for t in ins),
            tuple(t.dtype for t in outs), ins[0].device.index)


def _launch(launch, key_of, M: int, n_cols: int, ct: torch.dtype, ref: torch.Tensor, may_tune,
            config: Optional[Config], candidates, f32_store: bool = False) -> None:
    """The launch of a kernel ``launch(config)`` through :meth:`Tuner.dispatch`: explicit ``config``; the
    interpreter's tile; compile-only (the sm_90 tool): every candidate; else tuned over ``candidates()``.
    ``f32_store``: the default tile is :func:`pick_config`'s for a float32 accumulator stored as is."""
    TUNER.dispatch(launch, config=config, interpreted=_INTERPRETER_CONFIG if _INTERPRETED else None,
                   compile_only=COMPILE_ONLY, enabled=AUTOTUNE, disk_cache=AUTOTUNE_CACHE, key_of=key_of,
                   default_of=lambda: pick_config(M, n_cols, ct, _sm_count(ref), f32_store), candidates=candidates,
                   device=ref.device, may_tune=may_tune)


_MAX_BLOCK_K = 256  # above every BLOCK_K a config may carry


def _reduction_stride_safe(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t``, or a copy of it with unit stride along the GEMM's reduction (``dim``) where that stride times a BLOCK_K
    could pass 2**31: the K loops index that dimension with ``ks * stride`` and step by ``BLOCK_K * stride``, 32-bit
    products in every specialisation (IDX64 widens the row and column offsets only). Only a column-major view of a
    huge tensor (a reduction stride in the millions) takes the copy."""
    if abs(t.stride(dim)) * _MAX_BLOCK_K > _INT32_MAX:
        return t.movedim(dim, -1).contiguous().movedim(-1, dim)  # dim innermost in memory
    return t


def _check_tensor(name: str, t, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"linear: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if device is not None and t.device != device:
        raise ValueError(f"linear: {name} is on {t.device}, but x is on {device}; expected one device")


def _check_device_kind(device: torch.device, dtypes) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if COMPILE_ONLY and not _INTERPRETED:
            return
        if not _INTERPRETED:
            raise ValueError("linear: x is on the CPU, but the Triton kernels need a CUDA device (CPU runs only under "
                             "Triton's interpreter, TRITON_INTERPRET=1 set before crossvit_fast.kernels.linear is "
                             "imported)")
        if torch.bfloat16 in dtypes and not interpreter_runs_bf16():
            raise TypeError("linear: bfloat16 is not supported under Triton's CPU interpreter (it computes wrong "
                            "bfloat16 dots and truncates bfloat16 stores); use float16/float32 on CPU, or CUDA")
        return
    raise ValueError(f"linear: x is on {device}; expected a CUDA device")


def check_linear_shapes(x, weight, bias, ln_weight, ln_bias) -> Tuple[int, int]:
    """x's features K, the weight ``(N, K)``, the bias ``(N,)``, the LayerNorm prologue's pair ``(K,)`` (both or
    neither); returns (K, N). No device needed: the ``linear`` op's fakes run it (with
    :func:`check_linear_epilogue`) too."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"linear: x must have a last (feature) dimension >= 1, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] < 1:
        raise ValueError(f"linear: weight has shape {tuple(weight.shape)}, expected (N, {K}) with N >= 1 (nn.Linear's "
                         f"(out_features, in_features)) for x of shape {tuple(x.shape)}")
    N = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("linear: the LayerNorm prologue needs both ln_weight and ln_bias (an affine LayerNorm)")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and tuple(t.shape) != (K,):
            raise ValueError(f"linear: {name} has shape {tuple(t.shape)}, expected ({K},)")
    return K, N


def check_linear_epilogue(x, N: int, ln_weight, scale, residual, out_dtype) -> None:
    """After :func:`check_linear_shapes` (and the LayerNorm pair's dtypes): the prologue's width limit, the
    residual ``x.shape[:-1] + (N,)``, one drop-path scale per index of x's first dimension, the output dtype."""
    K = x.shape[-1]
    if ln_weight is not None and K > LAYER_NORM_MAX_DIM:
        raise ValueError(f"linear: {K} input features with the LayerNorm prologue; its backward (and the "
                         f"LayerNorm-first forward) holds a row in registers, at most {LAYER_NORM_MAX_DIM}")
    out_shape = tuple(x.shape[:-1]) + (N,)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"linear: residual has shape {tuple(residual.shape)}, expected {out_shape}")
    if scale is not None:
        lead = x.shape[0] if x.dim() >= 2 else 1
        if scale.numel() != lead or (scale.dim() > 0 and scale.shape[0] != lead):
            raise ValueError(f"linear: scale has shape {tuple(scale.shape)}, expected one value per index of x's "
                             f"first dimension ({lead},) (drop-path's per-sample scale)")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"linear: out_dtype {out_dtype}; expected float16, bfloat16 or float32")


def check_linear_inputs(x, weight, bias=None, ln_weight=None, ln_bias=None, eps=1e-6, scale=None, residual=None,
                        out_dtype=None) -> Tuple[int, int]:
    """Every check of the forward, before any allocation or launch; returns (K, N)."""
    _check_tensor("x", x, None)
    _check_tensor("weight", weight, x.device)
    for name, t in (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("scale", scale),
                    ("residual", residual)):
        if t is not None:
            _check_tensor(name, t, x.device)
    K, N = check_linear_shapes(x, weight, bias, ln_weight, ln_bias)
    if ln_weight is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"linear: eps must be a float >= 0, got {eps!r}")
        if ln_weight.dtype != ln_bias.dtype:
            raise TypeError(f"linear: ln_weight is {ln_weight.dtype} and ln_bias {ln_bias.dtype}; expected one dtype")
    check_linear_epilogue(x, N, ln_weight, scale, residual, out_dtype)
    dtypes = {t.dtype for t in (x, weight, bias, ln_weight, ln_bias, scale, residual) if t is not None}
    _check_device_kind(x.device, dtypes | ({out_dtype} if out_dtype is not None else set()))
    return K, N


def default_out_dtype(weight_dtype: torch.dtype, residual: Optional[torch.Tensor]) -> torch.dtype:
    """The compute dtype, or with a residual ``promote(residual, compute)`` (timm's ``x + branch`` under autocast)."""
    return weight_dtype if residual is None else torch.promote_types(residual.dtype, weight_dtype)


def _normalized(x, ln_weight, ln_bias, eps, ct, ahat, mean, rstd) -> torch.Tensor:
    """The LN_FIRST / CUBLAS forwards' first step: the ``layer_norm`` kernel writes LayerNorm(x) rounded to ``ct``
    (into ``ahat``, with ``mean`` / ``rstd``, when the backward will read them), shaped like x."""
    a = ahat.view(x.shape) if ahat is not None else torch.empty(x.shape, dtype=ct, device=x.device)
    layer_norm_fwd(x, None, ln_weight, ln_bias, eps, out_dtype=ct, out=a, mean=mean, rstd=rstd)
    return a


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    gelu: bool = False,
    scale: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    save: bool = False,
    *,
    out: Optional[torch.Tensor] = None,
    config: Optional[Tuple[int, int, int, int, int]] = None,
):
    """Forward: ``(out, pre, ahat, mean, rstd)``.

    ``out`` has shape ``x.shape[:-1] + (N,)`` in ``out_dtype`` (default :func:`default_out_dtype`); ``out=`` takes a
    preallocated tensor of any strides (2-D / 3-D). With ``save``: ``pre`` = z (GELU only), ``ahat`` = the rounded
    normalised input (LayerNorm only), both contiguous ``(M, ·)`` in the compute dtype, and ``mean`` / ``rstd``
    float32 ``(M,)`` (LayerNorm only); otherwise None.
    """
    K, N = check_linear_inputs(x, weight, bias, ln_weight, ln_bias, eps, scale, residual, out_dtype)
    bias, ln_weight, ln_bias, scale = (_unit_stride(t) for t in (bias, ln_weight, ln_bias, scale))
    ct = weight.dtype
    odt = out_dtype or default_out_dtype(ct, residual)
    out_shape = tuple(x.shape[:-1]) + (N,)
    if out is None:
        out = torch.empty(out_shape, dtype=odt, device=x.device)
    else:
        if tuple(out.shape) != out_shape or out.dtype != odt or out.device != x.device:
            raise ValueError(f"linear: out must be a {odt} tensor of shape {out_shape} on {x.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        if out.dim() > 3 and not out.is_contiguous():
            raise ValueError("linear: a preallocated out of more than 3 dimensions must be contiguous")
    has_ln = ln_weight is not None
    M = x.numel() // K
    dev = x.device
    pre = torch.empty((M, N), dtype=ct, device=dev) if save and gelu else None
    ahat = torch.empty((M, K), dtype=ct, device=dev) if save and has_ln else None
    mean = torch.empty((M,), dtype=torch.float32, device=dev) if save and has_ln else None
    rstd = torch.empty((M,), dtype=torch.float32, device=dev) if save and has_ln else None
    if M == 0:
        return out, pre, ahat, mean, rstd
    x3, o3 = _as3d(x), _as3d(out)
    r3 = _as3d(residual) if residual is not None else o3
    T = x3.shape[1]
    if o3.shape[1] != T or r3.shape[1] != T:  # a reshaped 4-D+ tensor: fall back to one flat row index
        raise ValueError("linear: x, residual and out must share their leading shape")
    lead = x.shape[0] if x.dim() >= 2 else 1
    rpg = max(M // lead, 1)
    scale_flat = scale.reshape(-1) if scale is not None else None
    x3, weight = _reduction_stride_safe(x3, 2), _reduction_stride_safe(weight, 1)
    idx64 = max(_span(t) for t in (x3, o3, r3, weight)) > _INT32_MAX or M * max(N, K) > _INT32_MAX
    dummy = out
    flags = (has_ln, bias is not None, bool(gelu), scale is not None, residual is not None, bool(save))

    def launch(cfg) -> None:
        if tuple(cfg) == CUBLAS:
            _fwd_cublas(x, weight, bias, ln_weight, ln_bias, eps, gelu, scale_flat, residual, out, pre, ahat, mean,
                        rstd, lead)
            return
        bm, bn, bk, warps, stages = cfg[:5]
        a3, prologue = x3, has_ln
        if has_ln and (len(cfg) == 6 or ct != torch.float32):  # LN_FIRST: every 16-bit LayerNorm GEMM
            a3, prologue = _as3d(_normalized(x, ln_weight, ln_bias, eps, ct, ahat, mean, rstd)), False
        _linear_fwd_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
            a3, weight, bias if bias is not None else dummy, ln_weight if prologue else dummy,
            ln_bias if prologue else dummy, scale_flat if scale is not None else dummy, r3, o3,
            pre if pre is not None else dummy, ahat if ahat is not None else dummy,
            mean if mean is not None else dummy, rstd if rstd is not None else dummy,
            M, N, K, T, rpg, float(eps),
            *a3.stride(), *weight.stride(), *r3.stride(), *o3.stride(),
            HAS_LN=prologue, HAS_BIAS=bias is not None, GELU=bool(gelu), HAS_SCALE=scale is not None,
            HAS_RES=residual is not None, SAVE=bool(save) and (prologue or bool(gelu)), EVEN_K=K % bk == 0,
            IDX64=idx64,
            DOT_PRECISION="ieee" if ct == torch.float32 else "tf32",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, num_warps=warps, num_stages=stages,
            enable_fp_fusion=FP_FUSION,
        )

    def key_of() -> tuple:
        return _tune_key("fwd", M, N, K, flags, [x3, weight] + ([r3] if residual is not None else []), [o3])

    def may_tune() -> bool:
        return not tuning.shares_storage([out], [x, weight, bias, ln_weight, ln_bias, scale, residual])

    f32_store = odt == torch.float32 and not gelu and scale is None and residual is None
    with _device_of(x):
        _launch(launch, key_of, M, N, ct, x, may_tune, config, lambda: fwd_candidates(ct, has_ln, K, f32_store),
                f32_store)
    return out, pre, ahat, mean, rstd


@torch.no_grad()  # the launchers sit below autograd (the ops' backward is their own); out= calls need it
def _fwd_cublas(x, weight, bias, ln_weight, ln_bias, eps, gelu, scale, residual, out, pre, ahat, mean, rstd,
                lead: int) -> None:
    """:data:`CUBLAS`: ``linear_ref``'s sequence into ``out`` (and ``pre`` / ``ahat`` / ``mean`` / ``rstd`` when
    saved): the LayerNorm kernel, ``addmm`` in the compute dtype, then GELU, the scale and the residual add (one
    ``addcmul`` pass when both). It rounds z and GELU(z) to the compute dtype, as the reference does; the fused
    kernel rounds once, so the result can differ from the fused tile's by about an ulp of the compute dtype (both
    within the tolerance rule): the autotuner's pick decides which (``CROSSVIT_FAST_AUTOTUNE=0`` fixes the tiles)."""
    ct = weight.dtype
    if ct == torch.float32:
        raise ValueError("linear: the CUBLAS config needs a 16-bit compute dtype (float32 has the fused kernel only: "
                         "cuBLAS's float32 GEMM follows torch's TF32 switch)")
    K, N = x.shape[-1], weight.shape[0]
    M = x.numel() // K
    if ln_weight is not None:
        a = _normalized(x, ln_weight, ln_bias, eps, ct, ahat, mean, rstd)
    else:
        a = x if x.dtype == ct else x.to(ct)
    if COMPILE_ONLY:
        return
    a2 = a.reshape(M, K)  # (M, K)
    plain = not gelu and scale is None and residual is None
    if pre is not None:
        z = pre
    elif plain and out.dtype == ct and out.is_contiguous():
        z = out.view(M, N)
    else:
        z = torch.empty((M, N), dtype=ct, device=x.device)
    if bias is not None:
        torch.addmm(bias.to(ct), a2, weight.t(), out=z)
    else:
        torch.mm(a2, weight.t(), out=z)
    y = (torch.nn.functional.gelu(z) if gelu else z).view(out.shape)
    s = scale.to(ct).view((lead,) + (1,) * (out.dim() - 1)) if scale is not None else None  # one per sample
    if residual is not None and s is not None:
        torch.addcmul(residual, y, s, out=out)  # residual + y * s, one pass
    elif residual is not None:
        torch.add(residual, y, out=out)
    elif s is not None:
        torch.mul(y, s, out=out)
    elif y.data_ptr() != out.data_ptr() or y.stride() != out.stride():
        out.copy_(y)


def linear_dgrad(
    dout: torch.Tensor,
    weight: torch.Tensor,
    pre: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    da_dtype: Optional[torch.dtype] = None,
    store_dz: bool = True,
    bias_grad: bool = False,
    *,
    da: Optional[torch.Tensor] = None,
    config: Optional[Tuple[int, int, int, int, int]] = None,
):
    """Backward of the GEMM: ``(da, dz, db)`` with ``dz = (dout * scale * GELU'(pre)).to(weight.dtype)``
    (``(M, N)`` contiguous, None without ``store_dz``), ``da = dz @ weight`` (shape ``dout.shape[:-1] + (K,)``, in
    ``da_dtype``, default the compute dtype; ``da=`` takes a preallocated tensor of any strides) and, with
    ``bias_grad``, the bias gradient ``db = sum over rows of dz`` (float32 ``(N,)``: per-row-tile partial sums
    written by the kernel, summed here; deterministic), else None. ``pre`` is the forward's saved ``z`` (GELU) or
    None; ``scale`` the forward's per-group scale or None."""
    _check_tensor("dout", dout, None)
    _check_tensor("weight", weight, dout.device)
    if weight.dim() != 2 or dout.dim() < 1 or dout.shape[-1] != weight.shape[0]:
        raise ValueError(f"linear backward: dout has shape {tuple(dout.shape)} and weight {tuple(weight.shape)}; "
                         f"expected dout (..., N) and weight (N, K)")
    N, K = weight.shape
    if N < 1 or K < 1:
        raise ValueError(f"linear backward: weight has shape {tuple(weight.shape)}; expected (N, K) with N, K >= 1")
    M = dout.numel() // N
    if pre is not None:
        _check_tensor("pre", pre, dout.device)
        if tuple(pre.shape) != (M, N) or not pre.is_contiguous():
            raise ValueError(f"linear backward: pre must be the forward's contiguous ({M}, {N}) z, got "
                             f"{tuple(pre.shape)}")
    if scale is not None:
        _check_tensor("scale", scale, dout.device)
        lead = dout.shape[0] if dout.dim() >= 2 else 1
        if scale.numel() != lead:
            raise ValueError(f"linear backward: scale has {scale.numel()} values, expected {lead}")
        scale = _unit_stride(scale)
    if da_dtype is not None and da_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"linear backward: da_dtype {da_dtype}; expected float16, bfloat16 or float32")
    ct = weight.dtype
    _check_device_kind(dout.device, {dout.dtype, ct, da_dtype or ct} | ({pre.dtype} if pre is not None else set()))
    a_shape = tuple(dout.shape[:-1]) + (K,)
    if da is None:
        da = torch.empty(a_shape, dtype=da_dtype or ct, device=dout.device)
    elif tuple(da.shape) != a_shape or da.dtype != (da_dtype or ct):
        raise ValueError(f"linear backward: da must be a {da_dtype or ct} tensor of shape {a_shape}")
    dz = torch.empty((M, N), dtype=ct, device=dout.device) if store_dz else None
    if M == 0:
        return da, dz, torch.zeros((N,), dtype=torch.float32, device=dout.device) if bias_grad else None
    d3, a3 = _as3d(dout), _as3d(da)
    partials = []  # the launched config's (cdiv(M, BLOCK_M), N) float32 partial sums (the last launch's)
    lead = dout.shape[0] if dout.dim() >= 2 else 1
    d3, weight = _reduction_stride_safe(d3, 2), _reduction_stride_safe(weight, 0)
    idx64 = max(_span(t) for t in (d3, a3, weight)) > _INT32_MAX or M * max(N, K) > _INT32_MAX

    dz_pass = ct != torch.float32 and (pre is not None or scale is not None or d3.dtype != ct or bool(store_dz)
                                       or bool(bias_grad))

    def launch(cfg: Config) -> None:
        if tuple(cfg) == DZ_FIRST:
            _dz_first(d3, weight, pre, scale, dz, da, partials, bias_grad, M, lead, idx64)
            return
        bm, bn, bk, warps, stages = cfg[:5]
        g3, fused = d3, ct == torch.float32
        if dz_pass:  # every 16-bit dgrad: dz formed once per element, then the GEMM without prologue
            g3 = _dz_pass(d3, weight, pre, scale, dz, partials, bias_grad, M, lead, idx64, True)
            g3 = g3 if g3.dim() == 3 else g3.view(d3.shape)
        elif fused and bias_grad:
            partials[:] = [torch.empty((triton.cdiv(M, bm), N), dtype=torch.float32, device=dout.device)]
        _linear_dgrad_kernel[(triton.cdiv(M, bm) * triton.cdiv(K, bn),)](
            g3, pre if pre is not None else g3, scale.reshape(-1) if scale is not None else g3, weight, a3,
            dz if dz is not None else a3, partials[0] if fused and bias_grad else a3,
            M, N, K, g3.shape[1], max(M // lead, 1),
            *g3.stride(), *weight.stride(), *a3.stride(),
            GELU=fused and pre is not None, HAS_SCALE=fused and scale is not None, STORE_DZ=fused and bool(store_dz),
            HAS_DB=fused and bool(bias_grad), EVEN_N=N % bk == 0,
            IDX64=idx64, DOT_PRECISION="ieee" if ct == torch.float32 else "tf32",
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, num_warps=warps, num_stages=stages,
            enable_fp_fusion=FP_FUSION,
        )

    def key_of() -> tuple:
        return _tune_key("dgrad", M, N, K, (pre is not None, scale is not None, bool(store_dz), bool(bias_grad)),
                         [d3, weight] + ([pre] if pre is not None else []), [a3])

    f32_store = ct != torch.float32 and da.dtype == torch.float32
    with _device_of(dout):
        _launch(launch, key_of, M, K, ct, dout, lambda: not tuning.shares_storage([da], [dout, pre, scale, weight]),
                config, lambda: dgrad_candidates(ct, da.dtype, dz_pass), f32_store)
    return da, dz, partials[0].sum(0) if bias_grad else None


def _dz_pass(d3, weight, pre, scale, dz, partials, bias_grad: bool, M: int, lead: int, idx64: bool,
             strided_ok: bool) -> torch.Tensor:
    """A 16-bit dgrad's first step (:data:`DZ_PASS`, :data:`DZ_FIRST`): ``_linear_dz_kernel`` writes
    ``dz = (dout * scale * GELU'(z)).to(ct)`` into ``dz`` (or a scratch (M, N) one) and, with ``bias_grad``, the
    bias gradient's partial sums into ``partials``. Returns what the GEMM reads: that dz; or, where dz is dout
    itself and not stored, ``d3`` (the GEMM takes any strides: ``strided_ok``) or its ``(M, N)`` view (the dz
    kernel copies a dout whose last stride is not 1), whose column sums alone the kernel then forms."""
    N = weight.shape[0]
    ct = weight.dtype
    assert DZ_ROWS % DZ_BLOCK_M == 0, (DZ_ROWS, DZ_BLOCK_M)
    identity = pre is None and scale is None and d3.dtype == ct
    dzm = dz
    if dzm is None:  # not stored for dW: dout itself when it is dz already, else a scratch dz for the GEMM
        if identity and strided_ok:
            dzm = d3
        elif identity and d3.stride(-1) == 1:
            dzm = d3.reshape(M, N)
        else:
            dzm = torch.empty((M, N), dtype=ct, device=d3.device)
    write = dzm is dz or not identity or (not strided_ok and d3.stride(-1) != 1)
    if bias_grad:
        partials[:] = [torch.empty((triton.cdiv(M, DZ_ROWS), N), dtype=torch.float32, device=d3.device)]
    if write or bias_grad:
        _linear_dz_kernel[(triton.cdiv(M, DZ_ROWS), triton.cdiv(N, DZ_BLOCK_N))](
            d3, pre if pre is not None else d3, scale.reshape(-1) if scale is not None else d3, weight,
            dzm if write else d3, partials[0] if bias_grad else d3,
            M, N, d3.shape[1], max(M // lead, 1), *d3.stride(),
            GELU=pre is not None, HAS_SCALE=scale is not None, STORE_DZ=write, HAS_DB=bool(bias_grad), IDX64=idx64,
            ROWS=DZ_ROWS, BLOCK_M=DZ_BLOCK_M, BLOCK_N=DZ_BLOCK_N, num_warps=DZ_WARPS, num_stages=1,
            enable_fp_fusion=FP_FUSION,
        )
    return dzm


@torch.no_grad()
def _dz_first(d3, weight, pre, scale, dz, da, partials, bias_grad: bool, M: int, lead: int, idx64: bool) -> None:
    """:data:`DZ_FIRST`: ``_linear_dz_kernel`` (dz, the bias gradient's partial sums), then ``da = dz @ W`` by
    ``torch.mm`` (cuBLAS: float32 accumulation into a float32 ``da``; into a 16-bit ``da`` it follows torch's
    ``allow_{fp16,bf16}_reduced_precision_reduction``, as the reference's GEMM does)."""
    N, K = weight.shape
    ct = weight.dtype
    if ct == torch.float32:
        raise ValueError("linear backward: the DZ_FIRST config needs a 16-bit compute dtype (float32 has the fused "
                         "dgrad only: cuBLAS's float32 GEMM follows torch's TF32 switch)")
    dzm = _dz_pass(d3, weight, pre, scale, dz, partials, bias_grad, M, lead, idx64, False)
    if COMPILE_ONLY:
        return
    direct = da.is_contiguous() and da.dtype in (ct, torch.float32)
    acc_dtype = da.dtype if direct else (ct if da.dtype == ct else torch.float32)
    if acc_dtype != ct and not _cublas_writes(ct, acc_dtype):
        raise ValueError(f"linear backward: the DZ_FIRST config cannot write a {da.dtype} da from {ct} operands "
                         f"with this torch (mm's out_dtype needs torch >= 2.8)")
    out = da.view(M, K) if direct else torch.empty((M, K), dtype=acc_dtype, device=da.device)
    if _INTERPRETED:  # CPU tests: exact 16-bit products, float32 sums, one rounding (cuBLAS's semantics)
        out.copy_(torch.mm(dzm.float(), weight.float()))
    elif acc_dtype == ct:
        torch.mm(dzm, weight, out=out)
    else:
        try:
            torch.mm(dzm, weight, out_dtype=acc_dtype, out=out)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:  # this torch / device has no such cuBLAS GEMM: the tuner skips the candidate
            raise CublasUnsupported(f"linear backward: torch.mm({ct} x {ct} -> {acc_dtype}) failed: {e}") from e
    if not direct:
        da.copy_(out.view(da.shape))


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile cases (for an sm_90 compile tool: fakedrv + fn.warmup)
# --------------------------------------------------------------------------------------------------------------

# The five GEMMs of a branch block at (C, flags): qkv (LN, bias), proj (bias, scale, residual), fc1 (LN, bias,
# GELU), fc2 (bias, scale, residual); the model family's widths.
_BLOCK_GEMMS = (
    ("qkv", 1, 3, dict(ln=True, bias=True)),
    ("proj", 1, 1, dict(bias=True, scale=True, res=True)),
    ("fc1", 1, 3, dict(ln=True, bias=True, gelu=True)),
    ("fc2", 3, 1, dict(bias=True, scale=True, res=True)),
)
AOT_WIDTHS = (96, 128, 192, 224, 384, 448, 768)


def aot_cases() -> List[Dict[str, object]]:
    """Every (kernel, flags, K, N, dtype, config) the launchers can compile for the family (every tile the autotuner
    may time): a list of dicts with ``kernel`` ("fwd" / "dgrad"), ``name``, ``K``, ``N``, ``dtype``, ``config`` (a
    :data:`Config` tuple) and the flag keywords. An sm_90 tool
    builds CPU tensors of these shapes and calls ``linear_fwd`` / ``linear_dgrad`` (or the kernels' ``warmup``)."""
    out = []
    for C in AOT_WIDTHS:
        for name, kin, nout, flags in _BLOCK_GEMMS:
            K, N = kin * C, nout * C
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for cfg in fwd_candidates(dtype, bool(flags.get("ln")), K):
                    for save in (False, True):
                        out.append(dict(kernel="fwd", name=name, K=K, N=N, dtype=dtype, config=cfg, save=save,
                                        **flags))
                for cfg in dgrad_candidates(dtype, torch.float32 if flags.get("ln") else dtype):
                    out.append(dict(kernel="dgrad", name=name, K=K, N=N, dtype=dtype, config=cfg,
                                    gelu=flags.get("gelu", False), scale=flags.get("scale", False)))
    return out


