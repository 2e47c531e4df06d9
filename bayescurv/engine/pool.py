r"""Reusable CPU memory for the engine's large results and temporaries.

# NOTE [Reusing result memory]
# On CPU, glibc serves every allocation above its mmap threshold (at most 32 MB) with
# fresh pages from the kernel, and each page faults (and is zeroed) on its first
# write: about 0.45 ms per MB on the benchmark machine. Writing BatchGrad's 229 MB of
# per-sample gradients on 3C3D into fresh memory costs about one gradient step on
# top of the arithmetic. Inside a ``backprop`` sweep the rules therefore take the
# memory of large per-sample results (and of large temporaries such as unfolded
# convolution patches) from this pool, which keeps the buffers it handed out in
# earlier sweeps and hands one out again only when nothing else holds its memory
# any more: a result the user still holds, or any view of it, its storage, a NumPy
# array made from it, is never overwritten.
#
# Ownership is read from reference counts with public APIs only: a buffer is a
# NumPy byte array; a handed-out tensor is ``torch.from_numpy`` of it, whose storage
# holds a reference to the array until the last tensor or storage sharing that
# memory is gone. A buffer whose array has no reference but the pool's is free.
#
# Bounds: buffers not handed out during the last KEEP_SWEEPS sweeps are dropped
# (forgotten, so a result still held by the user stays the user's and is freed
# normally). Three sweeps, so that calls whose results are held in turn by two
# holders still alternate between pooled buffers: engine calls between
# BackPACK-style calls that keep their savefields until the next one, or two
# backprop calls per step whose results live until the next step. A buffer comes
# back free two sweeps after it was handed out; with two sweeps kept it was
# forgotten just before, and every call faulted fresh pages (BatchGrad on the MLP
# alternated with compat's: 0.11 instead of 0.02 s). All buffers together never
# exceed the pool's limit
# (DEFAULT_POOL_BYTES; a request that does not fit gets ordinary memory). Only
# requests of at least POOL_MIN_BYTES are pooled (glibc recycles smaller blocks
# itself), only on CPU (the caching allocators of accelerators already reuse
# memory), and only for tensors that autograd need not track (out= writes are not
# differentiable; create_graph keeps ordinary memory).
# ``set_pool_limit(0)`` switches the pool off; ``release_pool()`` frees its buffers.
#
# NOTE [No higher peak]
# A free buffer of another size cannot serve a request (buffers are handed out
# whole, so that one reference count tells whether one is free), so a pool keeping
# every freed temporary would raise a call's peak memory (BatchDiagGGNExact on 3C3D
# by 60%). In a sweep that has not yet reused a buffer of an earlier sweep (the
# first call, or one whose shapes changed), a request without a free buffer of its
# size therefore first drops the free buffers this sweep used before: the pool
# then grows only when none of them is free, and the call's peak stays that of
# ordinary allocation. Once a sweep has reused an earlier sweep's buffer (it
# repeats an earlier call), misses allocate without dropping, so that the next call
# finds a buffer for every request; such calls keep one buffer per large request,
# up to the limit. Temporaries that are only summed are built in small column
# chunks, which reuse one buffer within a call.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

POOL_MIN_BYTES = 2**20
"""Smallest request served from the pool (bytes)."""

DEFAULT_POOL_BYTES = 2**31
"""Default limit on the bytes of all pooled buffers (see :func:`set_pool_limit`)."""

KEEP_SWEEPS = 3
"""Sweeps a buffer stays pooled after it was last handed out."""

_ALIGN = 64
"""Buffer sizes are rounded up to this many bytes (and torch aligns them so)."""


@dataclass
class _Buffer:
    """One pooled allocation: a NumPy byte array over torch-allocated memory."""

    array: np.ndarray
    last_sweep: int


def _references(buffer: _Buffer) -> int:
    """References to the buffer's array (compared with a free buffer's count)."""
    return sys.getrefcount(buffer.array)


class MemoryPool:
    """Buffers of earlier sweeps, handed out again once nothing else holds them.

    See NOTE [Reusing result memory]. Thread-safe; a thread that is not inside a
    :meth:`sweep` gets ordinary memory.

    Args:
        max_bytes: Limit on the bytes of all pooled buffers (``0``: no pooling).
        min_bytes: Smallest request served from the pool.
    """

    def __init__(
        self, max_bytes: int = DEFAULT_POOL_BYTES, min_bytes: int = POOL_MIN_BYTES
    ) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._buffers: list[_Buffer] = []
        self._sweeps = 0
        self._warm_sweep = -1  # the last sweep that reused an earlier sweep's buffer
        self._max_bytes = max_bytes
        self._min_bytes = min_bytes
        self._free_refs = _references(_Buffer(np.empty(0, np.uint8), 0))

    @property
    def nbytes(self) -> int:
        """Bytes of all pooled buffers (free or held)."""
        with self._lock:
            return sum(b.array.nbytes for b in self._buffers)

    def set_limit(self, max_bytes: int) -> None:
        """Limit the pooled bytes to ``max_bytes`` (``0`` switches pooling off)."""
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(
                f"max_bytes must be a non-negative int (bytes), got {max_bytes!r}."
            )
        with self._lock:
            self._max_bytes = max_bytes
            # held buffers stay their holders' memory when forgotten
            self._buffers = _fitting(self._buffers, max_bytes, self._is_free)

    def release(self) -> None:
        """Forget every buffer (free ones are freed, held ones stay their holders')."""
        with self._lock:
            self._buffers = []

    @contextmanager
    def sweep(self) -> Iterator[None]:
        """Pool this thread's requests until the outermost sweep ends.

        At its end, buffers not handed out in the last ``KEEP_SWEEPS`` sweeps are
        dropped.
        """
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._lock:
                    self._sweeps += 1
                    oldest = self._sweeps - KEEP_SWEEPS
                    self._buffers = [b for b in self._buffers if b.last_sweep >= oldest]

    def empty(
        self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
    ) -> Tensor:
        """An uninitialized contiguous tensor, from the pool where possible.

        Pooled: on CPU, inside a :meth:`sweep` of this thread, for at least
        ``min_bytes``; everything else is ``torch.empty``. The caller writes
        every element (the memory holds an earlier result's values).
        """
        shape = tuple(shape)
        nbytes = _nbytes(shape, dtype)
        device = torch.device(device)
        if (
            device.type != "cpu"
            or nbytes < max(self._min_bytes, 1)
            or not getattr(self._local, "depth", 0)
        ):
            return torch.empty(shape, dtype=dtype, device=device)
        size = -(-nbytes // _ALIGN) * _ALIGN
        with self._lock:
            buffer = self._take(size)
            if buffer is None:
                return torch.empty(shape, dtype=dtype, device=device)
            flat = torch.from_numpy(buffer.array)
        return flat[:nbytes].view(dtype).view(shape)

    def _take(self, size: int) -> _Buffer | None:
        """A free buffer of ``size`` bytes, a new one, or ``None`` over the limit.

        A miss in a sweep that has not reused an earlier sweep's buffer first
        drops the free buffers this sweep has used (see NOTE [No higher peak]).
        """
        for buffer in self._buffers:
            if buffer.array.nbytes == size and self._is_free(buffer):
                if buffer.last_sweep != self._sweeps:  # kept from an earlier sweep
                    self._warm_sweep = self._sweeps
                buffer.last_sweep = self._sweeps
                return buffer
        if self._warm_sweep != self._sweeps:
            self._buffers = [
                b
                for b in self._buffers
                if b.last_sweep != self._sweeps or not self._is_free(b)
            ]
        if sum(b.array.nbytes for b in self._buffers) + size > self._max_bytes:
            return None
        array = torch.empty(size, dtype=torch.uint8).numpy()
        buffer = _Buffer(array, self._sweeps)
        self._buffers.append(buffer)
        return buffer

    def _is_free(self, buffer: _Buffer) -> bool:
        return _references(buffer) == self._free_refs


def _fitting(
    buffers: list[_Buffer], max_bytes: int, is_free: Callable[[_Buffer], bool]
) -> list[_Buffer]:
    """Buffers that fit into ``max_bytes``: held ones first, recently used first."""
    kept, total = [], 0
    for buffer in sorted(buffers, key=lambda b: (is_free(b), -b.last_sweep)):
        if total + buffer.array.nbytes <= max_bytes:
            kept.append(buffer)
            total += buffer.array.nbytes
    return kept


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


POOL = MemoryPool()
"""The engine's pool (see NOTE [Reusing result memory])."""


def pooled_empty(shape: Sequence[int], like: Tensor) -> Tensor:
    """``torch.empty(shape)`` with ``like``'s dtype and device, from :data:`POOL`."""
    return POOL.empty(shape, like.dtype, like.device)


def sweep() -> AbstractContextManager[None]:
    """:meth:`MemoryPool.sweep` of :data:`POOL` (``backprop`` runs inside one)."""
    return POOL.sweep()


def set_pool_limit(max_bytes: int) -> None:
    """Limit the memory the engine keeps for reuse across calls (bytes).

    The engine writes large per-sample results (``BatchGrad``, ``BatchDiagGGN*``,
    ...) and temporaries into CPU memory kept from earlier calls once nothing holds
    it any more, which saves the page faults of fresh memory (see NOTE [Reusing
    result memory] in :mod:`bayescurv.engine.pool`). Default ``2**31``; ``0``
    switches the reuse off and frees the kept buffers.

    Raises:
        ValueError: If ``max_bytes`` is not a non-negative int.
    """
    POOL.set_limit(max_bytes)


def release_pool() -> None:
    """Free the memory the engine keeps for reuse (results still held stay valid)."""
    POOL.release()
