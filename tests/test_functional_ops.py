"""RecIS's functional ops (recis.nn.functional): segment sums and means, ragged tile, ragged
<-> dense/sparse conversions and the ragged cutoffs. Each op is checked against a plain-Python
reference written here, against the values of RecIS's own tests
(tests/nn/segment_ops_test.py, tests/nn/test_ragged_tile.py) and docstrings, and the numba
kernel against its torch twin."""

import doctest

import pytest
import torch

import recis.nn.functional.embedding_ops as embedding_ops
import recis.nn.functional.ragged_ops as ragged_ops
from recis._core.backends import get_backend
from recis.nn.functional import (
    dense_to_ragged,
    fused_ragged_cutoff_2D,
    fused_ragged_cutoff_3D,
    ids_encode,
    merge_offsets,
    ragged_embedding_segment_reduce,
    ragged_tile,
    ragged_to_dense,
    ragged_to_sparse,
    segment_sum_sparse,
    sparse_embedding_segment_reduce,
    weight_norm_sparse,
)

BACKENDS = ["recis", "torch"]

# RecIS's tests/nn/segment_ops_test.py inputs
DATA = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
WEIGHT = torch.tensor([2.0, 3.0, 0.5, 1.0])
INDICES = torch.tensor([2, 0, 1, 0])
SEGMENT_IDS = torch.tensor([0, 1, 1, 2])


def segment_sum_reference(data, weight, indices, segment_ids, num_segments):
    """Plain-Python loops."""
    out = [[0.0] * data.shape[1] for _ in range(num_segments)]
    for i, (r, s) in enumerate(zip(indices.tolist(), segment_ids.tolist(), strict=True)):
        w = 1.0 if weight is None else float(weight[i])
        for j in range(data.shape[1]):
            out[s][j] += w * float(data[r, j])
    return torch.tensor(out, dtype=torch.float64).reshape(num_segments, data.shape[1])


def segment_mean_reference(data, weight, indices, segment_ids, num_segments):
    totals = [0.0] * num_segments
    for i, s in enumerate(segment_ids.tolist()):
        totals[s] += 1.0 if weight is None else float(weight[i])
    sums = segment_sum_reference(data, weight, indices, segment_ids, num_segments)
    return torch.stack([row / t if t != 0 else torch.zeros_like(row)
                        for row, t in zip(sums, totals, strict=True)])


# -- RecIS's documented values  -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sum_and_mean_give_recis_test_values(backend):
    total = segment_sum_sparse(DATA, WEIGHT, INDICES, SEGMENT_IDS, 4, backend=backend)
    assert torch.allclose(total, torch.tensor([[6.0, 6], [4, 4], [1, 1], [0, 0]]))
    norm = weight_norm_sparse(DATA, WEIGHT, SEGMENT_IDS, 4, backend=backend)
    mean = segment_sum_sparse(DATA, norm, INDICES, SEGMENT_IDS, 4, backend=backend)
    expected_mean = torch.tensor([[3.0, 3], [4 / 3.5, 4 / 3.5], [1, 1], [0, 0]])
    assert torch.allclose(mean, expected_mean)
    for combiner, expected in (("sum", total), ("mean", expected_mean)):
        got = sparse_embedding_segment_reduce(DATA, WEIGHT, INDICES, SEGMENT_IDS, 4, combiner,
                                              backend=backend)
        assert torch.allclose(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combiner, expected_grad", [
    ("sum", [[4.0, 4.0], [0.5, 0.5], [2.0, 2.0]]),
    ("mean", [[1 + 3 / 3.5] * 2, [0.5 / 3.5] * 2, [1.0, 1.0]]),
])
def test_segment_reduce_gradient_gives_recis_test_values(backend, combiner, expected_grad):
    emb = DATA.clone().requires_grad_()
    out = sparse_embedding_segment_reduce(emb, WEIGHT, INDICES, SEGMENT_IDS, 4, combiner,
                                          backend=backend)
    out.backward(torch.ones_like(out))
    assert torch.allclose(emb.grad, torch.tensor(expected_grad))


