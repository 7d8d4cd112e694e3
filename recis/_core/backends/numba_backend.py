"""The numba backend: compiled loops (:mod:`.numba_kernels`) for CPU tables.

It overrides the kernels of :class:`~.torch_backend.TorchBackend` for CPU tensors and falls
back to them for dtypes the compiled kernels do not cover (float16, bfloat16). Kernels that
touch random rows split their range over ``torch.get_num_threads()`` threads when the work is
large enough (:func:`run_ranges`): they release the GIL and each range writes disjoint
outputs, so results do not depend on the split, and the threads overlap cache misses. The
threads are torch's own OpenMP threads (:mod:`.omp`), so the kernels and torch's ops share one
pool instead of competing for the cores (no ``OMP_WAIT_POLICY`` tuning needed); where that is
not possible, or ``RECIS_PARALLEL=pool`` asks for it, a thread pool of this module.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from . import numba_kernels as nk
from . import omp
from .base import BlockList
from .torch_backend import TorchBackend

NUMBA_DTYPES = {torch.float32, torch.float64, torch.int64, torch.int32, torch.int8}
_EMPTY_TAGS = np.zeros(0, np.int64)
PARALLEL_MIN = 8192  # below this many items a second thread costs more than it saves
_BUILD_PARALLEL_MIN = 1 << 18  # map builds: each part scans every key
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child inherits the executor but not its threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run_all(jobs: list[Callable[[], object]]) -> None:
    """Run jobs concurrently: the first in this thread, the others in the kernel pool."""
    global _pool
    if len(jobs) > 1 and (_pool is None or _pool._max_workers < len(jobs) - 1):
        _pool = ThreadPoolExecutor(len(jobs) - 1, thread_name_prefix="recis-kernel")
    futures = [_pool.submit(job) for job in jobs[1:]]
    jobs[0]()
    for f in futures:
        f.result()


def run_ranges(fn: Callable, n: int, *args, work: int | None = None) -> None:
    """Run ``fn(*args, lo, hi)`` over ``[0, n)``, split across threads when ``work`` (default
    ``n``) items make it worth it."""
    parts = _threads() if (n if work is None else work) >= PARALLEL_MIN else 1
    if parts > 1 and omp.run(fn, n, args, parts):
        return
    bounds = [n * k // parts for k in range(parts + 1)]
    _run_all([functools.partial(fn, *args, bounds[k], bounds[k + 1]) for k in range(parts)])


def _np_tags(tags: Tensor | None) -> np.ndarray:
    return _EMPTY_TAGS if tags is None else tags.numpy()


def _np_weights(weights: Tensor | None, like: np.ndarray) -> np.ndarray:
    return np.zeros(0, like.dtype) if weights is None else weights.detach().to(
        torch.from_numpy(like).dtype).contiguous().numpy()


class NumbaBackend(TorchBackend):
    """Compiled CPU kernels (numba, JIT on first use, cached to disk)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    @staticmethod
    def _compiled(blocks: BlockList) -> bool:
        return blocks.dtype in NUMBA_DTYPES and len(blocks) > 0

    # -- ID map --------------------------------------------------------------------------------
    def unique_with_inverse(self, ids, tags):
        # one thread: splitting by hash partition was measured slower (branchy, no prefetch)
        uniq, uniq_tags, inverse = nk.unique_with_inverse(ids.numpy(), _np_tags(tags))
        out_tags = None if tags is None else torch.from_numpy(uniq_tags)
        return torch.from_numpy(uniq), out_tags, torch.from_numpy(inverse)

    def map_lookup(self, table, ids, tags):
        rows = np.empty(ids.numel(), np.int64)
        run_ranges(nk.map_lookup_range, ids.numel(), table.numpy(), ids.numpy(), _np_tags(tags),
                   rows)
        return torch.from_numpy(rows)

    def map_lookup_or_insert(self, table, ids, tags, free, n_free, next_row):
        # Lookups run in parallel; the absent keys are then inserted in input order by one
        # thread, which keeps row assignment deterministic.
        rows = self.map_lookup(table, ids, tags)
        inserted = rows < 0
        _, n_free, next_row, reused = nk.map_insert_missing(
            table.numpy(), ids.numpy(), _np_tags(tags), rows.numpy(), free.numpy(), n_free,
            next_row)
        return rows, inserted, int(n_free), int(next_row), int(reused)

    def map_resolve(self, table, ids, tags):
        # A hash-partitioned parallel dedup fused with the lookup was measured slower on 2
        # cores (3.9 vs 2.5 ms for 82k keys): its extra passes cost more than it saves.
        uniq, uniq_tags, inverse = self.unique_with_inverse(ids, tags)
        return uniq, uniq_tags, inverse, self.map_lookup(table, uniq, uniq_tags)

    def map_insert_missing(self, table, ids, tags, rows, free, n_free, next_row):
        inserted = rows < 0
        _, n_free, next_row, reused = nk.map_insert_missing(
            table.numpy(), ids.numpy(), _np_tags(tags), rows.numpy(), free.numpy(), n_free,
            next_row)
        return inserted, int(n_free), int(next_row), int(reused)

    def map_delete(self, table, ids, tags):
        return torch.from_numpy(nk.map_delete(table.numpy(), ids.numpy(), _np_tags(tags)))

    def map_build(self, keys, packed, capacity):
        # numpy's allocator asks the kernel for huge pages on large arrays (torch's does not):
        # a cold table of 10M keys fills in a fifth of the time and its probes miss the TLB less
        table = np.empty((capacity, 2), np.int64)
        keys_np, packed_np = keys.contiguous().numpy(), packed.contiguous().numpy()
        # parts over disjoint slot ranges, in threads; entries whose probe leaves their part
        # (a few near each boundary) are inserted afterwards in order: the layout depends on
        # the number of parts, never on timing
        parts = _threads() if keys_np.shape[0] >= _BUILD_PARALLEL_MIN else 1
        bounds = [capacity * k // parts for k in range(parts + 1)]
        deferred = [np.empty(keys_np.shape[0], np.int64) for _ in range(parts)]
        counts = [0] * parts

        def part(k: int) -> None:
            counts[k] = nk.map_build_range(keys_np, packed_np, table, bounds[k], bounds[k + 1],
                                           deferred[k])

        _run_all([functools.partial(part, k) for k in range(parts)])
        late = np.concatenate([d[:c] for d, c in zip(deferred, counts, strict=True)])
        nk.map_insert_deferred(keys_np, packed_np, table, late)
        return torch.from_numpy(table)

    def map_items(self, table, num_rows):
        table_np = table.numpy()
        id_of_row, tag_of_row = np.empty(num_rows, np.int64), np.empty(num_rows, np.int64)
        present = np.zeros(num_rows, np.uint8)
        run_ranges(nk.map_items_place, table_np.shape[0], table_np, id_of_row, tag_of_row,
                   present)
        return tuple(torch.from_numpy(a)
                     for a in nk.map_items_collect(id_of_row, tag_of_row, present))

    def map_ids_by_row(self, table, num_rows):
        ids = np.empty(num_rows, np.int64)
        run_ranges(nk.map_ids_place, table.shape[0], table.numpy(), ids)
        return torch.from_numpy(ids)

    def split_at_kth(self, values, index, k):
        if values.dtype not in NUMBA_DTYPES:
            return super().split_at_kth(values, index, k)
        below, equal = nk.split_at_kth(values.numpy(), _EMPTY_TAGS if index is None
                                       else index.numpy(), index is None, k - 1)
        return torch.from_numpy(below), torch.from_numpy(equal)

    # -- blocks --------------------------------------------------------------------------------
    def _addresses(self, blocks: BlockList, rows: Tensor) -> np.ndarray:
        return nk.row_addresses(blocks.ptrs, blocks.block_size, rows.numpy(),
                                blocks.width * blocks.itemsize)

    def gather(self, blocks, rows, out):
        if not self._compiled(blocks):
            return super().gather(blocks, rows, out)
        run_ranges(nk.gather_range, rows.numel(), self._addresses(blocks, rows), out.numpy())
        return out

    def scatter(self, blocks, rows, values):
        if not self._compiled(blocks):
            return super().scatter(blocks, rows, values)
        rows_np, values_np = rows.numpy(), values.contiguous().numpy()
        n = rows_np.shape[0]
        # split over threads only when no row can be written twice (later writes win)
        if n >= PARALLEL_MIN and values_np.shape[0] == n and nk.strictly_increasing(rows_np):
            run_ranges(nk.scatter_range, n, blocks.ptrs, blocks.block_size, rows_np, values_np)
        else:
            nk.scatter_range(blocks.ptrs, blocks.block_size, rows_np, values_np, 0, n)

    def bag_reduce(self, blocks, rows, inverse, offsets, weights, mean, out):
        if not self._compiled(blocks) or out.dtype != blocks.dtype:
            return super().bag_reduce(blocks, rows, inverse, offsets, weights, mean, out)
        out_np = out.numpy()
        run_ranges(nk.bag_reduce_range, offsets.numel() - 1, self._addresses(blocks, rows),
                   inverse.numpy(), offsets.numpy(), _np_weights(weights, out_np), mean, out_np,
                   work=inverse.numel())
        return out

    def bag_reduce_backward(self, inverse, offsets, weights, mean, grad_out, num_unique):
        if grad_out.dtype not in (torch.float32, torch.float64):
            return super().bag_reduce_backward(inverse, offsets, weights, mean, grad_out,
                                               num_unique)
        grad_out = grad_out.contiguous()
        grad = torch.empty(num_unique, grad_out.shape[1], dtype=grad_out.dtype)
        g_np = grad_out.numpy()
        plan = nk.bag_backward_plan(inverse.numpy(), offsets.numpy(), _np_weights(weights, g_np),
                                    mean, num_unique)
        run_ranges(nk.bag_backward_range, num_unique, *plan, g_np, grad.numpy(),
                   work=inverse.numel())
        return grad

    # -- policy metadata ---------------------------------------------------------------------
    def decayed_count_touch(self, count, last, rows, clock, decay):
        if count.dtype != torch.float64 or last.dtype != torch.int64 or not len(count):
            return super().decayed_count_touch(count, last, rows, clock, decay)
        run_ranges(nk.decayed_count_touch_range, rows.numel(), count.ptrs, last.ptrs,
                   count.block_size, rows.numpy(), int(clock), float(decay))

    # -- segment ops ------------------------------------------------------------------------------
    def segment_sum(self, data, weight, indices, segment_ids, num_segments):
        # measured 6-12x faster than index_add_ of the gathered rows (200k rows, D 16-128):
        # no (M, D) intermediate, and torch's CPU index_add_ is slow
        if data.dtype not in (torch.float32, torch.float64):
            return super().segment_sum(data, weight, indices, segment_ids, num_segments)
        data = data.detach().contiguous()
        out = torch.zeros(num_segments, data.shape[1], dtype=data.dtype)
        out_np = out.numpy()
        nk.segment_sum(data.numpy(), _np_weights(weight, out_np), indices.contiguous().numpy(),
                       segment_ids.contiguous().numpy(), out_np)
        return out

    # -- optimizer updates -------------------------------------------------------------------------
    def _update(self, kernel: Callable, blocks: list[BlockList], rows: Tensor, grad: Tensor,
                *scalars) -> None:
        flat = grad.detach().to(blocks[0].dtype).reshape(rows.numel(), -1).contiguous()
        addresses = [self._addresses(b, rows) for b in blocks]
        run_ranges(kernel, rows.numel(), *addresses, flat.numpy(), *scalars)

    def adam_update(self, emb, exp_avg, exp_avg_sq, rows, grad, *, decay, beta1, beta2, alpha,
                    eps, l2):
        if not all(self._compiled(b) for b in (emb, exp_avg, exp_avg_sq)) or \
                emb.dtype not in (torch.float32, torch.float64):
            return super().adam_update(emb, exp_avg, exp_avg_sq, rows, grad, decay=decay,
                                       beta1=beta1, beta2=beta2, alpha=alpha, eps=eps, l2=l2)
        # 1 - beta is computed here in float64: in float32, 1 - float32(0.999) is off by 1e-5
        self._update(nk.adam_update_range, [emb, exp_avg, exp_avg_sq], rows, grad, decay,
                     beta1, 1 - beta1, beta2, 1 - beta2, alpha, eps, l2)

    def adagrad_update(self, emb, state_sum, rows, grad, *, clr, eps, l2):
        if not all(self._compiled(b) for b in (emb, state_sum)) or \
                emb.dtype not in (torch.float32, torch.float64):
            return super().adagrad_update(emb, state_sum, rows, grad, clr=clr, eps=eps, l2=l2)
        self._update(nk.adagrad_update_range, [emb, state_sum], rows, grad, clr, eps, l2)

    def sgd_update(self, emb, momentum_buffer, rows, grad, *, lr, momentum, l2, nesterov):
        buffers = [emb] if not momentum else [emb, momentum_buffer]
        if not all(self._compiled(b) for b in buffers) or \
                emb.dtype not in (torch.float32, torch.float64):
            return super().sgd_update(emb, momentum_buffer, rows, grad, lr=lr,
                                      momentum=momentum, l2=l2, nesterov=nesterov)
        self._update(nk.sgd_update_range, [emb, buffers[-1]], rows, grad, lr, momentum, l2,
                     nesterov)
