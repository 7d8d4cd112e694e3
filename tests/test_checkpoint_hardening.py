"""Checkpoint hardening: regression tests of the faults a fault-injection run found.

Each test is named after the defect it pins down: names that break checkpoint keys, an index
without a checksum, paths that lead out of the checkpoint directory (and files that are not
what the index says), temporary files left by killed saves, and slots dropped by a save's
``filter_func`` that a strict load did not notice.
"""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest
import torch
from safetensors import safe_open

from recis.framework.checkpoint_manager import CheckpointManager
from recis.nn import HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.nn.initializers import NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param, gen_slice
from recis.optim import SparseAdamW
from recis.serialize import CheckpointError, CheckpointReader, Loader, Saver

DIM = 4
DATA = "sparse-00000-of-00001.safetensors"


def make_table(name="t", seed=0, **kw):
    table = HashTable([DIM], block_size=8, name=name, initializer=NormalInitializer(
        generator=torch.Generator().manual_seed(seed)), **kw)
    table.add_slot("m", [DIM], torch.float32, 0.0)
    return table


def filled(name="t", n=100, **kw):
    table = make_table(name, **kw)
    table(torch.arange(n))
    table.delete(torch.arange(0, n, 7))
    table.set_slot_values("m", table.ids_map()[1], torch.rand(len(table), DIM))
    return table


def same_table(a, b):
    ids_a, rows_a = a.ids_map()
    ids_b, rows_b = b.ids_map()
    assert torch.equal(ids_a, ids_b) and torch.equal(rows_a, rows_b)
    for slot in a.slot_names:
        assert torch.equal(a.slot_values(slot, rows_a), b.slot_values(slot, rows_b)), slot


def by_id(table, child=None):
    ids, rows = table.ids_map(child)
    return {i: {s: table.slot_values(s, rows[k : k + 1])[0] for s in table.slot_names}
            for k, i in enumerate(ids.tolist())}


def reseal(index):
    """Give a hand-edited index a valid checksum (a consistent forgery), where indexes have
    one: the checks below must hold even when the checksum does."""
    try:
        from recis.serialize.checkpoint import index_checksum
    except ImportError:  # an index format without a checksum
        return index
    index = {k: v for k, v in index.items() if k != "index_checksum"}
    index["index_checksum"] = index_checksum(index)
    return index


