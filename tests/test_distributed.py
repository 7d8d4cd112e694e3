"""Sharded training on 2 and 3 gloo processes started from pytest, each under a timeout:
the same tables and dense weights as one process on the concatenated batches, sharded
checkpoints loading N -> M, bit-exact resume, a failing rank, mismatched tables."""


import os

import pytest
import torch
from dist_scenarios import merged_table_states, run_ranks
from safetensors.torch import load_file

STEPS = 8


def _train(tmp_path, world, name, **kw):
    out = tmp_path / name
    out.mkdir()
    args = (str(out), kw.pop("steps", STEPS), 0, kw.pop("manager_dir", None),
            kw.pop("save_at", None), kw.pop("resume", False), kw.pop("device", "cpu"))
    failed = run_ranks("train", world, args, str(tmp_path), **kw)
    assert not failed, "\n".join(f"rank {r}: {e}" for r, e in failed.items())
    tables = merged_table_states([str(out / f"tables-{r}.safetensors") for r in range(world)])
    return tables, load_file(str(out / "dense.safetensors"))


def _assert_same(a, b, atol=2e-5, rtol=1e-4):
    assert set(a) == set(b)
    for key in a:
        if key.endswith(".ids") or key.endswith("step_filter"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("one"), 1, "w1")


@pytest.mark.parametrize("world", [2, 3])
def test_n_processes_train_as_one(tmp_path, one_process, world):
    tables, dense = _train(tmp_path, world, f"w{world}")
    ref_tables, ref_dense = one_process
    assert ref_tables["user.ids"].numel() > 10 and ref_tables["cat.ids"].numel() > 0
    _assert_same(ref_tables, tables)
    _assert_same(ref_dense, dense)


@pytest.mark.parametrize("saved, loaded", [(2, 1), (1, 2), (2, 3)])
def test_sharded_checkpoints_load_n_to_m(tmp_path, saved, loaded):
    ckpt = tmp_path / "ckpt"
    tables, _ = _train(tmp_path, saved, "train", manager_dir=str(ckpt), save_at=STEPS)
    out = tmp_path / "loaded"
    out.mkdir()
    failed = run_ranks("load_checkpoint", loaded, (str(out), str(ckpt)), str(tmp_path))
    assert not failed, failed
    back = merged_table_states([str(out / f"tables-{r}.safetensors") for r in range(loaded)])
    _assert_same(tables, back, atol=0, rtol=0)


def test_resume_on_n_processes_is_bit_exact(tmp_path):
    straight, straight_dense = _train(tmp_path, 2, "straight", steps=10)
    ckpt = tmp_path / "ckpt"
    _train(tmp_path, 2, "first", steps=6, manager_dir=str(ckpt), save_at=6)
    resumed, resumed_dense = _train(tmp_path, 2, "resumed", steps=10, manager_dir=str(ckpt),
                                    resume=True)
    _assert_same(straight, resumed, atol=0, rtol=0)
    _assert_same(straight_dense, resumed_dense, atol=0, rtol=0)


@pytest.mark.parametrize("saved, loaded", [(2, 2), (2, 1)])
def test_a_sharded_background_save_holds_the_state_at_its_step(tmp_path, saved, loaded):
    ckpt, out, back = tmp_path / "ckpt", tmp_path / "train", tmp_path / "loaded"
    out.mkdir()
    back.mkdir()
    failed = run_ranks("train_with_background_save", saved, (str(out), str(ckpt), 4, STEPS),
                       str(tmp_path))
    assert not failed, failed
    at_save = merged_table_states([str(out / f"at_save-{r}.safetensors") for r in range(saved)])
    failed = run_ranks("load_checkpoint", loaded, (str(back), str(ckpt)), str(tmp_path))
    assert not failed, failed
    restored = merged_table_states([str(back / f"tables-{r}.safetensors")
                                    for r in range(loaded)])
    _assert_same(at_save, restored, atol=0, rtol=0)


def test_a_failing_rank_stops_the_others(tmp_path):
    failed = run_ranks("failing_rank", 2, (), str(tmp_path), timeout=90,
                       collective_timeout=10)
    assert "rank 1 fails on purpose" in failed[1]
    assert 0 in failed and -1 not in failed, failed  # rank 0 errored, nobody hung


