"""Argument checks shared by the public constructors (one wording for one kind of mistake)."""

from __future__ import annotations

from typing import Any


def check_positive_int(value: Any, name: str, *, allow_none: bool = False,
                       where: str | None = None) -> int | None:
    """``value`` if it is an int > 0 (or None when allowed): TypeError for another type (bools
    included), ValueError for a value <= 0; the message names the argument.

    Example::

        >>> check_positive_int(0, "block_size")
        Traceback (most recent call last):
        ValueError: block_size must be a positive int, got 0
    """
    if value is None and allow_none:
        return None
    expected = "a positive int or None" if allow_none else "a positive int"
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{prefix}{name} must be {expected}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{prefix}{name} must be {expected}, got {value!r}")
    return value
