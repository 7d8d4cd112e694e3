"""Checkpoint save/load throughput vs plain safetensors, incremental size, non-blocking saves.

Tables: ``HashTable([64])`` holding 1M distinct random int64 IDs (inserted in chunks of 200k)
with ``recis.optim.SparseAdam`` state, so every row has three float32 [64] slots
(``embedding``, ``sparse_adam_exp_avg``, ``sparse_adam_exp_avg_sq``), all filled with random
values; and a 10M-ID table of dim 16 **without** optimizer state (embedding only: 10M x 72
bytes = 720 MB of tensor data; with Adam it would hold 2 GB and, with the baseline's copy and
the loaded table, need ~8 GB on a machine shared by several people). ``--quick`` uses a tenth
of each (100k and 1M IDs). Candidates, interleaved inside every repeat (order rotated),
medians reported; the save repeats run first, then the load repeats (a load frees about a
gigabyte that this VM hands back to its host; a save right after it pays for faulting its page
cache back in, which made the save ratio depend on the order of the repeat):

* ours, save: ``Saver(path=new_dir, hashtables={"t": ht}).save()`` (a checkpoint directory:
  safetensors + index.json with CRC-32s, every file fsynced, atomic rename). Before every
  timed save (ours and the baseline's) an untimed ``os.sync()`` drains the disk's queue, so
  no save waits for the writeback of the one before it, and the saved files are kept until
  all save repeats are done (the disk is mounted with ``discard``: a 0.7 GB file deleted just
  before a save made that save 0.5-1.3 s slower, whichever candidate came next);
* ours, load: ``Loader(ckpt, {"t": ht2}).load()`` into a fresh table with the same slots
  (creating the table is untimed; the load verifies sizes and CRC-32s, then replaces the
  contents);
* baseline, save: the same tensors as they come out of the table (``ids_map()``, then
  ``slot_values(name, rows)`` per slot; gathered once, untimed) written by
  ``safetensors.torch.save_file`` into the same temp dir, timed without and with an
  ``os.fsync`` of the file afterwards. Ours fsyncs, so the target compares against the
  fsynced variant; the ratio vs the plain ``save_file`` is shown for information;
* baseline, load: ``safetensors.torch.load_file``. Its default ``backend="mmap"`` returns
  tensors backed by a lazy mmap and reads nothing (shown for information only); the target
  compares against ``backend="pread"``, which reads every byte into memory, as ours does.
  ``load_file`` (mmap) followed by ``.clone()`` of every tensor is shown for information.

Loads read a checkpoint and a baseline file written once before the repeats; all of them come
from the page cache (the VM has far more RAM than the files), so loads measure CPU work, not
the disk. Each save writes a new path (a Saver never overwrites); all are deleted after the
last save repeat (see above).

MB/s = bytes of tensor data (IDs + slots; 1M x (8 + 3 x 256) bytes = 776 MB, 1 MB = 10^6
bytes) / seconds; rows/s = IDs / seconds. Targets, for both tables: ours/baseline throughput
>= 0.9 for save and >= 0.8 for load.

Incremental save (1M table): after a full save, one training step (lookup + backward +
SparseAdam step) on 5% of the table's IDs (50k distinct, uniform), then
``Saver(...).save(incremental=True, base=<full dir name>)``; its size on disk (sum of its
files) against the full checkpoint's (target <= 10%). The chain (full + delta) is loaded into
a fresh table and checked equal to the original (IDs, rows and every slot).

Non-blocking saves (1M table, ``CheckpointManager``): the time ``save(step,
blocking=False)`` takes to return (it copies the state into buffers kept from the previous
snapshot, then a thread writes) against a blocking ``save(step)``, interleaved, after one
untimed non-blocking save that allocates the buffers (target: <= 0.10). Then the train-step
slowdown while a background save is written: SparseAdam steps on batches of the issue's
workload (4096 x 20 Zipf IDs over the table's IDs) timed alone and while a background save
runs (median step time during / alone; information, no target: on 2 cores the writer's CRC
and copies into the page cache compete with the step). Finally, one untimed pass wraps the
save/load functions to show where their time goes (exclusive time per function).

    PYTHONPATH=. python benchmarks/bench_checkpoint.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import safetensors
import torch
from _common import (
    DIM,
    N_IDS,
    SEED,
    Profiler,
    Workload,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    source_fingerprint,
    target_line,
)
from safetensors.torch import load_file, save_file

from recis.framework.checkpoint_manager import CheckpointManager
from recis.nn import HashTable
from recis.optim import SparseAdam
from recis.serialize import Loader, Saver
from recis.serialize._files import fsync_path

N_ROWS = 1_000_000
N_LARGE, DIM_LARGE = 10_000_000, 16
FILL_CHUNK = 200_000
TOUCH_FRAC = 0.05
TARGET_SAVE = 0.9
TARGET_LOAD = 0.8
TARGET_DELTA = 0.10
TARGET_BLOCKING = 0.10
TRAIN_STEPS = 12

PROFILE_TARGETS = [
    ("recis.serialize.checkpoint", None, "_read_sparse"),
    ("recis.serialize.checkpoint", None, "_restore_exact"),
    ("recis.serialize.checkpoint", None, "_restore_by_id"),
    ("recis.serialize.checkpoint", "Saver", "_publish"),
    ("recis.serialize._files", None, "write_safetensors"),
    ("recis.serialize._files", None, "read_safetensors"),
    ("recis.serialize._files", None, "atomic_write_bytes"),
    ("recis.serialize._files", None, "crc32_parallel"),
    ("os", None, "fsync"),
    ("recis.serialize.checkpoint", None, "_storage_pieces"),
    ("recis.serialize.checkpoint", "Saver", "_capture"),
    ("recis._core.store", "TableStore", "clear"),
    ("recis._core.store", "TableStore", "take_changes"),
    ("recis._core.store", "TableStore", "mark_saved"),
    ("recis._core.id_map", "IdMap", "items"),
    ("recis._core.id_map", "IdMap", "ids_by_row"),
    ("recis._core.id_map", "IdMap", "live_rows"),
    ("recis._core.id_map", "IdMap", "restore"),
    ("recis.serialize.checkpoint", "_SoleOwner", "of"),
    ("recis.serialize.checkpoint", "_SoleOwner", "live"),
    ("recis._core.slots", "SlotStore", "gather"),
    ("recis._core.slots", "SlotStore", "scatter"),
]


def distinct_ids(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    info = np.iinfo(np.int64)
    ids = np.unique(rng.integers(info.min, info.max, size=n + n // 100, dtype=np.int64))
    assert ids.size >= n
    return torch.from_numpy(rng.permutation(ids)[:n].copy())


def make_table(ids: torch.Tensor, gen: torch.Generator, dim: int = DIM, adam: bool = True
               ) -> tuple[HashTable, SparseAdam | None]:
    ht = HashTable([dim], name="t")
    opt = SparseAdam([ht], lr=1e-3) if adam else None
    for i in range(0, ids.numel(), FILL_CHUNK):
        part = ids[i : i + FILL_CHUNK]
        ht.insert(part, torch.randn(part.numel(), dim, generator=gen))
    _, rows = ht.ids_map()
    for name in ht.slot_names:
        if name == "embedding":
            continue
        for i in range(0, rows.numel(), FILL_CHUNK):
            r = rows[i : i + FILL_CHUNK]
            values = torch.randn(r.numel(), dim, generator=gen)
            ht.set_slot_values(name, r, values.abs_() if name.endswith("_sq") else values)
    return ht, opt


def table_tensors(ht: HashTable) -> dict[str, torch.Tensor]:
    """The table as plain tensors, in row order: ``{"id": ..., slot: ...}``."""
    ids, rows = ht.ids_map()
    return {"id": ids, **{name: ht.slot_values(name, rows) for name in ht.slot_names}}


def fresh_table(dim: int = DIM, adam: bool = True) -> HashTable:
    ht = HashTable([dim], name="t")
    if adam:
        SparseAdam([ht], lr=1e-3)  # creates the same slots
    return ht


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def same_contents(a: HashTable, b: HashTable) -> bool:
    ta, tb = table_tensors(a), table_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    repeats, warmup = (2, 1) if args.quick else (5, 1)
    scale = 10 if args.quick else 1
    n_rows, n_large = N_ROWS // scale, N_LARGE // scale

    print("== bench_checkpoint: Saver/Loader vs safetensors save_file/load_file "
          f"({n_rows:,} IDs x dim {DIM} + Adam state; {n_large:,} IDs x dim {DIM_LARGE}), "
          "non-blocking saves")
    print(f"recis sources sha256 {source_fingerprint()} ({time.strftime('%Y-%m-%d %H:%M %Z')})")
    print(f"torch {torch.__version__}, safetensors {safetensors.__version__}, threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, quick={args.quick}, "
          f"repeats={repeats} (+{warmup} warm-up), medians of interleaved repeats")

    tmp = tempfile.mkdtemp(prefix="recis_bench_ckpt_", dir="/tmp")
    targets = []
    try:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(SEED)
        ht, opt = make_table(distinct_ids(n_rows, SEED), gen)
        print(f"table filled in {time.perf_counter() - t0:.1f} s: {len(ht):,} IDs, slots "
              f"{ht.slot_names}")
        label = f"{n_rows / 1e6:g}M x {DIM} Adam"
        targets += compare(ht, tmp, repeats, warmup, label, DIM, adam=True)
        targets += incremental(ht, opt, tmp)
        targets += non_blocking(ht, opt, tmp, repeats, warmup)
        profile(ht, tmp)
        del ht, opt

        t0 = time.perf_counter()
        ht, _ = make_table(distinct_ids(n_large, SEED + 2), gen, DIM_LARGE, adam=False)
        print(f"large table filled in {time.perf_counter() - t0:.1f} s: {len(ht):,} IDs, "
              f"slots {ht.slot_names}")
        label = f"{n_large / 1e6:g}M x {DIM_LARGE}"
        targets += compare(ht, tmp, repeats, warmup, label, DIM_LARGE, adam=False)
        del ht
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("== targets")
    for args_ in targets:
        target_line(*args_)


def compare(ht: HashTable, tmp: str, repeats: int, warmup: int, label: str, dim: int,
            adam: bool) -> list[tuple]:
    """Save and load throughput of ours vs safetensors on ``ht``; the target lines."""
    base_tensors = table_tensors(ht)
    data_bytes = sum(t.numel() * t.element_size() for t in base_tensors.values())
    n_rows = len(ht)
    src_ckpt = os.path.join(tmp, "src_ckpt")  # load sources, written once (untimed)
    Saver(path=src_ckpt, hashtables={"t": ht}).save()
    src_file = os.path.join(tmp, "src.safetensors")
    save_file(base_tensors, src_file)
    fsync_path(src_file)
    print(f"-- {label}: tensor data {data_bytes / 1e6:.1f} MB; full checkpoint "
          f"{dir_bytes(src_ckpt) / 1e6:.1f} MB on disk, baseline file "
          f"{os.path.getsize(src_file) / 1e6:.1f} MB ({tmp}, "
          f"{os.statvfs(tmp).f_bavail * os.statvfs(tmp).f_frsize / 2**30:.0f} GiB free)")

    extra: dict[str, list[float]] = {"save_file (no fsync)": []}
    counter = [0]
    checked = []

    # Saves keep their output until every save repeat is done: this disk is mounted with
    # `discard`, and a file deleted just before a save made that save 0.5-1.3 s slower
    saved = os.path.join(tmp, "saved")
    os.makedirs(saved)

    def ours_save() -> float:
        counter[0] += 1
        path = os.path.join(saved, f"ckpt_{counter[0]:03d}")
        os.sync()  # no save waits for the writeback of the one before it
        t = time.perf_counter()
        Saver(path=path, hashtables={"t": ht}).save()
        return time.perf_counter() - t

    def base_save() -> float:
        counter[0] += 1
        path = os.path.join(saved, f"base_{counter[0]:03d}.safetensors")
        os.sync()
        t = time.perf_counter()
        save_file(base_tensors, path)
        t_write = time.perf_counter() - t
        fsync_path(path)
        elapsed = time.perf_counter() - t
        extra["save_file (no fsync)"].append(t_write)
        return elapsed

    def ours_load() -> float:
        ht2 = fresh_table(dim, adam)
        t = time.perf_counter()
        Loader(src_ckpt, {"t": ht2}).load()
        elapsed = time.perf_counter() - t
        if not checked:
            checked.append(torch.equal(ht2.ids(), ht.ids())
                           and torch.equal(ht2.embeddings(), ht.embeddings())
                           and same_contents(ht2, ht))
        del ht2
        return elapsed

    def base_load_pread() -> float:
        t = time.perf_counter()
        out = load_file(src_file, backend="pread")
        elapsed = time.perf_counter() - t
        assert torch.equal(out["id"], base_tensors["id"])
        return elapsed

    def base_load_mmap() -> float:
        t = time.perf_counter()
        out = load_file(src_file)
        elapsed = time.perf_counter() - t
        del out
        return elapsed

    def base_load_mmap_clone() -> float:
        t = time.perf_counter()
        out = {k: v.clone() for k, v in load_file(src_file).items()}
        elapsed = time.perf_counter() - t
        del out
        return elapsed

    saves = {"ours Saver.save (fsync)": ours_save, "save_file + fsync": base_save}
    loads = {
        "ours Loader.load (CRC check)": ours_load,
        "load_file pread": base_load_pread,
        "load_file mmap (lazy, reads nothing)": base_load_mmap,
        "load_file mmap + clone": base_load_mmap_clone,
    }
    t0 = time.perf_counter()
    # saves, then loads: a load frees ~1 GB that this VM hands back to its host, and the
    # next save's page cache faults it in again, so mixing them made saves depend on order
    samples = interleaved(saves, repeats, warmup)
    shutil.rmtree(saved)
    os.sync()
    samples.update(interleaved(loads, repeats, warmup))
    samples["save_file (no fsync)"] = extra["save_file (no fsync)"][warmup:]
    print(f"timed {warmup + repeats} interleaved repeats in {time.perf_counter() - t0:.0f} s; "
          f"loaded contents equal to the table (ids and every slot): "
          f"{'yes' if checked and checked[0] else 'NO'}")
    for name in ("ours Saver.save (fsync)", "save_file + fsync", "ours Loader.load (CRC check)",
                 "load_file pread"):
        print(f"  {name}: {' '.join(f'{s:.2f}' for s in samples[name])} s by repeat")

    order = ["ours Saver.save (fsync)", "save_file + fsync", "save_file (no fsync)",
             "ours Loader.load (CRC check)", "load_file pread", "load_file mmap + clone",
             "load_file mmap (lazy, reads nothing)"]
    ref = {"save": "ours Saver.save (fsync)", "load": "ours Loader.load (CRC check)"}
    rows = []
    for name in order:
        sec = median(samples[name])
        kind = "save" if "save" in name.lower() else "load"
        ratio = "-"
        if name != ref[kind]:
            ratio = f"{paired_ratio(samples[name], samples[ref[kind]]):.2f}"
        rows.append([name, f"{sec:.3f}", f"{data_bytes / 1e6 / sec:,.0f}",
                     f"{n_rows / sec / 1e6:.2f}M", ratio])
    print_table(["candidate", "median s", "MB/s", "rows/s", "ours thrpt / this"], rows)
    print("(ours thrpt / this = median over repeats of this candidate's time / ours in the same "
          "repeat; >= 1 means ours is at least as fast)")
    info_save = paired_ratio(samples["save_file (no fsync)"], samples["ours Saver.save (fsync)"])
    info_load = paired_ratio(samples["load_file mmap + clone"],
                             samples["ours Loader.load (CRC check)"])
    print(f"info: save ours / save_file without fsync {info_save:.2f}x; load ours / load_file "
          f"mmap + clone {info_load:.2f}x; correctness: "
          f"{'ok' if checked and checked[0] else 'MISMATCH'}")
    print()
    shutil.rmtree(src_ckpt)
    os.remove(src_file)
    save_ratio = paired_ratio(samples["save_file + fsync"], samples["ours Saver.save (fsync)"])
    load_ratio = paired_ratio(samples["load_file pread"], samples["ours Loader.load (CRC check)"])
    return [(f"{label}: save throughput ours / save_file+fsync", save_ratio, ">=", TARGET_SAVE,
             f"{TARGET_SAVE}x"),
            (f"{label}: load throughput ours / load_file(pread)", load_ratio, ">=", TARGET_LOAD,
             f"{TARGET_LOAD}x")]


def incremental(ht: HashTable, opt: SparseAdam, tmp: str) -> list[tuple]:
    """Size of an incremental save after a step on 5% of the IDs; the chain loads equal."""
    full_dir = os.path.join(tmp, "inc_full")
    Saver(path=full_dir, hashtables={"t": ht}).save()
    ids = ht.ids()
    pick = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(SEED + 1))
    touched = ids[pick[: int(ids.numel() * TOUCH_FRAC)]]
    opt.zero_grad()
    ht(touched).sum().backward()
    opt.step()
    opt.zero_grad()
    written = ht.store.changes().rows.numel()
    delta_dir = os.path.join(tmp, "inc_delta")
    t = time.perf_counter()
    Saver(path=delta_dir, hashtables={"t": ht}).save(incremental=True,
                                                     base=os.path.basename(full_dir))
    t_delta = time.perf_counter() - t
    inc_full, inc_delta = dir_bytes(full_dir), dir_bytes(delta_dir)
    ht3 = fresh_table()
    t = time.perf_counter()
    Loader(delta_dir, {"t": ht3}).load()
    t_chain = time.perf_counter() - t
    chain_ok = same_contents(ht3, ht) and torch.equal(ht3.snapshot()[2], ht.snapshot()[2])
    del ht3
    shutil.rmtree(full_dir)
    shutil.rmtree(delta_dir)
    print(f"-- incremental: one SparseAdam step on {touched.numel():,} IDs "
          f"({TOUCH_FRAC:.0%}); rows written since the full save: {written:,}")
    print_table(["checkpoint", "MB on disk", "share of full", "save s"], [
        ["full", f"{inc_full / 1e6:.1f}", "100%", "-"],
        ["incremental (delta)", f"{inc_delta / 1e6:.1f}", f"{inc_delta / inc_full:.1%}",
         f"{t_delta:.3f}"],
    ])
    print(f"load of the chain (full + delta) into a fresh table: {t_chain:.3f} s; equal to the "
          f"table (ids, rows, all slots): {'yes' if chain_ok else 'NO'}")
    print()
    return [(f"incremental save after a {TOUCH_FRAC:.0%} step / full save", inc_delta / inc_full,
             "<=", TARGET_DELTA, f"{TARGET_DELTA}")]


def non_blocking(ht: HashTable, opt: SparseAdam, tmp: str, repeats: int, warmup: int
                 ) -> list[tuple]:
    """Time to return of a non-blocking save vs a blocking one; train-step slowdown while a
    background save is written."""
    out = os.path.join(tmp, "manager")
    manager = CheckpointManager(ht, opt, output_dir=out, max_keep=2)
    step = [0]

    def save(blocking: bool) -> float:
        step[0] += 1
        t = time.perf_counter()
        manager.save(step[0], blocking=blocking)
        elapsed = time.perf_counter() - t
        manager.wait()  # the next candidate starts with no save running
        return elapsed

    save(blocking=False)  # allocates the snapshot buffers (kept for the next saves)
    samples = interleaved({"save(blocking=True)": lambda: save(True),
                           "save(blocking=False) returns": lambda: save(False)},
                          repeats, warmup)
    blocking_ratio = paired_ratio(samples["save(blocking=False) returns"],
                                  samples["save(blocking=True)"])

    workload = Workload(support=len(ht))
    workload.rank_ids = ht.ids().numpy()  # Zipf over the table's IDs: lookups hit rows

    def train_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            ids = torch.from_numpy(workload.ids_of(workload.ranks()))
            t = time.perf_counter()
            opt.zero_grad()
            ht(ids).sum().backward()
            opt.step()
            times.append(time.perf_counter() - t)
        return times

    train_steps(2)  # warm-up
    alone, during, saves = [], [], 0
    for _ in range(repeats):
        alone += train_steps(TRAIN_STEPS)
        step[0] += 1
        manager.save(step[0], blocking=False)
        while manager.saving:
            during += train_steps(1)
        manager.wait()
        saves += 1
    slowdown = median(during) / median(alone) if during else float("nan")
    print(f"-- non-blocking saves ({len(ht):,} IDs x {DIM} + Adam, CheckpointManager)")
    print_table(["candidate", "median s", "share of a blocking save"], [
        ["save(blocking=True)", f"{median(samples['save(blocking=True)']):.3f}", "100%"],
        ["save(blocking=False) returns",
         f"{median(samples['save(blocking=False) returns']):.3f}", f"{blocking_ratio:.1%}"],
    ])
    print(f"train step (SparseAdam, {N_IDS:,} Zipf IDs): alone {median(alone) * 1e3:.1f}"
          f" ms (median of {len(alone)}), during a background save "
          f"{median(during) * 1e3 if during else float('nan'):.1f} ms (median of {len(during)} "
          f"steps over {saves} saves): slowdown {slowdown:.2f}x")
    print()
    shutil.rmtree(out, ignore_errors=True)
    return [("non-blocking save: time to return / blocking save", blocking_ratio, "<=",
             TARGET_BLOCKING, f"{TARGET_BLOCKING}")]


def profile(ht: HashTable, tmp: str) -> None:
    """Where one save and one load spend their time (exclusive time of wrapped functions)."""
    src = os.path.join(tmp, "prof_src")
    Saver(path=src, hashtables={"t": ht}).save()
    prof = Profiler()
    with prof.installed(PROFILE_TARGETS):
        prof.phase = "save"
        path = os.path.join(tmp, "prof_ckpt")
        t = time.perf_counter()
        Saver(path=path, hashtables={"t": ht}).save()
        prof.phase_wall["save"] = time.perf_counter() - t
        shutil.rmtree(path)
        ht2 = fresh_table()
        prof.phase = "load"
        t = time.perf_counter()
        Loader(src, {"t": ht2}).load()
        prof.phase_wall["load"] = time.perf_counter() - t
        del ht2
    shutil.rmtree(src)
    print("-- phase breakdown of one save and one load (exclusive time of wrapped functions)")
    print_table(["phase / function", "calls", "ms", "share"], prof.table(1, ("save", "load")))
    print()


if __name__ == "__main__":
    main()
