"""RecIS's functional ops (recis.nn.functional): segment sums and means. Each op is checked
against a plain-Python reference written here, against the values of RecIS's own tests
(tests/nn/segment_ops_test.py) and docstrings, and the numba kernel against its torch twin."""

import doctest

import pytest
import torch

import recis.nn.functional.embedding_ops as embedding_ops
from recis._core.backends import get_backend
from recis.nn.functional import (
    ids_encode,
    merge_offsets,
    ragged_embedding_segment_reduce,
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


@pytest.mark.parametrize("module", [embedding_ops])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
