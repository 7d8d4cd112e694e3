"""FeatureEngine throughput on a Criteo-like batch, against the same transforms as plain torch.

The batch: 4096 rows; 26 categorical columns ``c1..c26`` (RaggedTensor, 0 or 1 int64 ID per
row, 20% missing, Zipf-like IDs in [0, 2**40) as in the Criteo sample) and 13 integer columns
``i1..i13`` (``[B, 1]`` float, heavy-tailed counts).

* **ids** pipeline, computed both ways (outputs checked equal before timing):
  ``c*``: ``Mod(1_000_003)``; ``c1..c4`` also ``IDMultiHash([20000, 10000])``; ``i*``:
  ``Bucketize`` over the ``--features`` boundaries. Candidates: the engine (fused steps),
  the same features run one by one through ``Feature.forward`` (no fusion), and plain torch
  ops per column (``torch.remainder`` with the uint64 correction, ``torch.bucketize``, the
  multi-hash formula) written inline.
* **features** pipeline (the job's ``--features`` mode: FarmHash64 of each categorical's
  decimal text, integer buckets), engine only, for information: plain torch has no string
  hashing to compare with.

Rows/s count batch rows (each row carries 39 columns).

    PYTHONPATH=. python benchmarks/bench_features.py [--quick]
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from _common import (
    SEED,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    source_fingerprint,
)

from recis.examples.deepfm import (
    INTEGER_BOUNDARIES,
    CriteoFeatureTransform,
    criteo_feature_engine,
)
from recis.features import Bucketize, Feature, FeatureEngine, IDMultiHash, Mod, SelectField
from recis.io import criteo_columns
from recis.ragged import RaggedTensor

ROWS = 4096
MOD = 1_000_003
MULTI = [20000, 10000]


def criteo_like_batch(rows: int = ROWS, seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed)
    _, dense, sparse = criteo_columns()
    batch: dict = {"label": torch.from_numpy((rng.random(rows) < 0.03).astype(np.float32))}
    for k, name in enumerate(sparse):
        present = rng.random(rows) >= 0.2
        ranks = np.minimum(rng.zipf(1.3, present.sum()), 2**20)
        ids = (ranks * 0x9E3779B1 + k * 7919) % 2**40
        offsets = np.concatenate([[0], np.cumsum(present)])
        batch[name] = RaggedTensor(torch.from_numpy(ids.astype(np.int64)),
                                   torch.from_numpy(offsets.astype(np.int64)))
    counts = np.floor(rng.lognormal(1.5, 2.0, (rows, len(dense)))).astype(np.float32)
    batch["dense"] = torch.from_numpy(counts)
    for k, name in enumerate(dense):
        batch[name] = batch["dense"][:, k:k + 1]
    return batch


def ids_features() -> list[Feature]:
    _, dense, sparse = criteo_columns()
    out = [Feature(c).add_op(SelectField(c)).add_op(Mod(MOD)) for c in sparse]
    out += [Feature(f"{c}_multi").add_op(SelectField(c)).add_op(IDMultiHash(MULTI))
            for c in sparse[:4]]
    out += [Feature(i).add_op(SelectField(i)).add_op(Bucketize(INTEGER_BOUNDARIES))
            for i in dense]
    return out


def plain_torch(batch: dict) -> dict:
    """The ids pipeline as plain torch ops, one column at a time."""
    _, dense, sparse = criteo_columns()
    bounds = torch.tensor(INTEGER_BOUNDARIES, dtype=torch.float32)
    wrap = (2**64) % MOD  # uint64 reading of negative IDs
    primes = IDMultiHash(MULTI).primes
    out = {}
    for c in sparse:
        rt = batch[c]
        v = rt.values()
        r = torch.remainder(v, MOD)
        r = torch.where(v < 0, torch.remainder(r + wrap, MOD), r)
        out[c] = RaggedTensor(r, rt.offsets(), validate=False)
    for c in sparse[:4]:
        rt = batch[c]
        for i, (mul, p, b) in enumerate(zip((1, 3), primes, MULTI, strict=True)):
            h = torch.remainder(torch.fmod(rt.values() * mul, p) + p, p) % b
            out[f"{c}_multi_multi_hash_{i}"] = RaggedTensor(h, rt.offsets(), validate=False)
    for i in dense:
        out[i] = torch.bucketize(batch[i].contiguous(), bounds, right=True)
    return out


def check_equal(engine_out: dict, torch_out: dict) -> None:
    for key, want in torch_out.items():
        got = engine_out[key]
        if isinstance(want, RaggedTensor):
            assert torch.equal(got.values(), want.values()), key
        else:
            assert torch.equal(got, want), key


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(2)
    repeats, warmup = (5, 2) if args.quick else (30, 5)
    print("== bench_features: FeatureEngine vs plain torch ops")
    print(f"recis sources sha256 {source_fingerprint()} ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, quick={args.quick}, "
          f"repeats={repeats} (+{warmup} warm-up), medians of interleaved repeats")
    batch = criteo_like_batch()
    print(f"batch: {ROWS} rows, 26 categorical + 13 integer columns "
          f"({sum(batch[f'c{k}'].values().numel() for k in range(1, 27))} categorical values)")

    engine = FeatureEngine(ids_features())
    unfused = ids_features()
    check_equal(engine(batch, remain_no_use_data=False), plain_torch(batch))

    def run(fn):
        def timed_call() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return timed_call

    cands = {
        "FeatureEngine (fused steps)": run(lambda: engine(batch, remain_no_use_data=False)),
        "Feature.forward one by one (no fusion)": run(lambda: [f(batch) for f in unfused]),
        "plain torch ops per column": run(lambda: plain_torch(batch)),
    }
    s = interleaved(cands, repeats, warmup)
    base = s["plain torch ops per column"]
    rows = [[name, f"{median(ts) * 1e3:.2f}", f"{ROWS / median(ts) / 1e6:.3f}",
             f"{paired_ratio(base, ts):.2f}x"] for name, ts in s.items()]
    print("\n-- ids pipeline (Mod, IDMultiHash, Bucketize), same outputs both ways")
    print_table(["candidate", "median ms", "M rows/s", "speed vs torch"], rows)

    _, dense, sparse = criteo_columns()
    transform = CriteoFeatureTransform(criteo_feature_engine(sparse, dense), dense)
    s = interleaved({"--features engine": run(lambda: transform(batch))}, repeats, warmup)
    t = median(s["--features engine"])
    print("\n-- features pipeline (Int64ToString -> Hash('farm') per categorical, Bucketize "
          "per integer column), engine only")
    print_table(["candidate", "median ms", "M rows/s"],
                [["--features engine", f"{t * 1e3:.2f}", f"{ROWS / t / 1e6:.3f}"]])


if __name__ == "__main__":
    main()
