"""GlobalStepFilter and HashTableFilterHook: the exact timeline, resets, reuse, registry."""

import gc

import pytest
import torch

from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.nn.initializers import ConstantInitializer
from recis.nn.modules.hashtable_hook_impl import (
    BaseFilterHookImpl,
    HashtableHookFactory,
    regist_filter,
)


def step_filter(n):
    return FilterHook("GlobalStepFilter", {"filter_step": n})


@pytest.mark.parametrize("filter_step", [1, 3, 10, 15, 25])
def test_timeline(filter_step):
    """One lookup, then one after_step per step from 0; interval 10: runs at 10, 20, 30, ...

    An ID last looked up at step s is removed by the first run at step c with c - s >= n.
    """
    ht = HashTable([2], filter_hook=step_filter(filter_step))
    hook = HashTableFilterHook(filter_interval=10, tables=[ht])
    last_seen = {100 + s: s for s in range(0, 40, 3)}  # ID 100+s seen at step s only
    removed_at = {}
    for step in range(60):
        if 100 + step in last_seen:
            ht(torch.tensor([100 + step]))
        before = set(ht.ids().tolist())
        hook.after_step(None, step)
        for i in before - set(ht.ids().tolist()):
            removed_at[i] = step
    for i, s in last_seen.items():
        runs = [c for c in range(10, 60, 10) if c - s >= filter_step and c >= s]
        assert removed_at.get(i) == (runs[0] if runs else None), (i, s)


def test_filter_runs_only_on_interval_steps_and_counts_calls():
    ht = HashTable([2], filter_hook=step_filter(1))
    hook = HashTableFilterHook(filter_interval=10, tables=[ht])
    impl = ht._filter_hook_impl
    runs = []
    for step in range(35):
        ht(torch.tensor([step]))  # a fresh ID each step; older ones are stale
        n = len(ht)
        hook.after_step(global_step=torch.tensor(step))
        if len(ht) < n:
            runs.append(step)
    assert runs == [10, 20, 30]
    assert impl.global_step == 35


def test_insert_stamps_rows_so_they_survive():
    # RecIS leaves inserted rows at stamp 0, so a filter can drop them at once.
    ht = HashTable([2], filter_hook=step_filter(5))
    hook = HashTableFilterHook(filter_interval=1, tables=[ht])
    for step in range(20):
        hook.after_step(None, step)
    ht.insert(torch.tensor([7]), torch.ones(1, 2))
    hook.after_step(None, 20)
    assert ht.ids().tolist() == [7]


def test_removed_rows_are_reset_and_reused():
    ht = HashTable([4], block_size=8, initializer=ConstantInitializer(3.0),
                   filter_hook=step_filter(2))
    ht.add_slot("exp_avg", [4], torch.float32, 0.0)
    hook = HashTableFilterHook(filter_interval=1, tables=[ht])
    ht.insert(torch.arange(10), torch.ones(10, 4))
    ht.set_slot_values("exp_avg", ht.ids_map()[1], torch.ones(10, 4))
    keep = torch.arange(0, 10, 2)
    for step in range(4):
        ht(keep)
        hook.after_step(None, step)
    assert sorted(ht.ids().tolist()) == keep.tolist()
    live_rows = set(ht.ids_map()[1].tolist())
    dead = torch.tensor([r for r in range(10) if r not in live_rows])
    assert torch.equal(ht.slot_values("embedding", dead), torch.zeros(5, 4))  # no ID: zeros
    assert torch.equal(ht.slot_values("exp_avg", dead), torch.zeros(5, 4))
    assert torch.equal(ht.slot_values("step_filter", dead), torch.zeros(5, 1, dtype=torch.int64))
    out = ht(torch.arange(100, 106))  # 5 freed rows are reused before the table grows
    assert torch.equal(out, torch.full((6, 4), 3.0))  # with fresh initial values
    assert max(ht.ids_map()[1].tolist()) == len(ht) - 1 == 10


def test_global_step_is_in_state_dict():
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=2, shared_name="gs",
                                           filter_hook=step_filter(3)))
    hook = HashTableFilterHook(filter_interval=100, tables=[emb])
    for step in range(5):
        hook.after_step(None, step)
    sd = emb.state_dict()
    key = "hashtable._filter_hook_impl._global_step"
    assert sd[key].tolist() == [5]
    fresh = DynamicEmbedding(EmbeddingOption(embedding_dim=2, shared_name="gs",
                                             filter_hook=step_filter(3)))
    fresh.load_state_dict(sd)
    assert fresh.hashtable._filter_hook_impl.global_step == 5


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-3, ValueError), (1.5, TypeError)])
def test_bad_filter_step(bad, err):
    with pytest.raises(err, match="filter_step"):
        HashTable([2], filter_hook=step_filter(bad))
    with pytest.raises((ValueError, TypeError), match="filter_step"):
        EmbeddingOption(filter_hook=step_filter(bad))


def test_unknown_policy_names_list_the_registered_ones():
    expected = r"Unknown filter policy 'GlobalStepFiltr'.*GlobalStepFilter"
    with pytest.raises(ValueError, match=expected):
        HashTable([2], filter_hook=FilterHook("GlobalStepFiltr"))
    from recis.nn.hashtable_hook import AdmitHook

    with pytest.raises(ValueError, match=r"Unknown admit policy 'Readonly'.*ReadOnly"):
        HashTable([2])(torch.tensor([1]), admit_hook=AdmitHook("Readonly"))
    with pytest.raises(ValueError, match="Unknown admit policy"):
        EmbeddingOption(admit_hook=AdmitHook("Nope"))


