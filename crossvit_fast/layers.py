"""CrossViT's layers with timm's module names and state_dict keys, each choosing its backend when built.

The two seams where fused kernels plug in:

* :class:`Attention`: the branch self-attention (``qkv`` Linear -> attention -> ``proj``),
* :class:`CrossAttentionBlock`: the CLS-query cross-attention of the fusion (``norm1`` + ``attn.wq/wk/wv/proj``),
  called with the projected CLS and the other branch's patch tokens, never their concatenation.

Everything else is plain PyTorch modules laid out exactly as in timm's ``crossvit.py``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from crossvit_fast.backend import (
    BackendUnavailableError,
    device_arch,
    fused_runs_on,
    get_backend,
    resolve_backend,
    verified_archs,
    verified_on,
    warn_once,
)
from crossvit_fast.config import LN_EPS
from crossvit_fast.ops import registry as op_registry
from crossvit_fast.record import class_name as record_class_name
from crossvit_fast.reference import cls_cross_attention_ref, self_attention_ref

__all__ = [
    "DropPath",
    "Mlp",
    "Attention",
    "Block",
    "PatchEmbed",
    "CrossAttention",
    "CrossAttentionBlock",
    "MultiScaleBlock",
    "patch_grid",
]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample: zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear, with timm's ``fc1``/``fc2`` keys."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def self_attention_sdpa(qkv: torch.Tensor, num_heads: int, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The ``"torch"`` path of the branch self-attention, what timm's ``Attention`` runs: qkv ``(B, N, 3C)`` ->
    ``F.scaled_dot_product_attention`` -> ``(B, N, C)``."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    # (B, N, 3*H*D) -> (3, B, H, N, D)
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)  # (B, H, N, D)
    return out.transpose(1, 2).reshape(B, N, C)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device type, or None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class _FusedSeams:
    """The backend choice of a module with fused-op seams, made once when it is built (or re-made by
    :meth:`set_backend`): ``backends`` maps each op the module can run fused (``ops``, its main op first) to
    ``"triton"``, ``"torch"`` or ``"reference"``. At call time :meth:`_fused_call` is the one check that may still
    send a call off the fused path: a torch.fx trace, dropout in training, an input dtype or device the kernels do
    not take, an architecture the kernel is not verified on ("auto" only). Off the path it warns once ("auto") or
    raises (an explicit "triton")."""

    ops: Tuple[str, ...] = ()
    __jit_unused_properties__ = ["backend"]

    @property
    def backend(self) -> str:
        """The resolved backend of the module's main op."""
        return self.backends[self.ops[0]]

    @backend.setter
    def backend(self, value: str) -> None:
        self.backends = {**self.backends, self.ops[0]: value}

    def _dims(self) -> Dict[str, int]:
        """The module's sizes, as the registry's shape checks take them."""
        return {}

    def _unsupported(self, op: str) -> str:
        """Why ``op``'s kernel cannot take this module ("" when it can)."""
        return op_registry.get(op).unsupported(**self._dims())

    def _resolve(self, op: str, arg: Optional[str], requested: str, chosen: Dict[str, str]) -> str:
        resolved = resolve_backend(arg, op=op, dims=self._dims())
        if resolved != "triton":
            return resolved
        why = self._unsupported(op)
        if why and requested == "triton":
            raise BackendUnavailableError(f"{type(self).__name__}: backend='triton' cannot take this module: {why}")
        return "torch" if why else "triton"

    def set_backend(self, backend: Optional[str] = None) -> None:
        """(Re)choose this module's backends: ``backend``, or the current default when None (see crossvit_fast.backend)."""
        arg = None if backend is None else str(backend).lower()
        requested = get_backend() if arg is None else arg
        chosen: Dict[str, str] = {}
        for op in self.ops:
            chosen[op] = self._resolve(op, arg, requested, chosen)
        self.backend_requested, self.backends = requested, chosen

    def _dropout_active(self, op: str) -> str:
        """The dropout that would draw masks in this call and that ``op``'s kernel does not implement ("" if none)."""
        return ""

    def _instead(self, op: str) -> str:
        """What runs where ``op`` does not run fused, for messages."""
        return "the torch path (what timm runs)"

    @torch.jit.unused
    def _fused_call(self, op, x):
        # type: (str, torch.Tensor) -> bool
        """Whether this call runs ``op`` fused, ``x`` being the tensor the kernel will see (its device, and its
        dtype or the autocast one). Not under TorchScript (the callers skip it) nor torch.fx tracing, which trace
        the unfused path (with a warning where the fused one was chosen)."""
        if self.backends.get(op) != "triton":
            return False
        name = type(self).__name__
        if isinstance(x, torch.fx.Proxy):
            warn_once(f"{op}-fx", f"crossvit_fast: torch.fx traces {name}'s unfused path (the fused {op} kernel "
                      f"needs the tensors' dtype and device, which a traced graph does not have)")
            return False
        dropout = self._dropout_active(op)
        if dropout:
            warn_once(f"{op}-dropout", f"crossvit_fast: {name} has {dropout} in training mode, which the fused {op} "
                      f"kernel does not implement; using {self._instead(op)} for those calls")
            return False
        dtype = _autocast_dtype(x) or x.dtype
        dtype_name = str(dtype).replace("torch.", "")
        dtypes = op_registry.get(op).dtypes
        problem = ""
        if dtype_name not in dtypes:
            problem = f"a {dtype} input (the fused kernels take {', '.join(dtypes)})"
        elif not fused_runs_on(x):
            problem = f"a tensor on {x.device} (the fused kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU ones)"
        if problem:
            if self.backend_requested == "triton":
                raise ValueError(f"{name} was built with backend='triton' but got {problem}")
            warn_once(f"{op}-{dtype}-{x.device.type}", f"crossvit_fast: backend 'auto' chose the fused {op} kernel "
                      f"for {name}, but it got {problem}; using {self._instead(op)} for such calls")
            return False
        if self.backend_requested == "triton":
            return True
        arch = device_arch(x.device)
        dims = self._dims()
        if verified_on(op, arch, dims, dtype_name):
            return True
        problem = (f"a tensor on {x.device} ({arch or 'not a CUDA device'}), an architecture the {op} kernel has "
                   f"not passed its parity tests on (verified on: {verified_archs(op)}), nor has this machine's "
                   f"record verified {record_class_name(op, dtype_name, dims)} (crossvit-fast verify)")
        warn_once(f"{op}: {problem}", f"crossvit_fast: backend 'auto' chose the fused {op} kernel for {name}, but it "
                  f"got {problem}; using {self._instead(op)} for such calls")
        return False


