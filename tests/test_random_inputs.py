"""Randomized inputs for the five fused ops, each judged by the tolerance rule against the float64 reference.

Every case is drawn from its own seed, ``crc32("<CROSSVIT_FAST_TEST_SEED>:<op>:<index>")``: shapes (1, primes,
non-powers of two), dtypes, the layout of every tensor argument (contiguous, transposed, sliced, stepped, expanded;
strided 1-D parameters), aliasing, values (normal, shifted, near-constant and constant rows), forward and backward,
and NaN / inf forwards for the row-local ops. A failure's message names the case's draws and the command that
replays it. ``test_bad_input`` draws a valid case, breaks one argument (dtype, device -- meta included --, size) and
asserts a clear error naming the op before any kernel launch.

``CROSSVIT_FAST_RANDOM_CASES`` (conftest, default 12 per op and test) sets how many cases run: CI runs the
default; ``CROSSVIT_FAST_RANDOM_CASES=200`` with ``CROSSVIT_FAST_TEST_SEED=1 2 3 ...`` is the long sweep.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from conftest import RANDOM_CASES, SEED, forbid_launches
from crossvit_fast.reference import (block_half_ref, cls_cross_attention_ref, layer_norm_ref, linear_ref,
                                     self_attention_ref)
from crossvit_fast.testing import assert_within_rule, default_atol

pytest.importorskip("triton", reason="triton is not installed")
from crossvit_fast.ops.block import block_half  # noqa: E402
from crossvit_fast.ops.cls_cross_attention import cls_cross_attention  # noqa: E402
from crossvit_fast.ops.layer_norm import layer_norm  # noqa: E402
from crossvit_fast.ops.linear import linear  # noqa: E402
from crossvit_fast.ops.self_attention import self_attention  # noqa: E402
import crossvit_fast.kernels.cls_cross_attention as kcls  # noqa: E402
import crossvit_fast.kernels.layer_norm as kln  # noqa: E402
import crossvit_fast.kernels.linear as kl  # noqa: E402
import crossvit_fast.kernels.self_attention as ksa  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SIZES = (1, 2, 3, 5, 7, 13)
WIDTHS = (1, 2, 3, 5, 8, 17, 40, 96, 100, 197, 384)


@pytest.fixture(autouse=True)
def _fixed_configs(monkeypatch):
    monkeypatch.setattr(kl, "AUTOTUNE", False)
    monkeypatch.setattr(ksa, "AUTOTUNE", False)


class Arg:
    """One tensor argument: the stored ``base`` (the leaf the gradient reaches) and the ``view`` the op is given."""

    def __init__(self, base, view=lambda t: t, diff=True, layout="contiguous"):
        self.base, self.view, self.diff, self.layout = base, view, diff, layout


class Draw:
    """The random choices of one case, from its own seed; ``notes`` lists them for the failure message."""

    def __init__(self, op: str, index: int):
        self.op, self.index = op, index
        self.seed = zlib.crc32(f"{SEED}:{op}:{index}".encode())
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.notes = []

    def choice(self, name, options):
        value = self.rng.choice(options)
        self.notes.append(f"{name}={value}".replace("torch.", ""))
        return value

    def coin(self, name, p=0.5):
        value = self.rng.random() < p
        self.notes.append(f"{name}={int(value)}")
        return value

    def __str__(self):
        return (f"{self.op} case {self.index} (seed {self.seed}: {', '.join(self.notes)}); replay: "
                f"CROSSVIT_FAST_TEST_SEED={SEED} python -m pytest tests/test_random_inputs.py -k "
                f"'{self.op}-case{self.index}]'")

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen)

    def values(self, name, shape, kinds=("normal", "normal", "shifted", "near-constant", "constant")):
        """Values for a row-normalised input: rows of every kind LayerNorm meets, float32 (cast by ``tensor``)."""
        kind = self.choice(name + ".values", kinds)
        rows = shape[:-1] + (1,)
        if kind == "normal":
            return self.randn(*shape) * (0.5 + self.rng.random() * 2)
        if kind == "shifted":  # a mean far above the spread
            return self.randn(*shape) * 0.05 + 3.0 + 10 * self.rng.random()
        if kind == "near-constant":
            return self.randn(*rows) + 1e-4 * self.randn(*shape)
        return (self.randn(*rows) * 0.7 + 0.1234567).expand(shape).clone()  # constant rows

    def tensor(self, name, values, dtype, layouts=("contiguous", "transposed", "sliced", "stepped", "expanded"),
               diff=True) -> Arg:
        """``values`` stored in ``dtype`` in a drawn layout; the view the op sees has ``values``' shape."""
        shape = tuple(values.shape)
        if len(shape) == 1:
            layouts = tuple(lt for lt in layouts if lt in ("contiguous", "sliced", "stepped"))
        if not (len(shape) >= 2 and shape[0] > 1):
            layouts = tuple(lt for lt in layouts if lt != "expanded")
        layout = self.choice(name + ".layout", layouts)
        v = values.to(dtype)
        if layout == "transposed":  # the dimensions stored in reverse order
            dims = tuple(range(v.dim() - 1, -1, -1))
            base = v.permute(*dims).contiguous().to(DEV)
            return Arg(base, lambda t: t.permute(*dims), diff, layout)
        if layout == "sliced":  # a window of wider rows
            off = self.rng.randint(1, 5)
            base = torch.zeros(shape[:-1] + (shape[-1] + off + 3,), dtype=dtype)
            base[..., off:off + shape[-1]] = v
            return Arg(base.to(DEV), lambda t: t[..., off:off + shape[-1]], diff, layout)
        if layout == "stepped":  # every other element of the last dimension
            base = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=dtype)
            base[..., ::2] = v
            return Arg(base.to(DEV), lambda t: t[..., ::2], diff, layout)
        if layout == "expanded":  # one stored sample read by every index of the first dimension (stride 0)
            return Arg(v[:1].contiguous().to(DEV), lambda t: t.expand(shape), diff, layout)
        return Arg(v.contiguous().to(DEV), lambda t: t, diff, layout)


