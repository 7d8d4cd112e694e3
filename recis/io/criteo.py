"""The Criteo click-log layout: column names and the model-ready batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recis.io.readers import FORMATS, FileDataset, _expand_paths
from recis.ragged.tensor import RaggedTensor

__all__ = ["criteo_columns", "criteo_batch_to_features", "criteo_dataset"]

logger = logging.getLogger(__name__)

_LABEL = "label"
_DENSE = tuple(f"i{i}" for i in range(1, 14))
_SPARSE = tuple(f"c{i}" for i in range(1, 27))
_SPARSE_FORMATS = ("ragged", "dense")


def criteo_columns() -> tuple[str, list[str], list[str]]:
    r"""Column names of the Criteo layout.

    Returns:
        tuple: ``("label", ["i1", ..., "i13"], ["c1", ..., "c26"])``: the click label, the 13
        integer (count) features and the 26 categorical features.

    Example::

        >>> label, dense, sparse = criteo_columns()
        >>> label, len(dense), len(sparse)
        ('label', 13, 26)
    """
    return _LABEL, list(_DENSE), list(_SPARSE)


def _single(value: Any, name: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """A ``[B]`` tensor from a ``[B]``/``[B, 1]`` tensor or a ragged column of 0/1 items."""
    where = "criteo_batch_to_features"
    if isinstance(value, RaggedTensor):
        if value.dim != 2:
            raise ValueError(f"{where}: {name!r} must have one ragged level, got {value.dim - 1}")
        lengths = value.lengths()
        if lengths.numel() and int(lengths.max()) > 1:
            raise ValueError(
                f"{where}: {name!r} must hold at most one value per row, "
                f"got a row with {int(lengths.max())}"
            )
        out = torch.full((lengths.numel(),), fill, dtype=dtype)
        out[lengths == 1] = value.values().to(dtype)
        return out
    if isinstance(value, torch.Tensor):
        if value.dim() == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.dim() != 1:
            raise ValueError(
                f"{where}: {name!r} must have shape [B] or [B, 1], got {tuple(value.shape)}"
            )
        return value.to(dtype)
    raise TypeError(
        f"{where}: {name!r} must be a Tensor or RaggedTensor, got {type(value).__name__}"
    )


def _sparse(value: Any, name: str, sparse_format: str, missing_id: int) -> Any:
    where = "criteo_batch_to_features"
    if sparse_format == "dense":
        return _single(value, name, missing_id, torch.int64).unsqueeze(1)
    if isinstance(value, RaggedTensor):
        if value.dtype != torch.int64:
            return RaggedTensor(value.values().to(torch.int64), value.offsets(), value.weight())
        return value
    if isinstance(value, torch.Tensor):
        ids = _single(value, name, missing_id, torch.int64)
        offsets = torch.arange(ids.numel() + 1, dtype=torch.int64)
        return RaggedTensor(ids, offsets)
    raise TypeError(
        f"{where}: {name!r} must be a Tensor or RaggedTensor, got {type(value).__name__}"
    )


def criteo_batch_to_features(
    batch: Mapping[str, Any], *, sparse_format: str = "ragged", missing_id: int = 0
) -> dict[str, Any]:
    r"""Turn a raw Criteo batch into the model-ready layout.

    The output layout (shared with :class:`~recis.datasets.SyntheticClickStream`):

    * ``"label"``: ``float32`` ``[B]`` (a missing label counts as 0);
    * ``"dense"``: ``float32`` ``[B, 13]`` holding ``i1 .. i13`` as they are, missing values as
      ``0``. No transformation (such as ``log1p``) is applied; that is left to the model;
    * ``"c1" .. "c26"``: with ``sparse_format="ragged"`` (default) a
      :class:`~recis.ragged.RaggedTensor` of ``int64`` IDs with one ID per row, or none where
      the value is missing; with ``sparse_format="dense"`` an ``int64`` ``[B, 1]`` tensor with
      ``missing_id`` where the value is missing.

    Input columns may be ragged (as :class:`~recis.io.FileDataset` reads list columns, each
    row holding 0 or 1 values) or dense ``[B]``/``[B, 1]`` tensors.

    Args:
        batch (dict): the raw batch with the columns of :func:`criteo_columns`.
        sparse_format (str): ``"ragged"`` or ``"dense"``. Default: ``"ragged"``.
        missing_id (int): ID of a missing categorical value when ``sparse_format="dense"``.
            Default: ``0``.

    Returns:
        dict: ``{"label", "dense", "c1", ..., "c26"}`` as described.

    Example::

        >>> ds = FileDataset("part-0.orc", batch_size=256)
        >>> features = criteo_batch_to_features(next(iter(ds)))
        >>> features["dense"].shape
        torch.Size([256, 13])
    """
    where = "criteo_batch_to_features"
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where}: batch must be a dict, got {type(batch).__name__}")
    if sparse_format not in _SPARSE_FORMATS:
        raise ValueError(
            f"{where}: sparse_format must be one of {_SPARSE_FORMATS}, got {sparse_format!r}"
        )
    missing = [c for c in (_LABEL, *_DENSE, *_SPARSE) if c not in batch]
    if missing:
        raise ValueError(f"{where}: batch lacks the Criteo columns {missing}")
    out: dict[str, Any] = {"label": _single(batch[_LABEL], _LABEL, 0.0, torch.float32)}
    dense = [_single(batch[name], name, 0.0, torch.float32) for name in _DENSE]
    out["dense"] = torch.stack(dense, dim=1)
    for name in _SPARSE:
        out[name] = _sparse(batch[name], name, sparse_format, missing_id)
    size = out["label"].shape[0]
    for name, value in out.items():
        rows = value.shape[0] if isinstance(value, torch.Tensor) else value.real_shape()[0]
        if rows != size:
            raise ValueError(f"{where}: column {name!r} has {rows} rows, expected {size}")
    return out


class _CriteoTransform:
    """Picklable ``criteo_batch_to_features`` with fixed options (for DataLoader workers)."""

    def __init__(self, sparse_format: str, missing_id: int) -> None:
        self.sparse_format = sparse_format
        self.missing_id = missing_id

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return criteo_batch_to_features(
            batch, sparse_format=self.sparse_format, missing_id=self.missing_id
        )


def criteo_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    batch_size: int,
    *,
    sparse_format: str = "ragged",
    missing_id: int = 0,
    **kwargs: Any,
) -> FileDataset:
    r"""A :class:`~recis.io.FileDataset` over Criteo files that yields model-ready batches.

    Reads the columns of :func:`criteo_columns` and applies :func:`criteo_batch_to_features`.
    Works for ORC/Parquet files whose columns are lists of 0 or 1 values (as the RecIS sample
    data) or scalars, and for the raw Criteo text files (tab-separated ``.txt``/``.tsv``
    without header, hexadecimal categorical values that are hashed to IDs): for text files
    the column names default to ``label, i1..i13, c1..c26`` in that order.

    Args:
        paths (str, PathLike or sequence of them): the files, as for FileDataset.
        batch_size (int): rows per batch.
        sparse_format (str): ``"ragged"`` or ``"dense"``, see
            :func:`criteo_batch_to_features`. Default: ``"ragged"``.
        missing_id (int): ID of a missing categorical value when dense. Default: ``0``.
        **kwargs: other FileDataset arguments (``shuffle``, ``seed``, ``rank``, ...).

    Returns:
        FileDataset: yields ``{"label", "dense", "c1", ..., "c26"}``.

    Example::

        >>> ds = criteo_dataset("../shared/data/criteo-sample/part-*.orc", batch_size=4096)
        >>> sorted(next(iter(ds)))[:3]
        ['c1', 'c10', 'c11']
    """
    where = "criteo_dataset"
    for key in ("columns", "dense_columns", "ragged_columns", "transform"):
        if key in kwargs:
            raise TypeError(f"{where}: {key} is set by criteo_dataset and cannot be passed")
    if sparse_format not in _SPARSE_FORMATS:
        raise ValueError(
            f"{where}: sparse_format must be one of {_SPARSE_FORMATS}, got {sparse_format!r}"
        )
    if "fill_missing" in kwargs:
        raise TypeError(f"{where}: fill_missing is set by criteo_dataset; use missing_id")
    columns = [_LABEL, *_DENSE, *_SPARSE]
    if "column_names" not in kwargs and _is_text(paths, kwargs.get("format")):
        kwargs["column_names"] = columns  # raw Criteo text files have no header
    if sparse_format == "dense":
        dense, ragged = [_LABEL, *_DENSE, *_SPARSE], []
        fills: dict[str, Any] | None = dict.fromkeys(_SPARSE, missing_id)
    else:
        dense, ragged, fills = [_LABEL, *_DENSE], list(_SPARSE), None
    # dense_columns/ragged_columns are no-ops for columns that already have that layout.
    return FileDataset(
        paths,
        batch_size,
        columns=columns,
        dense_columns=dense,
        ragged_columns=ragged,
        fill_missing=fills,
        transform=_CriteoTransform(sparse_format, missing_id),
        **kwargs,
    )


def _is_text(paths: Any, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt in ("csv", "tsv")
    try:
        files = _expand_paths(paths, "criteo_dataset")
    except (TypeError, ValueError, OSError):
        return False  # FileDataset reports the bad argument
    return any(FORMATS.get(Path(f).suffix.lower()) in ("csv", "tsv") for f in files)
