"""Lookup and train-step throughput of a CUDA table against torch's own GPU embeddings.

A ``HashTable([64], device="cuda")`` holding the workload's 1M IDs (raw int64, Zipf(0.9)
batches of 81,920 occurrences; see ``_common.Workload``) against baselines that are given a
vocabulary, i.e. the IDs already turned into row numbers 0..1M-1 (what a dynamic table saves
its users from doing), all on the same GPU, interleaved, medians of repeats, each timed with
``torch.cuda.synchronize()`` around it:

* eval lookup: ``table(ids)`` in eval mode vs ``F.embedding(ranks, weight)`` (a gather);
* train step: lookup + backward + ``SparseAdam`` step of the table vs ``nn.Embedding(1M, 64,
  sparse=True)`` + ``torch.optim.SparseAdam``, and vs the same with a dense ``torch.optim.Adam``
  (which updates all 1M rows every step);
* ID map alone: ``lookup_or_insert`` of a warm batch vs ``torch.unique(return_inverse=True)``
  (a floor for the dedup step) on the GPU;
* cold train step: 25% of the occurrences new IDs (inserted by the lookup).

Prints M IDs/s (occurrences per second) and ratios ours / baseline (> 1: ours faster for
throughput ratios). Needs CUDA.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DIM,
    N_IDS,
    SUPPORT,
    Workload,
    header,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    setup_torch,
)


def cuda_timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--device", default="cuda", help="cuda (default); cpu only checks the script runs"))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: needs CUDA")
    setup_torch()
    repeats, warmup = (10, 3) if args.quick else (50, 10)
    header("bench_gpu: CUDA table vs torch embeddings with a vocabulary", args.quick, repeats,
           warmup)
    from recis._core.id_map import IdMap
    from recis.nn import HashTable
    from recis.optim import SparseAdam

    dev = torch.device(args.device)
    if dev.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}")
    w = Workload()
    all_ids = torch.from_numpy(w.rank_ids.copy()).to(dev)
    table = HashTable([DIM], name="t", device=dev)
    opt = SparseAdam({"t": table}, lr=0.01)
    with torch.no_grad():
        for i in range(0, all_ids.numel(), 200_000):
            table(all_ids[i:i + 200_000])  # admit the support (training mode inserts)
    assert len(table) == SUPPORT
    id_map = IdMap(dev)
    id_map.lookup_or_insert(all_ids, assume_unique=True)
    weight = torch.randn(SUPPORT, DIM, device=dev)
    sparse_emb = torch.nn.Embedding(SUPPORT, DIM, sparse=True).to(dev)
    sparse_opt = torch.optim.SparseAdam(sparse_emb.parameters(), lr=0.01)
    dense_emb = torch.nn.Embedding(SUPPORT, DIM).to(dev)
    dense_opt = torch.optim.Adam(dense_emb.parameters(), lr=0.01)
    batches = [w.warm_batch() for _ in range(8)]
    batches = [(ids.to(dev), ranks.to(dev)) for ids, ranks in batches]
    cold = [w.cold_batch() for _ in range(warmup + repeats)]
    cold = [(ids.to(dev), ranks.to(dev)) for ids, ranks in cold]
    current: dict[str, torch.Tensor] = {}

    def pick(i: int) -> None:
        current["ids"], current["ranks"] = batches[i % len(batches)]
        current["cold_ids"], current["cold_ranks"] = cold[i]

    def lookup_ours() -> None:
        table.eval()
        with torch.no_grad():
            table(current["ids"])
        table.train()

    def lookup_gather() -> None:
        torch.nn.functional.embedding(current["ranks"], weight)

    def step_ours(key: str = "ids") -> None:
        opt.zero_grad()
        table(current[key]).sum().backward()
        opt.step()

    def step_sparse(key: str = "ranks") -> None:
        sparse_opt.zero_grad()
        sparse_emb(current[key]).sum().backward()
        sparse_opt.step()

    def step_dense() -> None:
        dense_opt.zero_grad()
        dense_emb(current["ranks"]).sum().backward()
        dense_opt.step()

    def map_ours() -> None:
        id_map.lookup_or_insert(current["ids"])

    def map_unique() -> None:
        torch.unique(current["ids"], return_inverse=True)

    cands = {"lookup ours": lookup_ours, "lookup gather": lookup_gather,
             "step ours": step_ours, "step sparse": step_sparse, "step dense": step_dense,
             "map ours": map_ours, "map unique": map_unique}
    samples = interleaved({k: cuda_timed(f) for k, f in cands.items()}, repeats, warmup, pick)
    cold_samples = interleaved({"cold ours": cuda_timed(lambda: step_ours("cold_ids")),
                                "cold sparse": cuda_timed(lambda: step_sparse("cold_ranks"))},
                               repeats, warmup, pick)
    samples.update(cold_samples)
    rows = [[name, f"{median(s) * 1e3:.2f}", f"{N_IDS / median(s) / 1e6:.0f}"]
            for name, s in samples.items()]
    print_table(["candidate", "ms (median)", "M IDs/s"], rows)
    pairs = [("eval lookup", "lookup ours", "lookup gather"),
             ("train step vs sparse Embedding + SparseAdam", "step ours", "step sparse"),
             ("train step vs dense Embedding + Adam", "step ours", "step dense"),
             ("ID map vs torch.unique", "map ours", "map unique"),
             ("cold train step vs sparse Embedding + SparseAdam", "cold ours", "cold sparse")]
    print_table(["comparison", "throughput ours / baseline"],
                [[label, f"{paired_ratio(samples[b], samples[a]):.2f}"]
                 for label, a, b in pairs])
    print(f"live rows at the end: {len(table):,} (cold batches insert new IDs)")


if __name__ == "__main__":
    main()