def test_weight_norm_divides_by_the_sum_of_weights_and_zero_sums_give_zero():
    # RecIS's "torch" backend would divide by the count (2 for segment 1): we follow its kernel
    weight = torch.tensor([2.0, 3.0, 0.5, 1.0, -1.0])
    segment_ids = torch.tensor([0, 1, 1, 2, 2])
    norm = weight_norm_sparse(DATA, weight, segment_ids, 4)
    assert torch.allclose(norm, torch.tensor([1.0, 3 / 3.5, 0.5 / 3.5, 0.0, 0.0]))
    assert torch.allclose(weight_norm_sparse(DATA, None, segment_ids, 4),
                          torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5]))


# -- against the plain-Python reference, and numba against torch  ---------------------------------

def random_segments(seed, num_rows=40, num_ids=300, num_segments=64, dim=5,
                    index_dtype=torch.int64, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(num_rows, dim, generator=g, dtype=dtype)
    indices = torch.randint(0, num_rows, (num_ids,), generator=g).to(index_dtype)
    # only even segments are used: the odd ones stay empty
    segment_ids = (torch.randint(0, num_segments // 2, (num_ids,), generator=g) * 2).to(
        index_dtype)
    weight = torch.rand(num_ids, generator=g, dtype=dtype)
    return data, weight, indices, segment_ids, num_segments


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_segment_sum_kernels_agree_with_each_other_and_the_reference(index_dtype, with_weight,
                                                                    dtype):
    data, weight, indices, segment_ids, num_segments = random_segments(1, index_dtype=index_dtype,
                                                                       dtype=dtype)
    weight = weight if with_weight else None
    numba = get_backend("numba").segment_sum(data, weight, indices, segment_ids, num_segments)
    twin = get_backend("torch").segment_sum(data, weight, indices, segment_ids, num_segments)
    reference = segment_sum_reference(data, weight, indices, segment_ids, num_segments)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert numba.dtype == twin.dtype == dtype
    assert torch.allclose(numba, twin, atol=tol) and torch.allclose(twin.double(), reference,
                                                                    atol=tol)
    assert not numba[1::2].any()  # empty segments are zero
    empty = get_backend("numba").segment_sum(data, None, indices[:0], segment_ids[:0], 3)
    assert torch.equal(empty, torch.zeros(3, data.shape[1], dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_segment_mean_matches_the_reference(backend, with_weight):
    data, weight, indices, segment_ids, num_segments = random_segments(2)
    weight = weight if with_weight else None
    got = sparse_embedding_segment_reduce(data, weight, indices, segment_ids, num_segments,
                                          "mean", backend=backend)
    expected = segment_mean_reference(data, weight, indices, segment_ids, num_segments)
    assert torch.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_segment_reduce_gradcheck(backend, combiner):
    data, weight, indices, segment_ids, num_segments = random_segments(3, num_rows=6, num_ids=15,
                                                                       num_segments=6, dim=3)
    data.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e, w: sparse_embedding_segment_reduce(e, w, indices, segment_ids, num_segments,
                                                     combiner, backend=backend),
        (data, weight))


def test_segment_ops_reject_bad_inputs_naming_the_argument():
    cases = [
        (lambda: segment_sum_sparse(DATA, WEIGHT, torch.tensor([2, 0, 3, 0]), SEGMENT_IDS, 4),
         IndexError, "indices"),
        (lambda: segment_sum_sparse(DATA, WEIGHT, INDICES, SEGMENT_IDS, 2), IndexError,
         "segment_ids"),
        (lambda: segment_sum_sparse(DATA, WEIGHT[:3], INDICES, SEGMENT_IDS, 4), ValueError,
         "weight"),
        (lambda: segment_sum_sparse(DATA, WEIGHT, INDICES.float(), SEGMENT_IDS, 4), ValueError,
         "indices"),
        (lambda: segment_sum_sparse(DATA[0], WEIGHT, INDICES, SEGMENT_IDS, 4), ValueError, "data"),
        (lambda: segment_sum_sparse(DATA, WEIGHT, INDICES, SEGMENT_IDS, -1), ValueError,
         "num_segments"),
        (lambda: segment_sum_sparse(DATA, WEIGHT, INDICES, SEGMENT_IDS, 4, backend="cuda"),
         ValueError, "backend"),
        (lambda: sparse_embedding_segment_reduce(DATA, WEIGHT, INDICES, SEGMENT_IDS, 4, "max"),
         ValueError, "combiner"),
        (lambda: weight_norm_sparse(DATA, WEIGHT, SEGMENT_IDS[:3], 4), ValueError, "weight"),
    ]
    for call, error, argument in cases:
        with pytest.raises(error, match=argument):
            call()


def test_ragged_embedding_segment_reduce_is_bag_reduce_over_offsets():
    emb = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    reverse = torch.tensor([0, 2, 1, 1], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 2, 4], dtype=torch.int32)
    weight = torch.tensor([1.0, 3.0, 0.5, 0.5])
    summed = ragged_embedding_segment_reduce(emb, weight, reverse, offsets, "sum")
    assert torch.allclose(summed, torch.tensor([[16.0, 20.0], [0, 0], [3, 4]]))
    mean = ragged_embedding_segment_reduce(emb, weight, reverse, offsets, "mean")
    assert torch.allclose(mean, torch.tensor([[4.0, 5.0], [0, 0], [3, 4]]))
    tiled = ragged_embedding_segment_reduce(emb, None, reverse, offsets, "tile",
                                            {"bs": [3], "tile_len": [1]})
    assert torch.equal(tiled, torch.tensor([[1.0, 2.0], [0, 0], [3, 4]]))


def test_merge_offsets_gives_recis_test_values():
    assert torch.equal(merge_offsets([torch.tensor([0, 2, 5]), torch.tensor([0, 3, 6])]),
                       torch.tensor([0, 2, 5, 8, 11]))
    assert torch.equal(merge_offsets([torch.tensor([0, 0, 0]), torch.tensor([0, 0, 0])]),
                       torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"offsets\[1\]"):
        merge_offsets([torch.tensor([0, 2]), torch.tensor([1, 3])])


def test_ids_encode_packs_the_table_above_52_bits():
    ids = [torch.tensor([1, 2, 2**52 + 5, -1]), torch.tensor([7], dtype=torch.int32)]
    got = ids_encode(ids, [3, 4095])
    expected = []
    for table, tensor in zip([3, 4095], ids, strict=True):
        for i in tensor.tolist():
            value = (i % 2**52) + table * 2**52  # unsigned, then as int64
            expected.append(value - 2**64 if value >= 2**63 else value)
    assert got.tolist() == expected
    with pytest.raises(ValueError, match="table_ids"):
        ids_encode(ids, [0, 4096])
    with pytest.raises(ValueError, match="table_ids"):
        ids_encode(ids, [0])


# -- ragged_tile  ---------------------------------------------------------------------------------

def ragged_tile_reference(batch, seq, indices, offset, table, left_pad):
    """The tiled rows, and the table row each output row was copied from (None: padding)."""
    sources = []
    row = 0
    for k, (rows, length) in enumerate(zip(batch, seq, strict=True)):
        for _ in range(rows):
            ids = indices[offset[row]:offset[row + 1]].tolist()[:length]
            padding = [None] * (length - len(ids))
            sources += padding + ids if left_pad[k] else ids + padding
            row += 1
    out = [[0.0] * table.shape[1] if i is None else table[i].tolist() for i in sources]
    return torch.tensor(out, dtype=table.dtype).reshape(-1, table.shape[1]), sources


def test_ragged_tile_follows_recis_kernel_on_its_docstring_example():
    table = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = ragged_tile([2, 1], [3, 4], torch.tensor([0, 1, 0, 0, 1]),
                      torch.tensor([0, 2, 3, 4]), table)
    # RecIS's docstring prints [2, 3] for the last row; its kernel reads indices[3] = 0
    assert torch.equal(out, torch.tensor([[0.0, 1], [2, 3], [0, 0],
                                          [0, 1], [0, 0], [0, 0],
                                          [0, 1], [0, 0], [0, 0], [0, 0]]))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_ragged_tile_matches_the_reference_with_left_and_right_padding(index_dtype):
    g = torch.Generator().manual_seed(4)
    batch, seq, left_pad = [3, 2, 4], [4, 5, 3], [True, False, True]
    lengths = torch.randint(0, 7, (sum(batch),), generator=g)
    assert bool((lengths[:3] < 4).any() & (lengths[:3] > 4).any())  # pads and cuts on the left
    offset = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(index_dtype)
    table = torch.randn(9, 4, generator=g, dtype=torch.float64)
    indices = torch.randint(0, 9, (int(lengths.sum()),), generator=g).to(index_dtype)
    got = ragged_tile(batch, seq, indices, offset, table, torch.tensor(left_pad))
    expected, sources = ragged_tile_reference(batch, seq, indices, offset, table, left_pad)
    assert torch.equal(got, expected)

    # backward scatter-adds: table row i gets the sum of the upstream rows where it was copied
    table.requires_grad_()
    upstream = torch.randn(got.shape, generator=g, dtype=torch.float64)
    ragged_tile(batch, seq, indices, offset, table, left_pad).backward(upstream)
    expected_grad = torch.zeros_like(table)
    for position, source in enumerate(sources):
        if source is not None:
            expected_grad[source] += upstream[position]
    assert torch.allclose(table.grad, expected_grad)
    assert torch.autograd.gradcheck(
        lambda t: ragged_tile(batch, seq, indices, offset, t, left_pad), (table,))


def test_ragged_tile_of_no_rows_is_empty():
    table = torch.ones(2, 3)
    assert ragged_tile([], [], torch.tensor([0]), torch.tensor([0]), table).shape == (0, 3)
    assert ragged_tile([2], [0], torch.tensor([0]), torch.tensor([0, 1, 1]), table).shape == (0, 3)


def test_ragged_tile_rejects_bad_inputs_naming_the_argument():
    table = torch.zeros(2, 3)
    good = dict(batch=[2], seq=[2], indices=torch.tensor([0, 1, 1]),
                offset=torch.tensor([0, 2, 3]), table=table)
    for change, error, argument in [
        (dict(seq=[2, 1]), ValueError, "batch and seq"),
        (dict(offset=torch.tensor([0, 3])), ValueError, "offset"),
        (dict(offset=torch.tensor([0, 3, 2])), ValueError, "offset"),
        (dict(indices=torch.tensor([0, 1, 2])), IndexError, "indices"),
        (dict(table=torch.zeros(2, 3, dtype=torch.long)), ValueError, "table"),
        (dict(left_pad=[1, 0]), ValueError, "left_pad"),
    ]:
        with pytest.raises(error, match=argument):
            ragged_tile(**{**good, **change})


# -- conversions  ---------------------------------------------------------------------------------

def test_dense_to_ragged_gives_recis_docstring_values():
    dense = torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]])
    values, offsets = dense_to_ragged(dense, check_invalid=True)
    assert torch.equal(values, torch.tensor([1, 2, 3, 4, 5, 6]))
    assert len(offsets) == 1 and offsets[0].dtype == torch.int32
    assert offsets[0].tolist() == [0, 2, 5, 6]
    values, offsets = dense_to_ragged(dense)
    assert torch.equal(values, dense.reshape(-1)) and offsets[0].tolist() == [0, 3, 6, 9]
    # interior invalid values stay, trailing ones go; another invalid value
    values, offsets = dense_to_ragged(torch.tensor([[-1, 7, -1], [-1, -1, -1]]), True, -1)
    assert values.tolist() == [-1, 7] and offsets[0].tolist() == [0, 2, 2]
    values, offsets = dense_to_ragged(torch.arange(24).reshape(2, 3, 4))
    assert [o.tolist() for o in offsets] == [[0, 3, 6], [0, 4, 8, 12, 16, 20, 24]]
    with pytest.raises(ValueError, match="2-D"):
        dense_to_ragged(torch.zeros(2, 2, 2), check_invalid=True)
    with pytest.raises(ValueError, match="tensor"):
        dense_to_ragged(torch.zeros(3))


