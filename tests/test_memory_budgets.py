"""Memory budgets beyond one table (issue #10): a budget shared by several tables (one LFU order
over all of them, rows weighed by their own bytes), an engine's budget, a hard cap at insert
time, ``HashTable(memory_budget=...)``, and every lifecycle policy's state through resharded
checkpoint loads."""

import random

import pytest
import torch
from test_lifecycle_policies import LFUModel
from test_lifecycle_policies_more import CappedModel

from recis.nn import EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import gen_slice, in_slice
from recis.nn.modules.hashtable_hook_impl import (
    MemoryBudgetFilterHookImpl,
    worst_beyond_bytes,
)
from recis.serialize import Loader, Saver


def _ids(table: HashTable) -> set[int]:
    return set(table.ids().tolist())


@pytest.mark.parametrize("seed", range(5))
def test_worst_beyond_bytes_removes_the_shortest_prefix_that_fits(seed):
    g = torch.Generator().manual_seed(seed)
    n = 400
    keys = [torch.randint(0, 5, (n,), generator=g).to(torch.float64),  # many ties
            torch.randint(0, 3, (n,), generator=g), torch.randperm(n, generator=g)]
    weights = torch.randint(1, 9, (n,), generator=g)
    total = int(weights.sum())
    order = sorted(range(n), key=lambda i: tuple(float(k[i]) for k in keys))
    for budget in (1, 7, total // 3, total - 1, total, total + 5):
        expected, kept = set(), total
        for i in order:
            if kept <= budget:
                break
            expected.add(i)
            kept -= int(weights[i])
        got = set(worst_beyond_bytes(budget, keys, weights).nonzero().view(-1).tolist())
        assert got == expected, budget


def _budget_hook(budget, **extra):
    return FilterHook("MemoryBudget", {"budget": budget, **extra})


def test_a_shared_budget_removes_one_lfu_order_over_all_its_tables():
    """Three tables of different row sizes share a budget: after a run, the rows left are what
    a reference keeps when it drops the globally least frequent rows (then older last touch,
    then table, then ID) until the bytes of all three fit."""
    dims = (2, 6, 12)
    budget = 40_000
    tables = [HashTable([d], name=f"t{k}", filter_hook=_budget_hook(budget, share="g",
                                                                    decay=0.9))
              for k, d in enumerate(dims)]
    impls = [t._filter_hook_impl for t in tables]
    bytes_per_row = [impl.bytes_per_row() for impl in impls]
    assert bytes_per_row[0] < bytes_per_row[1] < bytes_per_row[2]
    refs = [LFUModel(max_rows=10**9, decay=0.9) for _ in tables]
    rng = random.Random(5)
    for step in range(90):
        for k, (table, ref) in enumerate(zip(tables, refs, strict=True)):
            hot = rng.randrange(40 * (k + 1))  # each table has its own popularity
            batch = [rng.randrange(400) for _ in range(rng.randrange(5, 30))] + [hot] * 3
            table(torch.tensor(batch))
            ref.lookup(batch)
        for impl, ref in zip(impls, refs, strict=True):
            impl.update_step()
            ref.step()
        if step % 10 == 9:
            removed = impls[step // 10 % 3].do_filter()  # any member enforces the group
            assert all(impl.do_filter() == 0 for impl in impls)  # the others find it done
            rows = [(*ref._freq(i), k, i) for k, ref in enumerate(refs) for i in ref.rows]
            used = sum(len(ref.rows) * b for ref, b in zip(refs, bytes_per_row, strict=True))
            dropped = 0
            for *_, k, i in sorted(rows):
                if used <= budget:
                    break
                del refs[k].rows[i]
                used -= bytes_per_row[k]
                dropped += 1
            assert removed == dropped, f"step {step}"
            for table, ref in zip(tables, refs, strict=True):
                assert _ids(table) == set(ref.rows), f"step {step}, {table.name}"
            assert sum(len(t) * b for t, b in zip(tables, bytes_per_row, strict=True)) <= budget
    assert sum(table.stats()["evicted"].get("MemoryBudget", 0) for table in tables) > 0


def test_tables_sharing_a_budget_must_agree_on_it():
    a = HashTable([2], name="a", filter_hook=_budget_hook(1000, share="s"))
    b = HashTable([2], name="b", filter_hook=_budget_hook(2000, share="s"))
    a(torch.arange(10))
    b(torch.arange(10))
    with pytest.raises(ValueError, match=r"sharing 's' were given different budgets \[1000, "
                                         r"2000\]"):
        a._filter_hook_impl.do_filter()


@pytest.mark.parametrize("params, message", [
    ({"share": ""}, "share must be a non-empty str"),
    ({"share": 3}, "share must be a non-empty str"),
    ({"share": "s", "cap_on_insert": True}, "not with share"),
    ({"cap_on_insert": "yes"}, "cap_on_insert must be a bool"),
])
def test_bad_budget_params_are_named(params, message):
    with pytest.raises((TypeError, ValueError), match=message):
        HashTable([2], filter_hook=_budget_hook("1MiB", **params))


def test_an_engine_budget_keeps_the_most_used_ids_of_every_feature():
    """Cold IDs of one feature go before hot IDs of another, and the engine's tables fit."""
    budget = 120_000
    engine = EmbeddingEngine({
        "user": EmbeddingOption(embedding_dim=4, shared_name="user"),
        "item": EmbeddingOption(embedding_dim=16, shared_name="item"),
    }, memory_budget=budget)
    tables = [engine.hashtable("user"), engine.hashtable("item")]
    impls = [next(p for p in t.modules() if isinstance(p, MemoryBudgetFilterHookImpl))
             for t in tables]
    assert impls[0].share == impls[1].share and impls[0].name == "engine_budget"
    hot_items = torch.arange(50)
    for step in range(30):
        users = torch.arange(step * 200, step * 200 + 200)  # each user seen once
        engine({"user": users.view(-1, 1), "item": hot_items.view(-1, 1)})
        for impl in impls:
            impl.update_step()
    assert impls[0].do_filter() > 0
    used = sum(len(t) * impl.bytes_per_row() for t, impl in zip(tables, impls, strict=True))
    assert used <= budget
    assert set(hot_items.tolist()) <= set(tables[1].ids().tolist())  # all hot items stay
    assert len(tables[0]) < 30 * 200
    other = EmbeddingEngine({"x": EmbeddingOption(embedding_dim=4, shared_name="x")},
                            memory_budget="1MiB")
    other_impl = next(p for p in other.hashtable("x").modules()
                      if isinstance(p, MemoryBudgetFilterHookImpl))
    assert other_impl.share != impls[0].share  # each engine is its own group
    with pytest.raises(ValueError, match="memory_budget: cannot read"):
        EmbeddingEngine({"x": EmbeddingOption(embedding_dim=4)}, memory_budget="lots")


@pytest.mark.parametrize("seed", range(3))
def test_a_budget_with_cap_on_insert_never_holds_more_rows_than_it_allows(seed):
    table = HashTable([4], name="t",
                      filter_hook=_budget_hook(30 * 200, decay=0.8, cap_on_insert=True))
    impl = table._filter_hook_impl
    limit = impl.row_limit()
    assert limit == 30 * 200 // impl.bytes_per_row()
    ref = CappedModel(LFUModel(limit, 0.8))
    rng = random.Random(seed)
    for step in range(60):
        batch = [rng.randrange(300) for _ in range(rng.randrange(1, 12))]
        table(torch.tensor(batch))
        ref.lookup(batch)
        impl.update_step()
        ref.step()
        assert _ids(table) == set(ref.rows()), f"step {step}"
        assert len(table) <= limit


def test_memory_budget_on_a_bare_table():
    plain = HashTable([8], name="p", memory_budget="64KiB")
    assert isinstance(plain._filter_hook_impl, MemoryBudgetFilterHookImpl)
    chained = HashTable([8], name="c", memory_budget=64 * 1024,
                        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5}))
    assert [type(p).__name__ for p in chained._filter_hook_impl] == [
        "GlobalStepFilterHookImpl", "MemoryBudgetFilterHookImpl"]
    for table in (plain, chained):
        table(torch.arange(5000))
        table._filter_hook_impl.do_filter()
        budget = next(p for p in table.modules() if isinstance(p, MemoryBudgetFilterHookImpl))
        assert 0 < len(table) <= 64 * 1024 // budget.bytes_per_row()
    with pytest.raises(ValueError, match="memory_budget: cannot read '2 lots'"):
        HashTable([8], memory_budget="2 lots")


