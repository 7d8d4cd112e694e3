"""HashTable: a growing embedding table keyed by raw int64 IDs.

The module holds a :class:`~recis._core.store.TableStore` (ID map + named per-row slots:
``"embedding"``, optimizer state, policy metadata) and makes lookups differentiable: the
gradient of a lookup is summed per row and kept in the table (:meth:`HashTable.grad`) for
the sparse optimizers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from recis._core.backends import MAX_TAGS
from recis._core.rwlock import CopyableLock
from recis._core.slots import SlotSpec
from recis._core.store import EMBEDDING as EMBEDDING_SLOT
from recis._core.store import TableStore
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import ConstantInitializer, Initializer
from recis.nn.modules.hashtable_hook_impl import (
    BaseAdmitHookImpl,
    FilterChain,
    HashtableHookFactory,
    filter_hooks,
    parse_bytes,
    policy_key,
)
from recis.utils.checks import check_device, check_positive_int

__all__ = [
    "HashTable",
    "Slice",
    "gen_slice",
    "slice_index",
    "in_slice",
    "is_hashtable",
    "filter_out_sparse_param",
    "split_sparse_dense_state_dict",
    "sum_stats",
]


def sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """:meth:`HashTable.stats` of several tables (or shards) added up: numbers summed, nested
    dicts (``rejected``, ``evicted``, ``bytes_by_slot``) summed key by key."""
    total: dict[str, Any] = {}
    for one in stats:
        for key, value in one.items():
            if isinstance(value, dict):
                into = total.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            elif isinstance(value, (int, float)):
                total[key] = total.get(key, 0) + value
    return total

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


def slice_index(ids: Tensor, slice_size: int = 65536) -> Tensor:
    """The slice of each ID: its value as an unsigned 64-bit number, mod ``slice_size``.

    One rule for every device, for negative IDs, for sharded lookups and for checkpoint loads
    (RecIS's CPU path used ``abs(fmod)`` for negative IDs and its GPU path ``uint64``: two
    owners for one ID).
    """
    if slice_size & (slice_size - 1) == 0:
        return ids & (slice_size - 1)  # two's complement: the uint64 residue
    low = torch.remainder(ids, slice_size)
    return torch.where(ids < 0, (low + (1 << 64) % slice_size) % slice_size, low)


def in_slice(ids: Tensor, s: Slice) -> Tensor:
    """Which IDs belong to slice ``s`` (see :func:`slice_index`)."""
    if s.slice_begin == 0 and s.slice_end == s.slice_size:
        return torch.ones_like(ids, dtype=torch.bool)
    low = slice_index(ids, s.slice_size)
    return (low >= s.slice_begin) & (low < s.slice_end)


def is_hashtable(obj: Any) -> bool:
    """True for :class:`HashTable` objects (RecIS's ``hashtable_tag`` test)."""
    return hasattr(obj, "hashtable_tag")


def split_sparse_dense_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Move the table entries out of ``state_dict``: returns ``(sparse, dense)``.

    As in RecIS the input dict is modified in place and returned as ``dense``. ``sparse`` is
    keyed by table name; a table's second entry (the key under its module path that
    ``load_state_dict`` reads, see :class:`HashTable`) is dropped.
    """
    tables = [(k, v) for k, v in state_dict.items() if v is not None and is_hashtable(v)]
    sparse = {}
    for k, v in tables:
        del state_dict[k]
        sparse.setdefault(getattr(v, "name", k), v)
    return sparse, state_dict


def filter_out_sparse_param(model: nn.Module) -> dict[str, HashTable]:
    """The tables of a model, by table name (what sparse optimizers and savers consume)."""
    return split_sparse_dense_state_dict(model.state_dict())[0]


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
        return table.store.read(EMBEDDING_SLOT, lookup.rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.table.accept_lookup_grad(ctx.lookup, grad)
        return None, None, None


class Slot:
    """One named per-row slot of a table, as RecIS's slot objects expose it (see
    :meth:`HashTable.slot_group`). A view: it reads the table's blocks when asked."""

    def __init__(self, store: TableStore, name: str):
        self._store, self._name = store, name

    def name(self) -> str:
        return self._name

    def block_size(self) -> int:
        """Rows per block."""
        return self._store.block_size

    def flat_size(self) -> int:
        """Elements per row (the product of the row shape)."""
        return self._store.slot_spec(self._name).width

    def values(self) -> list[Tensor]:
        """The blocks, ``[block_size, *row_shape]`` writable views."""
        return self._store.blocks(self._name)

    def value(self) -> Tensor:
        """The blocks concatenated: ``[capacity, *row_shape]`` (a copy; empty before the first
        block)."""
        blocks = self.values()
        if blocks:
            return torch.cat(blocks)
        spec = self._store.slot_spec(self._name)
        return torch.zeros((0, *spec.row_shape), dtype=spec.dtype, device=self._store.device)

    def __repr__(self) -> str:
        return f"Slot({self._name!r})"


