"""Multi-process scenarios for tests/test_distributed.py: each function runs in one spawned
process of a gloo group. ``run_ranks`` starts them from pytest, under a timeout."""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

DIM = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn_name: str, args: tuple, timeout_s: float,
            errors: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if world > 1:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        globals()[fn_name](rank, world, *args)
    except BaseException:
        with open(os.path.join(errors, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn_name: str, world: int, args: tuple, tmp: str, timeout: float = 120.0,
              collective_timeout: float = 30.0, backend: str = "gloo") -> dict[int, str]:
    """Run ``fn_name(rank, world, *args)`` in ``world`` spawned processes; returns the error
    text of each rank that failed (empty when all succeeded). Never hangs: processes still
    running after ``timeout`` seconds are killed and reported."""
    errors = os.path.join(tmp, f"errors-{fn_name}-{world}")
    os.makedirs(errors, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(world, free_port(), fn_name, args,
                                            collective_timeout, errors, backend),
                             nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout
    failed: dict[int, str] = {}
    while True:
        try:
            if ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                break
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass
        if all(not p.is_alive() for p in ctx.processes):
            break
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            failed[-1] = f"timed out after {timeout} s"
            break
    for rank in range(world):
        path = os.path.join(errors, f"rank{rank}.err")
        if os.path.exists(path):
            with open(path) as f:
                failed[rank] = f.read()
        elif ctx.processes[rank].exitcode not in (0, None):
            failed[rank] = f"exit code {ctx.processes[rank].exitcode}"
    return failed


# -- the model and data of the equality tests -------------------------------------------------
def make_model(seed: int = 0, dim: int = DIM):
    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.hashtable_hook import AdmitHook, FilterHook
    from recis.nn.initializers import NormalInitializer
    from recis.nn.modules.norm import DistributedBatchNorm1d

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            init = NormalInitializer(std=0.1, generator=torch.Generator().manual_seed(seed))
            filt = FilterHook("GlobalStepFilter", {"filter_step": 3})
            self.engine = EmbeddingEngine({
                "user": EmbeddingOption(embedding_dim=dim, shared_name="user", initializer=init,
                                        filter_hook=filt),
                "hist": EmbeddingOption(embedding_dim=dim, shared_name="item", initializer=init,
                                        combiner="mean", filter_hook=filt),
                "cand": EmbeddingOption(embedding_dim=dim, shared_name="item", initializer=init,
                                        filter_hook=filt),
                "cat": EmbeddingOption(embedding_dim=8, shared_name="cat", initializer=init,
                                       grad_reduce_by="id",
                                       admit_hook=AdmitHook("MinCount", {"min_count": 2})),
            })
            self.norm = DistributedBatchNorm1d(3)
            self.mlp = nn.Sequential(nn.Linear(3 * dim + 8 + 3, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, batch):
            out = self.engine({k: batch[k] for k in ("user", "hist", "cand", "cat")})
            x = torch.cat([out["user"], out["hist"], out["cand"], out["cat"],
                           self.norm(batch["dense"])], dim=1)
            logit = self.mlp(x).squeeze(1)
            return nn.functional.binary_cross_entropy_with_logits(logit, batch["label"])

    torch.manual_seed(seed)
    return Model()


def global_batch(step: int, batch: int = 12):
    from recis.ragged.tensor import RaggedTensor

    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(0, 4, (batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(-40, 40, (int(offsets[-1]),), generator=g) * 977
    weights = torch.rand(values.numel(), generator=g)
    return {
        "user": torch.randint(0, 30, (batch, 1), generator=g) - 15,
        "hist": RaggedTensor(values, offsets, weights),
        "cand": torch.randint(-40, 40, (batch, 1), generator=g) * 977,
        "cat": torch.randint(0, 6, (batch, 3), generator=g) * (2**40 + 3),
        "dense": torch.randn(batch, 3, generator=g),
        "label": (torch.rand(batch, generator=g) < 0.4).float(),
    }


def table_state(model) -> dict[str, torch.Tensor]:
    """Every table's rows by ID: ``{child}.ids`` sorted, ``{child}.{slot}`` in that order."""
    from recis.nn import HashTable

    out = {}
    for table in model.modules():
        if not isinstance(table, HashTable):
            continue
        for child in table.children_hashtable:
            ids, rows = table.ids_map(child)
            order = torch.argsort(ids)
            out[f"{child}.ids"] = ids[order].cpu()
            for slot in table.slot_names:
                out[f"{child}.{slot}"] = table.slot_values(slot, rows[order]).float().cpu()
    return out


def merged_table_states(paths: list[str]) -> dict[str, torch.Tensor]:
    """The union of the shards' table states, by ID."""
    parts = [load_file(p) for p in paths]
    out = {}
    for name in parts[0]:
        if not name.endswith(".ids"):
            continue
        child = name[:-4]
        ids = torch.cat([p[name] for p in parts])
        order = torch.argsort(ids)
        out[name] = ids[order]
        for key in parts[0]:
            if key.startswith(child + ".") and key != name:
                out[key] = torch.cat([p[key] for p in parts])[order]
    return out


def _to(batch, device):
    from recis.framework.trainer import move_batch

    return batch if device == "cpu" else move_batch(batch, torch.device(device))


def train(rank: int, world: int, out_dir: str, steps: int, seed: int = 0,
          manager_dir: str | None = None, save_at: int | None = None,
          resume: bool = False, device: str = "cpu") -> None:
    """Train the model ``steps`` steps on this rank's rows of the global batches; write this
    rank's tables (``tables-<rank>.safetensors``) and the dense weights (rank 0)."""
    from recis.distributed.data import rank_rows
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.hooks.filter_hook import HashTableFilterHook
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW

    model = make_model(seed)
    if device != "cpu":
        device = f"cuda:{torch.cuda.current_device()}"
        model.to(device)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.05, weight_decay=0.01)
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = HashTableFilterHook(2, tables=[model])
    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model)
    manager = CheckpointManager(model, sparse, dense, output_dir=manager_dir) \
        if manager_dir else None
    start = 0
    if resume:
        start = manager.restore()
        hook.load_state_dict(manager.restored_extra["hook"])
    for step in range(start, steps):
        batch = _to(rank_rows(global_batch(step), rank, world), device)
        dense.zero_grad()
        sparse.zero_grad()
        ddp(batch).backward()
        dense.step()
        sparse.step()
        hook.after_step(global_step=step)
        if manager is not None and save_at is not None and step + 1 == save_at:
            manager.save(step + 1, extra={"hook": hook.state_dict()})
    save_file(table_state(model), os.path.join(out_dir, f"tables-{rank}.safetensors"))
    if rank == 0:
        save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                   if isinstance(v, torch.Tensor)},
                  os.path.join(out_dir, "dense.safetensors"))


def train_with_background_save(rank: int, world: int, out_dir: str, manager_dir: str,
                               save_at: int, steps: int) -> None:
    """Train ``steps`` steps with a non-blocking save at ``save_at`` whose files are written
    only after training finished (the background writers are held until then); write this
    rank's tables as they were at ``save_at`` (``at_save-<rank>.safetensors``)."""
    import threading

    from recis.distributed.data import rank_rows
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW
    from recis.serialize import checkpoint

    gate = threading.Event()
    real = checkpoint.write_safetensors

    def held(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            gate.wait(60)
        return real(*args, **kwargs)

    checkpoint.write_safetensors = held
    model = make_model(0)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.05, weight_decay=0.01)
    dense = torch.optim.Adam(model.parameters(), lr=0.01)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    manager = CheckpointManager(model, sparse, dense, output_dir=manager_dir, async_save=True)
    for step in range(steps):
        batch = rank_rows(global_batch(step), rank, world)
        dense.zero_grad()
        sparse.zero_grad()
        ddp(batch).backward()
        dense.step()
        sparse.step()
        if step + 1 == save_at:
            manager.save(step + 1)
            save_file(table_state(model), os.path.join(out_dir, f"at_save-{rank}.safetensors"))
    assert manager.saving, "the background save ended before training did"
    gate.set()
    manager.wait()


def load_checkpoint(rank: int, world: int, out_dir: str, manager_dir: str) -> None:
    """Restore the latest checkpoint of ``manager_dir`` into a fresh model on ``world``
    processes; write this rank's tables."""
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW

    model = make_model(0)
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.05, weight_decay=0.01)
    CheckpointManager(model, sparse, output_dir=manager_dir).restore(strict=False)
    save_file(table_state(model), os.path.join(out_dir, f"tables-{rank}.safetensors"))