def test_ragged_to_dense_and_to_sparse_place_each_value_at_its_row_and_position():
    values = torch.tensor([1, 2, 3, 4, 5, 6])
    outer, inner = torch.tensor([0, 2, 5, 6], dtype=torch.int32), torch.tensor(
        [0, 1, 3, 6, 6, 6, 6], dtype=torch.int32)
    # reference: walk the rows
    entries = {}
    for s in range(3):
        for j, r in enumerate(range(outer[s], outer[s + 1])):
            for k, v in enumerate(range(inner[r], inner[r + 1])):
                entries[(s, j, k)] = int(values[v])
    shape = (3, 3, 3)
    dense = ragged_to_dense(values, [outer, inner], -1)
    assert dense.shape == shape
    for position in [(a, b, c) for a in range(3) for b in range(3) for c in range(3)]:
        assert int(dense[position]) == entries.get(position, -1)
    sparse = ragged_to_sparse(values, [outer, inner])
    assert sparse.shape == shape and sparse.is_coalesced()
    got = {tuple(i): int(v) for i, v in zip(sparse.indices().T.tolist(), sparse.values(),
                                             strict=True)}
    assert got == entries
    empty = ragged_to_sparse(torch.zeros(0), [torch.tensor([0, 0, 0])])
    assert empty.shape == (2, 0) and empty.values().numel() == 0
    with pytest.raises(ValueError, match=r"row_splits\[0\]"):
        ragged_to_sparse(values, [torch.tensor([0.0, 6.0])])


