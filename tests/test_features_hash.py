"""The hash functions of the feature engine give RecIS's values.

How the values are tied to RecIS: RecIS's ``Hash("farm")`` is FarmHash ``Fingerprint64``
(``farmhashna::Hash64``), its ``Hash("murmur")`` and ``FeatureCross`` are MurmurHash64A with
seed 0 (see :mod:`recis.features.hash_kernels`). Each function here is checked (1) against
values published with the reference algorithm (FarmHash's self-test vectors, SMHasher's
verification value), (2) against the expected values in RecIS's own
``tests/ops/fused_hash_test.py``, and (3) against a plain-Python reference written in this
file from the algorithms, on random inputs of every length class.
"""

import random

import numpy as np
import pytest
import torch

from recis.features import FeatureCross, Hash, Int64ToString
from recis.features import hash_kernels as kernels
from recis.ragged import RaggedTensor

M64 = (1 << 64) - 1
K0, K1, K2 = 0xC3A5C85C97CB3127, 0xB492B66FBE98F273, 0x9AE16A3B2F90404F


# ----------------------------------------------------------------- plain-Python references


def _u64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i:i + 8], "little")


def _u32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i:i + 4], "little")


def _rot(v: int, s: int) -> int:
    return ((v >> s) | (v << (64 - s))) & M64 if s else v


def _mix(u: int, v: int, mul: int) -> int:
    a = ((u ^ v) * mul) & M64
    a ^= a >> 47
    b = ((v ^ a) * mul) & M64
    b ^= b >> 47
    return (b * mul) & M64


def _weak(b: bytes, i: int, x: int, y: int) -> tuple[int, int]:
    w, xx, yy, z = (_u64(b, i + 8 * j) for j in range(4))
    x = (x + w) & M64
    y = _rot((y + x + z) & M64, 21)
    c = x
    x = (x + xx + yy) & M64
    y = (y + _rot(x, 44)) & M64
    return (x + z) & M64, (y + c) & M64


