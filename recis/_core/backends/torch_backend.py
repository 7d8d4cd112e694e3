"""Plain-torch kernels: the reference backend, which runs on any device (CPU, CUDA).

Vectorised tensor operations, no Python loop over elements. These define the semantics
documented on :class:`~.base.Backend`; other backends must give the same observable results
(the parity tests check it). Map layout: see :mod:`.base`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import EMPTY, ROW_MASK, TAG_SHIFT, TOMBSTONE, Backend, BlockList

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _lsr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def hash_keys(ids: Tensor, tags: Tensor | None) -> Tensor:
    """splitmix64 finaliser of ``ids ^ tags * golden``; int64 arithmetic wraps like uint64."""
    x = ids if tags is None else ids ^ (tags * _GOLDEN)
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def unique_with_inverse(ids: Tensor, tags: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """Unique ``(id, tag)`` pairs in first-occurrence order, and the inverse index.

    Returns ``(uniq_ids, uniq_tags, inverse)`` with ``uniq_ids[inverse] == ids`` (and the same for
    tags); ``uniq_tags`` is None when ``tags`` is None.
    """
    n = ids.numel()
    if tags is None:
        uniq, inverse = torch.unique(ids, return_inverse=True)
        uniq_tags = None
    else:
        pairs, inverse = torch.unique(torch.stack([tags, ids]), dim=1, return_inverse=True)
        uniq_tags, uniq = pairs[0], pairs[1]
    positions = torch.arange(n, device=ids.device)
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=ids.device)
    uniq = uniq[order]
    if uniq_tags is not None:
        uniq_tags = uniq_tags[order]
    return uniq, uniq_tags, rank[inverse]


def _probe(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None) -> tuple[Tensor, Tensor]:
    """Slot position and row of each key, ``(-1, -1)`` where absent."""
    mask = keys.numel() - 1
    n = ids.numel()
    pos_out = torch.full((n,), -1, dtype=torch.int64, device=ids.device)
    row_out = torch.full((n,), -1, dtype=torch.int64, device=ids.device)
    idx = torch.arange(n, device=ids.device)
    pos = hash_keys(ids, tags) & mask
    want_tag = tags if tags is not None else torch.zeros_like(ids)
    while idx.numel():
        v = vals[pos]
        hit = (v >= 0) & (keys[pos] == ids[idx]) & ((v >> TAG_SHIFT) == want_tag[idx])
        pos_out[idx[hit]] = pos[hit]
        row_out[idx[hit]] = v[hit] & ROW_MASK
        go_on = ~(hit | (v == EMPTY))
        idx = idx[go_on]
        pos = (pos[go_on] + 1) & mask
    return pos_out, row_out


def map_lookup(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    """Row of each key, -1 where the key is absent. Never inserts."""
    return _probe(keys, vals, ids, tags)[1]


def _insert_absent(
    keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None, rows: Tensor
) -> int:
    """Insert unique keys known to be absent; parallel claim rounds, lowest index wins a slot.

    Returns how many tombstones were reused."""
    mask = keys.numel() - 1
    packed = rows if tags is None else rows | (tags << TAG_SHIFT)
    idx = torch.arange(ids.numel(), device=ids.device)
    pos = hash_keys(ids, tags) & mask
    reused_tombstones = 0
    while idx.numel():
        free = vals[pos] < 0
        cand, cand_pos = idx[free], pos[free]
        slots, which = torch.unique(cand_pos, return_inverse=True)
        winner = torch.full((slots.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
        winner.scatter_reduce_(0, which, cand, reduce="amin")
        reused_tombstones += int((vals[slots] == TOMBSTONE).sum())
        keys[slots] = ids[winner]
        vals[slots] = packed[winner]
        won = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        won[winner] = True
        go_on = ~won[idx]
        idx = idx[go_on]
        pos = (pos[go_on] + 1) & mask
    return reused_tombstones


def take_rows(free: Tensor, n_free: int, next_row: int, count: int) -> tuple[Tensor, int, int]:
    """``count`` rows: the smallest free rows first (``free[:n_free]`` is sorted descending),
    then fresh rows from the high-water mark ``next_row``. Returns ``(rows, n_free, next_row)``."""
    reuse = min(count, n_free)
    reused = free[n_free - reuse : n_free].flip(0)
    fresh = torch.arange(next_row, next_row + count - reuse, device=free.device)
    return torch.cat([reused, fresh]), n_free - reuse, next_row + count - reuse


def map_lookup_or_insert(
    keys: Tensor,
    vals: Tensor,
    ids: Tensor,
    tags: Tensor | None,
    free: Tensor,
    n_free: int,
    next_row: int,
) -> tuple[Tensor, int, int, int, int]:
    """Rows of unique keys, inserting the absent ones in input order.

    New keys take the smallest free rows first, then grow from ``next_row``. The caller
    guarantees room in the map. Returns ``(rows, inserted, n_free, next_row,
    tombstones_reused)`` with ``inserted`` the mask of the keys that were absent.
    """
    rows = map_lookup(keys, vals, ids, tags)
    inserted, n_free, next_row, reused = insert_missing(keys, vals, ids, tags, rows, free,
                                                        n_free, next_row)
    return rows, inserted, n_free, next_row, reused


def insert_missing(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None, rows: Tensor,
                   free: Tensor, n_free: int, next_row: int) -> tuple[Tensor, int, int, int]:
    """Give the keys whose looked-up row is -1 a row (smallest free rows first, then from
    ``next_row``), in input order, writing it into ``rows``. Returns ``(inserted, n_free,
    next_row, tombstones_reused)``."""
    inserted = rows < 0
    missing = inserted.nonzero().squeeze(1)
    reused = 0
    if missing.numel():
        new_rows, n_free, next_row = take_rows(free, n_free, next_row, missing.numel())
        rows[missing] = new_rows
        reused = _insert_absent(
            keys, vals, ids[missing], None if tags is None else tags[missing], new_rows
        )
    return inserted, n_free, next_row, reused


def map_delete(keys: Tensor, vals: Tensor, ids: Tensor, tags: Tensor | None) -> Tensor:
    """Remove keys; returns the freed row of each key, -1 where it was absent.

    Duplicate keys in ``ids`` are allowed: the first occurrence frees the row, later ones get -1.
    """
    uniq, uniq_tags, inverse = unique_with_inverse(ids, tags)
    pos, rows = _probe(keys, vals, uniq, uniq_tags)
    hit = pos >= 0
    vals[pos[hit]] = TOMBSTONE
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), "amin")
    out = torch.full_like(ids, -1)
    out[first] = rows
    return out


def new_table(capacity: int, device: torch.device) -> Tensor:
    """An empty ``[capacity, 2]`` map table."""
    table = torch.empty(capacity, 2, dtype=torch.int64, device=device)
    table[:, 0] = 0
    table[:, 1] = EMPTY
    return table


def map_build(keys: Tensor, vals: Tensor, capacity: int) -> Tensor:
    """A fresh ``[capacity, 2]`` table holding the entries whose value is >= 0 (not empty, not
    a tombstone)."""
    live = vals >= 0
    ids, packed = keys[live], vals[live]
    table = new_table(capacity, keys.device)
    tags = packed >> TAG_SHIFT
    _insert_absent(table[:, 0], table[:, 1], ids, tags, packed & ROW_MASK)
    return table


def map_items(keys: Tensor, vals: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, tags, rows)`` of the live entries, ordered by row."""
    live = vals >= 0
    ids, packed = keys[live], vals[live]
    rows = packed & ROW_MASK
    # rows are unique and below num_rows: place them instead of sorting
    slot_of_row = torch.full((num_rows,), -1, dtype=torch.int64, device=keys.device)
    slot_of_row[rows] = torch.arange(rows.numel(), device=keys.device)
    order = slot_of_row[slot_of_row >= 0]
    return ids[order], (packed >> TAG_SHIFT)[order], rows[order]


