"""Loading timm and IBM/CrossViT checkpoints, with position-embedding resampling and precise mismatch reports.

Formats:

* timm: ``pos_embed_0``, ``cls_token_0``, ``pos_embed_1``, ``cls_token_1`` + the module keys;
* IBM release ``.pth``: the same module keys with ``pos_embed.0``, ``cls_token.0``, ... (a ParameterList), usually
  wrapped as ``{"model": state_dict, ...}``; DistributedDataParallel's ``module.`` prefix is stripped too.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from crossvit_fast.model_registry import MODEL_CONFIGS

__all__ = ["CheckpointError", "LoadResult", "load_checkpoint", "resample_pos_embed", "to_timm_keys", "to_ibm_keys"]

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
_IBM_KEY = re.compile(r"^(pos_embed|cls_token)\.(\d+)$")
_TIMM_KEY = re.compile(r"^(pos_embed|cls_token)_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model. The message leads with one line (what the checkpoint looks like, what
    to do), then the missing, unexpected and mis-shaped keys (ten of each kind); ``.result`` (a :class:`LoadResult`)
    holds them all when the error comes from a mismatch."""

    result: Optional["LoadResult"] = None


@dataclass
class LoadResult:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    resampled_keys: List[str] = field(default_factory=list)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any) -> Dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj:
                return _unwrap(obj[key])
        raise CheckpointError(
            f"checkpoint is a dict without tensors at the top level nor any of the wrapper keys {_WRAPPER_KEYS}; "
            f"its keys: {sorted(map(str, obj))[:20]}"
        )
    raise CheckpointError(f"checkpoint must be a state dict (or a dict wrapping one), got {type(obj).__name__}")


def to_timm_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """IBM keys (``pos_embed.0``) -> timm keys (``pos_embed_0``); drops a ``module.`` prefix; others unchanged."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        k = _IBM_KEY.sub(r"\1_\2", k)
        out[k] = v
    return out


def to_ibm_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm keys -> IBM release keys (``pos_embed_0`` -> ``pos_embed.0``)."""
    return {_TIMM_KEY.sub(r"\1.\2", k): v for k, v in state_dict.items()}


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample a ``(1, prefix + rows*cols, D)`` position embedding to ``new_grid`` (bicubic, align_corners=False).

    The prefix (CLS) embedding is kept; the patch embeddings are resized as a ``D``-channel image, as the paper did
    for its 384 fine-tuning. ``old_grid`` defaults to the square grid the token count implies.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"resample_pos_embed: expected (1, tokens, dim), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(
                f"resample_pos_embed: {n} patch positions are not a square grid; pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"resample_pos_embed: old_grid {old_grid} does not hold {n} positions")
    if old_grid == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    work_dtype = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    grid = grid.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2).to(work_dtype)  # (1, D, rows, cols)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)  # (1, r*c, D)
    return torch.cat((prefix, grid), dim=1)


