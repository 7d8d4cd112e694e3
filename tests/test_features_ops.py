"""Feature ops, Feature and FeatureEngine against plain-Python references of RecIS's semantics
(section 9.2 of the behaviour reference), on dense and ragged inputs, fused and not."""

import pickle
import random
import struct

import pytest
import torch
from test_features_hash import murmur_reference, signed

from recis.features import (
    Bucketize,
    Feature,
    FeatureCross,
    FeatureEngine,
    Hash,
    IDMultiHash,
    Int64ToString,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
)
from recis.features.op import uint64_mod
from recis.ragged import RaggedTensor


def ragged(rows, dtype=torch.int64, weights=None):
    """A 2-D RaggedTensor from a list of lists (and optional per-row weight lists)."""
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    values = torch.tensor([v for row in rows for v in row], dtype=dtype)
    weight = None
    if weights is not None:
        weight = torch.tensor([w for row in weights for w in row], dtype=torch.float32)
    return RaggedTensor(values, torch.tensor(offsets), weight)


def rows_of(rt):
    offs = rt.offsets()[-1].tolist()
    values = rt.values().tolist()
    return [values[a:b] for a, b in zip(offs, offs[1:], strict=False)]


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# ----------------------------------------------------------------------- references

def mod_reference(x: int, m: int) -> int:
    return (x % 2**64) % m


def bucketize_reference(x: float, bounds: list[float]) -> int:
    if x != x:  # NaN
        return len(bounds)
    return sum(1 for b in bounds if f32(b) <= f32(x))


def multi_hash_reference(x: int, buckets: list[int]) -> list[int]:
    def prime_at_most(n):
        while any(n % d == 0 for d in range(2, int(n ** 0.5) + 1)) or n < 2:
            n -= 1
        return n

    out = []
    for mul, factor, b in zip([1, 3, 5, 7], [29, 47, 67, 83], buckets, strict=False):
        p = prime_at_most(factor * b)
        prod = (x * mul + 2**63) % 2**64 - 2**63  # int64 wrap
        r = abs(prod) % p * (1 if prod >= 0 else -1)  # C remainder
        out.append((r + p) % p % b)
    return out


def cross_reference(x_rows, x_w, y_rows, y_w):
    values, weights = [], []
    for xr, xw, yr, yw in zip(x_rows, x_w, y_rows, y_w, strict=False):
        first_x, first_y = {}, {}
        for v, w in zip(xr, xw, strict=True):
            first_x.setdefault(v, w)
        for v, w in zip(yr, yw, strict=True):
            first_y.setdefault(v, w)
        row, row_w = [], []
        for a in sorted(first_x):
            for b in sorted(first_y):
                key = a.to_bytes(8, "little", signed=True) + b.to_bytes(8, "little", signed=True)
                row.append(signed(murmur_reference(key)))
                row_w.append(first_x[a] * first_y[b])
        values.append(row)
        weights.append(row_w)
    return values, weights


def truncate_reference(rows, seq_len, side):
    return [row[-seq_len:] if side == "left" and len(row) > seq_len else row[:seq_len]
            for row in rows]


# ----------------------------------------------------------------------- Mod

EDGE_IDS = [0, 1, 17, -1, -2, -17, 2**63 - 1, -2**63, 10**18, -10**18, 123456789]


@pytest.mark.parametrize("m", [1, 2, 7, 10, 1000003, 2**31 - 1, 2**62 + 3, 2**63 - 1])
def test_mod_reads_ids_as_uint64(m):
    out = Mod(m)(torch.tensor(EDGE_IDS)).tolist()
    assert out == [mod_reference(x, m) for x in EDGE_IDS]


@pytest.mark.parametrize("m", [1, 7, 1000003, 2**62 + 3, 2**63 - 1])
def test_uint64_mod_int64_formula_for_other_devices(m):
    """The formula Mod uses off the CPU (checked here on CPU tensors)."""
    out = uint64_mod(torch.tensor(EDGE_IDS), m).tolist()
    assert out == [mod_reference(x, m) for x in EDGE_IDS]


