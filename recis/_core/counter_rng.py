"""A counter-based random number generator: numbers that are a pure function of a key.

Initial rows of tables come from here (:meth:`recis.nn.initializers.Initializer.rows_for_ids`):
the numbers for an ID depend on nothing but ``(key, ID, column)``, so a row does not depend on
the order of insertion, the batch, the block size, the device, or how many processes share the
table. The mixing function is splitmix64's finaliser (int64 arithmetic wraps like uint64).
"""

from __future__ import annotations

import hashlib

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _lsr(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors."""
    x = (x ^ _lsr(x, 30)) * _MIX1
    x = (x ^ _lsr(x, 27)) * _MIX2
    return x ^ _lsr(x, 31)


def mix_seed(*parts: int | str) -> int:
    """A signed 64-bit key from integers and strings, the same in every process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def counter_uniform(ids: torch.Tensor, keys: torch.Tensor | int, width: int) -> torch.Tensor:
    """``(len(ids), width)`` float64 numbers, uniform in (0, 1), a pure function of each
    ``(key, id, column)``; ``keys`` is one int64 per ID, or one int for all.

    Example::

        >>> a = counter_uniform(torch.tensor([5, 6]), 1, 3)
        >>> torch.equal(a[1], counter_uniform(torch.tensor([6]), 1, 3)[0])
        True
    """
    ids = ids.to(torch.int64)
    keys = torch.as_tensor(keys, dtype=torch.int64, device=ids.device)
    base = mix64(ids ^ mix64(keys + _GOLDEN))  # (n,)
    cols = torch.arange(1, width + 1, dtype=torch.int64, device=ids.device) * _GOLDEN
    bits = _lsr(mix64(base[:, None] + cols), 11)  # 53 random bits
    return (bits.to(torch.float64) + 0.5) * 2.0**-53
