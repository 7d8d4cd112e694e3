import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from recis.metrics import AUROC, GAUC, Gauc, binary_auroc, group_auc_stats

sklearn_metrics = pytest.importorskip("sklearn.metrics")
roc_auc_score = sklearn_metrics.roc_auc_score

RECIS_LABELS = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 1, 1])
RECIS_PREDS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


def random_batch(rng, n, levels=None):
    """Scores with many ties when ``levels`` is set."""
    if levels is None:
        preds = rng.random(n)
    else:
        preds = rng.integers(0, levels, n) / levels
    labels = (rng.random(n) < 0.3).astype(np.int64)
    labels[0], labels[1] = 0, 1  # both classes present
    return torch.tensor(preds, dtype=torch.float32), torch.tensor(labels)


def thresholded_reference(preds, labels, n):
    """Straight O(N * n) evaluation of the TF-style formula."""
    inner = [(i + 1) / (n - 1) for i in range(n - 2)]
    thr = torch.tensor([-1e-7, *inner, 1 + 1e-7])  # float32, as RecIS
    above = preds.float().reshape(-1, 1) > thr
    y = labels.bool().reshape(-1, 1)
    tp = (above & y).sum(0).double()
    fp = (above & ~y).sum(0).double()
    fn = (~above & y).sum(0).double()
    tn = (~above & ~y).sum(0).double()
    tpr = (tp + 1e-6) / (tp + fn + 1e-6)
    fpr = fp / (fp + tn + 1e-6)
    return float(((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2).sum())


# ----------------------------------------------------------------------------- AUROC


def test_recis_values():
    assert roc_auc_score(RECIS_LABELS.numpy(), RECIS_PREDS.numpy()) == pytest.approx(0.7916667)
    approx = AUROC(num_thresholds=200)
    assert float(approx(RECIS_PREDS, RECIS_LABELS)) == pytest.approx(0.7917, abs=1e-4)
    assert float(approx.compute()) == pytest.approx(0.7917, abs=1e-4)
    exact = AUROC()
    assert float(exact(RECIS_PREDS, RECIS_LABELS)) == pytest.approx(19 / 24, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 7, 50])
def test_exact_matches_sklearn(levels):
    rng = np.random.default_rng(levels or 0)
    for n in (2, 13, 1000):
        preds, labels = random_batch(rng, n, levels)
        expected = roc_auc_score(labels.numpy(), preds.numpy())
        assert float(binary_auroc(preds, labels)) == pytest.approx(expected, abs=1e-12)
        assert float(AUROC()(preds, labels)) == pytest.approx(expected, abs=1e-12)


def test_exact_accumulation_equals_one_shot():
    rng = np.random.default_rng(1)
    preds, labels = random_batch(rng, 3000, levels=20)
    metric = AUROC()
    for p, y in zip(preds.split(700), labels.split(700), strict=True):
        metric.update(p, y)
    expected = roc_auc_score(labels.numpy(), preds.numpy())
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    metric.reset()
    metric.update(preds[:10], labels[:10])
    assert float(metric.compute()) == pytest.approx(
        roc_auc_score(labels[:10].numpy(), preds[:10].numpy()), abs=1e-12
    )


def test_exact_accepts_shapes_bools_and_other_dtypes():
    rng = np.random.default_rng(2)
    preds, labels = random_batch(rng, 64)
    expected = roc_auc_score(labels.numpy(), preds.numpy())
    metric = AUROC()
    got = metric(preds.reshape(8, 8).double(), labels.reshape(8, 8).bool())
    assert float(got) == pytest.approx(expected, abs=1e-12)
    # Scores need not be probabilities in exact mode; ints and lists work too.
    assert float(binary_auroc([3, 1, 2, 2], [1, 0, 1, 0])) == pytest.approx(
        roc_auc_score([1, 0, 1, 0], [3, 1, 2, 2])
    )


def test_exact_state_is_copied():
    metric = AUROC()
    preds = torch.tensor([0.9, 0.1])
    metric.update(preds, torch.tensor([1, 0]))
    preds.fill_(0.5)
    assert float(metric.compute()) == 1.0


@pytest.mark.parametrize("n", [3, 10, 200])
def test_thresholded_matches_reference(n):
    rng = np.random.default_rng(n)
    preds, labels = random_batch(rng, 500, levels=37)
    preds[:3] = torch.tensor([0.0, 1.0, 0.5])
    metric = AUROC(num_thresholds=n)
    total = 0
    for p, y in zip(preds.split(128), labels.split(128), strict=True):
        metric.update(p, y)
        total += p.numel()
    assert total == 500
    assert float(metric.compute()) == pytest.approx(
        thresholded_reference(preds, labels, n), abs=1e-9
    )
    tp, fp, tn, fn = metric.confusion
    assert torch.all(tp + fp + tn + fn == 500)


