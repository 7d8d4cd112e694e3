"""Combiners: reduce the embeddings of each bag of IDs to one output row.

Every combiner is defined by a simpler computation, which the tests use as the oracle. With
``e_i`` the embedding of the i-th ID of a bag and ``w_i`` its weight (1 when no weights):

* ``"sum"``: ``sum_i w_i e_i`` (empty bag -> 0), i.e. ``nn.EmbeddingBag(mode="sum")``;
* ``"mean"``: ``sum_i w_i e_i / sum_i w_i`` (empty bag, or zero total weight -> 0); without
  weights this is ``nn.EmbeddingBag(mode="mean")``. RecIS switches between this and dividing
  by the bag length depending on batch density; we always use the weighted mean;
* ``"tile"``: the embeddings of the first ``tile_len`` IDs of the bag in order, zero-padded to
  ``tile_len`` rows; weights are ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from recis._core import kernels

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable, Lookup

COMBINERS = ("sum", "mean", "tile")
EMBEDDING_SLOT = "embedding"


def table_bag_reduce(
    table: HashTable,
    lookup: Lookup,
    offsets: Tensor,
    weights: Tensor | None = None,
    combiner: str = "sum",
    tile_len: int | None = None,
    inverse: Tensor | None = None,
) -> Tensor:
    """Combine the rows of a table lookup (:meth:`HashTable.resolve`) over bags.

    Same result as ``bag_reduce(table.gather(lookup), inverse, offsets, ...)``, which is the
    reference and the path on GPU; on CPU, sum and mean over a float table run as one fused
    numba pass that reads rows straight from the blocks, with a fused backward that produces
    one gradient row per unique ID. ``inverse`` defaults to ``lookup.inverse`` (the engine
    passes one feature's slice of it).
    """
    inverse = lookup.inverse if inverse is None else inverse
    if combiner in ("sum", "mean") and table.dtype.is_floating_point:
        num_bags = offsets.numel() - 1
        width = table._slots.spec(EMBEDDING_SLOT).width
        out = torch.empty(num_bags, width, dtype=table.dtype, device=table.device)
        if weights is not None:
            weights = weights.to(table.dtype)
        mean = combiner == "mean"
        if table._slots.bag_reduce(EMBEDDING_SLOT, lookup.rows, inverse, offsets, weights, mean,
                                   out):
            if lookup.records_grad:
                out = _FusedBagLookup.apply(out, table._backward_holder, table, lookup, inverse,
                                            offsets, weights, mean)
            return out.view(num_bags, *table.embedding_shape)
    return bag_reduce(table.gather(lookup), inverse, offsets, weights, combiner, tile_len)


class _FusedBagLookup(torch.autograd.Function):
    """Attaches the fused kernel's backward to an output computed by ``bag_reduce_rows``."""

    @staticmethod
    def forward(ctx, out, holder, table, lookup, inverse, offsets, weights, mean):
        ctx.table, ctx.lookup, ctx.mean = table, lookup, mean
        ctx.save_for_backward(inverse, offsets, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inverse, offsets, weights = ctx.saved_tensors
        grad = kernels.bag_reduce_backward(inverse, offsets, weights, ctx.mean, grad_out,
                                           ctx.lookup.rows.numel())
        ctx.table._accept_lookup_grad(ctx.lookup, grad.view(-1, *ctx.table.embedding_shape))
        return (None,) * 8


def bag_reduce(
    unique_emb: Tensor,
    inverse: Tensor,
    offsets: Tensor,
    weights: Tensor | None = None,
    combiner: str = "sum",
    tile_len: int | None = None,
) -> Tensor:
    """Reduce bags of looked-up rows.

    Args:
        unique_emb (Tensor): ``(U, *row_shape)`` embeddings of the unique IDs.
        inverse (Tensor): ``(N,)`` index into ``unique_emb`` of every ID, in bag order.
        offsets (Tensor): ``(B + 1,)`` bag boundaries into ``inverse``, from 0 to ``N``.
        weights (Tensor, optional): ``(N,)`` per-ID weights (sum and mean).
        combiner (str): ``"sum"``, ``"mean"`` or ``"tile"``.
        tile_len (int, optional): rows kept per bag with ``"tile"``.

    Returns:
        ``(B, *row_shape)`` for sum and mean, ``(B, tile_len, *row_shape)`` for tile.
    """
    row_shape = unique_emb.shape[1:]
    table = unique_emb.reshape(unique_emb.shape[0], -1)
    num_bags = offsets.numel() - 1
    if combiner == "tile":
        positions = offsets[:-1, None] + torch.arange(tile_len, device=offsets.device)
        valid = positions < offsets[1:, None]  # (B, tile_len)
        out = table.new_zeros(num_bags, tile_len, table.shape[1])
        out[valid] = table[inverse[positions[valid]]]
        return out.view(num_bags, tile_len, *row_shape)
    if table.shape[0] == 0:  # no IDs at all: every bag is empty
        return table.new_zeros(num_bags, *row_shape)
    if weights is not None:
        weights = weights.to(table.dtype)
        if combiner == "mean":
            lengths = offsets[1:] - offsets[:-1]
            bag_of = torch.repeat_interleave(torch.arange(num_bags, device=offsets.device),
                                             lengths)
            totals = torch.zeros(num_bags, dtype=weights.dtype, device=weights.device)
            totals.index_add_(0, bag_of, weights)
            denom = totals[bag_of]
            weights = torch.where(denom != 0, weights / denom, torch.zeros_like(weights))
        out = F.embedding_bag(inverse, table, offsets, mode="sum", per_sample_weights=weights,
                              include_last_offset=True)
    else:
        out = F.embedding_bag(inverse, table, offsets, mode=combiner, include_last_offset=True)
    return out.view(num_bags, *row_shape)
