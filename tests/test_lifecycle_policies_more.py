"""Issue #10, second part: BloomFilter admission, MinCount with decaying counts, the Score
filter, several filters on one table; each against a small pure-Python reference model on
random sequences, and their saved state."""

import math
import random
from collections import Counter

import pytest
import torch
from test_lifecycle_policies import LFUModel, LRUModel

from recis.nn import HashTable
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable_hook_impl import (
    BloomFilterAdmitHookImpl,
    MinCountAdmitHookImpl,
    bloom_size,
)
from recis.serialize import Loader, Saver


def _ids(table: HashTable) -> set[int]:
    return set(table.ids().tolist())


def _sequence(seed: int, steps: int = 60, support: int = 300):
    rng = random.Random(seed)
    return [[rng.randrange(support) * 7919 - 10**6 for _ in range(rng.randrange(1, 40))]
            for _ in range(steps)]


# -- admission ---------------------------------------------------------------------------------
class CountingAdmissionModel:
    """Exact counts of the occurrences of unknown IDs; admitted at ``min_count``; after every
    ``every``-th lookup that sees an unknown ID the counts are multiplied by ``decay`` and
    rounded down."""

    def __init__(self, min_count, decay=1.0, every=1):
        self.min_count, self.decay, self.every = min_count, decay, every
        self.counts, self.table, self.calls = {}, set(), 0

    def lookup(self, ids):
        unknown = Counter(i for i in ids if i not in self.table)
        if not unknown:
            return
        for i, n in unknown.items():
            self.counts[i] = self.counts.get(i, 0) + n
            if self.counts[i] >= self.min_count:
                self.table.add(i)
        if self.decay < 1:
            self.calls += 1
            if self.calls % self.every == 0:
                self.counts = {i: math.floor(c * self.decay) for i, c in self.counts.items()}

    def delete(self, ids):
        self.table -= set(ids)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("hook, model", [
    (AdmitHook("BloomFilter", {"min_count": 3, "capacity": 10_000, "fp_rate": 1e-6}),
     lambda: CountingAdmissionModel(3)),
    (AdmitHook("BloomFilter", {"min_count": 1, "capacity": 10_000, "fp_rate": 1e-6}),
     lambda: CountingAdmissionModel(1)),
    (AdmitHook("MinCount", {"min_count": 4, "decay": 0.5, "decay_every": 3}),
     lambda: CountingAdmissionModel(4, 0.5, 3)),
    (AdmitHook("MinCount", {"min_count": 3, "decay": 0.8, "decay_every": 1}),
     lambda: CountingAdmissionModel(3, 0.8, 1)),
    (AdmitHook("MinCount", {"min_count": 3}), lambda: CountingAdmissionModel(3)),
])
def test_counting_admission_admits_exactly_the_reference_set(seed, hook, model):
    table = HashTable([2], name="t")
    ref = model()
    rng = random.Random(seed + 100)
    for n, batch in enumerate(_sequence(seed)):
        table(torch.tensor(batch), hook)
        ref.lookup(batch)
        assert _ids(table) == ref.table, f"lookup {n}"
        if n % 9 == 8 and ref.table:  # removed IDs are counted again from their counts
            gone = rng.sample(sorted(ref.table), k=min(5, len(ref.table)))
            table.delete(torch.tensor(gone))
            ref.delete(gone)


def test_bloom_filter_is_sized_by_the_standard_formulas():
    assert bloom_size(1000, 0.01) == (9586, 7)
    impl = BloomFilterAdmitHookImpl(capacity=1000, fp_rate=0.01)
    assert (impl.num_counters, impl.num_hashes) == (9586, 7)
    # at capacity, an ID seen once passes min_count=2 about fp_rate of the time
    table = HashTable([2], name="t")
    table(torch.arange(1000) * 104729, AdmitHook("BloomFilter", {"capacity": 1000}))
    assert len(table) <= 30


