"""RecIS's ragged-tensor ops, with its names, arguments and results.

A ragged tensor is flat ``values`` plus one offsets tensor per ragged level (see
:class:`recis.ragged.RaggedTensor`): row ``r`` of the last level is
``values[offsets[-1][r]:offsets[-1][r + 1]]``.

* :func:`ragged_tile`: the first ``seq`` embeddings of every row, zero padded (differentiable);
* :func:`dense_to_ragged`, :func:`ragged_to_dense`, :func:`ragged_to_sparse`: conversions;
* :func:`fused_ragged_cutoff_2D`, :func:`fused_ragged_cutoff_3D`: cut or pad every row (of
  several ragged tensors at once) to a fixed length.

Everything here is vectorised torch that runs on any device; only the backward of
:func:`ragged_tile` (a scatter-add) goes through the device's kernels.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from recis._core.backends import backend_for, check_offsets
from recis.nn.functional.embedding_ops import _check_index
from recis.ragged.tensor import RaggedTensor

__all__ = ["ragged_tile", "dense_to_ragged", "ragged_to_dense", "ragged_to_sparse",
           "fused_ragged_cutoff_2D", "fused_ragged_cutoff_3D"]

INDEX_DTYPES = (torch.int32, torch.int64)


def _ragged_arange(starts: Tensor, counts: Tensor) -> Tensor:
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    counts = counts.long()
    total = int(counts.sum()) if counts.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=counts.device)
    first = torch.cumsum(counts, 0) - counts  # where each run starts in the output
    shift = torch.repeat_interleave(starts.long() - first, counts, output_size=total)
    return torch.arange(total, device=counts.device) + shift


def _int_list(values: Sequence[int], arg: str, where: str) -> list[int]:
    if isinstance(values, Tensor):
        values = values.reshape(-1).tolist()
    try:
        out = [operator.index(v) for v in values]
    except TypeError:
        raise TypeError(f"{where}: {arg} must be a list of ints, got {values!r}") from None
    if any(v < 0 for v in out):
        raise ValueError(f"{where}: {arg} must be >= 0, got {out}")
    return out


# -- ragged_tile --------------------------------------------------------------------------------

class _RaggedTile(torch.autograd.Function):
    """Gathers ``table[rows]`` into output positions ``positions`` of a zero tensor; the
    backward scatter-adds the gradient of those positions back into the table's rows."""

    @staticmethod
    def forward(ctx, table, positions, rows, num_out):
        ctx.save_for_backward(positions, rows)
        ctx.num_rows = table.shape[0]
        out = table.new_zeros(num_out, table.shape[1])
        out[positions] = table[rows]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        positions, rows = ctx.saved_tensors
        kernels = backend_for(grad_out.device)
        grad = kernels.segment_sum(grad_out.contiguous(), None, positions, rows, ctx.num_rows)
        return grad, None, None, None


