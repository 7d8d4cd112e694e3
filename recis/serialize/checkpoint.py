"""Checkpoints of dynamic tables and dense tensors: Saver, Loader, CheckpointReader.

A checkpoint is a directory that becomes visible only when complete::

    ckpt_000100/
      index.json                           format, kind (full/delta), base, files (size, CRC-32
                                           and the dtype and shape of every tensor), tables
                                           (children, written slots and fields), extra, and
                                           index_checksum (SHA-256 of all the rest)
      sparse-00000-of-00002.safetensors    rows of shard 0: "<child>.id/part_0_2",
      sparse-00001-of-00002.safetensors    "<child>.<slot>/part_0_2", ... (RecIS's key names)
      dense.safetensors                    dense tensors (written by shard 0)

Every file is written under a hidden staging directory ``.ckpt_000100.partial``, fsynced, and
the directory is renamed to its final name by the last shard to finish, after ``index.json``
is in place; a process killed at any moment leaves either no checkpoint or a complete one.
Under ``torch.distributed`` (:meth:`Saver.save`) shard 0 publishes after a barrier; without
collectives (one process per shard, or :meth:`SaveSnapshot.write` in a background thread) each
shard writes its index part and the one that finds every part written publishes, claiming the
file ``.publishing`` (``O_EXCL``) so that exactly one does. The staging directory must hold no
part of an earlier, killed attempt (``CheckpointManager`` removes it before a save).

Rows are written in storage order (row ``i`` of every slot belongs to ``ids[i]``), straight
from the tables' storage blocks: :meth:`Saver.save` holds the tables' locks while it writes
them; :meth:`Saver.snapshot` copies them (into :class:`SnapshotBuffers`) and returns. A
child's ``row`` array gives each ID's storage row; a full save of a table of one child whose
rows are 0..n-1 (none freed, or every freed row reused) does not store it and lists the child
in its file's ``dense_rows`` instead (format version 3; version 2 checkpoints, which store
every ``row``, still load).

Loading trusts nothing it reads (see :func:`read_index` and
:func:`recis.serialize._files.read_safetensors`): the index must carry a valid checksum and
pass a schema check, names of files and bases must be plain names of entries inside the
checkpoint's directory (no path, no symbolic link), data files must be regular files of the
indexed size, CRC-32 and tensor listing; all of it is checked before anything is written into
a table, and every fault is a :class:`CheckpointError` naming the file and the key.

Keys: ``<child>.<field>/part_<shard>_<shard_num>`` for the rows of a logical table (child) and
``@<table>.<record>.<field>/part_...`` for a physical table's records (``unused`` rows,
allocator ``layout``, initializer ``rng``, a policy's state ``policy_<tag>``: an admission
sketch, a filter's clock; ``policies`` in the index maps tags to policies). Names are escaped
so that ``/``, ``.``, ``@`` and ``%`` in them cannot break a key: each of these four
characters becomes ``%2F``, ``%2E``, ``%40``, ``%25``; other characters (spaces, unicode)
are kept, so ordinary names (``user_emb``, ``embedding``, ``sparse_adamw_exp_avg``) give
RecIS's key names unchanged.

Incremental checkpoints (``Saver.save(incremental=True)``) hold only the rows written since the
previous save of the same tables and the IDs removed since then (``<child>.deleted_id``), and
name their ``base``; loading follows the chain back to a full checkpoint. A table whose log of
removed IDs overflowed (see :class:`~recis._core.store.TableStore`) is written in full inside
the delta and listed in ``replaced``. :func:`compact` turns a chain into a full checkpoint.

Reading a checkpoint without recis::

    import json
    from safetensors import safe_open
    index = json.load(open("ckpt/index.json"))
    with safe_open("ckpt/sparse-00000-of-00001.safetensors", "pt") as f:
        ids = f.get_tensor("user.id/part_0_1")
        emb = f.get_tensor("user.embedding/part_0_1")   # row i belongs to ids[i]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from recis.nn.modules.hashtable import HashTable, Slice, gen_slice, in_slice
from recis.serialize import recis_format
from recis.serialize._files import (
    DTYPE_CODES,
    CheckpointError,
    DeferredTensor,
    TensorPieces,
    atomic_write_json,
    dtype_code,
    dtype_from_name,
    dtype_name,
    fsync_path,
    is_plain_name,
    read_regular,
    read_safetensors,
    write_safetensors,
)
from recis.utils.logger import Logger

logger = Logger(__name__)

__all__ = ["Saver", "SaveSnapshot", "SnapshotBuffers", "Loader", "CheckpointReader",
           "CheckpointError", "compact", "FORMAT_VERSION"]

FORMAT = "recis-checkpoint"
FORMAT_VERSION = 3  # 2: index_checksum, per-file tensor listings, escaped names in keys;
#                    3: a file's "dense_rows" (children whose 'row' is 0..n-1, not stored)
OLDEST_VERSION = 2  # the oldest format version this recis reads
INDEX = "index.json"
CHECKSUM = "index_checksum"
DENSE_FILE = "dense.safetensors"
CLAIM = ".publishing"  # created (O_EXCL) by the shard that publishes without a barrier
SLICE_SIZE = 65536


def _sparse_file(shard: int, shard_num: int) -> str:
    return f"sparse-{shard:05d}-of-{shard_num:05d}.safetensors"


def _shard_index(shard: int, shard_num: int) -> str:
    return f"index-{shard:05d}-of-{shard_num:05d}.json"


_ESCAPES = {"%": "%25", "/": "%2F", ".": "%2E", "@": "%40"}
_TO_ESCAPE = re.compile("[%/.@]")
_ESCAPED = r"(?:[^%/.@]|%(?:25|2F|2E|40))*"  # what _esc produces, and only that
_UNESCAPE = re.compile("%(25|2F|2E|40)")
_KEY = re.compile(rf"(?P<group>@{_ESCAPED}\.[A-Za-z0-9_]+|{_ESCAPED})\.(?P<field>{_ESCAPED})"
                  r"/part_(?P<shard>0|[1-9][0-9]*)_(?P<num>[1-9][0-9]*)")
_RECORD_GROUP = re.compile(rf"@(?P<physical>{_ESCAPED})\.(?P<record>[A-Za-z0-9_]+)")
_POLICY_RECORD = re.compile("policy_[0-9a-f]{12}")


def _esc(name: str) -> str:
    """A name as it appears in keys: ``%``, ``/``, ``.``, ``@`` percent-encoded, the rest kept."""
    return _TO_ESCAPE.sub(lambda m: _ESCAPES[m.group()], name)


def _unesc(text: str) -> str:
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _key(child: str, field: str, shard: int, shard_num: int) -> str:
    """Key of a logical table's (child's) field: ``<child>.<field>/part_<shard>_<shard_num>``."""
    return _gkey(_esc(child), field, shard, shard_num)


def _gkey(group: str, field: str, shard: int, shard_num: int) -> str:
    """Key of a field of an (escaped) group: :func:`_esc` of a child, or :func:`_rec`."""
    return f"{group}.{_esc(field)}/part_{shard}_{shard_num}"


def _rec(physical: str, record: str) -> str:
    """Group of a physical table's record (``unused``, ``layout``, ``rng``,
    ``policy_<tag>``)."""
    return f"@{_esc(physical)}.{record}"


def _parse_key(key: str) -> tuple[str, str, int, int] | None:
    """``(group, field, shard, shard_num)`` of a sparse key (group escaped, field not), or None
    if ``key`` is not one."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    return m["group"], _unesc(m["field"]), int(m["shard"]), int(m["num"])


def _display(group: str) -> str:
    """A group's unescaped name: the child's name, or ``@<table>.<record>``."""
    m = _RECORD_GROUP.fullmatch(group)
    return _unesc(group) if m is None else f"@{_unesc(m['physical'])}.{m['record']}"


def _empty_dir(path: str) -> bool:
    """A real (not linked) empty directory: a Saver may publish onto it (RecIS's tests create
    the checkpoint directory first); renaming a directory onto an empty one is atomic."""
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _staging(path: str) -> str:
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.partial")


def _tables_of(hashtables: Any) -> dict[str, HashTable]:
    if hashtables is None:
        return {}
    if isinstance(hashtables, HashTable):
        return {hashtables.name: hashtables}
    if not isinstance(hashtables, Mapping):
        raise TypeError(f"hashtables must be a dict name -> HashTable, got {type(hashtables)}")
    for name, t in hashtables.items():
        if not isinstance(t, HashTable):
            raise TypeError(f"hashtables[{name!r}] must be a HashTable, got {type(t).__name__}")
    return dict(hashtables)


def _children(tables: Mapping[str, HashTable]) -> dict[str, tuple[HashTable, int]]:
    """Logical table (child) name -> (physical table, child index); names must be unique."""
    out: dict[str, tuple[HashTable, int]] = {}
    for table in tables.values():
        for idx, child in enumerate(table.children_hashtable):
            if child in out and out[child][0] is not table:
                raise CheckpointError(
                    f"two tables both hold a logical table named {child!r}; checkpoints key "
                    "rows by logical table name, so give them distinct shared_name values"
                )
            out[child] = (table, idx)
    return out