class Attention(_FusedSeams, nn.Module):
    """Branch multi-head self-attention: timm's ``Attention`` keys (``qkv``, ``proj``)."""

    ops = ("self_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.set_backend(backend)

    def _dropout_active(self, op: str) -> str:
        return "attention dropout > 0" if self.training and self.attn_drop.p > 0.0 else ""

    def _dims(self) -> Dict[str, int]:
        return {"head_dim": self.head_dim}

    @classmethod
    def from_module(cls, m: nn.Module, backend: Optional[str] = None) -> "Attention":
        """An Attention that reuses ``m``'s submodules and parameters (timm's or IBM's ``Attention``)."""
        for extra in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(m, extra, nn.Identity()), nn.Identity):
                raise ValueError(f"Attention.from_module: {type(m).__name__}.{extra} is not Identity; not a CrossViT attention")
        if getattr(m, "gate", None) is not None:
            raise ValueError(f"Attention.from_module: {type(m).__name__} has an output gate (timm's gated=True); "
                             f"not a CrossViT attention")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = int(m.num_heads)
        new.head_dim = m.qkv.out_features // 3 // new.num_heads
        new.scale = float(getattr(m, "scale", new.head_dim ** -0.5))
        new.qkv, new.proj = m.qkv, m.proj
        new.q_norm, new.k_norm = nn.Identity(), nn.Identity()
        new.attn_drop = getattr(m, "attn_drop", nn.Dropout(0.0))
        new.proj_drop = getattr(m, "proj_drop", nn.Dropout(0.0))
        new.set_backend(backend)
        return new

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("crossvit_fast Attention: attn_mask is not supported (CrossViT attends to every token)")
        qkv = self.qkv(x)  # (B, N, 3 * C)
        if not torch.jit.is_scripting() and self._fused_call("self_attention", qkv):
            out = self._fused(qkv)
        elif self.backends["self_attention"] == "reference":
            p = self.attn_drop.p if self.training else 0.0
            out = self_attention_ref(qkv, self.num_heads, self.scale, dropout_p=p)
        else:
            p = self.attn_drop.p if self.training else 0.0
            out = self_attention_sdpa(qkv, self.num_heads, self.scale, dropout_p=p)
        return self.proj_drop(self.proj(out))

    @torch.jit.unused
    def _fused(self, qkv):
        # type: (torch.Tensor) -> torch.Tensor
        from crossvit_fast.ops.self_attention import self_attention

        return self_attention(qkv.to(_autocast_dtype(qkv) or qkv.dtype), self.num_heads, self.scale)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"