def test_ranks_with_different_tables_fail_at_the_first_lookup(tmp_path):
    failed = run_ranks("mismatched_tables", 2, (), str(tmp_path), timeout=90)
    for rank in (0, 1):
        assert "ranks look up different tables" in failed.get(rank, ""), failed


def _main_job(tmp_path, nproc, extra=()):
    import json
    import subprocess
    import sys

    out = tmp_path / f"job{nproc}"
    cmd = ["-m", "recis.examples.deepfm", "--steps", "24", "--batch-size", "256",
           "--eval-every", "12", "--eval-batches", "4", "--no-progress", "--output", str(out),
           *extra]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, done.stdout  # only rank 0 reports
    return json.loads(lines[0])


def test_the_main_job_under_torchrun_matches_one_process(tmp_path):
    one, two = _main_job(tmp_path, 1), _main_job(tmp_path, 2)
    assert two["processes"] == 2 and two["train_examples"] == one["train_examples"]
    assert two["live_ids"] == one["live_ids"]
    assert abs(two["eval_auc"] - one["eval_auc"]) < 1e-5
    assert abs(two["eval_logloss"] - one["eval_logloss"]) < 1e-5


def test_rank_rows_split_tensors_and_ragged_batches():
    from recis.distributed.data import rank_rows
    from recis.ragged.tensor import RaggedTensor

    batch = {"label": torch.arange(5), "ids": RaggedTensor(torch.arange(7),
                                                          torch.tensor([0, 2, 2, 5, 6, 7]))}
    parts = [rank_rows(batch, r, 2) for r in range(2)]
    assert [p["label"].tolist() for p in parts] == [[0, 1], [2, 3, 4]]  # shares differ by one
    assert parts[0]["ids"].values().tolist() == [0, 1]
    assert parts[1]["ids"].values().tolist() == [2, 3, 4, 5, 6]
    assert parts[1]["ids"].offsets()[0].tolist() == [0, 3, 4, 5]
    with pytest.raises(ValueError, match="at least the number of processes"):
        rank_rows({"label": torch.arange(1)}, 0, 2)


def test_one_ownership_rule_for_lookups_and_checkpoints():
    from recis.nn.modules.hashtable import gen_slice, in_slice, slice_index

    ids = torch.tensor([0, 1, -1, -2, 2**63 - 1, -(2**63), 65535, 65536, 123456789])
    for size in (65536, 1000):
        expect = [(int(i) % 2**64) % size for i in ids]  # the ID as uint64, mod size
        assert slice_index(ids, size).tolist() == expect
        owners = torch.zeros(ids.numel(), dtype=torch.int64)
        for k in range(3):
            owners += k * in_slice(ids, gen_slice(k, 3, size))
        ends = [gen_slice(k, 3, size).slice_end for k in range(3)]
        assert owners.tolist() == [sum(e <= x for e in ends) for x in expect]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for nccl")
def test_nccl_processes_on_gpus_train_as_one(tmp_path, one_process):
    tables, dense = _train(tmp_path, 2, "nccl", backend="nccl", device="cuda")
    ref_tables, ref_dense = one_process
    _assert_same(ref_tables, tables, atol=1e-4, rtol=1e-3)
    _assert_same(ref_dense, dense, atol=1e-4, rtol=1e-3)


def test_a_pg_passed_in_the_option_is_used(tmp_path):
    failed = run_ranks("explicit_pg", 2, (str(tmp_path),), str(tmp_path))
    assert not failed, failed


def test_a_rank_dying_mid_save_leaves_the_previous_checkpoint(tmp_path):
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.serialize import Loader

    ckpt = tmp_path / "ckpt"
    failed = run_ranks("dying_saver", 2, (str(ckpt),), str(tmp_path), timeout=120,
                       collective_timeout=10)
    assert 1 in failed and -1 not in failed, failed  # rank 1 died, rank 0 did not hang
    latest = CheckpointManager(torch.nn.Module(), output_dir=str(ckpt)).latest()
    assert latest is not None and latest.endswith("ckpt_000000001")
    assert sorted(os.listdir(ckpt)) in (["ckpt_000000001", "latest"],
                                        [".ckpt_000000002.partial", "ckpt_000000001", "latest"])
    Loader(latest, {}, strict=False).load()  # complete and checked


