"""Kernel backends, registered by name and chosen once per table from its device.

Built in: ``"torch"`` (:class:`.torch_backend.TorchBackend`: plain torch on any device, the
reference and the CUDA path) and ``"numba"`` (:class:`.numba_backend.NumbaBackend`: compiled
CPU loops, the default for CPU tables). :func:`backend_for` picks, in this order: the backend
forced by :func:`use_backend` or the environment variable ``RECIS_KERNELS`` when it supports
the device, then the default registered for the device type, then ``"torch"``.

Adding a backend is one file: subclass :class:`.base.Backend` (or an existing backend, to
inherit what you do not override) and register it::

    @register_backend("mine", default_for=["cuda"])
    class MyBackend(TorchBackend):
        def gather(self, blocks, rows, out): ...
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch

from .base import MAX_TAGS, Backend, BlockList, check_offsets, check_rows
from .torch_backend import TorchBackend

__all__ = ["Backend", "BlockList", "MAX_TAGS", "backend_for", "get_backend", "register_backend",
           "use_backend", "registered_backends", "check_offsets", "check_rows"]

_REGISTRY: dict[str, Backend] = {}
_DEFAULTS: dict[str, str] = {}  # device type -> backend name
_forced: str | None = None


def register_backend(name: str, cls: type | None = None, *,
                     default_for: Iterable[str] = ()) -> Callable | type:
    """Register a :class:`Backend` subclass under ``name`` (usable as a decorator);
    ``default_for``: device types (``"cpu"``, ``"cuda"``) whose tables use it by default."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"backend name must be a non-empty str, got {name!r}")

    def add(c: type) -> type:
        if not (isinstance(c, type) and issubclass(c, Backend)):
            raise TypeError(f"a backend must subclass recis._core.backends.Backend, got {c!r}")
        if name in _REGISTRY:
            raise ValueError(f"a backend is already registered as {name!r} "
                             f"({type(_REGISTRY[name]).__name__})")
        instance = c()
        instance.name = name
        _REGISTRY[name] = instance
        for device_type in default_for:
            _DEFAULTS[device_type] = name
        return c

    return add if cls is None else add(cls)


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown kernel backend {name!r}; registered: "
                         f"{registered_backends()}") from None


def backend_for(device: torch.device | str) -> Backend:
    """The backend a table on ``device`` uses (see the module docstring for the order)."""
    device = torch.device(device)
    forced = _forced or os.environ.get("RECIS_KERNELS")
    if forced:
        backend = get_backend(forced)
        if backend.supports(device):
            return backend
    default = _DEFAULTS.get(device.type)
    if default is not None and _REGISTRY[default].supports(device):
        return _REGISTRY[default]
    return _REGISTRY["torch"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Tables created inside the block use backend ``name`` (where it supports their device).
    For tests and benchmarks; tables keep their backend after the block."""
    global _forced
    get_backend(name)  # unknown names fail here
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


register_backend("torch", TorchBackend)
try:  # numba is a dependency, but a broken install should degrade, not break imports
    from .numba_backend import NumbaBackend
except ImportError:  # pragma: no cover
    pass
else:
    register_backend("numba", NumbaBackend, default_for=["cpu"])
