"""timm's model-building conventions for crossvit_fast's models: pretrained configs, the Hub's released weights,
head and input-channel adaptation, the ``features_only`` wrapper.

Behaviour follows timm 1.0.x (``timm/models/_builder.py``, ``_pretrained.py``, ``_hub.py``, ``_features.py``):

* ``pretrained_cfg``: timm's 17 keys for a crossvit entry (``url`` .. ``license``), the ``hf_hub_id`` being
  ``timm/<name>.<tag>`` (the only tag timm releases for CrossViT is ``in1k``);
* ``pretrained=True``: the weights come from the Hugging Face Hub through ``huggingface_hub`` (an optional
  dependency, imported only then): ``model.safetensors`` when ``safetensors`` is installed, else
  ``pytorch_model.bin``. The Hub's cache (``HF_HOME``, ``HF_HUB_CACHE``, ``cache_dir``) and offline switch
  (``HF_HUB_OFFLINE=1``) are huggingface_hub's own;
* a model with another ``num_classes`` than the weights drops their classifier (``head.0``, ``head.1``) with a
  warning naming it; a model with ``in_chans`` != 3 gets the first convolutions adapted (1 channel: the sum over the
  RGB filters; C channels: the RGB filters tiled over C and scaled by 3 / C, so a grey image repeated C times gives
  the activations of the RGB one).

Loading is all or nothing: the adapted state dict goes through :func:`crossvit_fast.load_checkpoint` with
``strict=True``, which checks every key and shape before it copies anything.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from crossvit_fast.checkpoint import CheckpointError, _unwrap, load_checkpoint, to_timm_keys
from crossvit_fast.model_registry import MODEL_CONFIGS, parse_model_name
from crossvit_fast.model_registry import TAGS as PRETRAINED_TAGS

__all__ = [
    "PRETRAINED_CFG_KEYS",
    "PRETRAINED_TAGS",
    "FeatureInfo",
    "FeatureGetter",
    "adapt_input_conv",
    "default_pretrained_cfg",
    "load_pretrained",
    "parse_model_name",
    "resolve_pretrained_cfg",
]

# Every field of timm's PretrainedCfg with its default (None: left out of the dict, as timm's to_dict does).
_CFG_FIELDS: Dict[str, Any] = {
    "url": None, "file": None, "state_dict": None, "hf_hub_id": None, "hf_hub_filename": None, "source": None,
    "architecture": None, "tag": None, "custom_load": False,
    "input_size": (3, 224, 224), "test_input_size": None, "min_input_size": None, "fixed_input_size": False,
    "interpolation": "bicubic", "crop_pct": 0.875, "test_crop_pct": None, "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    "num_classes": 1000, "label_offset": None, "label_names": None, "label_descriptions": None,
    "pool_size": None, "test_pool_size": None, "first_conv": None, "classifier": None,
    "license": None, "description": None, "origin_url": None, "paper_name": None, "paper_ids": None, "notes": None,
}
PRETRAINED_CFG_KEYS = tuple(_CFG_FIELDS)
_KEEP_WHEN_NONE = ("pool_size",)  # timm keeps these keys in the dict even when None
_SOURCE_KEYS = ("url", "file", "state_dict", "hf_hub_id")

HUB_SAFE_FILE = "model.safetensors"
HUB_PICKLE_FILE = "pytorch_model.bin"


# --- configs ------------------------------------------------------------------------------------------------------
def _to_dict(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``PretrainedCfg.to_dict()``: field order, None values dropped (pool_size kept)."""
    return {k: cfg[k] for k in PRETRAINED_CFG_KEYS if cfg.get(k) is not None or k in _KEEP_WHEN_NONE}


