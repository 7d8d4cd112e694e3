"""Streaming ORC, Parquet and CSV/TSV readers that yield batches of tensors."""

from __future__ import annotations

import glob
import logging
import operator
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.orc as pa_orc
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset

from recis.io.convert import ColumnPlan, convert_column, plan_column
from recis.io.sharding import current_shard, resolve_rank

__all__ = ["FileDataset", "infer_format", "FORMATS"]

logger = logging.getLogger(__name__)

#: Formats understood by :class:`FileDataset`, and the file extensions that select them.
FORMATS = {
    ".orc": "orc",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
}
_FORMAT_NAMES = ("orc", "parquet", "csv", "tsv")
_PARQUET_READ_ROWS = 65_536
_CSV_BLOCK_BYTES = 1 << 22
_GLOB_CHARS = set("*?[")

Batch = dict[str, Any]


def infer_format(path: str | os.PathLike) -> str:
    r"""The reader format of a file, from its extension.

    Args:
        path (str or PathLike): the file.

    Returns:
        str: ``"orc"``, ``"parquet"`` (``.parquet``/``.pq``), ``"csv"`` or ``"tsv"``
        (``.tsv``/``.txt``).

    Example::

        >>> infer_format("data/part-0.orc")
        'orc'
    """
    suffix = Path(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise ValueError(
            f"infer_format: cannot tell the format of {str(path)!r} from its extension; "
            f"expected one of {sorted(FORMATS)} or pass format= explicitly"
        ) from None


def _expand_paths(paths: Any, where: str) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    elif not isinstance(paths, Sequence):
        raise TypeError(
            f"{where}: paths must be a path, a glob pattern or a sequence of them, "
            f"got {type(paths).__name__}"
        )
    files: list[str] = []
    for entry in paths:
        if not isinstance(entry, (str, os.PathLike)):
            raise TypeError(f"{where}: each path must be a str or PathLike, got {entry!r}")
        text = os.fspath(entry)
        if os.path.isdir(text):
            found = sorted(
                os.path.join(text, name)
                for name in os.listdir(text)
                if Path(name).suffix.lower() in FORMATS and os.path.isfile(os.path.join(text, name))
            )
            if not found:
                raise ValueError(f"{where}: directory {text!r} holds no readable data files")
            files.extend(found)
        elif _GLOB_CHARS & set(text):
            found = sorted(p for p in glob.glob(text) if os.path.isfile(p))
            if not found:
                raise ValueError(f"{where}: pattern {text!r} matched no files")
            files.extend(found)
        elif os.path.isfile(text):
            files.append(text)
        else:
            raise FileNotFoundError(f"{where}: no such file: {text!r}")
    if not files:
        raise ValueError(f"{where}: paths must name at least one file, got {paths!r}")
    return files


def _names(value: Any, name: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{where}: {name} must be a sequence of column names, got {value!r}")
    out = list(value)
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{where}: {name} must hold str column names, got {item!r}")
    return out


class FileDataset(IterableDataset):
    r"""Stream ORC, Parquet or CSV/TSV files as batches of tensors.

    Each item is one batch, a ``dict`` from column name (in ``columns`` order) to

    * an ``int64`` tensor ``[B]`` for integer columns, and for string/binary columns, whose
      values are hashed to IDs with :func:`~recis.io.hash_strings`;
    * a ``float32`` tensor ``[B]`` for floating and decimal columns; a ``bool`` tensor for
      booleans;
    * a :class:`~recis.ragged.RaggedTensor` (values of the dtypes above, ``int64`` offsets)
      for ``list<...>`` columns; a null list is an empty row and null items inside a list are
      dropped. Columns named in ``dense_columns`` are read as ``[B]`` tensors instead (each
      row must hold at most one item); columns named in ``ragged_columns`` are always ragged
      (a scalar column then gives rows of length 1, or 0 where the value is missing).

    Missing values (nulls, empty lists read dense, empty CSV fields) of dense outputs are
    replaced by the fill value: ``0`` for integer and hashed columns, ``0.0`` for floats,
    ``False`` for booleans, unless ``fill_missing`` says otherwise. Nothing is dropped and no
    row is ever skipped.

    **Sharding.** Every process reads a disjoint part of the data, deterministically:
    ``rank`` and ``world_size`` default to :mod:`torch.distributed` when it is initialized,
    else to the ``RANK``/``WORLD_SIZE`` environment variables, else to ``0``/``1``. Inside a
    :class:`~torch.utils.data.DataLoader` worker each rank's part is split again among its
    workers (use ``DataLoader(dataset, batch_size=None, num_workers=k)``), giving
    ``world_size * num_workers`` shards. With at least as many files as shards, shard ``s``
    reads the files ``s, s + num_shards, ...`` (shards may get different numbers of rows).
    Otherwise every shard reads all files and keeps batches ``s, s + num_shards, ...`` of the
    shared batch sequence. Either way the shards' rows are disjoint and together cover all
    rows (except the final partial batch when ``drop_remainder``).

    **Batches** hold exactly ``batch_size`` rows, crossing file boundaries, except the last
    batch of each shard, which is smaller unless ``drop_remainder`` drops it.

    **Epochs.** Iterating again starts again from the beginning. With ``shuffle=True`` the file
    order and the row order within each read chunk (an ORC stripe, a Parquet record batch of
    up to 65,536 rows, a CSV block of about 4 MB) are permuted, deterministically from
    ``(seed, epoch)``. The epoch advances on each iteration of this object; DataLoader worker
    processes iterate copies, so call :meth:`set_epoch` before each epoch in that case.

    **CSV/TSV.** The first row is the header unless ``column_names`` is given (then every row
    is data). ``.csv`` files are comma-separated; ``.tsv`` and ``.txt`` files are
    tab-separated (``delimiter`` overrides). Empty fields are missing. Column types are
    inferred from the first block of the first file and then fixed for all files (an all-empty
    column becomes float); pass ``column_types`` to choose them.

    Args:
        paths (str, PathLike or sequence of them): files, directories (their data files, by
            name) or glob patterns (sorted matches).
        batch_size (int): rows per batch, at least 1.
        columns (sequence of str, optional): columns to read, in output order. Default: every
            column of the first file, in its order.
        format (str, optional): ``"orc"``, ``"parquet"``, ``"csv"`` or ``"tsv"`` for every
            file. Default: from each file's extension (see :func:`infer_format`).
        shuffle (bool): permute files and rows each epoch, as described above. Default:
            ``False``.
        seed (int): seed of the shuffling. Default: ``0``.
        drop_remainder (bool): drop each shard's final partial batch. Default: ``False``.
        rank (int, optional): this process's rank. Default: see Sharding.
        world_size (int, optional): number of processes. Default: see Sharding.
        dense_columns (sequence of str, optional): list columns to read as ``[B]`` tensors.
        ragged_columns (sequence of str, optional): scalar columns to read as ragged tensors.
        fill_missing (number or dict, optional): fill value of dense outputs, for every column
            or per column name (others keep the default).
        column_names (sequence of str, optional): CSV/TSV only: names of the columns of
            header-less files.
        delimiter (str, optional): CSV/TSV only: the field separator.
        column_types (dict, optional): CSV/TSV only: Arrow type (or type name such as
            ``"int64"``) per column.
        transform (callable, optional): applied to every batch dict before it is yielded, e.g.
            :func:`~recis.io.criteo_batch_to_features`.

    Example::

        >>> ds = FileDataset("data/part-*.orc", batch_size=1024, columns=["label", "c1"],
        ...                  dense_columns=["label"])
        >>> batch = next(iter(ds))
        >>> batch["label"].shape, type(batch["c1"]).__name__
        (torch.Size([1024]), 'RaggedTensor')
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int,
        *,
        columns: Sequence[str] | None = None,
        format: str | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dense_columns: Sequence[str] | None = None,
        ragged_columns: Sequence[str] | None = None,
        fill_missing: float | Mapping[str, float] | None = None,
        column_names: Sequence[str] | None = None,
        delimiter: str | None = None,
        column_types: Mapping[str, pa.DataType | str] | None = None,
        transform: Callable[[Batch], Any] | None = None,
    ) -> None:
        super().__init__()
        where = "FileDataset"
        self._files = _expand_paths(paths, where)
        if isinstance(batch_size, bool):
            raise TypeError(f"{where}: batch_size must be an int, got bool")
        try:
            batch_size = operator.index(batch_size)
        except TypeError:
            raise TypeError(
                f"{where}: batch_size must be an int, got {type(batch_size).__name__}"
            ) from None
        if batch_size < 1:
            raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if format is not None and format not in _FORMAT_NAMES:
            raise ValueError(
                f"{where}: format must be one of {_FORMAT_NAMES} or None, got {format!r}"
            )
        self._formats = [format or infer_format(f) for f in self._files]
        for flag, flag_name in ((shuffle, "shuffle"), (drop_remainder, "drop_remainder")):
            if not isinstance(flag, bool):
                raise TypeError(f"{where}: {flag_name} must be a bool, got {type(flag).__name__}")
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        if isinstance(seed, bool):
            raise TypeError(f"{where}: seed must be an int, got bool")
        try:
            self.seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}") from None
        self.rank, self.world_size = resolve_rank(rank, world_size, where=where)
        if transform is not None and not callable(transform):
            raise TypeError(f"{where}: transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        self._epoch = 0

        # CSV options.
        self._column_names = _names(column_names, "column_names", where)
        if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
            raise ValueError(f"{where}: delimiter must be a single character, got {delimiter!r}")
        self._delimiter = delimiter
        self._csv_types: dict[str, pa.DataType] = {}
        if column_types is not None:
            if not isinstance(column_types, Mapping):
                raise TypeError(
                    f"{where}: column_types must be a dict, got {type(column_types).__name__}"
                )
            for key, value in column_types.items():
                try:
                    self._csv_types[key] = (
                        value if isinstance(value, pa.DataType) else pa.type_for_alias(value)
                    )
                except (ValueError, TypeError):
                    raise ValueError(
                        f"{where}: column_types[{key!r}] must be a pyarrow DataType or type "
                        f"name, got {value!r}"
                    ) from None

        # Schema of the first file decides the columns and their conversion.
        schema = self._read_schema(self._files[0], self._formats[0])
        if any(f in ("csv", "tsv") for f in self._formats):
            for field in schema:
                if field.name not in self._csv_types:
                    dtype = pa.float64() if pa.types.is_null(field.type) else field.type
                    self._csv_types[field.name] = dtype
        selected = _names(columns, "columns", where)
        if selected is None:
            selected = list(schema.names)
        if not selected:
            raise ValueError(f"{where}: columns must name at least one column, got []")
        if len(set(selected)) != len(selected):
            raise ValueError(f"{where}: columns must not repeat names, got {selected}")
        missing = [c for c in selected if c not in schema.names]
        if missing:
            raise ValueError(
                f"{where}: columns {missing} are not in {self._files[0]!r}; "
                f"it has {list(schema.names)}"
            )
        self.columns = selected
        dense = set(_names(dense_columns, "dense_columns", where) or ())
        ragged = set(_names(ragged_columns, "ragged_columns", where) or ())
        for group, group_name in ((dense, "dense_columns"), (ragged, "ragged_columns")):
            unknown = sorted(group - set(selected))
            if unknown:
                raise ValueError(
                    f"{where}: {group_name} names columns that are not read: {unknown}"
                )
        both = sorted(dense & ragged)
        if both:
            raise ValueError(
                f"{where}: columns {both} are in both dense_columns and ragged_columns"
            )
        fills = self._fills(fill_missing, selected, where)
        self._plans: list[ColumnPlan] = [
            plan_column(
                name,
                schema.field(name).type,
                dense=name in dense,
                ragged=name in ragged,
                fill=fills.get(name),
                where=where,
            )
            for name in selected
        ]

    # ------------------------------------------------------------------------- setup helpers

    @staticmethod
    def _fills(fill_missing: Any, selected: list[str], where: str) -> dict[str, Any]:
        if fill_missing is None:
            return {}
        if isinstance(fill_missing, Mapping):
            unknown = sorted(set(fill_missing) - set(selected))
            if unknown:
                raise ValueError(
                    f"{where}: fill_missing names columns that are not read: {unknown}"
                )
            return dict(fill_missing)
        return dict.fromkeys(selected, fill_missing)

    def _csv_options(self, fmt: str, columns: list[str] | None, types: bool) -> tuple:
        delimiter = self._delimiter or ("," if fmt == "csv" else "\t")
        read = pa_csv.ReadOptions(
            column_names=self._column_names or [], block_size=_CSV_BLOCK_BYTES
        )
        parse = pa_csv.ParseOptions(delimiter=delimiter)
        convert = pa_csv.ConvertOptions(
            include_columns=columns or [],
            column_types=self._csv_types if types else None,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        return read, parse, convert

    def _read_schema(self, path: str, fmt: str) -> pa.Schema:
        try:
            if fmt == "orc":
                return pa_orc.ORCFile(path).schema
            if fmt == "parquet":
                return pq.read_schema(path)
            read, parse, convert = self._csv_options(fmt, None, bool(self._csv_types))
            with pa_csv.open_csv(path, read, parse, convert) as reader:
                return reader.schema
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"FileDataset: cannot read {fmt} file {path!r}: {err}") from None

    # ------------------------------------------------------------------------- reading

    def _chunks(self, path: str, fmt: str) -> Iterator[pa.Table]:
        """The selected columns of one file, as tables of a few thousand rows or more."""
        columns = self.columns
        try:
            if fmt == "orc":
                reader = pa_orc.ORCFile(path)
                self._check_columns(path, reader.schema)
                for stripe in range(reader.nstripes):
                    yield pa.Table.from_batches([reader.read_stripe(stripe, columns=columns)])
            elif fmt == "parquet":
                reader = pq.ParquetFile(path)
                self._check_columns(path, reader.schema_arrow)
                for batch in reader.iter_batches(batch_size=_PARQUET_READ_ROWS, columns=columns):
                    yield pa.Table.from_batches([batch])
            else:
                read, parse, convert = self._csv_options(fmt, columns, True)
                with pa_csv.open_csv(path, read, parse, convert) as reader:
                    self._check_columns(path, reader.schema)
                    for batch in reader:
                        yield pa.Table.from_batches([batch])
        except pa.ArrowException as err:
            raise ValueError(f"FileDataset: cannot read {fmt} file {path!r}: {err}") from None

    def _check_columns(self, path: str, schema: pa.Schema) -> None:
        missing = [c for c in self.columns if c not in schema.names]
        if missing:
            raise ValueError(f"FileDataset: file {path!r} lacks the columns {missing}")

    def _convert(self, table: pa.Table) -> Batch:
        batch: Batch = {}
        for plan in self._plans:
            try:
                batch[plan.name] = convert_column(table.column(plan.name), plan)
            except (ValueError, TypeError) as err:
                raise type(err)(f"FileDataset: {err}") from None
        return self.transform(batch) if self.transform is not None else batch

    def set_epoch(self, epoch: int) -> None:
        r"""Set the epoch that the next iteration uses for shuffling.

        Args:
            epoch (int): epoch number, e.g. the training loop's counter.
        """
        try:
            self._epoch = operator.index(epoch)
        except TypeError:
            raise TypeError(
                f"FileDataset.set_epoch: epoch must be an int, got {type(epoch).__name__}"
            ) from None

    def num_rows(self) -> int | None:
        """Rows in all the files, from the ORC/Parquet footers; None when a CSV/TSV file is
        among them (its rows are known only by reading it)."""
        total = 0
        for path, fmt in zip(self._files, self._formats, strict=True):
            if fmt == "orc":
                total += pa_orc.ORCFile(path).nrows
            elif fmt == "parquet":
                total += pq.ParquetFile(path).metadata.num_rows
            else:
                return None
        return total

    def __len__(self) -> int:
        """Batches the next iteration yields on this shard (from the footers: no data is
        read). ``TypeError`` for CSV/TSV files, whose length is unknown until read."""
        if any(fmt in ("csv", "tsv") for fmt in self._formats):
            raise TypeError("FileDataset: the number of batches of CSV/TSV files is not known "
                            "before reading them")
        shard, num_shards = current_shard(self.rank, self.world_size)

        def batches(rows: int) -> int:
            return rows // self.batch_size if self.drop_remainder else \
                -(-rows // self.batch_size)

        if len(self._files) >= num_shards:
            order = self._order(self._epoch)
            rows = 0
            for pos in range(shard, len(order), num_shards):
                path, fmt = self._files[order[pos]], self._formats[order[pos]]
                rows += (pa_orc.ORCFile(path).nrows if fmt == "orc"
                         else pq.ParquetFile(path).metadata.num_rows)
            return batches(rows)
        total = batches(self.num_rows() or 0)
        return len(range(shard, total, num_shards))

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self._files)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch]).permutation(order)]
        return order

    @property
    def files(self) -> list[str]:
        """The data files, in reading order before shuffling."""
        return list(self._files)

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch
        self._epoch += 1
        shard, num_shards = current_shard(self.rank, self.world_size)
        order = self._order(epoch)
        by_file = len(order) >= num_shards
        if by_file:
            positions = list(range(shard, len(order), num_shards))
        else:
            positions = list(range(len(order)))
        logger.debug(
            "FileDataset epoch %d shard %d/%d reads %d of %d files",
            epoch,
            shard,
            num_shards,
            len(positions),
            len(order),
        )

        def owned(index: int) -> bool:
            return by_file or index % num_shards == shard

        pending: pa.Table | None = None
        start = 0
        index = 0  # batch number in the (shared, when striding) batch sequence
        for pos in positions:
            file_index = order[pos]
            path, fmt = self._files[file_index], self._formats[file_index]
            for chunk_index, chunk in enumerate(self._chunks(path, fmt)):
                if chunk.num_rows == 0:
                    continue
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch, pos, chunk_index])
                    chunk = chunk.take(pa.array(rng.permutation(chunk.num_rows)))
                if pending is None or start >= pending.num_rows:
                    pending, start = chunk, 0
                else:
                    pending, start = pa.concat_tables([pending.slice(start), chunk]), 0
                while pending.num_rows - start >= self.batch_size:
                    if owned(index):
                        yield self._convert(pending.slice(start, self.batch_size))
                    start += self.batch_size
                    index += 1
        if pending is not None and pending.num_rows > start and not self.drop_remainder:
            if owned(index):
                yield self._convert(pending.slice(start))
