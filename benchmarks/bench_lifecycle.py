"""Table lifecycle: what capacity eviction costs per step, and what it does to model quality.

* **cost**: one table of 1M live IDs (dim 64, SparseAdagrad), batches of the issue's workload
  with 5% of the occurrences new IDs (so the table keeps growing past its cap). Per step:
  the train step with no policy, with LRU and with LFU attached (their per-lookup
  bookkeeping), and a filter run (``do_filter``) that brings the table back to 1M rows,
  amortised over a filter interval of 100 steps. Eviction cost per step = the policy's extra
  step time + filter run / 100, as a share of the plain step (target <= 5%).
* **rss**: one table (dim 64, SparseAdagrad) under ``MemoryBudget``, fed drifting steps (4096
  IDs a step, 10% of them new, the rest from the last 100 steps' IDs), a filter run every 10
  steps; budgets of 64 and 128 MiB enforced at filter runs (5,000 steps), and 64 MiB also at
  insert time (``cap_on_insert``, 2,000 steps: it scans the table at every lookup that brings
  new IDs), each in a fresh process after a warm-up that compiles the kernels. Process RSS
  growth over the steps (a plateau), plotted in ``benchmarks/figures/lifecycle_rss.png``; the
  two budgets give RSS = slope x budget + fixed overhead (target: slope <= 1.1).
* **quality**: the main job's DeepFM on the synthetic drifting stream (400 steps of 1024,
  seed 0), evaluated on held-out batches, under no eviction, GlobalStepFilter(200), and LRU /
  LFU capped at 50% and 25% of the rows the table holds without eviction (filter every 50
  steps): eval AUC against the tables' memory, as a table and a plot
  (``benchmarks/figures/lifecycle_auc_memory.png``).

    PYTHONPATH=. python benchmarks/bench_lifecycle.py [--quick] [--parts rss,cost,quality]
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DIM,
    SUPPORT,
    Workload,
    header,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    rss_bytes,
    setup_torch,
)

INTERVAL = 100
FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures",
                      "lifecycle_auc_memory.png")


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (said once) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def _table(policy: str | None):
    from recis.nn import HashTable
    from recis.nn.hashtable_hook import FilterHook
    from recis.optim import SparseAdagrad

    hook = FilterHook(policy, {"max_rows": SUPPORT}) if policy else None
    table = HashTable([DIM], name=f"t_{policy}", filter_hook=hook)
    return table, SparseAdagrad({table.name: table}, lr=0.01)


def cost(quick: bool) -> float:
    repeats, warmup = (5, 2) if quick else (20, 4)
    w = Workload()
    ids = torch.from_numpy(w.rank_ids.copy())
    tables = {p: _table(p) for p in (None, "LRU", "LFU")}
    for table, _ in tables.values():
        for i in range(0, ids.numel(), 200_000):
            part = ids[i:i + 200_000]
            table.insert(part, torch.randn(part.numel(), DIM) * 0.01)
    batch: dict[str, torch.Tensor] = {}

    def pick(_: int) -> None:
        batch["ids"] = w.cold_batch(0.05)[0]

    def step(policy):
        table, opt = tables[policy]

        def run() -> float:
            t0 = time.perf_counter()
            opt.zero_grad()
            table(batch["ids"]).sum().backward()
            opt.step()
            return time.perf_counter() - t0
        return run

    def filter_run(policy):
        table, _ = tables[policy]

        def run() -> float:
            t0 = time.perf_counter()
            table._filter_hook_impl.do_filter()
            return time.perf_counter() - t0
        return run

    samples = interleaved({"plain": step(None), "LRU": step("LRU"), "LFU": step("LFU")},
                          repeats, warmup, pick)
    filters = interleaved({"LRU filter": filter_run("LRU"), "LFU filter": filter_run("LFU")},
                          max(repeats // 4, 2), 1, lambda i: [step(p)() for p in ("LRU", "LFU")])
    plain = median(samples["plain"])
    rows, worst = [], 0.0
    for policy in ("LRU", "LFU"):
        extra = (paired_ratio(samples[policy], samples["plain"]) - 1.0) * plain
        filt = median(filters[f"{policy} filter"])
        share = (extra + filt / INTERVAL) / plain
        worst = max(worst, share)
        rows.append([policy, f"{median(samples[policy]) * 1e3:.1f}", f"{plain * 1e3:.1f}",
                     f"{extra * 1e3:+.2f}", f"{filt * 1e3:.1f}", f"{share * 100:.1f}%"])
    print(f"\n-- cost: 1M live IDs, dim {DIM}, SparseAdagrad, 5% new IDs per batch; a filter run "
          f"every {INTERVAL} steps brings the table back to {SUPPORT:,} rows")
    print_table(["policy", "step ms", "plain step ms", "bookkeeping ms", "filter run ms",
                 "cost per step"], rows)
    verdict = "PASS" if worst <= 0.05 else "FAIL"
    print(f"target eviction cost per step / train step at 1M live IDs (worst of LRU, LFU) "
          f"<= 5%: {worst * 100:.1f}% ({verdict})")
    return worst


def _train(filter_hook, filter_step, quick: bool) -> dict:
    from recis.datasets import SyntheticClickStream
    from recis.examples.deepfm_model import DeepFM
    from recis.framework import Trainer, TrainingArguments
    from recis.hooks.filter_hook import HashTableFilterHook
    from recis.nn import HashTable
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW

    torch.manual_seed(0)
    steps = 80 if quick else 400
    data = SyntheticClickStream(num_batches=steps, batch_size=1024, seed=0, drift=0.5,
                                vocab_per_field=100_000)
    model = DeepFM(data.fields, data.num_dense, filter_step=filter_step, seed=0,
                   filter_hook=filter_hook)
    hooks = [HashTableFilterHook(50, tables=[model])] if (filter_hook or filter_step) else []
    trainer = Trainer(model, TrainingArguments(train_steps=steps, log_steps=50,
                                               progress_bar=False),
                      data, data.held_out(5 if quick else 20), hooks=hooks,
                      dense_optimizers=(torch.optim.Adam(model.parameters(), lr=1e-3), None),
                      sparse_optimizer=SparseAdamW(filter_out_sparse_param(model), lr=1e-3,
                                                   weight_decay=0.0))
    trainer.train()
    auc = trainer.evaluate()["eval_auc"]
    tables = [m for m in model.modules() if isinstance(m, HashTable)]
    if filter_hook is not None:  # the cap as it stands after a filter run
        for t in tables:
            t._filter_hook_impl.do_filter()
    return {"auc": auc,
            "rows": max(len(t) for t in tables),
            "mib": sum(t.memory_bytes() for t in tables) / 2**20}


def quality(quick: bool) -> list[list]:
    from recis.nn.hashtable_hook import FilterHook

    runs = {"no eviction": _train(None, None, quick),
            "GlobalStepFilter(200)": _train(None, 200, quick)}
    full = runs["no eviction"]["rows"]
    for share in (0.5, 0.25):
        cap = int(full * share)
        for policy in ("LRU", "LFU"):
            hook = FilterHook(policy, {"max_rows": cap, "decay": 0.99} if policy == "LFU"
                              else {"max_rows": cap})
            runs[f"{policy} cap {share:.0%}"] = _train(hook, None, quick)
    rows = [[name, f"{r['auc']:.4f}", f"{r['rows']:,}", f"{r['mib']:.1f}"]
            for name, r in runs.items()]
    print(f"\n-- quality: DeepFM on the drifting synthetic stream ({'80' if quick else '400'} "
          "steps of 1024), eval AUC on held-out batches; rows of the largest table after a "
          "last filter run, and MiB held by all tables (their peak: blocks are reused, not "
          "returned); caps are shares of the no-eviction rows, LFU decay 0.99, filter runs "
          "every 50 steps")
    print_table(["eviction", "eval AUC", "rows (largest table)", "tables MiB"], rows)
    plt = _pyplot()
    if plt is None:
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in runs.items():
        ax.scatter(r["mib"], r["auc"])
        ax.annotate(name, (r["mib"], r["auc"]), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")
    ax.set(xlabel="tables MiB at the end", ylabel="eval AUC",
           title="DeepFM on the drifting stream: AUC against memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(FIGURE), exist_ok=True)
    fig.savefig(FIGURE, dpi=100)
    print(f"plot: {os.path.relpath(FIGURE)}")
    return rows


# label: (cap_on_insert, budget in MiB, steps); two budgets separate the budget's share of
# RSS from the fixed overhead (per-step working memory, allocator, the map's spare room)
RSS_VARIANTS = {"filter runs, 64 MiB": (False, 64, 5000),
                "filter runs, 128 MiB": (False, 128, 5000),
                "cap on insert, 64 MiB": (True, 64, 2000)}


def rss_trace(quick: bool, cap_on_insert: bool, budget_mib: int, steps: int) -> dict:
    """One RSS run (called in a fresh process, so that no other table's freed memory hides
    growth): the trace and the table's numbers."""
    import numpy as np

    from recis.nn import HashTable
    from recis.nn.hashtable_hook import FilterHook
    from recis.optim import SparseAdagrad

    budget = budget_mib * 2**20
    steps, per_step, new_share, every = (min(steps, 1000) if quick else steps), 4096, 0.1, 10

    def build(name):
        table = HashTable([DIM], name=name, filter_hook=FilterHook(
            "MemoryBudget", {"budget": budget, "cap_on_insert": cap_on_insert}))
        return table, SparseAdagrad({name: table}, lr=0.01)

    warm, warm_opt = build("warm")  # compiles the kernels before RSS is measured
    warm(torch.arange(per_step)).sum().backward()
    warm_opt.step()
    warm._filter_hook_impl.do_filter()
    del warm, warm_opt
    table, opt = build("rss")
    impl = table._filter_hook_impl
    rng = np.random.default_rng(0)
    fresh_per_step = int(per_step * new_share)
    base = rss_bytes()
    trace = []
    for step in range(steps):
        fresh = step * fresh_per_step + np.arange(fresh_per_step)
        old = (rng.integers(max(step - 100, 0), step + 1, per_step - fresh_per_step)
               * fresh_per_step + rng.integers(0, fresh_per_step, per_step - fresh_per_step))
        ids = torch.from_numpy(np.concatenate([fresh, old]))
        opt.zero_grad()
        table(ids).sum().backward()
        opt.step()
        impl.update_step()
        if step % every == every - 1:
            impl.do_filter()
            trace.append((step + 1, rss_bytes() - base, len(table), table.memory_bytes()))
    return {"budget": budget, "bytes_per_row": impl.bytes_per_row(), "steps": steps,
            "per_step": per_step, "new_share": new_share, "every": every, "trace": trace,
            "block_bytes": table.store.block_size * impl.bytes_per_row()}


