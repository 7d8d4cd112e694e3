"""Non-blocking saves: ``CheckpointManager.save(step, blocking=False)`` and the Trainer's
``async_save``. The checkpoint holds exactly the state at ``step`` while training changes the
tables during the write; a second save waits for the first; a failed background save is
raised by ``wait()``; a kill -9 during a background save leaves the previous checkpoint."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

from recis.framework import Trainer, TrainingArguments
from recis.framework.checkpoint_manager import CheckpointManager
from recis.nn import HashTable
from recis.nn.initializers import NormalInitializer
from recis.optim import SparseAdam
from recis.serialize import CheckpointError, CheckpointReader
from recis.serialize import checkpoint as checkpoint_module

DIM = 4


class Model(nn.Module):
    """One table (Adam state) and a dense layer; ``block_size=8`` so training grows it."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = HashTable([DIM], block_size=8, name="t", initializer=NormalInitializer(
            generator=torch.Generator().manual_seed(seed)))
        self.dense = nn.Linear(DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dense(self.table(ids)).pow(2).mean()


def make(seed: int = 0):
    model = Model(seed)
    sparse = SparseAdam([model.table], lr=0.05)
    dense = torch.optim.Adam(model.dense.parameters(), lr=0.01)
    return model, sparse, dense


def train_step(model, sparse, dense, step: int) -> None:
    ids = torch.arange(step * 3, step * 3 + 12)  # old IDs change, new ones are inserted
    dense.zero_grad()
    sparse.zero_grad()
    model(ids).backward()
    dense.step()
    sparse.step()


def table_state(table: HashTable) -> dict[str, torch.Tensor]:
    ids, rows = table.ids_map()
    out = {"ids": ids, "rows": rows}
    out.update({slot: table.slot_values(slot, rows) for slot in table.slot_names})
    return {k: v.clone() for k, v in out.items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit


class HeldWriter:
    """Makes the background thread's file writes wait until :meth:`release` (the main
    thread's writes go through), so that training certainly runs during the save."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        self.started = threading.Event()
        real = checkpoint_module.write_safetensors

        def held(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                self.started.set()
                if not self.gate.wait(60):
                    raise TimeoutError("the test never released the background writer")
            return real(*args, **kwargs)

        monkeypatch.setattr(checkpoint_module, "write_safetensors", held)

    def release(self) -> None:
        self.gate.set()


def test_a_background_save_holds_exactly_the_state_at_its_step(tmp_path, monkeypatch):
    model, sparse, dense = make()
    manager = CheckpointManager(model, sparse, dense, output_dir=str(tmp_path))
    for step in range(5):
        train_step(model, sparse, dense, step)
    at_save = table_state(model.table)
    dense_at_save = {k: v.clone() for k, v in model.dense.state_dict().items()}
    held = HeldWriter(monkeypatch)
    path = manager.save(5, blocking=False)
    assert held.started.wait(30), "the background writer did not start"
    assert manager.saving and not os.path.exists(path)  # save() returned before writing
    for step in range(5, 12):  # training goes on while the save is being written
        train_step(model, sparse, dense, step)
    now = table_state(model.table)
    saved_rows = at_save["rows"].numel()
    assert now["rows"].numel() > saved_rows  # IDs were inserted meanwhile (and blocks added)
    assert torch.equal(now["rows"][:saved_rows], at_save["rows"])
    assert not torch.equal(now["embedding"][:saved_rows], at_save["embedding"])  # rows changed
    held.release()
    manager.wait()
    assert not manager.saving and manager.latest() == path

    fresh, fresh_sparse, fresh_dense = make(seed=1)
    assert CheckpointManager(fresh, fresh_sparse, fresh_dense,
                             output_dir=str(tmp_path)).restore() == 5
    assert_same_state(table_state(fresh.table), at_save)
    for key, value in fresh.dense.state_dict().items():
        assert torch.equal(value, dense_at_save[key]), key


def test_a_save_requested_while_one_runs_waits_for_it(tmp_path, monkeypatch):
    model, sparse, dense = make()
    manager = CheckpointManager(model, sparse, dense, output_dir=str(tmp_path),
                                async_save=True)
    train_step(model, sparse, dense, 0)
    held = HeldWriter(monkeypatch)
    first = manager.save(1)
    assert held.started.wait(30)
    train_step(model, sparse, dense, 1)
    threading.Timer(0.2, held.release).start()
    second = manager.save(2)  # waits until the first save is published
    assert os.path.isfile(os.path.join(first, "index.json"))
    manager.wait()
    assert manager.latest() == second
    assert CheckpointReader(first).extra["global_step"] == 1


def test_a_failed_background_save_is_raised_by_wait_and_latest_stays(tmp_path, monkeypatch):
    model, sparse, dense = make()
    manager = CheckpointManager(model, sparse, dense, output_dir=str(tmp_path))
    train_step(model, sparse, dense, 0)
    first = manager.save(1)
    real = checkpoint_module.write_safetensors

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "write_safetensors", full_disk)
    train_step(model, sparse, dense, 1)
    manager.save(2, blocking=False)
    with pytest.raises(CheckpointError, match="background save failed: OSError.*No space"):
        manager.wait()
    assert manager.latest() == first
    monkeypatch.setattr(checkpoint_module, "write_safetensors", real)
    manager.wait()  # the error was reported once
    # the rows the failed save took are in the next incremental save
    third = manager.save(3, incremental=True, blocking=False)
    manager.wait()
    fresh, fresh_sparse, fresh_dense = make(seed=1)
    CheckpointManager(fresh, fresh_sparse, fresh_dense, output_dir=str(tmp_path)).restore(third)
    assert_same_state(table_state(fresh.table), table_state(model.table))


def test_blocking_must_be_a_bool():
    model, _, _ = make()
    with pytest.raises(TypeError, match="async_save must be a bool"):
        CheckpointManager(model, async_save="yes")


class Batches:
    """12 batches of IDs that overlap from one to the next."""

    def __iter__(self):
        for step in range(12):
            yield torch.arange(step * 3, step * 3 + 12)


def _trainer_checkpoints(out, async_save: bool) -> dict[str, dict[str, torch.Tensor]]:
    model, sparse, dense = make()
    args = TrainingArguments(output_dir=str(out), save_steps=4, max_to_keep=10,
                             async_save=async_save, progress_bar=False, log_steps=100)
    Trainer(model, args, train_dataset=Batches(), dense_optimizers=(dense, None),
            sparse_optimizer=sparse).train()
    names = sorted(n for n in os.listdir(out) if n.startswith("ckpt_"))
    out_state = {}
    for name in names:
        reader = CheckpointReader(str(out / name))
        out_state[name] = {t: reader.read_tensor(t) for t in reader.tensor_names()
                           if not t.startswith("rng/")}
    return out_state


def test_trainer_async_save_writes_the_same_checkpoints_as_blocking_saves(tmp_path):
    blocking = _trainer_checkpoints(tmp_path / "blocking", async_save=False)
    background = _trainer_checkpoints(tmp_path / "async", async_save=True)
    assert list(blocking) == ["ckpt_000000004", "ckpt_000000008", "ckpt_000000012"]
    assert list(background) == list(blocking)
    for name, tensors in blocking.items():
        assert tensors.keys() == background[name].keys()
        for key, value in tensors.items():
            assert torch.equal(value, background[name][key]), (name, key)


class FailingBatches:
    """Batches like :class:`Batches`, then one the model rejects (at step 7)."""

    def __iter__(self):
        for step in range(6):
            yield torch.arange(step * 3, step * 3 + 12)
        yield torch.zeros(3)  # float, not IDs: the forward fails


def test_trainer_waits_for_its_background_save_when_training_fails(tmp_path, monkeypatch):
    model, sparse, dense = make()
    args = TrainingArguments(output_dir=str(tmp_path), save_steps=4, async_save=True,
                             progress_bar=False, log_steps=100)
    trainer = Trainer(model, args, train_dataset=FailingBatches(),
                      dense_optimizers=(dense, None), sparse_optimizer=sparse)
    held = HeldWriter(monkeypatch)
    threading.Timer(0.5, held.release).start()  # the save of step 4 ends after the failure
    with pytest.raises(Exception) as failure:
        trainer.train()
    assert not isinstance(failure.value, CheckpointError)  # the training error, not the save's
    assert not trainer.checkpoint_manager.saving  # train() waited for the background save
    assert os.path.basename(trainer.checkpoint_manager.latest()) == "ckpt_000000004"


_KILL_SCRIPT = textwrap.dedent("""
    import sys, threading, time, torch
    from recis.nn import HashTable
    from recis.framework.checkpoint_manager import CheckpointManager
    from recis.serialize import checkpoint
    out, mode = sys.argv[1], sys.argv[2]
    table = HashTable([16], name="t", block_size=1024)
    manager = CheckpointManager(table, output_dir=out, max_keep=3, incremental_every=2,
                                async_save=True)
    if mode == "stuck":  # the background writer stops after its sparse file: kill it there
        real = checkpoint.write_safetensors
        def stuck(*args, **kwargs):
            info = real(*args, **kwargs)
            if threading.current_thread() is not threading.main_thread():
                print("writing", flush=True)
                time.sleep(600)
            return info
    start = (manager.restore() or 0) + 1
    for step in range(start, start + 1000):
        table.insert(torch.arange(step * 100, step * 100 + 3000),
                     torch.full((3000, 16), float(step)))
        if mode == "stuck" and step == start + 1:
            manager.wait()  # save 1 is published; save 2 gets stuck
            checkpoint.write_safetensors = stuck
        manager.save(step)
        print(step, flush=True)
""")


def _run_saver(script, out, mode):
    return subprocess.Popen([sys.executable, str(script), str(out), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_restored(out) -> int:
    table = HashTable([16], name="t", block_size=1024)
    step = CheckpointManager(table, output_dir=str(out)).restore()
    assert step is not None
    # exactly the state after step `step`: the inserts of later steps, made while the save
    # was written, overwrote these rows with later values, and must not be in it
    ids, rows = table.ids_map()
    assert ids.min().item() == 100 and ids.max().item() == step * 100 + 2999
    last = table.slot_values("embedding", rows[ids >= step * 100])
    assert torch.all(last == float(step))
    assert not [n for n in os.listdir(out) if n.startswith("ckpt_") and not os.path.exists(
        os.path.join(out, n, "index.json"))]  # no half checkpoint under a final name
    return step


def test_kill_minus_nine_during_a_background_save_keeps_the_previous_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "run"
    proc = _run_saver(script, out, "stuck")
    try:
        lines = []  # "1", then "2" and "writing" in either order
        while "writing" not in lines and len(lines) < 3:
            lines.append(proc.stdout.readline().strip())
        assert lines[0] == "1" and "writing" in lines, \
            (lines, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _check_restored(out) == 1  # save 2 was being written: never published


def test_kill_minus_nine_at_random_moments_of_background_saves(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "run"
    rng = random.Random(0)
    for _ in range(6):
        proc = _run_saver(script, out, "random")
        try:
            if not proc.stdout.readline():
                proc.wait(timeout=60)
                pytest.fail(f"the saving process died early:\n{proc.stderr.read()}")
            time.sleep(rng.uniform(0.0, 0.4))  # kill it at a random moment of later saves
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        _check_restored(out)
