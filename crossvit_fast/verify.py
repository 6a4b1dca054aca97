"""``crossvit_fast.verify`` / ``crossvit-fast verify``: prove the fused kernels on this machine's GPU.

For every fused op of the registry at the shapes of the given models (per branch: width, heads, tokens), in every
dtype the device takes (float32, bfloat16 where supported, float16): a parity check of the forward output and of
every gradient (inputs and parameters) against the float64 reference under the project's tolerance rule
(:func:`crossvit_fast.testing.rule_check`; fresh random inputs and weights, the device's allocator poisoned with
NaN first so that an element a kernel forgets to write shows), then a timing of the fused path against the
``"torch"`` path (what timm runs) at a modest batch, forward and forward + backward.

Each op is checked through the module that runs it (``Attention``, ``Block``, ``CrossAttentionBlock``) with only
that op switched to the kernels, so its error and its speed are those a model meets.

A *shape class* is an op, a dtype and the dims the registry's ``supports`` takes (``head_dim`` for the
self-attention; ``dim`` for the LayerNorm and the block GEMMs; both for the CLS cross-attention). Its verdict, over
every token count of the models: ``failed`` (any case out of the rule, or an error), else ``slower`` (the fused
path slower than the torch path in any case and phase), else ``verified``. The verdicts go into this machine's
record (:mod:`crossvit_fast.record`), from which ``"auto"`` takes a kernel for a module whose class is verified.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from crossvit_fast.backend import BackendUnavailableError, device_arch, triton_status
from crossvit_fast.config import interpreter_enabled
from crossvit_fast.ops import registry as op_registry

__all__ = ["VERDICTS", "VerifyUnavailableError", "Branch", "Case", "Timing", "CaseResult", "Report", "branches",
           "cases", "device_dtypes", "verify", "DEFAULT_MODEL"]

DEFAULT_MODEL = "crossvit_18_dagger_240"
VERDICTS = ("verified", "slower", "failed")
"""A shape class's verdicts, best first; a class's verdict is the worst of its cases'."""

Timer = Callable[[Callable[[], object], "Timing"], float]


class VerifyUnavailableError(BackendUnavailableError):
    """Verification cannot run here (no CUDA device, no triton); the message names what is missing."""


@dataclasses.dataclass(frozen=True)
class Branch:
    """One branch of a model: width, heads, tokens (patches + the CLS token) and the MLP ratio of its blocks."""

    dim: int
    heads: int
    tokens: int
    mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape in one dtype. ``tokens``: the sequence length the op sees (the other branch's patch
    tokens for the CLS cross-attention)."""

    op: str
    dtype: str
    dim: int
    heads: int
    tokens: int
    mlp_ratio: float = 4.0

    @property
    def dims(self) -> Dict[str, int]:
        """The dims of the shape class, as the registry's ``supports`` takes them."""
        head_dim = self.dim // self.heads
        if self.op == "self_attention":
            return {"head_dim": head_dim}
        if self.op == "cls_cross_attention":
            return {"dim": self.dim, "head_dim": head_dim}
        return {"dim": self.dim}

    @property
    def shape_class(self) -> str:
        from crossvit_fast.record import class_name

        return class_name(self.op, self.dtype, self.dims)

    def __str__(self) -> str:
        return f"{self.op} {self.dtype} C={self.dim} heads={self.heads} N={self.tokens}"


@dataclasses.dataclass(frozen=True)
class Timing:
    """What a timer is asked to time: ``backend`` ``"triton"`` or ``"torch"``, ``phase`` ``"forward"`` or
    ``"forward+backward"``."""

    case: Case
    backend: str
    phase: str


@dataclasses.dataclass
class CaseResult:
    """One case's outcome: ``err_ratio`` (the largest error / bound over the output and gradients; above 1 is out
    of the rule), ``worst`` (which tensor), the median ms per phase of each path, ``error`` (an exception's text)."""

    case: Case
    verdict: str
    err_ratio: float = 0.0
    worst: str = ""
    fused_ms: Dict[str, float] = dataclasses.field(default_factory=dict)
    torch_ms: Dict[str, float] = dataclasses.field(default_factory=dict)
    error: str = ""