def test_decay_off_keeps_the_min_count_state_as_before():
    impl = MinCountAdmitHookImpl(min_count=2, width=16)
    impl.admit(None, torch.arange(3), None, torch.ones(3, dtype=torch.int64))
    assert set(impl.policy_state()) == {"sketch"}


@pytest.mark.parametrize("hook", [
    AdmitHook("BloomFilter", {"min_count": 3, "capacity": 2000, "fp_rate": 0.001}),
    AdmitHook("MinCount", {"min_count": 4, "decay": 0.5, "decay_every": 4, "width": 1 << 12}),
])
def test_counting_admission_state_is_saved_and_restored(tmp_path, hook):
    seq = _sequence(7)
    straight = HashTable([2], name="t")
    for n, batch in enumerate(seq):
        straight(torch.tensor(batch), hook)
        if n == 24:
            Saver(path=str(tmp_path / "c"), hashtables={"t": straight}).save()
    resumed = HashTable([2], name="t")
    resumed(torch.tensor(seq[0][:0], dtype=torch.int64), hook)  # the policy exists first
    Loader(str(tmp_path / "c"), {"t": resumed}).load()
    for batch in seq[25:]:
        resumed(torch.tensor(batch), hook)
    assert _ids(resumed) == _ids(straight)


def test_counting_admission_states_merge_by_sum():
    a = {"counters": torch.tensor([1, 2, 0], dtype=torch.int32)}
    b = {"counters": torch.tensor([3, 0, 5], dtype=torch.int32)}
    assert BloomFilterAdmitHookImpl.merge_policy_states([a, b])["counters"].tolist() == [4, 2, 5]
    merged = MinCountAdmitHookImpl.merge_policy_states(
        [{"sketch": torch.ones(1, 2, dtype=torch.int32), "calls": torch.tensor([3])},
         {"sketch": torch.ones(1, 2, dtype=torch.int32), "calls": torch.tensor([5])}])
    assert merged["sketch"].tolist() == [[2, 2]] and merged["calls"].tolist() == [5]


@pytest.mark.parametrize("params, message", [
    ({"name": "BloomFilter", "capacity": 0}, "BloomFilter: capacity"),
    ({"name": "BloomFilter"}, "capacity"),
    ({"name": "BloomFilter", "capacity": 10, "fp_rate": 1.0},
     r"BloomFilter: fp_rate must be a number in \(0, 1\)"),
    ({"name": "BloomFilter", "capacity": 10, "min_count": 0}, "BloomFilter: min_count"),
    ({"name": "MinCount", "decay": 0.0}, r"MinCount: decay must be a number in \(0, 1\]"),
    ({"name": "MinCount", "decay": 0.5, "decay_every": 0}, "MinCount: decay_every"),
])
def test_bad_admission_params_are_named(params, message):
    params = dict(params)
    hook = AdmitHook(params.pop("name"), params)
    with pytest.raises((ValueError, TypeError), match=message):
        HashTable([2], name="t")(torch.arange(3), hook)


# -- Score -------------------------------------------------------------------------------------
def first_column(slots):
    return slots["embedding"][:, 0]


class ScoreModel:
    """Rows below ``min_score`` go, then the lowest (score, ID) beyond ``max_rows``."""

    def __init__(self, max_rows=None, min_score=None):
        self.max_rows, self.min_score, self.rows = max_rows, min_score, {}

    def insert(self, ids, values):
        for i, v in zip(ids, values, strict=True):
            self.rows[i] = v

    def filter(self):
        if self.min_score is not None:
            self.rows = {i: v for i, v in self.rows.items() if v >= self.min_score}
        if self.max_rows is not None and len(self.rows) > self.max_rows:
            order = sorted(self.rows, key=lambda i: (self.rows[i], i))
            for i in order[:len(self.rows) - self.max_rows]:
                del self.rows[i]
        return set(self.rows)


