"""This machine's record of verified kernels: what ``crossvit-fast verify`` found, read by ``"auto"``.

One JSON file per GPU architecture in :func:`crossvit_fast.config.cache_dir` (``verified-sm_90.json``), written
atomically (a temporary file in the same directory, then ``os.replace``), so a reader or a second writer meets
either the old file or the new one, never half of one. A record holds for the system that made it only: its
``key`` names the GPU and its architecture, the driver and CUDA runtime, torch, triton, crossvit_fast and a hash of
the kernel sources; a record whose key differs from the running system's is ignored (:func:`status` says why). An
unreadable, corrupt or unwritable record gives a warning, never an error.

The format (``"format": 1``)::

    {"format": 1, "created": "2026-12-07T19:30:00Z",
     "key": {"gpu": ..., "arch": "sm_90", "driver": ..., "cuda": ..., "torch": ..., "triton": ...,
             "crossvit_fast": ..., "kernel_sources": "sha256:..."},
     "models": ["crossvit_18_dagger_240"],
     "classes": [{"class": "self_attention[bfloat16, head_dim=32]", "op": "self_attention", "dtype": "bfloat16",
                  "dims": {"head_dim": 32}, "verdict": "verified", "err_ratio": 0.41, "worst": "grad qkv.weight",
                  "tokens": [197, 401], "fused_ms": {...}, "torch_ms": {...}, "case": "..."}]}

A shape class is an op, a dtype and the dims the registry's ``supports`` takes (``head_dim`` for the
self-attention, ``dim`` for the LayerNorm and the block GEMMs, both for the CLS cross-attention): ``"auto"`` takes
a kernel for a module whose class the record calls ``verified``. Token counts and batch sizes are not part of it.

Nothing here imports triton.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import tempfile
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch

from crossvit_fast import device as _device
from crossvit_fast.device import device_arch, warn_once
from crossvit_fast.config import cache_dir

__all__ = ["FORMAT", "record_path", "system_key", "kernel_source_hash", "class_name", "load", "status",
           "verified_date", "save", "write_json", "forget", "package_version"]

FORMAT = 1
"""The version of the record's JSON layout; a file of another version is ignored."""

DimsKey = Tuple[Tuple[str, int], ...]
_hash: Optional[str] = None
_loaded: Dict[str, Tuple[Optional[dict], str, FrozenSet[tuple]]] = {}


def record_path(arch: str) -> str:
    """The record file of architecture ``arch`` (a :func:`crossvit_fast.backend.device_arch` name)."""
    return os.path.join(cache_dir(), f"verified-{arch}.json")


def kernel_source_hash() -> str:
    """``sha256:`` of the kernel sources (``crossvit_fast/kernels/*.py``) and the ops (``crossvit_fast/ops/*.py``),
    names and contents, in name order; computed once per process."""
    global _hash
    if _hash is None:
        root = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        for sub in ("kernels", "ops"):
            folder = os.path.join(root, sub)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                if name.endswith(".py"):
                    h.update(f"{sub}/{name}\0".encode())
                    with open(os.path.join(folder, name), "rb") as f:
                        h.update(f.read())
                    h.update(b"\0")
        _hash = "sha256:" + h.hexdigest()
    return _hash


def package_version(pkg: str) -> str:
    """An installed distribution's version, or ``"not installed"`` (without importing it)."""
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu_names(arch: str) -> List[str]:
    """The names of this machine's devices of architecture ``arch``, the current device first."""
    if arch is not None and arch == _device.INTERPRETER_ARCH:
        return ["Triton CPU interpreter"]
    if not torch.cuda.is_available():
        return []
    current = torch.cuda.current_device()
    order = [current] + [i for i in range(torch.cuda.device_count()) if i != current]
    return list(dict.fromkeys(torch.cuda.get_device_name(i) for i in order if device_arch(i) == arch))


def _driver() -> str:
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is None or not torch.cuda.is_available():
        return "unknown"
    try:
        return str(get())
    except RuntimeError:
        return "unknown"


