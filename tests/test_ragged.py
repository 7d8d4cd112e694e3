import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis.ragged import RaggedTensor


def example(weight=True):
    values = torch.tensor([10, 11, 12, 13, 14])
    offsets = torch.tensor([0, 2, 2, 5])
    w = torch.tensor([1.0, 0.5, 0.2, 0.3, 0.5]) if weight else None
    return RaggedTensor(values, offsets, weight=w)


def two_level():
    # batch of 2: [[1], []] and [[2, 3, 4]]
    return RaggedTensor(
        torch.tensor([1, 2, 3, 4]), [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1, 4])]
    )


# ----------------------------------------------------------------------------- basics


def test_accessors():
    rt = example()
    assert torch.equal(rt.values(), torch.tensor([10, 11, 12, 13, 14]))
    assert isinstance(rt.offsets(), list) and len(rt.offsets()) == 1
    assert torch.equal(rt.offsets()[0], torch.tensor([0, 2, 2, 5]))
    assert torch.equal(rt.weight(), torch.tensor([1.0, 0.5, 0.2, 0.3, 0.5]))
    assert rt.dtype == torch.int64
    assert rt.device == torch.device("cpu")
    assert rt.dim == 2
    assert torch.equal(rt.lengths(), torch.tensor([2, 0, 3]))
    assert "RaggedTensor(values=" in repr(rt)


def test_shapes():
    rt = example()
    assert rt.shape == rt.size() == rt.real_shape() == (3, 3)
    assert rt.real_shape(0, 1) == (3,)
    assert rt.real_shape(1) == (3,)
    assert rt.real_shape(0, -1) == (3,)
    assert rt.get_shape(0) == 3 and rt.get_shape(-1) == 3
    assert rt.max_length == 3
    assert rt.dense_shape == (-1, -1)

    rt2 = two_level()
    assert rt2.dim == 3
    assert rt2.shape == (2, 2, 3)
    assert torch.equal(rt2.lengths(0), torch.tensor([2, 1]))


def test_empty_batch_and_empty_rows():
    rt = RaggedTensor(torch.tensor([], dtype=torch.int64), torch.tensor([0]))
    assert rt.shape == (0, 0)
    assert rt.to_dense().shape == (0, 0)
    rt = RaggedTensor(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0]))
    assert rt.shape == (2, 0)
    assert rt.to_dense().shape == (2, 0)


def test_dense_shape_with_fixed_and_free_entries():
    rt = RaggedTensor(torch.arange(5), torch.tensor([0, 2, 2, 5]), dense_shape=(-1, 6))
    assert rt.dense_shape == (-1, 6)
    assert rt.shape == (3, 6)
    assert rt.max_length == 6
    assert rt.to_dense(-1).shape == (3, 6)
    rt.set_dim_by_rank(-1, 1)
    assert rt.shape == (3, 3)
    rt.set_dim_by_rank(4, -1)
    assert rt.shape == (3, 4)


def test_dense_shape_validation():
    values, offsets = torch.arange(5), torch.tensor([0, 2, 2, 5])
    with pytest.raises(ValueError, match=r"dense_shape must have 2 entries .* got \(3,\)"):
        RaggedTensor(values, offsets, dense_shape=(3,))
    with pytest.raises(ValueError, match="dense_shape\\[0\\] must equal the batch size 3, got 4"):
        RaggedTensor(values, offsets, dense_shape=(4, -1))
    with pytest.raises(ValueError, match="dense_shape\\[1\\] must be at least the longest row"):
        RaggedTensor(values, offsets, dense_shape=(3, 2))
    with pytest.raises(ValueError, match="entries must be >= -1"):
        RaggedTensor(values, offsets, dense_shape=(3, -2))
    with pytest.raises(TypeError, match="dense_shape entries must be an int, got float"):
        RaggedTensor(values, offsets, dense_shape=(3, 2.5))
    rt = RaggedTensor(values, offsets)
    with pytest.raises(ValueError, match="at least the longest row"):
        rt.set_dim_by_rank(1, 1)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "values,offsets,exc,match",
    [
        ([1, 2], torch.tensor([0, 2]), TypeError, "values must be a Tensor, got list"),
        (torch.ones(2, 2), torch.tensor([0, 4]), ValueError, r"values must be 1-D, got shape"),
        (torch.arange(2), [0, 2], TypeError, "offsets\\[0\\] must be a Tensor, got int"),
        (torch.arange(2), "x", TypeError, "offsets must be a Tensor or a list"),
        (torch.arange(2), [], ValueError, "at least one level"),
        (torch.arange(2), torch.tensor([0.0, 2.0]), TypeError, "integer dtype, got torch.float32"),
        (torch.arange(2), torch.tensor([[0, 2]]), ValueError, "offsets\\[0\\] must be 1-D"),
        (torch.arange(2), torch.tensor([], dtype=torch.long), ValueError, "at least 1 entry"),
        (torch.arange(2), torch.tensor([1, 2]), ValueError, "must start at 0, got 1"),
        (torch.arange(3), torch.tensor([0, 2, 1, 3]), ValueError, "must be non-decreasing"),
        (torch.arange(3), torch.tensor([0, 2]), ValueError, r"end at len\(values\) = 3, got 2"),
        (
            torch.arange(3),
            [torch.tensor([0, 1, 3]), torch.tensor([0, 1, 3])],
            ValueError,
            "offsets\\[0\\] must end at the number of rows of offsets\\[1\\] .* = 2, got 3",
        ),
    ],
)
def test_construction_validation(values, offsets, exc, match):
    with pytest.raises(exc, match=match):
        RaggedTensor(values, offsets)