def rss(quick: bool) -> None:
    """Each variant in its own process; RSS growth against ``1.1 x budget`` (the fixed
    overhead is the process before the table: growth is measured from there)."""
    import json
    import subprocess

    runs = {}
    for label, variant in RSS_VARIANTS.items():
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *(["--quick"] if quick else [])],
            env={**os.environ, "RECIS_BENCH_RSS_ONLY": json.dumps(variant)},
            capture_output=True, text=True, check=True)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    first = next(iter(runs.values()))
    print(f"\n-- rss: MemoryBudget ({first['bytes_per_row']} B a row), steps of "
          f"{first['per_step']} IDs ({first['new_share']:.0%} new, the rest from the last 100 "
          f"steps), a filter run every {first['every']}; each variant in a fresh process")
    for label, run in runs.items():
        trace = run["trace"]
        rows = [[s, f"{r / 2**20:.1f}", f"{n:,}", f"{m / 2**20:.1f}"]
                for s, r, n, m in trace[:: max(len(trace) // 10, 1)] + trace[-1:]]
        budget = run["budget"]
        print(f"\n{label} ({budget // run['bytes_per_row']:,} rows), {run['steps']} steps:")
        print_table(["step", "RSS growth MiB", "live rows", "table MiB"], rows)
        half = max(t[1] for t in trace[len(trace) // 2:])
        quarter = max(t[1] for t in trace[len(trace) // 4:len(trace) // 2])
        print(f"{label}: RSS growth, max over the 2nd quarter {quarter / 2**20:.1f} MiB, over "
              f"the 2nd half {half / 2**20:.1f} MiB (a plateau when equal or lower); table "
              f"bytes at the end {trace[-1][3] / 2**20:.1f} MiB; max RSS growth / budget "
              f"{max(t[1] for t in trace) / budget:.3f}")
    low, high = (runs[f"filter runs, {m} MiB"] for m in (64, 128))
    peak = [max(t[1] for t in r["trace"][len(r["trace"]) // 2:]) for r in (low, high)]
    slope = (peak[1] - peak[0]) / (high["budget"] - low["budget"])
    overhead = peak[0] - slope * low["budget"]
    print(f"RSS growth (2nd half's max) = {slope:.3f} x budget + {overhead / 2**20:.1f} MiB "
          f"fixed overhead, from the 64 and 128 MiB runs (target: <= 1.1 x budget + fixed)")
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (label, run), style in zip(runs.items(), ("-", "--", "-."), strict=True):
        trace = run["trace"]
        ax.plot([t[0] for t in trace], [t[1] / 2**20 for t in trace], style,
                label=f"RSS growth, {label}")
        ax.plot([t[0] for t in trace], [t[3] / 2**20 for t in trace], style, alpha=0.5,
                label=f"table bytes, {label}")
    for mib in (64, 128):
        ax.axhline(mib, color="gray", linestyle=":")
    ax.set(xlabel="step", ylabel="MiB", title="MemoryBudget under a drifting stream "
           "(dotted: budgets)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(os.path.dirname(FIGURE), "lifecycle_rss.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {os.path.relpath(path)}")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--parts", default="rss,cost,quality",
        help="comma-separated parts to run (rss and quality measure memory and AUC, not time, "
             "so they may run beside other work; cost must run alone)"))
    parts = set(args.parts.split(","))
    if parts - {"rss", "cost", "quality"}:
        sys.exit(f"--parts: expected rss, cost, quality; got {args.parts}")
    setup_torch()
    only = os.environ.get("RECIS_BENCH_RSS_ONLY")
    if only is not None:  # one RSS variant, in a process of its own (see rss)
        import json

        cap, mib, steps = json.loads(only)
        print(json.dumps(rss_trace(args.quick, cap, mib, steps)))
        return
    header("bench_lifecycle: eviction cost per step, RSS under a budget, quality under caps",
           args.quick, *((5, 2) if args.quick else (20, 4)))
    if "rss" in parts:
        rss(args.quick)  # each variant in its own process
    if "cost" in parts:
        cost(args.quick)
    if "quality" in parts:
        quality(args.quick)


if __name__ == "__main__":
    main()
