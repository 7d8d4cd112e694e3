"""DynamicEmbedding and EmbeddingEngine against torch.nn.EmbeddingBag on the same rows.

Tolerance: forward outputs and gradients within rtol 1e-5 / atol 1e-6 (float32; the only
difference is summation order).
"""

import pytest
import torch
from torch import nn

from recis._core import backends
from recis._core.backends import numba_backend
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook
from recis.nn.initializers import NormalInitializer
from recis.ragged.tensor import RaggedTensor

DIM = 6
TOL = {"rtol": 1e-5, "atol": 1e-6}


def normal(seed=0):
    return NormalInitializer(generator=torch.Generator().manual_seed(seed))


def random_bags(seed, batch=32, max_len=7, id_range=40, empty=True):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0 if empty else 1, max_len + 1, (batch,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = (torch.randint(-id_range, id_range, (int(offsets[-1]),), generator=gen)
              * 1_000_003 + 2**55)
    weights = torch.rand(values.numel(), generator=gen) + 0.1
    return values, offsets, weights


def dense_reference(table, child, values):
    """A plain nn.EmbeddingBag holding copies of the table rows of ``values``."""
    ids, rows = table.ids_map(child)
    weight = table.slot_values("embedding", rows).clone()
    index = {i: k for k, i in enumerate(ids.tolist())}
    local = torch.tensor([index[i] for i in values.tolist()], dtype=torch.int64)
    return weight, rows, local


def check_grads(table, rows, ref_weight_grad):
    got_rows, got = table.grad_rows()
    by_row = dict(zip(got_rows.tolist(), got, strict=True))
    for k, row in enumerate(rows.tolist()):
        expected = ref_weight_grad[k]
        torch.testing.assert_close(by_row.get(row, torch.zeros_like(expected)), expected, **TOL)


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_dynamic_embedding_matches_embedding_bag(backend, combiner, weighted):
    values, offsets, weights = random_bags(1)
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="t", combiner=combiner,
                                           initializer=normal()))
    ragged = RaggedTensor(values, offsets, weight=weights if weighted else None)
    out = emb(ragged)
    assert out.shape == (32, DIM)
    weight, rows, local = dense_reference(emb.hashtable, None, values)
    if weighted and combiner == "mean":
        # EmbeddingBag has no weighted mean: its oracle is a weighted sum divided by the bag's
        # total weight (0 for empty bags).
        bag = nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum",
                                              include_last_offset=True)
        totals = torch.zeros(32).index_add_(0, torch.repeat_interleave(
            torch.arange(32), offsets.diff()), weights)
        ref = bag(local, offsets, per_sample_weights=weights)
        ref = torch.where(totals[:, None] > 0, ref / totals.clamp(min=1e-30)[:, None], 0.0)
    else:
        bag = nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode=combiner,
                                              include_last_offset=True)
        ref = bag(local, offsets, per_sample_weights=weights if weighted else None)
    torch.testing.assert_close(out, ref, **TOL)
    upstream = torch.randn(32, DIM, generator=torch.Generator().manual_seed(9))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    check_grads(emb.hashtable, rows, bag.weight.grad)


def test_tile_matches_padded_lookup(backend):
    values, offsets, _ = random_bags(2)
    opt = EmbeddingOption(embedding_dim=DIM, shared_name="t", combiner="tile",
                          combiner_kwargs={"tile_len": 3}, initializer=normal())
    emb = DynamicEmbedding(opt)
    out = emb(RaggedTensor(values, offsets))
    assert out.shape == (32, 3, DIM)
    weight, rows, local = dense_reference(emb.hashtable, None, values)
    weight.requires_grad_(True)
    ref = torch.zeros(32, 3, DIM)
    for b in range(32):
        seq = local[offsets[b]:offsets[b + 1]][:3]
        ref[b, : len(seq)] = weight[seq]
    torch.testing.assert_close(out, ref, **TOL)
    upstream = torch.randn(32, 3, DIM, generator=torch.Generator().manual_seed(4))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    check_grads(emb.hashtable, rows, weight.grad)
    dense = emb(values[:64].view(16, 4))
    assert dense.shape == (16, 3 * DIM)
    as_ragged = emb(RaggedTensor(values[:64], torch.arange(0, 65, 4)))
    torch.testing.assert_close(dense.view(16, 3, DIM), as_ragged, **TOL)