def _written(data: Mapping[str, Tensor]) -> dict[str, set[str]]:
    """Escaped group -> the fields that ``data`` (sparse tensors by key) holds of it."""
    out: dict[str, set[str]] = {}
    for key in data:
        group, field, _, _ = _parse_key(key)
        out.setdefault(group, set()).add(field)
    return out


def _table_info(table: HashTable, child: str, fields: set[str]) -> dict:
    """A logical table's entry of the index: what was written of it (``fields``: ``id``,
    ``row``, ``deleted_id`` and slots), so a load reports a slot that was not saved (e.g.
    dropped by ``filter_func``) as missing."""
    if not {"id", "row"} <= fields:
        raise ValueError(
            f"filter_func kept {sorted(fields)} of table {child!r} but not its 'id' and 'row' "
            "keys: rows cannot be restored without them; keep or drop a table's keys together"
        )
    return {
        "physical": table.name,
        "embedding_shape": list(table.embedding_shape),
        "slots": {spec.name: {"shape": list(spec.row_shape), "dtype": dtype_name(spec.dtype)}
                  for spec in table.store.slot_specs() if spec.saved and spec.name in fields},
        "fields": sorted(fields),
    }


def _policy_tag(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _saved_slots(store) -> list[str]:
    return [spec.name for spec in store.slot_specs() if spec.saved]


class SnapshotBuffers:
    """Memory for the copies of :meth:`Saver.snapshot`, kept from one snapshot to the next.

    A copy into fresh memory pays a page fault per page on first touch (on the VMs we
    measured, a 768 MB copy ran ~10x slower than into memory used before), so a
    :class:`~recis.framework.checkpoint_manager.CheckpointManager` keeps the buffers of its
    last snapshot (as large as the saved slots) and copies the next one into them.
    :meth:`copy` hands out the buffer at once and :meth:`flush` copies the data, a few
    threads each copying whole blocks (on CPU with numpy: an OpenMP copy per block waits for
    its slowest thread, which made snapshots ~15x slower on a loaded machine).

    Example::

        buffers = SnapshotBuffers()
        snap = saver.snapshot(buffers=buffers)   # copies into reused memory
        snap.write()                             # gives the buffers back when written
    """

    def __init__(self):
        self._free: dict[tuple, list[Tensor]] = {}
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._lock = threading.Lock()

    def copy(self, t: Tensor) -> Tensor:
        """The buffer that holds a copy of ``t`` once :meth:`flush` ran: a kept one of the
        same shape and dtype when there is one."""
        with self._lock:
            free = self._free.get((t.shape, t.dtype, t.device))
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty_like(t, memory_format=torch.contiguous_format)
        self._pending.append((buffer, t))
        return buffer

    def flush(self) -> None:
        """Copy the data of every :meth:`copy` since the last flush."""
        pending, self._pending = self._pending, []

        def copy(pair: tuple[Tensor, Tensor]) -> None:
            dst, src = pair
            if src.device.type != "cpu" or not src.is_contiguous() or src.numel() == 0:
                dst.copy_(src)
            else:  # numpy releases the GIL: the threads copy side by side
                np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())

        threads = min(torch.get_num_threads(), len(pending))
        if threads <= 1:
            for pair in pending:
                copy(pair)
            return
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(copy, pending))

    def give_back(self, buffers: list[Tensor]) -> None:
        """Keep ``buffers`` (a written snapshot's) for the next snapshot, and only them: the
        memory kept is at most one snapshot's."""
        free: dict[tuple, list[Tensor]] = {}
        for b in buffers:
            free.setdefault((b.shape, b.dtype, b.device), []).append(b)
        with self._lock:
            self._free = free

    def clear(self) -> None:
        """Release the kept memory."""
        with self._lock:
            self._free.clear()


def _storage_pieces(store, slot: str, rows: Tensor,
                    copies: SnapshotBuffers | None) -> TensorPieces:
    """Values of ``slot`` at ``rows`` (ascending storage rows) as pieces, one per block: a
    view of the block where its rows among ``rows`` are one contiguous range (every block of
    a table without holes), a gathered copy elsewhere. With ``copies`` the views are copied
    too (into its buffers): a snapshot that later writes to the table leave as it is. Call
    under the table's lock."""
    spec = store.slot_spec(slot)
    shape = (rows.numel(), *spec.row_shape)
    if rows.numel() == 0:
        return TensorPieces(spec.dtype, shape, [])
    size = store.block_size
    blocks = store.blocks(slot)
    edges = torch.arange(len(blocks) + 1, device=rows.device) * size
    bounds = torch.searchsorted(rows, edges)
    starts, ends = bounds[:-1], bounds[1:]
    firsts = rows[starts.clamp(max=rows.numel() - 1)].tolist()
    lasts = rows[(ends - 1).clamp(min=0)].tolist()
    pieces = []
    for b, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if lo == hi:
            continue
        first, last = firsts[b] - b * size, lasts[b] - b * size
        if last - first == hi - lo - 1:  # one contiguous range of the block
            view = blocks[b][first : last + 1]
            pieces.append(view if copies is None else copies.copy(view))
        else:
            pieces.append(store.read(slot, rows[lo:hi]))
    return TensorPieces(spec.dtype, shape, pieces)


