"""The CrossViT model class and ``create_model``, which builds the configurations of
:mod:`crossvit_fast.model_registry` (its tables and name functions are importable from here too).

Module tree and state_dict keys are timm's (``timm/models/crossvit.py``), so timm state dicts load with
``strict=True``; IBM's release checkpoints load through :func:`crossvit_fast.load_checkpoint`.
"""

import math
import os
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crossvit_fast import pretrained as pt
from crossvit_fast.backend import count_backends, module_backends
from crossvit_fast.checkpoint import load_checkpoint
from crossvit_fast.config import LN_EPS
from crossvit_fast.layers import MultiScaleBlock, PatchEmbed
from crossvit_fast.model_registry import (
    ALIASES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    MODEL_GMACS,
    TAGS,
    _canonical,
    list_models,
    model_config,
    parse_model_name,
)
from crossvit_fast.pretrained import _take_indices

__all__ = ["CrossViT", "MODEL_CONFIGS", "MODEL_GMACS", "ALIASES", "TAGS", "create_model", "list_models", "model_config",
           "parse_model_name"]


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
        return count_backends(self)

    def __repr__(self) -> str:
        parts = [
            f"{op}: " + ", ".join(f"{c} x {b}" for b, c in counts.items())
            for op, counts in self.summary().items()
        ]
        return "{" + "; ".join(parts) + "}"

    __str__ = __repr__


# --- input checks and branch scaling: leaves of torch.fx graphs (torch.fx.wrap), compiled by TorchScript ----------
def check_image(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> None:
    """Raise unless ``x`` is a batch of ``(in_chans, *img_size)`` images."""
    if x.dim() != 4:
        raise ValueError(f"CrossViT expects images (B, {in_chans}, H, W), got a tensor of shape {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"CrossViT expects {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)})")
    if x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(
            f"CrossViT built for {img_size[0]}x{img_size[1]} (H x W) images got "
            f"{x.shape[2]}x{x.shape[3]}; build the model with img_size=({x.shape[2]}, {x.shape[3]}) "
            f"(and load_checkpoint resamples the position embeddings)"
        )


def scale_image(x: torch.Tensor, size: Tuple[int, int], crop_scale: bool = False) -> torch.Tensor:
    """A branch's image: ``x`` itself, its centre crop (``crop_scale``) or its bicubic resize to ``size``."""
    H, W = x.shape[-2], x.shape[-1]
    if H == size[0] and W == size[1]:
        return x
    if crop_scale and size[0] <= H and size[1] <= W:
        top, left = int(round((H - size[0]) / 2.0)), int(round((W - size[1]) / 2.0))
        return x[:, :, top : top + size[0], left : left + size[1]]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


@torch.jit.unused
def check_image_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise unless ``x`` is floating point in the weights' dtype (any float dtype under autocast)."""
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"CrossViT expects a floating-point image tensor, got {x.dtype}: convert it first, e.g. "
            f"x.float().div(255) and normalise with the model's pretrained_cfg mean and std"
        )
    autocast_ok = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype != weight.dtype and not autocast_ok:
        raise ValueError(
            f"CrossViT's weights are {weight.dtype} and the input is {x.dtype}: pass x.to({weight.dtype}) "
            f"(or convert the model first: model.to({x.dtype}))"
        )


torch.fx.wrap("check_image")
torch.fx.wrap("check_image_dtype")
torch.fx.wrap("scale_image")


