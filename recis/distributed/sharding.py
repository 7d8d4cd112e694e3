"""Sharded lookups: each ID has an owner rank, its rows live there, lookups travel to it.

Ownership is RecIS's rule, the one the checkpoints use: of ``W`` ranks, rank ``k`` owns the IDs
whose slice (:func:`~recis.nn.modules.hashtable.slice_index`: the ID as an unsigned 64-bit
number mod ``slice_size``) falls in ``gen_slice(k, W, slice_size)``. One rule for CPU and GPU,
for negative IDs, for lookups and for checkpoint loads.

A step of a module (all its tables at once: one exchange per step, not per feature):

1. each rank deduplicates its IDs per table and orders the unique ones by owner, then by
   table and logical table (child), so that no per-ID metadata has to travel: the segment
   sizes say which IDs belong to which table;
2. ``all_gather`` of a fingerprint of the request (tables, children, dims, dtypes, hooks):
   ranks whose tables or features differ fail at once, all of them, with the difference;
3. ``all_to_all`` of the segment sizes, then of the IDs (and of each ID's occurrence count
   where admission or ``grad_reduce_by="id"`` needs it);
4. each owner resolves what it received in one lookup per table (admission, inserts, filter
   stamps: the policies see each ID once, with its total count) and gathers the rows;
5. ``all_to_all`` of the rows back, in the order the IDs came; each rank pools its own bags.

Backward: one asynchronous ``all_to_all`` of the unique rows' gradients to their owners (the
rest of the backward runs meanwhile; a table takes them when its gradient is first read, by
the sparse optimizer's step), which sum them per row and keep them for the optimizers
(divided by the world size, so that W ranks with a mean loss over their own batch give the
gradient of the mean over the concatenated batch; for ``grad_reduce_by="id"`` divided by the
ID's total occurrences too). Bytes on the wire per unique ID and step: 8 for the ID (12 with
a count), and the row twice (forward and backward), which is below ``2 * (8 + 4 * dim)``.

The exchanges run on a process group of their own (the same ranks), so they never interleave
with ``DistributedDataParallel``'s collectives on the default group.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from recis.nn.hashtable_hook import AdmitHook
from recis.nn.modules.hashtable import HashTable, Lookup, gen_slice, slice_index

__all__ = ["ShardingContext", "Request", "sharded_lookup", "world_of", "collective_device"]


def collective_device(group: Any = None) -> torch.device:
    """Where small tensors for collectives must live: the current CUDA device under nccl
    (which takes CUDA tensors only), the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_of(pg: Any = None) -> int:
    """Ranks of ``pg`` (default: the default group); 1 when torch.distributed is not
    initialised."""
    if pg is not None:
        return dist.get_world_size(pg)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ShardingContext:
    """The ranks a module's tables are sharded over, and its exchange process group.

    Build it on every rank of the default group, in the same order (it creates a process
    group, a collective call).

    Args:
        pg (ProcessGroup, optional): the ranks to shard over. Default: the default group.
        slice_size (int): the slice space of the ownership rule. Default: 65536.
    """

    def __init__(self, pg: Any = None, slice_size: int = 65536):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sharding needs torch.distributed.init_process_group() first")
        self.pg = pg
        self.world = dist.get_world_size(pg)
        self.rank = dist.get_rank(pg)
        self.slice_size = slice_size
        ranks = dist.get_process_group_ranks(pg) if pg is not None else list(range(self.world))
        self.group = dist.new_group(ranks)
        self.ends = torch.tensor([gen_slice(k, self.world, slice_size).slice_end
                                  for k in range(self.world)], dtype=torch.int64)
        self.bytes_sent = 0  # payload bytes this rank sent to other ranks (IDs, counts, rows)
        self.steps = 0

    def slice(self):
        """This rank's slice of the ID space."""
        return gen_slice(self.rank, self.world, self.slice_size)

    def owner(self, ids: Tensor) -> Tensor:
        """The owner rank of each ID."""
        low = slice_index(ids, self.slice_size)
        return torch.bucketize(low, self.ends.to(ids.device), right=True)

    def _all_to_all(self, out: Tensor, inp: Tensor, out_splits: list[int],
                    in_splits: list[int], async_op: bool = False):
        sent = sum(in_splits) - in_splits[self.rank]
        self.bytes_sent += sent * inp.element_size()
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group,
                                      async_op=async_op)


