"""Fused branch-block GEMM (``crossvit_fast::linear``) against ``linear_ref`` in float64, and the five-kernel Block.

Tolerance rule (crossvit_fast.testing): the kernel's error against the float64 reference is at most twice the error
of the reference itself run in the same low dtype, plus a small atol. Checked for the output and the gradients of
x, weight, bias, the LayerNorm's weight and bias and the residual, for every combination of the prologue and
epilogue flags. Without CUDA the kernels run in Triton's CPU interpreter (bfloat16 dots and stores as on the GPU:
tests/gpu_numerics.py).
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossvit_fast.reference import linear_ref
from crossvit_fast.testing import assert_within_rule, default_atol, poison_

kl = pytest.importorskip("crossvit_fast.kernels.linear", reason="triton is not installed")
from crossvit_fast.ops.linear import linear  # noqa: E402
from conftest import (  # noqa: E402
    CUDA, DEV, LOW_DTYPES, DispatchLog, assert_compiled_like_eager, cpu_only, forbid_launches, requires_cuda)

FLAGS = ("ln", "bias", "gelu", "scale", "res")
SMALL_TILES = (16, 16, 16, 1, 1)  # interpreter: several row/column tiles, K loops and ragged edges


def _ids(d):
    return str(d).replace("torch.", "")


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    """On CUDA, the default tiles instead of autotuning (tuning every case would dominate the test time, and the
    op-vs-launcher comparisons expect one tile per shape); the tests of the tuned path switch it back on."""
    monkeypatch.setattr(kl, "AUTOTUNE", False)


def rand(shape, dtype, layout="contiguous", scale=1.0, shift=0.0):
    """Random 3-D ``shape`` in a memory layout (a view of its storage)."""
    B, T, C = shape
    if layout == "contiguous":
        t = torch.randn(B, T, C, device=DEV)
    elif layout == "slice":
        t = torch.randn(B, T, C + 24, device=DEV)[..., 8:8 + C]
    elif layout == "transposed":
        t = torch.randn(C, T, B, device=DEV).permute(2, 1, 0)
    else:
        raise ValueError(layout)
    return (t * scale + shift).to(dtype)


def make(shape, N, dtype, flags, x_dtype=None, res_dtype=None, layout="contiguous", p_drop=0.5):
    """Inputs of one GEMM: x (the residual stream's dtype with a LayerNorm, as under autocast), weight in the
    compute dtype ``dtype``, float32 parameters, a drop-path scale with a zero, a residual."""
    B, T, K = shape
    x_dtype = x_dtype or dtype
    x = rand(shape, x_dtype, layout, shift=2.0 if "ln" in flags else 0.0)
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    if layout == "transposed":
        w = (torch.randn(K, N, device=DEV) / K ** 0.5).to(dtype).t()
    args = dict(x=x, weight=w)
    if "bias" in flags:
        args["bias"] = torch.randn(N, device=DEV).to(x_dtype)
    if "ln" in flags:
        args["ln_weight"] = (1 + 0.3 * torch.randn(K, device=DEV)).to(x_dtype)
        args["ln_bias"] = (0.3 * torch.randn(K, device=DEV)).to(x_dtype)
    if "gelu" in flags:
        args["gelu"] = True
    if "scale" in flags:
        keep = torch.ones(B, device=DEV)
        keep[::2] = 0.0
        args["scale"] = (keep / (1 - p_drop)).to(dtype)
    if "res" in flags:
        args["residual"] = rand((B, T, N), res_dtype or x_dtype, layout)
    return args


def reference(args, dout, dtype64=True):
    """Output and gradients of ``linear_ref``: in float64 (the oracle) or in the inputs' own dtypes (the rule's
    baseline)."""
    diff = ("x", "weight", "bias", "ln_weight", "ln_bias", "residual")
    leaves = {}
    call = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if dtype64:
                t = t.double()
            if k in diff:
                t = t.requires_grad_()
                leaves[k] = t
            call[k] = t
        else:
            call[k] = v
    out = linear_ref(**call)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def run_op(args, dout):
    leaves = {k: v.detach().requires_grad_() for k, v in args.items()
              if isinstance(v, torch.Tensor) and k != "scale"}
    call = dict(args, **leaves)
    out = linear(**call)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out, dict(zip(leaves, grads))


def check(args):
    """The op (forward + backward) and the launchers into NaN-poisoned buffers, against float64 under the rule."""
    a = dict(args)
    K = a["x"].shape[-1]
    N = a["weight"].shape[0]
    odt = kl.default_out_dtype(a["weight"].dtype, a.get("residual"))
    dout = torch.randn(tuple(a["x"].shape[:-1]) + (N,), device=DEV).to(odt)
    out, grads = run_op(a, dout)
    o64, g64 = reference(a, dout)
    olow, glow = reference(a, dout, dtype64=False)
    assert out.dtype == olow.dtype == odt, (out.dtype, olow.dtype, odt)
    # the rule's atol is the compute dtype's (the GEMM's), also for float32 outputs, streams and parameters
    atol = default_atol(a["weight"].dtype)
    assert_within_rule(out, o64, olow, atol=atol, what="out")
    for name, g in grads.items():
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        assert_within_rule(g, g64[name], glow[name].to(g.dtype), atol=atol, what=f"d{name}")
    # launchers into poisoned buffers: every element written
    kw = {k: v for k, v in a.items() if k != "x" and k != "weight"}
    o = poison_(torch.empty(tuple(a["x"].shape[:-1]) + (N,), dtype=odt, device=DEV))
    o2, pre, ahat, mean, rstd = kl.linear_fwd(a["x"], a["weight"], save=True, out=o, **kw)
    assert o2 is o
    torch.testing.assert_close(o, out.detach(), rtol=0, atol=0)
    M = a["x"].numel() // K
    if "ln_weight" in a:
        want = F.layer_norm(a["x"].float(), (K,), a["ln_weight"].float(), a["ln_bias"].float(), 1e-6)
        # a 16-bit ahat and the rounded F.layer_norm may round one ulp apart (bf16: 2**-7 relative)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[a["weight"].dtype]
        torch.testing.assert_close(ahat.float(), want.to(a["weight"].dtype).float().reshape(M, K), rtol=tol, atol=tol)
        torch.testing.assert_close(mean, a["x"].float().mean(-1).reshape(M), rtol=1e-5, atol=1e-5)
    if a.get("gelu"):
        z = F.linear(ahat if "ln_weight" in a else a["x"].to(a["weight"].dtype).reshape(M, K), a["weight"],
                     a["bias"].to(a["weight"].dtype) if "bias" in a else None)
        torch.testing.assert_close(pre.float(), z.float(), rtol=1e-2 if z.dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if z.dtype != torch.float32 else 1e-5)
    da = poison_(torch.empty(tuple(a["x"].shape), dtype=torch.float32, device=DEV))
    kl.linear_dgrad(dout, a["weight"], pre, a.get("scale"), torch.float32, da=da)
    assert not torch.isnan(da).any()


# ------------------------------------------------------------------------------------------------------------
# Every flag combination, odd sizes, layouts (interpreter on CPU; quick on CUDA)
# ------------------------------------------------------------------------------------------------------------

COMBOS = [c for r in range(len(FLAGS) + 1) for c in itertools.combinations(FLAGS, r)]


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=_ids)
@pytest.mark.parametrize("flags", COMBOS, ids=lambda c: "+".join(c) or "bare")
def test_every_flag_combination(flags, dtype):
    check(make((2, 5, 24), 20, dtype, flags))


@pytest.mark.parametrize("layout", ["contiguous", "slice"])
def test_int64_offsets(monkeypatch, layout):
    """The 64-bit offset specialisation (IDX64, taken when a tensor spans 2**31 elements or M x max(N, K) does;
    forced here by lowering the switch-over threshold): every prologue and epilogue, forward and dgrad."""
    monkeypatch.setattr(kl, "_INT32_MAX", 0)
    check(make((2, 5, 24), 20, torch.float32, FLAGS, layout=layout))


def test_reduction_stride_too_large_for_32_bit_products_is_copied():
    """The K loops' ``ks * stride`` and ``BLOCK_K * stride`` are 32-bit products even under IDX64: an operand whose
    stride along the reduction could overflow them is made contiguous first (meta tensors: strides, no storage)."""
    big = (2**31) // 256 + 1
    x = torch.empty_strided((3, 4), (1, big), device="meta")  # column-major, reduction stride `big`
    assert kl._reduction_stride_safe(x, 1).stride() == (4, 1)
    assert kl._reduction_stride_safe(x, 0) is x  # its row stride is fine
    w = torch.empty_strided((5, 4), (4, 1), device="meta")
    assert kl._reduction_stride_safe(w, 1) is w
    w = torch.empty_strided((5, 4), (big, 1), device="meta")  # the dgrad reduces a weight over its rows
    assert kl._reduction_stride_safe(w, 0).stride() == (1, 5)


def test_reduction_stride_copy_path(monkeypatch):
    """The launchers with that copy taken for every strided operand (threshold lowered): each GEMM operand is passed
    through the check along its reduction dim (forward: x's K, the weight's K; dgrad: dout's N, the weight's N), a
    transposed x and dout are copied, and forward and dgrad stay right on the copies."""
    monkeypatch.setattr(kl, "_MAX_BLOCK_K", 2**31)
    if not CUDA:
        monkeypatch.setattr(kl, "_INTERPRETER_CONFIG", SMALL_TILES)
    seen = []
    orig = kl._reduction_stride_safe

    def spy(t, dim):
        r = orig(t, dim)
        seen.append((t.dim(), dim, t.shape[dim], t.stride(dim) != 1, r.stride(dim)))
        return r

    monkeypatch.setattr(kl, "_reduction_stride_safe", spy)
    K, N = 40, 24
    check(make((2, 5, K), N, torch.float32, FLAGS, layout="transposed"))
    assert {c[:3] for c in seen} == {(3, 2, K), (2, 1, K), (3, 2, N), (2, 0, N)}, seen
    assert any(c[:2] == (3, 2) and c[3] for c in seen)  # the transposed view was among them
    assert all(c[4] == 1 for c in seen)  # and every operand the kernels got has unit reduction stride


@pytest.mark.parametrize("dtype", LOW_DTYPES[1:], ids=_ids)
@pytest.mark.parametrize("gemm", ["qkv", "proj", "fc1", "fc2"])
def test_autocast_dtypes(gemm, dtype):
    """The block's GEMMs as the Block calls them under autocast: float32 residual stream and parameters, the weight
    cast to the 16-bit compute dtype, 16-bit branch activations, float32 output of the residual adds."""
    flags = {"qkv": ("ln", "bias"), "proj": ("bias", "scale", "res"), "fc1": ("ln", "bias", "gelu"),
             "fc2": ("bias", "scale", "res")}[gemm]
    x_dtype = torch.float32 if "ln" in flags else dtype
    args = make((3, 7, 32), 48 if gemm in ("qkv", "fc1") else 32, dtype, flags, x_dtype=x_dtype,
                res_dtype=torch.float32)
    if "bias" in args:
        args["bias"] = args["bias"].float()
    check(args)


@pytest.mark.parametrize("shape_n", [((1, 1, 1), 1), ((1, 3, 7), 5), ((3, 13, 37), 35), ((2, 9, 48), 67)],
                         ids=lambda s: f"{'x'.join(map(str, s[0]))}-N{s[1]}")
def test_odd_sizes_many_tiles(shape_n, monkeypatch):
    """Odd M, K, N with small tiles: several row and column tiles, the grouped tile order, K loops, ragged edges."""
    if not CUDA:
        monkeypatch.setattr(kl, "_INTERPRETER_CONFIG", SMALL_TILES)
    shape, N = shape_n
    check(make(shape, N, torch.float32, FLAGS))
    check(make(shape, N, torch.float16, FLAGS, x_dtype=torch.float32, res_dtype=torch.float32))


@pytest.mark.parametrize("layout", ["slice", "transposed"])
def test_strided_inputs(layout, monkeypatch):
    if not CUDA:
        monkeypatch.setattr(kl, "_INTERPRETER_CONFIG", SMALL_TILES)
    check(make((3, 5, 40), 24, torch.float32, FLAGS, layout=layout))
    check(make((3, 5, 40), 24, torch.float16, ("bias", "scale", "res"), layout=layout))


def test_other_ranks_and_strided_out():
    w = torch.randn(12, 20, device=DEV)
    b = torch.randn(12, device=DEV)
    for x in (torch.randn(7, 20, device=DEV), torch.randn(20, device=DEV), torch.randn(2, 3, 4, 20, device=DEV),
              torch.randn(2, 3, 4, 20, device=DEV).transpose(1, 2)):
        torch.testing.assert_close(linear(x, w, b, gelu=True), linear_ref(x, w, b, gelu=True), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, 20, device=DEV)
    out = poison_(torch.empty(3, 12, 5, device=DEV)).transpose(1, 2)  # a strided preallocated output
    kl.linear_fwd(x, w, b, out=out)
    torch.testing.assert_close(out, linear_ref(x, w, b), rtol=1e-5, atol=1e-5)


def test_batch_0_and_1():
    w, b = torch.randn(8, 16, device=DEV), torch.randn(8, device=DEV)
    lw, lb = torch.randn(16, device=DEV), torch.randn(16, device=DEV)
    x = torch.randn(0, 5, 16, device=DEV, requires_grad=True)
    y = linear(x, w, b, lw, lb, residual=torch.randn(0, 5, 8, device=DEV), gelu=True)
    assert y.shape == (0, 5, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
    check(make((1, 1, 16), 8, torch.float32, FLAGS))
    check(make((1, 6, 16), 8, torch.float16, FLAGS, x_dtype=torch.float32, res_dtype=torch.float32))


def test_scale_zeroes_samples():
    """Drop-path scale 0 drops a sample's branch: out = residual exactly, and no gradient reaches x or W from it."""
    args = make((4, 3, 16), 16, torch.float32, ("ln", "bias", "scale", "res"))
    out = linear(**args)
    dropped = args["scale"] == 0
    assert torch.equal(out[dropped], args["residual"][dropped])
    x = args["x"].detach().requires_grad_()
    linear(**dict(args, x=x)).sum().backward()
    assert torch.equal(x.grad[dropped], torch.zeros_like(x.grad[dropped]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_propagates_to_its_row_only():
    args = make((2, 4, 16), 8, torch.float32, ("ln", "bias", "gelu"))
    args["x"][1, 2, 5] = float("nan")
    out = linear(**args)
    assert torch.isnan(out[1, 2]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(out[mask]).all()
    args = make((2, 4, 16), 8, torch.float32, ("bias",))
    args["weight"][3, 0] = float("nan")
    out = linear(**args)
    assert torch.isnan(out[..., 3]).all() and torch.isfinite(out[..., [0, 1, 2, 4, 5, 6, 7]]).all()


def test_deterministic_backward():
    args = make((3, 11, 24), 40, torch.float32, FLAGS)
    dout = torch.randn(3, 11, 40, device=DEV)
    a = run_op(args, dout)[1]
    b = run_op(args, dout)[1]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, lazy import, FLOPs
# ------------------------------------------------------------------------------------------------------------


def test_opcheck():
    x = torch.randn(2, 5, 24, device=DEV, requires_grad=True)
    w = torch.randn(16, 24, device=DEV, requires_grad=True)
    b = torch.randn(16, device=DEV, requires_grad=True)
    lw = torch.randn(24, device=DEV, requires_grad=True)
    lb = torch.randn(24, device=DEV, requires_grad=True)
    r = torch.randn(2, 5, 16, device=DEV, requires_grad=True)
    s = torch.tensor([0.0, 2.0], device=DEV)
    op = torch.ops.crossvit_fast.linear.default
    torch.library.opcheck(op, (x, w, b, lw, lb, 1e-6, True, s, r, None, True))
    torch.library.opcheck(op, (x.detach(), w.detach(), None, None, None, 1e-6, False, None, None, torch.float16,
                               False))
    out, pre, ahat, mean, rstd = op(x.detach(), w.detach(), b.detach(), lw.detach(), lb.detach(), 1e-6, True, s,
                                    None, None, True)
    torch.library.opcheck(torch.ops.crossvit_fast.linear_backward.default,
                          (torch.randn_like(out), x.detach(), w.detach(), pre, ahat, lw.detach(), mean, rstd, s))


def test_compile_fullgraph_aot_eager():
    def f(x, w, b, lw, lb, r):
        h = linear(x, w, b, lw, lb, gelu=True)
        return linear(h, w.t().contiguous(), None, residual=r)

    args = [torch.randn(2, 7, 16, device=DEV), torch.randn(16, 16, device=DEV), torch.randn(16, device=DEV),
            torch.randn(16, device=DEV), torch.randn(16, device=DEV), torch.randn(2, 7, 16, device=DEV)]
    args = [a.requires_grad_() for a in args]
    assert_compiled_like_eager(f, args)


def test_flop_handle_counts_like_the_reference():
    pytest.importorskip("fvcore")
    from fvcore.nn import FlopCountAnalysis

    from crossvit_fast.flops import OP_HANDLES

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(24), nn.Linear(24, 40)

        def forward(self, x, r):
            return r + F.gelu(self.fc(self.norm(x)))[..., :24]

    class Fused(Ref):
        def forward(self, x, r):
            return r + linear(x, self.fc.weight, self.fc.bias, self.norm.weight, self.norm.bias, gelu=True)[..., :24]

    args = (torch.randn(2, 5, 24, device=DEV), torch.randn(2, 5, 24, device=DEV))
    want = FlopCountAnalysis(Ref().to(DEV), args)
    got = FlopCountAnalysis(Fused().to(DEV), args).set_op_handle(**OP_HANDLES)
    for a in (want, got):
        a.unsupported_ops_warnings(False)
    assert got.total() == want.total() == 2 * 5 * (24 * 40 + 5 * 24)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear exception before any launch
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch):
    forbid_launches(monkeypatch, kl, "_linear_fwd_kernel", "_linear_dgrad_kernel", "_linear_dz_kernel")


def test_bad_inputs(no_launch):
    x = torch.randn(2, 5, 16, device=DEV)
    w, b = torch.randn(8, 16, device=DEV), torch.randn(8, device=DEV)
    lw = torch.randn(16, device=DEV)
    bad = [
        (dict(x=x.double()), TypeError, "x has dtype torch.float64"),
        (dict(weight=w.int()), TypeError, "weight has dtype torch.int32"),
        (dict(weight=w[:, :8]), ValueError, r"weight has shape \(8, 8\), expected \(N, 16\)"),
        (dict(weight=w.reshape(-1)), ValueError, "weight has shape"),
        (dict(bias=b[:4]), ValueError, r"bias has shape \(4,\), expected \(8,\)"),
        (dict(ln_weight=lw), ValueError, "both ln_weight and ln_bias"),
        (dict(ln_weight=lw[:8], ln_bias=lw[:8]), ValueError, r"ln_weight has shape \(8,\), expected \(16,\)"),
        (dict(residual=torch.randn(2, 5, 16, device=DEV)), ValueError, r"residual has shape \(2, 5, 16\)"),
        (dict(scale=torch.ones(3, device=DEV)), ValueError, "scale has shape"),
        (dict(out_dtype=torch.float64), TypeError, "out_dtype"),
        (dict(x=torch.randn(2, 5, 0, device=DEV), weight=w[:, :0]), ValueError, "last"),
    ]
    for change, exc, match in bad:
        args = dict(x=x, weight=w, bias=b)
        args.update(change)
        with pytest.raises(exc, match=match):
            kl.linear_fwd(**args)
        with pytest.raises(exc, match=match):
            linear(**args)
    with pytest.raises(ValueError, match="eps"):
        linear(x, w, b, lw, lw, eps=-1.0)
    with pytest.raises(TypeError, match="residual must be"):
        linear(x, w, b, residual=[1.0])
    with pytest.raises(ValueError, match="out must be"):
        kl.linear_fwd(x, w, b, out=torch.empty(2, 5, 9, device=DEV))
    with pytest.raises(ValueError, match="dout has shape"):
        kl.linear_dgrad(torch.randn(2, 5, 7, device=DEV), w)
    with pytest.raises(ValueError, match="pre must be"):
        kl.linear_dgrad(torch.randn(2, 5, 8, device=DEV), w, pre=torch.randn(10, 7, device=DEV))
    with pytest.raises(ValueError, match=r"weight has shape \(8, 0\); expected \(N, K\) with N, K >= 1"):
        kl.linear_dgrad(torch.randn(2, 5, 8, device=DEV), torch.randn(8, 0, device=DEV), bias_grad=True)


def test_cpu_tensor_refused_without_interpreter(no_launch, monkeypatch):
    monkeypatch.setattr(kl, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="CUDA"):
        kl.linear_fwd(torch.randn(2, 5, 16), torch.randn(8, 16))


@cpu_only
def test_bf16_refused_in_plain_interpreter(no_launch, plain_interpreter):
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="bfloat16"):
        kl.linear_fwd(x, torch.randn(8, 16).bfloat16())
    with pytest.raises(TypeError, match="bfloat16"):
        kl.linear_fwd(x, torch.randn(8, 16), out_dtype=torch.bfloat16)


@requires_cuda
def test_mixed_devices_refused(no_launch):
    x = torch.randn(2, 5, 16, device=DEV)
    with pytest.raises(ValueError, match="weight is on cpu"):
        kl.linear_fwd(x, torch.randn(8, 16))


# ------------------------------------------------------------------------------------------------------------
# The Block: five kernels under backend="triton", against the reference Block
# ------------------------------------------------------------------------------------------------------------


def _block_pair(train, drop_path=0.3, dim=32, heads=2, **kw):
    from crossvit_fast.layers import Block

    torch.manual_seed(0)
    ref = Block(dim, heads, 3.0, qkv_bias=True, drop_path=drop_path, backend="reference", **kw).to(DEV).train(train)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fused = copy.deepcopy(ref)
    fused.set_backend("triton")
    assert fused.linear_backend == "triton"
    return ref, fused


@pytest.fixture
def float32_drop_path_masks(monkeypatch):
    """Drop-path masks drawn in float32 whatever the branch's dtype: CUDA's ``bernoulli_`` draws a float64 tensor
    from other random numbers than a float32 / 16-bit one (on the CPU they agree), and the float64 reference must
    drop the samples the others drop. The fused block's scale and the reference's DropPath both call it."""
    import crossvit_fast.layers as layers

    def drop_path(x, drop_prob, training):
        if drop_prob == 0.0 or not training:
            return x
        keep = 1.0 - drop_prob
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device).bernoulli_(keep)
        return x * mask.div_(keep).to(x.dtype)

    monkeypatch.setattr(layers, "drop_path", drop_path)


