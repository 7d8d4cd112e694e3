"""Shared helpers of the benchmark scripts: workload, interleaved timing, tables, targets.

Every script measures candidates and baselines in the same process, alternating them inside
each repeat (the order rotates from one repeat to the next), and reports medians after a
warm-up. Absolute times drift on a shared machine; the ratios are what to compare across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import torch

SEED = 20240607
BATCH = 4096
IDS_PER_ROW = 20
N_IDS = BATCH * IDS_PER_ROW  # 81920 ID occurrences per batch
SUPPORT = 1_000_000
ZIPF_A = 0.9
DIM = 64

# A timed candidate returns its own elapsed seconds, so untimed setup can live inside it.
Timed = Callable[[], float]


def setup_torch() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(SEED)


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke run (few repeats)")
    if extra is not None:
        extra(p)
    return p.parse_args()


class Workload:
    """Zipf(0.9) over a finite support of ``SUPPORT`` ranks; rank r has probability ∝ 1/r^0.9.

    Ranks map to raw int64 IDs through fixed random 63-bit-ish hash values (distinct, spread
    over the whole int64 range, negative ones included), so IDs look like hashed feature IDs.
    """

    def __init__(self, seed: int = SEED, support: int = SUPPORT, a: float = ZIPF_A):
        self.rng = np.random.default_rng(seed)
        self.support = support
        w = 1.0 / np.arange(1, support + 1, dtype=np.float64) ** a
        self.cdf = np.cumsum(w)
        self.cdf /= self.cdf[-1]
        self.rank_ids = self._distinct_ids(support, set())
        self._used = set(self.rank_ids.tolist())

    def _distinct_ids(self, n: int, avoid: set) -> np.ndarray:
        info = np.iinfo(np.int64)
        out = np.unique(self.rng.integers(info.min, info.max, size=n, dtype=np.int64))
        out = np.array([x for x in out.tolist() if x not in avoid], dtype=np.int64)
        while out.size < n:  # collisions are astronomically rare; top up if any
            more = self.rng.integers(info.min, info.max, size=n - out.size, dtype=np.int64)
            out = np.unique(np.concatenate([out, [x for x in more.tolist() if x not in avoid]]))
        return self.rng.permutation(out[:n])

    def ranks(self, n: int = N_IDS) -> np.ndarray:
        """``n`` Zipf ranks in ``[0, support)`` (0 = most frequent)."""
        r = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return np.minimum(r, self.support - 1).astype(np.int64)

    def ids_of(self, ranks: np.ndarray) -> np.ndarray:
        return self.rank_ids[ranks]

    def fresh_ids(self, n: int) -> np.ndarray:
        """``n`` distinct IDs outside the support and never handed out before."""
        out = self._distinct_ids(n, self._used)
        self._used.update(out.tolist())
        return out

    def warm_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, ranks)`` of one batch, both flat int64 of length ``N_IDS``."""
        r = self.ranks()
        return torch.from_numpy(self.ids_of(r)), torch.from_numpy(r)

    def cold_batch(self, new_frac: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch whose ``new_frac`` of the ID occurrences are keys never seen before (each
        once, like tail IDs), shuffled among Zipf draws from the support. The returned ranks
        replace the new keys by uniform ranks (for baselines with a fixed-size table)."""
        n_new = int(round(N_IDS * new_frac))
        r = self.ranks(N_IDS)
        ids = self.ids_of(r)
        pos = self.rng.choice(N_IDS, size=n_new, replace=False)
        ids[pos] = self.fresh_ids(n_new)
        r[pos] = self.rng.integers(0, self.support, size=n_new)
        return torch.from_numpy(ids), torch.from_numpy(r)


def timed(fn: Callable[[], object]) -> Timed:
    """Wrap a callable so it returns its elapsed seconds."""

    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run


def interleaved(
    cands: dict[str, Timed],
    repeats: int,
    warmup: int,
    before_repeat: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Run every candidate once per repeat (rotating the order); return the timed samples.

    ``before_repeat(i)`` runs untimed before repeat ``i`` (e.g. to pick that repeat's batch).
    """
    names = list(cands)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + repeats):
        if before_repeat is not None:
            before_repeat(i)
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t = cands[name]()
            if i >= warmup:
                samples[name].append(t)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of ``a[i] / b[i]`` (both measured in the same repeat)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        pairs = enumerate(zip(vals, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in cells:
        print(line(r))


def target_line(label: str, value: float, op: str, bound: float, shown: str) -> bool:
    ok = value >= bound if op == ">=" else value <= bound
    print(f"target {label} {op} {shown}: {_fmt_value(value, shown)} ({'PASS' if ok else 'FAIL'})")
    return ok


def _fmt_value(value: float, shown: str) -> str:
    if shown.endswith("M keys/s"):
        return f"{value:.1f}M keys/s"
    if shown.endswith("x"):
        return f"{value:.2f}x"
    return f"{value:.3f}"


def rss_bytes(field: str = "VmRSS") -> int:
    """Resident set size (or ``VmHWM``, the peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def source_fingerprint() -> str:
    """Short sha256 of recis/**/*.py, to tell which version of the code produced a table."""
    import recis

    root = os.path.dirname(os.path.abspath(recis.__file__))
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(d, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def header(title: str, quick: bool, repeats: int, warmup: int) -> None:
    print(f"== {title}")
    print(f"recis sources sha256 {source_fingerprint()} ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"RECIS_KERNELS={os.environ.get('RECIS_KERNELS', 'numba')}, quick={quick}, "
        f"repeats={repeats} (+{warmup} warm-up), medians of interleaved repeats"
    )
    print(
        f"workload: batch {BATCH} x {IDS_PER_ROW} IDs (N={N_IDS}), Zipf({ZIPF_A}) over "
        f"{SUPPORT:,} ranks -> random int64 IDs, dim {DIM}, seed {SEED}"
    )


class Profiler:
    """Exclusive wall time of wrapped functions, per phase label (set ``phase`` as you go).

    Targets are ``(module, class or None, attribute)``; absent ones are skipped, so the list
    can name functions that only some versions of the code have. A module function is also
    replaced wherever a ``recis`` module imported it by name. Nested wrapped calls are
    subtracted from their caller (exclusive time); each thread has its own stack, so a call in
    a worker thread counts whole, in parallel with what the caller does meanwhile (shares of
    a phase can then add up to more than 100%).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.phase = ""
        self.phase_wall: dict[str, float] = defaultdict(float)  # filled by the caller
        self.excl: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._local = threading.local()

    @property
    def _stack(self) -> list[float]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _wrap(self, label: str, fn: Callable) -> Callable:
        prof = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            prof._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                children = prof._stack.pop()
                key = (prof.phase, label)
                prof.excl[key] += elapsed - children
                prof.calls[key] += 1
                if prof._stack:
                    prof._stack[-1] += elapsed

        return wrapper

    @contextlib.contextmanager
    def installed(self, targets: list[tuple[str, str | None, str]]) -> Iterator[None]:
        undo: list[tuple[object, str, object]] = []
        try:
            for modname, clsname, attr in targets:
                try:
                    mod = importlib.import_module(modname)
                except ImportError:
                    continue
                owner = getattr(mod, clsname, None) if clsname else mod
                orig = None if owner is None else vars(owner).get(attr)
                if not callable(orig):
                    continue
                label = f"{clsname or modname.rsplit('.', 1)[-1]}.{attr}"
                wrapped = self._wrap(label, orig)
                owners = [owner]
                if clsname is None:
                    owners += [
                        m for name, m in list(sys.modules.items())
                        if name.startswith("recis") and m is not mod
                        and getattr(m, attr, None) is orig
                    ]
                for o in owners:
                    undo.append((o, attr, orig))
                    setattr(o, attr, wrapped)
            yield
        finally:
            for o, attr, orig in reversed(undo):
                setattr(o, attr, orig)

    def table(self, steps: int, phases: tuple[str, ...]) -> list[list[str]]:
        """Rows ``[label, calls/step, ms/step, share of phase]``; needs ``phase_wall`` set."""
        rows = []
        for phase in phases:
            wall = self.phase_wall.get(phase, 0.0)
            rows.append([phase, "", f"{wall / steps * 1e3:.2f}", "100%"])
            items = sorted(((k[1], v) for k, v in self.excl.items() if k[0] == phase),
                           key=lambda kv: -kv[1])
            for label, t in items:
                rows.append([f"  {label}", f"{self.calls[(phase, label)] / steps:g}",
                             f"{t / steps * 1e3:.2f}", f"{t / wall:.0%}" if wall else "-"])
            rest = max(0.0, wall - sum(t for _, t in items))  # threads overlap: may be over
            rows.append(["  unattributed", "", f"{rest / steps * 1e3:.2f}",
                         f"{rest / wall:.0%}" if wall else "-"])
        return rows