class Saver:
    """Write a checkpoint of tables (their rows and every slot) and dense tensors.

    Args:
        shard_index (int): this worker's shard. Default: 0.
        shard_num (int): number of workers writing the checkpoint. Default: 1.
        parallel (int): accepted for RecIS compatibility (one file per shard is written).
        path (str): the checkpoint directory to create (must not exist, or be an empty
            directory: the complete checkpoint replaces it atomically).
        hashtables (dict[str, HashTable]): e.g. ``filter_out_sparse_param(model)``.
        tensors (dict[str, Tensor]): dense tensors, written by shard 0.
        filter_func (callable, optional): ``f(list of tensor keys) -> list`` to keep a subset
            of the sparse tensors (keys as stored: names escaped, see the module docstring).
            The index lists what was kept, so a strict load reports dropped slots missing;
            a table's ``id`` and ``row`` keys must be kept or dropped with the rest of it.
        format (str): ``"recis"`` writes RecIS's layout instead (``parallel`` files per
            shard, see :mod:`recis.serialize.recis_format`), for RecIS to read. Default:
            ``"native"``, this module's layout.

    :meth:`save` writes while the tables wait (their rows go to the file straight from the
    storage blocks, in storage order); :meth:`snapshot` copies the state and returns at once,
    and its :meth:`SaveSnapshot.write` can then run in another thread while training goes on.

    Example::

        Saver(path="ckpt/ckpt_000100", hashtables=filter_out_sparse_param(model),
              tensors=dense_state).save(extra={"global_step": 100})
    """

    def __init__(self, shard_index: int = 0, shard_num: int = 1, parallel: int = 8,
                 path: str = ".", hashtables: Any = None, tensors: Mapping | None = None,
                 filter_func: Callable | None = None, format: str = "native"):  # noqa: A002
        if format not in ("native", "recis"):
            raise ValueError(f"format must be 'native' or 'recis', got {format!r}")
        if not 0 <= shard_index < shard_num:
            raise ValueError(f"shard_index must be in [0, {shard_num}), got {shard_index}")
        self.shard_index, self.shard_num = shard_index, shard_num
        self.path = os.path.abspath(path)
        self.tables = _tables_of(hashtables)
        self.tensors = dict(tensors or {})
        for name, t in self.tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"tensors[{name!r}] must be a Tensor, got {type(t).__name__}")
        self.filter_func = filter_func
        self.format, self.parallel = format, parallel

    def save(self, incremental: bool = False, base: str | None = None,
             extra: Mapping | None = None) -> str:
        """Write this shard's part; the last shard to finish publishes the checkpoint.

        ``incremental=True`` writes only what changed since the tables were last saved and
        names ``base`` (the previous checkpoint's directory name) in the index. ``extra``
        is JSON-serialisable state stored in the index (shard 0). Returns the path.

        The tables are locked until this shard's file is written (their rows are written
        from the storage blocks, not copied). Under ``torch.distributed`` the shards meet at
        a barrier and shard 0 publishes.
        """
        if self.format == "recis":
            if incremental or base is not None or extra:
                raise ValueError("format='recis' writes full checkpoints without extra state "
                                 "(RecIS's layout has no place for incremental, base or extra)")
            return recis_format.save_recis(self.path, self.tables, self.tensors,
                                           self.shard_index, self.shard_num, self.parallel,
                                           self.filter_func)
        in_full = self._start(incremental, base)
        with contextlib.ExitStack() as locks:
            for table in self.tables.values():
                locks.enter_context(table.store.lock.write())
            # its workers read the tables: it waits for them before the locks are released
            pool = locks.enter_context(ThreadPoolExecutor(1, thread_name_prefix="recis-save"))
            snap = self._capture(incremental, base, extra, in_full, copies=None, pool=pool)
            snap.write_sparse()
        collective = self.shard_num > 1 and dist.is_available() and dist.is_initialized()
        snap.finish(collective)
        return self.path

    def snapshot(self, incremental: bool = False, base: str | None = None,
                 extra: Mapping | None = None,
                 buffers: SnapshotBuffers | None = None) -> SaveSnapshot:
        """Copy what :meth:`save` would write (the tables' rows and slots, the dense tensors)
        as it is now and return it; :meth:`SaveSnapshot.write` writes it later, from any
        thread, while the tables change. Costs a copy of the saved slots in memory (into
        ``buffers``, reused from one snapshot to the next, when given).

        Example::

            snap = Saver(path="ckpt/ckpt_000100", hashtables=tables).snapshot()
            threading.Thread(target=snap.write).start()   # training goes on
        """
        in_full = self._start(incremental, base)
        with contextlib.ExitStack() as locks:
            for table in self.tables.values():
                locks.enter_context(table.store.lock.write())
            return self._capture(incremental, base, extra, in_full,
                                 copies=buffers if buffers is not None else SnapshotBuffers())

    def _start(self, incremental: bool, base: str | None) -> set[str]:
        """Check the arguments; the tables an incremental save writes in full."""
        if self.format == "recis":
            raise ValueError("snapshot() writes recis's own layout; format='recis' saves only "
                             "through save()")
        if incremental and not base:
            raise ValueError("an incremental save needs base= (the previous checkpoint)")
        if base is not None and not is_plain_name(base):
            raise ValueError(f"base must be the directory name of the previous checkpoint (a "
                             f"sibling of path, no separator, no leading dot), got {base!r}")
        if os.path.lexists(self.path) and not _empty_dir(self.path):
            raise CheckpointError(f"{self.path} already exists and is not an empty directory; "
                                  "checkpoints are never overwritten")
        return self._tables_in_full(incremental)

    def _capture(self, incremental: bool, base: str | None, extra: Mapping | None,
                 in_full: set[str], copies: SnapshotBuffers | None,
                 pool: ThreadPoolExecutor | None = None) -> SaveSnapshot:
        """The state to write, taken under the tables' locks: IDs and rows of each child in
        storage order, slot values as pieces of the blocks (views, or copies into
        ``copies``). With ``pool`` (a blocking save, whose locks outlive the pool's work)
        IDs may be listed in its worker while the slot values are written."""
        children = _children(self.tables)
        n, k = self.shard_num, self.shard_index
        data: dict[str, Tensor | TensorPieces | DeferredTensor] = {}
        rows_saved: dict[str, int] = {}
        policies: dict[str, dict[str, str]] = {}
        replaced: list[str] = []
        taken = []  # (store, changes) to give back if the save fails
        dense_rows: list[str] = []  # children whose rows are 0..n-1: no 'row' key written
        try:
            for table in self.tables.values():
                store = table.store
                changes = store.take_changes()
                taken.append((store, changes))
                full = table.name in in_full
                written = changes.rows if incremental and not full else None
                if incremental and full:
                    replaced += table.children_hashtable  # the removal log overflowed
                    logger.info("table %s: too many removals since the last save; its rows "
                                "are saved in full", table.name)
                kids = table.children_hashtable
                for idx, child, ids, rows in self._rows_by_child(store, kids, written, pool):
                    if written is not None:
                        removed = changes.removed_ids[changes.removed_tags == idx]
                        data[_key(child, "deleted_id", k, n)] = removed.cpu()
                    # row i of every slot belongs to ids[i]
                    data[_key(child, "id", k, n)] = ids
                    if written is None and len(kids) == 1 and _zero_to_n(rows):
                        dense_rows.append(child)  # implied by the number of IDs
                    else:
                        data[_key(child, "row", k, n)] = rows.cpu()
                    rows_saved[child] = rows.numel()
                    for slot in _saved_slots(store):
                        data[_key(child, slot, k, n)] = _storage_pieces(store, slot, rows,
                                                                        copies)
                # what an exact restore needs besides the live rows: the allocator state and
                # the seed of initial values (rows without an ID hold defaults)
                for field, values in store.layout().items():
                    data[_gkey(_rec(table.name, "layout"), field, k, n)] = values
                for key, state in store.policy_states().items():  # admission/filter state
                    tag = _policy_tag(key)
                    for field, value in state.items():
                        data[_gkey(_rec(table.name, f"policy_{tag}"), field, k, n)] = value.cpu()
                    policies.setdefault(table.name, {})[tag] = key
            if copies is not None:
                copies.flush()
            if self.filter_func is not None:
                keep_keys = set(self.filter_func(list(data)))
                data = {key: v for key, v in data.items() if key in keep_keys}
            written_fields = _written(data)
            dense_rows = [c for c in dense_rows if _key(c, "id", k, n) in data]
            for child in dense_rows:
                written_fields[_esc(child)].add("row")
            tables_info = {c: _table_info(t, c, written_fields[_esc(c)])
                           for c, (t, _) in children.items() if _esc(c) in written_fields}
            dense = {}
            if k == 0:
                dense = {name: t.detach().to("cpu", copy=copies is not None)
                         for name, t in self.tensors.items()}
            part = {
                "tables": tables_info,
                "physical": {t.name: list(t.children_hashtable) for t in self.tables.values()},
                "policies": policies,
                "replaced": replaced,
                "rows": rows_saved,
                "dense": sorted(self.tensors) if k == 0 else [],
                "extra": json.loads(json.dumps(dict(extra or {}))) if k == 0 else {},
            }
        except BaseException:
            _give_back(taken)
            raise
        return SaveSnapshot(self, data, dense, part, taken, incremental, base, copies,
                            dense_rows)

    @staticmethod
    def _rows_by_child(store, kids: list[str], written: Tensor | None,
                       pool: ThreadPoolExecutor | None
                       ) -> list[tuple[int, str, Tensor | DeferredTensor, Tensor]]:
        """``(tag, child, ids, rows)`` of each child: its live rows (those written since the
        last save, with ``written``) ascending, and their IDs. For a full save of one child the
        rows are read off the allocator and the IDs listed without tags; with a ``pool``, in
        its worker (a :class:`DeferredTensor`, written last) while the slot values are
        written."""
        if written is None and len(kids) == 1:
            live = store.live_rows()
            rows = live.cpu()
            if pool is None:
                return [(0, kids[0], store.ids_by_row(live).cpu(), rows)]
            ids = pool.submit(lambda: store.ids_by_row(live, lock=False).cpu())
            return [(0, kids[0], DeferredTensor(torch.int64, (rows.numel(),), ids), rows)]
        all_ids, tags, all_rows = store.items()  # by row: storage order
        out = []
        for idx, child in enumerate(kids):
            ids, rows = all_ids, all_rows
            if len(kids) > 1 or written is not None:
                keep = tags == idx
                if written is not None:
                    keep &= torch.isin(all_rows, written)
                ids, rows = all_ids[keep], all_rows[keep]
            out.append((idx, child, ids.cpu(), rows))
        return out

    def _tables_in_full(self, incremental: bool) -> set[str]:
        """Tables an incremental save must write in full: their log of removed IDs overflowed
        (on any shard: the shards of a table agree, so that a load never mixes a full shard
        and a delta shard of one table)."""
        if not incremental:
            return set()
        flags = torch.tensor([int(t.store.changes_complete) for t in self.tables.values()],
                             dtype=torch.int64)
        if self.shard_num > 1 and dist.is_available() and dist.is_initialized():
            from recis.distributed.sharding import collective_device

            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            flags = flags.cpu()
        return {t.name for t, ok in zip(self.tables.values(), flags.tolist(), strict=True)
                if not ok}

    def _publish(self, staging: str, incremental: bool, base: str | None) -> None:
        """Merge the shards' index parts (each checked like an index) into ``index.json``."""
        n = self.shard_num
        index = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "kind": "delta" if incremental else "full", "base": base, "shard_num": n,
            "files": {}, "tables": {}, "physical": {}, "rows": {}, "dense": [], "extra": {},
            "policies": {}, "replaced": [],
        }
        for s in range(n):
            where = os.path.join(staging, _shard_index(s, n))
            part = _checked(_load_json(where, "shard index"), where, part=(s, n))
            for section in ("tables", "physical"):
                for name, value in part[section].items():
                    if index[section].setdefault(name, value) != value:
                        raise CheckpointError(
                            f"{where}: {section}[{name!r}] differs from another shard's "
                            f"({value!r} vs {index[section][name]!r}): every shard must save "
                            "the same tables with the same slots (and the same filter_func)"
                        )
            index["files"].update(part["files"])
            for table, tags in part["policies"].items():
                index["policies"].setdefault(table, {}).update(tags)
            index["replaced"] += [c for c in part["replaced"] if c not in index["replaced"]]
            for child, count in part["rows"].items():
                index["rows"][child] = index["rows"].get(child, 0) + count
            index["dense"] += part["dense"]
            index["extra"].update(part["extra"])
        _publish_dir(staging, self.path, index)


