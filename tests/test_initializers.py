import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recis.nn.initializers import (
    ConstantInitializer,
    Initializer,
    KaimingNormalInitializer,
    KaimingUniformInitializer,
    NormalInitializer,
    TruncNormalInitializer,
    UniformInitializer,
    XavierNormalInitializer,
    XavierUniformInitializer,
)

N = 200_000
RANDOM_CLASSES = [
    UniformInitializer,
    NormalInitializer,
    TruncNormalInitializer,
    XavierUniformInitializer,
    XavierNormalInitializer,
    KaimingUniformInitializer,
    KaimingNormalInitializer,
]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sample(init, n=N, row_shape=(16,), fan_shape=None, dtype=torch.float32):
    rows = n // math.prod(row_shape)
    return init.generate_rows(rows, row_shape, dtype, "cpu", fan_shape=fan_shape).double()


def kurtosis(x):
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def normal_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def normal_pdf(x):
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


# ----------------------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("cls", RANDOM_CLASSES + [ConstantInitializer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_generate_rows_shape_dtype_device(cls, dtype):
    init = cls()
    out = init.generate_rows(5, (3, 4), dtype, torch.device("cpu"), fan_shape=(64, 3, 4))
    assert out.shape == (5, 3, 4)
    assert out.dtype == dtype
    assert out.device.type == "cpu"
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_zero_rows(cls):
    out = cls().generate_rows(0, (8,), torch.float32, "cpu", fan_shape=(0, 8))
    assert out.shape == (0, 8)


def test_fan_shape_defaults_to_generated_shape():
    a = XavierUniformInitializer(generator=gen(1)).generate_rows(4, (8,), torch.float32, "cpu")
    b = XavierUniformInitializer(generator=gen(1)).generate_rows(
        4, (8,), torch.float32, "cpu", fan_shape=(4, 8)
    )
    assert torch.equal(a, b)


def test_float64_is_generated_in_float64():
    out = NormalInitializer(generator=gen()).generate_rows(1000, (4,), torch.float64, "cpu")
    assert out.dtype == torch.float64
    # float32 values cast to float64 would all be exactly representable in float32.
    assert not torch.equal(out, out.float().double())


# ----------------------------------------------------------------------------- constant


def test_constant_float_and_int_dtypes():
    init = ConstantInitializer(1.7)
    assert torch.equal(init.generate_rows(2, (3,), torch.float32, "cpu"), torch.full((2, 3), 1.7))
    ints = init.generate_rows(2, (3,), torch.int64, "cpu")
    assert ints.dtype == torch.int64
    assert torch.equal(ints, torch.ones(2, 3, dtype=torch.int64))
    assert ConstantInitializer().generate_rows(1, (2,), torch.int32, "cpu").sum() == 0


def test_constant_rejects_non_number():
    with pytest.raises(TypeError, match="init_val must be a number, got str"):
        ConstantInitializer("1")


# ----------------------------------------------------------------------------- distributions


def test_uniform_statistics():
    x = sample(UniformInitializer(-0.5, 1.5, generator=gen()))
    assert x.min() >= -0.5 and x.max() < 1.5
    assert abs(x.mean() - 0.5) < 0.01
    assert abs(x.std() - 2 / math.sqrt(12)) < 0.01


def test_normal_statistics():
    x = sample(NormalInitializer(mean=2.0, std=0.5, generator=gen()))
    assert abs(x.mean() - 2.0) < 0.01
    assert abs(x.std() - 0.5) < 0.01
    assert abs(kurtosis(x) - 3.0) < 0.1


def test_normal_zero_std_is_constant():
    x = sample(NormalInitializer(mean=3.0, std=0.0), n=64)
    assert torch.all(x == 3.0)