def ragged_tile(
    batch: Sequence[int],
    seq: Sequence[int],
    indices: Tensor,
    offset: Tensor,
    table: Tensor,
    left_pad: Tensor | Sequence[bool] | None = None,
    check_enable: bool = False,
) -> Tensor:
    """Tile the rows of several ragged tensors into fixed-length blocks of embeddings.

    The rows of ``M`` ragged tensors are given one after the other: tensor ``k`` has
    ``batch[k]`` rows, and row ``r`` (over all tensors) holds the table rows
    ``indices[offset[r]:offset[r + 1]]``. Each row of tensor ``k`` becomes ``seq[k]`` output
    rows: the embeddings of its first ``seq[k]`` IDs in order, then zeros; with
    ``left_pad[k]`` True the zeros come first (a row longer than ``seq[k]`` keeps its first
    ``seq[k]`` IDs either way). That is::

        out = cat over rows r of tensor k of
              pad(table[indices[offset[r]:offset[r + 1]][:seq[k]]], to seq[k] rows)

    Args:
        batch (list of int): number of rows of each tensor (``M`` entries).
        seq (list of int): output rows per row of each tensor (``M`` entries).
        indices (Tensor): int32/int64 rows of ``table`` (the IDs' unique indices).
        offset (Tensor): ``(sum(batch) + 1,)`` int32/int64, non-decreasing, within
            ``[0, len(indices)]``.
        table (Tensor): ``(N, D)`` floating embeddings.
        left_pad (Tensor or list of bool, optional): ``(M,)`` pad side of each tensor.
            Default: right (False).
        check_enable (bool): accepted for RecIS compatibility; the inputs are always checked.

    Returns:
        ``(sum(batch[k] * seq[k]), D)``; the gradient scatter-adds into ``table``.

    Example::

        >>> table = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
        >>> ragged_tile([2, 1], [3, 2], torch.tensor([0, 1, 0, 1]),
        ...             torch.tensor([0, 2, 3, 4]), table)
        tensor([[0., 1.],
                [2., 3.],
                [0., 0.],
                [0., 1.],
                [0., 0.],
                [0., 0.],
                [2., 3.],
                [0., 0.]])

    .. note::
        RecIS's docstring example shows ``[2, 3]`` for a row whose only ID is 0; its kernel
        (and this function) give that row's embedding, ``table[0]``.
    """
    where = "ragged_tile"
    batch, seq = _int_list(batch, "batch", where), _int_list(seq, "seq", where)
    if len(batch) != len(seq):
        raise ValueError(f"{where}: batch and seq must have one entry per tensor, got "
                         f"{len(batch)} and {len(seq)}")
    _check_index(indices, "indices", where)
    _check_index(offset, "offset", where)
    if not isinstance(table, Tensor) or table.dim() != 2 or not table.dtype.is_floating_point:
        raise ValueError(f"{where}: table must be a 2-D floating tensor (rows, dim), got "
                         f"{getattr(table, 'shape', type(table).__name__)}")
    num_rows = sum(batch)
    if offset.numel() != num_rows + 1:
        raise ValueError(f"{where}: offset must have sum(batch) + 1 = {num_rows + 1} entries, "
                         f"got {offset.numel()}")
    offset = offset.long()
    if int(offset[0]) < 0 or int(offset[-1]) > indices.numel() or \
            bool((offset[1:] < offset[:-1]).any()):
        raise ValueError(f"{where}: offset must be non-decreasing within [0, len(indices)="
                         f"{indices.numel()}], got {offset.tolist()}")
    device = table.device
    if left_pad is None:
        left_pad = torch.zeros(len(batch), dtype=torch.bool, device=device)
    else:
        left_pad = torch.as_tensor(left_pad, device=device)
        if left_pad.dtype != torch.bool or left_pad.numel() != len(batch):
            raise ValueError(f"{where}: left_pad must be {len(batch)} bools (one per tensor), "
                             f"got {left_pad.dtype} with {left_pad.numel()} entries")
        left_pad = left_pad.reshape(-1)

    tensor_of_row = torch.repeat_interleave(
        torch.arange(len(batch), device=device),
        torch.tensor(batch, dtype=torch.long, device=device), output_size=num_rows)
    seq_of_row = torch.tensor(seq, dtype=torch.long, device=device)[tensor_of_row]
    lengths = offset[1:] - offset[:-1]
    kept = torch.minimum(lengths, seq_of_row)
    pad = torch.where(left_pad[tensor_of_row], seq_of_row - kept, 0)
    row_start = torch.cumsum(seq_of_row, 0) - seq_of_row  # first output row of each row
    positions = _ragged_arange(row_start + pad, kept)  # output rows that hold an embedding
    sources = _ragged_arange(offset[:-1], kept)  # their positions in indices
    rows = indices[sources].long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table.shape[0]):
        raise IndexError(f"{where}: indices must be in [0, table.shape[0]={table.shape[0]}), "
                         f"got values in [{int(rows.min())}, {int(rows.max())}]")
    num_out = sum(b * s for b, s in zip(batch, seq, strict=True))
    return _RaggedTile.apply(table, positions, rows, num_out)


# -- conversions --------------------------------------------------------------------------------

def _offsets_dtype(count: int) -> torch.dtype:
    """RecIS's offsets are int32; wider data needs int64."""
    return torch.int32 if count < 2**31 else torch.int64


