"""Capacity eviction (LRU, LFU with decay, L2Norm) and Probability admission (issue #10), each
against a small pure-Python reference model on random sequences, and their saved state."""

import math
import random

import pytest
import torch

from recis.nn import HashTable
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.serialize import Loader, Saver


def _table(hook: FilterHook | None = None) -> HashTable:
    return HashTable([4], name="t", filter_hook=hook)


def _ids(table: HashTable) -> set[int]:
    return set(table.ids().tolist())


def _sequence(seed: int, steps: int = 60, support: int = 300):
    rng = random.Random(seed)
    return [[rng.randrange(support) * 7919 - 10**6 for _ in range(rng.randrange(1, 40))]
            for _ in range(steps)]


class LRUModel:
    def __init__(self, max_rows):
        self.max_rows, self.clock, self.stamp = max_rows, 0, {}

    def lookup(self, ids):
        self.clock += 1
        for i in set(ids):
            self.stamp[i] = self.clock

    def step(self):
        pass

    def filter(self):
        if len(self.stamp) > self.max_rows:
            order = sorted(self.stamp, key=lambda i: (self.stamp[i], i))
            for i in order[:len(self.stamp) - self.max_rows]:
                del self.stamp[i]
        return set(self.stamp)


class LFUModel:
    def __init__(self, max_rows, decay):
        self.max_rows, self.decay, self.clock, self.rows = max_rows, decay, 0, {}

    def _freq(self, i):
        count, last = self.rows[i]
        return count * math.pow(self.decay, self.clock - last) if self.decay < 1 else count, last

    def lookup(self, ids):
        for i in set(ids):
            count = self._freq(i)[0] if i in self.rows else 0.0
            self.rows[i] = (count + 1, self.clock)

    def step(self):
        self.clock += 1

    def filter(self):
        if len(self.rows) > self.max_rows:
            order = sorted(self.rows, key=lambda i: (*self._freq(i), i))
            for i in order[:len(self.rows) - self.max_rows]:
                del self.rows[i]
        return set(self.rows)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("policy, params, model", [
    ("LRU", {"max_rows": 50}, lambda: LRUModel(50)),
    ("LFU", {"max_rows": 50}, lambda: LFUModel(50, 1.0)),
    ("LFU", {"max_rows": 80, "decay": 0.8}, lambda: LFUModel(80, 0.8)),
])
def test_capacity_eviction_removes_exactly_the_reference_set(seed, policy, params, model):
    table = _table(FilterHook(policy, params))
    impl = table._filter_hook_impl
    ref = model()
    for n, batch in enumerate(_sequence(seed)):
        table(torch.tensor(batch))
        ref.lookup(batch)
        impl.update_step()
        ref.step()
        if n % 7 == 6:
            impl.do_filter()
            assert _ids(table) == ref.filter(), f"step {n}"
            assert len(table) <= params["max_rows"]


def test_lru_ties_and_inserts_follow_the_documented_order():
    table = _table(FilterHook("LRU", {"max_rows": 2}))
    table(torch.tensor([30, 10, 20]))  # one lookup: a tie, broken by ID
    assert table._filter_hook_impl.do_filter() == 1 and _ids(table) == {20, 30}
    table.insert(torch.tensor([5]), torch.ones(1, 4))  # an insert counts as a use
    table(torch.tensor([30]))
    table._filter_hook_impl.do_filter()
    assert _ids(table) == {5, 30}


def test_l2norm_removes_rows_below_the_norm():
    table = _table(FilterHook("L2Norm", {"min_norm": 1.0}))
    ids = torch.arange(10)
    rows = torch.zeros(10, 4)
    rows[:, 0] = torch.linspace(0, 2, 10)  # norms 0, 0.22, ..., 2
    table.insert(ids, rows)
    table._filter_hook_impl.do_filter()
    assert _ids(table) == {i for i in range(10) if float(rows[i].norm()) >= 1.0}


