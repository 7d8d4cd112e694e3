"""Every kernel of the backend interface gives the same results on the numba and the torch
backend, on the same inputs: edge IDs, duplicates, empty inputs, rows of -1, weights, empty
bags, zero total weights, NaN. The torch backend is the reference."""

import math

import pytest
import torch

from recis._core.backends import (
    BlockList,
    backend_for,
    check_offsets,
    get_backend,
    register_backend,
    registered_backends,
    use_backend,
)
from recis._core.backends.torch_backend import TorchBackend

NUMBA, TORCH = get_backend("numba"), get_backend("torch")
EDGE_IDS = torch.tensor([0, -1, -2, 2**63 - 1, -(2**63), 2**52, 2**52 + 1, 7, 7, -1, 0, 2**62])


def blocks_of(values: torch.Tensor, block_size: int) -> BlockList:
    blocks = BlockList(block_size, values.shape[1], values.dtype, "cpu")
    for start in range(0, values.shape[0], block_size):
        blocks.append(values[start:start + block_size].clone())
    return blocks


def as_dense(blocks: BlockList) -> torch.Tensor:
    return torch.cat(blocks.tensors)


@pytest.mark.parametrize("ids", [EDGE_IDS, torch.zeros(0, dtype=torch.int64),
                                 torch.randint(-50, 50, (5000,), generator=torch.Generator()
                                               .manual_seed(0))])