def gather_rows(blocks: list[Tensor], block_size: int, rows: Tensor, out: Tensor) -> Tensor:
    """``out[i] = row rows[i]`` of the block store; zero where ``rows[i] < 0``."""
    out.zero_()
    valid = (rows >= 0).nonzero().squeeze(1)
    block_of = rows[valid] // block_size
    for b in torch.unique(block_of).tolist():
        sel = valid[block_of == b]
        out[sel] = blocks[b][rows[sel] - b * block_size].to(out.dtype)
    return out


def scatter_rows(blocks: list[Tensor], block_size: int, rows: Tensor, values: Tensor) -> None:
    """Write ``values[i]`` into row ``rows[i]``; rows < 0 are skipped. ``values`` may have a
    single row, broadcast to every row."""
    valid = (rows >= 0).nonzero().squeeze(1)
    block_of = rows[valid] // block_size
    broadcast = values.shape[0] == 1 and rows.numel() != 1
    for b in torch.unique(block_of).tolist():
        sel = valid[block_of == b]
        src = values.expand(sel.numel(), -1) if broadcast else values[sel]
        blocks[b][rows[sel] - b * block_size] = src.to(blocks[b].dtype)


def bag_sum_rows(unique_emb: Tensor, inverse: Tensor, offsets: Tensor, weights: Tensor | None,
                 mean: bool) -> Tensor:
    """Reference combiner over bags of rows: ``(B, width)`` sums (weighted), or weighted means
    ``sum_i w_i e_i / sum_i w_i`` (0 for an empty bag or zero total weight). Differentiable
    with respect to ``unique_emb`` and ``weights``."""
    num_bags = offsets.numel() - 1
    flat = unique_emb.reshape(unique_emb.shape[0], math.prod(unique_emb.shape[1:]))
    if flat.shape[0] == 0 or inverse.numel() == 0:  # no IDs at all: every bag is empty
        return flat.new_zeros(num_bags, flat.shape[1])
    if weights is None and not mean:
        return F.embedding_bag(inverse, flat, offsets, mode="sum", include_last_offset=True)
    if weights is None:
        return F.embedding_bag(inverse, flat, offsets, mode="mean", include_last_offset=True)
    weights = weights.to(flat.dtype)
    if mean:
        bag_of = bag_index(offsets, inverse.numel())
        totals = torch.zeros(num_bags, dtype=weights.dtype, device=weights.device)
        totals = totals.index_add(0, bag_of, weights)
        denom = totals[bag_of]
        safe = torch.where(denom != 0, denom, torch.ones_like(denom))
        weights = torch.where(denom != 0, weights / safe, torch.zeros_like(weights))
    return F.embedding_bag(inverse, flat, offsets, mode="sum", per_sample_weights=weights,
                           include_last_offset=True)


