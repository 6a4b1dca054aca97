"""The CrossViT family: the model class, the 11 released configurations, ``create_model`` and ``list_models``.

Module tree and state_dict keys are timm's (``timm/models/crossvit.py``), so timm state dicts load with
``strict=True``; IBM's release checkpoints load through :func:`crossvit_fast.load_checkpoint`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crossvit_fast.config import LN_EPS
from crossvit_fast.layers import MultiScaleBlock, PatchEmbed

__all__ = ["CrossViT", "MODEL_CONFIGS", "MODEL_GMACS", "ALIASES", "TAGS", "create_model", "list_models", "model_config",
           "parse_model_name"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(x) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or an (H, W) pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


class BackendMap(dict):
    """op -> the resolved backend of each of its seams (a plain dict of lists); ``repr`` counts them per op."""

    def summary(self) -> Dict[str, Dict[str, int]]:
        """op -> {backend: number of seams}."""
        out: Dict[str, Dict[str, int]] = {}
        for op, names in self.items():
            for n in names:
                out.setdefault(op, {}).setdefault(n, 0)
                out[op][n] += 1
        return out

    def __repr__(self) -> str:
        parts = [
            f"{op}: " + ", ".join(f"{c} x {b}" for b, c in counts.items())
            for op, counts in self.summary().items()
        ]
        return "{" + "; ".join(parts) + "}"

    __str__ = __repr__


class CrossViT(nn.Module):
    """Dual-branch CrossViT (Chen, Fan, Panda, ICCV 2021), computing what timm's ``CrossVit`` computes.

    Args mirror timm's, plus ``backend`` ("reference", "torch", "triton", "auto"; None: the current default, see
    :mod:`crossvit_fast.backend`). ``img_size`` may be an int or ``(H, W)``; the large branch sees the image
    resized by ``img_scale[1]`` (bicubic), and the patch grids are computed per side, so any size whose branch
    images are at least one patch wide builds.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        img_scale: Sequence[Union[float, Fraction]] = (1.0, 1.0),
        patch_size: Sequence[int] = (12, 16),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: Sequence[int] = (192, 384),
        depth: Sequence[Sequence[int]] = ((1, 3, 0), (1, 3, 0), (1, 3, 0)),
        num_heads: Sequence[int] = (6, 12),
        mlp_ratio: Sequence[float] = (2.0, 2.0, 4.0),
        multi_conv: bool = False,
        crop_scale: bool = False,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        backend: Optional[str] = None,
    ):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = _pair(img_size)
        self.img_scale = tuple(Fraction(s).limit_denominator(10000) for s in img_scale)
        # Each branch's image: floor(side * scale), exactly (timm: int(side * float scale)).
        self.img_size_scaled = [
            tuple(int(math.floor(side * s)) for side in self.img_size) for s in self.img_scale
        ]
        self.crop_scale = crop_scale
        self.num_branches = len(patch_size)
        self.embed_dim = tuple(embed_dim)
        self.num_features = self.head_hidden_size = sum(embed_dim)
        self.grad_checkpointing = False

        self.patch_embed = nn.ModuleList(
            [
                PatchEmbed(im, p, in_chans, d, multi_conv)
                for im, p, d in zip(self.img_size_scaled, patch_size, embed_dim)
            ]
        )
        num_patches = [pe.num_patches for pe in self.patch_embed]
        for i in range(self.num_branches):
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + num_patches[i], embed_dim[i])))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, embed_dim[i])))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        total_depth = sum(sum(x[-2:]) for x in depth)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, total_depth, device="cpu")]
        ptr = 0
        self.blocks = nn.ModuleList()
        for block_cfg in depth:
            curr = max(block_cfg[:-1]) + block_cfg[-1]
            self.blocks.append(
                MultiScaleBlock(
                    embed_dim, block_cfg, num_heads, mlp_ratio, qkv_bias,
                    proj_drop_rate, attn_drop_rate, dpr[ptr : ptr + curr], backend,
                )
            )
            ptr += curr

        self.norm = nn.ModuleList([nn.LayerNorm(d, eps=LN_EPS) for d in embed_dim])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.ModuleList(
            [nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity() for d in embed_dim]
        )

        for i in range(self.num_branches):
            _trunc_normal_(getattr(self, f"pos_embed_{i}"))
            _trunc_normal_(getattr(self, f"cls_token_{i}"))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- timm-compatible conveniences -------------------------------------------------------------------------
    @property
    def patch_grids(self) -> List[Tuple[int, int]]:
        return [pe.grid_size for pe in self.patch_embed]

    @property
    def backends(self) -> "BackendMap":
        """The resolved backend of every fused-op seam, by op: e.g. ``{"self_attention": ["torch"], ...}``
        (``"triton"``: fused; ``"torch"``: what timm runs; ``"reference"``: the explicit math); printed as a per-op
        count (``self_attention: 27 x torch``)."""
        out = BackendMap()
        for m in self.modules():
            op = getattr(m, "op_name", "")
            if op:
                out.setdefault(op, []).append(m.backend)
        return out

    def no_weight_decay(self):
        out = set()
        for i in range(self.num_branches):
            out.add(f"cls_token_{i}")
            if getattr(self, f"pos_embed_{i}", None) is not None and getattr(self, f"pos_embed_{i}").requires_grad:
                out.add(f"pos_embed_{i}")
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each multi-scale block in backward to save activation memory (timm's CrossViT refuses)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.norm[0].weight
        self.head = nn.ModuleList(
            [
                nn.Linear(d, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
                for d in self.embed_dim
            ]
        )
        self.head.train(self.training)  # the new head takes the model's mode, as in timm

    # --- forward ------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"CrossViT expects images (B, {self.in_chans}, H, W), got a tensor of shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"CrossViT expects a floating-point image tensor, got {x.dtype}: convert it first, e.g. "
                f"x.float().div(255) and normalise with the model's pretrained_cfg mean and std"
            )
        p = self.norm[0].weight
        autocast_ok = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if x.dtype != p.dtype and not autocast_ok:
            raise ValueError(
                f"CrossViT's weights are {p.dtype} and the input is {x.dtype}: pass x.to({p.dtype}) "
                f"(or convert the model first: model.to({x.dtype}))"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(f"CrossViT expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"CrossViT built for {self.img_size[0]}x{self.img_size[1]} (H x W) images got "
                f"{x.shape[-2]}x{x.shape[-1]}; build the model with img_size=({x.shape[-2]}, {x.shape[-1]}) "
                f"(and load_checkpoint resamples the position embeddings)"
            )

    def _scale_image(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        H, W = x.shape[-2:]
        if (H, W) == tuple(size):
            return x
        if self.crop_scale and size[0] <= H and size[1] <= W:
            top, left = int(round((H - size[0]) / 2.0)), int(round((W - size[1]) / 2.0))
            return x[:, :, top : top + size[0], left : left + size[1]]
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        self._check_input(x)
        B = x.shape[0]
        xs = []
        for i, patch_embed in enumerate(self.patch_embed):
            x_ = patch_embed(self._scale_image(x, self.img_size_scaled[i]))  # (B, N_i, dim_i)
            cls_token = getattr(self, f"cls_token_{i}").expand(B, -1, -1)
            x_ = torch.cat((cls_token, x_), dim=1) + getattr(self, f"pos_embed_{i}")  # (B, 1 + N_i, dim_i)
            xs.append(self.pos_drop(x_))
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                xs = checkpoint(blk, xs, use_reentrant=False)
            else:
                xs = blk(xs)
        return [norm(xs[i]) for i, norm in enumerate(self.norm)]

    def forward_head(self, xs: List[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        feats = [x[:, 1:].mean(dim=1) for x in xs] if self.global_pool == "avg" else [x[:, 0] for x in xs]
        feats = [self.head_drop(f) for f in feats]
        if pre_logits or isinstance(self.head[0], nn.Identity):
            return torch.cat(feats, dim=1)
        return torch.mean(torch.stack([head(feats[i]) for i, head in enumerate(self.head)], dim=0), dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- the family -------------------------------------------------------------------------------------------------

_S240 = Fraction(224, 240)  # the large branch sees 224x224 of a 240x240 image
_S408 = Fraction(384, 408)  # and 384x384 of 408x408


def _cfg(img, dims, heads, m, mlp, dagger, ibm):
    return {
        "kwargs": dict(
            img_size=img,
            img_scale=(Fraction(1), _S240 if img == 240 else _S408),
            patch_size=(12, 16),
            embed_dim=dims,
            depth=((1, m, 0),) * 3,
            num_heads=heads,
            mlp_ratio=(mlp, mlp, 1.0),
            multi_conv=dagger,
        ),
        "pretrained_cfg": dict(
            input_size=(3, img, img),
            crop_pct=0.875 if img == 240 else 1.0,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        "ibm_name": ibm,
    }


MODEL_CONFIGS: Dict[str, dict] = {
    "crossvit_tiny_240": _cfg(240, (96, 192), (3, 3), 4, 4.0, False, "crossvit_tiny_224"),
    "crossvit_small_240": _cfg(240, (192, 384), (6, 6), 4, 4.0, False, "crossvit_small_224"),
    "crossvit_base_240": _cfg(240, (384, 768), (12, 12), 4, 4.0, False, "crossvit_base_224"),
    "crossvit_9_240": _cfg(240, (128, 256), (4, 4), 3, 3.0, False, "crossvit_9_224"),
    "crossvit_15_240": _cfg(240, (192, 384), (6, 6), 5, 3.0, False, "crossvit_15_224"),
    "crossvit_18_240": _cfg(240, (224, 448), (7, 7), 6, 3.0, False, "crossvit_18_224"),
    "crossvit_9_dagger_240": _cfg(240, (128, 256), (4, 4), 3, 3.0, True, "crossvit_9_dagger_224"),
    "crossvit_15_dagger_240": _cfg(240, (192, 384), (6, 6), 5, 3.0, True, "crossvit_15_dagger_224"),
    "crossvit_18_dagger_240": _cfg(240, (224, 448), (7, 7), 6, 3.0, True, "crossvit_18_dagger_224"),
    "crossvit_15_dagger_408": _cfg(408, (192, 384), (6, 6), 5, 3.0, True, "crossvit_15_dagger_384"),
    "crossvit_18_dagger_408": _cfg(408, (224, 448), (7, 7), 6, 3.0, True, "crossvit_18_dagger_384"),
}

ALIASES: Dict[str, str] = {cfg["ibm_name"]: name for name, cfg in MODEL_CONFIGS.items()}
"""IBM/CrossViT's model names (named after the large branch's size) -> timm's names."""


TAGS = ("in1k",)
"""timm's pretrained tags of the CrossViT family (``crossvit_9_240.in1k``): accepted and mapped to the model."""

MODEL_GMACS: Dict[str, float] = {
    "crossvit_tiny_240": 1.57, "crossvit_small_240": 5.63, "crossvit_base_240": 21.22,
    "crossvit_9_240": 1.85, "crossvit_15_240": 5.81, "crossvit_18_240": 9.05,
    "crossvit_9_dagger_240": 1.99, "crossvit_15_dagger_240": 6.13, "crossvit_18_dagger_240": 9.50,
    "crossvit_15_dagger_408": 21.45, "crossvit_18_dagger_408": 32.47,
}
"""fvcore multiply-adds per image at the model's own size, in billions (``flops(model).total() / 1e9``; the paper's
"FLOPs"); tests/test_cli.py checks them against fvcore."""

_HUB_PREFIXES = ("hf_hub:", "hf-hub:")


def _did_you_mean(word: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_model_name(name: str) -> Tuple[str, Optional[str]]:
    """``(model name, pretrained tag or None)`` of a timm or IBM name, with timm's spellings accepted:
    ``crossvit_9_240``, ``crossvit_9_240.in1k``, ``timm/crossvit_9_240.in1k``, ``hf_hub:timm/crossvit_9_240``
    (``hf-hub:`` too). IBM names (``crossvit_9_224``) map to timm's. An unknown model or tag raises ``ValueError``
    with the nearest known name."""
    if not isinstance(name, str):
        raise ValueError(f"a CrossViT model name must be a string, got {type(name).__name__}")
    key = name.strip()
    for prefix in _HUB_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            if not key.startswith("timm/"):
                raise ValueError(
                    f"{name!r}: crossvit_fast knows timm's CrossViT models only ({prefix}timm/<model>[.tag])"
                )
    if key.startswith("timm/"):
        key = key[len("timm/"):]
    base, _, tag = key.partition(".")
    if base in MODEL_CONFIGS:
        canonical = base
    elif base in ALIASES:
        canonical = ALIASES[base]
    else:
        raise ValueError(
            f"unknown CrossViT model {name!r}{_did_you_mean(base, list_models(include_aliases=True))}; "
            f"known: {', '.join(list_models())} (IBM names: {', '.join(ALIASES)}); see crossvit-fast list"
        )
    if not tag:
        return canonical, None
    if tag not in TAGS:
        hint = _did_you_mean(tag, TAGS) or f" (did you mean {base + '.' + TAGS[0]!r}?)"
        raise ValueError(f"unknown pretrained tag {tag!r} in {name!r}{hint}; timm's CrossViT tags: {', '.join(TAGS)}")
    return canonical, tag


def _canonical(name: str) -> str:
    return parse_model_name(name)[0]


def model_config(name: str) -> dict:
    """The configuration of ``name`` (timm or IBM name): constructor kwargs, pretrained_cfg, IBM name."""
    canonical = _canonical(name)
    cfg = MODEL_CONFIGS[canonical]
    return {"name": canonical, **{k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}}


def list_models(include_aliases: bool = False) -> List[str]:
    """The 11 model names (timm's); with ``include_aliases``, IBM's names too."""
    names = list(MODEL_CONFIGS)
    return names + list(ALIASES) if include_aliases else names


def create_model(
    name: str,
    pretrained: Union[bool, str] = False,
    *,
    strict: bool = True,
    weights_only: bool = True,
    **overrides,
) -> CrossViT:
    """Build model ``name`` (timm or IBM name) with constructor ``overrides`` (num_classes, img_size, drop rates,
    backend, ...). ``pretrained`` may be a checkpoint path (timm or IBM format); weights are never downloaded.
    ``strict`` and ``weights_only`` go to :func:`crossvit_fast.load_checkpoint` with it (``weights_only=False`` for
    IBM's release files, which pickle their training args; ``strict=False`` to load what fits, e.g. all but a head
    of another class count).
    """
    cfg = model_config(name)
    kwargs = dict(cfg["kwargs"])
    kwargs.update(overrides)
    model = CrossViT(**kwargs)
    model.model_name = cfg["name"]
    model.pretrained_cfg = dict(cfg["pretrained_cfg"], input_size=(kwargs.get("in_chans", 3), *model.img_size))
    if pretrained:
        if pretrained is True:
            raise ValueError(
                "crossvit_fast does not download weights: pass pretrained=PATH to a timm or IBM checkpoint, "
                "or use crossvit_fast.load_checkpoint(model, path_or_state_dict)"
            )
        from crossvit_fast.checkpoint import load_checkpoint

        load_checkpoint(model, pretrained, strict=strict, weights_only=weights_only)
    return model
