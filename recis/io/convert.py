"""Conversion of Arrow columns into tensors and ragged tensors."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recis.ragged.tensor import RaggedTensor

__all__ = ["hash_strings", "ColumnPlan", "plan_column", "convert_column"]

logger = logging.getLogger(__name__)

# Value categories and the tensor dtype each one becomes.
_TORCH_DTYPES = {
    "int": torch.int64,
    "string": torch.int64,
    "float": torch.float32,
    "null": torch.float32,
    "bool": torch.bool,
}
_DEFAULT_FILL = {"int": 0, "string": 0, "float": 0.0, "null": 0.0, "bool": False}

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK63 = 0x7FFFFFFFFFFFFFFF
_hash_kernel = None


def _fnv1a_rows(offsets, data, out):  # pragma: no cover - compiled by numba
    for i in range(out.shape[0]):
        h = np.uint64(_FNV_OFFSET)
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * np.uint64(_FNV_PRIME)
        out[i] = np.int64(h & np.uint64(_MASK63))


def _get_hash_kernel():
    """The numba-compiled hash loop, compiled (or loaded from numba's cache) on first use."""
    global _hash_kernel
    if _hash_kernel is None:
        import numba

        _hash_kernel = numba.njit(cache=True, nogil=True)(_fnv1a_rows)
    return _hash_kernel


def _hash_arrow(arr: pa.Array) -> np.ndarray:
    """63-bit FNV-1a of each entry's bytes; null entries hash like the empty string."""
    arr = arr.cast(pa.large_binary())
    out = np.empty(len(arr), dtype=np.int64)
    if len(arr) == 0:
        return out
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    if buffers[2] is None or buffers[2].size == 0:
        data = np.zeros(1, dtype=np.uint8)
    else:
        data = np.frombuffer(buffers[2], dtype=np.uint8)
    _get_hash_kernel()(offsets, data, out)
    return out


def hash_strings(values: Sequence[str | bytes] | pa.Array) -> torch.Tensor:
    r"""Map strings to non-negative int64 IDs, the same way the file readers do.

    The ID is the 64-bit FNV-1a hash of the UTF-8 bytes with the top bit cleared, so it is
    stable across processes, machines and versions (unlike Python's ``hash``).

    Args:
        values (sequence of str or bytes, or pyarrow.Array): the strings; no ``None``.

    Returns:
        Tensor: 1-D ``int64`` tensor of IDs in ``[0, 2**63)``.

    Example::

        >>> hash_strings(["68fd1e64", "80e26c9b"]).dtype
        torch.int64
    """
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(
                "hash_strings: values must be a sequence of str/bytes or a pyarrow Array, "
                f"got {type(values).__name__}"
            )
        arr = pa.array(values)
    if not (
        pa.types.is_string(arr.type)
        or pa.types.is_large_string(arr.type)
        or pa.types.is_binary(arr.type)
        or pa.types.is_large_binary(arr.type)
    ):
        raise TypeError(f"hash_strings: values must hold strings or bytes, got type {arr.type}")
    if arr.null_count:
        raise ValueError(f"hash_strings: values must not contain None, got {arr.null_count}")
    return torch.from_numpy(_hash_arrow(arr))


# ----------------------------------------------------------------------------- planning


def _category(dtype: pa.DataType) -> str | None:
    if pa.types.is_dictionary(dtype):
        return _category(dtype.value_type)
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "float"
    if (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_binary(dtype)
        or pa.types.is_large_binary(dtype)
    ):
        return "string"
    if pa.types.is_null(dtype):
        return "null"
    return None


def _is_list(dtype: pa.DataType) -> bool:
    return (
        pa.types.is_list(dtype)
        or pa.types.is_large_list(dtype)
        or pa.types.is_fixed_size_list(dtype)
    )


@dataclass(frozen=True)
class ColumnPlan:
    """How one column becomes a tensor.

    Attributes:
        name: column name.
        category: ``"int"``, ``"float"``, ``"bool"``, ``"string"`` (hashed) or ``"null"``.
        is_list: whether the Arrow column is a list column.
        ragged: produce a :class:`RaggedTensor` (else a dense ``[B]`` tensor).
        fill: value written for missing entries of a dense output.
    """

    name: str
    category: str
    is_list: bool
    ragged: bool
    fill: Any

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.category]


def _check_fill(fill: Any, category: str, name: str, where: str) -> Any:
    if category == "bool":
        if not isinstance(fill, (bool, np.bool_)) and fill not in (0, 1):
            raise TypeError(
                f"{where}: fill_missing for bool column {name!r} must be a bool, got {fill!r}"
            )
        return bool(fill)
    if isinstance(fill, bool) or not isinstance(fill, numbers.Real):
        raise TypeError(
            f"{where}: fill_missing for column {name!r} must be a number, got {type(fill).__name__}"
        )
    if category in ("int", "string"):
        if isinstance(fill, numbers.Integral) or (isinstance(fill, float) and fill.is_integer()):
            value = int(fill)
            if not -(2**63) <= value < 2**63:
                raise ValueError(
                    f"{where}: fill_missing for int64 column {name!r} must fit in int64, got {fill}"
                )
            return value
        raise TypeError(
            f"{where}: fill_missing for integer column {name!r} must be an integer, got {fill!r}"
        )
    return float(fill)


