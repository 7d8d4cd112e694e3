"""Checkpoints: exact round trips, strictness, corruption, resharding, incremental chains,
the manager, bit-for-bit resume of training, and saves killed at random moments."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors import safe_open

from recis.framework import Trainer, TrainingArguments
from recis.framework.checkpoint_manager import CheckpointManager
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.nn.initializers import NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param, gen_slice
from recis.optim import SparseAdam
from recis.serialize import CheckpointError, CheckpointReader, Loader, Saver, compact

DIM = 4


def make_table(name="t", seed=0, **kw):
    table = HashTable([DIM], block_size=8, name=name, initializer=NormalInitializer(
        generator=torch.Generator().manual_seed(seed)), **kw)
    table.add_slot("m", [DIM], torch.float32, 0.0)
    return table


def churn(table, start=0):
    table(torch.arange(start, start + 20))
    table.delete(torch.arange(start, start + 20, 3))
    table.set_slot_values("m", table.ids_map()[1], torch.rand(len(table), DIM))


def same_table(a, b):
    ids_a, rows_a = a.ids_map()
    ids_b, rows_b = b.ids_map()
    assert torch.equal(ids_a, ids_b) and torch.equal(rows_a, rows_b)
    for slot in a.slot_names:
        assert torch.equal(a.slot_values(slot, rows_a), b.slot_values(slot, rows_b)), slot


def test_round_trip_is_exact_and_training_continues_identically(tmp_path):
    a = make_table()
    churn(a)
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save(extra={"step": 7})
    b = make_table(seed=99)
    b(torch.tensor([1000, 1001]))  # loading replaces: these rows must disappear
    Loader(str(tmp_path / "c"), {"t": b}).load()
    same_table(a, b)
    # the rows without an ID and the RNG come back too: new IDs get the same rows and values
    assert torch.equal(a(torch.arange(50, 90)), b(torch.arange(50, 90)))
    same_table(a, b)
    assert CheckpointReader(str(tmp_path / "c")).extra == {"step": 7}


def test_files_are_readable_with_safetensors_alone(tmp_path):
    a = make_table("user")
    a.insert(torch.tensor([5, -3]), torch.ones(2, DIM))
    Saver(path=str(tmp_path / "c"), hashtables={"user": a}).save()
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["format"] == "recis-checkpoint" and index["kind"] == "full"
    with safe_open(str(tmp_path / "c" / "sparse-00000-of-00001.safetensors"), "pt") as f:
        ids = f.get_tensor("user.id/part_0_1")
        emb = f.get_tensor("user.embedding/part_0_1")
    assert ids.tolist() == [5, -3] and torch.equal(emb, torch.ones(2, DIM))
    reader = CheckpointReader(str(tmp_path / "c"))
    assert "user@embedding" in reader.tensor_names()
    assert reader.tensor_shape("user@embedding") == [2, DIM]
    assert reader.tensor_dtype("user@id") == torch.int64


def test_strict_checks_name_what_is_missing_or_mismatched(tmp_path):
    a = make_table()
    a(torch.arange(5))
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}, tensors={"w": torch.ones(3)}).save()
    other = HashTable([DIM], name="t")  # no slot "m"
    with pytest.raises(CheckpointError, match=r"Unexpected: \['t.m'\]"):
        Loader(str(tmp_path / "c"), {"t": other}).load()
    report = Loader(str(tmp_path / "c"), {"t": other}, strict=False).load()
    assert report == {"missing": [], "unexpected": ["t.m"]}
    assert len(other) == 5
    with pytest.raises(CheckpointError, match="shape"):
        Loader(str(tmp_path / "c"), {"t": HashTable([DIM + 1], name="t")}).load()
    w = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"Missing: \['nope'\]"):
        Loader(str(tmp_path / "c"), {"t": make_table()},
               tensors={"w": w, "nope": torch.zeros(1)}).load()
    with pytest.raises(CheckpointError, match="'w'"):
        Loader(str(tmp_path / "c"), {"t": make_table()}, tensors={"w": torch.zeros(4)}).load()
    Loader(str(tmp_path / "c"), {"t": make_table()}, tensors={"w": w}).load()
    assert torch.equal(w, torch.ones(3))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_index", "delete_file"])
def test_damaged_checkpoints_are_clear_errors_and_tables_stay_untouched(tmp_path, damage):
    a = make_table()
    churn(a)
    path = tmp_path / "c"
    Saver(path=str(path), hashtables={"t": a}).save()
    data = path / "sparse-00000-of-00001.safetensors"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-10])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "delete_index":
        (path / "index.json").unlink()
    else:
        data.unlink()
    b = make_table()
    b.insert(torch.tensor([42]), torch.ones(1, DIM))
    match = {"truncate": "sparse-00000-of-00001.safetensors.*truncated",
             "flip": "sparse-00000-of-00001.safetensors is corrupted",
             "delete_index": "not a complete checkpoint",
             "delete_file": "sparse-00000-of-00001.safetensors is missing"}[damage]
    with pytest.raises(CheckpointError, match=match):
        Loader(str(path), {"t": b}).load()
    assert b.ids().tolist() == [42]


@pytest.mark.parametrize("children", [1, 2])
def test_exact_loads_take_owners_from_the_file_as_the_replay_does(tmp_path, monkeypatch,
                                                                   children):
    """A full checkpoint of one child is restored from its ID array directly, without the
    per-row replay; with free rows (deleted IDs), reused rows and rows without an ID, the
    table equals the one the replay builds: IDs, rows, slots, allocator, next inserts. Two
    children take the replay."""
    from recis.serialize import checkpoint

    kids = ["a", "b"][:children]

    def build(seed):
        return HashTable([DIM], block_size=8, name="t", coalesced=True, children=kids,
                         initializer=NormalInitializer(
                             generator=torch.Generator().manual_seed(seed)))

    a = build(0)
    for i, kid in enumerate(kids):
        a.insert(torch.arange(40) + 1000 * i, torch.randn(40, DIM), child=kid)
    a.delete(torch.arange(0, 40, 3), child="a")
    a.insert(torch.arange(50, 55), torch.randn(5, DIM), child="a")  # reuses freed rows
    a.delete(torch.arange(1, 40, 7), child="a")
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    calls = []
    sole_owner = checkpoint._SoleOwner.of
    monkeypatch.setattr(checkpoint._SoleOwner, "of",
                        staticmethod(lambda *args: calls.append(sole_owner(*args)) or calls[-1]))
    direct = build(5)
    Loader(str(tmp_path / "c"), {"t": direct}).load()
    assert (calls[0] is not None) == (children == 1)
    monkeypatch.setattr(checkpoint._SoleOwner, "of", staticmethod(lambda *args: None))
    replayed = build(5)
    Loader(str(tmp_path / "c"), {"t": replayed}).load()
    for b in (direct, replayed):
        same_table(a, b)
        for kid in kids:
            assert torch.equal(a.ids(kid), b.ids(kid))
            assert torch.equal(a.embeddings(kid), b.embeddings(kid))
        for field in ("next_row", "free", "capacity"):
            assert torch.equal(b.store.layout()[field], a.store.layout()[field]), field
    new_ids = torch.arange(200, 240)
    for b in (direct, replayed):  # new IDs: same rows (freed ones first), same values
        b.insert(new_ids, torch.ones(40, DIM), child="a")
    same_table(direct, replayed)


def _stored_keys(path):
    with safe_open(os.path.join(path, "sparse-00000-of-00001.safetensors"), "pt") as f:
        return set(f.keys())


def _file_entry(path):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)["files"]["sparse-00000-of-00001.safetensors"]


def test_rows_0_to_n_are_implied_not_stored_and_load_exactly(tmp_path):
    """A full save of a table whose rows are 0..n-1 (no row freed, or every freed row
    reused) stores no ``row`` array: the file lists the table in ``dense_rows``. The load is
    exact (same rows, allocator, next inserts) and readers see the rows 0..n-1. A table with
    free rows, a table of two children and a delta store their rows."""
    a = make_table()
    a(torch.arange(40))
    a.set_slot_values("m", a.ids_map()[1], torch.rand(40, DIM))
    for name, dense in (("full", True), ("holes", False), ("reused", True)):
        if name == "holes":
            a.delete(torch.tensor([3, 17, 39]))
        if name == "reused":
            a(torch.tensor([100, 101, 102]))  # takes the freed rows back: 0..39 again
        path = str(tmp_path / name)
        Saver(path=path, hashtables={"t": a}).save()
        assert ("t.row/part_0_1" not in _stored_keys(path)) == dense, name
        assert _file_entry(path).get("dense_rows") == (["t"] if dense else None), name
        b = make_table(seed=5)
        b(torch.tensor([999]))
        Loader(path, {"t": b}).load()
        same_table(a, b)
        for field in ("next_row", "free", "capacity"):
            assert torch.equal(b.store.layout()[field], a.store.layout()[field]), (name, field)
        rows = CheckpointReader(path).read_tensor("t@row")
        assert torch.equal(rows, a.ids_map()[1]), name
        assert torch.equal(b(torch.arange(200, 230)), a(torch.arange(200, 230))), name
    shared = HashTable([DIM], block_size=8, name="s", coalesced=True, children=["x", "y"])
    shared.insert(torch.arange(10), torch.randn(10, DIM), child="x")
    shared.insert(torch.arange(5), torch.randn(5, DIM), child="y")
    Saver(path=str(tmp_path / "shared"), hashtables={"s": shared}).save()
    assert {"x.row/part_0_1", "y.row/part_0_1"} <= _stored_keys(str(tmp_path / "shared"))
    c = make_table()
    c(torch.arange(20))
    Saver(path=str(tmp_path / "base"), hashtables={"t": c}).save()
    c(torch.arange(20, 30))
    Saver(path=str(tmp_path / "delta"), hashtables={"t": c}).save(incremental=True,
                                                                   base="base")
    assert "t.row/part_0_1" in _stored_keys(str(tmp_path / "delta"))
    d = make_table(seed=3)
    Loader(str(tmp_path / "delta"), {"t": d}).load()
    same_table(c, d)


def test_saves_while_another_thread_inserts_hold_whole_batches(tmp_path):
    """A blocking save lists a table's IDs in a worker while it writes the slot values; the
    table's write lock keeps other threads out until both are done, so each checkpoint taken
    while a thread inserts holds whole batches, every ID with its own values, and loads
    exactly. Free rows (taken back by the inserts) and rows 0..n-1 both occur."""
    table = HashTable([DIM], block_size=64, name="t")
    table.insert(torch.arange(-100, 0), torch.arange(-100, 0).float()[:, None].expand(-1, DIM))
    table.delete(torch.arange(-100, -50))
    with pytest.raises(RuntimeError, match="write lock"):
        table.store.ids_by_row(lock=False)
    stop = threading.Event()

    def insert():
        batch = 0
        while not stop.is_set():
            ids = torch.arange(batch * 50, batch * 50 + 50)
            table.insert(ids, ids.float()[:, None].expand(-1, DIM))
            batch += 1
            time.sleep(0.001)

    thread = threading.Thread(target=insert, daemon=True)
    thread.start()
    try:
        for i in range(8):
            Saver(path=str(tmp_path / f"c{i}"), hashtables={"t": table}).save()
    finally:
        stop.set()
        thread.join(10)
    kinds = set()
    for i in range(8):
        path = str(tmp_path / f"c{i}")
        kinds.add("dense_rows" in _file_entry(path))
        loaded = HashTable([DIM], block_size=64, name="t")
        Loader(path, {"t": loaded}).load()
        ids, rows = loaded.ids_map()
        inserted = ids[ids >= 0].sort().values
        assert torch.equal(inserted, torch.arange(inserted.numel()))
        assert inserted.numel() % 50 == 0 and (ids < 0).sum() == 50
        assert torch.equal(loaded.slot_values("embedding", rows),
                           ids.float()[:, None].expand(-1, DIM))
        assert torch.equal(rows, torch.arange(ids.numel())) == ("dense_rows" in
                                                                _file_entry(path))
    assert True in kinds


def test_saves_never_overwrite(tmp_path):
    a = make_table()
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    with pytest.raises(CheckpointError, match="already exists"):
        Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()


def _split(table, parts, name="t"):
    """Shards of a table by the 65536-slice rule."""
    ids, rows = table.ids_map()
    shards = []
    for k in range(parts):
        shard = make_table(name, slice=gen_slice(k, parts))
        mine = torch.tensor([s.slice_begin <= (i % 65536) < s.slice_end
                             for i in ids.tolist() for s in [gen_slice(k, parts)]])
        shard.insert(ids[mine], table.slot_values("embedding", rows[mine]))
        shard.set_slot_values("m", shard.ids_map()[1],
                              table.slot_values("m", rows[mine]))
        shards.append(shard)
    return shards


@pytest.mark.parametrize("saved, loaded", [(2, 3), (3, 1), (1, 2)])
def test_n_shards_load_into_m(tmp_path, saved, loaded):
    full = make_table()
    full.insert(torch.randint(-(2**62), 2**62, (300,)), torch.randn(300, DIM))
    full.set_slot_values("m", full.ids_map()[1], torch.randn(300, DIM))
    path = str(tmp_path / "c")
    for k, shard in reversed(list(enumerate(_split(full, saved)))):
        Saver(shard_index=k, shard_num=saved, path=path, hashtables={"t": shard}).save()
    assert json.loads((tmp_path / "c" / "index.json").read_text())["shard_num"] == saved
    targets = [make_table(slice=gen_slice(k, loaded)) for k in range(loaded)]
    for target in targets:
        Loader(path, {"t": target}).load()
    expected = {i: r for i, r in zip(full.ids().tolist(), full.embeddings(), strict=True)}
    seen = {}
    for target in targets:
        for i, row in zip(target.ids().tolist(), target.embeddings(), strict=True):
            assert i not in seen
            seen[i] = row
    assert seen.keys() == expected.keys()
    for i in expected:
        assert torch.equal(seen[i], expected[i])


def test_incremental_chain_and_compaction(tmp_path):
    a = make_table()
    churn(a)
    Saver(path=str(tmp_path / "c0"), hashtables={"t": a}).save()
    full_size = sum(f.stat().st_size for f in (tmp_path / "c0").iterdir())
    for step in range(1, 4):
        a(torch.arange(100 * step, 100 * step + 3))
        a.delete(torch.tensor([1, 2, 100 * (step - 1)]))
        Saver(path=str(tmp_path / f"c{step}"), hashtables={"t": a}).save(
            incremental=True, base=f"c{step - 1}")
    index = json.loads((tmp_path / "c3" / "index.json").read_text())
    assert index["kind"] == "delta" and index["base"] == "c2"
    delta_size = sum(f.stat().st_size for f in (tmp_path / "c3").iterdir())
    assert delta_size < full_size
    b = make_table(seed=5)
    Loader(str(tmp_path / "c3"), {"t": b}).load()
    same_table(a, b)
    compact(str(tmp_path / "c3"), str(tmp_path / "full"))
    assert json.loads((tmp_path / "full" / "index.json").read_text())["kind"] == "full"
    c = make_table(seed=6)
    Loader(str(tmp_path / "full"), {"t": c}).load()
    same_table(a, c)
    assert torch.equal(a(torch.arange(900, 930)), c(torch.arange(900, 930)))
    with pytest.raises(ValueError, match="base"):
        Saver(path=str(tmp_path / "x"), hashtables={"t": a}).save(incremental=True)


def test_optimizer_and_filter_state_round_trip(tmp_path):
    def build():
        table = HashTable([DIM], name="f", filter_hook=FilterHook("GlobalStepFilter",
                                                                 {"filter_step": 2}))
        return table, SparseAdam([table], lr=0.1)

    a, opt_a = build()
    hook = HashTableFilterHook(filter_interval=1, tables=[a])
    for step in range(3):
        opt_a.zero_grad()
        a(torch.tensor([step, 10])).sum().backward()
        opt_a.step()
        hook.after_step(None, step)
    manager = CheckpointManager(a, opt_a, output_dir=str(tmp_path))
    manager.save(3)
    b, opt_b = build()
    assert CheckpointManager(b, opt_b, output_dir=str(tmp_path)).restore() == 3
    same_table(a, b)
    assert opt_b.state_dict() == opt_a.state_dict()
    assert b._filter_hook_impl.global_step == a._filter_hook_impl.global_step == 3


def test_manager_keeps_max_keep_and_the_bases_they_need(tmp_path):
    table = make_table()
    manager = CheckpointManager(table, output_dir=str(tmp_path), save_interval=1, max_keep=2,
                                incremental_every=3)
    for step in range(1, 8):
        table(torch.tensor([step]))
        manager.step(step)
    names = manager.checkpoints()
    assert names[-1] == "ckpt_000000007" and open(tmp_path / "latest").read() == names[-1]
    kinds = {n: json.loads((tmp_path / n / "index.json").read_text())["kind"] for n in names}
    assert kinds["ckpt_000000007"] == "full" or kinds["ckpt_000000006"] in ("full", "delta")
    # every kept delta's chain is complete
    fresh = make_table(seed=3)
    assert CheckpointManager(fresh, output_dir=str(tmp_path)).restore() == 7
    same_table(table, fresh)
    assert len(names) <= 2 + 2  # two kept plus at most the full base of their chain


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = HashTable([DIM], name="ids", initializer=NormalInitializer(
            generator=torch.Generator().manual_seed(0)),
            filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}))
        self.head = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Dropout(0.3),
                                        torch.nn.Linear(8, 1))

    def forward(self, batch):
        logit = self.head(self.table(batch["ids"])).squeeze(1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch["label"])


def _stream(n=12):
    gen = torch.Generator().manual_seed(1)
    return [{"ids": torch.randint(0, 40 + 5 * i, (16,), generator=gen),
             "label": torch.randint(0, 2, (16,), generator=gen).float()} for i in range(n)]


def _run(out_dir, steps, save_steps, incremental_every=0):
    torch.manual_seed(123)
    model = Tiny()
    dense = torch.optim.Adam(model.head.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=2, gamma=0.9)
    sparse = SparseAdam(filter_out_sparse_param(model), lr=0.05)
    args = TrainingArguments(train_steps=steps, save_steps=save_steps, output_dir=out_dir,
                             progress_bar=False, incremental_every=incremental_every)
    trainer = Trainer(model, args, _stream(), hooks=[HashTableFilterHook(2, tables=[model])],
                      dense_optimizers=(dense, sched), sparse_optimizer=sparse)
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("incremental_every", [0, 2])
def test_n_steps_save_load_m_steps_equals_n_plus_m(tmp_path, incremental_every):
    straight, _ = _run(str(tmp_path / "straight"), 12, None)
    _run(str(tmp_path / "resumed"), 5, 2, incremental_every)  # stops after step 5 (saved)
    resumed, trainer = _run(str(tmp_path / "resumed"), 12, 2, incremental_every)
    assert trainer.global_step == 12
    same_table(straight.table, resumed.table)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert straight.table._filter_hook_impl.global_step == 12


_KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from recis.nn import HashTable
    from recis.framework.checkpoint_manager import CheckpointManager
    table = HashTable([16], name="t", block_size=1024)
    manager = CheckpointManager(table, output_dir=sys.argv[1], max_keep=3,
                                incremental_every=2)
    start = (manager.restore() or 0) + 1
    for step in range(start, start + 1000):
        table.insert(torch.arange(step * 100, step * 100 + 3000),
                     torch.full((3000, 16), float(step)))
        manager.save(step)
        print(step, flush=True)
""")