@pytest.mark.parametrize("with_tags", [False, True])
def test_unique_with_inverse(ids, with_tags):
    tags = (ids.abs() % 3) if with_tags else None
    got = [b.unique_with_inverse(ids, tags) for b in (NUMBA, TORCH)]
    for a, b in zip(got[0], got[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    uniq, uniq_tags, inverse = got[0]
    assert torch.equal(uniq[inverse], ids)
    if with_tags:
        assert torch.equal(uniq_tags[inverse], tags)


def test_map_kernels_assign_the_same_rows():
    results = {}
    for backend in (NUMBA, TORCH):
        table = backend.map_new(64, torch.device("cpu"))
        uniq = torch.unique(EDGE_IDS)
        free = torch.tensor([9, 4, 2])  # sorted descending: 2 is handed out first
        rows, inserted, n_free, next_row, reused = backend.map_lookup_or_insert(
            table, uniq, None, free, 3, 100)
        looked = backend.map_lookup(table, torch.cat([uniq, torch.tensor([123])]), None)
        freed = backend.map_delete(table, torch.tensor([7, 7, 555, 0]), None)
        rows2, *state2 = backend.map_lookup_or_insert(table, torch.tensor([7, 8]), None,
                                                      torch.zeros(0, dtype=torch.int64), 0,
                                                      next_row)
        rebuilt = backend.map_build(table[:, 0], table[:, 1], 128)
        after = backend.map_lookup(rebuilt, torch.cat([uniq, torch.tensor([8])]), None)
        tagged = backend.map_lookup_or_insert(table, torch.tensor([7, 7]),
                                              torch.tensor([1, 2]),
                                              torch.zeros(0, dtype=torch.int64), 0, 500)[0]
        items = backend.map_items(table, 502)  # with holes: freed rows, rows never handed out
        results[backend.name] = (rows, inserted, n_free, next_row, reused, looked, freed, rows2,
                                 state2, after, tagged, items)
    def same(a, b):
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    for a, b in zip(results["numba"], results["torch"], strict=True):
        assert same(a, b)
    rows, inserted, n_free, *_ = results["torch"]
    assert rows[:3].tolist() == [2, 4, 9] and bool(inserted.all())
    ids, tags, item_rows = results["torch"][-1]
    assert bool((item_rows[1:] > item_rows[:-1]).all()) and item_rows[-2:].tolist() == [500, 501]
    assert tags[-2:].tolist() == [1, 2] and ids[-2:].tolist() == [7, 7]
    assert results["torch"][6].tolist()[1:] == [-1, -1, results["torch"][6][3].item()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_gather_and_scatter(dtype):
    gen = torch.Generator().manual_seed(1)
    values = (torch.randn(48, 3, generator=gen) * 100).to(dtype)
    if dtype.is_floating_point:
        values[5, 1] = math.nan
    rows = torch.tensor([5, -1, 0, 47, 17, 5])
    outs, stores = [], []
    for backend in (NUMBA, TORCH):
        blocks = blocks_of(values, 16)
        out = torch.empty(rows.numel(), 3, dtype=dtype)
        outs.append(backend.gather(blocks, rows, out).clone())
        backend.scatter(blocks, torch.tensor([1, -1, 47]), torch.arange(9).view(3, 3).to(dtype))
        backend.scatter(blocks, torch.tensor([2, 3]), torch.full((1, 3), 7).to(dtype))
        stores.append(as_dense(blocks))
        empty = backend.gather(blocks, torch.zeros(0, dtype=torch.int64),
                               torch.empty(0, 3, dtype=dtype))
        assert empty.shape == (0, 3)
    assert torch.equal(outs[0], outs[1]) or torch.allclose(outs[0], outs[1], equal_nan=True)
    assert torch.equal(outs[0][1], torch.zeros(3, dtype=dtype))
    torch.testing.assert_close(stores[0], stores[1], equal_nan=True, rtol=0, atol=0)
    assert stores[1][2].tolist() == [7, 7, 7]


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_map_build_in_parts(monkeypatch, parts):
    """A build split over slot ranges (threads) equals the reference: entries whose probe
    leaves their range (a full map at 3/4 load has many) are inserted after the parts,
    wrapping around the end; tags and rows are kept; entries with a negative value are left
    out; the same inputs give the same layout."""
    from recis._core.backends import numba_backend
    from recis._core.backends.base import TAG_SHIFT

    monkeypatch.setattr(numba_backend, "_BUILD_PARALLEL_MIN", 0)
    monkeypatch.setattr(numba_backend, "PARALLEL_MIN", 0)  # map_items in parts too
    monkeypatch.setattr(numba_backend, "_threads", lambda: parts)
    gen = torch.Generator().manual_seed(3)
    ids = torch.unique(torch.randint(-(2**62), 2**62, (200,), generator=gen))[:192]
    ids = torch.cat([ids, EDGE_IDS.unique()])
    tags = torch.randint(0, 3, (ids.numel(),), generator=gen)
    packed = torch.arange(ids.numel()) | (tags << TAG_SHIFT)
    packed[::17] = -1  # not live: left out
    built = NUMBA.map_build(ids, packed, 256)
    reference = TORCH.map_build(ids, packed, 256)
    for table in (built, reference):
        rows = NUMBA.map_lookup(table, ids, tags)
        expected = torch.where(packed >= 0, torch.arange(ids.numel()), -1)
        assert torch.equal(rows, expected)
    items = NUMBA.map_items(built, ids.numel())  # placed by row in parts, with holes
    for got, want in zip(items, TORCH.map_items(reference, ids.numel()), strict=True):
        assert torch.equal(got, want)
    for backend, table in ((NUMBA, built), (TORCH, reference)):  # IDs only, placed by row
        placed = backend.map_ids_by_row(table, ids.numel())
        assert torch.equal(placed[items[2]], items[0]), backend.name
    assert torch.equal(built, NUMBA.map_build(ids, packed, 256))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_scatter_of_row_runs(dtype):
    """Runs of consecutive rows (a checkpoint's storage order) are copied as spans: runs that
    cross a block boundary, runs broken by -1, a row written twice (the later write wins),
    descending and ascending rows mixed."""
    rows = torch.cat([torch.arange(3, 40), torch.tensor([-1, 40, 41, 5, 6, 6, 63, 62, 61]),
                      torch.arange(44, 60), torch.tensor([-1])])
    gen = torch.Generator().manual_seed(2)
    values = (torch.randn(rows.numel(), 3, generator=gen) * 100).to(dtype)
    stores = []
    for backend in (NUMBA, TORCH):
        blocks = blocks_of(torch.zeros(64, 3, dtype=dtype), 16)
        backend.scatter(blocks, rows, values)
        stores.append(as_dense(blocks))
    assert torch.equal(stores[0], stores[1])
    expected = torch.zeros(64, 3, dtype=dtype)
    for i, r in enumerate(rows.tolist()):  # plain loop: in order, later writes win
        if r >= 0:
            expected[r] = values[i]
    assert torch.equal(stores[0], expected)


@pytest.mark.parametrize("rows", [
    torch.cat([torch.arange(0, 30), torch.arange(33, 64)]),  # ascending: split over threads
    torch.tensor([3, 4, 5, 4, 9, 10, 11, 12, 3]),  # repeats: one thread, later writes win
])
def test_scatter_in_threads(monkeypatch, rows):
    from recis._core.backends import numba_backend

    monkeypatch.setattr(numba_backend, "PARALLEL_MIN", 0)
    monkeypatch.setattr(numba_backend, "_threads", lambda: 3)
    values = torch.randn(rows.numel(), 5, generator=torch.Generator().manual_seed(4))
    stores = []
    for backend in (NUMBA, TORCH):
        blocks = blocks_of(torch.zeros(64, 5), 16)
        backend.scatter(blocks, rows, values)
        stores.append(as_dense(blocks))
    assert torch.equal(stores[0], stores[1])


def _bags(gen, num_bags, max_len, num_unique):
    lengths = torch.randint(0, max_len + 1, (num_bags,), generator=gen)
    lengths[:1] = 0  # an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    inverse = torch.randint(0, num_unique, (int(offsets[-1]),), generator=gen)
    return offsets, inverse


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_bags", [0, 1, 300])
def test_bag_reduce_and_its_backward(mean, weighted, num_bags):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(64, 5, dtype=torch.float64, generator=gen)
    values[3, 2] = math.nan
    rows = torch.randint(0, 64, (30,), generator=gen)
    rows[4] = -1  # not admitted: reads as zeros
    offsets, inverse = _bags(gen, num_bags, 12, 30)
    weights = None
    if weighted:
        weights = torch.rand(inverse.numel(), dtype=torch.float64, generator=gen)
        if num_bags > 2:
            weights[offsets[2]:offsets[3]] = 0.0  # zero total weight -> 0 for mean
    grad_out = torch.randn(num_bags, 5, dtype=torch.float64, generator=gen)
    outs, grads = [], []
    for backend in (NUMBA, TORCH):
        out = torch.empty(num_bags, 5, dtype=torch.float64)
        outs.append(backend.bag_reduce(blocks_of(values, 16), rows, inverse, offsets, weights,
                                       mean, out))
        grads.append(backend.bag_reduce_backward(inverse, offsets, weights, mean, grad_out, 30))
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True)
    torch.testing.assert_close(grads[0], grads[1])
    # the reference against plain torch: gather the rows, then an explicit loop
    unique = values[rows.clamp(min=0)] * (rows >= 0)[:, None]
    for b in range(num_bags):
        sel = slice(int(offsets[b]), int(offsets[b + 1]))
        w = weights[sel] if weighted else torch.ones(sel.stop - sel.start, dtype=torch.float64)
        expect = (w[:, None] * unique[inverse[sel]]).sum(0)
        if mean:
            expect = expect / w.sum() if w.sum() != 0 else torch.zeros(5, dtype=torch.float64)
        torch.testing.assert_close(outs[1][b], expect, equal_nan=True)


def _optimizer_state(gen, n=64, width=6):
    return [torch.randn(n, width, dtype=torch.float64, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("kernel", ["adam", "adagrad", "sgd", "sgd_momentum"])
def test_optimizer_updates(kernel):
    gen = torch.Generator().manual_seed(3)
    emb, m, v = _optimizer_state(gen)
    v = v.abs()
    rows = torch.randperm(64, generator=gen)[:20]
    grad = torch.randn(20, 6, dtype=torch.float64, generator=gen)
    results = []
    for backend in (NUMBA, TORCH):
        e_b, m_b, v_b = (blocks_of(x, 16) for x in (emb, m, v))
        if kernel == "adam":
            backend.adam_update(e_b, m_b, v_b, rows, grad, decay=0.99, beta1=0.9, beta2=0.999,
                                alpha=0.01, eps=1e-8, l2=0.1)
        elif kernel == "adagrad":
            backend.adagrad_update(e_b, v_b, rows, grad, clr=0.1, eps=1e-10, l2=0.01)
        else:
            momentum = 0.9 if kernel == "sgd_momentum" else 0.0
            backend.sgd_update(e_b, m_b if momentum else None, rows, grad, lr=0.1,
                               momentum=momentum, l2=0.01, nesterov=momentum > 0)
        results.append([as_dense(x) for x in (e_b, m_b, v_b)])
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(results[1][0][untouched], emb[untouched])  # lazy: other rows stay
    assert not torch.equal(results[1][0][rows], emb[rows])


@pytest.mark.parametrize("offsets, match", [
    ([0, 2, 9], "end at the number of IDs"), ([0, 3, 1, 4], "non-decreasing"),
    ([1, 4], "start at 0"), ([], "non-empty"),
])
def test_offsets_are_checked_before_any_kernel(offsets, match):
    with pytest.raises(ValueError, match=match):
        check_offsets(torch.tensor(offsets, dtype=torch.int64), 4)


def test_backend_choice_and_registry(monkeypatch):
    monkeypatch.delenv("RECIS_KERNELS", raising=False)  # the default choice, whatever the env
    assert backend_for("cpu") is NUMBA
    with use_backend("torch"):
        assert backend_for("cpu") is TORCH
    assert backend_for("cpu") is NUMBA
    with pytest.raises(ValueError, match="Unknown kernel backend 'nope'; registered"):
        get_backend("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("torch", TorchBackend)
    assert {"numba", "torch"} <= set(registered_backends())


@pytest.mark.parametrize("with_tags", [False, True])
def test_map_resolve_and_insert_missing(with_tags):
    gen = torch.Generator().manual_seed(5)
    keys = torch.randint(-(2**62), 2**62, (30_000,), generator=gen)
    batch = keys[torch.randint(0, 30_000, (50_000,), generator=gen)]  # > PARALLEL_MIN
    batch[:3] = torch.tensor([0, -1, 2**63 - 1])
    tags = (batch.abs() % 3) if with_tags else None
    got = {}
    for backend in (NUMBA, TORCH):
        table = backend.map_new(1 << 16, torch.device("cpu"))
        pre = torch.unique(keys[:5000])
        backend.map_lookup_or_insert(table, pre, None if not with_tags else pre.abs() % 3,
                                     torch.zeros(0, dtype=torch.int64), 0, 0)
        uniq, uniq_tags, inverse, rows = backend.map_resolve(table, batch, tags)
        known = rows.clone()
        inserted, *_ = backend.map_insert_missing(table, uniq, uniq_tags, rows,
                                                  torch.zeros(0, dtype=torch.int64), 0, 5000)
        got[backend.name] = (uniq, uniq_tags, inverse, known, rows, inserted)
    for a, b in zip(got["numba"], got["torch"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    uniq, uniq_tags, inverse, known, rows, inserted = got["numba"]
    assert torch.equal(uniq[inverse], batch)  # first-occurrence order, inverse exact
    assert torch.equal(inserted, known < 0) and bool((rows >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64, torch.int32])
def test_split_at_kth(dtype):
    gen = torch.Generator().manual_seed(6)
    ties = torch.randint(-5, 5, (1000,), generator=gen)
    ties[:2] = torch.tensor([-(2**30), 2**30])
    mostly_zero = torch.zeros(1000, dtype=torch.int64)
    mostly_zero[::50] = torch.randint(-3, 4, (20,), generator=gen)
    subset = torch.randperm(1000, generator=gen)[:600].sort().values
    for values in (ties, mostly_zero, torch.arange(1000), torch.randperm(1000, generator=gen),
                   torch.zeros(1000, dtype=torch.int64), torch.tensor([42])):
        values = values.to(dtype)
        for index in (None, subset[subset < values.numel()]):
            picked = values if index is None else values[index]
            positions = torch.arange(values.numel()) if index is None else index
            for k in sorted({1, 2, 137, 500, 599, 1000} & set(range(1, picked.numel() + 1))):
                kth = picked.sort().values[k - 1]
                expected = (positions[picked < kth], positions[picked == kth])
                for backend in (NUMBA, TORCH):
                    got = backend.split_at_kth(values, index, k)
                    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_map_items_lists_live_keys_by_row():
    gen = torch.Generator().manual_seed(7)
    ids = torch.unique(torch.randint(-(2**62), 2**62, (3000,), generator=gen))
    ids = ids[torch.randperm(ids.numel(), generator=gen)]
    tags = ids.abs() % 5
    tables = {}
    for backend in (NUMBA, TORCH):
        table = backend.map_new(8192, torch.device("cpu"))
        backend.map_lookup_or_insert(table, ids, tags, torch.zeros(0, dtype=torch.int64), 0, 0)
        backend.map_delete(table, ids[::3], tags[::3])  # tombstones and holes in the rows
        tables[backend.name] = table
    live = torch.ones(ids.numel(), dtype=torch.bool)
    live[::3] = False
    rows = torch.arange(ids.numel())[live]  # rows were handed out in input order
    expected = (ids[live], tags[live], rows)
    for table in tables.values():  # each backend reads either layout
        for backend in (NUMBA, TORCH):
            got = backend.map_items(table, ids.numel() + 10)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    empty = NUMBA.map_new(64, torch.device("cpu"))
    assert all(t.numel() == 0 for b in (NUMBA, TORCH) for t in b.map_items(empty, 0))


@pytest.mark.parametrize("decay", [1.0, 0.9, 0.5])
def test_decayed_count_touch(decay):
    gen = torch.Generator().manual_seed(8)
    count = torch.rand(20_480, 1, generator=gen, dtype=torch.float64) * 50
    last = torch.randint(0, 40, (20_480, 1), generator=gen)
    rows = torch.randperm(20_480, generator=gen)[:12_000]  # > PARALLEL_MIN: split on threads
    clock = torch.tensor([40])
    got = {}
    for backend in (NUMBA, TORCH):
        blocks = blocks_of(count, 1024), blocks_of(last, 1024)
        backend.decayed_count_touch(*blocks, rows, clock, decay)
        got[backend.name] = [as_dense(b) for b in blocks]
    expected_count = count.clone()
    expected_count[rows] = count[rows] * decay ** (40 - last[rows]).double() + 1
    expected_last = last.clone()
    expected_last[rows] = 40
    for new_count, new_last in got.values():
        torch.testing.assert_close(new_count, expected_count, rtol=1e-15, atol=0)
        assert torch.equal(new_last, expected_last)
    if decay == 1.0:
        assert torch.equal(got["numba"][0], got["torch"][0])