def dense_to_ragged(
    tensor: Tensor, check_invalid: bool = False, invalid_value: int | float = 0
) -> tuple[Tensor, list[Tensor]]:
    """Convert a dense tensor to ``(values, offsets)``.

    With ``check_invalid=False`` every row is kept whole: ``values`` is the flattened tensor
    and level ``d`` of ``offsets`` is ``arange(rows_d + 1) * tensor.shape[d + 1]``. With
    ``check_invalid=True`` (2-D only, as in RecIS) each row's trailing run of
    ``invalid_value`` is dropped (invalid values followed by a valid one are kept).

    Args:
        tensor (Tensor): at least 2-D (2-D with ``check_invalid``).
        check_invalid (bool): drop trailing ``invalid_value`` entries. Default: False.
        invalid_value (number): the padding value. Default: 0.

    Returns:
        ``(values, offsets)``: 1-D values and a list of int32 offsets (int64 past 2**31).

    Example::

        >>> dense_to_ragged(torch.tensor([[1, 2, 0], [3, 4, 5], [6, 0, 0]]), True)
        (tensor([1, 2, 3, 4, 5, 6]), [tensor([0, 2, 5, 6], dtype=torch.int32)])
    """
    where = "dense_to_ragged"
    if not isinstance(tensor, Tensor) or tensor.dim() < 2:
        raise ValueError(f"{where}: tensor must be a tensor with at least 2 dimensions, got "
                         f"{getattr(tensor, 'shape', type(tensor).__name__)}")
    dtype = _offsets_dtype(tensor.numel())
    if check_invalid:
        if tensor.dim() != 2:
            raise ValueError(f"{where}: check_invalid=True needs a 2-D tensor, got shape "
                             f"{tuple(tensor.shape)}")
        ragged = RaggedTensor.from_dense(tensor, invalid_value)
        return ragged.values(), [ragged.offsets()[0].to(dtype)]
    offsets, rows = [], 1
    for d in range(tensor.dim() - 1):
        rows *= tensor.shape[d]
        width = tensor.shape[d + 1]
        offsets.append(torch.arange(rows + 1, dtype=dtype, device=tensor.device) * width)
    return tensor.contiguous().view(-1), offsets


def _as_offsets_list(offsets: Tensor | Sequence[Tensor], arg: str, where: str) -> list[Tensor]:
    offsets = [offsets] if isinstance(offsets, Tensor) else list(offsets)
    if not offsets:
        raise ValueError(f"{where}: {arg} must hold at least one offsets tensor")
    for level, offs in enumerate(offsets):
        _check_index(offs, f"{arg}[{level}]", where)
    return offsets


def ragged_to_dense(
    values: Tensor, offsets: Tensor | Sequence[Tensor], default_value: int | float = 0
) -> Tensor:
    """Pad a ragged tensor to a dense one (:meth:`recis.ragged.RaggedTensor.to_dense`).

    The shape is ``(len(offsets[0]) - 1, max row length of each level...)``; missing entries
    are ``default_value``.

    Example::

        >>> ragged_to_dense(torch.tensor([1, 2, 3]), [torch.tensor([0, 2, 2, 3])], -1)
        tensor([[ 1,  2],
                [-1, -1],
                [ 3, -1]])
    """
    offsets = _as_offsets_list(offsets, "offsets", "ragged_to_dense")
    return RaggedTensor(values, offsets).to_dense(default_value)


def ragged_to_sparse(values: Tensor, row_splits: Tensor | Sequence[Tensor]) -> Tensor:
    """A ragged tensor as a coalesced sparse COO tensor of its dense shape: the entry of
    ``values[i]`` sits at ``(row, position in row, ...)``.

    RecIS raises when a dimension is 0 (e.g. every row empty); this returns an empty sparse
    tensor of that shape. Offsets may be int32 (RecIS requires it) or int64.

    Example::

        >>> sp = ragged_to_sparse(torch.tensor([1, 2, 3]), [torch.tensor([0, 2, 3])])
        >>> sp.indices(), sp.values(), sp.shape
        (tensor([[0, 0, 1],
                [0, 1, 0]]), tensor([1, 2, 3]), torch.Size([2, 2]))
    """
    offsets = _as_offsets_list(row_splits, "row_splits", "ragged_to_sparse")
    ragged = RaggedTensor(values, offsets)
    device = values.device
    element = torch.arange(values.numel(), device=device)
    coordinates = []
    for level in range(len(offsets) - 1, -1, -1):  # innermost level first
        offs = offsets[level].long()
        lengths = offs[1:] - offs[:-1]
        num_items = values.numel() if level == len(offsets) - 1 else offsets[level + 1].numel() - 1
        parent = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths,
                                         output_size=num_items)
        position = torch.arange(num_items, device=device) - offs[parent]
        coordinates.insert(0, position[element])
        element = parent[element]
    coordinates.insert(0, element)
    # valid by construction: skip torch's invariant checks (and its warning about them)
    return torch.sparse_coo_tensor(torch.stack(coordinates), values, ragged.real_shape(),
                                   device=device, check_invariants=False).coalesce()


# -- cutoff -------------------------------------------------------------------------------------

