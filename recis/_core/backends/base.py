"""The kernel interface every backend implements, and the block lists the kernels work on.

A backend is one object per kind of device: :class:`~.torch_backend.TorchBackend` (plain torch,
any device: the reference and the CUDA path) and :class:`~.numba_backend.NumbaBackend`
(compiled loops for CPU tensors). A table picks its backend once, from its device
(:func:`recis._core.backends.backend_for`), and calls only the methods below, which have the
same signatures and the same observable results on every backend (a parity test checks it).

Hash-map layout shared by all backends: one int64 table ``[C, 2]`` (``C`` a power of two), key
and value side by side so that a probe touches one cache line. ``table[:, 0]`` holds an ID,
``table[:, 1]`` holds ``row | (tag << 48)`` for a live slot, ``EMPTY`` (-1) for a never-used
slot and ``TOMBSTONE`` (-2) for a deleted one. The tag is the child (logical table) index, so
equal IDs of two children are different keys and every int64 value is a valid ID. Where a key
lands may differ between backends, which is not observable.

Callers check what they pass (rows inside the blocks, bag offsets monotone and inside the IDs:
see :func:`check_rows` and :func:`check_offsets`); kernels index memory with those values and
do not check again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

EMPTY = -1
TOMBSTONE = -2
TAG_SHIFT = 48
ROW_MASK = (1 << TAG_SHIFT) - 1
MAX_TAGS = 1 << 15  # tags share the value word with the row (bits 48..62)


class BlockList:
    """The blocks of one slot: contiguous tensors ``[block_size, width]`` of one dtype.

    Row ``r`` is ``tensors[r // block_size][r % block_size]``. The blocks' data addresses are
    kept in :attr:`ptrs` (int64) for kernels that address rows by pointer; the tensors keep
    that memory alive. Copies (``copy.deepcopy``, pickling) recompute the addresses.
    """

    def __init__(self, block_size: int, width: int, dtype: torch.dtype, device: torch.device):
        self.block_size, self.width, self.dtype = int(block_size), int(width), dtype
        self.device = torch.device(device)
        self.tensors: list[Tensor] = []
        self.ptrs = np.zeros(0, np.int64)

    def append(self, block: Tensor) -> None:
        if block.shape != (self.block_size, self.width) or not block.is_contiguous():
            raise ValueError(f"a block must be a contiguous ({self.block_size}, {self.width}) "
                             f"tensor, got {tuple(block.shape)}")
        self.tensors.append(block)
        self.ptrs = np.append(self.ptrs, np.int64(block.data_ptr()))

    def clear(self) -> None:
        self.tensors.clear()
        self.ptrs = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def capacity(self) -> int:
        return len(self.tensors) * self.block_size

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["ptrs"]  # addresses of this process's tensors: meaningless in a copy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ptrs = np.array([t.data_ptr() for t in self.tensors], np.int64)


def check_rows(rows: Tensor, capacity: int, arg: str = "rows") -> None:
    """Raise unless every row is ``-1`` (meaning "none") or inside ``[0, capacity)``."""
    if rows.dtype != torch.int64:
        raise TypeError(f"{arg} must be int64, got {rows.dtype}")
    if rows.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(rows))  # one pass
    if low < -1 or high >= capacity:
        raise IndexError(f"{arg} must be -1 or in [0, {capacity}), got values in "
                         f"[{low}, {high}]")


def check_offsets(offsets: Tensor, num_items: int, arg: str = "offsets") -> None:
    """Raise unless ``offsets`` are bag boundaries over ``num_items`` items: 1-D int64,
    ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == num_items``."""
    if offsets.dim() != 1 or offsets.numel() == 0 or offsets.dtype != torch.int64:
        raise ValueError(f"{arg} must be a non-empty 1-D int64 tensor, got shape "
                         f"{tuple(offsets.shape)} {offsets.dtype}")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != num_items:
        raise ValueError(f"{arg} must start at 0 and end at the number of IDs ({num_items}), "
                         f"got {first} ... {last}")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{arg} must be non-decreasing (bag b is ids[{arg}[b]:{arg}[b+1]])")


class Backend:
    """The kernels of the ID map, the slot blocks and the optimizers.

    Every method takes and returns torch tensors on the backend's device. Subclasses override
    all of them (the torch backend) or some of them (the numba backend falls back to the torch
    one for what it does not compile). Register a subclass with
    :func:`recis._core.backends.register_backend`.
    """

    #: registry name, set by ``register_backend``
    name: str = ""

    def supports(self, device: torch.device) -> bool:
        """Whether tables on ``device`` can use this backend."""
        raise NotImplementedError

    # -- ID map --------------------------------------------------------------------------------
    def unique_with_inverse(self, ids: Tensor, tags: Tensor | None
                            ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Unique ``(id, tag)`` pairs in first-occurrence order and the inverse index:
        ``(uniq_ids, uniq_tags, inverse)`` with ``uniq_ids[inverse] == ids`` (and the same for
        tags); ``uniq_tags`` is None when ``tags`` is None."""
        raise NotImplementedError

    def map_new(self, capacity: int, device: torch.device) -> Tensor:
        """An empty ``[capacity, 2]`` map table (``capacity`` a power of two)."""
        raise NotImplementedError

    def map_lookup(self, table: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
        """Row of each key, -1 where absent. Never writes."""
        raise NotImplementedError

    def map_lookup_or_insert(self, table: Tensor, ids: Tensor, tags: Tensor | None,
                             free: Tensor, n_free: int, next_row: int
                             ) -> tuple[Tensor, int, int, int, int]:
        """Rows of unique keys, inserting the absent ones in input order.

        New keys take the smallest free rows first (``free[:n_free]`` is sorted descending),
        then fresh rows from ``next_row``. The caller guarantees room in the map. Returns
        ``(rows, inserted, n_free, next_row, tombstones_reused)``; ``inserted`` is a bool mask
        of the keys that were absent."""
        raise NotImplementedError

    def map_resolve(self, table: Tensor, ids: Tensor, tags: Tensor | None
                    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """:meth:`unique_with_inverse` and :meth:`map_lookup` of the unique keys in one call
        (one parallel pass on CPU): ``(uniq, uniq_tags, inverse, rows)``, ``rows`` -1 where
        absent, unique keys in first-occurrence order."""
        raise NotImplementedError

    def map_insert_missing(self, table: Tensor, ids: Tensor, tags: Tensor | None,
                           rows: Tensor, free: Tensor, n_free: int, next_row: int
                           ) -> tuple[Tensor, int, int, int]:
        """Insert the unique keys whose ``rows`` entry is -1 (absent: see :meth:`map_resolve`),
        in input order, writing their new rows into ``rows``; rows as in
        :meth:`map_lookup_or_insert`. Returns ``(inserted, n_free, next_row,
        tombstones_reused)``."""
        raise NotImplementedError

    def map_delete(self, table: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
        """Remove keys; the freed row of each, -1 where absent (and for repeats of a key)."""
        raise NotImplementedError

    def map_build(self, keys: Tensor, packed: Tensor, capacity: int) -> Tensor:
        """A new table of ``capacity`` slots holding the entries ``(keys[i], packed[i])``
        (``packed``: ``row | tag << TAG_SHIFT``) whose ``packed[i] >= 0``; keys unique.
        Rebuilding a table is ``map_build(table[:, 0], table[:, 1], capacity)``."""
        raise NotImplementedError

    def map_items(self, table: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, tags, rows)`` of the live entries, ordered by row (rows are unique and below
        ``num_rows``)."""
        raise NotImplementedError

    def map_ids_by_row(self, table: Tensor, num_rows: int) -> Tensor:
        """``ids[r]``: the key of the live entry at row ``r`` (unspecified at rows without one;
        tags left out), for ``r < num_rows``: :meth:`map_items`'s IDs, placed by row."""
        raise NotImplementedError

    def split_at_kth(self, values: Tensor, index: Tensor | None, k: int
                     ) -> tuple[Tensor, Tensor]:
        """Of ``values[index]`` (1-D, no NaN; all of ``values`` when ``index`` is None), the
        entries below the ``k``-th smallest (1-based) and those equal to it: ``(below,
        equal)``, positions into ``values`` in the order of ``index`` (eviction's order is
        split at the k-th value, one key at a time)."""
        raise NotImplementedError

    # -- blocks --------------------------------------------------------------------------------
    def gather(self, blocks: BlockList, rows: Tensor, out: Tensor) -> Tensor:
        """``out[i]`` = row ``rows[i]`` (zeros where ``rows[i] == -1``); ``out`` is
        ``[len(rows), width]`` in the blocks' dtype. Returns ``out``."""
        raise NotImplementedError

    def scatter(self, blocks: BlockList, rows: Tensor, values: Tensor) -> None:
        """Row ``rows[i]`` = ``values[i]`` (``values`` may have one row, written to every row);
        rows equal to -1 are skipped. ``values`` is ``[n, width]`` in the blocks' dtype."""
        raise NotImplementedError

    def bag_reduce(self, blocks: BlockList, rows: Tensor, inverse: Tensor, offsets: Tensor,
                   weights: Tensor | None, mean: bool, out: Tensor) -> Tensor:
        """Fused lookup and combiner: ``out[b] = sum_i w_i * row(rows[inverse[i]])`` over
        ``i`` in ``[offsets[b], offsets[b+1])`` (rows equal to -1 read as zeros), divided by
        ``sum_i w_i`` when ``mean`` (0 for an empty bag or zero total weight). ``weights``
        None means all ones. ``out`` is ``[B, width]``. Returns ``out``."""
        raise NotImplementedError

    def bag_reduce_backward(self, inverse: Tensor, offsets: Tensor, weights: Tensor | None,
                            mean: bool, grad_out: Tensor, num_unique: int) -> Tensor:
        """Gradient of :meth:`bag_reduce` with respect to each unique row:
        ``grad[u] = sum over occurrences i of u: c_i * grad_out[bag(i)]`` with ``c_i`` the
        weight (divided by the bag's total weight for ``mean``). ``(num_unique, width)``."""
        raise NotImplementedError

    # -- policy metadata ---------------------------------------------------------------------
    def decayed_count_touch(self, count: BlockList, last: BlockList, rows: Tensor, clock: Tensor,
                            decay: float) -> None:
        """LFU's touch of unique, valid ``rows``: ``count = count * decay ** (clock - last) + 1``
        (``count + 1`` when ``decay == 1``), ``last = clock``. ``count``: a float slot of width
        1, ``last``: an int64 slot of width 1, ``clock``: a 1-element int64 tensor."""
        raise NotImplementedError

    # -- segment ops (recis.nn.functional) ------------------------------------------------------
    def segment_sum(self, data: Tensor, weight: Tensor | None, indices: Tensor,
                    segment_ids: Tensor, num_segments: int) -> Tensor:
        """Weighted scatter-sum of rows: ``out[segment_ids[i]] += weight[i] * data[indices[i]]``
        for every ``i``; ``out`` is ``(num_segments, D)`` zeros first, in ``data``'s dtype.
        ``data`` is ``(N, D)``; ``weight`` None means all ones, else ``(M,)`` in ``data``'s
        dtype; ``indices`` and ``segment_ids`` are ``(M,)`` int32 or int64, checked by the
        caller to lie in ``[0, N)`` and ``[0, num_segments)``."""
        raise NotImplementedError

    # -- optimizer updates (rows unique: the updates are not linear) -----------------------------
    def adam_update(self, emb: BlockList, exp_avg: BlockList, exp_avg_sq: BlockList,
                    rows: Tensor, grad: Tensor, *, decay: float, beta1: float, beta2: float,
                    alpha: float, eps: float, l2: float) -> None:
        """Per row: ``g += l2 * e; e *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
        e -= alpha * m / (sqrt(v) + eps)`` (``alpha`` carries the bias correction)."""
        raise NotImplementedError

    def adagrad_update(self, emb: BlockList, state_sum: BlockList, rows: Tensor, grad: Tensor,
                       *, clr: float, eps: float, l2: float) -> None:
        """Per row: ``g += l2 * e; s += g^2; e -= clr * g / (sqrt(s) + eps)``."""
        raise NotImplementedError

    def sgd_update(self, emb: BlockList, momentum_buffer: BlockList | None, rows: Tensor,
                   grad: Tensor, *, lr: float, momentum: float, l2: float,
                   nesterov: bool) -> None:
        """Per row: ``g += l2 * e``; with momentum ``b = momentum * b + g`` and the step is
        ``b`` (``g + momentum * b`` for Nesterov); ``e -= lr * step``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __reduce__(self) -> tuple[Any, ...]:
        from recis._core.backends import get_backend

        return get_backend, (self.name,)  # copies of a table share the registered instance
