"""Fused residual add + LayerNorm (the pre-norm seams of a CrossViT branch block): Triton forward and backward.

What it computes
----------------
For rows ``x`` (and optionally a residual branch ``y`` of the same shape), per row of C channels::

    r = x + y                       (stored in torch.result_type(x, y); skipped when there is no y: r = x)
    p = r[0],   mean = p + sum(r - p) / C,   d = (r - p) - sum(r - p) / C     (pivoted: row_moments)
    var = sum(d^2) / C,   rstd = 1 / sqrt(var + eps)
    out = d * rstd * w + b          (stored in out_dtype: default r's dtype)

which is ``r = x + y; out = F.layer_norm(r, (C,), w, b, eps)`` and, with ``out_dtype`` = the autocast dtype,
what ``Linear(LayerNorm(r))`` feeds its matmul under ``torch.autocast`` (LayerNorm runs in float32 there and the
Linear casts its output to the autocast dtype; rounding once, here, is the same computation). All arithmetic is
float32 whatever the storage dtypes; ``r`` is rounded to its dtype *before* it is normalised, as in PyTorch.

Rounding: the row statistics use correctly rounded division and square root (``tl.div_rn``, ``tl.sqrt_rn``; sm_90
would otherwise compile ``/`` to ``div.full.f32`` and ``sqrt`` to ``sqrt.approx.ftz.f32``), so mean and rstd are the
same on every GPU and in the interpreter. They are not bit-equal to torch's LayerNorm (Welford, ``rsqrtf``): the
tests bound both against a float64 reference by the tolerance rule, never against each other bit for bit. The row is
centred about its first element ``p`` before it is summed: ``r - p`` is exact wherever r is within a factor of two
of p, so the centred row is accurate to an ulp of the row's *spread*, not of its mean. A constant row gives exactly
the bias (as torch's Welford does), and a row whose mean is far above its spread (a blank image's patches, padding
tokens) loses nothing to the mean's rounding, which rstd (up to ``1 / sqrt(eps)``) would scale into the output: the
plain two-pass mean put constant rows up to 190x over the tolerance rule's bound. The backward centres about the
saved mean ``fl(p + mean(r - p))`` and corrects once more by the centred row's own mean, recovering that precision
whichever kernel (this one or the GEMM prologue) computed the statistics.

Backward, with ``xhat = (r - mean) * rstd``, ``g = dout * w`` and ``dr_in`` the gradient reaching ``r`` from its
other uses (the residual stream)::

    xhat = (d - mean_c(d)) * rstd with d = r - mean (the saved mean, corrected once more from the row)
    dr = rstd * (g - xhat * mean_c(xhat * g) - mean_c(g)) + dr_in,    dx = dr (x's dtype),  dy = dr (y's dtype)
    dw = sum_rows(dout * xhat),   db = sum_rows(dout)

Why fuse
--------
In eager PyTorch under bf16 autocast a ViT block's pre-norm is three memory-bound kernels over the (float32)
residual stream: the add (read 6, write 4 bytes per element), LayerNorm (read 4, write 4) and the Linear's cast to
bf16 (read 4, write 2): 24 bytes per element. Fused it is 12 (read 4 + 2, write 4 + 2); without a residual
(the block's first norm) 14 become 6.

Algorithm
---------
Forward: one program per BLOCK_R rows; a whole row (C <= MAX_DIM) sits in registers (BLOCK_C = next power of two
of C, the extra columns masked), so it is one read and one write, pivoted two-pass mean/variance (no Welford
needed).
Saves mean and rstd, float32, one per row.

Backward: a fixed number of persistent programs; each walks row blocks ``pid, pid + G, ...``, writes dx (and dy)
for its rows and accumulates its dw/db partial sums in float32 registers, stored to a ``(G, C)`` buffer that the
launcher sums over G: deterministic (no atomics), the same result every run.

Limits
------
* x: ``(..., C)``, any strides for 2-D and 3-D inputs (read in place); other ranks are reshaped (a copy only if no
  view exists). ``y`` the same shape as x. ``w`` and ``b``: ``(C,)``. 1 <= C <= MAX_DIM (8192).
* dtypes: float16, bfloat16, float32 for every tensor; out_dtype one of those three. Triton's CPU interpreter
  truncates float32 -> bfloat16 stores (round toward zero, not to nearest), so bfloat16 is refused there.
* Tiles (GPU): (BLOCK_R x BLOCK_C) tiles of 4096 elements (forward) and 2048 (backward), warps from ``_tiles``.
  Compiled ahead of time for sm_90 (``tests/sm90_compile.py``, ptxas of triton 3.6.0 and 3.9.0): no register spills
  at CrossViT's widths (96..768, table below), nor at C = 2048 and 8192 (triton 3.6, 256 x 197 rows). Narrow rows are
  tight: at C = 40 and 100 the forward holds 64 / 32 rows a program and takes 234-255 registers under triton 3.6 (an
  earlier review saw 4-16 B of spills there in other shapes). Not yet timed on a GPU: no autotuning, the
  tiles are a first choice.
* Offsets are 32-bit unless a tensor spans 2**31 elements or more (then IDX64: 64-bit row and channel offsets).
* CUDA; CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
  Plain pointer arithmetic with masks; only APIs present in both triton 3.6 and 3.9.

Static sm_90 readings (``tests/sm90_compile.py --set ci --table``): docs/sm90.md.

"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from crossvit_fast.config import LAYER_NORM_MAX_DIM as MAX_DIM
from crossvit_fast.config import TRITON_FP_FUSION as FP_FUSION, interpreter_enabled, interpreter_runs_bf16

__all__ = ["layer_norm_fwd", "layer_norm_bwd", "check_layer_norm_inputs", "MAX_DIM", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = interpreter_enabled()
COMPILE_ONLY = False
"""Set only by ``tests/sm90_compile.py`` (ahead-of-time sm_90 compiles under a Triton driver that compiles and never
launches): CPU tensors then pass the device check, so the real launchers pick and compile their GPU configs."""
_INT32_MAX = 2**31 - 1
_ROW_TILE = 4096  # elements of a (BLOCK_R, BLOCK_C) tile on the GPU: BLOCK_R = _ROW_TILE // BLOCK_C
_INTERPRETER_TILE = 65536  # the interpreter's cost is per program, not per element: few, large tiles


@triton.jit
def _row_offsets(rows, N, s0, s1):
    """Offset of row ``rows`` of a (B, N, C) view: ``(rows // N) * s0 + (rows % N) * s1``."""
    return (rows // N) * s0 + (rows % N) * s1


@triton.jit
def row_moments(xs, mask, C, AXIS: tl.constexpr, EXACT: tl.constexpr = True):
    """``(mean, M2, d)`` over ``AXIS`` of the float32 tile ``xs = x - p`` (zero where ``mask`` is off, ``C`` valid
    entries a row), ``p`` a pivot per row, the row's first element: ``d = xs - mean`` is the centred row and
    ``M2 = sum(d^2)``, two-pass. The row's mean is ``p + mean``.

    ``x - p`` is exact wherever x is within a factor of two of p (Sterbenz), so the mean of ``xs`` and the centred
    row are accurate to about an ulp of the row's *spread*, not of its mean: a constant row centres to exactly 0 (as
    torch's Welford LayerNorm gives) and a row whose mean is far above its spread loses nothing to the mean's
    rounding, which ``rstd`` (up to ``1 / sqrt(eps)``) would otherwise scale into the output (the plain two-pass
    mean put constant rows at up to 190x the tolerance rule's bound). It costs one load per row and one subtraction
    per element, no extra reduction. Partial moments of row chunks merge by Chan et al.'s update. ``EXACT``: the
    mean by correctly rounded division (the ``layer_norm`` kernel's, the same on every GPU and in the
    interpreter), else by ``/`` (``div.full.f32`` on sm_90)."""
    s = tl.sum(xs, axis=AXIS)
    c = tl.zeros_like(s) + C
    mean = tl.div_rn(s, c) if EXACT else s / c
    d = tl.where(mask, xs - tl.expand_dims(mean, AXIS), 0.0)
    return mean, tl.sum(d * d, axis=AXIS), d


@triton.jit
def rstd_of(m2, C, eps):
    """``1 / sqrt(M2 / C + eps)``, correctly rounded division and square root (the same on every GPU and in the
    interpreter; sm_90 would otherwise compile ``/`` to ``div.full.f32`` and ``sqrt`` to an approximation)."""
    return tl.div_rn(tl.zeros_like(m2) + 1.0, tl.sqrt_rn(tl.div_rn(m2, tl.zeros_like(m2) + C) + eps))


@triton.jit
def _layer_norm_fwd_kernel(
    X, Y, W, Bias, R, Out, Mean, Rstd,  # Y, R unused without HAS_Y
    sx0, sx1, sx2,  # x strides, (B, N, C) view
    sy0, sy1, sy2,  # y strides
    sr0, sr1, sr2,  # r strides
    so0, so1, so2,  # out strides
    ROWS, N, C,  # ROWS = B * N rows of C channels
    eps,
    HAS_Y: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # next power of two >= C
    IDX64: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if IDX64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64) if IDX64 else tl.arange(0, BLOCK_C)  # cols * channel stride too
    rmask = rows < ROWS
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]

    x_rows = X + _row_offsets(rows, N, sx0, sx1)
    r = tl.load(x_rows[:, None] + cols[None, :] * sx2, mask=mask, other=0.0)
    r = r.to(tl.float32)
    piv = tl.load(x_rows, mask=rmask, other=0.0).to(tl.float32)  # (BLOCK_R,): each row's first channel
    if HAS_Y:
        y_rows = Y + _row_offsets(rows, N, sy0, sy1)
        y = tl.load(y_rows[:, None] + cols[None, :] * sy2, mask=mask, other=0.0)
        r_st = (r + y.to(tl.float32)).to(R.dtype.element_ty)
        tl.store(R + _row_offsets(rows, N, sr0, sr1)[:, None] + cols[None, :] * sr2, r_st, mask=mask)
        r = r_st.to(tl.float32)
        piv = (piv + tl.load(y_rows, mask=rmask, other=0.0).to(tl.float32)).to(R.dtype.element_ty).to(tl.float32)

    mean, m2, d = row_moments(tl.where(mask, r - piv[:, None], 0.0), mask, C, 1)
    rstd = rstd_of(m2, C, eps)
    mean += piv
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)
    out = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Out + _row_offsets(rows, N, so0, so1)[:, None] + cols[None, :] * so2, out.to(Out.dtype.element_ty),
             mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _layer_norm_bwd_kernel(
    DOut, DRin, Xin, W, Mean, Rstd, DX, DY, DWp, DBp,  # DRin, DY unused without HAS_DR / HAS_DY
    sdo0, sdo1, sdo2,  # dout strides
    sdr0, sdr1, sdr2,  # dr_in strides
    sxi0, sxi1, sxi2,  # strides of the normalised input (r, or x without a residual)
    sdx0, sdx1, sdx2,  # dx strides
    sdy0, sdy1, sdy2,  # dy strides
    ROWS, N, C,
    HAS_DR: tl.constexpr,
    HAS_DY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    cols = tl.arange(0, BLOCK_C).to(tl.int64) if IDX64 else tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(pid * BLOCK_R, ROWS, step):
        rows = start + tl.arange(0, BLOCK_R)
        if IDX64:
            rows = rows.to(tl.int64)
        rmask = rows < ROWS
        mask = rmask[:, None] & cmask[None, :]
        xin = tl.load(Xin + _row_offsets(rows, N, sxi0, sxi1)[:, None] + cols[None, :] * sxi2, mask=mask, other=0.0)
        dout = tl.load(DOut + _row_offsets(rows, N, sdo0, sdo1)[:, None] + cols[None, :] * sdo2, mask=mask,
                       other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        # the saved (rounded) mean as the pivot of one more correction step: xhat to about an ulp of the row's
        # spread, as in the forward, whichever kernel computed the statistics
        d = tl.where(mask, xin.to(tl.float32) - mean[:, None], 0.0)
        xhat = tl.where(mask, d - (tl.sum(d, axis=1) / C)[:, None], 0.0) * rstd[:, None]
        g = dout * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DR:
            dr = tl.load(DRin + _row_offsets(rows, N, sdr0, sdr1)[:, None] + cols[None, :] * sdr2, mask=mask,
                         other=0.0)
            dx += dr.to(tl.float32)
        tl.store(DX + _row_offsets(rows, N, sdx0, sdx1)[:, None] + cols[None, :] * sdx2, dx.to(DX.dtype.element_ty),
                 mask=mask)
        if HAS_DY:
            tl.store(DY + _row_offsets(rows, N, sdy0, sdy1)[:, None] + cols[None, :] * sdy2,
                     dx.to(DY.dtype.element_ty), mask=mask)
        dw += tl.sum(dout * xhat, axis=0)
        db += tl.sum(dout, axis=0)
    tl.store(DWp + pid * C + cols, dw, mask=cmask)
    tl.store(DBp + pid * C + cols, db, mask=cmask)


def _device_of(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _as3d(t: torch.Tensor) -> torch.Tensor:
    """A (B, N, C) view of ``t`` (2-D: (1, R, C); other ranks: reshaped, a copy only when no view exists)."""
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(0)
    return t.reshape(1, -1, t.shape[-1])


def _span(t: torch.Tensor) -> int:
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A ``(C,)`` parameter (LayerNorm affine, bias, drop-path scale) with unit stride: the kernels index these
    vectors as contiguous, so a strided view (a slice of a packed tensor, ``w[::2]``) is copied (C elements)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"layer_norm: {name} is on {t.device}, but x is on {device}; expected one device")


def _check_out(name: str, t: torch.Tensor, dtype: torch.dtype, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"layer_norm: {name} has dtype {t.dtype}, expected {dtype}")
    _check_device(name, t, like.device)
    if t.dim() > 3 and not t.is_contiguous():
        raise ValueError(f"layer_norm: a preallocated {name} of more than 3 dimensions must be contiguous")


def check_layer_norm_shapes(x, residual, weight, bias, max_dim: Optional[int] = None) -> int:
    """The shape checks of the forward's arguments (no device needed: the ``layer_norm`` op's fakes run them too):
    x has a channel dimension C (at most ``max_dim``, where given), weight and bias are ``(C,)``, a residual has x's
    shape. Returns C."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"layer_norm: x must have a last (channel) dimension >= 1, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if max_dim is not None and C > max_dim:
        raise ValueError(f"layer_norm: {C} channels; the fused LayerNorm holds a row in registers, at most {max_dim}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(t.shape)}, expected ({C},) for x of shape "
                             f"{tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual has shape {tuple(residual.shape)}, expected x's {tuple(x.shape)}")
    return C


def check_layer_norm_inputs(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: Optional[torch.dtype],
) -> int:
    """Every check of the forward, before any allocation or launch; returns C."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)) + ((("residual", residual),) if residual is not None
                                                                      else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    C = check_layer_norm_shapes(x, residual, weight, bias, MAX_DIM)
    if weight.dtype != bias.dtype:
        raise TypeError(f"layer_norm: weight is {weight.dtype} and bias {bias.dtype}; expected one dtype")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"layer_norm: out_dtype {out_dtype}; expected float16, bfloat16 or float32")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"layer_norm: eps must be a float >= 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None:
            _check_device(name, t, x.device)
    if x.device.type == "cuda" or (x.device.type == "cpu" and COMPILE_ONLY and not _INTERPRETED):
        pass
    elif x.device.type == "cpu":
        if _INTERPRETED and torch.bfloat16 in (x.dtype, getattr(residual, "dtype", None), out_dtype) and not (
                interpreter_runs_bf16()):
            raise TypeError("layer_norm: bfloat16 is not supported under Triton's CPU interpreter (it truncates "
                            "float32 -> bfloat16 stores); use float16/float32 on CPU, or a CUDA device")
        if not _INTERPRETED:
            raise ValueError("layer_norm: x is on the CPU, but the Triton kernels need a CUDA device (CPU runs only "
                             "under Triton's interpreter, TRITON_INTERPRET=1 set before "
                             "crossvit_fast.kernels.layer_norm is imported)")
    else:
        raise ValueError(f"layer_norm: x is on {x.device}; expected a CUDA device")
    return C


def _tiles(C: int, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for C channels.

    The backward (six tile-sized tensors live) takes half the forward's rows. Warps are set so a thread holds at
    most 32 elements of a tile per live tensor in the forward and 8 in the backward: no register spills on sm_90
    at the family's widths (``tests/sm90_compile.py``, triton 3.6 and 3.9, float32, float16, bfloat16, autocast).
    """
    block_c = triton.next_power_of_2(C)
    if _INTERPRETED:
        return max(1, _INTERPRETER_TILE // block_c), block_c, 1
    block_r = max(1, (_ROW_TILE // 2 if backward else _ROW_TILE) // block_c)
    per_thread = 8 if backward else 32
    warps = min(16, max(4, block_r * block_c // (32 * per_thread)))
    return block_r, block_c, warps


def layer_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: Optional[torch.dtype] = None,
    *,
    out: Optional[torch.Tensor] = None,
    r: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    rstd: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward: ``(out, r, mean, rstd)``.

    ``r = x + residual`` (None without a residual) in ``torch.result_type(x, residual)``; ``out`` the LayerNorm
    of r (or of x) in ``out_dtype`` (default: r's or x's dtype), both with x's shape (new ones contiguous; ``out=``
    and ``r=`` take preallocated tensors of any strides); ``mean`` and ``rstd`` float32, shape ``x.shape[:-1]``,
    for the backward (``mean=`` / ``rstd=`` take preallocated contiguous float32 tensors of that many elements).
    """
    C = check_layer_norm_inputs(x, residual, weight, bias, eps, out_dtype)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    r_dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype or r_dtype, device=x.device)
    else:
        _check_out("out", out, out_dtype or r_dtype, x)
    if residual is None:
        if r is not None:
            raise ValueError("layer_norm: r= was given without a residual (there is no sum to write)")
    elif r is None:
        r = torch.empty(x.shape, dtype=r_dtype, device=x.device)
    else:
        _check_out("r", r, r_dtype, x)
    rows = x.numel() // C
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != rows or not t.is_contiguous()
                              or t.device != x.device):
            raise ValueError(f"layer_norm: {name}= must be a contiguous float32 tensor of {rows} elements on "
                             f"{x.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if mean is None:
        mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rstd is None:
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, r, mean, rstd
    x3, o3 = _as3d(x), _as3d(out)
    y3 = _as3d(residual) if residual is not None else x3
    r3 = _as3d(r) if r is not None else o3
    idx64 = max(_span(t) for t in (x3, y3, r3, o3)) > _INT32_MAX
    block_r, block_c, warps = _tiles(C)
    with _device_of(x):
        _layer_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x3, y3, weight, bias, r3, o3, mean, rstd,
            *x3.stride(), *y3.stride(), *r3.stride(), *o3.stride(),
            rows, x3.shape[1], C, float(eps),
            HAS_Y=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, IDX64=idx64, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )
    return out, r, mean, rstd


