"""A memory checker for Triton's CPU interpreter: every load and store a kernel makes must touch its arguments.

On a GPU a kernel that loads or stores one element past a tensor (a mask that lets the tail through, an offset
computed with the wrong stride) either reads a neighbour's bytes silently or kills the CUDA context with an illegal
address, and every later launch of the process fails with it. The interpreter does neither: its loads and stores
are raw memory accesses (``_interpreter.load`` / ``store``), so such a kernel passes its CPU tests as long as the
bytes it reads happen not to matter and the bytes it writes happen to belong to nobody the test looks at.

``install`` checks, at every masked-in lane of every ``tl.load`` and ``tl.store``, that the bytes accessed are
bytes of one of the launch's tensor arguments *as a view*: inside its sizes and strides, not merely inside its
storage (a slice's neighbouring rows, the gaps of a strided view, the CLS row before a ``[:, 1:]`` view are all
refused). This is stricter than compute-sanitizer's memcheck, which knows allocations only. Masked-off lanes are not
checked: their addresses are never dereferenced, on the GPU either. A violation raises ``MemcheckError`` naming
the kernel, the access, the program id, how many lanes were wrong and where the first one points (which argument,
its element index, or that it lies outside every argument).

It also checks for races, which the interpreter cannot show either: it runs a launch's programs one after another,
in order, so a program that reads what another program of the same launch writes gets a fixed answer on the CPU and
a timing-dependent one on the GPU. Per byte of every argument the checker records which program wrote it and which
read it; a load of bytes another program wrote, or a store to bytes another program read or wrote, raises
``MemcheckError`` naming both programs. Programs that only read the same bytes are fine; a program may read and write
its own bytes (in-place kernels).

``conftest.py`` installs it in every test session under the interpreter (``CROSSVIT_FAST_MEMCHECK=0`` leaves it
out). Atomics and block pointers are not checked: the kernels use neither.
"""

from __future__ import annotations

import os

import numpy as np

MARK = "_crossvit_fast_memcheck"
"""Set on the interpreter's builder class once :func:`install` has run."""

_current = []  # the launch being interpreted: [(executor, regions)], at most one entry


class MemcheckError(AssertionError):
    """A kernel loaded or stored a byte outside every tensor argument's view, or raced another program for it."""


class _Region:
    """One storage that the launch's tensor arguments view: which of its bytes the views cover, and by whom."""

    def __init__(self, base: int, nbytes: int):
        self.base = base
        self.valid = np.zeros(nbytes, dtype=bool)
        self.views = []  # (argument name, data_ptr, itemsize, sizes, strides)
        self._owners = None

    def owners(self):
        """Per byte, the program (linear id) that wrote it and the one that read it (-1 none, -2 several)."""
        if self._owners is None:
            n = self.valid.size
            self._owners = (np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32))
        return self._owners

    def add(self, name, t) -> None:
        import torch

        item = t.element_size()
        off = torch.zeros((), dtype=torch.int64)
        for size, stride in zip(t.shape, t.stride()):
            off = off[..., None] + torch.arange(size, dtype=torch.int64) * stride  # element offsets of the view
        start = t.data_ptr() - self.base
        byte = (start + off.reshape(-1).numpy() * item)[:, None] + np.arange(item)  # (numel, itemsize)
        self.valid[byte.reshape(-1)] = True
        self.views.append((name, t.data_ptr(), item, tuple(t.shape), tuple(t.stride())))

    def describe(self, addr: int) -> str:
        name, ptr, item, shape, strides = min(self.views, key=lambda v: abs(addr - v[1]))
        return (f"at {(addr - ptr) / item:+g} elements from the start of argument {name!r} (shape {shape}, strides "
                f"{strides}): inside its storage, outside the view")


def _tensors(name, arg):
    """(name, tensor) for every tensor an argument carries (tuples, tensor descriptors' bases)."""
    if isinstance(arg, (tuple, list)):
        for i, a in enumerate(arg):
            yield from _tensors(f"{name}[{i}]", a)
    elif hasattr(arg, "base") and hasattr(arg, "block_shape"):
        yield from _tensors(f"{name}.base", arg.base)
    elif hasattr(arg, "data_ptr") and hasattr(arg, "untyped_storage"):
        yield name, arg


def _regions(arg_names, args, kwargs):
    regions = {}
    named = list(zip(arg_names, args)) + list(kwargs.items())
    for name, arg in named:
        for tname, t in _tensors(name, arg):
            if t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in regions:
                regions[key] = _Region(key, storage.nbytes())
            regions[key].add(tname, t)
    return sorted(regions.values(), key=lambda r: r.base)