def edit_index(path, edit):
    index_path = os.path.join(path, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    edit(index)
    with open(index_path, "w") as f:
        json.dump(reseal(index), f)


def run_with_timeout(fn, seconds=10.0):
    """fn() in a thread; fails the test (instead of hanging it) when it does not return."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), result


# -- 1. names with '/', '.', '@', '%' ---------------------------------------------------------

ODD_NAMES = ["user/id", "user.id", "@user", "a@b.layout", "100%", "p%2Fq", "with space",
             "ünï/名前.é"]


def odd_table(name, slice=None):  # noqa: A002 - HashTable's argument name
    table = HashTable([DIM], block_size=8, name=name, slice=slice, initializer=NormalInitializer(
        generator=torch.Generator().manual_seed(0)),
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5, "name": "step.filter"}))
    table.add_slot("m.v", [DIM], torch.float32, 0.0)
    return table


def odd_fill(table, ids):
    table(ids)
    table.set_slot_values("m.v", table.ids_map()[1], ids.float()[:, None].expand(-1, DIM) / 7)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_names_with_key_separators_round_trip_exactly(tmp_path, name):
    a = odd_table(name)
    odd_fill(a, torch.arange(100))
    a.delete(torch.arange(0, 100, 9))
    Saver(path=str(tmp_path / "c"), hashtables={name: a}).save()
    b = odd_table(name)
    b(torch.tensor([1000]))
    Loader(str(tmp_path / "c"), {name: b}).load()
    assert len(b) == len(a)
    same_table(a, b)
    assert torch.equal(a(torch.arange(200, 220)), b(torch.arange(200, 220)))


@pytest.mark.parametrize("name", ODD_NAMES)
def test_names_with_key_separators_survive_resharding(tmp_path, name):
    full = odd_table(name)
    odd_fill(full, torch.arange(0, 300_000, 997))
    path = str(tmp_path / "c")
    full._filter_hook_impl.update_step(3)
    full(torch.arange(0, 300_000, 997 * 3))  # stamps 3 in the filter slot of some rows
    for k in range(2):
        shard = odd_table(name, slice=gen_slice(k, 2))
        ids, rows = full.ids_map()
        mine = torch.tensor([gen_slice(k, 2).slice_begin <= i % 65536 < gen_slice(k, 2).slice_end
                             for i in ids.tolist()])
        shard.insert(ids[mine], full.slot_values("embedding", rows[mine]))
        for slot in ("m.v", "step.filter"):
            shard.set_slot_values(slot, shard.ids_map()[1], full.slot_values(slot, rows[mine]))
        assert 0 < len(shard) < len(full)
        Saver(shard_index=k, shard_num=2, path=path, hashtables={name: shard}).save()
    target = odd_table(name)
    Loader(path, {name: target}).load()
    want, got = by_id(full), by_id(target)
    assert got.keys() == want.keys()
    assert {int(v["step.filter"]) for v in want.values()} == {0, 3}
    for i in want:
        for slot in ("embedding", "m.v", "step.filter"):
            assert torch.equal(got[i][slot], want[i][slot]), (i, slot)


def test_coalesced_children_with_odd_names_round_trip(tmp_path):
    children = ["a/b", "@a.layout", "c%d.e"]
    def build(seed=0):
        return HashTable([DIM], block_size=8, name="phys/x.y", coalesced=True,
                         children=children, initializer=NormalInitializer(
                             generator=torch.Generator().manual_seed(seed)))
    a = build()
    for i, child in enumerate(children):
        a.insert(torch.arange(10) + i, torch.full((10, DIM), float(i)), child=child)
    Saver(path=str(tmp_path / "c"), hashtables={"x": a}).save()
    b = build(seed=1)
    Loader(str(tmp_path / "c"), {"x": b}).load()
    same_table(a, b)
    for child in children:
        assert torch.equal(a.ids(child), b.ids(child))
        assert torch.equal(a.embeddings(child), b.embeddings(child))
    reader = CheckpointReader(str(tmp_path / "c"))
    for child in children:
        assert torch.equal(reader.read_tensor(f"{child}@id").sort().values,
                           a.ids(child).sort().values)


def test_reader_shows_unescaped_names_and_ordinary_keys_stay_recis_style(tmp_path):
    a = odd_table("user/emb.v1")
    odd_fill(a, torch.arange(5))
    b = make_table("user_emb")
    b(torch.arange(3))
    Saver(path=str(tmp_path / "c"), hashtables={"a": a, "b": b}).save()
    names = CheckpointReader(str(tmp_path / "c")).tensor_names()
    for field in ("id", "embedding", "step.filter", "m.v"):
        assert f"user/emb.v1@{field}" in names
    assert "user_emb@m" in names
    with safe_open(str(tmp_path / "c" / DATA), "pt") as f:
        keys = set(f.keys())
    assert {"user_emb.id/part_0_1", "user_emb.embedding/part_0_1", "user_emb.m/part_0_1"} <= keys
    assert all(k.count("/") == 1 for k in keys)


# -- 2. index.json checksum and schema ---------------------------------------------------------

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = HashTable([DIM], block_size=8, name="emb", initializer=NormalInitializer(
            generator=torch.Generator().manual_seed(0)),
            filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}))
        self.head = torch.nn.Linear(DIM, 1)

    def forward(self, ids):
        return self.head(self.table(ids)).sum()


def build_training():
    torch.manual_seed(0)
    model = Model()
    dense = torch.optim.Adam(model.head.parameters(), lr=0.01, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=1, gamma=0.5)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.05)
    return model, dense, sched, sparse


def manager_for(objs, out):
    model, dense, sched, sparse = objs
    return CheckpointManager(model, sparse, dense, sched, output_dir=str(out))


def same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same_state(x, y)
    else:
        assert type(a) is type(b) and a == b


def snapshot(objs, step):
    model, dense, sched, sparse = objs
    ids, rows = model.table.ids_map()
    return {"step": step, "ids": ids, "rows": rows,
            "slots": {s: model.table.slot_values(s, rows) for s in model.table.slot_names},
            "filter": model.table._filter_hook_impl.global_step,
            "head": dict(model.head.state_dict()), "dense": dense.state_dict(),
            "sched": sched.state_dict(), "sparse": sparse.state_dict()}


def trained_checkpoint(out):
    objs = build_training()
    model, dense, sched, sparse = objs
    manager = manager_for(objs, out)
    for step in range(3):
        dense.zero_grad()
        sparse.zero_grad()
        model(torch.arange(step, step + 6)).backward()
        dense.step()
        sparse.step()
        sched.step()
        model.table._filter_hook_impl.update_step()
    return manager.save(3, extra={"data": [1, 2.5, "x"]})


def test_index_json_corruption_is_detected(tmp_path):
    ckpt = trained_checkpoint(tmp_path)
    index_path = os.path.join(ckpt, "index.json")
    original = open(index_path, "rb").read()
    objs = build_training()
    reference = snapshot(objs, manager_for(objs, tmp_path).restore())
    rng = random.Random(1234)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\x00", "é"]
    outcomes = {"error": 0, "same": 0}
    indent = original.index(b"\n ") + 1  # trial -1: only whitespace changes, still loads
    for trial in range(-1, 300):
        pos = rng.randrange(len(original)) if trial >= 0 else indent
        char = rng.choice([c for c in alphabet if c.encode() != original[pos : pos + 1]]
                          ) if trial >= 0 else "\t"
        damaged = original[:pos] + char.encode() + original[pos + 1 :]
        with open(index_path, "wb") as f:
            f.write(damaged)
        objs = build_training()
        try:
            step = manager_for(objs, tmp_path).restore()
        except CheckpointError:
            outcomes["error"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"trial {trial}: byte {pos} -> {char!r} raised {type(e).__name__}: {e}")
        try:
            assert json.loads(damaged) == json.loads(original)
            same_state(snapshot(objs, step), reference)
        except AssertionError:
            pytest.fail(f"trial {trial}: byte {pos} -> {char!r} loaded a different state")
        outcomes["same"] += 1
    with open(index_path, "wb") as f:
        f.write(original)
    assert outcomes["error"] > 200 and outcomes["same"] >= 1, outcomes


@pytest.mark.parametrize("edit, key", [
    (lambda ex: ex.update(dense_optimizer={"__tensor__": "nope"}), "dense_optimizer"),
    (lambda ex: ex.update(dense_optimizer={"__dict__": 5}), "dense_optimizer"),
    (lambda ex: ex.update(lr_scheduler={"__dict__": [[{"__dict__": []}, 1]]}), "lr_scheduler"),
    (lambda ex: ex.update(sparse_optimizer={"state": 1}), "sparse_optimizer"),
    (lambda ex: ex.update(global_step="3"), "global_step"),
    (lambda ex: ex.pop("global_step"), "global_step"),
])
def test_manager_state_faults_are_checkpoint_errors(tmp_path, edit, key):
    ckpt = trained_checkpoint(tmp_path)
    edit_index(ckpt, lambda ix: edit(ix["extra"]))
    objs = build_training()
    before = snapshot(objs, None)
    with pytest.raises(CheckpointError, match=key):
        manager_for(objs, tmp_path).restore()
    if key != "sparse_optimizer":  # checked before anything is loaded
        same_state(snapshot(objs, None), before)


def _forged(tmp_path, edit):
    a = filled()
    path = str(tmp_path / "c")
    Saver(path=path, hashtables={"t": a}, tensors={"w": torch.ones(2)}).save(extra={"s": 1})
    edit_index(path, edit)
    return path


@pytest.mark.parametrize("edit, key", [
    (lambda ix: ix.pop("files"), "files"),
    (lambda ix: ix.update(files=[]), "files"),
    (lambda ix: ix.pop("kind"), "kind"),
    (lambda ix: ix.update(kind="half"), "kind"),
    (lambda ix: ix.update(shard_num="1"), "shard_num"),
    (lambda ix: ix.update(shard_num=0), "shard_num"),
    (lambda ix: ix["files"][DATA].pop("crc32"), "crc32"),
    (lambda ix: ix["files"][DATA].update(bytes=-1), "bytes"),
    (lambda ix: ix["tables"]["t"].pop("slots"), "slots"),
    (lambda ix: ix["tables"]["t"]["slots"]["m"].update(dtype="float33"), "dtype"),
    (lambda ix: ix["tables"]["t"].update(embedding_shape=None), "embedding_shape"),
    (lambda ix: ix.update(tables=[1]), "tables"),
    (lambda ix: ix.update(dense="w"), "dense"),
    (lambda ix: ix.update(extra=[]), "extra"),
    (lambda ix: ix.update(physical={"t": "t"}), "physical"),
    (lambda ix: ix.update(policies={"t": {"x": "admit:{"}}), "policies"),
    (lambda ix: ix.update(replaced="t"), "replaced"),
])
def test_index_schema_faults_are_checkpoint_errors(tmp_path, edit, key):
    path = _forged(tmp_path, edit)
    with pytest.raises(CheckpointError, match=key) as info:
        Loader(path, {"t": make_table()}, tensors={"w": torch.zeros(2)}).load()
    assert "index.json" in str(info.value)
    with pytest.raises(CheckpointError, match=key):
        CheckpointReader(path).tensor_names()


def test_index_checksum_mismatch_is_detected(tmp_path):
    path = str(tmp_path / "c")
    Saver(path=path, hashtables={"t": filled()}).save(extra={"lr": 0.01})
    raw = open(os.path.join(path, "index.json")).read()
    assert "0.01" in raw and "index_checksum" in raw
    with open(os.path.join(path, "index.json"), "w") as f:
        f.write(raw.replace("0.01", "0.11"))
    with pytest.raises(CheckpointError, match="index.json.*checksum"):
        Loader(path, {"t": make_table()}).load()


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.update(dense_rows="t"), "dense_rows.*a list of table names"),
    (lambda e: e.update(dense_rows=["nope"]), "dense_rows.*'nope' has \\[\\]"),
    (lambda e: e.pop("dense_rows"), "fields"),  # 'row' is listed for t but not stored
])
def test_a_forged_dense_rows_entry_is_a_clear_error(tmp_path, edit, match):
    """``dense_rows`` (format 3: tables whose rows 0..n-1 are implied) is checked against the
    file's listing like every other field of the index."""
    path = str(tmp_path / "c")
    table = make_table()
    table(torch.arange(30))
    Saver(path=path, hashtables={"t": table}).save()
    edit_index(path, lambda index: edit(index["files"][DATA]))
    with pytest.raises(CheckpointError, match=match):
        Loader(path, {"t": make_table()}).load()


def test_a_stored_row_array_cannot_also_be_implied(tmp_path):
    path = str(tmp_path / "c")
    Saver(path=path, hashtables={"t": filled()}).save()  # rows with holes: 'row' stored
    edit_index(path, lambda index: index["files"][DATA].update(dense_rows=["t"]))
    with pytest.raises(CheckpointError, match="dense_rows.*IDs, and not rows"):
        Loader(path, {"t": make_table()}).load()


def test_format_version_2_loads_and_a_newer_version_is_refused(tmp_path):
    """Checkpoints of format version 2 (every table's rows stored) still load; a version
    newer than this recis asks for an upgrade."""
    path = str(tmp_path / "c")
    source = filled()
    Saver(path=path, hashtables={"t": source}).save()
    edit_index(path, lambda index: index.update(version=2))
    loaded = make_table()
    Loader(path, {"t": loaded}).load()
    same_table(source, loaded)
    edit_index(path, lambda index: index.update(version=4))
    with pytest.raises(CheckpointError, match="format version 4.*versions 2 to 3: upgrade"):
        Loader(path, {"t": make_table()}).load()


def test_index_without_checksum_is_rejected(tmp_path):
    path = str(tmp_path / "c")
    Saver(path=path, hashtables={"t": filled()}).save()
    index = json.loads(open(os.path.join(path, "index.json")).read())
    del index["index_checksum"]
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="index_checksum"):
        Loader(path, {"t": make_table()}).load()
    index["version"] = 1  # as an older recis wrote it: rejected, with the reason
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="format version 1.*older recis"):
        Loader(path, {"t": make_table()}).load()


