"""numba kernels of the ID map, the slot blocks and the optimizers, for CPU tables.

Each kernel gives the observable results of its twin in :mod:`.torch_backend` (the reference;
the semantics are documented on :class:`.base.Backend`); only speed differs. Arguments are
numpy views of CPU tensors; kernels are compiled on first use and cached to disk
(``cache=True``). Float kernels use numpy's error model: a division by zero gives inf/nan as
in torch, never a ``ZeroDivisionError`` half-way through an update.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .base import EMPTY, ROW_MASK, TAG_SHIFT, TOMBSTONE

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PREFETCH_AHEAD = 16  # probes issued ahead: hides most of a cache miss on this hardware
_BUILD_AHEAD = 8  # map_build's probes write: fewer in flight measured faster (8 vs 16, 32)


@intrinsic
def _prefetch(typingctx, address):
    """Hint the CPU to load the cache line at an int64 address (read, keep in all levels)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i8p = ir.PointerType(ir.IntType(8))
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        ptr = builder.inttoptr(args[0], i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(address), codegen


@njit(inline="always", cache=True)
def _hash(key, tag):
    x = np.uint64(key) ^ (np.uint64(tag) * _GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return np.int64(x ^ (x >> np.uint64(31)))


@njit(cache=True, nogil=True)
def _hashes(ids, tags, has_tags):
    out = np.empty(ids.shape[0], np.int64)
    for i in range(ids.shape[0]):
        out[i] = _hash(ids[i], tags[i] if has_tags else 0)
    return out


@njit(cache=True, nogil=True)
def unique_with_inverse(ids, tags):
    """See ``_torch.unique_with_inverse``; ``tags`` of length 0 means all tags are 0."""
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    hashes = _hashes(ids, tags, has_tags)
    table = np.empty((cap, 2), np.int64)  # (key, index into uniq) side by side
    table[:, 1] = -1
    base = table.ctypes.data
    uniq = np.empty(n, np.int64)
    uniq_tags = np.zeros(n if has_tags else 0, np.int64)
    inverse = np.empty(n, np.int64)
    count = 0
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            _prefetch(base + (hashes[i + _PREFETCH_AHEAD] & mask) * 16)
        key = ids[i]
        tag = tags[i] if has_tags else 0
        s = hashes[i] & mask
        while True:
            j = table[s, 1]
            if j < 0:
                table[s, 0] = key
                table[s, 1] = count
                uniq[count] = key
                if has_tags:
                    uniq_tags[count] = tag
                inverse[i] = count
                count += 1
                break
            if table[s, 0] == key and (not has_tags or uniq_tags[j] == tag):
                inverse[i] = j
                break
            s = (s + 1) & mask
    return uniq[:count], uniq_tags[:count], inverse


@njit(inline="always", cache=True)
def _find(table, key, tag, s, mask):
    """(slot of the key or -1, first reusable slot on the probe path) from start slot s."""
    reusable = -1
    while True:
        v = table[s, 1]
        if v == EMPTY:
            if reusable < 0:
                reusable = s
            return -1, reusable
        if v == TOMBSTONE:
            if reusable < 0:
                reusable = s
        elif table[s, 0] == key and (v >> TAG_SHIFT) == tag:
            return s, reusable
        s = (s + 1) & mask


@njit(cache=True, nogil=True)
def map_lookup_range(table, ids, tags, rows, lo, hi):
    """``rows[i]`` = row of ``ids[i]`` or -1, for ``i`` in ``[lo, hi)`` (read-only: ranges can
    run in parallel threads)."""
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = table.shape[0] - 1
    base = table.ctypes.data
    ahead = np.empty(_PREFETCH_AHEAD, np.int64)  # slots of the next keys, in a ring
    for i in range(lo, min(hi, lo + _PREFETCH_AHEAD)):
        ahead[i - lo] = _hash(ids[i], tags[i] if has_tags else 0) & mask
    for i in range(lo, hi):
        s = ahead[(i - lo) % _PREFETCH_AHEAD]
        k = i + _PREFETCH_AHEAD
        if k < hi:
            nxt = _hash(ids[k], tags[k] if has_tags else 0) & mask
            ahead[(i - lo) % _PREFETCH_AHEAD] = nxt
            _prefetch(base + nxt * 16)
        tag = tags[i] if has_tags else 0
        found, _ = _find(table, ids[i], tag, s, mask)
        rows[i] = table[found, 1] & ROW_MASK if found >= 0 else -1


@njit(cache=True, nogil=True)
def map_insert_missing(table, ids, tags, rows, free, n_free, next_row):
    """Insert the unique keys with ``rows[i] < 0``, in input order, filling ``rows``.

    New keys take the smallest free rows first (``free[:n_free]`` sorted descending), then
    fresh rows. Returns ``(n_new, n_free, next_row, n_tombstones_reused)``."""
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = table.shape[0] - 1
    base = table.ctypes.data
    missing = np.empty(n, np.int64)
    n_missing = 0
    for i in range(n):
        if rows[i] < 0:
            missing[n_missing] = i
            n_missing += 1
    reused_tombstones = 0
    for m in range(n_missing):
        if m + _PREFETCH_AHEAD < n_missing:
            k = missing[m + _PREFETCH_AHEAD]
            _prefetch(base + (_hash(ids[k], tags[k] if has_tags else 0) & mask) * 16)
        i = missing[m]
        key = ids[i]
        tag = tags[i] if has_tags else 0
        _, slot = _find(table, key, tag, _hash(key, tag) & mask, mask)
        if n_free > 0:
            n_free -= 1
            row = free[n_free]
        else:
            row = next_row
            next_row += 1
        if table[slot, 1] == TOMBSTONE:
            reused_tombstones += 1
        table[slot, 0] = key
        table[slot, 1] = row | (np.int64(tag) << TAG_SHIFT)
        rows[i] = row
    return n_missing, n_free, next_row, reused_tombstones


@njit(cache=True, nogil=True)
def map_delete(table, ids, tags):
    n = ids.shape[0]
    has_tags = tags.shape[0] == n and n > 0
    mask = table.shape[0] - 1
    rows = np.empty(n, np.int64)
    for i in range(n):
        tag = tags[i] if has_tags else 0
        s, _ = _find(table, ids[i], tag, _hash(ids[i], tag) & mask, mask)
        if s >= 0:
            rows[i] = table[s, 1] & ROW_MASK
            table[s, 1] = TOMBSTONE
        else:
            rows[i] = -1
    return rows


@njit(cache=True, nogil=True)
def map_build_range(keys, packed, new, lo, hi, deferred):
    """One part of a map build (see ``NumbaBackend.map_build``): empty the slots ``[lo, hi)``
    of ``new`` and insert, in index order, the entries whose home slot lies there and whose
    probe stays there; the index of an entry whose probe would run past ``hi`` goes to
    ``deferred`` instead. Returns how many were deferred. Parts over disjoint slot ranges run
    in parallel; the slot of an entry a few places ahead is prefetched."""
    for s in range(lo, hi):
        new[s, 0] = 0
        new[s, 1] = EMPTY
    mask = new.shape[0] - 1
    base = new.ctypes.data
    n = keys.shape[0]
    count = 0
    for i in range(n):
        ahead = i + _BUILD_AHEAD
        if ahead < n and packed[ahead] >= 0:
            t = _hash(keys[ahead], packed[ahead] >> TAG_SHIFT) & mask
            if lo <= t < hi:
                _prefetch(base + t * 16)
        v = packed[i]
        if v < 0:
            continue
        t = _hash(keys[i], v >> TAG_SHIFT) & mask
        if t < lo or t >= hi:
            continue
        while t < hi and new[t, 1] != EMPTY:
            t += 1
        if t == hi:
            deferred[count] = i
            count += 1
            continue
        new[t, 0] = keys[i]
        new[t, 1] = v
    return count


@njit(cache=True, nogil=True)
def map_insert_deferred(keys, packed, new, deferred):
    """Insert the entries ``deferred`` (indices) by plain linear probing (wrapping)."""
    mask = new.shape[0] - 1
    for i in deferred:
        t = _hash(keys[i], packed[i] >> TAG_SHIFT) & mask
        while new[t, 1] != EMPTY:
            t = (t + 1) & mask
        new[t, 0] = keys[i]
        new[t, 1] = packed[i]


@njit(inline="always", cache=True)
def _split(a, lo, hi, pivot, or_equal):
    """Move the values of ``a[lo:hi]`` below ``pivot`` (``or_equal``: not above it) to the
    front, without branches (a random pivot would mispredict half of them); returns where the
    rest starts."""
    mid = lo
    for i in range(lo, hi):
        v = a[i]
        a[i] = a[mid]
        a[mid] = v
        mid += (v <= pivot) if or_equal else (v < pivot)
    return mid


@njit(cache=True, nogil=True)
def map_items_place(table, id_of_row, tag_of_row, present, lo, hi):
    """First half of ``map_items``: each live entry of the slots ``[lo, hi)`` goes to its row
    (``id_of_row[r]``, ``tag_of_row[r]``, ``present[r] = 1``). Rows are unique, so parts over
    disjoint slot ranges run in parallel; the row of an entry a few slots ahead is
    prefetched (the rows of a hash map's slots are in random order)."""
    ids_base, tags_base = id_of_row.ctypes.data, tag_of_row.ctypes.data
    for s in range(lo, hi):
        if s + _PREFETCH_AHEAD < hi:
            ahead = table[s + _PREFETCH_AHEAD, 1]
            if ahead >= 0:
                _prefetch(ids_base + (ahead & ROW_MASK) * 8)
                _prefetch(tags_base + (ahead & ROW_MASK) * 8)
        v = table[s, 1]
        if v >= 0:
            r = v & ROW_MASK
            id_of_row[r] = table[s, 0]
            tag_of_row[r] = v >> TAG_SHIFT
            present[r] = 1


@njit(cache=True, nogil=True)
def map_ids_place(table, id_of_row, lo, hi):
    """``map_ids_by_row`` over the slots ``[lo, hi)``: the key of each live entry goes to its
    row, nothing else (a third of ``map_items_place``'s scattered writes); parts over
    disjoint slot ranges run in parallel."""
    ids_base = id_of_row.ctypes.data
    for s in range(lo, hi):
        if s + _PREFETCH_AHEAD < hi:
            ahead = table[s + _PREFETCH_AHEAD, 1]
            if ahead >= 0:
                _prefetch(ids_base + (ahead & ROW_MASK) * 8)
        v = table[s, 1]
        if v >= 0:
            id_of_row[v & ROW_MASK] = table[s, 0]


@njit(cache=True, nogil=True)
def map_items_collect(id_of_row, tag_of_row, present):
    """Second half of ``map_items``: ``(ids, tags, rows)`` of the present rows, by row; when
    every row is present (no row freed), the placed arrays themselves."""
    n = present.shape[0]
    count = 0
    for r in range(n):
        count += present[r]
    if count == n:
        return id_of_row, tag_of_row, np.arange(n)
    ids = np.empty(count, np.int64)
    tags = np.empty(count, np.int64)
    rows = np.empty(count, np.int64)
    j = 0
    for r in range(n):
        if present[r]:
            ids[j] = id_of_row[r]
            tags[j] = tag_of_row[r]
            rows[j] = r
            j += 1
    return ids, tags, rows


@njit(cache=True, nogil=True)
def _kth_smallest_in_place(a, k):
    """The ``k``-th smallest (0-based) of ``a`` (no NaN), reordering ``a``: a quickselect.
    Pivots are the median of three values at pseudo-random positions (sorted or patterned
    input stays linear); the values equal to the pivot are split off too, so runs of equal
    values (common in eviction keys) end it instead of slowing it down (numpy's partition is
    5-50x slower on them)."""
    lo, hi = 0, a.shape[0]  # the answer lies in a[lo:hi]
    state = np.uint64(0x2545F4914F6CDD1D)
    picks = np.empty(3, a.dtype)
    while True:
        for p in range(3):
            state ^= state << np.uint64(13)
            state ^= state >> np.uint64(7)
            state ^= state << np.uint64(17)
            picks[p] = a[lo + np.int64(state % np.uint64(hi - lo))]
        x, y, z = picks[0], picks[1], picks[2]
        pivot = max(min(x, y), min(max(x, y), z))
        below = _split(a, lo, hi, pivot, False)
        if k < below:
            hi = below
            continue
        above = _split(a, below, hi, pivot, True)
        if k < above:
            return pivot
        lo = above


@njit(cache=True, nogil=True)
def split_at_kth(values, index, everything, k):
    """``(below, equal)``: the positions of ``values[index]`` (``everything``: of all
    ``values``) below its ``k``-th smallest (0-based) and equal to it, in index order. A
    quickselect on a copy picks the value (:func:`_kth_smallest_in_place`), then one pass sorts
    the positions out: no index array is carried along the selection, as torch.kthvalue's is."""
    n = values.shape[0] if everything else index.shape[0]
    picked = np.empty(n, values.dtype)
    for i in range(n):
        picked[i] = values[i] if everything else values[index[i]]
    kth = _kth_smallest_in_place(picked, k)
    below = np.empty(k, np.int64)  # fewer than k + 1 values are below the k-th
    equal = np.empty(n, np.int64)
    n_below = n_equal = 0
    for i in range(n):
        pos = i if everything else index[i]
        v = values[pos]
        if v < kth:
            below[n_below] = pos
            n_below += 1
        elif v == kth:
            equal[n_equal] = pos
            n_equal += 1
    return below[:n_below], equal[:n_equal]


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
def _row_addresses(block_ptrs, block_size, rows, row_bytes):
    """Data address of each row (0 for rows < 0): one division per row, done once."""
    out = np.empty(rows.shape[0], np.int64)
    for u in range(rows.shape[0]):
        r = rows[u]
        out[u] = block_ptrs[r // block_size] + (r % block_size) * row_bytes if r >= 0 else 0
    return out


@njit(inline="always", cache=True)
def _prefetch_row(address, row_bytes):
    if address != 0:
        for q in range(0, row_bytes, 64):
            _prefetch(address + q)


@njit(cache=True, nogil=True)
def row_addresses(block_ptrs, block_size, rows, row_bytes):
    """Data address of each row (0 for rows < 0): one division per row, done once."""
    return _row_addresses(block_ptrs, block_size, rows, row_bytes)


@njit(cache=True, nogil=True)
def gather_range(addresses, out, lo, hi):
    """``out[i]`` = the row at ``addresses[i]`` (zeros for address 0), ``i`` in [lo, hi)."""
    width = out.shape[1]
    row_bytes = width * out.itemsize
    for i in range(lo, hi):
        if i + _PREFETCH_AHEAD < hi:
            _prefetch_row(addresses[i + _PREFETCH_AHEAD], row_bytes)
        if addresses[i] == 0:
            out[i, :] = 0
            continue
        src = carray(_as_pointer(addresses[i]), (width,), out.dtype)
        for j in range(width):
            out[i, j] = src[j]


@njit(cache=True, nogil=True)
def scatter_range(block_ptrs, block_size, rows, values, lo, hi):
    """``row rows[i]`` = ``values[i]`` (or ``values[0]`` for all), ``i`` in ``[lo, hi)`` in
    order (a later write of a row wins), -1 skipped. A run of consecutive rows inside one
    block (a checkpoint's rows in storage order) is copied as one span."""
    width = values.shape[1]
    row_bytes = width * values.itemsize
    if values.shape[0] == 1 and rows.shape[0] != 1:
        addresses = _row_addresses(block_ptrs, block_size, rows[lo:hi], row_bytes)
        for address in addresses:
            if address != 0:
                dst = carray(_as_pointer(address), (width,), values.dtype)
                for j in range(width):
                    dst[j] = values[0, j]
        return
    flat = values.reshape(-1)
    i = lo
    while i < hi:
        r = rows[i]
        if r < 0:
            i += 1
            continue
        block, offset = r // block_size, r % block_size
        end = min(hi, i + block_size - offset)  # the run stops at the end of the block
        j = i + 1
        while j < end and rows[j] == r + (j - i):
            j += 1
        span = (j - i) * width
        dst = carray(_as_pointer(block_ptrs[block] + offset * row_bytes), (span,), values.dtype)
        src = flat[i * width : i * width + span]
        for k in range(span):
            dst[k] = src[k]
        i = j


@njit(cache=True, nogil=True)
def strictly_increasing(a):
    for i in range(1, a.shape[0]):
        if a[i] <= a[i - 1]:
            return False
    return True


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def bag_reduce_range(addresses, inverse, offsets, weights, mean, out, lo, hi):
    """Fused lookup + combiner for bags ``[lo, hi)``: ``out[b] = sum_i w_i * row_i`` with
    ``row_i`` the row at ``addresses[inverse[i]]`` (zeros for address 0); divided by
    ``sum_i w_i`` when ``mean`` (0 for an empty bag or zero total weight). ``weights`` (dtype
    of ``out``) of length 0 means all ones."""
    width = out.shape[1]
    row_bytes = width * out.itemsize
    has_weights = weights.shape[0] > 0
    end = offsets[hi]
    one = out.dtype.type(1)
    for b in range(lo, hi):
        for j in range(width):
            out[b, j] = 0
        total = 0.0
        for i in range(offsets[b], offsets[b + 1]):
            if i + _PREFETCH_AHEAD < end:
                _prefetch_row(addresses[inverse[i + _PREFETCH_AHEAD]], row_bytes)
            w = weights[i] if has_weights else one
            total += w
            address = addresses[inverse[i]]
            if address == 0:
                continue
            row = carray(_as_pointer(address), (width,), out.dtype)
            if has_weights:
                for j in range(width):
                    out[b, j] += w * row[j]
            else:
                for j in range(width):
                    out[b, j] += row[j]
        if mean:
            scale = out.dtype.type(1.0 / total if total != 0.0 else 0.0)
            for j in range(width):
                out[b, j] *= scale


@njit(cache=True, nogil=True)
def bag_backward_plan(inverse, offsets, weights, mean, num_unique):
    """Occurrences grouped by unique row (a counting sort), for :func:`bag_backward_range`.

    Returns ``(starts, bag, coef)``: the occurrences of unique ``u`` are positions
    ``starts[u]:starts[u + 1]``, in input order; the occurrence at position ``k`` belongs to
    bag ``bag[k]`` and contributes ``coef[k] * grad_out[bag[k]]`` (its weight, divided by its
    bag's total weight for ``mean``). Grouped copies keep the backward's reads sequential."""
    n = inverse.shape[0]
    has_weights = weights.shape[0] > 0
    starts = np.zeros(num_unique + 1, np.int64)
    for i in range(n):
        starts[inverse[i] + 1] += 1
    for u in range(num_unique):
        starts[u + 1] += starts[u]
    fill = starts[:-1].copy()
    bag = np.empty(n, np.int64)
    coef = np.empty(n, np.float64)
    for b in range(offsets.shape[0] - 1):
        scale = 1.0
        if mean:
            total = 0.0
            for i in range(offsets[b], offsets[b + 1]):
                total += weights[i] if has_weights else 1.0
            scale = 1.0 / total if total != 0.0 else 0.0
        for i in range(offsets[b], offsets[b + 1]):
            k = fill[inverse[i]]
            fill[inverse[i]] = k + 1
            bag[k] = b
            coef[k] = (weights[i] if has_weights else 1.0) * scale
    return starts, bag, coef


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def bag_backward_range(starts, bag, coef, grad_out, grad_unique, lo, hi):
    """``grad_unique[u] = sum over its occurrences k: coef[k] * grad_out[bag[k]]`` for ``u`` in
    ``[lo, hi)``; each row is written once, in order (no zero-filling needed)."""
    width = grad_out.shape[1]
    row_bytes = width * grad_out.itemsize
    base = grad_out.ctypes.data
    end = starts[hi]
    for u in range(lo, hi):
        dst = grad_unique[u]
        dst[:] = 0
        for k in range(starts[u], starts[u + 1]):
            if k + _PREFETCH_AHEAD < end:
                _prefetch_row(base + bag[k + _PREFETCH_AHEAD] * row_bytes, row_bytes)
            c = grad_out.dtype.type(coef[k])
            src = grad_out[bag[k]]
            for j in range(width):
                dst[j] += c * src[j]


@njit(cache=True, nogil=True, error_model="numpy")
def decayed_count_touch_range(count_ptrs, last_ptrs, block_size, rows, clock, decay, lo, hi):
    """LFU's touch of ``rows[lo:hi]`` (unique, valid): ``count = count * decay ** (clock -
    last) + 1`` (``count + 1`` when ``decay == 1``), ``last = clock``; float64 counts, int64
    steps, one value a row."""
    for i in range(lo, hi):
        if i + _PREFETCH_AHEAD < hi:
            ahead = rows[i + _PREFETCH_AHEAD]
            _prefetch(count_ptrs[ahead // block_size] + (ahead % block_size) * 8)
            _prefetch(last_ptrs[ahead // block_size] + (ahead % block_size) * 8)
        r = rows[i]
        b, o = r // block_size, r % block_size
        count = carray(_as_pointer(count_ptrs[b]), (block_size,), np.float64)
        last = carray(_as_pointer(last_ptrs[b]), (block_size,), np.int64)
        if decay < 1.0:
            count[o] = count[o] * decay ** np.float64(clock - last[o]) + 1.0
        else:
            count[o] += 1.0
        last[o] = clock


# -- optimizer updates over unique rows (addresses from row_addresses; rows are unique) --------
@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def segment_sum(data, weights, indices, segment_ids, out):
    """``out[segment_ids[i]] += weights[i] * data[indices[i]]`` for every ``i`` (``out``
    zeroed by the caller); ``weights`` of length 0 means all ones. One thread: segments are
    in any order, so a split would need atomics or a sort."""
    has_weights = weights.shape[0] > 0
    width = data.shape[1]
    for i in range(indices.shape[0]):
        s = segment_ids[i]
        r = indices[i]
        if has_weights:
            w = weights[i]
            for j in range(width):
                out[s, j] += w * data[r, j]
        else:
            for j in range(width):
                out[s, j] += data[r, j]


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def adam_update_range(emb_addr, m_addr, v_addr, grads, decay, beta1, one_minus_beta1, beta2,
                      one_minus_beta2, alpha, eps, l2, lo, hi):
    """Per row: ``g += l2 * e; e *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    e -= alpha * m / (sqrt(v) + eps)`` (alpha carries the bias correction)."""
    width = grads.shape[1]
    dt = grads.dtype
    # scalars in the table dtype: mixing in float64 would make every element a float64
    # sqrt/div and stop vectorisation (2.7x slower)
    decay, beta1, beta2 = dt.type(decay), dt.type(beta1), dt.type(beta2)
    # 1 - beta comes computed in float64: in float32, 1 - float32(0.999) is off by 1e-5
    c1, c2 = dt.type(one_minus_beta1), dt.type(one_minus_beta2)
    alpha, eps, l2 = dt.type(alpha), dt.type(eps), dt.type(l2)
    row_bytes = width * grads.itemsize
    for u in range(lo, hi):
        if u + _PREFETCH_AHEAD < hi:
            _prefetch_row(emb_addr[u + _PREFETCH_AHEAD], row_bytes)
            _prefetch_row(m_addr[u + _PREFETCH_AHEAD], row_bytes)
            _prefetch_row(v_addr[u + _PREFETCH_AHEAD], row_bytes)
        e = carray(_as_pointer(emb_addr[u]), (width,), dt)
        m = carray(_as_pointer(m_addr[u]), (width,), dt)
        v = carray(_as_pointer(v_addr[u]), (width,), dt)
        for j in range(width):
            g = grads[u, j] + l2 * e[j]
            ej = e[j] * decay
            mj = beta1 * m[j] + c1 * g
            vj = beta2 * v[j] + c2 * g * g
            m[j] = mj
            v[j] = vj
            e[j] = ej - alpha * mj / (np.sqrt(vj) + eps)


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def adagrad_update_range(emb_addr, sum_addr, grads, clr, eps, l2, lo, hi):
    """Per row: ``g += l2 * e; s += g^2; e -= clr * g / (sqrt(s) + eps)``."""
    width = grads.shape[1]
    dt = grads.dtype
    clr, eps, l2 = dt.type(clr), dt.type(eps), dt.type(l2)
    row_bytes = width * grads.itemsize
    for u in range(lo, hi):
        if u + _PREFETCH_AHEAD < hi:
            _prefetch_row(emb_addr[u + _PREFETCH_AHEAD], row_bytes)
            _prefetch_row(sum_addr[u + _PREFETCH_AHEAD], row_bytes)
        e = carray(_as_pointer(emb_addr[u]), (width,), dt)
        s = carray(_as_pointer(sum_addr[u]), (width,), dt)
        for j in range(width):
            g = grads[u, j] + l2 * e[j]
            sj = s[j] + g * g
            s[j] = sj
            e[j] -= clr * g / (np.sqrt(sj) + eps)


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def sgd_update_range(emb_addr, buf_addr, grads, lr, momentum, l2, nesterov, lo, hi):
    """Per row: ``g += l2 * e``; with momentum ``b = momentum * b + g`` and the step uses ``b``
    (``g + momentum * b`` for Nesterov); ``e -= lr * step``. ``buf_addr`` is unused without
    momentum."""
    width = grads.shape[1]
    dt = grads.dtype
    lr, momentum, l2 = dt.type(lr), dt.type(momentum), dt.type(l2)
    row_bytes = width * grads.itemsize
    for u in range(lo, hi):
        if u + _PREFETCH_AHEAD < hi:
            _prefetch_row(emb_addr[u + _PREFETCH_AHEAD], row_bytes)
        e = carray(_as_pointer(emb_addr[u]), (width,), dt)
        if momentum != 0.0:
            b = carray(_as_pointer(buf_addr[u]), (width,), dt)
            for j in range(width):
                g = grads[u, j] + l2 * e[j]
                bj = momentum * b[j] + g
                b[j] = bj
                e[j] -= lr * (g + momentum * bj if nesterov else bj)
        else:
            for j in range(width):
                e[j] -= lr * (grads[u, j] + l2 * e[j])


# -- CRC-32 ------------------------------------------------------------------------------------
# zlib's CRC-32 by folding with carry-less multiplication (PCLMULQDQ; callers check that the
# CPU has it): 64 bytes per step in four 128-bit lanes, folded to one lane, reduced to 64 and
# 32 bits, then a Barrett reduction. The constants are x^k mod P(x) for the reflected
# polynomial 0xEDB88320 (the ones of Intel's white paper "Fast CRC Computation for Generic
# Polynomials Using PCLMULQDQ", used by zlib-ng and Linux). Plain zlib is the reference.

@intrinsic
def _clmul(typingctx, a, b):
    """The 128-bit carry-less product of two uint64 as ``(low, high)`` uint64."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    signature = types.UniTuple(types.uint64, 2)(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        v2 = ir.VectorType(i64, 2)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v2, [v2, v2, i8]), "llvm.x86.pclmulqdq")
        undef = ir.Constant(v2, ir.Undefined)
        va = builder.insert_element(undef, args[0], ir.Constant(i32, 0))
        vb = builder.insert_element(undef, args[1], ir.Constant(i32, 0))
        product = builder.call(fn, [va, vb, ir.Constant(i8, 0)])
        low = builder.extract_element(product, ir.Constant(i32, 0))
        high = builder.extract_element(product, ir.Constant(i32, 1))
        return context.make_tuple(builder, signature.return_type, [low, high])

    return signature, codegen


_K1, _K2 = np.uint64(0x154442BD4), np.uint64(0x1C6E41596)  # fold by 512 bits
_K3, _K4 = np.uint64(0x1751997D0), np.uint64(0x0CCAA009E)  # fold by 128 bits
_K5 = np.uint64(0x163CD6124)  # 64 -> 32 bits
_POLY, _MU = np.uint64(0x1DB710641), np.uint64(0x1F7011641)  # Barrett reduction
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)


@njit(inline="always", cache=True)
def _fold(lo, hi, k_lo, k_hi, next_lo, next_hi):
    a0, a1 = _clmul(lo, k_lo)
    b0, b1 = _clmul(hi, k_hi)
    return a0 ^ b0 ^ next_lo, a1 ^ b1 ^ next_hi


@njit(cache=True, nogil=True)
def crc32_pclmul(words, crc):
    """``zlib.crc32(words, crc)`` for uint64 ``words`` (little-endian bytes), whose length is
    a multiple of 8 (64 bytes) and at least 8."""
    a0, a1 = words[0] ^ np.uint64(~np.uint32(crc)), words[1]
    b0, b1 = words[2], words[3]
    c0, c1 = words[4], words[5]
    d0, d1 = words[6], words[7]
    for i in range(8, words.shape[0], 8):
        a0, a1 = _fold(a0, a1, _K1, _K2, words[i], words[i + 1])
        b0, b1 = _fold(b0, b1, _K1, _K2, words[i + 2], words[i + 3])
        c0, c1 = _fold(c0, c1, _K1, _K2, words[i + 4], words[i + 5])
        d0, d1 = _fold(d0, d1, _K1, _K2, words[i + 6], words[i + 7])
    a0, a1 = _fold(a0, a1, _K3, _K4, b0, b1)
    a0, a1 = _fold(a0, a1, _K3, _K4, c0, c1)
    a0, a1 = _fold(a0, a1, _K3, _K4, d0, d1)
    t0, t1 = _clmul(a0, _K4)  # 128 -> 64 bits (appends 32 zero bits)
    t0 ^= a1
    u0, _ = _clmul(t0 & _LOW32, _K5)  # 64 -> 32 bits
    u0 ^= (t0 >> _U32) | (t1 << _U32)
    v0, _ = _clmul(u0 & _LOW32, _MU)  # Barrett: the remainder in bits 32..63
    w0, _ = _clmul(v0 & _LOW32, _POLY)
    return np.uint32(~np.uint32((w0 ^ u0) >> _U32))