def test_dense_inputs_one_and_two_dims():
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="d",
                                           initializer=normal()))
    one = emb(torch.LongTensor([1, 2, 3, 4]))
    assert one.shape == (4, DIM)
    two = emb(torch.LongTensor([[1, 2], [3, 4]]))
    torch.testing.assert_close(two, one.view(2, 2, DIM).sum(1), **TOL)
    weighted = emb(torch.LongTensor([[1, 2]]), input_weights=torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(weighted[0], 2 * one[0] + 0.5 * one[1], **TOL)


def test_ragged_weights_are_honoured_and_use_weight_false_drops_them():
    values, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])
    w = torch.tensor([2.0, 3.0, 4.0])
    e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="w", initializer=normal()))
    single = e(torch.tensor([1, 2, 3]))
    out = e(RaggedTensor(values, offsets, weight=w))
    torch.testing.assert_close(out[0], 2 * single[0] + 3 * single[1], **TOL)
    torch.testing.assert_close(out[1], 4 * single[2], **TOL)
    engine = EmbeddingEngine({"f": EmbeddingOption(embedding_dim=DIM, shared_name="w2",
                                                   use_weight=False)})
    got = engine({"f": RaggedTensor(values, offsets, weight=w)})["f"]
    torch.testing.assert_close(got, torch.zeros(2, DIM))


def test_mean_of_empty_bag_and_zero_weights_is_zero():
    e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="m", combiner="mean",
                                         initializer=normal()))
    out = e(RaggedTensor(torch.tensor([1, 2]), torch.tensor([0, 0, 2]),
                         weight=torch.tensor([0.0, 0.0])))
    assert torch.equal(out, torch.zeros(2, DIM))


def test_trainable_false_detaches_but_admits():
    e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="nt", trainable=False))
    out = e(torch.LongTensor([[5, 6]]))
    assert not out.requires_grad and len(e.hashtable) == 2


def test_read_only_dynamic_embedding():
    e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="ro",
                                         admit_hook=AdmitHook("ReadOnly")))
    assert torch.equal(e(torch.LongTensor([1, 2, 3, 4])), torch.zeros(4, DIM))
    assert len(e.hashtable) == 0


@pytest.mark.parametrize(
    "ids, kwargs, err, match",
    [
        (torch.zeros(2, 2, 2, dtype=torch.int64), {}, ValueError, "1-D .* or 2-D"),
        (torch.tensor([[1.0]]), {}, TypeError, "integer tensor"),
        (torch.tensor([[1, 2]]), {"input_weights": torch.ones(3)}, ValueError,
         "one value per ID"),
        ([1, 2], {}, TypeError, "Tensor or RaggedTensor"),
        (torch.tensor([[1, 2]]).to_sparse(), {}, TypeError, "sparse"),
    ],
)
def test_bad_inputs(ids, kwargs, err, match):
    e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="bad"))
    with pytest.raises(err, match=match):
        e(ids, **kwargs)


@pytest.mark.parametrize("offsets", [[0, 2, 1, 3], [1, 2, 3], [0, 1, 2]])
def test_bad_offsets(offsets):
    with pytest.raises(ValueError, match="offsets"):
        RaggedTensor(torch.tensor([1, 2, 3]), torch.tensor(offsets))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"combiner": "max"}, "combiner must be one of"),
        ({"combiner": "tile"}, "tile_len"),
        ({"combiner": "tile", "combiner_kwargs": {"tile_len": 0}}, "tile_len"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"grad_reduce_by": "mean"}, "grad_reduce_by"),
        ({"fp16_enabled": True}, "fp16_enabled"),
        ({"device": "meta"}, "device"),
    ],
)
def test_option_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EmbeddingOption(**kwargs)