def test_mod_keeps_the_ragged_layout_and_fuses():
    x = ragged([[5, -5], [], [12]], weights=[[0.5, 1.0], [], [2.0]])
    out = Mod(4)(x)
    assert rows_of(out) == [[1, 3], [], [0]]
    assert out.weight() is x.weight() and out.offsets()[0] is x.offsets()[0]
    dense = torch.tensor([[7, -7], [9, 10]])
    fused = Mod.run_fused([Mod(4), Mod(5)], [x, dense])
    assert rows_of(fused[0]) == [[1, 3], [], [0]]
    assert fused[1].tolist() == [[mod_reference(v, 5) for v in r] for r in dense.tolist()]


def test_mod_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mod_value must be a positive int"):
        Mod(0)
    with pytest.raises(ValueError, match="mod_value must be < 2\\*\\*63"):
        Mod(2**63)
    with pytest.raises(TypeError, match="Mod: input values must be int64 IDs"):
        Mod(3)(torch.tensor([1.0]))


# ----------------------------------------------------------------------- Bucketize

def test_bucketize_counts_boundaries_at_or_below():
    bounds = [0.0, 1.0, 2.5, 10.0, 1e6]
    xs = [-5.0, 0.0, 0.5, 1.0, 2.49, 2.5, 9.99, 10.0, 1e6, 1e9, float("nan"), float("-inf")]
    out = Bucketize(bounds)(torch.tensor(xs)).tolist()
    assert out == [bucketize_reference(x, bounds) for x in xs]
    ints = torch.tensor([[-1, 0], [3, 16777217]])  # compared as float32, as RecIS does
    assert Bucketize(bounds)(ints).tolist() == [[bucketize_reference(float(v), bounds)
                                                  for v in r] for r in ints.tolist()]


def test_bucketize_on_ragged_keeps_layout():
    x = ragged([[1.5, 30.0], [], [0.0]], dtype=torch.float32)
    out = Bucketize([1, 2, 20])(x)
    assert rows_of(out) == [[1, 3], [], [0]] and out.values().dtype == torch.int64


def test_bucketize_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="boundary must be ascending"):
        Bucketize([3, 1])
    with pytest.raises(ValueError, match="at least one value"):
        Bucketize([])
    with pytest.raises(TypeError, match="boundary must be a list of numbers"):
        Bucketize("0,1")


# ----------------------------------------------------------------------- FeatureCross

def test_feature_cross_matches_the_reference():
    rng = random.Random(3)
    x_rows = [[rng.choice([1, 2, 3, -9, 2**40]) for _ in range(rng.randrange(4))]
              for _ in range(30)]
    y_rows = [[rng.choice([7, 8, 1, -1]) for _ in range(rng.randrange(4))] for _ in range(28)]
    x_w = [[rng.random() for _ in r] for r in x_rows]
    y_w = [[rng.random() for _ in r] for r in y_rows]
    out = FeatureCross()([ragged(x_rows, weights=x_w), ragged(y_rows, weights=y_w)])
    values, weights = cross_reference(x_rows, x_w, y_rows, y_w)
    assert rows_of(out) == values  # only min(rows) = 28 rows
    got_w = out.weight().tolist()
    want_w = [w for row in weights for w in row]
    assert got_w == pytest.approx([f32(f32(a)) for a in want_w], rel=1e-6)


def test_feature_cross_without_weights_has_none_and_one_side_counts_one():
    x, y = ragged([[1, 1, 2]]), ragged([[5]], weights=[[0.5]])
    assert FeatureCross()([x, ragged([[5]])]).weight() is None
    assert FeatureCross()([x, y]).weight().tolist() == [0.5, 0.5]


def test_feature_cross_rejects_bad_inputs():
    with pytest.raises(TypeError, match="a list of two RaggedTensors"):
        FeatureCross()(ragged([[1]]))
    with pytest.raises(TypeError, match="input y must hold int64 IDs"):
        FeatureCross()([ragged([[1]]), ragged([[1.0]], dtype=torch.float32)])


# ----------------------------------------------------------------------- SequenceTruncate

