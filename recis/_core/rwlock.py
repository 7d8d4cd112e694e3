"""A readers-writer lock: many readers at once, or one writer; re-entrant in one thread.

Writers are preferred (a waiting writer blocks new readers), so a stream of lookups cannot
starve a save or a filter run. A thread holding the write lock may take either lock again; a
thread holding only the read lock may take the read lock again but not the write lock (that
upgrade could deadlock with another reader doing the same, so it raises).

Example::

    lock = RWLock()
    with lock.read():      # lookups, gathers, saves
        ...
    with lock.write():     # inserts, removals, row updates, growth
        ...
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class RWLock:
    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding the read lock
        self._writer: int | None = None  # thread holding the write lock
        self._waiting_writers = 0
        self._local = threading.local()  # per thread: read depth, write depth

    def _depths(self) -> tuple[int, int]:
        return getattr(self._local, "read", 0), getattr(self._local, "write", 0)

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        reads, writes = self._depths()
        if reads or writes:  # already inside this lock in this thread
            self._local.read = reads + 1
            try:
                yield
            finally:
                self._local.read = reads
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.read = 1
        try:
            yield
        finally:
            self._local.read = 0
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        reads, writes = self._depths()
        if writes:
            self._local.write = writes + 1
            try:
                yield
            finally:
                self._local.write = writes
            return
        if reads:
            raise RuntimeError("a thread holding a table's read lock cannot take its write lock")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = threading.get_ident()
        self._local.write = 1
        try:
            yield
        finally:
            self._local.write = 0
            with self._cond:
                self._writer = None
                self._cond.notify_all()

    def write_held(self) -> bool:
        """Whether some thread holds the write lock (not necessarily the caller)."""
        with self._cond:
            return self._writer is not None

    # a table copied with copy.deepcopy or pickled gets a fresh, unlocked lock
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class CopyableLock:
    """A ``threading.Lock`` that survives ``copy.deepcopy`` and pickling (the copy gets a
    fresh, unlocked lock), for state that modules copy with themselves."""

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
