"""Combiners: reduce the embeddings of each bag of IDs to one output row.

Every combiner is defined by a simpler computation, which the tests use as the oracle. With
``e_i`` the embedding of the i-th ID of a bag and ``w_i`` its weight (1 when no weights):

* ``"sum"``: ``sum_i w_i e_i`` (empty bag -> 0), i.e. ``nn.EmbeddingBag(mode="sum")``;
* ``"mean"``: ``sum_i w_i e_i / sum_i w_i`` (empty bag, or zero total weight -> 0); without
  weights this is ``nn.EmbeddingBag(mode="mean")``. RecIS switches between this and dividing
  by the bag length depending on batch density; we always use the weighted mean;
* ``"tile"``: the embeddings of the first ``tile_len`` IDs of the bag in order, zero-padded to
  ``tile_len`` rows; weights are ignored.

RecIS's functional surface, with its names and arguments: :func:`segment_sum_sparse`,
:func:`weight_norm_sparse`, :func:`sparse_embedding_segment_reduce` (segments given by one
segment ID per looked-up ID), :func:`ragged_embedding_segment_reduce` (segments given by
offsets), :func:`merge_offsets` and :func:`ids_encode`. Their ``backend`` argument picks the
kernels: ``"recis"`` (default) those of the data's device (:func:`recis._core.backends.
backend_for`: numba on CPU, plain torch on CUDA), ``"torch"`` the plain-torch twin.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recis._core.backends import Backend, backend_for, check_offsets, get_backend
from recis._core.backends.torch_backend import bag_sum_rows

if TYPE_CHECKING:
    from recis.nn.modules.hashtable import HashTable, Lookup

COMBINERS = ("sum", "mean", "tile")
EMBEDDING_SLOT = "embedding"
SEGMENT_BACKENDS = ("recis", "torch", "auto")
ID_BITS = 52  # ids_encode keeps the low 52 bits of an ID and puts the table index above them
MAX_ENCODED_TABLES = 1 << (64 - ID_BITS)

__all__ = ["bag_reduce", "table_bag_reduce", "segment_sum_sparse", "weight_norm_sparse",
           "sparse_embedding_segment_reduce", "ragged_embedding_segment_reduce",
           "merge_offsets", "ids_encode"]


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


# -- RecIS's segment ops ---------------------------------------------------------------------------

def _segment_kernels(backend: str, device: torch.device, where: str) -> Backend:
    """The kernels a ``backend`` argument names: ``"recis"`` (or RecIS's internal ``"auto"``)
    the device's own, ``"torch"`` the plain-torch twin."""
    if backend not in SEGMENT_BACKENDS:
        raise ValueError(f"{where}: backend must be one of {SEGMENT_BACKENDS}, got {backend!r}")
    return get_backend("torch") if backend == "torch" else backend_for(device)


def _check_index(index: Tensor, arg: str, where: str, bound: int | None = None,
                 bound_name: str = "") -> None:
    """Raise unless ``index`` is a 1-D int32/int64 tensor (with values in ``[0, bound)`` when
    ``bound`` is given)."""
    if not isinstance(index, Tensor):
        raise TypeError(f"{where}: {arg} must be a Tensor, got {type(index).__name__}")
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: {arg} must be a 1-D int32 or int64 tensor, got shape "
                         f"{tuple(index.shape)} {index.dtype}")
    if bound is not None and index.numel() and (
            int(index.min()) < 0 or int(index.max()) >= bound):
        raise IndexError(f"{where}: {arg} must be in [0, {bound_name}={bound}), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")


def _check_count(value: object, arg: str, where: str) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {arg} must be an int, got {type(value).__name__}") from None
    if count < 0:
        raise ValueError(f"{where}: {arg} must be >= 0, got {count}")
    return count


def _check_data(data: Tensor, arg: str, where: str) -> None:
    if not isinstance(data, Tensor):
        raise TypeError(f"{where}: {arg} must be a Tensor, got {type(data).__name__}")
    if data.dim() != 2 or not data.dtype.is_floating_point:
        raise ValueError(f"{where}: {arg} must be a 2-D floating tensor (rows, dim), got shape "
                         f"{tuple(data.shape)} {data.dtype}")