def _call(fn, args: dict, dtype64: bool):
    """``fn(**args)`` on fresh leaves (float64 ones for the oracle); returns (outputs tuple, leaves dict)."""
    leaves, call = {}, {}
    for k, a in args.items():
        if isinstance(a, Arg):
            b = a.base.detach().clone()
            if dtype64:
                b = b.double()
            if a.diff and b.is_floating_point():
                b.requires_grad_()
                leaves[k] = b
            call[k] = a.view(b)
        elif isinstance(a, str) and a.startswith("alias:"):
            call[k] = None  # filled below
        else:
            call[k] = a
    for k, a in args.items():
        if isinstance(a, str) and a.startswith("alias:"):
            call[k] = call[a[len("alias:"):]]
    out = fn(**call)
    return (out if isinstance(out, tuple) else (out,)), leaves


def judge(draw: Draw, fused, ref, args: dict, atol=None, backward=True, nan=False):
    """Outputs (and, with ``backward``, every differentiable argument's gradient) of ``fused`` against ``ref`` in
    float64 under the tolerance rule; ``ref`` in the arguments' own dtypes is the rule's baseline. ``atol``: a
    function of the judged tensor's dtype (default the rule's atol of that dtype)."""
    atol = atol or default_atol
    grad_mode = torch.enable_grad() if backward else torch.no_grad()
    with grad_mode:
        outs, leaves = _call(fused, args, False)
        outs64, leaves64 = _call(ref, args, True)
        outs_lo, leaves_lo = _call(ref, args, False)
    for i, (o, o64, olo) in enumerate(zip(outs, outs64, outs_lo)):
        what = f"{draw}: output {i}"
        assert o.shape == olo.shape and o.dtype == olo.dtype, f"{what}: {o.dtype} {tuple(o.shape)}, expected " \
                                                              f"{olo.dtype} {tuple(olo.shape)}"
        if nan:
            same = torch.equal(torch.isnan(o.double()), torch.isnan(o64))
            assert same, f"{what}: NaN where the reference has none, or none where it has NaN"
        assert_within_rule(o, o64, olo, atol=atol(o.dtype), what=what)
    if not backward or not leaves:
        return
    douts = [draw.randn(*o.shape).to(DEV) for o in outs]

    def grads(outputs, lv):
        loss = sum((o.double() * d.double()).sum() for o, d in zip(outputs, douts))
        return torch.autograd.grad(loss, list(lv.values()))

    for name, g, g64, glo in zip(leaves, grads(outs, leaves), grads(outs64, leaves64), grads(outs_lo, leaves_lo)):
        what = f"{draw}: grad of {name} ({args[name].layout})"
        assert g.dtype == glo.dtype and g.shape == glo.shape, f"{what}: {g.dtype} {tuple(g.shape)}"
        assert_within_rule(g, g64, glo, atol=atol(g.dtype), what=what)