@dataclass
class Request:
    """One table's part of a sharded lookup: flat IDs, their children (tags, or None), the
    admission hook of the lookup."""

    table: HashTable
    ids: Tensor
    tags: Tensor | None
    admit_hook: AdmitHook | None

    def needs_counts(self) -> bool:
        hook = self.admit_hook
        return (hook is not None and hook.name != "ReadOnly") or \
            self.table.grad_reduce_by == "id"

    def describe(self) -> dict:
        t = self.table
        return {"table": t.name, "children": t.children_hashtable,
                "shape": list(t.embedding_shape), "dtype": str(t.dtype),
                "admit": str(self.admit_hook), "grad_reduce_by": t.grad_reduce_by}


def _check_same_requests(ctx: ShardingContext, requests: Sequence[Request]) -> None:
    """Every rank must send the same tables in the same order: compare fingerprints (one small
    all_gather), and on a difference raise on every rank, saying which ranks differ how."""
    desc = json.dumps([r.describe() for r in requests], sort_keys=True)
    digest = int.from_bytes(hashlib.sha256(desc.encode()).digest()[:8], "little", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=collective_device(ctx.group))
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world)]
    dist.all_gather(everyone, mine, group=ctx.group)
    if any(int(d.item()) != digest for d in everyone):
        descs: list[Any] = [None] * ctx.world
        dist.all_gather_object(descs, desc, group=ctx.group)
        lines = [f"  rank {k}: {d}" for k, d in enumerate(descs)]
        raise RuntimeError("ranks look up different tables or features in one sharded step "
                           "(every rank must build the same modules and feed the same "
                           "features):\n" + "\n".join(lines))


@dataclass
class _Plan:
    """What a step's backward needs: the send/receive layout and the owner's lookups."""

    ctx: ShardingContext
    requests: Sequence[Request]
    order: list[Tensor]  # per request: unique keys in send order
    send_splits: list[int]  # keys per destination rank
    recv_splits: list[int]  # keys per source rank
    dims: list[int]  # row width per request
    send_req: Tensor  # (K_send,) request of each sent key, in send order
    recv_req: Tensor  # (K_recv,) request of each received key
    owner_lookups: list[Lookup | None]  # per request: the owner's lookup of received keys
    owner_positions: list[Tensor]  # per request: positions of its keys in the recv buffer
    owner_inverse: list[Tensor]  # per request: received key -> unique key of the lookup


def _element_offsets(widths: Tensor) -> Tensor:
    return torch.cumsum(widths, 0) - widths


def _flatten_rows(rows_of: Sequence[Tensor], req_of_key: Tensor, positions: Sequence[Tensor],
                  dims: Sequence[int], dtype: torch.dtype, device) -> Tensor:
    """One 1-D buffer holding, for each key in buffer order, its request's row."""
    if len(set(dims)) == 1:  # one width: a (keys, width) matrix, filled row by row
        out = torch.empty(req_of_key.numel(), dims[0], dtype=dtype, device=device)
        for rows, pos in zip(rows_of, positions, strict=True):
            if len(rows_of) == 1:  # the positions are all of them, in order
                return rows.reshape(-1).to(dtype).contiguous()
            if pos.numel():
                out.index_copy_(0, pos, rows.reshape(-1, dims[0]).to(dtype))
        return out.view(-1)
    widths = torch.tensor(dims, dtype=torch.int64, device=device)[req_of_key]
    starts = _element_offsets(widths)
    out = torch.zeros(int(widths.sum()), dtype=dtype, device=device)
    for q, rows in enumerate(rows_of):
        pos = positions[q]
        if pos.numel():
            idx = starts[pos][:, None] + torch.arange(dims[q], device=device)
            out[idx.reshape(-1)] = rows.reshape(-1).to(dtype)
    return out


def _unflatten_rows(buffer: Tensor, req_of_key: Tensor, positions: Sequence[Tensor],
                    dims: Sequence[int]) -> list[Tensor]:
    if len(set(dims)) == 1:
        matrix = buffer.view(-1, dims[0])
        if len(positions) == 1:
            return [matrix]
        return [matrix.index_select(0, pos) for pos in positions]
    widths = torch.tensor(dims, dtype=torch.int64, device=buffer.device)[req_of_key]
    starts = _element_offsets(widths)
    out = []
    for q, pos in enumerate(positions):
        idx = starts[pos][:, None] + torch.arange(dims[q], device=buffer.device)
        out.append(buffer[idx.reshape(-1)].view(pos.numel(), dims[q]))
    return out


