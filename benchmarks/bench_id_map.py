"""ID map lookup-or-insert throughput (M keys/s) on Zipf(0.9) batches of N=81920 raw int64 IDs.

* warm: the map already holds the whole 1M-ID support, so every key is present;
* cold: 25% of the N ID occurrences are keys never seen before (tail IDs, once each); every
  repeat starts from an untimed copy of the warm map, so the timed call never rehashes.

Throughput counts the N ID occurrences of the batch (duplicates included) unless the row says
"per unique key". Baselines run in the same repeats: a Python dict (``setdefault`` loop on
``batch.tolist()``, conversion included), ``torch.unique(return_inverse=True)`` alone (a floor
for the dedup step), and for information the plain-torch twin of the kernels.

Also measures numba's first-use compile cost in subprocesses: a fresh ``NUMBA_CACHE_DIR``,
then the same cache dir again (warm cache).

    PYTHONPATH=. python benchmarks/bench_id_map.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from _common import (
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
    target_line,
    timed,
)

from recis._core.backends import get_backend
from recis._core.id_map import IdMap

numba = get_backend("numba")

TARGET_MKEYS = 50.0
N_WARM_BATCHES = 8


def filled_map(ids: torch.Tensor, chunk: int = N_IDS) -> IdMap:
    m = IdMap("cpu")
    for i in range(0, ids.numel(), chunk):
        m.lookup_or_insert(ids[i : i + chunk], assume_unique=True)
    return m


def dict_lookup_or_insert(d: dict, batch: torch.Tensor) -> list:
    setdefault = d.setdefault
    return [setdefault(k, len(d)) for k in batch.tolist()]


def run_scenario(name: str, batches, uniqs, base_map: IdMap, base_dict: dict, fresh_map: bool,
                 repeats: int, warmup: int) -> tuple[list[list[object]], float, float]:
    """Interleaved timings of one scenario; returns table rows and our/kernel M keys/s."""
    state: dict = {}

    def pick(i: int) -> None:
        state["batch"] = batches[i % len(batches)]
        state["uniq"] = uniqs[i % len(uniqs)]

    twin_map = base_map.to("cpu", get_backend("torch"))

    def table() -> IdMap:
        return base_map.to("cpu") if fresh_map else base_map

    def twin_table() -> IdMap:
        return base_map.to("cpu", get_backend("torch")) if fresh_map else twin_map

    def ours() -> float:
        m, b = table(), state["batch"]
        t0 = time.perf_counter()
        m.lookup_or_insert(b)
        return time.perf_counter() - t0

    def kernel_only() -> float:
        m, u = table(), state["uniq"]
        t0 = time.perf_counter()
        m.lookup_or_insert(u, assume_unique=True)
        return time.perf_counter() - t0

    def twin() -> float:
        m, b = twin_table(), state["batch"]
        t0 = time.perf_counter()
        m.lookup_or_insert(b)
        return time.perf_counter() - t0

    def py_dict() -> float:
        d, b = (base_dict.copy() if fresh_map else base_dict), state["batch"]
        t0 = time.perf_counter()
        dict_lookup_or_insert(d, b)
        return time.perf_counter() - t0

    cands = {
        "IdMap.lookup_or_insert(batch)": ours,
        "  kernel only: map(uniq, assume_unique)": kernel_only,
        "  dedup only: backend.unique_with_inverse": timed(
            lambda: numba.unique_with_inverse(state["batch"], None)
        ),
        "torch.unique(return_inverse=True)": timed(
            lambda: torch.unique(state["batch"], return_inverse=True)
        ),
        "python dict setdefault loop": py_dict,
        "IdMap, plain-torch kernels (info)": twin,
    }
    s = interleaved(cands, repeats, warmup, pick)
    n_uniq = sum(u.numel() for u in uniqs) / len(uniqs)
    ours_t = s["IdMap.lookup_or_insert(batch)"]
    rows = []
    for cname, ts in s.items():
        per_unique = cname.startswith("  kernel only")
        keys = n_uniq if per_unique else N_IDS
        mkeys = keys / median(ts) / 1e6
        rows.append([
            cname,
            "U" if per_unique else "N",
            f"{median(ts) * 1e3:.2f}",
            f"{mkeys:.1f}",
            f"{paired_ratio(s['python dict setdefault loop'], ts):.1f}x",
            f"{paired_ratio(ts, ours_t):.2f}",
        ])
    ours_mk = N_IDS / median(ours_t) / 1e6
    kern_mk = n_uniq / median(s["  kernel only: map(uniq, assume_unique)"]) / 1e6
    print(f"\n-- {name}: {len(batches)} batches, mean unique keys per batch U={n_uniq:,.0f} "
          f"of N={N_IDS}")
    print_table(
        ["candidate", "keys", "median ms", "M keys/s", "speed vs dict", "time / ours"], rows
    )
    return rows, ours_mk, kern_mk


COMPILE_SNIPPET = r"""
import json, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(2)
from recis._core.id_map import IdMap
from recis.nn import HashTable
t1 = time.perf_counter()
g = torch.Generator().manual_seed(1)
ids = torch.randint(-2**62, 2**62, (81920,), generator=g)
m = IdMap("cpu")
a = time.perf_counter(); m.lookup_or_insert(ids); b = time.perf_counter()
m.lookup_or_insert(ids + 1); c = time.perf_counter()
ht = HashTable([64])
d = time.perf_counter(); ht(ids); e = time.perf_counter()
ht(ids + 1); f = time.perf_counter()
print(json.dumps({"import": t1 - t0, "map_first": b - a, "map_second": c - b,
                  "table_first": e - d, "table_second": f - e}))
