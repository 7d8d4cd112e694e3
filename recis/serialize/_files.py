"""Checksummed safetensors files, safe opening of checkpoint files, atomic file operations.

Data files are standard safetensors (8-byte little-endian header size, JSON header, raw
little-endian data), written by :func:`write_safetensors` in one pass that also computes a
CRC-32 of the whole file, so ``safetensors.safe_open`` reads them and the checkpoint index can
carry a checksum and a listing of the tensors without a second pass over the data. A tensor
can be given in pieces (:class:`TensorPieces`, e.g. views of a table's storage blocks): they
are written one after the other, never concatenated in memory.

Reading trusts nothing in the file: :func:`read_safetensors` opens only a regular file (never
through a symbolic link, never blocking on a FIFO or a device), compares its size with the
index before reading a byte of it, then its CRC-32, then its header against the index's listing
(same keys, dtypes and shapes; the data offsets contiguous and inside the file). The file is
memory-mapped (copy-on-write: nothing written to the tensors reaches the file); the CRC pass
reads it from the page cache and the tensors are views of the mapping, so the data is copied
once, into its destination. Do not truncate a file while it is loaded: reading a mapped page
past the end of a truncated file kills the process (SIGBUS).

CRC-32s are zlib's, computed in pieces on every core and combined (:func:`crc32_parallel`,
:func:`crc32_combine`); on x86 CPUs with carry-less multiplication a compiled folding kernel
does the bulk at about 2.5x zlib's speed (:func:`crc32`). Writes ask the kernel to start
writing back every 32 MiB, so the disk works while the rest is written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_CODE = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {code: torch.empty(0, dtype=dtype).element_size() for dtype, code in _DTYPES.items()}
DTYPE_CODES = frozenset(_FROM_CODE)

# names of entries of a checkpoint directory (data files) and of an output directory
# (checkpoints): no separator, not "." or "..", no leading dot (hidden: staging, removal)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,254}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match what is loaded."""