def test_validate_false_skips_content_checks_only():
    RaggedTensor(torch.arange(3), torch.tensor([0, 2]), validate=False)
    with pytest.raises(TypeError, match="integer dtype"):
        RaggedTensor(torch.arange(2), torch.tensor([0.0, 2.0]), validate=False)


def test_weight_validation():
    values, offsets = torch.arange(3), torch.tensor([0, 1, 3])
    with pytest.raises(TypeError, match="weight must have a floating dtype, got torch.int64"):
        RaggedTensor(values, offsets, weight=torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one entry per value \(3\), got 2"):
        RaggedTensor(values, offsets, weight=torch.ones(2))
    with pytest.raises(ValueError, match="weight must be 1-D"):
        RaggedTensor(values, offsets, weight=torch.ones(3, 1))
    with pytest.raises(TypeError, match="weight must be a Tensor or None, got list"):
        RaggedTensor(values, offsets, weight=[1.0, 1.0, 1.0])


def test_set_values_and_weight():
    rt = example(weight=False)
    rt.set_values(torch.arange(5.0))
    assert rt.dtype == torch.float32
    with pytest.raises(ValueError, match="values must have 5 entries .* got 4"):
        rt.set_values(torch.arange(4))
    rt.set_weight(torch.full((5,), 2.0))
    assert rt.weight().sum() == 10
    with pytest.raises(ValueError, match="one entry per value"):
        rt.set_weight(torch.ones(6))
    rt.set_weight(None)
    assert rt.weight() is None


def test_index_errors():
    rt = example()
    with pytest.raises(IndexError, match="dim must be in \\[-2, 1\\], got 2"):
        rt.get_shape(2)
    with pytest.raises(IndexError, match="level must be in"):
        rt.lengths(1)


# ----------------------------------------------------------------------------- dense conversion


def test_to_dense_2d():
    dense = example().to_dense()
    assert torch.equal(dense, torch.tensor([[10, 11, 0], [0, 0, 0], [12, 13, 14]]))
    dense = example().to_dense(default_value=-1)
    assert torch.equal(dense, torch.tensor([[10, 11, -1], [-1, -1, -1], [12, 13, 14]]))


def test_to_dense_3d():
    dense = two_level().to_dense(-1)
    expected = torch.tensor([[[1, -1, -1], [-1, -1, -1]], [[2, 3, 4], [-1, -1, -1]]])
    assert torch.equal(dense, expected)


def test_to_dense_int32_offsets_and_float_values():
    rt = RaggedTensor(torch.tensor([0.5, 1.5, 2.5]), torch.tensor([0, 0, 3], dtype=torch.int32))
    assert torch.equal(rt.to_dense(), torch.tensor([[0.0, 0.0, 0.0], [0.5, 1.5, 2.5]]))


def test_from_dense_trailing_padding():
    rt = RaggedTensor.from_dense(torch.tensor([[1, 0, 2, 0], [0, 0, 0, 0], [3, 4, 5, 6]]))
    assert torch.equal(rt.values(), torch.tensor([1, 0, 2, 3, 4, 5, 6]))
    assert torch.equal(rt.offsets()[0], torch.tensor([0, 3, 3, 7]))
    assert rt.dense_shape == (3, 4)
    rt = RaggedTensor.from_dense(torch.tensor([[7, -1], [-1, 8]]), pad_value=-1)
    assert torch.equal(rt.values(), torch.tensor([7, -1, 8]))
    assert torch.equal(rt.offsets()[0], torch.tensor([0, 1, 3]))


def test_from_dense_nan_padding():
    nan = float("nan")
    rt = RaggedTensor.from_dense(torch.tensor([[1.0, nan], [nan, nan]]), pad_value=nan)
    assert torch.equal(rt.values(), torch.tensor([1.0]))
    assert torch.equal(rt.offsets()[0], torch.tensor([0, 1, 1]))


def test_from_dense_3d():
    dense = torch.tensor([[[1, 0], [0, 0], [0, 0]], [[2, 3], [0, 0], [4, 0]]])
    rt = RaggedTensor.from_dense(dense)
    assert torch.equal(rt.offsets()[0], torch.tensor([0, 1, 4]))
    assert torch.equal(rt.offsets()[1], torch.tensor([0, 1, 3, 3, 4]))
    assert torch.equal(rt.values(), torch.tensor([1, 2, 3, 4]))
    assert torch.equal(rt.to_dense(), dense)


def test_from_dense_validation():
    with pytest.raises(ValueError, match="at least 2 dimensions, got shape \\(3,\\)"):
        RaggedTensor.from_dense(torch.arange(3))
    with pytest.raises(TypeError, match="dense must be a Tensor, got list"):
        RaggedTensor.from_dense([[1, 2]])


ragged_lists = st.lists(st.lists(st.integers(-5, 5), max_size=6), max_size=6)


@settings(max_examples=60, deadline=None)
@given(rows=ragged_lists, pad=st.integers(-1, 1))
def test_round_trip_from_lists(rows, pad):
    values = torch.tensor([v for r in rows for v in r], dtype=torch.int64)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    rt = RaggedTensor(values, offsets)
    dense = rt.to_dense(pad)
    assert dense.shape == (len(rows), max((len(r) for r in rows), default=0))
    for i, r in enumerate(rows):
        assert dense[i, : len(r)].tolist() == r
        assert (dense[i, len(r) :] == pad).all()
    back = RaggedTensor.from_dense(dense, pad_value=pad)
    assert torch.equal(back.to_dense(pad), dense)
    # from_dense only drops trailing pad values.
    for i, r in enumerate(rows):
        got = back.values()[back.offsets()[0][i] : back.offsets()[0][i + 1]].tolist()
        trimmed = list(r)
        while trimmed and trimmed[-1] == pad:
            trimmed.pop()
        assert got == trimmed


@settings(max_examples=40, deadline=None)
@given(
    dense=st.integers(0, 3).flatmap(
        lambda b: st.lists(
            st.lists(
                st.lists(st.sampled_from([0, 0, 1, 2]), min_size=3, max_size=3),
                min_size=2,
                max_size=2,
            ),
            min_size=b,
            max_size=b,
        )
    )
)
def test_round_trip_3d(dense):
    x = torch.tensor(dense, dtype=torch.int64).reshape(len(dense), 2, 3)
    rt = RaggedTensor.from_dense(x)
    assert rt.dim == 3
    assert torch.equal(rt.to_dense(), x)
    again = RaggedTensor(rt.values(), rt.offsets())  # re-validates the offsets
    assert torch.equal(again.values(), rt.values())


# ----------------------------------------------------------------------------- device / dtype


def test_to_dtype_converts_values_only():
    rt = RaggedTensor(
        torch.tensor([1, 2, 3]),
        torch.tensor([0, 1, 3], dtype=torch.int32),
        weight=torch.tensor([0.5, 1.0, 2.0]),
    )
    out = rt.to(torch.float64)
    assert out.dtype == torch.float64
    assert out.offsets()[0].dtype == torch.int32
    assert out.weight().dtype == torch.float32
    assert torch.equal(out.offsets()[0], rt.offsets()[0])
    assert rt.dtype == torch.int64  # original untouched
    out = rt.to("cpu", torch.int32)
    assert out.dtype == torch.int32 and out.offsets()[0].dtype == torch.int32
    out = rt.to(dtype=torch.float16)
    assert out.dtype == torch.float16
    out = rt.to(torch.zeros(1, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.weight().dtype == torch.float32


def test_to_keeps_dense_shape_and_cpu():
    rt = RaggedTensor(torch.arange(3), torch.tensor([0, 1, 3]), dense_shape=(2, 5))
    out = rt.cpu()
    assert out.shape == (2, 5) and out.device == torch.device("cpu")
    assert rt.to(torch.device("cpu"), copy=True).values() is not rt.values()


def test_to_argument_errors():
    rt = example()
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['foo'\\]"):
        rt.to(foo=1)
    with pytest.raises(TypeError, match="got unexpected argument"):
        rt.to(torch.float32, "cpu")


def test_clone_copies():
    rt = example()
    c = rt.clone()
    c.values()[0] = 99
    c.offsets()[0][1] = 1
    c.weight()[0] = 9.0
    assert rt.values()[0] == 10
    assert rt.offsets()[0][1] == 2
    assert rt.weight()[0] == 1.0
    d = copy.deepcopy(rt)
    assert torch.equal(d.values(), rt.values())


def test_from_numpy():
    rt = RaggedTensor.from_numpy(np.array([1, 2, 3]), np.array([0, 2, 3]))
    assert rt.shape == (2, 2)
    assert torch.equal(rt.to_dense(), torch.tensor([[1, 2], [3, 0]]))


def test_device_mismatch_is_rejected():
    values = torch.empty(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="offsets\\[0\\] must be on the device of values"):
        RaggedTensor(values, torch.tensor([0, 3]), validate=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    rt = example()
    g = rt.cuda()
    assert g.device.type == "cuda"
    assert all(o.device.type == "cuda" for o in g.offsets())
    assert g.weight().device.type == "cuda"
    assert torch.equal(g.to_dense().cpu(), rt.to_dense())
    back = RaggedTensor.from_dense(g.to_dense())
    assert back.device.type == "cuda"
    assert torch.equal(back.cpu().to_dense(), rt.to_dense())
    pinned = rt.pin_memory()
    assert pinned.values().is_pinned()
