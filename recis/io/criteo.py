"""The Criteo click-log layout: column names and the model-ready batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recis.io.readers import FileDataset, _expand_paths, infer_format
from recis.ragged.tensor import RaggedTensor

__all__ = ["criteo_columns", "criteo_batch_to_features", "criteo_dataset",
           "CRITEO_TEXT_COLUMNS"]

logger = logging.getLogger(__name__)

_LABEL = "label"
_DENSE = tuple(f"i{i}" for i in range(1, 14))
_SPARSE = tuple(f"c{i}" for i in range(1, 27))
_SPARSE_FORMATS = ("ragged", "dense")
#: Column order of Criteo's own header-less text files (``train.txt``, day_0 ... day_23):
#: ``criteo_dataset(files, batch_size, columns=CRITEO_TEXT_COLUMNS)``.
CRITEO_TEXT_COLUMNS = [_LABEL, *_DENSE, *_SPARSE]


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
    columns: Sequence[str] | None = None,
    sparse_format: str = "ragged",
    missing_id: int = 0,
    **kwargs: Any,
) -> FileDataset:
    r"""A :class:`~recis.io.FileDataset` over Criteo files that yields model-ready batches.

    Every format is read **by column name**, never by position: ORC and Parquet files by their
    schema's names, CSV/TSV files by their header line (which is not data). Columns may be in
    any order and other columns are ignored. A CSV/TSV file without a header line (such as
    Criteo's own ``train.txt``: tab-separated, hexadecimal categoricals hashed to IDs) needs
    ``columns``: the names of its columns in file order, e.g. :data:`CRITEO_TEXT_COLUMNS`.
    A file that lacks one of the columns of :func:`criteo_columns` is a ``ValueError`` naming
    the file, the missing columns and the expected ones. ORC/Parquet with list columns of 0
    or 1 values (as the RecIS sample data) or scalars both work.

    Args:
        paths (str, PathLike or sequence of them): the files, as for FileDataset.
        batch_size (int): rows per batch.
        columns (sequence of str or "criteo", optional): CSV/TSV files without a header
            only: the names of their columns, in order (every line is then data); must
            include the columns of :func:`criteo_columns`. ``"criteo"`` stands for
            :data:`CRITEO_TEXT_COLUMNS`.
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
        >>> raw = criteo_dataset("day_0.txt", 4096, columns=CRITEO_TEXT_COLUMNS)
    """
    where = "criteo_dataset"
    for key in ("dense_columns", "ragged_columns", "transform", "column_names"):
        if key in kwargs:
            raise TypeError(f"{where}: {key} is set by criteo_dataset and cannot be passed")
    if sparse_format not in _SPARSE_FORMATS:
        raise ValueError(
            f"{where}: sparse_format must be one of {_SPARSE_FORMATS}, got {sparse_format!r}"
        )
    if "fill_missing" in kwargs:
        raise TypeError(f"{where}: fill_missing is set by criteo_dataset; use missing_id")
    expected = [_LABEL, *_DENSE, *_SPARSE]
    files = _expand_paths(paths, where)
    formats = [kwargs.get("format") or infer_format(f) for f in files]
    text = [f for f, fmt in zip(files, formats, strict=True) if fmt in ("csv", "tsv")]
    if columns == "criteo":
        columns = CRITEO_TEXT_COLUMNS
    if columns is not None:
        if isinstance(columns, str) or not isinstance(columns, Sequence) or \
                not all(isinstance(c, str) for c in columns):
            raise TypeError(f"{where}: columns must be a list of column names or 'criteo', "
                            f"got {columns!r}")
        if len(text) != len(files):
            raise ValueError(f"{where}: columns names the columns of header-less CSV/TSV "
                             "files; ORC and Parquet files carry their own names")
        _check_names(list(columns), expected, "columns", where)
        kwargs["column_names"] = list(columns)
    for path, fmt in zip(files, formats, strict=True):  # every file, by its own names
        if fmt not in ("csv", "tsv"):
            names = _schema_names(path, fmt)
            if names is not None:
                _check_names(names, expected, "", where, path)
        elif columns is None:
            _check_header(path, fmt, kwargs.get("delimiter"), expected, where)
    if sparse_format == "dense":
        dense, ragged = [_LABEL, *_DENSE, *_SPARSE], []
        fills: dict[str, Any] | None = dict.fromkeys(_SPARSE, missing_id)
    else:
        dense, ragged, fills = [_LABEL, *_DENSE], list(_SPARSE), None
    # dense_columns/ragged_columns are no-ops for columns that already have that layout.
    return FileDataset(
        files,
        batch_size,
        columns=expected,
        dense_columns=dense,
        ragged_columns=ragged,
        fill_missing=fills,
        transform=_CriteoTransform(sparse_format, missing_id),
        **kwargs,
    )


def _schema_names(path: str, fmt: str) -> list[str] | None:
    """Column names from an ORC/Parquet footer; None when unreadable (FileDataset says why)."""
    import pyarrow as pa
    import pyarrow.orc as pa_orc
    import pyarrow.parquet as pq

    try:
        schema = pa_orc.ORCFile(path).schema if fmt == "orc" else pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return None
    return list(schema.names)


def _describe(names: Sequence[str]) -> str:
    return "label, i1..i13, c1..c26" if list(names) == CRITEO_TEXT_COLUMNS else ", ".join(names)


def _check_names(names: list[str], expected: list[str], what: str, where: str,
                 path: str | None = None) -> None:
    of = f"{path!r}" if path else what
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: {of} repeats the column names {repeated}")
    missing = [c for c in expected if c not in names]
    if missing:
        extra = [n for n in names if n not in expected]
        others = f"; it has other columns {extra[:8]}" if extra else ""
        raise ValueError(f"{where}: {of} lacks the columns {missing}{others}; expected "
                         f"{_describe(expected)} (in any order)")


def _check_header(path: str, fmt: str, delimiter: str | None, expected: list[str],
                  where: str) -> None:
    """A CSV/TSV file's header line must name the expected columns; a file whose first line
    looks like data has no header and needs ``columns``."""
    sep = delimiter or ("," if fmt == "csv" else "\t")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline().rstrip("\r\n")
    except OSError as err:
        raise ValueError(f"{where}: cannot read {path!r}: {err}") from None
    names = [n.strip().strip('"') for n in first.split(sep)]
    if not any(n in expected for n in names):
        raise ValueError(
            f"{where}: {path!r} has no header line naming its columns (its first line starts "
            f"{first[:40]!r}); pass columns= (--columns) with the names of its columns in "
            f"order, e.g. 'criteo' for {_describe(CRITEO_TEXT_COLUMNS)}")
    _check_names(names, expected, "", where, path)