def test_kill_minus_nine_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    log = tmp_path / "stderr.txt"
    for _ in range(8):
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, str(script), str(out)],
                                    stdout=subprocess.PIPE, stderr=err)
        first = proc.stdout.readline()  # one save done: the loop of saves is running
        if not first:
            proc.wait()
            pytest.fail(f"the saving process died before its first save:\n{log.read_text()}")
        time.sleep(rng.uniform(0.0, 0.4))  # then kill it at a random moment of later saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        table = HashTable([16], name="t", block_size=1024)
        step = CheckpointManager(table, output_dir=str(out)).restore()
        assert step is not None
        # the table is exactly the state after step `step`: ids of every step so far, and the
        # rows of the last insert hold `step`
        ids, rows = table.ids_map()
        assert ids.min().item() == 100 and ids.max().item() == step * 100 + 2999
        last = table.slot_values("embedding", table.ids_map()[1][ids >= step * 100])
        assert torch.all(last == float(step))
        assert not [n for n in os.listdir(out) if n.startswith("ckpt_") and not os.path.exists(
            os.path.join(out, n, "index.json"))]  # no half checkpoint under a final name
    assert kills == 8


def test_slot_writes_are_in_the_next_incremental_save(tmp_path):
    a = make_table()
    a(torch.arange(10))
    Saver(path=str(tmp_path / "c0"), hashtables={"t": a}).save()
    rows = a.ids_map()[1][:3]
    a.set_slot_values("m", rows, torch.full((3, DIM), 7.0))
    assert torch.equal(a.store.changes().rows, rows)
    Saver(path=str(tmp_path / "c1"), hashtables={"t": a}).save(incremental=True, base="c0")
    b = make_table()
    Loader(str(tmp_path / "c1"), {"t": b}).load()
    same_table(a, b)