def is_plain_name(name: object) -> bool:
    """True for a name that can only denote an entry of the directory it is joined to: letters,
    digits, ``_``, ``-`` and ``.``, not starting with ``.`` (so never ``.``, ``..``, a hidden
    entry, an absolute path or a path with a separator), at most 255 characters."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str, what: str = "checkpoint file") -> tuple[int, int]:
    """Open ``path`` for reading if it is a regular file; returns ``(fd, size)``.

    Rejected with :class:`CheckpointError`: a missing file, a symbolic link (``O_NOFOLLOW``), and
    anything that is not a regular file: a FIFO, a device, a socket or a directory. The
    entry is checked with ``lstat`` before it is opened (a device is never opened) and the
    open file with ``fstat`` (the entry may have been replaced in between); ``O_NONBLOCK`` makes
    the open of a FIFO return at once instead of waiting for a writer.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror}") from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{what} {path} is a symbolic link; checkpoint files must be "
                              "regular files inside the checkpoint directory")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {path} is {_kind(mode)}, not a regular file")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{what} {path} is a symbolic link; checkpoint files must "
                                  "be regular files inside the checkpoint directory") from None
        raise CheckpointError(f"{what} {path} cannot be read: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    return fd, st.st_size


def _read_exactly(fd: int, size: int, path: str, what: str) -> np.ndarray:
    data = np.empty(size, np.uint8)  # not zero-filled
    view = memoryview(data)
    done = 0
    while done < size:
        n = os.readv(fd, [view[done:]])
        if n == 0:
            raise CheckpointError(f"{what} {path} shrank while it was read")
        done += n
    return data


def read_regular(path: str, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a small regular file (see :func:`open_regular`); a file over ``max_bytes``
    is rejected before it is read."""
    fd, size = open_regular(path, what)
    try:
        if max_bytes is not None and size > max_bytes:
            raise CheckpointError(f"{what} {path} has {size} bytes, more than the {max_bytes} "
                                  "it can have")
        return _read_exactly(fd, size, path, what).tobytes()
    finally:
        os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's entries: creations, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


class TensorPieces(NamedTuple):
    """A tensor of ``dtype`` and ``shape`` given as contiguous ``pieces`` that, concatenated
    along dim 0, make it: written piece by piece, never concatenated in memory. Example::

        TensorPieces(torch.float32, (3, 2), [torch.zeros(1, 2), torch.ones(2, 2)])
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: list[torch.Tensor]


class DeferredTensor(NamedTuple):
    """A tensor of ``dtype`` and ``shape`` still being computed (``future.result()`` gives
    it): :func:`write_safetensors` writes it after every other tensor, so its computation
    runs while they are written. Example::

        DeferredTensor(torch.int64, (n,), pool.submit(list_ids))
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    future: Future


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


def _libc_sync_file_range():
    """Linux's ``sync_file_range`` (not in :mod:`os`), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_EVERY = 1 << 25


def _write_flushing(f, chunks: list) -> None:
    """Write ``chunks`` to the unbuffered file ``f``, asking the kernel every 32 MiB to start
    writing what came before to the disk (``sync_file_range``, asynchronous): the disk works
    while later chunks are written, so the final fsync waits for the last part only."""
    fd, start, done = f.fileno(), 0, 0
    for chunk in chunks:
        view = memoryview(chunk() if callable(chunk) else chunk)
        while view.nbytes:
            n = f.write(view[:_WRITEBACK_EVERY])
            view, done = view[n:], done + n
            if _SYNC_FILE_RANGE is not None and done - start >= _WRITEBACK_EVERY:
                _SYNC_FILE_RANGE(fd, start, done - start, _SYNC_FILE_RANGE_WRITE)
                start = done


def _resolved(name: str, deferred: DeferredTensor) -> Callable[[], memoryview]:
    """The bytes of a deferred tensor, once computed, checked against its dtype and shape."""

    def get() -> memoryview:
        t = deferred.future.result()
        if t.dtype != deferred.dtype or tuple(t.shape) != tuple(deferred.shape):
            raise ValueError(f"tensor {name!r}: computed as {t.dtype} {list(t.shape)}, "
                             f"announced as {deferred.dtype} {list(deferred.shape)}")
        return _as_bytes(t)

    return get


def write_safetensors(path: str,
                      tensors: Mapping[str, torch.Tensor | TensorPieces | DeferredTensor],
                      metadata: Mapping[str, str] | None = None) -> dict:
    """Write ``tensors`` (tensors, :class:`TensorPieces` or :class:`DeferredTensor`, these
    last) as a safetensors file (fsynced); returns what the index records of it: ``{"crc32",
    "bytes", "tensors": {key: {"dtype": "F32", "shape": [...]}}}``."""
    header: dict[str, object] = {}
    listing: dict[str, dict] = {}
    data: list[memoryview | Callable[[], memoryview]] = []
    offset = 0
    later = [name for name, t in tensors.items() if isinstance(t, DeferredTensor)]
    for name in [name for name in tensors if name not in later] + later:
        t = tensors[name]
        dtype, shape = t.dtype, tuple(t.shape)
        if dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be saved")
        size = math.prod(shape) * _ITEMSIZE[_DTYPES[dtype]]
        if isinstance(t, DeferredTensor):
            data.append(_resolved(name, t))
        else:
            pieces = t.pieces if isinstance(t, TensorPieces) else [t]
            chunks = [_as_bytes(p) for p in pieces]
            if sum(c.nbytes for c in chunks) != size or any(p.dtype != dtype for p in pieces):
                raise ValueError(f"tensor {name!r}: its pieces do not make a {dtype} tensor of "
                                 f"shape {list(shape)}")
            data += chunks
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        listing[name] = {"dtype": _DTYPES[dtype], "shape": list(shape)}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    chunks = [struct.pack("<Q", len(blob)), blob] + data

    def checksum() -> int:
        crc = 0
        for chunk in chunks:
            crc = crc32(chunk() if callable(chunk) else chunk, crc)
        return crc

    tmp = f"{path}.tmp-{os.getpid()}"
    # zlib and file writes release the GIL: the checksum runs beside the writes
    with ThreadPoolExecutor(1) as pool:
        crc = pool.submit(checksum)
        with open(tmp, "wb", buffering=0) as f:
            _write_flushing(f, chunks)
            os.fsync(f.fileno())
        crc = crc.result()
    os.replace(tmp, path)
    return {"crc32": crc, "bytes": 8 + len(blob) + offset, "tensors": listing}


# CRC-32 (zlib's polynomial, reflected) of pieces computed in threads and combined: crc(a + b)
# from crc(a), crc(b) and len(b) by arithmetic on polynomials mod P over GF(2) (zlib's
# crc32_combine, which Python's zlib module does not expose).
_CRC_POLY = 0xEDB88320
_CRC_PIECE_MIN = 1 << 24  # a thread's piece: no smaller than this (threads cost ~50 us)


def _crc_multmodp(a: int, b: int) -> int:
    """a(x) * b(x) mod P(x), polynomials as reflected 32-bit integers (x^0 is bit 31)."""
    product, m = 0, 1 << 31
    while a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


def _crc_x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)  # x^(2^k) mod P
        p = _crc_multmodp(p, p)
    return table


_CRC_X2N = _crc_x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and ``len(b)``.

    >>> crc32_combine(zlib.crc32(b"ab"), zlib.crc32(b"cd"), 2) == zlib.crc32(b"abcd")
    True
    """
    if len2 < 0:
        raise ValueError(f"len2 must be >= 0, got {len2}")
    shift, k = 1 << 31, 3  # x^(8 * len2) mod P, from the x^(2^k) table
    while len2:
        if len2 & 1:
            shift = _crc_multmodp(_CRC_X2N[k & 31], shift)
        len2 >>= 1
        k += 1
    return _crc_multmodp(shift, crc1) ^ crc2


def _pclmul_kernel():
    """The folding CRC-32 kernel where the CPU has carry-less multiplication, else None."""
    try:
        from llvmlite import binding

        if not binding.get_host_cpu_features().get("pclmul"):
            return None
        from recis._core.backends.numba_kernels import crc32_pclmul
    except Exception:  # no numba, another architecture: zlib does it all
        return None
    return crc32_pclmul


_PCLMUL = _pclmul_kernel()
_FOLD_MIN = 1 << 12  # below this, zlib: the kernel's call costs more than it saves


def crc32(data: memoryview | bytes, crc: int = 0) -> int:
    """``zlib.crc32(data, crc)``; on CPUs with carry-less multiplication the bulk is folded by
    a compiled kernel (about 2.5x zlib's speed), the last bytes by zlib. Releases the GIL."""
    data = memoryview(data).cast("B")
    bulk = data.nbytes & ~63 if _PCLMUL is not None and data.nbytes >= _FOLD_MIN else 0
    if bulk:
        crc = int(_PCLMUL(np.frombuffer(data[:bulk], np.uint64), crc))
    return zlib.crc32(data[bulk:], crc) if bulk < data.nbytes else crc


def crc32_parallel(data: memoryview, threads: int | None = None) -> int:
    """:func:`crc32` of ``data``, computed over pieces in up to ``threads`` threads (default:
    the CPUs this process may use) and combined."""
    size = data.nbytes
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    parts = max(1, min(threads, size // _CRC_PIECE_MIN))
    if parts == 1:
        return crc32(data)
    bounds = [size * k // parts & ~63 for k in range(parts)] + [size]
    with ThreadPoolExecutor(parts) as pool:
        crcs = list(pool.map(lambda k: crc32(data[bounds[k] : bounds[k + 1]]), range(parts)))
    crc = crcs[0]
    for k in range(1, parts):
        crc = crc32_combine(crc, crcs[k], bounds[k + 1] - bounds[k])
    return crc


def read_safetensors(path: str, expected: Mapping) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file that the index describes as ``expected`` (``{"crc32",
    "bytes", "tensors"}``, see :func:`write_safetensors`).

    In this order, each fault a :class:`CheckpointError` naming the file (and the tensor): the
    file must be a regular file (:func:`open_regular`); its size must be ``expected["bytes"]``,
    checked before any data is read; its CRC-32 must match; its header must list exactly the
    tensors of ``expected["tensors"]`` with the same dtypes and shapes, and their data must
    tile the data section (contiguous, no gap, no overlap, nothing past the end). Only then
    are tensors built, so a header that lies about a dtype never reinterprets data. The
    tensors are views of a private memory mapping of the file (writable, copy-on-write).
    """
    fd, size = open_regular(path)
    try:
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} has {size} bytes, the index says "
                f"{expected['bytes']}: it is truncated or was overwritten"
            )
        data = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    view = memoryview(data)
    if crc32_parallel(view) != expected["crc32"]:
        raise CheckpointError(f"checkpoint file {path} is corrupted (CRC-32 mismatch)")
    header, base = _checked_header(path, view, expected["tensors"])
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = _FROM_CODE[info["dtype"]]
        if end > start:
            t = torch.frombuffer(data, dtype=dtype, offset=base + start,
                                 count=(end - start) // _ITEMSIZE[info["dtype"]])
        else:
            t = torch.zeros(0, dtype=dtype)
        out[key] = t.reshape(info["shape"])
    return out


def _checked_header(path: str, data: memoryview, listing: Mapping) -> tuple[dict, int]:
    """The tensors of a safetensors header (``__metadata__`` left out) and where the data
    section starts, after checking the header against the index's ``listing``."""

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {path}: {msg}")

    if len(data) < 8:
        raise fail("shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise fail(f"the header claims {size} bytes, the file has {len(data) - 8} after it")
    try:
        header = json.loads(bytes(data[8 : 8 + size]).decode("utf-8"))
    except ValueError as e:
        raise fail(f"the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise fail("the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise fail("the header's __metadata__ is not a map of strings")
    if header.keys() != listing.keys():
        raise fail(f"the header lists tensors {sorted(header.keys() - listing.keys())} that "
                   f"the index does not, and lacks {sorted(listing.keys() - header.keys())}")
    spans = []
    for key, info in header.items():
        want = listing[key]
        if not isinstance(info, dict):
            raise fail(f"tensor {key!r}: its header entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype != want["dtype"]:
            raise fail(f"tensor {key!r} has dtype {dtype!r} in the header, the index lists "
                       f"{want['dtype']!r}")
        if not (isinstance(shape, list) and all(type(d) is int for d in shape)
                and shape == want["shape"]):
            raise fail(f"tensor {key!r} has shape {shape!r} in the header, the index lists "
                       f"{want['shape']!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise fail(f"tensor {key!r}: data_offsets must be two integers, got {offsets!r}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise fail(f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                       f"bytes, a {dtype} tensor of shape {shape} has {nbytes}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise fail(f"tensor {key!r}: data_offsets start at {start}, expected {end} "
                       "(tensors must tile the data section)")
        end = stop
    if end != len(data) - 8 - size:
        raise fail(f"the tensors cover {end} bytes of a data section of {len(data) - 8 - size}")
    return header, 8 + size


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_code(name: object) -> str | None:
    """The safetensors code (``"F32"``) of a dtype named as in the index (``"float32"``), or
    None when ``name`` is not the name of a dtype that checkpoints hold."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return _DTYPES.get(dtype) if isinstance(dtype, torch.dtype) else None


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint index")
    return dtype
