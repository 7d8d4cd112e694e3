"""HashTable: a growing embedding table keyed by raw int64 IDs.

The table is an :class:`~recis._core.id_map.IdMap` (ID -> row) over a
:class:`~recis._core.slots.SlotStore` (row -> named slots: ``"embedding"``, optimizer state,
policy metadata). Lookups are differentiable: the gradient of a lookup is summed per row and
kept in the table (:meth:`HashTable.grad`) for the sparse optimizers.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from recis._core import kernels
from recis._core.id_map import MAX_TAGS, IdMap
from recis._core.slots import SlotStore
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import ConstantInitializer, Initializer
from recis.nn.modules.hashtable_hook_impl import BaseAdmitHookImpl, HashtableHookFactory
from recis.utils.checks import check_positive_int

__all__ = [
    "HashTable",
    "Slice",
    "gen_slice",
    "is_hashtable",
    "filter_out_sparse_param",
    "split_sparse_dense_state_dict",
]

EMBEDDING_SLOT = "embedding"
_GRAD_REDUCE = ("worker", "id")


class Slice:
    """A range ``[slice_begin, slice_end)`` of the ``slice_size`` ID slices (``id mod size``)."""

    def __init__(self, slice_beg: int, slice_end: int, slice_size: int):
        if not 0 <= slice_beg < slice_end <= slice_size:
            raise ValueError(
                f"slice must satisfy 0 <= begin < end <= size, got ({slice_beg}, {slice_end}, "
                f"{slice_size})"
            )
        self.slice_begin, self.slice_end, self.slice_size = slice_beg, slice_end, slice_size

    def __repr__(self) -> str:
        return f"Slice({self.slice_begin}, {self.slice_end}, {self.slice_size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slice) and (
            (self.slice_begin, self.slice_end, self.slice_size)
            == (other.slice_begin, other.slice_end, other.slice_size)
        )


def gen_slice(shard_index: int = 0, shard_num: int = 1, slice_size: int = 65536) -> Slice:
    """Shard ``shard_index`` of ``shard_num`` contiguous ranges of ``[0, slice_size)``; the
    first ``slice_size % shard_num`` shards get one extra slice."""
    if not 0 <= shard_index < shard_num:
        raise ValueError(f"shard_index must be in [0, {shard_num}), got {shard_index}")
    base, extra = divmod(slice_size, shard_num)
    begin = shard_index * base + min(shard_index, extra)
    return Slice(begin, begin + base + (1 if shard_index < extra else 0), slice_size)


def is_hashtable(obj: Any) -> bool:
    """True for :class:`HashTable` objects (RecIS's ``hashtable_tag`` test)."""
    return hasattr(obj, "hashtable_tag")


def split_sparse_dense_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Move the table entries out of ``state_dict``: returns ``(sparse, dense)``.

    As in RecIS the input dict is modified in place and returned as ``dense``.
    """
    sparse = {k: v for k, v in state_dict.items() if v is not None and is_hashtable(v)}
    for k in sparse:
        del state_dict[k]
    return sparse, state_dict


def filter_out_sparse_param(model: nn.Module) -> dict[str, HashTable]:
    """The tables of a model, by table name (what sparse optimizers and savers consume)."""
    return split_sparse_dense_state_dict(model.state_dict())[0]


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def check_ids(ids: Any, device: torch.device, arg: str = "ids") -> Tensor:
    """Validate an ID tensor (integer dtype, on the table's device); returns flat int64 IDs."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor of int64 IDs, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{arg} must be an integer tensor (int64 IDs), got dtype={ids.dtype}")
    if ids.device.type != device.type:
        raise ValueError(
            f"{arg} are on {ids.device} but the table lives on {device}; "
            f"move them first with {arg}.to({str(device)!r})"
        )
    return ids.reshape(-1).to(torch.int64)


class Lookup(NamedTuple):
    """The rows behind one lookup: ``rows[inverse]`` are the rows of the looked-up IDs."""

    rows: Tensor  # (U,) int64, -1 for IDs that were not admitted
    inverse: Tensor  # (N,) int64 index into rows
    counts: Tensor | None  # (U,) occurrences of each unique ID when grad_reduce_by="id"
    all_valid: bool  # no row is -1
    records_grad: bool  # backward hands the gradient to the table


class _TableLookup(torch.autograd.Function):
    """Gathers the embedding rows of a lookup; backward hands the gradient to the table."""

    @staticmethod
    def forward(ctx, holder: Tensor, table: HashTable, lookup: Lookup):
        ctx.table, ctx.lookup = table, lookup
        return table._slots.gather(EMBEDDING_SLOT, lookup.rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.table._accept_lookup_grad(ctx.lookup, grad)
        return None, None, None


class HashTable(nn.Module):
    """An embedding table keyed by raw int64 IDs that grows as new IDs arrive.

    In training mode a lookup inserts unknown IDs (their rows start from the ``initializer``);
    in eval mode, for integer dtypes, or with ``AdmitHook("ReadOnly")`` it never inserts and
    unknown IDs read as zero rows that receive no gradient and no policy update.

    Args:
        embedding_shape (list[int]): shape of one row, e.g. ``[64]``.
        block_size (int, optional): rows per storage block; the table grows a block at a time.
            Default: 10240 (RecIS's 5 makes millions of tiny blocks).
        dtype (torch.dtype, optional): storage dtype. Default: ``torch.float32``.
        device (torch.device, optional): where rows live (``cpu`` or ``cuda``). Default: cpu.
        coalesced (bool, optional): the table serves several children (logical tables).
        children (list[str], optional): child names; IDs of different children never collide.
            Default: ``[name]``.
        slice (Slice, optional): the ID slices this shard owns. Default: all of them.
        initializer (Initializer, optional): draws new rows. Default: constant 0.
        name (str, optional): table name, also its key in ``state_dict``. Default: "hashtable".
        grad_reduce_by (str, optional): ``"worker"`` sums the gradient over occurrences of an ID
            (divided by the world size when distributed); ``"id"`` averages it.
        filter_hook (FilterHook, optional): eviction policy, e.g. ``GlobalStepFilter``.

    Shape:
        - Input: IDs of any shape ``(*)``, int64 (other integer dtypes are converted).
        - Output: ``(N, *embedding_shape)`` with ``N = ids.numel()``.

    Example::

        >>> ht = HashTable([4])
        >>> ht(torch.tensor([10, 2**62, 10])).shape
        torch.Size([3, 4])
        >>> len(ht)
        2
    """

    hashtable_tag = -1

    def __init__(
        self,
        embedding_shape: list[int],
        block_size: int = 10240,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        coalesced: bool = False,
        children: list[str] | None = None,
        slice: Slice | None = None,  # noqa: A002 - RecIS's argument name
        initializer: Initializer | None = None,
        name: str = "hashtable",
        grad_reduce_by: str = "worker",
        filter_hook: FilterHook | None = None,
    ):
        super().__init__()
        if isinstance(embedding_shape, int):
            embedding_shape = [embedding_shape]
        shape = list(embedding_shape) if embedding_shape is not None else []
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"embedding_shape must be a list of positive ints, got {shape!r}")
        check_positive_int(block_size, "block_size")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if grad_reduce_by not in _GRAD_REDUCE:
            raise ValueError(
                f"grad_reduce_by must be one of {_GRAD_REDUCE}, got {grad_reduce_by!r}"
            )
        children = list(children) if children else [name]
        if len(set(children)) != len(children):
            raise ValueError(f"children must be distinct, got {children}")
        if len(children) > 1 and not coalesced:
            raise ValueError(f"a table with several children must be coalesced, got {children}")
        if len(children) >= MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS - 1} children, got {len(children)}")
        if initializer is None:
            initializer = ConstantInitializer(0.0)
        if not hasattr(initializer, "generate_rows"):
            raise TypeError(f"initializer must be a recis Initializer, got {initializer!r}")
        if filter_hook is not None and not isinstance(filter_hook, FilterHook):
            raise TypeError(f"filter_hook must be a FilterHook, got {type(filter_hook).__name__}")

        self._name = name
        self._embedding_shape = tuple(shape)
        self._dtype = dtype
        self._device = device
        self._coalesced = coalesced
        self._children = children
        self._child_index = {c: i for i, c in enumerate(children)}
        self._slice = slice if slice is not None else Slice(0, 65536, 65536)
        self._initializer = initializer
        self._grad_reduce_by = grad_reduce_by
        self._worker_num = int(os.environ.get("WORLD_SIZE", 1))
        self._id_map = IdMap(device)
        self._slots = SlotStore(block_size, device)
        self._slots.add_slot(EMBEDDING_SLOT, self._embedding_shape, dtype, initializer)
        self._admit_impls: dict[str, BaseAdmitHookImpl] = {}
        self._grad_rows: list[Tensor] = []
        self._grad_values: list[Tensor] = []
        self._grad_unique = False
        # change tracking for incremental checkpoints: rows written since the last save, and
        # the (ids, child indices) removed since then
        self._dirty = torch.zeros(0, dtype=torch.bool, device=device)  # per storage row
        self._deleted_log: list[tuple[Tensor, Tensor]] = []
        self._backward_holder = torch.zeros(1, requires_grad=True)
        self._filter_hook = filter_hook
        if filter_hook is not None:
            self._filter_hook_impl = HashtableHookFactory.create_filter_hook(self, filter_hook)
            for slot in self._filter_hook_impl.slots():
                self.add_slot(*slot)
        else:
            self._filter_hook_impl = nn.Identity()
        self._register_state_dict_hook(_put_table_in_state_dict)
        self.register_load_state_dict_post_hook(_accept_table_key)

    # -- properties --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return self._embedding_shape

    @property
    def block_size(self) -> int:
        return self._slots.block_size

    @property
    def coalesce(self) -> bool:
        return self._coalesced

    @property
    def children_hashtable(self) -> list[str]:
        return list(self._children)

    @property
    def slice(self) -> Slice:
        return self._slice

    @property
    def grad_reduce_by(self) -> str:
        return self._grad_reduce_by

    @property
    def filter_hook(self) -> FilterHook | None:
        return self._filter_hook

    def initializer(self) -> Initializer:
        return self._initializer

    def child_index(self, child: str) -> int:
        try:
            return self._child_index[child]
        except KeyError:
            raise ValueError(f"unknown child {child!r}; children: {self._children}") from None

    def __len__(self) -> int:
        return len(self._id_map)

    def stats(self) -> dict[str, int]:
        """``{"live": IDs now, "admitted": IDs ever inserted, "removed": IDs ever removed}``
        (since construction, in this process)."""
        return {"live": len(self._id_map), "admitted": self._id_map.inserted_total,
                "removed": self._id_map.deleted_total}

    def memory_bytes(self) -> int:
        """Bytes held by the ID map and every slot's blocks."""
        return self._id_map.memory_bytes() + self._slots.memory_bytes()

    def extra_repr(self) -> str:
        s = f"name={self._name!r}, embedding_shape={list(self._embedding_shape)}"
        if self._dtype != torch.float32:
            s += f", dtype={self._dtype}"
        if self._device.type != "cpu":
            s += f", device={self._device}"
        if self._coalesced:
            s += f", children={self._children}"
        return s + f", rows={len(self)}"

    def __str__(self) -> str:
        return f"HashTable_{self._name}"

    # -- lookups -----------------------------------------------------------------------------
    def _tags(self, child: str | int | None, n: int) -> Tensor | None:
        if child is None:
            return None
        idx = child if isinstance(child, int) else self.child_index(child)
        if idx == 0:
            return None
        return torch.full((n,), idx, dtype=torch.int64, device=self._device)

    def _admit_impl(self, hook: AdmitHook) -> BaseAdmitHookImpl:
        key = str(hook)
        impl = self._admit_impls.get(key)
        if impl is None:
            impl = HashtableHookFactory.create_admit_hook(self, hook)
            self._admit_impls[key] = impl
        return impl

    @property
    def _writable(self) -> bool:
        return self.training and self._dtype.is_floating_point

    def resolve(
        self, ids: Tensor, tags: Tensor | None = None, admit_hook: AdmitHook | None = None
    ) -> Lookup:
        """Map IDs to rows: admit (training) or not (eval, read-only), stamp the filter.

        ``ids`` must be flat int64 (see :func:`check_ids`); ``tags`` optional child indices of
        the same length. The embeddings are read by :meth:`gather` or a fused combiner.
        """
        if admit_hook is not None and not isinstance(admit_hook, AdmitHook):
            raise TypeError(f"admit_hook must be an AdmitHook, got {type(admit_hook).__name__}")
        policy = self._admit_impl(admit_hook) if admit_hook is not None else None
        training = self._writable
        records_grad = training and torch.is_grad_enabled()
        with torch.no_grad():
            uniq, uniq_tags, inverse = kernels.unique_with_inverse(ids, tags)
            counts = None  # occurrences per unique ID, when a policy or the gradient needs them
            if (policy is not None and not policy.admits_nothing) or (
                records_grad and self._grad_reduce_by == "id"
            ):
                counts = torch.bincount(inverse, minlength=uniq.numel())
            if not training or (policy is not None and policy.admits_nothing):
                rows = self._id_map.lookup(uniq, uniq_tags)
            elif policy is None:
                rows = self._id_map.lookup_or_insert(uniq, uniq_tags, assume_unique=True)
            else:
                rows = self._id_map.lookup(uniq, uniq_tags)
                missing = (rows < 0).nonzero().squeeze(1)
                if missing.numel():
                    miss_tags = None if uniq_tags is None else uniq_tags[missing]
                    admitted = policy.admit(self, uniq[missing], miss_tags, counts[missing])
                    take = missing[admitted]
                    rows[take] = self._id_map.lookup_or_insert(
                        uniq[take], None if uniq_tags is None else uniq_tags[take],
                        assume_unique=True,
                    )
            self._ensure_rows()
            all_valid = training and policy is None
            if training:
                touched = rows if all_valid else rows[rows >= 0]
                self._filter_hook_impl(touched)
                self._mark_dirty(touched)
        if self._grad_reduce_by != "id":
            counts = None  # the gradient sums occurrences; only "id" divides by the counts
        return Lookup(rows, inverse, counts, all_valid, records_grad)

    def gather(self, lookup: Lookup) -> Tensor:
        """Embeddings of a lookup's unique rows ``(U, *embedding_shape)``, differentiable when
        the lookup records gradients (zeros for rows that were not admitted)."""
        if lookup.records_grad:
            return _TableLookup.apply(self._backward_holder, self, lookup)
        return self._slots.gather(EMBEDDING_SLOT, lookup.rows)

    def lookup_unique(
        self, ids: Tensor, tags: Tensor | None = None, admit_hook: AdmitHook | None = None
    ) -> tuple[Tensor, Tensor]:
        """Embeddings of the unique IDs and the inverse index: ``emb[inverse]`` is the lookup."""
        lookup = self.resolve(ids, tags, admit_hook)
        return self.gather(lookup), lookup.inverse

    def _accept_lookup_grad(self, lookup: Lookup, grad: Tensor) -> None:
        """Backward of a lookup: ``grad`` holds one row per unique ID of ``lookup``."""
        rows = lookup.rows
        if not lookup.all_valid:
            valid = rows >= 0
            rows, grad = rows[valid], grad[valid]
        if lookup.counts is not None:  # grad_reduce_by="id": mean over occurrences
            counts = lookup.counts if lookup.all_valid else lookup.counts[lookup.rows >= 0]
            grad = grad / counts.view((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype)
        else:  # "worker": sum over occurrences, divided by the number of workers
            world = _world_size()
            if world > 1:
                grad = grad / world
        self.accept_grad(rows, grad, _unique=True)

    def forward(self, ids: Tensor, admit_hook: AdmitHook | None = None) -> Tensor:
        """Rows of ``ids`` (any shape) as ``(ids.numel(), *embedding_shape)``."""
        flat = check_ids(ids, self._device)
        emb, inverse = self.lookup_unique(flat, None, admit_hook)
        return emb[inverse]

    # -- explicit writes ---------------------------------------------------------------------
    @torch.no_grad()
    def insert(self, ids: Tensor, embeddings: Tensor, child: str | None = None) -> None:
        """Store ``embeddings[i]`` as the row of ``ids[i]``, inserting unknown IDs.

        Only the embedding slot is written; other slots of existing rows are kept. Duplicate IDs
        are allowed and the last occurrence wins. Rows are stamped by the filter policy as if
        looked up now.
        """
        flat = check_ids(ids, self._device)
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a Tensor, got {type(embeddings).__name__}")
        expected = (flat.numel(), *self._embedding_shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"embeddings must have shape {list(expected)} (one row per ID), "
                f"got {list(embeddings.shape)}"
            )
        if embeddings.dtype != self._dtype:
            raise TypeError(
                f"embeddings must have the table dtype {self._dtype}, got {embeddings.dtype}"
            )
        if embeddings.device.type != self._device.type:
            raise ValueError(f"embeddings are on {embeddings.device}, table on {self._device}")
        tags = self._tags(child, flat.numel())
        uniq, uniq_tags, inverse = kernels.unique_with_inverse(flat, tags)
        last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=self._device)
        last.scatter_reduce_(0, inverse, torch.arange(flat.numel(), device=self._device), "amax")
        rows = self._id_map.lookup_or_insert(uniq, uniq_tags, assume_unique=True)
        self._ensure_rows()
        self._slots.scatter(EMBEDDING_SLOT, rows, embeddings[last])
        self._filter_hook_impl(rows)
        self._mark_dirty(rows)

    def _delete_keys(self, ids: Tensor, tags: Tensor | None) -> int:
        rows = self._id_map.delete(ids, tags)
        hit = rows >= 0
        freed = rows[hit]
        self._slots.reset_rows(freed)
        if freed.numel():
            kept_tags = tags[hit] if tags is not None else torch.zeros_like(freed)
            self._deleted_log.append((ids[hit].clone(), kept_tags.clone()))
            self._mark_dirty(freed)  # their slots were reset to defaults
        return freed.numel()

    @torch.no_grad()
    def delete(self, ids: Tensor, child: str | None = None) -> int:
        """Remove IDs (unknown ones are ignored); their rows are reset to every slot's default
        and reused by later inserts. Returns how many were removed."""
        flat = check_ids(ids, self._device)
        return self._delete_keys(flat, self._tags(child, flat.numel()))

    def clear(self) -> None:
        """Remove every ID and release all rows and blocks."""
        ids, tags, _ = self._id_map.items()
        if ids.numel():
            self._deleted_log.append((ids, tags))
        self._id_map.clear()
        self._slots.clear()
        self._dirty = self._dirty[:0]
        self.clear_grad()

    # -- change tracking and row export/import (checkpoints) --------------------------------
    def _ensure_rows(self, num_rows: int | None = None, initialize: bool = True) -> None:
        """Grow the slot store to hold the rows handed out; new blocks count as written."""
        before = self._slots.capacity
        self._slots.ensure_rows(self._id_map.row_high_water if num_rows is None else num_rows,
                                initialize)
        if self._slots.capacity > before:
            self._mark_dirty(torch.arange(before, self._slots.capacity, device=self._device))

    def _mark_dirty(self, rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        need = self._slots.capacity
        if self._dirty.numel() < need:
            grown = torch.zeros(need, dtype=torch.bool, device=self._device)
            grown[: self._dirty.numel()] = self._dirty
            self._dirty = grown
        self._dirty[rows] = True

    def changes(self) -> tuple[Tensor, Tensor, Tensor]:
        """What changed since :meth:`mark_saved`: ``(rows written, removed ids, their child
        indices)``. Rows written are storage rows, live or not: training lookups, inserts,
        slot writes, optimizer updates, rows reset by removals and newly allocated blocks."""
        written = self._dirty.nonzero().squeeze(1)
        if self._deleted_log:
            del_ids = torch.cat([d[0] for d in self._deleted_log])
            del_tags = torch.cat([d[1] for d in self._deleted_log])
        else:
            del_ids = del_tags = torch.zeros(0, dtype=torch.int64, device=self._device)
        return written, del_ids, del_tags

    def mark_saved(self) -> None:
        """Forget the recorded changes (called after a checkpoint captured the table)."""
        self._dirty.zero_()
        self._deleted_log.clear()

    def export_rows(self, child: int = 0, rows: Tensor | None = None,
                    snapshot: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """``{"id": ids, "row": rows, slot: values, ...}`` of one child's live rows (all, or
        those among ``rows``), ordered by row. ``snapshot``: a :meth:`snapshot` to reuse."""
        ids, tags, all_rows = snapshot if snapshot is not None else self._id_map.items()
        keep = tags == child
        if rows is not None:
            keep &= torch.isin(all_rows, rows)
        ids, sel = ids[keep], all_rows[keep]
        out = {"id": ids, "row": sel}
        for name in self._slots.slot_names:
            out[name] = self._slots.gather(name, sel)
        return out

    def export_unused(self, rows: Tensor | None = None,
                      snapshot: tuple[Tensor, Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """``{"row": rows, slot: values}`` of storage rows that hold no ID (free rows and the
        tail of the last block), all or those among ``rows``; with :meth:`layout` this is what
        an exact restore needs besides the live rows."""
        live = torch.zeros(self._slots.capacity, dtype=torch.bool, device=self._device)
        live[(snapshot if snapshot is not None else self._id_map.items())[2]] = True
        unused = (~live).nonzero().squeeze(1)
        if rows is not None:
            unused = unused[torch.isin(unused, rows)]
        out = {"row": unused}
        for name in self._slots.slot_names:
            out[name] = self._slots.gather(name, unused)
        return out

    def layout(self) -> dict[str, Tensor]:
        """Row allocator state: ``capacity``, ``next_row`` and the free rows (reuse order)."""
        m = self._id_map
        return {"capacity": torch.tensor([self._slots.capacity]),
                "next_row": torch.tensor([m.row_high_water]),
                "free": m._free[: m._n_free].clone().cpu()}

    @torch.no_grad()
    def restore_exact(self, ids: Tensor, tags: Tensor, rows: Tensor, capacity: int,
                      next_row: int, free: Tensor) -> None:
        """Rebuild the ID map with exactly these ``(id, child) -> row`` entries and allocator
        state (used by checkpoint loads that restore the layout bit for bit)."""
        self._id_map.restore(ids.to(self._device), tags.to(self._device),
                             rows.to(self._device), next_row, free.to(self._device))
        self._ensure_rows(capacity)

    @torch.no_grad()
    def import_rows(self, child: int, ids: Tensor, slots: dict[str, Tensor]) -> None:
        """Insert (or overwrite) rows of one child with the given slot values; slots not given
        keep their defaults for new rows."""
        if ids.numel() == 0:
            return
        tags = None if child == 0 else torch.full_like(ids, child)
        rows = self._id_map.lookup_or_insert(ids, tags)
        self._ensure_rows()
        for name, values in slots.items():
            self._slots.scatter(name, rows, values)
        self._mark_dirty(rows)

    # -- reading the contents ----------------------------------------------------------------
    def ids_map(self, child: str | None = None) -> tuple[Tensor, Tensor]:
        """``(ids, rows)`` of the live IDs (of one child, or all), ordered by row."""
        ids, tags, rows = self._id_map.items()
        if child is not None:
            keep = tags == self.child_index(child)
            ids, rows = ids[keep], rows[keep]
        return ids, rows

    def ids(self, child: str | None = None) -> Tensor:
        """The live IDs (of one child, or all), ordered by row."""
        return self.ids_map(child)[0]

    def embeddings(self, child: str | None = None) -> Tensor:
        """Rows of :meth:`ids`, in the same order: ``(len, *embedding_shape)``."""
        return self.slot_values(EMBEDDING_SLOT, self.ids_map(child)[1])

    def snapshot(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, child indices, rows)`` of every live entry, ordered by row."""
        return self._id_map.items()

    # -- slots -------------------------------------------------------------------------------
    def add_slot(self, name: str, row_shape, dtype: torch.dtype, default: Any = 0) -> None:
        """Add a per-row slot (existing rows get ``default``)."""
        self._slots.add_slot(name, row_shape, dtype, default)

    def has_slot(self, name: str) -> bool:
        return self._slots.has_slot(name)

    @property
    def slot_names(self) -> list[str]:
        return self._slots.slot_names

    def slot_values(self, name: str, rows: Tensor) -> Tensor:
        """Values of a slot at ``rows`` (zeros where ``rows < 0``)."""
        return self._slots.gather(name, rows)

    def set_slot_values(self, name: str, rows: Tensor, values: Tensor) -> None:
        """Write values of a slot at ``rows`` (rows < 0 are skipped)."""
        self._slots.scatter(name, rows, values)
        self._mark_dirty(rows[rows >= 0])

    def slot_blocks(self, name: str) -> list[Tensor]:
        """The blocks of a slot, writable views ``[block_size, *row_shape]``."""
        return self._slots.blocks(name)

    # -- gradients ---------------------------------------------------------------------------
    def accept_grad(self, grad_index: Tensor, grad: Tensor, _unique: bool = False) -> None:
        """Keep a gradient for rows ``grad_index`` (accumulated until :meth:`clear_grad`)."""
        if grad_index.dtype != torch.int64:
            raise TypeError(f"grad_index must be int64, got {grad_index.dtype}")
        if grad.shape[0] != grad_index.numel():
            raise ValueError(
                f"grad must have one row per index ({grad_index.numel()}), got {grad.shape[0]}"
            )
        self._grad_rows.append(grad_index.detach())
        self._grad_values.append(grad.detach().to(self._dtype))
        self._grad_unique = _unique and len(self._grad_rows) == 1

    def grad_rows(self, acc_steps: int = 1) -> tuple[Tensor, Tensor]:
        """The accumulated gradient as ``(unique rows, per-row sum / acc_steps)``.

        Rows are ascending, except for the gradient of a single lookup, which is returned as
        it came (its rows are already unique).
        """
        shape = self._embedding_shape
        if not self._grad_rows:
            return (
                torch.zeros(0, dtype=torch.int64, device=self._device),
                torch.zeros(0, *shape, dtype=self._dtype, device=self._device),
            )
        if self._grad_unique:
            values = self._grad_values[0]
            return self._grad_rows[0], values / acc_steps if acc_steps != 1 else values
        rows = torch.cat(self._grad_rows)
        values = torch.cat(self._grad_values)
        uniq, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(uniq.numel(), *shape, dtype=values.dtype, device=values.device)
        summed.index_add_(0, inverse, values)
        if acc_steps != 1:
            summed /= acc_steps
        return uniq, summed

    def grad(self, acc_steps: int = 1) -> Tensor:
        """The accumulated gradient as a coalesced sparse COO tensor whose indices are rows.

        Values are per-row sums divided by ``acc_steps``; size ``[capacity, *embedding_shape]``.
        """
        check_positive_int(acc_steps, "acc_steps")
        rows, values = self.grad_rows(acc_steps)
        rows, order = torch.sort(rows)
        values = values[order]
        size = (max(self._slots.capacity, 1), *self._embedding_shape)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, size, is_coalesced=True,
                                       check_invariants=False)

    def clear_grad(self) -> None:
        self._grad_rows.clear()
        self._grad_values.clear()
        self._grad_unique = False


def _put_table_in_state_dict(module: HashTable, state_dict: dict, prefix: str, local_metadata):
    # RecIS convention: the table itself appears under its bare name, for
    # filter_out_sparse_param and the checkpoint savers.
    state_dict[module._name] = module
    return state_dict


def _accept_table_key(module: HashTable, incompatible_keys) -> None:
    unexpected = incompatible_keys.unexpected_keys
    if module._name in unexpected:
        unexpected.remove(module._name)

