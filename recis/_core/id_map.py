"""ID map: int64 key (optionally tagged with a child index) -> int64 row, with a row allocator.

Open addressing with linear probing (layout in :mod:`recis._core.backends.base`). Every int64
value is a valid ID: emptiness lives in the value array, not in reserved keys. The map grows by
rehashing when live plus deleted slots pass :attr:`IdMap.MAX_LOAD` of its capacity.

Rows are handed out deterministically: the new keys of a call, in input order, take the
smallest freed rows first, then fresh rows from a high-water mark. So the same operations give
the same rows on every backend.

Example::

    >>> m = IdMap(torch.device("cpu"))
    >>> m.lookup_or_insert(torch.tensor([7, -1, 7, 2**63 - 1]))
    tensor([0, 1, 0, 2])
    >>> m.lookup(torch.tensor([-1, 5]))
    tensor([ 1, -1])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Backend, backend_for
from .backends.base import MAX_TAGS, ROW_MASK, TAG_SHIFT

__all__ = ["IdMap", "MAX_TAGS"]


class IdMap:
    """int64 ID (+ tag) -> row map with deterministic row allocation and reuse of freed rows."""

    MAX_LOAD = 0.75
    MIN_CAPACITY = 1024

    def __init__(self, device: torch.device | str = "cpu", capacity: int = MIN_CAPACITY,
                 backend: Backend | None = None):
        self.device = torch.device(device)
        self.backend = backend if backend is not None else backend_for(self.device)
        cap = self.MIN_CAPACITY
        while cap < capacity:
            cap *= 2
        self._table = self.backend.map_new(cap, self.device)  # [cap, 2]: (key, row | tag << 48)
        self._size = 0  # live keys
        self._used = 0  # live keys + tombstones
        # Freed rows, sorted descending in free[:n_free], so the smallest is popped first.
        self._free = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._n_free = 0
        self._next_row = 0  # high-water mark: rows [0, next_row) have been handed out
        self.inserted_total = 0  # keys ever inserted (statistics)
        self.deleted_total = 0  # keys ever deleted (statistics)

    # -- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._table.shape[0]

    @property
    def row_high_water(self) -> int:
        """Rows ``[0, row_high_water)`` have been handed out at least once."""
        return self._next_row

    def free_rows(self) -> Tensor:
        """The freed rows waiting for reuse, in reuse order reversed (a copy)."""
        return self._free[: self._n_free].clone()

    def memory_bytes(self) -> int:
        return (self._table.numel() + self._free.numel()) * 8

    # -- operations --------------------------------------------------------------------------
    def _reserve(self, extra: int) -> None:
        if self._used + extra <= self.MAX_LOAD * self.capacity:
            return
        # Rebuild at the same size when tombstones are the problem; double until the live keys
        # fill at most 3/4 of the bound, so a rebuild is followed by room to grow.
        cap = self.capacity
        while self._size + extra > self.MAX_LOAD * 0.75 * cap:
            cap *= 2
        self._table = self.backend.map_build(self._table[:, 0], self._table[:, 1], cap)
        self._used = self._size

    def lookup(self, ids: Tensor, tags: Tensor | None = None) -> Tensor:
        """Row of each ID, -1 where absent. Never inserts."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        return self.backend.map_lookup(self._table, ids, tags)

    def resolve(self, ids: Tensor, tags: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Deduplicate a batch and look its unique keys up: ``(uniq, uniq_tags, inverse,
        rows)``, ``rows`` -1 where absent (see :meth:`insert_missing`). Writes nothing."""
        if ids.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, (None if tags is None else empty), empty, empty.clone()
        return self.backend.map_resolve(self._table, ids, tags)

    def insert_missing(self, ids: Tensor, tags: Tensor | None, rows: Tensor) -> Tensor:
        """Insert the unique keys whose ``rows`` entry is -1, in order, writing their rows
        into ``rows``; returns the mask of the inserted keys."""
        n_missing = int((rows < 0).sum())
        if n_missing == 0:
            return torch.zeros(rows.numel(), dtype=torch.bool, device=self.device)
        self._reserve(n_missing)
        if self._n_free == 0 and self._free.numel():
            self._free = self._free[:0]
        inserted, self._n_free, self._next_row, reused = self.backend.map_insert_missing(
            self._table, ids, tags, rows, self._free, self._n_free, self._next_row)
        if self._next_row > ROW_MASK:
            raise RuntimeError(f"ID map holds more than {ROW_MASK} rows")
        self._size += n_missing
        self._used += n_missing - reused
        self.inserted_total += n_missing
        return inserted

    def lookup_or_insert(
        self, ids: Tensor, tags: Tensor | None = None, *, assume_unique: bool = False,
        return_inserted: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Row of each ID, inserting the absent ones (first-occurrence order) as it goes.

        ``assume_unique=True`` skips deduplication when the caller knows the keys are unique.
        ``return_inserted=True`` also returns the mask of the keys that were inserted (of
        repeated keys, the first occurrence).
        """
        if ids.numel() == 0:
            rows = torch.zeros(0, dtype=torch.int64, device=self.device)
            return (rows, rows.bool()) if return_inserted else rows
        if not assume_unique:
            uniq, uniq_tags, inverse, rows = self.resolve(ids, tags)
            inserted = self.insert_missing(uniq, uniq_tags, rows)
            if not return_inserted:
                return rows[inverse]
            first = torch.zeros(ids.numel(), dtype=torch.bool, device=self.device)
            positions = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64,
                                   device=self.device)
            positions.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=self.device),
                                      "amin")
            first[positions[inserted]] = True
            return rows[inverse], first
        self._reserve(ids.numel())
        if self._n_free == 0 and self._free.numel():
            self._free = self._free[:0]
        rows, inserted, self._n_free, self._next_row, reused = \
            self.backend.map_lookup_or_insert(self._table, ids, tags, self._free, self._n_free,
                                              self._next_row)
        if self._next_row > ROW_MASK:
            raise RuntimeError(f"ID map holds more than {ROW_MASK} rows")
        n_new = int(inserted.sum())
        self._size += n_new
        self._used += n_new - reused
        self.inserted_total += n_new
        return (rows, inserted) if return_inserted else rows

    def delete(self, ids: Tensor, tags: Tensor | None = None) -> Tensor:
        """Remove IDs; returns the freed rows (-1 for IDs that were absent), which become the
        first rows handed to new IDs, smallest first."""
        if ids.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        rows = self.backend.map_delete(self._table, ids, tags)
        freed = rows[rows >= 0]
        if freed.numel():
            self._size -= freed.numel()
            self.deleted_total += freed.numel()
            pool = torch.cat([self._free[: self._n_free], freed])
            self._free = torch.sort(pool, descending=True).values
            self._n_free = self._free.numel()
        return rows

    def live_rows(self) -> Tensor:
        """The rows that hold a key, ascending: every row handed out and not freed (read off
        the allocator, without visiting the keys)."""
        if self._n_free == 0:
            return torch.arange(self._next_row, device=self.device)
        live = torch.ones(self._next_row, dtype=torch.bool, device=self.device)
        live[self._free[: self._n_free]] = False
        return live.nonzero().squeeze(1)

    def ids_by_row(self, rows: Tensor | None = None) -> Tensor:
        """The keys' IDs at ``rows`` (default :meth:`live_rows`; the caller's copy of them
        spares a second pass), in row order (tags left out): the IDs of :meth:`items` for a
        third of its scattered writes."""
        ids = self.backend.map_ids_by_row(self._table, self._next_row)
        if self._n_free == 0:
            return ids
        return ids[self.live_rows() if rows is None else rows]

    def items(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, tags, rows)`` of every live key, ordered by row."""
        return self.backend.map_items(self._table, self._next_row)

    def clear(self) -> None:
        """Forget every key and every row; the next key gets row 0 (statistics are kept)."""
        inserted, deleted = self.inserted_total, self.deleted_total + self._size
        self.__init__(self.device, backend=self.backend)
        self.inserted_total, self.deleted_total = inserted, deleted

    def restore(self, ids: Tensor, tags: Tensor, rows: Tensor, next_row: int,
                free: Tensor) -> None:
        """Replace the contents with these ``(id, tag) -> row`` entries and allocator state.

        The capacity is the smallest that holds the entries within :attr:`MAX_LOAD` (as
        dense as a map that grew to this size may be): memory, not room to grow, is what a
        loaded table needs first; the next inserts grow it as usual."""
        stats = (self.inserted_total, self.deleted_total)
        self.__init__(self.device, backend=self.backend)
        self.inserted_total, self.deleted_total = stats
        capacity = self.MIN_CAPACITY
        while ids.numel() > self.MAX_LOAD * capacity:
            capacity *= 2
        packed = rows | (tags << TAG_SHIFT) if bool(tags.any()) else rows
        self._table = self.backend.map_build(ids, packed, capacity)
        self._size = self._used = ids.numel()
        self._next_row = int(next_row)
        self._free = torch.sort(free.to(torch.int64), descending=True).values
        self._n_free = self._free.numel()

    def to(self, device: torch.device | str, backend: Backend | None = None) -> IdMap:
        """A copy of this map on ``device`` (slot positions rebuilt for that backend)."""
        other = IdMap(device, self.capacity, backend)
        table = self._table.to(device)
        other._table = other.backend.map_build(table[:, 0], table[:, 1], self.capacity)
        other._size = other._used = self._size
        other._free = self._free[: self._n_free].to(device)
        other._n_free = self._n_free
        other._next_row = self._next_row
        other.inserted_total, other.deleted_total = self.inserted_total, self.deleted_total
        return other