def test_thresholded_close_to_exact_with_many_thresholds():
    rng = np.random.default_rng(3)
    preds, labels = random_batch(rng, 5000)
    exact = roc_auc_score(labels.numpy(), preds.numpy())
    assert float(AUROC(num_thresholds=2000)(preds, labels)) == pytest.approx(exact, abs=2e-3)


def test_forward_returns_batch_value_and_accumulates():
    metric = AUROC()
    first = metric(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
    assert float(first) == 1.0
    second = metric(torch.tensor([0.3, 0.6]), torch.tensor([1, 0]))
    assert float(second) == 0.0
    assert float(metric.compute()) == pytest.approx(0.75)


def test_single_class_is_nan_with_warning():
    for metric in (AUROC(), AUROC(num_thresholds=10)):
        with pytest.warns(RuntimeWarning, match="undefined"):
            assert math.isnan(float(metric(torch.tensor([0.2, 0.3]), torch.tensor([1, 1]))))
        metric.reset()
        with pytest.warns(RuntimeWarning):
            assert math.isnan(float(metric.compute()))


def test_auroc_validation():
    with pytest.raises(ValueError, match="num_thresholds must be > 2"):
        AUROC(num_thresholds=2)
    with pytest.raises(TypeError, match="num_thresholds"):
        AUROC(num_thresholds=2.5)
    with pytest.raises(TypeError, match="dist_sync_on_step"):
        AUROC(dist_sync_on_step="yes")
    metric = AUROC()
    with pytest.raises(ValueError, match="same number of elements"):
        metric.update(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be 0 or 1, got a label equal to 2"):
        metric.update(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="preds must be finite"):
        metric.update(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="preds must be real"):
        metric.update(torch.tensor([True, False]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        AUROC(num_thresholds=10).update(torch.tensor([0.1, 1.5]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="preds must be a Tensor"):
        metric.update(object(), torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- distributed


class FakeDist:
    """Two ranks simulated in one process: the other rank contributes ``other``."""

    def __init__(self, monkeypatch, other):
        self.other = list(other)
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_gather", self.all_gather)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_gather(self, outputs, tensor, group=None, async_op=False):
        outputs[0].copy_(tensor)
        outputs[1].copy_(self.other.pop(0))

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        tensor += self.other.pop(0).to(tensor.dtype)


def test_exact_compute_gathers_other_ranks(monkeypatch):
    p0, y0 = torch.tensor([0.9, 0.1, 0.4]), torch.tensor([1, 0, 1])
    p1, y1 = torch.tensor([0.3, 0.8]), torch.tensor([0, 0])
    metric = AUROC()
    metric.update(p0, y0)
    # Other rank: size 2 (padded to 3), then its padded preds, its size again, its labels.
    FakeDist(
        monkeypatch,
        [
            torch.tensor([2]),
            torch.tensor([0.3, 0.8, 0.0], dtype=torch.float64),
            torch.tensor([2]),
            torch.tensor([0, 0, 0], dtype=torch.uint8),
        ],
    )
    expected = roc_auc_score(torch.cat([y0, y1]).numpy(), torch.cat([p0, p1]).numpy())
    assert float(metric.compute()) == pytest.approx(expected)


def test_thresholded_compute_all_reduces_counts(monkeypatch):
    p0, y0 = torch.tensor([0.9, 0.1, 0.4]), torch.tensor([1, 0, 1])
    p1, y1 = torch.tensor([0.3, 0.8]), torch.tensor([0, 0])
    other = AUROC(num_thresholds=50)
    other.update(p1, y1)
    metric = AUROC(num_thresholds=50)
    metric.update(p0, y0)
    local = metric.confusion.clone()
    FakeDist(monkeypatch, [other.confusion.clone()])
    expected = thresholded_reference(torch.cat([p0, p1]), torch.cat([y0, y1]), 50)
    assert float(metric.compute()) == pytest.approx(expected)
    assert torch.equal(metric.confusion, local)  # compute does not change the local state


def test_dist_sync_on_step_syncs_each_update(monkeypatch):
    p0, y0 = torch.tensor([0.9, 0.1]), torch.tensor([1, 0])
    p1, y1 = torch.tensor([0.3, 0.8]), torch.tensor([1, 0])
    other = AUROC(num_thresholds=20)
    other.update(p1, y1)
    FakeDist(monkeypatch, [other.confusion.clone()])
    metric = AUROC(num_thresholds=20, dist_sync_on_step=True)
    batch = metric(p0, y0)
    expected = thresholded_reference(torch.cat([p0, p1]), torch.cat([y0, y1]), 20)
    assert float(batch) == pytest.approx(expected)
    assert float(metric.compute()) == pytest.approx(expected)  # no second sync needed


def test_gauc_compute_all_reduces(monkeypatch):
    gauc = GAUC()
    gauc.update(torch.tensor([1, 0]), torch.tensor([0.9, 0.1]), torch.tensor([5, 5]))
    FakeDist(monkeypatch, [torch.tensor([0.0, 2.0], dtype=torch.float64)])
    # Other rank: one group of size 2 with AUC 0 -> (0 * 2, 2).
    assert float(gauc.compute()) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- GAUC


def gauc_reference(labels, preds, indicators):
    """Per-run sklearn AUC weighted by run size."""
    labels, preds, indicators = (np.asarray(a) for a in (labels, preds, indicators))
    bounds = np.flatnonzero(np.diff(indicators)) + 1
    num = den = 0.0
    for y, p in zip(np.split(labels, bounds), np.split(preds, bounds), strict=True):
        if 0 < y.sum() < len(y):
            num += roc_auc_score(y, p) * len(y)
            den += len(y)
    return num / den


def test_gauc_recis_example():
    gauc = Gauc()
    batch, total = gauc(
        torch.tensor([1, 0, 1, 0, 1]),
        torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]),
        torch.tensor([0, 1, 1, 1, 2]),
    )
    assert float(batch) == pytest.approx(0.5)
    assert float(total) == pytest.approx(0.5)
    assert Gauc is GAUC


def test_gauc_counts_first_and_last_group():
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    preds = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7, 0.6])
    users = torch.tensor([3, 3, 4, 4, 7, 7])
    # AUCs 1, 0, 1 with equal sizes.
    batch, _ = GAUC()(labels, preds, users)
    assert float(batch) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_sklearn_per_group(seed):
    rng = np.random.default_rng(seed)
    indicators = np.repeat(rng.integers(0, 20, 60), rng.integers(1, 30, 60))
    n = len(indicators)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    preds = rng.integers(0, 6, n) / 5.0  # many ties
    num, den = group_auc_stats(torch.tensor(labels), torch.tensor(preds), torch.tensor(indicators))
    assert float(num / den) == pytest.approx(gauc_reference(labels, preds, indicators), abs=1e-12)


def test_gauc_runs_not_keys():
    # The same key in two separate runs makes two groups.
    labels = torch.tensor([1, 0, 0, 1, 1, 0])
    preds = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.4])
    users = torch.tensor([1, 1, 2, 2, 1, 1])
    expected = gauc_reference(labels.numpy(), preds.numpy(), users.numpy())
    assert expected == pytest.approx((1 * 2 + 0 * 2 + 0 * 2) / 6)
    assert float(GAUC()(labels, preds, users)[0]) == pytest.approx(expected)