def load_checkpoint(
    model: torch.nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
    strict: bool = True,
    weights_only: bool = True,
    old_grids: Optional[Sequence[Sequence[int]]] = None,
) -> LoadResult:
    """Load a timm or IBM/CrossViT checkpoint (a path or an in-memory dict) into a crossvit_fast ``model``.

    Position embeddings made for another image size are resampled to the model's patch grids (``old_grids``:
    the checkpoint's grids per branch, when not square). With ``strict`` (default), a checkpoint that does not fit
    raises :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys, and nothing is loaded;
    otherwise the keys that fit are loaded and the rest reported in the returned :class:`LoadResult`.
    ``weights_only=False`` allows pickled non-tensor objects in the file (only for files you trust).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            obj = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - re-raised with the remedy
            if weights_only and "weights_only" in str(e):
                raise CheckpointError(
                    f"{os.fspath(checkpoint)}: holds pickled objects besides tensors (IBM's files keep their "
                    f"training args); if you trust the file, pass weights_only=False. torch said: {e}"
                ) from e
            raise
    else:
        obj = checkpoint
    source = to_timm_keys(_unwrap(obj))
    target = model.state_dict()
    result = LoadResult()

    branches = getattr(model, "patch_embed", [])
    for i, pe in enumerate(branches):
        key = f"pos_embed_{i}"
        if key in source and key in target and source[key].shape != target[key].shape:
            src, tgt = source[key], target[key]
            if src.dim() == 3 and src.shape[-1] == tgt.shape[-1]:
                old = None if old_grids is None else old_grids[i]
                try:
                    source[key] = resample_pos_embed(src, pe.grid_size, old_grid=old)
                    result.resampled_keys.append(key)
                except ValueError as e:
                    raise CheckpointError(f"{key}: cannot resample {tuple(src.shape)} to {tuple(tgt.shape)}: {e}")

    result.missing_keys = sorted(set(target) - set(source))
    result.unexpected_keys = sorted(set(source) - set(target))
    result.mismatched_keys = [
        (k, tuple(source[k].shape), tuple(target[k].shape))
        for k in sorted(set(source) & set(target))
        if source[k].shape != target[k].shape
    ]
    if strict and (result.missing_keys or result.unexpected_keys or result.mismatched_keys):
        err = CheckpointError(_mismatch_report(model, source, target, result))
        err.result = result  # every key, for code that wants them all
        raise err
    bad = {k for k, _, _ in result.mismatched_keys}
    model.load_state_dict({k: v for k, v in source.items() if k in target and k not in bad}, strict=False)
    return result


_SHOW = 10  # keys listed per kind in a mismatch report; the rest are counted


def _shape_of(sd: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    """The architecture a CrossViT state dict (timm keys) implies: widths, L blocks per multi-scale block, dagger,
    mlp ratio, image size, classes; None when it is not one."""
    try:
        widths = tuple(int(sd[f"cls_token_{i}"].shape[-1]) for i in range(2))
        m = len({k.split(".")[4] for k in sd if k.startswith("blocks.0.blocks.1.")})
        mlp = sd["blocks.0.blocks.0.0.mlp.fc1.weight"].shape[0] / widths[0]
        side = math.isqrt(int(sd["pos_embed_0"].shape[1]) - 1)
        head = sd.get("head.0.weight")
        return {
            "widths": widths,
            "m": m,
            "dagger": "patch_embed.0.proj.0.weight" in sd,
            "mlp": mlp,
            "img": side * 12,
            "classes": int(head.shape[0]) if head is not None else 0,
        }
    except (KeyError, IndexError, AttributeError, ValueError, ZeroDivisionError):
        return None


def _looks_like(shape: Dict[str, Any]) -> Optional[str]:
    """The released model with this architecture (the one at its image size when there are two), or None."""
    found = [
        (name, cfg["kwargs"]["img_size"])
        for name, cfg in MODEL_CONFIGS.items()
        if tuple(cfg["kwargs"]["embed_dim"]) == shape["widths"]
        and cfg["kwargs"]["depth"][0][1] == shape["m"]
        and bool(cfg["kwargs"]["multi_conv"]) == shape["dagger"]
        and abs(cfg["kwargs"]["mlp_ratio"][0] - shape["mlp"]) < 1e-6
    ]
    for name, img in found:
        if img == shape["img"]:
            return name
    return found[0][0] if found else None


def _describe(shape: Dict[str, Any]) -> str:
    return (
        f"widths {shape['widths'][0]}, {shape['widths'][1]}; {shape['m']} L blocks per multi-scale block; "
        f"{'dagger' if shape['dagger'] else 'no dagger'}; {shape['img']}x{shape['img']}; {shape['classes']} classes"
    )


def _keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def _mismatch_report(model, source, target, result: LoadResult) -> str:
    """One summary line (what the checkpoint looks like, what to do), then the keys, shortened."""
    name = getattr(model, "model_name", None) or type(model).__name__
    counts = (
        f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, "
        f"{len(result.mismatched_keys)} mis-shaped keys"
    )
    src, tgt = _shape_of(source), _shape_of(target)
    head_only = (
        not result.missing_keys
        and not result.unexpected_keys
        and all(k.startswith("head.") for k, _, _ in result.mismatched_keys)
    )
    if head_only and src and tgt:
        first = (
            f"checkpoint does not fit {name}: only the classifier head differs (checkpoint {src['classes']} classes, "
            f"model {tgt['classes']}); pass strict=False to load everything else and keep the model's new head"
        )
    elif src and tgt and (src["widths"], src["m"], src["dagger"]) != (tgt["widths"], tgt["m"], tgt["dagger"]):
        like = _looks_like(src)
        first = (
            f"checkpoint does not fit {name}: it looks like {like or 'another CrossViT'} ({_describe(src)}), "
            f"the model has {_describe(tgt)}; build "
            + (f"create_model({like!r})" if like else "the matching model")
            + f" for it ({counts})"
        )
    else:
        first = f"checkpoint does not fit {name} ({counts}); strict=False loads the keys that fit and returns the rest"
    lines = [first]
    if result.missing_keys:
        lines.append(f"  missing keys ({len(result.missing_keys)}): {_keys(result.missing_keys)}")
    if result.unexpected_keys:
        lines.append(f"  unexpected keys ({len(result.unexpected_keys)}): {_keys(result.unexpected_keys)}")
    for k, s, t in result.mismatched_keys[:_SHOW]:
        lines.append(f"  mis-shaped key {k}: checkpoint {s}, model {t}")
    if len(result.mismatched_keys) > _SHOW:
        lines.append(f"  ... and {len(result.mismatched_keys) - _SHOW} more mis-shaped keys")
    return "\n".join(lines)