def failing_rank(rank: int, world: int) -> None:
    """Rank 1 raises at its third step; the others must fail with an error, not hang."""
    model = make_model(0)
    from recis.distributed.data import rank_rows

    for step in range(6):
        if rank == 1 and step == 2:
            raise RuntimeError("rank 1 fails on purpose")
        model(rank_rows(global_batch(step), rank, world)).backward()


def mismatched_tables(rank: int, world: int) -> None:
    """Rank 1 builds its table with another width: the first lookup must say so."""
    from recis.nn import DynamicEmbedding, EmbeddingOption

    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=4 if rank == 0 else 8,
                                           shared_name="t"))
    emb(torch.tensor([[1, 2, 3]]))


def explicit_pg(rank: int, world: int, out_dir: str) -> None:
    """A pg passed in the option is the one the table shards over (RecIS ignored it)."""
    from recis.nn import DynamicEmbedding, EmbeddingOption

    pg = dist.new_group(list(range(world)))
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="p", pg=pg))
    assert emb.sharding.pg is pg and emb.sharding.world == world
    out = emb(torch.arange(8).view(4, 2) + 100 * rank)
    assert out.shape == (4, DIM)
    owned = emb.hashtable.ids()
    assert bool((emb.sharding.owner(owned) == rank).all())


