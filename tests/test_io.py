import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.orc as pa_orc
import pyarrow.parquet as pq
import pytest
import torch
import torch.utils.data

from recis.io import (
    FileDataset,
    criteo_batch_to_features,
    criteo_columns,
    criteo_dataset,
    current_shard,
    hash_strings,
    infer_format,
    resolve_rank,
)
from recis.ragged import RaggedTensor

CRITEO_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/criteo-sample"


def write(table: pa.Table, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".orc":
        pa_orc.write_table(table, path)
    elif suffix in (".parquet", ".pq"):
        pq.write_table(table, path, row_group_size=7)
    else:
        delimiter = "," if suffix == ".csv" else "\t"
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(delimiter=delimiter))
    return path


def id_files(tmp_path, rows_per_file, suffix=".parquet"):
    """Files with an ``id`` column numbering the rows 0, 1, ... across files."""
    paths, start = [], 0
    for i, rows in enumerate(rows_per_file):
        ids = np.arange(start, start + rows, dtype=np.int64)
        table = pa.table({"id": ids, "x": ids.astype(np.float64) / 2})
        paths.append(write(table, tmp_path / f"part-{i}{suffix}"))
        start += rows
    return paths, start


def all_ids(dataset):
    return [int(v) for batch in dataset for v in batch["id"]]


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".orc", ".parquet", ".csv", ".tsv"])
def test_scalar_columns_each_format(tmp_path, suffix):
    table = pa.table(
        {
            "a": pa.array([1, None, 3, 4, 5], pa.int32()),
            "b": pa.array([0.5, 1.5, None, -2.0, 1e3], pa.float64()),
            "s": pa.array(["x", "y", None, "x", "zz"]),
        }
    )
    path = write(table, tmp_path / f"data{suffix}")
    batches = list(FileDataset(path, batch_size=2))
    assert [len(b["a"]) for b in batches] == [2, 2, 1]
    a = torch.cat([b["a"] for b in batches])
    b = torch.cat([b["b"] for b in batches])
    s = torch.cat([b["s"] for b in batches])
    assert a.dtype == torch.int64 and b.dtype == torch.float32 and s.dtype == torch.int64
    assert a.tolist() == [1, 0, 3, 4, 5]  # null -> 0
    assert b.tolist() == [0.5, 1.5, 0.0, -2.0, 1000.0]
    hashed = hash_strings(["x", "y", "x", "zz"]).tolist()
    assert s.tolist() == [hashed[0], hashed[1], 0, hashed[2], hashed[3]]
    assert s[0] == s[3] and s[0] != s[1]


@pytest.mark.parametrize("suffix", [".orc", ".parquet"])
def test_list_columns(tmp_path, suffix):
    table = pa.table(
        {
            "ids": pa.array([[1, 2], None, [], [3, None, 4], [5]], pa.list_(pa.int64())),
            "w": pa.array([[0.5], [], None, [1.5], [2.5]], pa.list_(pa.float32())),
        }
    )
    path = write(table, tmp_path / f"lists{suffix}")
    batch = next(iter(FileDataset(path, batch_size=10)))
    ids = batch["ids"]
    assert isinstance(ids, RaggedTensor)
    assert ids.values().tolist() == [1, 2, 3, 4, 5]  # null items dropped
    assert ids.offsets()[0].tolist() == [0, 2, 2, 2, 4, 5]  # null list -> empty row
    assert ids.offsets()[0].dtype == torch.int64
    assert batch["w"].values().dtype == torch.float32

    dense = next(iter(FileDataset(path, 10, dense_columns=["w"], fill_missing={"w": -1.0})))
    assert dense["w"].tolist() == [0.5, -1.0, -1.0, 1.5, 2.5]
    assert isinstance(dense["ids"], RaggedTensor)
    with pytest.raises(ValueError, match="'ids' is read dense but has a row with 2 items"):
        next(iter(FileDataset(path, 10, dense_columns=["ids"])))


