"""Sharded training on 2 and 3 gloo processes started from pytest, each under a timeout:
the same tables and dense weights as one process on the concatenated batches, sharded
checkpoints loading N -> M, bit-exact resume, a failing rank, mismatched tables."""


import pytest
import torch
from dist_scenarios import merged_table_states, run_ranks
from safetensors.torch import load_file

STEPS = 8


def _train(tmp_path, world, name, **kw):
    out = tmp_path / name
    out.mkdir()
    args = (str(out), kw.pop("steps", STEPS), 0, kw.pop("manager_dir", None),
            kw.pop("save_at", None), kw.pop("resume", False))
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


def test_a_failing_rank_stops_the_others(tmp_path):
    failed = run_ranks("failing_rank", 2, (), str(tmp_path), timeout=90,
                       collective_timeout=10)
    assert "rank 1 fails on purpose" in failed[1]
    assert 0 in failed and -1 not in failed, failed  # rank 0 errored, nobody hung


def test_ranks_with_different_tables_fail_at_the_first_lookup(tmp_path):
    failed = run_ranks("mismatched_tables", 2, (), str(tmp_path), timeout=90)
    for rank in (0, 1):
        assert "ranks look up different tables" in failed.get(rank, ""), failed