@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_truncate_2d(side):
    rows = [[1, 2, 3, 4, 5], [], [6], [7, 8, 9]]
    weights = [[float(v) for v in r] for r in rows]
    x = ragged(rows, weights=weights)
    out = SequenceTruncate(3, check_length=False, truncate_side=side)(x)
    assert rows_of(out) == truncate_reference(rows, 3, side)
    assert out.weight().tolist() == [float(v) for v in out.values().tolist()]
    assert out.dense_shape[1] == 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_truncate_3d_pads_every_row_to_seq_len(side):
    seqs = [[[1, 2], [3], [4, 5, 6]], [[7]], []]
    outer, inner, values = [0], [0], []
    for seq in seqs:
        outer.append(outer[-1] + len(seq))
        for item in seq:
            inner.append(inner[-1] + len(item))
            values += item
    x = RaggedTensor(torch.tensor(values), [torch.tensor(outer), torch.tensor(inner)])
    out = SequenceTruncate(2, check_length=False, truncate_side=side, n_dims=3)(x)
    assert out.offsets()[0].tolist() == [0, 2, 4, 6]
    got = rows_of(out)  # the inner lists, two per row
    want = []
    for kept in truncate_reference(seqs, 2, side):
        want += kept + [[]] * (2 - len(kept))
    assert got == want


def test_sequence_truncate_checks_length_and_arguments():
    x = ragged([[1, 2, 3]])
    with pytest.raises(ValueError, match="more than seq_len=2"):
        SequenceTruncate(2)(x)
    assert SequenceTruncate(3)(x).values().tolist() == [1, 2, 3]
    assert SequenceTruncate(2, check_length=False, truncate=False)(x) is x
    with pytest.raises(ValueError, match="truncate_side must be 'left' or 'right'"):
        SequenceTruncate(2, truncate_side="middle")
    with pytest.raises(ValueError, match="n_dims=3 expects a RaggedTensor of rank 3"):
        SequenceTruncate(2, n_dims=3)(x)


# ----------------------------------------------------------------------- IDMultiHash

def test_id_multi_hash_matches_the_reference():
    buckets = [20000, 20000, 10000, 500]
    out = IDMultiHash(buckets)(torch.tensor(EDGE_IDS))
    assert sorted(out) == [f"multi_hash_{i}" for i in range(4)]
    for i in range(4):
        assert out[f"multi_hash_{i}"].tolist() == [multi_hash_reference(x, buckets)[i]
                                                   for x in EDGE_IDS]
    r = IDMultiHash([7], prefix="h")(ragged([[1, 2], [3]]))
    assert list(r) == ["h_0"] and rows_of(r["h_0"]) == [[1, 2], [3]]


def test_id_multi_hash_rejects_bad_buckets():
    with pytest.raises(ValueError, match="1 to 4 positive ints"):
        IDMultiHash([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="num_buckets entries must be a positive int"):
        IDMultiHash([10, 0])


# ----------------------------------------------------------------------- Hash

def test_hash_drops_the_last_level_and_checks_its_input():
    words = [b"ab", b"", b"criteo"]
    text = ragged([list(w) for w in words], dtype=torch.uint8)
    assert Hash("murmur")(text).tolist() == [signed(murmur_reference(w)) for w in words]
    nested = RaggedTensor(text.values(), [torch.tensor([0, 2, 3]), text.offsets()[0]])
    out = Hash("murmur")(nested)
    assert rows_of(out) == [[signed(murmur_reference(w)) for w in words[:2]],
                            [signed(murmur_reference(words[2]))]]
    with pytest.raises(ValueError, match="hash_type must be 'farm' or 'murmur'"):
        Hash("md5")
    with pytest.raises(TypeError, match="Hash: input values must be bytes"):
        Hash("farm")(ragged([[1]]))
    with pytest.raises(TypeError, match="Hash: input must be a RaggedTensor of bytes"):
        Hash("farm")(torch.tensor([1]))


def test_id_to_text_then_hash_hashes_the_decimal_text():
    ids = ragged([[12, -3], [], [7]])
    out = Hash("murmur")(Int64ToString()(ids))
    assert rows_of(out) == [[signed(murmur_reference(str(v).encode())) for v in r]
                            for r in [[12, -3], [], [7]]]
    with pytest.raises(ValueError, match="must not have weights"):
        Int64ToString()(ragged([[1]], weights=[[1.0]]))


# ----------------------------------------------------------------------- Feature / engine

def criteo_like_batch(rows=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2**40, 2**40, (rows,), generator=gen)
    present = torch.rand(rows, generator=gen) > 0.3
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(present.long(), 0)])
    return {"c1": RaggedTensor(ids[present], offsets),
            "c2": RaggedTensor(ids[present] * 3, offsets),
            "i1": torch.randint(0, 1000, (rows,), generator=gen).float(),
            "label": torch.zeros(rows)}


