"""EmbeddingOption and DynamicEmbedding: one dynamic table plus a combiner over bags of IDs."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from recis.distributed import sharding as _sharding  # module: recis.distributed imports recis.nn
from recis.nn.functional.embedding_ops import COMBINERS, bag_reduce, table_bag_reduce
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import ConstantInitializer, Initializer
from recis.nn.modules.hashtable import HashTable, Lookup, check_ids, gen_slice
from recis.nn.modules.hashtable_hook_impl import (
    HashtableHookFactory,
    filter_hooks,
    parse_bytes,
)
from recis.ragged.tensor import RaggedTensor
from recis.utils.checks import check_device, check_positive_int

__all__ = ["EmbeddingOption", "DynamicEmbedding", "Bags", "to_bags", "lookup_features",
           "lookup_groups"]


@dataclass
class EmbeddingOption:
    """Configuration of one embedding feature (RecIS's fields and defaults).

    Features whose table fields (dim, dtype, device, initializer, grad_reduce_by, filter_hook,
    block_size) are equal can share one physical table in :class:`EmbeddingEngine`.
    """

    embedding_dim: int = 16  # row width
    block_size: int = 10240  # rows per storage block
    dtype: torch.dtype = torch.float32  # storage dtype; int8 tables are read-only
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    trainable: bool = True  # False: outputs are detached (IDs are still admitted)
    pg: Any = None  # process group (sharding); None = the default group
    max_partition_num: int = 65536  # size of the ID slice space used for sharding
    shared_name: str = "embedding"  # logical table; features with one shared_name share rows
    children: list[str] = field(default_factory=list)  # [] -> [shared_name]
    coalesced: bool = False  # the table serves several children
    initializer: Initializer | None = None  # None -> ConstantInitializer(0)
    use_weight: bool = True  # honour per-ID weights of ragged inputs
    combiner: str = "sum"  # "sum", "mean" or "tile"
    combiner_kwargs: dict | None = None  # tile: {"tile_len": n}
    grad_reduce_by: str = "worker"  # "worker": sum over occurrences; "id": mean
    filter_hook: FilterHook | list[FilterHook] | None = None  # eviction policy (list: in order)
    admit_hook: AdmitHook | None = None  # admission policy
    fp16_enabled: bool = False  # int8 tables only: reduce in fp16 instead of fp32
    memory_budget: int | str | None = None  # bytes ("2GiB") for the table: a MemoryBudget
    # filter (LFU order) is added after filter_hook's policies

    def __post_init__(self):
        check_positive_int(self.embedding_dim, "embedding_dim")
        check_positive_int(self.block_size, "block_size")
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {self.dtype!r}")
        self.device = check_device(self.device)
        if not isinstance(self.shared_name, str) or not self.shared_name:
            raise ValueError(f"shared_name must be a non-empty str, got {self.shared_name!r}")
        if not self.children:
            self.children = [self.shared_name]
        if self.initializer is None:
            self.initializer = ConstantInitializer(0.0)
        elif not isinstance(self.initializer, Initializer):
            raise TypeError(f"initializer must be a recis Initializer, got {self.initializer!r}")
        if self.combiner not in COMBINERS:
            raise ValueError(f"combiner must be one of {COMBINERS}, got {self.combiner!r}")
        if self.combiner == "tile":
            tile_len = (self.combiner_kwargs or {}).get("tile_len")
            if isinstance(tile_len, bool) or not isinstance(tile_len, int) or tile_len <= 0:
                raise ValueError(
                    "combiner='tile' needs combiner_kwargs={'tile_len': n} with n a positive "
                    f"int, got combiner_kwargs={self.combiner_kwargs!r}"
                )
        if self.grad_reduce_by not in ("worker", "id"):
            raise ValueError(
                f"grad_reduce_by must be 'worker' or 'id', got {self.grad_reduce_by!r}"
            )
        if self.memory_budget is not None:
            budget = FilterHook("MemoryBudget", {"budget": parse_bytes(self.memory_budget,
                                                                     "memory_budget")})
            self.filter_hook = budget if self.filter_hook is None else \
                [*filter_hooks(self.filter_hook), budget]
        if self.filter_hook is not None:
            hooks = filter_hooks(self.filter_hook)
            if not isinstance(self.filter_hook, FilterHook):
                self.filter_hook = hooks  # a list, applied in its order
            for hook in hooks:
                HashtableHookFactory.check_hook(hook)
        if self.admit_hook is not None:
            if not isinstance(self.admit_hook, AdmitHook):
                raise TypeError(f"admit_hook must be an AdmitHook, got {self.admit_hook!r}")
            HashtableHookFactory.check_hook(self.admit_hook)
        if self.fp16_enabled and self.dtype != torch.int8:
            raise ValueError(f"fp16_enabled needs dtype=torch.int8, got dtype={self.dtype}")

    @property
    def tile_len(self) -> int | None:
        return (self.combiner_kwargs or {}).get("tile_len")

    def coalesced_info(self) -> str:
        """JSON of the fields that define a physical table (equal -> shareable)."""
        return json.dumps(
            {
                "dim": self.embedding_dim,
                "dtype": str(self.dtype),
                "device": self.device.type,
                "initializer": str(self.initializer),
                "grad_reduce_by": self.grad_reduce_by,
                "filter_hook": str(self.filter_hook) if not isinstance(self.filter_hook, list)
                else [str(h) for h in self.filter_hook],
                "block_size": self.block_size,
            },
            sort_keys=True,
        )

    def runtime_info(self) -> str:
        """JSON of the per-feature lookup settings."""
        return json.dumps(
            {
                "combiner": self.combiner,
                "combiner_kwargs": self.combiner_kwargs,
                "use_weight": self.use_weight,
                "trainable": self.trainable,
                "admit_hook": str(self.admit_hook),
                "fp16_enabled": self.fp16_enabled,
            },
            sort_keys=True,
        )


@dataclass
class Bags:
    """A batch of ID bags in flat form: ``values[offsets[b]:offsets[b+1]]`` is bag ``b``."""

    values: Tensor  # (N,) int64
    offsets: Tensor  # (B + 1,) int64
    weights: Tensor | None  # (N,) or None
    out_shape: tuple[int, ...]  # leading shape of the output, e.g. (B,)


def to_bags(ids: Any, input_weights: Tensor | None, device: torch.device) -> Bags:
    """Validate an embedding input and flatten it to :class:`Bags`.

    Accepted: a 1-D ID tensor (one ID per bag), a 2-D ``(B, K)`` ID tensor, or a
    :class:`RaggedTensor` (its weights are used unless ``input_weights`` is given).
    """
    if isinstance(ids, RaggedTensor):
        offsets = ids.offsets()[-1]
        outer = ids.real_shape(0, ids.dim - 1)
        rows = 1
        for d in outer:
            rows *= d
        if rows != offsets.numel() - 1:
            raise ValueError(
                f"RaggedTensor of shape {tuple(ids.real_shape())} has {offsets.numel() - 1} "
                f"innermost rows but its outer dims {tuple(outer)} need {rows}: pad it first"
            )
        values = check_ids(ids.values(), device, "ids.values()")
        if input_weights is not None and ids.weight() is not None:
            raise ValueError("give weights either inside the RaggedTensor or as input_weights")
        weights = input_weights if input_weights is not None else ids.weight()
        offsets = offsets.to(device=values.device, dtype=torch.int64)
        out_shape = tuple(outer)
    elif isinstance(ids, Tensor):
        if ids.is_sparse:
            raise TypeError("sparse ID tensors are not supported; use a RaggedTensor")
        if ids.dim() not in (1, 2):
            raise ValueError(
                f"dense ids must be 1-D (one ID per bag) or 2-D (B, K), got shape "
                f"{tuple(ids.shape)}; use a RaggedTensor for deeper nesting"
            )
        values = check_ids(ids, device)
        batch = ids.shape[0]
        per_bag = 1 if ids.dim() == 1 else ids.shape[1]
        offsets = torch.arange(batch + 1, device=values.device, dtype=torch.int64) * per_bag
        weights = input_weights
        out_shape = (batch,)
    else:
        raise TypeError(f"ids must be a Tensor or RaggedTensor, got {type(ids).__name__}")
    if weights is not None:
        if not isinstance(weights, Tensor) or not weights.is_floating_point():
            raise TypeError("weights must be a floating-point Tensor")
        expected = tuple(ids.shape) if isinstance(ids, Tensor) else (values.numel(),)
        if tuple(weights.shape) != expected and not (
                isinstance(ids, RaggedTensor) and weights.dim() == 1):
            raise ValueError(f"weights must have one value per ID, in the shape of the ids "
                             f"{list(expected)}, got {list(weights.shape)}")
        weights = weights.reshape(-1)
        if weights.numel() != values.numel():
            raise ValueError(
                f"weights must have one value per ID ({values.numel()}), got {weights.numel()}"
            )
        if weights.device.type != values.device.type:
            raise ValueError(f"weights are on {weights.device}, ids on {values.device}")
    return Bags(values, offsets, weights, out_shape)


def reduce_bags(
    opt: EmbeddingOption, table: HashTable, lookup: Lookup, bags: Bags, ragged: bool,
    inverse: Tensor | None = None,
) -> Tensor:
    """Apply ``opt``'s combiner to the rows of a lookup and shape the output."""
    weights = bags.weights if opt.use_weight else None
    if table.dtype.is_floating_point:
        out = table_bag_reduce(table, lookup, bags.offsets, weights, opt.combiner, opt.tile_len,
                               inverse)
        return _shape_output(opt, out, bags, ragged)
    inverse = lookup.inverse if inverse is None else inverse
    return reduce_rows(opt, table.gather(lookup), inverse, bags, ragged)


def reduce_rows(opt: EmbeddingOption, unique_rows: Tensor, inverse: Tensor, bags: Bags,
                ragged: bool) -> Tensor:
    """Apply ``opt``'s combiner to rows already gathered (a sharded lookup's) and shape the
    output; integer (e.g. int8) rows are reduced in fp32, or fp16 when asked."""
    if not unique_rows.dtype.is_floating_point:
        unique_rows = unique_rows.to(torch.float16 if opt.fp16_enabled else torch.float32)
    weights = bags.weights if opt.use_weight else None
    out = bag_reduce(unique_rows, inverse, bags.offsets, weights, opt.combiner, opt.tile_len)
    return _shape_output(opt, out, bags, ragged)


def _shape_output(opt: EmbeddingOption, out: Tensor, bags: Bags, ragged: bool) -> Tensor:
    if opt.combiner == "tile" and not ragged:
        out = out.flatten(1)  # (B, tile_len * D)
    out = out.reshape(*bags.out_shape, *out.shape[1:])
    return out if opt.trainable else out.detach()


Group = tuple[HashTable, Sequence[tuple[EmbeddingOption, Bags, bool]], Sequence[int] | None,
              AdmitHook | None]


def _flat_ids(features, children) -> tuple[Tensor, Tensor | None]:
    if len(features) == 1:
        values = features[0][1].values
    else:
        values = torch.cat([bags.values for _, bags, _ in features])
    tags = None
    if children is not None and any(children):
        tags = torch.cat([torch.full_like(bags.values, child)
                          for (_, bags, _), child in zip(features, children, strict=True)])
    return values, tags


def lookup_groups(groups: Sequence[Group], sharding: _sharding.ShardingContext | None
                  ) -> list[list[Tensor]]:
    """The forward of :class:`DynamicEmbedding` and :class:`EmbeddingEngine`.

    ``groups``: per table, ``(table, features, children, admit_hook)`` with ``features`` a list
    of ``(option, bags, ragged input)`` and feature ``f``'s IDs in child ``children[f]``.
    Returns each group's outputs, per feature. In one process each table is looked up once
    (:func:`lookup_features`); sharded over ranks, all groups travel in one exchange
    (:func:`recis.distributed.sharding.sharded_lookup`) and each feature's bags are pooled
    from the rows that came back.
    """
    if sharding is None:
        return [lookup_features(*group) for group in groups]
    requests = []
    for table, features, children, admit_hook in groups:
        values, tags = _flat_ids(features, children)
        requests.append(_sharding.Request(table, values, tags, admit_hook))
    outputs = []
    for (_, features, _, _), (rows, inverse) in zip(
            groups, _sharding.sharded_lookup(sharding, requests), strict=True):
        start, group_out = 0, []
        for opt, bags, ragged in features:
            n = bags.values.numel()
            group_out.append(reduce_rows(opt, rows, inverse[start:start + n], bags, ragged))
            start += n
        outputs.append(group_out)
    return outputs


def lookup_features(
    table: HashTable, features: Sequence[tuple[EmbeddingOption, Bags, bool]],
    children: Sequence[int] | None = None, admit_hook: AdmitHook | None = None,
) -> list[Tensor]:
    """The forward of :class:`DynamicEmbedding` and :class:`EmbeddingEngine`: one lookup of
    every feature's IDs in ``table`` (feature ``f``'s IDs in child ``children[f]``), then each
    feature's combiner. ``features``: ``(option, bags, ragged input)`` per feature."""
    values, tags = _flat_ids(features, children)
    outputs = []
    with table.lookup_lock():
        lookup = table.resolve(values, tags, admit_hook)
        start = 0
        for opt, bags, ragged in features:
            n = bags.values.numel()
            inverse = lookup.inverse[start:start + n] if len(features) > 1 else None
            outputs.append(reduce_bags(opt, table, lookup, bags, ragged, inverse))
            start += n
    return outputs


class DynamicEmbedding(nn.Module):
    """One dynamic table and a combiner: bags of raw IDs -> one row per bag.

    Args:
        emb_opt (EmbeddingOption): the table and combiner configuration.
        pg (ProcessGroup, optional): the ranks to shard the table over. Default:
            ``emb_opt.pg``, else the default group when ``torch.distributed`` is initialised
            (with more than one rank), else none: one process needs no initialisation.

    Sharded (world size ``W > 1``), rank ``k`` holds the IDs of slice ``gen_slice(k, W)``
    (:mod:`recis.distributed.sharding`): a forward sends each rank's unique IDs to their
    owners in one ``all_to_all`` and gets their rows back; a backward sends the gradients. Every
    rank must run the same forwards and backwards. With a mean loss over each rank's batch,
    ``W`` ranks train the table as one process would on the concatenated batches.

    Shape:
        - ``(N,)`` IDs -> ``(N, D)`` (each ID its own bag);
        - ``(B, K)`` IDs -> ``(B, D)``;
        - :class:`RaggedTensor` of shape ``(*S, L)`` -> ``(*S, D)``;
        - with ``combiner="tile"``: ``(B, tile_len * D)`` for dense, ``(*S, tile_len, D)`` ragged.

    ``combiner="sum"`` equals ``HashTable`` lookups of each ID followed by a (weighted) sum over
    its bag; see :mod:`recis.nn.functional.embedding_ops` for mean and tile.

    Example::

        >>> emb = DynamicEmbedding(EmbeddingOption(embedding_dim=8, shared_name="user"))
        >>> emb(torch.LongTensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 8])
    """

    def __init__(self, emb_opt: EmbeddingOption, pg: Any = None,
                 sharding: _sharding.ShardingContext | None = None):
        super().__init__()
        if not isinstance(emb_opt, EmbeddingOption):
            raise TypeError(f"emb_opt must be an EmbeddingOption, got {type(emb_opt).__name__}")
        pg = pg if pg is not None else emb_opt.pg
        if sharding is None and _sharding.world_of(pg) > 1:
            sharding = _sharding.ShardingContext(pg, emb_opt.max_partition_num)
        self._pg = pg
        self._sharding = sharding
        self._emb_opt = copy.copy(emb_opt)
        self.hashtable = HashTable(
            embedding_shape=[emb_opt.embedding_dim],
            block_size=emb_opt.block_size,
            dtype=emb_opt.dtype,
            device=emb_opt.device,
            coalesced=emb_opt.coalesced,
            children=emb_opt.children,
            slice=(sharding.slice() if sharding is not None
                   else gen_slice(0, 1, emb_opt.max_partition_num)),
            initializer=emb_opt.initializer,
            name=emb_opt.shared_name,
            grad_reduce_by=emb_opt.grad_reduce_by,
            filter_hook=emb_opt.filter_hook,
        )

    @property
    def emb_opt(self) -> EmbeddingOption:
        return self._emb_opt

    def forward(
        self, ids: Tensor | RaggedTensor, input_weights: Tensor | None = None
    ) -> Tensor:
        bags = to_bags(ids, input_weights, self.hashtable.device)
        feature = (self._emb_opt, bags, isinstance(ids, RaggedTensor))
        group = (self.hashtable, [feature], None, self._emb_opt.admit_hook)
        return lookup_groups([group], self._sharding)[0][0]

    @property
    def sharding(self) -> _sharding.ShardingContext | None:
        """The ranks the table is sharded over (None in one process)."""
        return self._sharding

    def extra_repr(self) -> str:
        o = self._emb_opt
        return f"shared_name={o.shared_name!r}, dim={o.embedding_dim}, combiner={o.combiner!r}"
