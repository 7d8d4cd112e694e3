"""A deterministic synthetic click stream with Zipf-skewed, drifting IDs and a learnable label."""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from recis.io.sharding import current_shard, resolve_rank
from recis.ragged.tensor import RaggedTensor

__all__ = ["SyntheticClickStream"]

logger = logging.getLogger(__name__)

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_TWO_NEG_53 = 1.0 / (1 << 53)

# Salts separating the hash-derived quantities of the hidden model.
_TAG_FIELD, _TAG_PHASE, _TAG_ID, _TAG_WEIGHT, _TAG_FACTOR = 1, 2, 3, 4, 5
_HELD_OUT_STREAM = 2**31
_CALIBRATION_ROWS = 16_384

# Hidden model scales (logit units).
_FIELD_STD = 0.5
_DENSE_STD = 0.3
_FACTOR_DIM = 4
_FACTOR_SCALE = 0.35


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijective avalanche of uint64 values."""
    x = x + _GOLDEN
    x = (x ^ (x >> _U64(30))) * _MIX1
    x = (x ^ (x >> _U64(27))) * _MIX2
    return x ^ (x >> _U64(31))


def _hash(*parts: Any) -> np.ndarray:
    """Hash uint64 arrays/ints elementwise (broadcasting) into uint64."""
    with np.errstate(over="ignore"):
        h = np.asarray(_U64(0x6A09E667F3BCC909))
        for part in parts:
            h = _splitmix(h ^ np.asarray(part).astype(_U64))
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    """Uniform in (0, 1) from a uint64 hash."""
    return ((h >> _U64(11)).astype(np.float64) + 0.5) * _TWO_NEG_53


def _normal(h: np.ndarray) -> np.ndarray:
    """Standard normal from a uint64 hash (Box-Muller on two derived uniforms)."""
    u1 = _unit(h)
    with np.errstate(over="ignore"):
        u2 = _unit(_splitmix(h))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def _int_arg(value: Any, name: str, low: int | None = None) -> int:
    where = "SyntheticClickStream"
    if isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}") from None
    if low is not None and value < low:
        raise ValueError(f"{where}: {name} must be >= {low}, got {value}")
    return value


def _float_arg(value: Any, name: str, low: float, high: float | None = None) -> float:
    where = "SyntheticClickStream"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{where}: {name} must be finite and {bounds}, got {value}")
    return value


class SyntheticClickStream(IterableDataset):
    r"""An endless (or finite) stream of synthetic click batches, reproducible from a seed.

    Each batch is a dict with the same layout as :func:`~recis.io.criteo_batch_to_features`:

    * ``"label"``: ``float32`` ``[B]`` of 0/1 clicks;
    * ``"dense"``: ``float32`` ``[B, num_dense]`` of standard-normal features;
    * ``"c1" .. f"c{num_sparse}"``: ``int64`` ``[B, 1]`` IDs for single-valued fields, or a
      :class:`~recis.ragged.RaggedTensor` of ``int64`` IDs for the ``multi_hot`` fields (bag
      sizes ``Poisson(mean_bag_size)`` capped at ``max_bag_size``; empty bags occur).

    **IDs.** Every field has ``vocab_per_field`` active slots; slot ``r`` is drawn with
    probability proportional to ``(r + 1) ** -zipf_a``. A slot holds one item at a time; the
    item's raw ID is a 64-bit hash of (seed, field, slot, generation) reduced into
    ``[0, id_space)``, so IDs look hashed and differ between fields. **Drift**: each slot
    moves to a new generation (a new, never-seen ID) ``drift`` times per 1000 batches on
    average, at a slot-specific phase, so over any 1000 batches a fraction ``drift`` of the
    active items is replaced: new IDs keep arriving (at every popularity) and old ones fade.
    Time is the global batch index, so drift depends on the number of batches, not of rows.

    **Labels** come from a hidden logistic model: every (field, ID) pair has a hidden weight
    ``N(0, 0.5**2)`` derived from a hash of the ID and the seed (multi-hot bags contribute
    their sum divided by the square root of the bag size), the dense features have hidden
    weights ``N(0, 0.3**2)``, and fields ``c1`` and ``c2`` interact through hidden 4-dimensional
    factors. The bias is set so that the click rate is about ``base_ctr``. A model that learns
    per-ID weights (e.g. logistic regression on hashed one-hot IDs) therefore reaches an AUC
    clearly above 0.5; the hidden model itself reaches about 0.85.

    **Determinism and sharding.** Batch ``t`` (the global index, counted from
    ``start_batch``) is a pure function of ``(seed, stream, t)`` and the constructor options.
    With ``world_size`` processes (defaults as in :class:`~recis.io.FileDataset`) and
    DataLoader workers, shard ``s`` of ``n`` yields batches ``s, s + n, ...``: disjoint, and
    together exactly the unsharded stream. Iterating again restarts the stream.

    Args:
        num_batches (int, optional): number of global batches; ``None`` for an endless stream.
            Default: ``None``.
        batch_size (int): rows per batch. Default: ``4096``.
        num_sparse (int): number of ID fields ``c1 .. cK``. Default: ``8``.
        num_dense (int): number of dense features (may be 0). Default: ``4``.
        id_space (int): raw IDs lie in ``[0, id_space)``, at most ``2**63``. Default: ``2**40``.
        vocab_per_field (int): active items per field. Default: ``100_000``.
        zipf_a (float): Zipf exponent of item popularity (> 0). Default: ``1.1``.
        drift (float): fraction of each field's active items replaced per 1000 batches.
            Default: ``0.05``.
        multi_hot (int or sequence of str): the multi-valued fields: a count of trailing
            fields, or field names. Default: ``1`` (the last field).
        mean_bag_size (float): mean bag size of multi-valued fields. Default: ``3.0``.
        max_bag_size (int): largest bag. Default: ``8``.
        base_ctr (float): approximate click rate, in ``(0, 1)``. Default: ``0.1``.
        seed (int): seed of the hidden model and of the stream (>= 0). Default: ``0``.
        rank (int, optional): this process's rank. Default: from the environment.
        world_size (int, optional): number of processes. Default: from the environment.
        start_batch (int): global index of the first batch (>= 0). Default: ``0``.
        stream (int): index of the random stream (>= 0); batches of different streams are
            independent draws from the same hidden model. Default: ``0``.
        time (int, optional): freeze the item vocabulary at this batch index instead of
            letting it follow the batch index. Default: ``None``.

    Example::

        >>> stream = SyntheticClickStream(num_batches=100, batch_size=1024, seed=7)
        >>> batch = next(iter(stream))
        >>> batch["label"].shape, batch["dense"].shape, batch["c1"].shape
        (torch.Size([1024]), torch.Size([1024, 4]), torch.Size([1024, 1]))
        >>> type(batch["c8"]).__name__
        'RaggedTensor'
        >>> evaluation = stream.held_out(num_batches=10)
    """

    def __init__(
        self,
        num_batches: int | None = None,
        batch_size: int = 4096,
        *,
        num_sparse: int = 8,
        num_dense: int = 4,
        id_space: int = 2**40,
        vocab_per_field: int = 100_000,
        zipf_a: float = 1.1,
        drift: float = 0.05,
        multi_hot: int | Sequence[str] = 1,
        mean_bag_size: float = 3.0,
        max_bag_size: int = 8,
        base_ctr: float = 0.1,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start_batch: int = 0,
        stream: int = 0,
        time: int | None = None,
    ) -> None:
        super().__init__()
        where = "SyntheticClickStream"
        self.num_batches = None if num_batches is None else _int_arg(num_batches, "num_batches", 0)
        self.batch_size = _int_arg(batch_size, "batch_size", 1)
        self.num_sparse = _int_arg(num_sparse, "num_sparse", 1)
        self.num_dense = _int_arg(num_dense, "num_dense", 0)
        self.id_space = _int_arg(id_space, "id_space", 2)
        if self.id_space > 2**63:
            raise ValueError(f"{where}: id_space must be <= 2**63, got {self.id_space}")
        self.vocab_per_field = _int_arg(vocab_per_field, "vocab_per_field", 1)
        self.zipf_a = _float_arg(zipf_a, "zipf_a", 0.0)
        if self.zipf_a == 0.0:
            raise ValueError(f"{where}: zipf_a must be > 0, got 0.0")
        self.drift = _float_arg(drift, "drift", 0.0)
        self.mean_bag_size = _float_arg(mean_bag_size, "mean_bag_size", 0.0)
        self.max_bag_size = _int_arg(max_bag_size, "max_bag_size", 1)
        self.base_ctr = _float_arg(base_ctr, "base_ctr", 0.0, 1.0)
        if not 0.0 < self.base_ctr < 1.0:
            raise ValueError(f"{where}: base_ctr must be in (0, 1), got {self.base_ctr}")
        self.seed = _int_arg(seed, "seed", 0)
        if self.seed >= 2**63:
            raise ValueError(f"{where}: seed must be < 2**63, got {self.seed}")
        self.start_batch = _int_arg(start_batch, "start_batch", 0)
        self.stream = _int_arg(stream, "stream", 0)
        self.time = None if time is None else _int_arg(time, "time", 0)
        self.rank, self.world_size = resolve_rank(rank, world_size, where=where)

        self.fields = [f"c{i}" for i in range(1, self.num_sparse + 1)]
        if isinstance(multi_hot, (str, bytes)):
            raise TypeError(f"{where}: multi_hot must be an int or a sequence of field names")
        if isinstance(multi_hot, Sequence):
            unknown = [name for name in multi_hot if name not in self.fields]
            if unknown:
                raise ValueError(
                    f"{where}: multi_hot names unknown fields {unknown}; fields are "
                    f"c1..c{self.num_sparse}"
                )
            self.multi_hot = [name for name in self.fields if name in set(multi_hot)]
        else:
            count = _int_arg(multi_hot, "multi_hot", 0)
            if count > self.num_sparse:
                raise ValueError(
                    f"{where}: multi_hot must be <= num_sparse ({self.num_sparse}), got {count}"
                )
            self.multi_hot = self.fields[self.num_sparse - count :]

        # Hidden model constants, all derived from the seed.
        self._field_salt = _hash(self.seed, _TAG_FIELD, np.arange(self.num_sparse))
        rng = np.random.default_rng([self.seed, 0x5EED])
        self._dense_weight = rng.normal(0.0, _DENSE_STD, self.num_dense)
        ranks = np.arange(1, self.vocab_per_field + 1, dtype=np.float64)
        cdf = np.cumsum(ranks**-self.zipf_a)
        self._cdf = cdf / cdf[-1]
        self._bias = self._calibrate_bias()
        self._epoch = 0

    # ------------------------------------------------------------------------- hidden model

    def _ids(self, field: int, slots: np.ndarray, time: int) -> np.ndarray:
        salt = self._field_salt[field]
        phase = _unit(_hash(salt, _TAG_PHASE, slots))
        generation = np.floor(time * self.drift / 1000.0 + phase).astype(np.int64)
        raw = _hash(salt, _TAG_ID, slots, generation)
        return (raw % _U64(self.id_space)).astype(np.int64)

    def _weights(self, field: int, ids: np.ndarray) -> np.ndarray:
        return _FIELD_STD * _normal(_hash(self._field_salt[field], _TAG_WEIGHT, ids))

    def _factors(self, field: int, ids: np.ndarray) -> np.ndarray:
        dims = np.arange(_FACTOR_DIM)
        return _normal(_hash(self._field_salt[field], _TAG_FACTOR, ids[:, None], dims))

    def ids_at(self, field: str, slots: Any, at_batch: int) -> torch.Tensor:
        r"""The raw IDs held by popularity slots of a field at a given time.

        Args:
            field (str): field name, ``"c1"`` ... .
            slots (array-like of int): popularity ranks, ``0`` being the most popular.
            at_batch (int): the batch index (time).

        Returns:
            Tensor: ``int64`` IDs, one per slot.

        Example::

            >>> stream = SyntheticClickStream(drift=1000.0)
            >>> bool((stream.ids_at("c1", [0, 1], 0) != stream.ids_at("c1", [0, 1], 1)).all())
            True
        """
        if field not in self.fields:
            raise ValueError(f"SyntheticClickStream: field must be one of c1..c{self.num_sparse}")
        slots_np = np.asarray(slots, dtype=np.int64).reshape(-1)
        if slots_np.size and (slots_np.min() < 0 or slots_np.max() >= self.vocab_per_field):
            raise ValueError(
                f"SyntheticClickStream: slots must be in [0, {self.vocab_per_field}), "
                f"got {slots_np.min()}..{slots_np.max()}"
            )
        at = _int_arg(at_batch, "at_batch", 0)
        return torch.from_numpy(self._ids(self.fields.index(field), slots_np, at))

    # ------------------------------------------------------------------------- generation

    def batch(self, index: int) -> dict[str, Any]:
        r"""Generate global batch ``index`` (counted from ``start_batch``), ignoring sharding.

        Args:
            index (int): batch number, ``>= 0`` (and ``< num_batches`` if finite).

        Returns:
            dict: the batch, as described in the class documentation.
        """
        index = _int_arg(index, "index", 0)
        if self.num_batches is not None and index >= self.num_batches:
            raise ValueError(
                f"SyntheticClickStream: index must be < num_batches ({self.num_batches}), "
                f"got {index}"
            )
        t = self.start_batch + index
        time = t if self.time is None else self.time
        key = [self.seed, self.stream, t, 0 if self.time is None else self.time + 1]
        rng = np.random.default_rng(np.random.SeedSequence(key))
        features, score = self._features(rng, self.batch_size, time)
        prob = 1.0 / (1.0 + np.exp(-(score + self._bias)))
        label = (rng.random(self.batch_size) < prob).astype(np.float32)
        return {"label": torch.from_numpy(label), **features}

    def _features(
        self, rng: np.random.Generator, n: int, time: int
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Draw ``n`` rows: the feature dict (without label) and the hidden logit minus bias."""
        dense = rng.standard_normal((n, self.num_dense), dtype=np.float32)
        score = dense.astype(np.float64) @ self._dense_weight
        out: dict[str, Any] = {"dense": torch.from_numpy(dense)}
        first_ids: list[np.ndarray] = []
        for f, name in enumerate(self.fields):
            if name in self.multi_hot:
                lengths = np.minimum(rng.poisson(self.mean_bag_size, n), self.max_bag_size)
                slots = np.searchsorted(self._cdf, rng.random(int(lengths.sum())))
                ids = self._ids(f, slots, time)
                offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(lengths, out=offsets[1:])
                weights = np.append(self._weights(f, ids), 0.0)
                sums = np.add.reduceat(weights, offsets[:-1]) * (lengths > 0)
                score += sums / np.sqrt(np.maximum(lengths, 1))
                out[name] = RaggedTensor(torch.from_numpy(ids), torch.from_numpy(offsets))
                if f < 2:
                    # The interaction uses the bag's first item (an empty bag: none).
                    firsts = ids[np.minimum(offsets[:-1], max(len(ids) - 1, 0))] if len(ids) else 0
                    first_ids.append(np.where(lengths > 0, firsts, -1))
            else:
                slots = np.searchsorted(self._cdf, rng.random(n))
                ids = self._ids(f, slots, time)
                score += self._weights(f, ids)
                out[name] = torch.from_numpy(ids).reshape(n, 1)
                if f < 2:
                    first_ids.append(ids)
        if self.num_sparse >= 2:
            a, b = first_ids
            factors = (self._factors(0, a) * self._factors(1, b)).sum(1)
            score += _FACTOR_SCALE * factors * ((a >= 0) & (b >= 0))
        return out, score

    def _calibrate_bias(self) -> float:
        """Bias giving a mean click probability of ``base_ctr`` on a fixed sample at time 0."""
        rng = np.random.default_rng([self.seed, 0xCA11B])
        _, score = self._features(rng, _CALIBRATION_ROWS, 0)
        low, high = -30.0, 30.0
        for _ in range(60):  # bisection on a monotone function
            mid = 0.5 * (low + high)
            if np.mean(1.0 / (1.0 + np.exp(-(score + mid)))) < self.base_ctr:
                low = mid
            else:
                high = mid
        return 0.5 * (low + high)

    def set_epoch(self, epoch: int) -> None:
        r"""Kept for API symmetry with :class:`~recis.io.FileDataset`; the stream does not
        depend on the epoch (every epoch replays the same batches).

        Args:
            epoch (int): ignored beyond validation.
        """
        self._epoch = _int_arg(epoch, "epoch", 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = current_shard(self.rank, self.world_size)
        if self.num_batches is None:
            indices: Iterator[int] = itertools.count(shard, num_shards)
        else:
            indices = iter(range(shard, self.num_batches, num_shards))
        for index in indices:
            yield self.batch(index)

    # ------------------------------------------------------------------------- evaluation

    def held_out(
        self, num_batches: int, *, at_batch: int | None = None, batch_size: int | None = None
    ) -> SyntheticClickStream:
        r"""A finite evaluation stream from the same hidden model, disjoint from training.

        Its batches come from a separate random stream (index ``stream + 2**31``), so they
        never repeat a training batch, and its item vocabulary is frozen at one time point so
        that it matches the training stream there.

        Args:
            num_batches (int): number of evaluation batches.
            at_batch (int, optional): the time point (batch index). Default: the last batch of
                a finite stream, else ``start_batch``.
            batch_size (int, optional): rows per batch. Default: this stream's batch size.

        Returns:
            SyntheticClickStream: the evaluation stream, sharded like this one.

        Example::

            >>> train = SyntheticClickStream(num_batches=500, batch_size=256)
            >>> test = train.held_out(20)
        """
        if at_batch is None:
            if self.time is not None:
                at_batch = self.time
            elif self.num_batches:
                at_batch = self.start_batch + self.num_batches - 1
            else:
                at_batch = self.start_batch
        return SyntheticClickStream(
            num_batches,
            self.batch_size if batch_size is None else batch_size,
            num_sparse=self.num_sparse,
            num_dense=self.num_dense,
            id_space=self.id_space,
            vocab_per_field=self.vocab_per_field,
            zipf_a=self.zipf_a,
            drift=self.drift,
            multi_hot=list(self.multi_hot),
            mean_bag_size=self.mean_bag_size,
            max_bag_size=self.max_bag_size,
            base_ctr=self.base_ctr,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            start_batch=0,
            stream=self.stream + _HELD_OUT_STREAM,
            time=_int_arg(at_batch, "at_batch", 0),
        )
