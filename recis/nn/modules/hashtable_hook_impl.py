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

Built in: admission ``"ReadOnly"``, ``"MinCount"`` (count-min sketch, optionally decaying),
``"BloomFilter"`` (counting Bloom filter) and ``"Probability"``; filters
``"GlobalStepFilter"``, ``"LRU"``, ``"LFU"``, ``"L2Norm"`` and ``"Score"``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from recis._core.backends import backend_for
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
    "MinCountAdmitHookImpl",
    "BloomFilterAdmitHookImpl",
    "LRUFilterHookImpl",
    "LFUFilterHookImpl",
    "L2NormFilterHookImpl",
    "MemoryBudgetFilterHookImpl",
    "parse_bytes",
    "ScoreFilterHookImpl",
    "FilterChain",
    "filter_hooks",
    "regist_score",
    "bloom_size",
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


def _check_unit_interval(where: str, name: str, value: Any, *, closed_low: bool = False,
                         closed_high: bool = True) -> float:
    """A number in (0, 1] (or another combination of open and closed ends)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and \
        (0 <= value if closed_low else 0 < value) and (value <= 1 if closed_high else value < 1)
    if not ok:
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{where}: {name} must be a number in {interval}, got {value!r}")
    return float(value)


@torch.no_grad()
def decay_counters(counters: Tensor, decay: float) -> None:
    """Multiply int counters by ``decay`` in place, rounding down."""
    counters.copy_((counters.to(torch.float64) * decay).floor_().to(counters.dtype))


@regist_admit("MinCount")
class MinCountAdmitHookImpl(BaseAdmitHookImpl):
    """Admit an ID once it has occurred ``min_count`` times in training lookups.

    Until then it reads as a zero row and gets no gradient. Occurrences of IDs not yet in the
    table are counted in a count-min sketch of ``depth x width`` int32 counters (fixed memory,
    ``4 * depth * width`` bytes), which can over-count, so an ID may be admitted a little
    early, never late. Counts of IDs that are removed later start again from the sketch. The
    sketch is saved with the table; a resharded load gives every new shard the sum of the
    saved shards' sketches (IDs may then be admitted early, never late).

    Old counts fade with ``decay < 1``: the policy numbers its admission calls (training
    lookups that see at least one unknown ID); after every ``decay_every``-th call (its counts
    added and its IDs admitted) every counter is multiplied by ``decay`` and rounded down. An
    ID must then reach ``min_count`` with its recent occurrences: e.g. ``decay=0.5,
    decay_every=100`` halves the counts every 100 such lookups. The call counter is saved with
    the sketch (a resharded load continues from the largest).

    Args:
        min_count (int): occurrences needed (>= 1). Default: 2.
        width (int): counters per row, a power of two. Default: 2**20.
        depth (int): independent hash rows. Default: 2.
        decay (float): factor applied to the counts, in (0, 1]; 1 = counts never fade.
            Default: 1.
        decay_every (int): admission calls between two decays (>= 1). Default: 1000.
    """

    def __init__(self, min_count: int = 2, width: int = 1 << 20, depth: int = 2,
                 decay: float = 1.0, decay_every: int = 1000):
        for name, value in (("min_count", min_count), ("width", width), ("depth", depth),
                            ("decay_every", decay_every)):
            check_positive_int(value, name, where="MinCount")
        if width & (width - 1):
            raise ValueError(f"MinCount: width must be a power of two, got {width}")
        self.decay = _check_unit_interval("MinCount", "decay", decay)
        self.decay_every = decay_every
        self.min_count = min_count
        self._shape = (depth, width)
        self._sketch: Tensor | None = None
        self._calls = torch.zeros(1, dtype=torch.int64)

    def admit(self, store, ids, tags, counts):
        if self._sketch is None:
            self._sketch = torch.zeros(self._shape, dtype=torch.int32, device=ids.device)
        admitted = count_min_admit(self._sketch, ids, tags, counts, self.min_count)
        if self.decay < 1:
            self._calls += 1
            if int(self._calls.item()) % self.decay_every == 0:
                decay_counters(self._sketch, self.decay)
        return admitted

    def policy_state(self) -> dict[str, Tensor]:
        state = {} if self._sketch is None else {"sketch": self._sketch}
        if self.decay < 1:
            state["calls"] = self._calls
        return state

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        unknown = set(state) - {"sketch", "calls"}
        if unknown:
            raise ValueError(f"MinCount: unknown state {sorted(unknown)}")
        sketch = state.get("sketch")
        if sketch is not None:
            if tuple(sketch.shape) != self._shape:
                raise ValueError(f"MinCount: saved sketch has shape {tuple(sketch.shape)}, "
                                 f"this policy {self._shape}")
            self._sketch = sketch.to(torch.int32).clone()
        if "calls" in state:
            self._calls = state["calls"].to(torch.int64).reshape(1).cpu().clone()

    @classmethod
    def merge_policy_states(cls, states):
        out = {}
        sketches = [s["sketch"].to(torch.int64) for s in states if "sketch" in s]
        if sketches:
            total = torch.stack(sketches).sum(0).clamp_(max=torch.iinfo(torch.int32).max)
            out["sketch"] = total.to(torch.int32)
        calls = [s["calls"].reshape(()).cpu() for s in states if "calls" in s]
        if calls:
            out["calls"] = torch.stack(calls).max().reshape(1)
        return out


def bloom_size(capacity: int, fp_rate: float) -> tuple[int, int]:
    """``(m, k)`` of a Bloom filter for ``capacity`` distinct keys at false-positive rate
    ``fp_rate``: ``m = ceil(-capacity ln(fp_rate) / ln(2)^2)`` counters and
    ``k = max(1, round(m / capacity * ln 2))`` hashes (the standard formulas)."""
    m = max(1, math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2))
    return m, max(1, round(m / capacity * math.log(2)))


@regist_admit("BloomFilter")
class BloomFilterAdmitHookImpl(BaseAdmitHookImpl):
    """Admit an ID once it has occurred ``min_count`` times in training lookups, counted in a
    counting Bloom filter sized for ``capacity`` distinct IDs at false-positive rate
    ``fp_rate``.

    The filter has ``m`` int32 counters and ``k`` hashes (:func:`bloom_size`); each occurrence
    of an unknown ID adds one to its ``k`` counters and the ID's count is the smallest of
    them. Counters shared with other IDs can only over-count, so an ID may be admitted early
    (with about ``fp_rate`` odds while at most ``capacity`` IDs were counted), never late.
    Memory: ``4 * m`` bytes (``capacity=10**7, fp_rate=0.01``: about 383 MB). The counters
    are saved with the table; a resharded load gives every new shard the sum of the saved
    shards' counters (early, never late).

    Args:
        min_count (int): occurrences needed (>= 1). Default: 2.
        capacity (int): expected distinct IDs (>= 1).
        fp_rate (float): target false-positive rate, in (0, 1). Default: 0.01.
    """

    def __init__(self, capacity: int, min_count: int = 2, fp_rate: float = 0.01):
        check_positive_int(capacity, "capacity", where="BloomFilter")
        check_positive_int(min_count, "min_count", where="BloomFilter")
        fp_rate = _check_unit_interval("BloomFilter", "fp_rate", fp_rate, closed_high=False)
        self.min_count, self.capacity, self.fp_rate = min_count, capacity, fp_rate
        self.num_counters, self.num_hashes = bloom_size(capacity, fp_rate)
        self._counters: Tensor | None = None

    def positions(self, ids: Tensor, tags: Tensor | None) -> list[Tensor]:
        """The ``k`` counter indices of each ID."""
        base = tags if tags is not None else torch.zeros_like(ids)
        return [torch.remainder(hash_keys(ids, base + (h + 1) * (1 << 24) + 7),
                                self.num_counters) for h in range(self.num_hashes)]

    @torch.no_grad()
    def admit(self, store, ids, tags, counts):
        if self._counters is None:
            self._counters = torch.zeros(self.num_counters, dtype=torch.int32,
                                         device=ids.device)
        counters = self._counters
        positions = self.positions(ids, tags)
        for pos in positions:
            counters.index_add_(0, pos, counts.to(counters.dtype))
        estimate = torch.stack([counters[pos] for pos in positions]).min(0).values
        return estimate >= self.min_count

    def policy_state(self) -> dict[str, Tensor]:
        return {} if self._counters is None else {"counters": self._counters}

    def load_policy_state(self, state: dict[str, Tensor]) -> None:
        unknown = set(state) - {"counters"}
        if unknown:
            raise ValueError(f"BloomFilter: unknown state {sorted(unknown)}")
        counters = state.get("counters")
        if counters is not None:
            if tuple(counters.shape) != (self.num_counters,):
                raise ValueError(f"BloomFilter: saved counters have shape "
                                 f"{tuple(counters.shape)}, this policy ({self.num_counters},)"
                                 " (capacity and fp_rate must match the saved run)")
            self._counters = counters.to(torch.int32).clone()

    @classmethod
    def merge_policy_states(cls, states):
        counters = [s["counters"].to(torch.int64).cpu() for s in states if "counters" in s]
        if not counters:
            return {}
        total = torch.stack(counters).sum(0).clamp_(max=torch.iinfo(torch.int32).max)
        return {"counters": total.to(torch.int32)}


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
        p = _check_unit_interval("Probability", "p", p)
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
        if rows.numel():  # the kernel alone: the rows are valid and the touch marks them
            store.backend.scatter(store.block_list(self._name), rows, self._global_step.view(1, 1))

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
    ``keys`` (the first key decides, the next ones break its ties, then the position), lowest
    first.

    Linear in the rows, no sort: each key is split at its k-th smallest value (a selection)
    among the rows still tied on the previous keys, so a run that removes a few thousand of a
    million rows, or ties half a million of them on the first key, sorts nothing."""
    n = keys[0].numel()
    remove = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    need = n - max_rows
    if need <= 0:
        return remove
    split_at_kth = backend_for(keys[0].device).split_at_kth
    tied = None  # rows tied on the keys so far, ascending (None: all)
    for key in keys:
        low, high = (key if tied is None else key[tied]).aminmax()
        if low == high:  # no split (e.g. the tags of a plain table)
            continue
        below, tied = split_at_kth(key, tied, need)  # fewer than `need` below the k-th value
        remove[below] = True
        need -= below.numel()
        if tied.numel() == need:
            break
    if tied is None:
        tied = torch.arange(n, device=remove.device)
    remove[tied[:need]] = True  # the rest, tied on every key: the lowest positions
    return remove