def plan_column(
    name: str, dtype: pa.DataType, *, dense: bool, ragged: bool, fill: Any, where: str
) -> ColumnPlan:
    """Decide the output of a column from its Arrow type and the user's layout choices."""
    is_list = _is_list(dtype)
    value_type = dtype.value_type if is_list else dtype
    if _is_list(value_type):
        raise TypeError(
            f"{where}: column {name!r} has nested list type {dtype}; only one list level "
            "is supported"
        )
    category = _category(value_type)
    if category is None:
        raise TypeError(
            f"{where}: column {name!r} has unsupported type {dtype}; expected integers, "
            "floats, bools, strings/binary, or a list of those"
        )
    fill = _DEFAULT_FILL[category] if fill is None else _check_fill(fill, category, name, where)
    as_ragged = ragged or (is_list and not dense)
    return ColumnPlan(name, category, is_list, as_ragged, fill)


# ----------------------------------------------------------------------------- conversion


def _to_numpy(arr: pa.Array, plan: ColumnPlan, fill: Any) -> np.ndarray:
    """Values of ``arr`` as a writable numpy array of the plan's dtype; nulls become ``fill``."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    category = plan.category
    n = len(arr)
    if pa.types.is_null(arr.type):
        return np.full(n, fill, dtype=_numpy_dtype(category))
    if category == "string":
        if _category(arr.type) != "string":
            raise TypeError(
                f"column {plan.name!r} changed type to {arr.type}; it was read as strings"
            )
        out = _hash_arrow(arr)
        if arr.null_count:
            out[~np.asarray(arr.is_valid())] = fill
        return out
    if category == "bool":
        if arr.null_count:
            arr = arr.fill_null(pa.scalar(fill, pa.bool_()))
        return np.array(arr.cast(pa.bool_()).to_numpy(zero_copy_only=False), dtype=bool)
    if category == "int":
        target = pa.int64()
    else:
        target = pa.float64()
        if pa.types.is_decimal(arr.type):
            arr = arr.cast(pa.float64())
    try:
        arr = arr.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"column {plan.name!r} cannot be converted to {target}: {err}") from None
    if arr.null_count:
        arr = arr.fill_null(pa.scalar(fill, target))
    values = arr.to_numpy(zero_copy_only=False)
    if category == "int":
        return np.array(values, dtype=np.int64)
    out = values.astype(np.float32)
    overflow = np.isinf(out) & np.isfinite(values)
    if overflow.any():
        raise ValueError(
            f"column {plan.name!r} holds {values[overflow][0]!r}, outside the float32 range"
        )
    return out


def _numpy_dtype(category: str) -> Any:
    return {"int": np.int64, "string": np.int64, "float": np.float32, "null": np.float32}.get(
        category, bool
    )


def _list_parts(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Flattened non-null items of a list array and the number of items of each row."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False)
    lengths = np.asarray(lengths, dtype=np.int64)
    values = arr.flatten()
    if values.null_count:
        valid = np.asarray(values.is_valid())
        rows = np.repeat(np.arange(len(arr), dtype=np.int64), lengths)
        lengths = np.bincount(rows[valid], minlength=len(arr)).astype(np.int64)
        values = values.filter(pa.array(valid))
    return values, lengths


def convert_column(arr: pa.Array | pa.ChunkedArray, plan: ColumnPlan) -> Any:
    r"""Turn one Arrow column (a batch of rows) into a tensor or a ragged tensor.

    * dense, scalar column: ``[B]`` tensor, nulls replaced by ``plan.fill``;
    * dense, list column: ``[B]`` tensor; rows must hold at most one item, empty or null rows
      become ``plan.fill``;
    * ragged: :class:`RaggedTensor` with int64 offsets; a null row (or null scalar) is an
      empty row and null items inside a list are dropped.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if plan.is_list != _is_list(arr.type):
        raise TypeError(
            f"column {plan.name!r} changed type to {arr.type}; "
            f"it was {'a list' if plan.is_list else 'a scalar'} column in the first file"
        )
    if plan.is_list:
        values_arr, lengths = _list_parts(arr)
    elif plan.ragged:
        valid = np.asarray(arr.is_valid()) if arr.null_count else np.ones(n, dtype=bool)
        values_arr = arr.filter(pa.array(valid)) if arr.null_count else arr
        lengths = valid.astype(np.int64)
    else:
        return torch.from_numpy(_to_numpy(arr, plan, plan.fill))

    values = _to_numpy(values_arr, plan, plan.fill)
    if plan.ragged:
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return RaggedTensor(torch.from_numpy(values), torch.from_numpy(offsets))
    longest = int(lengths.max()) if n else 0
    if longest > 1:
        raise ValueError(
            f"column {plan.name!r} is read dense but has a row with {longest} items; "
            "only list columns with at most one item per row can be dense"
        )
    out = np.full(n, plan.fill, dtype=values.dtype)
    out[lengths == 1] = values
    return torch.from_numpy(out)
