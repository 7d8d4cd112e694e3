"""numba kernels of the feature ops: FarmHash64, MurmurHash64A, feature crossing, int64 -> text.

Arguments are numpy arrays (views of CPU tensors); kernels are compiled on first use and
cached to disk (``cache=True``). All hash arithmetic is on ``uint64`` and wraps modulo 2**64;
results are returned as ``int64`` with the same bits (as RecIS returns them).

Which hash RecIS uses, and how this module is tied to it:

* ``Hash("farm")`` in RecIS (``csrc/ops/fused_hash_kernel.cu``, ``FarmhashFactory``) calls
  FarmHash's ``Fingerprint64``, i.e. ``farmhashna::Hash64`` of the row's bytes (no seed
  argument; the long-input path starts from the constant 81 as in FarmHash).
  :func:`farmhash64` implements that function from the algorithm.
  ``tests/test_features_hash.py`` checks it against the FarmHash self-test vectors of
  ``farmhashna::Hash64`` (google/farmhash ``src/farmhash.cc``) and against the values in
  RecIS's ``tests/ops/fused_hash_test.py``.
* ``Hash("murmur")`` (``MurmurhashFactory``) is MurmurHash64A (MurmurHash2, 64-bit) with
  seed 0; ``FeatureCross`` hashes the pair ``[x, y]`` of int64 IDs with the same function over
  their 16 little-endian bytes (``murmur_hash_64(keys, seed=0, size=2)`` in RecIS's
  ``ragged_common.cuh``). :func:`murmurhash64a` is checked against SMHasher's verification
  value of MurmurHash64A (0x1F0D3804) and against RecIS's test values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_U0 = np.uint64(0)
_K0 = np.uint64(0xC3A5C85C97CB3127)
_K1 = np.uint64(0xB492B66FBE98F273)
_K2 = np.uint64(0x9AE16A3B2F90404F)
_KMUL = np.uint64(0x9DDFEA08EB382D69)
_MURMUR_M = np.uint64(0xC6A4A7935BD1E995)
_R47 = np.uint64(47)


@njit(inline="always", cache=True)
def _fetch64(data, pos):
    v = _U0
    for i in range(8):
        v |= np.uint64(data[pos + i]) << np.uint64(8 * i)
    return v


@njit(inline="always", cache=True)
def _fetch32(data, pos):
    v = _U0
    for i in range(4):
        v |= np.uint64(data[pos + i]) << np.uint64(8 * i)
    return v


@njit(inline="always", cache=True)
def _rot(v, shift):
    s = np.uint64(shift)
    return (v >> s) | (v << (np.uint64(64) - s))


@njit(inline="always", cache=True)
def _shift_mix(v):
    return v ^ (v >> _R47)


@njit(inline="always", cache=True)
def _mix16(u, v, mul):
    a = (u ^ v) * mul
    a ^= a >> _R47
    b = (v ^ a) * mul
    b ^= b >> _R47
    return b * mul


@njit(inline="always", cache=True)
def _weak32(data, pos, a, b):
    """(first, second) of FarmHash's WeakHashLen32WithSeeds over data[pos:pos+32]."""
    w = _fetch64(data, pos)
    x = _fetch64(data, pos + 8)
    y = _fetch64(data, pos + 16)
    z = _fetch64(data, pos + 24)
    a += w
    b = _rot(b + a + z, 21)
    c = a
    a += x
    a += y
    b += _rot(a, 44)
    return a + z, b + c