# -- cutoffs  -------------------------------------------------------------------------------------

def cutoff_2d_reference(rows, keep, drop_left):
    values, lengths, drops, pads = [], [], [], []
    for row in rows:
        kept = row[len(row) - keep:] if drop_left and len(row) > keep else row[:keep]
        values += kept
        lengths.append(len(kept))
        drops.append(max(len(row) - keep, 0))
        pads.append(max(keep - len(row), 0))
    return values, lengths, drops, pads


def test_fused_ragged_cutoff_2D_gives_recis_docstring_values():
    values = torch.tensor([9155707040084860980, 11, 12, 20, 21, 30, 31, 32, 33])
    offsets = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    out = fused_ragged_cutoff_2D([values], [offsets], torch.tensor([3], dtype=torch.int32),
                                 torch.tensor([True]), torch.tensor([True]))
    new_values, new_offsets, drop_nums, pad_nums, drop_sides, pad_sides = out
    # RecIS's docstring says [.., 30, 31, 32] for a left drop, which is a right drop: a left drop
    # keeps the last three
    assert new_values[0].tolist() == [9155707040084860980, 11, 12, 20, 21, 31, 32, 33]
    assert new_offsets[0].tolist() == [0, 3, 5, 8] and new_offsets[0].dtype == torch.int32
    assert drop_nums[0].tolist() == [0, 0, 1] and pad_nums[0].tolist() == [0, 1, 0]
    assert drop_sides.tolist() == [True] and pad_sides.tolist() == [True]
    # all rows empty (RecIS's docstring example 'c')
    out = fused_ragged_cutoff_2D([torch.zeros(0, dtype=torch.float64)],
                                 [torch.tensor([0, 0, 0, 0], dtype=torch.int32)],
                                 torch.tensor([3]), torch.tensor([True]), torch.tensor([True]))
    assert out[0][0].numel() == 0 and out[1][0].tolist() == [0, 0, 0, 0]
    assert out[2][0].tolist() == [0, 0, 0] and out[3][0].tolist() == [3, 3, 3]


