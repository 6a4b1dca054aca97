"""The one autotuner of the kernels that tune (the self-attention, the block GEMMs), and when they may time.

Each of those kernel modules keeps its own ``AUTOTUNE`` flag (``CROSSVIT_FAST_AUTOTUNE``, read at import),
``AUTOTUNE_CACHE`` flag (``CROSSVIT_FAST_AUTOTUNE_CACHE``) and one :class:`Tuner`, which holds its picks and its disk
cache; both modules launch through :meth:`Tuner.dispatch`, so a key, a disk entry and the capture rule mean the same
in both. Whether a launch may time candidates now is decided here, the same way for both: the module's flag is on,
no :func:`pinned` block is open, and the launch's stream is not being captured into a CUDA graph (a capture must not
compile, load or time kernels). Imports no triton at import time.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["pinned", "is_pinned", "capturing", "may_tune", "Tuner", "bench_ms", "shares_storage"]

_state = threading.local()


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Within the block (in this thread), every tuned kernel launches the config already picked for its key, or its
    default, and never times candidates: what a CUDA-graph capture launches. Run a step under it before a capture so
    that the capture meets only kernels compiled and loaded already."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def is_pinned() -> bool:
    """Whether a :func:`pinned` block is open in this thread."""
    return getattr(_state, "depth", 0) > 0


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def may_tune(enabled: bool, device: torch.device) -> bool:
    """Whether a launch on ``device`` may time candidates: its module's ``enabled`` flag, no :func:`pinned` block,
    no capture."""
    return enabled and not is_pinned() and not capturing(device)


_may_time = may_tune  # the switch, under a name the tuner's ``may_tune`` argument does not shadow


# --------------------------------------------------------------------------------------------------------------
# The autotuner both tuned kernel modules launch through
# --------------------------------------------------------------------------------------------------------------


def bench_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in ms (device events). A short budget (the model's kernels take 5 us - 1 ms; at the
    short end each timed launch costs more CPU than GPU time): tens of samples are enough to rank tiles, and a model
    tunes a few dozen keys at start-up."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=2, rep=10, return_mode="median")


def shares_storage(outs, ins) -> bool:
    """Whether an output shares memory with an input: repeated (timed) launches would then not give one result."""
    ptrs = {t.untyped_storage().data_ptr() for t in ins if t is not None}
    return any(t.untyped_storage().data_ptr() in ptrs for t in outs if t is not None)


def _skippable(extra: Tuple[type, ...]) -> Tuple[type, ...]:
    """What a candidate may raise that makes the tuner skip it: out of shared memory / registers at launch, a ptxas
    or compile-time-assert failure, and the tuner's own ``extra`` (e.g. a cuBLAS GEMM this torch lacks)."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    return (OutOfResources, PTXASError, CompileTimeAssertionFailure) + tuple(extra)


Config = Tuple  # a tuple of ints (and tags) that the kernel module's ``launch(config)`` understands


