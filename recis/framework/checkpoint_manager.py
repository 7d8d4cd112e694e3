"""CheckpointManager: periodic, atomic checkpoints of a whole training state, and resume.

One checkpoint holds, from the same moment: every table's rows and slots (embeddings,
optimizer moments, filter stamps), the model's dense state (parameters and buffers, so the
filters' step counters too), the dense optimizer and LR scheduler, the sparse optimizer's
per-table counters, torch's RNG state, the step and any extra state (e.g. the data position).
Nothing is pickled: tensors go to safetensors, the rest to JSON in the index.

Layout of ``output_dir``::

    ckpt_000000100/   ckpt_000000200/   ...   latest   (the name of the newest checkpoint)

``latest`` is replaced atomically after a checkpoint is complete, so a crash at any point
leaves the previous checkpoint as ``latest``. ``latest`` must hold the plain name of a
checkpoint directory of ``output_dir`` (no path, not a symbolic link): anything else is a
:class:`CheckpointError`, never a load from elsewhere. Temporary files ``*.tmp-<pid>`` that a
killed save left in ``output_dir`` are removed by the next save once their process is gone.

Non-blocking saves (``save(step, blocking=False)``, or ``async_save=True`` for every save):
the state at ``step`` is copied in memory (the tables' saved slots, IDs and allocator state,
the dense state: a copy as large as the saved slots) and a background thread writes it,
publishes it and moves ``latest`` while training goes on; the checkpoint holds exactly the
state at ``step``. One save runs at a time: a save requested while one is being written
**waits** for it first (so does :meth:`~CheckpointManager.restore`); :meth:`~CheckpointManager.wait`
waits for it and raises its error if it failed. Under ``torch.distributed`` every rank copies
its shard at the same step; the threads use no collective (they would race with training's
on the same group): each writes its files, and the last to finish publishes the checkpoint
(see :class:`~recis.serialize.checkpoint.SaveSnapshot`) and moves ``latest``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from recis.distributed.sharding import collective_device
from recis.nn.modules.hashtable import split_sparse_dense_state_dict
from recis.serialize._files import (
    CheckpointError,
    atomic_write_bytes,
    is_plain_name,
    read_regular,
)
from recis.serialize.checkpoint import (
    Loader,
    Saver,
    SaveSnapshot,
    SnapshotBuffers,
    _staging,
    chain,
    read_dense,
    read_index,
)
from recis.utils.checks import check_positive_int
from recis.utils.logger import Logger

logger = Logger(__name__)

__all__ = ["CheckpointManager"]

LATEST = "latest"
_PREFIX = "ckpt_"
_TMP = re.compile(r".+\.tmp-([0-9]{1,10})")  # atomic_write_bytes' temporary files


def _pid_alive(pid: int) -> bool:
    """True unless process ``pid`` surely does not exist (of this host's PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:  # larger than any PID
        return False
    return True


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON skeleton of a nested state (dicts, lists, numbers, strings) with tensors moved to
    ``tensors`` and replaced by ``{"__tensor__": key}``."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_flatten(k, f"{prefix}/k{i}", tensors),
                              _flatten(v, f"{prefix}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix!r} without pickle")


def _unflatten(obj: Any, tensors: Mapping[str, Tensor], where: str) -> Any:
    """Inverse of :func:`_flatten`; a skeleton that is not one (an unknown tensor, a malformed
    node) is a CheckpointError naming ``where``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"{where}: no dense tensor {key!r} in the checkpoint")
            return tensors[key].clone()
        if set(obj) == {"__dict__"} and isinstance(obj["__dict__"], list) and all(
                isinstance(kv, list) and len(kv) == 2 for kv in obj["__dict__"]):
            out = {}
            for k, v in obj["__dict__"]:
                k, v = _unflatten(k, tensors, where), _unflatten(v, tensors, where)
                try:
                    out[k] = v
                except TypeError:  # an unhashable key
                    raise CheckpointError(f"{where}: a dict key {k!r} is not hashable") from None
            return out
        if set(obj) == {"__tuple__"} and isinstance(obj["__tuple__"], list):
            return tuple(_unflatten(v, tensors, where) for v in obj["__tuple__"])
        raise CheckpointError(f"{where}: not a state written by CheckpointManager: {obj!r:.80}")
    if isinstance(obj, list):
        return [_unflatten(v, tensors, where) for v in obj]
    return obj


class CheckpointManager:
    """Save and restore training state under ``output_dir``.

    Args:
        model (nn.Module): the model (its tables and dense state).
        sparse_optimizer (SparseOptimizer, optional): the tables' optimizer.
        dense_optimizer (torch.optim.Optimizer, optional): the dense optimizer.
        lr_scheduler (optional): a torch LR scheduler.
        output_dir (str): where checkpoints live. Default: ``"output_dir"``.
        save_interval (int): :meth:`step` saves every this many steps. Default: 1000.
        max_keep (int): checkpoints kept; older ones are deleted (never the base of a kept
            incremental checkpoint). Default: 5.
        incremental_every (int): every save but one in this many is incremental (only the
            rows changed since the previous save); 0 or 1: always full. Default: 0.
        async_save (bool): saves (:meth:`step`, and :meth:`save` without ``blocking``) copy
            the state and write it in a background thread (see the module docstring).
            Default: False.

    Example::

        manager = CheckpointManager(model, sparse_opt, dense_opt, output_dir="run1",
                                    save_interval=500)
        step = manager.restore() or 0     # resume if run1 holds a checkpoint
        for batch in data: ...; step += 1; manager.step(step)
        manager.wait()                    # with async_save: the last save is on disk
    """

    def __init__(self, model: nn.Module, sparse_optimizer: Any = None,
                 dense_optimizer: Any = None, lr_scheduler: Any = None,
                 output_dir: str = "output_dir", save_interval: int = 1000, max_keep: int = 5,
                 incremental_every: int = 0, async_save: bool = False):
        for name, value in (("save_interval", save_interval), ("max_keep", max_keep)):
            check_positive_int(value, name)
        self.model = model
        self.sparse_optimizer = sparse_optimizer
        self.dense_optimizer = dense_optimizer
        self.lr_scheduler = lr_scheduler
        self.output_dir = os.path.abspath(output_dir)
        self.save_interval = save_interval
        self.max_keep = max_keep
        self.incremental_every = incremental_every
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be a bool, got {async_save!r}")
        self.async_save = async_save
        self._saves = 0
        self._writer: threading.Thread | None = None  # the background save, if one runs
        self._writer_error: BaseException | None = None
        self._buffers = SnapshotBuffers()  # the snapshots' copies, reused
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    # -- paths -------------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        """Names of the complete checkpoints, oldest first."""
        if not os.path.isdir(self.output_dir):
            return []
        names = [n for n in os.listdir(self.output_dir) if n.startswith(_PREFIX)
                 and not os.path.islink(os.path.join(self.output_dir, n))
                 and os.path.isfile(os.path.join(self.output_dir, n, "index.json"))]
        return sorted(names)

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint (from ``latest``), or None.

        ``latest`` must be a regular file (not a symbolic link or FIFO) holding the plain name
        of a checkpoint directory of ``output_dir`` that is not a symbolic link; a path
        (``../x``, ``/x``) or a name of something else is a :class:`CheckpointError`, as is a
        pointer to a checkpoint that does not load (see :func:`read_index`)."""
        pointer = os.path.join(self.output_dir, LATEST)
        if not os.path.lexists(pointer):
            return None
        raw = read_regular(pointer, "the 'latest' pointer", max_bytes=4096)
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{pointer} is corrupted: not text") from None
        if not is_plain_name(name):
            raise CheckpointError(
                f"{pointer} must hold the name of a checkpoint directory in {self.output_dir} "
                f"(a plain name: no separator, no leading dot), got {name!r}"
            )
        path = os.path.join(self.output_dir, name)
        if os.path.islink(path):
            raise CheckpointError(f"{pointer} names {name!r}, a symbolic link; checkpoints "
                                  f"must be directories inside {self.output_dir}")
        read_index(path)  # a dangling pointer is an error worth hearing about
        return path

    # -- saving ------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _rng_states(self) -> dict[str, Tensor]:
        """torch's RNG state of every rank (collective), as ``rng/torch`` (one process) or
        ``rng/torch/<rank>``."""
        state = torch.get_rng_state()
        if self.world == 1:
            return {"rng/torch": state}
        device = collective_device()
        everyone = [torch.empty_like(state, device=device) for _ in range(self.world)]
        dist.all_gather(everyone, state.to(device))
        return {f"rng/torch/{k}": s.cpu() for k, s in enumerate(everyone)}

    def _state(self, step: int, extra: Mapping | None) -> tuple[dict, dict, dict]:
        state = self.model.state_dict()
        tables, dense = split_sparse_dense_state_dict(dict(state))
        tensors = {f"model/{k}": v for k, v in dense.items()}
        meta: dict[str, Any] = {"global_step": int(step), "extra": dict(extra or {}),
                                "world_size": self.world}
        if self.dense_optimizer is not None:
            meta["dense_optimizer"] = _flatten(self.dense_optimizer.state_dict(), "dense_opt",
                                               tensors)
        if self.lr_scheduler is not None:
            meta["lr_scheduler"] = _flatten(self.lr_scheduler.state_dict(), "sched", tensors)
        if self.sparse_optimizer is not None:
            meta["sparse_optimizer"] = self.sparse_optimizer.state_dict()
        return tables, tensors, meta

    def save(self, step: int, extra: Mapping | None = None,
             incremental: bool | None = None, blocking: bool | None = None) -> str:
        """Save the state at ``step`` as ``ckpt_<step>``; returns its path. ``extra``:
        JSON-able state.

        ``blocking=False`` (default: ``not async_save``) copies the state and returns; a
        background thread writes the checkpoint and moves ``latest`` (:meth:`wait` waits for
        it). A save requested while a background save runs waits for it first.

        Under ``torch.distributed`` every rank calls it (collective): each writes its shard
        of the tables into the one checkpoint directory, rank 0 the dense state (and every
        rank's RNG state) and, once all shards are in, the checkpoint is published and
        ``latest`` moved; a rank that dies before that leaves the previous checkpoint as
        ``latest``."""
        blocking = not self.async_save if blocking is None else blocking
        name = f"{_PREFIX}{int(step):09d}"
        path = os.path.join(self.output_dir, name)
        self._wait_everywhere()  # one save at a time: every rank's previous one is published
        os.makedirs(self.output_dir, exist_ok=True)
        previous = self.latest()
        if incremental is None:
            n = self.incremental_every
            incremental = n > 1 and previous is not None and self._saves % n != 0
        if incremental and previous is None:
            raise CheckpointError("an incremental save needs an earlier checkpoint in output_dir")
        tables, tensors, meta = self._state(step, extra)
        tensors.update(self._rng_states())
        json.dumps(meta)  # fail before writing anything if extra is not JSON-able
        self._barrier()  # every rank has read 'previous' before anything moves
        if self.rank == 0:
            if os.path.exists(path):
                if previous is not None and os.path.samefile(path, previous):
                    raise CheckpointError(f"{path} already exists and is the latest checkpoint")
                # published by a save that was interrupted before it moved 'latest': never
                # committed, so it is replaced
                logger.warning("replacing %s, left by an interrupted save", path)
                self._remove(name)
            # parts left by a killed save would be taken for this save's
            shutil.rmtree(_staging(path), ignore_errors=True)
        self._barrier()
        saver = Saver(self.rank, self.world, path=path, hashtables=tables,
                      tensors=tensors if self.rank == 0 else None)
        base = os.path.basename(previous) if incremental else None
        if blocking:
            saver.save(incremental=incremental, base=base, extra=meta)
            if self.rank == 0:
                self._commit(name)
            self._barrier()  # 'latest' names the new checkpoint for every rank
        else:
            snapshot = saver.snapshot(incremental=incremental, base=base, extra=meta,
                                      buffers=self._buffers)
            self._writer = threading.Thread(target=self._write_in_background,
                                            args=(snapshot, name), name=f"recis-save-{name}")
            self._writer.start()  # not a daemon: the interpreter waits for it at exit
        self._saves += 1
        logger.info("%s %s%s", "saved" if blocking else "saving in the background", path,
                    " (incremental)" if incremental else "")
        return path

    def _commit(self, name: str) -> None:
        """After ``name`` is published: point ``latest`` at it, delete old checkpoints."""
        atomic_write_bytes(os.path.join(self.output_dir, LATEST), name.encode())
        self._prune()

    def _write_in_background(self, snapshot: SaveSnapshot, name: str) -> None:
        try:
            if snapshot.write():  # this rank's part was the last: it published
                self._commit(name)
        except BaseException as e:  # handed to the training thread by wait()
            self._writer_error = e

    def wait(self) -> None:
        """Wait for the background save, if one runs; raise its error if it failed (the
        checkpoint was not published and ``latest`` still names the previous one)."""
        error = self._join()
        if error is not None:
            raise CheckpointError(f"the background save failed: {type(error).__name__}: "
                                  f"{error}") from error

    def _join(self) -> BaseException | None:
        """Wait for the background save; its error, if it failed (then forgotten)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._writer_error = self._writer_error, None
        return error

    def _wait_everywhere(self) -> None:
        """:meth:`wait` on every rank (collective): a failed background save on any rank is
        an error on all of them, so that none is left waiting in a collective."""
        error = self._join()
        failed = error is not None
        if self.world > 1:
            flag = torch.tensor([int(failed)], device=collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if int(flag.item()) and not failed:
                raise CheckpointError("the previous background save failed on another rank; "
                                      "see its error")
        if failed:
            raise CheckpointError(f"the background save failed: {type(error).__name__}: "
                                  f"{error}") from error

    @property
    def saving(self) -> bool:
        """True while a background save is being written."""
        return self._writer is not None and self._writer.is_alive()

    def step(self, global_step: int, extra: Mapping | None = None) -> str | None:
        """Save if ``global_step`` is a multiple of ``save_interval``."""
        if global_step > 0 and global_step % self.save_interval == 0:
            return self.save(global_step, extra)
        return None

    def _prune(self) -> None:
        self._remove_stale_tmp()
        names = self.checkpoints()
        keep = set(names[-self.max_keep:])
        for name in list(keep):  # keep every checkpoint a kept one depends on
            keep.update(os.path.basename(p) for p in chain(os.path.join(self.output_dir, name)))
        for name in os.listdir(self.output_dir):  # left by interrupted saves and removals
            if name.startswith(f".{_PREFIX}") and name.endswith((".partial", ".removing")):
                shutil.rmtree(os.path.join(self.output_dir, name), ignore_errors=True)
        for name in names:
            if name not in keep:
                self._remove(name)

    def _remove_stale_tmp(self) -> None:
        """Remove the ``<name>.tmp-<pid>`` files that saves killed before their rename left in
        ``output_dir``: only those whose process no longer exists (``os.kill(pid, 0)`` raises
        ProcessLookupError), never one of a live process (it may be writing it). Processes
        are those of this host: do not share ``output_dir`` between hosts that save."""
        for name in os.listdir(self.output_dir):
            m = _TMP.fullmatch(name)
            if m is None or int(m.group(1)) <= 0 or _pid_alive(int(m.group(1))):
                continue
            path = os.path.join(self.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                continue  # not a file atomic_write_bytes writes
            try:
                os.unlink(path)
                logger.info("removed %s, left by a killed save", path)
            except FileNotFoundError:
                pass

    def _remove(self, name: str) -> None:
        """Delete a checkpoint so that it is never seen half deleted under its name: rename it
        away first (atomic), then delete the files."""
        doomed = os.path.join(self.output_dir, f".{name}.removing")
        os.rename(os.path.join(self.output_dir, name), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------
    def restore(self, path: str | None = None, strict: bool = True) -> int | None:
        """Load ``path`` (default: the latest checkpoint) into the model and optimizers;
        returns the restored step, or None when there is nothing to restore. Under
        ``torch.distributed`` every rank loads the IDs of its own slice (a checkpoint of N
        ranks loads into M), the dense state, and its own RNG state when N == M.

        The index, the dense tensors and the saved state of the dense optimizer and LR
        scheduler are read and checked before anything is loaded: a checkpoint that was not
        written by a CheckpointManager (no integer ``global_step``) or whose state skeletons
        name tensors it lacks is a :class:`CheckpointError` and leaves the model untouched.
        State that does not fit the optimizers (their own ``load_state_dict`` rejects it) is
        a :class:`CheckpointError` too, raised after the tables were loaded."""
        self.wait()
        path = path or self.latest()
        if path is None:
            return None
        where = os.path.join(path, "index.json")
        meta = read_index(path)["extra"]
        dense = read_dense(path)
        step = meta.get("global_step")
        if type(step) is not int or not isinstance(meta.get("extra", {}), dict):
            raise CheckpointError(f"{where}: extra must hold the state CheckpointManager saves "
                                  "(an integer global_step and an extra object)")
        states = {name: _unflatten(meta[name], dense, f"{where}: extra[{name!r}]")
                  for name in ("dense_optimizer", "lr_scheduler") if name in meta}
        rng_key = "rng/torch" if self.world == 1 else f"rng/torch/{self.rank}"
        if meta.get("world_size", 1) != self.world:
            rng_key = None  # another number of processes: each keeps its own RNG
        rng = dense.get(rng_key) if rng_key else None
        if rng is not None and (rng.dtype != torch.uint8
                                or rng.shape != torch.get_rng_state().shape):
            raise CheckpointError(f"{where}: the dense tensor {rng_key!r} is not a torch RNG "
                                  f"state ({rng.dtype}, shape {list(rng.shape)})")
        tables, tensors_now, _ = self._state(0, None)
        model_tensors = {k: v for k, v in tensors_now.items() if k.startswith("model/")}
        Loader(path, hashtables=tables, tensors=model_tensors, strict=strict).load()
        if rng is not None:
            torch.set_rng_state(rng)
        for name, target in (("dense_optimizer", self.dense_optimizer),
                             ("lr_scheduler", self.lr_scheduler),
                             ("sparse_optimizer", self.sparse_optimizer)):
            if target is None or name not in meta:
                continue
            try:
                target.load_state_dict(states.get(name, meta[name]))
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f"{where}: extra[{name!r}] does not fit the "
                                      f"{name.replace('_', ' ')}: {type(e).__name__}: {e}") from e
        self.restored_extra = meta.get("extra", {})
        logger.info("restored %s (step %d)", path, step)
        return step
