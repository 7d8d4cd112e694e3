"""Kernel threads vs torch's OpenMP pool: two workloads, each OMP_WAIT_POLICY, each dispatch.

The parallel table kernels run either on torch's own OpenMP threads (``RECIS_PARALLEL=omp``,
the default) or on a thread pool of their own (``RECIS_PARALLEL=pool``, the old dispatch).
libgomp's idle workers spin after each torch op unless ``OMP_WAIT_POLICY=PASSIVE`` was set
before torch started, so each dispatch is measured with the variable unset (libgomp's default)
and with PASSIVE. Workloads:

* ``deepfm``: the main job, ``python -m recis.examples.deepfm --steps 200`` (synthetic data;
  examples/s as it prints them). It runs through a wrapper that imports torch first, so the
  policy of the measured setting is in force even where ``recis/examples/deepfm.py`` sets
  ``OMP_WAIT_POLICY`` itself (libgomp reads the variable once, when torch loads it);
* ``step``: one train step of a ``DynamicEmbedding`` (dim 64, sum over bags of 4096 x 20
  Zipf IDs, see ``_common.py``) feeding a dense MLP 64 -> 256 -> 256 -> 1, with
  ``recis.optim.SparseAdamW`` and ``torch.optim.Adam``; median ms/step in the process.

Every measurement is a fresh subprocess; the four settings alternate within each run (the
order rotates from run to run). Printed: every figure, then speed ratios as the ratio of the
medians over runs [and the range of the per-run ratios]: policy unset vs PASSIVE for each
dispatch (the goal: within 10% for omp), omp vs pool, and omp vs the best old setting.

    PYTHONPATH=. python benchmarks/bench_threads.py [--runs 2] [--workloads deepfm,step]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
POLICIES = ("default", "PASSIVE")  # "default": OMP_WAIT_POLICY unset
DISPATCHES = ("pool", "omp")
SETTINGS = [(p, d) for p in POLICIES for d in DISPATCHES]
GOAL = 0.10  # default-policy vs PASSIVE, per workload, on the omp dispatch
QUIET_WAIT = [60.0]  # seconds to wait, at most, for an idle machine before a measurement

# Imports torch (hence libgomp, which reads OMP_WAIT_POLICY now) before the job module.
_DEEPFM = (
    "import runpy, sys, torch\n"
    "sys.argv = ['recis.examples.deepfm', *sys.argv[1:]]\n"
    "runpy.run_module('recis.examples.deepfm', run_name='__main__', alter_sys=True)\n"
)


def child_env(policy: str, dispatch: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["RECIS_PARALLEL"] = dispatch
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (stolen time included), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until the other processes use under ``threshold`` of a
    core over one second; returns that load (cores), the last one measured."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = _busy_seconds(), time.monotonic()
        time.sleep(1.0)
        load = (_busy_seconds() - b0) / (time.monotonic() - t0)
        if load < threshold or time.monotonic() > deadline:
            return load
        time.sleep(2.0)


_foreign: list[float] = []  # per measurement: CPU cores used by others while it ran


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    if QUIET_WAIT[0] > 0:
        wait_quiet(QUIET_WAIT[0])
    busy0, cpu0, wall0 = _busy_seconds(), _children_cpu(), time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)
    wall = time.monotonic() - wall0
    other = (_busy_seconds() - busy0) - (_children_cpu() - cpu0)
    _foreign.append(max(0.0, other / wall))
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{cmd} printed no JSON line:\n{proc.stdout}\n{proc.stderr}")


def measure_deepfm(policy: str, dispatch: str, steps: int) -> float:
    """examples/s of the main job."""
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as out:
        cmd = [sys.executable, "-c", _DEEPFM, "--steps", str(steps), "--output", out,
               "--no-progress"]
        return float(run_child(cmd, child_env(policy, dispatch), 900)["examples_per_second"])


def measure_step(policy: str, dispatch: str, steps: int) -> float:
    """Median ms per train step of the table + MLP workload."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-step", str(steps)]
    return float(run_child(cmd, child_env(policy, dispatch), 900)["ms_per_step"])


def child_step(steps: int) -> None:
    """The ``step`` workload, in this (fresh) process; prints one JSON line."""
    sys.path.insert(0, HERE)
    import torch
    from _common import BATCH, DIM, IDS_PER_ROW, Workload, setup_torch
    from torch import nn

    from recis._core.backends import omp as _omp
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW

    setup_torch()
    w = Workload()
    batches = [w.warm_batch()[0].view(BATCH, IDS_PER_ROW) for _ in range(8)]
    labels = (torch.rand(BATCH, 1) < 0.2).float()
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="ids"))
    mlp = nn.Sequential(nn.Linear(DIM, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 1))
    sparse = SparseAdamW(filter_out_sparse_param(emb), lr=1e-3)
    dense = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()

    def step(ids: torch.Tensor) -> None:
        sparse.zero_grad()
        dense.zero_grad()
        loss_fn(mlp(emb(ids)), labels).backward()
        sparse.step()
        dense.step()

    for ids in batches * 2:  # warm-up: every ID of the cycle is in the table afterwards
        step(ids)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"ms_per_step": round(1e3 * times[len(times) // 2], 3),
                      "mean_ms": round(1e3 * sum(times) / len(times), 3),
                      "omp_calls": _omp.calls, "dispatch": _omp.status()}), flush=True)