# -- every lifecycle policy's state through resharded loads ------------------------------------
FILTERS = [FilterHook("LRU", {"max_rows": 10**6}),
           FilterHook("LFU", {"max_rows": 10**6, "decay": 0.9}),
           FilterHook("MemoryBudget", {"budget": "1GiB", "decay": 0.8}),
           FilterHook("GlobalStepFilter", {"filter_step": 10**6})]
ADMITS = [AdmitHook("MinCount", {"min_count": 2, "decay": 0.5, "decay_every": 3,
                                 "width": 1 << 10}),
          AdmitHook("BloomFilter", {"min_count": 2, "capacity": 1000, "fp_rate": 0.01})]


def _policy_table(name: str = "t", slice=None) -> HashTable:  # noqa: A002
    table = HashTable([3], name=name, slice=slice, filter_hook=FILTERS)
    for hook in ADMITS:  # the policies exist before a load
        table(torch.zeros(0, dtype=torch.int64), hook)
    return table


def _train_shards(shards: list[HashTable], steps: int = 40, seed: int = 2) -> None:
    rng = random.Random(seed)
    for step in range(steps):
        batch = torch.tensor([rng.randrange(500) * 65537 for _ in range(30)])
        for shard in shards:
            mine = batch[in_slice(batch, shard._slice)]
            shard(mine, ADMITS[step % 2])
            shard._filter_hook_impl.update_step()


