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

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from recis._core.backends import check_offsets
from recis._core.backends.torch_backend import bag_sum_rows

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable, Lookup

COMBINERS = ("sum", "mean", "tile")
EMBEDDING_SLOT = "embedding"


def check_bags(inverse: Tensor, offsets: Tensor, weights: Tensor | None) -> None:
    """Raise unless ``offsets`` are valid bag boundaries over ``inverse`` and ``weights`` has
    one value per ID (the kernels index memory with them)."""
    check_offsets(offsets, inverse.numel())
    if weights is not None and weights.numel() != inverse.numel():
        raise ValueError(f"weights must have one value per ID ({inverse.numel()}), got "
                         f"{weights.numel()}")


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

    Same result as ``bag_reduce(table.gather(lookup), inverse, offsets, ...)``, the reference.
    Sum and mean over a float table run as the backend's fused kernel (rows read straight from
    the blocks, no ``(N, D)`` intermediate) with a fused backward that produces one gradient
    row per unique ID; weights that require a gradient take the reference path, which
    differentiates them too. ``inverse`` defaults to ``lookup.inverse`` (the engine passes one
    feature's slice of it). Call it under :meth:`HashTable.lookup_lock`, with the lookup.
    """
    inverse = lookup.inverse if inverse is None else inverse
    check_bags(inverse, offsets, weights)
    weights_need_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
    if combiner in ("sum", "mean") and table.dtype.is_floating_point and not weights_need_grad:
        store = table.store
        num_bags = offsets.numel() - 1
        out = torch.empty(num_bags, store.slot_spec(EMBEDDING_SLOT).width, dtype=table.dtype,
                          device=table.device)
        if weights is not None:
            weights = weights.detach().to(table.dtype)
        mean = combiner == "mean"
        store.backend.bag_reduce(store.block_list(EMBEDDING_SLOT), lookup.rows, inverse,
                                 offsets, weights, mean, out)
        if lookup.records_grad:
            out = _FusedBagLookup.apply(out, table.grad_anchor, table, lookup, inverse,
                                        offsets, weights, mean)
        return out.view(num_bags, *table.embedding_shape)
    return bag_reduce(table.gather(lookup), inverse, offsets, weights, combiner, tile_len)


class _FusedBagLookup(torch.autograd.Function):
    """Attaches the fused kernel's backward to an output computed by ``Backend.bag_reduce``."""

    @staticmethod
    def forward(ctx, out, holder, table, lookup, inverse, offsets, weights, mean):
        ctx.table, ctx.lookup, ctx.mean = table, lookup, mean
        ctx.save_for_backward(inverse, offsets, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inverse, offsets, weights = ctx.saved_tensors
        table = ctx.table
        grad = table.store.backend.bag_reduce_backward(inverse, offsets, weights, ctx.mean,
                                                       grad_out, ctx.lookup.rows.numel())
        table.accept_lookup_grad(ctx.lookup, grad.view(-1, *table.embedding_shape))
        return (None,) * 8


def bag_reduce(
    unique_emb: Tensor,
    inverse: Tensor,
    offsets: Tensor,
    weights: Tensor | None = None,
    combiner: str = "sum",
    tile_len: int | None = None,
) -> Tensor:
    """Reduce bags of looked-up rows (the reference combiner, differentiable in
    ``unique_emb`` and ``weights``).

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
    check_bags(inverse, offsets, weights)
    if inverse.numel() and (int(inverse.min()) < 0 or int(inverse.max()) >= unique_emb.shape[0]):
        raise IndexError(f"inverse must index the {unique_emb.shape[0]} unique rows")
    row_shape = unique_emb.shape[1:]
    table = unique_emb.reshape(unique_emb.shape[0], math.prod(row_shape))
    num_bags = offsets.numel() - 1
    if combiner == "tile":
        positions = offsets[:-1, None] + torch.arange(tile_len, device=offsets.device)
        valid = positions < offsets[1:, None]  # (B, tile_len)
        out = table.new_zeros(num_bags, tile_len, table.shape[1])
        out[valid] = table[inverse[positions[valid]]]
        return out.view(num_bags, tile_len, *row_shape)
    if combiner not in ("sum", "mean"):
        raise ValueError(f"combiner must be one of {COMBINERS}, got {combiner!r}")
    out = bag_sum_rows(table, inverse, offsets, weights, combiner == "mean")
    return out.view(num_bags, *row_shape)
