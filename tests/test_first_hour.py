"""A new user's first hour (issue #9): files read by column name, clean exits and one-line
errors, an evaluation that says why it is missing, readable metrics, TensorBoard, progress
totals."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recis.examples import deepfm
from recis.io import criteo_dataset
from recis.io.criteo import CRITEO_TEXT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT.parent / "shared" / "data" / "criteo-sample"
ROWS = 3000


def _rows(n: int = ROWS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, 50, 26) + 1000 * np.arange(26)
        label = int((ids[0] % 7 == 0) ^ (rng.random() < 0.1))
        out.append([label, *rng.integers(0, 100, 13).tolist(), *ids.tolist()])
    return out


def _write(path: Path, header: list[str] | None, rows: list[list[int]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("csv")
    rows = _rows()
    moved = CRITEO_TEXT_COLUMNS[1:] + ["label"]
    return {
        "header": _write(d / "header.csv", CRITEO_TEXT_COLUMNS, rows),
        "moved": _write(d / "moved.csv", moved, [r[1:] + r[:1] for r in rows]),
        "bare": _write(d / "bare.csv", None, rows),
        "renamed": _write(d / "renamed.csv", ["click", *CRITEO_TEXT_COLUMNS[1:]], rows),
        "rows": rows,
    }


def _all(ds) -> dict[str, torch.Tensor]:
    batches = list(ds)
    out = {"label": torch.cat([b["label"] for b in batches]),
           "dense": torch.cat([b["dense"] for b in batches])}
    for c in ("c1", "c26"):
        out[c] = torch.cat([b[c].values() for b in batches])
    return out


def test_a_csv_header_is_not_data_and_columns_are_found_by_name(files):
    expected = torch.tensor([r[0] for r in files["rows"]], dtype=torch.float32)
    header = _all(criteo_dataset(files["header"], 512))
    assert header["label"].shape[0] == ROWS  # the header line is not a row
    assert torch.equal(header["label"], expected)
    moved = _all(criteo_dataset(files["moved"], 512))  # label last: same values
    for key in header:
        assert torch.equal(header[key], moved[key]), key


def test_a_file_without_header_needs_columns(files):
    with pytest.raises(ValueError, match=r"no header line.*columns"):
        criteo_dataset(files["bare"], 512)
    bare = _all(criteo_dataset(files["bare"], 512, columns="criteo"))
    header = _all(criteo_dataset(files["header"], 512))
    for key in header:
        assert torch.equal(header[key], bare[key]), key
    with pytest.raises(ValueError, match="header-less CSV/TSV"):
        criteo_dataset(str(CRITEO / "part-0.orc") if CRITEO.is_dir() else files["header"],
                       512, columns=["label"] + CRITEO_TEXT_COLUMNS[1:], format="orc")


def test_missing_or_misnamed_columns_are_an_error_listing_the_expected_names(files):
    with pytest.raises(ValueError, match=r"lacks the columns \['label'\].*'click'.*expected "
                                         r"label, i1..i13, c1..c26"):
        criteo_dataset(files["renamed"], 512)
    with pytest.raises(ValueError, match=r"columns lacks the columns \['c26'\]"):
        criteo_dataset(files["bare"], 512, columns=CRITEO_TEXT_COLUMNS[:-1] + ["x"])
    with pytest.raises(ValueError, match="repeats the column names"):
        criteo_dataset(files["bare"], 512, columns=CRITEO_TEXT_COLUMNS[:-1] + ["c1"])


def _job(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recis.examples.deepfm", "--no-progress",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_the_main_job_counts_rows_not_header_lines(files, tmp_path):
    summary = None
    for name in ("header", "moved"):
        done = _job(["--data", str(files[name]), "--eval-data", str(files["header"]),
                     "--output", str(tmp_path / name)], tmp_path)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["train_examples"] == ROWS
        if summary is not None:  # the label column moved: the same training
            assert result["eval_auc"] == pytest.approx(summary["eval_auc"], abs=1e-6)
        summary = result


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--data", "missing*.orc"], "no file matches 'missing*.orc'"),
    (["--data", "{renamed}"], "lacks the columns ['label']"),
    (["--data", "{bare}"], "no header line"),
    (["--columns", "criteo"], "--columns applies to --data files"),
])
def test_bad_arguments_and_files_are_one_line(files, tmp_path, args, message):
    args = [a.format(**{k: v for k, v in files.items() if k != "rows"}) for a in args]
    done = _job(args + ["--output", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m recis.examples.deepfm: error:") and message in lines[0]


def test_an_earlier_run_is_not_overwritten_silently(tmp_path):
    args = ["--steps", "4", "--batch-size", "128", "--vocab", "500", "--eval-batches", "1",
            "--output", str(tmp_path / "out")]
    assert deepfm.run(args) == 0
    first = (tmp_path / "out" / "metrics.json").read_text()
    assert deepfm.run(args) == 2  # refused, said in one line
    assert (tmp_path / "out" / "metrics.json").read_text() == first
    assert deepfm.run(args + ["--overwrite", "--seed", "1"]) == 0
    assert (tmp_path / "out" / "metrics.json").read_text() != first


def test_an_empty_evaluation_split_is_said(files, tmp_path, caplog):
    # 3000 rows in batches of 1024: 3 batches, none of them a 10th batch to hold out
    with caplog.at_level("WARNING"):
        result = deepfm.main(["--data", str(files["header"]), "--batch-size", "1024",
                              "--no-progress", "--output", str(tmp_path)])
    assert result["eval_auc"] is None
    text = caplog.text
    assert "no evaluation" in text and "--eval-data" in text and "--batch-size" in text


def test_metrics_name_tables_readably_and_record_each_evaluation_once(tmp_path):
    deepfm.main(["--steps", "20", "--batch-size", "128", "--vocab", "500", "--eval-every", "10",
                 "--eval-batches", "2", "--no-progress", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    evals = [h["step"] for h in saved["history"] if "eval_loss" in h]
    assert evals == [10, 20]
    for record in saved["history"]:
        assert all(name.startswith("dim ") for name in record["tables"]), record["tables"]


def test_ctrl_c_stops_at_a_step_boundary_saves_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "recis.examples.deepfm", "--no-progress", "--steps", "5000",
            "--batch-size", "128", "--vocab", "500", "--eval-batches", "1", "--save-steps", "5",
            "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "interrupted at step" in lines[0] and "checkpoint" in lines[0]
    step = int(lines[0].split("interrupted at step ")[1].split(":")[0])
    assert (out / "checkpoints" / f"ckpt_{step:09d}").is_dir()  # that very step was saved
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["interrupted_at_step"] == step
    done = subprocess.run(args[:args.index("5000")] + [str(step + 2)] +
                          args[args.index("5000") + 1:], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["train_steps"] == step + 2


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    deepfm.main(["--steps", "20", "--batch-size", "128", "--vocab", "500", "--eval-every", "10",
                 "--eval-batches", "2", "--no-progress", "--tensorboard",
                 "--output", str(tmp_path)])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/examples_per_second", "eval/auc", "eval/logloss"} <= tags
    assert any(t.startswith("tables/dim 16") for t in tags)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    aucs = [h["eval_auc"] for h in saved["history"] if "eval_auc" in h]
    assert [e.value for e in events.Scalars("eval/auc")] == pytest.approx(aucs)


@pytest.mark.skipif(not CRITEO.is_dir(), reason="../shared/data/criteo-sample is absent")
def test_the_progress_bar_knows_its_total_from_the_footers():
    from recis.framework import Trainer, TrainingArguments

    data = criteo_dataset([CRITEO / "part-0.orc", CRITEO / "part-1.orc"], 1000)
    assert len(data) == 20 == sum(1 for _ in data)
    held = deepfm.HoldOut(data, 10, take=False)
    assert len(held) == 18 == sum(1 for _ in held)
    trainer = Trainer(torch.nn.Linear(1, 1), TrainingArguments(train_epoch=2), held)
    assert trainer.planned_steps() == 36
    assert Trainer(torch.nn.Linear(1, 1), TrainingArguments(train_steps=7), held) \
        .planned_steps() == 7


def test_tables_with_equal_counts_stay_visible_in_the_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: saved.append(fig))
    tables = {"dim 16 (c1, ...)": 100, "dim 1 (c1_w, ...)": 100}  # equal counts
    history = [{"step": s, "loss": 0.5, "tables": tables} for s in (10, 20, 30)]
    assert deepfm.plot(history, str(tmp_path / "p.png"))
    lines = saved[0].axes[2].get_lines()
    assert len(lines) == 2
    looks = {(line.get_linestyle(), line.get_marker()) for line in lines}
    assert len(looks) == 2  # drawn on top of each other, yet told apart
    assert {line.get_label() for line in lines} == set(tables)