def _random_rows(rng, n, support=400):
    ids = [rng.randrange(support) * 104729 - 10**7 for _ in range(n)]
    scores = [float(rng.randrange(-5, 6)) for _ in range(n)]  # many ties
    return ids, scores


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("params", [{"max_rows": 40}, {"min_score": 0.5},
                                    {"max_rows": 30, "min_score": -2}])
def test_score_filter_removes_exactly_the_reference_set(seed, params):
    table = HashTable([3], name="t", filter_hook=FilterHook("Score",
                                                            {"score": first_column, **params}))
    ref = ScoreModel(**params)
    rng = random.Random(seed)
    for _ in range(6):
        ids, scores = _random_rows(rng, rng.randrange(10, 60))
        rows = torch.randn(len(ids), 3)
        rows[:, 0] = torch.tensor(scores)
        table.insert(torch.tensor(ids), rows)
        last = {i: s for i, s in zip(ids, scores, strict=True)}  # last occurrence wins
        ref.insert(list(last), list(last.values()))
        table._filter_hook_impl.do_filter()
        assert _ids(table) == ref.filter()


def test_score_sees_every_slot_and_can_be_registered_by_name(tmp_path):
    from recis.nn.modules.hashtable_hook_impl import regist_score

    seen = []

    @regist_score("test_oldest_first")
    def oldest_first(slots):
        seen.append(sorted(slots))
        return slots["lru_stamp"].view(-1)

    hooks = [FilterHook("LRU", {"max_rows": 1000}),
             FilterHook("Score", {"score": "test_oldest_first", "max_rows": 3})]
    table = HashTable([2], name="t", filter_hook=hooks)
    for i in range(6):
        table(torch.tensor([i]))
    table._filter_hook_impl.do_filter()
    assert _ids(table) == {3, 4, 5} and seen == [["embedding", "lru_stamp"]]
    # the policy has no state: a restored table filters with the function it is built with
    Saver(path=str(tmp_path / "c"), hashtables={"t": table}).save()
    resumed = HashTable([2], name="t", filter_hook=hooks)
    Loader(str(tmp_path / "c"), {"t": resumed}).load()
    resumed(torch.tensor([3]))
    table(torch.tensor([3]))
    for t in (table, resumed):
        t._filter_hook_impl[1].max_rows = 2
        t._filter_hook_impl.do_filter()
    assert _ids(resumed) == _ids(table) == {3, 5}
    with pytest.raises(ValueError, match="already registered"):
        regist_score("test_oldest_first", oldest_first)


def test_hooks_with_score_functions_have_distinct_strs():
    a = FilterHook("Score", {"score": first_column, "max_rows": 3})
    b = FilterHook("Score", {"score": lambda s: -first_column(s), "max_rows": 3})
    assert "first_column" in str(a) and str(a) != str(b) and a != b
    assert a == FilterHook("Score", {"score": first_column, "max_rows": 3})


@pytest.mark.parametrize("params, message", [
    ({"score": first_column}, "Score: give max_rows, min_score or both"),
    ({"score": "no_such_score", "max_rows": 3}, "Score: unknown score function 'no_such_score'"),
    ({"score": 3, "max_rows": 3}, "Score: score must be a callable"),
    ({"score": first_column, "max_rows": 0}, "Score: max_rows"),
    ({"score": first_column, "min_score": float("nan")}, "Score: min_score must be a number"),
])
def test_bad_score_params_are_named(params, message):
    with pytest.raises((ValueError, TypeError), match=message):
        HashTable([2], name="t", filter_hook=FilterHook("Score", params))


def test_a_score_of_the_wrong_shape_is_named():
    table = HashTable([2], name="t", filter_hook=FilterHook(
        "Score", {"score": lambda s: s["embedding"], "max_rows": 1}))
    table(torch.arange(3))
    with pytest.raises(ValueError, match="one per row"):
        table._filter_hook_impl.do_filter()


