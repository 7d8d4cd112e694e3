"""Kernels of the ID map and the slot store, behind one dispatcher.

Two twins with the same signatures (torch tensors in, torch tensors out):

* :mod:`._torch`, vectorised plain torch, runs on any device and is the reference;
* :mod:`._numba`, compiled loops for CPU tensors (JIT, cached to disk).

:func:`use_numba` is the single place that picks one: numba for CPU tensors unless the
environment variable ``RECIS_KERNELS=torch`` asks for the reference everywhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


def _np_tags(tags: Tensor | None) -> np.ndarray:
    return _EMPTY_TAGS if tags is None else tags.numpy()


def unique_with_inverse(ids: Tensor, tags: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Unique ``(id, tag)`` keys in first-occurrence order and the inverse index."""
    if not use_numba(ids.device):
        return _torch.unique_with_inverse(ids, tags)
    uniq, uniq_tags, inverse = _numba.unique_with_inverse(ids.numpy(), _np_tags(tags))
    out_tags = None if tags is None else torch.from_numpy(uniq_tags)
    return torch.from_numpy(uniq), out_tags, torch.from_numpy(inverse)


def map_lookup(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    if not use_numba(keys.device):
        return _torch.map_lookup(keys, vals, ids, tags)
    return torch.from_numpy(_numba.map_lookup(keys.numpy(), vals.numpy(), ids.numpy(),
                                              _np_tags(tags)))


def map_lookup_or_insert(
    keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None, free: Tensor, n_free: int,
    next_row: int,
) -> tuple[Tensor, int, int, int, int]:
    if not use_numba(keys.device):
        return _torch.map_lookup_or_insert(keys, vals, ids, tags, free, n_free, next_row)
    rows, n_new, n_free, next_row, reused = _numba.map_lookup_or_insert(
        keys.numpy(), vals.numpy(), ids.numpy(), _np_tags(tags), free.numpy(), n_free, next_row
    )
    return torch.from_numpy(rows), int(n_new), int(n_free), int(next_row), int(reused)


def map_delete(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    if not use_numba(keys.device):
        return _torch.map_delete(keys, vals, ids, tags)
    return torch.from_numpy(_numba.map_delete(keys.numpy(), vals.numpy(), ids.numpy(),
                                              _np_tags(tags)))


def map_rebuild(keys: Tensor, vals: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    if not use_numba(keys.device):
        return _torch.map_rebuild(keys, vals, capacity)
    new_keys, new_vals = _numba.map_rebuild(keys.numpy(), vals.numpy(), capacity)
    return torch.from_numpy(new_keys), torch.from_numpy(new_vals)


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

    def gather(self, block_size: int, rows: Tensor, out: Tensor) -> Tensor:
        """``out[i]`` = row ``rows[i]``, zeros where ``rows[i] < 0``; ``out`` is ``[n, width]``."""
        if self._numba_ok(out):
            _numba.gather_rows(self._ptrs, block_size, rows.numpy(), out.numpy())
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
        _numba.bag_reduce_rows(self._ptrs, block_size, rows.numpy(), inverse.numpy(),
                               offsets.numpy(), w, mean, out.numpy())
        return True


def _no_weights(like: Tensor) -> np.ndarray:
    return np.zeros(0, like.numpy().dtype)


def bag_reduce_backward(
    inverse: Tensor, offsets: Tensor, weights: Tensor | None, mean: bool, grad_out: Tensor,
    num_unique: int,
) -> Tensor:
    """Per-unique-row gradient of a fused bag sum/mean (CPU, numba)."""
    grad_out = grad_out.contiguous()
    grad = torch.zeros(num_unique, grad_out.shape[1], dtype=grad_out.dtype)
    w = _no_weights(grad_out) if weights is None else weights.to(grad_out.dtype).numpy()
    _numba.bag_reduce_backward(inverse.numpy(), offsets.numpy(), w, mean, grad_out.numpy(),
                               grad.numpy())
    return grad
