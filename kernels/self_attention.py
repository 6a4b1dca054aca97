"""Fused multi-head self-attention (non-causal) of a CrossViT branch block: Triton forward and backward.

Input and output
----------------
``qkv`` is the output of timm's ``Attention.qkv`` Linear, ``(B, N, 3 * H * D)``: the last dimension is
``[q | k | v]``, each head-major ``(H, D)``. The kernels read it in place through its three strides (any strided
view; no permute or contiguous copy), so element ``(b, n, part, h, d)`` lives at
``b * s_b + n * s_n + ((part * H + h) * D + d) * s_c``. The output is ``(B, N, H * D)``, the layout timm's output
projection reads; the backward writes ``dqkv`` as one ``(B, N, 3 * H * D)`` tensor, the gradient the qkv Linear
wants. The oracle is :func:`crossvit_fast.reference.self_attention_ref`.

Math
----
Per batch ``b`` and head ``h``, with ``S = scale * Q K^T`` (default ``scale = D^-0.5``)::

    P = softmax(S) (over keys),  O = P V,  L_i = log(sum_j exp(S_ij))      (L: the log-sum-exp, natural log)

    backward:  dV = P^T dO
               dP = dO V^T,  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id
               dS = P * (dP - delta)
               dQ = scale * dS K,   dK = scale * dS^T Q

Algorithm
---------
Forward (flash attention, online softmax): one program per (query block of BLOCK_M rows, b, h). It keeps the
running row maximum ``m``, row sum ``l~`` and un-normalised accumulator ``acc`` in registers and streams over key
blocks of BLOCK_N, with ``c = |scale| * log2(e)`` (base-2 exponent, so exp2 replaces exp)::

    s = q k^T                                (unscaled: c enters the exponent's FFMA)
    m' = max(m, rowmax(s) * c);  a = 2^(m - m');  p = 2^(s * c - m')      (one FFMA and one exp2 per score)
    p~ = p rounded to the input dtype        (the tl.dot operand, converted two scores per instruction)
    l~ = a l~ + p~ E;   acc = a acc + p~ v;   m = m'
    O = acc / l~,   L = (m + log2 l~) * ln 2

A negative scale negates q instead (exact), so ``m`` is the maximum of the scaled scores for any sign; masked keys
take ``p = 0`` through a select on the exponent (also right for ``scale = 0``).

One row sum, ``l~``, the sum of the rounded weights the PV dot used, computed by that dot's operand: ``E`` is a
``(BLOCK_N, 16)`` matrix with ones in column 0, so ``p~ E`` is one more tensor-core dot (64x16 wgmma, products
exact, float32 sums) whose column 0 accumulates ``l~``. Summing ``p~`` on the CUDA cores instead needs p~ widened
back to float32, and that second use of each converted score keeps the compiler from converting two at a time (one
conversion per score plus byte permutes to pack the operand). O divided by ``l~`` has weights that sum to 1 to
float32 rounding: a component common to every value row (the qkv Linear's bias puts one there) passes through
unchanged. L is taken from the same ``l~``, not from the sum ``l`` of the unrounded weights: the backward's
recomputed ``P = p / l~`` then sums to ``l / l~ = 1 + e`` per row (``|e| <= 2^-8`` bfloat16, ``2^-11`` float16: a
weighted mean of the rounding errors of p~, typically far smaller), one factor per row, and the exact-delta scheme
below is unaffected: with ``delta = dO . O_fp32 = dO . (sum_j p~_j v_j) / l~``, a component common to the value rows
still cancels in ``dP - delta`` for every score, and ``rowsum(dS) = sum_j p_j (dP_j - delta) / l~`` is what it was
with ``l`` up to the factor ``l / l~``. The LSE moves by ``ln(l~ / l)``, below the 16-bit reference's own LSE error
(its scores are rounded to 16 bits).

float32 keeps the scores in natural units instead and scales them first (its loop is bound by the FMA dot, not by
these; folding the scale made its 64-column 16 x 32 tile spill with triton 3.9): ``s = (q k^T) * scale``,
``m' = max(m, rowmax(s))``, ``p = 2^((s - m') * log2 e)``, ``L = m + ln l`` with ``l`` the plain row sum (p is the
dot's operand unrounded), so log2(e) multiplies the small differences and never a score of magnitude 20-40, and L is
rounded once instead of three times (``* log2 e``, ``+ log2 l``, ``* ln 2``): each of those roundings moved every P
of a row by up to ``2^-24 |L|``, a float32 error 2-3x the reference's.

Static reading, not a measurement (sm_90 SASS, cuobjdump of each cubin): instructions per score per thread in the
loop over full key (query) blocks, its instructions divided by ``BLOCK_M * BLOCK_N / (32 * num_warps)``; ranges over
every config the pruner keeps at batch 256, H = 7, the forward with and without the out_lo store ("before": the
scale as a separate multiply, two row sums on the CUDA cores, p~ converted one score at a time and widened back;
dK/dV multiplying each loaded L by log2 e)::

    kernel   dtype  D   N     triton 3.6: before -> after   triton 3.9: before -> after
    forward  bf16   32  401    10.5-14.9 -> 5.4-9.9          10.7-15.4 -> 5.8-10.2
    forward  bf16   64  197    11.0-16.3 -> 5.9-11.7         11.4-17.4 -> 6.4-12.2
    forward  fp16   32  401     9.6-13.8 -> 5.4-9.9           9.7-14.4 -> 5.8-10.2
    forward  fp16   64  197    10.0-15.3 -> 5.9-11.7         10.4-16.6 -> 6.4-12.2
    dK/dV    bf16   32  401    10.0-18.1 -> 9.5-17.6          9.7-18.2 -> 9.2-17.8
    dK/dV    bf16   64  197    10.8-18.1 -> 10.3-17.6        10.8-20.0 -> 10.3-19.5
    dK/dV    fp16   32  401    10.0-18.1 -> 9.5-17.6          9.7-18.2 -> 9.2-17.8
    dK/dV    fp16   64  197    10.8-18.1 -> 10.3-17.6        10.8-20.0 -> 10.3-19.5
    dQ       bf16   32  401     6.8-12.2    (unchanged)       7.2-13.4    (unchanged)
    dQ       bf16   64  197     7.3-12.8    (unchanged)       8.2-16.0    (unchanged)
    dQ       fp16   32  401     6.8-12.2    (unchanged)       7.2-13.4    (unchanged)
    dQ       fp16   64  197     7.3-12.8    (unchanged)       8.2-16.0    (unchanged)

Per config the forward loop lost 28-48 % of its instructions at D = 32 and 24-46 % at D = 64; what is left per 32
scores of a thread: 32 exp2, 32 max, 32 FFMA, 16 paired conversions, the rescaling of acc and l~ by a, and the
loads, barriers and wgmma issue of the block. dK/dV lost 0.5 per score (3-5 %). ptxas (3.6 and 3.9) reports no
wgmma serialisation (C7515, C7512) for any config kept, before or after; the forward tile that 3.6 serialises for
lack of registers (C7512: float16, 64 columns, 128 x 64, 4 warps, 243 registers; 3.9 spills there) is pruned.

Nothing N x N ever reaches memory: the forward saves only O and L, ``(B, H, N)`` float32, contiguous (and, when
asked, O's rounding residual O_LO, below).

Backward, deterministic (no atomics), three launches for float16/bfloat16 (float32: below):

1. ``delta = rowsum(dO * O)``, ``(B, H, N)`` float32. For float16/bfloat16 the O the forward returns is rounded,
   and ``delta`` from it is off by ``rowsum(dO * (O_fp32 - O))``, an error every dS element inherits as
   ``P * error``: on a branch block's own gradients it made dQKV 2-3x less accurate than the float16 reference
   (flash attention and SDPA take the same rounded O). So the forward can also write the residual
   ``O_LO = O_fp32 - O`` in the input dtype (``out_lo``; the ``self_attention`` op does when it saves for a
   backward) and ``delta`` reads ``O + O_LO``, float32 to within the residual's own rounding. The cost: one more
   ``(B, N, H * D)`` 16-bit tensor written by the forward, kept and read once by the backward. The same kernel
   writes ``L log2 e`` (``(B, H, N)`` float32), the exponent's units, so the loops below subtract it in the
   exponent's FFMA instead of multiplying every loaded L by log2 e (the dK/dV loop did so once per query column
   and thread: 0.5 instruction per score);
2. dK, dV: one program per (key block of BLOCK_N, b, h); it loops over every query block, recomputes
   ``P^T = 2^(k q^T * scale * log2 e - L log2 e)`` from ``L log2 e`` and accumulates ``dV += P^T dO`` and
   ``dK += dS^T Q`` in registers; each dK/dV row is written once, by its owner;
3. dQ: one program per (query block, b, h); loops over every key block and accumulates ``dQ += dS K``.

Per score, float16/bfloat16: 7 matmuls (dK/dV: ``K Q^T``, ``V dO^T``, ``P^T dO``, ``dS^T Q``; dQ: ``Q K^T``,
``dO V^T``, ``dS K``) and 2 exp2 (P, once in each kernel); flash attention 2 has 5 and 1, its dQ accumulated by
float32 atomic adds from the dK/dV program. The 2 matmuls and 1 exp2 above that are the dQ kernel's recomputation of
S, P and dP, kept for gradients that are bit-reproducible (atomic adds commit in no fixed order) without scratch
memory. The deterministic alternatives, on paper at the headline shapes (B = 256, H = 7, N = 401, D = 32: 288 M
scores per layer; H100 SXM, 3.35 TB/s nominal HBM3): dS written by the dK/dV kernel and read by a dQ GEMM, 2 B per
score, 576 MB written and read again per layer, about 0.34 ms of traffic alone; or float32 dQ partials per key
block, ``cdiv(N, 64) * N * D * 4`` B per head, 644 MB written and read by a reduction pass. The recomputation costs
about 0.07-0.16 ms there: the dQ loop's 6.8-16.0 SASS instructions per score per thread (above) issued at 4 warp
instructions per clock per SM (132 SMs, 1.75 GHz), its exp2 (16 per clock per SM: 0.08 ms) overlapping; its 3
matmuls are 55 GFLOP. None of this is measured yet.

float32, two launches, dQ first. P recomputed from a float32 L sums to ``1 + O(2^-24 |L|)`` per row, not to 1, and
``rowsum(dS) = delta * (1 - rowsum(P))`` is then no longer 0: with keys or values that share an offset it made dQ
and dK 2-3x less accurate than the float32 reference. So the dQ kernel first streams over the key blocks once
for ``r = 1 / rowsum(P)`` and ``delta = r * rowsum(P * dP)`` (two more matmuls per tile pair, 9 in all), stores
both ``(B, H, N)`` and multiplies every P by r; the dK/dV kernel reads them. No delta kernel runs; ``out_lo`` is
not needed (O is float32). r is correctly rounded (``tl.div_rn``, once per query row): ``rowsum(dS) = delta * (1 -
rowsum(r P))`` takes delta times r's error, and with the GPU's approximate division (about 2 ulp) two keys sharing
an offset (delta ~28) put dQ at 1.6x the rule's bound.

Masking: keys past N score -inf (forward) or get P = 0 (backward, a padded query row loads L = +inf, so its P
is 0); padded query rows are computed and never written. Full key/query blocks run an unmasked loop; only the
last, partial block is masked.

Limits
------
* head dim D: a multiple of 16 up to 128 (16, 32, ..., 128); anything else raises ValueError. D that is not a
  power of two (48, 80, 96, 112) runs in a register tile of the next power of two with the extra columns masked
  (zeros in, never written); 16, 32, 64 and 128 run unpadded.
* dtypes: float16, bfloat16, float32 (all tensors of a call the same dtype; L, delta and r are float32).
  Matmuls accumulate in float32; P and dS are rounded to the input dtype before their matmul (as in flash
  attention). float32 runs its matmuls with ``tl.dot(..., input_precision="ieee")``: true float32 products, never
  TF32 (whatever ``torch.backends.cuda.matmul.allow_tf32`` says), so it matches a float32 reference. Triton lowers
  ieee float32 dots to FMA loops, not tensor cores: float32 uses its own smaller tiles and is the accurate path,
  several times slower than float16/bfloat16. (``input_precision`` is ignored for 16-bit operands.)
* any N >= 1 (B = 0 or N = 0 returns empty results without a launch); non-causal, no dropout, no mask input.
* offsets: the per-batch/per-head base offset is always 64-bit; the in-tile offsets are 32-bit unless one batch
  element of a tensor spans 2**31 elements or more, in which case a 64-bit specialisation (IDX64) is compiled.
* devices: CUDA; CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported),
  which cannot run bfloat16 ``tl.dot`` correctly, so bfloat16 is refused there.
* plain pointer arithmetic with masks (no block pointers / tensor descriptors), only Triton APIs present in both
  3.6 and 3.9 (``tl.dot(a, b, acc, input_precision=...)``, ``triton.autotune`` with ``early_config_prune``).

Tuning
------
Each kernel but the (memory-bound, fixed-config) delta kernel is tuned by this module's ``TUNER`` (the package's
one autotuner, ``kernels/tuning.py``, shared with the block GEMMs) keyed on ``(kernel, N_BUCKET, H, HEAD_DIM,
dtype[, WRITE_LO], device)``, where ``N_BUCKET = next_power_of_2(N)``: a new batch size, or another N in the same
bucket, reuses the tuned config (kept on disk too, ``AUTOTUNE_CACHE``, so a later process on the same GPU model and
software loads it). Tuning times kernels, which must not happen inside CUDA-graph capture: while the current stream
is capturing, the launchers use the config already tuned for that key in this process or, if none, a fixed default
config. Warm up (run once) before capturing to get the tuned config (and to compile outside the capture); the
tuner's timed launches are the same raw launches, so they compile what a capture will launch. ``config=`` on the
launchers (or ``AUTOTUNE = False`` / ``CROSSVIT_FAST_AUTOTUNE=0``, or a ``kernels.tuning.pinned()`` block: the one
switch this module and the block GEMMs' share) bypasses tuning; under the CPU interpreter a fixed tile is used
(16 x 16 below N = 128, 64 x 64 from there).
The candidate tiles (``_TILES_16`` for float16/bfloat16, ``_TILES_32`` for float32) are filtered per call by
:func:`candidates`: the dtype's set, minus, for 16-bit 128-wide register tiles, the larger tiles and two
that spill 8 B (``_SPILL_16_D128``), and for 16-bit 64-wide the one forward tile that spills there
(``_SPILL_16_D64``: 128 x 64, 4 warps); for float32 register tiles of 64 or more columns only the 8-warp 512-element
tiles of ``_TILES_32_WIDE`` (the others spill 100-340 B there), and at 128 columns the one 16 x 16, 8-warp tile of
``_TILES_32_D128`` (the least spill there: 0 / 248 / 204 B of stores in fwd / dkdv / dq, against 0.6-3.4 KB
before dq's first pass). Every candidate is compiled for sm_90 ahead of time by
``tests/sm90_compile.py`` (CI: ``tests/test_sm90_compile.py``).

Grid: 1-D, ``cdiv(N, BLOCK) * B * H`` programs with the block index fastest, so the programs of one (b, h) run
side by side and share that head's K/V (or Q/dO) in L2; 1-D avoids the 65535 limit of grid axes 1 and 2.

Registers, spills and shared memory per config as sm_90 compiles them (a static reading): docs/sm90.md.

"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from crossvit_fast.config import FUSED_DTYPES, SELF_ATTENTION_HEAD_DIMS, autotune_cache_from_env, autotune_from_env
from crossvit_fast.config import TRITON_FP_FUSION as FP_FUSION, interpreter_runs_bf16
from crossvit_fast.kernels import tuning

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_DTYPES",
    "AUTOTUNE",
    "self_attention_fwd",
    "self_attention_bwd",
    "check_self_attention_inputs",
    "fwd_configs",
    "bwd_configs",
    "candidates",
    "tuned_configs",
]

SUPPORTED_HEAD_DIMS = SELF_ATTENTION_HEAD_DIMS
SUPPORTED_DTYPES = tuple(getattr(torch, n) for n in FUSED_DTYPES)

AUTOTUNE = autotune_from_env()
"""Module switch (CUDA only): False never autotunes; a launch takes the config already tuned for its key, if any,
else the fixed default."""

COMPILE_ONLY = False
"""Set only by ``tests/sm90_compile.py`` (ahead-of-time sm_90 compiles under a Triton driver that compiles and never
launches): CPU tensors then pass the device check, so the real launchers pick and compile their GPU configs."""

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, n_rows, cols, stride_row, stride_col,
               HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (len(rows), BLOCK_D) tile of ``base[row * stride_row + col * stride_col]``; masked rows/columns read 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if MASK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, x, rows, n_rows, cols, stride_row, stride_col, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def _exp_units(x, DOT_PRECISION: tl.constexpr):
    """exp of a score difference in the kernels' units: natural for float32 (log2(e) applied here, to the small
    difference), log2 for 16-bit (exp2 directly). Every P of forward and backward goes through it."""
    if DOT_PRECISION == "ieee":
        return tl.math.exp2(x * 1.4426950408889634)
    return tl.math.exp2(x)


@triton.jit
def _program_bh(N, H, BLOCK_OWN: tl.constexpr):
    """This program's ``(pid_own, bh, b, h)`` on the 1-D grid ``(cdiv(N, BLOCK_OWN) * B * H,)``, row block fastest:
    ``pid_own`` the block of BLOCK_OWN rows it owns; b and h 64-bit."""
    num_blocks = tl.cdiv(N, BLOCK_OWN)
    pid = tl.program_id(0)
    pid_own = pid % num_blocks
    bh = pid // num_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return pid_own, bh, b, h


@triton.jit
def _tile_offsets(pid_own, BLOCK_OWN: tl.constexpr, BLOCK_STEP: tl.constexpr, BLOCK_D: tl.constexpr,
                  IDX64: tl.constexpr):
    """``(offs_own, offs_step, offs_d)``: the BLOCK_OWN rows the program owns, the BLOCK_STEP rows of a block it
    steps over, the head-dim columns (IDX64: the row and column offsets 64-bit)."""
    offs_own = pid_own * BLOCK_OWN + tl.arange(0, BLOCK_OWN)
    offs_step = tl.arange(0, BLOCK_STEP)
    offs_d = tl.arange(0, BLOCK_D)
    if IDX64:
        offs_own = offs_own.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    return offs_own, offs_step, offs_d


@triton.jit
def _qkv_bases(QKV, b, h, stride_qb, stride_qc, stride_qpart, HEAD_DIM: tl.constexpr):
    """Bases of head h of batch b in ``qkv``'s q, k and v parts."""
    q_base = QKV + b * stride_qb + h * HEAD_DIM * stride_qc
    k_base = q_base + stride_qpart
    v_base = k_base + stride_qpart
    return q_base, k_base, v_base


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, ones, k_base, v_base, start_n, N, offs_n, offs_d, stride_n, stride_c, qk_scale,
                   HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                   IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = start_n + offs_n
    if IDX64:
        rows = rows.to(tl.int64)
    k = _load_tile(k_base, rows, N, offs_d, stride_n, stride_c, HEAD_DIM, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    if DOT_PRECISION == "ieee":  # float32: the scores scaled first, natural units
        s = s * qk_scale
        if MASK_N:
            s = tl.where(rows[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        x = s - m_new[:, None]
    elif MASK_N:  # 16-bit: s unscaled, qk_scale >= 0 applied in the exponent's FFMA
        valid = rows[None, :] < N
        m_new = tl.maximum(m_i, tl.max(tl.where(valid, s, float("-inf")), 1) * qk_scale)
        x = tl.where(valid, s * qk_scale - m_new[:, None], float("-inf"))
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        x = s * qk_scale - m_new[:, None]
    p = _exp_units(x, DOT_PRECISION)
    alpha = _exp_units(m_i - m_new, DOT_PRECISION)
    v = _load_tile(v_base, rows, N, offs_d, stride_n, stride_c, HEAD_DIM, MASK_N, EVEN_D)
    acc = acc * alpha[:, None]
    if DOT_PRECISION == "ieee":  # float32: p is the dot's operand unrounded
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    else:
        p_in = p.to(k.dtype)
        l_i = tl.dot(p_in, ones, l_i * alpha[:, None], input_precision=DOT_PRECISION)
        acc = tl.dot(p_in, v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    QKV, O, O_LO, LSE,
    stride_qb, stride_qn, stride_qc, stride_qpart,
    stride_ob, stride_on, stride_oc,
    stride_lob, stride_lon, stride_loc,
    N, H, N_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_LO: tl.constexpr,
):
    """O, LSE (and with WRITE_LO the rounding residual O_LO = O_fp32 - O) of one (query block, b, h).
    Grid: (cdiv(N, BLOCK_M) * B * H,), query block fastest."""
    pid_m, bh, b, h = _program_bh(N, H, BLOCK_M)
    q_base, k_base, v_base = _qkv_bases(QKV, b, h, stride_qb, stride_qc, stride_qpart, HEAD_DIM)
    o_base = O + b * stride_ob + h * HEAD_DIM * stride_oc
    offs_m, offs_n, offs_d = _tile_offsets(pid_m, BLOCK_M, BLOCK_N, BLOCK_D, IDX64)

    q = _load_tile(q_base, offs_m, N, offs_d, stride_qn, stride_qc, HEAD_DIM, True, EVEN_D)
    if DOT_PRECISION != "ieee":  # the row maximum of s * qk_scale is that of s times qk_scale >= 0
        q = tl.where(qk_scale < 0, -q, q)
        qk_scale = tl.abs(qk_scale)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if DOT_PRECISION == "ieee":
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    ones = (tl.arange(0, 16)[None, :] == 0).to(q.dtype) + tl.zeros([BLOCK_N, 16], dtype=q.dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, ones, k_base, v_base, start_n, N, offs_n, offs_d,
                                       stride_qn, stride_qc, qk_scale,
                                       HEAD_DIM, False, EVEN_D, IDX64, DOT_PRECISION)
    if n_full < N:
        acc, l_i, m_i = _fwd_key_block(acc, l_i, m_i, q, ones, k_base, v_base, n_full, N, offs_n, offs_d,
                                       stride_qn, stride_qc, qk_scale,
                                       HEAD_DIM, True, EVEN_D, IDX64, DOT_PRECISION)
    if DOT_PRECISION != "ieee":
        l_i = tl.sum(l_i, 1)

    acc = acc / l_i[:, None]
    o = acc.to(O.dtype.element_ty)
    _store_tile(o_base, o, offs_m, N, offs_d, stride_on, stride_oc, HEAD_DIM, EVEN_D)
    if WRITE_LO:
        _store_tile(O_LO + b * stride_lob + h * HEAD_DIM * stride_loc, (acc - o.to(tl.float32)).to(O.dtype.element_ty),
                    offs_m, N, offs_d, stride_lon, stride_loc, HEAD_DIM, EVEN_D)
    if DOT_PRECISION == "ieee":
        lse = m_i + tl.math.log2(l_i) * 0.6931471805599453
    else:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=offs_m < N)


@triton.jit
def _attn_bwd_delta_kernel(
    O, O_LO, DO, DELTA, LSE, LSE2,
    stride_ob, stride_on, stride_oc,
    stride_lob, stride_lon, stride_loc,
    stride_dob, stride_don, stride_doc,
    N, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, IDX64: tl.constexpr,
    HAS_LO: tl.constexpr,
):
    """delta = rowsum(dO * (O + O_LO)) (O_LO only with HAS_LO) and LSE2 = LSE * log2(e), the log-sum-exp in the
    exponent's units the dK/dV and dQ kernels read, both (B, H, N) float32. Grid: (cdiv(N, BLOCK_M) * B * H,)."""
    pid_m, bh, b, h = _program_bh(N, H, BLOCK_M)
    offs_m, _, offs_d = _tile_offsets(pid_m, BLOCK_M, BLOCK_M, BLOCK_D, IDX64)
    o = _load_tile(O + b * stride_ob + h * HEAD_DIM * stride_oc, offs_m, N, offs_d, stride_on, stride_oc,
                   HEAD_DIM, True, EVEN_D)
    do = _load_tile(DO + b * stride_dob + h * HEAD_DIM * stride_doc, offs_m, N, offs_d, stride_don, stride_doc,
                    HEAD_DIM, True, EVEN_D)
    o = o.to(tl.float32)
    if HAS_LO:
        o += _load_tile(O_LO + b * stride_lob + h * HEAD_DIM * stride_loc, offs_m, N, offs_d, stride_lon, stride_loc,
                        HEAD_DIM, True, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)
    lse = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    tl.store(LSE2 + bh.to(tl.int64) * N + offs_m, lse * 1.4426950408889634, mask=offs_m < N)


@triton.jit
def _bwd_dkdv_query_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rnorm_base, start_m, N, offs_m,
                          offs_d, stride_qn, stride_qc, stride_don, stride_doc, qk_scale,
                          HEAD_DIM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                          IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = start_m + offs_m
    if IDX64:
        rows = rows.to(tl.int64)
    q = _load_tile(q_base, rows, N, offs_d, stride_qn, stride_qc, HEAD_DIM, MASK_M, EVEN_D)
    do = _load_tile(do_base, rows, N, offs_d, stride_don, stride_doc, HEAD_DIM, MASK_M, EVEN_D)
    if MASK_M:
        lse = tl.load(lse_base + rows, mask=rows < N, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    p_t = _exp_units(s_t * qk_scale - lse[None, :], DOT_PRECISION)  # lse in the exponent's units
    if DOT_PRECISION == "ieee":  # float32: P renormalised by the dQ kernel's r
        if MASK_M:
            rnorm = tl.load(rnorm_base + rows, mask=rows < N, other=0.0)
        else:
            rnorm = tl.load(rnorm_base + rows)
        p_t = p_t * rnorm[None, :]
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, DO, LSE, DELTA, RNORM, DQKV,
    stride_qb, stride_qn, stride_qc, stride_qpart,
    stride_dob, stride_don, stride_doc,
    stride_gb, stride_gn, stride_gc, stride_gpart,
    N, H, N_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one (key block, b, h), written into DQKV's k and v parts. Grid: (cdiv(N, BLOCK_N) * B * H,)."""
    pid_n, bh, b, h = _program_bh(N, H, BLOCK_N)
    q_base, k_base, v_base = _qkv_bases(QKV, b, h, stride_qb, stride_qc, stride_qpart, HEAD_DIM)
    do_base = DO + b * stride_dob + h * HEAD_DIM * stride_doc
    lse_base = LSE + bh.to(tl.int64) * N
    rnorm_base = RNORM + bh.to(tl.int64) * N
    delta_base = DELTA + bh.to(tl.int64) * N
    dk_base = DQKV + b * stride_gb + h * HEAD_DIM * stride_gc + stride_gpart
    dv_base = dk_base + stride_gpart
    offs_n, offs_m, offs_d = _tile_offsets(pid_n, BLOCK_N, BLOCK_M, BLOCK_D, IDX64)

    k = _load_tile(k_base, offs_n, N, offs_d, stride_qn, stride_qc, HEAD_DIM, True, EVEN_D)
    v = _load_tile(v_base, offs_n, N, offs_d, stride_qn, stride_qc, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _bwd_dkdv_query_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rnorm_base, start_m,
                                       N, offs_m, offs_d, stride_qn, stride_qc, stride_don, stride_doc, qk_scale,
                                       HEAD_DIM, False, EVEN_D, IDX64, DOT_PRECISION)
    if m_full < N:
        dk, dv = _bwd_dkdv_query_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, rnorm_base, m_full,
                                       N, offs_m, offs_d, stride_qn, stride_qc, stride_don, stride_doc, qk_scale,
                                       HEAD_DIM, True, EVEN_D, IDX64, DOT_PRECISION)

    dk = dk * sm_scale
    _store_tile(dk_base, dk.to(DQKV.dtype.element_ty), offs_n, N, offs_d, stride_gn, stride_gc, HEAD_DIM, EVEN_D)
    _store_tile(dv_base, dv.to(DQKV.dtype.element_ty), offs_n, N, offs_d, stride_gn, stride_gc, HEAD_DIM, EVEN_D)


@triton.jit
def _bwd_dq_key_block(dq, q, do, lse2, rnorm, delta, k_base, v_base, start_n, N, offs_n, offs_d, stride_qn, stride_qc,
                      qk_scale, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                      IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr):
    rows = start_n + offs_n
    if IDX64:
        rows = rows.to(tl.int64)
    k = _load_tile(k_base, rows, N, offs_d, stride_qn, stride_qc, HEAD_DIM, MASK_N, EVEN_D)
    v = _load_tile(v_base, rows, N, offs_d, stride_qn, stride_qc, HEAD_DIM, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    p = _exp_units(s * qk_scale - lse2[:, None], DOT_PRECISION)
    if DOT_PRECISION == "ieee":
        p = p * rnorm[:, None]
    if MASK_N:
        p = tl.where(rows[None, :] < N, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_delta_key_block(delta, psum, q, do, lse2, k_base, v_base, start_n, N, offs_n, offs_d, stride_qn, stride_qc,
                         qk_scale, HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                         IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """delta += rowsum(P * dP) over one key block, P recomputed as the gradient's blocks recompute it."""
    rows = start_n + offs_n
    if IDX64:
        rows = rows.to(tl.int64)
    k = _load_tile(k_base, rows, N, offs_d, stride_qn, stride_qc, HEAD_DIM, MASK_N, EVEN_D)
    v = _load_tile(v_base, rows, N, offs_d, stride_qn, stride_qc, HEAD_DIM, MASK_N, EVEN_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    p = _exp_units(s * qk_scale - lse2[:, None], DOT_PRECISION)
    if MASK_N:
        p = tl.where(rows[None, :] < N, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
    return delta + tl.sum(p * dp, 1), psum + tl.sum(p, 1)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, DO, LSE, DELTA, RNORM, DQKV,
    stride_qb, stride_qn, stride_qc, stride_qpart,
    stride_dob, stride_don, stride_doc,
    stride_gb, stride_gn, stride_gc, stride_gpart,
    N, H, N_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IDX64: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of one (query block, b, h), written into DQKV's q part; float32 first also writes the block's delta and
    r = 1 / rowsum(P) into DELTA and RNORM, which the dK/dV kernel (launched after it) reads.
    Grid: (cdiv(N, BLOCK_M) * B * H,)."""
    pid_m, bh, b, h = _program_bh(N, H, BLOCK_M)
    q_base, k_base, v_base = _qkv_bases(QKV, b, h, stride_qb, stride_qc, stride_qpart, HEAD_DIM)
    do_base = DO + b * stride_dob + h * HEAD_DIM * stride_doc
    dq_base = DQKV + b * stride_gb + h * HEAD_DIM * stride_gc
    offs_m, offs_n, offs_d = _tile_offsets(pid_m, BLOCK_M, BLOCK_N, BLOCK_D, IDX64)

    q = _load_tile(q_base, offs_m, N, offs_d, stride_qn, stride_qc, HEAD_DIM, True, EVEN_D)
    do = _load_tile(do_base, offs_m, N, offs_d, stride_don, stride_doc, HEAD_DIM, True, EVEN_D)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=float("inf"))  # exponent's units
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N // BLOCK_N) * BLOCK_N
    rnorm = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if DOT_PRECISION == "ieee":  # float32: P renormalised and delta = rowsum(P * dP) from that P (header)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        psum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, n_full, BLOCK_N):
            delta, psum = _bwd_delta_key_block(delta, psum, q, do, lse2, k_base, v_base, start_n, N, offs_n, offs_d,
                                               stride_qn, stride_qc, qk_scale, HEAD_DIM, False, EVEN_D, IDX64,
                                               DOT_PRECISION)
        if n_full < N:
            delta, psum = _bwd_delta_key_block(delta, psum, q, do, lse2, k_base, v_base, n_full, N, offs_n, offs_d,
                                               stride_qn, stride_qc, qk_scale, HEAD_DIM, True, EVEN_D, IDX64,
                                               DOT_PRECISION)
        rnorm = tl.where(offs_m < N, tl.div_rn(tl.zeros_like(psum) + 1.0, tl.where(offs_m < N, psum, 1.0)), 0.0)
        delta = delta * rnorm
        tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)
        tl.store(RNORM + bh.to(tl.int64) * N + offs_m, rnorm, mask=offs_m < N)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    for start_n in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_key_block(dq, q, do, lse2, rnorm, delta, k_base, v_base, start_n, N, offs_n, offs_d,
                               stride_qn, stride_qc, qk_scale, HEAD_DIM, False, EVEN_D, IDX64, DOT_PRECISION)
    if n_full < N:
        dq = _bwd_dq_key_block(dq, q, do, lse2, rnorm, delta, k_base, v_base, n_full, N, offs_n, offs_d,
                               stride_qn, stride_qc, qk_scale, HEAD_DIM, True, EVEN_D, IDX64, DOT_PRECISION)

    dq = dq * sm_scale
    _store_tile(dq_base, dq.to(DQKV.dtype.element_ty), offs_m, N, offs_d, stride_gn, stride_gc, HEAD_DIM, EVEN_D)


# --------------------------------------------------------------------------------------------------------------
# Configs and autotuning
# --------------------------------------------------------------------------------------------------------------

# Tiles as (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M counts query rows and BLOCK_N keys in every kernel:
# fwd and dQ hold BLOCK_M query rows per program and step over keys by BLOCK_N; dK/dV holds BLOCK_N keys per
# program and steps over queries by BLOCK_M. The 16-bit sets run on tensor cores (wgmma on Hopper); the float32
# sets are for input_precision="ieee", which Triton lowers to FMA loops whose register appetite is much larger,
# hence smaller tiles. Chosen from sm_90 compiles (registers/spills) of every config at D = 32, 64, 128.
_TILES_16 = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3),
            (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2)],
    "dkdv": [(32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 3), (32, 128, 8, 2), (64, 128, 8, 2)],
    "dq": [(64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 16, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2)],
}
_TILES_32 = {
    "fwd": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (64, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    "dkdv": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 32, 8, 2)],
    "dq": [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2), (16, 32, 8, 2)],
}
# The float32 subset for register tiles of 64 or more columns (head dims 48..128), where the other float32 tiles
# spill 100-340 B: 8 warps on 512-element tiles do not spill in the forward and spill least in the backward.
_TILES_32_WIDE = {
    "fwd": [(16, 32, 8, 2), (32, 16, 8, 2)],
    "dkdv": [(16, 32, 8, 2)],
    "dq": [(16, 32, 8, 2)],
}
# 16-bit tiles that pass the rule above at 128-wide heads but spill 8 B there (sm_90, triton 3.6.0)
# float32 at head dim 128 (beyond the family): the only tile that neither spills kilobytes nor runs out of registers
# (sm_90, triton 3.6 / 3.9: fwd 0 B, dkdv 248+248 / 264+264 B, dq 204+396 / 220+428 B with its first pass over the keys,
# 168+168 / 184+184 B without; every other 8-, 4- and 16-warp tile tried, before that pass, spilled 600-3400 B there)
_TILES_32_D128 = {"fwd": [(16, 16, 8, 2)], "dkdv": [(16, 16, 8, 2)], "dq": [(16, 16, 8, 2)]}
_SPILL_16_D128 = {"fwd": {(128, 32, 4, 3)}, "dkdv": {(32, 64, 4, 3)}, "dq": set()}
# 128 x 64, 4 warps at 64 columns: bfloat16 255 registers + 8 B before the forward's tensor-core row sum; with it,
# float16 255 + 88 B (triton 3.9; 243 registers, none, with 3.6)
_SPILL_16_D64 = {"fwd": {(128, 64, 4, 3)}, "dkdv": set(), "dq": set()}
_DEFAULTS_16 = {"fwd": (128, 64, 8, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
_DEFAULTS_32 = {"fwd": (32, 32, 8, 2), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 8, 2)}
_DEFAULTS_32_WIDE = {"fwd": (16, 32, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (16, 32, 8, 2)}
# Under the interpreter every program instance costs tens of ms: small tiles for short sequences (so tests walk
# several blocks and ragged tails), 64 x 64 from N = 128 on (5x fewer instances on the family's lengths).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
_INTERPRETER_CONFIG_LONG = {"BLOCK_M": 64, "BLOCK_N": 64}
_DELTA_BLOCK_M = 64


def _as_config(t) -> triton.Config:
    bm, bn, w, s = t
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _tile(c: triton.Config) -> Tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _all_tiles(name: str):
    tiles = _TILES_16[name] + _TILES_32[name] + _TILES_32_D128[name]
    return list(dict.fromkeys(tiles))


def _tiles_32(block_d: int) -> Dict[str, list]:
    """float32's candidate tiles at a register tile width."""
    return _TILES_32_D128 if block_d >= 128 else _TILES_32_WIDE if block_d >= 64 else _TILES_32


def _defaults(name: str, fp32: bool, block_d: int) -> Tuple[int, int, int, int]:
    if not fp32:
        return _DEFAULTS_16[name]
    return _TILES_32_D128[name][0] if block_d >= 128 else (_DEFAULTS_32_WIDE if block_d >= 64 else _DEFAULTS_32)[name]


def fwd_configs():
    """Every forward config the autotuner may pick (16-bit and float32 sets), as ``triton.Config``."""
    return [_as_config(t) for t in _all_tiles("fwd")]


def bwd_configs():
    """``{"dkdv": [...], "dq": [...]}``: every backward config the autotuner may pick."""
    return {name: [_as_config(t) for t in _all_tiles(name)] for name in ("dkdv", "dq")}


def candidates(name: str, dtype: torch.dtype, block_d: int) -> List[Tuple[int, int, int, int]]:
    """The tiles ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` the autotuner times for kernel ``name`` at this dtype
    and register tile width: the dtype's set (float32: by width); for 128-wide 16-bit tiles, no large tile and none
    that spills; for 16-bit 64-wide, not the forward tile that spills there. Never empty (else the default)."""
    fp32 = dtype == torch.float32
    allowed = set(_tiles_32(block_d)[name]) if fp32 else set(_TILES_16[name])
    keep = []
    for t in _all_tiles(name):
        bm, bn, w, _ = t
        if t not in allowed:
            continue
        if not fp32 and block_d >= 128:
            if bm * bn > 128 * 64 or (w == 4 and bm * bn > 64 * 64) or (name == "dkdv" and bm > 32):
                continue
            if t in _SPILL_16_D128[name]:
                continue
        if not fp32 and block_d == 64 and t in _SPILL_16_D64[name]:
            continue
        keep.append(t)
    return keep or [_defaults(name, fp32, block_d)]


AUTOTUNE_CACHE = autotune_cache_from_env()
"""Module switch (CUDA only): True keeps each pick on disk too (:class:`~crossvit_fast.kernels.tuning.Tuner`), so a
later process loads it instead of timing the candidates; ``CROSSVIT_FAST_AUTOTUNE_CACHE=0`` sets it False."""

_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}

TUNER = tuning.Tuner("self_attention", lambda: tuple(_KERNELS.values()))
"""This module's autotuner (the one :class:`~crossvit_fast.kernels.tuning.Tuner` class, shared with the block
GEMMs). Keys: ``(kernel, N_BUCKET, H, HEAD_DIM, dtype[, WRITE_LO], device index)``."""


def tuned_configs() -> Dict[tuple, Tuple[int, int, int, int]]:
    """A copy of what the autotuner picked so far (key -> ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``)."""
    return TUNER.picks()


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(_attn_fwd_kernel, InterpretedFunction)


_INTERPRETED = _interpreted()


def _launch(name: str, grid, args, meta, tune_key: tuple, device: torch.device, config: Optional[Dict]) -> None:
    """Launch kernel ``name``: an explicit ``config`` dict, the interpreter's tile, else through :data:`TUNER`
    (compile-only: every candidate; else the tuned, remembered or default tile). ``tune_key``: ``(N_BUCKET, H,
    HEAD_DIM, dtype[, WRITE_LO])``."""
    raw = _KERNELS[name]
    if config is None and _INTERPRETED:
        config = _INTERPRETER_CONFIG_LONG if tune_key[0] >= 128 else _INTERPRETER_CONFIG
    if config is not None:
        raw[grid](*args, **meta, **config, enable_fp_fusion=FP_FUSION)
        return

    def launch(tile):
        bm, bn, w, s = tile
        raw[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, enable_fp_fusion=FP_FUSION)

    dtype, block_d = tune_key[3], meta["BLOCK_D"]
    TUNER.dispatch(launch, config=None, interpreted=None, compile_only=COMPILE_ONLY, enabled=AUTOTUNE,
                   disk_cache=AUTOTUNE_CACHE, key_of=lambda: (name,) + tuple(tune_key) + (device.index,),
                   default_of=lambda: _defaults(name, dtype == torch.float32, block_d),
                   candidates=lambda: candidates(name, dtype, block_d), device=device, may_tune=lambda: True)


# --------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------


def _device_of(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device), whatever the current device is."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _span(t: torch.Tensor) -> int:
    """Largest in-tile element offset of one batch element of ``t`` (dims 1..)."""
    return sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))


def _check_tensor(name: str, t, dtype: torch.dtype, device: torch.device, shape: Tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"self_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"self_attention: {name} has dtype {t.dtype}, expected {dtype} (the dtype of qkv): "
                        "all tensors of one call must share a dtype")
    if t.device != device:
        raise ValueError(f"self_attention: {name} is on {t.device}, expected {device} (the device of qkv)")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"self_attention: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def check_self_attention_inputs(qkv, num_heads, scale=None) -> Tuple[int, int, int, int, float]:
    """Validate ``qkv``/``num_heads``/``scale`` for the kernels; returns ``(B, N, H, D, scale)``.

    Raises:
        TypeError: qkv is not a tensor, has an unsupported dtype, or num_heads/scale have a wrong type.
        ValueError: wrong rank or last dimension, unsupported head dim, or a device the kernels cannot run on.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"self_attention: qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"self_attention: num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"self_attention: num_heads must be >= 1, got {num_heads}")
    if qkv.dim() != 3:
        raise ValueError(f"self_attention: qkv must be 3-D (B, N, 3 * num_heads * head_dim), got shape "
                         f"{tuple(qkv.shape)}")
    B, N, C3 = qkv.shape
    if C3 % (3 * num_heads) != 0:
        raise ValueError(f"self_attention: qkv's last dimension {C3} is not 3 * num_heads * head_dim for "
                         f"num_heads={num_heads} (it must be divisible by {3 * num_heads})")
    D = C3 // (3 * num_heads)
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"self_attention: head_dim {D} (= {C3} / (3 * {num_heads})) is not supported; expected a "
                         f"multiple of 16 up to 128: {SUPPORTED_HEAD_DIMS}")
    if qkv.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"self_attention: qkv has dtype {qkv.dtype}; expected one of float16, bfloat16, float32")
    if qkv.device.type == "cuda" or (qkv.device.type == "cpu" and COMPILE_ONLY and not _INTERPRETED):
        pass
    elif qkv.device.type == "cpu" and _INTERPRETED:
        if qkv.dtype == torch.bfloat16 and not interpreter_runs_bf16():
            raise TypeError("self_attention: bfloat16 is not supported under Triton's CPU interpreter (its tl.dot "
                            "gives wrong bfloat16 results); use float16/float32 on CPU, or a CUDA device")
    elif qkv.device.type == "cpu":
        raise ValueError("self_attention: qkv is on the CPU, but the Triton kernels need a CUDA device (CPU runs "
                         "only under Triton's interpreter, TRITON_INTERPRET=1 set before "
                         "crossvit_fast.kernels.self_attention is imported)")
    else:
        raise ValueError(f"self_attention: qkv is on {qkv.device}; expected a CUDA device")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"self_attention: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"self_attention: scale must be finite, got {scale}")
    return B, N, num_heads, D, scale


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _exponent_scale(scale: float, dtype: torch.dtype) -> float:
    """The kernels' ``qk_scale``: scores in natural units for float32, in log2 units (exp2 directly) otherwise."""
    return scale if dtype == torch.float32 else scale * _LOG2E


def _common_meta(D: int, dtype: torch.dtype, idx64: bool) -> Dict[str, object]:
    return {"HEAD_DIM": D, "BLOCK_D": _next_pow2(D), "EVEN_D": D == _next_pow2(D),
            "IDX64": idx64,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def self_attention_fwd(
    qkv: torch.Tensor,
    num_heads: int,
    scale: Optional[float] = None,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    out_lo: Optional[torch.Tensor] = None,
    config: Optional[Dict[str, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out, lse)`` with ``out`` ``(B, N, H * D)`` in qkv's dtype and ``lse`` ``(B, H, N)`` float32.

    Args:
        qkv: ``(B, N, 3 * H * D)`` ``[q | k | v]``, head-major; any strides.
        num_heads: H.
        scale: score scale, default ``D ** -0.5``.
        out: optional preallocated output (any strides); lse: optional preallocated contiguous float32 LSE.
        out_lo: optional ``(B, N, H * D)`` tensor in qkv's dtype (any strides) that receives the rounding residual
            ``O_fp32 - out``; handed to :func:`self_attention_bwd`, it makes ``delta`` exact (see the header).
        config: explicit ``{"BLOCK_M", "BLOCK_N"[, "num_warps", "num_stages"]}``, bypassing autotuning.
    """
    B, N, H, D, scale = check_self_attention_inputs(qkv, num_heads, scale)
    if out is None:
        out = torch.empty((B, N, H * D), dtype=qkv.dtype, device=qkv.device)
    else:
        _check_tensor("out", out, qkv.dtype, qkv.device, (B, N, H * D))
    if out_lo is not None:
        _check_tensor("out_lo", out_lo, qkv.dtype, qkv.device, (B, N, H * D))
    if lse is None:
        lse = torch.empty((B, H, N), dtype=torch.float32, device=qkv.device)
    else:
        _check_tensor("lse", lse, torch.float32, qkv.device, (B, H, N))
        if not lse.is_contiguous():
            raise ValueError("self_attention: lse must be contiguous")
    if B == 0 or N == 0:
        return out, lse
    lo = out if out_lo is None else out_lo
    idx64 = max(_span(qkv), _span(out), _span(lo)) > _INT32_MAX
    meta = {**_common_meta(D, qkv.dtype, idx64), "WRITE_LO": out_lo is not None}
    n_bucket = _next_pow2(N)
    args = (qkv, out, lo, lse, *qkv.stride(), H * D * qkv.stride(2), *out.stride(), *lo.stride(), N, H, n_bucket,
            _exponent_scale(scale, qkv.dtype))

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_M"]) * B * H,)

    with _device_of(qkv):
        _launch("fwd", grid, args, meta, (n_bucket, H, D, qkv.dtype, out_lo is not None), qkv.device, config)
    return out, lse


def self_attention_bwd(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    scale: Optional[float] = None,
    *,
    dqkv: Optional[torch.Tensor] = None,
    out_lo: Optional[torch.Tensor] = None,
    config: Optional[Dict[str, int]] = None,
) -> torch.Tensor:
    """Backward: ``dqkv`` ``(B, N, 3 * H * D)`` in qkv's dtype, from ``dout`` ``(B, N, H * D)``.

    ``out`` and ``lse`` are the forward's results for the same ``qkv``/``num_heads``/``scale``; ``out_lo``, if
    given, the residual the forward wrote into its ``out_lo`` (``delta`` then reads ``out + out_lo``, not the
    rounded ``out``; float32 ignores it: its delta comes from P and dP, see the header). ``dqkv`` may be
    preallocated (any strides); every element is written. ``config`` (``BLOCK_M``, ``BLOCK_N``, optional
    ``num_warps``/``num_stages``) applies to both the dK/dV and the dQ kernel, bypassing autotuning.
    """
    B, N, H, D, scale = check_self_attention_inputs(qkv, num_heads, scale)
    _check_tensor("dout", dout, qkv.dtype, qkv.device, (B, N, H * D))
    _check_tensor("out", out, qkv.dtype, qkv.device, (B, N, H * D))
    if out_lo is not None:
        _check_tensor("out_lo", out_lo, qkv.dtype, qkv.device, (B, N, H * D))
    _check_tensor("lse", lse, torch.float32, qkv.device, (B, H, N))
    if not lse.is_contiguous():
        raise ValueError("self_attention: lse must be contiguous (as self_attention_fwd returns it)")
    if dqkv is None:
        dqkv = torch.empty((B, N, 3 * H * D), dtype=qkv.dtype, device=qkv.device)
    else:
        _check_tensor("dqkv", dqkv, qkv.dtype, qkv.device, (B, N, 3 * H * D))
    if B == 0 or N == 0:
        return dqkv
    lo = out if out_lo is None else out_lo
    idx64 = max(_span(qkv), _span(out), _span(lo), _span(dout), _span(dqkv)) > _INT32_MAX
    meta = _common_meta(D, qkv.dtype, idx64)
    n_bucket = _next_pow2(N)
    tune_key = (n_bucket, H, D, qkv.dtype)

    fp32 = qkv.dtype == torch.float32
    delta = torch.empty((B, H, N), dtype=torch.float32, device=qkv.device)
    delta_block = 16 if _INTERPRETED else _DELTA_BLOCK_M
    rnorm = torch.empty_like(delta) if fp32 else delta  # r = 1 / rowsum(P), float32 only (16-bit: not read)
    lse_exp = lse if fp32 else torch.empty_like(delta)  # L in the exponent's units (16-bit: L log2 e, delta kernel)
    args = (qkv, dout, lse_exp, delta, rnorm, dqkv, *qkv.stride(), H * D * qkv.stride(2), *dout.stride(),
            *dqkv.stride(), H * D * dqkv.stride(2), N, H, n_bucket, scale, _exponent_scale(scale, qkv.dtype))

    def grid_dkdv(m):
        return (triton.cdiv(N, m["BLOCK_N"]) * B * H,)

    def grid_dq(m):
        return (triton.cdiv(N, m["BLOCK_M"]) * B * H,)

    with _device_of(qkv):
        if fp32:  # the dQ kernel's first pass writes delta and r, which the dK/dV kernel reads
            _launch("dq", grid_dq, args, meta, tune_key, qkv.device, config)
            _launch("dkdv", grid_dkdv, args, meta, tune_key, qkv.device, config)
            return dqkv
        _attn_bwd_delta_kernel[(triton.cdiv(N, delta_block) * B * H,)](
            out, lo, dout, delta, lse, lse_exp, *out.stride(), *lo.stride(), *dout.stride(), N, H,
            HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], BLOCK_M=delta_block, IDX64=idx64,
            HAS_LO=out_lo is not None,
            num_warps=4, enable_fp_fusion=FP_FUSION,
        )
        _launch("dkdv", grid_dkdv, args, meta, tune_key, qkv.device, config)
        _launch("dq", grid_dq, args, meta, tune_key, qkv.device, config)
    return dqkv