def _check_weight(weight: Tensor | None, num_ids: int, where: str) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor):
        raise TypeError(f"{where}: weight must be a Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.numel() != num_ids or not weight.dtype.is_floating_point:
        raise ValueError(f"{where}: weight must be a 1-D floating tensor with one value per "
                         f"index ({num_ids}), got shape {tuple(weight.shape)} {weight.dtype}")


class _SegmentSum(torch.autograd.Function):
    """``Backend.segment_sum`` with its gradient: for ``data`` the same kernel with the roles of
    ``indices`` and ``segment_ids`` swapped, for ``weight`` the dot product of each gathered
    row with its segment's upstream gradient."""

    @staticmethod
    def forward(ctx, data, weight, indices, segment_ids, num_segments, kernels):
        ctx.kernels, ctx.num_rows = kernels, data.shape[0]
        ctx.save_for_backward(data, weight, indices, segment_ids)
        return kernels.segment_sum(data, weight, indices, segment_ids, num_segments)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        data, weight, indices, segment_ids = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_data = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_data = ctx.kernels.segment_sum(grad_out, weight, segment_ids, indices,
                                                ctx.num_rows)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out[segment_ids] * data[indices]).sum(1)
        return grad_data, grad_weight, None, None, None, None


def segment_sum_sparse(
    data: Tensor,
    weight: Tensor | None,
    indices: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    backend: str = "recis",
) -> Tensor:
    """Weighted sum of rows of ``data`` per segment:
    ``out[s] = sum over i with segment_ids[i] == s of weight[i] * data[indices[i]]``.

    Args:
        data (Tensor): ``(N, D)`` floating rows (e.g. the embeddings of the unique IDs).
        weight (Tensor, optional): ``(M,)`` one weight per index; None means all ones.
        indices (Tensor): ``(M,)`` int32/int64 rows of ``data``, each in ``[0, N)``.
        segment_ids (Tensor): ``(M,)`` int32/int64 segment of each index, in
            ``[0, num_segments)``, in any order.
        num_segments (int): rows of the output; segments without an index are 0.
        backend (str): ``"recis"`` (the device's kernels: numba on CPU) or ``"torch"``.
            Default: ``"recis"``.

    Returns:
        ``(num_segments, D)`` in ``data``'s dtype, differentiable in ``data`` and ``weight``.
        RecIS's CUDA kernel does not check the IDs (out-of-range ones write anywhere); here they
        raise an ``IndexError``.

    Example::

        >>> data = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
        >>> segment_sum_sparse(data, torch.tensor([2.0, 3.0, 0.5, 1.0]),
        ...                    torch.tensor([2, 0, 1, 0]), torch.tensor([0, 1, 1, 2]), 4)
        tensor([[6., 6.],
                [4., 4.],
                [1., 1.],
                [0., 0.]])
    """
    where = "segment_sum_sparse"
    _check_data(data, "data", where)
    num_segments = _check_count(num_segments, "num_segments", where)
    _check_index(indices, "indices", where, data.shape[0], "data.shape[0]")
    _check_index(segment_ids, "segment_ids", where, num_segments, "num_segments")
    if segment_ids.numel() != indices.numel():
        raise ValueError(f"{where}: segment_ids must have one entry per index "
                         f"({indices.numel()}), got {segment_ids.numel()}")
    _check_weight(weight, indices.numel(), where)
    kernels = _segment_kernels(backend, data.device, where)
    if weight is not None:
        weight = weight.to(data.dtype)
    return _SegmentSum.apply(data, weight, indices, segment_ids, num_segments, kernels)


def weight_norm_sparse(
    data: Tensor,
    weight: Tensor | None,
    segment_ids: Tensor,
    num_segments: int,
    backend: str = "recis",
) -> Tensor:
    """Each weight divided by the sum of the weights of its segment, so that
    :func:`segment_sum_sparse` with the result gives weighted means ``sum w e / sum w``.

    A segment whose weights sum to 0 gives 0 weights. This follows RecIS's kernel and tests;
    RecIS's ``"torch"`` backend divides by the number of entries in the segment instead, which
    is not a weighted mean: we do not copy it. Both backends run the same torch code (a 1-D
    ``index_add``, cheap everywhere).

    Args:
        data (Tensor): ``(N, D)``: only its dtype and device are used (for ``weight=None``).
        weight (Tensor, optional): ``(M,)`` weights; None means all ones (the plain mean).
        segment_ids (Tensor): ``(M,)`` int32/int64 segment of each weight, in
            ``[0, num_segments)``.
        num_segments (int): number of segments.
        backend (str): ``"recis"`` or ``"torch"``. Default: ``"recis"``.

    Returns:
        ``(M,)`` normalised weights, differentiable in ``weight``.

    Example::

        >>> weight_norm_sparse(torch.zeros(3, 2), torch.tensor([2.0, 3.0, 0.5, 1.0]),
        ...                    torch.tensor([0, 1, 1, 2]), 4)
        tensor([1.0000, 0.8571, 0.1429, 1.0000])
    """
    where = "weight_norm_sparse"
    if not isinstance(data, Tensor):
        raise TypeError(f"{where}: data must be a Tensor, got {type(data).__name__}")
    num_segments = _check_count(num_segments, "num_segments", where)
    _check_index(segment_ids, "segment_ids", where, num_segments, "num_segments")
    _check_weight(weight, segment_ids.numel(), where)
    _segment_kernels(backend, data.device, where)  # validates the name; both share this code
    if weight is None:
        weight = torch.ones(segment_ids.numel(), dtype=data.dtype, device=data.device)
    totals = weight.new_zeros(num_segments).index_add(0, segment_ids, weight)[segment_ids]
    nonzero = totals != 0
    return torch.where(nonzero, weight / torch.where(nonzero, totals, 1.0), 0.0)