@pytest.mark.parametrize(
    "mean,std,a,b",
    [(0.0, 1.0, -2.0, 2.0), (0.0, 0.02, -0.04, 0.04), (1.0, 2.0, 0.5, 3.0), (0.0, 1.0, -6, -5)],
)
def test_trunc_normal_statistics(mean, std, a, b):
    x = sample(TruncNormalInitializer(mean, std, a, b, generator=gen()))
    assert x.min() >= a and x.max() <= b
    alpha, beta = (a - mean) / std, (b - mean) / std
    z = normal_cdf(beta) - normal_cdf(alpha)
    expected_mean = mean + std * (normal_pdf(alpha) - normal_pdf(beta)) / z
    expected_var = std**2 * (
        1
        + (alpha * normal_pdf(alpha) - beta * normal_pdf(beta)) / z
        - ((normal_pdf(alpha) - normal_pdf(beta)) / z) ** 2
    )
    assert abs(x.mean() - expected_mean) < 0.01 * std + 1e-3 * abs(expected_mean)
    assert abs(x.std() - math.sqrt(expected_var)) < 0.01 * std


def test_trunc_normal_bounds_are_absolute_like_torch():
    ours = sample(TruncNormalInitializer(mean=0.0, std=10.0, a=-1.0, b=1.0, generator=gen()))
    theirs = torch.nn.init.trunc_normal_(torch.empty(N), std=10.0, a=-1.0, b=1.0)
    assert ours.min() >= -1 and ours.max() <= 1
    assert abs(ours.std() - theirs.std()) < 0.01


def test_trunc_normal_zero_std_is_clamped_mean():
    x = sample(TruncNormalInitializer(mean=5.0, std=0.0, a=-1.0, b=1.0), n=16)
    assert torch.all(x == 1.0)


@settings(max_examples=40, deadline=None)
@given(
    mean=st.floats(-10, 10),
    std=st.floats(1e-3, 10),
    a=st.floats(-20, 20),
    width=st.floats(1e-3, 20),
    seed=st.integers(0, 2**31),
)
def test_trunc_normal_always_within_bounds(mean, std, a, width, seed):
    b = a + width
    x = TruncNormalInitializer(mean, std, a, b, generator=gen(seed)).generate_rows(
        256, (4,), torch.float32, "cpu"
    )
    assert torch.isfinite(x).all()
    assert x.min() >= a and x.max() <= b


def test_xavier_scales_from_fan_shape():
    fan_shape = (1024, 16)
    std = math.sqrt(2.0 / (1024 + 16))
    xu = sample(XavierUniformInitializer(generator=gen()), fan_shape=fan_shape)
    assert xu.abs().max() <= math.sqrt(3) * std
    assert abs(xu.std() / std - 1) < 0.02
    xn = sample(XavierNormalInitializer(gain=2.0, generator=gen()), fan_shape=fan_shape)
    assert abs(xn.std() / (2.0 * std) - 1) < 0.02


def test_reinitialising_few_rows_uses_block_scale():
    # With the block's fan_shape, 2 rows get the block's bound, not the one of a [2, 16] tensor.
    bound_block = math.sqrt(6.0 / (1024 + 16))
    init = XavierUniformInitializer(generator=gen())
    rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    assert rows.abs().max() <= bound_block
    rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(2, 16))
    assert rows.abs().max() > bound_block


def test_fans_follow_torch_convention_for_3d():
    # fan_in = 3 * 4, fan_out = 64 * 4
    x = sample(
        KaimingNormalInitializer(mode="fan_in", generator=gen()),
        row_shape=(3, 4),
        fan_shape=(64, 3, 4),
    )
    assert abs(x.std() / (math.sqrt(2) / math.sqrt(12)) - 1) < 0.02
    x = sample(
        KaimingNormalInitializer(mode="fan_out", generator=gen()),
        row_shape=(3, 4),
        fan_shape=(64, 3, 4),
    )
    assert abs(x.std() / (math.sqrt(2) / math.sqrt(256)) - 1) < 0.02


def test_kaiming_uniform_bound_and_std():
    init = KaimingUniformInitializer(nonlinearity="relu", generator=gen())
    x = sample(init, fan_shape=(512, 16))
    std = math.sqrt(2.0) / math.sqrt(16)
    assert x.abs().max() <= math.sqrt(3) * std
    assert abs(x.std() / std - 1) < 0.02
    assert abs(kurtosis(x) - 1.8) < 0.05