def layer_norm_bwd(
    dout: torch.Tensor,
    dr: Optional[torch.Tensor],
    xin: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    y_dtype: Optional[torch.dtype] = None,
    *,
    dx: Optional[torch.Tensor] = None,
    dy: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dy, dweight, dbias)``.

    ``dout``: gradient of ``out``; ``dr``: gradient reaching ``r`` from its other uses (None: zero, or no
    residual); ``xin``: the tensor that was normalised (r, or x without a residual); ``mean``/``rstd`` from the
    forward. ``dx`` in ``x_dtype``; ``dy`` (the residual's gradient, the same values) in ``y_dtype``, None when
    ``y_dtype`` is None; ``dweight``/``dbias`` in weight's dtype, summed deterministically. ``dx=``/``dy=`` take
    preallocated gradients (any strides).
    """
    C = check_layer_norm_inputs(xin, None, weight, weight, 0.0, None)
    weight = _unit_stride(weight)
    for name, t in (("dout", dout), ("dr", dr)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm backward: {name} must be a float16/bfloat16/float32 tensor")
        if t.shape != xin.shape:
            raise ValueError(f"layer_norm backward: {name} has shape {tuple(t.shape)}, expected {tuple(xin.shape)}")
        _check_device(name, t, xin.device)
    for name, t in (("x_dtype", x_dtype), ("y_dtype", y_dtype)):
        if t is not None and t not in SUPPORTED_DTYPES:
            raise TypeError(f"layer_norm backward: {name} {t}; expected float16, bfloat16 or float32")
    if _INTERPRETED and xin.device.type == "cpu" and torch.bfloat16 in (x_dtype, y_dtype, dout.dtype) and not (
            interpreter_runs_bf16()):
        raise TypeError("layer_norm: bfloat16 is not supported under Triton's CPU interpreter (it truncates "
                        "float32 -> bfloat16 stores); use float16/float32 on CPU, or a CUDA device")
    if y_dtype is None and dy is not None:
        raise ValueError("layer_norm backward: dy= was given without y_dtype (no residual)")
    if tuple(mean.shape) != tuple(xin.shape[:-1]) or mean.shape != rstd.shape or not (mean.is_contiguous()
                                                                                      and rstd.is_contiguous()):
        raise ValueError("layer_norm backward: mean and rstd must be the forward's contiguous (x.shape[:-1]) float32 "
                         "statistics")
    if mean.dtype != torch.float32 or rstd.dtype != torch.float32:
        raise TypeError("layer_norm backward: mean and rstd must be float32 (as the forward returns them)")
    _check_device("mean", mean, xin.device)
    _check_device("rstd", rstd, xin.device)
    if dx is None:
        dx = torch.empty(xin.shape, dtype=x_dtype, device=xin.device)
    else:
        _check_out("dx", dx, x_dtype, xin)
    if y_dtype is not None:
        if dy is None:
            dy = torch.empty(xin.shape, dtype=y_dtype, device=xin.device)
        else:
            _check_out("dy", dy, y_dtype, xin)
    rows = mean.numel()
    block_r, block_c, warps = _tiles(C, backward=True)
    if _INTERPRETED:
        programs = min(triton.cdiv(rows, block_r), 2)
    else:
        sms = torch.cuda.get_device_properties(xin.device).multi_processor_count
        programs = min(triton.cdiv(rows, block_r), 4 * sms)
    programs = max(programs, 1)
    dwp = torch.zeros((programs, C), dtype=torch.float32, device=xin.device)
    dbp = torch.zeros((programs, C), dtype=torch.float32, device=xin.device)
    if rows > 0:
        do3, xi3, dx3 = _as3d(dout), _as3d(xin), _as3d(dx)
        dr3 = _as3d(dr) if dr is not None else do3
        dy3 = _as3d(dy) if dy is not None else dx3
        idx64 = max(_span(t) for t in (do3, xi3, dx3, dr3, dy3)) > _INT32_MAX
        with _device_of(xin):
            _layer_norm_bwd_kernel[(programs,)](
                do3, dr3, xi3, weight, mean, rstd, dx3, dy3, dwp, dbp,
                *do3.stride(), *dr3.stride(), *xi3.stride(), *dx3.stride(), *dy3.stride(),
                rows, xi3.shape[1], C,
                HAS_DR=dr is not None, HAS_DY=dy is not None, BLOCK_R=block_r, BLOCK_C=block_c, IDX64=idx64,
                num_warps=warps, enable_fp_fusion=FP_FUSION,
            )
    return dx, dy, dwp.sum(0).to(weight.dtype), dbp.sum(0).to(weight.dtype)