def _nan_into(draw: Draw, arg: Arg) -> None:
    """One NaN or inf written into the stored tensor (the forward's NaN pattern is then judged)."""
    flat = arg.base.view(-1)
    flat[draw.rng.randrange(flat.numel())] = draw.choice("poison", (float("nan"), float("inf"), -float("inf")))


# ----------------------------------------------------------------------------------------------------------------
# One drawing function per op: (fused, ref, args, judge keyword arguments)
# ----------------------------------------------------------------------------------------------------------------


def draw_layer_norm(d: Draw):
    B, N, C = d.choice("B", SIZES[:4]), d.choice("N", SIZES), d.choice("C", WIDTHS)
    dtype = d.choice("dtype", (F32, F16, BF16))
    pdt = d.choice("param_dtype", (F32, dtype))
    args = dict(x=d.tensor("x", d.values("x", (B, N, C)), dtype),
                weight=d.tensor("weight", 1 + 0.3 * d.randn(C), pdt),
                bias=d.tensor("bias", 0.3 * d.randn(C), pdt), eps=d.choice("eps", (1e-6, 1e-5)))
    residual = d.choice("residual", ("none", "tensor", "alias"))
    if residual == "tensor":
        args["residual"] = d.tensor("residual", d.randn(B, N, C), d.choice("residual_dtype", (F32, dtype)))
    elif residual == "alias":  # x + x: one tensor as both arguments
        args["residual"] = "alias:x"
    out_dtype = d.choice("out_dtype", (None, F16, BF16)) if dtype == F32 else None
    if out_dtype is not None:
        args["out_dtype"] = out_dtype
    nan = d.coin("nan", 0.15)
    if nan:
        _nan_into(d, args["x"])

    def fused(**kw):
        return layer_norm(**kw)

    def ref(**kw):
        if kw["x"].dtype == torch.float64:
            kw.pop("out_dtype", None)
        res = kw.get("residual")
        r_dtype = torch.result_type(kw["x"], res) if res is not None else kw["x"].dtype
        if r_dtype == torch.float32:  # torch's CPU LayerNorm takes 16-bit parameters only with 16-bit input
            kw["weight"], kw["bias"] = kw["weight"].float(), kw["bias"].float()
        return layer_norm_ref(**kw)

    return fused, ref, args, dict(backward=not nan, nan=nan)