def _per_id_slots(tables: list[HashTable]) -> dict[int, dict[str, list]]:
    out = {}
    for table in tables:
        ids, rows = table.ids_map()
        for name in table.store.slot_names:
            for i, value in zip(ids.tolist(), table.slot_values(name, rows).tolist(),
                                strict=True):
                out.setdefault(i, {})[name] = value
    return out


def _states(table: HashTable) -> dict[str, dict[str, torch.Tensor]]:
    return {key: policy.policy_state() for key, policy in table.store.policies().items()}


@pytest.mark.parametrize("saved, loaded", [(2, 1), (1, 3), (2, 3)])
def test_policy_slots_and_states_survive_resharded_loads(tmp_path, saved, loaded):
    sources = [_policy_table(slice=gen_slice(k, saved)) for k in range(saved)]
    _train_shards(sources)
    path = str(tmp_path / "c")
    for k, shard in reversed(list(enumerate(sources))):
        Saver(shard_index=k, shard_num=saved, path=path, hashtables={"t": shard}).save()
    targets = [_policy_table(slice=gen_slice(k, loaded)) for k in range(loaded)]
    for target in targets:
        Loader(path, {"t": target}).load()
    assert _per_id_slots(targets) == _per_id_slots(sources)  # every slot of every ID
    for key, policy in sources[0].store.policies().items():
        merged = type(policy).merge_policy_states([_states(s)[key] for s in sources])
        for target in targets:
            got = _states(target)[key]
            assert got.keys() == merged.keys(), key
            for field in merged:
                assert torch.equal(got[field].cpu(), merged[field].cpu()), (key, field)