def dying_saver(rank: int, world: int, manager_dir: str) -> None:
    """Save once, then rank 1 dies in the middle of the second save: the first checkpoint must
    stay the latest, complete and loadable."""
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.serialize import checkpoint

    model = make_model(0)
    model(global_batch(0))
    manager = CheckpointManager(model, output_dir=manager_dir)
    manager.save(1)
    model(global_batch(1))
    if rank == 1:
        def die(self, *a, **k):
            os._exit(3)  # killed before its shard is written

        checkpoint.SaveSnapshot.write_sparse = die
    manager.save(2)


def lru_batch(step: int, rank: int) -> list[int]:
    """The IDs rank ``rank`` looks up at ``step`` in :func:`sharded_lru`."""
    import random

    rng = random.Random(step * 1000 + rank)
    return [rng.randrange(120) * 7919 - 500_000 for _ in range(rng.randrange(5, 30))]


def sharded_lru(rank: int, world: int, out_dir: str, steps: int, max_rows: int,
                every: int) -> None:
    """Each rank enforces LRU's cap on its own shard; writes the IDs it holds at the end."""
    import json

    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.nn.hashtable_hook import FilterHook

    emb = DynamicEmbedding(EmbeddingOption(
        embedding_dim=DIM, shared_name="lru",
        filter_hook=FilterHook("LRU", {"max_rows": max_rows})))
    for step in range(steps):
        emb(torch.tensor(lru_batch(step, rank)).view(-1, 1))
        if step % every == every - 1:
            emb.hashtable._filter_hook_impl.do_filter()
            assert len(emb.hashtable) <= max_rows
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(emb.hashtable.ids().tolist(), f)


def sharded_engine_budget(rank: int, world: int, out_dir: str, steps: int, budget: int,
                          every: int) -> None:
    """An engine's shared budget under sharding: each rank keeps its own shards of the two
    tables within the budget; writes the IDs of each table and the bytes per row."""
    import json

    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.modules.hashtable_hook_impl import MemoryBudgetFilterHookImpl

    engine = EmbeddingEngine({"a": EmbeddingOption(embedding_dim=2, shared_name="a"),
                              "b": EmbeddingOption(embedding_dim=8, shared_name="b")},
                             memory_budget=budget)
    tables = [engine.hashtable(f) for f in ("a", "b")]
    impls = [next(p for p in t.modules() if isinstance(p, MemoryBudgetFilterHookImpl))
             for t in tables]
    for step in range(steps):
        batch = lru_batch(step, rank)
        engine({"a": torch.tensor(batch).view(-1, 1),
                "b": torch.tensor(batch[::2]).view(-1, 1)})
        for impl in impls:
            impl.update_step()
        if step % every == every - 1:
            impls[0].do_filter()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"ids": [t.ids().tolist() for t in tables],
                   "bytes_per_row": [i.bytes_per_row() for i in impls]}, f)

