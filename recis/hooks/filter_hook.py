"""HashTableFilterHook: runs the tables' filter policies from the training loop."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from recis.hooks.hook import Hook
from recis.nn.modules.hashtable_hook_impl import BaseFilterHookImpl, live_filters
from recis.utils.checks import check_positive_int
from recis.utils.logger import Logger

logger = Logger(__name__)

__all__ = ["HashTableFilterHook"]


def _as_step(global_step: Any) -> int:
    if isinstance(global_step, Tensor):
        if global_step.numel() != 1:
            raise ValueError(
                f"global_step must be an int or a one-element tensor, got shape "
                f"{tuple(global_step.shape)}"
            )
        return int(global_step.item())
    if isinstance(global_step, bool) or not isinstance(global_step, int):
        raise TypeError(f"global_step must be an int or a tensor, got {global_step!r}")
    return global_step


class HashTableFilterHook(Hook):
    """Advances every filter policy's clock once per step and filters every ``filter_interval``.

    Each :meth:`after_step` call advances the clock ``G`` of each filter policy by one; when at
    least ``filter_interval`` steps have passed since the last run (counted from the first
    ``global_step`` seen), every policy removes the rows it selects. With calls at steps 0, 1,
    2, ... and ``filter_interval=10``, filtering runs at steps 10, 20, 30, ...

    By default the hook serves the filter-bearing tables alive in the process (found through
    the policy registry, held by weak reference, so dead tables are dropped); pass ``tables`` to
    restrict it to those tables (any module containing tables works).

    Args:
        filter_interval (int, optional): steps between filter runs; None disables filtering
            (clocks still advance). Default: 100.
        tables (iterable of nn.Module, optional): restrict to the tables inside these modules.

    Example::

        hook = HashTableFilterHook(filter_interval=10)
        for step in range(100):
            loss = model(batch).sum(); loss.backward(); opt.step()
            hook.after_step(global_step=step)
    """

    def __init__(self, filter_interval: int | None = 100, tables: Iterable[Any] | None = None):
        self.reset_filter_interval(filter_interval)
        self.last_filter_step: int | None = None
        self._tables: list[weakref.ref] | None = None
        if tables is not None:
            from recis.nn.modules.hashtable import HashTable

            found = []
            for item in tables:
                mods = item.modules() if hasattr(item, "modules") else [item]
                found += [m for m in mods if isinstance(m, HashTable)]
            self._tables = [weakref.ref(t) for t in found]

    def state_dict(self) -> dict:
        """The hook's schedule (saved by the Trainer's checkpoints; RecIS loses it)."""
        return {"filter_interval": self.filter_interval, "last_filter_step": self.last_filter_step}

    def load_state_dict(self, state: dict) -> None:
        self.reset_filter_interval(state.get("filter_interval", self.filter_interval))
        self.last_filter_step = state.get("last_filter_step")

    def reset_filter_interval(self, interval: int | None = 100) -> None:
        self.filter_interval = check_positive_int(interval, "filter_interval", allow_none=True)

    def filters(self) -> list[BaseFilterHookImpl]:
        """The filter policies this hook drives, in creation order."""
        impls = live_filters()
        if self._tables is None:
            return impls
        mine = {id(t) for t in (r() for r in self._tables) if t is not None}
        return [f for f in impls if id(f.table) in mine]

    def after_step(self, metrics: Any = None, global_step: Any = None) -> None:
        if global_step is None:
            raise ValueError("after_step needs global_step (int or one-element tensor)")
        step = _as_step(global_step)
        if self.last_filter_step is None:
            self.last_filter_step = step
        interval = self.filter_interval
        run = interval is not None and step - self.last_filter_step >= interval
        impls = self.filters()
        for impl in impls:
            impl.update_step()
        if run:
            removed = sum(impl.do_filter() for impl in impls)
            self.last_filter_step = step
            logger.info("step %d: filtering removed %d rows from %d tables", step, removed,
                        len(impls))