def sparse_embedding_segment_reduce(
    unique_emb: Tensor,
    weight: Tensor | None,
    reverse_indices: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    combiner: str,
    *,
    backend: str = "recis",
) -> Tensor:
    """Reduce looked-up embeddings per segment: ``"sum"`` is
    :func:`segment_sum_sparse`, ``"mean"`` the weighted mean ``sum w e / sum w`` (0 for an empty
    segment or zero total weight), i.e. :func:`weight_norm_sparse` then the sum.

    Args:
        unique_emb (Tensor): ``(U, D)`` embeddings of the unique IDs.
        weight (Tensor, optional): ``(N,)`` one weight per ID; None means all ones (RecIS
            requires a tensor).
        reverse_indices (Tensor): ``(N,)`` row of ``unique_emb`` of each ID.
        segment_ids (Tensor): ``(N,)`` output row of each ID, in ``[0, num_segments)``.
        num_segments (int): rows of the output.
        combiner (str): ``"sum"`` or ``"mean"``.
        backend (str): ``"recis"`` or ``"torch"`` (keyword only). Default: ``"recis"``.

    Returns:
        ``(num_segments, D)``; gradients reach ``unique_emb`` (one scatter-add per ID) and
        ``weight``.

    Example::

        >>> emb = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
        >>> sparse_embedding_segment_reduce(emb, torch.tensor([2.0, 3.0, 0.5, 1.0]),
        ...     torch.tensor([2, 0, 1, 0]), torch.tensor([0, 1, 1, 2]), 4, "mean")
        tensor([[3.0000, 3.0000],
                [1.1429, 1.1429],
                [1.0000, 1.0000],
                [0.0000, 0.0000]])
    """
    where = "sparse_embedding_segment_reduce"
    if combiner not in ("sum", "mean"):
        raise ValueError(f"{where}: combiner must be 'sum' or 'mean', got {combiner!r}")
    _check_data(unique_emb, "unique_emb", where)
    if combiner == "mean":
        weight = weight_norm_sparse(unique_emb, weight, segment_ids, num_segments, backend)
    return segment_sum_sparse(unique_emb, weight, reverse_indices, segment_ids, num_segments,
                              backend)


def ragged_embedding_segment_reduce(
    unique_emb: Tensor,
    weight: Tensor | None,
    reverse_indices: Tensor,
    offsets: Tensor,
    combiner: str,
    combiner_kwargs: dict | None = None,
) -> Tensor:
    """Reduce looked-up embeddings over bags given by offsets (RecIS's name for
    :func:`bag_reduce`).

    ``"sum"`` and ``"mean"`` give ``(B, D)`` as :func:`bag_reduce` (the mean is always the
    weighted mean; RecIS switches to dividing by the bag length on dense batches).
    ``"tile"`` is :func:`recis.nn.functional.ragged_ops.ragged_tile` with
    ``combiner_kwargs = {"bs": [...], "tile_len": [...], "left_pad": [bool tensors]}``
    (``left_pad`` optional), giving ``(sum bs[k] * tile_len[k], D)``.

    Args:
        unique_emb (Tensor): ``(U, D)`` embeddings of the unique IDs.
        weight (Tensor, optional): ``(N,)`` per-ID weights (sum and mean).
        reverse_indices (Tensor): ``(N,)`` row of ``unique_emb`` of each ID.
        offsets (Tensor): ``(B + 1,)`` bag boundaries from 0 to ``N`` (int32 or int64).
        combiner (str): ``"sum"``, ``"mean"`` or ``"tile"``.
        combiner_kwargs (dict, optional): the tile arguments above.

    Example::

        >>> emb = torch.tensor([[1.0], [2.0]])
        >>> ragged_embedding_segment_reduce(emb, None, torch.tensor([0, 1, 1]),
        ...                                 torch.tensor([0, 2, 3]), "sum")
        tensor([[3.],
                [2.]])
    """
    where = "ragged_embedding_segment_reduce"
    if combiner not in COMBINERS:
        raise ValueError(f"{where}: combiner must be one of {COMBINERS}, got {combiner!r}")
    _check_data(unique_emb, "unique_emb", where)
    if combiner == "tile":
        from recis.nn.functional.ragged_ops import ragged_tile

        kwargs = combiner_kwargs or {}
        missing = [k for k in ("bs", "tile_len") if k not in kwargs]
        if missing:
            raise ValueError(f"{where}: combiner 'tile' needs combiner_kwargs with 'bs' and "
                             f"'tile_len', missing {missing}")
        left_pad = kwargs.get("left_pad")
        if isinstance(left_pad, (list, tuple)):
            left_pad = torch.cat([torch.as_tensor(p, dtype=torch.bool).reshape(-1)
                                  for p in left_pad]) if left_pad else None
        return ragged_tile(kwargs["bs"], kwargs["tile_len"], reverse_indices, offsets,
                           unique_emb, left_pad)
    _check_index(reverse_indices, "reverse_indices", where, unique_emb.shape[0],
                 "unique_emb.shape[0]")
    if not isinstance(offsets, Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: offsets must be an int32 or int64 tensor, got "
                         f"{getattr(offsets, 'dtype', type(offsets).__name__)}")
    return bag_reduce(unique_emb, reverse_indices.long(), offsets.long(), weight, combiner)