def test_ragged_scalar_column_and_fill_scalar(tmp_path):
    table = pa.table({"a": pa.array([7, None, 9]), "b": pa.array([None, 2.0, 3.0])})
    path = write(table, tmp_path / "t.parquet")
    batch = next(iter(FileDataset(path, 8, ragged_columns=["a"], fill_missing=5)))
    assert batch["a"].values().tolist() == [7, 9]
    assert batch["a"].offsets()[0].tolist() == [0, 1, 1, 2]
    assert batch["b"].tolist() == [5.0, 2.0, 3.0]


def test_sliced_list_batches_match_whole(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, 100)
    rows = [None if n == 3 else list(range(i, i + n)) for i, n in enumerate(lengths)]
    path = write(pa.table({"ids": pa.array(rows, pa.list_(pa.int64()))}), tmp_path / "l.orc")
    got = []
    for batch in FileDataset(path, 13):
        rt = batch["ids"]
        offs = rt.offsets()[0].tolist()
        vals = rt.values().tolist()
        got += [vals[offs[i] : offs[i + 1]] for i in range(len(offs) - 1)]
    assert got == [r or [] for r in rows]


def test_csv_options(tmp_path):
    (tmp_path / "a.txt").write_text("1\t\t7\n0\t2.5\t\n")
    (tmp_path / "b.txt").write_text("1\t3\t8\n")
    ds = FileDataset(
        [tmp_path / "a.txt", tmp_path / "b.txt"],
        batch_size=10,
        column_names=["y", "f", "n"],
    )
    batch = next(iter(ds))
    assert batch["y"].tolist() == [1, 0, 1]
    assert batch["f"].dtype == torch.float32 and batch["f"].tolist() == [0.0, 2.5, 3.0]
    assert batch["n"].tolist() == [7, 0, 8]
    # Explicit types; comma override of the delimiter; header row.
    (tmp_path / "c.csv").write_text("p;q\n1;\n2;x\n")
    ds = FileDataset(tmp_path / "c.csv", 4, delimiter=";", column_types={"p": "float32"})
    batch = next(iter(ds))
    assert batch["p"].dtype == torch.float32
    assert batch["q"].tolist() == [0, hash_strings(["x"]).item()]


def test_columns_selection_and_order(tmp_path):
    path = write(pa.table({"a": [1, 2], "b": [3.0, 4.0], "c": [5, 6]}), tmp_path / "t.orc")
    batch = next(iter(FileDataset(path, 2, columns=["c", "a"])))
    assert list(batch) == ["c", "a"]


# ----------------------------------------------------------------------------- batching


def test_batches_cross_files_and_remainder(tmp_path):
    paths, total = id_files(tmp_path, [5, 0, 7, 3])
    batches = list(FileDataset(paths, 4))
    assert [len(b["id"]) for b in batches] == [4, 4, 4, 3]
    assert all_ids(FileDataset(paths, 4)) == list(range(total))
    dropped = list(FileDataset(paths, 4, drop_remainder=True))
    assert [len(b["id"]) for b in dropped] == [4, 4, 4]
    assert torch.equal(batches[1]["x"], batches[1]["id"].float() / 2)


