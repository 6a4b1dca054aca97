"""Fused residual add + LayerNorm (``crossvit_fast::layer_norm``) against ``layer_norm_ref`` in float64.

Tolerance rule (crossvit_fast.testing): the kernel's error against the float64 reference is at most twice the
error of the reference itself run in the same low dtype, plus a small atol. Checked: the sum ``r``, the normalised
output, and the gradients of x, the residual, weight and bias, with a gradient arriving on ``r`` as well (the
residual stream). Without CUDA the kernels run in Triton's CPU interpreter (bfloat16 stores rounded as
on the GPU: tests/gpu_numerics.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from crossvit_fast.reference import layer_norm_ref
from crossvit_fast.testing import assert_within_rule, poison_

kln = pytest.importorskip("crossvit_fast.kernels.layer_norm", reason="triton is not installed")
from crossvit_fast.ops.layer_norm import layer_norm  # noqa: E402
from conftest import CUDA, DEV, LOW_DTYPES, assert_compiled_like_eager, cpu_only, forbid_launches, requires_cuda  # noqa: E402,E501

LAYOUTS = ("contiguous", "slice", "transposed")


def rand(shape, dtype, layout="contiguous", scale=1.0, shift=0.0):
    """Random ``shape`` (3-D) in a memory layout, built as a view of its storage; a shift makes LayerNorm's
    cancellation matter."""
    B, N, C = shape
    if layout == "contiguous":
        t = torch.randn(B, N, C, device=DEV)
    elif layout == "slice":  # a window of wider rows
        t = torch.randn(B, N, C + 24, device=DEV)[..., 8:8 + C]
    elif layout == "transposed":  # channel-major storage
        t = torch.randn(C, N, B, device=DEV).permute(2, 1, 0)
    else:
        raise ValueError(layout)
    return (t * scale + shift).to(dtype)


def reference(x, w, b, eps, residual, dout, dr, out_dtype, dtype64=torch.float64):
    """Outputs and gradients of ``layer_norm_ref`` with inputs cast to ``dtype64`` (float64 oracle, or the low
    dtype itself for the rule's baseline)."""
    def leaf(t):
        return None if t is None else t.detach().to(dtype64 if dtype64 == torch.float64 else t.dtype).requires_grad_()

    xs, ws, bs, ys = leaf(x), leaf(w), leaf(b), leaf(residual)
    od = None if dtype64 == torch.float64 else out_dtype
    res = layer_norm_ref(xs, ws, bs, eps, residual=ys, out_dtype=od)
    if ys is None:
        out, r = res, None
        loss = (out.double() * dout.double()).sum()
    else:
        r, out = res
        loss = (out.double() * dout.double()).sum() + (r.double() * dr.double()).sum()
    inputs = [t for t in (xs, ys, ws, bs) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    return out.detach(), (None if r is None else r.detach()), grads


def check(x, w, b, eps=1e-6, residual=None, out_dtype=None, poison=True):
    """Launchers (into NaN-poisoned buffers) against the float64 reference under the tolerance rule."""
    r_dtype = torch.result_type(x, residual) if residual is not None else x.dtype
    odt = out_dtype or r_dtype
    dout = torch.randn(x.shape, device=DEV).to(odt)
    dr = torch.randn(x.shape, device=DEV).to(r_dtype) if residual is not None else None
    kw = {}
    if poison:
        kw["out"] = poison_(torch.empty(x.shape, dtype=odt, device=DEV))
        if residual is not None:
            kw["r"] = poison_(torch.empty(x.shape, dtype=r_dtype, device=DEV))
    out, r, mean, rstd = kln.layer_norm_fwd(x, residual, w, b, eps, out_dtype, **kw)
    assert out.dtype == odt and out.shape == x.shape
    bkw = {}
    if poison:
        bkw["dx"] = poison_(torch.empty(x.shape, dtype=x.dtype, device=DEV))
        if residual is not None:
            bkw["dy"] = poison_(torch.empty(x.shape, dtype=residual.dtype, device=DEV))
    xin = r if residual is not None else x
    dx, dy, dw, db = kln.layer_norm_bwd(dout, dr, xin, w, mean, rstd, x.dtype,
                                        residual.dtype if residual is not None else None, **bkw)
    o64, r64, g64 = reference(x, w, b, eps, residual, dout, dr, out_dtype)
    olow, rlow, glow = reference(x, w, b, eps, residual, dout, dr, out_dtype, dtype64=None)
    assert_within_rule(out, o64, olow, what="out")
    if residual is not None:
        assert r.dtype == r_dtype
        assert_within_rule(r, r64, rlow, what="r")
    got = [dx] + ([dy] if residual is not None else []) + [dw, db]
    names = ["dx"] + (["dresidual"] if residual is not None else []) + ["dweight", "dbias"]
    for name, g, ref64, reflow in zip(names, got, g64, glow):
        assert g.dtype == reflow.dtype, (name, g.dtype, reflow.dtype)
        assert_within_rule(g, ref64, reflow, what=name)


# ------------------------------------------------------------------------------------------------------------
# CPU interpreter (also run on CUDA, where they are quick)
# ------------------------------------------------------------------------------------------------------------

CASES = [(1, 1, 1), (1, 1, 7), (2, 3, 32), (3, 17, 96), (1, 5, 448), (2, 9, 100), (1, 2, 1000)]


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add+norm"])
def test_kernels(shape, dtype, with_residual):
    C = shape[-1]
    x = rand(shape, dtype, shift=3.0)
    y = rand(shape, dtype) if with_residual else None
    w = torch.randn(C, device=DEV).to(dtype)
    b = torch.randn(C, device=DEV).to(dtype)
    check(x, w, b, residual=y)


@cpu_only
@pytest.mark.parametrize("tile", [8, 64], ids=["1-row-blocks", "8-row-blocks"])
def test_many_row_blocks_in_the_interpreter(monkeypatch, tile):
    """Small tiles: many forward programs, a partial last row block, and backward programs that loop over several
    row blocks each (the GPU's layout; the interpreter's default tile holds these rows at once)."""
    monkeypatch.setattr(kln, "_INTERPRETER_TILE", tile)
    x = rand((3, 13, 7), torch.float32, shift=1.0)
    y = rand((3, 13, 7), torch.float16)
    w, b = torch.randn(7, device=DEV), torch.randn(7, device=DEV)
    check(x, w, b, residual=y)


def test_int64_offsets(monkeypatch):
    """The 64-bit offset specialisation (IDX64, taken when a tensor spans 2**31 elements; forced here by lowering the
    switch-over threshold), forward and backward, strided inputs, the residual add and a 16-bit output."""
    monkeypatch.setattr(kln, "_INT32_MAX", 0)
    x = rand((3, 13, 40), torch.float32, "slice", shift=1.0)
    y = rand((3, 13, 40), torch.float16, "transposed")
    w, b = torch.randn(40, device=DEV), torch.randn(40, device=DEV)
    check(x, w, b, residual=y, out_dtype=torch.float16)
    check(x, w, b)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_autocast_seam_dtypes(out_dtype):
    """The block's seam under autocast: float32 residual stream, a 16-bit branch output, float32 weights and the
    normalised output written in the autocast dtype."""
    shape = (2, 13, 64)
    x = rand(shape, torch.float32)
    y = rand(shape, out_dtype)
    w, b = torch.randn(64, device=DEV), torch.randn(64, device=DEV)
    check(x, w, b, residual=y, out_dtype=out_dtype)
    check(x, w, b, out_dtype=out_dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided(layout):
    x = rand((3, 5, 40), torch.float32, layout)
    y = rand((3, 5, 40), torch.float16, layout)
    w, b = torch.randn(40, device=DEV), torch.randn(40, device=DEV)
    check(x, w, b, residual=y)
    check(x, w, b)


def test_other_ranks():
    """2-D and 4-D inputs (a 4-D non-contiguous one is reshaped: a copy, never a wrong result)."""
    w, b = torch.randn(24, device=DEV), torch.randn(24, device=DEV)
    for x in (torch.randn(7, 24, device=DEV), torch.randn(2, 3, 4, 24, device=DEV).transpose(1, 2),
              torch.randn(24, device=DEV)):
        out = layer_norm(x, w, b, 1e-5)
        torch.testing.assert_close(out, layer_norm_ref(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_op_autograd_matches_launchers():
    x = torch.randn(2, 9, 48, device=DEV, requires_grad=True)
    y = torch.randn(2, 9, 48, device=DEV).half().requires_grad_(True)
    w = torch.randn(48, device=DEV, requires_grad=True)
    b = torch.randn(48, device=DEV, requires_grad=True)
    r, out = layer_norm(x, w, b, 1e-6, residual=y, out_dtype=torch.float16)
    dout, dr = torch.randn_like(out), torch.randn_like(r)
    torch.autograd.backward([out, r], [dout, dr])
    o, rr, mean, rstd = kln.layer_norm_fwd(x.detach(), y.detach(), w.detach(), b.detach(), 1e-6, torch.float16)
    dx, dy, dw, db = kln.layer_norm_bwd(dout, dr, rr, w.detach(), mean, rstd, torch.float32, torch.float16)
    for got, want in ((out, o), (r, rr), (x.grad, dx), (y.grad, dy), (w.grad, dw), (b.grad, db)):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    # only the normalised output used: dr is None in the backward
    x.grad = None
    r, out = layer_norm(x, w, b, 1e-6, residual=y)
    out.sum().backward()
    ref = torch.autograd.grad(layer_norm_ref(x, w, b, 1e-6, residual=y)[1].sum(), x)[0]
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-5)


def test_empty_and_deterministic():
    w, b = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    out, r, mean, rstd = kln.layer_norm_fwd(torch.randn(0, 3, 16, device=DEV), torch.randn(0, 3, 16, device=DEV),
                                            w, b, 1e-6)
    assert out.shape == r.shape == (0, 3, 16) and mean.shape == (0, 3)
    dx, dy, dw, db = kln.layer_norm_bwd(out, None, r, w, mean, rstd, torch.float32, torch.float32)
    assert dx.shape == (0, 3, 16) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))
    x = torch.randn(3, 37, 16, device=DEV)
    out, _, mean, rstd = kln.layer_norm_fwd(x, None, w, b, 1e-6)
    g = torch.randn_like(x)
    first = kln.layer_norm_bwd(g, None, x, w, mean, rstd, x.dtype)
    second = kln.layer_norm_bwd(g, None, x, w, mean, rstd, x.dtype)
    for a, c in zip(first, second):
        assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_constant_rows_and_nan():
    """A constant row normalises to the bias (variance 0: rstd = eps^-1/2 times 0); NaN propagates."""
    w, b = torch.randn(8, device=DEV), torch.randn(8, device=DEV)
    x = torch.full((1, 2, 8), 5.0, device=DEV)
    torch.testing.assert_close(layer_norm(x, w, b), b.expand(1, 2, 8).contiguous())
    x[0, 1, 3] = float("nan")
    out = layer_norm(x, w, b)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()


def test_opcheck():
    x = torch.randn(2, 5, 24, device=DEV, requires_grad=True)
    y = torch.randn(2, 5, 24, device=DEV).half().requires_grad_(True)
    w = torch.randn(24, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    op = torch.ops.crossvit_fast.layer_norm.default
    torch.library.opcheck(op, (x, y, w, b, 1e-6, None))
    torch.library.opcheck(op, (x, None, w, b, 1e-6, torch.float16))
    out, r, mean, rstd = op(x.detach(), y.detach(), w.detach(), b.detach(), 1e-6, None)
    torch.library.opcheck(torch.ops.crossvit_fast.layer_norm_backward.default,
                          (torch.randn_like(out), torch.randn_like(r), r, w.detach(), mean, rstd, torch.float32,
                           torch.float16))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    if backend == "inductor" and not CUDA:
        pytest.skip("Inductor's CPU code generation is slow on a 2-core machine; aot_eager covers the graph "
                    "capture on CPU and Inductor runs on CUDA")

    def f(x, y, w, b):
        r, out = layer_norm(x, w, b, residual=y)
        return r * 2.0 + out

    args = [torch.randn(2, 7, 32, device=DEV, requires_grad=True) for _ in range(2)]
    args += [torch.randn(32, device=DEV, requires_grad=True) for _ in range(2)]
    assert_compiled_like_eager(f, args, backend)


# ------------------------------------------------------------------------------------------------------------
# The Block seam: backend="triton" against the reference Block
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def replayed_drop_path_masks(monkeypatch):
    """Drop-path masks drawn once, in float64, and replayed call by call into every run (whatever its dtype), so the
    float64 oracle, the low-precision reference and the fused Block drop the same samples. ``start()`` rewinds."""
    import crossvit_fast.layers as layers

    masks, calls = [], [0]

    def drop_path(x, drop_prob, training):
        if drop_prob == 0.0 or not training:
            return x
        i = calls[0]
        calls[0] += 1
        if i == len(masks):
            g = torch.Generator().manual_seed(100 + i)
            keep = torch.bernoulli(torch.full((x.shape[0],), 1.0 - drop_prob, dtype=torch.float64), generator=g)
            masks.append(keep / (1.0 - drop_prob))
        return x * masks[i].to(device=x.device, dtype=x.dtype).view((x.shape[0],) + (1,) * (x.dim() - 1))

    monkeypatch.setattr(layers, "drop_path", drop_path)

    def start():
        calls[0] = 0
        return masks

    return start


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "fp16-autocast"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_block_fused_layer_norm(autocast, train, replayed_drop_path_masks):
    """The fused seams in a whole branch Block, output and every gradient, under the tolerance rule: the float64
    Block is the oracle and the reference Block run in the same precision (float32, or fp16 autocast) is the rule's
    low-precision baseline. No bound assumes the fused LayerNorm rounds exactly as torch's kernel does."""
    from crossvit_fast.layers import Block

    ref = Block(32, 2, 3.0, qkv_bias=True, drop_path=0.3, backend="reference").to(DEV).train(train)
    fused = copy.deepcopy(ref)
    fused.set_backend("triton")  # the LayerNorms only: the attention stays on the reference path
    fused.linear_backend = "torch"  # and the Linears (the five-kernel path is tests/test_linear.py's)
    assert fused.backend == "triton" and fused.attn.backend == "reference"
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 11, 32, device=DEV)
    weight = torch.linspace(-1, 1, 32, device=DEV, dtype=torch.float64)
    runs = []
    for m, lowp in ((ref64, False), (ref, True), (fused, True)):
        masks = replayed_drop_path_masks()
        xi = x.to(torch.float64 if not lowp else torch.float32).requires_grad_()
        with torch.autocast(DEV.type, dtype=torch.float16, enabled=autocast and lowp):
            y = m(xi)
        grads = torch.autograd.grad((y.double() * weight).sum(), [xi] + list(m.parameters()))
        runs.append((y, grads))
    assert len(masks) == (2 if train else 0)
    (y64, g64), (yl, gl), (yf, gf) = runs
    assert yf.dtype == yl.dtype == torch.float32  # the residual stream stays float32 under autocast
    assert_within_rule(yf, y64, yl, what="block output")
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, c64, cl in zip(names, gf, g64, gl):
        assert_within_rule(a, c64, cl, atol=1e-6, what=f"grad of {name}")


def test_block_state_dict_and_backend_choice():
    from crossvit_fast.layers import Block

    ref = Block(32, 2, backend="reference")
    fused = Block(32, 2, backend="triton")
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert Block(32, 2, backend="auto").backend == "torch"  # not GPU-verified yet / no GPU: what timm runs


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear exception before any launch
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    forbid_launches(monkeypatch, kln, "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")


def test_bad_inputs(no_launch):
    x = torch.randn(2, 5, 16, device=DEV)
    w, b = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    bad = [
        (dict(x=x.double()), TypeError, "x has dtype torch.float64"),
        (dict(x=x.int()), TypeError, "x has dtype torch.int32"),
        (dict(residual=x[:, :4]), ValueError, "residual has shape"),
        (dict(weight=w[:8]), ValueError, r"weight has shape \(8,\), expected \(16,\)"),
        (dict(bias=b.view(4, 4)), ValueError, "bias has shape"),
        (dict(x=torch.randn(2, 5, 0, device=DEV), weight=w[:0], bias=b[:0]), ValueError, "last"),
        (dict(out_dtype=torch.float64), TypeError, "out_dtype"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(x=torch.randn(1, 1, 9000, device=DEV), weight=torch.randn(9000, device=DEV),
              bias=torch.randn(9000, device=DEV)), ValueError, "at most 8192"),
    ]
    for change, exc, match in bad:
        args = dict(x=x, residual=None, weight=w, bias=b, eps=1e-6, out_dtype=None)
        args.update(change)
        with pytest.raises(exc, match=match):
            kln.layer_norm_fwd(**args)
        if "9000" not in match and "at most" not in match:
            with pytest.raises(exc, match=match):
                layer_norm(args["x"], args["weight"], args["bias"], args["eps"], residual=args["residual"],
                           out_dtype=args["out_dtype"])
    with pytest.raises(TypeError, match="residual must be"):
        layer_norm(x, w, b, residual=[1.0])
    with pytest.raises(ValueError, match="out has shape"):
        kln.layer_norm_fwd(x, None, w, b, 1e-6, out=torch.empty(2, 5, 8, device=DEV))
    with pytest.raises(TypeError, match="r has dtype"):
        kln.layer_norm_fwd(x, x, w, b, 1e-6, r=torch.empty(2, 5, 16, device=DEV).half())
    with pytest.raises(ValueError, match="without a residual"):
        kln.layer_norm_fwd(x, None, w, b, 1e-6, r=torch.empty_like(x))


def test_bad_backward_inputs(no_launch):
    x = torch.randn(2, 5, 16, device=DEV)
    w = torch.randn(16, device=DEV)
    mean = torch.zeros(2, 5, device=DEV)
    rstd = torch.ones(2, 5, device=DEV)
    with pytest.raises(ValueError, match="dout has shape"):
        kln.layer_norm_bwd(x[:, :3], None, x, w, mean, rstd, x.dtype)
    with pytest.raises(ValueError, match="dr has shape"):
        kln.layer_norm_bwd(x, x[:1], x, w, mean, rstd, x.dtype, x.dtype)
    with pytest.raises(ValueError, match="mean and rstd"):
        kln.layer_norm_bwd(x, None, x, w, mean[:, :2], rstd, x.dtype)
    with pytest.raises(TypeError, match="float32"):
        kln.layer_norm_bwd(x, None, x, w, mean.half(), rstd.half(), x.dtype)
    with pytest.raises(TypeError, match="x_dtype"):
        kln.layer_norm_bwd(x, None, x, w, mean, rstd, torch.float64)
    with pytest.raises(ValueError, match="dx has shape"):
        kln.layer_norm_bwd(x, None, x, w, mean, rstd, x.dtype, dx=torch.empty(2, 5, 8, device=DEV))


def test_cpu_tensor_refused_without_interpreter(no_launch, monkeypatch):
    monkeypatch.setattr(kln, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA"):
        kln.layer_norm_fwd(torch.randn(2, 5, 16), None, torch.randn(16), torch.randn(16), 1e-6)


@cpu_only
def test_bf16_refused_in_plain_interpreter(no_launch, plain_interpreter):
    x = torch.randn(2, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    for args in ((x.bfloat16(), None, w, b, 1e-6), (x, None, w, b, 1e-6, torch.bfloat16)):
        with pytest.raises(TypeError, match="bfloat16"):
            kln.layer_norm_fwd(*args)


@requires_cuda
def test_mixed_devices_refused(no_launch):
    x = torch.randn(2, 5, 16, device=DEV)
    w, b = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    with pytest.raises(ValueError, match="weight is on cpu"):
        kln.layer_norm_fwd(x, None, w.cpu(), b, 1e-6)
    with pytest.raises(ValueError, match="residual is on cpu"):
        kln.layer_norm_fwd(x, x.cpu(), w, b, 1e-6)


# ------------------------------------------------------------------------------------------------------------
# CUDA: bfloat16, the model family's widths and row counts
# ------------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("C", [96, 192, 224, 384, 448, 768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
def test_cuda_family_widths(C, dtype):
    N = 197 if C >= 384 else 401
    x = rand((4, N, C), torch.float32, shift=2.0)
    y = rand((4, N, C), dtype)
    w, b = torch.randn(C, device=DEV), torch.randn(C, device=DEV)
    check(x, w, b, residual=y, out_dtype=None if dtype == torch.float32 else dtype)
    check(x.to(dtype), w.to(dtype), b.to(dtype), residual=y)


# The headline model's shapes (crossvit_18_dagger_240: S branch C=224, 7 heads, 400 patch tokens; L branch C=448,
# 7 heads, 196 patch tokens), every dtype: the set `bench/gpu_run.sh smoke` runs first on a GPU (`-m smoke`).


@requires_cuda
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("N,C", [(401, 224), (197, 448)], ids=["S", "L"])
def test_cuda_headline(N, C, dtype):
    """The block's two seams at the headline shapes: norm1 alone, and the residual add with norm2 (under autocast the
    stream is float32 and the output 16-bit, as in the model)."""
    x = rand((4, N, C), torch.float32, shift=2.0)
    y = rand((4, N, C), dtype)
    w, b = torch.randn(C, device=DEV), torch.randn(C, device=DEV)
    out_dtype = None if dtype == torch.float32 else dtype
    check(x, w, b, residual=y, out_dtype=out_dtype)
    check(x, w, b, out_dtype=out_dtype)


def mixed_inputs(B, N, C):
    """A float32 stream x, a bfloat16 branch output y (B, N, C) and float32 LayerNorm weight and bias, as a block."""
    w, b = torch.randn(C, device=DEV), torch.randn(C, device=DEV)
    return rand((B, N, C), torch.float32), rand((B, N, C), torch.bfloat16), w, b


@requires_cuda
def test_cuda_large_row_count_backward_deterministic():
    C = 448
    x, y, w, b = mixed_inputs(64, 197, C)
    out, r, mean, rstd = kln.layer_norm_fwd(x, y, w, b, 1e-6, torch.bfloat16)
    g, dr = torch.randn_like(out), torch.randn_like(r)
    a = kln.layer_norm_bwd(g, dr, r, w, mean, rstd, x.dtype, y.dtype)
    c = kln.layer_norm_bwd(g, dr, r, w, mean, rstd, x.dtype, y.dtype)
    for u, v in zip(a, c):
        assert torch.equal(u, v)


@requires_cuda
def test_cuda_graph_capture():
    C = 224
    x, y, w, b = mixed_inputs(8, 401, C)
    kln.layer_norm_fwd(x, y, w, b, 1e-6, torch.bfloat16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, r, _, _ = kln.layer_norm_fwd(x, y, w, b, 1e-6, torch.bfloat16)
    x.copy_(rand((8, 401, C), torch.float32))
    graph.replay()
    torch.cuda.synchronize()
    ref_r, ref_out = layer_norm_ref(x, w, b, 1e-6, residual=y, out_dtype=torch.bfloat16)
    r64, out64 = layer_norm_ref(x.double(), w.double(), b.double(), 1e-6, residual=y.double())
    torch.testing.assert_close(r, ref_r, rtol=0, atol=0)  # one fp32 add, correctly rounded in both
    assert_within_rule(out, out64, ref_out, what="replayed out")