def test_kaiming_normal_is_normal():
    init = KaimingNormalInitializer(a=0.0, mode="fan_in", generator=gen())
    x = sample(init, fan_shape=(512, 16))
    std = math.sqrt(2.0) / math.sqrt(16)  # leaky_relu with slope 0 -> gain sqrt(2)
    assert abs(x.std() / std - 1) < 0.02
    assert abs(x.mean()) < 0.01 * std * 10
    # Uniform with the same std never exceeds sqrt(3) * std; a normal does ~4.6% of the time.
    beyond = (x.abs() > 2 * std).double().mean()
    assert 0.04 < beyond < 0.052
    assert abs(kurtosis(x) - 3.0) < 0.1


def test_kaiming_fan_out_and_leaky_slope():
    init = KaimingNormalInitializer(a=0.5, mode="fan_out", generator=gen())
    x = sample(init, fan_shape=(64, 16))
    expected = math.sqrt(2.0 / (1 + 0.5**2)) / math.sqrt(64)
    assert abs(x.std() / expected - 1) < 0.02


@pytest.mark.parametrize(
    "recis_name,torch_name",
    [
        ("liner", "linear"),
        ("sigmod", "sigmoid"),
        ("conv_1d", "conv1d"),
        ("conv_2d", "conv2d"),
        ("conv_3d", "conv3d"),
        ("conv_transpose_1d", "conv_transpose1d"),
        ("conv_transpose_2d", "conv_transpose2d"),
        ("conv_transpose_3d", "conv_transpose3d"),
    ],
)
def test_recis_nonlinearity_spellings(recis_name, torch_name):
    a = KaimingUniformInitializer(nonlinearity=recis_name)
    b = KaimingUniformInitializer(nonlinearity=torch_name)
    assert a.nonlinearity == torch_name
    assert str(a) == str(b)


def test_selu_gain():
    init = KaimingNormalInitializer(nonlinearity="selu", generator=gen())
    x = sample(init, fan_shape=(64, 16))
    assert abs(x.std() / (0.75 / 4) - 1) < 0.02


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_same_seed_same_values_and_successive_draws_differ(cls):
    a, b = cls(generator=gen(7)), cls(generator=gen(7))
    first_a = a.generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8))
    first_b = b.generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8))
    assert torch.equal(first_a, first_b)
    second_a = a.generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8))
    assert not torch.equal(first_a, second_a)
    other = cls(generator=gen(8)).generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8))
    assert not torch.equal(first_a, other)


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_str_does_not_touch_generator(cls):
    g = gen(3)
    init = cls(generator=g)
    state = g.get_state()
    s1, s2 = str(init), repr(init)
    assert s1 == s2 == str(init)
    assert torch.equal(g.get_state(), state)
    assert g.initial_seed() == 3
    ref = cls(generator=gen(3)).generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8))
    assert torch.equal(init.generate_rows(4, (8,), torch.float32, "cpu", fan_shape=(64, 8)), ref)


def test_global_rng_used_without_generator():
    init = NormalInitializer()
    torch.manual_seed(123)
    a = init.generate_rows(3, (4,), torch.float32, "cpu")
    torch.manual_seed(123)
    b = init.generate_rows(3, (4,), torch.float32, "cpu")
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- str


def test_str_is_sorted_json():
    s = str(TruncNormalInitializer(0.0, 0.5, -1.0, 1.0, generator=gen(11)))
    assert json.loads(s) == {
        "type": "TruncNormalInitializer",
        "mean": 0.0,
        "std": 0.5,
        "a": -1.0,
        "b": 1.0,
        "generator_seed": 11,
    }
    assert s == json.dumps(json.loads(s), sort_keys=True)
    assert json.loads(str(NormalInitializer()))["generator_seed"] is None
    assert json.loads(str(ConstantInitializer(2.5))) == {
        "type": "ConstantInitializer",
        "init_val": 2.5,
    }


def test_str_equality():
    assert str(NormalInitializer(0, 1, gen(5))) == str(NormalInitializer(0.0, 1.0, gen(5)))
    assert str(NormalInitializer(0, 1, gen(5))) != str(NormalInitializer(0, 1, gen(6)))
    assert str(NormalInitializer(0, 1)) != str(NormalInitializer(0, 2))
    assert str(XavierNormalInitializer()) != str(XavierUniformInitializer())