def draw_linear(d: Draw):
    lead = d.choice("lead", ((1,), (2,), (3, 5), (1, 7), (2, 13)))
    K, N = d.choice("K", (1, 3, 8, 17, 40, 64, 97, 130)), d.choice("N", (1, 5, 16, 33, 96))
    ct = d.choice("compute_dtype", (F32, F16, BF16))
    has_ln, gelu = d.coin("ln"), d.coin("gelu")
    xv = d.values("x", lead + (K,)) if has_ln else d.randn(*lead, K)
    args = dict(x=d.tensor("x", xv, d.choice("x_dtype", (F32, ct))),
                weight=d.tensor("weight", d.randn(N, K) / K ** 0.5, ct, layouts=("contiguous", "transposed",
                                                                                 "sliced", "stepped")),
                gelu=gelu)
    if d.coin("bias"):
        args["bias"] = d.tensor("bias", d.randn(N), d.choice("bias_dtype", (F32, ct)))
    if has_ln:
        pdt = d.choice("ln_dtype", (F32, ct))
        args["ln_weight"] = d.tensor("ln_weight", 1 + 0.3 * d.randn(K), pdt)
        args["ln_bias"] = d.tensor("ln_bias", 0.3 * d.randn(K), pdt)
    if d.coin("scale") and len(lead) == 2:  # drop-path: one value per sample, a zero among them
        s = (torch.rand(lead[0], generator=d.gen) < 0.7).float() / 0.7
        args["scale"] = d.tensor("scale", s, ct, diff=False)
    if d.coin("residual"):
        if K == N and d.coin("residual_is_x", 0.3):
            args["residual"] = "alias:x"
        else:
            args["residual"] = d.tensor("residual", d.randn(*lead, N), d.choice("residual_dtype", (F32, ct)))
    nan = d.coin("nan", 0.15)
    if nan:
        _nan_into(d, args["x"])

    def fused(**kw):
        return linear(**kw)

    def ref(**kw):
        if kw.get("scale") is not None:
            kw["scale"] = kw["scale"].to(kw["weight"].dtype)
        if kw.get("ln_weight") is not None and kw["x"].dtype == torch.float32:  # as for layer_norm's reference
            kw["ln_weight"], kw["ln_bias"] = kw["ln_weight"].float(), kw["ln_bias"].float()
        return linear_ref(**kw)

    return fused, ref, args, dict(backward=not nan, nan=nan, atol=lambda dt: default_atol(ct))


def draw_block_half(d: Draw):
    B, N = d.choice("B", (1, 2, 3)), d.choice("N", (1, 3, 7, 13))
    ct = d.choice("compute_dtype", (F32, F16, BF16))
    heads = d.choice("heads", (0, 0, 1, 2))
    D = 16
    C = heads * D if heads else d.choice("C", (3, 8, 17, 40))
    N1 = 3 * C if heads else d.choice("hidden", (5, 16, 3 * C))
    K2 = C if heads else N1
    args = dict(x=d.tensor("x", d.values("x", (B, N, C)), d.choice("x_dtype", (F32, ct))),
                ln_weight=d.tensor("ln_weight", 1 + 0.3 * d.randn(C), F32),
                ln_bias=d.tensor("ln_bias", 0.3 * d.randn(C), F32),
                w1=d.tensor("w1", d.randn(N1, C) / C ** 0.5, ct, layouts=("contiguous", "transposed", "stepped")),
                b1=d.tensor("b1", d.randn(N1), F32) if d.coin("b1") else None,
                w2=d.tensor("w2", d.randn(C, K2) / K2 ** 0.5, ct, layouts=("contiguous", "transposed", "sliced")),
                b2=d.tensor("b2", d.randn(C), F32) if d.coin("b2") else None,
                num_heads=heads)
    if d.coin("scale"):
        args["scale"] = d.tensor("scale", (torch.rand(B, generator=d.gen) < 0.7).float() / 0.7, ct, diff=False)

    def fused(**kw):
        return block_half(**kw)

    def ref(**kw):
        if kw.get("scale") is not None:
            kw["scale"] = kw["scale"].to(kw["w1"].dtype)
        return block_half_ref(**kw)

    return fused, ref, args, dict(atol=lambda dt: default_atol(ct))


def draw_self_attention(d: Draw):
    B, N = d.choice("B", (1, 2, 3)), d.choice("N", (1, 2, 5, 13, 31, 70))
    H, D = d.choice("H", (1, 2, 3)), d.choice("D", (16, 32, 48, 64))
    dtype = d.choice("dtype", (F32, F16, BF16))
    qkv = d.randn(B, N, 3 * H * D) * d.choice("spread", (0.5, 1.0, 2.0))
    if d.coin("shared_offset", 0.3):  # keys and values with a common offset, as a qkv bias gives them
        qkv[..., H * D:] += 2.0
    args = dict(qkv=d.tensor("qkv", qkv, dtype, layouts=("contiguous", "transposed", "sliced", "expanded")),
                num_heads=H)
    if d.coin("scale", 0.3):
        args["scale"] = d.rng.uniform(0.05, 0.5)

    def fused(**kw):
        return self_attention(**kw)

    def ref(**kw):
        return self_attention_ref(**kw)

    return fused, ref, args, {}


