"""Read-only embeddings for serving, in plain torch: sorted-ID search, gather, combiner.

This file imports nothing but torch, so that a serving process can use it (or copy it) without
numba or the training stack. The modules reproduce what :class:`~recis.nn.DynamicEmbedding`
and :class:`~recis.nn.EmbeddingEngine` compute in eval mode: an ID that is not in the table
reads as a zero row, and the combiners ``sum``, ``mean`` and ``tile`` add the rows of a bag
in the order of its IDs, as the training kernels do, so float32 rows give equal outputs.

Inputs, per feature (as the training modules take them):

* a 1-D ``(N,)`` ID tensor: each ID its own bag, output ``(N, D)``;
* a 2-D ``(B, K)`` ID tensor: ``B`` bags of ``K`` IDs, output ``(B, D)``;
* a ragged batch ``(values, offsets)`` or ``(values, offsets, weights)`` (bag ``b`` is
  ``values[offsets[b]:offsets[b + 1]]``), or any object with ``values()``, ``offsets()`` and
  ``weight()`` methods, such as a two-level :class:`~recis.ragged.RaggedTensor`: output
  ``(B, D)``.

Example::

    >>> table = FrozenTable(torch.tensor([3, 7]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> FrozenEmbedding(table, combiner="sum")(torch.tensor([[7, 3], [5, 7]]))
    tensor([[4., 6.],
            [3., 4.]])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FrozenTable", "FrozenEmbedding", "FrozenEngine", "combine_bags", "COMBINERS"]

COMBINERS = ("sum", "mean", "tile")


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


class FrozenTable(nn.Module):
    """A read-only embedding table: sorted int64 IDs and one row per ID.

    Args:
        ids (Tensor): ``(N,)`` int64 IDs in strictly increasing order.
        rows (Tensor): ``(N, D)`` rows: float32, float16, or int8 with ``scale``.
        scale (Tensor, optional): ``(N,)`` float32, int8 rows only: row ``i`` is
            ``rows[i] * scale[i]``.

    ``forward(ids)`` returns the float32 rows ``(ids.numel(), D)`` of IDs of any shape; IDs that
    are not in the table give zero rows. The tensors are buffers outside ``state_dict()``: the
    export directory (:mod:`recis.export`) is the saved form.

    Example::

        >>> table = FrozenTable(torch.tensor([3, 7]), torch.tensor([[1.0], [2.0]]))
        >>> table(torch.tensor([7, 5]))
        tensor([[2.],
                [0.]])
    """

    def __init__(self, ids: Tensor, rows: Tensor, scale: Tensor | None = None):
        super().__init__()
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            raise TypeError(f"ids must be a 1-D int64 tensor, got {_describe(ids)}")
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[0] != ids.numel():
            raise ValueError(f"rows must be a 2-D tensor with one row per ID ({ids.numel()}), "
                             f"got {_describe(rows)}")
        if rows.dtype not in (torch.float32, torch.float16, torch.int8):
            raise TypeError(f"rows must be float32, float16 or int8, got {rows.dtype}")
        if (rows.dtype == torch.int8) != (scale is not None):
            raise ValueError("int8 rows need scale (one float32 per row); other rows take none")
        if scale is not None and (not isinstance(scale, Tensor) or scale.dtype != torch.float32
                                  or tuple(scale.shape) != (ids.numel(),)):
            raise ValueError(f"scale must be a float32 tensor of shape ({ids.numel()},), got "
                             f"{_describe(scale)}")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("ids must be sorted in strictly increasing order (unique)")
        width = rows.shape[1]
        # one zero row after the last: a miss gathers it, so no mask over (N, D) is needed
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("rows", torch.cat([rows, rows.new_zeros(1, width)]),
                             persistent=False)
        padded = None if scale is None else torch.cat([scale, scale.new_zeros(1)])
        self.register_buffer("scale", padded, persistent=False)

    @property
    def num_ids(self) -> int:
        return self.ids.numel()

    @property
    def embedding_dim(self) -> int:
        return self.rows.shape[1]

    def positions(self, ids: Tensor) -> Tensor:
        """Row index of each ID (flattened); ``num_ids`` (the zero row) for unknown IDs."""
        flat = ids.reshape(-1).contiguous()
        n = self.ids.numel()
        if n == 0:
            return torch.zeros_like(flat)
        pos = torch.searchsorted(self.ids, flat).clamp(max=n - 1)
        return torch.where(self.ids.index_select(0, pos) == flat, pos, n)

    def forward(self, ids: Tensor) -> Tensor:
        if not isinstance(ids, Tensor) or not _is_int_dtype(ids.dtype):
            raise TypeError(f"ids must be an integer tensor, got {_describe(ids)}")
        index = self.positions(ids.to(torch.int64))
        out = self.rows.index_select(0, index)
        if self.scale is not None:
            return out.to(torch.float32) * self.scale.index_select(0, index).unsqueeze(1)
        return out.to(torch.float32)

    def extra_repr(self) -> str:
        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}[
            self.rows.dtype]
        return f"ids={self.num_ids}, dim={self.embedding_dim}, rows={dtype}"


def combine_bags(rows: Tensor, offsets: Tensor, weights: Tensor | None = None,
                 combiner: str = "sum", tile_len: int | None = None,
                 index: Tensor | None = None) -> Tensor:
    """Reduce the rows of bags of IDs to one output per bag.

    Args:
        rows (Tensor): ``(R, D)`` float32 rows.
        offsets (Tensor): ``(B + 1,)`` int64 bag boundaries from 0 to ``N``.
        weights (Tensor, optional): ``(N,)`` per-ID weights (sum and mean).
        combiner (str): ``"sum"`` (``sum_i w_i e_i``), ``"mean"`` (``sum_i w_i e_i /
            sum_i w_i``, 0 for an empty bag or zero total weight) or ``"tile"`` (the first
            ``tile_len`` rows of each bag, zero-padded).
        index (Tensor, optional): ``(N,)`` the row in ``rows`` of each ID, in bag order.
            Default: ``rows`` are the IDs' rows in order (``R = N``).

    Returns:
        ``(B, D)``, or ``(B, tile_len, D)`` for tile.

    Each bag's rows are added in order into a zero row (float32), and a mean scales that sum
    by ``1 / total weight`` (total in float64, the factor rounded to float32): the order of
    the training kernels, so equal rows give equal outputs for unweighted bags.

    Example::

        >>> combine_bags(torch.ones(3, 2), torch.tensor([0, 1, 3]), combiner="mean")
        tensor([[1., 1.],
                [1., 1.]])
    """
    if index is None:
        index = torch.arange(rows.shape[0], device=rows.device)
    num_bags, n = offsets.numel() - 1, index.numel()
    if combiner == "tile":
        positions = offsets[:-1].unsqueeze(1) + torch.arange(tile_len, device=rows.device)
        positions = torch.where(positions < offsets[1:].unsqueeze(1), positions, n)
        zero_row = torch.full((1,), rows.shape[0], dtype=index.dtype, device=index.device)
        picked = torch.cat([index, zero_row])[positions]  # (B, tile_len)
        return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])[picked]
    if combiner not in ("sum", "mean"):
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    if weights is not None:
        weights = weights.to(rows.dtype)
    out = F.embedding_bag(index, rows, offsets, mode="sum", per_sample_weights=weights,
                          include_last_offset=True)
    if combiner == "mean":
        if weights is None:
            total = (offsets[1:] - offsets[:-1]).to(torch.float64)
        else:
            bag_of = torch.searchsorted(offsets[1:], torch.arange(n, device=rows.device),
                                        right=True)
            total = torch.zeros(num_bags, dtype=torch.float64, device=rows.device)
            total = total.index_add_(0, bag_of, weights.to(torch.float64))
        factor = torch.where(total != 0, 1.0 / total, torch.zeros_like(total))
        out = out * factor.to(torch.float32).unsqueeze(1)
    return out


class FrozenEmbedding(nn.Module):
    """The serving twin of :class:`~recis.nn.DynamicEmbedding`: a :class:`FrozenTable` and a
    combiner over bags of IDs (inputs and output shapes as described in the module docstring;
    ``combiner="tile"`` gives ``(B, tile_len * D)`` for a 2-D ID tensor, ``(B, tile_len, D)``
    for a ragged batch).

    Args:
        table (FrozenTable): the rows; several embeddings may share one table.
        combiner (str): ``"sum"``, ``"mean"`` or ``"tile"``. Default: ``"sum"``.
        tile_len (int, optional): rows kept per bag, ``combiner="tile"`` only.
        use_weight (bool): honour per-ID weights of ragged inputs. Default: True.

    ``forward(ids, input_weights=None)`` as :class:`~recis.nn.DynamicEmbedding`'s: weights
    with one value per ID, unless the ragged input carries its own.

    Example::

        >>> table = FrozenTable(torch.tensor([3, 7]), torch.tensor([[1.0], [2.0]]))
        >>> emb = FrozenEmbedding(table, combiner="mean")
        >>> emb((torch.tensor([7, 3, 5]), torch.tensor([0, 2, 3])))  # bags [7, 3] and [5]
        tensor([[1.5000],
                [0.0000]])
    """

    def __init__(self, table: FrozenTable, combiner: str = "sum", tile_len: int | None = None,
                 use_weight: bool = True):
        super().__init__()
        if not isinstance(table, FrozenTable):
            raise TypeError(f"table must be a FrozenTable, got {type(table).__name__}")
        if combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
        if combiner == "tile" and (isinstance(tile_len, bool) or not isinstance(tile_len, int)
                                   or tile_len <= 0):
            raise ValueError(f"combiner='tile' needs tile_len, a positive int, got {tile_len!r}")
        self.table = table
        self.combiner = combiner
        self.tile_len = tile_len if combiner == "tile" else None
        self.use_weight = use_weight

    def forward(self, ids: Any, input_weights: Tensor | None = None) -> Tensor:
        values, offsets, weights, ragged = _as_bags(ids, input_weights)
        weights = weights if self.use_weight else None
        table = self.table
        if table.scale is None and table.rows.dtype == torch.float32:  # read in place
            out = combine_bags(table.rows, offsets, weights, self.combiner, self.tile_len,
                               index=table.positions(values))
        else:
            out = combine_bags(table(values), offsets, weights, self.combiner, self.tile_len)
        if self.combiner == "tile" and not ragged:
            out = out.flatten(1)
        return out

    def extra_repr(self) -> str:
        tile = f", tile_len={self.tile_len}" if self.tile_len else ""
        weight = "" if self.use_weight else ", use_weight=False"
        return f"combiner={self.combiner!r}{tile}{weight}"


class FrozenEngine(nn.Module):
    """The serving twin of :class:`~recis.nn.EmbeddingEngine`: a dict of features in, a dict
    of outputs out (in the input's order); features without an embedding pass through.

    Args:
        embeddings (dict[str, FrozenEmbedding]): feature name -> its embedding; features of
            one logical table share its :class:`FrozenTable`.

    Example::

        >>> table = FrozenTable(torch.tensor([3, 7]), torch.tensor([[1.0], [2.0]]))
        >>> engine = FrozenEngine({"user": FrozenEmbedding(table)})
        >>> engine({"user": torch.tensor([[7, 3]]), "age": torch.tensor([30])})
        {'user': tensor([[3.]]), 'age': tensor([30])}
    """

    def __init__(self, embeddings: Mapping[str, FrozenEmbedding]):
        super().__init__()
        if not isinstance(embeddings, Mapping) or not all(
                isinstance(e, FrozenEmbedding) for e in embeddings.values()):
            raise TypeError("embeddings must be a dict feature name -> FrozenEmbedding")
        # a list, not a ModuleDict: feature names may hold dots
        self.embeddings = nn.ModuleList(embeddings.values())
        self.features = {name: i for i, name in enumerate(embeddings)}

    def embedding(self, feature: str) -> FrozenEmbedding:
        """The embedding of ``feature``."""
        try:
            return self.embeddings[self.features[feature]]
        except KeyError:
            raise ValueError(f"unknown feature {feature!r}; features: {list(self.features)}"
                             ) from None

    def forward(self, input_features: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(input_features, Mapping):
            raise TypeError(f"input_features must be a dict, got {type(input_features).__name__}")
        out = {}
        for name, value in input_features.items():
            index = self.features.get(name)
            if index is None:
                out[name] = value
                continue
            try:
                out[name] = self.embeddings[index](value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"feature {name!r}: {e}") from None
        return out

    def extra_repr(self) -> str:
        return f"features={list(self.features)}"


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _as_bags(ids: Any, input_weights: Tensor | None
             ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """``(values, offsets, weights, ragged)`` of any accepted input (module docstring)."""
    offsets = weights = None
    if isinstance(ids, (tuple, list)):
        if len(ids) not in (2, 3):
            raise TypeError("a ragged input is a tuple (values, offsets) or (values, offsets, "
                            f"weights), got a {type(ids).__name__} of {len(ids)}")
        ids, offsets, weights = ids if len(ids) == 3 else (*ids, None)
    elif not isinstance(ids, Tensor) and callable(getattr(ids, "offsets", None)):
        levels = ids.offsets()
        if len(levels) != 1:
            raise ValueError(f"ragged ids must have one ragged level, got {len(levels)}")
        ids, offsets, weights = ids.values(), levels[0], ids.weight()
    if weights is not None and input_weights is not None:
        raise ValueError("give weights either inside the ragged input or as input_weights")
    weights = input_weights if weights is None else weights
    if not isinstance(ids, Tensor) or not _is_int_dtype(ids.dtype):
        raise TypeError(f"ids must be an integer tensor, got {_describe(ids)}")
    if offsets is not None:
        if not isinstance(offsets, Tensor) or not _is_int_dtype(offsets.dtype) \
                or offsets.dim() != 1 or ids.dim() != 1:
            raise ValueError(f"a ragged input needs 1-D ids and 1-D integer offsets, got ids "
                             f"{_describe(ids)} and offsets {_describe(offsets)}")
        offsets, ragged = offsets.to(torch.int64), True
    elif ids.dim() in (1, 2):
        per_bag = 1 if ids.dim() == 1 else ids.shape[1]
        offsets = torch.arange(ids.shape[0] + 1, device=ids.device) * per_bag
        ragged = False
    else:
        raise ValueError(f"ids must be 1-D (one ID per bag) or 2-D (B, K), got shape "
                         f"{tuple(ids.shape)}; pass (values, offsets) for ragged bags")
    if weights is not None:
        if not isinstance(weights, Tensor) or not weights.is_floating_point() \
                or weights.numel() != ids.numel():
            raise ValueError(f"weights must be a floating tensor with one value per ID "
                             f"({ids.numel()}), got {_describe(weights)}")
        weights = weights.reshape(-1)
    return ids.reshape(-1), offsets, weights, ragged