def _run_block(m, x, autocast, dtype, seed=1):
    xx = x.detach().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path masks
    with torch.autocast(DEV.type, dtype=dtype, enabled=autocast):
        y = m(xx)
    w = torch.linspace(-1, 1, y.shape[-1], device=DEV)
    grads = torch.autograd.grad((y.double() * w).sum(), [xx] + list(m.parameters()))
    return y, grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-drop-path"])
def test_block_five_kernels(autocast, train, float32_drop_path_masks):
    """Logits and every gradient of the fused Block under the tolerance rule, against the reference Block in
    float64 and in the same precision (float32, or bfloat16 autocast); in training the drop-path
    masks are the reference's (the same seed draws the same masks)."""
    ref, fused = _block_pair(train)
    dtype = torch.bfloat16
    x = torch.randn(3, 11, 32, device=DEV)
    y, g = _run_block(fused, x, autocast, dtype)
    y_low, g_low = _run_block(ref, x, autocast, dtype)
    ref64 = copy.deepcopy(ref).double()
    y64, g64 = _run_block(ref64, x.double(), False, dtype)
    assert y.dtype == y_low.dtype == torch.float32
    assert_within_rule(y, y64, y_low, atol=1e-5, what="block output")
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, c, d in zip(names, g, g_low, g64):
        assert_within_rule(a, d, c, atol=1e-5, what=f"block grad {name}")