def test_epochs_restart_and_shuffle(tmp_path):
    paths, total = id_files(tmp_path, [10, 10, 10])
    ds = FileDataset(paths, 7)
    assert all_ids(ds) == all_ids(ds) == list(range(total))
    shuffled = FileDataset(paths, 7, shuffle=True, seed=3)
    first, second = all_ids(shuffled), all_ids(shuffled)
    assert sorted(first) == sorted(second) == list(range(total))
    assert first != list(range(total)) and first != second
    again = FileDataset(paths, 7, shuffle=True, seed=3)
    assert all_ids(again) == first
    again.set_epoch(1)
    assert all_ids(again) == second


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("files,world", [([6, 4, 5, 3], 2), ([20], 2), ([9, 12], 3)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_complete(tmp_path, files, world, shuffle):
    paths, total = id_files(tmp_path, files)
    seen = []
    for rank in range(world):
        ds = FileDataset(paths, 4, rank=rank, world_size=world, shuffle=shuffle)
        ids = all_ids(ds)
        assert ids == all_ids(FileDataset(paths, 4, rank=rank, world_size=world, shuffle=shuffle))
        seen.append(set(ids))
        assert len(ids) == len(set(ids))
    assert sum(len(s) for s in seen) == total
    assert set().union(*seen) == set(range(total))


def test_worker_split(tmp_path, monkeypatch):
    paths, total = id_files(tmp_path, [17])

    class Info:
        num_workers = 2

        def __init__(self, worker_id):
            self.id = worker_id

    seen = []
    for rank in range(2):
        for worker in range(2):
            info = Info(worker)
            monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            assert current_shard(rank, 2) == (rank * 2 + worker, 4)
            seen.append(all_ids(FileDataset(paths, 3, rank=rank, world_size=2)))
    assert sorted(sum(seen, [])) == list(range(total))
    assert all(len(s) > 0 for s in seen)


def test_dataloader_workers(tmp_path):
    paths, total = id_files(tmp_path, [8, 8, 8])
    loader = torch.utils.data.DataLoader(
        FileDataset(paths, 4), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    ids = [int(v) for batch in loader for v in batch["id"]]
    assert sorted(ids) == list(range(total))


def test_rank_defaults(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (2, 4)
    assert resolve_rank(1, 2) == (1, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=4\), got 5"):
        resolve_rank(5)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        resolve_rank()


# ----------------------------------------------------------------------------- validation


def test_validation(tmp_path):
    path = write(pa.table({"a": [1, 2], "l": pa.array([[1], [2]])}), tmp_path / "t.orc")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        FileDataset(path, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        FileDataset(path, 2.0)
    with pytest.raises(ValueError, match=r"columns \['zz'\] are not in"):
        FileDataset(path, 2, columns=["zz"])
    with pytest.raises(ValueError, match="dense_columns names columns that are not read"):
        FileDataset(path, 2, columns=["a"], dense_columns=["l"])
    with pytest.raises(ValueError, match="in both dense_columns and ragged_columns"):
        FileDataset(path, 2, dense_columns=["l"], ragged_columns=["l"])
    with pytest.raises(TypeError, match="fill_missing for integer column 'a'"):
        FileDataset(path, 2, fill_missing=0.5)
    with pytest.raises(ValueError, match="fill_missing names columns that are not read"):
        FileDataset(path, 2, fill_missing={"q": 1})
    with pytest.raises(ValueError, match="format must be one of"):
        FileDataset(path, 2, format="json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        FileDataset(tmp_path / "missing.orc", 2)
    with pytest.raises(ValueError, match="matched no files"):
        FileDataset(str(tmp_path / "*.parquet"), 2)
    with pytest.raises(ValueError, match="cannot tell the format"):
        infer_format("x.json")
    with pytest.raises(TypeError, match="unsupported type"):
        FileDataset(write(pa.table({"t": pa.array([{"k": 1}])}), tmp_path / "s.parquet"), 1)
    with pytest.raises(TypeError, match="values must be a sequence"):
        hash_strings("abc")


def test_overflowing_and_inconsistent_files(tmp_path):
    path = write(pa.table({"u": pa.array([2**63], pa.uint64())}), tmp_path / "u.parquet")
    with pytest.raises(ValueError, match="'u' cannot be converted to int64"):
        next(iter(FileDataset(path, 1)))
    first = write(pa.table({"a": [1]}), tmp_path / "a.parquet")
    second = write(pa.table({"b": [1]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"lacks the columns \['a'\]"):
        list(FileDataset([first, second], 1))


def test_hash_strings_is_fnv1a():
    assert hash_strings([""]).item() == 0xCBF29CE484222325 & (2**63 - 1)
    assert hash_strings(["a", b"a"]).tolist() == [0xAF63DC4C8601EC8C & (2**63 - 1)] * 2


# ----------------------------------------------------------------------------- Criteo


def test_criteo_batch_to_features_small():
    label, dense, sparse = criteo_columns()
    assert label == "label" and dense[0] == "i1" and dense[-1] == "i13"
    assert sparse[0] == "c1" and len(sparse) == 26
    empty_or_one = RaggedTensor(torch.tensor([4.0]), torch.tensor([0, 0, 1]))
    batch = {"label": torch.tensor([1, 0]), **{d: empty_or_one for d in dense}}
    batch.update({s: RaggedTensor(torch.tensor([11]), torch.tensor([0, 1, 1])) for s in sparse})
    out = criteo_batch_to_features(batch)
    assert out["label"].dtype == torch.float32 and out["label"].tolist() == [1.0, 0.0]
    assert out["dense"].shape == (2, 13) and out["dense"][:, 0].tolist() == [0.0, 4.0]
    assert out["c3"].lengths().tolist() == [1, 0]
    dense_out = criteo_batch_to_features(batch, sparse_format="dense", missing_id=-1)
    assert dense_out["c3"].shape == (2, 1) and dense_out["c3"][:, 0].tolist() == [11, -1]
    with pytest.raises(ValueError, match="lacks the Criteo columns"):
        criteo_batch_to_features({"label": torch.zeros(2)})
    with pytest.raises(ValueError, match="sparse_format must be one of"):
        criteo_batch_to_features(batch, sparse_format="coo")


def test_criteo_raw_text(tmp_path):
    label, dense, sparse = criteo_columns()
    rows = [["1", *["3"] * 13, *["68fd1e64"] * 26], ["0", *[""] * 13, *[""] * 26]]
    (tmp_path / "day_0.txt").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="no header line"):  # never read by position unasked
        criteo_dataset(tmp_path, 8)
    batch = next(iter(criteo_dataset(tmp_path, 8, columns="criteo")))  # a directory of them
    assert batch["label"].tolist() == [1.0, 0.0]
    assert batch["dense"].tolist() == [[3.0] * 13, [0.0] * 13]
    assert batch["c26"].values().tolist() == hash_strings(["68fd1e64"]).tolist()
    assert batch["c26"].lengths().tolist() == [1, 0]


@pytest.mark.skipif(not CRITEO_DIR.is_dir(), reason=f"Criteo sample not found at {CRITEO_DIR}")
def test_criteo_sample_orc():
    path = CRITEO_DIR / "part-0.orc"
    table = pa_orc.read_table(path, columns=["label", "i1", "c14"])
    raw_missing_c14 = sum(len(v) == 0 for v in table.column("c14").to_pylist())
    raw_i1 = [v[0] if len(v) else 0.0 for v in table.column("i1").to_pylist()]
    ds = criteo_dataset(path, 4096)
    batches = list(ds)
    assert [len(b["label"]) for b in batches] == [4096, 4096, 1808]
    labels = torch.cat([b["label"] for b in batches])
    assert 0.02 < float(labels.mean()) < 0.05
    dense = torch.cat([b["dense"] for b in batches])
    assert dense.dtype == torch.float32 and dense.shape == (10_000, 13)
    assert dense[:, 0].tolist() == raw_i1
    missing = sum(int((b["c14"].lengths() == 0).sum()) for b in batches)
    assert missing == raw_missing_c14 > 0
    assert batches[0]["c1"].values().dtype == torch.int64
    assert int(batches[0]["c1"].values().max()) < 2**40
    assert not any(math.isnan(v) for v in dense.flatten()[:1000].tolist())


@pytest.mark.skipif(not CRITEO_DIR.is_dir(), reason=f"Criteo sample not found at {CRITEO_DIR}")
def test_criteo_sample_sharded_by_file():
    files = sorted(CRITEO_DIR.glob("part-*.orc"))
    counts = [
        sum(
            len(b["label"])
            for b in FileDataset(
                files, 8192, columns=["label"], dense_columns=["label"], rank=r, world_size=4
            )
        )
        for r in range(4)
    ]
    assert counts == [20_000, 20_000, 10_000, 10_000]