def _cutoff_settings(num: int, keep_lengths: Tensor, drop_sides: Tensor | None,
                     pad_sides: Tensor | None, where: str) -> tuple[list[int], Tensor, Tensor]:
    """Check the per-tensor settings: ``keep_lengths`` ``num`` ints >= 0, the sides ``num``
    bools (None: all False). Returns ``(keep, drop_sides, pad_sides)``."""
    if not isinstance(keep_lengths, Tensor) or keep_lengths.dtype not in INDEX_DTYPES:
        raise ValueError(f"{where}: keep_lengths must be an int32 or int64 tensor")
    if keep_lengths.numel() != num:
        raise ValueError(f"{where}: keep_lengths must have one entry per tensor ({num}), got "
                         f"shape {tuple(keep_lengths.shape)}")
    keep = _int_list(keep_lengths, "keep_lengths", where)
    sides = []
    for arg, side in (("drop_sides", drop_sides), ("pad_sides", pad_sides)):
        if side is None:
            side = torch.zeros(num, dtype=torch.bool, device=keep_lengths.device)
        if not isinstance(side, Tensor) or side.dtype != torch.bool:
            raise ValueError(f"'{arg}' must be of type torch.bool, but got "
                             f"{getattr(side, 'dtype', type(side).__name__)}.")
        if side.numel() != num:
            raise ValueError(f"{where}: {arg} must have one entry per tensor ({num}), got "
                             f"shape {tuple(side.shape)}")
        sides.append(side)
    return keep, sides[0], sides[1]


def _check_ragged_level(offsets: Tensor, num_items: int, arg: str, where: str) -> Tensor:
    """``offsets`` as int64 after checking it is a level over ``num_items`` items."""
    _check_index(offsets, arg, where)
    if offsets.numel() == 0:
        raise ValueError(f"{where}: {arg} must have at least 1 entry")
    offsets64 = offsets.long()
    check_offsets(offsets64, num_items, arg=f"{where}: {arg}")
    return offsets64


def _cut_rows(offsets: Tensor, keep: int, drop_left: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                     Tensor]:
    """For rows ``offsets`` cut or padded to ``keep`` items: ``(first kept item, kept count,
    dropped count, padded count)`` of each row."""
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=keep)
    dropped = lengths - kept
    padded = keep - kept
    first = offsets[:-1] + (dropped if drop_left else 0)
    return first, kept, dropped, padded


