"""HashTable: lookups, inserts, read-only modes, gradients, slots, state_dict, errors."""

import pytest
import torch
from torch import nn

from recis._core import backends
from recis.nn import HashTable
from recis.nn.hashtable_hook import AdmitHook
from recis.nn.initializers import ConstantInitializer, NormalInitializer
from recis.nn.modules.hashtable import (
    filter_out_sparse_param,
    gen_slice,
    is_hashtable,
    split_sparse_dense_state_dict,
)

DIM = 8


def _rows_equal_ids(ids):
    return ids.to(torch.float32)[:, None].expand(-1, DIM).contiguous()


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


def test_lookup_inserts_and_insert_overwrites(backend):
    # RecIS ht_lookup_test, with ID-based accessors instead of row positions.
    ht = HashTable([DIM], block_size=1024)
    assert torch.equal(ht(torch.arange(2048)), torch.zeros(2048, DIM))
    emb = _rows_equal_ids(torch.arange(2048, 4096))
    ht.insert(torch.arange(2048, 4096), emb)
    assert torch.equal(ht(torch.arange(2048, 4096)), emb)
    out = ht(torch.arange(2048, 6144))
    assert torch.equal(out[:2048], emb)
    assert torch.equal(out[2048:], torch.zeros(2048, DIM))
    assert sorted(ht.ids().tolist()) == list(range(6144))
    assert len(ht) == 6144


@pytest.mark.parametrize("mode", ["readonly_hook", "eval"])
def test_read_only_lookups_never_insert(backend, mode):
    ht = HashTable([DIM], block_size=1024)
    hook = AdmitHook("ReadOnly") if mode == "readonly_hook" else None
    if mode == "eval":
        ht.eval()
    assert torch.equal(ht(torch.arange(2048), admit_hook=hook), torch.zeros(2048, DIM))
    emb = _rows_equal_ids(torch.arange(2048, 4096))
    ht.insert(torch.arange(2048, 4096), emb)
    out = ht(torch.arange(2048, 6144), admit_hook=hook)
    assert torch.equal(out[:2048], emb)
    assert torch.equal(out[2048:], torch.zeros(2048, DIM))
    assert sorted(ht.ids().tolist()) == list(range(2048, 4096))


def test_ids_and_embeddings_are_aligned(backend):
    init = NormalInitializer(generator=torch.Generator().manual_seed(1))
    ht = HashTable([2, 3], initializer=init)
    ids = torch.tensor([2**62, -7, 5, 5, 0])
    out = ht(ids)
    assert out.shape == (5, 2, 3)
    got = dict(zip(ht.ids().tolist(), ht.embeddings(), strict=True))
    for i, row in zip(ids.tolist(), out, strict=True):
        assert torch.equal(got[i], row)


def test_insert_duplicates_last_wins_and_keeps_other_slots():
    ht = HashTable([DIM])
    ht.add_slot("counter", [1], torch.int64, 0)
    ht.insert(torch.tensor([1]), torch.ones(1, DIM))
    row = ht.ids_map()[1]
    ht.set_slot_values("counter", row, torch.tensor([[9]]))
    values = torch.stack([torch.full((DIM,), v) for v in (3.0, 4.0, 5.0)])
    ht.insert(torch.tensor([1, 2, 1]), values)
    assert torch.equal(ht(torch.tensor([1, 2])), torch.tensor([[5.0] * DIM, [4.0] * DIM]))
    assert ht.slot_values("counter", row).item() == 9
    assert len(ht) == 2