class SlotGroup:
    """The slots of a table in declaration order (the embedding first), RecIS's
    ``slot_group()``."""

    def __init__(self, store: TableStore):
        self._store = store

    def slots(self) -> list[Slot]:
        return [Slot(self._store, name) for name in self._store.slot_names]

    def slot_by_name(self, name: str) -> Slot:
        if not self._store.has_slot(name):
            raise KeyError(f"no slot {name!r}; slots: {self._store.slot_names}")
        return Slot(self._store, name)

    def slot_by_index(self, index: int) -> Slot:
        names = self._store.slot_names
        if isinstance(index, bool) or not isinstance(index, int) or \
                not -len(names) <= index < len(names):
            raise IndexError(f"slot index must be an int in [0, {len(names)}), got {index!r}")
        return Slot(self._store, names[index])


class HashTable(nn.Module):
    """An embedding table keyed by raw int64 IDs that grows as new IDs arrive.

    In training mode a lookup inserts unknown IDs; in eval mode, for integer dtypes, or with
    ``AdmitHook("ReadOnly")`` it never inserts and unknown IDs read as zero rows that receive no
    gradient and no policy update. A new ID's row is ``initializer.rows_for_ids``: a pure
    function of the ID, the logical table's name and a seed (the initializer's generator's
    seed, or ``torch.initial_seed()`` when the table is built), so it is the same whatever the
    insertion order, the batch or the number of processes the table is sharded over.

    The module is a thin layer (autograd, RecIS's signature) over a
    :class:`~recis._core.store.TableStore`, :attr:`store`, which holds the rows and is what
    policies, optimizers and checkpoints use. A table is safe to use from several threads at
    once: lookups that insert, removals and row updates are serialised, read-only lookups and
    saves run concurrently (see :mod:`recis._core.store`).

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
            (a sharded lookup divides it by the world size); ``"id"`` averages it.
        filter_hook (FilterHook or list of FilterHook, optional): eviction policy, e.g.
            ``GlobalStepFilter``; a list applies its policies in order at each filter run
            (each sees the rows the previous ones left), each with its own slots and state.
        memory_budget (int or str, optional): bytes for this table (``"2GiB"``): a
            ``MemoryBudget`` filter (LFU order) is added after ``filter_hook``'s policies;
            for a hard cap at insert time use
            ``FilterHook("MemoryBudget", {"budget": ..., "cap_on_insert": True})`` instead.

    Shape:
        - Input: IDs of any shape ``(*)``, int64 (other integer dtypes are converted).
        - Output: ``(N, *embedding_shape)`` with ``N = ids.numel()``.

    ``.to(device)``, ``.cuda()``, ``.cpu()`` and ``.to(dtype)`` (floating dtypes) move or cast
    the rows with every slot; other targets (``meta``) raise. ``state_dict()`` holds the table
    itself twice: under its bare name (RecIS's convention, what
    :func:`filter_out_sparse_param` and the savers read) and under its module path + ``_table``
    (what ``load_state_dict`` reads): ``other.load_state_dict(model.state_dict())`` copies the
    rows, slots and policy state of each table into the table at the same path.

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
        filter_hook: FilterHook | list[FilterHook] | None = None,
        memory_budget: int | str | None = None,
    ):
        super().__init__()
        if isinstance(embedding_shape, int) and not isinstance(embedding_shape, bool):
            embedding_shape = [embedding_shape]
        shape = list(embedding_shape) if isinstance(embedding_shape, (list, tuple)) else None
        if not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(
                f"embedding_shape must be a list of positive ints, got {embedding_shape!r}")
        check_positive_int(block_size, "block_size")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        device = check_device(device)
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if grad_reduce_by not in _GRAD_REDUCE:
            raise ValueError(
                f"grad_reduce_by must be one of {_GRAD_REDUCE}, got {grad_reduce_by!r}"
            )
        children = list(children) if children else [name]
        if not all(isinstance(c, str) and c for c in children):
            raise TypeError(f"children must be non-empty strs, got {children!r}")
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
        hooks = filter_hooks(filter_hook)
        if memory_budget is not None:
            hooks.append(FilterHook("MemoryBudget", {
                "budget": parse_bytes(memory_budget, "memory_budget")}))
            filter_hook = hooks if len(hooks) > 1 else hooks[0]
        if slice is not None and not isinstance(slice, Slice):
            raise TypeError(f"slice must be a Slice, got {type(slice).__name__}")

        self._name = name
        self._embedding_shape = tuple(shape)
        self._coalesced = coalesced
        self._children = children
        self._child_index = {c: i for i, c in enumerate(children)}
        self._slice = slice if slice is not None else Slice(0, 65536, 65536)
        self._initializer = initializer
        self._grad_reduce_by = grad_reduce_by
        self._worker_num = int(os.environ.get("WORLD_SIZE", 1))
        seed = getattr(initializer, "seed", None)
        self.store = TableStore(SlotSpec(EMBEDDING_SLOT, self._embedding_shape, dtype,
                                         initializer), block_size, device, children=children,
                                seed=torch.initial_seed() if seed is None else seed)
        self._grad_rows: list[Tensor] = []
        self._grad_values: list[Tensor] = []
        self._grad_unique = False
        self._grad_lock = CopyableLock()  # threads may backward into one table at once
        # a lookup that records gradients happened since clear_grad: the sparse optimizers
        # count a step for the table even if no row of this shard got a gradient
        self.grad_pending = False
        self._deferred: list[Callable[[], None]] = []  # gradients still on the wire
        self._backward_holder = torch.zeros(1, requires_grad=True)
        self._filter_hook = list(filter_hook) if isinstance(filter_hook, tuple) else filter_hook
        impls = [HashtableHookFactory.create_filter_hook(self, hook) for hook in hooks]
        for hook, impl in zip(hooks, impls, strict=True):
            self.store.attach_policy(policy_key(hook, impl), impl)
        if isinstance(filter_hook, FilterHook):
            self._filter_hook_impl = impls[0]
        elif impls:  # a list: applied in its order
            self._filter_hook_impl = FilterChain(impls)
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
        return self.store.device

    @property
    def dtype(self) -> torch.dtype:
        return self.store.slot_spec(EMBEDDING_SLOT).dtype

    @property
    def embedding_shape(self) -> tuple[int, ...]:
        return self._embedding_shape

    @property
    def block_size(self) -> int:
        return self.store.block_size

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
    def filter_hook(self) -> FilterHook | list[FilterHook] | None:
        return self._filter_hook

    @property
    def grad_anchor(self) -> Tensor:
        """A tensor that requires grad, for autograd functions over this table's rows: their
        outputs come from kernels run without autograd, so they take it as an input to make
        backward reach them."""
        return self._backward_holder

    def initializer(self) -> Initializer:
        return self._initializer

    def child_index(self, child: str) -> int:
        try:
            return self._child_index[child]
        except KeyError:
            raise ValueError(f"unknown child {child!r}; children: {self._children}") from None

    def __len__(self) -> int:
        return len(self.store)

    def stats(self) -> dict[str, Any]:
        """The table's state now (``live``, ``capacity``, ``bytes``, ``bytes_by_slot``) and
        its counters since construction or :meth:`reset_stats` (``lookups``,
        ``ids_looked_up``, ``hits``, ``misses``, ``admitted``, ``rejected`` by admission
        policy, ``evicted`` by reason, ``removed``): see :meth:`TableStore.stats
        <recis._core.store.TableStore.stats>`. This process's shard only."""
        return self.store.stats()

    def reset_stats(self) -> None:
        """Start the counters of :meth:`stats` again from 0."""
        self.store.reset_stats()

    @property
    def label(self) -> str:
        """A readable name: the width and (up to 3 of) the logical tables, e.g.
        ``"dim 16 (c1, c2, c3, ...)"``."""
        kids = self.children_hashtable
        shown = ", ".join(kids[:3]) + (", ..." if len(kids) > 3 else "")
        return f"dim {self.embedding_shape[0]} ({shown})"

    def memory_bytes(self) -> int:
        """Bytes held by the ID map, every slot's blocks and the change tracking."""
        return self.store.memory_bytes()

    def extra_repr(self) -> str:
        s = f"name={self._name!r}, embedding_shape={list(self._embedding_shape)}"
        if self.dtype != torch.float32:
            s += f", dtype={self.dtype}"
        if self.device.type != "cpu":
            s += f", device={self.device}"
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
        return torch.full((n,), idx, dtype=torch.int64, device=self.device)

    def admit_policy(self, hook: AdmitHook) -> BaseAdmitHookImpl:
        """The table's admission policy for ``hook`` (created and attached on first use, so
        its state, e.g. MinCount's counts, lives and is saved with the table)."""
        if not isinstance(hook, AdmitHook):
            raise TypeError(f"admit_hook must be an AdmitHook, got {type(hook).__name__}")
        key = policy_key(hook)
        impl = self.store.policies().get(key)
        if impl is None:
            impl = HashtableHookFactory.create_admit_hook(self, hook)
            try:
                self.store.attach_policy(key, impl)
            except ValueError:  # attached by another thread meanwhile
                impl = self.store.policies()[key]
        return impl

    @property
    def _writable(self) -> bool:
        return self.training and self.dtype.is_floating_point

    def lookup_lock(self):
        """The lock a lookup and the reads of its rows hold together: exclusive when the
        lookup writes (training), shared otherwise."""
        return self.store.lock.write() if self._writable else self.store.lock.read()

    def resolve(
        self, ids: Tensor, tags: Tensor | None = None, admit_hook: AdmitHook | None = None,
        occurrences: Tensor | None = None,
    ) -> Lookup:
        """Map IDs to rows: admit (training) or not (eval, read-only), stamp the filter.

        ``ids`` must be flat int64 (see :func:`check_ids`); ``tags`` optional child indices of
        the same length; ``occurrences`` optional int counts per ID (a sharded lookup sends
        each ID once with its count; admission and ``grad_reduce_by="id"`` see the sums). The
        embeddings are read by :meth:`gather` or a fused combiner; hold :meth:`lookup_lock`
        around both so that no other thread moves rows in between.
        """
        if admit_hook is not None and not isinstance(admit_hook, AdmitHook):
            raise TypeError(f"admit_hook must be an AdmitHook, got {type(admit_hook).__name__}")
        training = self._writable
        # admission only matters when the lookup may insert (and attaching a new policy
        # needs the write lock, which a read-only lookup does not hold)
        policy = self.admit_policy(admit_hook) if admit_hook is not None and training else None
        records_grad = training and torch.is_grad_enabled()
        by_id = records_grad and self._grad_reduce_by == "id"
        with torch.no_grad():
            got = self.store.resolve(ids, tags, training=training, admit=policy, count=by_id,
                                     occurrences=occurrences)
        if records_grad:
            self.grad_pending = True
        return Lookup(got.rows, got.inverse, got.counts if by_id else None,
                      training and policy is None, records_grad)

    def gather(self, lookup: Lookup) -> Tensor:
        """Embeddings of a lookup's unique rows ``(U, *embedding_shape)``, differentiable when
        the lookup records gradients (zeros for rows that were not admitted)."""
        if lookup.records_grad:
            return _TableLookup.apply(self._backward_holder, self, lookup)
        return self.store.read(EMBEDDING_SLOT, lookup.rows)

    def lookup_unique(
        self, ids: Tensor, tags: Tensor | None = None, admit_hook: AdmitHook | None = None
    ) -> tuple[Tensor, Tensor]:
        """Embeddings of the unique IDs and the inverse index: ``emb[inverse]`` is the lookup."""
        with self.lookup_lock():
            lookup = self.resolve(ids, tags, admit_hook)
            return self.gather(lookup), lookup.inverse

    def accept_lookup_grad(self, lookup: Lookup, grad: Tensor, workers: int = 1) -> None:
        """Backward of a lookup: ``grad`` holds one row per unique ID of ``lookup``, summed
        over the ID's occurrences. ``grad_reduce_by="id"`` divides it by the occurrences (of
        all ranks, for a sharded lookup). A sharded lookup passes the world size as
        ``workers``, which divides it too: each worker's loss is a mean over its own batch,
        so the result is the gradient of the mean over all batches, as one process on the
        concatenated batch computes it (for either ``grad_reduce_by``)."""
        rows = lookup.rows
        if not lookup.all_valid:
            valid = rows >= 0
            rows, grad = rows[valid], grad[valid]
        if lookup.counts is not None:  # grad_reduce_by="id": mean over occurrences
            counts = lookup.counts if lookup.all_valid else lookup.counts[lookup.rows >= 0]
            grad = grad / counts.view((-1,) + (1,) * (grad.dim() - 1)).to(grad.dtype)
        if workers > 1:
            grad = grad / workers
        self.accept_grad(rows, grad, _unique=True)

    def forward(self, ids: Tensor, admit_hook: AdmitHook | None = None) -> Tensor:
        """Rows of ``ids`` (any shape) as ``(ids.numel(), *embedding_shape)``."""
        flat = check_ids(ids, self.device)
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
        flat = check_ids(ids, self.device)
        if not isinstance(embeddings, Tensor):
            raise TypeError(f"embeddings must be a Tensor, got {type(embeddings).__name__}")
        expected = (flat.numel(), *self._embedding_shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(
                f"embeddings must have shape {list(expected)} (one row per ID), "
                f"got {list(embeddings.shape)}"
            )
        if embeddings.dtype != self.dtype:
            raise TypeError(
                f"embeddings must have the table dtype {self.dtype}, got {embeddings.dtype}"
            )
        if embeddings.device.type != self.device.type:
            raise ValueError(f"embeddings are on {embeddings.device}, table on {self.device}")
        tags = self._tags(child, flat.numel())
        store = self.store
        with store.lock.write():
            uniq, uniq_tags, inverse = store.backend.unique_with_inverse(flat, tags)
            last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=self.device)
            last.scatter_reduce_(0, inverse, torch.arange(flat.numel(), device=self.device),
                                 "amax")
            rows = store.lookup_or_insert(uniq, uniq_tags)
            store.write(EMBEDDING_SLOT, rows, embeddings[last])
            store.touch(rows)

    @torch.no_grad()
    def delete(self, ids: Tensor, child: str | None = None) -> int:
        """Remove IDs (unknown ones are ignored); their rows are reset to every slot's default
        and reused by later inserts. Returns how many were removed."""
        flat = check_ids(ids, self.device)
        return self.store.remove(flat, self._tags(child, flat.numel()))

    def clear(self) -> None:
        """Remove every ID and release all rows and blocks."""
        self.store.clear()
        self.clear_grad()

    # -- reading the contents ----------------------------------------------------------------
    def ids_map(self, child: str | None = None) -> tuple[Tensor, Tensor]:
        """``(ids, rows)`` of the live IDs (of one child, or all), ordered by row."""
        ids, tags, rows = self.store.items()
        if child is not None:
            keep = tags == self.child_index(child)
            ids, rows = ids[keep], rows[keep]
        return ids, rows

    def ids(self, child: str | None = None) -> Tensor:
        """The live IDs (of one child, or all), ordered by row."""
        return self.ids_map(child)[0]

    def embeddings(self, child: str | None = None) -> Tensor:
        """Rows of :meth:`ids`, in the same order: ``(len, *embedding_shape)``."""
        with self.store.lock.read():
            return self.slot_values(EMBEDDING_SLOT, self.ids_map(child)[1])

    def snapshot(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, child indices, rows)`` of every live entry, ordered by row."""
        return self.store.items()

    # -- slots -------------------------------------------------------------------------------
    def add_slot(self, name: str, row_shape, dtype: torch.dtype, default: Any = 0) -> None:
        """Add a per-row slot (existing rows get ``default``)."""
        self.store.declare_slot(SlotSpec(name, tuple(row_shape), dtype, default))

    def has_slot(self, name: str) -> bool:
        return self.store.has_slot(name)

    @property
    def slot_names(self) -> list[str]:
        return self.store.slot_names

    def slot_values(self, name: str, rows: Tensor) -> Tensor:
        """Values of a slot at ``rows`` (zeros where ``rows == -1``)."""
        return self.store.read(name, rows)

    def set_slot_values(self, name: str, rows: Tensor, values: Tensor) -> None:
        """Write values of a slot at ``rows`` (rows equal to -1 are skipped)."""
        self.store.write(name, rows, values)

    def slot_blocks(self, name: str) -> list[Tensor]:
        """The blocks of a slot, writable views ``[block_size, *row_shape]``."""
        return self.store.blocks(name)

    def slot_group(self) -> SlotGroup:
        """RecIS's view of the table's slots: ``slot_by_name(name)``, ``slot_by_index(i)``,
        ``slots()``; each slot gives ``name()``, ``block_size()``, ``flat_size()``,
        ``value()`` (its blocks concatenated: ``capacity`` rows, free ones included) and
        ``values()`` (the blocks, writable views).

        Example::

            >>> ht = HashTable([4])
            >>> _ = ht(torch.tensor([7]))
            >>> ht.slot_group().slot_by_name("embedding").value().shape
            torch.Size([10240, 4])
        """
        return SlotGroup(self.store)

    # -- gradients ---------------------------------------------------------------------------
    def accept_grad(self, grad_index: Tensor, grad: Tensor, _unique: bool = False) -> None:
        """Keep a gradient for rows ``grad_index`` (accumulated until :meth:`clear_grad`)."""
        if not isinstance(grad_index, Tensor) or grad_index.dtype != torch.int64:
            raise TypeError(f"grad_index must be an int64 Tensor, got {grad_index!r:.60}")
        if not isinstance(grad, Tensor) or grad.shape[:1] != (grad_index.numel(),):
            raise ValueError(
                f"grad must have one row per index ({grad_index.numel()}), got "
                f"{tuple(getattr(grad, 'shape', ()))}"
            )
        with self._grad_lock:
            self._grad_rows.append(grad_index.detach())
            self._grad_values.append(grad.detach().to(self.dtype))
            self._grad_unique = _unique and len(self._grad_rows) == 1

    def defer_grad(self, finish: Callable[[], None]) -> None:
        """Register ``finish``, which hands this table gradients that are still arriving (a
        sharded backward's exchange runs beside the rest of the backward); the first reader
        of the gradient (:meth:`grad_rows`, :meth:`grad`, :meth:`clear_grad`) runs it."""
        self._deferred.append(finish)

    def _take_deferred(self) -> None:
        while self._deferred:
            self._deferred.pop(0)()

    def grad_rows(self, acc_steps: int = 1) -> tuple[Tensor, Tensor]:
        """The accumulated gradient as ``(unique rows, per-row sum / acc_steps)``.

        Rows are ascending, except for the gradient of a single lookup, which is returned as
        it came (its rows are already unique).
        """
        self._take_deferred()
        shape = self._embedding_shape
        with self._grad_lock:  # a consistent snapshot while other threads may add
            grad_rows, grad_values = list(self._grad_rows), list(self._grad_values)
            unique = self._grad_unique
        if not grad_rows:
            return (
                torch.zeros(0, dtype=torch.int64, device=self.device),
                torch.zeros(0, *shape, dtype=self.dtype, device=self.device),
            )
        if unique:
            values = grad_values[0]
            return grad_rows[0], values / acc_steps if acc_steps != 1 else values
        rows = torch.cat(grad_rows)
        values = torch.cat(grad_values)
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
        size = (max(self.store.capacity, 1), *self._embedding_shape)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, size, is_coalesced=True,
                                       check_invariants=False)

    def clear_grad(self) -> None:
        self._take_deferred()
        with self._grad_lock:
            self._grad_rows.clear()
            self._grad_values.clear()
            self._grad_unique = False
        self.grad_pending = False

    # -- module semantics --------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.cpu()``, ``.double()``, ...: move or cast the rows too."""
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        try:
            moved = fn(probe)
        except (AssertionError, RuntimeError) as e:
            raise RuntimeError(f"cannot move table {self._name!r}: {e}") from e
        if isinstance(moved, Tensor) and (moved.device, moved.dtype) != (probe.device,
                                                                         probe.dtype):
            device = check_device(moved.device, f"the new device of table {self._name!r}")
            dtype = moved.dtype if moved.dtype != probe.dtype else None
            self.store.to(device, dtype)
            self._grad_values = [g.to(device, self.dtype) for g in self._grad_values]
            self._grad_rows = [r.to(device) for r in self._grad_rows]
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + _TABLE_KEY
        other = state_dict.get(key)
        if isinstance(other, HashTable) and other is not self:
            problems = [f"{what}: {a} vs {b}" for what, a, b in (
                ("embedding_shape", other.embedding_shape, self.embedding_shape),
                ("children", other.children_hashtable, self.children_hashtable))
                if a != b]
            if problems:
                error_msgs.append(f"table {self._name!r} cannot take the rows of table "
                                  f"{other.name!r}: " + "; ".join(problems))
            else:
                self.store.copy_from(other.store)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def __setstate__(self, state):
        super().__setstate__(state)
        impl = self.__dict__.get("_modules", {}).get("_filter_hook_impl")
        if impl is not None and hasattr(impl, "bind"):  # a copy serves the copied table
            impl.bind(self)


_TABLE_KEY = "_table"  # the table's entry under its own module path


def _put_table_in_state_dict(module: HashTable, state_dict: dict, prefix: str, local_metadata):
    # RecIS convention: the table itself appears under its bare name, for
    # filter_out_sparse_param and the checkpoint savers; load_state_dict only shows a module
    # the keys under its path, so the table is there too.
    state_dict[module._name] = module
    state_dict[prefix + _TABLE_KEY] = module
    return state_dict


def _accept_table_key(module: HashTable, incompatible_keys) -> None:
    unexpected = incompatible_keys.unexpected_keys
    if module._name in unexpected:
        unexpected.remove(module._name)

