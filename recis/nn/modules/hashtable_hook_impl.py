"""Admission and filter policies, registered by name.

A hook configuration (:class:`~recis.nn.hashtable_hook.AdmitHook`,
:class:`~recis.nn.hashtable_hook.FilterHook`) names a policy; this module maps names to policy
classes and creates them for tables. Add a policy without touching the library::

    from recis.nn.modules.hashtable_hook_impl import BaseFilterHookImpl, regist_filter

    @regist_filter("DropOddIds")
    class DropOddIds(BaseFilterHookImpl):
        def filter(self, ids, tags, rows):
            return ids % 2 == 1

    FilterHook("DropOddIds")  # now usable in HashTable / EmbeddingOption

Built in: admission ``"ReadOnly"``, ``"MinCount"`` and ``"Probability"``; filters
``"GlobalStepFilter"``, ``"LRU"``, ``"LFU"`` and ``"L2Norm"``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from recis._core.backends.torch_backend import hash_keys
from recis._core.counter_rng import counter_uniform, mix_seed
from recis._core.policy import TablePolicy
from recis._core.slots import SlotSpec
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.utils.checks import check_positive_int
from recis.utils.logger import Logger

if TYPE_CHECKING:
    from recis._core.store import TableStore
    from recis.nn.modules.hashtable import HashTable

logger = Logger(__name__)

__all__ = [
    "BaseAdmitHookImpl",
    "BaseFilterHookImpl",
    "ReadOnlyHookImpl",
    "GlobalStepFilterHookImpl",
    "ProbabilityAdmitHookImpl",
    "LRUFilterHookImpl",
    "LFUFilterHookImpl",
    "L2NormFilterHookImpl",
    "HashtableHookFactory",
    "regist_admit",
    "regist_filter",
    "live_filters",
    "policy_key",
    "check_slot_name",
]

RESERVED_SLOTS = ("embedding",)


def check_slot_name(name: Any, where: str) -> str:
    """A policy's slot name: a non-empty str that is not a reserved slot (``"embedding"``)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: name must be a non-empty str, got {name!r}")
    if name in RESERVED_SLOTS:
        raise ValueError(f"{where}: name {name!r} is reserved for the table's own slot; "
                         "choose another")
    return name

_ADMIT_POLICIES: dict[str, type] = {}
_FILTER_POLICIES: dict[str, type] = {}
_LIVE_FILTERS: list[weakref.ref] = []  # creation order; dead entries pruned on access


def _register(registry: dict[str, type], kind: str, name: str, cls: type | None):
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} policy name must be a non-empty str, got {name!r}")

    def add(c: type) -> type:
        if name in registry:
            raise ValueError(
                f"a {kind} policy is already registered under the name {name!r} "
                f"({registry[name].__name__})"
            )
        registry[name] = c
        return c

    return add if cls is None else add(cls)


def regist_admit(name: str, cls: type | None = None) -> Callable | type:
    """Register an admission policy class under ``name`` (usable as a decorator)."""
    return _register(_ADMIT_POLICIES, "admit", name, cls)


def regist_filter(name: str, cls: type | None = None) -> Callable | type:
    """Register a filter policy class under ``name`` (usable as a decorator)."""
    return _register(_FILTER_POLICIES, "filter", name, cls)


def _policy(registry: dict[str, type], kind: str, name: str) -> type:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(
            f"Unknown {kind} policy {name!r}; registered: {sorted(registry)}"
        ) from None


def live_filters() -> list[BaseFilterHookImpl]:
    """Filter policies of live tables in this process, in creation order."""
    alive = []
    for ref in list(_LIVE_FILTERS):
        impl = ref()
        if impl is None or impl.table is None:
            _LIVE_FILTERS.remove(ref)
        else:
            alive.append(impl)
    return alive


def policy_key(hook: AdmitHook | FilterHook, impl: Any = None) -> str:
    """The key a table attaches a hook's policy under (and its state is saved under).

    An admission policy is keyed by its hook's JSON (name and params: other params are another
    policy); a filter by its policy name and slot name, so that a run restarted with another
    ``filter_step`` keeps its clock."""
    if isinstance(hook, FilterHook):
        return f"filter:{hook.name}:{impl.name if impl is not None else hook.name}"
    return f"admit:{hook}"