def _zero_to_n(rows: Tensor) -> bool:
    """Whether strictly ascending ``rows`` are exactly 0..n-1 (two reads, no pass)."""
    n = rows.numel()
    return n == 0 or (int(rows[0]) == 0 and int(rows[-1]) == n - 1)


def _give_back(taken: list) -> None:
    """Record again the changes that a failed save took from the tables."""
    for store, changes in taken:
        store.give_back_changes(changes)


class SaveSnapshot:
    """One shard's part of a checkpoint, captured by :meth:`Saver.snapshot` (or, viewing the
    live blocks, by :meth:`Saver.save`), ready to be written.

    :meth:`write` writes it and, if this shard is the last one to finish, publishes the
    checkpoint; it uses no collective, so it can run in a background thread while the
    training's collectives go on. If it fails, the tables' changes it took are recorded again
    (the next incremental save still holds them) and nothing is published.
    """

    def __init__(self, saver: Saver, data: dict, dense: dict, part: dict, taken: list,
                 incremental: bool, base: str | None, buffers: SnapshotBuffers | None,
                 dense_rows: list[str] | None = None):
        self.saver, self.data, self.dense, self.part = saver, data, dense, part
        self.taken, self.incremental, self.base = taken, incremental, base
        self.buffers, self.dense_rows = buffers, list(dense_rows or [])
        self.path = saver.path
        self.staging = _staging(saver.path)
        self.files: dict[str, dict] = {}

    def write(self) -> bool:
        """Write this shard's files and publish the checkpoint if every shard's part is in;
        returns True if this call published it."""
        self.write_sparse()
        return self.finish(collective=False)

    def write_sparse(self) -> None:
        """Write this shard's sparse file into the staging directory."""
        saver = self.saver
        name = _sparse_file(saver.shard_index, saver.shard_num)
        try:
            os.makedirs(self.staging, exist_ok=True)
            self.files[name] = write_safetensors(
                os.path.join(self.staging, name), self.data,
                {"format": FORMAT, "version": str(FORMAT_VERSION)})
            if self.dense_rows:
                self.files[name]["dense_rows"] = self.dense_rows
        except BaseException:
            _give_back(self.taken)
            raise
        finally:
            if self.buffers is not None:  # the copies, for the next snapshot
                self.buffers.give_back([p for v in self.data.values()
                                        if isinstance(v, TensorPieces) for p in v.pieces])
            self.data = {}  # the views of the blocks, or the copies: not needed any more

    def finish(self, collective: bool) -> bool:
        """Write the dense file (shard 0) and this shard's index part, then publish: shard 0
        after a barrier (``collective``), else the shard that finds every part written."""
        saver = self.saver
        n, k = saver.shard_num, saver.shard_index
        try:
            if self.dense:
                self.files[DENSE_FILE] = write_safetensors(
                    os.path.join(self.staging, DENSE_FILE), self.dense,
                    {"format": FORMAT, "version": str(FORMAT_VERSION)})
                self.dense = {}
            atomic_write_json(os.path.join(self.staging, _shard_index(k, n)),
                              _sealed({"files": self.files, **self.part}))
            if collective:
                dist.barrier()
                if k == 0:
                    saver._publish(self.staging, self.incremental, self.base)
                return k == 0
            if n > 1:
                if not all(os.path.exists(os.path.join(self.staging, _shard_index(s, n)))
                           for s in range(n)):
                    return False  # a shard still writing publishes
                try:  # the shards that find every part written race for this name
                    os.close(os.open(os.path.join(self.staging, CLAIM),
                                     os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except (FileExistsError, FileNotFoundError):
                    return False  # another shard publishes (or already did)
            saver._publish(self.staging, self.incremental, self.base)
            return True
        except BaseException:
            _give_back(self.taken)
            raise


def _publish_dir(staging: str, final: str, index: dict) -> None:
    """Seal the index (add its checksum), check it as a load will, write it last, then make
    the complete directory visible under its final name."""
    index = _sealed(index)
    _checked(json.loads(json.dumps(index)), os.path.join(final, INDEX))  # never publish junk
    atomic_write_json(os.path.join(staging, INDEX), index)
    fsync_path(staging)
    os.rename(staging, final)  # the moment the checkpoint becomes visible
    fsync_path(os.path.dirname(os.path.abspath(final)))


# -- the index: checksum and schema ---------------------------------------------------------------

def index_checksum(index: Mapping) -> str:
    """SHA-256 (hex) of the canonical JSON (sorted keys, no whitespace, ASCII) of ``index``
    without its ``index_checksum``: what an index stores under ``index_checksum``. Whitespace
    and key order of the file do not matter; any change of a value, key or type does."""
    body = json.loads(json.dumps({k: v for k, v in index.items() if k != CHECKSUM}))
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _sealed(index: Mapping) -> dict:
    body = {k: v for k, v in index.items() if k != CHECKSUM}
    return {**body, CHECKSUM: index_checksum(body)}


def _load_json(where: str, what: str) -> Any:
    raw = read_regular(where, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError
        raise CheckpointError(f"{where} is corrupted: {e}") from None


_NOT_GIVEN = object()


class _Schema:
    """Checks of one index file's structure; each fault is a CheckpointError naming the file,
    the key and what was expected."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, expected: str, value: Any = _NOT_GIVEN) -> NoReturn:
        got = "it is missing" if value is _NOT_GIVEN else f"got {_short(value)}"
        raise CheckpointError(f"{self.where}: {key} must be {expected}; {got}")

    def get(self, obj: Mapping, name: str, key: str, expected: str,
            ok: Callable[[Any], bool]) -> Any:
        if name not in obj:
            self.fail(key, expected)
        if not ok(obj[name]):
            self.fail(key, expected, obj[name])
        return obj[name]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_count(d) for d in v)


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v) and len(set(v)) == len(v)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_policy_key(v: Any) -> bool:
    """``admit:<hook JSON>`` or ``filter:<policy name>:<slot name>``."""
    kind, _, rest = v.partition(":") if isinstance(v, str) else ("", "", "")
    if kind == "filter":
        return bool(rest)
    if kind != "admit":
        return False
    try:
        spec = json.loads(rest)
    except ValueError:
        return False
    return (isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and isinstance(spec.get("params"), dict))


def _checked(index: Any, where: str, part: tuple[int, int] | None = None) -> dict:
    """``index`` if it is a valid index (``part=(shard, shard_num)``: a shard's index part)."""
    sc = _Schema(where)
    if not isinstance(index, dict):
        sc.fail("the index", "a JSON object", index)
    if CHECKSUM in index and index[CHECKSUM] != index_checksum(index):
        raise CheckpointError(f"{where} is corrupted: its {CHECKSUM} does not match its content")
    if part is None:
        if index.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a recis checkpoint index "
                                  f"(format={_short(index.get('format'))})")
        version = sc.get(index, "version", "version", "an integer", _is_int)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{where} has format version {version}; this recis reads "
                                  f"versions {OLDEST_VERSION} to {FORMAT_VERSION}: upgrade recis")
        if version < OLDEST_VERSION:
            raise CheckpointError(
                f"{where} has format version {version}, written by an older recis: it has no "
                f"{CHECKSUM} nor tensor listings, which this recis requires to trust a "
                f"checkpoint (format version {OLDEST_VERSION} or later); load it with the "
                "recis that wrote it and save it again"
            )
    if CHECKSUM not in index:
        sc.fail(CHECKSUM, "the SHA-256 of the rest of the index")
    if part is None:
        sc.get(index, "kind", "kind", "'full' or 'delta'", lambda v: v in ("full", "delta"))
        shards = sc.get(index, "shard_num", "shard_num", "a positive integer",
                        lambda v: _is_int(v) and v > 0)
        if index["kind"] == "delta":
            sc.get(index, "base", "base", "the directory name of a checkpoint next to this one "
                   "(a plain name: no separator, no leading dot)", is_plain_name)
        else:
            sc.get(index, "base", "base", "null or a plain directory name",
                   lambda v: v is None or is_plain_name(v))
    files = sc.get(index, "files", "files", "a JSON object", _is_dict)
    if part is None:
        if shards > len(files):
            sc.fail("shard_num", f"the number of sparse files ({len(files)} files)", shards)
        expected = [_sparse_file(s, shards) for s in range(shards)]
    else:
        expected = [_sparse_file(*part)]
    for name in files:
        if not is_plain_name(name):
            sc.fail("files", "names of files inside the checkpoint directory (plain names: "
                    "no separator, no leading dot)", name)
    if sorted(set(files) - {DENSE_FILE}) != expected:
        sc.fail("files", f"the data files {expected} (and {DENSE_FILE!r})", sorted(files))
    for name, entry in files.items():
        key = f"files[{name!r}]"
        sc.get(files, name, key, "a JSON object", _is_dict)
        sc.get(entry, "crc32", f"{key}['crc32']", "a CRC-32", lambda v: _is_count(v)
               and v < 2**32)
        sc.get(entry, "bytes", f"{key}['bytes']", "a file size", lambda v: _is_count(v)
               and v >= 8)
        tensors = sc.get(entry, "tensors", f"{key}['tensors']", "a JSON object", _is_dict)
        for tkey, info in tensors.items():
            where_t = f"{key}['tensors'][{tkey!r}]"
            sc.get(tensors, tkey, where_t, "a JSON object", _is_dict)
            sc.get(info, "dtype", f"{where_t}['dtype']", f"one of {sorted(DTYPE_CODES)}",
                   lambda v: isinstance(v, str) and v in DTYPE_CODES)
            sc.get(info, "shape", f"{where_t}['shape']", "a list of sizes", _is_shape)
        if "dense_rows" in entry:
            sc.get(entry, "dense_rows", f"{key}['dense_rows']", "a list of table names",
                   _is_names)
    physical = sc.get(index, "physical", "physical", "a JSON object", _is_dict)
    for name in physical:
        sc.get(physical, name, f"physical[{name!r}]", "a list of distinct names", _is_names)
    tables = sc.get(index, "tables", "tables", "a JSON object", _is_dict)
    for child, info in tables.items():
        key = f"tables[{child!r}]"
        sc.get(tables, child, key, "a JSON object", _is_dict)
        sc.get(info, "physical", f"{key}['physical']", "a table of 'physical' holding it",
               lambda v, c=child: isinstance(v, str) and c in physical.get(v, []))
        sc.get(info, "embedding_shape", f"{key}['embedding_shape']", "a list of positive sizes",
               lambda v: _is_shape(v) and len(v) > 0 and all(d > 0 for d in v))
        slots = sc.get(info, "slots", f"{key}['slots']", "a JSON object", _is_dict)
        for slot, spec in slots.items():
            skey = f"{key}['slots'][{slot!r}]"
            sc.get(slots, slot, skey, "a JSON object", _is_dict)
            sc.get(spec, "shape", f"{skey}['shape']", "a list of sizes", _is_shape)
            sc.get(spec, "dtype", f"{skey}['dtype']", "the name of a dtype (e.g. 'float32')",
                   lambda v: dtype_code(v) is not None)
        need = {"id", "row", *slots}
        sc.get(info, "fields", f"{key}['fields']", "the distinct fields written, with 'id', "
               "'row' and every slot", lambda v, need=need: _is_names(v) and need <= set(v))
    policies = sc.get(index, "policies", "policies", "a JSON object", _is_dict)
    for name, by_tag in policies.items():
        sc.get(policies, name, f"policies[{name!r}]", "a JSON object", _is_dict)
        for tag in by_tag:
            sc.get(by_tag, tag, f"policies[{name!r}][{tag!r}]",
                   "a policy key ('admit:<hook JSON>' or 'filter:<policy>:<slot>')",
                   lambda v, tag=tag: _is_policy_key(v) and _policy_tag(v) == tag)
    sc.get(index, "replaced", "replaced", "a list of table names", _is_names)
    rows = sc.get(index, "rows", "rows", "a JSON object", _is_dict)
    for child in rows:
        sc.get(rows, child, f"rows[{child!r}]", "a row count", _is_count)
    dense = sc.get(index, "dense", "dense", "a list of tensor names", _is_names)
    listed = sorted(files[DENSE_FILE]["tensors"]) if DENSE_FILE in files else []
    if sorted(dense) != listed:
        sc.fail("dense", f"the tensors listed for {DENSE_FILE!r} ({_short(listed)})", dense)
    sc.get(index, "extra", "extra", "a JSON object", _is_dict)
    _check_listings(sc, index)
    return index


def _check_listings(sc: _Schema, index: dict) -> None:
    """The sparse files' tensor listings against the tables: well-formed keys of this file's
    part, every group known, each logical table's fields exactly as ``tables`` lists them, with
    the slots' dtypes and row shapes, and as many rows in each of them as IDs."""
    tables, physical = index["tables"], index["physical"]
    seen: set[str] = set()
    for fname, entry in index["files"].items():
        if fname == DENSE_FILE:
            continue
        part = tuple(int(x) for x in re.findall("[0-9]+", fname))
        groups: dict[str, dict[str, dict]] = {}
        for key, info in entry["tensors"].items():
            parsed = _parse_key(key)
            where = f"files[{fname!r}]['tensors'][{key!r}]"
            if parsed is None or parsed[2:] != part:
                sc.fail(where, f"a key '<name>.<field>/part_{part[0]}_{part[1]}' with '%', '/', "
                        "'.' and '@' in names escaped", key)
            groups.setdefault(parsed[0], {})[parsed[1]] = info
        for child in entry.get("dense_rows", []):  # 'row' implied: 0..n-1, n = number of IDs
            fields = groups.get(_esc(child), {})
            where = f"files[{fname!r}]['dense_rows']"
            if "id" not in fields or "row" in fields:
                sc.fail(where, f"tables whose IDs, and not rows, the file holds ({child!r} has "
                        f"{sorted(fields)})")
            fields["row"] = {"dtype": "I64", "shape": fields["id"]["shape"][:1]}
        for group, fields in groups.items():
            where = f"files[{fname!r}]['tensors']"
            rec = _RECORD_GROUP.fullmatch(group)
            if rec is not None:
                _check_record(sc, where, _display(group), _unesc(rec["physical"]),
                              rec["record"], fields, physical)
                continue
            child = _unesc(group)
            if child not in tables:
                sc.fail("tables", f"an entry for every table of {where} (no {child!r})")
            want = tables[child]
            if set(fields) != set(want["fields"]):
                sc.fail(f"tables[{child!r}]['fields']", f"the fields of {child!r} in {where}, "
                        f"{sorted(fields)}", want["fields"])
            seen.add(child)
            n = None
            for field, info in fields.items():
                spec = want["slots"].get(field)
                if spec is None:
                    ok = info["dtype"] == "I64" and len(info["shape"]) == 1
                    expected = "I64 of shape [n]"
                else:
                    ok = (info["dtype"] == dtype_code(spec["dtype"])
                          and info["shape"][1:] == spec["shape"])
                    expected = f"{dtype_code(spec['dtype'])} of shape [n, *{spec['shape']}]"
                if not ok:
                    sc.fail(f"{where}[{_key(child, field, *part)!r}]", f"{expected} (table "
                            f"{child!r})", f"{info['dtype']} of shape {info['shape']}")
                if field != "deleted_id" and info["shape"]:
                    if n is not None and info["shape"][0] != n:
                        sc.fail(f"{where}[{_key(child, field, *part)!r}]['shape']",
                                f"[{n}, ...]: as many rows as IDs", info["shape"])
                    n = info["shape"][0]
    for child in tables:
        if child not in seen:
            sc.fail(f"tables[{child!r}]", "a table with tensors in the data files (it has none)")


def _check_record(sc: _Schema, where: str, name: str, phys: str, record: str,
                  fields: Mapping[str, dict], physical: Mapping) -> None:
    """A physical table's record: the table exists; the fields an exact restore reads are there
    with the shapes it needs."""
    if phys not in physical:
        sc.fail("physical", f"an entry for table {phys!r} of the records {name!r} in {where}")
    need = {"layout": {"capacity": [1], "next_row": [1], "free": None},
            "unused": {"row": None}, "rng": {"state": None}}.get(record)
    if need is None:
        if not _POLICY_RECORD.fullmatch(record):
            sc.fail(where, "records 'unused', 'layout', 'rng' or 'policy_<tag>'", name)
        return
    for field, shape in need.items():
        info = fields.get(field)
        if info is None:
            sc.fail(f"{where}", f"a field {field!r} of the records {name!r}")
        dtype = "U8" if record == "rng" else "I64"
        if info["dtype"] != dtype or len(info["shape"]) != 1 or (
                shape is not None and info["shape"] != shape):
            sc.fail(f"{where}[{name + '.' + field!r}]", f"{dtype} of shape {shape or '[n]'}",
                    f"{info['dtype']} of shape {info['shape']}")
    if record == "unused":
        for field, info in fields.items():
            if not info["shape"] or info["shape"][0] != fields["row"]["shape"][0]:
                sc.fail(f"{where}[{name + '.' + field!r}]['shape']", "[n, ...]: as many rows "
                        "as 'row'", info["shape"])


def read_index(path: str) -> dict:
    """The index of the checkpoint directory ``path``, checked (a :class:`CheckpointError`
    naming the file and the key otherwise).

    Checked: ``index.json`` is a regular file (not a symbolic link, FIFO or device) holding a
    JSON object; its ``index_checksum`` matches its content (any change to the index, other
    than whitespace, is caught); format and version (indexes of format version 1, without a
    checksum, are **rejected**: a checkpoint nobody can vouch for is not loaded); and the
    schema of everything loads read: ``files`` names exactly the checkpoint's data files by
    plain names (no path, so nothing outside the directory), each with size, CRC-32 and the
    dtype and shape of each tensor; ``base`` is a plain name; ``tables``, ``physical``,
    ``policies``, ``replaced``, ``rows``, ``dense``, ``extra`` have their types, and the
    listings agree with ``tables`` (well-formed keys, each table's fields, slot dtypes and
    shapes).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    index_path = os.path.join(path, INDEX)
    if not os.path.lexists(index_path):
        raise CheckpointError(f"{path} has no {INDEX}: not a complete checkpoint")
    return _checked(_load_json(index_path, "checkpoint index"), index_path)


def chain(path: str) -> list[str]:
    """The checkpoints to apply in order: a full one, then its deltas up to ``path``.

    A delta's ``base`` is a plain name (see :func:`read_index`) of a directory next to it; a
    base that is a symbolic link, or a chain that comes back to a checkpoint, is rejected."""
    out = [os.path.abspath(path)]
    while True:
        index = read_index(out[0])
        if index["kind"] == "full":
            return out
        base = os.path.join(os.path.dirname(out[0]), index["base"])
        if os.path.islink(base):
            raise CheckpointError(
                f"{os.path.join(out[0], INDEX)}: base {index['base']!r} is a symbolic link; a "
                "base must be a checkpoint directory next to the delta"
            )
        if base in out:
            raise CheckpointError(f"the checkpoint chain of {path} loops at {base}")
        out.insert(0, base)


class _Content(dict):
    """group -> field -> [tensor per shard part]; ``shards[group]``: the shards that wrote the
    group, ``field_shards[group][field]``: the shard of each of the field's parts (a policy's
    state may lack a field on some shards, e.g. a sketch never used there)."""

    def __init__(self):
        super().__init__()
        self.shards: dict[str, list[int]] = {}
        self.field_shards: dict[str, dict[str, list[int]]] = {}


def _read_sparse(path: str, index: dict) -> _Content:
    """group -> field -> [tensor per shard part], after checking every file.

    Groups are escaped (:func:`_esc` of a child's name, :func:`_rec` of a physical table's
    record), so no name can collide with another; fields are the slot names, unescaped."""
    out = _Content()
    for fname, expected in sorted(index["files"].items()):
        if fname == DENSE_FILE:
            continue
        for key, t in read_safetensors(os.path.join(path, fname), expected).items():
            parsed = _parse_key(key)
            if parsed is None:
                raise CheckpointError(f"checkpoint file {os.path.join(path, fname)}: "
                                      f"{key!r} is not a checkpoint key")
            group, field, shard, _ = parsed
            fields = out.setdefault(group, {})
            if not fields:
                out.shards[group] = []
            fields.setdefault(field, []).append(t)
            out.field_shards.setdefault(group, {}).setdefault(field, []).append(shard)
            shards = out.shards[group]
            if not shards or shards[-1] != shard:
                shards.append(shard)
        for child in expected.get("dense_rows", []):  # rows 0..n-1 in storage order
            fields, shard = out[_esc(child)], out.field_shards[_esc(child)]["id"][-1]
            fields.setdefault("row", []).append(torch.arange(fields["id"][-1].numel()))
            out.field_shards[_esc(child)].setdefault("row", []).append(shard)
    return out


class Loader:
    """Load a checkpoint into tables and dense tensors.

    A table's contents are **replaced** (rows that exist now but not in the checkpoint are
    removed); dims, dtypes and slot names are checked, and only the IDs of the table's slice
    are taken, so a checkpoint written by N shards loads into M. With ``strict=True``
    (default) a logical table or slot missing on either side, or a dense tensor missing, is an
    error; ``strict=False`` loads what matches and returns what did not.

    Args:
        checkpoint_path (str): a checkpoint directory (a delta loads its whole chain), or one
            in RecIS's layout (``index`` and ``tensorkey.json``: see
            :mod:`recis.serialize.recis_format`).
        hashtables (dict[str, HashTable]): the tables to fill.
        tensors (dict[str, Tensor]): dense tensors, filled in place.
        parallel (int): accepted for RecIS compatibility.
        filter_func (callable, optional): ``f(plan) -> plan`` where plan is
            ``{child: [slots]}``, to load a subset.
        strict (bool): see above. Default: True.
    """

    def __init__(self, checkpoint_path: str, hashtables: Any = None,
                 tensors: Mapping | None = None, parallel: int = 16,
                 filter_func: Callable | None = None, strict: bool = True):
        self.path = os.path.abspath(checkpoint_path)
        self.tables = _tables_of(hashtables)
        self.tensors = dict(tensors or {})
        self.filter_func = filter_func
        self.strict = strict

    def load(self) -> dict[str, list[str]]:
        """Load; returns ``{"missing": [...], "unexpected": [...]}`` (empty when strict)."""
        if recis_format.is_recis_layout(self.path):
            return recis_format.load_recis(self.path, self.tables, self.tensors,
                                           self.filter_func, self.strict)
        paths = chain(self.path)
        indexes = [read_index(p) for p in paths]
        last = indexes[-1]
        children = _children(self.tables)
        plan = {c: _saved_slots(t.store) for c, (t, _) in children.items()}
        if self.filter_func is not None:
            plan = self.filter_func(plan)
        missing, unexpected = [], []
        for child in plan:
            if child not in last["tables"]:
                missing.append(child)
                continue
            saved = last["tables"][child]
            table = children[child][0]
            if saved["embedding_shape"] != list(table.embedding_shape):
                raise CheckpointError(
                    f"table {child!r}: checkpoint rows have shape {saved['embedding_shape']}, "
                    f"the table {list(table.embedding_shape)}"
                )
            for slot in plan[child]:
                if slot not in saved["slots"]:
                    missing.append(f"{child}.{slot}")
                    continue
                spec = table.store.slot_spec(slot)
                info = saved["slots"][slot]
                if info["shape"] != list(spec.row_shape) or dtype_from_name(
                        info["dtype"]) != spec.dtype:
                    raise CheckpointError(
                        f"{child}.{slot}: checkpoint has shape {info['shape']} "
                        f"{info['dtype']}, the table {list(spec.row_shape)} {spec.dtype}"
                    )
            unexpected += [f"{child}.{s}" for s in saved["slots"] if s not in plan[child]]
        unexpected += [c for c in last["tables"] if c not in plan]
        missing += [name for name in self.tensors if name not in last["dense"]]
        if self.strict and (missing or unexpected):
            raise CheckpointError(
                f"Error(s) in loading checkpoint {self.path}:\n"
                f"    Missing: {sorted(missing)}\n    Unexpected: {sorted(unexpected)}\n"
                "(pass strict=False to load what matches)"
            )
        # Read and verify every file of the chain before touching any table.
        contents = [_read_sparse(p, ix) for p, ix in zip(paths, indexes, strict=True)]
        dense = {}
        if self.tensors and DENSE_FILE in last["files"]:
            dense = read_safetensors(os.path.join(paths[-1], DENSE_FILE),
                                     last["files"][DENSE_FILE])
        for name, target in self.tensors.items():
            if name in dense and (dense[name].shape != target.shape
                                  or dense[name].dtype != target.dtype):
                raise CheckpointError(
                    f"dense tensor {name!r}: checkpoint {tuple(dense[name].shape)} "
                    f"{dense[name].dtype}, target {tuple(target.shape)} {target.dtype}"
                )
        tables = list({id(t): t for t, _ in children.values()}.values())  # unique, in order
        for table in tables:
            kids = table.children_hashtable
            present = [c for c in kids if c in plan and c in last["tables"]]
            if not present:
                continue
            exact = (
                self.filter_func is None
                and all(ix["shard_num"] == 1 for ix in indexes)
                and last["physical"].get(table.name) == kids
                and table.slice == Slice(0, SLICE_SIZE, SLICE_SIZE)
                and all(_rec(table.name, "layout") in c for c in contents)  # not filtered out
            )
            if exact:
                _restore_exact(table, contents)
            else:
                _restore_by_id(table, contents, indexes, plan)
            _restore_policies(table, contents[-1], last.get("policies", {}), exact,
                              last["shard_num"])
            table.store.mark_saved()
        with torch.no_grad():
            for name, target in self.tensors.items():
                if name in dense:
                    target.copy_(dense[name])
        return {"missing": sorted(missing), "unexpected": sorted(unexpected)}

    @property
    def extra(self) -> dict:
        """The ``extra`` state stored with the checkpoint (e.g. the training step)."""
        return read_index(self.path).get("extra", {})


def _cat(fields: Mapping[str, list[Tensor]], name: str) -> Tensor:
    parts = fields[name]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _RowReplay:
    """Replays the row records of one physical table along a checkpoint chain.

    Each checkpoint of the chain holds the storage rows written since the previous one: live
    rows per child (``id``, ``row``, slot values), rows without an ID (``unused``), the
    allocator ``layout`` and the initializer's ``rng``. The replay tracks which ID owns each
    row and hands every block of slot values to ``write(slot, rows, values)``.
    """

    def __init__(self, physical: str, children: list[str], device: torch.device):
        self.phys, self.children, self.device = "@" + _esc(physical), children, device
        self.owned = torch.zeros(0, dtype=torch.bool, device=device)
        self.owner_id = torch.zeros(0, dtype=torch.int64, device=device)
        self.owner_tag = torch.zeros(0, dtype=torch.int64, device=device)
        self.layout: dict[str, Tensor] = {}
        self.rng: Tensor | None = None

    @property
    def capacity(self) -> int:
        return int(self.layout["capacity"][0])

    def apply(self, content: dict, write: Callable[[str, Tensor, Tensor], None],
              grow: Callable[[int], None], owners: bool = True) -> None:
        """Replay one checkpoint of the chain; ``owners=False`` hands out the slot values
        and the layout only (the caller finds the owners another way)."""
        self.layout = {f: _cat(content[self.phys + ".layout"], f)
                       for f in content[self.phys + ".layout"]}
        grow(self.capacity)
        extra = self.capacity - self.owned.numel()
        if owners and extra > 0:
            self.owned, self.owner_id, self.owner_tag = (
                torch.cat([t, t.new_zeros(extra)]) if t.numel() else t.new_zeros(extra)
                for t in (self.owned, self.owner_id, self.owner_tag))
        groups = [(content.get(self.phys + ".unused", {}), None)]
        groups += [(content.get(_esc(c), {}), i) for i, c in enumerate(self.children)]
        for fields, idx in groups:
            if "row" not in fields:
                continue
            rows = _cat(fields, "row").to(self.device)
            if owners:
                self._own(rows, idx, fields)
            for name in fields:
                if name not in ("row", "id", "deleted_id"):
                    write(name, rows, _cat(fields, name).to(self.device))
        if owners:
            # rows the allocator holds as free, or never handed out, belong to no ID (their
            # removal may predate this record: a delta lists only rows written since its base)
            free = self.layout.get("free")
            if free is not None and free.numel():
                self.owned[free.to(self.device)] = False
            self.owned[int(self.layout["next_row"][0]):] = False
        if self.phys + ".rng" in content:
            self.rng = _cat(content[self.phys + ".rng"], "state")

    def _own(self, rows: Tensor, idx: int | None, fields: dict) -> None:
        """Rows written by child ``idx`` (None: rows without an ID) now belong to it.
        index_fill_/index_copy_: a third of the time of ``t[rows] = v`` on 10M rows, and a
        negative row is an error instead of counting from the end."""
        self.owned.index_fill_(0, rows, idx is not None)
        if idx is not None:
            self.owner_id.index_copy_(0, rows, _cat(fields, "id").to(self.device))
            self.owner_tag.index_fill_(0, rows, idx)

    def live(self, child: int | None = None) -> Tensor:
        """Rows owned by an ID (of one child, or any), ascending."""
        mask = self.owned if child is None else self.owned & (self.owner_tag == child)
        return mask.nonzero().squeeze(1)


class _SoleOwner:
    """The rows of a chain of one checkpoint whose rows belong to one child and ascend (a full
    save is written in storage order): :meth:`live` reads the owners from the file's arrays,
    without the replay's per-row owner arrays (three arrays the size of the table, filled and
    searched). ``dense``: the rows are 0..n-1, so slot values written at this very tensor
    of rows (the replay hands it out) are copied as one range."""

    def __init__(self, tag: int, rows: Tensor, ids: Tensor):
        self.tag, self.rows, self.ids = tag, rows, ids
        self.dense = _zero_to_n(rows)

    @classmethod
    def of(cls, replay: _RowReplay, contents: list[dict]) -> _SoleOwner | None:
        """None where the general replay is needed."""
        if len(contents) != 1:
            return None
        groups = [(i, contents[0][_esc(c)]) for i, c in enumerate(replay.children)
                  if _esc(c) in contents[0] and "row" in contents[0][_esc(c)]]
        if len(groups) != 1:
            return None
        tag, fields = groups[0]
        rows = _cat(fields, "row").to(replay.device)
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            return None  # repeated or unordered rows: the replay decides who owns them
        return cls(tag, rows, _cat(fields, "id").to(replay.device))

    def live(self, layout: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, tags, rows)`` of the live entries: rows below the allocator's high-water
        mark and not free (the replay's rule; rows without an ID never shadow a child's row,
        as children are replayed after them)."""
        rows, ids, next_row = self.rows, self.ids, int(layout["next_row"][0])
        free = layout.get("free")
        free = None if free is None or not free.numel() else free.to(rows.device)
        if not (self.dense and free is None and rows.numel() <= next_row):
            keep = rows < next_row
            if free is not None:
                keep &= ~torch.isin(rows, free)
            if not bool(keep.all()):
                rows, ids = rows[keep], ids[keep]
        tags = torch.full((1,), self.tag, dtype=torch.int64, device=rows.device)
        return ids, tags.expand(rows.numel()), rows