def default_pretrained_cfg(architecture: str, tag: str = "in1k") -> Dict[str, Any]:
    """timm's registered pretrained cfg of ``architecture.tag`` (the 17 keys timm's model carries)."""
    cfg = MODEL_CONFIGS[architecture]
    img = cfg["kwargs"]["img_size"]
    dagger = cfg["kwargs"]["multi_conv"]
    conv = ".proj.0" if dagger else ".proj"
    out = dict(_CFG_FIELDS)
    out.update(
        url="",
        hf_hub_id=f"timm/{architecture}.{tag}",
        architecture=architecture,
        tag=tag,
        input_size=(3, img, img),
        fixed_input_size=True,
        crop_pct=cfg["pretrained_cfg"]["crop_pct"],
        mean=cfg["pretrained_cfg"]["mean"],
        std=cfg["pretrained_cfg"]["std"],
        num_classes=1000,
        first_conv=(f"patch_embed.0{conv}", f"patch_embed.1{conv}"),
        classifier=("head.0", "head.1"),
        license="apache-2.0",
    )
    return _to_dict(out)


def _check_cfg_keys(cfg: Mapping[str, Any], what: str) -> None:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{what} must be a dict of pretrained-cfg fields, got {type(cfg).__name__}")
    unknown = sorted(set(map(str, cfg)) - set(PRETRAINED_CFG_KEYS))
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; timm's pretrained cfg fields are "
                         f"{', '.join(PRETRAINED_CFG_KEYS)}")