def farm_reference(s: bytes) -> int:
    """farmhashna::Hash64 (FarmHash Fingerprint64), unsigned."""
    n = len(s)
    if n <= 16:
        if n >= 8:
            mul = (K2 + 2 * n) & M64
            a = (_u64(s, 0) + K2) & M64
            b = _u64(s, n - 8)
            c = (_rot(b, 37) * mul + a) & M64
            d = ((_rot(a, 25) + b) * mul) & M64
            return _mix(c, d, mul)
        if n >= 4:
            mul = (K2 + 2 * n) & M64
            return _mix((n + (_u32(s, 0) << 3)) & M64, _u32(s, n - 4), mul)
        if n:
            y = (s[0] + (s[n >> 1] << 8)) & 0xFFFFFFFF
            z = (n + (s[n - 1] << 2)) & 0xFFFFFFFF
            h = ((y * K2) ^ (z * K0)) & M64
            return ((h ^ (h >> 47)) * K2) & M64
        return K2
    mul = (K2 + 2 * n) & M64
    if n <= 32:
        a = (_u64(s, 0) * K1) & M64
        b = _u64(s, 8)
        c = (_u64(s, n - 8) * mul) & M64
        d = (_u64(s, n - 16) * K2) & M64
        return _mix((_rot((a + b) & M64, 43) + _rot(c, 30) + d) & M64,
                    (a + _rot((b + K2) & M64, 18) + c) & M64, mul)
    if n <= 64:
        a = (_u64(s, 0) * K2) & M64
        b = _u64(s, 8)
        c = (_u64(s, n - 8) * mul) & M64
        d = (_u64(s, n - 16) * K2) & M64
        y = (_rot((a + b) & M64, 43) + _rot(c, 30) + d) & M64
        z = _mix(y, (a + _rot((b + K2) & M64, 18) + c) & M64, mul)
        e = (_u64(s, 16) * mul) & M64
        f = _u64(s, 24)
        g = ((y + _u64(s, n - 32)) * mul) & M64
        h = ((z + _u64(s, n - 24)) * mul) & M64
        return _mix((_rot((e + f) & M64, 43) + _rot(g, 30) + h) & M64,
                    (e + _rot((f + a) & M64, 18) + g) & M64, mul)
    x = 81
    y = (81 * K1 + 113) & M64
    t = (y * K2 + 113) & M64
    z = ((t ^ (t >> 47)) * K2) & M64
    v, w = (0, 0), (0, 0)
    x = (x * K2 + _u64(s, 0)) & M64
    end = ((n - 1) // 64) * 64
    last = end + ((n - 1) & 63) - 63
    p = 0
    while p != end:
        x = (_rot((x + y + v[0] + _u64(s, p + 8)) & M64, 37) * K1) & M64
        y = (_rot((y + v[1] + _u64(s, p + 48)) & M64, 42) * K1) & M64
        x ^= w[1]
        y = (y + v[0] + _u64(s, p + 40)) & M64
        z = (_rot((z + w[0]) & M64, 33) * K1) & M64
        v = _weak(s, p, (v[1] * K1) & M64, (x + w[0]) & M64)
        w = _weak(s, p + 32, (z + w[1]) & M64, (y + _u64(s, p + 16)) & M64)
        x, z = z, x
        p += 64
    mul = (K1 + ((z & 0xFF) << 1)) & M64
    p = last
    w0 = (w[0] + ((n - 1) & 63)) & M64
    v0 = (v[0] + w0) & M64
    w0 = (w0 + v0) & M64
    v, w = (v0, v[1]), (w0, w[1])
    x = (_rot((x + y + v[0] + _u64(s, p + 8)) & M64, 37) * mul) & M64
    y = (_rot((y + v[1] + _u64(s, p + 48)) & M64, 42) * mul) & M64
    x ^= (w[1] * 9) & M64
    y = (y + v[0] * 9 + _u64(s, p + 40)) & M64
    z = (_rot((z + w[0]) & M64, 33) * mul) & M64
    v = _weak(s, p, (v[1] * mul) & M64, (x + w[0]) & M64)
    w = _weak(s, p + 32, (z + w[1]) & M64, (y + _u64(s, p + 16)) & M64)
    x, z = z, x
    return _mix((_mix(v[0], w[0], mul) + (y ^ (y >> 47)) * K0 + z) & M64,
                (_mix(v[1], w[1], mul) + x) & M64, mul)


def murmur_reference(s: bytes, seed: int = 0) -> int:
    """MurmurHash64A, unsigned."""
    m = 0xC6A4A7935BD1E995
    h = (seed ^ (len(s) * m)) & M64
    full = len(s) - len(s) % 8
    for i in range(0, full, 8):
        k = (_u64(s, i) * m) & M64
        k ^= k >> 47
        h ^= (k * m) & M64
        h = (h * m) & M64
    tail = s[full:]
    if tail:
        for i, byte in enumerate(tail):
            h ^= byte << (8 * i)
        h = (h * m) & M64
    h ^= h >> 47
    h = (h * m) & M64
    return h ^ (h >> 47)


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


# ----------------------------------------------------------------- published test vectors


def farmhash_selftest_data(size: int) -> np.ndarray:
    """The pseudo-random bytes of FarmHash's self-test (``Setup()`` in farmhash.cc)."""
    out = np.empty(size, np.uint8)
    a, b = 9, 777
    for i in range(size):
        a = (a + b) & M64
        b = (b + a) & M64
        a = ((a ^ (a >> 41)) * K0) & M64
        b = (((b ^ (b >> 41)) * K0) + i) & M64
        out[i] = (b >> 37) & 0xFF
    return out


# farmhashnaTest in google/farmhash src/farmhash.cc: the i-th test hashes ``data[i*i:i*i+i]``
# and records farmhashna::Hash64 as two 32-bit halves; here joined, for a spread of lengths
# (every length class of the algorithm, and more than two 64-byte blocks).
FARMHASH_NA_HASH64 = {
    0: 0x9AE16A3B2F90404F, 1: 0x541150E87F415E96, 2: 0x0F3786A4B25827C1,
    3: 0xEF923A7A1AF78EAB, 4: 0x11DF592596F41D88, 5: 0x831F448BDC5600B3,
    7: 0x1B5A063FB4C7F9F1, 8: 0xA0F10149A0E538D6, 9: 0xFB8D9C70660B910B,
    15: 0x44473E03BE306C88, 16: 0x03EAD5F21D344056, 17: 0x6ABBFDE37EE03B5B,
    24: 0x36A097AA49519D97, 31: 0x55BDB0E71E3EDEBD, 32: 0x0782FA1B08B475E7,
    33: 0x09DEB3DA5E16B5B8, 48: 0x01601BBBC1DB4A56, 63: 0xA8EDBFF858475437,
    64: 0xDEF74BF4C9F1BC1B, 65: 0x3CCEAB392BC39B3F, 80: 0x93FFA56C72E1911A,
    100: 0x05AD36F677825CE0, 127: 0x99096F55F2E75EB0, 128: 0xF4A9A248B462909D,
    129: 0xD4F7C858D78153B6, 135: 0xDA4F403068577213,
}


def test_farmhash_gives_farmhash_selftest_vectors():
    data = farmhash_selftest_data(140 * 140)
    for i, expected in FARMHASH_NA_HASH64.items():
        assert int(kernels.farmhash64(data, i * i, i)) == expected, f"length {i}"
        assert farm_reference(bytes(data[i * i:i * i + i])) == expected, f"reference, {i}"


def test_murmurhash64a_gives_smhasher_verification_value():
    """SMHasher's VerificationTest: hash {}, {0}, {0,1}, ..., {0..254} with seed 256 - n,
    hash the concatenated 8-byte results with seed 0; the low 32 bits are 0x1F0D3804 for
    MurmurHash64A."""
    key = np.arange(256, dtype=np.uint8)
    results = b"".join(int(kernels.murmurhash64a(key, 0, n, 256 - n)).to_bytes(8, "little")
                       for n in range(256))
    final = int(kernels.murmurhash64a(np.frombuffer(results, np.uint8), 0, len(results), 0))
    assert final & 0xFFFFFFFF == 0x1F0D3804
    ref = b"".join(murmur_reference(bytes(range(n)), 256 - n).to_bytes(8, "little")
                   for n in range(256))
    assert murmur_reference(ref) & 0xFFFFFFFF == 0x1F0D3804


# tests/ops/fused_hash_test.py of alibaba/RecIS: two byte strings per input, each hashed.
RECIS_INPUTS = [[0, 1, 2, 1, 2, 3], [0, 5, 5, 5, 6, 7]]
RECIS_FARM = [[-7736835464683084646, -5546720800891377920],
              [-4442022684725028445, -909183002746659612]]
RECIS_MURMUR = [[-4003751876240412087, -1042754718167355375],
                [-5541886947548579749, 4434088491466393040]]


@pytest.mark.parametrize("hash_type,expected", [("farm", RECIS_FARM),
                                                ("murmur", RECIS_MURMUR)])
def test_hash_op_gives_recis_values(hash_type, expected):
    inputs = [RaggedTensor(torch.tensor(b, dtype=torch.int8), torch.tensor([0, 3, 6],
                                                                           dtype=torch.int32))
              for b in RECIS_INPUTS]
    op = Hash(hash_type)
    for x, want in zip(inputs, expected, strict=True):
        assert op(x).tolist() == want
    fused = Hash.run_fused([op, op], inputs)
    assert [out.tolist() for out in fused] == expected
    reference = farm_reference if hash_type == "farm" else murmur_reference
    for b, want in zip(RECIS_INPUTS, expected, strict=True):
        assert [signed(reference(bytes(b[:3]))), signed(reference(bytes(b[3:])))] == want


@pytest.mark.parametrize("hash_type", ["farm", "murmur"])
def test_hash_kernels_match_the_reference_on_random_bytes(hash_type):
    rng = random.Random(7)
    strings = [bytes(rng.randrange(256) for _ in range(n))
               for n in [*range(0, 70), 100, 127, 128, 129, 191, 192, 193, 300, 1000]]
    data = torch.tensor(list(b"".join(strings)), dtype=torch.uint8)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in strings]))
    got = Hash(hash_type)(RaggedTensor(data, offsets)).tolist()
    reference = farm_reference if hash_type == "farm" else murmur_reference
    assert got == [signed(reference(s)) for s in strings]


