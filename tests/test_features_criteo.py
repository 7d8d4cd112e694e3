"""The main job's ``--features`` mode: the FeatureEngine turns raw Criteo values into IDs,
the model trains on them, and the engine runs inside DataLoader workers."""

import json
from pathlib import Path

import pytest
import torch
from test_features_hash import farm_reference, signed
from test_features_ops import bucketize_reference, rows_of

from recis.examples import deepfm
from recis.io import FileDataset, criteo_batch_to_features, criteo_columns, criteo_dataset

CRITEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo-sample"
needs_sample = pytest.mark.skipif(not CRITEO.is_dir(),
                                  reason="../shared/data/criteo-sample is absent")


def test_features_needs_data_files(capsys):
    with pytest.raises(SystemExit) as stop:
        deepfm.main(["--features", "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--features applies to --data files" in err, err


@needs_sample
def test_features_ids_are_farmhash_of_the_text_and_integer_buckets():
    _, dense, sparse = criteo_columns()
    batch = next(iter(criteo_dataset(str(CRITEO / "part-0.orc"), 300)))
    transform = deepfm.CriteoFeatureTransform(deepfm.criteo_feature_engine(sparse, dense), dense)
    out = transform(batch)
    for name in ("c1", "c7", "c26"):
        raw = rows_of(batch[name])
        assert rows_of(out[name]) == [[signed(farm_reference(str(v).encode())) for v in row]
                                      for row in raw]
    for k, name in enumerate(dense):
        want = [[bucketize_reference(v, deepfm.INTEGER_BOUNDARIES)]
                for v in batch["dense"][:, k].tolist()]
        assert out[name].tolist() == want
    assert torch.equal(out["dense"], batch["dense"]) and torch.equal(out["label"],
                                                                      batch["label"])


@needs_sample
def test_features_mode_trains_on_the_sample(tmp_path, capsys):
    deepfm.main(["--data", str(CRITEO / "part-0.orc"), "--eval-data", str(CRITEO / "part-5.orc"),
                 "--features", "--steps", "30", "--batch-size", "512", "--eval-every", "30",
                 "--no-progress", "--output", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_steps"] == 30
    assert "feature engine" in summary["data"]
    assert summary["eval_auc"] > 0.65  # hashed and bucketized IDs carry the signal
    tables = json.loads((tmp_path / "metrics.json").read_text())["tables"]
    # c1..c26 and i1..i13 as ID fields, each with its first-order table
    assert sum(len(t["logical_tables"]) for t in tables.values()) == 2 * (26 + 13)


class _RawToFeatures:
    """Raw file batch -> model layout -> feature engine (picklable, for workers)."""

    def __init__(self):
        _, dense, sparse = criteo_columns()
        self.features = deepfm.CriteoFeatureTransform(
            deepfm.criteo_feature_engine(sparse, dense), dense)

    def __call__(self, batch):
        return self.features(criteo_batch_to_features(batch))


@needs_sample
def test_engine_runs_in_dataloader_workers_on_the_sample():
    label, dense, sparse = criteo_columns()
    files = [str(CRITEO / "part-0.orc"), str(CRITEO / "part-1.orc")]

    def dataset():
        return FileDataset(files, 2500, columns=[label, *dense, *sparse],
                           dense_columns=[label, *dense], transform=_RawToFeatures())

    def fingerprint(batch):
        return (batch["c3"].values().sum().item(), batch["i2"].sum().item(),
                batch["label"].sum().item())

    loader = torch.utils.data.DataLoader(dataset(), batch_size=None, num_workers=2)
    in_workers = sorted(fingerprint(b) for b in loader)
    in_process = sorted(fingerprint(b) for b in dataset())
    assert len(in_workers) == 8 and in_workers == in_process