# ----------------------------------------------------------------------------- RecIS protocol


def test_recis_protocol():
    init = KaimingNormalInitializer(generator=gen(0))
    init.set_shape([100, 8])
    init.set_dtype(torch.float64)
    init.build()
    init.build()  # harmless
    assert init.impl() is init
    out = init.generate()
    assert out.shape == (100, 8) and out.dtype == torch.float64
    ref = KaimingNormalInitializer(generator=gen(0)).generate_rows(
        100, (8,), torch.float64, "cpu", fan_shape=(100, 8)
    )
    assert torch.equal(out, ref)


def test_constructor_shape_and_dtype():
    init = KaimingNormalInitializer([10, 4], torch.float16)
    assert init.generate().shape == (10, 4)
    assert init.generate().dtype == torch.float16
    assert ConstantInitializer(3, torch.int32).set_shape([2]) is None


def test_constant_generate_uses_its_dtype():
    init = ConstantInitializer(3, dtype=torch.int32)
    init.set_shape((2, 2))
    assert torch.equal(init.generate(), torch.full((2, 2), 3, dtype=torch.int32))


def test_generate_without_shape():
    with pytest.raises(ValueError, match="shape is not set"):
        NormalInitializer().generate()


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        Initializer().generate_rows(1, (1,), torch.float32, "cpu")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: NormalInitializer(std=-1.0), ValueError, "expected std >= 0, got std=-1.0"),
        (lambda: TruncNormalInitializer(std=-0.1), ValueError, "expected std >= 0"),
        (lambda: UniformInitializer(1.0, 1.0), ValueError, "expected a < b, got a=1.0"),
        (lambda: UniformInitializer(2.0, 1.0), ValueError, "expected a < b"),
        (lambda: TruncNormalInitializer(a=2.0, b=-2.0), ValueError, "expected a < b"),
        (lambda: NormalInitializer(mean=float("nan")), ValueError, "mean must be a finite"),
        (lambda: NormalInitializer(std="1"), TypeError, "std must be a real number, got str"),
        (lambda: XavierUniformInitializer(gain=-1.0), ValueError, "expected gain >= 0"),
        (lambda: KaimingUniformInitializer(mode="fan_avg"), ValueError, "mode must be 'fan_in'"),
        (lambda: KaimingNormalInitializer(mode=1), TypeError, "mode must be a str, got int"),
        (lambda: KaimingNormalInitializer(nonlinearity="gelu"), ValueError, "nonlinearity 'gelu'"),
        (lambda: NormalInitializer(generator=0), TypeError, "generator must be a torch.Generator"),
        (lambda: KaimingNormalInitializer(shape=[2, -1]), ValueError, "shape must be non-neg"),
        (lambda: ConstantInitializer(dtype="float32"), TypeError, "dtype must be a torch.dtype"),
    ],
)
def test_constructor_validation(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("cls", RANDOM_CLASSES)
def test_random_initializers_reject_integer_dtypes(cls):
    with pytest.raises(TypeError, match="needs a floating dtype, got torch.int64"):
        cls().generate_rows(2, (4,), torch.int64, "cpu", fan_shape=(8, 4))


def test_generate_rows_argument_validation():
    init = NormalInitializer()
    with pytest.raises(ValueError, match="num_rows must be non-negative, got -1"):
        init.generate_rows(-1, (4,), torch.float32, "cpu")
    with pytest.raises(TypeError, match="num_rows must be an int, got float"):
        init.generate_rows(1.5, (4,), torch.float32, "cpu")
    with pytest.raises(TypeError, match="row_shape must be a sequence"):
        init.generate_rows(1, 4, torch.float32, "cpu")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype, got str"):
        init.generate_rows(1, (4,), "float32", "cpu")
    with pytest.raises(ValueError, match="fan_shape must have at least 2 dimensions"):
        XavierUniformInitializer().generate_rows(2, (), torch.float32, "cpu", fan_shape=(2,))
    with pytest.raises(ValueError, match="fan_in must be positive"):
        KaimingUniformInitializer().generate_rows(1, (4,), torch.float32, "cpu", fan_shape=(4, 0))
