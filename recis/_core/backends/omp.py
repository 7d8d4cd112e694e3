"""Run the parallel range kernels on torch's own OpenMP threads (libgomp), not a second pool.

Why: torch's intra-op pool is libgomp. After each parallel region its idle workers spin
(unless ``OMP_WAIT_POLICY=PASSIVE`` was set before torch started), so threads of a second
pool of ours had to compete with them for the cores: a step of a table plus a small MLP got
slower with the default policy, while torch ops got faster with it. A library should not need
that environment tuning. Here a kernel call becomes one OpenMP parallel region of the calling
thread (``GOMP_parallel`` of the libgomp that torch has loaded, called through ctypes, which
releases the GIL): the caller is the team's master and torch's workers, spinning or asleep,
take the rest of the work, exactly as in a torch op.

How: every team thread runs a trampoline, a numba ``cfunc`` compiled per kernel and dtype,
that reads the kernel's arguments from a small int64 block (array addresses and shapes,
scalars; floats as their bit patterns) and claims chunks of ``[0, n)`` with an atomic
fetch-add on the block's first word until none are left, calling the kernel
``fn(*args, lo, hi)`` on each chunk. Claiming chunks, rather than one range per thread
number, balances the load when a worker wakes up late and works with any team size libgomp
grants. Ranges write disjoint outputs, so results equal the single-threaded result.

Under ``OMP_WAIT_POLICY=PASSIVE`` the workers sleep between regions and each call pays their
wake-up (0.1-0.3 ms on a 2-vCPU VM), as torch's own ops do; the caller starts on its chunks
at once meanwhile. With the policy unset, a call that follows a torch op finds them spinning.

:func:`run` returns False (and does nothing) when this path cannot serve a call, and the
caller then uses its thread pool: torch not built with libgomp, no ``GOMP_parallel`` found,
``RECIS_PARALLEL=pool``, a forked child process (libgomp's pool does not survive ``fork``:
an OpenMP region in a child whose parent already ran one hangs, torch ops included; torch's
DataLoader workers avoid it with one thread, which needs no pool at all), or arguments of
an unexpected layout (non-contiguous arrays, another dtype).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable

import numpy as np
import torch
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from . import numba_kernels as _numba
from .numba_kernels import _as_pointer

logger = logging.getLogger(__name__)

ENV = "RECIS_PARALLEL"  # "omp" (default): torch's OpenMP threads; "pool": our thread pool
# Chunks of [0, n) per team thread: finer chunks balance a worker that wakes up late (asleep
# under OMP_WAIT_POLICY=PASSIVE), each costs an atomic add and a prefetch ramp-up; 4, 8 and 16
# measured within 3% of each other on a forward + SparseAdamW step (4096 x 20 IDs, dim 64).
CHUNKS_PER_THREAD = 8
_HEADER = 3  # block words before the arguments: claim counter, n, chunk size
_SIG = types.void(types.voidptr)

# -- the trampolines (numba) -------------------------------------------------------------------


@intrinsic
def _fetch_add(typingctx, address, value):
    """Atomically add ``value`` to the int64 at ``address``; returns the previous value.
    Relaxed ordering is enough: the claimed chunks only need to be distinct, and the end of
    the parallel region (a team barrier) orders the kernels' writes before the caller reads."""
    if not isinstance(address, types.Integer) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ptr = builder.inttoptr(args[0], i64.as_pointer())
        val = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", ptr, val, "monotonic")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _address(typingctx, pointer):
    """A ``void*`` as an int64 address."""
    if pointer != types.voidptr:
        return None

    def codegen(context, builder, signature, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(pointer), codegen


@njit(inline="always", cache=True)
def _words(block, size):
    """The block as int64 words (its first word is the claim counter)."""
    return carray(block, (size,), np.int64)


@njit(inline="always", cache=True)
def _claim(block, b):
    """The next chunk ``(lo, hi)`` of ``[0, b[1])``; ``lo >= hi`` when none is left."""
    lo = _fetch_add(_address(block), b[2])
    return lo, min(lo + b[2], b[1])


@njit(inline="always", cache=True)
def _vec(b, k, dtype):
    return carray(_as_pointer(b[k]), (b[k + 1],), dtype)


@njit(inline="always", cache=True)
def _mat(b, k, dtype):
    return carray(_as_pointer(b[k]), (b[k + 1], b[k + 2]), dtype)


@njit(inline="always", cache=True)
def _flt(block, size, k):
    return carray(block, (size,), np.float64)[k]


# One factory per kernel; ``dt`` is the variable dtype of its ``D`` arrays (see _SPECS).
# ``stamp`` identifies the source of numba_kernels.py: numba's disk cache of a function only watches
# the file that defines it, but a trampoline embeds the kernel it calls, so the stamp, a
# closure variable, goes into the cache key (numba hashes closure variables into it) and an
# edited kernel is recompiled instead of running stale from the cache. The
# ``if stamp == 0`` test only makes the trampoline reference it.


def _map_lookup(dt, stamp):
    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, _HEADER + 9)
        if stamp == 0:
            return
        table = _mat(b, 3, np.int64)
        ids, tags, rows = _vec(b, 6, dt), _vec(b, 8, np.int64), _vec(b, 10, np.int64)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.map_lookup_range(table, ids, tags, rows, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _gather(dt, stamp):
    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, _HEADER + 5)
        if stamp == 0:
            return
        addresses, out = _vec(b, 3, np.int64), _mat(b, 5, dt)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.gather_range(addresses, out, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _bag_reduce(dt, stamp):
    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, _HEADER + 12)
        if stamp == 0:
            return
        addresses, inverse = _vec(b, 3, np.int64), _vec(b, 5, np.int64)
        offsets = _vec(b, 7, np.int64)
        weights, mean, out = _vec(b, 9, dt), b[11] != 0, _mat(b, 12, dt)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.bag_reduce_range(addresses, inverse, offsets, weights, mean, out, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _bag_backward(dt, stamp):
    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, _HEADER + 12)
        if stamp == 0:
            return
        starts, bag, coef = _vec(b, 3, np.int64), _vec(b, 5, np.int64), _vec(b, 7, np.float64)
        grad_out, grad_unique = _mat(b, 9, dt), _mat(b, 12, dt)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.bag_backward_range(starts, bag, coef, grad_out, grad_unique, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _adam(dt, stamp):
    size = _HEADER + 17

    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, size)
        if stamp == 0:
            return
        emb, m, v = _vec(b, 3, np.int64), _vec(b, 5, np.int64), _vec(b, 7, np.int64)
        grads = _mat(b, 9, dt)
        decay, beta1, c1 = _flt(block, size, 12), _flt(block, size, 13), _flt(block, size, 14)
        beta2, c2 = _flt(block, size, 15), _flt(block, size, 16)
        alpha, eps, l2 = _flt(block, size, 17), _flt(block, size, 18), _flt(block, size, 19)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.adam_update_range(emb, m, v, grads, decay, beta1, c1, beta2, c2, alpha, eps,
                                     l2, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _adagrad(dt, stamp):
    size = _HEADER + 10

    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, size)
        if stamp == 0:
            return
        emb, state_sum, grads = _vec(b, 3, np.int64), _vec(b, 5, np.int64), _mat(b, 7, dt)
        clr, eps, l2 = _flt(block, size, 10), _flt(block, size, 11), _flt(block, size, 12)
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.adagrad_update_range(emb, state_sum, grads, clr, eps, l2, lo, hi)
            lo, hi = _claim(block, b)

    return run