def draw_cls_cross_attention(d: Draw):
    B, N = d.choice("B", (1, 2, 3)), d.choice("N", (0, 1, 4, 13, 50))
    H = d.choice("H", (1, 2, 3))
    C = H * d.choice("D", (4, 8, 16, 24))
    dtype = d.choice("dtype", (F32, F16, BF16))
    # float32 activations into a 16-bit call (autocast's case): rounded to the compute dtype as the kernels load them
    act = d.choice("act_dtype", (F32, dtype)) if dtype != F32 else F32
    std = 0.05  # the fp32 fold's conditioning at larger weights: test_cls_cross_attention's large-weight test
    args = dict(cls=d.tensor("cls", d.values("cls", (B, 1, C)), act, layouts=("contiguous", "sliced")),
                tokens=d.tensor("tokens", d.values("tokens", (B, N, C)), act) if N else
                Arg(torch.zeros(B, 0, C, dtype=act, device=DEV)),
                num_heads=H)
    affine = d.coin("affine", 0.8)
    args["norm_weight"] = d.tensor("norm_weight", 1 + 0.3 * d.randn(C), dtype) if affine else None
    args["norm_bias"] = d.tensor("norm_bias", 0.3 * d.randn(C), dtype) if affine else None
    for w in ("q", "k", "v", "proj"):
        args["w" + w] = d.tensor("w" + w, std * d.randn(C, C), dtype, layouts=("contiguous", "transposed",
                                                                                "stepped"))
        args["b" + w] = d.tensor("b" + w, 0.1 * d.randn(C), dtype) if d.coin("b" + w, 0.8) else None

    def fused(**kw):
        return cls_cross_attention(**kw)

    def ref(**kw):  # the activations rounded to the compute dtype first, then in the weights' working dtype
        for k in ("cls", "tokens"):
            kw[k] = kw[k].to(dtype).to(kw["wq"].dtype)
        return cls_cross_attention_ref(**kw)

    return fused, ref, args, {}


DRAWS = {"layer_norm": draw_layer_norm, "linear": draw_linear, "block_half": draw_block_half,
         "self_attention": draw_self_attention, "cls_cross_attention": draw_cls_cross_attention}
KERNEL_MODULES = (kln, kl, ksa, kcls)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("index", range(RANDOM_CASES), ids=lambda i: f"case{i}")
@pytest.mark.parametrize("op", list(DRAWS))
def test_random_case(op, index):
    d = Draw(op, index)
    fused, ref, args, kw = DRAWS[op](d)
    judge(d, fused, ref, args, **kw)


def _break(d: Draw, args: dict):
    """One argument of a valid case made wrong; returns what was done (the expected error names the op)."""
    names = [k for k, a in args.items() if isinstance(a, Arg)]
    name = d.choice("broken", names)
    a = args[name]
    how = d.choice("how", ("float64", "int32", "meta", "size") if len(names) > 1 else ("float64", "int32", "size"))
    if how == "float64":
        a.base = a.base.double()
    elif how == "int32":
        a.base = a.base.to(torch.int32)
    elif how == "meta":
        a.base = a.base.to("meta")
    else:  # one channel more in the view's last dimension
        view, base = a.view, a.base
        shape = tuple(view(base).shape)
        a.base = torch.randn(shape[:-1] + (shape[-1] + 1,), generator=d.gen).to(base.dtype).to(DEV)
        a.view = lambda t: t
    return f"{name}: {how}"


@pytest.mark.parametrize("index", range(RANDOM_CASES), ids=lambda i: f"case{i}")
@pytest.mark.parametrize("op", list(DRAWS))
def test_bad_input(op, index, monkeypatch):
    """A wrong dtype, device (meta included) or size of any tensor argument: a TypeError or ValueError naming the
    op, raised before any kernel launch."""
    d = Draw(op, index)
    fused, _, args, _ = DRAWS[op](d)
    broken = _break(d, args)
    for module in KERNEL_MODULES:
        forbid_launches(monkeypatch, module, *[n for n in vars(module) if n.endswith("_kernel")])
    with pytest.raises((TypeError, ValueError)) as err:
        outs, leaves = _call(fused, args, False)
    message = str(err.value)
    assert op in message or "crossvit_fast" in message, f"{d}: {broken}: the error does not name the op: {message}"