def _split_sums(sizes: Tensor, per_rank: int) -> list[int]:
    return sizes.view(-1, per_rank).sum(1).tolist()


class _ExchangeGrad(torch.autograd.Function):
    """Hands the gradients of the unique rows of every request back to their owners."""

    @staticmethod
    def forward(ctx, anchor: Tensor, plan: _Plan, *rows: Tensor):
        ctx.plan = plan
        return tuple(r.view_as(r) for r in rows)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        plan: _Plan = ctx.plan
        sc, requests = plan.ctx, plan.requests
        device = requests[0].table.device
        dtype = requests[0].table.dtype
        send_pos = [(plan.send_req == q).nonzero().squeeze(1) for q in range(len(requests))]
        per_key = []  # the unique rows are in send order already
        for q, grad in enumerate(grads):
            n = plan.order[q].numel()
            per_key.append(torch.zeros(n, plan.dims[q], dtype=dtype, device=device)
                           if grad is None else grad.reshape(n, plan.dims[q]))
        send = _flatten_rows(per_key, plan.send_req, send_pos, plan.dims, dtype, device)
        widths = torch.tensor(plan.dims, device=device)
        recv_elems = widths[plan.recv_req].split(plan.recv_splits)
        send_elems = widths[plan.send_req].split(plan.send_splits)
        recv = torch.empty(sum(int(w.sum()) for w in recv_elems), dtype=dtype, device=device)
        # asynchronous: the rest of the backward (dense layers, DDP's all-reduce) runs while
        # the gradients travel; the tables take them when their gradient is first read
        work = sc._all_to_all(recv, send, [int(w.sum()) for w in recv_elems],
                              [int(w.sum()) for w in send_elems], async_op=True)
        done = []

        def finish() -> None:
            if done:
                return
            done.append(True)
            work.wait()
            received = _unflatten_rows(recv, plan.recv_req, plan.owner_positions, plan.dims)
            for q, request in enumerate(requests):
                lookup = plan.owner_lookups[q]
                if lookup is None or not lookup.records_grad:
                    continue
                summed = torch.zeros(lookup.rows.numel(), plan.dims[q], dtype=dtype,
                                     device=device)
                summed.index_add_(0, plan.owner_inverse[q], received[q])
                request.table.accept_lookup_grad(
                    lookup, summed.view(-1, *request.table.embedding_shape), workers=sc.world)

        for request in requests:
            request.table.defer_grad(finish)
        return (None, None) + (None,) * len(grads)


