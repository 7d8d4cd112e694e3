"""Each rank's rows of a global batch.

To train on ``W`` ranks exactly as one process trains on a batch of ``B`` rows, every rank
reads the same global batches and keeps its ``B / W`` rows of each (:class:`RankSlice`): the
same rows in the same steps, whatever ``W``. (The readers can also shard by whole batches or
files, which reads less but gives other batches than one process would.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor

from recis.ragged.tensor import RaggedTensor

__all__ = ["rank_rows", "RankSlice"]


def _rows_of(batch: Any) -> int | None:
    if isinstance(batch, RaggedTensor):
        return batch.offsets()[0].numel() - 1
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = _rows_of(v)
            if n is not None:
                return n
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _rows_of(v)
            if n is not None:
                return n
    return None


def _take(value: Any, lo: int, hi: int) -> Any:
    if isinstance(value, RaggedTensor):
        if len(value.offsets()) != 1:
            raise ValueError("rank_rows splits RaggedTensors with one ragged level only")
        offsets = value.offsets()[0]
        start, end = int(offsets[lo]), int(offsets[hi])
        weight = value.weight()
        return RaggedTensor(value.values()[start:end], offsets[lo:hi + 1] - start,
                            None if weight is None else weight[start:end], validate=False)
    if isinstance(value, Tensor):
        return value[lo:hi] if value.dim() else value
    if isinstance(value, Mapping):
        return {k: _take(v, lo, hi) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, lo, hi) for v in value)
    return value


def rank_rows(batch: Any, rank: int, world: int) -> Any:
    """Rows ``[rank * B // W, (rank + 1) * B // W)`` of a batch of ``B`` rows (tensors, ragged
    tensors, dicts and lists of them): equal shares when ``B`` is a multiple of ``W``, else
    shares that differ by one row (e.g. the last, partial batch of a file). ``B >= W``.

    Example::

        >>> rank_rows({"label": torch.arange(4)}, 1, 2)
        {'label': tensor([2, 3])}
    """
    rows = _rows_of(batch)
    if rows is None:
        raise ValueError("rank_rows: the batch holds no tensor with a batch dimension")
    if rows < world:
        raise ValueError(f"a global batch of {rows} rows cannot give each of {world} ranks a "
                         "row: make the batch size at least the number of processes")
    return _take(batch, rank * rows // world, (rank + 1) * rows // world)


class RankSlice:
    """Iterate ``dataset``'s global batches, keeping this rank's rows of each.

    Args:
        dataset (iterable): global batches (the same on every rank).
        rank, world_size (int, optional): default: from ``torch.distributed``.
    """

    def __init__(self, dataset: Iterable, rank: int | None = None,
                 world_size: int | None = None):
        initialized = dist.is_available() and dist.is_initialized()
        self.dataset = dataset
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world = world_size if world_size is not None else (
            dist.get_world_size() if initialized else 1)

    def __iter__(self) -> Iterator:
        for batch in self.dataset:
            yield rank_rows(batch, self.rank, self.world)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]