def test_shard_index_corruption_is_detected(tmp_path):
    path = str(tmp_path / "c")
    full = filled()
    shards = [make_table(slice=gen_slice(k, 2)) for k in range(2)]
    for k, shard in enumerate(shards):
        ids, rows = full.ids_map()
        keep = torch.tensor([gen_slice(k, 2).slice_begin <= i % 65536 < gen_slice(k, 2).slice_end
                             for i in ids.tolist()])
        shard.insert(ids[keep], full.slot_values("embedding", rows[keep]))
    Saver(shard_index=1, shard_num=2, path=path, hashtables={"t": shards[1]}).save()
    staging = tmp_path / ".c.partial"
    part = staging / "index-00001-of-00002.json"
    raw = part.read_text()
    assert "index_checksum" in raw
    part.write_text(raw.replace('"rows"', '"rowz"'))
    with pytest.raises(CheckpointError, match="index-00001-of-00002.json"):
        Saver(shard_index=0, shard_num=2, path=path, hashtables={"t": shards[0]}).save()
    assert not (tmp_path / "c").exists()


# -- 3. paths out of the checkpoint, special files, headers ------------------------------------

def _saved(tmp_path, name="c"):
    path = str(tmp_path / name)
    Saver(path=path, hashtables={"t": filled()}).save()
    return path