def resolve_pretrained_cfg(
    architecture: str,
    tag: Optional[str] = None,
    pretrained_cfg: Union[None, str, Mapping[str, Any]] = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The pretrained cfg a model gets, by timm's rules: ``pretrained_cfg`` a tag (str) or a full cfg (dict: the
    fields it leaves out take timm's defaults), else the registered cfg of ``architecture.tag``; then
    ``pretrained_cfg_overlay`` replaces single fields."""
    if isinstance(pretrained_cfg, str):
        tag = pretrained_cfg
        pretrained_cfg = None
    if pretrained_cfg is not None:
        _check_cfg_keys(pretrained_cfg, "pretrained_cfg")
        cfg = dict(_CFG_FIELDS)
        cfg.update(pretrained_cfg)
    else:
        tag = tag or PRETRAINED_TAGS[0]
        if tag not in PRETRAINED_TAGS:
            raise ValueError(f"{architecture}: no pretrained tag {tag!r}; timm releases CrossViT weights under "
                             f"{', '.join(repr(t) for t in PRETRAINED_TAGS)}")
        cfg = dict(_CFG_FIELDS)
        cfg.update(default_pretrained_cfg(architecture, tag))
    if pretrained_cfg_overlay is not None:
        _check_cfg_keys(pretrained_cfg_overlay, "pretrained_cfg_overlay")
    overlay = dict(pretrained_cfg_overlay or {})
    if not cfg.get("architecture"):
        overlay.setdefault("architecture", architecture)
    if any(overlay.get(k) for k in _SOURCE_KEYS):
        overlay.setdefault("custom_load", False)
    cfg.update(overlay)
    size = cfg.get("input_size")
    if not (isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"pretrained cfg input_size must be (channels, height, width) of positive ints, got {size!r}")
    cfg["input_size"] = tuple(size)
    return _to_dict(cfg)


def cfg_for_features(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg_for_features``: a features model has no classifier."""
    return {k: v for k, v in cfg.items() if k not in ("num_classes", "classifier", "global_pool")}


# --- weights ------------------------------------------------------------------------------------------------------
def adapt_input_conv(weight: torch.Tensor, in_chans: int, base_chans: int = 3) -> torch.Tensor:
    """A first-convolution weight ``(O, base_chans, kh, kw)`` for ``in_chans`` input channels.

    1 channel: the sum over the ``base_chans`` filters (a grey image gives what the same grey in every channel
    gave). Otherwise the filters tiled cyclically over ``in_chans`` and scaled by ``base_chans / in_chans`` (an image
    whose channels all repeat the base ones keeps its activations)."""
    if weight.dim() != 4 or weight.shape[1] != base_chans:
        raise ValueError(f"adapt_input_conv: expected a conv weight (O, {base_chans}, kh, kw), "
                         f"got shape {tuple(weight.shape)}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"adapt_input_conv: in_chans must be a positive int, got {in_chans!r}")
    if in_chans == base_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        idx = torch.arange(in_chans, device=weight.device) % base_chans
        out = w[:, idx] * (base_chans / in_chans)
    return out.to(weight.dtype)


def _hub_download(repo_id: str, cache_dir: Optional[Union[str, os.PathLike]], filename: Optional[str]) -> str:
    """The local path of the weights file of ``repo_id`` (downloaded or from the Hub's cache)."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(
            f"pretrained=True downloads timm's weights ({repo_id}) with huggingface_hub, which is not installed: "
            f"pip install huggingface_hub (or pass pretrained=PATH / checkpoint_path=PATH to a checkpoint file)"
        ) from e
    try:
        import safetensors.torch  # noqa: F401
        has_safetensors = True
    except ImportError:
        has_safetensors = False
    if filename is not None:
        candidates = [filename]
    else:
        candidates = ([HUB_SAFE_FILE] if has_safetensors else []) + [HUB_PICKLE_FILE]
    errors: List[str] = []
    for name in candidates:
        try:
            return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - every failure is reported below with the remedy
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    files = " or ".join(candidates)
    where = cache_dir if cache_dir is not None else "the Hugging Face cache (HF_HUB_CACHE / HF_HOME)"
    raise RuntimeError(
        f"could not get timm's weights {repo_id} ({files}) from the Hugging Face Hub"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}, nor from {where}. Either connect to the network, or "
        f"download {files} from https://huggingface.co/{repo_id} and pass pretrained=PATH (or "
        f"checkpoint_path=PATH). Tried: " + "; ".join(errors)
    )


def read_weights(path: Union[str, os.PathLike], weights_only: bool = True) -> Dict[str, Any]:
    """A weights file: ``.safetensors`` (needs safetensors) or a torch file (``weights_only=False`` unpickles any
    object, for IBM's release files, which keep their training args: only for files you trust)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        try:
            import safetensors.torch
        except ImportError as e:
            raise ImportError(f"{path} is a .safetensors file: pip install safetensors to read it") from e
        return safetensors.torch.load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - re-raised with the remedy
        if weights_only and "weights_only" in str(e):
            raise CheckpointError(
                f"{path}: holds pickled objects besides tensors (IBM's files keep their training args); if you "
                f"trust the file, pass weights_only=False (create_model(..., weights_only=False) or "
                f"crossvit_fast.load_checkpoint(model, path, weights_only=False))"
            ) from e
        raise


def fetch_pretrained(cfg: Mapping[str, Any], cache_dir: Optional[Union[str, os.PathLike]] = None
                     ) -> Dict[str, torch.Tensor]:
    """The state dict ``cfg`` points at: its ``state_dict``, ``file``, ``url`` or ``hf_hub_id`` (timm's order)."""
    if cfg.get("state_dict") is not None:
        return dict(cfg["state_dict"])
    if cfg.get("file"):
        return read_weights(os.fspath(cfg["file"]))
    if cfg.get("url"):
        model_dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), "checkpoints")
        return torch.hub.load_state_dict_from_url(cfg["url"], model_dir=model_dir, map_location="cpu",
                                                  weights_only=True)
    if cfg.get("hf_hub_id"):
        return read_weights(_hub_download(cfg["hf_hub_id"], cache_dir, cfg.get("hf_hub_filename")))
    raise ValueError(f"pretrained=True but the pretrained cfg names no weights (no state_dict, file, url nor "
                     f"hf_hub_id): {dict(cfg)}")


def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    num_classes: int,
    in_chans: int,
    warn: bool = True,
    strict: bool = True,
) -> None:
    """Load released weights into ``model`` the way timm's ``load_pretrained`` does: the first convolutions
    adapted to ``in_chans``, the classifier dropped (with a warning naming it) when ``num_classes`` differs from
    the weights' (``warn=False``: silently, for a features model whose head is pruned anyway). Raises
    :class:`crossvit_fast.CheckpointError` and changes nothing when the rest does not fit (``strict=False``: loads
    what fits and returns the lists, as :func:`crossvit_fast.load_checkpoint`)."""
    source = to_timm_keys(_unwrap(state_dict))
    target = model.state_dict()
    base_chans = int((cfg.get("input_size") or (3,))[0])
    first_conv = cfg.get("first_conv") or ()
    for name in (first_conv,) if isinstance(first_conv, str) else first_conv:
        key = f"{name}.weight"
        if key in source and key in target and source[key].shape != target[key].shape and in_chans != base_chans:
            source[key] = adapt_input_conv(source[key], in_chans, base_chans)
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if classifier and num_classes != cfg.get("num_classes", 1000):
        dropped = [f"{c}.{p}" for c in classifier for p in ("weight", "bias") if f"{c}.{p}" in source]
        for key in dropped:
            del source[key]
        if dropped and warn:
            warnings.warn(
                f"pretrained weights have {cfg.get('num_classes', 1000)} classes and the model {num_classes}: "
                f"not loading the classifier ({', '.join(dropped)}); it keeps its fresh initialisation",
                stacklevel=3,
            )
        # the model's own head (if any) keeps its values: give them to the strict loader
        for c in classifier:
            for p in ("weight", "bias"):
                if f"{c}.{p}" in target:
                    source[f"{c}.{p}"] = target[f"{c}.{p}"]
    return load_checkpoint(model, source, strict=strict)