def test_user_policy_by_name_and_duplicate_registration():
    @regist_filter("DropNegativeIdsForTest")
    class DropNegative(BaseFilterHookImpl):
        def filter(self, ids, tags, rows):
            return ids < 0

    with pytest.raises(ValueError, match="already registered"):
        regist_filter("DropNegativeIdsForTest", DropNegative)
    assert "DropNegativeIdsForTest" in HashtableHookFactory.filter_policies()
    ht = HashTable([2], filter_hook=FilterHook("DropNegativeIdsForTest"))
    ht(torch.tensor([-2, -1, 0, 1]))
    hook = HashTableFilterHook(filter_interval=1, tables=[ht])
    assert [f.table for f in hook.filters()] == [ht]
    hook.after_step(None, 0)
    assert len(ht) == 4  # the first call only arms the interval
    hook.after_step(None, 1)
    assert sorted(ht.ids().tolist()) == [0, 1]


def test_hook_finds_tables_without_the_model_and_forgets_dead_ones():
    hook = HashTableFilterHook(filter_interval=1)
    ht = HashTable([2], filter_hook=step_filter(1), name="weakref_probe")
    assert any(f.table is ht for f in hook.filters())
    del ht
    gc.collect()
    assert all(f.table.name != "weakref_probe" for f in hook.filters())


def test_explicit_tables_limit_the_hook():
    a = HashTable([2], filter_hook=step_filter(1))
    b = HashTable([2], filter_hook=step_filter(1))
    a(torch.tensor([1]))
    b(torch.tensor([1]))
    hook = HashTableFilterHook(filter_interval=1, tables=[a])
    for step in range(3):
        hook.after_step(None, step)
    assert len(a) == 0 and len(b) == 1
    assert b._filter_hook_impl.global_step == 0


def test_after_step_argument_errors():
    hook = HashTableFilterHook(filter_interval=1, tables=[])
    with pytest.raises(ValueError, match="global_step"):
        hook.after_step(None)
    with pytest.raises(ValueError, match="one-element"):
        hook.after_step(None, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="filter_interval"):
        HashTableFilterHook(filter_interval=0)


def test_recis_filter_scenario_on_a_coalesced_table():
    """RecIS testFilterHook, steps 0-7 (no optimizer): children keep separate IDs."""
    a = dict(embedding_dim=8, initializer=ConstantInitializer(3.0), filter_hook=step_filter(1))
    opts = {
        "fea_1": EmbeddingOption(shared_name="ht1", **a),
        "fea_3": EmbeddingOption(shared_name="ht1", combiner="mean", trainable=False, **a),
        "fea_2": EmbeddingOption(shared_name="ht2", combiner="mean", **a),
        "fea_4": EmbeddingOption(embedding_dim=8, shared_name="ht3", filter_hook=step_filter(3),
                                 initializer=ConstantInitializer(3.0)),
    }
    engine = EmbeddingEngine(opts)
    assert len(engine._ht) == 2
    table_a, table_b = engine.hashtable("fea_1"), engine.hashtable("fea_4")
    assert table_a is engine.hashtable("fea_2")
    hook = HashTableFilterHook(filter_interval=1, tables=[engine])

    def ids(table, child):
        return sorted(table.ids(child).tolist())

    def run(step, feats, backward=True):
        out = engine({k: torch.tensor([v]) for k, v in feats.items()})
        if backward:
            (out["fea_1"].sum() + out["fea_2"].sum()).backward()
        hook.after_step(None, step)

    base = {"fea_1": list(range(12, 17)), "fea_2": list(range(27, 34)), "fea_3": [12, 99],
            "fea_4": [100, 101, 102]}
    for step in range(3):
        run(step, base)
        assert ids(table_a, "ht1") == [12, 13, 14, 15, 16, 99]
        assert ids(table_a, "ht2") == list(range(27, 34))
        assert ids(table_b, "ht3") == [100, 101, 102]
    run(3, {"fea_1": [12, 13, 16], "fea_2": [777777, 28]})
    assert ids(table_a, "ht1") == [12, 13, 16] and ids(table_a, "ht2") == [28, 777777]
    assert max(table_a.ids_map()[1].tolist()) <= 13
    assert ids(table_b, "ht3") == [100, 101, 102]
    run(4, {"fea_3": [12, 13, 16, 999]}, backward=False)
    assert ids(table_a, "ht1") == [12, 13, 16, 999] and ids(table_a, "ht2") == []
    run(5, {"fea_1": [999], "fea_2": [12]})
    assert ids(table_a, "ht1") == [999] and ids(table_a, "ht2") == [12]
    assert ids(table_b, "ht3") == []  # last seen at step 2, G is now 6, 2 < 6 - 3
    dead = [r for r in range(14) if r not in set(table_a.ids_map()[1].tolist())]
    assert torch.equal(table_a.slot_values("embedding", torch.tensor(dead)),
                       torch.zeros(len(dead), 8))  # rows without an ID
    assert torch.equal(table_a(torch.tensor([16, 17])), torch.full((2, 8), 3.0))  # fresh


def test_hook_params_are_checked_when_the_option_is_built():
    with pytest.raises(TypeError, match="filter_stp"):
        EmbeddingOption(filter_hook=FilterHook("GlobalStepFilter", {"filter_stp": 3}))
    from recis.nn.hashtable_hook import AdmitHook

    with pytest.raises(ValueError, match="MinCount: min_count must be a positive int"):
        EmbeddingOption(admit_hook=AdmitHook("MinCount", {"min_count": 0}))