def merge_offsets(offsets: Sequence[Tensor]) -> Tensor:
    """Concatenate the offsets of several ragged tensors into those of their concatenation:
    each list's offsets are shifted by the total length of the lists before it.

    Args:
        offsets (list of Tensor): 1-D integer offsets, each starting at 0 and non-decreasing.

    Returns:
        1-D offsets in the first tensor's dtype, ``sum(len(o) - 1) + 1`` long.

    Example::

        >>> merge_offsets([torch.tensor([0, 2, 5]), torch.tensor([0, 3, 6])])
        tensor([ 0,  2,  5,  8, 11])
    """
    where = "merge_offsets"
    if not isinstance(offsets, (list, tuple)) or not offsets:
        raise ValueError(f"{where}: offsets must be a non-empty list of tensors, got {offsets!r}")
    pieces, shift = [], 0
    for k, offs in enumerate(offsets):
        if not isinstance(offs, Tensor) or offs.dim() != 1 or offs.numel() == 0 or \
                offs.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: offsets[{k}] must be a non-empty 1-D int32/int64 tensor")
        check_offsets(offs.long(), int(offs[-1]), arg=f"offsets[{k}]")
        pieces.append((offs if k == 0 else offs[1:]) + shift)
        shift += int(offs[-1])
    return torch.cat(pieces).to(offsets[0].dtype)


def ids_encode(ids_list: Sequence[Tensor], table_ids: Tensor | Sequence[int]) -> Tensor:
    """Concatenate ID tensors, tagging each with its table:
    ``(id & (2**52 - 1)) | (table_id << 52)``, as RecIS's coalesced tables do.

    The top 12 bits of every ID are replaced by the table index, so IDs that differ only
    there collide and negative IDs lose their sign (RecIS's behaviour; recis's own tables
    keep the table apart from the ID and never need this). RecIS's docstring describes an
    addition of ``table_ids``; its kernel does the bit packing above, which we follow.

    Args:
        ids_list (list of Tensor): integer ID tensors (any shape, flattened), one device.
        table_ids (Tensor or list of int): one table index per tensor, in ``[0, 4096)``.

    Returns:
        1-D int64 tensor of all encoded IDs in order.

    Example::

        >>> ids_encode([torch.tensor([1, 2]), torch.tensor([3])], [0, 1])
        tensor([               1,                2, 4503599627370499])
    """
    where = "ids_encode"
    if not isinstance(ids_list, (list, tuple)) or not ids_list:
        raise ValueError(f"{where}: ids_list must be a non-empty list of tensors")
    device = ids_list[0].device if isinstance(ids_list[0], Tensor) else None
    for k, ids in enumerate(ids_list):
        if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"{where}: ids_list[{k}] must be an integer tensor")
        if ids.device != device:
            raise ValueError(f"{where}: ids_list[{k}] is on {ids.device}, ids_list[0] on {device}")
    table_ids = torch.as_tensor(table_ids, dtype=torch.int64).reshape(-1).tolist()
    if len(table_ids) != len(ids_list):
        raise ValueError(f"{where}: table_ids must have one entry per tensor of ids_list "
                         f"({len(ids_list)}), got {len(table_ids)}")
    bad = [t for t in table_ids if not 0 <= t < MAX_ENCODED_TABLES]
    if bad:
        raise ValueError(f"{where}: table_ids must be in [0, {MAX_ENCODED_TABLES}), got {bad}")
    low_bits = (1 << ID_BITS) - 1
    tag_of = [t << ID_BITS if t < MAX_ENCODED_TABLES // 2 else (t << ID_BITS) - (1 << 64)
              for t in table_ids]  # as a signed int64
    return torch.cat([(ids.reshape(-1).long() & low_bits) | tag
                      for ids, tag in zip(ids_list, tag_of, strict=True)])