def test_feature_cross_ids_are_murmur_of_the_pair_bytes():
    x = RaggedTensor(torch.tensor([5, -3]), torch.tensor([0, 2]))
    y = RaggedTensor(torch.tensor([2**62 + 1]), torch.tensor([0, 1]))
    out = FeatureCross()([x, y]).values().tolist()
    pairs = [(-3, 2**62 + 1), (5, 2**62 + 1)]  # ascending x
    want = [signed(murmur_reference(a.to_bytes(8, "little", signed=True)
                                    + b.to_bytes(8, "little", signed=True))) for a, b in pairs]
    assert out == want
    # the same function as Hash("murmur") over the pair's 16 bytes
    raw = torch.tensor([-3, 2**62 + 1]).numpy().view(np.uint8).copy()
    text = RaggedTensor(torch.from_numpy(raw), torch.tensor([0, 16]))
    assert Hash("murmur")(text).tolist() == [want[0]]


def test_int64_to_string_gives_decimal_text():
    ids = [0, 7, -1, 123, -456, 10**18, 2**63 - 1, -2**63]
    text = Int64ToString()(torch.tensor(ids))
    offsets = text.offsets()[-1].tolist()
    raw = bytes(text.values().tolist())
    words = [raw[a:b].decode() for a, b in zip(offsets, offsets[1:], strict=False)]
    assert words == [str(i) for i in ids]
