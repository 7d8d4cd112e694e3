"""Slot store: named per-row slots (embedding, optimizer moments, policy metadata) in blocks.

Every slot is a list of blocks ``[block_size, width]`` and all slots have the same number of
blocks, so row ``r`` lives at ``blocks[r // block_size][r % block_size]`` in each of them.
Growing appends blocks (never copies existing ones), so a large table does not need twice its
memory to grow. A new block, and a row reset by :meth:`SlotStore.reset_rows`, hold the slot's
default: the initializer's draw for the embedding, a constant for the others. A slot added to a
store that already has blocks gets those blocks at once, filled with its default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .kernels import BlockList


@dataclass
class SlotSpec:
    """What a slot holds: per-row shape, dtype and default (a number or an initializer)."""

    name: str
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    default: Any  # float/int constant, or an object with ``generate_rows``

    @property
    def width(self) -> int:
        return math.prod(self.row_shape)


class SlotStore:
    """Named slots over one shared row space, allocated in blocks of ``block_size`` rows."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = int(block_size)
        self.device = torch.device(device)
        self._specs: dict[str, SlotSpec] = {}
        self._blocks: dict[str, BlockList] = {}
        self._num_blocks = 0

    # -- slots -------------------------------------------------------------------------------
    def add_slot(self, name: str, row_shape, dtype: torch.dtype, default: Any = 0) -> None:
        """Add a slot; existing blocks get rows filled with ``default``."""
        if name in self._specs:
            raise ValueError(f"slot {name!r} already exists; slots: {list(self._specs)}")
        spec = SlotSpec(name, tuple(int(d) for d in row_shape), dtype, default)
        self._specs[name] = spec
        self._blocks[name] = BlockList(dtype, self.device)
        for _ in range(self._num_blocks):
            self._blocks[name].append(self._default_rows(spec, self.block_size))

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
        new blocks uninitialised, for callers that overwrite every row (checkpoint loads)."""
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
        total = 0
        for spec in self._specs.values():
            itemsize = torch.empty(0, dtype=spec.dtype).element_size()
            total += self._num_blocks * self.block_size * spec.width * itemsize
        return total

    # -- rows --------------------------------------------------------------------------------
    def _default_rows(self, spec: SlotSpec, n: int) -> Tensor:
        default = spec.default
        if hasattr(default, "generate_rows"):
            values = default.generate_rows(
                n, spec.row_shape, spec.dtype, self.device, (self.block_size, *spec.row_shape)
            )
            return values.reshape(n, spec.width).contiguous()
        return torch.full((n, spec.width), default, dtype=spec.dtype, device=self.device)

    def gather(self, name: str, rows: Tensor, out: Tensor | None = None) -> Tensor:
        """Rows of a slot as ``[len(rows), *row_shape]``; zeros where ``rows < 0``."""
        spec = self.spec(name)
        if out is None:
            out = torch.empty(rows.numel(), spec.width, dtype=spec.dtype, device=self.device)
        if rows.numel():
            self._blocks[name].gather(self.block_size, rows, out)
        return out.view(rows.numel(), *spec.row_shape)

    def bag_reduce(self, name: str, rows: Tensor, inverse: Tensor, offsets: Tensor,
                   weights: Tensor | None, mean: bool, out: Tensor) -> bool:
        """Fused gather + bag sum/mean of a slot into ``out`` (``[B, width]``); False when no
        fused kernel serves this slot (the caller then gathers and reduces with torch)."""
        return self._blocks[name].bag_reduce(self.block_size, rows, inverse, offsets, weights,
                                             mean, out)

    def uses_numba(self, name: str) -> bool:
        """True when the slot's blocks are served by the numba kernels."""
        return self._blocks[name].uses_numba and self._num_blocks > 0

    def row_addresses(self, name: str, rows: Tensor):
        """Data addresses of rows of a slot (numba path; see :meth:`uses_numba`)."""
        spec = self.spec(name)
        itemsize = torch.empty(0, dtype=spec.dtype).element_size()
        return self._blocks[name].addresses(self.block_size, rows, spec.width * itemsize)

    def scatter(self, name: str, rows: Tensor, values: Tensor) -> None:
        """Write ``values`` (``[len(rows), *row_shape]`` or one row) into rows; rows < 0 skipped."""
        spec = self.spec(name)
        if rows.numel() == 0:
            return
        flat = values.detach().reshape(-1, spec.width).to(spec.dtype).contiguous()
        self._blocks[name].scatter(self.block_size, rows, flat)

    def reset_rows(self, rows: Tensor) -> None:
        """Give rows the defaults of every slot, as a fresh row would have."""
        if rows.numel() == 0:
            return
        for name, spec in self._specs.items():
            n = 1 if not hasattr(spec.default, "generate_rows") else rows.numel()
            self._blocks[name].scatter(self.block_size, rows, self._default_rows(spec, n))

    def value(self, name: str, num_rows: int | None = None) -> Tensor:
        """The first ``num_rows`` rows of a slot (all blocks if None), concatenated (a copy)."""
        spec = self.spec(name)
        tensors = self._blocks[name].tensors
        if not tensors:
            return torch.zeros(0, *spec.row_shape, dtype=spec.dtype, device=self.device)
        out = torch.cat(tensors).view(-1, *spec.row_shape)
        return out if num_rows is None else out[:num_rows]
