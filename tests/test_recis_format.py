"""RecIS's checkpoint layout (reference section 8.3/8.4): fixtures written here from the
specification with plain safetensors + json (not with recis), loaded into recis tables, with
resharding, coalesced children, optimizer slots and dense tensors; recis's own writer of the
layout checked against the specification and read back; corrupted fixtures rejected with
errors naming the file and key, before any table is touched."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recis.nn import HashTable
from recis.nn.modules.hashtable import gen_slice, in_slice
from recis.optim import SparseAdamW
from recis.serialize import CheckpointError, CheckpointReader, Loader, Saver

DIM = 3
SLOTS = ("embedding", "sparse_adamw_exp_avg", "sparse_adamw_exp_avg_sq")


def spec_slice(begin, end, size=65536):
    """The slice string of the specification: begin and end padded to the digits of size."""
    width = len(str(size))
    return f"{begin:0{width}d}@{end:0{width}d}@{size}"


def write_recis_fixture(path, shards, dense=None, parallel=1):
    """A RecIS checkpoint as the specification describes it.

    ``shards[k]`` is ``(slice string, {child: {"id": ids, slot: rows, ...}})``; dense tensors
    are written by shard 0 under ``name^ ``; blocks go round robin over ``parallel`` files
    per shard, named ``model-XXXXXX-of-YYYYYY.safetensors``."""
    os.makedirs(path)
    n = len(shards)
    file_index, block_index, tensorkey = {}, {}, {}
    for k, (slice_text, children) in enumerate(shards):
        blocks = []
        if k == 0:
            blocks += [(f"{name}^ ", t, None) for name, t in (dense or {}).items()]
        for child, fields in children.items():
            for field, t in fields.items():
                key = f"{child}.{field}/part_{k}_{n}".replace("@", ".")
                blocks.append((key, t, f"{child}@{field}^{slice_text}"))
        files = [{} for _ in range(parallel)]
        for i, (key, t, block) in enumerate(blocks):
            files[i % parallel][key] = t.contiguous()
            if block is not None:
                tensorkey[key] = block
        for w, content in enumerate(files):
            if not content:
                continue
            fname = f"model-{k * parallel + w:06d}-of-{n * parallel:06d}.safetensors"
            save_file(content, os.path.join(path, fname))
            file_index[fname] = len(file_index)
            for key in content:
                block_index[key] = file_index[fname]
    with open(os.path.join(path, "index"), "w") as f:
        json.dump({"file_index": file_index, "block_index": block_index}, f, indent=4)
    with open(os.path.join(path, "tensorkey.json"), "w") as f:
        json.dump(tensorkey, f, indent=4)


def rows_for(ids, seed):
    g = torch.Generator().manual_seed(seed)
    return {slot: torch.randn(len(ids), DIM, generator=g) for slot in SLOTS}


def make_table(name="user", slice_=None, children=None):
    table = HashTable([DIM], name=name, slice=slice_, children=children,
                      coalesced=children is not None and len(children) > 1)
    SparseAdamW({name: table}, lr=0.1)  # declares RecIS's slot names
    return table


def by_id(table, child=None):
    """``{id: {slot: row}}`` of a table (child)."""
    ids, rows = table.ids_map(child)
    values = {slot: table.slot_values(slot, rows) for slot in SLOTS}
    return {int(i): {s: values[s][j] for s in SLOTS} for j, i in enumerate(ids.tolist())}


def expected_by_id(ids, values):
    return {int(i): {s: values[s][j] for s in SLOTS} for j, i in enumerate(ids.tolist())}


def assert_same(got, want):
    assert got.keys() == want.keys()
    for i in want:
        for s in SLOTS:
            assert torch.equal(got[i][s], want[i][s]), (i, s)


def two_shard_source(tmp_path):
    """A table ``user`` saved by 2 RecIS shards (slices [0, 32768) and [32768, 65536)), with
    IDs of every kind: small, large, negative; and a dense tensor."""
    ids = torch.tensor([0, 1, 32767, 32768, 65535, 65536, 2**40 + 5, -1, -32769, 2**62 + 3,
                        123456789, 40000], dtype=torch.int64)
    owner = (ids & 65535) >= 32768  # the uint64 residue mod 65536
    values = rows_for(ids, seed=1)
    shards = []
    for k, sl in enumerate((spec_slice(0, 32768), spec_slice(32768, 65536))):
        mine = owner == bool(k)
        shards.append((sl, {"user": {"id": ids[mine], **{s: v[mine] for s, v in
                                                         values.items()}}}))
    dense = {"beta1_power": torch.tensor([0.81]), "mlp.weight": torch.randn(2, 5)}
    path = str(tmp_path / "recis_ckpt")
    write_recis_fixture(path, shards, dense, parallel=2)
    return path, ids, values, dense


def test_two_recis_shards_load_into_one_table_with_slots_and_dense(tmp_path):
    path, ids, values, dense = two_shard_source(tmp_path)
    table = make_table()
    table(torch.tensor([777, 888]))  # loading replaces: these rows must disappear
    targets = {name: torch.zeros_like(t) for name, t in dense.items()}
    assert Loader(path, {"user": table}, targets).load() == {"missing": [], "unexpected": []}
    assert_same(by_id(table), expected_by_id(ids, values))
    for name, t in dense.items():
        assert torch.equal(targets[name], t)


def test_two_recis_shards_reshard_into_three_by_the_slice_rule(tmp_path):
    path, ids, values, _ = two_shard_source(tmp_path)
    tables = [make_table(slice_=gen_slice(k, 3)) for k in range(3)]
    for table in tables:
        Loader(path, {"user": table}).load()
    want = expected_by_id(ids, values)
    union = {}
    for table in tables:
        s = table.slice
        got = by_id(table)
        for i in got:  # each target holds exactly the IDs whose uint64 residue it owns
            assert s.slice_begin <= (i % 2**64) % 65536 < s.slice_end
        union.update(got)
    assert sum(len(t) for t in tables) == len(ids)
    assert_same(union, want)


def test_coalesced_recis_table_with_two_children(tmp_path):
    """RecIS stores a coalesced table per child, IDs decoded to their low 52 bits; the same
    raw ID in two children is two rows."""
    a_ids = torch.tensor([5, 70000, 2**52 - 1], dtype=torch.int64)
    b_ids = torch.tensor([5, 6], dtype=torch.int64)
    a_vals, b_vals = rows_for(a_ids, 2), rows_for(b_ids, 3)
    path = str(tmp_path / "coalesced")
    write_recis_fixture(path, [(spec_slice(0, 65536), {
        "a": {"id": a_ids, **a_vals}, "b": {"id": b_ids, **b_vals}})])
    table = make_table("ab", children=["a", "b"])
    Loader(path, {"ab": table}).load()
    assert_same(by_id(table, "a"), expected_by_id(a_ids, a_vals))
    assert_same(by_id(table, "b"), expected_by_id(b_ids, b_vals))


def test_reader_names_and_concatenates_by_slice_string(tmp_path):
    path, ids, values, dense = two_shard_source(tmp_path)
    reader = CheckpointReader(path)
    assert set(reader.tensor_names()) == {f"user@{f}" for f in ("id", *SLOTS)} | set(dense)
    first = ((ids & 65535) < 32768)
    assert torch.equal(reader.read_tensor("user@id"), torch.cat([ids[first], ids[~first]]))
    assert reader.tensor_shape("user@embedding") == [len(ids), DIM]
    assert reader.tensor_dtype("beta1_power") == torch.float32


def test_strict_reports_missing_slot_and_nonstrict_loads_the_rest(tmp_path):
    ids = torch.tensor([1, 2, 3])
    values = rows_for(ids, 4)
    path = str(tmp_path / "no_moments")
    write_recis_fixture(path, [(spec_slice(0, 65536), {"user": {
        "id": ids, "embedding": values["embedding"], "step_filter": torch.ones(3, 1,
                                                                               dtype=torch.int64)}})])
    table = make_table()
    with pytest.raises(CheckpointError, match=r"user\.sparse_adamw_exp_avg.*\n.*user\.step_filter"):
        Loader(path, {"user": table}).load()
    assert len(table) == 0
    report = Loader(path, {"user": table}, strict=False).load()
    assert report == {"missing": ["user.sparse_adamw_exp_avg", "user.sparse_adamw_exp_avg_sq"],
                      "unexpected": ["user.step_filter"]}
    ids_got, rows = table.ids_map()
    order = torch.argsort(ids_got)
    assert torch.equal(table.slot_values("embedding", rows)[order], values["embedding"])
    assert not table.slot_values("sparse_adamw_exp_avg", rows).any()  # defaults


def trained_table(name="user", slice_=None, seed=0):
    table = make_table(name, slice_)
    torch.manual_seed(seed)
    ids = torch.randint(-10**6, 10**6, (200,))
    table(ids[in_slice(ids, table.slice)])  # a shard holds the IDs of its slice
    for slot in SLOTS:
        rows = table.ids_map()[1]
        table.set_slot_values(slot, rows, torch.randn(len(rows), DIM))
    return table


def test_saver_writes_the_layout_of_the_specification_and_reads_it_back(tmp_path):
    """Two shards, parallel=5: file names, keys, index, tensorkey.json and the rank json as
    section 8.3 has them, readable with safe_open; loading gives the same tables."""
    path = str(tmp_path / "out")
    sources = [trained_table(slice_=gen_slice(k, 2), seed=k) for k in range(2)]
    dense = {"w": torch.randn(4, 2)}
    for k, table in enumerate(sources):
        assert not os.path.exists(path)  # visible only once complete
        Saver(k, 2, parallel=5, path=path, hashtables={"user": table}, tensors=dense,
              format="recis").save()
    names = sorted(os.listdir(path))
    # shard 0: 5 blocks (w, id, 3 slots) on writers 0-4; shard 1: 4 blocks on writers 5-8 of
    # 10; the empty writer 9 makes no file
    assert names == ["index", *[f"model-{i:06d}-of-000010.safetensors" for i in range(9)],
                     "tensorkey.json", "torch_rank_weights_embs_table_multi_shard.json"]
    index = json.load(open(os.path.join(path, "index")))
    tensorkey = json.load(open(os.path.join(path, "tensorkey.json")))
    rank = json.load(open(os.path.join(path, "torch_rank_weights_embs_table_multi_shard.json")))
    table_keys = {f"user.{f}/part_{k}_2" for f in ("id", *SLOTS) for k in range(2)}
    assert set(index["block_index"]) == table_keys | {"w^ "}
    assert set(index["file_index"]) == {n for n in names if n.startswith("model-")}
    assert set(index["block_index"].values()) == set(index["file_index"].values())
    assert tensorkey["user.embedding/part_1_2"] == "user@embedding^32768@65536@65536"
    assert tensorkey["user.id/part_0_2"] == "user@id^00000@32768@65536"
    assert set(tensorkey) == table_keys
    assert rank["w^ "] == {"name": "w^ ", "dtype": "float32", "shape": [4, 2], "dense": True,
                           "dimension": 0, "is_hashmap": False}
    emb = rank["user.embedding/part_0_2"]
    assert emb["is_hashmap"] and emb["dimension"] == DIM
    assert emb["hashmap_key"] == "user.id/part_0_2" and emb["hashmap_key_dtype"] == "int64"
    assert emb["hashmap_value"] == "user.embedding/part_0_2"
    files = {i: n for n, i in index["file_index"].items()}
    found = {}
    for key, i in index["block_index"].items():
        with safe_open(os.path.join(path, files[i]), "pt") as f:
            assert f.metadata() is None  # no __metadata__, as RecIS writes
            found[key] = f.get_tensor(key)
    assert torch.equal(found["w^ "], dense["w"])
    for k, table in enumerate(sources):
        ids, rows = table.ids_map()
        assert torch.equal(found[f"user.id/part_{k}_2"], ids)
        assert torch.equal(found[f"user.embedding/part_{k}_2"],
                           table.slot_values("embedding", rows))
    # read back with recis, into 1 and into 3 tables
    whole = make_table()
    Loader(path, {"user": whole}, {"w": torch.zeros(4, 2)}).load()
    want = {**by_id(sources[0]), **by_id(sources[1])}
    assert_same(by_id(whole), want)
    union = {}
    for k in range(3):
        part = make_table(slice_=gen_slice(k, 3))
        Loader(path, {"user": part}).load()
        union.update(by_id(part))
    assert_same(union, want)


def test_round_trip_recis_to_recis_layout_to_recis(tmp_path):
    a_ids, b_ids = torch.tensor([1, 2, 2**51]), torch.tensor([1, 9])
    source = make_table("ab", children=["a", "b"])
    source.insert(a_ids, torch.randn(3, DIM), child="a")
    source.insert(b_ids, torch.randn(2, DIM), child="b")
    rows = source.ids_map()[1]
    source.set_slot_values("sparse_adamw_exp_avg", rows, torch.randn(len(rows), DIM))
    path = str(tmp_path / "rt")
    Saver(path=path, hashtables={"ab": source}, parallel=8, format="recis").save()
    back = make_table("ab", children=["a", "b"])
    Loader(path, {"ab": back}).load()
    for child in ("a", "b"):
        assert_same(by_id(back, child), by_id(source, child))


def test_saver_recis_format_refuses_what_the_layout_cannot_hold(tmp_path):
    table = make_table("ab", children=["a", "b"])
    table.insert(torch.tensor([2**52]), torch.zeros(1, DIM), child="b")
    with pytest.raises(ValueError, match=r"child 'b'.*52 bits"):
        Saver(path=str(tmp_path / "x"), hashtables={"ab": table}, format="recis").save()
    with pytest.raises(ValueError, match="incremental"):
        Saver(path=str(tmp_path / "y"), hashtables={"ab": make_table()},
              format="recis").save(incremental=True, base="z")
    with pytest.raises(ValueError, match=r"format='recis' saves only through save\(\)"):
        Saver(path=str(tmp_path / "s"), hashtables={"ab": make_table()},
              format="recis").snapshot()
    with pytest.raises(ValueError, match="format must be"):
        Saver(path=str(tmp_path / "z"), format="tf")
    assert not os.path.exists(tmp_path / "x")


def test_saver_recis_format_filter_func_keeps_a_subset(tmp_path):
    source = trained_table()
    path = str(tmp_path / "emb_only")
    Saver(path=path, hashtables={"user": source}, format="recis",
          filter_func=lambda keys: [k for k in keys if "adamw" not in k]).save()
    assert sorted(json.load(open(os.path.join(path, "tensorkey.json")))) == [
        "user.embedding/part_0_1", "user.id/part_0_1"]
    back = make_table()
    report = Loader(path, {"user": back}, strict=False).load()
    assert report["missing"] == ["user.sparse_adamw_exp_avg", "user.sparse_adamw_exp_avg_sq"]
    ids, rows = source.ids_map()
    back_rows = back.ids_map()[1]
    assert torch.equal(back.ids(), ids)  # one insert in saved order: same order here
    assert torch.equal(back.slot_values("embedding", back_rows),
                       source.slot_values("embedding", rows))
    with pytest.raises(ValueError, match=r"kept \['user\.embedding/part_0_1'\] without the id"):
        Saver(path=str(tmp_path / "no_ids"), hashtables={"user": source}, format="recis",
              filter_func=lambda keys: [k for k in keys if "embedding" in k]).save()


def _edit_json(path, name, change):
    where = os.path.join(path, name)
    obj = json.load(open(where))
    change(obj)
    with open(where, "w") as f:
        json.dump(obj, f)


def _rewrite_file(path, key, change):
    """Rewrite the data file holding ``key`` with ``change(tensors)`` applied."""
    index = json.load(open(os.path.join(path, "index")))
    fname = {i: n for n, i in index["file_index"].items()}[index["block_index"][key]]
    with safe_open(os.path.join(path, fname), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, os.path.join(path, fname))


def _remove_data_file(path):
    index = json.load(open(os.path.join(path, "index")))
    os.remove(os.path.join(path, sorted(index["file_index"])[0]))


def _slot_rows_wrong(tensors):
    tensors["user.embedding/part_0_2"] = tensors["user.embedding/part_0_2"][:-1]


def _id_dtype_wrong(tensors):
    tensors["user.id/part_1_2"] = tensors["user.id/part_1_2"].to(torch.int32)


CORRUPTIONS = {
    "data file missing": (_remove_data_file, r"model-000000-of-000004\.safetensors is missing"),
    "key in index not in file": (
        lambda p: _rewrite_file(p, "user.sparse_adamw_exp_avg/part_1_2",
                                lambda t: t.pop("user.sparse_adamw_exp_avg/part_1_2")),
        r"model-0000\d\d-of-000004\.safetensors: key 'user\.sparse_adamw_exp_avg/part_1_2' is "
        r"in .*index but not in the file"),
    "slot rows differ from ids": (
        lambda p: _rewrite_file(p, "user.embedding/part_0_2", _slot_rows_wrong),
        r"'user\.embedding/part_0_2' has shape \[\d+, 3\]; it needs one row per ID of "
        r"'user\.id/part_0_2'"),
    "id block not int64": (
        lambda p: _rewrite_file(p, "user.id/part_1_2", _id_dtype_wrong),
        r"'user\.id/part_1_2' must be int64 of shape \[n\]; got torch\.int32"),
    "slice string does not parse": (
        lambda p: _edit_json(p, "tensorkey.json", lambda d: d.update(
            {"user.id/part_0_2": "user@id^0@32768"})),
        r"tensorkey\.json\['user\.id/part_0_2'\]: '0@32768' is not a slice string"),
    "slice out of range": (
        lambda p: _edit_json(p, "tensorkey.json", lambda d: d.update(
            {"user.id/part_0_2": "user@id^40000@32768@65536"})),
        r"'40000@32768@65536' is not a slice string"),
    "block name without slot": (
        lambda p: _edit_json(p, "tensorkey.json", lambda d: d.update(
            {"user.id/part_0_2": "userid^00000@32768@65536"})),
        r"tensorkey\.json: 'user\.id/part_0_2' maps to 'userid\^00000@32768@65536', not a "
        r"block name"),
    "table key missing from tensorkey": (
        lambda p: _edit_json(p, "tensorkey.json", lambda d: d.pop("user.embedding/part_1_2")),
        r"index: block_index key 'user\.embedding/part_1_2' is neither a dense key"),
    "index points at an unknown file": (
        lambda p: _edit_json(p, "index", lambda d: d["block_index"].update({"w^ ": 99})),
        r"index: block_index\['w\^ '\] must be a number of 'file_index'"),
    "file name with a path": (
        lambda p: _edit_json(p, "index", lambda d: d["file_index"].update({"../evil": 7})),
        r"index: 'file_index' must map plain file names"),
    "index not json": (
        lambda p: open(os.path.join(p, "index"), "w").write("{not json"),
        r"index .* is not valid JSON"),
    "two shards overlap": (
        lambda p: _edit_json(p, "tensorkey.json", lambda d: d.update({
            k: v.replace("32768@65536@65536", "30000@65536@65536") for k, v in d.items()})),
        r"table 'user' has blocks of overlapping slices 00000@32768@65536 and "
        r"30000@65536@65536"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_recis_checkpoints_are_rejected_before_touching_tables(tmp_path, name):
    path, _, _, dense = two_shard_source(tmp_path)
    corrupt, message = CORRUPTIONS[name]
    corrupt(path)
    table = make_table()
    table(torch.tensor([777]))
    w = torch.zeros(2, 5)
    with pytest.raises(CheckpointError, match=message):
        Loader(path, {"user": table}, {"mlp.weight": w}).load()
    assert table.ids().tolist() == [777] and not w.any()


def test_mismatched_targets_are_rejected(tmp_path):
    path, _, _, _ = two_shard_source(tmp_path)
    with pytest.raises(CheckpointError, match=r"dense tensor 'mlp\.weight\^ ' is torch\.float32 "
                                              r"\[2, 5\], the target torch\.float32 \[5, 2\]"):
        Loader(path, {"user": make_table()}, {"mlp.weight": torch.zeros(5, 2)}).load()
    wide = HashTable([DIM + 1], name="user")
    with pytest.raises(CheckpointError, match=r"'user\.embedding/part_\d_2' is torch\.float32 "
                                              r"with rows \[3\]; the slot 'embedding' of table "
                                              r"'user' is torch\.float32 with rows \[4\]"):
        Loader(path, {"user": wide}, strict=False).load()
    other_size = make_table(slice_=gen_slice(0, 1, 1024))
    with pytest.raises(CheckpointError, match=r"slices of size \[65536\], the table's slice "
                                              r"has size 1024"):
        Loader(path, {"user": other_size}).load()