def worst_beyond_bytes(budget: int, keys: list[Tensor], weights: Tensor) -> Tensor:
    """Bool mask of the rows to remove so that the ``weights`` (bytes) of the rows kept sum to
    at most ``budget``: the fewest rows first in the order of ``keys`` (as
    :func:`worst_beyond`), i.e. the shortest prefix of that order whose removal fits.

    One sort of the first key, then a sort of the rows tied at the cut by the other keys."""
    n = keys[0].numel()
    remove = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    excess = int(weights.sum()) - budget
    if excess <= 0:
        return remove
    first = keys[0]
    order = torch.argsort(first, stable=True)
    freed = torch.cumsum(weights[order], 0)
    cut = int(torch.searchsorted(freed, excess))  # rows order[:cut + 1] free enough
    value = first[order[min(cut, n - 1)]]
    remove |= first < value
    tied = (first == value).nonzero().squeeze(1)
    need = excess - int(weights[remove].sum())
    tie_order = torch.arange(tied.numel(), device=first.device)
    for key in reversed(keys[1:]):
        tie_order = tie_order[torch.argsort(key[tied][tie_order], stable=True)]
    ranked = tied[tie_order]
    take = int(torch.searchsorted(torch.cumsum(weights[ranked], 0), need)) + 1
    remove[ranked[:take]] = True
    return remove