def _program(interp):
    """The program being interpreted: its grid index and its linear id."""
    b = interp.interpreter_builder
    x, y, z = (int(v) for v in b.grid_idx)
    gx, gy, _ = (int(v) for v in b.grid_dim)
    return (x, y, z), x + gx * (y + gy * z)


def _nearest(regions, addr: int) -> str:
    near = min(
        ((abs(addr - ptr), name, ptr, item, shape, strides) for r in regions for name, ptr, item, shape, strides in r.views),
        default=None,
    )
    if near is None:
        return "no tensor argument"
    _, name, ptr, item, shape, strides = near
    return f"{name!r} (shape {shape}, strides {strides}), {(addr - ptr) / item:+g} elements from its start"


def _check(kind: str, ptrs, mask) -> None:
    if not _current:
        return
    executor, regions = _current[-1]
    addrs = np.asarray(ptrs.data).astype(np.int64, copy=False)
    on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    addrs = addrs[on]
    if addrs.size == 0:
        return
    from triton.runtime import interpreter as interp

    kernel = getattr(executor.fn, "__name__", executor.fn)
    item = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    ok = np.zeros(addrs.shape, dtype=bool)
    hits = []  # (region, bytes accessed in it)
    for r in regions:
        rel = addrs - r.base
        inside = (rel >= 0) & (rel + item <= r.valid.size)
        if not inside.any():
            continue
        idx = np.nonzero(inside)[0]
        byte = (rel[idx][:, None] + np.arange(item)).reshape(-1)  # (lanes * itemsize,)
        good = r.valid[byte].reshape(idx.size, item).all(axis=1)
        ok[idx[good]] = True
        if good.any():
            hits.append((r, (rel[idx[good]][:, None] + np.arange(item)).reshape(-1)))
    pid, linear = _program(interp)
    if not ok.all():
        bad = addrs[~ok]
        first = int(bad[0])
        where = next((r.describe(first) for r in regions if r.base <= first < r.base + r.valid.size), None)
        if where is None:
            where = f"outside every tensor argument; the nearest is {_nearest(regions, first)}"
        raise MemcheckError(
            f"memcheck: kernel {kernel} program {pid}: a {kind} of {bad.size} of {addrs.size} masked-in lanes "
            f"({item}-byte elements) outside the arguments' views; the first {where}"
        )
    for r, byte in hits:
        writer, reader = r.owners()
        w = writer[byte]
        clash = (w != -1) & (w != linear)
        rd = reader[byte]
        if kind == "store":
            clash |= (rd != -1) & (rd != linear)
        if clash.any():
            j = int(np.nonzero(clash)[0][0])
            other = int(w[j]) if w[j] not in (-1, linear) else int(rd[j])
            did = "wrote" if w[j] not in (-1, linear) else "read"
            who = "several other programs" if other == -2 else f"program {other} (linear id)"
            raise MemcheckError(
                f"memcheck: kernel {kernel} program {pid}: a {kind} of bytes that {who} {did} in the same launch, "
                f"the first at {_nearest(regions, r.base + int(byte[j]))}: a race on the GPU, where programs run "
                f"at once and in no fixed order (the interpreter runs them one after another)"
            )
        if kind == "load":
            reader[byte] = np.where((rd == -1) | (rd == linear), linear, -2)
        else:
            writer[byte] = linear


def install() -> None:
    """Patch the interpreter (idempotent). Call before or after the kernel modules are imported."""
    from crossvit_fast.config import env_flag

    if not env_flag("CROSSVIT_FAST_MEMCHECK"):
        return
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, MARK, False):
        return
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_init, orig_call = interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__

    # the trailing arguments (cache policy, volatility, eviction...) differ between triton versions: passed through
    def create_masked_load(self, ptrs, mask, *rest, **kw):
        _check("load", ptrs, mask)
        return orig_load(self, ptrs, mask, *rest, **kw)

    def create_masked_store(self, ptrs, value, mask, *rest, **kw):
        _check("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, *rest, **kw)

    def _init_args_hst(self, *a, **kw):
        args_hst, kwargs_hst = orig_init(self, *a, **kw)
        _current.append((self, _regions(self.arg_names, args_hst, kwargs_hst)))
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        depth = len(_current)
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            del _current[depth:]

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    interp.GridExecutor._init_args_hst = _init_args_hst
    interp.GridExecutor.__call__ = __call__
    setattr(builder, MARK, True)
