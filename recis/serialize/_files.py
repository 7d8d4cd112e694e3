"""Checksummed safetensors files and atomic file operations.

Data files are standard safetensors (8-byte little-endian header size, JSON header, raw
little-endian data), written by :func:`write_safetensors` in one pass that also computes a
CRC-32 of the whole file, so ``safetensors.safe_open`` reads them and the checkpoint index can
carry a checksum without a second pass over the data.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_CODE = {v: k for k, v in _DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not match what is loaded."""


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


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B") if t.numel() else memoryview(b"")


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> dict:
    """Write ``tensors`` as a safetensors file (fsynced); returns ``{"crc32", "bytes"}``."""
    header: dict[str, object] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be saved")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    chunks = [struct.pack("<Q", len(blob)), blob] + [_as_bytes(t) for t in tensors.values()]

    def checksum() -> int:
        crc = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
        return crc

    tmp = f"{path}.tmp-{os.getpid()}"
    # zlib and file writes release the GIL: the checksum runs beside the writes
    with ThreadPoolExecutor(1) as pool:
        crc = pool.submit(checksum)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        crc = crc.result()
    os.replace(tmp, path)
    return {"crc32": crc, "bytes": 8 + len(blob) + offset}


def read_safetensors(path: str, expected: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file, checking size and CRC-32 against ``expected``."""
    try:
        with open(path, "rb") as f:
            data = np.empty(os.fstat(f.fileno()).st_size, np.uint8)  # not zero-filled
            f.readinto(memoryview(data))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    if expected is not None:
        if len(data) != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} has {len(data)} bytes, the index says "
                f"{expected['bytes']}: it is truncated or was overwritten"
            )
        crc = zlib.crc32(data)
        if crc != expected["crc32"]:
            raise CheckpointError(f"checkpoint file {path} is corrupted (CRC-32 mismatch)")
    try:
        (size,) = struct.unpack("<Q", data[:8].tobytes())
        header = json.loads(data[8 : 8 + size].tobytes())
    except (struct.error, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} is not a safetensors file: {e}") from None
    base = 8 + size
    buffer = data
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _FROM_CODE[info["dtype"]]
        raw = torch.from_numpy(buffer[base + start : base + end])
        if dtype == torch.bfloat16:
            t = raw.view(torch.int16).view(torch.bfloat16)
        else:
            t = raw.view(dtype) if end > start else torch.zeros(0, dtype=dtype)
        out[key] = t.reshape(info["shape"])
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint index")
    return dtype
