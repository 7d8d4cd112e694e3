"""Kernels of the ID map and the slot store, behind one dispatcher.

Two twins with the same signatures (torch tensors in, torch tensors out):

* :mod:`._torch`, vectorised plain torch, runs on any device and is the reference;
* :mod:`._numba`, compiled loops for CPU tensors (JIT, cached to disk).

:func:`use_numba` is the single place that picks one: numba for CPU tensors unless the
environment variable ``RECIS_KERNELS=torch`` asks for the reference everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from . import _torch

try:  # numba is a dependency, but a broken install should degrade, not break imports
    from . import _numba
except ImportError:  # pragma: no cover
    _numba = None

_NUMBA_DTYPES = {torch.float32, torch.float64, torch.int64, torch.int32, torch.int8}
_EMPTY_TAGS = np.zeros(0, np.int64)


_forced: str | None = None


def use_numba(device: torch.device) -> bool:
    """True when CPU kernels should run through numba for tensors on ``device``."""
    choice = _forced or os.environ.get("RECIS_KERNELS", "numba")
    return _numba is not None and device.type == "cpu" and choice != "torch"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the block with ``"torch"`` or ``"numba"`` kernels (tables created inside keep it for
    their slot storage). For tests and benchmarks."""
    global _forced
    if name not in ("torch", "numba"):
        raise ValueError(f"backend must be 'torch' or 'numba', got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


_PARALLEL_MIN = 8192  # below this many items a second thread costs more than it saves
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child inherits the executor but not its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run_all(jobs: list[Callable[[], object]]) -> None:
    """Run jobs concurrently: the first in this thread, the others in the kernel pool."""
    global _pool
    if len(jobs) > 1 and (_pool is None or _pool._max_workers < len(jobs) - 1):
        _pool = ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="recis-kernel")
    futures = [_pool.submit(job) for job in jobs[1:]]
    jobs[0]()
    for f in futures:
        f.result()


