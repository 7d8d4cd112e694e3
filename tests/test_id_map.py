"""ID map: numba kernel, torch twin and a Python dict model must agree on every operation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis._core import backends
from recis._core.id_map import IdMap

EDGE_IDS = [0, -1, -2, 1, 2**63 - 1, -(2**63), 2**52, 2**52 + 5, 5, -(2**52) - 5, 12345678901]
BACKENDS = ["numba", "torch"]


class DictModel:
    """The specification: (id, tag) -> row; new keys take the smallest freed row, then grow."""

    def __init__(self):
        self.rows, self.free, self.next_row = {}, [], 0

    def lookup_or_insert(self, ids, tags):
        out = []
        for key in zip(ids, tags, strict=True):
            if key not in self.rows:
                if self.free:
                    self.free.sort()
                    self.rows[key] = self.free.pop(0)
                else:
                    self.rows[key] = self.next_row
                    self.next_row += 1
            out.append(self.rows[key])
        return out

    def lookup(self, ids, tags):
        return [self.rows.get(k, -1) for k in zip(ids, tags, strict=True)]

    def delete(self, ids, tags):
        out = []
        for key in zip(ids, tags, strict=True):
            row = self.rows.pop(key, -1)
            if row >= 0:
                self.free.append(row)
            out.append(row)
        return out


def _t(values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_ids_are_valid_keys(backend):
    with backends.use_backend(backend):
        m = IdMap("cpu")
        rows = m.lookup_or_insert(_t(EDGE_IDS))
        assert rows.tolist() == list(range(len(EDGE_IDS)))
        assert m.lookup(_t(EDGE_IDS)).tolist() == rows.tolist()
        assert m.lookup(_t([3, 2**52 + 6])).tolist() == [-1, -1]
        assert m.delete(_t([-1, -2, 77])).tolist() == [1, 2, -1]
        assert m.lookup(_t([-1, -2, 0])).tolist() == [-1, -1, 0]
        # freed rows come back smallest first, before the map grows
        assert m.lookup_or_insert(_t([99, 98, 97])).tolist() == [1, 2, len(EDGE_IDS)]
        ids, tags, rows = m.items()
        assert rows.tolist() == sorted(rows.tolist())
        assert len(m) == len(EDGE_IDS) + 1
        assert set(ids.tolist()) == (set(EDGE_IDS) - {-1, -2}) | {97, 98, 99}


@pytest.mark.parametrize("backend", BACKENDS)
def test_tags_separate_equal_ids(backend):
    with backends.use_backend(backend):
        m = IdMap("cpu")
        ids = _t([5, 5, 2**52 + 5, 5])
        tags = _t([0, 1, 0, 2])
        assert m.lookup_or_insert(ids, tags).tolist() == [0, 1, 2, 3]
        assert m.lookup(_t([5, 5]), _t([2, 3])).tolist() == [3, -1]
        m.delete(_t([5]), _t([1]))
        assert m.lookup(ids, tags).tolist() == [0, -1, 2, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_growth_keeps_every_key(backend):
    gen = torch.Generator().manual_seed(0)
    with backends.use_backend(backend):
        m = IdMap("cpu")
        seen = []
        for _ in range(8):
            batch = torch.randint(-(2**62), 2**62, (5000,), generator=gen)
            rows = m.lookup_or_insert(batch)
            seen.append((batch, rows))
        assert len(m) == 40000
        assert m.capacity >= len(m) / IdMap.MAX_LOAD
        for batch, rows in seen:
            assert torch.equal(m.lookup(batch), rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_churn_does_not_grow_without_bound(backend):
    with backends.use_backend(backend):
        m = IdMap("cpu")
        for i in range(60):
            m.lookup_or_insert(torch.arange(i * 500, i * 500 + 500))
            m.delete(torch.arange(i * 500, i * 500 + 500))
        assert len(m) == 0
        assert m.capacity <= 4096  # tombstones are cleared by rebuilds, not by growth
        assert m.row_high_water == 500  # rows were reused


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_with_inverse_first_occurrence_order(backend):
    ids = _t([7, 3, 7, -1, 3, 2**63 - 1, 7])
    with backends.use_backend(backend):
        uniq, tags, inverse = backends.backend_for("cpu").unique_with_inverse(ids, None)
        assert tags is None
        assert uniq.tolist() == [7, 3, -1, 2**63 - 1]
        assert torch.equal(uniq[inverse], ids)
        uniq, tags, inverse = backends.backend_for("cpu").unique_with_inverse(
            _t([7, 7, 3, 7]), _t([0, 1, 0, 1]))
        assert uniq.tolist() == [7, 7, 3] and tags.tolist() == [0, 1, 0]
        assert inverse.tolist() == [0, 1, 2, 1]


def test_empty_inputs():
    for backend in BACKENDS:
        with backends.use_backend(backend):
            m = IdMap("cpu")
            empty = torch.zeros(0, dtype=torch.int64)
            assert m.lookup_or_insert(empty).numel() == 0
            assert m.lookup(empty).numel() == 0
            assert m.delete(empty).numel() == 0
            uniq, _, inverse = backends.backend_for("cpu").unique_with_inverse(empty, None)
            assert uniq.numel() == 0 and inverse.numel() == 0


def test_clear_restarts_rows():
    m = IdMap("cpu")
    m.lookup_or_insert(_t([4, 5, 6]))
    m.clear()
    assert len(m) == 0
    assert m.lookup(_t([4])).tolist() == [-1]
    assert m.lookup_or_insert(_t([6])).tolist() == [0]


_key = st.one_of(st.sampled_from(EDGE_IDS), st.integers(-20, 20),
                 st.integers(-(2**63), 2**63 - 1))
_op = st.tuples(
    st.sampled_from(["insert", "insert", "lookup", "delete", "clear"]),
    st.lists(st.tuples(_key, st.integers(0, 2)), max_size=40),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_op, max_size=25))
def test_backends_agree_with_dict_model(ops):
    maps = {}
    for backend in BACKENDS:
        with backends.use_backend(backend):
            maps[backend] = IdMap("cpu")
    model = DictModel()
    for op, keys in ops:
        ids = _t([k for k, _ in keys])
        tags = _t([t for _, t in keys])
        if op == "clear":
            for backend in BACKENDS:
                maps[backend].clear()
            model = DictModel()
            continue
        if op == "insert":
            expected = model.lookup_or_insert(ids.tolist(), tags.tolist())
        elif op == "lookup":
            expected = model.lookup(ids.tolist(), tags.tolist())
        else:
            expected = model.delete(ids.tolist(), tags.tolist())
        for backend in BACKENDS:
            with backends.use_backend(backend):
                m = maps[backend]
                fn = {"insert": m.lookup_or_insert, "lookup": m.lookup, "delete": m.delete}[op]
                assert fn(ids, tags).tolist() == expected, (backend, op)
                assert len(m) == len(model.rows)
    for backend in BACKENDS:
        ids, tags, rows = maps[backend].items()
        got = {(i, t): r for i, t, r in zip(ids.tolist(), tags.tolist(), rows.tolist(),
                                           strict=True)}
        assert got == model.rows
        # the allocator's view of the live rows (saves list IDs by it) agrees with the keys
        assert torch.equal(maps[backend].live_rows(), rows), backend
        assert torch.equal(maps[backend].ids_by_row(), ids), backend