def _must_reject(path, match, table=None):
    table = table or make_table()
    table.insert(torch.tensor([42]), torch.ones(1, DIM))
    with pytest.raises(CheckpointError, match=match):
        Loader(path, {"t": table}).load()
    assert table.ids().tolist() == [42]  # untouched


@pytest.mark.parametrize("where", ["parent", "absolute", "etc_passwd"])
def test_data_file_names_leaving_the_checkpoint_are_rejected(tmp_path, where):
    path = _saved(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(path, DATA), outside)  # a valid file: only the name is wrong
    name = {"parent": "../outside.safetensors", "absolute": str(outside),
            "etc_passwd": "/etc/passwd"}[where]

    def edit(ix):
        ix["files"][name] = ix["files"].pop(DATA)

    edit_index(path, edit)
    os.unlink(os.path.join(path, DATA))
    _must_reject(path, "index.json.*files")


def test_symlinked_data_file_is_rejected(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(os.path.join(path, DATA), outside)
    os.symlink(outside, os.path.join(path, DATA))
    _must_reject(path, f"{DATA}.*symbolic link")


def _chain(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    a = filled()
    Saver(path=str(run / "c0"), hashtables={"t": a}).save()
    a(torch.arange(500, 510))
    Saver(path=str(run / "c1"), hashtables={"t": a}).save(incremental=True, base="c0")
    return run, a


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "itself"])
def test_delta_base_leaving_the_directory_is_rejected(tmp_path, where):
    run, a = _chain(tmp_path)
    shutil.copytree(run / "c0", tmp_path / "c0copy")  # a valid base: only the name is wrong
    if where == "symlink":
        os.symlink(tmp_path / "c0copy", run / "c0link")
    base = {"parent": "../c0copy", "absolute": str(tmp_path / "c0copy"),
            "symlink": "c0link", "itself": "c1"}[where]
    edit_index(str(run / "c1"), lambda ix: ix.update(base=base))
    shutil.rmtree(run / "c0")
    _must_reject(str(run / "c1"), {"symlink": "symbolic link", "itself": "loops"}.get(
        where, "index.json.*base"))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_latest_pointer_leaving_the_output_dir_is_rejected(tmp_path, where):
    out = tmp_path / "out"
    table = filled()
    CheckpointManager(table, output_dir=str(out)).save(1)
    shutil.move(out / "ckpt_000000001", tmp_path / "elsewhere")
    if where == "symlink":
        os.symlink(tmp_path / "elsewhere", out / "ckpt_000000001")
        name = "ckpt_000000001"
    else:
        name = {"parent": "../elsewhere", "absolute": str(tmp_path / "elsewhere")}[where]
    (out / "latest").write_text(name)
    fresh = make_table()
    with pytest.raises(CheckpointError, match="latest|symbolic link"):
        CheckpointManager(fresh, output_dir=str(out)).restore()
    assert len(fresh) == 0