def _sgd(dt, stamp):
    size = _HEADER + 11

    @cfunc(_SIG, cache=True)
    def run(block):
        b = _words(block, size)
        if stamp == 0:
            return
        emb, buf, grads = _vec(b, 3, np.int64), _vec(b, 5, np.int64), _mat(b, 7, dt)
        lr, momentum, l2 = _flt(block, size, 10), _flt(block, size, 11), _flt(block, size, 12)
        nesterov = b[13] != 0
        lo, hi = _claim(block, b)
        while lo < hi:
            _numba.sgd_update_range(emb, buf, grads, lr, momentum, l2, nesterov, lo, hi)
            lo, hi = _claim(block, b)

    return run


# Argument kinds of each kernel, in order (``lo, hi`` excluded), and its trampoline factory.
# Arrays: "i8" int64, "f8" float64, "D" the kernel's variable dtype (one per call), each
# "…1" 1-D (address, length) or "…2" 2-D (address, rows, columns), C-contiguous.
# Scalars: "f" a float (its float64 bits), "b" a bool (0/1); one word each.
_F8 = ("f",) * 8
_SPECS: dict[object, tuple[tuple[str, ...], Callable]] = {
    _numba.map_lookup_range: (("i82", "D1", "i81", "i81"), _map_lookup),
    _numba.gather_range: (("i81", "D2"), _gather),
    _numba.bag_reduce_range: (("i81", "i81", "i81", "D1", "b", "D2"), _bag_reduce),
    _numba.bag_backward_range: (("i81", "i81", "f81", "D2", "D2"), _bag_backward),
    _numba.adam_update_range: (("i81", "i81", "i81", "D2", *_F8), _adam),
    _numba.adagrad_update_range: (("i81", "i81", "D2", "f", "f", "f"), _adagrad),
    _numba.sgd_update_range: (("i81", "i81", "D2", "f", "f", "f", "b"), _sgd),
}
# dtypes a "D" array may have (those of the numba slot store, and int64 IDs for lookups)
_DTYPES = {np.dtype(t) for t in (np.float32, np.float64, np.int64, np.int32, np.int8)}
_FIXED = {"i8": np.dtype(np.int64), "f8": np.dtype(np.float64)}