@njit(cache=True)
def farmhash64(data, start, length):
    """FarmHash ``Fingerprint64`` (= ``farmhashna::Hash64``) of ``data[start:start+length]``
    (``data``: uint8 array); the uint64 result."""
    n = np.uint64(length)
    p = start
    if length <= 16:
        if length >= 8:
            mul = _K2 + n * np.uint64(2)
            a = _fetch64(data, p) + _K2
            b = _fetch64(data, p + length - 8)
            c = _rot(b, 37) * mul + a
            d = (_rot(a, 25) + b) * mul
            return _mix16(c, d, mul)
        if length >= 4:
            mul = _K2 + n * np.uint64(2)
            a = _fetch32(data, p)
            return _mix16(n + (a << np.uint64(3)), _fetch32(data, p + length - 4), mul)
        if length > 0:
            a = np.uint64(data[p])
            b = np.uint64(data[p + (length >> 1)])
            c = np.uint64(data[p + length - 1])
            y = (a + (b << np.uint64(8))) & np.uint64(0xFFFFFFFF)
            z = (n + (c << np.uint64(2))) & np.uint64(0xFFFFFFFF)
            return _shift_mix(y * _K2 ^ z * _K0) * _K2
        return _K2
    if length <= 32:
        mul = _K2 + n * np.uint64(2)
        a = _fetch64(data, p) * _K1
        b = _fetch64(data, p + 8)
        c = _fetch64(data, p + length - 8) * mul
        d = _fetch64(data, p + length - 16) * _K2
        return _mix16(_rot(a + b, 43) + _rot(c, 30) + d, a + _rot(b + _K2, 18) + c, mul)
    if length <= 64:
        mul = _K2 + n * np.uint64(2)
        a = _fetch64(data, p) * _K2
        b = _fetch64(data, p + 8)
        c = _fetch64(data, p + length - 8) * mul
        d = _fetch64(data, p + length - 16) * _K2
        y = _rot(a + b, 43) + _rot(c, 30) + d
        z = _mix16(y, a + _rot(b + _K2, 18) + c, mul)
        e = _fetch64(data, p + 16) * mul
        f = _fetch64(data, p + 24)
        g = (y + _fetch64(data, p + length - 32)) * mul
        h = (z + _fetch64(data, p + length - 24)) * mul
        return _mix16(_rot(e + f, 43) + _rot(g, 30) + h, e + _rot(f + a, 18) + g, mul)
    seed = np.uint64(81)
    x = seed
    y = seed * _K1 + np.uint64(113)
    z = _shift_mix(y * _K2 + np.uint64(113)) * _K2
    v0 = _U0
    v1 = _U0
    w0 = _U0
    w1 = _U0
    x = x * _K2 + _fetch64(data, p)
    end = p + ((length - 1) // 64) * 64
    last64 = end + ((length - 1) & 63) - 63
    while True:
        x = _rot(x + y + v0 + _fetch64(data, p + 8), 37) * _K1
        y = _rot(y + v1 + _fetch64(data, p + 48), 42) * _K1
        x ^= w1
        y += v0 + _fetch64(data, p + 40)
        z = _rot(z + w0, 33) * _K1
        v0, v1 = _weak32(data, p, v1 * _K1, x + w0)
        w0, w1 = _weak32(data, p + 32, z + w1, y + _fetch64(data, p + 16))
        x, z = z, x
        p += 64
        if p == end:
            break
    mul = _K1 + ((z & np.uint64(0xFF)) << np.uint64(1))
    p = last64
    w0 += np.uint64((length - 1) & 63)
    v0 += w0
    w0 += v0
    x = _rot(x + y + v0 + _fetch64(data, p + 8), 37) * mul
    y = _rot(y + v1 + _fetch64(data, p + 48), 42) * mul
    x ^= w1 * np.uint64(9)
    y += v0 * np.uint64(9) + _fetch64(data, p + 40)
    z = _rot(z + w0, 33) * mul
    v0, v1 = _weak32(data, p, v1 * mul, x + w0)
    w0, w1 = _weak32(data, p + 32, z + w1, y + _fetch64(data, p + 16))
    x, z = z, x
    return _mix16(_mix16(v0, w0, mul) + _shift_mix(y) * _K0 + z, _mix16(v1, w1, mul) + x, mul)


@njit(inline="always", cache=True)
def _murmur_final(h):
    h ^= h >> _R47
    h *= _MURMUR_M
    h ^= h >> _R47
    return h


@njit(cache=True)
def murmurhash64a(data, start, length, seed):
    """MurmurHash64A of ``data[start:start+length]`` (uint8 array) with a uint64 ``seed``."""
    h = np.uint64(seed) ^ (np.uint64(length) * _MURMUR_M)
    p = start
    blocks = length // 8
    for _ in range(blocks):
        k = _fetch64(data, p) * _MURMUR_M
        k ^= k >> _R47
        k *= _MURMUR_M
        h ^= k
        h *= _MURMUR_M
        p += 8
    tail = length & 7
    if tail:
        for i in range(tail - 1, -1, -1):
            h ^= np.uint64(data[p + i]) << np.uint64(8 * i)
        h *= _MURMUR_M
    return _murmur_final(h)


@njit(inline="always", cache=True)
def murmur_pair(x, y):
    """MurmurHash64A (seed 0) of the 16 little-endian bytes of the int64 pair ``[x, y]``."""
    h = np.uint64(16) * _MURMUR_M
    for key in (np.uint64(x), np.uint64(y)):
        k = key * _MURMUR_M
        k ^= k >> _R47
        k *= _MURMUR_M
        h ^= k
        h *= _MURMUR_M
    return _murmur_final(h)


@njit(cache=True, nogil=True)
def hash_rows(data, offsets, use_farm):
    """One int64 hash per row ``data[offsets[i]:offsets[i+1]]``: FarmHash64 when
    ``use_farm``, else MurmurHash64A with seed 0."""
    rows = offsets.shape[0] - 1
    out = np.empty(rows, np.int64)
    for i in range(rows):
        start = offsets[i]
        length = offsets[i + 1] - start
        if use_farm:
            out[i] = np.int64(farmhash64(data, start, length))
        else:
            out[i] = np.int64(murmurhash64a(data, start, length, _U0))
    return out


@njit(cache=True, nogil=True)
def _unique_first(values, weights, lo, hi):
    """Sorted distinct values of ``values[lo:hi]`` and the weight of each one's first
    occurrence."""
    segment = values[lo:hi]
    order = np.argsort(segment, kind="mergesort")  # stable: equal IDs keep their order
    ids = np.empty(hi - lo, np.int64)
    wts = np.empty(hi - lo, weights.dtype)
    n = 0
    for j in range(hi - lo):
        k = order[j]
        if n == 0 or segment[k] != ids[n - 1]:
            ids[n] = segment[k]
            wts[n] = weights[lo + k]
            n += 1
    return ids[:n], wts[:n]


@njit(cache=True, nogil=True)
def feature_cross(x_values, x_offsets, x_weights, y_values, y_offsets, y_weights, rows):
    """Row-wise cross of two ragged ID lists: (values, offsets, weights); see FeatureCross."""
    counts = np.zeros(rows + 1, np.int64)
    for i in range(rows):
        nx = np.unique(x_values[x_offsets[i]:x_offsets[i + 1]]).shape[0]
        ny = np.unique(y_values[y_offsets[i]:y_offsets[i + 1]]).shape[0]
        counts[i + 1] = counts[i] + nx * ny
    out = np.empty(counts[rows], np.int64)
    out_w = np.empty(counts[rows], x_weights.dtype)
    for i in range(rows):
        xs, xw = _unique_first(x_values, x_weights, x_offsets[i], x_offsets[i + 1])
        ys, yw = _unique_first(y_values, y_weights, y_offsets[i], y_offsets[i + 1])
        k = counts[i]
        for a in range(xs.shape[0]):
            for b in range(ys.shape[0]):
                out[k] = np.int64(murmur_pair(xs[a], ys[b]))
                out_w[k] = xw[a] * yw[b]
                k += 1
    return out, counts, out_w


@njit(cache=True, nogil=True)
def int64_to_decimal(values):
    """The decimal text of each int64 (``-`` for negatives) as uint8 ASCII bytes, and the
    offsets of each number's bytes."""
    n = values.shape[0]
    offsets = np.zeros(n + 1, np.int64)
    for i in range(n):
        v = values[i]
        digits = 1
        u = np.uint64(-(v + 1)) + np.uint64(1) if v < 0 else np.uint64(v)
        while u >= np.uint64(10):
            u //= np.uint64(10)
            digits += 1
        offsets[i + 1] = offsets[i] + digits + (1 if v < 0 else 0)
    out = np.empty(offsets[n], np.uint8)
    for i in range(n):
        v = values[i]
        u = np.uint64(-(v + 1)) + np.uint64(1) if v < 0 else np.uint64(v)
        pos = offsets[i + 1] - 1
        while True:
            out[pos] = np.uint8(48 + u % np.uint64(10))
            u //= np.uint64(10)
            pos -= 1
            if u == np.uint64(0):
                break
        if v < 0:
            out[offsets[i]] = np.uint8(45)
    return out, offsets


@njit(cache=True, nogil=True)
def bucketize_segments(values, value_offsets, bounds, bound_offsets):
    """For each segment ``s`` of ``values`` (float32), the number of its boundaries
    ``bounds[bound_offsets[s]:bound_offsets[s+1]]`` that are ``<=`` each value (an upper-bound
    binary search; NaN counts every boundary, as RecIS's kernel)."""
    out = np.empty(values.shape[0], np.int64)
    for s in range(value_offsets.shape[0] - 1):
        lo_b = bound_offsets[s]
        count_b = bound_offsets[s + 1] - lo_b
        for i in range(value_offsets[s], value_offsets[s + 1]):
            v = values[i]
            if v != v:
                out[i] = count_b
                continue
            lo = 0
            hi = count_b
            while lo < hi:
                mid = (lo + hi) >> 1
                if bounds[lo_b + mid] <= v:
                    lo = mid + 1
                else:
                    hi = mid
            out[i] = lo
    return out


@njit(cache=True, nogil=True)
def uint64_mod_segments(values, value_offsets, mods):
    """``values`` (int64) read as uint64, modulo ``mods[s]`` for the values of segment ``s``
    (``value_offsets[s]:value_offsets[s+1]``), as int64."""
    out = np.empty(values.shape[0], np.int64)
    for s in range(value_offsets.shape[0] - 1):
        m = np.uint64(mods[s])
        for i in range(value_offsets[s], value_offsets[s + 1]):
            out[i] = np.int64(np.uint64(values[i]) % m)
    return out
