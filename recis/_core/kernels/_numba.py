"""numba kernels of the ID map and the slot store, for CPU tables.

Each function has the signature and the observable results of its twin in
:mod:`recis._core.kernels._torch` (the reference, which documents the semantics and the map
layout); only speed differs. Arguments are numpy views of CPU tensors; kernels are compiled on
first use and cached to disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._torch import EMPTY, ROW_MASK, TAG_SHIFT, TOMBSTONE

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(inline="always", cache=True)
def _hash(key, tag):
    x = np.uint64(key) ^ (np.uint64(tag) * _GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return np.int64(x ^ (x >> np.uint64(31)))


@njit(cache=True, nogil=True)
def unique_with_inverse(ids, tags):
    """See ``_torch.unique_with_inverse``; ``tags`` of length 0 means all tags are 0."""
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    table = np.full(cap, -1, np.int64)
    uniq = np.empty(n, np.int64)
    uniq_tags = np.zeros(n if has_tags else 0, np.int64)
    inverse = np.empty(n, np.int64)
    count = 0
    for i in range(n):
        key = ids[i]
        tag = tags[i] if has_tags else 0
        s = _hash(key, tag) & mask
        while True:
            j = table[s]
            if j < 0:
                table[s] = count
                uniq[count] = key
                if has_tags:
                    uniq_tags[count] = tag
                inverse[i] = count
                count += 1
                break
            if uniq[j] == key and (not has_tags or uniq_tags[j] == tag):
                inverse[i] = j
                break
            s = (s + 1) & mask
    return uniq[:count], uniq_tags[:count], inverse


@njit(inline="always", cache=True)
def _find(keys, vals, key, tag, mask):
    """(position of the key or -1, first reusable slot seen on the probe path)."""
    s = _hash(key, tag) & mask
    reusable = -1
    while True:
        v = vals[s]
        if v == EMPTY:
            if reusable < 0:
                reusable = s
            return -1, reusable
        if v == TOMBSTONE:
            if reusable < 0:
                reusable = s
        elif keys[s] == key and (v >> TAG_SHIFT) == tag:
            return s, reusable
        s = (s + 1) & mask


@njit(cache=True, nogil=True)
def map_lookup(keys, vals, ids, tags):
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = keys.shape[0] - 1
    rows = np.empty(n, np.int64)
    for i in range(n):
        tag = tags[i] if has_tags else 0
        s, _ = _find(keys, vals, ids[i], tag, mask)
        rows[i] = vals[s] & ROW_MASK if s >= 0 else -1
    return rows


@njit(cache=True, nogil=True)
def map_lookup_or_insert(keys, vals, ids, tags, free, n_free, next_row):
    """Returns ``(rows, n_new, n_free, next_row, n_tombstones_reused)``."""
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = keys.shape[0] - 1
    rows = np.empty(n, np.int64)
    n_new = 0
    reused_tombstones = 0
    for i in range(n):
        key = ids[i]
        tag = tags[i] if has_tags else 0
        s, reusable = _find(keys, vals, key, tag, mask)
        if s >= 0:
            rows[i] = vals[s] & ROW_MASK
            continue
        if n_free > 0:
            n_free -= 1
            row = free[n_free]
        else:
            row = next_row
            next_row += 1
        if vals[reusable] == TOMBSTONE:
            reused_tombstones += 1
        keys[reusable] = key
        vals[reusable] = row | (np.int64(tag) << TAG_SHIFT)
        rows[i] = row
        n_new += 1
    return rows, n_new, n_free, next_row, reused_tombstones


@njit(cache=True, nogil=True)
def map_delete(keys, vals, ids, tags):
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = keys.shape[0] - 1
    rows = np.empty(n, np.int64)
    for i in range(n):
        tag = tags[i] if has_tags else 0
        s, _ = _find(keys, vals, ids[i], tag, mask)
        if s >= 0:
            rows[i] = vals[s] & ROW_MASK
            vals[s] = TOMBSTONE
        else:
            rows[i] = -1
    return rows


@njit(cache=True, nogil=True)
def map_rebuild(keys, vals, capacity):
    new_keys = np.zeros(capacity, np.int64)
    new_vals = np.full(capacity, EMPTY, np.int64)
    mask = capacity - 1
    for s in range(keys.shape[0]):
        v = vals[s]
        if v >= 0:
            t = _hash(keys[s], v >> TAG_SHIFT) & mask
            while new_vals[t] != EMPTY:
                t = (t + 1) & mask
            new_keys[t] = keys[s]
            new_vals[t] = v
    return new_keys, new_vals


@intrinsic
def _as_pointer(typingctx, address):
    """An int64 address as a ``void*`` (to view a block's memory with ``carray``)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


# Blocks are passed as an int64 array of their data addresses (the caller keeps the tensors
# alive): indexing a typed list of arrays costs a reference-count round trip per row, which
# made a gather 3x slower than reading from one flat array.


@njit(cache=True, nogil=True)
def gather_rows(block_ptrs, block_size, rows, out):
    width = out.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            out[i, :] = 0
            continue
        src = carray(_as_pointer(block_ptrs[r // block_size]), (block_size, width), out.dtype)
        o = r % block_size
        for j in range(width):
            out[i, j] = src[o, j]
    return out


@njit(cache=True, nogil=True)
def scatter_rows(block_ptrs, block_size, rows, values):
    width = values.shape[1]
    broadcast = values.shape[0] == 1 and rows.shape[0] != 1
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            continue
        dst = carray(_as_pointer(block_ptrs[r // block_size]), (block_size, width), values.dtype)
        o = r % block_size
        k = 0 if broadcast else i
        for j in range(width):
            dst[o, j] = values[k, j]



@njit(cache=True, nogil=True)
def bag_reduce_rows(block_ptrs, block_size, rows, inverse, offsets, weights, mean, out):
    """Fused lookup + combiner: ``out[b] = sum_i w_i * row(rows[inverse[i]])`` over bag ``b``
    (divided by ``sum_i w_i`` when ``mean``; 0 for an empty bag or zero total weight). Rows
    < 0 read as zeros. ``weights`` (dtype of ``out``) of length 0 means all ones."""
    width = out.shape[1]
    has_weights = weights.shape[0] > 0
    one = out.dtype.type(1)
    for b in range(offsets.shape[0] - 1):
        acc = out[b]
        acc[:] = 0
        total = 0.0
        for i in range(offsets[b], offsets[b + 1]):
            w = weights[i] if has_weights else one
            total += w
            r = rows[inverse[i]]
            if r < 0:
                continue
            src = carray(_as_pointer(block_ptrs[r // block_size]), (block_size, width), out.dtype)
            row = src[r % block_size]
            if has_weights:
                for j in range(width):
                    acc[j] += w * row[j]
            else:
                for j in range(width):
                    acc[j] += row[j]
        if mean:
            scale = out.dtype.type(1.0 / total if total != 0.0 else 0.0)
            for j in range(width):
                acc[j] *= scale


@njit(cache=True, nogil=True)
def bag_reduce_backward(inverse, offsets, weights, mean, grad_out, grad_unique):
    """Gradient of :func:`bag_reduce_rows` per unique row: ``grad_unique[inverse[i]] +=
    w_i * scale_b * grad_out[b]``; ``grad_unique`` must be zeroed by the caller."""
    width = grad_out.shape[1]
    has_weights = weights.shape[0] > 0
    one = grad_out.dtype.type(1)
    for b in range(offsets.shape[0] - 1):
        scale = one
        if mean:
            total = 0.0
            for i in range(offsets[b], offsets[b + 1]):
                total += weights[i] if has_weights else one
            scale = grad_out.dtype.type(1.0 / total if total != 0.0 else 0.0)
        g = grad_out[b]
        for i in range(offsets[b], offsets[b + 1]):
            w = (weights[i] if has_weights else one) * scale
            dst = grad_unique[inverse[i]]
            for j in range(width):
                dst[j] += w * g[j]