def _source_stamp() -> int:
    try:
        with open(_numba.__file__, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:  # pragma: no cover - no source file: numba cannot cache anyway
        return 1
    return int(digest[:15], 16) or 1


_STAMP = _source_stamp()

# -- the libgomp binding -----------------------------------------------------------------------


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _library_of(address: int) -> str | None:
    """Path of the loaded library that holds ``address`` (``dladdr``), or None."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):  # pragma: no cover - no dladdr in this libc
        return None
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def find_gomp_parallel() -> tuple[Callable | None, str]:
    """``(GOMP_parallel of the libgomp torch uses, where)`` or ``(None, why not)``.

    The symbol is looked up through torch's ``libtorch_cpu`` handle, so it resolves in that
    library's dependencies: the very OpenMP runtime torch's ops run on, even if another copy
    of libgomp is loaded too. Only libgomp (GNU) is accepted: its behaviour is what was
    measured and tested (another runtime may export a ``GOMP_parallel`` shim)."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "torch's parallel backend is not OpenMP"
    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                         "libtorch_cpu.*")))
    for path in libs:
        try:
            fn = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        where = _library_of(ctypes.cast(fn, ctypes.c_void_p).value) or "?"
        if "gomp" not in os.path.basename(where):
            return None, f"GOMP_parallel comes from {where}, not libgomp"
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        return fn, where
    return None, "no GOMP_parallel found through libtorch_cpu"


_gomp_parallel, _where = find_gomp_parallel()
_pid = os.getpid()  # libgomp's pool belongs to this process; a forked child must not use it
_trampolines: dict[tuple[object, np.dtype], int | None] = {}
_lock = threading.Lock()
calls = 0  # kernel calls served on OpenMP threads (for tests and benchmarks)


def status() -> str:
    """Why the OpenMP path is or is not used in this process (one line)."""
    if _gomp_parallel is None:
        return f"thread pool: {_where}"
    if os.getpid() != _pid:
        return "thread pool: forked child process (libgomp's pool does not survive fork)"
    if os.environ.get(ENV, "omp") == "pool":
        return f"thread pool: {ENV}=pool"
    return f"OpenMP threads of torch ({_where})"


def enabled() -> bool:
    """True when calls may run on torch's OpenMP threads (see the module docstring)."""
    if _gomp_parallel is None or os.getpid() != _pid:
        return False
    choice = os.environ.get(ENV, "omp")
    if choice not in ("omp", "pool"):
        raise ValueError(f"{ENV} must be 'omp' or 'pool', got {choice!r}")
    return choice == "omp"


def _trampoline(fn: object, dt: np.dtype) -> int | None:
    """Address of the compiled trampoline of ``fn`` for dtype ``dt`` (None if it failed)."""
    key = (fn, dt)
    try:
        return _trampolines[key]
    except KeyError:
        pass
    with _lock:
        if key not in _trampolines:
            try:
                address = _SPECS[fn][1](dt.type, _STAMP).address
            except Exception:  # a numba typing error must not break the kernel call
                logger.warning("no OpenMP trampoline for %s (%s); using the thread pool",
                               getattr(fn, "__name__", fn), dt, exc_info=True)
                address = None
            _trampolines[key] = address
    return _trampolines[key]


_pack_float = struct.Struct("<d").pack
_unpack_word = struct.Struct("<q").unpack


def _encode(spec: tuple[str, ...], args: tuple, n: int, chunk: int):
    """``(int64 block, D dtype)`` for the trampoline, or None if an argument does not fit."""
    words = [0, n, chunk]
    dt = None
    for kind, a in zip(spec, args, strict=True):
        if kind == "f":
            words.append(_unpack_word(_pack_float(a))[0])
        elif kind == "b":
            words.append(1 if a else 0)
        else:
            try:
                face = a.__array_interface__  # address, shape, strides (None: C-contiguous)
            except AttributeError:
                return None
            shape = face["shape"]
            if face["strides"] is not None or len(shape) != int(kind[-1]):
                return None
            want = _FIXED.get(kind[:-1])
            if want is None:  # "D"
                if dt is None:
                    dt = a.dtype
                want = dt
            if a.dtype != want:
                return None
            words.append(face["data"][0])
            words.extend(shape)
    if dt is None or dt not in _DTYPES:
        return None
    return np.array(words, np.int64), dt


def run(fn: object, n: int, args: tuple, threads: int) -> bool:
    """Run ``fn(*args, lo, hi)`` over ``[0, n)`` as one OpenMP parallel region of up to
    ``threads`` threads (this thread included); False, having done nothing, when this call
    cannot use the OpenMP path (the caller then uses its thread pool)."""
    global calls
    entry = _SPECS.get(fn)
    if entry is None or n <= 0 or not enabled():
        return False
    chunk = max(1, -(-n // (threads * CHUNKS_PER_THREAD)))
    encoded = _encode(entry[0], args, n, chunk)
    if encoded is None:
        return False
    block, dt = encoded
    address = _trampoline(fn, dt)
    if address is None:
        return False
    # ctypes releases the GIL for the call; the block stays alive in this frame until it ends
    _gomp_parallel(address, block.ctypes.data, threads, 0)
    calls += 1
    return True