def system_key(arch: str) -> Dict[str, str]:
    """What a record made here for ``arch`` is keyed on: GPU name and architecture, driver and CUDA runtime
    versions, torch, triton, crossvit_fast and the kernel sources' hash."""
    from crossvit_fast import __version__

    names = _gpu_names(arch)
    return {
        "gpu": names[0] if names else "unknown",
        "arch": arch,
        "driver": _driver(),
        "cuda": str(torch.version.cuda or torch.version.hip or "none"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "crossvit_fast": __version__,
        "kernel_sources": kernel_source_hash(),
    }


def _mismatch(key: dict, arch: str) -> str:
    """"" when ``key`` (a record's) is this system's for ``arch``, else which fields differ."""
    if not isinstance(key, dict):
        return "it has no key"
    now = system_key(arch)
    diffs = []
    for field, value in now.items():
        theirs = key.get(field)
        if field == "gpu" and theirs in _gpu_names(arch):
            continue
        if theirs != value:
            diffs.append(f"{field} {theirs!r} (here: {value!r})")
    return ", ".join(diffs)


def class_name(op: str, dtype: str, dims: Dict[str, int]) -> str:
    """A shape class's name: ``self_attention[bfloat16, head_dim=32]``."""
    return f"{op}[{', '.join([dtype] + [f'{k}={v}' for k, v in sorted(dims.items())])}]"


def _dims_key(dims: Optional[Dict[str, int]]) -> Optional[DimsKey]:
    return None if dims is None else tuple(sorted((str(k), int(v)) for k, v in dims.items()))


def _lookup_keys(classes: Iterable[dict]) -> FrozenSet[tuple]:
    keys = set()
    for c in classes:
        if c.get("verdict") != "verified":
            continue
        op, dtype, dims = c["op"], c["dtype"], _dims_key(c["dims"])
        keys.update({(op, dtype, dims), (op, None, dims), (op, dtype, None), (op, None, None), (None, None, None)})
    return frozenset(keys)


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"format {fmt!r}, not {FORMAT}")
    if not isinstance(data.get("classes"), list) or not all(
        isinstance(c, dict) and isinstance(c.get("dims"), dict) and {"op", "dtype", "verdict"} <= set(c)
        for c in data["classes"]
    ):
        raise ValueError("its 'classes' is not a list of shape-class entries")
    return data


def load(arch: Optional[str]) -> Tuple[Optional[dict], str]:
    """``(record, why)``: this machine's record for ``arch`` when it holds for the running system (``why`` then
    says where it is from), else ``(None, why not)``. Read once per process (:func:`forget` reads it again); a
    corrupt or unreadable file warns once."""
    if arch is None:
        return None, "not a GPU"
    return _load(arch)[:2]


def _load(arch: str) -> Tuple[Optional[dict], str, FrozenSet[tuple]]:
    cached = _loaded.get(arch)
    if cached is not None:  # the call-time path: dict and set lookups only, which torch.compile traces
        return cached
    path = record_path(arch)
    if not os.path.exists(path):
        out: Tuple[Optional[dict], str, FrozenSet[tuple]] = (None, f"no record at {path}", frozenset())
    else:
        try:
            data = _read(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"the record {path} cannot be read ({type(e).__name__}: {e}); crossvit-fast verify writes a new one"
            warn_once(f"record-{path}", f"crossvit_fast: {why}")
            out = (None, why, frozenset())
        else:
            diff = _mismatch(data.get("key"), arch)
            if diff:
                out = (None, f"the record {path} was made on another system: {diff}; run crossvit-fast verify "
                             f"again", frozenset())
            else:
                out = (data, f"the record {path} of {data.get('created', '?')}", _lookup_keys(data["classes"]))
    _loaded[arch] = out
    return out


def status(arch: Optional[str]) -> str:
    """One line for reports: which record ``"auto"`` reads for ``arch`` and how many shape classes it verifies, or
    why there is none."""
    data, why = load(arch)
    if data is None:
        return why
    n = sum(c.get("verdict") == "verified" for c in data["classes"])
    return f"{why}: {n} of {len(data['classes'])} shape classes verified"


def verified_date(op: Optional[str], arch: Optional[str], dims: Optional[Dict[str, int]] = None,
                  dtype: Optional[str] = None) -> Optional[str]:
    """The creation date of the record that says ``op``'s kernel is ``verified`` on ``arch`` for ``dims`` and
    ``dtype`` (None: any of them), or None where no valid record says so."""
    if arch is None:
        return None
    data, _, keys = _load(arch)
    if data is not None and (op, dtype, _dims_key(dims)) in keys:
        return str(data.get("created", "?"))
    return None


def forget() -> None:
    """Drop the records read so far: the next lookup reads the files again."""
    _loaded.clear()


def write_json(path: str, data: dict) -> bool:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then ``os.replace``); False, with a
    warning, where it cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".verified-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        warn_once(f"record-write-{path}-{e}", f"crossvit_fast: could not write the verification record {path} "
                  f"({type(e).__name__}: {e}); set CROSSVIT_FAST_CACHE_DIR to a writable directory")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


def save(arch: str, classes: List[dict], models: List[str]) -> Tuple[Optional[dict], str]:
    """Merge ``classes`` (shape-class entries) into this machine's record for ``arch`` and write it; a class
    verified before and not run now keeps its entry. Returns ``(record, path)``; the path is ``""`` where it could
    not be written (warned)."""
    path = record_path(arch)
    forget()
    old, _ = load(arch)
    merged = {c["class"]: c for c in (old or {}).get("classes", []) if "class" in c}
    merged.update({c["class"]: c for c in classes})
    data = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": system_key(arch),
        "models": sorted(set((old or {}).get("models", [])) | set(models)),
        "classes": [merged[k] for k in sorted(merged)],
    }
    ok = write_json(path, data)
    forget()
    return data, path if ok else ""