class CrossViT(nn.Module):
    """Dual-branch CrossViT (Chen, Fan, Panda, ICCV 2021), computing what timm's ``CrossVit`` computes.

    Args mirror timm's, plus ``backend`` ("reference", "torch", "triton", "auto"; None: the current default, see
    :mod:`crossvit_fast.backend`). ``img_size`` may be an int or ``(H, W)``; the large branch sees the image
    resized by ``img_scale[1]`` (bicubic), and the patch grids are computed per side, so any size whose branch
    images are at least one patch wide builds.
    """

    __jit_unused_properties__ = ["backends", "patch_grids"]  # Python-only (TorchScript compiles properties)

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

        # Features (timm's layout): each branch's patch tokens after each multi-scale block, branch-major, so
        # index b * num_feature_blocks + i is branch b after block i.
        self.num_feature_blocks = len(depth)
        self.feature_info = [
            dict(num_chs=embed_dim[b], reduction=round(patch_size[b] / float(self.img_scale[b])), module=f"blocks.{i}")
            for b in range(self.num_branches)
            for i in range(self.num_feature_blocks)
        ]

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
        """:func:`crossvit_fast.backend.module_backends`: the resolved backend of every fused-op seam, by op, e.g.
        ``{"self_attention": ["torch"], ..., "linear": ["torch"], ...}``
        (``"triton"``: fused; ``"torch"``: what timm runs; ``"reference"``: the explicit math); printed as a per-op
        count (``self_attention: 27 x torch``)."""
        return BackendMap(module_backends(self))

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
        ref = self.cls_token_0  # device and dtype (the norms may be pruned to Identity)
        self.head = nn.ModuleList(
            [
                nn.Linear(d, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
                for d in self.embed_dim
            ]
        )
        self.head.train(self.training)  # the new head takes the model's mode, as in timm

    # --- timm's feature and optimizer API ------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups by name, as timm's ``CrossVit``: the stem (tokens, position embeddings, patch
        embeddings), then one group per multi-scale block, the final norms last (what timm's layer-wise lr decay
        and ``group_parameters`` read)."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """The forward that also returns intermediate features, as timm's ``CrossVit.forward_intermediates``.

        Features are each branch's patch tokens (CLS removed) after each multi-scale block, branch-major: with D
        blocks, indices 0..D-1 are branch 0 (small patches), D..2D-1 branch 1. ``indices``: None (all), an int n
        (the last n) or a list (negative from the end). ``norm`` applies the branch's final norm; ``output_fmt``
        "NCHW" (``(B, C, rows, cols)``) or "NLC" (``(B, rows*cols, C)``); ``stop_early`` skips the blocks after the
        last feature asked for. Returns ``(final normed token lists, features)``, or the features alone.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        num_blocks = self.num_feature_blocks
        take = _take_indices(self.num_branches * num_blocks, indices)
        last_block = max(idx % num_blocks for idx in take)
        xs = self._embed(x)
        blocks = self.blocks[: last_block + 1] if stop_early else self.blocks
        per_branch: List[List[torch.Tensor]] = [[] for _ in range(self.num_branches)]
        for i, blk in enumerate(blocks):
            xs = blk(xs)
            for b, norm_layer in enumerate(self.norm):
                if b * num_blocks + i in take:
                    y = norm_layer(xs[b]) if norm else xs[b]
                    per_branch[b].append(y[:, 1:])  # (B, rows*cols, C_b)
        B = x.shape[0]
        intermediates: List[torch.Tensor] = []
        for pe, feats in zip(self.patch_embed, per_branch):
            if output_fmt == "NCHW":
                rows, cols = pe.grid_size
                feats = [y.reshape(B, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for y in feats]  # (B, C, r, c)
            intermediates.extend(feats)
        if intermediates_only:
            return intermediates
        return [norm_layer(xs[i]) for i, norm_layer in enumerate(self.norm)], intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last feature in ``indices`` (timm's rule), optionally the final norms and the
        head; returns the absolute feature indices kept. Feature indices keep their meaning afterwards."""
        take = _take_indices(self.num_branches * self.num_feature_blocks, indices)
        last_block = max(idx % self.num_feature_blocks for idx in take)
        self.blocks = self.blocks[: last_block + 1]
        if prune_norm:
            self.norm = nn.ModuleList([nn.Identity() for _ in range(self.num_branches)])
        if prune_head:
            self.reset_classifier(0)
        return take

    # --- forward ------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.in_chans, self.img_size)
        if not torch.jit.is_scripting():
            check_image_dtype(x, self.cls_token_0)

    def _scale_image(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        return scale_image(x, size, self.crop_scale)

    def _branch_tokens(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Branch i's (cls_token, pos_embed); spelled out for the two branches TorchScript can compile."""
        if i == 0:
            return self.cls_token_0, self.pos_embed_0
        if i == 1:
            return self.cls_token_1, self.pos_embed_1
        return self._branch_tokens_any(i)

    @torch.jit.unused
    def _branch_tokens_any(self, i):
        # type: (int) -> Tuple[torch.Tensor, torch.Tensor]
        return getattr(self, f"cls_token_{i}"), getattr(self, f"pos_embed_{i}")

    def _embed(self, x: torch.Tensor) -> List[torch.Tensor]:
        self._check_input(x)
        B = x.shape[0]
        xs: List[torch.Tensor] = []
        for i, patch_embed in enumerate(self.patch_embed):
            x_ = patch_embed(scale_image(x, self.img_size_scaled[i], self.crop_scale))  # (B, N_i, dim_i)
            cls_token, pos_embed = self._branch_tokens(i)
            x_ = torch.cat((cls_token.expand(B, -1, -1), x_), dim=1) + pos_embed  # (B, 1 + N_i, dim_i)
            xs.append(self.pos_drop(x_))
        return xs

    @torch.jit.unused
    def _blocks_checkpointed(self, xs):
        # type: (List[torch.Tensor]) -> List[torch.Tensor]
        for blk in self.blocks:
            xs = checkpoint(blk, xs, use_reentrant=False)
        return xs

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        xs = self._embed(x)
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            xs = self._blocks_checkpointed(xs)
        else:
            for blk in self.blocks:
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


def _check_device_dtype(device, dtype) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    dev = None
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch.device or a device string ('cpu', 'cuda:0', 'meta'), "
                             f"got {device!r}") from e
    dt = dtype
    if isinstance(dtype, str):
        dt = getattr(torch, dtype.replace("torch.", ""), None)
    if dtype is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...), "
                         f"got {dtype!r}")
    return dev, dt