@dataclasses.dataclass
class Report:
    """What :func:`verify` found: every case, each shape class's entry (as the record holds them), the record's
    path (``""`` where it was not written), the device, the seconds it took and the cases the budget left out."""

    results: List[CaseResult]
    classes: List[dict]
    record: Optional[dict]
    path: str
    device: str
    seconds: float
    not_run: List[Case] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> List[dict]:
        return [c for c in self.classes if c["verdict"] == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when no class failed (``slower`` ones simply stay on the torch path), 1 otherwise."""
        return 1 if self.failed else 0

    def table(self) -> str:
        """The summary: one row per shape class."""
        rows = [[c["class"], c["verdict"], _fmt_ratio(c["err_ratio"]), _fmt_ms(c["fused_ms"]), _fmt_ms(c["torch_ms"]),
                 c["case"] if c["verdict"] == "failed" else ""] for c in self.classes]
        header = ["shape class", "verdict", "err/bound", "fused ms (fwd, fwd+bwd)", "torch ms", "failing case"]
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _fmt_ratio(r: float) -> str:
    return "inf" if not math.isfinite(r) else f"{r:.2f}"


def _fmt_ms(ms: Dict[str, float]) -> str:
    return ", ".join(f"{v:.3f}" for v in ms.values()) or "-"


Model = Union[str, nn.Module, Sequence[Branch]]


def branches(model: Model) -> List[Branch]:
    """The branches of ``model``: a model name (built on the meta device, nothing allocated), a CrossViT module
    (crossvit_fast's or timm's; ``patch_embed`` and ``blocks[0].blocks``) or a list of :class:`Branch`."""
    if isinstance(model, (list, tuple)) and all(isinstance(b, Branch) for b in model):
        return list(model)
    if isinstance(model, str):
        from crossvit_fast.models import create_model

        with torch.device("meta"):
            model = create_model(model, backend="reference")
    try:
        out = []
        for pe, seq in zip(model.patch_embed, model.blocks[0].blocks):
            blk = seq[0]
            hidden = blk.mlp.fc1.out_features
            dim = blk.norm1.normalized_shape[0]
            out.append(Branch(dim, int(blk.attn.num_heads), int(pe.num_patches) + 1, hidden / dim))
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"verify: {type(model).__name__} is not a CrossViT (no patch_embed / blocks[0].blocks with "
                         f"a Block per branch: {e})") from None
    if not out:
        raise ValueError(f"verify: found no branch in {type(model).__name__}")
    return out


def _model_name(model: Model) -> str:
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        return str(getattr(model, "model_name", None) or type(model).__name__)
    return "branches " + ", ".join(f"C={b.dim} heads={b.heads} N={b.tokens}" for b in model)


def cases(models: Iterable[Model], dtypes: Sequence[str], ops: Optional[Sequence[str]] = None) -> List[Case]:
    """Every (op, shape, dtype) of the models that the registry says the kernel takes, without repeats; ``ops``:
    only these (default: every op of the registry)."""
    specs = [op_registry.get(op) for op in ops] if ops is not None else list(op_registry.OPS.values())
    out: Dict[Case, None] = {}
    for model in models:
        bs = branches(model)
        for dtype in dtypes:
            for spec in specs:
                op = spec.name
                for b in bs:
                    tokens = b.tokens - 1 if op == "cls_cross_attention" else b.tokens
                    case = Case(op, dtype, b.dim, b.heads, tokens, b.mlp_ratio)
                    if not spec.supports(dtype, **case.dims):
                        out[case] = None
    return list(out)


def device_dtypes(device: torch.device) -> List[str]:
    """The dtypes verified on ``device``: float32, bfloat16 where the GPU supports it, float16 (the interpreter:
    float32)."""
    if device.type != "cuda":
        return ["float32"]
    out = ["float32"]
    if torch.cuda.is_bf16_supported():
        out.append("bfloat16")
    return out + ["float16"]


def _check_device(device) -> torch.device:
    """The device to verify on; :class:`VerifyUnavailableError` naming what is missing where there is none."""
    ok, why = triton_status(allow_interpreter=True)
    if device is None:
        if not torch.cuda.is_available():
            build = ("this torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
                     else "torch sees no CUDA device")
            raise VerifyUnavailableError(f"no CUDA device to verify on ({build}); crossvit-fast verify runs on an "
                                         f"NVIDIA GPU with triton installed")
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device_arch(device) is None:
        raise VerifyUnavailableError(f"{device} is not a CUDA device; crossvit-fast verify runs on an NVIDIA GPU")
    if not ok:
        raise VerifyUnavailableError(f"the fused kernels cannot run here: {why}")
    if device.type == "cpu" and not interpreter_enabled():
        raise VerifyUnavailableError("CPU tensors need Triton's CPU interpreter (TRITON_INTERPRET=1), for tests")
    return device


def _module(case: Case, backend: str) -> nn.Module:
    """The module that runs ``case.op``, on ``backend``: ``"reference"``, ``"torch"``, or ``"triton"`` for that op
    alone (an explicit request: the call-time check then raises rather than falls back)."""
    from crossvit_fast.layers import Attention, Block, CrossAttentionBlock

    build = "reference" if backend == "triton" else backend
    if case.op == "self_attention":
        m: nn.Module = Attention(case.dim, case.heads, qkv_bias=True, backend=build)
    elif case.op == "cls_cross_attention":
        m = CrossAttentionBlock(case.dim, case.heads, qkv_bias=True, backend=build)
    else:
        m = Block(case.dim, case.heads, mlp_ratio=case.mlp_ratio, qkv_bias=True, backend=build)
    if backend != "triton":
        return m
    if case.op in ("self_attention", "cls_cross_attention"):
        m.backends = {case.op: "triton"}
    else:
        attn_fused = case.op == "linear" and not op_registry.get("self_attention").supports(
            case.dtype, head_dim=case.dim // case.heads)
        m.backends = {"layer_norm": "triton", "linear": "triton" if case.op == "linear" else "torch"}
        m.attn.backends = {"self_attention": "triton" if attn_fused else "torch"}
        m.attn.backend_requested = "triton" if attn_fused else "torch"
    m.backend_requested = "triton"
    return m


def _inputs(case: Case, batch: int, g: torch.Generator) -> List[torch.Tensor]:
    shapes = [(batch, 1, case.dim), (batch, case.tokens, case.dim)] if case.op == "cls_cross_attention" else \
        [(batch, case.tokens, case.dim)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def _poison_allocator(device: torch.device, like: Sequence[torch.Tensor]) -> None:
    """Leave freed NaN-filled blocks in the CUDA caching allocator (bytes 0xFF: NaN in every float dtype), which the
    next allocations reuse: an output element a kernel does not write then reads NaN."""
    if device.type != "cuda":
        return
    nbytes = 16 * sum(t.numel() * 8 for t in like) + (1 << 20)
    torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(0xFF)


def _run(m: nn.Module, inputs: List[torch.Tensor], gout: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """The forward output and the gradients of ``(out * gout).sum()`` for the inputs and every parameter."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    out = m(*ins)
    grads = torch.autograd.grad(out, ins + [p for _, p in named], gout.to(out.dtype), allow_unused=True)
    names = ["output"] + [f"grad input {i}" for i in range(len(ins))] + [f"grad {n}" for n, _ in named]
    return [(n, t) for n, t in zip(names, [out.detach()] + list(grads)) if t is not None]


def _parity(case: Case, device: torch.device, batch: int, seed: int) -> Tuple[float, str]:
    """The case's largest error / bound of the tolerance rule and the tensor it is on."""
    from crossvit_fast.testing import fill_seeded_, rule_check

    dtype = getattr(torch, case.dtype)
    ref = fill_seeded_(_module(case, "reference").double(), seed)
    state = ref.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = [t.to(device) for t in _inputs(case, batch, g)]
    gout = torch.randn(_out_shape(case, batch), generator=g, dtype=torch.float64).to(device)
    ref64 = _run(ref.to(device), inputs, gout)
    runs = {}
    for backend in ("reference", "triton"):
        m = _module(case, backend)
        m.load_state_dict(state)
        m = m.to(device=device, dtype=dtype)
        low = [t.to(dtype) for t in inputs]
        if backend == "triton":
            _poison_allocator(device, inputs)
        runs[backend] = _run(m, low, gout)
    worst, where = 0.0, ""
    names64 = [n for n, _ in ref64]
    if [n for n, _ in runs["triton"]] != names64:
        return math.inf, "the fused path's gradients are not those of the reference (a missing gradient)"
    for (name, r64), (_, lo), (_, fu) in zip(ref64, runs["reference"], runs["triton"]):
        ratio = rule_check(fu, r64, lo)["ratio"]
        if not ratio <= worst:
            worst, where = ratio, name
    return worst, where


def _out_shape(case: Case, batch: int) -> Tuple[int, ...]:
    return (batch, 1, case.dim) if case.op == "cls_cross_attention" else (batch, case.tokens, case.dim)


def _timings(case: Case, device: torch.device, batch: int, timer: Timer) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median ms per phase of the fused path and of the torch path."""
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(0)
    out = {}
    for backend in ("triton", "torch"):
        m = _module(case, backend).to(device=device, dtype=dtype)
        ins = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in _inputs(case, batch, g)]
        gout = torch.randn(_out_shape(case, batch), generator=g).to(device=device, dtype=dtype)

        def forward():
            with torch.no_grad():
                return m(*ins)

        def forward_backward():
            return torch.autograd.backward(m(*ins), gout)

        out[backend] = {"forward": timer(forward, Timing(case, backend, "forward")),
                        "forward+backward": timer(forward_backward, Timing(case, backend, "forward+backward"))}
    return out["triton"], out["torch"]


def default_timer(device: torch.device) -> Timer:
    """CUDA: ``triton.testing.do_bench``'s median (device events, after warm-up); elsewhere the median of a few
    wall-clock runs after one warm-up (the interpreter: not a speed figure)."""
    if device.type == "cuda":
        def cuda_timer(fn, timing):
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

        return cuda_timer

    def wall_timer(fn, timing):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    return wall_timer


def _classify(c: Case, parity: float, where: str, fused: Dict[str, float], torch_ms: Dict[str, float]) -> CaseResult:
    if not parity <= 1.0:
        return CaseResult(c, "failed", parity, where, fused, torch_ms, f"{where}: error {_fmt_ratio(parity)} x the bound")
    slower = any(fused[p] > torch_ms[p] for p in fused)
    return CaseResult(c, "slower" if slower else "verified", parity, where, fused, torch_ms)


def _one(case: Case, device: torch.device, batch: int, timing_batch: int, timer: Timer, seed: int) -> CaseResult:
    try:
        parity, where = _parity(case, device, batch, seed)
        if not parity <= 1.0:
            return _classify(case, parity, where, {}, {})
        fused, torch_ms = _timings(case, device, timing_batch, timer)
    except Exception as e:  # a kernel that raises fails its case: the report names it
        first = (str(e).strip().splitlines() or [""])[0]
        return CaseResult(case, "failed", math.inf, "", error=f"{type(e).__name__}: {first}")
    return _classify(case, parity, where, fused, torch_ms)


def _class_entries(results: List[CaseResult], seed: int) -> List[dict]:
    by_class: Dict[str, List[CaseResult]] = {}
    for r in results:
        by_class.setdefault(r.case.shape_class, []).append(r)
    out = []
    for name, rs in by_class.items():
        worst = max(rs, key=lambda r: (VERDICTS.index(r.verdict), r.err_ratio))
        c = rs[0].case
        out.append({
            "class": name, "op": c.op, "dtype": c.dtype, "dims": c.dims, "verdict": worst.verdict,
            "err_ratio": max(r.err_ratio for r in rs) if all(math.isfinite(r.err_ratio) for r in rs) else "inf",
            "worst": worst.worst, "tokens": sorted({r.case.tokens for r in rs}),
            "fused_ms": worst.fused_ms, "torch_ms": worst.torch_ms,
            "case": f"{worst.case} seed {seed}" + (f": {worst.error}" if worst.error else ""),
        })
    return out


def verify(
    models: Sequence[Model] = (DEFAULT_MODEL,),
    *,
    device=None,
    dtypes: Optional[Sequence[str]] = None,
    ops: Optional[Sequence[str]] = None,
    batch: int = 4,
    timing_batch: int = 32,
    budget_s: Optional[float] = None,
    timer: Optional[Timer] = None,
    seed: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = print,
    write: bool = True,
    json_path: Optional[str] = None,
) -> Report:
    """Verify every fused op at the shapes of ``models`` (names, CrossViT modules or lists of :class:`Branch`) on
    ``device`` (None: the current CUDA device) and write the verdicts into this machine's record (``write``), and
    to ``json_path`` too.

    ``dtypes``: torch names (default: :func:`device_dtypes`). ``ops``: only these ops (default: the registry's). ``batch``: images per parity case; ``timing_batch``:
    per timed case. ``budget_s``: no case starts after that many seconds (those left are in ``Report.not_run``
    and their classes keep what the record said before). ``timer(fn, timing) -> ms``: default
    :func:`default_timer`. ``seed``: of weights and inputs (default: fresh each run). ``progress``: gets one line
    per case (None: quiet).

    Raises:
        VerifyUnavailableError: no CUDA device or no triton (the message names what is missing).
    """
    start = time.perf_counter()
    device = _check_device(device)
    arch = device_arch(device)
    dtypes = list(dtypes) if dtypes is not None else device_dtypes(device)
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"verify: dtype {d!r} is not one the kernels take (float32, bfloat16, float16)")
    timer = timer or default_timer(device)
    seed = random.SystemRandom().randrange(1 << 30) if seed is None else int(seed)
    names = [_model_name(m) for m in models]
    todo = cases(models, dtypes, ops)
    results, not_run = [], []
    for i, case in enumerate(todo, 1):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            not_run.append(case)
            continue
        t0 = time.perf_counter()
        r = _one(case, device, batch, timing_batch, timer, seed + i)
        results.append(r)
        if progress is not None:
            timing = f"; fused {_fmt_ms(r.fused_ms)} ms, torch {_fmt_ms(r.torch_ms)} ms" if r.fused_ms else ""
            detail = f" ({r.error or r.worst})" if r.verdict == "failed" else ""
            progress(f"[{i}/{len(todo)}] {case}: err/bound {_fmt_ratio(r.err_ratio)}{timing} -> {r.verdict}"
                     f"{detail} ({time.perf_counter() - t0:.1f} s)")
    classes = _class_entries(results, seed)
    record, path = None, ""
    if write and classes:
        from crossvit_fast.record import save

        record, path = save(arch, classes, names)
    if json_path:
        from crossvit_fast.record import FORMAT, system_key, write_json

        out = record or {"format": FORMAT, "key": system_key(arch), "models": names, "classes": classes}
        write_json(os.fspath(json_path), out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton CPU interpreter"
    return Report(results, classes, record, path, f"{device} ({name}, {arch})", time.perf_counter() - start, not_run)