def _restore_exact(table: HashTable, contents: list[dict]) -> None:
    """Replay a chain row by row: same IDs on the same rows, same values, same allocator state
    and seed of initial values; so training continues exactly as if it had not stopped. Slots
    or rows the checkpoint does not hold (a slot added since, another block size, rows without
    an ID) get their defaults."""
    layout_fields = contents[-1][_rec(table.name, "layout")]
    layout = {f: _cat(layout_fields, f) for f in ("capacity", "next_row")}
    capacity = int(layout["capacity"][0])
    replay = _RowReplay(table.name, table.children_hashtable, table.device)
    slots = set(table.slot_names)
    writes: list[tuple[str, Tensor, Tensor]] = []  # in chain order: later ones win
    with table.store.restoring(capacity) as restore:
        capacity = restore.capacity  # rounded up to this table's block size

        def write(slot: str, rows: Tensor, values: Tensor) -> None:
            if slot not in slots:
                return
            if owners is not None and owners.dense and rows is owners.rows and (
                    rows.numel() <= capacity):  # the file's rows 0..n-1: copied as one range
                writes.append((slot, slice(0, rows.numel()), values))
                return
            if rows.numel() and int(rows.max()) >= capacity:  # rows past a smaller capacity
                keep = rows < capacity
                rows, values = rows[keep], values[keep]
            writes.append((slot, rows, values))

        owners = _SoleOwner.of(replay, contents)
        for content in contents:
            replay.apply(content, write, lambda _: None, owners=owners is None)
        if owners is None:
            rows = replay.live()  # ascending
            ids, tags = replay.owner_id[rows], replay.owner_tag[rows]
        else:
            ids, tags, rows = owners.live(replay.layout)
        if rows.numel() and int(rows[-1]) >= capacity:
            keep = rows < capacity
            ids, tags, rows = ids[keep], tags[keep], rows[keep]
        # the ID map is built (a kernel that releases the GIL) while the slots are filled
        with ThreadPoolExecutor(1) as pool:
            keys = pool.submit(restore.set_keys, ids, tags, rows,
                               int(replay.layout["next_row"][0]), replay.layout["free"])
            for slot, slot_rows, values in writes:
                restore.write(slot, slot_rows, values)
            keys.result()
    _restore_seed(table, contents[-1])