def test_a_save_interrupted_before_latest_moved_is_replaced(tmp_path):
    table = make_table()
    manager = CheckpointManager(table, output_dir=str(tmp_path))
    table(torch.arange(3))
    manager.save(1)
    table(torch.arange(3, 6))
    # simulate a crash between publishing ckpt 2 and moving 'latest' to it
    Saver(path=str(tmp_path / "ckpt_000000002"), hashtables={"t": table}).save()
    assert open(tmp_path / "latest").read() == "ckpt_000000001"
    fresh = make_table()
    restored = CheckpointManager(fresh, output_dir=str(tmp_path))
    assert restored.restore() == 1 and len(fresh) == 3  # the uncommitted save is not taken
    fresh(torch.arange(10, 12))
    restored.save(2)  # replaces the orphan instead of failing
    again = make_table()
    assert CheckpointManager(again, output_dir=str(tmp_path)).restore() == 2
    same_table(fresh, again)


def test_admission_counts_survive_a_checkpoint(tmp_path):
    from recis.nn.hashtable_hook import AdmitHook

    hook = AdmitHook("MinCount", {"min_count": 2, "width": 1024})
    a = make_table()
    a(torch.tensor([7]), admit_hook=hook)  # seen once: not admitted yet
    assert len(a) == 0
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    b = make_table()
    Loader(str(tmp_path / "c"), {"t": b}).load()
    b(torch.tensor([7]), admit_hook=hook)  # the second sighting, after the restore
    assert b.ids().tolist() == [7]
    compact(str(tmp_path / "c"), str(tmp_path / "full"))  # compaction keeps the counts
    c = make_table()
    Loader(str(tmp_path / "full"), {"t": c}).load()
    c(torch.tensor([7]), admit_hook=hook)
    assert c.ids().tolist() == [7]