# -- EmbeddingEngine ---------------------------------------------------------------------------
def test_engine_groups_identical_tables_and_keeps_ids_apart(backend):
    same = dict(embedding_dim=DIM, initializer=normal(5))
    engine = EmbeddingEngine({
        "a": EmbeddingOption(shared_name="A", **same),
        "b": EmbeddingOption(shared_name="B", combiner="mean", **same),
        "a2": EmbeddingOption(shared_name="A", **same),  # shares rows with "a"
        "c": EmbeddingOption(embedding_dim=DIM + 1, shared_name="C"),
    })
    assert len(engine._ht) == 2
    table = engine.hashtable("a")
    assert table is engine.hashtable("b") is engine.hashtable("a2")
    assert table.children_hashtable == ["A", "B"]
    big = [5, 2**52 + 5, -5, 2**63 - 1]  # RecIS would fold 5 and 2**52+5 together
    out = engine({"a": torch.tensor([big]), "b": torch.tensor([big]), "a2": torch.tensor([[5]]),
                  "c": torch.tensor([[1]]), "label": "passthrough"})
    assert out["label"] == "passthrough"
    assert list(out) == ["a", "b", "a2", "c", "label"]
    assert sorted(table.ids("A").tolist()) == sorted(big)
    assert sorted(table.ids("B").tolist()) == sorted(big)
    assert len(table) == 8
    rows_a = dict(zip(*[t.tolist() for t in table.ids_map("A")], strict=True))
    rows_b = dict(zip(*[t.tolist() for t in table.ids_map("B")], strict=True))
    assert set(rows_a.values()).isdisjoint(rows_b.values())
    emb_a = table.slot_values("embedding", torch.tensor([rows_a[i] for i in big]))
    torch.testing.assert_close(out["a"][0], emb_a.sum(0), **TOL)
    torch.testing.assert_close(out["a2"][0], emb_a[0], **TOL)
    emb_b = table.slot_values("embedding", torch.tensor([rows_b[i] for i in big]))
    torch.testing.assert_close(out["b"][0], emb_b.mean(0), **TOL)


def test_engine_gradients_match_embedding_bag(backend):
    same = dict(embedding_dim=DIM, initializer=normal(2))
    engine = EmbeddingEngine({
        "x": EmbeddingOption(shared_name="X", **same),
        "y": EmbeddingOption(shared_name="X", combiner="mean", **same),
        "z": EmbeddingOption(shared_name="Z", **same),
    })
    feats = {}
    for k, name in enumerate(["x", "y", "z"]):
        values, offsets, _ = random_bags(10 + k, batch=16, id_range=10)
        feats[name] = RaggedTensor(values, offsets)
    out = engine(feats)
    table = engine.hashtable("x")
    upstream = {k: torch.randn(16, DIM, generator=torch.Generator().manual_seed(i))
                for i, k in enumerate(out)}
    sum(((out[k] * upstream[k]).sum() for k in out), torch.zeros(())).backward()
    expected = {}
    for name, child, mode in [("x", "X", "sum"), ("y", "X", "mean"), ("z", "Z", "sum")]:
        values, offsets = feats[name].values(), feats[name].offsets()[-1]
        weight, rows, local = dense_reference(table, child, values)
        bag = nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode,
                                              include_last_offset=True)
        ref = bag(local, offsets)
        torch.testing.assert_close(out[name], ref, **TOL)
        (ref * upstream[name]).sum().backward()
        for k, row in enumerate(rows.tolist()):
            expected[row] = expected.get(row, 0) + bag.weight.grad[k]
    got_rows, got = table.grad_rows()
    assert sorted(expected) == got_rows.tolist()
    for row, g in zip(got_rows.tolist(), got, strict=True):
        torch.testing.assert_close(g, expected[row], **TOL)