# -- admission ---------------------------------------------------------------------------------
class BaseAdmitHookImpl(TablePolicy):
    """Decides which unknown IDs of a training lookup get a row.

    Subclasses implement :meth:`admit`; ``admits_nothing = True`` lets the table skip the call.
    Like every :class:`~recis._core.policy.TablePolicy` an admission policy may declare
    per-row slots and keep state (:meth:`policy_state`), saved with its table.
    """

    admits_nothing = False

    def __init__(self, **params: Any):
        if params:
            raise TypeError(f"{type(self).__name__} takes no parameters, got {sorted(params)}")

    def admit(self, store: TableStore, ids: Tensor, tags: Tensor | None,
              counts: Tensor) -> Tensor:
        """Bool mask over ``ids`` (unknown, unique; ``counts`` = occurrences in this lookup):
        True = insert now."""
        raise NotImplementedError


@regist_admit("ReadOnly")
class ReadOnlyHookImpl(BaseAdmitHookImpl):
    """Admit no new ID: unknown IDs read as zero rows and leave no trace in the table."""

    admits_nothing = True

    def admit(self, store, ids, tags, counts):
        return torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)


@torch.no_grad()
def count_min_admit(sketch: Tensor, ids: Tensor, tags: Tensor | None, counts: Tensor,
                    min_count: int) -> Tensor:
    """Add ``counts`` to a count-min sketch and return which IDs reached ``min_count``.

    An ID is admitted once the smallest of its ``depth`` counters is ``>= min_count``. The
    sketch may over-count (IDs sharing counters), so an ID can be admitted early, never
    late. ``sketch`` is ``(depth, width)`` int32 with ``width`` a power of two.
    """
    depth, width = sketch.shape
    base = tags if tags is not None else torch.zeros_like(ids)
    estimate = None
    for d in range(depth):
        slot = hash_keys(ids, base + (d + 1) * (1 << 20)) & (width - 1)
        sketch[d].index_add_(0, slot, counts.to(sketch.dtype))
        row = sketch[d][slot]
        estimate = row if estimate is None else torch.minimum(estimate, row)
    return estimate >= min_count


@regist_admit("MinCount")
class MinCountAdmitHookImpl(BaseAdmitHookImpl):
    """Admit an ID once it has occurred ``min_count`` times in training lookups.

    Until then it reads as a zero row and gets no gradient. Occurrences of IDs not yet in the
    table are counted in a count-min sketch of ``depth x width`` int32 counters (fixed memory,
    ``4 * depth * width`` bytes), which can over-count, so an ID may be admitted a little
    early, never late. Counts of IDs that are removed later start again from the sketch. The
    sketch is saved with the table; a resharded load gives every new shard the sum of the
    saved shards' sketches (IDs may then be admitted early, never late).

    Args:
        min_count (int): occurrences needed (>= 1). Default: 2.
        width (int): counters per row, a power of two. Default: 2**20.
        depth (int): independent hash rows. Default: 2.
    """

    def __init__(self, min_count: int = 2, width: int = 1 << 20, depth: int = 2):
        for name, value in (("min_count", min_count), ("width", width), ("depth", depth)):
            check_positive_int(value, name, where="MinCount")
        if width & (width - 1):
            raise ValueError(f"MinCount: width must be a power of two, got {width}")
        self.min_count = min_count
        self._shape = (depth, width)
        self._sketch: Tensor | None = None

    def admit(self, store, ids, tags, counts):
        if self._sketch is None:
            self._sketch = torch.zeros(self._shape, dtype=torch.int32, device=ids.device)
        return count_min_admit(self._sketch, ids, tags, counts, self.min_count)

    def policy_state(self) -> dict[str, Tensor]:
        return {} if self._sketch is None else {"sketch": self._sketch}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        unknown = set(state) - {"sketch"}
        if unknown:
            raise ValueError(f"MinCount: unknown state {sorted(unknown)}")
        sketch = state.get("sketch")
        if sketch is not None:
            if tuple(sketch.shape) != self._shape:
                raise ValueError(f"MinCount: saved sketch has shape {tuple(sketch.shape)}, "
                                 f"this policy {self._shape}")
            self._sketch = sketch.to(torch.int32).clone()

    @classmethod
    def merge_policy_states(cls, states):
        sketches = [s["sketch"].to(torch.int64) for s in states if "sketch" in s]
        if not sketches:
            return {}
        total = torch.stack(sketches).sum(0).clamp_(max=torch.iinfo(torch.int32).max)
        return {"sketch": total.to(torch.int32)}