def _restore_seed(table: HashTable, content: dict) -> None:
    """The seed of initial values the table was saved with (new IDs get the rows they would
    have got had training not stopped)."""
    seeds = content.get(_rec(table.name, "layout"), {}).get("init_seed")
    if seeds:
        table.store.reseed(int(seeds[0][0]))


def _restore_policies(table: HashTable, content: _Content, policies: Mapping, exact: bool,
                      shard_num: int) -> None:
    """Give the table's admission and filter policies the state they had (a filter's clock,
    MinCount's counts). Admission policies the checkpoint names are created; the states of
    several saved shards are merged by each policy's ``merge_policy_states``, unless the
    table is one of ``shard_num`` shards of the same slices as when saved: then it takes its
    own shard's state (so N processes resume exactly)."""
    from recis.nn.hashtable_hook import AdmitHook

    attached = table.store.policies()
    states = {}
    for tag, key in policies.get(table.name, {}).items():
        kind, _, rest = key.partition(":")
        policy = attached.get(key)
        if policy is None and kind == "admit":
            spec = json.loads(rest)
            policy = table.admit_policy(AdmitHook(spec["name"], spec["params"]))
        if policy is None:
            continue  # a filter this table does not have
        group = _rec(table.name, f"policy_{tag}")
        fields = content.get(group, {})
        shards = content.shards.get(group, [])
        parts = content.field_shards.get(group, {})
        shard_states = [{f: v[parts[f].index(k)] for f, v in fields.items() if k in parts[f]}
                        for k in shards]
        own = [i for i, k in enumerate(shards)
               if gen_slice(k, shard_num, table.slice.slice_size) == table.slice]
        if exact and len(shard_states) == 1:
            states[key] = shard_states[0]
        elif own:  # the same sharding as when saved: this shard's own state
            states[key] = shard_states[own[0]]
        elif shard_states:
            states[key] = type(policy).merge_policy_states(shard_states)
    table.store.load_policy_states(states)