def sharded_lookup(ctx: ShardingContext, requests: Sequence[Request]) -> list[tuple[Tensor,
                                                                                  Tensor]]:
    """Look up every request's IDs at their owners; returns, per request, the rows of its
    unique keys (differentiable when the tables record gradients) and the inverse index
    (``rows[inverse]`` are the rows of the request's IDs). Collective: every rank of ``ctx``
    calls it with the same tables in the same order."""
    if not requests:
        return []
    dtypes = {r.table.dtype for r in requests}
    if len(dtypes) > 1:  # rows travel in one buffer per dtype
        out: list[Any] = [None] * len(requests)
        for dtype in sorted(dtypes, key=str):
            idx = [i for i, r in enumerate(requests) if r.table.dtype == dtype]
            for i, got in zip(idx, sharded_lookup(ctx, [requests[i] for i in idx]),
                              strict=True):
                out[i] = got
        return out
    _check_same_requests(ctx, requests)
    ctx.steps += 1
    device = requests[0].table.device
    dtype = requests[0].table.dtype
    world, n_req = ctx.world, len(requests)
    with_counts = any(r.needs_counts() for r in requests)
    # -- 1. dedup and order by (owner, request, child) -------------------------------------------
    seg_base, segs = [], 0  # request q's children are segments seg_base[q] + child
    for r in requests:
        seg_base.append(segs)
        segs += len(r.table.children_hashtable)
    uniq, uniq_tags, inverse, counts, seg_keys = [], [], [], [], []
    if True:  # nothing below records autograd history (IDs, rows read from the stores)
        for q, r in enumerate(requests):
            u, t, inv = r.table.store.backend.unique_with_inverse(r.ids, r.tags)
            uniq.append(u)
            uniq_tags.append(t)
            inverse.append(inv)
            counts.append(torch.bincount(inv, minlength=u.numel()) if with_counts else None)
            child = t if t is not None else torch.zeros_like(u)
            seg_keys.append(ctx.owner(u) * segs + seg_base[q] + child)
        all_keys = torch.cat(seg_keys)
        order_all = torch.argsort(all_keys, stable=True)
        send_seg_counts = torch.bincount(all_keys, minlength=world * segs)
        req_of_key = torch.cat([torch.full((u.numel(),), q, dtype=torch.int64, device=device)
                                for q, u in enumerate(uniq)])
        send_req = req_of_key[order_all]
        local_index = torch.cat([torch.arange(u.numel(), device=device) for u in uniq])
        send_local = local_index[order_all]
        order = [send_local[send_req == q] for q in range(n_req)]
        send_ids = torch.cat(uniq)[order_all]
        # -- 2, 3. segment sizes, then IDs (and counts) --------------------------------------------
        recv_seg_counts = torch.empty_like(send_seg_counts)
        ctx._all_to_all(recv_seg_counts, send_seg_counts, [segs] * world, [segs] * world)
        send_splits = _split_sums(send_seg_counts, segs)
        recv_splits = _split_sums(recv_seg_counts, segs)
        recv_ids = torch.empty(sum(recv_splits), dtype=torch.int64, device=device)
        ctx._all_to_all(recv_ids, send_ids, recv_splits, send_splits)
        recv_counts = None
        if with_counts:
            send_counts = torch.cat([c for c in counts])[order_all].to(torch.int32)
            recv_counts = torch.empty(recv_ids.numel(), dtype=torch.int32, device=device)
            ctx._all_to_all(recv_counts, send_counts, recv_splits, send_splits)
        # -- 4. owners resolve what they received ----------------------------------------------
        seg_of_recv = torch.repeat_interleave(
            torch.arange(segs, device=device).repeat(world), recv_seg_counts)
        seg_req = torch.cat([torch.full((len(r.table.children_hashtable),), q, dtype=torch.int64)
                             for q, r in enumerate(requests)]).to(device)
        seg_child = torch.cat([torch.arange(len(r.table.children_hashtable))
                               for r in requests]).to(device)
        recv_req = seg_req[seg_of_recv]
        dims = [math.prod(r.table.embedding_shape) for r in requests]
        owner_positions, owner_lookups, owner_inverse, owner_rows = [], [], [], []
        records = []
        for q, r in enumerate(requests):
            pos = (recv_req == q).nonzero().squeeze(1)
            owner_positions.append(pos)
            ids = recv_ids[pos]
            tags = seg_child[seg_of_recv[pos]] if len(r.table.children_hashtable) > 1 else None
            occ = recv_counts[pos] if recv_counts is not None else None
            table = r.table
            with table.lookup_lock():
                lookup = table.resolve(ids, tags, r.admit_hook, occurrences=occ)
                # one gather straight into the order the keys came in
                rows = table.store.read("embedding", lookup.rows[lookup.inverse])
            owner_lookups.append(lookup)
            owner_inverse.append(lookup.inverse)
            owner_rows.append(rows.reshape(pos.numel(), dims[q]))
            records.append(lookup.records_grad)
        # -- 5. rows back, in the order the IDs came ---------------------------------------------
        send_back = _flatten_rows(owner_rows, recv_req, owner_positions, dims, dtype, device)
        widths = torch.tensor(dims, device=device)
        back_out = [int(w.sum()) for w in widths[recv_req].split(recv_splits)]
        back_in = [int(w.sum()) for w in widths[send_req].split(send_splits)]
        got = torch.empty(sum(back_in), dtype=dtype, device=device)
        ctx._all_to_all(got, send_back, back_in, back_out)
        send_pos = [(send_req == q).nonzero().squeeze(1) for q in range(n_req)]
        # the unique rows stay in send order; the inverse index is renumbered to match, which
        # costs an int per occurrence instead of a row copy (and spares the backward a gather)
        unique_rows = []
        for q, rows in enumerate(_unflatten_rows(got, send_req, send_pos, dims)):
            position = torch.empty_like(order[q])
            position[order[q]] = torch.arange(order[q].numel(), device=device)
            inverse[q] = position[inverse[q]]
            unique_rows.append(rows.view(-1, *requests[q].table.embedding_shape))
    if any(records) and torch.is_grad_enabled():
        plan = _Plan(ctx, requests, order, send_splits, recv_splits, dims, send_req, recv_req,
                     owner_lookups, owner_positions, owner_inverse)
        anchor = requests[0].table.grad_anchor
        unique_rows = list(_ExchangeGrad.apply(anchor, plan, *unique_rows))
    return list(zip(unique_rows, inverse, strict=True))
