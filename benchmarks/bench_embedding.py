"""DynamicEmbedding (sum) training step vs nn.EmbeddingBag(sparse=True) on the same batch.

Ours: ``emb(ids [4096, 20])`` -> ``out.backward(g)`` -> ``emb.hashtable.grad_rows()`` (unique rows
and their summed gradient), timed until ``grad_rows`` has returned; ``clear_grad()`` runs
untimed after each step. The table is pre-filled with the whole 1M-ID support, so the timed
steps are steady state (no inserts).

Baseline: ``nn.EmbeddingBag(1M, 64, mode="sum", sparse=True)`` on the same batch with IDs
remapped to their Zipf ranks in ``[0, 1M)``, forward + backward until its sparse weight grad
exists (``.grad = None`` untimed between steps). Its grad is left uncoalesced, as produced;
a row with ``.coalesce()`` added is shown for information (ours returns unique rows).

Also: forward-only ratio, an inference (eval, no_grad) ratio, a phase breakdown of our step,
and a cold variant where 25% of the ID occurrences are new keys (the table grows).

    PYTHONPATH=. python benchmarks/bench_embedding.py [--quick]
"""

from __future__ import annotations

import time

import torch
from _common import (
    BATCH,
    DIM,
    IDS_PER_ROW,
    SUPPORT,
    Profiler,
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
from torch import nn

from recis.nn import DynamicEmbedding, EmbeddingOption

TARGET_RATIO = 1.5
# Functions timed in the profiled pass (skipped when absent, so this follows code changes).
PROFILE_TARGETS = [
    ("recis._core.backends.numba_backend", "NumbaBackend", "unique_with_inverse"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "map_lookup"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "map_lookup_or_insert"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "map_rebuild"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "gather"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "scatter"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "bag_reduce"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "bag_reduce_backward"),
    ("recis._core.slots", "SlotStore", "ensure_rows"),
    ("recis.nn.functional.embedding_ops", None, "bag_reduce"),
    ("recis.nn.modules.hashtable", "HashTable", "accept_grad"),
    ("recis.nn.modules.hashtable", "HashTable", "grad_rows"),
    ("torch.nn.functional", None, "embedding_bag"),
    ("torch", None, "unique"),
    ("torch", None, "sort"),
    ("torch", None, "argsort"),
    ("torch", None, "cat"),
]
N_WARM_BATCHES = 8
FILL_CHUNK = 100_000


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    setup_torch()
    repeats, warmup = (5, 2) if args.quick else (30, 5)
    cold_repeats, cold_warmup = (4, 1) if args.quick else (20, 3)
    header("bench_embedding: DynamicEmbedding sum fwd+bwd vs nn.EmbeddingBag(sparse)",
           args.quick, repeats, warmup)

    t0 = time.perf_counter()
    w = Workload()
    gen = torch.Generator().manual_seed(7)
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="x"))
    ht = emb.hashtable
    support_ids = torch.from_numpy(w.rank_ids.copy())
    with torch.no_grad():
        for i in range(0, SUPPORT, FILL_CHUNK):
            chunk = support_ids[i : i + FILL_CHUNK]
            ht.insert(chunk, torch.randn(chunk.numel(), DIM, generator=gen) * 0.01)
    bag = nn.EmbeddingBag(SUPPORT, DIM, mode="sum", sparse=True)
    shape = (BATCH, IDS_PER_ROW)
    warm = []
    for _ in range(N_WARM_BATCHES):
        ids, ranks = w.warm_batch()
        warm.append((ids.view(shape), ranks.view(shape)))
    cold = []
    for _ in range(cold_repeats + cold_warmup):
        ids, ranks = w.cold_batch()
        cold.append((ids.view(shape), ranks.view(shape)))
    g = torch.randn(BATCH, DIM, generator=gen)
    print(f"setup {time.perf_counter() - t0:.1f}s: table pre-filled with the {SUPPORT:,}-ID "
          f"support (len {len(ht):,})")

    state: dict = {}
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "grad_rows": []}
    prof = Profiler()

    def pick(i: int) -> None:
        state["i"] = i
        state["ids"], state["ranks"] = warm[i % len(warm)]

    def ours_step() -> float:
        prof.phase = "forward"
        a = time.perf_counter()
        out = emb(state["ids"])
        b = time.perf_counter()
        prof.phase = "backward"
        out.backward(g)
        c = time.perf_counter()
        prof.phase = "grad_rows"
        ht.grad_rows()
        d = time.perf_counter()
        ht.clear_grad()
        prof.phase_wall["forward"] += b - a
        prof.phase_wall["backward"] += c - b
        prof.phase_wall["grad_rows"] += d - c
        if state.get("record", False):
            phases["forward"].append(b - a)
            phases["backward"].append(c - b)
            phases["grad_rows"].append(d - c)
        return d - a

    def base_step(coalesce: bool = False):
        def run() -> float:
            bag.weight.grad = None
            a = time.perf_counter()
            out = bag(state["ranks"])
            out.backward(g)
            grad = bag.weight.grad
            if coalesce:
                grad.coalesce()
            return time.perf_counter() - a

        return run

    def ours_eval() -> float:
        emb.eval()
        with torch.no_grad():
            a = time.perf_counter()
            emb(state["ids"])
            t = time.perf_counter() - a
        emb.train()
        return t

    def base_eval() -> float:
        with torch.no_grad():
            a = time.perf_counter()
            bag(state["ranks"])
            return time.perf_counter() - a

    cands = {
        "ours fwd+bwd+grad_rows": ours_step,
        "EmbeddingBag fwd+bwd (sparse grad)": base_step(),
        "EmbeddingBag fwd+bwd + grad.coalesce()": base_step(coalesce=True),
        "ours fwd (train, autograd graph)": timed(lambda: emb(state["ids"])),
        "EmbeddingBag fwd (train)": timed(lambda: bag(state["ranks"])),
        "ours fwd (eval, no_grad)": ours_eval,
        "EmbeddingBag fwd (no_grad)": base_eval,
    }

    def pick_and_record(i: int) -> None:
        pick(i)
        state["record"] = i >= warmup

    s = interleaved(cands, repeats, warmup, pick_and_record)
    full, base = s["ours fwd+bwd+grad_rows"], s["EmbeddingBag fwd+bwd (sparse grad)"]
    pairs = [
        ("ours fwd+bwd+grad_rows", "EmbeddingBag fwd+bwd (sparse grad)"),
        ("ours fwd+bwd+grad_rows", "EmbeddingBag fwd+bwd + grad.coalesce()"),
        ("ours fwd (train, autograd graph)", "EmbeddingBag fwd (train)"),
        ("ours fwd (eval, no_grad)", "EmbeddingBag fwd (no_grad)"),
    ]
    n_uniq = sum(torch.unique(ids).numel() for ids, _ in warm) / len(warm)
    print(f"\n-- warm (steady state): {len(warm)} batches, mean U={n_uniq:,.0f} unique IDs of "
          f"N={BATCH * IDS_PER_ROW}")
    rows = []
    for ours_name, base_name in pairs:
        rows.append([
            ours_name, base_name, f"{median(s[ours_name]) * 1e3:.2f}",
            f"{median(s[base_name]) * 1e3:.2f}", f"{paired_ratio(s[ours_name], s[base_name]):.2f}",
        ])
    print_table(["ours", "baseline", "ours ms", "base ms", "ours/base"], rows)

    step_ms = median(full) * 1e3
    fwd, bwd, gr = (median(phases[k]) * 1e3 for k in ("forward", "backward", "grad_rows"))
    # Profiled pass (not part of the ratios): wrapped functions, exclusive time per step phase.
    n_prof = 5 if args.quick else 20
    with prof.installed(PROFILE_TARGETS):
        pick(0)
        ours_step()  # warm the wrappers
        prof.reset()
        for i in range(n_prof):
            pick(i)
            ours_step()
    print(f"\n-- phase breakdown of our step: median step {step_ms:.2f} ms = forward {fwd:.2f} + "
          f"backward {bwd:.2f} + grad_rows {gr:.2f} (un-instrumented, from the timed repeats)")
    print(f"   profiled pass of {n_prof} steps with wrapped functions (exclusive time, mean per "
          "step; 'unattributed' = python glue, autograd, torch ops not wrapped)")
    print_table(["phase / function", "calls/step", "ms/step", "of phase"],
                prof.table(n_prof, ("forward", "backward", "grad_rows")))

    # Cold: 25% of occurrences are new keys; the table grows (no rehash within these repeats).
    cstate: dict = {}

    def cpick(i: int) -> None:
        cstate["ids"], cstate["ranks"] = cold[i]

    def cold_ours() -> float:
        a = time.perf_counter()
        out = emb(cstate["ids"])
        out.backward(g)
        ht.grad_rows()
        t = time.perf_counter() - a
        ht.clear_grad()
        return t

    def cold_base() -> float:
        bag.weight.grad = None
        a = time.perf_counter()
        bag(cstate["ranks"]).backward(g)
        _ = bag.weight.grad
        return time.perf_counter() - a

    before = len(ht)
    cs = interleaved({"ours": cold_ours, "base": cold_base}, cold_repeats, cold_warmup, cpick)
    cold_ratio = paired_ratio(cs["ours"], cs["base"])
    print(f"\n-- cold: 25% of occurrences new keys ({len(ht) - before:,} rows inserted over "
          f"{len(cold)} steps); baseline gets uniform ranks for the new keys")
    print_table(
        ["ours", "baseline", "ours ms", "base ms", "ours/base"],
        [["ours fwd+bwd+grad_rows (cold)", "EmbeddingBag fwd+bwd (sparse grad)",
          f"{median(cs['ours']) * 1e3:.2f}", f"{median(cs['base']) * 1e3:.2f}",
          f"{cold_ratio:.2f}"]],
    )

    print()
    target_line("embedding fwd+bwd ours/EmbeddingBag", paired_ratio(full, base), "<=",
                TARGET_RATIO, f"{TARGET_RATIO}x")
    print(f"info: forward-only ratio "
          f"{paired_ratio(s[pairs[2][0]], s[pairs[2][1]]):.2f}x, inference ratio "
          f"{paired_ratio(s[pairs[3][0]], s[pairs[3][1]]):.2f}x, cold step ratio "
          f"{cold_ratio:.2f}x")


if __name__ == "__main__":
    main()