def _merge_by_id(contents: list[dict], indexes: list[dict], child: str
                 ) -> dict[str, Tensor] | None:
    """A child's live rows after a chain, by ID: ``{"id": ..., slot: ...}`` (None if absent)."""
    cur = None
    for content, index in zip(contents, indexes, strict=True):
        fields = content.get(_esc(child))
        if fields is None:
            continue
        if child in index.get("replaced", []):
            cur = None  # this checkpoint holds all of the child's rows
        if "deleted_id" in fields and cur is not None:
            keep = ~torch.isin(cur["id"], _cat(fields, "deleted_id"))
            cur = {f: v[keep] for f, v in cur.items()}
        if "id" in fields:
            new = {f: _cat(fields, f) for f in fields if f not in ("deleted_id", "row")}
            if cur is not None:
                keep = ~torch.isin(cur["id"], new["id"])
                cur = {f: torch.cat([cur[f][keep], new[f]]) for f in new}
            else:
                cur = new
    return cur


def _restore_by_id(table: HashTable, contents: list[dict], indexes: list[dict],
                   plan: Mapping) -> None:
    """Replace the table's rows with the checkpoint's IDs of this table's slice (resharding,
    partial loads): values are exact; row positions are new; slots the checkpoint does not
    hold get their defaults."""
    store = table.store
    table.clear()
    for idx, child in enumerate(table.children_hashtable):
        if child not in plan:
            continue
        state = _merge_by_id(contents, indexes, child)
        if state is None:
            continue
        ids = state["id"].to(table.device)
        keep = in_slice(ids, table.slice)
        ids = ids[keep]
        if ids.numel() == 0:
            continue
        rows = store.lookup_or_insert(ids, None if idx == 0 else torch.full_like(ids, idx))
        for slot in plan[child]:
            if slot in state:
                store.write(slot, rows, state[slot].to(table.device)[keep])
    _restore_seed(table, contents[-1])


