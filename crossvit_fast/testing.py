"""Helpers for parity tests: the tolerance rule, poisoned outputs, the fixtures' weight-fill rule.

The tolerance rule (docs/kernels.md): a kernel's error against the float64 reference may be at most twice the error
of the reference itself run in the same low dtype, plus a small atol::

    max|out - ref64| <= 2 * max|ref_lowp - ref64| + atol + ulps * eps_acc * max|ref64|

The last term is the atol's share that scales with the result: a few units in the last place of float32 (the
accumulation dtype of every kernel; float64's for float64 outputs) at the output's largest magnitude. Two correct
float32 summation orders differ by a few such ulps, while the reference's own error in float32 may by chance be
half of one: with values near 10 a fixed float32 atol of 1e-6 is one ulp, and correct float32 LayerNorm gradients
missed the bound by 2-4 % for some draws. For 16-bit outputs the term is about 1/1000 of the reference's own
error and changes nothing.

The reference's own error is taken as at least half an ulp of the output dtype at the output's largest magnitude
(``err_ref = max(max|ref_lowp - ref64|, half_ulp(dtype, max|ref64|))``): the exact result rounded once to the output
dtype is that far off, so no implementation in that dtype can be expected closer, while the reference may by chance
round closer. That happens where few elements decide the maximum: a 3-element float16 LayerNorm bias gradient whose
reference landed 2.0e-3 from the exact value at magnitude 12.6 (half an ulp there: 3.9e-3), while the kernel, which
rounds the same float16 upstream gradient once instead of twice, landed 5.8e-3 off. A correctly rounded result
therefore always passes. For tensors of more than a few elements the reference's own error is already about half
an ulp at the largest magnitude, and the floor changes little.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

__all__ = [
    "default_atol",
    "half_ulp",
    "max_abs_err",
    "assert_within_rule",
    "rule_check",
    "poison_",
    "fill_like_fixtures_",
    "fill_seeded_",
    "fixture_input",
]

_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
_ULPS = 4  # float32 ulps at the output's largest magnitude (see the module docstring)


def default_atol(dtype: torch.dtype) -> float:
    """The small absolute slack of the tolerance rule for ``dtype``."""
    return _ATOL[dtype]


def half_ulp(dtype: torch.dtype, magnitude: float) -> float:
    """Half the spacing of ``dtype``'s values at ``magnitude`` (its binade's; the subnormal spacing below the
    smallest normal; 0 for 0 or a non-finite magnitude): the largest error of the exact value rounded once to
    ``dtype``."""
    if not (magnitude > 0.0 and math.isfinite(magnitude)):
        return 0.0
    fi = torch.finfo(dtype)
    _, exp = math.frexp(max(magnitude, fi.smallest_normal))  # magnitude in [2^(exp-1), 2^exp)
    return 0.5 * fi.eps * 2.0 ** (exp - 1)


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|a - ref|`` in float64; NaN anywhere in ``a`` where ``ref`` is finite gives ``inf``."""
    a64, r64 = a.detach().double(), ref.detach().double()
    if a64.shape != r64.shape:
        raise AssertionError(f"shape {tuple(a64.shape)} != reference shape {tuple(r64.shape)}")
    if a64.numel() == 0:
        return 0.0
    bad = torch.isnan(a64) & ~torch.isnan(r64)
    if bool(bad.any()):
        return float("inf")
    return float((a64 - r64).abs().nan_to_num(0.0).max())