def test_gauc_accumulation_and_reset():
    rng = np.random.default_rng(5)
    gauc = GAUC()
    nums = dens = 0.0
    for _ in range(3):
        ind = np.repeat(np.arange(15), 8)
        labels = (rng.random(120) < 0.5).astype(np.int64)
        preds = rng.random(120)
        batch, total = gauc(torch.tensor(labels), torch.tensor(preds), torch.tensor(ind))
        n, d = group_auc_stats(torch.tensor(labels), torch.tensor(preds), torch.tensor(ind))
        nums += float(n)
        dens += float(d)
        assert float(batch) == pytest.approx(gauc_reference(labels, preds, ind))
        assert float(total) == pytest.approx(nums / dens)
    assert float(gauc.compute()) == pytest.approx(nums / dens)
    gauc.reset()
    with pytest.warns(RuntimeWarning, match="no group"):
        assert math.isnan(float(gauc.compute()))


def test_gauc_single_class_groups_only():
    gauc = GAUC()
    with pytest.warns(RuntimeWarning):
        batch, total = gauc(torch.tensor([1, 1, 0]), torch.tensor([0.1, 0.2, 0.3]), [1, 1, 2])
    assert math.isnan(float(batch)) and math.isnan(float(total))


def test_gauc_validation():
    gauc = GAUC()
    with pytest.raises(ValueError, match="indicators must have one entry per label"):
        gauc(torch.tensor([1, 0]), torch.tensor([0.1, 0.2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="same number of elements"):
        gauc(torch.tensor([1, 0]), torch.tensor([0.1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        gauc(torch.tensor([1, 3]), torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="indicators must be finite"):
        gauc(torch.tensor([1, 0]), torch.tensor([0.1, 0.2]), torch.tensor([1.0, float("nan")]))