@regist_admit("Probability")
class ProbabilityAdmitHookImpl(BaseAdmitHookImpl):
    """Admit each new ID with probability ``p``, drawn anew every training lookup that sees
    it unknown (so an ID seen ``n`` times is admitted with probability ``1 - (1 - p)^n``).

    The draws are a pure function of ``(seed, lookup number, child, ID)``: the same seed and
    inputs admit the same IDs. The lookup counter is the policy's state, saved with the
    table (a resharded load continues from the largest saved counter; under sharding each
    owner draws for its own IDs, so N processes admit different IDs than 1).

    Args:
        p (float): admission probability, in (0, 1].
        seed (int): seed of the draws. Default: 0.
    """

    def __init__(self, p: float, seed: int = 0):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"Probability: p must be a number in (0, 1], got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"Probability: seed must be an int, got {seed!r}")
        self.p, self.seed = float(p), seed
        self._lookups = torch.zeros(1, dtype=torch.int64)

    def admit(self, store, ids, tags, counts):
        key = mix_seed("Probability", self.seed, int(self._lookups.item()))
        self._lookups += 1
        keys = torch.full_like(ids, key) if tags is None else key ^ (tags.to(torch.int64) << 40)
        return counter_uniform(ids, keys, 1)[:, 0] < self.p

    def policy_state(self) -> dict[str, Tensor]:
        return {"lookups": self._lookups}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        if set(state) - {"lookups"}:
            raise ValueError(f"Probability: unknown state {sorted(set(state) - {'lookups'})}")
        if "lookups" in state:
            self._lookups = state["lookups"].to(torch.int64).reshape(1).cpu().clone()

    @classmethod
    def merge_policy_states(cls, states):
        counts = [s["lookups"].reshape(()).cpu() for s in states if "lookups" in s]
        return {"lookups": torch.stack(counts).max().reshape(1)} if counts else {}


# -- filters -----------------------------------------------------------------------------------
class BaseFilterHookImpl(nn.Module, TablePolicy):
    """A filter policy attached to one table (a submodule of it).

    Contract (on top of :class:`~recis._core.policy.TablePolicy`):

    * :meth:`slot_specs` declares per-row metadata slots; the table allocates them, resets
      them when a row is removed, and saves them.
    * :meth:`on_touch` sees the rows every training lookup and insert touched (by default it
      calls :meth:`update`, RecIS's name).
    * :meth:`update_step` is called once per :class:`HashTableFilterHook` step.
    * :meth:`filter` returns which live rows to remove; :meth:`do_filter` removes them.
    * :meth:`policy_state` is the policy's own state (e.g. a clock), saved with the table.
    """

    def __init__(self, table: HashTable, name: str | None = None):
        super().__init__()
        self._name = name or type(self).__name__
        self.policy_name = type(self).__name__  # the registered name, set by the factory
        self.bind(table)

    def bind(self, table: HashTable) -> None:
        """Serve ``table`` (done at construction, and for a copy of a table)."""
        self._table_ref = weakref.ref(table)
        _LIVE_FILTERS.append(weakref.ref(self))

    @property
    def table(self) -> HashTable | None:
        return self._table_ref()

    @property
    def name(self) -> str:
        return self._name

    @classmethod
    def check_params(cls, **params: Any) -> None:
        """Validate a hook's params before any table exists (default: names only)."""
        inspect.signature(cls.__init__).bind(None, None, **params)

    def update(self, rows: Tensor) -> None:
        """Called with the (valid, unique) rows of every training lookup and insert."""

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        self.update(rows)

    def update_step(self, step_size: int = 1) -> None:
        """Advance the policy's clock."""

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        """Bool mask over the live ``(ids, tags, rows)``: True = remove."""
        raise NotImplementedError

    def forward(self, rows: Tensor) -> None:
        self.update(rows)

    @torch.no_grad()
    def do_filter(self) -> int:
        """Remove the rows :meth:`filter` selects; returns how many were removed."""
        table = self.table
        if table is None:
            return 0
        store = table.store
        with store.lock.write():
            ids, tags, rows = store.items()
            if ids.numel() == 0:
                return 0
            remove = self.filter(ids, tags, rows)
            removed = store.remove(ids[remove], tags[remove], reason=self.policy_name)
        logger.debug(
            "%s on %s: %d live rows, %d removed", self._name, table.name, ids.numel(), removed
        )
        return removed


