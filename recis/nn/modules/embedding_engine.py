"""EmbeddingEngine: many embedding features over as few physical tables as possible."""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Mapping
from typing import Any

from torch import nn

from recis.distributed import sharding as _sharding  # module: recis.distributed imports recis.nn
from recis.nn.hashtable_hook import FilterHook
from recis.nn.modules.embedding import (
    DynamicEmbedding,
    EmbeddingOption,
    lookup_groups,
    to_bags,
)
from recis.nn.modules.hashtable import sum_stats
from recis.nn.modules.hashtable_hook_impl import filter_hooks, parse_bytes
from recis.ragged.tensor import RaggedTensor

__all__ = ["EmbeddingEngine"]

_ENGINE_NUMBERS = itertools.count()  # each engine's budget is its own share group


class EmbeddingEngine(nn.Module):
    """Embeds a dict of features; features with equal table configuration share one table.

    * Features with the same ``shared_name`` share IDs and rows (one logical table).
    * Logical tables whose configuration (:meth:`EmbeddingOption.coalesced_info`) is equal live
      as children of one physical table, looked up once per forward (once per distinct admit
      hook). Children keep separate ID spaces: equal IDs of two features never collide, and no
      bit of an ID is lost (RecIS overwrites the top 12 bits with the child index).
    * Each feature keeps its own combiner, weights, ``trainable`` and admit hook.
    * Features without an option pass through unchanged.

    Args:
        emb_options (dict[str, EmbeddingOption]): feature name -> option.
        memory_budget (int or str, optional): bytes for all the engine's tables together
            (``"8GiB"``; per process under sharding): each table gets a ``MemoryBudget``
            filter named ``"engine_budget"`` sharing the budget (see
            :class:`~recis.nn.modules.hashtable_hook_impl.MemoryBudgetFilterHookImpl`): at a
            filter run the rows that come first in one LFU order over every table go, until
            the tables' bytes together fit, so memory goes to the most used IDs whatever
            their feature. An option's own ``memory_budget`` still caps its table.

    Example::

        >>> engine = EmbeddingEngine({
        ...     "user": EmbeddingOption(embedding_dim=8, shared_name="user"),
        ...     "item": EmbeddingOption(embedding_dim=8, shared_name="item", combiner="mean"),
        ... })
        >>> out = engine({"user": torch.LongTensor([[1, 2]]), "item": torch.LongTensor([[1]])})
        >>> out["user"].shape, len(engine._ht)
        (torch.Size([1, 8]), 1)
    """

    def __init__(self, emb_options: Mapping[str, EmbeddingOption],
                 memory_budget: int | str | None = None):
        super().__init__()
        budget_hook = None
        if memory_budget is not None:
            budget_hook = FilterHook("MemoryBudget", {
                "budget": parse_bytes(memory_budget, "memory_budget"), "name": "engine_budget",
                "share": f"EmbeddingEngine-{next(_ENGINE_NUMBERS)}"})
        if not isinstance(emb_options, Mapping):
            raise TypeError(f"emb_options must be a dict, got {type(emb_options).__name__}")
        table_of_shared: dict[str, str] = {}
        info_of_shared: dict[str, str] = {}
        children: dict[str, list[str]] = {}
        first_opt: dict[str, EmbeddingOption] = {}
        self._fea_to_ht: dict[str, str] = {}
        self._fea_child: dict[str, int] = {}
        self._options: dict[str, EmbeddingOption] = {}
        for fea, opt in emb_options.items():
            if not isinstance(opt, EmbeddingOption):
                raise TypeError(
                    f"emb_options[{fea!r}] must be an EmbeddingOption, got {type(opt).__name__}"
                )
            info = opt.coalesced_info()
            shared = opt.shared_name
            if shared in info_of_shared and info_of_shared[shared] != info:
                raise ValueError(
                    f"feature {fea!r} uses shared_name {shared!r} with a table configuration "
                    f"different from an earlier feature's: {info} vs {info_of_shared[shared]}"
                )
            ht_name = "CoalescedHashtable_" + hashlib.sha256(info.encode()).hexdigest()
            info_of_shared[shared] = info
            table_of_shared[shared] = ht_name
            kids = children.setdefault(ht_name, [])
            if shared not in kids:
                kids.append(shared)
            first_opt.setdefault(ht_name, opt)
            self._fea_to_ht[fea] = ht_name
            self._fea_child[fea] = kids.index(shared)
            self._options[fea] = opt
        pgs = {id(opt.pg): opt.pg for opt in self._options.values()}
        slice_sizes = {opt.max_partition_num for opt in self._options.values()}
        if len(pgs) > 1 or len(slice_sizes) > 1:
            raise ValueError("all features of an EmbeddingEngine must have the same pg and "
                             f"max_partition_num, got {len(pgs)} pgs and {sorted(slice_sizes)}")
        pg = next(iter(pgs.values()), None)
        self._sharding = None
        if _sharding.world_of(pg) > 1:  # one exchange per step for all the engine's tables
            self._sharding = _sharding.ShardingContext(pg, next(iter(slice_sizes)))
        self._ht = nn.ModuleDict()
        for ht_name, kids in children.items():
            opt = copy.copy(first_opt[ht_name])
            opt.coalesced, opt.children, opt.shared_name = True, list(kids), ht_name
            if budget_hook is not None:
                opt.filter_hook = [*filter_hooks(opt.filter_hook), budget_hook]
            self._ht[ht_name] = DynamicEmbedding(opt, sharding=self._sharding)
        self._fea_to_group = {
            fea: (self._fea_to_ht[fea], str(opt.admit_hook)) for fea, opt in self._options.items()
        }

    def hashtable(self, feature: str):
        """The physical :class:`HashTable` serving ``feature``."""
        return self._ht[self._fea_to_ht[feature]].hashtable

    @property
    def emb_options(self) -> dict[str, EmbeddingOption]:
        """Feature -> its :class:`EmbeddingOption` (a copy of the dict)."""
        return dict(self._options)

    def child_name(self, feature: str) -> str:
        """The logical table (child) of ``feature`` in its physical table."""
        return self._options[feature].shared_name

    def forward(self, input_features: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(input_features, Mapping):
            raise TypeError(f"input_features must be a dict, got {type(input_features).__name__}")
        outputs: dict[str, Any] = {}
        groups: dict[tuple[str, str], list[str]] = {}
        for fea, value in input_features.items():
            if fea in self._options:
                groups.setdefault(self._fea_to_group[fea], []).append(fea)
            else:
                outputs[fea] = value
        lookups, names = [], []
        for (ht_name, _), feas in groups.items():
            table = self._ht[ht_name].hashtable
            features = []
            for fea in feas:
                try:
                    bags = to_bags(input_features[fea], None, table.device)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"feature {fea!r}: {e}") from None
                ragged = isinstance(input_features[fea], RaggedTensor)
                features.append((self._options[fea], bags, ragged))
            children = [self._fea_child[f] for f in feas]
            lookups.append((table, features, children, self._options[feas[0]].admit_hook))
            names.append(feas)
        for feas, outs in zip(names, lookup_groups(lookups, self._sharding), strict=True):
            outputs.update(zip(feas, outs, strict=True))
        return {fea: outputs[fea] for fea in input_features}

    def stats(self) -> dict[str, dict[str, Any]]:
        """``{table label: HashTable.stats()}`` of the physical tables, plus ``"total"``: the
        numbers summed over the tables (dicts such as ``evicted`` summed key by key)."""
        out: dict[str, dict[str, Any]] = {}
        for name, module in self._ht.items():
            table = module.hashtable
            label = table.label
            out[label if label not in out and label != "total" else name] = table.stats()
        out["total"] = sum_stats(list(out.values()))
        return out

    def reset_stats(self) -> None:
        """Start the counters of every table's :meth:`~HashTable.stats` again from 0."""
        for module in self._ht.values():
            module.hashtable.reset_stats()

    def extra_repr(self) -> str:
        return f"features={list(self._options)}, tables={len(self._ht)}"