def test_engine_rejects_conflicting_shared_name():
    with pytest.raises(ValueError, match="shared_name 'S'"):
        EmbeddingEngine({"a": EmbeddingOption(embedding_dim=4, shared_name="S"),
                         "b": EmbeddingOption(embedding_dim=8, shared_name="S")})
    with pytest.raises(TypeError, match=r"emb_options\['a'\]"):
        EmbeddingEngine({"a": {"embedding_dim": 4}})


def test_engine_names_the_feature_in_input_errors():
    engine = EmbeddingEngine({"f": EmbeddingOption(embedding_dim=4, shared_name="S")})
    with pytest.raises(TypeError, match="feature 'f'.*integer tensor"):
        engine({"f": torch.tensor([[1.5]])})


def test_engine_one_lookup_per_table_and_admit_hook(monkeypatch):
    same = dict(embedding_dim=DIM)
    engine = EmbeddingEngine({
        "u": EmbeddingOption(shared_name="U", **same),
        "v": EmbeddingOption(shared_name="V", combiner="mean", **same),
        "w": EmbeddingOption(shared_name="W", admit_hook=AdmitHook("ReadOnly"), **same),
    })
    table = engine.hashtable("u")
    calls = []
    original = type(table).resolve

    def counting(self, *args, **kwargs):
        calls.append(args[0].numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(table), "resolve", counting)
    engine({"u": torch.tensor([[1, 2]]), "v": torch.tensor([[1]]), "w": torch.tensor([[3]])})
    assert calls == [3, 1]  # u and v together, w (read-only) apart
    assert sorted(table.ids().tolist()) == [1, 1, 2]


def _grad_fn_names(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is not None and fn not in seen:
        seen.add(fn)
        yield type(fn).__name__
        for nxt, _ in fn.next_functions:
            yield from _grad_fn_names(nxt, seen)


@pytest.mark.parametrize("backend_name", ["numba", "torch"])
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_sum_and_mean_take_the_backends_fused_kernel(combiner, backend_name, monkeypatch):
    # The parity tests above compare every path with EmbeddingBag; this one makes sure each
    # backend really runs its fused kernel and backward rather than silently falling back.
    with backends.use_backend(backend_name):
        e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="f",
                                             combiner=combiner))
    backend = e.hashtable.store.backend
    assert backend.name == backend_name
    calls = []
    for kernel in ("bag_reduce", "bag_reduce_backward"):
        original = getattr(backend, kernel)
        monkeypatch.setattr(backend, kernel, lambda *a, _k=kernel, _f=original, **kw: (
            calls.append(_k), _f(*a, **kw))[1])
    out = e(torch.tensor([[1, 2], [3, 3]]))
    assert "_FusedBagLookupBackward" in set(_grad_fn_names(out.grad_fn))
    out.sum().backward()
    assert calls == ["bag_reduce", "bag_reduce_backward"]


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_large_batches_split_across_threads_match_the_torch_twin(combiner):
    # Above numba_backend.PARALLEL_MIN IDs the numba kernels run in several threads; the results
    # must equal the single-threaded torch reference (forward, per-row gradients, rows).
    assert 20 * 1024 >= numba_backend.PARALLEL_MIN
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(-5000, 5000, (1024, 20), generator=gen) * 7919
    weights = torch.rand(1024, 20, generator=gen)
    upstream = torch.randn(1024, DIM, generator=gen)
    results = {}
    for backend in ["numba", "torch"]:
        with backends.use_backend(backend):
            e = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="big",
                                                 combiner=combiner, initializer=normal(3)))
            out = e(ids, input_weights=weights)
            (out * upstream).sum().backward()
            rows, grads = e.hashtable.grad_rows()
            order = torch.argsort(rows)
            results[backend] = (out.detach(), rows[order], grads[order], e.hashtable.ids_map())
    (o1, r1, g1, m1), (o2, r2, g2, m2) = results["numba"], results["torch"]
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert torch.equal(m1[0], m2[0]) and torch.equal(m1[1], m2[1])
