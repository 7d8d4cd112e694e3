"""Regression tests for the defects of the core-contracts issue (#7), one per defect, named
after it, and the contracts that replaced the code that had them."""

import copy
import threading

import pytest
import torch
from torch import nn

from recis._core import backends
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import ConstantInitializer, NormalInitializer
from recis.nn.modules.hashtable import gen_slice
from recis.nn.modules.hashtable_hook_impl import HashtableHookFactory
from recis.optim import SparseAdagrad, SparseAdam, SparseAdamW, SparseAdamWTF
from recis.ragged.tensor import RaggedTensor
from recis.serialize import Loader, Saver

DIM = 4


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


def run_threads(targets, timeout=120):
    """Run callables in threads; re-raise the first error; fail (never hang) on a timeout."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"a thread did not finish within {timeout} s"
    if errors:
        raise errors[0]


# -- 1, 2: threads ---------------------------------------------------------------------------
def test_defect01_threads_inserting_new_ids_keep_the_table_consistent():
    ht = HashTable([1], block_size=4096)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randperm(4_000_000, generator=gen)[:1_000_000] * 977 - 10**9
    chunks = ids.split(250_000)
    batches = [c.split(25_000) for c in chunks]

    def worker(k):  # every chunk is inserted by two threads at once
        def run():
            for a, b in zip(batches[k], batches[(k + 1) % len(batches)], strict=True):
                ht(a)
                ht(b)
        return run

    run_threads([worker(k) for k in range(len(chunks))])
    assert len(ht) == ids.numel()
    table_ids, rows = ht.ids_map()
    assert torch.equal(torch.sort(table_ids).values, torch.sort(ids).values)
    assert torch.unique(rows).numel() == rows.numel()  # no two IDs share a row
    found = ht.store.lookup(ids)
    assert bool((found >= 0).all()) and torch.unique(found).numel() == ids.numel()


def test_defect02_saving_while_another_thread_inserts(tmp_path):
    ht = HashTable([DIM], block_size=1024, name="t")
    stop = threading.Event()

    def insert():
        start = 0
        while not stop.is_set():
            ht(torch.arange(start, start + 20_000))
            ht.delete(torch.arange(start, start + 20_000, 7))
            start = (start + 20_000) % 200_000

    def save():
        try:
            for i in range(8):
                path = str(tmp_path / f"c{i}")
                Saver(path=path, hashtables={"t": ht}).save()
                loaded = HashTable([DIM], block_size=1024, name="t")
                Loader(path, {"t": loaded}).load()
                ids, rows = loaded.ids_map()
                assert torch.unique(ids).numel() == ids.numel() == len(loaded)
                assert torch.unique(rows).numel() == rows.numel()
        finally:
            stop.set()

    run_threads([insert, save])


def test_concurrent_lookups_filters_and_optimizer_steps_stay_consistent():
    opt = EmbeddingOption(embedding_dim=DIM, shared_name="u", initializer=NormalInitializer(
        generator=torch.Generator().manual_seed(0)),
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 2}))
    emb = DynamicEmbedding(opt)
    table = emb.hashtable
    sparse = SparseAdamW({"u": table}, lr=0.01)
    hook = HashTableFilterHook(1, tables=[emb])

    def train(seed):
        def run():
            gen = torch.Generator().manual_seed(seed)
            for _ in range(30):
                ids = torch.randint(0, 50_000, (512, 8), generator=gen)
                emb(ids).sum().backward()
                sparse.step()
                sparse.zero_grad()
        return run

    def filt():
        for step in range(30):
            hook.after_step(global_step=step)

    def read():
        for _ in range(30):
            with torch.no_grad():
                table.store.read("embedding", table.ids_map()[1])

    run_threads([train(1), train(2), filt, read])
    ids, rows = table.ids_map()
    assert torch.unique(rows).numel() == rows.numel() == len(table)
    assert torch.equal(table.store.lookup(ids), rows)
    assert torch.isfinite(table.embeddings()).all()


# -- 3: no uninitialised values after a load -------------------------------------------------
def test_defect03a_embedding_only_checkpoint_into_a_table_with_optimizer_slots(tmp_path):
    plain = HashTable([DIM], name="t", initializer=ConstantInitializer(0.5))
    plain(torch.arange(100))
    Saver(path=str(tmp_path / "c"), hashtables={"t": plain}).save()
    target = HashTable([DIM], name="t")
    SparseAdamW({"t": target})
    target(torch.arange(1000, 1050))
    result = Loader(str(tmp_path / "c"), {"t": target}, strict=False).load()
    assert result["missing"] == ["t.sparse_adamw_exp_avg", "t.sparse_adamw_exp_avg_sq"]
    rows = torch.arange(target.store.capacity)
    for slot in ("sparse_adamw_exp_avg", "sparse_adamw_exp_avg_sq"):
        assert torch.equal(target.store.read(slot, rows), torch.zeros(rows.numel(), DIM))
    assert torch.equal(target.embeddings(), torch.full((100, DIM), 0.5))


def test_defect03b_filtered_save_then_non_strict_load_gives_default_moments(tmp_path):
    a = HashTable([DIM], name="t")
    opt = SparseAdamW({"t": a}, lr=0.1)
    a(torch.arange(50)).sum().backward()
    opt.step()
    Saver(path=str(tmp_path / "c"), hashtables={"t": a},
          filter_func=lambda keys: [k for k in keys if "sparse_adamw" not in k]).save()
    b = HashTable([DIM], name="t")
    opt_b = SparseAdamW({"t": b}, lr=0.1)
    Loader(str(tmp_path / "c"), {"t": b}, strict=False).load()
    assert torch.equal(b.embeddings(), a.embeddings())
    rows = torch.arange(b.store.capacity)
    assert torch.equal(b.store.read("sparse_adamw_exp_avg_sq", rows),
                       torch.zeros(rows.numel(), DIM))
    b(torch.arange(50)).sum().backward()
    opt_b.step()  # no ZeroDivisionError, no NaN
    assert torch.isfinite(b.embeddings()).all()


def test_defect03c_another_block_size_at_load_gives_new_ids_initial_values(tmp_path):
    a = HashTable([DIM], block_size=8, name="t", initializer=ConstantInitializer(0.25))
    a(torch.arange(10))
    a.insert(torch.arange(10), torch.arange(40.0).view(10, DIM))
    a.delete(torch.arange(5))  # freed rows hold defaults again
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    b = HashTable([DIM], block_size=10, name="t", initializer=ConstantInitializer(0.25))
    b(torch.arange(500, 530))  # blocks that held other values before the load
    b.insert(torch.arange(500, 530), torch.full((30, DIM), 7.0))
    Loader(str(tmp_path / "c"), {"t": b}).load()
    assert torch.equal(b(torch.arange(5, 10)), a(torch.arange(5, 10)))
    fresh = b(torch.arange(100, 125))  # take freed rows, then rows past the saved capacity
    assert torch.equal(fresh, torch.full((25, DIM), 0.25))


# -- 5: policy state travels with the table --------------------------------------------------
def test_defect05_filter_clock_survives_a_saver_loader_round_trip(tmp_path):
    def table():
        return HashTable([DIM], name="t", filter_hook=FilterHook(
            "GlobalStepFilter", {"filter_step": 10}))

    a = table()
    a(torch.arange(10))  # stamped 0
    for _ in range(50):
        a._filter_hook_impl.update_step()
    a(torch.arange(5))  # stamped 50
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    b = table()
    Loader(str(tmp_path / "c"), {"t": b}).load()
    assert b._filter_hook_impl.global_step == 50
    assert b._filter_hook_impl.do_filter() == 5
    assert sorted(b.ids().tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("saved_shards, loaded_shards", [(2, 1), (1, 2)])
def test_defect05_admission_counts_survive_resharded_loads(tmp_path, saved_shards,
                                                           loaded_shards):
    hook = AdmitHook("MinCount", {"min_count": 3, "width": 1 << 12})

    def shard_tables(n):
        return [HashTable([DIM], name="t", slice=gen_slice(k, n)) for k in range(n)]

    def owner(ids, n):
        low = ids & 65535
        return [ids[(low >= gen_slice(k, n).slice_begin) & (low < gen_slice(k, n).slice_end)]
                for k in range(n)]

    ids = torch.arange(0, 300_000, 1000)  # spread over the slices
    saved = shard_tables(saved_shards)
    for table, mine in zip(saved, owner(ids, saved_shards), strict=True):
        table(mine, admit_hook=hook)
        table(mine, admit_hook=hook)  # seen twice: not admitted yet
        assert len(table) == 0
    for k, table in enumerate(saved):
        Saver(k, saved_shards, path=str(tmp_path / "c"), hashtables={"t": table}).save()
    loaded = shard_tables(loaded_shards)
    for table, mine in zip(loaded, owner(ids, loaded_shards), strict=True):
        Loader(str(tmp_path / "c"), {"t": table}).load()
        table(mine, admit_hook=hook)  # the third sighting admits every ID
        assert len(table) == mine.numel()


# -- 8, 9, 10: inputs that crashed or failed ---------------------------------------------------
@pytest.mark.parametrize("offsets", [[0, 2, 9], [0, 3, 1], [0, -4, 4], [1, 2, 4]])
def test_defect08_malformed_ragged_offsets_are_errors_not_crashes(backend, offsets):
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u"))
    values = torch.tensor([1, 2, 3, 4])
    bad = RaggedTensor(values, torch.tensor(offsets), validate=False)
    with pytest.raises(ValueError, match="offsets"):
        emb(bad)
    good = RaggedTensor(values, torch.tensor([0, 2, 4]))
    emb(good)
    good.offsets()[-1][1] = 7  # mutated after validation
    with pytest.raises(ValueError, match="offsets"):
        emb(good)


@pytest.mark.parametrize("combiner", ["sum", "mean", "tile"])
def test_defect09_empty_batches_give_zeros_of_the_right_shape(backend, combiner):
    kwargs = {"combiner_kwargs": {"tile_len": 2}} if combiner == "tile" else {}
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u",
                                           combiner=combiner, **kwargs))
    width = 2 * DIM if combiner == "tile" else DIM
    for ids, shape in ((torch.zeros(0, dtype=torch.int64), (0, width)),
                       (torch.zeros(3, 0, dtype=torch.int64), (3, width)),
                       (torch.zeros(0, 5, dtype=torch.int64), (0, width))):
        out = emb(ids)
        assert out.shape == shape and not out.any()
        out.sum().backward()
    ragged = RaggedTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    out = emb(ragged)
    assert out.shape == ((3, 2, DIM) if combiner == "tile" else (3, DIM)) and not out.any()
    engine = EmbeddingEngine({"a": EmbeddingOption(embedding_dim=DIM, shared_name="a"),
                              "b": EmbeddingOption(embedding_dim=DIM, shared_name="b")})
    out = engine({"a": torch.zeros(2, 0, dtype=torch.int64), "b": torch.tensor([[1]])})
    assert out["a"].shape == (2, DIM) and not out["a"].any()
    assert len(emb.hashtable) == 0


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_defect10_weights_that_require_grad_get_their_gradient(backend, combiner):
    gen = torch.Generator().manual_seed(3)
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u",
                                           combiner=combiner))
    ids = torch.randint(0, 20, (6, 5), generator=gen)
    emb.hashtable.insert(torch.arange(20), torch.randn(20, DIM, generator=gen))
    weights = torch.rand(6, 5, generator=gen, requires_grad=True)
    upstream = torch.randn(6, DIM, generator=gen)
    (emb(ids, weights) * upstream).sum().backward()
    reference = nn.EmbeddingBag(20, DIM, mode="sum")
    with torch.no_grad():
        reference.weight.copy_(emb.hashtable(torch.arange(20)))
    w_ref = weights.detach().clone().requires_grad_(True)
    w_used = w_ref / w_ref.sum(1, keepdim=True) if combiner == "mean" else w_ref
    (reference(ids, per_sample_weights=w_used) * upstream).sum().backward()
    torch.testing.assert_close(weights.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


# -- 11: bounded bookkeeping -----------------------------------------------------------------
def test_defect11_removal_log_is_bounded_and_counted(tmp_path):
    ht = HashTable([DIM], name="t", block_size=1024,
                   filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    hook = HashTableFilterHook(1, tables=[ht])
    Saver(path=str(tmp_path / "base"), hashtables={"t": ht}).save()
    for step in range(60):  # each step brings 10k new IDs, the filter drops the last ones
        ht(torch.arange(step * 10_000, (step + 1) * 10_000))
        hook.after_step(global_step=step)
    assert ht.stats()["removed"] >= 500_000
    changes = ht.store.changes()
    assert not changes.complete and changes.removed_ids.numel() == 0
    assert ht.memory_bytes() < 4 * 1024 * 1024  # the table itself holds ~20k rows
    # the next incremental save holds the table in full, and the chain loads exactly
    Saver(path=str(tmp_path / "delta"), hashtables={"t": ht}).save(incremental=True,
                                                                  base="base")
    back = HashTable([DIM], name="t", block_size=1024)
    Loader(str(tmp_path / "delta"), {"t": back}, strict=False).load()
    assert torch.equal(torch.sort(back.ids()).values, torch.sort(ht.ids()).values)
    assert ht.store.changes().complete


# -- 12: optimizer hyperparameters -------------------------------------------------------------
@pytest.mark.parametrize("cls", [SparseAdamW, SparseAdam, SparseAdamWTF, SparseAdagrad])
def test_defect12_eps_zero_is_rejected_at_construction(cls):
    with pytest.raises(ValueError, match=r"eps must be > 0"):
        cls({"t": HashTable([DIM], name="t")}, eps=0.0)


@pytest.mark.parametrize("bad", [{"eps": 0.0}, {"lr": -1.0}, {"beta1": 1.0},
                                 {"weight_decay": -0.1}])
def test_defect12_an_invalid_update_changes_nothing(bad):
    a, b = HashTable([DIM], name="a"), HashTable([DIM], name="b")
    opt = SparseAdamW({"a": a, "b": b}, lr=0.1)
    for t in (a, b):
        t(torch.arange(10)).sum().backward()
    def state():
        return {(t.name, s): t.slot_values(s, t.ids_map()[1]).clone()
                for t in (a, b) for s in t.slot_names}

    before = state()
    opt.param_groups[0].update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        opt.step()
    assert {n: s["step"] for n, s in opt.state.items()} == {"a": 0, "b": 0}
    after = state()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_defect12_zero_moments_with_tiny_eps_never_raise_mid_update():
    table = HashTable([DIM], name="t")
    opt = SparseAdagrad({"t": table}, lr=0.1, eps=1e-300)
    table(torch.arange(10)).sum().mul(0.0).backward()  # zero gradient: 0 / (0 + eps)
    opt.step()
    assert opt.state["t"]["step"] == 1


# -- 13: module semantics --------------------------------------------------------------------
def test_defect13_to_dtype_casts_every_float_slot_and_keeps_training():
    model = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u",
                                             filter_hook=FilterHook("GlobalStepFilter")))
    opt = SparseAdamW(model.hashtable, lr=0.1)
    model(torch.arange(20)).sum().backward()
    opt.step()
    before = model.hashtable.embeddings()
    model.to(torch.float64)
    table = model.hashtable
    assert table.dtype == torch.float64
    for slot in ("embedding", "sparse_adamw_exp_avg", "sparse_adamw_exp_avg_sq"):
        assert table.store.slot_spec(slot).dtype == torch.float64
    assert table.store.slot_spec("step_filter").dtype == torch.int64
    torch.testing.assert_close(table.embeddings(), before.double())
    opt.zero_grad()
    model(torch.arange(30)).sum().backward()
    opt.step()
    assert table.embeddings().dtype == torch.float64 and len(table) == 30


def test_defect13_meta_and_missing_cuda_are_clear_errors():
    model = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u",
                                             filter_hook=FilterHook("GlobalStepFilter")))
    model(torch.arange(5))
    with pytest.raises(ValueError, match="must be cpu or cuda, got meta"):
        model.to("meta")
    clock = model.hashtable._filter_hook_impl._global_step
    assert clock.device.type == "cpu" and model.hashtable.device.type == "cpu"
    assert len(model.hashtable) == 5
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot move table 'u'"):
            model.cuda()
    model.cpu()  # a no-op
    assert len(model.hashtable) == 5


def test_defect13_state_dict_round_trips_tables_into_another_model():
    def model():
        return DynamicEmbedding(EmbeddingOption(
            embedding_dim=DIM, shared_name="u", filter_hook=FilterHook("GlobalStepFilter"),
            initializer=NormalInitializer(generator=torch.Generator().manual_seed(0))))

    a, b = model(), model()
    SparseAdamW(a.hashtable)
    SparseAdamW(b.hashtable)
    a(torch.arange(100))
    a.hashtable.delete(torch.arange(0, 100, 3))
    a.hashtable._filter_hook_impl.update_step(7)
    b(torch.arange(500, 600))
    b.load_state_dict(a.state_dict())
    ta, tb = a.hashtable, b.hashtable
    assert torch.equal(ta.ids_map()[0], tb.ids_map()[0])
    assert torch.equal(ta.ids_map()[1], tb.ids_map()[1])
    rows = torch.arange(ta.store.capacity)
    for slot in ta.slot_names:
        assert torch.equal(ta.store.read(slot, rows), tb.store.read(slot, rows)), slot
    assert tb._filter_hook_impl.global_step == 7
    c = copy.deepcopy(a)  # an independent copy
    c(torch.arange(1000, 1010))
    c.hashtable.insert(torch.tensor([1]), torch.ones(1, DIM))
    assert len(c.hashtable) == len(ta) + 10 and len(ta) == 66
    assert not torch.equal(a.hashtable(torch.tensor([1])), torch.ones(1, DIM))
    assert c.hashtable._filter_hook_impl.table is c.hashtable


# -- 14, 15: names and small checks ------------------------------------------------------------
def test_defect14_get_filters_is_keyed_by_policy_name():
    table = HashTable([DIM], name="t", filter_hook=FilterHook(
        "GlobalStepFilter", {"name": "last_seen"}))
    filters = HashtableHookFactory.get_filters()
    assert filters["GlobalStepFilter"][table] is table._filter_hook_impl
    assert "last_seen" not in filters


def test_defect15_weights_must_have_the_shape_of_the_ids():
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="u"))
    with pytest.raises(ValueError, match=r"shape of the ids \[2, 3\], got \[3, 2\]"):
        emb(torch.zeros(2, 3, dtype=torch.int64), torch.ones(3, 2))


@pytest.mark.parametrize("make, err, match", [
    (lambda: HashTable([True]), ValueError, "embedding_shape"),
    (lambda: EmbeddingOption(filter_hook=FilterHook("GlobalStepFilter", {"name": 5})),
     TypeError, "name must be a non-empty str"),
    (lambda: EmbeddingOption(filter_hook=FilterHook("GlobalStepFilter",
                                                    {"name": "embedding"})),
     ValueError, "reserved"),
    (lambda: HashTable([DIM], name=""), TypeError, "name must be a non-empty str"),
])
def test_defect15_bad_arguments_fail_at_construction(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_defect15_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        HashTable([DIM], device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        EmbeddingOption(device="cuda")


def test_first_lookup_with_an_admit_hook_in_eval_mode_needs_no_write_lock():
    engine = EmbeddingEngine({"c": EmbeddingOption(embedding_dim=DIM, shared_name="i",
                                                   admit_hook=AdmitHook("MinCount"))})
    engine.eval()
    assert not engine({"c": torch.tensor([[1]])})["c"].any()
    engine.train()
    engine({"c": torch.tensor([[1, 1]])})  # seen twice: admitted
    assert len(engine.hashtable("c")) == 1


def test_filter_clock_survives_a_changed_filter_step(tmp_path):
    a = HashTable([DIM], name="t", filter_hook=FilterHook("GlobalStepFilter",
                                                          {"filter_step": 10}))
    a._filter_hook_impl.update_step(30)
    Saver(path=str(tmp_path / "c"), hashtables={"t": a}).save()
    b = HashTable([DIM], name="t", filter_hook=FilterHook("GlobalStepFilter",
                                                          {"filter_step": 20}))
    Loader(str(tmp_path / "c"), {"t": b}).load()
    assert b._filter_hook_impl.global_step == 30


def test_defect04_odd_names_round_trip_through_the_checkpoint_manager(tmp_path):
    from recis.framework.checkpoint_manager import CheckpointManager

    def model():
        return DynamicEmbedding(EmbeddingOption(
            embedding_dim=DIM, shared_name="@user/id.v2%", filter_hook=FilterHook(
                "GlobalStepFilter", {"filter_step": 3, "name": "step.filter"})))

    a = model()
    a(torch.arange(100))
    a.hashtable._filter_hook_impl.update_step(5)
    a(torch.arange(50))
    CheckpointManager(a, output_dir=str(tmp_path)).save(1)
    b = model()
    assert CheckpointManager(b, output_dir=str(tmp_path)).restore() == 1
    ta, tb = a.hashtable, b.hashtable
    assert torch.equal(ta.ids_map()[0], tb.ids_map()[0]) and len(tb) == 100
    rows = ta.ids_map()[1]
    assert torch.equal(tb.slot_values("step.filter", rows), ta.slot_values("step.filter", rows))
    assert tb._filter_hook_impl.global_step == 5