class Tuner:
    """The autotuner of one kernel module: per tuning key the fastest of a candidate list, timed at the key's first
    launch, remembered in the process (:attr:`chosen`) and on disk (one JSON file per environment, key and candidate
    list, through Triton's cache manager: ``TRITON_CACHE_DIR`` and a remote cache apply), so a later process on the
    same GPU model and software loads the pick instead of timing.

    Args:
        name: the module's name, in the disk files' names and the warnings.
        kernels: returns the ``@triton.jit`` functions whose source a pick depends on (their cache keys go into the
            disk key: a changed kernel never reads an old pick).
        skippable: exception types, besides Triton's launch / compile failures, that make a candidate skipped.

    A config is a tuple; the module's ``launch(config)`` launches it. Why not ``triton.autotune``: the block GEMMs'
    candidates include non-Triton sequences (cuBLAS, a LayerNorm or dz kernel first) and a K-loop evenness that
    depends on the tile, and both modules want one key, one disk cache, one capture rule.
    """

    def __init__(self, name: str, kernels: Callable[[], Sequence], skippable: Tuple[type, ...] = ()):
        self.name = name
        self._kernels = kernels
        self._extra_skippable = tuple(skippable)
        self.chosen: Dict[tuple, Config] = {}
        self.timer: Callable[[Callable[[], object]], float] = bench_ms
        self._fingerprints: Dict[Optional[int], str] = {}
        self._warned: set = set()

    def picks(self) -> Dict[tuple, Config]:
        """A copy of what the tuner picked so far (key -> config), e.g. for a benchmark record."""
        return dict(self.chosen)

    def skippable(self) -> Tuple[type, ...]:
        return _skippable(self._extra_skippable)

    def dispatch(self, launch, *, config, interpreted, compile_only, enabled: bool, disk_cache: bool,
                 key_of: Callable[[], tuple], default_of: Callable[[], Config], candidates: Callable[[], List[Config]],
                 device: torch.device, may_tune: Callable[[], bool]) -> Config:
        """One launch of the module's kernel, ``launch(config)``, with: an explicit ``config``; else the
        ``interpreted`` config under Triton's CPU interpreter (not None there); else, compile-only (the sm_90
        compile tool, nothing launched): every candidate, as the tuner would time them (a candidate that cannot
        compile is skipped; none: the default); else :meth:`launch`. ``key_of`` / ``default_of`` / ``candidates`` /
        ``may_tune`` are evaluated only where needed (microseconds of CPU a launch saved). Returns the config."""
        if config is not None:
            launch(config)
            return config
        if interpreted is not None:
            launch(interpreted)
            return interpreted
        if compile_only:
            fit = None
            for c in candidates() if enabled and not is_pinned() else []:
                try:
                    launch(c)
                    fit = fit or c
                except self.skippable():
                    continue
            if fit is None:
                fit = default_of()
                launch(fit)
            return fit
        key = key_of()
        tunable = enabled and not is_pinned() and key not in self.chosen
        cands = candidates() if tunable else []  # only a launch that may tune needs them
        return self.launch(launch, key, default_of(), cands, device, may_tune, enabled=enabled,
                           disk_cache=disk_cache, fallbacks=candidates)

    def launch(self, launch, key: tuple, default: Config, candidates: List[Config], device: torch.device,
               may_tune: Callable[[], bool], *, enabled: bool, disk_cache: bool, fallbacks=None) -> Config:
        """Launch once, with: the config tuned for ``key`` if any; else, when ``enabled`` and not capturing (a
        capture must not compile or load a kernel the process has not launched yet), the pick an earlier process
        left on disk for this key and candidate list (``disk_cache``), remembered; else, when tuning is allowed too
        (``may_tune()``: e.g. no output shares memory with an input, so repeated launches give one result), the
        fastest candidate, timed now, remembered and written to disk (a candidate that cannot compile or launch is
        skipped; out of memory for the timing's L2-flush buffer skips the tuning; the result is that of one more
        launch with the winner); else ``default``, or where ``default`` cannot launch on this GPU (e.g. a tile with
        more shared memory than an sm_86 / sm_89 part has), the first of ``fallbacks()`` that can, remembered for
        the key. Returns the config used."""
        chosen = self.chosen.get(key)
        disk = self.disk_on(device, disk_cache)
        if chosen is None and _may_time(enabled, device) and len(candidates) > 1:
            if disk:
                chosen = self.disk_load(key, candidates)
                if chosen is not None:
                    self.chosen[key] = chosen
            if chosen is None and may_tune():
                times = {}
                try:
                    for c in candidates:
                        try:
                            times[c] = self.timer(lambda c=c: launch(c))
                        except self.skippable():
                            continue
                except torch.cuda.OutOfMemoryError:
                    times = {}
                if times:
                    chosen = min(times, key=times.get)
                    self.chosen[key] = chosen
                    if disk:
                        self.disk_store(key, candidates, times, chosen)
        if chosen is not None:
            launch(chosen)
            return chosen
        try:
            launch(default)
            return default
        except self.skippable() as e:
            for c in fallbacks() if fallbacks is not None else []:
                if tuple(c) == tuple(default):
                    continue
                try:
                    launch(c)
                except self.skippable():
                    continue
                self.chosen[key] = c
                return c
            raise e

    # Picks on disk ------------------------------------------------------------------------------------------------

    def disk_on(self, device: torch.device, disk_cache: bool) -> bool:
        return bool(disk_cache) and device.type == "cuda"

    def fingerprint(self, device_index: Optional[int]) -> str:
        """What a pick depends on besides its key and candidates: Triton (its own hash and the GPU target's backend
        hash, which covers ptxas), the kernels' source, torch and its CUDA (cuBLAS candidates), the GPU model and its
        SM count."""
        if device_index in self._fingerprints:
            return self._fingerprints[device_index]
        from triton.compiler.compiler import make_backend
        from triton.runtime.cache import triton_key
        from triton.runtime.driver import driver

        index = torch.cuda.current_device() if device_index is None else device_index
        with torch.cuda.device(index):
            backend = make_backend(driver.active.get_current_target()).hash()
        props = torch.cuda.get_device_properties(index)
        parts = [triton_key(), backend, torch.__version__, str(torch.version.cuda), props.name,
                 str(props.multi_processor_count)] + [getattr(k, "cache_key", k.__name__) for k in self._kernels()]
        self._fingerprints[device_index] = "\n".join(parts)
        return self._fingerprints[device_index]

    def disk_entry(self, key: tuple):
        """(Triton cache manager, file name) of ``key``'s pick; the file name carries the module and kernel kind."""
        from triton.runtime.cache import get_cache_manager

        return get_cache_manager, f"crossvit_fast-{self.name}-{key[0]}.autotune.json"

    def disk_hash(self, key: tuple, candidates: List[Config]) -> str:
        """sha256 of the environment, the key without its device index (its last element; the GPU model stands for
        it) and the candidates: a changed candidate list or kernel source never reads an old pick."""
        import hashlib

        parts = [self.fingerprint(key[-1]), repr(key[:-1])] + [repr(tuple(c)) for c in candidates]
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def _disk_warn(self, what: str, err: BaseException) -> None:
        import warnings

        from crossvit_fast.config import ENV_AUTOTUNE_CACHE

        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"crossvit_fast {self.name} autotuner: {what} ({type(err).__name__}: {err}); the picks stay "
                          f"in this process only where it fails (set {ENV_AUTOTUNE_CACHE}=0 to stop using the disk "
                          f"cache)", RuntimeWarning, stacklevel=4)

    def disk_load(self, key: tuple, candidates: List[Config]) -> Optional[Config]:
        """The candidate an earlier process picked for ``key`` and this candidate list, or None (no file; a file that
        cannot be read or names no candidate is ignored, warning once, and the key is timed again)."""
        import json

        try:
            manager, name = self.disk_entry(key)
            path = manager(self.disk_hash(key, candidates)).get_file(name)
            if path is None:
                return None
            with open(path, "r", encoding="utf-8") as f:
                picked = tuple(json.load(f)["chosen"])
        except Exception as e:  # noqa: BLE001 -- a cache must not fail a launch: warned, then timed as without it
            self._disk_warn("cannot read a cached autotune pick", e)
            return None
        for c in candidates:
            if tuple(c) == picked:
                return c
        self._disk_warn("a cached autotune pick names no candidate", ValueError(f"{picked!r} for key {key!r}"))
        return None

    def disk_store(self, key: tuple, candidates: List[Config], times: Dict, chosen: Config) -> None:
        """Write ``chosen`` and every candidate's time (ms) for ``key`` (a failed write warns once)."""
        import json

        record = {"key": repr(key[:-1]), "chosen": list(chosen),
                  "times_ms": [[list(c), t] for c, t in times.items()]}
        try:
            manager, name = self.disk_entry(key)
            manager(self.disk_hash(key, candidates)).put(json.dumps(record), name, binary=False)
        except Exception as e:  # noqa: BLE001 -- as in disk_load
            self._disk_warn("cannot write an autotune pick to the disk cache", e)