def features():
    return [
        Feature("c1").add_op(SelectField("c1")).add_op(Int64ToString()).add_op(Hash("farm")),
        Feature("c2").add_op(SelectField("c2")).add_op(Int64ToString()).add_op(Hash("murmur")),
        Feature("c1_copy").add_op(SelectField("c1")).add_op(Int64ToString())
        .add_op(Hash("farm")),
        Feature("c1_mod").add_op(SelectField("c1")).add_op(Mod(1000)),
        Feature("i1").add_op(SelectField("i1")).add_op(Bucketize([1, 10, 100])),
        Feature("c1_multi").add_op(SelectField("c1")).add_op(IDMultiHash([100, 50])),
        Feature("cross").add_op(SelectFields(["c1", "c2"])).add_op(FeatureCross()),
    ]


def test_engine_output_equals_running_each_feature_alone():
    batch = criteo_like_batch()
    engine = FeatureEngine(features())
    out = engine(batch)
    for feature in features():
        alone = feature(batch)
        if isinstance(alone, dict):
            for key, value in alone.items():
                assert rows_of(out[f"{feature.name}_{key}"]) == rows_of(value)
        elif isinstance(alone, RaggedTensor):
            assert rows_of(out[feature.name]) == rows_of(alone), feature.name
        else:
            assert torch.equal(out[feature.name], alone), feature.name
    assert "label" in out and "c1_multi" not in out
    assert set(FeatureEngine(features())(batch, remain_no_use_data=False)) == {
        "c1", "c2", "c1_copy", "c1_mod", "i1", "c1_multi_multi_hash_0",
        "c1_multi_multi_hash_1", "cross"}


def test_engine_deduplicates_fuses_by_step_and_pickles():
    engine = FeatureEngine(features())
    assert engine.aliases == {"c1_copy": "c1"}
    assert len(engine.features) == 6
    assert len(engine.steps) == 3
    hash_groups = [names for cls, names, _ in engine.steps[2] if cls is Hash]
    assert hash_groups == [["c1", "c2"]]  # both hash ops run in one fused call
    clone = pickle.loads(pickle.dumps(engine))
    batch = criteo_like_batch(seed=1)
    assert rows_of(clone(batch)["c2"]) == rows_of(engine(batch)["c2"])


def test_engine_and_feature_errors_name_the_problem():
    with pytest.raises(ValueError, match="first op must be SelectField or SelectFields"):
        Feature("x").add_op(Mod(3))
    with pytest.raises(ValueError, match="SelectField may only be the first op"):
        Feature("x").add_op(SelectField("a")).add_op(SelectField("b"))
    with pytest.raises(ValueError, match="duplicate feature name 'x'"):
        FeatureEngine([Feature("x").add_op(SelectField("a")),
                       Feature("x").add_op(SelectField("b"))])
    with pytest.raises(TypeError, match="feature_list entries must be Feature"):
        FeatureEngine([Mod(3)])
    engine = FeatureEngine([Feature("x").add_op(SelectField("a"))])
    with pytest.raises(KeyError, match="the batch has no column 'a'"):
        engine({"b": torch.tensor([1])})
    with pytest.raises(TypeError, match="data must be a dict"):
        engine([1])


class _Batches(torch.utils.data.Dataset):
    def __init__(self, engine):
        self.engine = engine

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.engine(criteo_like_batch(seed=i), remain_no_use_data=False)


def test_engine_runs_inside_dataloader_workers():
    engine = FeatureEngine(features())
    loader = torch.utils.data.DataLoader(_Batches(engine), batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 4
    for i, out in enumerate(got):
        want = engine(criteo_like_batch(seed=i), remain_no_use_data=False)
        assert rows_of(out["c1"]) == rows_of(want["c1"])
        assert rows_of(out["cross"]) == rows_of(want["cross"])
        assert torch.equal(out["i1"], want["i1"])