def test_block_runs_five_kernels_and_keeps_state(monkeypatch):
    """Under autocast the block runs its four GEMMs through block_half (the MLP half, and the attention half when the
    attention is fused) or linear, the attention's reference in between; no separate LayerNorm, add or cast of
    activations is left (only the per-call weight casts)."""
    from crossvit_fast.layers import Block

    ref, fused = _block_pair(True)
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fused.named_modules()]
    x = torch.randn(2, 5, 32, device=DEV)
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16), DispatchLog() as log:
        fused(x)
    seen = [n.rsplit(".", 1)[-1] for n in log.names]  # "crossvit_fast.block_half" -> "block_half"
    assert seen.count("block_half") >= 1 and seen.count("linear") + 2 * seen.count("block_half") == 4, seen
    assert not {"layer_norm", "native_layer_norm", "add", "gelu"} & set(seen), seen
    assert Block(32, 2, backend="auto").linear_backend == "torch"  # not GPU-verified


def test_block_dropout_takes_the_unfused_gemms_with_one_warning():
    import crossvit_fast.device as D

    ref, fused = _block_pair(True, proj_drop=0.1)
    D._warned.discard("linear-dropout")
    x = torch.randn(2, 5, 32, device=DEV)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.manual_seed(3)
        y = fused(x)
        fused(x)
    msgs = [str(m.message) for m in w if "fused linear kernel" in str(m.message)]
    assert len(msgs) == 1, msgs
    torch.manual_seed(3)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    fused.eval()
    ref.eval()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-5, atol=1e-5)  # eval: dropout off, fused path