def test_a_restore_writes_a_range_of_rows_across_blocks():
    """``restoring().write(slot, slice(a, b), values)`` copies consecutive rows block by block
    (a checkpoint's rows 0..n-1): equal to writing them by row index; rows it leaves get the
    slot's default; a range past the capacity or of the wrong length is an error."""
    values = torch.randn(21, DIM)
    tables = [make_table(), make_table()]
    for table, rows in zip(tables, (slice(2, 23), torch.arange(2, 23)), strict=True):
        with table.store.restoring(24) as restore:
            restore.write("embedding", rows, values)
            restore.write("m", rows, values * 2)
            restore.set_keys(torch.arange(100, 121), torch.zeros(21, dtype=torch.int64),
                             torch.arange(2, 23), 23, torch.tensor([0, 1]))
    same_table(*tables)
    all_rows = torch.arange(24)
    for table in tables:
        assert torch.equal(table.slot_values("embedding", all_rows)[2:23], values)
        assert torch.equal(table.slot_values("m", all_rows)[[0, 1, 23]], torch.zeros(3, DIM))
    table = make_table()
    with pytest.raises(IndexError, match=r"rows \[20, 41\) out of range \[0, 24\)"):
        with table.store.restoring(24) as restore:
            restore.write("embedding", slice(20, 41), values)
    assert len(table) == 0
    with pytest.raises(ValueError, match="21 values for rows \\[0, 5\\)"):
        with table.store.restoring(24) as restore:
            restore.write("embedding", slice(0, 5), values)
