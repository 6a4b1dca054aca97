"""The CrossViT family by name: the 11 released configurations (``MODEL_CONFIGS``), IBM's names for them
(``ALIASES``), timm's pretrained tags (``TAGS``), their multiply-adds (``MODEL_GMACS``), and the name parsing of
``create_model`` (``parse_model_name``, ``model_config``, ``list_models``).

Plain data and string handling: this module imports nothing of crossvit_fast, nor torch.
"""

from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Tuple

__all__ = ["MODEL_CONFIGS", "MODEL_GMACS", "ALIASES", "TAGS", "list_models", "model_config", "parse_model_name"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
"""timm's pretrained tags of the CrossViT family (``crossvit_9_240.in1k``), the tags timm releases weights under:
accepted in model names and mapped to the model."""

MODEL_GMACS: Dict[str, float] = {
    "crossvit_tiny_240": 1.57, "crossvit_small_240": 5.63, "crossvit_base_240": 21.22,
    "crossvit_9_240": 1.85, "crossvit_15_240": 5.81, "crossvit_18_240": 9.05,
    "crossvit_9_dagger_240": 1.99, "crossvit_15_dagger_240": 6.13, "crossvit_18_dagger_240": 9.50,
    "crossvit_15_dagger_408": 21.45, "crossvit_18_dagger_408": 32.47,
}
"""fvcore multiply-adds per image at the model's own size, in billions (``flops(model).total() / 1e9``; the paper's
"FLOPs")."""

_HUB_PREFIXES = ("hf_hub:", "hf-hub:")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
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
    if "/" in key:
        org, key = key.split("/", 1)
        if org != "timm":
            raise ValueError(f"{name!r}: crossvit_fast knows timm's CrossViT weights ('timm/<name>.<tag>'), "
                             f"not those of Hub organisation {org!r}")
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