class _IBMDropPath(nn.Module):
    """IBM/timm-0.4's drop path: ``floor(keep + U[0, 1))`` masks (other random draws than ``bernoulli_``)."""

    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _IBMBlock(nn.Module):
    """IBM CrossViT's Block layout: norm1, attn, one drop_path, norm2, mlp (fc1, act, fc2, drop)."""

    def __init__(self, dim, heads, src_attn):
        super().__init__()
        self.norm1, self.attn, self.drop_path = nn.LayerNorm(dim, eps=1e-6), src_attn, _IBMDropPath(0.4)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), _Mlp(dim, 3 * dim)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def test_optimize_foreign_block_with_its_own_drop_path():
    """optimize() swaps an IBM-layout block (its own drop-path rule) for Block: the five-kernel path draws the
    foreign module's masks (same outputs in training), state_dict unchanged."""
    import crossvit_fast
    from crossvit_fast.layers import Attention, Block

    torch.manual_seed(0)
    model = nn.Sequential(_IBMBlock(32, 2, Attention(32, 2, qkv_bias=True, backend="reference"))).to(DEV).train()
    keys = list(model.state_dict())
    x = torch.randn(4, 6, 32, device=DEV)
    torch.manual_seed(5)
    want = model(x)
    crossvit_fast.optimize(model, backend="triton")
    assert isinstance(model[0], Block) and model[0].linear_backend == "triton"
    assert list(model.state_dict()) == keys
    torch.manual_seed(5)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Whole small models: backend="triton" (five-kernel blocks) against the reference, logits and gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if CUDA else [torch.float16]), ids=_ids)