def _in_ranges(fn: Callable, n: int, *args, work: int | None = None) -> None:
    """Run ``fn(*args, lo, hi)`` over ``[0, n)`` split across ``torch.get_num_threads()``
    threads when ``work`` (default ``n``) items make it worth it. The numba kernels release
    the GIL and each range writes disjoint outputs, so results do not depend on the split;
    the threads overlap the cache misses of random rows."""
    parts = _threads() if (n if work is None else work) >= _PARALLEL_MIN else 1
    bounds = [n * k // parts for k in range(parts + 1)]
    _run_all([functools.partial(fn, *args, bounds[k], bounds[k + 1]) for k in range(parts)])


def _np_tags(tags: Tensor | None) -> np.ndarray:
    return _EMPTY_TAGS if tags is None else tags.numpy()


def unique_with_inverse(ids: Tensor, tags: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Unique ``(id, tag)`` keys in first-occurrence order and the inverse index."""
    if not use_numba(ids.device):
        return _torch.unique_with_inverse(ids, tags)
    # one thread: splitting by hash partition was measured slower (branchy, no prefetch)
    uniq, uniq_tags, inverse = _numba.unique_with_inverse(ids.numpy(), _np_tags(tags))
    out_tags = None if tags is None else torch.from_numpy(uniq_tags)
    return torch.from_numpy(uniq), out_tags, torch.from_numpy(inverse)


def new_table(capacity: int, device: torch.device) -> Tensor:
    """An empty ``[capacity, 2]`` hash-map table (layout in :mod:`._torch`)."""
    return _torch.new_table(capacity, device)


def map_lookup(table: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    """Row of each key, -1 where absent."""
    if not use_numba(table.device):
        return _torch.map_lookup(table[:, 0], table[:, 1], ids, tags)
    rows = np.empty(ids.numel(), np.int64)
    _in_ranges(_numba.map_lookup_range, ids.numel(), table.numpy(), ids.numpy(), _np_tags(tags),
               rows)
    return torch.from_numpy(rows)


def map_lookup_or_insert(
    table: Tensor, ids: Tensor, tags: Tensor | None, free: Tensor, n_free: int, next_row: int,
) -> tuple[Tensor, int, int, int, int]:
    """Rows of unique keys, inserting absent ones; ``(rows, n_new, n_free, next_row,
    tombstones_reused)``."""
    if not use_numba(table.device):
        return _torch.map_lookup_or_insert(table[:, 0], table[:, 1], ids, tags, free, n_free,
                                           next_row)
    # Lookups run in parallel; the absent keys are then inserted in input order by one thread,
    # which keeps row assignment deterministic.
    rows = map_lookup(table, ids, tags)
    n_new, n_free, next_row, reused = _numba.map_insert_missing(
        table.numpy(), ids.numpy(), _np_tags(tags), rows.numpy(), free.numpy(), n_free, next_row
    )
    return rows, int(n_new), int(n_free), int(next_row), int(reused)


def map_delete(table: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    """Remove keys; the freed row of each, -1 where absent."""
    if not use_numba(table.device):
        return _torch.map_delete(table[:, 0], table[:, 1], ids, tags)
    return torch.from_numpy(_numba.map_delete(table.numpy(), ids.numpy(), _np_tags(tags)))


def map_rebuild(table: Tensor, capacity: int) -> Tensor:
    """A new table of ``capacity`` slots with the live entries of ``table``."""
    if not use_numba(table.device):
        return _torch.map_rebuild(table[:, 0], table[:, 1], capacity)
    return torch.from_numpy(_numba.map_rebuild(table.numpy(), capacity))


class BlockList:
    """The blocks of one slot: contiguous 2-D tensors ``[block_size, width]`` of one dtype.

    For the numba kernels it also keeps the blocks' data addresses in an int64 array; the
    tensors in :attr:`tensors` keep that memory alive.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.tensors: list[Tensor] = []
        self._numba = use_numba(device) and dtype in _NUMBA_DTYPES
        self._ptrs = np.zeros(0, np.int64)

    def append(self, block: Tensor) -> None:
        if not block.is_contiguous():
            raise ValueError("blocks must be contiguous")
        self.tensors.append(block)
        if self._numba:
            self._ptrs = np.append(self._ptrs, np.int64(block.data_ptr()))

    def clear(self) -> None:
        self.tensors.clear()
        self._ptrs = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.tensors)

    def _numba_ok(self, other: Tensor) -> bool:
        return self._numba and bool(self.tensors) and other.dtype == self.tensors[0].dtype

    @property
    def uses_numba(self) -> bool:
        return self._numba

    def addresses(self, block_size: int, rows: Tensor, row_bytes: int) -> np.ndarray:
        """Data address of each row (numba path only; 0 for rows < 0)."""
        return _numba.row_addresses(self._ptrs, block_size, rows.numpy(), row_bytes)

    def gather(self, block_size: int, rows: Tensor, out: Tensor) -> Tensor:
        """``out[i]`` = row ``rows[i]``, zeros where ``rows[i] < 0``; ``out`` is ``[n, width]``."""
        if self._numba_ok(out):
            addresses = _numba.row_addresses(self._ptrs, block_size, rows.numpy(),
                                             out.shape[1] * out.element_size())
            _in_ranges(_numba.gather_range, rows.numel(), addresses, out.numpy())
            return out
        return _torch.gather_rows(self.tensors, block_size, rows, out)

    def scatter(self, block_size: int, rows: Tensor, values: Tensor) -> None:
        """Row ``rows[i]`` = ``values[i]`` (or ``values[0]`` for all when it has one row)."""
        if self._numba_ok(values) and values.is_contiguous():
            _numba.scatter_rows(self._ptrs, block_size, rows.numpy(), values.numpy())
            return
        _torch.scatter_rows(self.tensors, block_size, rows, values)

    def bag_reduce(
        self, block_size: int, rows: Tensor, inverse: Tensor, offsets: Tensor,
        weights: Tensor | None, mean: bool, out: Tensor,
    ) -> bool:
        """Fused lookup + sum/mean over bags into ``out`` (``[B, width]``) with the numba
        kernel; returns False (doing nothing) when this block list has no numba path."""
        if not self._numba_ok(out):
            return False
        w = _no_weights(out) if weights is None else weights.to(out.dtype).numpy()
        addresses = _numba.row_addresses(self._ptrs, block_size, rows.numpy(),
                                         out.shape[1] * out.element_size())
        _in_ranges(_numba.bag_reduce_range, offsets.numel() - 1, addresses, inverse.numpy(),
                   offsets.numpy(), w, mean, out.numpy(), work=inverse.numel())
        return True


def _no_weights(like: Tensor) -> np.ndarray:
    return np.zeros(0, like.numpy().dtype)


def bag_reduce_backward(
    inverse: Tensor, offsets: Tensor, weights: Tensor | None, mean: bool, grad_out: Tensor,
    num_unique: int,
) -> Tensor:
    """Per-unique-row gradient of a fused bag sum/mean (CPU, numba): occurrences are grouped
    by unique row, then each row's gradient is summed in one pass (parallel over rows)."""
    grad_out = grad_out.contiguous()
    grad = torch.empty(num_unique, grad_out.shape[1], dtype=grad_out.dtype)
    w = _no_weights(grad_out) if weights is None else weights.to(grad_out.dtype).numpy()
    plan = _numba.bag_backward_plan(inverse.numpy(), offsets.numpy(), w, mean, num_unique)
    _in_ranges(_numba.bag_backward_range, num_unique, *plan, grad_out.numpy(), grad.numpy(),
               work=inverse.numel())
    return grad


def update_rows(kernel_name: str, addresses: list[np.ndarray], grads: Tensor, *args) -> None:
    """Run an optimizer kernel of :mod:`._numba` over unique rows, split across threads."""
    grads = grads.contiguous()
    flat = grads.reshape(grads.shape[0], -1).numpy()
    _in_ranges(getattr(_numba, kernel_name), grads.shape[0], *addresses, flat, *args)