# -- several filters on one table --------------------------------------------------------------
class ChainModel:
    """GlobalStepFilter stamps, LRU stamps and a score per row; filters applied in order."""

    def __init__(self, order, filter_step, max_rows, min_score):
        self.order, self.filter_step, self.max_rows, self.min_score = (order, filter_step,
                                                                      max_rows, min_score)
        self.step, self.clock, self.rows = 0, 0, {}  # id -> [step stamp, lru stamp, score]

    def lookup(self, ids, scores):
        self.clock += 1
        for i in ids:
            self.rows.setdefault(i, [0, 0, scores[i]])[:2] = [self.step, self.clock]

    def filter(self):
        for name in self.order:
            if name == "GlobalStepFilter":
                self.rows = {i: r for i, r in self.rows.items()
                             if r[0] >= self.step - self.filter_step}
            elif name == "LRU" and len(self.rows) > self.max_rows:
                order = sorted(self.rows, key=lambda i: (self.rows[i][1], i))
                for i in order[:len(self.rows) - self.max_rows]:
                    del self.rows[i]
            elif name == "Score":
                self.rows = {i: r for i, r in self.rows.items() if r[2] >= self.min_score}
        return set(self.rows)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("order", [("GlobalStepFilter", "LRU"), ("LRU", "Score"),
                                   ("Score", "LRU"), ("GlobalStepFilter", "Score", "LRU")])
def test_filters_run_in_list_order_like_the_reference(seed, order):
    from recis.hooks.filter_hook import HashTableFilterHook

    def score_of(i):
        return float((i * 7) % 5)  # a fixed score per ID, stored as its first column

    params = {"GlobalStepFilter": {"filter_step": 6}, "LRU": {"max_rows": 40},
              "Score": {"score": first_column, "min_score": 2.0}}
    table = HashTable([2], name="t", filter_hook=[FilterHook(n, params[n]) for n in order])
    driver = HashTableFilterHook(filter_interval=5, tables=[table])
    ref = ChainModel(order, 6, 40, 2.0)
    for step, batch in enumerate(_sequence(seed, steps=50, support=150)):
        uniq = sorted(set(batch))
        new = [i for i in uniq if i not in ref.rows]
        table(torch.tensor(batch))
        if new:  # give new IDs their score (insert stamps like a lookup, so do it in the same
            rows = torch.zeros(len(new), 2)  # lookup: stamp again below in the reference)
            rows[:, 0] = torch.tensor([score_of(i) for i in new])
            table.insert(torch.tensor(new), rows)
        ref.lookup(uniq, {i: score_of(i) for i in uniq})
        if new:
            ref.clock += 1
            for i in new:
                ref.rows[i][1] = ref.clock
        ref.step += 1
        driver.after_step(global_step=step)
        if step and step % 5 == 0:
            assert _ids(table) == ref.filter(), f"step {step}"


def test_several_filters_save_and_restore_each_state(tmp_path):
    hooks = [FilterHook("GlobalStepFilter", {"filter_step": 8}),
             FilterHook("LFU", {"max_rows": 40, "decay": 0.9})]
    seq = _sequence(3)

    def run(table, batches, start):
        for n, batch in enumerate(batches, start=start):
            table(torch.tensor(batch))
            table._filter_hook_impl.update_step()
            if n % 5 == 4:
                table._filter_hook_impl.do_filter()
            if n == 29 and start == 0:  # after the step's filter run: the resumed run
                Saver(path=str(tmp_path / "c"), hashtables={"t": table}).save()  # starts at 30

    straight = HashTable([2], name="t", filter_hook=hooks)
    run(straight, seq, 0)
    resumed = HashTable([2], name="t", filter_hook=hooks)
    Loader(str(tmp_path / "c"), {"t": resumed}).load()
    assert set(resumed.store.policy_states()) == {
        "filter:GlobalStepFilter:step_filter", "filter:LFU:lfu"}
    run(resumed, seq[30:], 30)
    assert _ids(resumed) == _ids(straight)