def test_insert_errors_name_the_problem():
    ht = HashTable([DIM])
    with pytest.raises(ValueError, match=r"embeddings must have shape \[2, 8\]"):
        ht.insert(torch.tensor([1, 2]), torch.zeros(2, DIM + 1))
    with pytest.raises(TypeError, match="table dtype torch.float32"):
        ht.insert(torch.tensor([1, 2]), torch.zeros(2, DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match="integer tensor"):
        ht.insert(torch.tensor([1.0, 2.0]), torch.zeros(2, DIM))
    assert len(ht) == 0


@pytest.mark.parametrize(
    "ids, err, match",
    [
        (torch.tensor([1.0, 2.0]), TypeError, "integer tensor"),
        (torch.tensor([True, False]), TypeError, "integer tensor"),
        ([1, 2], TypeError, "must be a torch.Tensor"),
        (torch.tensor([1, 2], device="meta"), ValueError, r"move them first with ids.to\('cpu'\)"),
    ],
)
def test_bad_ids(ids, err, match):
    with pytest.raises(err, match=match):
        HashTable([DIM])(ids)


def test_int32_ids_are_accepted():
    ht = HashTable([DIM])
    ht(torch.tensor([3, 4], dtype=torch.int32))
    assert sorted(ht.ids().tolist()) == [3, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embedding_shape": []}, "embedding_shape"),
        ({"embedding_shape": [0]}, "embedding_shape"),
        ({"embedding_shape": [4], "block_size": 0}, "block_size"),
        ({"embedding_shape": [4], "grad_reduce_by": "sum"}, "grad_reduce_by"),
        ({"embedding_shape": [4], "device": "meta"}, "device must be cpu or cuda"),
        ({"embedding_shape": [4], "children": ["a", "b"]}, "must be coalesced"),
        ({"embedding_shape": [4], "children": ["a", "a"], "coalesced": True}, "distinct"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HashTable(**kwargs)


def test_accept_grad_aggregates_on_rows_not_positions():
    # RecIS ht_grad_ga_test puts the sums on positions 0..2 (bug 1); they belong to rows 1..3.
    ht = HashTable([4])
    ht.accept_grad(torch.tensor([1, 2, 3]), torch.ones(3, 4))
    ht.accept_grad(torch.tensor([1, 1, 1]), torch.full((3, 4), 2.0))
    ht.accept_grad(torch.tensor([2, 2, 2]), torch.full((3, 4), 3.0))
    g = ht.grad(3).coalesce()
    assert g.indices().tolist() == [[1, 2, 3]]
    assert torch.allclose(g.values(), torch.tensor([[7.0] * 4, [10.0] * 4, [1.0] * 4]) / 3)
    ht.clear_grad()
    assert ht.grad_rows()[0].numel() == 0
    with pytest.raises(ValueError, match="acc_steps"):
        ht.grad(0)


@pytest.mark.parametrize("reduce_by", ["worker", "id"])
def test_lookup_gradient_matches_dense_embedding(backend, reduce_by):
    gen = torch.Generator().manual_seed(3)
    ht = HashTable([DIM], grad_reduce_by=reduce_by,
                   initializer=NormalInitializer(generator=torch.Generator().manual_seed(0)))
    ids = torch.randint(-50, 50, (300,), generator=gen) * (2**40)
    out = ht(ids)
    upstream = torch.randn(300, DIM, generator=gen)
    (out * upstream).sum().backward()
    table_ids, table_rows = ht.ids_map()
    # Reference: a dense copy of the touched rows, looked up by plain torch.
    dense = nn.Embedding.from_pretrained(ht.embeddings().clone(), freeze=False)
    index = {i: k for k, i in enumerate(table_ids.tolist())}
    local = torch.tensor([index[i] for i in ids.tolist()])
    ref_out = dense(local)
    assert torch.equal(ref_out, out.detach())
    (ref_out * upstream).sum().backward()
    expected = dense.weight.grad
    if reduce_by == "id":
        expected = expected / torch.bincount(local, minlength=len(index)).clamp(min=1)[:, None]
    rows, grads = ht.grad_rows()
    assert torch.equal(rows, table_rows.sort().values)
    by_row = dict(zip(rows.tolist(), grads, strict=True))
    for k, row in enumerate(table_rows.tolist()):
        torch.testing.assert_close(by_row[row], expected[k], rtol=1e-5, atol=1e-6)


def test_read_only_training_lookup_trains_known_rows_only():
    ht = HashTable([DIM], initializer=ConstantInitializer(1.0))
    ht.insert(torch.tensor([10]), torch.ones(1, DIM))
    out = ht(torch.tensor([10, 11, 10]), admit_hook=AdmitHook("ReadOnly"))
    assert torch.equal(out[1], torch.zeros(DIM))
    out.sum().backward()
    rows, grads = ht.grad_rows()
    assert rows.tolist() == ht.ids_map()[1].tolist()
    assert torch.equal(grads, torch.full((1, DIM), 2.0))
    assert len(ht) == 1


def test_eval_and_no_grad_lookups_record_nothing():
    ht = HashTable([DIM])
    ht(torch.tensor([1]))
    ht.eval()
    out = ht(torch.tensor([1, 2]))
    assert not out.requires_grad
    ht.train()
    with torch.no_grad():
        ht(torch.tensor([1]))
    assert ht.grad_rows()[0].numel() == 0


def test_slot_added_after_rows_exist_covers_them():
    # RecIS bug 3: a slot added after the first block has fewer blocks.
    ht = HashTable([DIM], block_size=4)
    ht(torch.arange(10))
    ht.add_slot("moment", [DIM], torch.float32, 0.5)
    rows = ht.ids_map()[1]
    assert torch.equal(ht.slot_values("moment", rows), torch.full((10, DIM), 0.5))
    ht(torch.arange(10, 20))
    rows = ht.ids_map()[1]
    assert torch.equal(ht.slot_values("moment", rows), torch.full((20, DIM), 0.5))
    assert len(ht.slot_blocks("moment")) == len(ht.slot_blocks("embedding")) == 5


def test_growth_appends_blocks_without_copying():
    ht = HashTable([DIM], block_size=16)
    ht(torch.arange(16))
    first = ht.slot_blocks("embedding")[0]
    ht(torch.arange(16, 100))
    blocks = ht.slot_blocks("embedding")
    assert len(blocks) == 7  # ceil(100 / 16)
    assert blocks[0].data_ptr() == first.data_ptr()


def test_delete_resets_every_slot_and_rows_are_reused(backend):
    ht = HashTable([DIM], block_size=8, initializer=ConstantInitializer(3.0))
    ht.add_slot("moment", [DIM], torch.float32, 0.0)
    ht.insert(torch.arange(20), torch.ones(20, DIM))
    ht.set_slot_values("moment", ht.ids_map()[1], torch.ones(20, DIM))
    removed_rows = ht.ids_map()[1][torch.arange(20) % 2 == 0]
    assert ht.delete(torch.arange(0, 20, 2)) == 10
    assert ht.delete(torch.tensor([999])) == 0
    # rows without an ID hold the constant defaults, and zeros for the initializer's slot
    # (a new ID's row is drawn from the ID when it is inserted)
    assert torch.equal(ht.slot_values("embedding", removed_rows), torch.zeros(10, DIM))
    assert torch.equal(ht.slot_values("moment", removed_rows), torch.zeros(10, DIM))
    out = ht(torch.arange(100, 110))
    assert torch.equal(out, torch.full((10, DIM), 3.0))  # fresh rows, not stale ones
    assert sorted(ht.ids_map()[1].tolist()) == list(range(20))  # freed rows reused first


def test_clear_then_reuse():
    # RecIS bug 4: clear() left the block counter, so later lookups indexed missing blocks.
    ht = HashTable([DIM], block_size=4)
    ht(torch.arange(10))
    ht.clear()
    assert len(ht) == 0 and ht.ids().numel() == 0
    assert torch.equal(ht(torch.tensor([5])), torch.zeros(1, DIM))
    assert ht.ids_map()[1].tolist() == [0]


def test_memory_bytes_counts_map_blocks_and_change_tracking():
    ht = HashTable([DIM], block_size=1000)
    assert ht.memory_bytes() == 1024 * 16  # an empty map of 1024 (key, value) slots
    ht(torch.arange(1500))
    map_slots = ht.store._map.capacity
    assert map_slots >= 1500 / 0.75
    # map + 2 blocks of rows + one "written since the last save" flag per row
    assert ht.memory_bytes() == map_slots * 16 + 2 * 1000 * DIM * 4 + 2000


def test_state_dict_exposes_the_table_and_round_trips():
    model = nn.ModuleDict({"a": HashTable([4], name="16"), "b": HashTable([8], name="32")})
    sd = model.state_dict()
    assert is_hashtable(sd["16"]) and sd["32"] is model["b"]
    assert list(filter_out_sparse_param(model)) == ["16", "32"]
    sparse, dense = split_sparse_dense_state_dict(dict(sd))
    assert list(sparse) == ["16", "32"] and all(not is_hashtable(v) for v in dense.values())
    model.load_state_dict(sd)  # strict: the table entries are recognised, not "unexpected"


def test_same_seed_same_table():
    def build():
        ht = HashTable([DIM], initializer=NormalInitializer(
            generator=torch.Generator().manual_seed(7)), block_size=64)
        ht(torch.tensor([5, 1, 2**60, 5]))
        ht(torch.arange(100, 300))
        ht.delete(torch.arange(100, 150))
        ht(torch.arange(500, 520))
        return ht.ids(), ht.embeddings()

    a, b = build(), build()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gen_slice_splits_evenly():
    slices = [gen_slice(i, 3) for i in range(3)]
    assert [(s.slice_begin, s.slice_end) for s in slices] == [
        (0, 21846), (21846, 43691), (43691, 65536)]
    with pytest.raises(ValueError, match="shard_index"):
        gen_slice(3, 3)


def test_integer_dtype_tables_are_read_only():
    ht = HashTable([DIM], dtype=torch.int8)
    ht.insert(torch.tensor([1]), torch.ones(1, DIM, dtype=torch.int8))
    out = ht(torch.tensor([1, 2]))
    assert out.dtype == torch.int8 and out[0].tolist() == [1] * DIM and len(ht) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_table():
    ht = HashTable([DIM], device="cuda")
    with pytest.raises(ValueError, match="move them first"):
        ht(torch.tensor([1, 2]))
    ids = torch.tensor([1, 2, 1, -1, 2**63 - 1], device="cuda")
    out = ht(ids)
    assert out.device.type == "cuda" and out.shape == (5, DIM)
    out.sum().backward()
    rows, grads = ht.grad_rows()
    assert rows.device.type == "cuda" and grads[0, 0].item() == 2.0
    assert sorted(ht.ids().tolist()) == sorted({1, 2, -1, 2**63 - 1})


def test_stats_count_admissions_and_removals():
    ht = HashTable([DIM])
    ht(torch.tensor([1, 2, 3, 1]))
    ht.insert(torch.tensor([3, 4]), torch.zeros(2, DIM))
    ht.delete(torch.tensor([1, 9]))
    ht.eval()
    ht(torch.tensor([50]))
    core = ("live", "capacity", "admitted", "removed")
    assert {k: ht.stats()[k] for k in core} == {"live": 3, "capacity": 10240, "admitted": 4,
                                                 "removed": 1}
    ht.clear()
    assert {k: ht.stats()[k] for k in core} == {"live": 0, "capacity": 0, "admitted": 4,
                                                 "removed": 4}


def test_min_count_admission():
    ht = HashTable([DIM], initializer=ConstantInitializer(1.0))
    hook = AdmitHook("MinCount", {"min_count": 3})
    out = ht(torch.tensor([5, 5, 6]), admit_hook=hook)  # 5 seen twice, 6 once
    assert torch.equal(out, torch.zeros(3, DIM)) and len(ht) == 0
    out.sum().backward()
    assert ht.grad_rows()[0].numel() == 0  # not admitted: no gradient
    out = ht(torch.tensor([5, 6, 7]), admit_hook=hook)  # 5 reaches 3
    assert ht.ids().tolist() == [5]
    assert torch.equal(out[0], torch.ones(DIM)) and torch.equal(out[1:], torch.zeros(2, DIM))
    ht(torch.tensor([6, 6]), admit_hook=hook)
    assert sorted(ht.ids().tolist()) == [5, 6]
    ht.eval()
    ht(torch.tensor([7, 7, 7, 7]), admit_hook=hook)  # eval never counts nor admits
    ht.train()
    ht(torch.tensor([7]), admit_hook=hook)
    assert sorted(ht.ids().tolist()) == [5, 6]


def test_min_count_keeps_children_apart_and_validates():
    from recis.nn import EmbeddingEngine, EmbeddingOption

    hook = AdmitHook("MinCount", {"min_count": 2})
    engine = EmbeddingEngine({f: EmbeddingOption(embedding_dim=DIM, shared_name=f,
                                                 admit_hook=hook) for f in ("a", "b")})
    engine({"a": torch.tensor([[1]]), "b": torch.tensor([[1]])})
    engine({"a": torch.tensor([[1]]), "b": torch.tensor([[2]])})
    table = engine.hashtable("a")
    assert table.ids("a").tolist() == [1] and table.ids("b").tolist() == []
    with pytest.raises(ValueError, match="min_count must be a positive int"):
        HashTable([DIM])(torch.tensor([1]), admit_hook=AdmitHook("MinCount", {"min_count": 0}))
    with pytest.raises(ValueError, match="power of two"):
        HashTable([DIM])(torch.tensor([1]), admit_hook=AdmitHook("MinCount", {"width": 1000}))
