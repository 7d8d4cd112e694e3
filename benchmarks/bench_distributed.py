"""Sharded training on one machine (gloo): step time and bytes on the wire for 1, 2 and 4
processes, TorchRec's row-wise sharded EmbeddingBagCollection on the same workload, and a
table-size sweep against TorchRec's static FusedEmbeddingBagCollection + Adagrad.

Workload: global batches of 4096 bags x 20 Zipf(0.9) IDs (dim 64, ``_common.py``), each of W
processes taking its 4096 / W rows of every batch (``RankSlice``'s rule), one
``DynamicEmbedding`` (sum) + ``SparseAdagrad`` (lr 0.01), loss ``(out * upstream).sum()``.
Each process runs with one torch thread (W processes share the 2 cores). Tables are
pre-filled with the whole support (each rank with the IDs it owns), so steps are steady state.

* **scaling**: median over steps of the slowest rank's step time; bytes each rank sends per
  step (IDs, counts, rows, gradients: ``ShardingContext.bytes_sent``) against the ideal of
  deduplicated traffic ``2 * (W - 1) / W * U * (8 + 4 * dim)`` with ``U`` the rank's unique IDs;
* **TorchRec**: ``DistributedModelParallel`` over an ``EmbeddingBagCollection`` with a row-wise
  plan on gloo, same batches (the Zipf ranks as indices), if it runs here (else the error);
* **sweep**: live IDs 1e5, 1e6, 1e7, the batch's IDs scattered over the table's rows (a random
  permutation maps Zipf ranks to rows), one process with 2 threads: ours + SparseAdagrad vs
  TorchRec FusedEmbeddingBagCollection + EXACT_ADAGRAD on the same rows (paired ratio), and the
  same step on 2 sharded processes (1 thread each, per-rank work) against the same baseline.

    PYTHONPATH=. python benchmarks/bench_distributed.py [--quick]
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    BATCH,
    DIM,
    IDS_PER_ROW,
    SEED,
    Workload,
    header,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    target_line,
)

LR = 0.01
FILL = 200_000
TARGET_SWEEP = 0.8


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, args: tuple, timeout: float = 1800.0) -> list[dict]:
    out = tempfile.mkdtemp(prefix="bench_dist_")
    ctx = mp.start_processes(fn, args=(world, _port(), out, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} on {world} processes timed out")
    results = []
    for r in range(world):
        with open(os.path.join(out, f"{r}.json")) as f:
            results.append(json.load(f))
    return results


def _init(rank: int, world: int, port: int, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))


def _batches(n: int, support: int, rows_of_rank=None):
    """``n`` global batches of ranks (Zipf over ``support``), as (B, K) tensors."""
    w = Workload(seed=SEED, support=support)
    return w, [torch.from_numpy(w.ranks()).view(BATCH, IDS_PER_ROW) for _ in range(n)]


def scaling_worker(rank: int, world: int, port: int, out: str, steps: int, warmup: int):
    _init(rank, world, port)
    from recis.distributed.data import rank_rows
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.optim import SparseAdagrad

    w, batches = _batches(8, 1_000_000)
    ids_of = torch.from_numpy(w.rank_ids.copy())
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="t"))
    ctx = emb.sharding
    gen = torch.Generator().manual_seed(rank)
    mine = ids_of if ctx is None else ids_of[ctx.owner(ids_of) == rank]
    for i in range(0, mine.numel(), FILL):
        part = mine[i:i + FILL]
        emb.hashtable.insert(part, torch.randn(part.numel(), DIM, generator=gen) * 0.01)
    opt = SparseAdagrad(emb.hashtable, lr=LR)
    upstream = torch.randn(BATCH // world, DIM, generator=torch.Generator().manual_seed(9))
    times, uniques = [], []
    sent0 = 0
    for step in range(warmup + steps):
        ids = ids_of[rank_rows(batches[step % len(batches)], rank, world)]
        if step == warmup:
            sent0 = ctx.bytes_sent if ctx else 0
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        opt.zero_grad()
        (emb(ids) * upstream).sum().backward()
        opt.step()
        t = time.perf_counter() - t
        if step >= warmup:
            slowest = torch.tensor([t])
            if world > 1:
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times.append(float(slowest))
            uniques.append(int(torch.unique(ids).numel()))
    sent = ((ctx.bytes_sent if ctx else 0) - sent0) / steps
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"step_ms": median(times) * 1e3, "bytes": sent, "unique": np.mean(uniques),
                   "live": len(emb.hashtable)}, f)
    if world > 1:
        dist.destroy_process_group()


def torchrec_worker(rank: int, world: int, port: int, out: str, steps: int, warmup: int):
    """TorchRec DistributedModelParallel, row-wise sharded EBC on gloo."""
    result: dict = {}
    try:
        _init(rank, world, port)
        import torchrec
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.types import ShardingType
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        ebc = torchrec.EmbeddingBagCollection(tables=[torchrec.EmbeddingBagConfig(
            name="t0", embedding_dim=DIM, num_embeddings=1_000_000, feature_names=["f0"])],
            device=torch.device("meta"))
        apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": LR})
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device="cpu"),
            constraints={"t0": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])})
        plan = planner.collective_plan(ebc, None, dist.group.WORLD)
        model = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan)
        _, batches = _batches(8, 1_000_000)
        lengths = torch.full((BATCH // world,), IDS_PER_ROW, dtype=torch.int64)
        upstream = torch.randn(BATCH // world, DIM, generator=torch.Generator().manual_seed(9))
        times = []
        from recis.distributed.data import rank_rows

        for step in range(warmup + steps):
            ranks = rank_rows(batches[step % len(batches)], rank, world).reshape(-1)
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f0"], values=ranks,
                                                      lengths=lengths)
            dist.barrier()
            t = time.perf_counter()
            (model(kjt).values() * upstream).sum().backward()
            t = time.perf_counter() - t
            if step >= warmup:
                slowest = torch.tensor([t])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                times.append(float(slowest))
        result = {"step_ms": median(times) * 1e3}
    except Exception as e:  # report, do not fail the benchmark
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def _sweep_table(live: int):
    """(row of each Zipf rank: a random permutation of the live rows, the live IDs)."""
    rng = np.random.default_rng(SEED + live)
    ids = np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, live + 1000))
    ids = torch.from_numpy(rng.permutation(ids)[:live])
    rows = torch.from_numpy(rng.permutation(live))
    return rows, ids


def sweep_sharded_worker(rank: int, world: int, port: int, out: str, live: int, steps: int,
                         warmup: int):
    _init(rank, world, port)
    from recis.distributed.data import rank_rows
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.optim import SparseAdagrad

    row_of_rank, ids = _sweep_table(live)
    _, batches = _batches(4, min(live, 1_000_000))
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="t"))
    mine = ids[emb.sharding.owner(ids) == rank]
    for i in range(0, mine.numel(), FILL):
        part = mine[i:i + FILL]
        emb.hashtable.insert(part, torch.full((part.numel(), DIM), 0.01))
    opt = SparseAdagrad(emb.hashtable, lr=LR)
    upstream = torch.randn(BATCH // world, DIM, generator=torch.Generator().manual_seed(9))
    times = []
    for step in range(warmup + steps):
        batch = ids[row_of_rank[rank_rows(batches[step % len(batches)], rank, world)]]
        dist.barrier()
        t = time.perf_counter()
        opt.zero_grad()
        (emb(batch) * upstream).sum().backward()
        opt.step()
        t = time.perf_counter() - t
        if step >= warmup:
            slowest = torch.tensor([t])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times.append(float(slowest))
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"step_ms": median(times) * 1e3}, f)
    dist.destroy_process_group()


def sweep_one_process(live: int, repeats: int, warmup: int, trec) -> dict:
    """Ours and TorchRec's fused EBC + Adagrad, interleaved in this process (2 threads)."""
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.optim import SparseAdagrad

    torch.set_num_threads(2)
    row_of_rank, ids = _sweep_table(live)
    _, batches = _batches(4, min(live, 1_000_000))
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="t"))
    for i in range(0, live, FILL):
        part = ids[i:i + FILL]
        emb.hashtable.insert(part, torch.full((part.numel(), DIM), 0.01))
    opt = SparseAdagrad(emb.hashtable, lr=LR)
    upstream = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(9))
    state = {"i": 0}

    def pick(i):
        state["i"] = i

    def ours() -> float:
        rows = row_of_rank[batches[state["i"] % len(batches)]]
        b = ids[rows]
        t = time.perf_counter()
        opt.zero_grad()
        (emb(b) * upstream).sum().backward()
        opt.step()
        return time.perf_counter() - t

    cands = {"ours": ours}
    if trec is not None:
        config, collection, kjt_cls = trec
        cfg = config(name="t0", embedding_dim=DIM, num_embeddings=live, feature_names=["f0"])
        ebc = collection(tables=[cfg], optimizer_type=torch.optim.Adagrad,
                         optimizer_kwargs={"lr": LR}, device=torch.device("cpu"))
        lengths = torch.full((BATCH,), IDS_PER_ROW, dtype=torch.int64)
        kjts = [kjt_cls.from_lengths_sync(keys=["f0"], values=row_of_rank[b].reshape(-1),
                                          lengths=lengths) for b in batches]

        def torchrec() -> float:
            t = time.perf_counter()
            (ebc(kjts[state["i"] % len(kjts)]).values() * upstream).sum().backward()
            return time.perf_counter() - t

        cands["torchrec"] = torchrec
        # per-rank work of 2 shards: half the batch on half the rows, one thread
        half_cfg = config(name="t1", embedding_dim=DIM, num_embeddings=live // 2,
                          feature_names=["f0"])
        half = collection(tables=[half_cfg], optimizer_type=torch.optim.Adagrad,
                          optimizer_kwargs={"lr": LR}, device=torch.device("cpu"))
        half_lengths = torch.full((BATCH // 2,), IDS_PER_ROW, dtype=torch.int64)
        half_kjts = [kjt_cls.from_lengths_sync(
            keys=["f0"], values=(row_of_rank[b[: BATCH // 2]] % (live // 2)).reshape(-1),
            lengths=half_lengths) for b in batches]
        half_up = upstream[: BATCH // 2]

        def torchrec_rank() -> float:
            torch.set_num_threads(1)
            try:
                t = time.perf_counter()
                (half(half_kjts[state["i"] % len(half_kjts)]).values() * half_up).sum().backward()
                return time.perf_counter() - t
            finally:
                torch.set_num_threads(2)

        cands["torchrec_rank"] = torchrec_rank
    s = interleaved(cands, repeats, warmup, pick)
    out = {"ours_ms": median(s["ours"]) * 1e3}
    if "torchrec" in s:
        out["torchrec_ms"] = median(s["torchrec"]) * 1e3
        out["torchrec_rank_ms"] = median(s["torchrec_rank"]) * 1e3
        out["ratio"] = paired_ratio(s["ours"], s["torchrec"])
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    steps, warmup = (5, 2) if args.quick else (20, 4)
    header("bench_distributed: sharded steps on gloo, bytes on the wire, table-size sweep",
           args.quick, steps, warmup)
    print("no GPU in this run: nccl and the GPU lookup throughput are not measured here")

    # -- scaling ------------------------------------------------------------------------------
    rows, bytes_ratios = [], []
    for world in (1, 2, 4):
        res = _spawn(scaling_worker, world, (steps, warmup))
        step_ms = res[0]["step_ms"]
        sent = float(np.mean([r["bytes"] for r in res]))
        unique = float(np.mean([r["unique"] for r in res]))
        ideal = 2 * (world - 1) / world * unique * (8 + 4 * DIM)
        rows.append([world, f"{step_ms:.1f}", f"{BATCH / step_ms * 1e3:,.0f}", f"{unique:,.0f}",
                     f"{sent / 2**20:.2f}", f"{ideal / 2**20:.2f}",
                     f"{sent / ideal:.2f}" if ideal else "-",
                     f"{sum(r['live'] for r in res):,}"])
        if world > 1:
            bytes_ratios.append(sent / ideal)
    print(f"\n-- scaling: global batch {BATCH} x {IDS_PER_ROW}, each of W processes its "
          f"{BATCH}/W rows, 1 thread each; median over {steps} steps of the slowest rank")
    print_table(["W", "step ms", "examples/s", "unique IDs/rank", "MiB sent/rank/step",
                 "ideal MiB", "sent/ideal", "live IDs (sum)"], rows)

    # -- TorchRec row-wise on gloo ----------------------------------------------------------------
    trec_res = _spawn(torchrec_worker, 2, (steps, warmup))
    if "error" in trec_res[0]:
        print(f"\nTorchRec DMP row-wise (2 processes, gloo): does not run here: "
              f"{trec_res[0]['error']}")
    else:
        print(f"\nTorchRec DMP row-wise (2 processes, gloo): {trec_res[0]['step_ms']:.1f} ms "
              f"per step; ours on 2 processes {rows[1][1]} ms")

    # -- table-size sweep -------------------------------------------------------------------------
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train_step import load_torchrec

    torchrec, trec = load_torchrec()
    sweep_rows, ratios = [], []
    sizes = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    for live in sizes:
        one = sweep_one_process(live, steps, warmup, trec if torchrec else None)
        two = _spawn(sweep_sharded_worker, 2, (live, steps, warmup))[0]
        nan = float("nan")
        ratio2 = two["step_ms"] / one.get("torchrec_ms", nan)
        ratio_rank = two["step_ms"] / one.get("torchrec_rank_ms", nan)
        ratios.append(ratio_rank)
        sweep_rows.append([f"{live:,}", f"{one['ours_ms']:.1f}",
                           f"{one.get('torchrec_ms', nan):.1f}",
                           f"{one.get('ratio', nan):.2f}", f"{two['step_ms']:.1f}",
                           f"{ratio2:.2f}", f"{one.get('torchrec_rank_ms', nan):.1f}",
                           f"{ratio_rank:.2f}"])
    print("\n-- table-size sweep: batch IDs scattered over the live rows; ours + SparseAdagrad vs "
          "TorchRec FusedEBC + EXACT_ADAGRAD (1 process, 2 threads), and ours on 2 sharded "
          "processes (1 thread each)")
    print_table(["live IDs", "ours 1 proc ms", "TorchRec ms", "ours/TorchRec",
                 "ours 2 procs ms", "2 procs/TorchRec", "TorchRec per-rank ms",
                 "2 procs/per-rank"], sweep_rows)
    print("(per-rank: TorchRec on one thread with half the batch over half the rows, the work "
          "of one of 2 shards without the exchange)")
    print()
    target_line("bytes on the wire / ideal deduplicated traffic (2 and 4 processes, worst)",
                max(bytes_ratios), "<=", 1.0, "1.0x")
    if torchrec:
        target_line("sweep: sharded step (2 processes) / TorchRec per-rank work, worst size",
                    max(ratios), "<=", TARGET_SWEEP, f"{TARGET_SWEEP}x")


if __name__ == "__main__":
    main()