def rule_check(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    atol: Optional[float] = None,
    ulps: float = _ULPS,
) -> Dict[str, float]:
    """The tolerance rule's numbers, without asserting: ``err`` (``out``'s max abs error against ``ref64``),
    ``err_ref`` (``ref_lowp``'s, at least :func:`half_ulp` of ``out``'s dtype at ``scale``: module docstring),
    ``bound``, ``scale`` (``max|ref64|``), ``atol`` and ``ratio`` (``err / bound``: at most 1 within the rule;
    ``inf`` for a NaN where the reference is finite). Arguments as :func:`assert_within_rule`."""
    if atol is None:
        atol = default_atol(out.dtype)
    err = max_abs_err(out, ref64)
    eps = torch.finfo(torch.float64 if out.dtype == torch.float64 else torch.float32).eps
    r64 = ref64.detach().double()
    scale = float(r64.abs().nan_to_num(0.0, 0.0, 0.0).max()) if r64.numel() else 0.0
    err_ref = max(max_abs_err(ref_lowp, ref64), half_ulp(out.dtype, scale))
    bound = 2.0 * err_ref + atol + ulps * eps * scale
    return {"err": err, "err_ref": err_ref, "bound": bound, "scale": scale, "atol": atol,
            "ratio": err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))}


def assert_within_rule(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_lowp: torch.Tensor,
    atol: Optional[float] = None,
    what: str = "output",
    ulps: float = _ULPS,
) -> Dict[str, float]:
    """Assert the tolerance rule; returns the two errors and the bound for reporting.

    ``atol`` defaults to :func:`default_atol` of ``out``'s dtype; ``ulps`` is the magnitude-scaled share of the
    atol (``ulps * eps * max|ref64|``, eps of float32, of float64 for float64 outputs; 0 turns it off)."""
    r = rule_check(out, ref64, ref_lowp, atol, ulps)
    if not r["err"] <= r["bound"]:
        raise AssertionError(
            f"{what}: max abs error {r['err']:.3e} against the float64 reference exceeds the rule's bound "
            f"{r['bound']:.3e} (= 2 x {r['err_ref']:.3e}, the reference's own error in {out.dtype} or half an ulp "
            f"of it at the largest magnitude if more, + atol "
            f"{r['atol']:.1e} + {ulps:g} ulp x {r['scale']:.3e}, the reference's largest magnitude)"
        )
    return {"err": r["err"], "err_ref": r["err_ref"], "bound": r["bound"]}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (integers: their maximum) so that any element a kernel forgets to write shows."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def fill_like_fixtures_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill ``model``'s state in place by the fixtures' seeded rule (tests/data/timm_crossvit_logits.json).

    One ``numpy.random.default_rng(seed)``; for each key of ``sorted(state_dict)`` draw a standard normal of the
    tensor's shape (float64); 1-D ``*.weight`` tensors (LayerNorm scales) get ``1 + 0.1 z``, every other ``0.05 z``,
    cast to the model's dtype. The fixtures filled a float32 model and converted it with ``.double()`` for their
    float64 logits: fill a float32 model to reproduce them.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for key in sorted(sd):
            t = sd[key]
            z = rng.standard_normal(tuple(t.shape))
            val = 1.0 + 0.1 * z if (t.dim() == 1 and key.endswith(".weight")) else 0.05 * z
            t.copy_(torch.from_numpy(np.asarray(val, dtype=np.float64)).to(t.dtype))
    return model


def fill_seeded_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The fixtures' fill rule drawn from ``torch.Generator().manual_seed(seed)`` instead of numpy: the same scales
    (``1 + 0.1 z`` for 1-D ``*.weight`` tensors, ``0.05 z`` for the rest), not the fixtures' values. Needs no numpy,
    so ``crossvit-fast check`` runs after a plain ``pip install .``."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for key in sorted(sd):
            t = sd[key]
            z = torch.randn(tuple(t.shape), generator=g, dtype=torch.float64)
            val = 1.0 + 0.1 * z if (t.dim() == 1 and key.endswith(".weight")) else 0.05 * z
            t.copy_(val.to(t.dtype))
    return model


def fixture_input(seed: int, batch: int, hw, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The fixtures' input: ``default_rng(seed + 1).standard_normal((batch, 3, H, W))``."""
    import numpy as np

    x = np.random.default_rng(seed + 1).standard_normal((batch, 3, int(hw[0]), int(hw[1])))
    return torch.from_numpy(x).to(dtype)