@regist_filter("GlobalStepFilter")
class GlobalStepFilterHookImpl(BaseFilterHookImpl):
    """Remove rows not looked up during the last ``filter_step`` steps.

    The policy keeps a step counter ``G`` (its state: saved with the table's checkpoints, and
    a buffer, so also in the model's ``state_dict``) that
    :class:`~recis.hooks.filter_hook.HashTableFilterHook` advances by one per ``after_step``.
    Training lookups and :meth:`HashTable.insert` stamp ``G`` into the rows they touch; a run of
    the filter removes rows whose stamp is ``< G - filter_step``. With one lookup and one
    ``after_step`` per step from step 0, an ID last seen at step ``s`` is removed by the first
    filter run at a step ``c`` with ``c - s >= filter_step``. A resharded load gives every
    shard the largest saved counter.

    Args:
        filter_step (int): steps without a lookup after which a row is removed. Must be > 0.
            Default: 100.
        name (str): the slot holding each row's stamp. Default: ``"step_filter"``.
    """

    def __init__(self, table: HashTable, filter_step: int = 100, name: str = "step_filter"):
        self.check_params(filter_step=filter_step, name=name)
        super().__init__(table, name)
        self.filter_step = filter_step
        self.register_buffer(
            "_global_step", torch.zeros(1, dtype=torch.int64, device=table.device)
        )

    @classmethod
    def check_params(cls, filter_step: int = 100, name: str = "step_filter") -> None:
        check_positive_int(filter_step, "filter_step", where="GlobalStepFilter")
        check_slot_name(name, "GlobalStepFilter")

    @property
    def global_step(self) -> int:
        return int(self._global_step.item())

    def slot_specs(self) -> list[SlotSpec]:
        return [SlotSpec(self._name, (1,), torch.int64, 0)]

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        if rows.numel():
            store.write(self._name, rows, self._global_step.view(1, 1))

    def update_step(self, step_size: int = 1) -> None:
        self._global_step += step_size

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        stamps = self.table.store.read(self._name, rows).view(-1)
        return stamps < self._global_step - self.filter_step

    def policy_state(self) -> dict[str, Tensor]:
        return {"global_step": self._global_step}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"global_step"}:
            raise ValueError(f"GlobalStepFilter: expected state ['global_step'], got "
                             f"{sorted(state)}")
        self._global_step.copy_(state["global_step"].reshape(1))

    @classmethod
    def merge_policy_states(cls, states):
        steps = [s["global_step"].reshape(()) for s in states]
        return {"global_step": torch.stack(steps).max().reshape(1)} if steps else {}

    def extra_repr(self) -> str:
        return f"filter_step={self.filter_step}, name={self._name!r}"


def worst_beyond(max_rows: int, keys: list[Tensor]) -> Tensor:
    """Bool mask of the rows to remove so that ``max_rows`` remain: the first in the order of
    ``keys`` (the first key decides, the next ones break its ties), lowest first."""
    n = keys[0].numel()
    remove = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    if n <= max_rows:
        return remove
    order = torch.arange(n, device=keys[0].device)
    for key in reversed(keys):  # stable sorts, last key first: a lexicographic order
        order = order[torch.argsort(key[order], stable=True)]
    remove[order[:n - max_rows]] = True
    return remove


def _check_max_rows(where: str, max_rows: Any, name: str) -> None:
    check_positive_int(max_rows, "max_rows", where=where)
    check_slot_name(name, where)