def test_small_model_logits_and_parameter_gradients(dtype, float32_drop_path_masks):
    import crossvit_fast
    from crossvit_fast.testing import fill_like_fixtures_

    kw = dict(img_size=96, num_classes=5, drop_path_rate=0.2)
    ref = crossvit_fast.create_model("crossvit_tiny_240", backend="reference", **kw).train()
    fill_like_fixtures_(ref, 0)
    fused = crossvit_fast.create_model("crossvit_tiny_240", backend="triton", **kw).train()
    fused.load_state_dict(ref.state_dict())
    ref_low = copy.deepcopy(ref).to(DEV, dtype)
    ref64 = ref.double().to(DEV)
    fused = fused.to(DEV, dtype)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64, device=DEV)
    outs = []
    for m, xx in ((ref64, x), (ref_low, x.to(dtype)), (fused, x.to(dtype))):
        torch.manual_seed(7)  # the same drop-path masks in all three
        y = m(xx)
        y.double().square().sum().backward()
        outs.append((y.detach(), torch.cat([p.grad.double().flatten() for _, p in sorted(m.named_parameters())])))
    (y64, g64), (ylow, glow), (y, g) = outs
    assert_within_rule(y, y64, ylow, what="logits")
    assert_within_rule(g.to(dtype), g64, glow.to(dtype), what="parameter gradients")


# ------------------------------------------------------------------------------------------------------------
# CUDA: bfloat16, the model family's shapes
# ------------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("C", [96, 128, 192, pytest.param(224, marks=pytest.mark.smoke), 384,
                               pytest.param(448, marks=pytest.mark.smoke), 768])  # smoke: crossvit_18_dagger_240
@pytest.mark.parametrize("gemm", ["qkv", "proj", "fc1", "fc2"])
def test_cuda_family_shapes_bf16(C, gemm):
    T = 401 if C <= 224 else 197
    flags = {"qkv": ("ln", "bias"), "proj": ("bias", "scale", "res"), "fc1": ("ln", "bias", "gelu"),
             "fc2": ("bias", "scale", "res")}[gemm]
    K = 3 * C if gemm == "fc2" else C
    N = 3 * C if gemm in ("qkv", "fc1") else C
    args = make((4, T, K), N, torch.bfloat16, flags, x_dtype=torch.float32 if "ln" in flags else torch.bfloat16,
                res_dtype=torch.float32)
    check(args)