@pytest.mark.parametrize("hook, message", [
    (FilterHook("LRU", {"max_rows": 0}), "max_rows"),
    (FilterHook("LFU", {"max_rows": 5, "decay": 1.5}), "decay must be a number in"),
    (FilterHook("L2Norm", {"min_norm": -1}), "min_norm must be a number >= 0"),
    (FilterHook("LRU", {"max_rows": 5, "ttl": 3}), "ttl"),
])
def test_bad_policy_params_are_named(hook, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _table(hook)


@pytest.mark.parametrize("policy, params", [("LRU", {"max_rows": 40}),
                                            ("LFU", {"max_rows": 40, "decay": 0.9})])
def test_eviction_state_is_saved_and_restored_exactly(tmp_path, policy, params):
    seq = _sequence(11)
    straight = _table(FilterHook(policy, params))
    for n, batch in enumerate(seq):
        straight(torch.tensor(batch))
        straight._filter_hook_impl.update_step()
        if n % 5 == 4:
            straight._filter_hook_impl.do_filter()
        if n == 29:  # after that step's filter run: the resumed table continues from step 30
            Saver(path=str(tmp_path / "c"), hashtables={"t": straight}).save()
    resumed = _table(FilterHook(policy, params))
    Loader(str(tmp_path / "c"), {"t": resumed}).load()
    for n, batch in enumerate(seq[30:], start=30):
        resumed(torch.tensor(batch))
        resumed._filter_hook_impl.update_step()
        if n % 5 == 4:
            resumed._filter_hook_impl.do_filter()
    assert _ids(resumed) == _ids(straight)


def _slots_by_id(table: HashTable) -> dict[str, dict[int, list]]:
    ids, rows = table.ids_map()
    return {name: dict(zip(ids.tolist(), table.slot_values(name, rows).tolist(), strict=True))
            for name in table.slot_names}


def test_an_incremental_checkpoint_after_lookups_holds_their_stamps(tmp_path):
    """Policies write their stamps with kernels, without a write mark of their own: the touch
    marks the rows, so a delta saved after lookups alone restores every stamp exactly."""
    hooks = [FilterHook("GlobalStepFilter", {"filter_step": 3}),
             FilterHook("LRU", {"max_rows": 60}), FilterHook("LFU", {"max_rows": 50, "decay": 0.9})]
    table = _table(hooks)
    seq = _sequence(5, steps=20)
    for batch in seq[:10]:
        table(torch.tensor(batch))
        table._filter_hook_impl.update_step()
    Saver(path=str(tmp_path / "c0"), hashtables={"t": table}).save()
    for batch in seq[10:15]:  # lookups of IDs already there: stamps are their only writes
        table(torch.tensor([i for i in batch if i in _ids(table)] or batch[:1]))
        table._filter_hook_impl.update_step()
    Saver(path=str(tmp_path / "c1"), hashtables={"t": table}).save(incremental=True, base="c0")
    resumed = _table(hooks)
    Loader(str(tmp_path / "c1"), {"t": resumed}).load()
    assert _slots_by_id(resumed) == _slots_by_id(table)
    for batch in seq[15:]:
        for t in (table, resumed):
            t(torch.tensor(batch))
            t._filter_hook_impl.update_step()
            t._filter_hook_impl.do_filter()
    assert _ids(resumed) == _ids(table) and _slots_by_id(resumed) == _slots_by_id(table)


@pytest.mark.parametrize("policy", ["LRU", "LFU"])
def test_make_room_is_called_only_for_a_cap_on_insert(policy, monkeypatch):
    calls = []
    for cap in (False, True):
        table = _table(FilterHook(policy, {"max_rows": 5, "cap_on_insert": cap}))
        impl = table._filter_hook_impl
        monkeypatch.setattr(impl, "make_room", lambda store, new, keep: calls.append(new))
        table(torch.arange(3))
        table.insert(torch.arange(3, 5), torch.ones(2, 4))
        assert impl.caps_inserts is cap and len(calls) == (2 if cap else 0)


def _admitted(seed: int, p: float, batches) -> list[set[int]]:
    table = HashTable([2], name="t")
    hook = AdmitHook("Probability", {"p": p, "seed": seed})
    out = []
    for batch in batches:
        table(batch, hook)
        out.append(_ids(table))
    return out


def test_probability_admits_a_seeded_share_of_new_ids():
    batches = [torch.arange(i * 10_000, (i + 1) * 10_000) for i in range(2)]
    first = _admitted(0, 0.1, batches)
    assert abs(len(first[-1]) - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)
    assert first == _admitted(0, 0.1, batches)  # same seed, same IDs
    assert first[-1] != _admitted(1, 0.1, batches)[-1]
    again = _admitted(0, 0.5, [batches[0]] * 4)  # draws are new on every lookup
    sizes = [len(s) for s in again]
    for n, size in enumerate(sizes, start=1):
        assert abs(size - 10_000 * (1 - 0.5 ** n)) < 5 * math.sqrt(10_000 * 0.25)
    assert _admitted(0, 1.0, batches)[-1] == set(range(20_000))


def test_probability_state_is_saved_and_restored(tmp_path):
    hook = AdmitHook("Probability", {"p": 0.3, "seed": 5})
    batches = [torch.arange(i * 1000, (i + 1) * 1000) % 2500 for i in range(6)]
    straight = HashTable([2], name="t")
    for n, batch in enumerate(batches):
        straight(batch, hook)
        if n == 2:
            Saver(path=str(tmp_path / "c"), hashtables={"t": straight}).save()
    resumed = HashTable([2], name="t")
    resumed(batches[0][:0], hook)  # the policy exists before the load
    Loader(str(tmp_path / "c"), {"t": resumed}).load()
    for batch in batches[3:]:
        resumed(batch, hook)
    assert _ids(resumed) == _ids(straight)


def test_bad_probability_params_are_named():
    with pytest.raises(ValueError, match=r"p must be a number in \(0, 1\]"):
        HashTable([2], name="t")(torch.arange(3), AdmitHook("Probability", {"p": 0}))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("last_unique", [True, False])
def test_worst_beyond_equals_a_full_lexicographic_sort(seed, last_unique):
    from recis.nn.modules.hashtable_hook_impl import worst_beyond

    g = torch.Generator().manual_seed(seed)
    n = 500
    last = torch.randperm(n, generator=g) if last_unique else torch.randint(0, 4, (n,),
                                                                             generator=g)
    keys = [torch.randint(0, 6, (n,), generator=g).to(torch.float64),  # many ties
            torch.randint(0, 3, (n,), generator=g), last]
    for max_rows in (0, 1, 137, 499, 500, 800):
        # a stable sort: rows tied on every key go by position
        order = sorted(range(n), key=lambda i: tuple(float(k[i]) for k in keys))
        expected = set(order[:max(n - max_rows, 0)])
        got = set(worst_beyond(max_rows, keys).nonzero().view(-1).tolist())
        assert got == expected, max_rows


def test_parse_bytes():
    from recis.nn.modules.hashtable_hook_impl import parse_bytes

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes(1000) == 1000 and parse_bytes("1.5kib") == 1536
    for bad in ("2 GiBs", "lots", "-1MB", 0):
        with pytest.raises(ValueError, match="budget"):
            parse_bytes(bad, "budget")
    with pytest.raises(TypeError):
        parse_bytes(2.5e9, "budget")


def test_memory_budget_caps_rows_in_lfu_order():
    from recis.optim import SparseAdamW

    table = HashTable([16], name="t", filter_hook=FilterHook("MemoryBudget",
                                                             {"budget": 64 * 290}))
    SparseAdamW({"t": table}, lr=1e-3)  # its state counts in the row's bytes
    impl = table._filter_hook_impl
    assert impl.bytes_per_row() == 16 * 4 * 3 + 8 + 8 + 1 + 16 + 8 + 57
    ref = LFUModel(64, 1.0)
    for n, batch in enumerate(_sequence(3)):
        table(torch.tensor(batch))
        ref.lookup(batch)
        impl.update_step()
        ref.step()
        if n % 7 == 6:
            impl.do_filter()
            assert _ids(table) == ref.filter(), f"step {n}"


def test_memory_budget_plateaus_under_a_drifting_stream():
    block, interval, new_per_step = 256, 10, 40
    table = HashTable([8], name="t", block_size=block,
                      filter_hook=FilterHook("MemoryBudget", {"budget": "256KiB",
                                                              "decay": 0.95}))
    impl = table._filter_hook_impl
    rng = random.Random(0)
    memory, rows_and_map = [], []  # all of it, and without the (bounded) removal log
    for step in range(3000):
        fresh = [10**9 + step * new_per_step + k for k in range(new_per_step)]
        recent = [10**9 + rng.randrange(max(step - 50, 0), step + 1) * new_per_step
                  for _ in range(20)]
        table(torch.tensor(fresh + recent))
        impl.update_step()
        if step % interval == interval - 1:
            impl.do_filter()
            assert len(table) <= impl.budget // impl.bytes_per_row()
            memory.append(table.memory_bytes())
            rows_and_map.append(memory[-1] - table.store._removed.memory_bytes())
    from recis._core.store import _RemovalLog

    slack = (block * impl.bytes_per_row() + interval * new_per_step * impl.bytes_per_row()
             + 16 * _RemovalLog.MIN_BOUND)  # a block per slot, one interval, the log's floor
    assert max(memory) <= 1.1 * impl.budget + slack
    plateau = rows_and_map[len(rows_and_map) // 4:]
    assert min(plateau) == max(plateau)  # blocks and map stop growing once the cap holds


def test_memory_budget_as_an_embedding_option():
    from recis.nn import DynamicEmbedding, EmbeddingOption

    opt = EmbeddingOption(embedding_dim=8, shared_name="m", memory_budget="64KiB",
                          filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5}))
    assert [h.name for h in opt.filter_hook] == ["GlobalStepFilter", "MemoryBudget"]
    emb = DynamicEmbedding(opt)
    chain = emb.hashtable._filter_hook_impl
    emb(torch.arange(5000).view(-1, 1))
    chain.do_filter()
    budget = [p for p in chain.modules() if type(p).__name__ == "MemoryBudgetFilterHookImpl"][0]
    assert 0 < len(emb.hashtable) <= 64 * 1024 // budget.bytes_per_row()
    only = EmbeddingOption(embedding_dim=8, shared_name="n", memory_budget=1 << 20)
    assert only.filter_hook.name == "MemoryBudget"
    with pytest.raises(ValueError, match="memory_budget: cannot read 'lots'"):
        EmbeddingOption(memory_budget="lots")