class _ClockFilter(BaseFilterHookImpl):
    """A filter with an int64 clock buffer (its saved state; the largest wins on a resharded
    load)."""

    def __init__(self, table: HashTable, name: str):
        super().__init__(table, name)
        self.register_buffer("_clock", torch.zeros(1, dtype=torch.int64, device=table.device))

    def policy_state(self) -> dict[str, Tensor]:
        return {"clock": self._clock}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        if set(state) != {"clock"}:
            raise ValueError(f"{type(self).__name__}: expected state ['clock'], got "
                             f"{sorted(state)}")
        self._clock.copy_(state["clock"].reshape(1))

    @classmethod
    def merge_policy_states(cls, states):
        clocks = [s["clock"].reshape(()).cpu() for s in states]
        return {"clock": torch.stack(clocks).max().reshape(1)} if clocks else {}


@regist_filter("LRU")
class LRUFilterHookImpl(_ClockFilter):
    """Keep at most ``max_rows`` rows: a filter run removes the least recently used beyond it.

    Every training lookup (and :meth:`HashTable.insert`) that touches a row stamps it with the
    policy's lookup counter; a run removes the rows with the oldest stamps, ties (rows of the
    same lookup) broken by child then ID, lowest first, so the choice does not depend on row
    numbers.

    Args:
        max_rows (int): rows kept after a filter run (> 0); under sharding, rows of this
            rank's shard.
        name (str): the slot holding each row's stamp. Default: ``"lru_stamp"``.
    """

    def __init__(self, table: HashTable, max_rows: int, name: str = "lru_stamp"):
        self.check_params(max_rows=max_rows, name=name)
        super().__init__(table, name)
        self.max_rows = max_rows

    @classmethod
    def check_params(cls, max_rows: int = 1, name: str = "lru_stamp") -> None:
        _check_max_rows("LRU", max_rows, name)

    def slot_specs(self) -> list[SlotSpec]:
        return [SlotSpec(self._name, (1,), torch.int64, 0)]

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        if rows.numel():
            self._clock += 1
            store.write(self._name, rows, self._clock.view(1, 1))

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        stamps = self.table.store.read(self._name, rows).view(-1)
        return worst_beyond(self.max_rows, [stamps, tags, ids])

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, name={self._name!r}"