def _check_max_rows(where: str, max_rows: Any, name: str, cap_on_insert: Any = False) -> None:
    check_positive_int(max_rows, "max_rows", where=where)
    check_slot_name(name, where)
    if not isinstance(cap_on_insert, bool):
        raise TypeError(f"{where}: cap_on_insert must be a bool, got {cap_on_insert!r}")


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


class _CapacityFilter(_ClockFilter):
    """Keeps at most ``max_rows`` rows, removing the first in :meth:`order_keys` order (the
    first key decides, the next ones break its ties, lowest first): at filter runs, and with
    ``cap_on_insert`` also before new IDs get rows."""

    max_rows: int
    cap_on_insert: bool = False

    def order_keys(self, ids: Tensor, tags: Tensor, rows: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        return worst_beyond(self.max_rows, self.order_keys(ids, tags, rows))

    @property
    def caps_inserts(self) -> bool:
        return self.cap_on_insert

    @torch.no_grad()
    def make_room(self, store: TableStore, new: int, keep: Tensor) -> None:
        if not self.cap_on_insert or len(store) + new <= self.max_rows:
            return  # below the cap: no scan of the table
        ids, tags, rows = store.items()
        excess = ids.numel() + new - self.max_rows
        others = ~torch.isin(rows, keep)
        ids, tags, rows = ids[others], tags[others], rows[others]
        n = min(excess, ids.numel())
        if n:
            remove = worst_beyond(ids.numel() - n, self.order_keys(ids, tags, rows))
            store.remove(ids[remove], tags[remove])


@regist_filter("LRU")
class LRUFilterHookImpl(_CapacityFilter):
    """Keep at most ``max_rows`` rows: a filter run removes the least recently used beyond it.

    Every training lookup (and :meth:`HashTable.insert`) that touches a row stamps it with the
    policy's lookup counter; a run removes the rows with the oldest stamps, ties (rows of the
    same lookup) broken by child then ID, lowest first, so the choice does not depend on row
    numbers.

    Args:
        max_rows (int): rows kept after a filter run (> 0); under sharding, rows of this
            rank's shard.
        name (str): the slot holding each row's stamp. Default: ``"lru_stamp"``.
        cap_on_insert (bool): also a hard cap: before a training lookup or
            :meth:`HashTable.insert` gives new IDs rows, the least recently used rows that
            the same call does not use are removed so that at most ``max_rows`` remain (more
            only if one call uses more IDs), as TorchRec's managed collisions do.
            Default: False.
    """

    def __init__(self, table: HashTable, max_rows: int, name: str = "lru_stamp",
                 cap_on_insert: bool = False):
        self.check_params(max_rows=max_rows, name=name, cap_on_insert=cap_on_insert)
        super().__init__(table, name)
        self.max_rows, self.cap_on_insert = max_rows, cap_on_insert

    @classmethod
    def check_params(cls, max_rows: int = 1, name: str = "lru_stamp",
                     cap_on_insert: bool = False) -> None:
        _check_max_rows("LRU", max_rows, name, cap_on_insert)

    def order_keys(self, ids: Tensor, tags: Tensor, rows: Tensor) -> list[Tensor]:
        return [self.table.store.read(self._name, rows).view(-1), tags, ids]

    def slot_specs(self) -> list[SlotSpec]:
        return [SlotSpec(self._name, (1,), torch.int64, 0)]

    def on_touch(self, store: TableStore, rows: Tensor) -> None:
        if rows.numel():  # the kernel alone: the rows are valid and the touch marks them
            self._clock += 1
            store.backend.scatter(store.block_list(self._name), rows, self._clock.view(1, 1))

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, name={self._name!r}, " \
            f"cap_on_insert={self.cap_on_insert}"


@regist_filter("LFU")
class LFUFilterHookImpl(_CapacityFilter):
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
        cap_on_insert (bool): also a hard cap: before a training lookup or
            :meth:`HashTable.insert` gives new IDs rows, the least frequently used rows that
            the same call does not use are removed so that at most ``max_rows`` remain (more
            only if one call uses more IDs). Default: False.
    """

    def __init__(self, table: HashTable, max_rows: int, decay: float = 1.0, name: str = "lfu",
                 cap_on_insert: bool = False):
        LFUFilterHookImpl.check_params(max_rows=max_rows, decay=decay, name=name,
                                       cap_on_insert=cap_on_insert)
        super().__init__(table, name)
        self.max_rows, self.decay, self.cap_on_insert = max_rows, float(decay), cap_on_insert

    @classmethod
    def check_params(cls, max_rows: int = 1, decay: float = 1.0, name: str = "lfu",
                     cap_on_insert: bool = False) -> None:
        _check_max_rows("LFU", max_rows, name, cap_on_insert)
        _check_unit_interval("LFU", "decay", decay)

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
        if rows.numel():  # one fused kernel: the rows are valid and the touch marks them
            store.backend.decayed_count_touch(store.block_list(f"{self._name}_count"),
                                              store.block_list(f"{self._name}_step"), rows,
                                              self._clock, self.decay)

    def update_step(self, step_size: int = 1) -> None:
        self._clock += step_size

    def order_keys(self, ids: Tensor, tags: Tensor, rows: Tensor) -> list[Tensor]:
        count, last = self._frequency(rows)
        return [count, last, tags, ids]

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, decay={self.decay}, name={self._name!r}, " \
            f"cap_on_insert={self.cap_on_insert}"


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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, where: str = "memory budget") -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"512 MB"``, ``"1.5gib"``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: expected bytes as an int or a string like '2GiB', got bool")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        unit = text.lstrip("0123456789.")
        try:
            number = int(float(text[:len(text) - len(unit)]) * _UNITS[unit])
        except (ValueError, KeyError):
            raise ValueError(f"{where}: cannot read {value!r} as bytes; expected e.g. 2GiB, "
                             f"512MB, 1000000 (units {sorted(u for u in _UNITS if u)})") from None
    else:
        raise TypeError(f"{where}: expected bytes as an int or a string like '2GiB', got "
                        f"{type(value).__name__}")
    if number <= 0:
        raise ValueError(f"{where}: must be > 0 bytes, got {value!r}")
    return number


@regist_filter("MemoryBudget")
class MemoryBudgetFilterHookImpl(LFUFilterHookImpl):
    """Keep a table (or a group of tables) within a byte budget: at each filter run, the rows
    beyond what the budget holds are removed, least frequently used first
    (:class:`LFUFilterHookImpl`'s order).

    The row limit is ``budget // bytes_per_row()``, recomputed at every run from the table's
    own layout: every slot's row (embedding, optimizer state, policy metadata), one byte of
    change tracking, 16 bytes of removal log (for incremental checkpoints), 8 bytes of free
    list, and the ID map's bytes per ID at its sparsest (just after it doubles: 16 bytes a
    slot at 28% load, 57 bytes), so the rows never need more than the budget. Fixed overhead
    on top: one block of rows per slot, and up to 1 MiB of removal log while the table is
    small. Blocks and the map are allocated ahead of need and reused, not returned. Without
    ``cap_on_insert`` a table can exceed its budget between runs by the rows admitted since
    the last run; with it, never by more than one lookup's new IDs. Under sharding each rank
    keeps its shard within the budget given to it (the budget is per process).

    A shared budget (``share="name"``): every live ``MemoryBudget`` filter with the same
    ``share`` (and the same ``budget``) is one group, and the group's rows together stay
    within the budget. A run of any member enforces the whole group: it removes the rows
    that come first in one LFU order over all members (frequency, last touch, then member in
    creation order, child, ID) until the group's bytes fit, each row weighing its own
    table's ``bytes_per_row()``; the other members' runs in the same round then find
    nothing to remove. Members' clocks must advance together (one
    :class:`~recis.hooks.filter_hook.HashTableFilterHook` drives them), or their
    frequencies do not compare. This is what ``EmbeddingEngine(memory_budget=...)`` uses.

    Args:
        budget (int or str): bytes, e.g. ``"2GiB"``, ``"512MB"`` or an int.
        decay (float): LFU's weight kept per step, in (0, 1]. Default: 1.
        name (str): prefix of the LFU slots. Default: ``"budget"``.
        cap_on_insert (bool): also a hard cap: before new IDs get rows, the least
            frequently used rows the same call does not use are removed so that the table
            stays within its row limit (not with ``share``). Default: False.
        share (str or None): the group sharing this budget; None: this table alone.

    Example::

        >>> ht = HashTable([16], memory_budget="64MiB")   # or, for several tables:
        >>> hook = FilterHook("MemoryBudget", {"budget": "1GiB", "share": "user_tables"})
    """

    def __init__(self, table: HashTable, budget: int | str, decay: float = 1.0,
                 name: str = "budget", cap_on_insert: bool = False, share: str | None = None):
        self.check_params(budget=budget, decay=decay, name=name, cap_on_insert=cap_on_insert,
                          share=share)
        self.budget = parse_bytes(budget, "MemoryBudget: budget")
        self.share = share
        super().__init__(table, max_rows=1, decay=decay, name=name,
                         cap_on_insert=cap_on_insert)

    @classmethod
    def check_params(cls, budget: int | str = 1, decay: float = 1.0, name: str = "budget",
                     cap_on_insert: bool = False, share: str | None = None) -> None:
        parse_bytes(budget, "MemoryBudget: budget")
        LFUFilterHookImpl.check_params(max_rows=1, decay=decay, name=name,
                                       cap_on_insert=cap_on_insert)
        if share is not None and (not isinstance(share, str) or not share):
            raise TypeError(f"MemoryBudget: share must be a non-empty str or None, got "
                            f"{share!r}")
        if share is not None and cap_on_insert:
            raise ValueError("MemoryBudget: cap_on_insert works for a table's own budget, "
                             "not with share (a shared budget is enforced at filter runs)")

    def bytes_per_row(self) -> int:
        """The budget's cost of one row (see the class docstring)."""
        from recis._core.id_map import IdMap

        slots = sum(math.prod(spec.row_shape) * spec.dtype.itemsize
                    for spec in self.table.store.slot_specs())
        map_bytes = math.ceil(16 / (IdMap.MAX_LOAD * 0.75 / 2))
        return slots + 1 + 16 + 8 + map_bytes

    def row_limit(self) -> int:
        """Rows this table may hold on its own budget (at least 1)."""
        return max(self.budget // self.bytes_per_row(), 1)

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        self.max_rows = self.row_limit()
        return super().filter(ids, tags, rows)

    def make_room(self, store: TableStore, new: int, keep: Tensor) -> None:
        self.max_rows = self.row_limit()
        super().make_room(store, new, keep)

    def group(self) -> list[MemoryBudgetFilterHookImpl]:
        """The live members of this filter's ``share`` group, in creation order (itself alone
        without ``share``)."""
        if self.share is None:
            return [self]
        members = [f for f in live_filters()
                   if isinstance(f, MemoryBudgetFilterHookImpl) and f.share == self.share]
        budgets = {f.budget for f in members}
        if len(budgets) > 1:
            raise ValueError(f"MemoryBudget: the tables sharing {self.share!r} were given "
                             f"different budgets {sorted(budgets)}; give them one")
        return members

    @torch.no_grad()
    def do_filter(self) -> int:
        """Without ``share``: LFU beyond :meth:`row_limit`. With it: enforce the whole group
        (see the class docstring); returns the rows removed from all members."""
        if self.share is None:
            return super().do_filter()
        members = self.group()
        with contextlib.ExitStack() as locks:
            for member in members:  # creation order: every member takes the locks alike
                locks.enter_context(member.table.store.lock.write())
            live = [member.table.store.items() for member in members]
            device = self.table.device  # members may live on other devices
            keys: list[list[Tensor]] = [[], [], [], [], []]
            weights = []
            for index, (member, (ids, tags, rows)) in enumerate(zip(members, live, strict=True)):
                count, last = member._frequency(rows)
                for key, value in zip(keys, (count, last, torch.full_like(ids, index), tags,
                                             ids), strict=True):
                    key.append(value.to(device))
                weights.append(torch.full((ids.numel(),), member.bytes_per_row(),
                                          dtype=torch.int64, device=device))
            remove = worst_beyond_bytes(self.budget, [torch.cat(k) for k in keys],
                                        torch.cat(weights))
            removed, start = 0, 0
            for member, (ids, tags, _) in zip(members, live, strict=True):
                mine = remove[start:start + ids.numel()].to(ids.device)
                start += ids.numel()
                removed += member.table.store.remove(ids[mine], tags[mine],
                                                     reason=member.policy_name)
        logger.debug("MemoryBudget %r: %d tables, %d rows removed", self.share, len(members),
                     removed)
        return removed

    def extra_repr(self) -> str:
        return f"budget={self.budget}, decay={self.decay}, name={self._name!r}, " \
            f"cap_on_insert={self.cap_on_insert}, share={self.share!r}"


_SCORE_FUNCTIONS: dict[str, Callable[[dict[str, Tensor]], Tensor]] = {}


def regist_score(name: str, fn: Callable | None = None) -> Callable:
    """Register a score function for the ``"Score"`` filter under ``name`` (usable as a
    decorator), so that a hook can name it: ``FilterHook("Score", {"score": name, ...})``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"score function name must be a non-empty str, got {name!r}")

    def add(f: Callable) -> Callable:
        if not callable(f):
            raise TypeError(f"a score function must be callable, got {f!r}")
        if name in _SCORE_FUNCTIONS:
            raise ValueError(f"a score function is already registered under the name {name!r}")
        _SCORE_FUNCTIONS[name] = f
        return f

    return add if fn is None else add(fn)


def _score_function(score: Any) -> Callable:
    if isinstance(score, str):
        try:
            return _SCORE_FUNCTIONS[score]
        except KeyError:
            raise ValueError(f"Score: unknown score function {score!r}; registered: "
                             f"{sorted(_SCORE_FUNCTIONS)}") from None
    if not callable(score):
        raise TypeError(f"Score: score must be a callable or the name of a registered score "
                        f"function, got {score!r}")
    return score


@regist_filter("Score")
class ScoreFilterHookImpl(BaseFilterHookImpl):
    """Remove the rows a user function scores lowest, at each filter run.

    ``score(slots)`` gets ``{slot name: values}`` of the live rows (``"embedding"``, optimizer
    state, other policies' slots: ``[n, *row_shape]`` each, in the same row order) and returns
    one score per row (``n`` numbers, no NaN). A run removes the rows scoring below
    ``min_score``, then the lowest beyond ``max_rows``; ties are broken by child then ID,
    lowest first (as LRU's). At least one of ``min_score`` and ``max_rows`` is needed.

    The function itself is not saved in checkpoints (the policy has no state): a restored
    table uses the function of the hook it is built with. To name the function in a
    configuration, register it with :func:`regist_score` and pass its name.

    Args:
        score (callable or str): the function, or the name of a registered one.
        max_rows (int, optional): rows kept after a run (> 0).
        min_score (float, optional): rows scoring below it are removed.
        name (str): the policy's name. Default: ``"score"``.
    """

    def __init__(self, table: HashTable, score: Any, max_rows: int | None = None,
                 min_score: float | None = None, name: str = "score"):
        self.check_params(score=score, max_rows=max_rows, min_score=min_score, name=name)
        super().__init__(table, name)
        self.score_fn = _score_function(score)
        self.max_rows = max_rows
        self.min_score = None if min_score is None else float(min_score)

    @classmethod
    def check_params(cls, score: Any = None, max_rows: int | None = None,
                     min_score: float | None = None, name: str = "score") -> None:
        _score_function(score)
        if max_rows is None and min_score is None:
            raise ValueError("Score: give max_rows, min_score or both")
        if max_rows is not None:
            check_positive_int(max_rows, "max_rows", where="Score")
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(
                min_score, (int, float)) or math.isnan(min_score)):
            raise ValueError(f"Score: min_score must be a number, got {min_score!r}")
        check_slot_name(name, "Score")

    def scores(self, rows: Tensor) -> Tensor:
        """The score of each of ``rows`` (float64)."""
        store = self.table.store
        slots = {n: store.read(n, rows) for n in store.slot_names}
        out = self.score_fn(slots)
        if not isinstance(out, Tensor) or out.numel() != rows.numel():
            raise ValueError(f"Score: the score function must return a Tensor of "
                             f"{rows.numel()} scores (one per row), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        out = out.detach().reshape(-1).to(torch.float64)
        if bool(torch.isnan(out).any()):
            raise ValueError("Score: the score function returned NaN")
        return out

    def filter(self, ids: Tensor, tags: Tensor, rows: Tensor) -> Tensor:
        score = self.scores(rows).to(ids.device)
        remove = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        if self.min_score is not None:
            remove = score < self.min_score
        if self.max_rows is not None:
            kept = (~remove).nonzero().squeeze(1)
            beyond = worst_beyond(self.max_rows, [score[kept], tags[kept], ids[kept]])
            remove[kept[beyond]] = True
        return remove

    def extra_repr(self) -> str:
        return (f"score={getattr(self.score_fn, '__name__', self.score_fn)!r}, "
                f"max_rows={self.max_rows}, min_score={self.min_score}")


class FilterChain(nn.Module):
    """Several filter policies of one table, applied in order: a run of :meth:`do_filter`
    runs each policy's filter on the rows the previous ones left."""

    def __init__(self, policies: list[BaseFilterHookImpl]):
        super().__init__()
        self.policies = nn.ModuleList(policies)

    def bind(self, table: HashTable) -> None:
        for policy in self.policies:
            policy.bind(table)

    def __len__(self) -> int:
        return len(self.policies)

    def __iter__(self):
        return iter(self.policies)

    def __getitem__(self, index: int) -> BaseFilterHookImpl:
        return self.policies[index]

    def update_step(self, step_size: int = 1) -> None:
        for policy in self.policies:
            policy.update_step(step_size)

    def do_filter(self) -> int:
        return sum(policy.do_filter() for policy in self.policies)

    def forward(self, rows: Tensor) -> None:
        for policy in self.policies:
            policy.update(rows)


def filter_hooks(filter_hook: Any, where: str = "filter_hook") -> list[FilterHook]:
    """The hooks of a ``filter_hook`` argument: None, a FilterHook, or a non-empty list (or
    tuple) of them (applied in order)."""
    if filter_hook is None:
        return []
    if isinstance(filter_hook, FilterHook):
        return [filter_hook]
    if isinstance(filter_hook, (list, tuple)) and filter_hook and all(
            isinstance(h, FilterHook) for h in filter_hook):
        return list(filter_hook)
    raise TypeError(f"{where} must be a FilterHook or a non-empty list of FilterHooks, got "
                    f"{filter_hook!r}")


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
