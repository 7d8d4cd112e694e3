"""Slot store: named per-row slots (embedding, optimizer moments, policy metadata) in blocks.

Every slot is a :class:`~recis._core.backends.BlockList` of blocks ``[block_size, width]`` and
all slots have the same number of blocks, so row ``r`` lives at
``blocks[r // block_size][r % block_size]`` in each of them. Growing appends blocks (never
copies existing ones), so a large table does not need twice its memory to grow. A new block,
and a row reset by :meth:`SlotStore.reset_rows`, hold the slot's default: the initializer's
draw for the embedding, a constant for the others. A slot declared when blocks exist gets
those blocks at once, filled with its default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .backends import Backend, BlockList, check_rows


@dataclass(frozen=True)
class SlotSpec:
    """What a slot holds, per row.

    Args:
        name (str): the slot's name, unique in its table (also its checkpoint key).
        row_shape (tuple[int, ...]): shape of one row, e.g. ``(64,)`` or ``(1,)``.
        dtype (torch.dtype): storage dtype.
        default: a number, the value of new and reset rows; or an initializer (an object
            with ``rows_for_ids``), which gives each new row values drawn from its ID when the
            ID is inserted. Default: 0.
        saved (bool): written to checkpoints. Default: True.

    Example::

        >>> SlotSpec("last_seen", (1,), torch.int64, default=0)
        SlotSpec(name='last_seen', row_shape=(1,), dtype=torch.int64, default=0, saved=True)
    """

    name: str
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    default: Any = 0
    saved: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"slot name must be a non-empty str, got {self.name!r}")
        shape = tuple(self.row_shape) if isinstance(self.row_shape, (list, tuple)) else None
        if shape is None or not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"slot {self.name!r}: row_shape must be a non-empty list of "
                             f"positive ints, got {self.row_shape!r}")
        object.__setattr__(self, "row_shape", shape)
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"slot {self.name!r}: dtype must be a torch.dtype, got "
                            f"{self.dtype!r}")

    @property
    def width(self) -> int:
        return math.prod(self.row_shape)

    @property
    def keyed(self) -> bool:
        """The default is an initializer: a new row's values are drawn from its ID
        (``rows_for_ids``) when the ID is inserted; rows without an ID hold zeros."""
        return hasattr(self.default, "rows_for_ids")


class SlotStore:
    """Named slots over one shared row space, allocated in blocks of ``block_size`` rows."""

    def __init__(self, block_size: int, device: torch.device, backend: Backend):
        self.block_size = int(block_size)
        self.device = torch.device(device)
        self.backend = backend
        self._specs: dict[str, SlotSpec] = {}
        self._blocks: dict[str, BlockList] = {}
        self._num_blocks = 0

    # -- slots -------------------------------------------------------------------------------
    def add_slot(self, spec: SlotSpec) -> None:
        """Declare a slot; existing blocks get rows filled with its default."""
        if spec.name in self._specs:
            raise ValueError(f"slot {spec.name!r} already exists; slots: {list(self._specs)}")
        self._specs[spec.name] = spec
        self._blocks[spec.name] = BlockList(self.block_size, spec.width, spec.dtype, self.device)
        for _ in range(self._num_blocks):
            self._blocks[spec.name].append(self._default_rows(spec, self.block_size))

    def has_slot(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> SlotSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no slot {name!r}; slots: {list(self._specs)}") from None

    @property
    def slot_names(self) -> list[str]:
        return list(self._specs)

    def block_list(self, name: str) -> BlockList:
        self.spec(name)
        return self._blocks[name]

    def blocks(self, name: str) -> list[Tensor]:
        """The blocks of a slot, each ``[block_size, *row_shape]`` (views, writable)."""
        spec = self.spec(name)
        return [b.view(self.block_size, *spec.row_shape) for b in self._blocks[name].tensors]

    # -- capacity ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def capacity(self) -> int:
        return self._num_blocks * self.block_size

    def ensure_rows(self, num_rows: int, initialize: bool = True) -> None:
        """Append blocks until rows ``[0, num_rows)`` exist. ``initialize=False`` leaves the
        new blocks' values unset: the caller must write every row of them."""
        while self.capacity < num_rows:
            for name, spec in self._specs.items():
                block = (self._default_rows(spec, self.block_size) if initialize else
                         torch.empty(self.block_size, spec.width, dtype=spec.dtype,
                                     device=self.device))
                self._blocks[name].append(block)
            self._num_blocks += 1

    def clear(self) -> None:
        """Drop every block (slots stay declared)."""
        for blocks in self._blocks.values():
            blocks.clear()
        self._num_blocks = 0

    def memory_bytes(self) -> int:
        return sum(self.capacity * b.width * b.itemsize for b in self._blocks.values())

    def bytes_per_row(self) -> dict[str, int]:
        return {name: b.width * b.itemsize for name, b in self._blocks.items()}

    def moved(self, device: torch.device, backend: Backend, dtype_of) -> SlotStore:
        """A copy on ``device`` with each slot's dtype given by ``dtype_of(spec)``."""
        other = SlotStore(self.block_size, device, backend)
        for name, spec in self._specs.items():
            new = SlotSpec(spec.name, spec.row_shape, dtype_of(spec), spec.default, spec.saved)
            other._specs[name] = new
            other._blocks[name] = BlockList(self.block_size, new.width, new.dtype, device)
            for block in self._blocks[name].tensors:
                other._blocks[name].append(block.to(device=device, dtype=new.dtype).contiguous())
        other._num_blocks = self._num_blocks
        return other

    # -- rows --------------------------------------------------------------------------------
    def _default_rows(self, spec: SlotSpec, n: int) -> Tensor:
        """Values of rows that hold no ID: the constant default, or zeros for a keyed slot
        (its rows get values when an ID is inserted, see :meth:`initialize`)."""
        value = 0 if spec.keyed else spec.default
        return torch.full((n, spec.width), value, dtype=spec.dtype, device=self.device)

    def initialize(self, rows: Tensor, ids: Tensor, keys_of: dict[str, Tensor]) -> None:
        """Write the keyed slots' initial values of newly inserted ``ids`` into ``rows``;
        ``keys_of[slot]``: one int64 key per ID."""
        if rows.numel() == 0:
            return
        for name, keys in keys_of.items():
            spec = self._specs[name]
            values = spec.default.rows_for_ids(ids, keys, spec.row_shape, spec.dtype,
                                               (self.block_size, *spec.row_shape))
            self.backend.scatter(self._blocks[name], rows,
                                 values.reshape(-1, spec.width).contiguous())

    def keyed_slots(self) -> list[str]:
        return [n for n, spec in self._specs.items() if spec.keyed]

    def gather(self, name: str, rows: Tensor) -> Tensor:
        """Rows of a slot as ``[len(rows), *row_shape]``; zeros where ``rows == -1``."""
        spec = self.spec(name)
        out = torch.empty(rows.numel(), spec.width, dtype=spec.dtype, device=self.device)
        if rows.numel():
            check_rows(rows, self.capacity)
            self.backend.gather(self._blocks[name], rows, out)
        return out.view(rows.numel(), *spec.row_shape)

    def scatter(self, name: str, rows: Tensor, values: Tensor) -> None:
        """Write ``values`` (``[len(rows), *row_shape]`` or one row) into rows; -1 skipped."""
        spec = self.spec(name)
        if rows.numel() == 0:
            return
        check_rows(rows, self.capacity)
        flat = values.detach().reshape(-1, spec.width).to(spec.dtype).contiguous()
        if flat.shape[0] not in (1, rows.numel()):
            raise ValueError(f"slot {name!r}: values must have one row per row index "
                             f"({rows.numel()}) or a single row, got {flat.shape[0]}")
        self.backend.scatter(self._blocks[name], rows, flat)

    def write_range(self, name: str, start: int, values: Tensor) -> None:
        """Write ``values`` (``[n, *row_shape]``) into rows ``[start, start + n)``: block by
        block, with no row index (a checkpoint's rows 0..n-1)."""
        spec = self.spec(name)
        flat = values.detach().reshape(-1, spec.width).to(spec.dtype)
        n, size = flat.shape[0], self.block_size
        if start < 0 or start + n > self.capacity:
            raise IndexError(f"rows [{start}, {start + n}) out of range [0, {self.capacity})")
        blocks = self._blocks[name].tensors
        done = 0
        while done < n:
            b, lo = divmod(start + done, size)
            step = min(size - lo, n - done)
            blocks[b][lo : lo + step].copy_(flat[done : done + step])
            done += step

    def reset_rows(self, rows: Tensor, names: list[str] | None = None) -> None:
        """Give rows the defaults of the slots (all, or ``names``), as a fresh row has."""
        if rows.numel() == 0:
            return
        for name in self._specs if names is None else names:
            self.backend.scatter(self._blocks[name], rows, self._default_rows(self._specs[name], 1))

    def value(self, name: str, num_rows: int | None = None) -> Tensor:
        """The first ``num_rows`` rows of a slot (all blocks if None), concatenated (a copy)."""
        spec = self.spec(name)
        tensors = self._blocks[name].tensors
        if not tensors:
            return torch.zeros(0, *spec.row_shape, dtype=spec.dtype, device=self.device)
        out = torch.cat(tensors).view(-1, *spec.row_shape)
        return out if num_rows is None else out[:num_rows]
