"""Feature ops: the steps of a :class:`~recis.features.Feature` pipeline.

Each op is an ``nn.Module`` whose ``forward`` takes one input (a dense tensor, a
:class:`~recis.ragged.RaggedTensor`, or for the selecting ops the batch dict) and returns the
transformed value. :meth:`_Op.config` describes an op's settings (the engine deduplicates
features with equal pipelines by it) and :meth:`_Op.run_fused` runs several ops of one type
over several features' inputs at once (what :class:`~recis.features.FeatureEngine` calls
for each step). Semantics follow RecIS's ``recis/features/op.py``; where this module departs
from it, the op's docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from recis.ragged.tensor import RaggedTensor
from recis.utils.checks import check_positive_int

from . import hash_kernels

__all__ = [
    "SelectField", "SelectFields", "Mod", "Bucketize", "FeatureCross", "SequenceTruncate",
    "IDMultiHash", "Hash", "Int64ToString",
]

_INT64_MAX = (1 << 63) - 1


def _ragged(values: torch.Tensor, offsets: list[torch.Tensor], weight: torch.Tensor | None,
            dense_shape: Sequence[int] | None = None) -> RaggedTensor:
    """A RaggedTensor from parts that an op derived from a validated input."""
    return RaggedTensor(values, offsets, weight, dense_shape, validate=False)


def _values_of(x: Any, where: str) -> torch.Tensor:
    """The flat values of a dense tensor or a RaggedTensor (TypeError for anything else)."""
    if isinstance(x, RaggedTensor):
        return x.values()
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)
    raise TypeError(f"{where}: input must be a Tensor or RaggedTensor, got {type(x).__name__}")


def _with_values(x: Any, values: torch.Tensor) -> Any:
    """``x`` with its values replaced by ``values`` (offsets, weight, shape kept)."""
    if isinstance(x, RaggedTensor):
        return _ragged(values, x.offsets(), x.weight(), x.dense_shape)
    return values.reshape(x.shape)


def _check_int64_values(x: Any, where: str) -> torch.Tensor:
    values = _values_of(x, where)
    if values.dtype != torch.int64:
        raise TypeError(f"{where}: input values must be int64 IDs, got {values.dtype}")
    return values


def uint64_mod(values: torch.Tensor, mod: torch.Tensor | int) -> torch.Tensor:
    """``values`` read as uint64, modulo ``mod`` (1 <= mod < 2**63), as int64.

    Works on any device with int64 arithmetic only: ``x mod m`` for ``x >= 0``, and
    ``(x + 2**64) mod m`` for ``x < 0``, computed as ``(x mod m + 2**64 mod m) mod m``.

    Example::

        >>> uint64_mod(torch.tensor([7, -1]), 10)   # -1 is 2**64 - 1
        tensor([7, 5])
    """
    m = torch.as_tensor(mod, dtype=torch.int64, device=values.device)
    low = torch.remainder(values, m)  # in [0, m) for m > 0 (floor modulo)
    half = torch.remainder(torch.full_like(m, _INT64_MAX), m) + 1  # 2**63 mod m, maybe == m
    half = torch.where(half == m, torch.zeros_like(half), half)
    wrap = half - (m - half)  # 2**64 mod m, without overflow
    wrap = torch.where(wrap < 0, wrap + m, wrap)
    shifted = low - (m - wrap)  # low + wrap - m
    shifted = torch.where(shifted < 0, shifted + m, shifted)
    return torch.where(values < 0, shifted, low)


class _Op(nn.Module):
    """Base of the feature ops: a configuration for deduplication, and fused execution."""

    def config(self) -> dict[str, Any]:
        """The settings that define what this op computes (equal configs: equal results)."""
        raise NotImplementedError

    def signature(self) -> tuple[str, str]:
        """``(op type, config)`` as hashable text; equal signatures compute the same thing."""
        return type(self).__name__, repr(sorted(self.config().items()))

    @classmethod
    def run_fused(cls, ops: Sequence[_Op], inputs: Sequence[Any]) -> list[Any]:
        """Run ``ops[i]`` on ``inputs[i]`` for every i; subclasses batch the work."""
        return [op(x) for op, x in zip(ops, inputs, strict=True)]


class SelectField(_Op):
    """Pick one column of the batch dict: ``data[name]``; the first op of a feature.

    Args:
        name (str): the key in the batch.
        dtype (torch.dtype): the column's expected dtype, recorded in the config (as RecIS,
            the value is not converted). Default: ``torch.long``.
        dim (int, optional): when given, the rank a RaggedTensor column must have (its
            ``dim``); a column of another rank is a ValueError. Default: ``None``.
        from_dict (bool): ``False`` takes the input itself instead of ``data[name]``.
            Default: ``True``.

    Example::

        >>> SelectField("user_id")({"user_id": torch.tensor([3, 4])})
        tensor([3, 4])
    """

    def __init__(self, name: str, dtype: torch.dtype = torch.long, dim: int | None = None,
                 from_dict: bool = True):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise TypeError(f"SelectField: name must be a non-empty str, got {name!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"SelectField: dtype must be a torch.dtype, got {dtype!r}")
        if dim is not None:
            check_positive_int(dim, "dim", where="SelectField")
        self.name = name
        self.dtype = dtype
        self.dim = dim
        self.from_dict = bool(from_dict)

    def forward(self, data: Any) -> Any:
        where = f"SelectField({self.name!r})"
        if self.from_dict:
            if not isinstance(data, dict):
                raise TypeError(f"{where}: data must be a dict, got {type(data).__name__}")
            if self.name not in data:
                raise KeyError(f"{where}: the batch has no column {self.name!r}; it has "
                               f"{sorted(data)}")
            x = data[self.name]
        else:
            x = data
        if self.dim is not None and isinstance(x, RaggedTensor) and x.dim != self.dim:
            raise ValueError(f"{where}: dim={self.dim} expects a RaggedTensor of rank "
                             f"{self.dim}, got rank {x.dim}")
        return x

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.dtype), "dim": self.dim,
                "from_dict": self.from_dict}


class SelectFields(_Op):
    """Pick several columns: a list with one :class:`SelectField` result per entry.

    Args:
        input_list (list): :class:`SelectField` ops, or column names (each becomes
            ``SelectField(name)``).

    Example::

        >>> SelectFields(["a", "b"])({"a": torch.tensor([1]), "b": torch.tensor([2])})
        [tensor([1]), tensor([2])]
    """

    def __init__(self, input_list: Sequence[SelectField | str]):
        super().__init__()
        if isinstance(input_list, (str, bytes)) or not isinstance(input_list, Sequence) \
                or not input_list:
            raise TypeError("SelectFields: input_list must be a non-empty list of SelectField "
                            f"or column names, got {input_list!r}")
        fields = []
        for item in input_list:
            if isinstance(item, str):
                item = SelectField(item)
            if not isinstance(item, SelectField):
                raise TypeError("SelectFields: input_list entries must be SelectField or str, "
                                f"got {type(item).__name__}")
            fields.append(item)
        self.input_list = nn.ModuleList(fields)

    def forward(self, data: Any) -> list[Any]:
        return [field(data) for field in self.input_list]

    def config(self) -> dict[str, Any]:
        return {"inputs": [field.signature() for field in self.input_list]}


class Mod(_Op):
    """``x mod mod_value`` with ``x`` read as an unsigned 64-bit integer (as RecIS's
    ``(uint64)x % mod``), on dense tensors or on a RaggedTensor's values.

    Args:
        mod_value (int): the modulus, in ``[1, 2**63)``.

    Example::

        >>> Mod(10)(torch.tensor([17, -1]))   # -1 is 2**64 - 1 = 18446744073709551615
        tensor([7, 5])
    """

    def __init__(self, mod_value: int):
        super().__init__()
        check_positive_int(mod_value, "mod_value", where="Mod")
        if mod_value > _INT64_MAX:
            raise ValueError(f"Mod: mod_value must be < 2**63, got {mod_value}")
        self.mod_value = mod_value

    def forward(self, x: Any) -> Any:
        return self.run_fused([self], [x])[0]

    def config(self) -> dict[str, Any]:
        return {"mod": self.mod_value}

    @classmethod
    def run_fused(cls, ops: Sequence[Mod], inputs: Sequence[Any]) -> list[Any]:
        """One kernel call over all inputs' values together, each with its own modulus
        (CPU); the int64 formula of :func:`uint64_mod` on other devices."""
        values = [_check_int64_values(x, "Mod") for x in inputs]
        if any(v.device.type != "cpu" for v in values):
            return [_with_values(x, uint64_mod(v, op.mod_value))
                    for op, x, v in zip(ops, inputs, values, strict=True)]
        sizes = [v.numel() for v in values]
        out = hash_kernels.uint64_mod_segments(
            torch.cat(values).numpy(), np.cumsum([0, *sizes]),
            np.array([op.mod_value for op in ops], np.int64))
        parts = torch.from_numpy(out).split(sizes)
        return [_with_values(x, part) for x, part in zip(inputs, parts, strict=True)]


class Bucketize(_Op):
    """Bucket index of each value: the number of boundaries ``<=`` x, i.e. the index of the
    first boundary strictly greater than x (``len(boundary)`` when there is none; NaN also
    goes to the last bucket, as RecIS's kernel puts it). Values and boundaries are compared
    as float32, as RecIS does. Output: int64, same layout as the input.

    Args:
        boundary (list of float or Tensor): ascending boundaries.

    Example::

        >>> Bucketize([18, 25, 35])(torch.tensor([10, 18, 30, 99]))
        tensor([0, 1, 2, 3])
    """

    def __init__(self, boundary: Sequence[float] | torch.Tensor):
        super().__init__()
        if isinstance(boundary, torch.Tensor):
            bounds = boundary.detach().to("cpu", torch.float32).reshape(-1)
        elif isinstance(boundary, Sequence) and not isinstance(boundary, (str, bytes)):
            try:
                bounds = torch.tensor([float(b) for b in boundary], dtype=torch.float32)
            except (TypeError, ValueError):
                raise TypeError(f"Bucketize: boundary must hold numbers, got {boundary!r}") \
                    from None
        else:
            raise TypeError(f"Bucketize: boundary must be a list of numbers or a Tensor, got "
                            f"{type(boundary).__name__}")
        if bounds.numel() == 0:
            raise ValueError("Bucketize: boundary must have at least one value, got []")
        if bool(torch.isnan(bounds).any()) or bool((bounds[1:] < bounds[:-1]).any()):
            raise ValueError(f"Bucketize: boundary must be ascending numbers, got "
                             f"{bounds.tolist()}")
        self.register_buffer("boundary", bounds, persistent=False)

    def forward(self, x: Any) -> Any:
        return self.run_fused([self], [x])[0]

    def config(self) -> dict[str, Any]:
        return {"boundary": self.boundary.tolist()}

    @classmethod
    def run_fused(cls, ops: Sequence[Bucketize], inputs: Sequence[Any]) -> list[Any]:
        """One kernel call over all inputs' values, each with its own boundaries."""
        values = [_values_of(x, "Bucketize").to("cpu", torch.float32) for x in inputs]
        sizes = [v.numel() for v in values]
        value_offsets = np.cumsum([0, *sizes])
        bounds = [op.boundary for op in ops]
        bound_offsets = np.cumsum([0, *(b.numel() for b in bounds)])
        index = hash_kernels.bucketize_segments(
            torch.cat(values).numpy(), value_offsets, torch.cat(bounds).numpy(), bound_offsets)
        parts = torch.from_numpy(index).split(sizes)
        return [_with_values(x, part.to(_values_of(x, "Bucketize").device))
                for x, part in zip(inputs, parts, strict=True)]


class FeatureCross(_Op):
    """Cross two ragged ID features row by row (input: a list of two 2-D RaggedTensors).

    Within each row, each side's IDs are deduplicated (an ID keeps the weight of its first
    occurrence) and every pair ``(x, y)`` becomes the ID ``murmur64([x, y])``, the
    MurmurHash64A (seed 0) of the pair's 16 little-endian bytes, with weight ``w_x * w_y``
    (a side without weights counts 1). Only the first ``min(rows_x, rows_y)`` rows are
    crossed. Pairs are ordered by ascending x, then ascending y (RecIS's GPU order; its CPU
    kernel leaves the order to a hash map). Without weights on either side the output has
    none.

    Example::

        >>> x = RaggedTensor(torch.tensor([1, 2, 2]), torch.tensor([0, 3]))
        >>> y = RaggedTensor(torch.tensor([7]), torch.tensor([0, 1]))
        >>> FeatureCross()([x, y]).offsets()
        [tensor([0, 2])]
    """

    def forward(self, data: Sequence[RaggedTensor]) -> RaggedTensor:
        where = "FeatureCross"
        if not isinstance(data, (list, tuple)) or len(data) != 2:
            raise TypeError(f"{where}: input must be a list of two RaggedTensors "
                            f"(e.g. from SelectFields), got {type(data).__name__}")
        for side, rt in zip("xy", data, strict=True):
            if not isinstance(rt, RaggedTensor):
                raise TypeError(f"{where}: input {side} must be a RaggedTensor, got "
                                f"{type(rt).__name__}")
            if rt.dtype != torch.int64:
                raise TypeError(f"{where}: input {side} must hold int64 IDs, got {rt.dtype}")
        x, y = data
        rows = min(x.offsets()[-1].numel(), y.offsets()[-1].numel()) - 1
        weighted = x.weight() is not None or y.weight() is not None
        wdtype = (x.weight() if x.weight() is not None else
                  y.weight() if y.weight() is not None else torch.ones(0)).dtype

        def side(rt: RaggedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            values = rt.values().cpu().numpy()
            weight = rt.weight()
            weight = (torch.ones(values.shape[0], dtype=wdtype) if weight is None
                      else weight.cpu().to(wdtype))
            return values, rt.offsets()[-1].cpu().to(torch.int64).numpy(), weight.numpy()

        out, offsets, out_w = hash_kernels.feature_cross(*side(x), *side(y), rows)
        device = x.device
        return _ragged(torch.from_numpy(out).to(device),
                       [torch.from_numpy(offsets).to(device, x.offsets()[-1].dtype)],
                       torch.from_numpy(out_w).to(device) if weighted else None)

    def config(self) -> dict[str, Any]:
        return {}


class SequenceTruncate(_Op):
    """Keep at most ``seq_len`` items of every sequence.

    2-D input ``[B, L]`` (``n_dims=2``): each row keeps ``seq_len`` values; 3-D input
    ``[B, L, K]`` (``n_dims=3``): each row keeps ``seq_len`` inner lists, and its outer
    offsets are padded so that every row has exactly ``seq_len`` inner lists (the missing
    ones empty, at the end), as RecIS's 3-D kernel does. ``truncate_side="left"`` drops from
    the left (keeps the tail, the most recent items), ``"right"`` keeps the head. The output's
    ``dense_shape[1]`` is ``seq_len``. Weights are cut with their values (RecIS keeps the
    input's weights unchanged, which no longer line up with the values).

    Args:
        seq_len (int): items kept per row. Default: 64.
        check_length (bool): raise ValueError when the input's dimension 1 is longer than
            ``seq_len`` (RecIS asserts this). Default: ``True``.
        truncate (bool): ``False`` returns the input unchanged. Default: ``True``.
        truncate_side (str): ``"left"`` or ``"right"``. Default: ``"left"``.
        n_dims (int): 2 or 3, the input's rank. Default: 2.
        dtype (torch.dtype): recorded in the config. Default: ``torch.long``.

    Example::

        >>> x = RaggedTensor(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3, 4]))
        >>> SequenceTruncate(2, check_length=False)(x).values()
        tensor([2, 3, 4])
    """

    def __init__(self, seq_len: int = 64, check_length: bool = True, truncate: bool = True,
                 truncate_side: str = "left", n_dims: int = 2, dtype: torch.dtype = torch.long):
        super().__init__()
        check_positive_int(seq_len, "seq_len", where="SequenceTruncate")
        if truncate_side not in ("left", "right"):
            raise ValueError(f"SequenceTruncate: truncate_side must be 'left' or 'right', got "
                             f"{truncate_side!r}")
        if n_dims not in (2, 3):
            raise ValueError(f"SequenceTruncate: n_dims must be 2 or 3, got {n_dims!r}")
        self.seq_len = seq_len
        self.check_length = bool(check_length)
        self.truncate = bool(truncate)
        self.truncate_side = truncate_side
        self.n_dims = n_dims
        self.dtype = dtype

    def _kept(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first kept index, kept count) of each row of ``offsets``."""
        lengths = offsets[1:] - offsets[:-1]
        keep = lengths.clamp(max=self.seq_len)
        start = offsets[:-1] + (lengths - keep if self.truncate_side == "left" else 0)
        return start, keep

    @staticmethod
    def _ranges(start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Concatenation of ``arange(start[i], start[i] + count[i])`` over i."""
        total = int(count.sum())
        first = torch.repeat_interleave(start - torch.cumsum(count, 0) + count, count)
        return first + torch.arange(total, device=start.device)

    def forward(self, x: RaggedTensor) -> RaggedTensor:
        where = "SequenceTruncate"
        if not isinstance(x, RaggedTensor):
            raise TypeError(f"{where}: input must be a RaggedTensor, got {type(x).__name__}")
        if x.dim != self.n_dims:
            raise ValueError(f"{where}: n_dims={self.n_dims} expects a RaggedTensor of rank "
                             f"{self.n_dims}, got rank {x.dim}")
        if self.check_length and x.get_shape(1) > self.seq_len:
            raise ValueError(f"{where}: a row holds {x.get_shape(1)} items, more than seq_len="
                             f"{self.seq_len} (pass check_length=False to truncate)")
        if not self.truncate:
            return x
        weight = x.weight()
        shape = list(x.dense_shape)
        shape[1] = self.seq_len
        if self.n_dims == 2:
            offsets = x.offsets()[0].to(torch.int64)
            start, keep = self._kept(offsets)
            index = self._ranges(start, keep)
            out_offsets = torch.cat([offsets.new_zeros(1), torch.cumsum(keep, 0)])
            return _ragged(x.values()[index], [out_offsets.to(x.offsets()[0].dtype)],
                           None if weight is None else weight[index], shape)
        outer, inner = (o.to(torch.int64) for o in x.offsets())
        start, keep = self._kept(outer)
        rows = self._ranges(start, keep)  # the kept inner lists, in order
        lengths = inner[rows + 1] - inner[rows]
        index = self._ranges(inner[rows], lengths)
        batch = outer.numel() - 1
        # every row gets seq_len inner lists: the kept ones, then empty ones
        padded = torch.zeros(batch, self.seq_len, dtype=torch.int64, device=inner.device)
        slot = torch.arange(self.seq_len, device=inner.device).expand(batch, -1)
        padded[slot < keep.unsqueeze(1)] = lengths
        out_inner = torch.cat([inner.new_zeros(1), torch.cumsum(padded.reshape(-1), 0)])
        out_outer = torch.arange(batch + 1, device=outer.device) * self.seq_len
        return _ragged(x.values()[index], [out_outer.to(x.offsets()[0].dtype),
                                            out_inner.to(x.offsets()[1].dtype)],
                       None if weight is None else weight[index], shape)

    def config(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "check_length": self.check_length,
                "truncate": self.truncate, "truncate_side": self.truncate_side,
                "n_dims": self.n_dims, "dtype": str(self.dtype)}


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def largest_prime_at_most(n: int) -> int:
    """The largest prime ``<= n`` (``n >= 2``).

    Example::

        >>> largest_prime_at_most(29 * 10)
        283
    """
    while not _is_prime(n):
        n -= 1
    return n


class IDMultiHash(_Op):
    """Several bucketed hashes of each int64 ID (up to 4), for multi-hash embeddings.

    Hash ``i`` is ``((x * mul_i) mod p_i + p_i) mod p_i mod num_buckets[i]`` in int64
    arithmetic (the product wraps, ``mod`` truncates toward zero as in C), with
    ``mul = [1, 3, 5, 7]`` and ``p_i`` the largest prime ``<= [29, 47, 67, 83][i] *
    num_buckets[i]`` (RecIS's constants). Returns a dict ``{f"{prefix}_{i}": ...}`` with
    the input's layout; the engine names the outputs ``f"{feature}_{prefix}_{i}"``.

    Args:
        num_buckets (list of int): 1 to 4 bucket counts, each > 0.
        prefix (str): key prefix of the outputs. Default: ``"multi_hash"``.

    Example::

        >>> IDMultiHash([100, 10])(torch.tensor([12345]))
        {'multi_hash_0': tensor([57]), 'multi_hash_1': tensor([2])}
    """

    MULTIPLIERS = (1, 3, 5, 7)
    PRIME_FACTORS = (29, 47, 67, 83)

    def __init__(self, num_buckets: Sequence[int], prefix: str = "multi_hash"):
        super().__init__()
        if isinstance(num_buckets, (str, bytes)) or not isinstance(num_buckets, Sequence) \
                or not 1 <= len(num_buckets) <= 4:
            raise ValueError("IDMultiHash: num_buckets must be a list of 1 to 4 positive "
                             f"ints, got {num_buckets!r}")
        for b in num_buckets:
            check_positive_int(b, "num_buckets entries", where="IDMultiHash")
        if not isinstance(prefix, str) or not prefix:
            raise TypeError(f"IDMultiHash: prefix must be a non-empty str, got {prefix!r}")
        self.num_buckets = list(num_buckets)
        self.prefix = prefix
        self.primes = [largest_prime_at_most(f * b)
                       for f, b in zip(self.PRIME_FACTORS, self.num_buckets, strict=False)]

    def forward(self, x: Any) -> dict[str, Any]:
        values = _check_int64_values(x, "IDMultiHash")
        out = {}
        for i, (buckets, prime) in enumerate(zip(self.num_buckets, self.primes, strict=True)):
            h = torch.fmod(values * self.MULTIPLIERS[i], prime)
            h = torch.remainder(h + prime, prime) % buckets
            out[f"{self.prefix}_{i}"] = _with_values(x, h)
        return out

    def config(self) -> dict[str, Any]:
        return {"num_buckets": self.num_buckets, "prefix": self.prefix}


def _as_bytes(values: torch.Tensor, where: str) -> np.ndarray:
    if values.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"{where}: input values must be bytes (int8 or uint8), got "
                        f"{values.dtype}; Int64ToString turns int64 IDs into bytes")
    return values.cpu().numpy().view(np.uint8)


class Hash(_Op):
    """Hash each innermost ragged row (e.g. a string's bytes) into one int64, dropping the
    last ragged level: FarmHash ``Fingerprint64`` (``"farm"``) or MurmurHash64A with seed 0
    (``"murmur"``), the functions RecIS's ``Hash`` op uses (see
    :mod:`recis.features.hash_kernels` for how the values are tied to RecIS's).

    Input: a RaggedTensor of int8/uint8 values. With two or more ragged levels the output is
    a RaggedTensor with the remaining levels; with one level (a batch of byte strings) it is
    a 1-D int64 tensor, one hash per row. Weights are dropped (they belong to bytes).

    Args:
        hash_type (str): ``"farm"`` or ``"murmur"``.

    Example::

        >>> text = RaggedTensor(torch.tensor([0, 1, 2], dtype=torch.int8), torch.tensor([0, 3]))
        >>> Hash("farm")(text)
        tensor([-7736835464683084646])
    """

    def __init__(self, hash_type: str):
        super().__init__()
        if hash_type not in ("farm", "murmur"):
            raise ValueError(f"Hash: hash_type must be 'farm' or 'murmur', got {hash_type!r}")
        self.hash_type = hash_type

    @staticmethod
    def _check(x: Any) -> RaggedTensor:
        if not isinstance(x, RaggedTensor):
            raise TypeError(f"Hash: input must be a RaggedTensor of bytes, got "
                            f"{type(x).__name__}")
        return x

    @staticmethod
    def _result(x: RaggedTensor, hashes: torch.Tensor) -> Any:
        hashes = hashes.to(x.device)
        if x.dim == 2:
            return hashes
        return _ragged(hashes, x.offsets()[:-1], None, x.dense_shape[:-1])

    def forward(self, x: Any) -> Any:
        x = self._check(x)
        data = _as_bytes(x.values(), "Hash")
        offsets = x.offsets()[-1].cpu().to(torch.int64).numpy()
        hashes = hash_kernels.hash_rows(data, offsets, self.hash_type == "farm")
        return self._result(x, torch.from_numpy(hashes))

    def config(self) -> dict[str, Any]:
        return {"hash_type": self.hash_type}

    @classmethod
    def run_fused(cls, ops: Sequence[Hash], inputs: Sequence[Any]) -> list[Any]:
        """One kernel call per hash type over all inputs' bytes together."""
        outputs: list[Any] = [None] * len(inputs)
        for hash_type in ("farm", "murmur"):
            chosen = [i for i, op in enumerate(ops) if op.hash_type == hash_type]
            if not chosen:
                continue
            datas, offsets, rows, base = [], [], [], 0
            for i in chosen:
                x = cls._check(inputs[i])
                data = _as_bytes(x.values(), "Hash")
                offs = x.offsets()[-1].cpu().to(torch.int64).numpy()
                offsets.append(offs[:-1] + base if offsets else offs[:-1])
                datas.append(data)
                rows.append(offs.shape[0] - 1)
                base += data.shape[0]
            offsets.append(np.array([base], np.int64))
            hashes = hash_kernels.hash_rows(np.concatenate(datas), np.concatenate(offsets),
                                            hash_type == "farm")
            for i, part in zip(chosen, torch.from_numpy(hashes).split(rows), strict=True):
                outputs[i] = cls._result(inputs[i], part)
        return outputs


class Int64ToString(_Op):
    """The decimal text of each int64 ID as bytes (``-`` for negatives), one more ragged
    level; what :class:`Hash` then hashes. RecIS does this inside its ``StringMultiHash`` op
    (``fused_int64_to_string_int8``); here it is a step of its own.

    Input: a RaggedTensor of int64 values without weights (a byte has no weight), or a 1-D or
    2-D int64 tensor (a ``[B, K]`` tensor becomes ``B`` rows of ``K`` IDs). Output: a
    RaggedTensor of uint8 with one more level.

    Example::

        >>> text = Int64ToString()(torch.tensor([123, -4]))
        >>> text.values().tolist(), text.offsets()[-1].tolist()
        ([49, 50, 51, 45, 52], [0, 3, 5])
    """

    def forward(self, x: Any) -> RaggedTensor:
        where = "Int64ToString"
        values = _check_int64_values(x, where)
        if isinstance(x, RaggedTensor):
            if x.weight() is not None:
                raise ValueError(f"{where}: input must not have weights (bytes carry none); "
                                 "drop them with set_weight(None) first")
            outer = list(x.offsets())
        elif x.dim() == 1:
            outer = []
        elif x.dim() == 2:
            outer = [torch.arange(x.shape[0] + 1, device=x.device) * x.shape[1]]
        else:
            raise ValueError(f"{where}: a dense input must be 1-D or 2-D, got shape "
                             f"{tuple(x.shape)}")
        text, offsets = hash_kernels.int64_to_decimal(values.cpu().numpy())
        device = values.device
        return _ragged(torch.from_numpy(text).to(device),
                       outer + [torch.from_numpy(offsets).to(device)], None)

    def config(self) -> dict[str, Any]:
        return {}