# --- features_only ------------------------------------------------------------------------------------------------
def _take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's feature index rule: None -> all, an int n -> the last n, a sequence -> those (negative from the end)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, bool) or not isinstance(indices, (int, list, tuple)):
        raise TypeError(f"indices must be None, an int or a list of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num_features} features "
                             f"(expected 1 to {num_features})")
        return list(range(num_features - indices, num_features))
    if len(indices) == 0:
        raise ValueError("indices is an empty list; expected at least one feature index")
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"indices must hold ints, got {i!r} in {indices!r}")
        idx = num_features + i if i < 0 else i
        if not 0 <= idx < num_features:
            raise ValueError(f"feature index {i} is out of range for {num_features} features "
                             f"(expected {-num_features} to {num_features - 1})")
        out.append(idx)
    return out


class FeatureInfo:
    """timm's ``FeatureInfo`` for the features a :class:`FeatureGetter` returns (channels, reduction, module)."""

    def __init__(self, info: Sequence[Dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(i) for i in info]
        self.out_indices = tuple(out_indices)

    def _get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None):
        picked = [self.info[i][key] for i in self.out_indices]
        if idx is None:
            return picked
        if isinstance(idx, int):
            return picked[idx]
        return [picked[i] for i in idx]

    def channels(self, idx=None):
        return self._get("num_chs", idx)

    def reduction(self, idx=None):
        return self._get("reduction", idx)

    def module_name(self, idx=None):
        return self._get("module", idx)

    def get_dicts(self, keys=None, idx=None):
        picked = [self.info[i] for i in self.out_indices]
        picked = picked if idx is None else ([picked[idx]] if isinstance(idx, int) else [picked[i] for i in idx])
        return [p if keys is None else {k: p[k] for k in keys} for p in picked]

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self):
        return len(self.info)

    def __repr__(self):
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


class FeatureGetter(nn.ModuleDict):
    """What ``features_only=True`` builds (timm's ``FeatureGetterNet`` for CrossViT): the model pruned after its
    last feature, returning the features at ``out_indices`` from ``forward_intermediates``. The model sits under
    ``model`` (state_dict keys ``model.*``)."""

    def __init__(self, model: nn.Module, out_indices: Union[int, Sequence[int]], output_fmt: str = "NCHW",
                 norm: bool = False, prune: bool = True):
        super().__init__()
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if prune:
            out_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            out_indices = _take_indices(len(model.feature_info), out_indices)
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.model = model
        self.out_indices = list(out_indices)
        self.out_map = None
        self.return_dict = False
        self.output_fmt = output_fmt
        self.norm = norm
        self.in_chans = getattr(model, "in_chans", 3)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, norm=self.norm, output_fmt=self.output_fmt, intermediates_only=True
        )