def test_fifo_in_place_of_a_data_file_fails_fast(tmp_path):
    path = _saved(tmp_path)
    data = os.path.join(path, DATA)
    os.unlink(data)
    os.mkfifo(data)
    table = make_table()
    alive, result = run_with_timeout(lambda: Loader(path, {"t": table}).load(), 10.0)
    if alive:  # unblock the reader so that the thread ends, then fail
        fd = os.open(data, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("loading a checkpoint whose data file is a FIFO blocked")
    assert isinstance(result.get("error"), CheckpointError), result
    assert DATA in str(result["error"]) and "regular file" in str(result["error"])


def _rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_oversized_data_file_is_rejected_before_reading(tmp_path):
    path = _saved(tmp_path)
    os.truncate(os.path.join(path, DATA), 1 << 30)  # sparse: no disk space used
    before, start = _rchar(), time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{DATA}.*bytes"):
        Loader(path, {"t": make_table()}).load()
    read = _rchar() - before
    assert read < 16 << 20, f"{read} bytes were read before the size was checked"
    assert time.perf_counter() - start < 5


def _rewrite_header(data_path, old, new):
    raw = bytearray(open(data_path, "rb").read())
    (size,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + size].decode()
    assert old in header
    header = header.replace(old, new, 1).encode()
    assert len(header) == size
    raw[8 : 8 + size] = header
    with open(data_path, "wb") as f:
        f.write(raw)
    return zlib.crc32(raw)


def test_header_dtype_forgery_is_detected(tmp_path):
    path = _saved(tmp_path)
    key = "t.embedding/part_0_1"
    crc = _rewrite_header(os.path.join(path, DATA), f'"{key}":{{"dtype":"F32"',
                          f'"{key}":{{"dtype":"I32"')
    edit_index(path, lambda ix: ix["files"][DATA].update(crc32=crc))  # CRC and checksum fixed
    _must_reject(path, f"{DATA}.*{key}.*I32")


def test_header_shape_forgery_is_detected(tmp_path):
    path = _saved(tmp_path)
    with safe_open(os.path.join(path, DATA), "pt") as f:
        rows = f.get_slice("t.m/part_0_1").get_shape()[0]
    crc = _rewrite_header(os.path.join(path, DATA), f'"shape":[{rows},{DIM}]',
                          f'"shape":[{DIM},{rows}]')  # same size, other shape
    edit_index(path, lambda ix: ix["files"][DATA].update(crc32=crc))
    _must_reject(path, f"{DATA}.*shape")


# -- 4. temporary files of killed saves --------------------------------------------------------

def test_stale_tmp_files_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = out / f"latest.tmp-{dead.pid}"
        live = out / f"latest.tmp-{alive.pid}"
        mine = out / f"other.tmp-{os.getpid()}"
        unrelated = out / "notes.tmp-abc"
        for p in (stale, live, mine, unrelated):
            p.write_bytes(b"x")
        table = filled()
        CheckpointManager(table, output_dir=str(out)).save(1)
        assert not stale.exists()
        assert live.exists() and mine.exists() and unrelated.exists()
    finally:
        alive.kill()
        alive.wait()


# -- 5. slots dropped by a save's filter_func --------------------------------------------------

def test_slots_dropped_by_filter_func_are_reported_missing(tmp_path):
    a = filled()
    path = str(tmp_path / "c")
    Saver(path=path, hashtables={"t": a},
          filter_func=lambda keys: [k for k in keys if not k.startswith("t.m/")]).save()
    index = json.loads(open(os.path.join(path, "index.json")).read())
    assert "m" not in index["tables"]["t"]["slots"]
    with pytest.raises(CheckpointError, match=r"Missing: \['t.m'\]"):
        Loader(path, {"t": make_table()}).load()
    b = make_table()
    report = Loader(path, {"t": b}, strict=False).load()
    assert report == {"missing": ["t.m"], "unexpected": []}
    assert torch.equal(b.ids().sort().values, a.ids().sort().values)
