"""Argument checks shared by the public constructors (one wording for one kind of mistake)."""

from __future__ import annotations

from typing import Any

import torch


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


def check_device(device: Any, arg: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` where tables can live (``cpu``, or ``cuda`` when this
    machine has it); ValueError naming ``arg`` otherwise.

    Example::

        >>> check_device("meta")
        Traceback (most recent call last):
        ValueError: device must be cpu or cuda, got meta
    """
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError):
        raise ValueError(f"{arg} must be a torch.device or a str such as 'cpu' or 'cuda', got "
                         f"{device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{arg} must be cpu or cuda, got {device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg} is {device}, but CUDA is not available here (no GPU, or a "
                             "CPU-only torch build); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{arg} is {device}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device
