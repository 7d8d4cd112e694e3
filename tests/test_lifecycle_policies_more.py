"""Issue #10, second part: BloomFilter admission, MinCount with decaying counts; each against
a small pure-Python reference model on random sequences, and their saved state."""

import math
import random
from collections import Counter

import pytest
import torch

from recis.nn import HashTable
from recis.nn.hashtable_hook import AdmitHook
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