"""


def compile_cost() -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory(prefix="recis_numba_cache_") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("RECIS_KERNELS", None)
        for _ in ("cold cache", "warm cache"):
            res = subprocess.run(
                [sys.executable, "-c", COMPILE_SNIPPET], env=env, capture_output=True,
                text=True, check=True,
            )
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    setup_torch()
    repeats, warmup = (5, 1) if args.quick else (25, 5)
    n_cold = warmup + repeats
    header("bench_id_map: IdMap.lookup_or_insert throughput", args.quick, repeats, warmup)

    t0 = time.perf_counter()
    w = Workload()
    support_ids = torch.from_numpy(w.rank_ids.copy())
    warm = [w.warm_batch()[0] for _ in range(N_WARM_BATCHES)]
    cold = [w.cold_batch()[0] for _ in range(n_cold)]
    base = filled_map(support_ids)
    base_dict = {k: i for i, k in enumerate(support_ids.tolist())}
    print(f"setup {time.perf_counter() - t0:.1f}s: map pre-filled with the {SUPPORT:,}-ID "
          f"support (len {len(base):,}, capacity {base.capacity:,})")

    def uniq_of(batches):
        return [numba.unique_with_inverse(b, None)[0] for b in batches]

    _, warm_mk, warm_kern = run_scenario(
        "warm (all keys present)", warm, uniq_of(warm), base, base_dict, False, repeats, warmup
    )
    _, cold_mk, cold_kern = run_scenario(
        "cold (25% of occurrences are new keys; fresh copy of the warm map per repeat)",
        cold, uniq_of(cold), base, base_dict, True, repeats, warmup,
    )

    # Growth from empty, rehashes included (information).
    fills = []
    for _ in range(1 if args.quick else 3):
        t = time.perf_counter()
        filled_map(support_ids)
        fills.append(time.perf_counter() - t)
    print(f"\ninfo: fill an empty IdMap with {SUPPORT:,} distinct keys in N-key chunks "
          f"(rehashes included): {SUPPORT / median(fills) / 1e6:.1f}M keys/s")

    cc = compile_cost()
    print("\n-- numba first-use cost (subprocess, fresh NUMBA_CACHE_DIR, then same dir again)")
    rows = []
    for label, r in zip(("cold cache (compile)", "warm cache (load)"), cc, strict=True):
        rows.append([
            label,
            f"{r['import']:.2f}",
            f"{r['map_first']:.2f}",
            f"{r['map_second'] * 1e3:.1f}",
            f"{r['table_first']:.2f}",
            f"{r['table_second'] * 1e3:.1f}",
        ])
    print_table(
        ["numba cache", "import s", "1st map call s", "2nd map ms", "1st table fwd s",
         "2nd table fwd ms"],
        rows,
    )
    print("(1st table fwd runs after the map call, so it adds only the table's own kernels)")

    print("\nkeys/s count the N ID occurrences of a batch (duplicates included); "
          "kernel-only rows count unique keys")
    target_line("id-map warm", warm_mk, ">=", TARGET_MKEYS, f"{TARGET_MKEYS:.0f}M keys/s")
    target_line("id-map cold", cold_mk, ">=", TARGET_MKEYS, f"{TARGET_MKEYS:.0f}M keys/s")
    print(f"info: kernel only (unique keys -> map): warm {warm_kern:.1f}M, cold {cold_kern:.1f}M "
          "unique keys/s")


if __name__ == "__main__":
    main()
