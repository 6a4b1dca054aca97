"""``crossvit_fast::block_half`` (a branch block's residual half as one op) against ``block_half_ref`` in float64.

Tolerance rule (crossvit_fast.testing): the op's error against the float64 reference is at most twice the error of
the reference itself run in the same low dtype, plus a small atol; for the output and the gradients of x, the
LayerNorm's weight and bias and both Linears' weights and biases. Both halves (MLP: GELU; attention: self-attention
between the GEMMs), with and without biases and drop-path scale, odd sizes, a strided x. Without CUDA the kernels
run in Triton's CPU interpreter (bfloat16 as on the GPU: tests/gpu_numerics.py).
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.reference import block_half_ref
from crossvit_fast.testing import assert_within_rule, default_atol

kl = pytest.importorskip("crossvit_fast.kernels.linear", reason="triton is not installed")
from crossvit_fast.kernels import layer_norm as kln  # noqa: E402
from crossvit_fast.kernels import self_attention as ksa  # noqa: E402
from crossvit_fast.ops.block import block_half  # noqa: E402
from conftest import CUDA, DEV, LOW_DTYPES, assert_compiled_like_eager, forbid_launches, requires_cuda  # noqa: E402

PARAMS = ("ln_weight", "ln_bias", "w1", "b1", "w2", "b2")


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    monkeypatch.setattr(kl, "AUTOTUNE", False)
    monkeypatch.setattr(ksa, "AUTOTUNE", False)


def _ids(d):
    return str(d).replace("torch.", "")


def make(B, N, C, dtype, heads=0, hidden=None, bias=True, drop=True, x_dtype=torch.float32, strided=False):
    """Inputs of one half: a float32 residual stream (as under autocast) with a LayerNorm shift, weights in the
    compute dtype ``dtype``, float32 LayerNorm parameters and biases, a drop-path scale with a zero."""
    if strided:
        x = torch.randn(B, N, C + 8, device=DEV)[..., 3:3 + C]
    else:
        x = torch.randn(B, N, C, device=DEV)
    x = (x + 1.5).to(x_dtype)
    N1 = 3 * C if heads else (hidden or 3 * C)
    K2 = N1 // 3 if heads else N1
    args = dict(
        x=x,
        ln_weight=1 + 0.3 * torch.randn(C, device=DEV),
        ln_bias=0.3 * torch.randn(C, device=DEV),
        w1=(torch.randn(N1, C, device=DEV) / C ** 0.5).to(dtype),
        b1=torch.randn(N1, device=DEV) if bias else None,
        w2=(torch.randn(C, K2, device=DEV) / K2 ** 0.5).to(dtype),
        b2=torch.randn(C, device=DEV) if bias else None,
    )
    kw = dict(num_heads=heads)
    if drop:
        keep = torch.ones(B, device=DEV)
        keep[::2] = 0.0
        kw["scale"] = (keep / 0.7).to(dtype)
    return args, kw


def _run(fn, args, kw, dout, dtype64):
    leaves = {}
    call = {}
    for k, v in args.items():
        if v is None:
            call[k] = None
            continue
        t = v.detach()
        if dtype64:
            t = t.double()
        leaves[k] = t.requires_grad_()
        call[k] = t
    kw = dict(kw)
    if dtype64 and kw.get("scale") is not None:
        kw["scale"] = kw["scale"].double()
    out = fn(**call, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.to(out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def check(args, kw):
    dout = torch.randn(args["x"].shape, device=DEV)
    out, grads = _run(block_half, args, kw, dout, False)
    o64, g64 = _run(block_half_ref, args, kw, dout, True)
    olow, glow = _run(block_half_ref, args, kw, dout, False)
    assert out.dtype == olow.dtype and out.shape == args["x"].shape
    # the rule's atol is the compute dtype's (the GEMMs'), also for the float32 stream and parameters
    atol = default_atol(args["w1"].dtype)
    assert_within_rule(out, o64, olow, atol=atol, what="out")
    for name, g in grads.items():
        assert g.dtype == args[name].dtype and g.shape == args[name].shape, name
        assert_within_rule(g, g64[name], glow[name].to(g.dtype), atol=atol, what=f"d{name}")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=_ids)
@pytest.mark.parametrize("half", ["mlp", "attention"])
def test_both_halves(half, dtype):
    args, kw = make(2, 9, 32, dtype, heads=2 if half == "attention" else 0)
    check(args, kw)


@pytest.mark.parametrize("dtype", LOW_DTYPES[1:], ids=_ids)
@pytest.mark.parametrize("half", ["mlp", "attention"])
def test_layer_norm_kernel_first(half, dtype, monkeypatch):
    """Both halves with the first GEMM as the LayerNorm kernel + GEMM (``kl.LN_FIRST``, an autotuner candidate):
    the backward's saved rows and statistics come from the LayerNorm kernel; under the rule."""
    tile = ((16, 16, 16, 1, 1) if not CUDA else kl.CONFIGS["16bit-small"]) + (kl.LN_FIRST,)
    monkeypatch.setattr(kl, "_INTERPRETER_CONFIG", tile)
    monkeypatch.setattr(kl, "pick_config", lambda *a, **k: tile)
    calls = []
    real = kl.layer_norm_fwd
    monkeypatch.setattr(kl, "layer_norm_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    args, kw = make(2, 9, 48, dtype, heads=3 if half == "attention" else 0, strided=True)
    check(args, kw)
    assert calls


@pytest.mark.parametrize("dtype", LOW_DTYPES[1:], ids=_ids)
@pytest.mark.parametrize("half", ["mlp", "attention"])
@pytest.mark.parametrize("fwd", ["fused", "cublas"])
def test_dz_first_dgrad(fwd, half, dtype, monkeypatch):
    """Both halves with each GEMM's backward as DZ_FIRST (``kl.DZ_FIRST``, an autotuner candidate: the elementwise
    dz kernel, then cuBLAS): fc2 / proj's dz from the drop-path scale, fc1's from GELU', qkv's dz the attention's
    gradient itself; with the fused forward and with the CUBLAS forward (LayerNorm kernel, addmm, torch epilogue:
    the other candidate); under the rule."""
    real = kl.linear_dgrad
    used = []
    monkeypatch.setattr(kl, "linear_dgrad", lambda *a, **k: used.append(1) or real(*a, **dict(k, config=kl.DZ_FIRST)))
    if fwd == "cublas":
        real_fwd = kl.linear_fwd
        monkeypatch.setattr(kl, "linear_fwd", lambda *a, **k: real_fwd(*a, **dict(k, config=kl.CUBLAS)))
        forbid_launches(monkeypatch, kl, "_linear_fwd_kernel")
    if not CUDA:
        monkeypatch.setattr(kl, "DZ_ROWS", 32)
        monkeypatch.setattr(kl, "DZ_BLOCK_M", 16)
        monkeypatch.setattr(kl, "DZ_BLOCK_N", 16)
    forbid_launches(monkeypatch, kl, "_linear_dgrad_kernel")
    args, kw = make(3, 9, 48, dtype, heads=3 if half == "attention" else 0, strided=True)
    check(args, kw)
    assert len(used) == 2


@pytest.mark.parametrize("half", ["mlp", "attention"])
@pytest.mark.parametrize("case", ["no-bias-no-drop", "batch-1", "strided-x", "odd-hidden", "16-bit-stream"])
def test_variants(half, case):
    heads = 3 if half == "attention" else 0
    kw = dict(heads=heads)
    B, N, C = 3, 7, 48 if heads else 24  # not powers of two: three 16-wide heads; a 24-wide stream
    if case == "no-bias-no-drop":
        kw.update(bias=False, drop=False)
    elif case == "batch-1":
        B = 1
    elif case == "strided-x":
        kw.update(strided=True)
    elif case == "odd-hidden":
        if heads:
            pytest.skip("the attention half's widths follow the heads")
        kw.update(hidden=37)
    elif case == "16-bit-stream":
        kw.update(x_dtype=torch.float16)
    args, kwo = make(B, N, C, torch.float16 if case == "16-bit-stream" else torch.float32, **kw)
    check(args, kwo)


@pytest.mark.skipif(CUDA, reason="the autograd graph is the device's business only in speed; checked on the CPU")
def test_backward_adds_the_residual_gradient_in_the_layer_norm_kernel():
    """The separate ops leave autograd one add over the residual stream per half; the op leaves none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from crossvit_fast.ops.linear import linear

    args, kw = make(2, 5, 16, torch.float32)
    x = args["x"].detach().requires_grad_()

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, a=(), k=None):
            out = func(*a, **(k or {}))
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and out.shape == x.shape:
                self.n += 1
            return out

    def backward_adds(f):
        y = f()
        with Adds() as mode:
            torch.autograd.grad(y.sum(), [x])
        return mode.n

    def separate():
        h = linear(x, args["w1"], args["b1"], args["ln_weight"], args["ln_bias"], gelu=True)
        return linear(h, args["w2"], args["b2"], scale=kw["scale"], residual=x)

    assert backward_adds(separate) == 1
    assert backward_adds(lambda: block_half(x, **{k: v for k, v in args.items() if k != "x"}, **kw)) == 0


def test_opcheck():
    for heads, dtype in ((0, torch.float32), (2, torch.float32), (2, torch.float16)):
        args, kw = make(2, 5, 32, dtype, heads=heads)
        a = [args[k].detach().requires_grad_() if args[k] is not None else None for k in ("x",) + PARAMS]
        x, lw, lb, w1, b1, w2, b2 = a
        op = torch.ops.crossvit_fast.block_half.default
        torch.library.opcheck(op, (x, lw, lb, 1e-6, w1, b1, w2, b2, kw["scale"], heads, None, True))
        torch.library.opcheck(op, (x.detach(), lw.detach(), lb.detach(), 1e-6, w1.detach(), None, w2.detach(), None,
                                   None, heads, 0.3, False))
        out, y1, pre, o, o_lo, lse, ahat, mean, rstd = op(x.detach(), lw.detach(), lb.detach(), 1e-6, w1.detach(),
                                                          b1.detach(), w2.detach(), b2.detach(), kw["scale"], heads,
                                                          None, True)
        # the attention output's rounding residual: kept for a 16-bit compute dtype only
        assert o_lo.shape == (o.shape if heads and w1.dtype != torch.float32 else (0,))
        torch.library.opcheck(torch.ops.crossvit_fast.block_half_backward.default,
                              (torch.randn_like(out), x.detach(), lw.detach(), w1.detach(), w2.detach(), y1, pre, o,
                               o_lo, lse, ahat, mean, rstd, kw["scale"], heads, None))


def test_compile_fullgraph_aot_eager():
    """A whole block (attention half, then MLP half) under torch.compile(fullgraph=True): two opaque ops, the same
    output and gradients as eager."""
    att, kw = make(2, 7, 32, torch.float32, heads=2)
    mlp, _ = make(2, 7, 32, torch.float32, hidden=40)
    leaves = [att["x"]] + [att[k] for k in PARAMS] + [mlp[k] for k in PARAMS]
    leaves = [t.detach().requires_grad_() for t in leaves]

    def f(x, *p):
        x = block_half(x, *p[:6], scale=kw["scale"], num_heads=2)
        return block_half(x, *p[6:], scale=kw["scale"])

    assert_compiled_like_eager(f, leaves)


def test_flop_handle_counts_like_the_reference():
    pytest.importorskip("fvcore")
    from fvcore.nn import FlopCountAnalysis

    from crossvit_fast.flops import OP_HANDLES

    for heads in (0, 2):
        args, kw = make(2, 5, 32, torch.float32, heads=heads, drop=False)

        class Half(torch.nn.Module):
            def __init__(self, fn):
                super().__init__()
                self.fn = fn

            def forward(self, x):
                return self.fn(x, *(args[k] for k in PARAMS), num_heads=heads)

        counts = []
        for fn in (block_half_ref, block_half):
            a = FlopCountAnalysis(Half(fn), (args["x"],)).set_op_handle(**OP_HANDLES)
            a.unsupported_ops_warnings(False)
            counts.append(a.total())
        attn = 2 * 2 * 5 * 5 * 32 if heads else 0
        assert counts[0] == counts[1] == 2 * 5 * (5 * 32 + 96 * 32 + 32 * 96 // (3 if heads else 1)) + attn, counts


def test_backward_needs_the_saving_forward():
    args, kw = make(2, 5, 16, torch.float32)
    a = [args[k] for k in ("x",) + PARAMS]
    x = a[0].detach().requires_grad_()
    out = torch.ops.crossvit_fast.block_half(x, *a[1:3], 1e-6, *a[3:], None, 0, None, False)[0]
    with pytest.raises(RuntimeError, match="save=False"):
        out.sum().backward()


@pytest.fixture
def no_launch(monkeypatch):
    forbid_launches(monkeypatch, kl, "_linear_fwd_kernel", "_linear_dgrad_kernel")
    forbid_launches(monkeypatch, ksa, "self_attention_fwd", "_attn_fwd_kernel")
    forbid_launches(monkeypatch, kln, "_layer_norm_bwd_kernel")


def test_bad_inputs(no_launch):
    args, kw = make(2, 5, 16, torch.float32)
    p = {k: args[k] for k in PARAMS}

    def call(**over):
        a = dict(p, **{k: v for k, v in over.items() if k in p})
        return block_half(over.get("x", args["x"]), **a, **{k: v for k, v in over.items() if k not in p and k != "x"})

    with pytest.raises(ValueError, match=r"x must be \(B, N, C\)"):
        call(x=args["x"][0])
    with pytest.raises(ValueError, match="num_heads must be an int >= 0"):
        call(num_heads=-1)
    with pytest.raises(ValueError, match="3 \\* num_heads \\* head_dim"):
        call(num_heads=5)  # 48 rows: not 3 * 5 * D
    with pytest.raises(ValueError, match="3 \\* num_heads \\* head_dim"):
        call(num_heads=2)  # head dim 8: not a size the self-attention kernels take
    with pytest.raises(ValueError, match=r"w2 has shape \(16, 47\), expected \(16, 48\)"):
        call(w2=p["w2"][:, :47])
    with pytest.raises(TypeError, match="one compute dtype"):
        call(w2=p["w2"].half())
    with pytest.raises(ValueError, match=r"scale has shape \(3,\), expected \(2,\)"):
        call(scale=torch.ones(3, device=DEV))
    with pytest.raises(ValueError, match=r"b2 has shape \(15,\)"):
        call(b2=p["b2"][:15])
    with pytest.raises(ValueError, match="ln_weight has shape"):
        call(ln_weight=p["ln_weight"][:3])
    with pytest.raises(TypeError, match="w1 must be a torch.Tensor"):
        call(w1=None)
    with pytest.raises(ValueError, match="eps must be a float"):
        call(eps=-1.0)


@requires_cuda
@pytest.mark.parametrize("half", ["mlp", "attention"])
@pytest.mark.parametrize("C,heads,N", [pytest.param(224, 7, 401, marks=pytest.mark.smoke), (448, 7, 197)])
def test_cuda_family_shapes_bf16(half, C, heads, N):
    args, kw = make(4, N, C, torch.bfloat16, heads=heads if half == "attention" else 0)
    check(args, kw)