def fmt_range(xs: list[float], digits: int = 2) -> str:
    lo, hi = min(xs), max(xs)
    return f"{lo:.{digits}f}" if lo == hi else f"{lo:.{digits}f}-{hi:.{digits}f}"


def report(name: str, unit: str, higher_better: bool, results: dict) -> bool:
    """Print one workload's figures and speed ratios (higher: the first one is faster), as
    the ratio of the medians over runs and, in brackets, the range of the per-run ratios
    (both settings measured in the same run). True when the omp dispatch meets the goal, on
    the medians."""
    runs = len(next(iter(results.values())))
    print(f"\n== {name} ({unit}, {'higher' if higher_better else 'lower'} is better), "
          f"{runs} runs")
    for (policy, dispatch), xs in results.items():
        shown = ", ".join(f"{x:.1f}" if x >= 100 else f"{x:.2f}" for x in xs)
        print(f"  {dispatch:4s} OMP_WAIT_POLICY={policy:8s} {shown}  "
              f"(median {statistics.median(xs):.1f}, range {fmt_range(xs, 1)})")

    def speed(setting: tuple[str, str]) -> list[float]:  # per run, higher is better
        xs = results[setting]
        return xs if higher_better else [1.0 / x for x in xs]

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> tuple[float, str]:
        of_medians = statistics.median(speed(a)) / statistics.median(speed(b))
        per_run = [x / y for x, y in zip(speed(a), speed(b), strict=True)]
        return of_medians, f"{of_medians:.2f} [{fmt_range(per_run)}]"

    ok = True
    for dispatch in DISPATCHES:
        value, shown = ratio(("default", dispatch), ("PASSIVE", dispatch))
        line = f"  {dispatch}: speed with OMP_WAIT_POLICY unset / PASSIVE = {shown}"
        if dispatch == "omp":
            met = abs(value - 1.0) <= GOAL
            ok &= met
            line += f"  (goal within {GOAL:.0%}: {'met' if met else 'NOT met'})"
        print(line)
    for policy in POLICIES:
        print(f"  OMP_WAIT_POLICY={policy}: speed omp / pool = "
              f"{ratio((policy, 'omp'), (policy, 'pool'))[1]}")
    best = max((("default", "pool"), ("PASSIVE", "pool")),
               key=lambda s: statistics.median(speed(s)))
    for policy in POLICIES:
        print(f"  speed omp, OMP_WAIT_POLICY={policy} / best old setting (pool, {best[0]}) = "
              f"{ratio((policy, 'omp'), best)[1]}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="runs of every setting (default 2)")
    p.add_argument("--workloads", default="deepfm,step", help="comma-separated: deepfm,step")
    p.add_argument("--deepfm-steps", type=int, default=200)
    p.add_argument("--step-steps", type=int, default=40, help="timed steps of 'step'")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT[0],
                   help="before each measurement, wait up to this many seconds for other "
                        "processes to go idle (0: do not wait)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the short untimed run of each dispatch that fills numba's cache")
    p.add_argument("--child-step", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    QUIET_WAIT[0] = args.quiet_wait
    if args.child_step is not None:
        child_step(args.child_step)
        return
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    warm = {"deepfm": lambda pol, d: measure_deepfm(pol, d, 5),
            "step": lambda pol, d: measure_step(pol, d, 2)}
    specs = {
        "deepfm": (lambda pol, d: measure_deepfm(pol, d, args.deepfm_steps),
                   f"python -m recis.examples.deepfm --steps {args.deepfm_steps}",
                   "examples/s", True),
        "step": (lambda pol, d: measure_step(pol, d, args.step_steps),
                 "DynamicEmbedding(64) + MLP 64-256-256-1, SparseAdamW + Adam, 4096x20 IDs",
                 "ms/step", False),
    }
    unknown = set(workloads) - set(specs)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}")
    print(f"bench_threads: {os.cpu_count()} cpus, python {sys.version.split()[0]}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}; each figure a fresh process")
    all_ok = True
    for name in workloads:
        fn, title, unit, higher = specs[name]
        results: dict[tuple[str, str], list[float]] = {s: [] for s in SETTINGS}
        if args.warmup:  # numba compiles into its disk cache at first use: not in a figure
            for dispatch in DISPATCHES:
                warm[name]("default", dispatch)
        for r in range(args.runs):
            k = r % len(SETTINGS)
            for policy, dispatch in SETTINGS[k:] + SETTINGS[:k]:
                x = fn(policy, dispatch)
                results[(policy, dispatch)].append(x)
                print(f"  [{name} run {r + 1}] {dispatch} {policy}: {x:.2f} {unit} "
                      f"(other processes used {_foreign[-1]:.2f} cores meanwhile)", flush=True)
        all_ok &= report(title, unit, higher, results)
    print(f"\nother processes used {fmt_range(_foreign)} cores during the measurements "
          "(figures taken with more than ~0.1 are suspect)")
    print(f"\ngoal (omp dispatch: OMP_WAIT_POLICY unset vs PASSIVE within {GOAL:.0%} on every "
          f"workload, medians): {'met' if all_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
