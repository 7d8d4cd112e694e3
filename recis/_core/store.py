"""TableStore: the rows of one table behind a small contract.

``HashTable`` (the ``nn.Module``), the admission and eviction policies, the sparse optimizers,
the checkpoints and the sharding layer all use a table through these verbs and nothing else:

================================  ==========================================================
resolve IDs to rows               :meth:`resolve` (dedup, admission, insert, touch),
                                  :meth:`lookup`, :meth:`lookup_or_insert`
read / write rows of a slot       :meth:`read`, :meth:`write`, :meth:`block_list` (kernels)
declare a slot                    :meth:`declare_slot` (a :class:`~recis._core.slots.SlotSpec`)
remove IDs                        :meth:`remove`, :meth:`clear`
iterate ``(ids, tags, rows)``     :meth:`items`, :meth:`iter_items` (chunks, by row)
mark rows written                 :meth:`mark_written`, :meth:`changes`, :meth:`mark_saved`
policies and their state          :meth:`attach_policy`, :meth:`policies`,
                                  :meth:`policy_states`, :meth:`load_policy_states`
exact restore                     :meth:`layout`, :meth:`restoring`
================================  ==========================================================

Threads: every verb takes the table's :class:`~recis._core.rwlock.RWLock` (:attr:`lock`):
lookups, reads and saves share it, mutations (inserts, touches, writes, removals, growth)
take it alone. Callers that need several verbs to see one state (a lookup and the gather of
its rows, a whole save) hold ``lock.read()`` or ``lock.write()`` around them; the lock is
re-entrant.

Keys are ``(id, tag)``: ``tag`` is the child (logical table) index of a coalesced table, 0
otherwise; ``tags=None`` means all 0. Rows are handed out deterministically: the new keys of a
call, in first-occurrence order, take the smallest freed rows first, then fresh rows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import Backend, backend_for, check_rows
from .counter_rng import mix_seed
from .id_map import IdMap
from .policy import TablePolicy
from .rwlock import RWLock
from .slots import SlotSpec, SlotStore

__all__ = ["TableStore", "Resolved", "Changes", "EMBEDDING"]

EMBEDDING = "embedding"


def _signed64(value: int) -> int:
    """An integer seed (``torch.initial_seed()`` is unsigned) as a signed 64-bit int."""
    value = int(value) & ((1 << 64) - 1)
    return value - (1 << 64) if value >= 1 << 63 else value


class Resolved(NamedTuple):
    """The rows behind a batch of IDs: ``rows[inverse]`` are the rows of the IDs."""

    rows: Tensor  # (U,) int64 per unique key, -1 where not admitted / absent
    inverse: Tensor  # (N,) int64 index into rows
    counts: Tensor | None  # (U,) occurrences of each unique key (when asked for)


class Changes(NamedTuple):
    """What changed since the last :meth:`TableStore.mark_saved`."""

    rows: Tensor  # storage rows written (live or not), ascending
    removed_ids: Tensor  # IDs removed, with their tags
    removed_tags: Tensor
    complete: bool  # False: the removal log overflowed; only a full save captures the table


@dataclass
class _RemovalLog:
    """IDs removed since the last save, for incremental checkpoints. Bounded: past
    ``max(MIN_BOUND, live IDs)`` entries it is dropped and marked incomplete, and the next
    save must be a full one."""

    MIN_BOUND = 1 << 16
    parts: list
    count: int = 0
    complete: bool = True

    def add(self, ids: Tensor, tags: Tensor, live: int) -> None:
        if not self.complete or ids.numel() == 0:
            return
        self.count += ids.numel()
        if self.count > max(self.MIN_BOUND, live):
            self.parts.clear()
            self.count, self.complete = 0, False
        else:
            self.parts.append((ids.clone(), tags.clone()))

    def reset(self) -> None:
        self.parts.clear()
        self.count, self.complete = 0, True

    def memory_bytes(self) -> int:
        return 16 * self.count


class _Counters:
    """The resettable statistics of one table (see :meth:`TableStore.stats`).

    Updated inside the store's locked sections with Python ints that the lookup computes
    anyway, or with 0-d tensors (misses of read-only lookups) that are only summed on the
    device and turned into ints when read, so counting adds no host sync to a lookup. Its own
    small lock makes the adds of concurrent readers (which share the table lock) exact."""

    INT_KEYS = ("lookups", "ids_looked_up", "misses", "admitted")

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.values: dict[str, object] = dict.fromkeys(self.INT_KEYS, 0)
            self.rejected: dict[str, object] = {}
            self.evicted: dict[str, int] = {}

    def admit(self, count: int) -> None:
        with self._lock:
            self.values["admitted"] += count

    def lookup(self, unique: int, misses, rejected_by: str | None = None, rejected=0) -> None:
        """One lookup of ``unique`` IDs, ``misses`` of them absent (an int or a 0-d tensor),
        ``rejected`` of those refused by ``rejected_by``."""
        with self._lock:
            v = self.values
            v["lookups"] += 1
            v["ids_looked_up"] += unique
            v["misses"] = v["misses"] + misses
            if rejected_by is not None:
                self.rejected[rejected_by] = self.rejected.get(rejected_by, 0) + rejected

    def evict(self, reason: str, count: int) -> None:
        if count:
            with self._lock:
                self.evicted[reason] = self.evicted.get(reason, 0) + int(count)

    def snapshot(self) -> dict:
        with self._lock:
            self.values = {k: int(v) for k, v in self.values.items()}
            self.rejected = {k: int(v) for k, v in self.rejected.items()}
            return {**self.values, "rejected": dict(self.rejected),
                    "evicted": dict(self.evicted)}

    def __getstate__(self) -> dict:
        state = self.snapshot()
        return {"values": {k: state[k] for k in self.INT_KEYS}, "rejected": state["rejected"],
                "evicted": state["evicted"]}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.values, self.rejected, self.evicted = (dict(state["values"]),
                                                    dict(state["rejected"]),
                                                    dict(state["evicted"]))


#: The reason :meth:`TableStore.stats` gives removals by a user (``HashTable.delete``).
USER_REMOVAL = "user"
#: The name under which lookups that may not insert (eval, a read-only table) count the
#: unknown IDs they met as rejected.
READ_ONLY_LOOKUP = "read_only"


class TableStore:
    """ID map + slot blocks + change tracking + policies of one table.

    Args:
        embedding (SlotSpec): the embedding slot (name ``"embedding"``; its default is the
            initializer).
        block_size (int): rows per block.
        device (torch.device): where the rows live.
        backend (Backend, optional): the kernels. Default: :func:`backend_for` the device.
        children (list[str]): the logical tables (tags 0, 1, ...): their names key the initial
            values. Default: ``["table"]``.
        seed (int): mixed into the keys of initial values: a new row of a slot with an
            initializer default is ``default.rows_for_ids(id, key(seed, child, slot))``, so the
            same ID gets the same row in every process and every shard. Default: 0.

    Example::

        >>> store = TableStore(SlotSpec("embedding", (4,), torch.float32), 1024, "cpu")
        >>> got = store.resolve(torch.tensor([7, 9, 7]), training=True)
        >>> got.rows[got.inverse]
        tensor([0, 1, 0])
        >>> store.read("embedding", got.rows).shape
        torch.Size([2, 4])
    """

    def __init__(self, embedding: SlotSpec, block_size: int, device: torch.device | str,
                 backend: Backend | None = None, children: Sequence[str] = ("table",),
                 seed: int = 0):
        self.lock = RWLock()
        self._children = list(children)
        self._seed = _signed64(seed)
        self._keys: dict[str, Tensor] = {}  # keyed slot -> one init key per child
        self._device = torch.device(device)
        self._backend = backend if backend is not None else backend_for(self._device)
        self._map = IdMap(self._device, backend=self._backend)
        self._slots = SlotStore(block_size, self._device, self._backend)
        self._slots.add_slot(embedding)
        self._written = torch.zeros(0, dtype=torch.bool, device=self._device)  # per row
        self._removed = _RemovalLog([])
        self._policies: dict[str, TablePolicy] = {}
        self._counters = _Counters()
        self._last_inserted = 0  # IDs the last _insert inserted

    # -- description ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def block_size(self) -> int:
        return self._slots.block_size

    @property
    def capacity(self) -> int:
        """Rows allocated (a multiple of the block size)."""
        return self._slots.capacity

    def __len__(self) -> int:
        return len(self._map)

    def stats(self) -> dict[str, object]:
        """What the table holds now and what happened to it since construction or the last
        :meth:`reset_stats` (this process, this shard):

        * ``live`` IDs, ``capacity`` rows, ``bytes`` (= :meth:`memory_bytes`) and
          ``bytes_by_slot`` (slot name -> bytes, plus ``"id_map"`` and ``"tracking"``; the
          values sum to ``bytes``): the state now, not reset.
        * ``lookups``: :meth:`resolve` calls (training and eval); ``ids_looked_up``: unique
          IDs they resolved, ``hits`` of them were present, ``misses`` absent.
        * ``admitted``: IDs inserted (by lookups and inserts); ``rejected``: admission policy
          name -> unknown IDs it refused (``"read_only"``: unknown IDs of lookups that may not
          insert, e.g. in eval); ``evicted``: reason -> IDs removed (a filter policy's
          registered name, ``"user"`` for :meth:`remove` by the user, ``"clear"``);
          ``removed``: the sum of ``evicted``.
        """
        counters = self._counters.snapshot()
        by_slot = self._bytes_by_slot()
        counters["hits"] = counters["ids_looked_up"] - counters["misses"]
        return {"live": len(self._map), "capacity": self.capacity,
                "bytes": sum(by_slot.values()), "bytes_by_slot": by_slot,
                "lookups": counters["lookups"], "ids_looked_up": counters["ids_looked_up"],
                "hits": counters["hits"], "misses": counters["misses"],
                "admitted": counters["admitted"], "rejected": counters["rejected"],
                "evicted": counters["evicted"], "removed": sum(counters["evicted"].values())}

    def reset_stats(self) -> None:
        """Start the counters of :meth:`stats` again from 0 (not the live state)."""
        self._counters.reset()

    def _bytes_by_slot(self) -> dict[str, int]:
        out = {name: self.capacity * width for name, width in self._slots.bytes_per_row().items()}
        out["id_map"] = self._map.memory_bytes()
        out["tracking"] = self._written.numel() + self._removed.memory_bytes()
        return out

    def memory_bytes(self) -> int:
        """Bytes of the ID map, every slot's blocks and the change tracking."""
        return (self._map.memory_bytes() + self._slots.memory_bytes() + self._written.numel()
                + self._removed.memory_bytes())

    # -- slots ---------------------------------------------------------------------------------
    def declare_slot(self, spec: SlotSpec) -> None:
        """Add a per-row slot; rows that exist get its default."""
        if not isinstance(spec, SlotSpec):
            raise TypeError(f"spec must be a SlotSpec, got {type(spec).__name__}")
        with self.lock.write():
            self._slots.add_slot(spec)
            if spec.keyed and len(self._map):  # rows that exist get values from their IDs
                ids, tags, rows = self._map.items()
                self._slots.initialize(rows, ids, {spec.name: self._slot_keys(spec.name, tags)})

    @property
    def seed(self) -> int:
        """The seed of the initial values' keys (see the class docstring)."""
        return self._seed

    def reseed(self, seed: int) -> None:
        """Key the initial values of IDs inserted from now on with ``seed`` (a checkpoint
        load gives a table the seed it was saved with)."""
        with self.lock.write():
            self._seed = _signed64(seed)
            self._keys.clear()

    def _slot_keys(self, slot: str, tags: Tensor | None) -> Tensor:
        keys = self._keys.get(slot)
        if keys is None:
            keys = torch.tensor([mix_seed(self._seed, child, slot) for child in self._children],
                                dtype=torch.int64, device=self._device)
            self._keys[slot] = keys
        return keys[0] if tags is None else keys[tags]

    def _insert(self, ids: Tensor, tags: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """Rows of unique keys, inserting the absent ones (``rows``: their rows, -1 where
        absent, when already looked up); new rows of keyed slots get their initial values."""
        before = self._map.inserted_total
        if rows is None:
            rows, inserted = self._map.lookup_or_insert(ids, tags, assume_unique=True,
                                                        return_inserted=True)
        else:
            inserted = self._map.insert_missing(ids, tags, rows)
        self._last_inserted = self._map.inserted_total - before
        self._counters.admit(self._last_inserted)
        self._grow()
        keyed = self._slots.keyed_slots()
        if keyed and bool(inserted.any()):
            new_tags = None if tags is None else tags[inserted]
            self._slots.initialize(rows[inserted], ids[inserted],
                                   {s: self._slot_keys(s, new_tags) for s in keyed})
        return rows

    def has_slot(self, name: str) -> bool:
        return self._slots.has_slot(name)

    def slot_spec(self, name: str) -> SlotSpec:
        return self._slots.spec(name)

    @property
    def slot_names(self) -> list[str]:
        return self._slots.slot_names

    def slot_specs(self) -> list[SlotSpec]:
        return [self._slots.spec(n) for n in self._slots.slot_names]

    def block_list(self, name: str):
        """The blocks of a slot (for kernels; hold the lock while they run)."""
        return self._slots.block_list(name)

    def blocks(self, name: str) -> list[Tensor]:
        """The blocks of a slot, ``[block_size, *row_shape]`` views (writable)."""
        return self._slots.blocks(name)

    def read(self, name: str, rows: Tensor) -> Tensor:
        """Values of slot ``name`` at ``rows`` as ``[len(rows), *row_shape]`` (zeros for -1)."""
        with self.lock.read():
            return self._slots.gather(name, rows)

    def write(self, name: str, rows: Tensor, values: Tensor) -> None:
        """Write ``values`` (one row per index, or one row for all) into slot ``name`` at
        ``rows`` (-1 skipped); the rows count as written for incremental checkpoints."""
        with self.lock.write():
            self._slots.scatter(name, rows, values)
            self._mark_written(rows[rows >= 0])

    def mark_written(self, rows: Tensor) -> None:
        """Record that ``rows`` changed (e.g. after a kernel wrote them in place)."""
        check_rows(rows, self.capacity)
        with self.lock.write():
            self._mark_written(rows[rows >= 0])

    # -- IDs -> rows ---------------------------------------------------------------------------
    def lookup(self, ids: Tensor, tags: Tensor | None = None) -> Tensor:
        """Row of each key, -1 where absent. Writes nothing."""
        with self.lock.read():
            return self._map.lookup(ids, tags)

    def lookup_or_insert(self, ids: Tensor, tags: Tensor | None = None) -> Tensor:
        """Row of each key, inserting absent keys (their rows hold every slot's default)."""
        with self.lock.write():
            uniq, uniq_tags, inverse = self._backend.unique_with_inverse(ids, tags)
            if not self._capping():
                return self._insert(uniq, uniq_tags)[inverse]
            rows = self._map.lookup(uniq, uniq_tags)
            self._make_room(rows)
            return self._insert(uniq, uniq_tags, rows)[inverse]

    def resolve(self, ids: Tensor, tags: Tensor | None = None, *, training: bool,
                admit: TablePolicy | None = None, count: bool = False,
                occurrences: Tensor | None = None) -> Resolved:
        """Rows of a batch of keys, deduplicated.

        With ``training`` unknown keys are inserted (if ``admit`` is None) or offered to
        ``admit.admit(store, ids, tags, counts)``, which returns the mask of keys to insert;
        the valid rows are then touched (policies' :meth:`~TablePolicy.on_touch`) and marked
        written. Without ``training`` nothing is written and unknown keys get -1.
        ``count``: also return the occurrences of each unique key (``occurrences``: a count
        per key of ``ids``, summed, instead of one per key).
        """
        with self.lock.write() if training else self.lock.read():
            uniq, uniq_tags, inverse, found = self._map.resolve(ids, tags)
            admitting = training and admit is not None and not getattr(
                admit, "admits_nothing", False)
            counts = None
            if count or admitting:
                counts = (torch.bincount(inverse, minlength=uniq.numel()) if occurrences is None
                          else torch.zeros(uniq.numel(), dtype=torch.int64, device=self._device)
                          .index_add_(0, inverse, occurrences.to(torch.int64)))
            if not training or (admit is not None and not admitting):
                rows = found
                misses = (found < 0).sum()  # stays on the device until stats() reads it
                self._counters.lookup(uniq.numel(), misses, rejected_by=(
                    _policy_name(admit) if training else READ_ONLY_LOOKUP), rejected=misses)
            elif admit is None:
                self._make_room(found)
                rows = self._insert(uniq, uniq_tags, found)
                self._counters.lookup(uniq.numel(), self._last_inserted)
            else:
                rows = found
                missing = (rows < 0).nonzero().squeeze(1)
                admitted = 0
                if missing.numel():
                    miss_tags = None if uniq_tags is None else uniq_tags[missing]
                    take = missing[admit.admit(self, uniq[missing], miss_tags, counts[missing])]
                    self._make_room(rows, take.numel())
                    rows[take] = self._insert(
                        uniq[take], None if uniq_tags is None else uniq_tags[take])
                    admitted = self._last_inserted
                self._counters.lookup(uniq.numel(), missing.numel(),
                                      rejected_by=_policy_name(admit),
                                      rejected=missing.numel() - admitted)
            if training:
                self._touch(rows if admit is None else rows[rows >= 0])
            return Resolved(rows, inverse, counts)

    def _make_room(self, rows: Tensor, new: int | None = None) -> None:
        """Before inserting ``new`` keys (default: the -1 entries of ``rows``, a batch's rows)
        let the policies make room, keeping the batch's valid rows."""
        capping = self._capping()
        if not capping:
            return
        if new is None:
            new = int((rows < 0).sum())
        if new:
            keep = rows[rows >= 0]
            for policy in capping:
                policy.make_room(self, new, keep)

    def _capping(self) -> list[TablePolicy]:
        """The attached policies that cap inserts (:attr:`~TablePolicy.caps_inserts`; a table
        without them pays nothing before inserts)."""
        return [p for p in self._policies.values() if p.caps_inserts]

    def touch(self, rows: Tensor) -> None:
        """Let the policies see ``rows`` (unique, valid) as used now, and mark them written."""
        check_rows(rows, self.capacity)
        with self.lock.write():
            self._touch(rows[rows >= 0])

    def _touch(self, rows: Tensor) -> None:
        for policy in self._policies.values():
            policy.on_touch(self, rows)
        self._mark_written(rows)

    def remove(self, ids: Tensor, tags: Tensor | None = None, *,
               reason: str = USER_REMOVAL) -> int:
        """Remove keys (unknown ones are ignored); their rows get every slot's default and
        are reused, smallest first, by later inserts. Returns how many were removed.
        ``reason``: what :meth:`stats` counts them as evicted by (a filter policy passes its
        registered name)."""
        with self.lock.write():
            rows = self._map.delete(ids, tags)
            hit = rows >= 0
            freed = rows[hit]
            if freed.numel():
                self._slots.reset_rows(freed)
                kept_tags = tags[hit] if tags is not None else torch.zeros_like(freed)
                self._removed.add(ids[hit], kept_tags, len(self._map))
                self._mark_written(freed)
            self._counters.evict(reason, freed.numel())
            return int(freed.numel())

    def clear(self) -> None:
        """Remove every key and release every block (slots and policies stay)."""
        with self.lock.write():
            ids, tags, _ = self._map.items()
            self._removed.add(ids, tags, 0)
            self._counters.evict("clear", ids.numel())
            self._map.clear()
            self._slots.clear()
            self._written = self._written[:0]

    def items(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, tags, rows)`` of every live key, ordered by row."""
        with self.lock.read():
            return self._map.items()

    def ids_by_row(self, rows: Tensor | None = None, *, lock: bool = True) -> Tensor:
        """The IDs at :meth:`live_rows` (pass them as ``rows`` if you have them), in row
        order (tags left out): :meth:`items`'s IDs, at about half its cost. ``lock=False``
        takes no lock, for a worker of a thread that holds the write lock until the worker is
        done (a blocking save lists the IDs while it writes the slot values); it raises if no
        thread holds the write lock."""
        if lock:
            with self.lock.read():
                return self._map.ids_by_row(rows)
        if not self.lock.write_held():
            raise RuntimeError("ids_by_row(lock=False) needs the table's write lock held (by "
                               "the thread that waits for this call)")
        return self._map.ids_by_row(rows)

    def live_rows(self) -> Tensor:
        """The rows that hold an ID, ascending: the rows of :meth:`items` without listing the
        IDs (read off the row allocator)."""
        with self.lock.read():
            return self._map.live_rows()

    def iter_items(self, chunk: int = 1 << 20) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`items` in pieces of at most ``chunk`` keys (one consistent snapshot)."""
        ids, tags, rows = self.items()
        for start in range(0, ids.numel(), chunk):
            yield ids[start:start + chunk], tags[start:start + chunk], rows[start:start + chunk]

    # -- growth and change tracking ------------------------------------------------------------
    def _grow(self, num_rows: int | None = None, initialize: bool = True) -> None:
        """Blocks for every row handed out; new blocks count as written."""
        before = self._slots.capacity
        self._slots.ensure_rows(self._map.row_high_water if num_rows is None else num_rows,
                                initialize)
        if self._slots.capacity > before:
            self._mark_written(slice(before, self._slots.capacity))

    def _mark_written(self, rows: Tensor | slice) -> None:
        if isinstance(rows, Tensor) and rows.numel() == 0:
            return
        need = self._slots.capacity
        if self._written.numel() < need:
            grown = torch.zeros(need, dtype=torch.bool, device=self._device)
            grown[: self._written.numel()] = self._written
            self._written = grown
        self._written[rows] = True

    @property
    def changes_complete(self) -> bool:
        """False when the log of removed IDs overflowed: only a full save captures the table."""
        return self._removed.complete

    def changes(self) -> Changes:
        """Rows written and keys removed since :meth:`mark_saved`."""
        with self.lock.read():
            written = self._written.nonzero().squeeze(1)
            log = self._removed
            if log.parts:
                ids = torch.cat([p[0] for p in log.parts])
                tags = torch.cat([p[1] for p in log.parts])
            else:
                ids = tags = torch.zeros(0, dtype=torch.int64, device=self._device)
            return Changes(written, ids, tags, log.complete)

    def mark_saved(self) -> None:
        """Forget the recorded changes (a checkpoint now holds the table)."""
        with self.lock.write():
            self._written.zero_()
            self._removed.reset()

    def take_changes(self) -> Changes:
        """:meth:`changes` and :meth:`mark_saved` in one step (a save captures the table)."""
        with self.lock.write():
            changes = self.changes()
            self.mark_saved()
            return changes

    def give_back_changes(self, changes: Changes) -> None:
        """Record ``changes`` again (a save that took them failed)."""
        with self.lock.write():
            self._mark_written(changes.rows[changes.rows < self.capacity])
            log = self._removed
            if not changes.complete:
                log.parts.clear()
                log.count, log.complete = 0, False
            elif log.complete and changes.removed_ids.numel():
                log.parts.insert(0, (changes.removed_ids, changes.removed_tags))
                log.count += changes.removed_ids.numel()

    # -- policies ------------------------------------------------------------------------------
    def attach_policy(self, key: str, policy: TablePolicy) -> None:
        """Attach ``policy`` under ``key``: its slots are declared now (unless present with
        the same spec), and it is touched by every training lookup and insert from now on."""
        if not isinstance(policy, TablePolicy):
            raise TypeError(f"policy must be a TablePolicy, got {type(policy).__name__}")
        with self.lock.write():
            if key in self._policies:
                raise ValueError(f"a policy is already attached as {key!r}")
            for spec in policy.slot_specs():
                if not self._slots.has_slot(spec.name):
                    self._slots.add_slot(spec)
                elif self._slots.spec(spec.name) != spec:
                    raise ValueError(f"policy {key!r} needs slot {spec!r}, but the table "
                                     f"has {self._slots.spec(spec.name)!r}")
            self._policies[key] = policy

    def policies(self) -> dict[str, TablePolicy]:
        return dict(self._policies)

    def policy_states(self) -> dict[str, dict[str, Tensor]]:
        """``{key: state}`` of the attached policies that have state."""
        with self.lock.read():
            out = {}
            for key, policy in self._policies.items():
                state = policy.policy_state()
                if state:
                    out[key] = {k: v.detach().clone() for k, v in state.items()}
            return out

    def load_policy_states(self, states: dict[str, dict[str, Tensor]]) -> None:
        """Give attached policies their saved state (keys without a policy raise)."""
        with self.lock.write():
            unknown = sorted(set(states) - set(self._policies))
            if unknown:
                raise KeyError(f"no policy attached as {unknown}; attached: "
                               f"{sorted(self._policies)}")
            for key, state in states.items():
                self._policies[key].load_policy_state(
                    {k: v.to(self._device) for k, v in state.items()})

    # -- exact layout (checkpoints) ------------------------------------------------------------
    def layout(self) -> dict[str, Tensor]:
        """Row allocator state (``capacity``, ``next_row``, the free rows) and the seed of the
        initial values (``init_seed``), as CPU tensors."""
        with self.lock.read():
            return {"capacity": torch.tensor([self.capacity]),
                    "next_row": torch.tensor([self._map.row_high_water]),
                    "free": self._map.free_rows().cpu(),
                    "init_seed": torch.tensor([self._seed])}

    @contextlib.contextmanager
    def restoring(self, capacity: int) -> Iterator[_Restore]:
        """Rebuild the table row by row (exact checkpoint loads)::

            with store.restoring(capacity) as r:
                r.write("embedding", rows, values)           # any slot, any rows
                r.set_keys(ids, tags, rows, next_row, free)  # the ID map and the allocator

        Inside, the table is cleared and ``capacity`` rows are allocated without drawing
        initial values; on exit every row of every slot that was not written gets the slot's
        default (so no value is ever left unset, whatever the checkpoint holds and whatever
        the block size). On an error the table is left empty.
        """
        with self.lock.write():
            self._map.clear()
            self._slots.clear()
            self._written = self._written[:0]
            self._grow(capacity, initialize=False)
            restore = _Restore(self)
            try:
                yield restore
                restore.finish()
            except BaseException:
                self._map.clear()
                self._slots.clear()
                self._written = self._written[:0]
                raise

    # -- moving --------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> None:
        """Move every structure to ``device`` (a new backend is chosen for it) and cast the
        floating slots with the embedding's dtype to ``dtype``."""
        device = self._device if device is None else torch.device(device)
        embedding_dtype = self._slots.spec(EMBEDDING).dtype

        def dtype_of(spec: SlotSpec) -> torch.dtype:
            return dtype if dtype is not None and spec.dtype == embedding_dtype else spec.dtype

        with self.lock.write():
            backend = backend_for(device) if device != self._device else self._backend
            self._map = self._map.to(device, backend)
            self._slots = self._slots.moved(device, backend, dtype_of)
            self._written = self._written.to(device)
            self._removed.parts = [(i.to(device), t.to(device)) for i, t in self._removed.parts]
            self._device, self._backend = device, backend
            self._keys.clear()

    def copy_from(self, other: TableStore) -> None:
        """Make this table's rows, layout, slot values and policy states equal to ``other``'s
        (slots of this table that ``other`` lacks get defaults)."""
        if other is self:
            return
        with other.lock.read():
            ids, tags, rows = other._map.items()
            layout = other.layout()
            values = {n: other._slots.value(n) for n in other.slot_names
                      if self.has_slot(n)}
            states = other.policy_states()
        with self.restoring(int(layout["capacity"][0])) as restore:
            for name, value in values.items():
                restore.write(name, torch.arange(value.shape[0], device=self._device),
                              value.to(self._device))
            restore.set_keys(ids, tags, rows, int(layout["next_row"][0]), layout["free"])
        self.reseed(other.seed)
        self.load_policy_states({k: v for k, v in states.items() if k in self._policies})


def _policy_name(policy: TablePolicy) -> str:
    """The name a policy's decisions are counted under: its registered name if it has one."""
    return getattr(policy, "policy_name", None) or type(policy).__name__


class _Restore:
    """The writer handed out by :meth:`TableStore.restoring`."""

    def __init__(self, store: TableStore):
        self._store = store
        self._unset = {n: torch.ones(store.capacity, dtype=torch.bool, device=store.device)
                       for n in store.slot_names}

    @property
    def capacity(self) -> int:
        return self._store.capacity

    def write(self, name: str, rows: Tensor | slice, values: Tensor) -> None:
        """Write ``values`` into ``rows`` of slot ``name`` (a tensor of rows, -1 skipped, or
        ``slice(start, stop)``: consecutive rows, copied block by block)."""
        if name not in self._unset:
            raise KeyError(f"no slot {name!r}; slots: {list(self._unset)}")
        if isinstance(rows, slice):
            if values.shape[0] != rows.stop - rows.start:
                raise ValueError(f"slot {name!r}: {values.shape[0]} values for rows "
                                 f"[{rows.start}, {rows.stop})")
            self._store._slots.write_range(name, rows.start, values.to(self._store.device))
            self._unset[name][rows] = False
            return
        rows = rows.to(self._store.device)
        self._store._slots.scatter(name, rows, values.to(self._store.device))  # checks rows
        if rows.numel():
            # a boolean mask costs 8x an index fill on 10M rows: mask only when -1 is there
            self._unset[name].index_fill_(0, rows if int(rows.min()) >= 0 else rows[rows >= 0],
                                          False)

    def set_keys(self, ids: Tensor, tags: Tensor, rows: Tensor, next_row: int,
                 free: Tensor) -> None:
        """The ``(id, tag) -> row`` entries and the allocator state (free rows, high water)."""
        store, device = self._store, self._store.device
        rows, free = rows.to(device), free.to(device)
        check_rows(rows, self.capacity)
        check_rows(free, self.capacity, "free rows")
        if not 0 <= next_row <= self.capacity:
            raise ValueError(f"next_row must be in [0, {self.capacity}], got {next_row}")
        store._map.restore(ids.to(device), tags.to(device), rows, next_row, free)

    def finish(self) -> None:
        slots = self._store._slots
        for name, unset in self._unset.items():
            if bool(unset.any()):
                slots.reset_rows(unset.nonzero().squeeze(1), [name])