def read_dense(path: str) -> dict[str, Tensor]:
    """The dense tensors of a checkpoint (checksum verified)."""
    index = read_index(path)
    if DENSE_FILE not in index["files"]:
        return {}
    return read_safetensors(os.path.join(path, DENSE_FILE), index["files"][DENSE_FILE])


class CheckpointReader:
    """Read-only view of a checkpoint: names, shapes, dtypes and values of its tensors.

    Sparse tensors are named ``child@field`` (``field`` is ``id`` or a slot), concatenated over
    shards, with the names as given (unescaped); a physical table's records are
    ``@table.record@field``; dense tensors by their name. Example::

        r = CheckpointReader("ckpt/ckpt_000100")
        r.tensor_names()                   # ['item@embedding', 'item@id', ..., 'dense.weight']
        r.read_tensor("item@embedding")    # rows in the order of r.read_tensor("item@id")
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._cache: dict[str, Tensor] | None = None
        if recis_format.is_recis_layout(self.path):  # RecIS's layout: no index.json, no extra
            self.index: dict = {}
            self._cache = recis_format.read_recis_tensors(self.path)
            return
        self.index = read_index(self.path)

    def _all(self) -> dict[str, Tensor]:
        if self._cache is None:
            named = []
            for group, fields in _read_sparse(self.path, self.index).items():
                for field, parts in fields.items():
                    named.append((f"{_display(group)}@{field}", torch.cat(parts)))
            if DENSE_FILE in self.index["files"]:
                named += read_safetensors(os.path.join(self.path, DENSE_FILE),
                                          self.index["files"][DENSE_FILE]).items()
            out = dict(named)
            if len(out) != len(named):
                raise CheckpointError(f"{self.path}: two tensors have the same name "
                                      "(a table named like another's records or a dense tensor)")
            self._cache = out
        return self._cache

    def tensor_names(self) -> list[str]:
        return sorted(self._all())

    def read_tensor(self, name: str) -> Tensor:
        try:
            return self._all()[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}; see tensor_names()") from None

    def tensor_shape(self, name: str) -> list[int]:
        return list(self.read_tensor(name).shape)

    def tensor_dtype(self, name: str) -> torch.dtype:
        return self.read_tensor(name).dtype

    @property
    def extra(self) -> dict:
        return self.index.get("extra", {})


def compact(path: str, out: str) -> str:
    """Write the state at checkpoint ``path`` (a delta and its chain) as one full checkpoint
    at ``out``, restorable exactly like the chain; returns ``out``."""
    paths = chain(path)
    indexes = [read_index(p) for p in paths]
    last = indexes[-1]
    if any(ix["shard_num"] != 1 for ix in indexes):
        raise CheckpointError("compact() handles single-shard checkpoints; load the chain into "
                              "the tables and save a full checkpoint instead")
    contents = [_read_sparse(p, ix) for p, ix in zip(paths, indexes, strict=True)]
    data: dict[str, Tensor] = {}
    for phys_name, kids in last["physical"].items():
        kept = [c for c in kids if c in last["tables"]]
        if not kept:  # a save's filter_func dropped the whole table
            continue
        if not all(_rec(phys_name, "layout") in c for c in contents):
            raise CheckpointError(f"compact() needs the allocator layout of table {phys_name!r} "
                                  "in every checkpoint of the chain; a filter_func dropped it")
        slots = last["tables"][kept[0]]["slots"]
        replay = _RowReplay(phys_name, kids, torch.device("cpu"))
        storage = {s: torch.zeros(0, *info["shape"], dtype=dtype_from_name(info["dtype"]))
                   for s, info in slots.items()}  # every slot, also of a table without rows

        def grow(capacity: int, storage=storage, slots=slots) -> None:
            for s, info in slots.items():
                have = storage.get(s)
                extra = capacity - (0 if have is None else have.shape[0])
                if extra > 0:
                    new = torch.zeros(extra, *info["shape"], dtype=dtype_from_name(info["dtype"]))
                    storage[s] = new if have is None else torch.cat([have, new])

        def write(slot: str, rows: Tensor, values: Tensor, storage=storage) -> None:
            if slot in storage:
                storage[slot][rows] = values

        for content in contents:
            replay.apply(content, write, grow)
        phys = "@" + _esc(phys_name)
        for idx, child in enumerate(kids):
            if child not in last["tables"]:  # nothing of it was saved
                continue
            rows = replay.live(idx)
            data[_key(child, "id", 0, 1)] = replay.owner_id[rows]
            data[_key(child, "row", 0, 1)] = rows
            for s, values in storage.items():
                data[_key(child, s, 0, 1)] = values[rows]
        rows = (~replay.owned).nonzero().squeeze(1)
        data[_gkey(phys + ".unused", "row", 0, 1)] = rows
        for s, values in storage.items():
            data[_gkey(phys + ".unused", s, 0, 1)] = values[rows]
        for f, v in replay.layout.items():
            data[_gkey(phys + ".layout", f, 0, 1)] = v
        if replay.rng is not None:
            data[_gkey(phys + ".rng", "state", 0, 1)] = replay.rng
        for name, fields in contents[-1].items():  # policies' state, as last saved
            if name.startswith(phys + ".policy_"):
                for f in fields:
                    data[_gkey(name, f, 0, 1)] = _cat(fields, f)
    if os.path.exists(out):
        raise CheckpointError(f"{out} already exists")
    staging = _staging(out)
    os.makedirs(staging, exist_ok=True)
    files = {_sparse_file(0, 1): write_safetensors(os.path.join(staging, _sparse_file(0, 1)),
                                                   data)}
    if DENSE_FILE in last["files"]:
        shutil.copy2(os.path.join(paths[-1], DENSE_FILE), os.path.join(staging, DENSE_FILE))
        files[DENSE_FILE] = last["files"][DENSE_FILE]
    written = _written(data)
    tables = {c: {**info, "slots": {s: v for s, v in info["slots"].items()
                                    if s in written[_esc(c)]},
                  "fields": sorted(written[_esc(c)])}
              for c, info in last["tables"].items()}
    rows_per_child = {c: int(data[_key(c, "id", 0, 1)].numel()) for c in tables}
    index = {**last, "kind": "full", "base": None, "shard_num": 1, "files": files,
             "tables": tables, "rows": rows_per_child, "replaced": []}
    _publish_dir(staging, out, index)
    return out