def _layer_norm_eps(norm_layer) -> float:
    """The eps of ``norm_layer``, which must build affine ``nn.LayerNorm``s (what every crossvit_fast path computes)."""
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a callable building a norm layer from a width, got {norm_layer!r}")
    probe = norm_layer(8)
    if type(probe) is not nn.LayerNorm or probe.weight is None or probe.bias is None:
        raise ValueError(
            f"norm_layer must build affine torch.nn.LayerNorm layers (e.g. functools.partial(nn.LayerNorm, "
            f"eps=1e-6)): crossvit_fast's fused and reference paths compute LayerNorm; got {probe!r}"
        )
    return float(probe.eps)


def create_model(
    name: str,
    pretrained: Union[bool, str, "os.PathLike[str]"] = False,
    pretrained_cfg: Union[None, str, Dict] = None,
    pretrained_cfg_overlay: Optional[Dict] = None,
    checkpoint_path: Optional[Union[str, "os.PathLike[str]"]] = None,
    cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    norm_layer=None,
    features_only: bool = False,
    out_indices: Optional[Union[int, Sequence[int]]] = None,
    feature_cls: Optional[str] = None,
    scriptable: Optional[bool] = None,
    exportable: Optional[bool] = None,
    no_jit: Optional[bool] = None,
    strict: bool = True,
    weights_only: bool = True,
    **overrides,
) -> nn.Module:
    """Build model ``name`` as ``timm.create_model`` does, with constructor ``overrides`` (num_classes, img_size,
    in_chans, drop rates, backend, ...).

    ``name``: a timm name (``crossvit_9_240``, also ``crossvit_9_240.in1k``, ``timm/crossvit_9_240.in1k``,
    ``hf_hub:timm/...``) or IBM's (``crossvit_9_224``). ``pretrained``: True loads timm's released weights from the
    Hugging Face Hub (needs ``huggingface_hub``; see :mod:`crossvit_fast.pretrained`), a path loads that timm or
    IBM checkpoint; both drop the classifier (with a warning) when ``num_classes`` differs from the weights' and
    adapt the first convolutions to ``in_chans``. ``pretrained_cfg`` (a tag or a dict) and
    ``pretrained_cfg_overlay`` as in timm (the cfg's ``input_size`` sets ``img_size``/``in_chans`` unless given);
    ``checkpoint_path``: a checkpoint loaded strictly after building (timm's ``load_checkpoint``); ``cache_dir``:
    the Hub cache; ``device`` (``"meta"`` included) and ``dtype``: where and in what the parameters are made;
    ``norm_layer``: an affine ``nn.LayerNorm`` factory (its eps is used). ``strict`` and ``weights_only`` go to
    :func:`crossvit_fast.load_checkpoint` for a checkpoint path (``weights_only=False`` for IBM's release files,
    which pickle their training args; ``strict=False`` loads what fits). ``features_only=True`` returns the
    feature extractor timm builds for CrossViT (:class:`crossvit_fast.pretrained.FeatureGetter`), features
    ``out_indices`` (default: each branch's last block). ``scriptable``, ``exportable``, ``no_jit``: timm's layer
    flags, accepted for compatibility (these models always script and export). The model's ``pretrained_cfg``
    (and its alias ``default_cfg``) holds timm's fields, ``input_size`` being the model's own.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}  # as timm.create_model
    if not (isinstance(pretrained, (bool, str)) or isinstance(pretrained, os.PathLike)):
        raise TypeError(f"pretrained must be True/False or a checkpoint path, got {type(pretrained).__name__}")
    if feature_cls is not None and str(feature_cls).lower() != "getter":
        raise ValueError(f"feature_cls={feature_cls!r}: CrossViT's features_only model is timm's 'getter' "
                         f"(forward_intermediates); no other feature class is supported")
    if not features_only and out_indices is not None:
        raise ValueError("out_indices is only used with features_only=True")
    dev, dt = _check_device_dtype(device, dtype)
    is_meta = dev is not None and dev.type == "meta"
    if is_meta and (pretrained or checkpoint_path):
        raise ValueError("a model on the 'meta' device holds no values: build it without pretrained / "
                         "checkpoint_path, then load weights with load_state_dict(..., assign=True) after .to_empty()")
    eps = _layer_norm_eps(norm_layer) if norm_layer is not None else None

    arch, tag = parse_model_name(name)
    canonical = _canonical(arch)
    cfg = pt.resolve_pretrained_cfg(canonical, tag, pretrained_cfg, pretrained_cfg_overlay)
    kwargs = dict(MODEL_CONFIGS[canonical]["kwargs"])
    kwargs.update(in_chans=cfg["input_size"][0], img_size=tuple(cfg["input_size"][1:]))
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        kwargs["num_classes"] = cfg["num_classes"]
    kwargs.update(overrides)

    if dev is not None:
        with dev:
            model = CrossViT(**kwargs)
    else:
        model = CrossViT(**kwargs)
    if eps is not None:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    if dt is not None:
        model.to(dtype=dt)
    model.model_name = canonical

    if pretrained is True:
        state = pt.fetch_pretrained(cfg, cache_dir)
    elif pretrained:
        state = pt.read_weights(pretrained, weights_only=weights_only)
    else:
        state = None
    if state is not None:
        pt.load_pretrained(model, state, cfg, num_classes=0 if features_only else model.num_classes,
                           in_chans=model.in_chans, warn=not features_only, strict=strict)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)

    cfg = dict(cfg, input_size=(model.in_chans, *model.img_size))
    model.pretrained_cfg = cfg
    model.default_cfg = model.pretrained_cfg
    if not features_only:
        return model
    num_blocks = model.num_feature_blocks
    if out_indices is None:
        out_indices = [num_blocks * (b + 1) - 1 for b in range(model.num_branches)]
    elif isinstance(out_indices, tuple):
        out_indices = list(out_indices)
    features = pt.FeatureGetter(model, out_indices)
    features.pretrained_cfg = pt.cfg_for_features(cfg)
    features.default_cfg = features.pretrained_cfg
    return features
