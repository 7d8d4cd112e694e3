"""The main job: python -m recis.examples.deepfm, on the synthetic stream and on Criteo files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recis.examples import deepfm

CRITEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo-sample"


def test_synthetic_run_writes_metrics_and_plot(tmp_path, capsys):
    deepfm.main(["--steps", "40", "--batch-size", "256", "--vocab", "2000",
                 "--eval-every", "20", "--eval-batches", "4", "--filter-step", "10",
                 "--filter-interval", "5", "--no-progress", "--output", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)
    assert summary["train_steps"] == 40 and summary["train_examples"] == 40 * 256
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("eval_auc", "eval_logloss", "train_steps", "examples_per_second", "tables"):
        assert key in saved
    assert saved["eval_auc"] > 0.55  # the hidden model is learnable
    for table in saved["tables"].values():
        assert table["admitted"] >= table["live"] > 0
        assert table["admitted"] == table["live"] + table["removed"]
    assert any(t["removed"] > 0 for t in saved["tables"].values())  # the filter ran
    evals = [h for h in saved["history"] if "eval_auc" in h]
    assert [h["step"] for h in evals] == [20, 40]  # the final evaluation is not repeated
    pytest.importorskip("matplotlib")
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_bad_arguments_exit_with_a_message(capsys):
    for args in (["--steps", "0"], ["--optimizer", "lbfgs"]):  # argparse: SystemExit(2)
        with pytest.raises(SystemExit) as stop:
            deepfm.main(args + ["--no-progress"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err, err
    assert deepfm.run(["--data", "/nonexistent/*.orc", "--no-progress"]) == 2  # a bad file
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no file matches" in err, err


@pytest.mark.skipif(not CRITEO.is_dir(), reason="../shared/data/criteo-sample not present")
def test_criteo_files_as_a_module(tmp_path):
    cmd = [sys.executable, "-m", "recis.examples.deepfm", "--data", str(CRITEO / "part-0.orc"),
           "--eval-data", str(CRITEO / "part-5.orc"), "--steps", "8", "--batch-size", "512",
           "--no-progress", "--optimizer", "adagrad", "--output", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["train_steps"] == 8 and 0.0 < summary["eval_auc"] < 1.0
    tables = json.loads((tmp_path / "metrics.json").read_text())["tables"]
    assert sum(len(t["logical_tables"]) for t in tables.values()) == 52  # c1..c26 and c*_w