def test_filter_hook_lists_in_tables_and_options():
    from recis.nn import EmbeddingOption

    single = HashTable([2], name="t", filter_hook=FilterHook("LRU", {"max_rows": 2}))
    assert single.filter_hook == FilterHook("LRU", {"max_rows": 2})
    assert type(single._filter_hook_impl).__name__ == "LRUFilterHookImpl"  # as before
    hooks = [FilterHook("LRU", {"max_rows": 2}), FilterHook("L2Norm", {"min_norm": 0.5})]
    opt = EmbeddingOption(embedding_dim=2, filter_hook=tuple(hooks))
    assert opt.filter_hook == hooks and "L2Norm" in opt.coalesced_info()
    with pytest.raises(TypeError, match="non-empty list of FilterHooks"):
        EmbeddingOption(embedding_dim=2, filter_hook=[hooks[0], "LRU"])
    with pytest.raises(TypeError, match="non-empty list of FilterHooks"):
        HashTable([2], name="t", filter_hook=[])
    with pytest.raises(ValueError, match="max_rows"):
        EmbeddingOption(embedding_dim=2, filter_hook=[FilterHook("LRU", {"max_rows": 0})])
    with pytest.raises(ValueError, match="already attached"):
        HashTable([2], name="t", filter_hook=[hooks[0], hooks[0]])
    table = HashTable([2], name="t", filter_hook=hooks)
    copy = __import__("copy").deepcopy(table)
    assert [p.table for p in copy._filter_hook_impl] == [copy, copy]  # a copy serves the copy


# -- a hard cap at insert time -----------------------------------------------------------------
class CappedModel:
    """LRU or LFU reference with the cap applied before new IDs get rows: the worst rows not
    used by the same lookup go first."""

    def __init__(self, inner):
        self.inner = inner

    def rows(self):
        return self.inner.stamp if hasattr(self.inner, "stamp") else self.inner.rows

    def lookup(self, ids):
        uniq, rows = set(ids), self.rows()
        excess = len(rows) + len(uniq - set(rows)) - self.inner.max_rows
        if excess > 0:
            if hasattr(self.inner, "stamp"):
                key = lambda i: (rows[i], i)  # noqa: E731
            else:
                key = lambda i: (*self.inner._freq(i), i)  # noqa: E731
            for i in sorted((i for i in rows if i not in uniq), key=key)[:excess]:
                del rows[i]
        self.inner.lookup(ids)

    def step(self):
        self.inner.step()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("policy, params, model", [
    ("LRU", {"max_rows": 30}, lambda: LRUModel(30)),
    ("LFU", {"max_rows": 30, "decay": 0.8}, lambda: LFUModel(30, 0.8)),
])
def test_cap_on_insert_keeps_exactly_the_reference_set(seed, policy, params, model):
    table = HashTable([2], name="t",
                      filter_hook=FilterHook(policy, {**params, "cap_on_insert": True}))
    ref = CappedModel(model())
    for n, batch in enumerate(_sequence(seed)):
        if n % 4 == 3:  # an insert is capped like a lookup
            table.insert(torch.tensor(batch), torch.ones(len(batch), 2))
        else:
            table(torch.tensor(batch))
        ref.lookup(batch)
        table._filter_hook_impl.update_step()
        ref.step()
        assert _ids(table) == set(ref.rows()), f"step {n}"
        assert len(table) <= max(params["max_rows"], len(set(batch)))


def test_cap_on_insert_with_admission_counts_only_admitted_ids():
    table = HashTable([2], name="t",
                      filter_hook=FilterHook("LRU", {"max_rows": 3, "cap_on_insert": True}))
    hook = AdmitHook("MinCount", {"min_count": 2})
    table(torch.tensor([1, 1, 2, 2, 3, 3]), hook)
    table(torch.tensor([4, 5]), hook)  # not admitted: nothing removed
    assert _ids(table) == {1, 2, 3}
    table(torch.tensor([4, 1]), hook)  # 4 admitted: the least recent other than 1 goes
    assert _ids(table) == {1, 3, 4}
