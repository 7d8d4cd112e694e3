"""Initializers for the rows of dynamic embedding tables.

An initializer describes how a new embedding row is filled the first time its ID is seen.
Tables call :meth:`Initializer.generate_rows` with the number of rows to create, the shape of
one row, the target dtype and device, and a ``fan_shape`` (normally ``(block_size, *row_shape)``)
from which Xavier and Kaiming initializers compute their fans. Because the fans come from
``fan_shape`` and not from ``num_rows``, re-initialising a handful of rows uses the same scale
as a whole block.

Random initializers take an optional :class:`torch.Generator`; when given, every draw comes
from it (and is made on the generator's device), otherwise from torch's global RNG.

Tables draw a new row from :meth:`Initializer.rows_for_ids` instead: its values are a pure
function of ``(seed, key, ID)`` (a counter-based generator: a 64-bit hash of the ID, the key
and the element's position, turned into a uniform number and then into the distribution), so
an ID starts from the same row whatever the order of insertion, the block size, the other IDs
of the batch, or the number of processes the table is sharded over.

The RecIS-style protocol (:meth:`~Initializer.set_shape`, :meth:`~Initializer.set_dtype`,
:meth:`~Initializer.build`, :meth:`~Initializer.generate`, :meth:`~Initializer.impl`) is kept
for compatibility.

Example::

    >>> import torch
    >>> from recis.nn.initializers import XavierUniformInitializer
    >>> init = XavierUniformInitializer(generator=torch.Generator().manual_seed(0))
    >>> rows = init.generate_rows(4, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    >>> rows.shape
    torch.Size([4, 16])
    >>> print(init)
    {"gain": 1.0, "generator_seed": 0, "type": "XavierUniformInitializer"}
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch

from recis._core.counter_rng import counter_uniform

__all__ = [
    "Initializer",
    "ConstantInitializer",
    "UniformInitializer",
    "NormalInitializer",
    "XavierUniformInitializer",
    "XavierNormalInitializer",
    "KaimingUniformInitializer",
    "KaimingNormalInitializer",
    "TruncNormalInitializer",
]

_TORCH_NONLINEARITIES = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
)

# RecIS spellings mapped to torch's names.
_NONLINEARITY_ALIASES = {
    "liner": "linear",
    "conv_1d": "conv1d",
    "conv_2d": "conv2d",
    "conv_3d": "conv3d",
    "conv_transpose_1d": "conv_transpose1d",
    "conv_transpose_2d": "conv_transpose2d",
    "conv_transpose_3d": "conv_transpose3d",
    "sigmod": "sigmoid",
}

_FAN_MODES = ("fan_in", "fan_out")


# ----------------------------------------------------------------------------- validation helpers


def _real(value: Any, name: str, where: str, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float after checking it is a real, non-NaN (and finite) number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (not allow_inf and math.isinf(value)):
        expected = "a non-NaN number" if allow_inf else "a finite number"
        raise ValueError(f"{where}: {name} must be {expected}, got {value}")
    return value


def _check_generator(generator: Any, where: str) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    return generator


def _check_shape(shape: Any, name: str, where: str) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(
            f"{where}: {name} must be a sequence of non-negative ints, got {type(shape).__name__}"
        )
    dims = []
    for d in shape:
        try:
            d = operator.index(d)
        except TypeError:
            raise TypeError(
                f"{where}: {name} must contain ints, got {type(d).__name__} in {tuple(shape)}"
            ) from None
        if d < 0:
            raise ValueError(f"{where}: {name} must be non-negative, got {tuple(shape)}")
        dims.append(d)
    return tuple(dims)


def _check_dtype(dtype: Any, where: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{where}: dtype must be a torch.dtype, got {type(dtype).__name__}")
    return dtype


def _compute_fans(fan_shape: tuple[int, ...], where: str) -> tuple[int, int]:
    """Fans of a tensor of shape ``fan_shape``, following torch's convention.

    ``fan_in = fan_shape[1] * receptive`` and ``fan_out = fan_shape[0] * receptive`` where
    ``receptive = prod(fan_shape[2:])``.
    """
    if len(fan_shape) < 2:
        raise ValueError(
            f"{where}: fan_shape must have at least 2 dimensions to compute fans, got {fan_shape}"
        )
    receptive = math.prod(fan_shape[2:])
    fan_in = fan_shape[1] * receptive
    fan_out = fan_shape[0] * receptive
    return fan_in, fan_out


# ----------------------------------------------------------------------------- base class


class Initializer:
    r"""Base class of embedding-row initializers.

    Subclasses implement :meth:`_sample` (random ones) or override :meth:`generate_rows`
    and :meth:`_params`.

    Args:
        shape (sequence of int, optional): shape used by :meth:`generate`. Tables do not
            need it; they call :meth:`generate_rows`. Default: ``None``.
        dtype (torch.dtype): dtype used by :meth:`generate`. Default: ``torch.float32``.
        generator (torch.Generator, optional): source of randomness of random initializers.
            ``None`` uses torch's global RNG. Default: ``None``.

    Example::

        >>> init = NormalInitializer(std=0.01)
        >>> init.set_shape([8, 4])
        >>> init.build()
        >>> init.generate().shape
        torch.Size([8, 4])
    """

    #: whether the initializer draws random numbers (and so has a ``generator``).
    is_random: bool = False

    def __init__(
        self,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        where = type(self).__name__
        self._shape = None if shape is None else _check_shape(shape, "shape", where)
        self._dtype = _check_dtype(dtype, where)
        self._generator = _check_generator(generator, where)

    # -- public attributes ------------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator | None:
        """The generator used for sampling, or ``None`` for torch's global RNG."""
        return self._generator

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape used by :meth:`generate` (``None`` until set)."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype used by :meth:`generate`."""
        return self._dtype

    # -- core interface ---------------------------------------------------------------------------

    def generate_rows(
        self,
        num_rows: int,
        row_shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        fan_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        r"""Create ``num_rows`` freshly initialised rows.

        Random values are drawn in ``float32`` (``float64`` when ``dtype`` is ``float64``) and
        cast to ``dtype``. With a generator, values are drawn on the generator's device and
        then moved to ``device``.

        Args:
            num_rows (int): number of rows to create.
            row_shape (sequence of int): shape of one row, e.g. ``(embedding_dim,)``.
            dtype (torch.dtype): dtype of the result. Random initializers require a floating
                dtype.
            device (torch.device or str, optional): device of the result. Default: CPU.
            fan_shape (sequence of int, optional): shape from which Xavier/Kaiming fans are
                computed as for a weight tensor of that shape (for ``[B, D]``:
                ``fan_in = D``, ``fan_out = B``). Default: ``(num_rows, *row_shape)``.

        Returns:
            Tensor of shape ``[num_rows, *row_shape]``.

        Example::

            >>> ConstantInitializer(1.0).generate_rows(2, (3,), torch.float16, "cpu")
            tensor([[1., 1., 1.],
                    [1., 1., 1.]], dtype=torch.float16)
        """
        where = f"{type(self).__name__}.generate_rows"
        try:
            num_rows = operator.index(num_rows)
        except TypeError:
            raise TypeError(
                f"{where}: num_rows must be an int, got {type(num_rows).__name__}"
            ) from None
        if num_rows < 0:
            raise ValueError(f"{where}: num_rows must be non-negative, got {num_rows}")
        row_shape = _check_shape(row_shape, "row_shape", where)
        dtype = _check_dtype(dtype, where)
        device = torch.device("cpu") if device is None else torch.device(device)
        shape = (num_rows, *row_shape)
        fan_shape = shape if fan_shape is None else _check_shape(fan_shape, "fan_shape", where)

        if not self.is_random:
            return self._fill(shape, dtype, device)

        if not dtype.is_floating_point:
            raise TypeError(f"{where}: {type(self).__name__} needs a floating dtype, got {dtype}")
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        sample_device = device if self._generator is None else self._generator.device
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        out = self._sample(shape, compute_dtype, sample_device, fan_shape)
        return out.to(device=device, dtype=dtype)

    def rows_for_ids(
        self,
        ids: torch.Tensor,
        keys: torch.Tensor | int,
        row_shape: Sequence[int],
        dtype: torch.dtype,
        fan_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        r"""Initial rows of ``ids`` as a pure function of ``(key, id)``.

        Each value comes from a counter-based generator (:func:`counter_uniform`): no state
        is consumed, so the row of an ID does not depend on which other IDs are drawn, in
        which order, on which device or in which process. Tables pass ``keys`` derived from
        their seed and the ID's logical table, so two tables give an ID different rows.

        Args:
            ids (Tensor): ``(n,)`` int64 IDs; the result is on their device.
            keys (Tensor or int): one int64 key per ID, or one for all.
            row_shape (sequence of int): shape of one row.
            dtype (torch.dtype): dtype of the result (random initializers: floating).
            fan_shape (sequence of int, optional): as in :meth:`generate_rows`. Default:
                ``(n, *row_shape)``.

        Returns:
            Tensor of shape ``[n, *row_shape]``.

        Example::

            >>> init = NormalInitializer(std=0.1)
            >>> a = init.rows_for_ids(torch.tensor([7, 8]), 1, (4,), torch.float32)
            >>> torch.equal(a[1], init.rows_for_ids(torch.tensor([8]), 1, (4,), torch.float32)[0])
            True
        """
        row_shape = _check_shape(row_shape, "row_shape", f"{type(self).__name__}.rows_for_ids")
        shape = (ids.numel(), *row_shape)
        if not self.is_random:
            return self._fill(shape, dtype, ids.device)
        if not dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} needs a floating dtype, got {dtype}")
        fan_shape = shape if fan_shape is None else tuple(fan_shape)
        u = counter_uniform(ids.reshape(-1), keys, math.prod(row_shape)).view(shape)
        return self._from_uniform(u, fan_shape).to(dtype)

    def _from_uniform(self, u: torch.Tensor, fan_shape: tuple[int, ...]) -> torch.Tensor:
        """Random initializers turn uniform numbers in (0, 1) (float64) into their
        distribution here (inverse CDF), for :meth:`rows_for_ids`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _from_uniform")

    @property
    def seed(self) -> int | None:
        """The generator's seed (None without a generator): tables mix it into their keys."""
        return None if self._generator is None else self._generator.initial_seed()

    def _fill(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """Deterministic initializers build their rows here."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _fill")

    def _sample(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        fan_shape: tuple[int, ...],
    ) -> torch.Tensor:
        """Random initializers draw a tensor of ``shape`` in ``dtype`` on ``device`` here."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _sample")

    def _params(self) -> dict[str, Any]:
        """Parameters that define the distribution (shown by ``str``)."""
        return {}

    # -- RecIS compatibility protocol -------------------------------------------------------------

    def set_shape(self, shape: Sequence[int]) -> None:
        """Set the shape used by :meth:`generate`.

        Args:
            shape (sequence of int): full shape; ``shape[0]`` is the number of rows.
        """
        self._shape = _check_shape(shape, "shape", f"{type(self).__name__}.set_shape")

    def set_dtype(self, dtype: torch.dtype = torch.float32) -> None:
        """Set the dtype used by :meth:`generate`.

        Args:
            dtype (torch.dtype): Default: ``torch.float32``.
        """
        self._dtype = _check_dtype(dtype, f"{type(self).__name__}.set_dtype")

    def build(self) -> None:
        """Kept for RecIS compatibility; does nothing and may be called any number of times."""

    def impl(self) -> Initializer:
        """Return ``self`` (RecIS returns a backend object here)."""
        return self

    def generate(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Return a tensor of the shape set by :meth:`set_shape` and dtype :attr:`dtype`.

        Equivalent to ``generate_rows(shape[0], shape[1:], dtype, device, fan_shape=shape)``.

        Args:
            device (torch.device or str, optional): device of the result. Default: CPU.
        """
        if self._shape is None:
            raise ValueError(
                f"{type(self).__name__}.generate: shape is not set; call set_shape(shape) "
                "or pass shape to the constructor first"
            )
        if len(self._shape) == 0:
            raise ValueError(
                f"{type(self).__name__}.generate: shape must have at least 1 dimension "
                "(the number of rows), got ()"
            )
        return self.generate_rows(
            self._shape[0], self._shape[1:], self._dtype, device, fan_shape=self._shape
        )

    # -- description ------------------------------------------------------------------------------

    def __str__(self) -> str:
        desc: dict[str, Any] = {"type": type(self).__name__, **self._params()}
        if self.is_random:
            # initial_seed() only reads the seed; it neither reseeds nor consumes the generator.
            desc["generator_seed"] = (
                None if self._generator is None else self._generator.initial_seed()
            )
        return json.dumps(desc, sort_keys=True)

    __repr__ = __str__


# ----------------------------------------------------------------------------- deterministic


class ConstantInitializer(Initializer):
    r"""Fill rows with a constant value.

    Works for every dtype: the value is cast to the table's dtype (e.g. ``1.7`` becomes ``1``
    in an ``int64`` table).

    Args:
        init_val (float): the value. Default: ``0.0``.
        dtype (torch.dtype): dtype used by :meth:`generate`. Default: ``torch.float32``.

    Example::

        >>> ConstantInitializer(0.5).generate_rows(1, (2,), torch.float32, "cpu")
        tensor([[0.5000, 0.5000]])
    """

    def __init__(self, init_val: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype=dtype)
        if not isinstance(init_val, numbers.Number):
            raise TypeError(
                f"ConstantInitializer: init_val must be a number, got {type(init_val).__name__}"
            )
        self.init_val = init_val

    def _fill(self, shape, dtype, device):
        return torch.full(shape, self.init_val, dtype=dtype, device=device)

    def _params(self):
        value = self.init_val
        if isinstance(value, complex):
            value = [value.real, value.imag]
        elif not isinstance(value, (bool, int, float)):
            value = value.item() if hasattr(value, "item") else float(value)
        return {"init_val": value}


# ----------------------------------------------------------------------------- plain random


class UniformInitializer(Initializer):
    r"""Draw from the uniform distribution :math:`\mathcal{U}(a, b)`.

    Args:
        a (float): lower bound. Default: ``0.0``.
        b (float): upper bound, must exceed ``a``. Default: ``1.0``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> rows = UniformInitializer(-0.1, 0.1).generate_rows(8, (4,), torch.float32, "cpu")
    """

    is_random = True

    def __init__(
        self, a: float = 0.0, b: float = 1.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(generator=generator)
        self.a = _real(a, "a", "UniformInitializer")
        self.b = _real(b, "b", "UniformInitializer")
        if not self.a < self.b:
            raise ValueError(f"UniformInitializer: expected a < b, got a={self.a} and b={self.b}")

    def _sample(self, shape, dtype, device, fan_shape):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.uniform_(self.a, self.b, generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        return u * (self.b - self.a) + self.a

    def _params(self):
        return {"a": self.a, "b": self.b}


class NormalInitializer(Initializer):
    r"""Draw from the normal distribution :math:`\mathcal{N}(\text{mean}, \text{std}^2)`.

    Args:
        mean (float): mean. Default: ``0.0``.
        std (float): standard deviation, ``>= 0``. Default: ``1.0``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> rows = NormalInitializer(std=0.01).generate_rows(8, (4,), torch.float32, "cpu")
    """

    is_random = True

    def __init__(
        self, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(generator=generator)
        self.mean = _real(mean, "mean", "NormalInitializer")
        self.std = _real(std, "std", "NormalInitializer")
        if self.std < 0:
            raise ValueError(f"NormalInitializer: expected std >= 0, got std={self.std}")

    def _sample(self, shape, dtype, device, fan_shape):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(self.mean, self.std, generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        return torch.special.ndtri(u) * self.std + self.mean

    def _params(self):
        return {"mean": self.mean, "std": self.std}


class TruncNormalInitializer(Initializer):
    r"""Draw from a normal distribution truncated to ``[a, b]``.

    Like :func:`torch.nn.init.trunc_normal_`, ``a`` and ``b`` are absolute bounds on the
    values, not multiples of ``std``. Sampling uses the inverse normal CDF
    (:func:`torch.special.ndtri`) applied to uniform draws, so it consumes exactly one uniform
    draw per value from the generator and never loops.

    Args:
        mean (float): mean of the underlying normal. Default: ``0.0``.
        std (float): standard deviation of the underlying normal, ``>= 0``. Default: ``1.0``.
        a (float): lower bound. Default: ``-2.0``.
        b (float): upper bound, must exceed ``a``. Default: ``2.0``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> init = TruncNormalInitializer(std=0.02, a=-0.04, b=0.04)
        >>> rows = init.generate_rows(8, (4,), torch.float32, "cpu")
        >>> bool(rows.abs().max() <= 0.04)
        True
    """

    is_random = True

    def __init__(
        self,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator=generator)
        where = "TruncNormalInitializer"
        self.mean = _real(mean, "mean", where)
        self.std = _real(std, "std", where)
        self.a = _real(a, "a", where, allow_inf=True)
        self.b = _real(b, "b", where, allow_inf=True)
        if self.std < 0:
            raise ValueError(f"{where}: expected std >= 0, got std={self.std}")
        if not self.a < self.b:
            raise ValueError(f"{where}: expected a < b, got a={self.a} and b={self.b}")

    def _from_uniform(self, u, fan_shape):
        return self._truncated(u, u.shape, u.dtype, u.device)

    def _sample(self, shape, dtype, device, fan_shape):
        return self._truncated(None, shape, dtype, device)

    def _truncated(self, u, shape, dtype, device):
        """Inverse-CDF sampling of the truncated normal from ``u`` (drawn from the generator
        when None)."""
        if self.std == 0.0:
            value = min(max(self.mean, self.a), self.b)
            return torch.full(shape, value, dtype=dtype, device=device)

        alpha = (self.a - self.mean) / self.std
        beta = (self.b - self.mean) / self.std
        # Work in the lower tail, where small CDF values are represented precisely: an interval
        # lying above the mean is sampled as its mirror image and negated afterwards.
        flip = alpha > 0.0
        if flip:
            alpha, beta = -beta, -alpha

        def normal_cdf(x: float) -> float:
            return 0.5 * math.erfc(-x / math.sqrt(2.0))

        p_lo, p_hi = normal_cdf(alpha), normal_cdf(beta)
        finfo = torch.finfo(dtype)
        # p ~ U(p_lo, p_hi), kept inside (0, 1) so the inverse CDF stays finite.
        if u is None:
            p = torch.empty(shape, dtype=dtype, device=device)
            p.uniform_(0.0, 1.0, generator=self._generator)
        else:
            p = u.clone()
        p.mul_(p_hi - p_lo).add_(p_lo).clamp_(finfo.tiny, 1.0 - finfo.eps / 2)
        z = torch.special.ndtri(p)
        if flip:
            z.neg_()
        out = z.mul_(self.std).add_(self.mean)
        return out.clamp_(min=self.a, max=self.b)

    def _params(self):
        return {"a": self.a, "b": self.b, "mean": self.mean, "std": self.std}


# ----------------------------------------------------------------------------- fan-scaled


class XavierUniformInitializer(Initializer):
    r"""Glorot/Xavier uniform: :math:`\mathcal{U}(-r, r)`,
    :math:`r = \text{gain}\sqrt{6 / (\text{fan\_in} + \text{fan\_out})}`.

    Fans are computed from ``fan_shape`` (see :meth:`Initializer.generate_rows`).

    Args:
        gain (float): scaling factor, ``>= 0``. Default: ``1.0``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> init = XavierUniformInitializer()
        >>> rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    """

    is_random = True

    def __init__(self, gain: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__(generator=generator)
        self.gain = _real(gain, "gain", type(self).__name__)
        if self.gain < 0:
            raise ValueError(f"{type(self).__name__}: expected gain >= 0, got gain={self.gain}")

    def _std(self, fan_shape: tuple[int, ...]) -> float:
        fan_in, fan_out = _compute_fans(fan_shape, f"{type(self).__name__}.generate_rows")
        if fan_in + fan_out == 0:
            raise ValueError(
                f"{type(self).__name__}.generate_rows: fan_in + fan_out must be positive, "
                f"got fan_shape={fan_shape}"
            )
        return self.gain * math.sqrt(2.0 / (fan_in + fan_out))

    def _sample(self, shape, dtype, device, fan_shape):
        bound = math.sqrt(3.0) * self._std(fan_shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.uniform_(-bound, bound, generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        bound = math.sqrt(3.0) * self._std(fan_shape)
        return u * (2 * bound) - bound

    def _params(self):
        return {"gain": self.gain}


class XavierNormalInitializer(XavierUniformInitializer):
    r"""Glorot/Xavier normal: :math:`\mathcal{N}(0, \sigma^2)`,
    :math:`\sigma = \text{gain}\sqrt{2 / (\text{fan\_in} + \text{fan\_out})}`.

    Fans are computed from ``fan_shape`` (see :meth:`Initializer.generate_rows`).

    Args:
        gain (float): scaling factor, ``>= 0``. Default: ``1.0``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> init = XavierNormalInitializer(gain=0.5)
        >>> rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    """

    def _sample(self, shape, dtype, device, fan_shape):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, self._std(fan_shape), generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        return torch.special.ndtri(u) * self._std(fan_shape)


class KaimingUniformInitializer(Initializer):
    r"""He/Kaiming uniform: :math:`\mathcal{U}(-r, r)`,
    :math:`r = \text{gain}\sqrt{3 / \text{fan\_mode}}`.

    ``gain`` is :func:`torch.nn.init.calculate_gain` of ``nonlinearity`` (with negative slope
    ``a`` for ``"leaky_relu"``); ``fan_mode`` is ``fan_in`` or ``fan_out`` of ``fan_shape``.

    Args:
        a (float): negative slope of the rectifier after this layer (``"leaky_relu"`` only).
            Default: ``0.0``.
        mode (str): ``"fan_in"`` (preserve forward variance) or ``"fan_out"`` (backward).
            Default: ``"fan_in"``.
        nonlinearity (str): one of torch's names (``"linear"``, ``"conv1d"``, ...,
            ``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"leaky_relu"``, ``"selu"``); RecIS's
            spellings (``"liner"``, ``"conv_1d"``, ``"sigmod"``, ...) are accepted too.
            Default: ``"leaky_relu"``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> init = KaimingUniformInitializer(nonlinearity="relu")
        >>> rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    """

    is_random = True

    def __init__(
        self,
        a: float = 0.0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(shape=shape, dtype=dtype, generator=generator)
        where = type(self).__name__
        self.a = _real(a, "a", where)
        if not isinstance(mode, str):
            raise TypeError(f"{where}: mode must be a str, got {type(mode).__name__}")
        if mode not in _FAN_MODES:
            raise ValueError(f"{where}: mode must be 'fan_in' or 'fan_out', got {mode!r}")
        self.mode = mode
        if not isinstance(nonlinearity, str):
            raise TypeError(
                f"{where}: nonlinearity must be a str, got {type(nonlinearity).__name__}"
            )
        canonical = _NONLINEARITY_ALIASES.get(nonlinearity, nonlinearity)
        if canonical not in _TORCH_NONLINEARITIES:
            accepted = ", ".join(_TORCH_NONLINEARITIES + tuple(_NONLINEARITY_ALIASES))
            raise ValueError(
                f"{where}: unsupported nonlinearity {nonlinearity!r}; expected one of {accepted}"
            )
        self.nonlinearity = canonical

    def _std(self, fan_shape: tuple[int, ...]) -> float:
        where = f"{type(self).__name__}.generate_rows"
        fan_in, fan_out = _compute_fans(fan_shape, where)
        fan = fan_in if self.mode == "fan_in" else fan_out
        if fan == 0:
            raise ValueError(f"{where}: {self.mode} must be positive, got fan_shape={fan_shape}")
        gain = torch.nn.init.calculate_gain(self.nonlinearity, self.a)
        return gain / math.sqrt(fan)

    def _sample(self, shape, dtype, device, fan_shape):
        bound = math.sqrt(3.0) * self._std(fan_shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.uniform_(-bound, bound, generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        bound = math.sqrt(3.0) * self._std(fan_shape)
        return u * (2 * bound) - bound

    def _params(self):
        return {"a": self.a, "mode": self.mode, "nonlinearity": self.nonlinearity}


class KaimingNormalInitializer(KaimingUniformInitializer):
    r"""He/Kaiming normal: :math:`\mathcal{N}(0, \sigma^2)`,
    :math:`\sigma = \text{gain} / \sqrt{\text{fan\_mode}}`.

    Unlike RecIS (whose version draws from a uniform distribution), this draws from a normal
    distribution, as :func:`torch.nn.init.kaiming_normal_` does.

    Args:
        shape (sequence of int, optional): shape used by :meth:`generate`. Default: ``None``.
        dtype (torch.dtype): dtype used by :meth:`generate`. Default: ``torch.float32``.
        a (float): negative slope of the rectifier (``"leaky_relu"`` only). Default: ``0.0``.
        mode (str): ``"fan_in"`` or ``"fan_out"``. Default: ``"fan_in"``.
        nonlinearity (str): see :class:`KaimingUniformInitializer`. Default: ``"leaky_relu"``.
        generator (torch.Generator, optional): source of randomness. Default: ``None``.

    Example::

        >>> init = KaimingNormalInitializer(mode="fan_out", nonlinearity="relu")
        >>> rows = init.generate_rows(2, (16,), torch.float32, "cpu", fan_shape=(1024, 16))
    """

    def __init__(
        self,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        a: float = 0.0,
        mode: str = "fan_in",
        nonlinearity: str = "leaky_relu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            a=a,
            mode=mode,
            nonlinearity=nonlinearity,
            generator=generator,
            shape=shape,
            dtype=dtype,
        )

    def _sample(self, shape, dtype, device, fan_shape):
        out = torch.empty(shape, dtype=dtype, device=device)
        return out.normal_(0.0, self._std(fan_shape), generator=self._generator)

    def _from_uniform(self, u, fan_shape):
        return torch.special.ndtri(u) * self._std(fan_shape)