@requires_cuda
def test_cuda_graph_capture():
    args = make((8, 401, 224), 672, torch.bfloat16, ("ln", "bias", "gelu"), x_dtype=torch.float32)
    out = linear(**args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = linear(**args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=_ids)
@pytest.mark.parametrize("gemm", ["qkv", "fc1"])
def test_layer_norm_kernel_first(gemm, dtype, monkeypatch):
    """The LN_FIRST forward (the layer_norm kernel writes the rounded normalised rows, then the GEMM reads them;
    one of the autotuner's candidates for the LayerNorm-prologue GEMMs): the op's output and every gradient under
    the rule, the launchers' out / z / ahat / mean / rstd written in full (NaN-poisoned buffers), as the Block
    calls it (float32 stream under a 16-bit compute dtype) and in one dtype; ragged tiles."""
    tile = (SMALL_TILES if not CUDA else kl.CONFIGS["16bit-small"]) + (kl.LN_FIRST,)
    monkeypatch.setattr(kl, "_INTERPRETER_CONFIG", tile)
    monkeypatch.setattr(kl, "pick_config", lambda *a, **k: tile)  # CUDA (autotuning off in these tests)
    flags = ("ln", "bias") if gemm == "qkv" else ("ln", "bias", "gelu")
    x_dtype = torch.float32 if dtype != torch.float32 else dtype
    args = make((3, 13, 40), 35, dtype, flags, x_dtype=x_dtype, layout="slice")
    calls = []
    real = kl.layer_norm_fwd
    monkeypatch.setattr(kl, "layer_norm_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    check(args)
    assert calls  # the LayerNorm kernel ran (not the prologue)


def _force_dz_first(monkeypatch, rows=(64, 16, 16)):
    """Every dgrad as DZ_FIRST (the elementwise dz kernel, then torch.mm); small dz programs on the interpreter so
    that several row programs and ragged edges run. Returns the list the dz kernel's launches append to."""
    real = kl.linear_dgrad
    monkeypatch.setattr(kl, "linear_dgrad", lambda *a, **k: real(*a, **dict(k, config=kl.DZ_FIRST)))
    if not CUDA:
        monkeypatch.setattr(kl, "DZ_ROWS", rows[0])
        monkeypatch.setattr(kl, "DZ_BLOCK_M", rows[1])
        monkeypatch.setattr(kl, "DZ_BLOCK_N", rows[2])
    forbid_launches(monkeypatch, kl, "_linear_dgrad_kernel")
    spy = _Spy(kl._linear_dz_kernel)
    monkeypatch.setattr(kl, "_linear_dz_kernel", spy)
    return spy.calls


class _Spy:
    """Stands in for a jitted kernel: launches it and records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


LOW16 = LOW_DTYPES[1:]


@pytest.mark.parametrize("dtype", LOW16, ids=_ids)
@pytest.mark.parametrize("gemm", ["qkv", "proj", "fc1", "fc2"])
def test_dz_first_dgrad(gemm, dtype, monkeypatch):
    """The DZ_FIRST backward (an autotuner candidate for 16-bit dgrads: the elementwise kernel writes dz and the bias
    gradient's partial sums, cuBLAS computes da): the op's output and every gradient under the rule, as the Block
    calls each GEMM (float32 stream and LayerNorm, 16-bit compute), strided x, ragged sizes; the launcher into a
    NaN-poisoned float32 da (check's last step)."""
    calls = _force_dz_first(monkeypatch)
    flags = {"qkv": ("ln", "bias"), "proj": ("bias", "scale", "res"), "fc1": ("ln", "bias", "gelu"),
             "fc2": ("bias", "scale", "res")}[gemm]
    x_dtype = torch.float32 if "ln" in flags else dtype
    args = make((3, 29, 40), 35, dtype, flags, x_dtype=x_dtype, res_dtype=torch.float32, layout="slice")
    check(args)
    assert calls  # the elementwise kernel ran (the fused dgrad is forbidden)


@pytest.mark.parametrize("case", ["gelu+scale", "scale", "dz-is-dout", "float32-dout"])
@pytest.mark.parametrize("da_kind", ["compute", "float32", "strided", "other-16-bit"])
def test_dz_first_launcher_matches_the_fused_dgrad(case, da_kind):
    """linear_dgrad with DZ_FIRST against the fused dgrad kernel on the same inputs: dz equal, da and the bias
    gradient within float32 summation order; every element of a poisoned (strided or other-dtype) da written; dz
    not stored when it is dout itself; 1 row and several row programs."""
    ct = torch.float16 if not CUDA else torch.bfloat16
    fused_cfg = SMALL_TILES if not CUDA else kl.CONFIGS["16bit-small"]
    N, K = 37, 24
    for B, T in ((1, 1), (3, 101)):
        M = B * T
        ddt = torch.float32 if case == "float32-dout" else ct
        dout = rand((B, T, N), ddt, "slice" if case == "scale" else "contiguous")
        w = (torch.randn(N, K, device=DEV) / 5).to(ct)
        pre = torch.randn(M, N, device=DEV).to(ct) if case == "gelu+scale" else None
        scale = torch.rand(B, device=DEV).to(ct) if "scale" in case else None
        da_dtype = {"compute": ct, "float32": torch.float32, "strided": torch.float32,
                    "other-16-bit": torch.bfloat16 if ct == torch.float16 else torch.float16}[da_kind]
        if da_kind == "other-16-bit" and not CUDA and da_dtype == torch.bfloat16:
            da_dtype = torch.float32  # the interpreter refuses bfloat16
        da1, dz1, db1 = kl.linear_dgrad(dout, w, pre, scale, da_dtype, True, True, config=fused_cfg)
        da = torch.empty(B, T, K + 5, dtype=da_dtype, device=DEV)[..., 2:2 + K] if da_kind == "strided" else \
            torch.empty(B, T, K, dtype=da_dtype, device=DEV)
        poison_(da)
        old = (kl.DZ_ROWS, kl.DZ_BLOCK_M, kl.DZ_BLOCK_N, kl._linear_dz_kernel)
        spy = _Spy(kl._linear_dz_kernel)
        if not CUDA:
            kl.DZ_ROWS, kl.DZ_BLOCK_M, kl.DZ_BLOCK_N = 64, 16, 16
        kl._linear_dz_kernel = spy
        try:
            da2, dz2, db2 = kl.linear_dgrad(dout, w, pre, scale, da_dtype, True, True, da=da, config=kl.DZ_FIRST)
            da3, nodz, db3 = kl.linear_dgrad(dout, w, pre, scale, da_dtype, False, True, config=kl.DZ_FIRST)
        finally:
            kl.DZ_ROWS, kl.DZ_BLOCK_M, kl.DZ_BLOCK_N, kl._linear_dz_kernel = old
        assert da2 is da and nodz is None
        # dz written when stored; not stored: written to a scratch for the GEMM unless dz is dout itself
        assert [c["STORE_DZ"] for c in spy.calls] == [True, case != "dz-is-dout"]
        torch.testing.assert_close(da3, da2, rtol=0, atol=0)
        tol = dict(rtol=0, atol=0) if not CUDA else dict(rtol=1e-2, atol=1e-2)  # CUDA: FMA contraction may differ
        torch.testing.assert_close(dz2, dz1, **tol)
        exact = dz1.double() @ w.double()
        err1 = (da1.double() - exact.reshape(da1.shape)).abs().max().item()
        err2 = (da2.double() - exact.reshape(da2.shape)).abs().max().item()
        ulp = torch.finfo(da_dtype).eps * exact.abs().max().item()
        assert err2 <= 2 * err1 + 4 * ulp + 1e-6, (err1, err2)
        torch.testing.assert_close(db2, dz2.double().sum(0).float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(db3, db2, rtol=1e-5, atol=1e-5)


def test_cublas_configs_refuse_float32(no_launch):
    w = torch.randn(8, 4, device=DEV)
    with pytest.raises(ValueError, match="16-bit compute dtype"):
        kl.linear_dgrad(torch.randn(2, 3, 8, device=DEV), w, config=kl.DZ_FIRST)
    with pytest.raises(ValueError, match="16-bit compute dtype"):
        kl.linear_fwd(torch.randn(2, 3, 4, device=DEV), w, config=kl.CUBLAS)


@pytest.mark.parametrize("dtype", LOW16, ids=_ids)
@pytest.mark.parametrize("gemm", ["qkv", "proj", "fc1", "fc2", "plain", "gelu+scale"])
def test_cublas_forward(gemm, dtype, monkeypatch):
    """The CUBLAS forward (an autotuner candidate for 16-bit GEMMs: the LayerNorm kernel, addmm, torch's epilogue):
    the op's output and every gradient under the rule, the launchers' out / z / ahat / mean / rstd written in full
    (NaN-poisoned buffers, a strided x and residual), as the Block calls each GEMM and in one dtype."""
    real = kl.linear_fwd
    monkeypatch.setattr(kl, "linear_fwd", lambda *a, **k: real(*a, **dict(k, config=kl.CUBLAS)))
    forbid_launches(monkeypatch, kl, "_linear_fwd_kernel")
    flags = {"qkv": ("ln", "bias"), "proj": ("bias", "scale", "res"), "fc1": ("ln", "bias", "gelu"),
             "fc2": ("bias", "scale", "res"), "plain": (), "gelu+scale": ("gelu", "scale")}[gemm]
    x_dtype = torch.float32 if "ln" in flags else dtype
    args = make((3, 13, 40), 35, dtype, flags, x_dtype=x_dtype, res_dtype=torch.float32, layout="slice")
    check(args)


@pytest.mark.parametrize("shape", [(24,), (5, 24), (2, 1, 3, 24), (0, 4, 24), (1, 1, 24)], ids=str)
def test_cublas_and_dz_first_other_ranks(shape):
    """CUBLAS forward and DZ_FIRST backward on 1-D, 2-D, 4-D and empty x / dout, batch 1: as the fused tiles."""
    ct = torch.float16 if not CUDA else torch.bfloat16
    tile = SMALL_TILES if not CUDA else kl.CONFIGS["16bit-small"]
    x = torch.randn(shape, device=DEV)
    w = (torch.randn(20, 24, device=DEV) / 5).to(ct)
    lw, lb, b = 1 + torch.randn(24, device=DEV) / 4, torch.randn(24, device=DEV) / 4, torch.randn(20, device=DEV)
    scale = torch.rand(shape[0] if len(shape) > 1 else 1, device=DEV).to(ct)
    for kw in (dict(ln_weight=lw, ln_bias=lb, bias=b, gelu=True), dict(bias=b, scale=scale, gelu=True)):
        xx = x if "ln_weight" in kw else x.to(ct)
        want = kl.linear_fwd(xx, w, save=True, config=tile, **kw)
        got = kl.linear_fwd(xx, w, save=True, config=kl.CUBLAS, **kw)
        for g, t in zip(got, want):
            if t is not None:
                torch.testing.assert_close(g.float(), t.float(), rtol=2e-2, atol=2e-2)
        dout = torch.randn(shape[:-1] + (20,), device=DEV).to(ct)
        pre = want[1] if kw.get("gelu") else None
        sc = kw.get("scale")
        d1 = kl.linear_dgrad(dout, w, pre, sc, torch.float32, True, True, config=tile)
        d2 = kl.linear_dgrad(dout, w, pre, sc, torch.float32, True, True, config=kl.DZ_FIRST)
        for g, t in zip(d2, d1):
            assert g.shape == t.shape
            torch.testing.assert_close(g.float(), t.float(), rtol=1e-3, atol=1e-3)


def test_cublas_launchers_under_grad_mode():
    """The cuBLAS configs' out= calls run below autograd: a launcher called with inputs that require grad works."""
    ct = torch.float16 if not CUDA else torch.bfloat16
    w = torch.randn(20, 24, device=DEV).to(ct).requires_grad_()
    x = torch.randn(3, 24, device=DEV).to(ct).requires_grad_()
    out, *_ = kl.linear_fwd(x, w, residual=torch.randn(3, 20, device=DEV).requires_grad_(), config=kl.CUBLAS)
    da, *_ = kl.linear_dgrad(torch.randn(3, 20, device=DEV).to(ct), w, config=kl.DZ_FIRST)
    assert not out.requires_grad and not da.requires_grad


def test_cublas_forward_into_the_residual_and_other_outputs():
    """CUBLAS into ``out=`` the residual (in place), into a strided out, with ``out_dtype``: as the fused kernel."""
    ct = torch.float16 if not CUDA else torch.bfloat16
    tile = SMALL_TILES if not CUDA else kl.CONFIGS["16bit-small"]
    args = make((2, 7, 24), 20, ct, ("bias", "scale", "res"), res_dtype=torch.float32)
    want, *_ = kl.linear_fwd(**args, config=tile)
    res = args["residual"].clone()
    got, *_ = kl.linear_fwd(**dict(args, residual=res), out=res, config=kl.CUBLAS)
    assert got is res
    tol = 1e-3 if ct == torch.float16 else 2e-2  # cuBLAS rounds z to ct before the residual add, the tile does not
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    o = poison_(torch.empty(2, 7, 29, dtype=ct, device=DEV))[..., 3:23]
    got, *_ = kl.linear_fwd(**args, out_dtype=ct, out=o, config=kl.CUBLAS)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    gs = make((2, 7, 24), 20, ct, ("gelu", "scale"))  # no residual, into a strided out
    o = poison_(torch.empty(2, 7, 29, dtype=ct, device=DEV))[..., 3:23]
    got, *_ = kl.linear_fwd(**gs, out=o, config=kl.CUBLAS)
    want, *_ = kl.linear_fwd(**gs, config=tile)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    plain = make((1, 5, 24), 20, ct, ())
    o = poison_(torch.empty(1, 5, 20, dtype=ct, device=DEV))
    got, *_ = kl.linear_fwd(**plain, out=o, config=kl.CUBLAS)
    want, *_ = kl.linear_fwd(**plain, config=tile)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@requires_cuda
@pytest.mark.parametrize("gemm", ["qkv", "fc2"])
def test_cuda_autotuned(monkeypatch, gemm):
    """Tuned forward and backward: under the rule; each key timed once and remembered (a second call times nothing);
    the op's result is the chosen tile's."""
    monkeypatch.setattr(kl, "AUTOTUNE", True)
    monkeypatch.setattr(kl.TUNER, "chosen", {})
    flags = {"qkv": ("ln", "bias"), "fc2": ("bias", "scale", "res")}[gemm]
    K, N = (224, 672) if gemm == "qkv" else (672, 224)
    args = make((4, 401, K), N, torch.bfloat16, flags, x_dtype=torch.float32 if "ln" in flags else torch.bfloat16,
                res_dtype=torch.float32)
    dout = torch.randn(4, 401, N, device=DEV).to(kl.default_out_dtype(torch.bfloat16, args.get("residual")))
    out, grads = run_op(args, dout)
    o64, g64 = reference(args, dout)
    olow, glow = reference(args, dout, dtype64=False)
    atol = default_atol(torch.bfloat16)  # the GEMM's dtype, also for a float32 x
    assert_within_rule(out, o64, olow, atol=atol, what="out")
    assert_within_rule(grads["x"], g64["x"], glow["x"].to(grads["x"].dtype), atol=atol, what="dx")
    tuned = kl.tuned_configs()
    assert {k[0] for k in tuned} == {"fwd", "dgrad"}
    assert all(c in (kl.fwd_candidates(torch.bfloat16, "ln" in flags) if k[0] == "fwd" else
                     kl.dgrad_candidates(torch.bfloat16)) for k, c in tuned.items())
    calls = []
    monkeypatch.setattr(kl.TUNER, "timer", lambda fn: calls.append(1) or 1.0)
    out2, _ = run_op(args, dout)
    assert not calls and kl.tuned_configs() == tuned
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    fwd = next(c for k, c in tuned.items() if k[0] == "fwd")
    want, *_ = kl.linear_fwd(save=True, config=fwd, **args)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@requires_cuda
def test_cuda_autotune_pick_on_disk_is_loaded_by_the_next_process(monkeypatch):
    """The real environment fingerprint and Triton's cache manager: a tuned key's pick is written, and a process
    that has not tuned it (no picks in memory) loads it and times nothing."""
    import uuid

    fingerprint = kl.TUNER.fingerprint(torch.cuda.current_device())
    assert torch.cuda.get_device_name() in fingerprint and kl.triton.__version__ in fingerprint
    salt = uuid.uuid4().hex  # a fresh entry in the real cache dir (whose compiled kernels stay warm)
    real = kl.TUNER.fingerprint
    monkeypatch.setattr(kl.TUNER, "fingerprint", lambda index: real(index) + salt)
    monkeypatch.setattr(kl, "AUTOTUNE", True)
    monkeypatch.setattr(kl, "AUTOTUNE_CACHE", True)
    monkeypatch.setattr(kl.TUNER, "chosen", {})
    args = make((4, 197, 192), 576, torch.bfloat16, ("ln", "bias"), x_dtype=torch.float32)
    first, *_ = kl.linear_fwd(**args)
    tuned = kl.tuned_configs()
    (key,) = tuned
    manager, name = kl.TUNER.disk_entry(key)
    assert manager(kl.TUNER.disk_hash(key, kl.fwd_candidates(torch.bfloat16, True, 192))).get_file(name) is not None
    kl.TUNER.chosen.clear()
    calls = []
    monkeypatch.setattr(kl.TUNER, "timer", lambda fn: calls.append(1) or 1.0)
    again, *_ = kl.linear_fwd(**args)
    assert not calls and kl.tuned_configs() == tuned
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@requires_cuda
def test_cuda_autotune_never_reruns_into_an_aliased_output(monkeypatch):
    """``out=`` the residual (in place): timing would add the branch several times, so that launch is not tuned."""
    monkeypatch.setattr(kl, "AUTOTUNE", True)
    monkeypatch.setattr(kl, "AUTOTUNE_CACHE", False)  # a pick on disk would be loaded (not timed) for it
    monkeypatch.setattr(kl.TUNER, "chosen", {})
    args = make((2, 197, 448), 448, torch.bfloat16, ("bias", "res"), res_dtype=torch.bfloat16)
    kl.linear_fwd(**args)
    assert kl.tuned_configs()  # a launch into a fresh output is tuned
    kl.TUNER.chosen.clear()
    default = kl.pick_config(2 * 197, 448, torch.bfloat16, kl._sm_count(args["x"]))
    want, *_ = kl.linear_fwd(**args, config=default)
    res = args["residual"].clone()
    got, *_ = kl.linear_fwd(**dict(args, residual=res), out=res)
    assert got is res and not kl.tuned_configs()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("gelu_scale", [(False, False), (True, True)], ids=["dz-is-dout", "gelu+scale"])
@pytest.mark.parametrize("M_shape", [(3, 13), (1, 1), (2, 40)], ids=lambda s: "x".join(map(str, s)))
def test_dgrad_bias_gradient_from_partial_sums(gelu_scale, M_shape):
    """The dgrad kernel's per-row-tile column sums of dz, summed by the launcher: the bias gradient, without a
    second pass over dz (several row tiles, ragged edges, one row)."""
    gelu, with_scale = gelu_scale
    B, T = M_shape
    N, K = 37, 24
    dtype = torch.float32
    dout = torch.randn(B, T, N, device=DEV, dtype=dtype)
    w = torch.randn(N, K, device=DEV, dtype=dtype)
    pre = torch.randn(B * T, N, device=DEV, dtype=dtype) if gelu else None
    scale = torch.rand(B, device=DEV, dtype=dtype) if with_scale else None
    da, dz, db = kl.linear_dgrad(dout, w, pre, scale, None, True, True, config=SMALL_TILES)
    torch.testing.assert_close(db, dz.double().sum(0).float(), rtol=1e-5, atol=1e-5)
    da2, dz2, none = kl.linear_dgrad(dout, w, pre, scale, None, True, False, config=SMALL_TILES)
    assert none is None and torch.equal(da, da2) and torch.equal(dz, dz2)
    if not gelu and not with_scale:  # dz not stored (it is dout): the sums still come from the kernel
        _, nodz, db3 = kl.linear_dgrad(dout, w, None, None, None, False, True, config=SMALL_TILES)
        assert nodz is None
        torch.testing.assert_close(db3, dout.double().sum((0, 1)).float(), rtol=1e-5, atol=1e-5)
    empty = kl.linear_dgrad(dout[:0], w, None, None, None, True, True)[2]
    assert empty.shape == (N,) and not empty.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_ids)  # 16-bit: fp16 (bf16 dots: GPU only)
@pytest.mark.parametrize("gelu", [False, True], ids=["qkv", "fc1"])
def test_layer_norm_prologue_only_in_float32(dtype, gelu, monkeypatch):
    """A 16-bit LayerNorm GEMM runs as the layer_norm kernel (each row normalised once) and the GEMM without
    prologue whatever tile it is given (the in-GEMM prologue serialized its wgmma loop on sm_90: kernels/linear.py,
    Tuning); float32 keeps the prologue (FMA loops, no wgmma). The bare tile's result is the LN_FIRST tile's."""
    spy = _Spy(kl._linear_fwd_kernel)
    monkeypatch.setattr(kl, "_linear_fwd_kernel", spy)
    calls = []
    real = kl.layer_norm_fwd
    monkeypatch.setattr(kl, "layer_norm_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = make((2, 9, 40), 24, dtype, ("ln", "bias", "gelu") if gelu else ("ln", "bias"), x_dtype=torch.float32)
    kw = {k: v for k, v in args.items() if k not in ("x", "weight")}
    sixteen = dtype != torch.float32
    for save in (False, True):
        got = kl.linear_fwd(args["x"], args["weight"], save=save, config=SMALL_TILES, **kw)
        assert [c["HAS_LN"] for c in spy.calls] == [not sixteen]
        assert len(calls) == (1 if sixteen else 0)
        spy.calls.clear()
        calls.clear()
        if sixteen:
            want = kl.linear_fwd(args["x"], args["weight"], save=save, config=SMALL_TILES + (kl.LN_FIRST,), **kw)
            for g, w in zip(got, want):
                assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
            spy.calls.clear()
            calls.clear()


@pytest.mark.parametrize("case", ["gelu", "gelu+scale", "scale", "float32-dout", "dz-is-dout", "dz-is-dout-no-db"])
def test_16bit_dgrad_forms_dz_once_then_a_plain_gemm(case, monkeypatch):
    """Every 16-bit dgrad that needs dz formed (GELU', a scale, a cast) or the bias gradient runs the elementwise dz
    kernel once (GELU' once per element, not once per output column tile), then the dgrad GEMM with no prologue and
    no column sums (both serialized its wgmma loop on sm_90); dz not needed: the GEMM alone on dout. dz and the bias
    gradient equal DZ_FIRST's, da within float32 summation order."""
    ct = torch.float16 if not CUDA else torch.bfloat16
    if not CUDA:
        monkeypatch.setattr(kl, "DZ_ROWS", 32)
        monkeypatch.setattr(kl, "DZ_BLOCK_M", 16)
        monkeypatch.setattr(kl, "DZ_BLOCK_N", 16)
    dz_spy, gemm_spy = _Spy(kl._linear_dz_kernel), _Spy(kl._linear_dgrad_kernel)
    monkeypatch.setattr(kl, "_linear_dz_kernel", dz_spy)
    monkeypatch.setattr(kl, "_linear_dgrad_kernel", gemm_spy)
    B, T, N, K = 3, 21, 37, 24
    M = B * T
    dout = rand((B, T, N), torch.float32 if case == "float32-dout" else ct, "slice")
    w = (torch.randn(N, K, device=DEV) / 5).to(ct)
    pre = torch.randn(M, N, device=DEV).to(ct) if "gelu" in case else None
    scale = torch.rand(B, device=DEV).to(ct) if "scale" in case else None
    store = not case.startswith("dz-is-dout")
    bias_grad = case != "dz-is-dout-no-db"
    da, dz, db = kl.linear_dgrad(dout, w, pre, scale, torch.float32, store, bias_grad, config=SMALL_TILES)
    assert len(dz_spy.calls) == (0 if case == "dz-is-dout-no-db" else 1)
    assert [c["STORE_DZ"] for c in dz_spy.calls] == [store] * len(dz_spy.calls)
    assert [(c["GELU"], c["HAS_SCALE"], c["STORE_DZ"], c["HAS_DB"]) for c in gemm_spy.calls] == [(False,) * 4]
    da2, dz2, db2 = kl.linear_dgrad(dout, w, pre, scale, torch.float32, store, bias_grad, config=kl.DZ_FIRST)
    assert (dz is None) == (dz2 is None) == (not store) and (db is None) == (db2 is None) == (not bias_grad)
    if store:
        torch.testing.assert_close(dz, dz2, rtol=0, atol=0)
    if bias_grad:
        torch.testing.assert_close(db, db2, rtol=0, atol=0)
    torch.testing.assert_close(da, da2, rtol=1e-5, atol=1e-5)
