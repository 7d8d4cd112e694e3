"""Table lifecycle: what capacity eviction costs per step, and what it does to model quality.

* **cost**: one table of 1M live IDs (dim 64, SparseAdagrad), batches of the issue's workload
  with 5% of the occurrences new IDs (so the table keeps growing past its cap). Per step:
  the train step with no policy, with LRU and with LFU attached (their per-lookup
  bookkeeping), and a filter run (``do_filter``) that brings the table back to 1M rows,
  amortised over a filter interval of 100 steps. Eviction cost per step = the policy's extra
  step time + filter run / 100, as a share of the plain step (target <= 5%).
* **quality**: the main job's DeepFM on the synthetic drifting stream (400 steps of 1024,
  seed 0), evaluated on held-out batches, under no eviction, GlobalStepFilter(200), and LRU /
  LFU capped at 50% and 25% of the rows the table holds without eviction (filter every 50
  steps): eval AUC against the tables' memory, as a table and a plot
  (``benchmarks/figures/lifecycle_auc_memory.png``).

    PYTHONPATH=. python benchmarks/bench_lifecycle.py [--quick]
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
    setup_torch,
)

INTERVAL = 100
FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures",
                      "lifecycle_auc_memory.png")


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
    header("bench_lifecycle: eviction cost per step and model quality under caps", quick,
           repeats, warmup)
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
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


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    setup_torch()
    cost(args.quick)
    quality(args.quick)


if __name__ == "__main__":
    main()