def segment_sum(data: Tensor, weight: Tensor | None, indices: Tensor, segment_ids: Tensor,
                num_segments: int) -> Tensor:
    """``out[segment_ids[i]] += weight[i] * data[indices[i]]`` into ``(num_segments, D)``
    zeros (see :meth:`.base.Backend.segment_sum`). Differentiable in ``data`` and ``weight``."""
    rows = data[indices]
    if weight is not None:
        rows = rows * weight.unsqueeze(1)
    out = data.new_zeros(num_segments, data.shape[1])
    return out.index_add(0, segment_ids, rows)


def bag_index(offsets: Tensor, num_items: int) -> Tensor:
    """The bag of each item: ``(num_items,)`` int64."""
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.arange(offsets.numel() - 1, device=offsets.device)
    return torch.repeat_interleave(bags, lengths, output_size=num_items)


class TorchBackend(Backend):
    """Plain torch on any device: the reference implementation of every kernel."""

    def supports(self, device: torch.device) -> bool:
        return device.type != "meta"

    # -- ID map --------------------------------------------------------------------------------
    def unique_with_inverse(self, ids, tags):
        return unique_with_inverse(ids, tags)

    def map_new(self, capacity, device):
        return new_table(capacity, device)

    def map_lookup(self, table, ids, tags):
        return map_lookup(table[:, 0], table[:, 1], ids, tags)

    def map_lookup_or_insert(self, table, ids, tags, free, n_free, next_row):
        return map_lookup_or_insert(table[:, 0], table[:, 1], ids, tags, free, n_free, next_row)

    def map_resolve(self, table, ids, tags):
        uniq, uniq_tags, inverse = unique_with_inverse(ids, tags)
        return uniq, uniq_tags, inverse, map_lookup(table[:, 0], table[:, 1], uniq, uniq_tags)

    def map_insert_missing(self, table, ids, tags, rows, free, n_free, next_row):
        return insert_missing(table[:, 0], table[:, 1], ids, tags, rows, free, n_free,
                              next_row)

    def map_delete(self, table, ids, tags):
        return map_delete(table[:, 0], table[:, 1], ids, tags)

    def map_build(self, keys, packed, capacity):
        return map_build(keys, packed, capacity)

    def map_items(self, table, num_rows):
        return map_items(table[:, 0], table[:, 1], num_rows)

    def map_ids_by_row(self, table, num_rows):
        live = table[:, 1] >= 0
        ids = torch.zeros(num_rows, dtype=torch.int64, device=table.device)
        ids[table[live, 1] & ROW_MASK] = table[live, 0]
        return ids

    def split_at_kth(self, values, index, k):
        if index is None:
            index = torch.arange(values.numel(), device=values.device)
        picked = values[index]
        kth = picked.kthvalue(k).values
        return index[picked < kth], index[picked == kth]

    # -- blocks --------------------------------------------------------------------------------
    def gather(self, blocks, rows, out):
        return gather_rows(blocks.tensors, blocks.block_size, rows, out)

    def scatter(self, blocks, rows, values):
        scatter_rows(blocks.tensors, blocks.block_size, rows, values)

    def bag_reduce(self, blocks, rows, inverse, offsets, weights, mean, out):
        unique = self.gather(blocks, rows, out.new_empty(rows.numel(), out.shape[1]))
        out.copy_(bag_sum_rows(unique, inverse, offsets, weights, mean))
        return out

    def bag_reduce_backward(self, inverse, offsets, weights, mean, grad_out, num_unique):
        grad = grad_out.new_zeros(num_unique, grad_out.shape[1])
        if inverse.numel() == 0:
            return grad
        bag_of = bag_index(offsets, inverse.numel())
        coef = (torch.ones(inverse.numel(), dtype=grad_out.dtype, device=grad_out.device)
                if weights is None else weights.to(grad_out.dtype))
        if mean:
            totals = coef.new_zeros(offsets.numel() - 1).index_add_(0, bag_of, coef)
            denom = totals[bag_of]
            coef = torch.where(denom != 0, coef / torch.where(denom != 0, denom, 1.0), 0.0)
        return grad.index_add_(0, inverse, grad_out[bag_of] * coef[:, None])

    # -- policy metadata ---------------------------------------------------------------------
    def decayed_count_touch(self, count, last, rows, clock, decay):
        c = self._read(count, rows).view(-1)
        if decay < 1:
            exponent = (clock - self._read(last, rows).view(-1)).to(torch.float64)
            c = c * torch.pow(torch.tensor(decay, dtype=torch.float64, device=c.device),
                              exponent)
        self.scatter(count, rows, (c + 1).view(-1, 1).to(count.dtype))
        self.scatter(last, rows, clock.reshape(1, 1).to(last.dtype))

    # -- segment ops ------------------------------------------------------------------------------
    def segment_sum(self, data, weight, indices, segment_ids, num_segments):
        return segment_sum(data, weight, indices, segment_ids, num_segments)

    # -- optimizer updates: gather, compute, scatter --------------------------------------------
    def adam_update(self, emb, exp_avg, exp_avg_sq, rows, grad, *, decay, beta1, beta2, alpha,
                    eps, l2):
        e, m, v = (self._read(b, rows) for b in (emb, exp_avg, exp_avg_sq))
        g = grad.reshape(e.shape).to(e.dtype) + l2 * e
        e.mul_(decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        e.sub_(alpha * m / (v.sqrt() + eps))
        for blocks, values in ((emb, e), (exp_avg, m), (exp_avg_sq, v)):
            self.scatter(blocks, rows, values)

    def adagrad_update(self, emb, state_sum, rows, grad, *, clr, eps, l2):
        e, s = self._read(emb, rows), self._read(state_sum, rows)
        g = grad.reshape(e.shape).to(e.dtype) + l2 * e
        s.addcmul_(g, g)
        e.sub_(clr * g / (s.sqrt() + eps))
        self.scatter(emb, rows, e)
        self.scatter(state_sum, rows, s)

    def sgd_update(self, emb, momentum_buffer, rows, grad, *, lr, momentum, l2, nesterov):
        e = self._read(emb, rows)
        g = grad.reshape(e.shape).to(e.dtype) + l2 * e
        if momentum:
            b = self._read(momentum_buffer, rows)
            b.mul_(momentum).add_(g)
            self.scatter(momentum_buffer, rows, b)
            g = g + momentum * b if nesterov else b
        e.sub_(lr * g)
        self.scatter(emb, rows, e)

    def _read(self, blocks: BlockList, rows: Tensor) -> Tensor:
        out = torch.empty(rows.numel(), blocks.width, dtype=blocks.dtype, device=blocks.device)
        return self.gather(blocks, rows, out)
