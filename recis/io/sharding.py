"""Which part of a data stream this process (and DataLoader worker) reads."""

from __future__ import annotations

import logging
import operator
import os
from typing import Any

import torch.distributed as dist
import torch.utils.data

__all__ = ["resolve_rank", "current_shard"]

logger = logging.getLogger(__name__)


def _int_arg(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}") from None


def _env_int(name: str, where: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"{where}: environment variable {name} must be an integer, got {raw!r}"
        ) from None


def resolve_rank(
    rank: int | None = None, world_size: int | None = None, *, where: str = "resolve_rank"
) -> tuple[int, int]:
    r"""The ``(rank, world_size)`` a data source should shard for.

    Explicit arguments win. Otherwise the values come from :mod:`torch.distributed` when it is
    initialized, else from the ``RANK`` and ``WORLD_SIZE`` environment variables, else
    ``(0, 1)``.

    Args:
        rank (int, optional): this process's index, ``0 <= rank < world_size``.
        world_size (int, optional): number of processes, at least 1.
        where (str): name used in error messages.

    Returns:
        tuple[int, int]: ``(rank, world_size)``.

    Example::

        >>> resolve_rank(1, 4)
        (1, 4)
    """
    if rank is not None:
        rank = _int_arg(rank, "rank", where)
    if world_size is not None:
        world_size = _int_arg(world_size, "world_size", where)
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            auto_rank, auto_world = dist.get_rank(), dist.get_world_size()
        else:
            auto_rank = _env_int("RANK", where)
            auto_world = _env_int("WORLD_SIZE", where)
        if rank is None:
            rank = 0 if auto_rank is None else auto_rank
        if world_size is None:
            world_size = 1 if auto_world is None else auto_world
    if world_size < 1:
        raise ValueError(f"{where}: world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{where}: rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def current_shard(rank: int, world_size: int) -> tuple[int, int]:
    r"""Combine a process's rank with the current :class:`~torch.utils.data.DataLoader` worker.

    Inside a DataLoader worker (``torch.utils.data.get_worker_info()`` is not ``None``), each
    rank's share is split further among its workers.

    Args:
        rank (int): the process's rank.
        world_size (int): number of processes.

    Returns:
        tuple[int, int]: ``(shard, num_shards)`` with
        ``shard = rank * num_workers + worker_id`` and ``num_shards = world_size * num_workers``.

    Example::

        >>> current_shard(1, 2)  # outside a DataLoader worker
        (1, 2)
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return rank, world_size
    return rank * info.num_workers + info.id, world_size * info.num_workers