def _is_affine_layer_norm(m) -> bool:
    return (
        isinstance(m, nn.LayerNorm)
        and len(m.normalized_shape) == 1
        and m.weight is not None
        and m.bias is not None
    )


class Block(_FusedSeams, nn.Module):
    """Pre-norm ViT block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``; timm's ``Block`` keys.

    Under ``backend="triton"`` its two LayerNorms run as the fused ``layer_norm`` op: ``norm1`` writes its output
    straight in the dtype the qkv Linear computes in (the autocast dtype under autocast), and the first residual
    add is fused with ``norm2``. The attention chooses its own backend (``self_attention``).
    """

    ops = ("layer_norm", "linear")
    __jit_unused_properties__ = ["backend", "linear_backend"]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, backend=backend)
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.set_backend(backend)

    def _dims(self) -> Dict[str, int]:
        return {"dim": self.norm1.normalized_shape[0]}

    @property
    def linear_backend(self) -> str:
        """The resolved backend of the block's GEMMs (op ``linear``)."""
        return self.backends["linear"]

    @linear_backend.setter
    def linear_backend(self, value: str) -> None:
        self.backends = {**self.backends, "linear": value}

    @classmethod
    def from_module(cls, m: nn.Module, backend: Optional[str] = None) -> "Block":
        """A Block that reuses ``m``'s submodules (timm's ``Block``: ``ls1/2``, ``drop_path1/2``; IBM's: one
        ``drop_path``). ``m.norm1``/``m.norm2`` must be affine LayerNorms over the last dimension and ``m.mlp``
        start with a Linear ``fc1`` (what lets norm2 write the autocast dtype directly)."""
        if not (_is_affine_layer_norm(getattr(m, "norm1", None)) and _is_affine_layer_norm(getattr(m, "norm2", None))):
            raise ValueError(f"Block.from_module: {type(m).__name__}'s norm1/norm2 are not affine LayerNorms over the "
                             f"last dimension")
        if not isinstance(getattr(getattr(m, "mlp", None), "fc1", None), nn.Linear):
            raise ValueError(f"Block.from_module: {type(m).__name__}.mlp has no Linear fc1; not a CrossViT block")
        if not isinstance(getattr(getattr(m, "attn", None), "qkv", None), nn.Linear):
            raise ValueError(f"Block.from_module: {type(m).__name__}.attn has no Linear qkv; not a CrossViT block")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        shared_dp = getattr(m, "drop_path", nn.Identity())
        new.norm1, new.attn = m.norm1, m.attn
        new.ls1 = getattr(m, "ls1", nn.Identity())
        new.drop_path1 = getattr(m, "drop_path1", shared_dp)
        new.norm2, new.mlp = m.norm2, m.mlp
        new.ls2 = getattr(m, "ls2", nn.Identity())
        new.drop_path2 = getattr(m, "drop_path2", shared_dp)
        new.set_backend(backend)
        return new

    def _resolve(self, op: str, arg: Optional[str], requested: str, chosen: Dict[str, str]) -> str:
        if op != "linear":
            return super()._resolve(op, arg, requested, chosen)
        # The GEMMs run fused only beside the fused LayerNorms, and "auto" takes them only once GPU-verified. Off
        # that path the Linears, GELU and residual adds are timm's own modules and ops ("reference" beside a
        # reference block).
        if chosen["layer_norm"] != "triton":
            return "reference" if chosen["layer_norm"] == "reference" else "torch"
        if resolve_backend(arg, op="linear", dims=self._dims()) != "triton":
            return "torch"
        why = self._linear_unsupported() or super()._unsupported("linear")
        if why:
            warn_once(f"linear-structure-{why}", f"crossvit_fast: Block runs its LayerNorms fused but not the "
                      f"fused GEMMs (op 'linear'): {why}")
            return "torch"
        return "triton"

    def _linear_unsupported(self) -> str:
        """Why this block's modules do not fit the five-kernel path ("" when they do)."""
        a, mlp = self.attn, self.mlp
        if not (isinstance(self.ls1, nn.Identity) and isinstance(self.ls2, nn.Identity)):
            return "layer scale (ls1/ls2) is not Identity"
        if not all(isinstance(getattr(a, n, None), nn.Linear) for n in ("qkv", "proj")) or not hasattr(a, "num_heads"):
            return "attn has no qkv/proj Linears"
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1", "fc2")):
            return "mlp has no fc1/fc2 Linears"
        act = getattr(mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            return f"mlp.act is {type(act).__name__}, not the exact nn.GELU()"
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            return "mlp.norm is not Identity"
        return ""

    def _dropout_active(self, op: str) -> str:
        """Attention or MLP dropout that would draw masks in this call (the fused GEMMs do not implement it)."""
        if op != "linear" or not self.training:
            return ""
        mods = [getattr(self.attn, n, None) for n in ("attn_drop", "proj_drop")] + list(self.mlp.modules())
        return "attention or MLP dropout > 0" if any(isinstance(m, nn.Dropout) and m.p > 0.0 for m in mods) else ""

    def _instead(self, op: str) -> str:
        if op == "linear":
            return "timm's Linears, GELU and residual adds (the LayerNorms still fused)"
        return super()._instead(op)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._fused_call("layer_norm", x):
            if self._fused_call("linear", x):
                return self._forward_fused_linear(x)
            return self._forward_fused(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    @torch.jit.unused
    def _forward_fused(self, x):
        # type: (torch.Tensor) -> torch.Tensor
        from crossvit_fast.ops.layer_norm import layer_norm

        # Under autocast the Linears after norm1/norm2 cast LayerNorm's float32 output to the autocast dtype:
        # the fused op writes that dtype directly (one rounding, the same values).
        out_dtype = _autocast_dtype(x)
        n1, n2 = self.norm1, self.norm2
        h = layer_norm(x, n1.weight, n1.bias, n1.eps, out_dtype=out_dtype)
        y = self.drop_path1(self.ls1(self.attn(h)))
        x, h = layer_norm(x, n2.weight, n2.bias, n2.eps, residual=y, out_dtype=out_dtype)
        return x + self.drop_path2(self.ls2(self.mlp(h)))

    @staticmethod
    def _drop_path_scale(dp: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Drop-path's per-sample ``mask / keep`` as ``(B,)``, drawn by the module itself on a ``(B, 1, 1)`` tensor
        of ones in the branch's dtype: the same random draws as the reference's ``dp(branch)``; None when it is
        the identity."""
        if isinstance(dp, nn.Identity) or not dp.training or getattr(dp, "drop_prob", None) == 0.0:
            return None
        ones = torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=dtype, device=x.device)
        return dp(ones).reshape(-1)

    @torch.jit.unused
    def _forward_fused_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The five-kernel block: qkv (LN1 prologue, bias), self-attention, proj (bias, drop-path, residual),
        fc1 (LN2 prologue, bias, GELU), fc2 (bias, drop-path, residual); each half one ``block_half`` op, whose
        backward adds the residual's gradient inside the LayerNorm backward kernel (no separate add pass)."""
        from crossvit_fast.ops.block import block_half

        a, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        dt = _autocast_dtype(x) or x.dtype  # compute dtype: the autocast one, as timm's Linears under autocast

        def weight(lin: nn.Linear) -> torch.Tensor:
            return lin.weight if lin.weight.dtype == dt else lin.weight.to(dt)  # autocast's per-call cast

        attn_backend = getattr(a, "backend", "torch")  # a foreign (timm) attention: what it runs is SDPA
        if attn_backend == "triton" and a._fused_call("self_attention", x):  # x: the device and (autocast) dtype qkv will have
            x = block_half(x, n1.weight, n1.bias, weight(a.qkv), a.qkv.bias, weight(a.proj), a.proj.bias, eps=n1.eps,
                           scale=self._drop_path_scale(self.drop_path1, x, dt), num_heads=a.num_heads,
                           attn_scale=a.scale)
        else:  # the attention module's unfused path between the two GEMMs: SDPA ("torch"), or the explicit math
            from crossvit_fast.ops.linear import linear

            qkv = linear(x, weight(a.qkv), a.qkv.bias, n1.weight, n1.bias, n1.eps)  # (B, N, 3C) in dt
            attend = self_attention_ref if attn_backend == "reference" else self_attention_sdpa
            o = attend(qkv, a.num_heads, a.scale)  # (B, N, C)
            x = linear(o, weight(a.proj), a.proj.bias, scale=self._drop_path_scale(self.drop_path1, x, dt),
                       residual=x)
        return block_half(x, n2.weight, n2.bias, weight(mlp.fc1), mlp.fc1.bias, weight(mlp.fc2), mlp.fc2.bias,
                          eps=n2.eps, scale=self._drop_path_scale(self.drop_path2, x, dt))


# (kernel, stride, padding) of the dagger models' three convolutions ("3 Conv."), per patch size.
_MULTI_CONV = {
    12: ((7, 4, 3), (3, 3, 0), (3, 1, 1)),
    16: ((7, 4, 3), (3, 2, 1), (3, 2, 1)),
}


def patch_grid(img_size: Tuple[int, int], patch_size: int, multi_conv: bool) -> Tuple[int, int]:
    """The (rows, cols) of patch tokens the patch embedding makes from an image of ``img_size``.

    Computed from the convolutions' own arithmetic, per side, so non-square sizes come out right (timm and IBM
    compute ``H // p * W // p``, which is ``((H // p) * W) // p``).
    """
    if not multi_conv:
        return img_size[0] // patch_size, img_size[1] // patch_size
    out = []
    for side in img_size:
        for k, s, p in _MULTI_CONV[patch_size]:
            side = (side + 2 * p - k) // s + 1
        out.append(side)
    return out[0], out[1]


class PatchEmbed(nn.Module):
    """Image -> patch tokens ``(B, rows*cols, dim)``: one strided conv, or the dagger models' three convs."""

    def __init__(
        self,
        img_size: Tuple[int, int],
        patch_size: int,
        in_chans: int = 3,
        embed_dim: int = 768,
        multi_conv: bool = False,
    ):
        super().__init__()
        if multi_conv and patch_size not in _MULTI_CONV:
            raise ValueError(
                f"PatchEmbed: multi_conv (dagger) patch embedding exists for patch sizes {sorted(_MULTI_CONV)}, "
                f"got {patch_size}"
            )
        self.img_size = tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = patch_grid(self.img_size, patch_size, multi_conv)
        if self.grid_size[0] < 1 or self.grid_size[1] < 1:
            raise ValueError(f"PatchEmbed: image size {self.img_size} is too small for patch size {patch_size}")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if multi_conv:
            (k1, s1, p1), (k2, s2, p2), (k3, s3, p3) = _MULTI_CONV[patch_size]
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 4, kernel_size=k1, stride=s1, padding=p1),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=k2, stride=s2, padding=p2),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=k3, stride=s3, padding=p3),
            )
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, dim, rows, cols) -> (B, rows*cols, dim)