CRITEO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "criteo-sample")


@pytest.mark.skipif(not os.path.isdir(CRITEO), reason="../shared/data/criteo-sample is absent")
def test_the_main_job_on_files_under_torchrun_matches_one_process(tmp_path):
    files = ["--data", os.path.join(CRITEO, "part-0.orc"),
             "--eval-data", os.path.join(CRITEO, "part-5.orc")]
    one, two = _main_job(tmp_path, 1, files), _main_job(tmp_path, 2, files)
    assert two["processes"] == 2 and two["train_examples"] == one["train_examples"] > 0
    assert two["live_ids"] == one["live_ids"]
    assert abs(two["eval_auc"] - one["eval_auc"]) < 1e-5


def _owner_of(world: int):
    """The rank that owns an ID among ``world`` shards (the 65536-slice rule)."""
    from recis.nn.modules.hashtable import gen_slice, slice_index

    ends = torch.tensor([gen_slice(k, world, 65536).slice_end for k in range(world)])
    return lambda i: int(torch.bucketize(slice_index(torch.tensor([i]), 65536), ends,
                                         right=True))


def test_each_rank_keeps_its_engine_budget_over_its_own_shards(tmp_path):
    """EmbeddingEngine(memory_budget=...) on 2 processes: each rank removes, from its shards of
    both tables, what one LFU order over its own rows removes (reference below)."""
    import json

    from dist_scenarios import lru_batch

    steps, budget, every, world = 15, 9000, 3, 2
    failed = run_ranks("sharded_engine_budget", world, (str(tmp_path), steps, budget, every),
                       str(tmp_path))
    assert not failed, failed
    owner = _owner_of(world)

    removed_any = False
    for rank in range(world):
        held = json.loads((tmp_path / f"{rank}.json").read_text())
        sizes = held["bytes_per_row"]
        rows: list[dict[int, list[int]]] = [{}, {}]  # table -> ID -> [count, last touch]
        for step in range(steps):  # the LFU clock is the step
            batches = [lru_batch(step, r) for r in range(world)]
            for table, ids in enumerate(({i for b in batches for i in b},
                                         {i for b in batches for i in b[::2]})):
                for i in ids:
                    if owner(i) == rank:
                        count = rows[table].get(i, [0, 0])[0]
                        rows[table][i] = [count + 1, step]
            if step % every == every - 1:
                used = sum(len(r) * b for r, b in zip(rows, sizes, strict=True))
                order = sorted((c, last, t, i) for t in range(2)
                               for i, (c, last) in rows[t].items())
                for *_, t, i in order:
                    if used <= budget:
                        break
                    del rows[t][i]
                    used -= sizes[t]
                    removed_any = True
        for table in range(2):
            assert sorted(held["ids"][table]) == sorted(rows[table]), (rank, table)
        assert sum(len(ids) * b for ids, b in zip(held["ids"], sizes, strict=True)) <= budget
    assert removed_any


def test_each_rank_enforces_lru_on_its_own_shard(tmp_path):
    import json

    from dist_scenarios import lru_batch

    steps, max_rows, every, world = 14, 12, 3, 2
    failed = run_ranks("sharded_lru", world, (str(tmp_path), steps, max_rows, every),
                       str(tmp_path))
    assert not failed, failed
    owner = _owner_of(world)

    for rank in range(world):  # the owner sees one lookup per step: every rank's IDs it owns
        stamp: dict[int, int] = {}
        clock = 0
        for step in range(steps):
            mine = {i for r in range(world) for i in lru_batch(step, r) if owner(i) == rank}
            if mine:
                clock += 1
                stamp.update(dict.fromkeys(mine, clock))
            if step % every == every - 1 and len(stamp) > max_rows:
                for i in sorted(stamp, key=lambda i: (stamp[i], i))[:len(stamp) - max_rows]:
                    del stamp[i]
        held = json.loads((tmp_path / f"{rank}.json").read_text())
        assert sorted(held) == sorted(stamp), rank