@regist_filter("LFU")
class LFUFilterHookImpl(_ClockFilter):
    """Keep at most ``max_rows`` rows: a filter run removes the least frequently used beyond
    it.

    A row's frequency counts the training lookups (and inserts) that touched it, each
    weighted by ``decay ** (steps since)``, the steps being those of
    :class:`~recis.hooks.filter_hook.HashTableFilterHook` (``decay=1``: plain counts). The decay
    is applied lazily (each row keeps its count and the step of its last touch), so a step
    costs nothing for untouched rows. A run removes the lowest frequencies first, ties broken
    by the older last touch, then child, then ID.

    Args:
        max_rows (int): rows kept after a filter run (> 0); under sharding, rows of this
            rank's shard.
        decay (float): weight kept per step, in (0, 1]. Default: 1.
        name (str): prefix of the slots ``<name>_count`` and ``<name>_step``. Default: ``"lfu"``.
    """

    def __init__(self, table: HashTable, max_rows: int, decay: float = 1.0, name: str = "lfu"):
        self.check_params(max_rows=max_rows, decay=decay, name=name)
        super().__init__(table, name)
        self.max_rows, self.decay = max_rows, float(decay)

    @classmethod
    def check_params(cls, max_rows: int = 1, decay: float = 1.0, name: str = "lfu") -> None:
        _check_max_rows("LFU", max_rows, name)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or \
                not 0 < decay <= 1:
            raise ValueError(f"LFU: decay must be a number in (0, 1], got {decay!r}")

    def slot_specs(self) -> list[SlotSpec]:
        return [SlotSpec(f"{self._name}_count", (1,), torch.float64, 0.0),
                SlotSpec(f"{self._name}_step", (1,), torch.int64, 0)]

    def _frequency(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        store = self.table.store
        count = store.read(f"{self._name}_count", rows).view(-1)
        last = store.read(f"{self._name}_step", rows).view(-1)
        if self.decay < 1:
            count = count * torch.pow(torch.tensor(self.decay, dtype=torch.float64,
                                                   device=count.device),
                                      (self._clock - last).to(torch.float64))
        return count, last

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        if rows.numel():
            count, _ = self._frequency(rows)
            store.write(f"{self._name}_count", rows, (count + 1).view(-1, 1))
            store.write(f"{self._name}_step", rows, self._clock.expand(rows.numel()).view(-1, 1))

    def update_step(self, step_size: int = 1) -> None:
        self._clock += step_size

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        count, last = self._frequency(rows)
        return worst_beyond(self.max_rows, [count, last, tags, ids])

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, decay={self.decay}, name={self._name!r}"


@regist_filter("L2Norm")
class L2NormFilterHookImpl(BaseFilterHookImpl):
    """Remove rows whose embedding has an L2 norm below ``min_norm`` at a filter run (rows an
    L2 penalty or weight decay has pulled towards zero carry little signal).

    Args:
        min_norm (float): rows with a smaller norm are removed (>= 0).
        name (str): the policy's name. Default: ``"l2norm"``.
    """

    def __init__(self, table: HashTable, min_norm: float, name: str = "l2norm"):
        self.check_params(min_norm=min_norm, name=name)
        super().__init__(table, name)
        self.min_norm = float(min_norm)

    @classmethod
    def check_params(cls, min_norm: float = 0.0, name: str = "l2norm") -> None:
        if isinstance(min_norm, bool) or not isinstance(min_norm, (int, float)) or \
                not min_norm >= 0:
            raise ValueError(f"L2Norm: min_norm must be a number >= 0, got {min_norm!r}")
        check_slot_name(name, "L2Norm")

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        rows_emb = self.table.store.read("embedding", rows)
        return rows_emb.reshape(rows.numel(), -1).to(torch.float64).norm(dim=1) < self.min_norm

    def extra_repr(self) -> str:
        return f"min_norm={self.min_norm}"


class HashtableHookFactory:
    """RecIS's entry point to the policy registries (a process-wide singleton)."""

    _instance: HashtableHookFactory | None = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    regist_admit = staticmethod(regist_admit)
    regist_filter = staticmethod(regist_filter)

    @staticmethod
    def admit_policies() -> list[str]:
        return sorted(_ADMIT_POLICIES)

    @staticmethod
    def filter_policies() -> list[str]:
        return sorted(_FILTER_POLICIES)

    @staticmethod
    def check_hook(hook: AdmitHook | FilterHook) -> None:
        """Raise if a hook names no registered policy or has params its policy rejects."""
        if isinstance(hook, FilterHook):
            _policy(_FILTER_POLICIES, "filter", hook.name).check_params(**hook.params)
        else:
            _policy(_ADMIT_POLICIES, "admit", hook.name)(**hook.params)  # cheap to build

    @staticmethod
    def create_admit_hook(table: HashTable | None, hook: AdmitHook) -> BaseAdmitHookImpl:
        if not isinstance(hook, AdmitHook):
            raise TypeError(f"admit_hook must be an AdmitHook, got {type(hook).__name__}")
        impl = _policy(_ADMIT_POLICIES, "admit", hook.name)(**hook.params)
        impl.policy_name = hook.name  # what the table's stats() count its rejections under
        return impl

    @staticmethod
    def create_filter_hook(table: HashTable, hook: FilterHook) -> BaseFilterHookImpl:
        if not isinstance(hook, FilterHook):
            raise TypeError(f"filter_hook must be a FilterHook, got {type(hook).__name__}")
        impl = _policy(_FILTER_POLICIES, "filter", hook.name)(table, **hook.params)
        impl.policy_name = hook.name
        return impl

    @staticmethod
    def get_filters() -> dict[str, dict[HashTable, BaseFilterHookImpl]]:
        """``{policy name: {table: policy}}`` of the live tables (RecIS's layout: keyed by
        the registered policy name, e.g. ``"GlobalStepFilter"``)."""
        out: dict[str, dict] = {}
        for impl in live_filters():
            out.setdefault(impl.policy_name, {})[impl.table] = impl
        return out