class CrossAttention(nn.Module):
    """Holds the cross-attention's parameters with timm's keys (``wq``, ``wk``, ``wv``, ``proj``).

    ``forward`` is timm's: one query (token 0 of the normalised concatenation) against every token.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CrossAttention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q = self.wq(x[:, 0:1]).reshape(B, 1, H, D).permute(0, 2, 1, 3)  # (B, H, 1, D)
        k = self.wk(x).reshape(B, N, H, D).permute(0, 2, 1, 3)  # (B, H, N, D)
        v = self.wv(x).reshape(B, N, H, D).permute(0, 2, 1, 3)  # (B, H, N, D)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, 1, N)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(out))


class CrossAttentionBlock(_FusedSeams, nn.Module):
    """CrossViT's fusion attention: ``cls + attn(LN(concat(cls, tokens)))`` for the CLS query only.

    Keys as timm's ``CrossAttentionBlock`` (``norm1``, ``attn.wq/wk/wv/proj``). Call it as
    ``block(cls, tokens)`` with the projected CLS ``(B, 1, C)`` and the other branch's patch tokens
    ``(B, N, C)`` (a view; nothing is concatenated on the fused path), or as timm does, ``block(x)`` with their
    concatenation ``(B, 1 + N, C)``. Returns the new CLS ``(B, 1, C)``.
    """

    ops = ("cls_cross_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.set_backend(backend)

    def _dropout_active(self, op: str) -> str:
        return "attention dropout > 0" if self.training and self.attn.attn_drop.p > 0.0 else ""

    def _dims(self) -> Dict[str, int]:
        C = self.norm1.normalized_shape[0]
        return {"dim": C, "head_dim": C // self.attn.num_heads}

    @classmethod
    def from_module(cls, m: nn.Module, backend: Optional[str] = None) -> "CrossAttentionBlock":
        """A block that reuses ``m``'s ``norm1``, ``attn`` and ``drop_path`` (timm's or IBM's CrossAttentionBlock)."""
        if getattr(m, "has_mlp", False):
            raise ValueError("CrossAttentionBlock.from_module: blocks with an MLP (IBM has_mlp=True) are not CrossViT's fusion")
        head_dim = m.norm1.normalized_shape[0] // m.attn.num_heads
        if abs(float(getattr(m.attn, "scale", head_dim ** -0.5)) - head_dim ** -0.5) > 1e-12:
            raise ValueError(f"CrossAttentionBlock.from_module: attn.scale {m.attn.scale} is not head_dim ** -0.5 "
                             f"(a custom qk_scale), which the fused and reference paths assume")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.norm1, new.attn = m.norm1, m.attn
        new.drop_path = getattr(m, "drop_path", nn.Identity())
        new.set_backend(backend)
        return new

    def forward(self, cls: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens is None:
            tokens = cls[:, 1:]
            cls = cls[:, 0:1]
        a = self.attn
        if not torch.jit.is_scripting() and self._fused_call("cls_cross_attention", tokens):
            out = self._fused(cls, tokens)
        else:
            p = a.attn_drop.p if self.training else 0.0
            out = cls_cross_attention_ref(
                cls, tokens, self.norm1.weight, self.norm1.bias,
                a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias, a.wv.weight, a.wv.bias,
                a.proj.weight, a.proj.bias, a.num_heads, self.norm1.eps, dropout_p=p,
            )
        return cls + self.drop_path(a.proj_drop(out))

    @torch.jit.unused
    def _fused(self, cls, tokens):
        # type: (torch.Tensor, torch.Tensor) -> torch.Tensor
        from crossvit_fast.ops.cls_cross_attention import cls_cross_attention

        a = self.attn
        params = (self.norm1.weight, self.norm1.bias, a.wq.weight, a.wq.bias, a.wk.weight, a.wk.bias,
                  a.wv.weight, a.wv.bias, a.proj.weight, a.proj.bias)
        dt = _autocast_dtype(tokens)
        if dt is not None:
            # the parameters cast to the autocast dtype, the op's compute dtype; float32 activations go in as they
            # are (the kernels round them as they load them: no copy of the tokens)
            params = tuple(t if t is None else t.to(dt) for t in params)
            cls = cls if cls.dtype in (dt, torch.float32) else cls.to(dt)
            tokens = tokens if tokens.dtype in (dt, torch.float32) else tokens.to(dt)
        return cls_cross_attention(cls, tokens, *params, a.num_heads, self.norm1.eps)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class MultiScaleBlock(nn.Module):
    """One multi-scale block: each branch's transformer blocks, then CLS-query fusion in both directions.

    Keys as timm's ``MultiScaleBlock``: ``blocks.{b}.{j}``, ``projs.{b}.{0,2}``, ``fusion.{b}``,
    ``revert_projs.{b}.{0,2}``. Branch i's fusion uses branch j = 1 - i's width and heads.
    """

    def __init__(
        self,
        dim: Sequence[int],
        depth: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: Sequence[float],
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Union[float, Sequence[float]] = 0.0,
        backend: Optional[str] = None,
    ):
        super().__init__()
        num_branches = len(dim)
        self.num_branches = num_branches
        if depth[-1] != 0:
            raise ValueError(
                f"MultiScaleBlock: depth {tuple(depth)} asks for {depth[-1]} stacked fusion blocks; every released "
                f"CrossViT uses one cross-attention per direction (last depth entry 0), the only layout supported"
            )
        if isinstance(drop_path, (int, float)):
            drop_path = [float(drop_path)] * max(max(depth[:-1]), 1)
        dpr = list(drop_path)

        self.blocks = nn.ModuleList()
        for d in range(num_branches):
            self.blocks.append(
                nn.Sequential(
                    *[
                        Block(dim[d], num_heads[d], mlp_ratio[d], qkv_bias, proj_drop, attn_drop, dpr[i], backend)
                        for i in range(depth[d])
                    ]
                )
            )

        self.projs = nn.ModuleList()
        for d in range(num_branches):
            j = (d + 1) % num_branches
            self.projs.append(nn.Sequential(_layer_norm(dim[d]), nn.GELU(), nn.Linear(dim[d], dim[j])))

        self.fusion = nn.ModuleList()
        for d in range(num_branches):
            j = (d + 1) % num_branches
            self.fusion.append(
                CrossAttentionBlock(dim[j], num_heads[j], qkv_bias, proj_drop, attn_drop, dpr[-1], backend)
            )

        self.revert_projs = nn.ModuleList()
        for d in range(num_branches):
            j = (d + 1) % num_branches
            self.revert_projs.append(nn.Sequential(_layer_norm(dim[j]), nn.GELU(), nn.Linear(dim[j], dim[d])))

    @classmethod
    def from_module(cls, m: nn.Module) -> "MultiScaleBlock":
        """A block that reuses ``m``'s ``blocks``, ``projs``, ``fusion`` and ``revert_projs`` (timm's or IBM's)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_branches = len(m.projs)
        new.blocks, new.projs, new.fusion, new.revert_projs = m.blocks, m.projs, m.fusion, m.revert_projs
        return new

    def forward(self, x: List[torch.Tensor]) -> List[torch.Tensor]:
        # explicit loops over the ModuleLists: what TorchScript compiles
        outs_b: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            outs_b.append(block(x[i]))
        proj_cls: List[torch.Tensor] = []
        for i, proj in enumerate(self.projs):
            proj_cls.append(proj(outs_b[i][:, 0:1]))  # (B, 1, dim_j)
        new_cls: List[torch.Tensor] = []
        for i, fusion in enumerate(self.fusion):
            j = (i + 1) % self.num_branches
            new_cls.append(fusion(proj_cls[i], outs_b[j][:, 1:]))  # (B, 1, dim_j); branch j's tokens as a view
        outs: List[torch.Tensor] = []
        for i, revert_proj in enumerate(self.revert_projs):
            cls_i = revert_proj(new_cls[i])  # (B, 1, dim_i)
            if not torch.jit.is_scripting() and _may_write_in_place(outs_b[i], x[i], cls_i):
                # Without autograd, put the new CLS into the blocks' output (every fusion has read it already)
                # instead of building a (B, 1 + N, dim_i) copy with torch.cat.
                outs_b[i][:, 0:1].copy_(cls_i)
                outs.append(outs_b[i])
            else:
                outs.append(torch.cat((cls_i, outs_b[i][:, 1:]), dim=1))
        return outs



@torch.jit.unused
def _may_write_in_place(out, inp, cls):
    # type: (torch.Tensor, torch.Tensor, torch.Tensor) -> bool
    """Whether ``out[:, :1] = cls`` may replace the concatenation: nothing records autograd history, ``out`` is
    a fresh tensor (not the block stack's input), and the write keeps torch.cat's result dtype. Never while
    torch.fx traces (a Proxy has no dtype; the graph keeps torch.cat) nor under TorchScript (the caller skips it)."""
    if isinstance(out, torch.fx.Proxy):
        return False
    if torch.is_grad_enabled() and (out.requires_grad or cls.requires_grad):
        return False
    widening = out.dtype == torch.float32 and cls.dtype in (torch.float16, torch.bfloat16)
    same_dtype = cls.dtype == out.dtype or widening
    return out is not inp and same_dtype