def _prefix_offsets(lengths: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out.to(dtype)


def fused_ragged_cutoff_2D(
    values: Sequence[Tensor],
    offsets: Sequence[Tensor],
    keep_lengths: Tensor,
    drop_sides: Tensor | None = None,
    pad_sides: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor, Tensor]:
    """Cut every row of several 2-D ragged tensors to at most ``keep_lengths[k]`` values.

    For tensor ``k``, a row longer than ``keep_lengths[k]`` keeps its first values
    (``drop_sides[k]`` False) or its last ones (True); shorter rows are kept whole and their
    shortfall is reported in ``pad_nums`` (no values are added: the padding is materialised
    later, e.g. by :func:`ragged_tile`, on the side ``pad_sides[k]`` says).

    Args:
        values (list of Tensor): 1-D values of each tensor.
        offsets (list of Tensor): ``(rows + 1,)`` int32/int64 offsets of each tensor.
        keep_lengths (Tensor): one int per tensor (any shape with that many entries).
        drop_sides (Tensor, optional): one bool per tensor, True = drop from the left.
        pad_sides (Tensor, optional): one bool per tensor, True = pad on the left.

    Returns:
        ``(values, offsets, drop_nums, pad_nums, drop_sides, pad_sides)``: lists per tensor
        (``drop_nums``/``pad_nums`` per row, in the offsets' dtype) and the sides as given.

    Example::

        >>> out = fused_ragged_cutoff_2D([torch.tensor([1, 2, 3, 4, 5])],
        ...     [torch.tensor([0, 3, 5])], torch.tensor([2]), torch.tensor([True]))
        >>> out[0], out[1], out[2], out[3]
        ([tensor([2, 3, 4, 5])], [tensor([0, 2, 4])], [tensor([1, 0])], [tensor([0, 0])])

    .. note::
        RecIS's docstring example shows a left drop keeping a row's first values; its kernel
        (and this function) keep the last ones.
    """
    where = "fused_ragged_cutoff_2D"
    if len(offsets) != len(values):
        raise ValueError(f"{where}: offsets must have one tensor per values tensor "
                         f"({len(values)}), got {len(offsets)}")
    keep, drop_sides, pad_sides = _cutoff_settings(len(values), keep_lengths, drop_sides,
                                                   pad_sides, where)
    drop_left = drop_sides.reshape(-1).tolist()
    out_values, out_offsets, drop_nums, pad_nums = [], [], [], []
    for k, (vals, offs) in enumerate(zip(values, offsets, strict=True)):
        offs64 = _check_ragged_level(offs, vals.numel(), f"offsets[{k}]", where)
        first, kept, dropped, padded = _cut_rows(offs64, keep[k], drop_left[k])
        out_values.append(vals[_ragged_arange(first, kept)])
        out_offsets.append(_prefix_offsets(kept, offs.dtype))
        drop_nums.append(dropped.to(offs.dtype))
        pad_nums.append(padded.to(offs.dtype))
    return out_values, out_offsets, drop_nums, pad_nums, drop_sides, pad_sides


def _fused_ragged_cutoff_3D(
    values: Sequence[Tensor],
    outer_offsets: Sequence[Tensor],
    inner_offsets: Sequence[Tensor],
    keep_lengths: Tensor,
    drop_sides: Tensor | None = None,
    pad_sides: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`fused_ragged_cutoff_3D` with the outer and inner offsets in separate lists;
    returns ``(values, outer_offsets, inner_offsets)``."""
    where = "fused_ragged_cutoff_3D"
    if not len(values) == len(outer_offsets) == len(inner_offsets):
        raise ValueError(f"{where}: values, outer and inner offsets must have one entry per "
                         f"tensor, got {len(values)}, {len(outer_offsets)}, "
                         f"{len(inner_offsets)}")
    keep, drop_sides, pad_sides = _cutoff_settings(len(values), keep_lengths, drop_sides,
                                                   pad_sides, where)
    drop_left, pad_left = drop_sides.reshape(-1).tolist(), pad_sides.reshape(-1).tolist()
    out_values, out_outer, out_inner = [], [], []
    for k, (vals, outer, inner) in enumerate(zip(values, outer_offsets, inner_offsets,
                                                 strict=True)):
        inner64 = _check_ragged_level(inner, vals.numel(), f"inner offsets[{k}]", where)
        outer64 = _check_ragged_level(outer, inner64.numel() - 1, f"outer offsets[{k}]", where)
        first, kept, _, padded = _cut_rows(outer64, keep[k], drop_left[k])
        num_seqs = outer64.numel() - 1
        slot_start = torch.arange(num_seqs, device=outer.device) * keep[k]
        if pad_left[k]:
            slot_start = slot_start + padded  # the empty rows come first
        source_rows = _ragged_arange(first, kept)
        row_lengths = inner64[1:] - inner64[:-1]
        out_lengths = torch.zeros(num_seqs * keep[k], dtype=torch.long, device=inner.device)
        out_lengths[_ragged_arange(slot_start, kept)] = row_lengths[source_rows]
        out_values.append(vals[_ragged_arange(inner64[source_rows], row_lengths[source_rows])])
        out_outer.append((torch.arange(num_seqs + 1, device=outer.device) * keep[k])
                         .to(outer.dtype))
        out_inner.append(_prefix_offsets(out_lengths, inner.dtype))
    return out_values, out_outer, out_inner


def fused_ragged_cutoff_3D(
    values: Sequence[Tensor],
    offsets: Sequence[Sequence[Tensor]],
    keep_lengths: Tensor,
    drop_sides: Tensor | None = None,
    pad_sides: Tensor | None = None,
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Give every sequence of several 3-D ragged tensors exactly ``keep_lengths[k]`` rows.

    Tensor ``k`` is ``values[k]`` with ``offsets[k] = [outer, inner]``: sequence ``s`` holds
    rows ``outer[s]:outer[s + 1]``, row ``r`` holds ``values[inner[r]:inner[r + 1]]``. A
    sequence with more rows keeps its first ones (``drop_sides[k]`` False, the default) or its
    last ones (True); one with fewer gets empty rows appended (``pad_sides[k]`` False, the
    default) or prepended (True). Rows themselves are never cut.

    Returns:
        ``(values, [[outer, inner], ...])`` with ``outer = arange(S + 1) * keep_lengths[k]``.

    Example::

        >>> vals, offs = fused_ragged_cutoff_3D(
        ...     [torch.tensor([10, 11, 12, 13, 14])],
        ...     [[torch.tensor([0, 3, 4]), torch.tensor([0, 1, 4, 4, 5])]],
        ...     torch.tensor([2]), torch.tensor([True]), torch.tensor([True]))
        >>> vals, offs  # [[10], [11, 12, 13], []] -> [[11, 12, 13], []]; [[14]] -> [[], [14]]
        ([tensor([11, 12, 13, 14])], [[tensor([0, 2, 4]), tensor([0, 3, 3, 3, 4])]])
    """
    outer = [o[0] for o in offsets]
    inner = [o[1] for o in offsets]
    out_values, out_outer, out_inner = _fused_ragged_cutoff_3D(values, outer, inner,
                                                               keep_lengths, drop_sides,
                                                               pad_sides)
    return out_values, [[o, i] for o, i in zip(out_outer, out_inner, strict=True)]