@pytest.mark.parametrize("drop_left", [False, True])
def test_fused_ragged_cutoff_2D_matches_the_reference_on_several_tensors(drop_left):
    g = torch.Generator().manual_seed(5)
    tensors = []
    for num_rows in (7, 1, 12):
        rows = [torch.randint(0, 100, (int(torch.randint(0, 9, (1,), generator=g)),),
                              generator=g).tolist() for _ in range(num_rows)]
        tensors.append(rows)
    keep = [3, 0, 5]
    values = [torch.tensor(sum(rows, []), dtype=torch.int64) for rows in tensors]
    offsets = [torch.tensor([0] + [len(r) for r in rows]).cumsum(0) for rows in tensors]
    out = fused_ragged_cutoff_2D(values, offsets, torch.tensor(keep),
                                 torch.tensor([drop_left] * 3), None)
    for k, rows in enumerate(tensors):
        ref_values, lengths, drops, pads = cutoff_2d_reference(rows, keep[k], drop_left)
        assert out[0][k].tolist() == ref_values
        assert out[1][k].tolist() == torch.tensor([0] + lengths).cumsum(0).tolist()
        assert out[2][k].tolist() == drops and out[3][k].tolist() == pads


def test_fused_ragged_cutoff_3D_gives_recis_docstring_values():
    # [[10], [11, 12, 13], []], [[14, 15, 16, 17]], [[], [18, 19]]; keep 2, drop left, pad left
    values = torch.arange(10, 20)
    outer = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    inner = torch.tensor([0, 1, 4, 4, 8, 8, 10], dtype=torch.int32)
    new_values, new_offsets = fused_ragged_cutoff_3D(
        [values], [[outer, inner]], torch.tensor([2], dtype=torch.int32),
        torch.tensor([True]), torch.tensor([True]))
    # -> [[11, 12, 13], []], [[], [14, 15, 16, 17]], [[], [18, 19]]
    assert new_values[0].tolist() == [11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert new_offsets[0][0].tolist() == [0, 2, 4, 6]
    assert new_offsets[0][1].tolist() == [0, 3, 3, 3, 7, 7, 9]
    assert new_offsets[0][1].dtype == torch.int32
    # empty rows only (RecIS's docstring example with keep 3, defaults: drop and pad right)
    new_values, new_offsets = fused_ragged_cutoff_3D(
        [torch.zeros(0, dtype=torch.float64)],
        [[torch.tensor([0, 5, 6, 10], dtype=torch.int32), torch.zeros(11, dtype=torch.int32)]],
        torch.tensor([3]))
    assert new_values[0].numel() == 0 and new_offsets[0][0].tolist() == [0, 3, 6, 9]
    assert new_offsets[0][1].tolist() == [0] * 10


@pytest.mark.parametrize("drop_left", [False, True])
@pytest.mark.parametrize("pad_left", [False, True])
def test_fused_ragged_cutoff_3D_matches_the_reference(drop_left, pad_left):
    g = torch.Generator().manual_seed(6)
    keep = 3
    seqs = [[torch.randint(0, 50, (int(torch.randint(0, 4, (1,), generator=g)),),
                           generator=g).tolist()
             for _ in range(int(torch.randint(0, 6, (1,), generator=g)))] for _ in range(8)]
    values = torch.tensor([v for s in seqs for row in s for v in row], dtype=torch.int64)
    outer = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    inner = torch.tensor([0] + [len(row) for s in seqs for row in s]).cumsum(0)
    assert any(len(s) > keep for s in seqs) and any(len(s) < keep for s in seqs)
    new_values, new_offsets = fused_ragged_cutoff_3D([values], [[outer, inner]],
                                                     torch.tensor([keep]),
                                                     torch.tensor([drop_left]),
                                                     torch.tensor([pad_left]))
    expected_rows = []
    for s in seqs:
        rows = s[len(s) - keep:] if drop_left and len(s) > keep else s[:keep]
        padding = [[]] * (keep - len(rows))
        expected_rows += padding + rows if pad_left else rows + padding
    assert new_offsets[0][0].tolist() == [keep * i for i in range(len(seqs) + 1)]
    got_rows = [new_values[0][a:b].tolist() for a, b in
                zip(new_offsets[0][1][:-1].tolist(), new_offsets[0][1][1:].tolist(), strict=True)]
    assert got_rows == expected_rows


def test_cutoffs_reject_bad_inputs_naming_the_argument():
    values, offsets = [torch.tensor([1, 2, 3])], [torch.tensor([0, 1, 3])]
    with pytest.raises(ValueError, match="drop_sides"):
        fused_ragged_cutoff_2D(values, offsets, torch.tensor([1]), torch.tensor([1]),
                               torch.tensor([True]))
    with pytest.raises(ValueError, match="keep_lengths"):
        fused_ragged_cutoff_2D(values, offsets, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"offsets\[0\]"):
        fused_ragged_cutoff_2D(values, [torch.tensor([0, 1, 4])], torch.tensor([1]))
    with pytest.raises(ValueError, match="offsets"):
        fused_ragged_cutoff_2D(values, offsets * 2, torch.tensor([1]))
    with pytest.raises(ValueError, match="outer offsets"):
        fused_ragged_cutoff_3D(values, [[torch.tensor([0, 5]), torch.tensor([0, 1, 3])]],
                               torch.tensor([1]))


@pytest.mark.parametrize("module", [embedding_ops, ragged_ops])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_recis_import_paths_resolve():
    """Code written for RecIS imports the ops from these modules."""
    from recis.nn.functional.embedding_ops import (  # noqa: F401
        ids_encode,
        merge_offsets,
        ragged_embedding_segment_reduce,
        segment_sum_sparse,
        sparse_embedding_segment_reduce,
        weight_norm_sparse,
    )
    from recis.nn.functional.ragged_ops import (  # noqa: F401
        dense_to_ragged,
        fused_ragged_cutoff_2D,
        fused_ragged_cutoff_3D,
        ragged_tile,
        ragged_to_dense,
        ragged_to_sparse,
    )
