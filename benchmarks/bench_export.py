"""Export for serving: frozen lookup throughput vs the training table's eval lookup, and the
export's size vs the checkpoint's.

The table: ``DynamicEmbedding`` dim 64 holding the workload's 1M distinct IDs (random int64,
see ``_common.Workload``) with random N(0, 1) rows, plus ``SparseAdam`` state (two more float32
[64] slots, random values) as a trained table has. It is exported with
``recis.export.export`` in each row format (fp32, fp16, int8 with per-row scales) and loaded
back as ``FrozenEmbedding`` (plain torch: ``searchsorted`` over the sorted IDs, gather,
dequantize). Candidates, interleaved inside every repeat (order rotated) on the same batch of
81,920 Zipf(0.9) IDs (a new batch per repeat), medians reported:

* lookup: rows of every ID, ``(N, 64)`` float32: the table in eval mode under ``no_grad``
  (``HashTable.__call__``: hash-map lookup, unknown IDs read as zeros), the baseline, against
  ``FrozenTable.__call__`` of each export;
* bags: the sum over 4096 bags of 20 IDs, ``(4096, 64)``: ``DynamicEmbedding`` in eval mode
  (the fused numba lookup + combiner) against ``FrozenEmbedding`` of each export.

M keys/s = 81,920 / seconds. Ratios are frozen throughput / baseline throughput in the same
repeat. Targets: frozen fp32 lookup and bags >= 0.5x the training table's eval path (a
binary search over 1M sorted IDs against a hash map: the frozen module trades some speed for
needing nothing but torch).

Sizes: bytes on disk of each export directory against a checkpoint of the same table
(``recis.serialize.Saver``: embedding + the two Adam slots) and against the checkpoint's
embedding alone (IDs + fp32 rows: 72 bytes per ID). Targets: int8 export <= 0.3x the
embedding-only checkpoint size; the fp32 export <= 1.05x it.

    PYTHONPATH=. python benchmarks/bench_export.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch
from _common import (
    BATCH,
    DIM,
    IDS_PER_ROW,
    N_IDS,
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

from recis.export import export, load
from recis.nn import DynamicEmbedding, EmbeddingOption
from recis.optim import SparseAdam
from recis.serialize import Saver

FILL_CHUNK = 200_000
FORMATS = ("fp32", "fp16", "int8")
TARGET_LOOKUP = 0.5
TARGET_BAGS = 0.5
TARGET_INT8_SIZE = 0.3
TARGET_FP32_SIZE = 1.05


def make_embedding(ids: torch.Tensor, gen: torch.Generator) -> DynamicEmbedding:
    """A dim-64 DynamicEmbedding holding ``ids`` with random rows and random Adam state."""
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="t"))
    table = emb.hashtable
    SparseAdam([table], lr=1e-3)  # declares the Adam slots
    for i in range(0, ids.numel(), FILL_CHUNK):
        part = ids[i: i + FILL_CHUNK]
        table.insert(part, torch.randn(part.numel(), DIM, generator=gen))
    _, rows = table.ids_map()
    for name in table.slot_names:
        if name != "embedding":
            for i in range(0, rows.numel(), FILL_CHUNK):
                r = rows[i: i + FILL_CHUNK]
                table.set_slot_values(name, r, torch.randn(r.numel(), DIM, generator=gen).abs_())
    return emb.eval()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    repeats, warmup = (3, 1) if args.quick else (15, 2)
    header("bench_export: FrozenEmbedding (recis.export) vs the training table in eval mode",
           args.quick, repeats, warmup)
    work = Workload()
    t0 = time.perf_counter()
    emb = make_embedding(torch.from_numpy(work.rank_ids), torch.Generator().manual_seed(SEED))
    table = emb.hashtable
    print(f"table filled in {time.perf_counter() - t0:.1f} s: {len(table):,} IDs, slots "
          f"{table.slot_names}")
    tmp = tempfile.mkdtemp(prefix="recis_bench_export_", dir="/tmp")
    try:
        sizes = {}
        Saver(path=os.path.join(tmp, "ckpt"), hashtables={"t": table}).save()
        sizes["checkpoint"] = dir_bytes(os.path.join(tmp, "ckpt"))
        frozen = {}
        for fmt in FORMATS:
            t0 = time.perf_counter()
            export(emb, os.path.join(tmp, fmt), dtype=fmt)
            seconds = time.perf_counter() - t0
            sizes[fmt] = dir_bytes(os.path.join(tmp, fmt))
            frozen[fmt] = load(os.path.join(tmp, fmt))
            print(f"export {fmt}: {seconds:.1f} s, {sizes[fmt] / 1e6:.1f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    batch: list[torch.Tensor] = []

    def pick(i: int) -> None:
        batch[:] = [work.warm_batch()[0]]

    def run(fn):
        def timed() -> float:
            ids = batch[0]
            with torch.no_grad():
                t = time.perf_counter()
                fn(ids)
                return time.perf_counter() - t
        return timed

    cands = {"lookup: HashTable eval": run(table)}
    cands.update({f"lookup: frozen {f}": run(frozen[f].table) for f in FORMATS})
    cands["bags: DynamicEmbedding eval"] = run(lambda ids: emb(ids.view(BATCH, IDS_PER_ROW)))
    cands.update({f"bags: frozen {f}": run(lambda ids, m=frozen[f]: m(ids.view(BATCH,
                                                                              IDS_PER_ROW)))
                  for f in FORMATS})
    pick(0)
    with torch.no_grad():  # the frozen rows equal the table's (fp32)
        assert torch.equal(frozen["fp32"](batch[0].view(BATCH, IDS_PER_ROW)),
                           emb(batch[0].view(BATCH, IDS_PER_ROW)))
    samples = interleaved(cands, repeats, warmup, before_repeat=pick)

    rows = []
    for name, ts in samples.items():
        base = samples["lookup: HashTable eval" if name.startswith("lookup")
                       else "bags: DynamicEmbedding eval"]
        rows.append([name, f"{median(ts) * 1e3:.2f}", f"{N_IDS / median(ts) / 1e6:.1f}",
                     f"{paired_ratio(base, ts):.2f}x"])
    print_table(["candidate", "ms/batch", "M keys/s", "vs training table"], rows)
    ckpt_embedding = len(table) * (8 + DIM * 4)
    print_table(["files", "MB", "vs checkpoint", "vs checkpoint embedding only"],
                [[name, f"{b / 1e6:.1f}", f"{b / sizes['checkpoint']:.2f}x",
                  f"{b / ckpt_embedding:.2f}x"] for name, b in sizes.items()])
    print(f"(checkpoint embedding only = {len(table):,} x (8 + {DIM} x 4) bytes = "
          f"{ckpt_embedding / 1e6:.1f} MB)")
    target_line("frozen fp32 lookup / HashTable eval lookup",
                paired_ratio(samples["lookup: HashTable eval"], samples["lookup: frozen fp32"]),
                ">=", TARGET_LOOKUP, f"{TARGET_LOOKUP}x")
    target_line("frozen fp32 bags / DynamicEmbedding eval bags",
                paired_ratio(samples["bags: DynamicEmbedding eval"], samples["bags: frozen fp32"]),
                ">=", TARGET_BAGS, f"{TARGET_BAGS}x")
    target_line("int8 export size / checkpoint embedding", sizes["int8"] / ckpt_embedding,
                "<=", TARGET_INT8_SIZE, f"{TARGET_INT8_SIZE}x")
    target_line("fp32 export size / checkpoint embedding", sizes["fp32"] / ckpt_embedding,
                "<=", TARGET_FP32_SIZE, f"{TARGET_FP32_SIZE}x")


if __name__ == "__main__":
    main()
