"""Area under the ROC curve, exact or with RecIS's thresholded approximation."""

from __future__ import annotations

import logging
import operator
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["AUROC", "binary_auroc"]

logger = logging.getLogger(__name__)

_TPR_EPS = 1.0e-6
_THRESHOLD_EPS = 1.0e-7


# ----------------------------------------------------------------------------- helpers


def _as_tensor(value: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{where}: {name} must be a Tensor or array-like of numbers, got {type(value).__name__}"
        ) from None


def _check_preds_labels(
    preds: Any, labels: Any, where: str, *, unit_interval: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and flatten a batch: returns ``(preds float64 1-D, labels bool 1-D)``."""
    preds = _as_tensor(preds, "preds", where)
    labels = _as_tensor(labels, "labels", where)
    if preds.dtype == torch.bool or preds.is_complex():
        raise TypeError(f"{where}: preds must be real numbers, got dtype {preds.dtype}")
    if labels.is_complex():
        raise TypeError(f"{where}: labels must be 0/1 numbers or bools, got dtype {labels.dtype}")
    if preds.numel() != labels.numel():
        raise ValueError(
            f"{where}: preds and labels must have the same number of elements, got "
            f"{preds.numel()} (shape {tuple(preds.shape)}) and {labels.numel()} "
            f"(shape {tuple(labels.shape)})"
        )
    if preds.device != labels.device:
        raise ValueError(
            f"{where}: preds and labels must be on the same device, got {preds.device} "
            f"and {labels.device}"
        )
    preds = preds.detach().reshape(-1)
    labels = labels.detach().reshape(-1)
    if labels.dtype != torch.bool:
        bad = (labels != 0) & (labels != 1)
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(f"{where}: labels must be 0 or 1, got a label equal to {first}")
        labels = labels != 0
    if preds.dtype.is_floating_point:
        finite = torch.isfinite(preds)
        if not bool(finite.all()):
            first = preds[~finite][0].item()
            raise ValueError(f"{where}: preds must be finite, got {first}")
    if unit_interval:
        outside = (preds < 0) | (preds > 1)
        if bool(outside.any()):
            first = preds[outside][0].item()
            raise ValueError(
                f"{where}: preds must lie in [0, 1] when num_thresholds is set, got {first}"
            )
    return preds, labels


def _undefined(where: str, positives: int, negatives: int) -> torch.Tensor:
    warnings.warn(
        f"{where}: AUC is undefined when only one class has been seen "
        f"({positives} positive and {negatives} negative labels); returning nan",
        RuntimeWarning,
        stacklevel=3,
    )
    return torch.tensor(float("nan"), dtype=torch.float64)


def _exact_auc(preds: torch.Tensor, labels: torch.Tensor, where: str) -> torch.Tensor:
    """Mann-Whitney AUC with ties counted 1/2; ``labels`` bool, both 1-D."""
    num_pos = int(labels.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return _undefined(where, num_pos, num_neg)
    # Group equal scores; for each distinct score (ascending) count positives and negatives.
    _, inverse = torch.unique(preds.to(torch.float64), sorted=True, return_inverse=True)
    size = int(inverse.max()) + 1
    pos = torch.bincount(inverse, weights=labels.to(torch.float64), minlength=size)
    tot = torch.bincount(inverse, minlength=size).to(torch.float64)
    neg = tot - pos
    neg_below = torch.cumsum(neg, 0) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum()
    return (wins / (float(num_pos) * float(num_neg))).cpu()


def binary_auroc(preds: Any, labels: Any) -> torch.Tensor:
    r"""Exact area under the ROC curve of one batch.

    Equals the Mann-Whitney statistic: the probability that a random positive scores higher
    than a random negative, with ties counted 1/2 (the same value as
    ``sklearn.metrics.roc_auc_score``). Runs in :math:`O(N \log N)`.

    Args:
        preds (Tensor): scores of any shape; any real, finite values.
        labels (Tensor): 0/1 or bool labels with as many elements as ``preds``.

    Returns:
        Tensor: a 0-dim ``float64`` tensor; ``nan`` (with a :class:`RuntimeWarning`) when only
        one class is present.

    Example::

        >>> binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.7500, dtype=torch.float64)
    """
    p, y = _check_preds_labels(preds, labels, "binary_auroc")
    return _exact_auc(p, y, "binary_auroc")


def _dist_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather 1-D tensors of possibly different lengths and concatenate them in rank order."""
    world = dist.get_world_size()
    size = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


# ----------------------------------------------------------------------------- module


class AUROC(nn.Module):
    r"""Area under the ROC curve of a binary classifier, accumulated over batches.

    Two modes:

    * ``num_thresholds=None`` (default): the **exact** AUC, i.e. the Mann-Whitney statistic
      with tied scores counted 1/2, which equals ``sklearn.metrics.roc_auc_score``. Every
      update's scores and labels are kept (as given, plus one byte per label) until
      :meth:`reset`, so memory grows by about 5 bytes per float32 sample (e.g. 50 MB for ten
      million samples); :meth:`compute` sorts them, :math:`O(N \log N)`.
    * ``num_thresholds=n``: RecIS's TensorFlow-style approximation in constant memory. The
      ``n`` thresholds are ``[-1e-7, 1/(n-1), ..., (n-2)/(n-1), 1+1e-7]`` (float32); a sample
      is predicted positive at a threshold when ``pred > threshold``. Only the
      true/false-positive/negative counts per threshold are accumulated. The curve uses
      ``TPR = (tp + 1e-6) / (tp + fn + 1e-6)`` and ``FPR = fp / (fp + tn + 1e-6)`` and is
      integrated with the trapezoid rule. Predictions must lie in ``[0, 1]``.

    The AUC is undefined while only one class has been seen; then the result is ``nan`` and a
    :class:`RuntimeWarning` is issued.

    Under :mod:`torch.distributed` (initialized, world size > 1), :meth:`compute` combines the
    states of all ranks (all-gather of scores in exact mode, all-reduce of counts otherwise);
    every rank must call it. With ``dist_sync_on_step=True`` each :meth:`update` combines the
    batch across ranks instead, so :meth:`forward` returns the AUC of the global batch and the
    local state already holds everything.

    Args:
        num_thresholds (int, optional): number of thresholds (> 2) of the approximation, or
            ``None`` for the exact AUC. Default: ``None``.
        dist_sync_on_step (bool): combine every batch across ranks at update time.
            Default: ``False``.

    Example::

        >>> metric = AUROC()
        >>> metric(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))  # batch AUC, accumulated
        tensor(1., dtype=torch.float64)
        >>> metric.update(torch.tensor([0.3, 0.6]), torch.tensor([1, 0]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
        >>> metric.reset()
    """

    def __init__(self, num_thresholds: int | None = None, dist_sync_on_step: bool = False) -> None:
        super().__init__()
        if num_thresholds is not None:
            if isinstance(num_thresholds, bool):
                raise TypeError("AUROC: num_thresholds must be an int or None, got bool")
            try:
                num_thresholds = operator.index(num_thresholds)
            except TypeError:
                raise TypeError(
                    "AUROC: num_thresholds must be an int or None, "
                    f"got {type(num_thresholds).__name__}"
                ) from None
            if num_thresholds <= 2:
                raise ValueError(f"AUROC: num_thresholds must be > 2, got {num_thresholds}")
        if not isinstance(dist_sync_on_step, bool):
            raise TypeError(
                f"AUROC: dist_sync_on_step must be a bool, got {type(dist_sync_on_step).__name__}"
            )
        self.num_thresholds = num_thresholds
        self.dist_sync_on_step = dist_sync_on_step
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        if num_thresholds is not None:
            n = num_thresholds
            inner = [(i + 1) / (n - 1) for i in range(n - 2)]
            values = [0.0 - _THRESHOLD_EPS, *inner, 1.0 + _THRESHOLD_EPS]
            self.register_buffer("thresholds", torch.tensor(values), persistent=False)
            # Rows: tp, fp, tn, fn; one column per threshold.
            self.register_buffer(
                "confusion", torch.zeros(4, n, dtype=torch.int64), persistent=False
            )

    def extra_repr(self) -> str:
        return f"num_thresholds={self.num_thresholds}, dist_sync_on_step={self.dist_sync_on_step}"

    # ------------------------------------------------------------------------- thresholded

    def _counts(self, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Confusion counts ``[4, n]`` (tp, fp, tn, fn) of one batch at every threshold."""
        n = self.num_thresholds
        thresholds = self.thresholds.to(preds.device)
        # Number of thresholds strictly below each prediction: pred > thresholds[j] iff j < k.
        below = torch.bucketize(preds.to(thresholds.dtype), thresholds, right=False)
        hist_pos = torch.bincount(below[labels], minlength=n + 1)
        hist_neg = torch.bincount(below[~labels], minlength=n + 1)
        # tp[j] = #positives with k > j = suffix sum of hist_pos from j + 1.
        tp = torch.flip(torch.cumsum(torch.flip(hist_pos, [0]), 0), [0])[1:]
        fp = torch.flip(torch.cumsum(torch.flip(hist_neg, [0]), 0), [0])[1:]
        num_pos = hist_pos.sum()
        num_neg = hist_neg.sum()
        return torch.stack([tp, fp, num_neg - fp, num_pos - tp]).to(self.confusion.device)

    def _auc_from_counts(self, counts: torch.Tensor) -> torch.Tensor:
        tp, fp, tn, fn = counts.to(torch.float64).cpu()
        positives = int(tp[0] + fn[0])
        negatives = int(fp[0] + tn[0])
        if positives == 0 or negatives == 0:
            return _undefined("AUROC", positives, negatives)
        tpr = (tp + _TPR_EPS) / (tp + fn + _TPR_EPS)
        fpr = fp / (fp + tn + _TPR_EPS)
        return ((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0).sum()

    # ------------------------------------------------------------------------- public API

    def _batch_state(self, preds: Any, labels: Any) -> Any:
        p, y = _check_preds_labels(
            preds, labels, "AUROC", unit_interval=self.num_thresholds is not None
        )
        synced = self.dist_sync_on_step and _dist_world_size() > 1
        if self.num_thresholds is None:
            if synced:
                p = _all_gather_variable(p)
                y = _all_gather_variable(y.to(torch.uint8)).to(torch.bool)
            return p, y
        counts = self._counts(p, y)
        if synced:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts

    def _accumulate(self, state: Any) -> None:
        if self.num_thresholds is None:
            p, y = state
            # Copies: the caller may reuse its buffers for the next batch.
            self._preds.append(p.clone())
            self._labels.append(y.clone())
        else:
            self.confusion += state

    def update(self, preds: Any, labels: Any) -> None:
        r"""Add a batch to the state.

        Args:
            preds (Tensor): scores of any shape (probabilities in ``[0, 1]`` when
                ``num_thresholds`` is set).
            labels (Tensor): 0/1 or bool labels with as many elements as ``preds``.
        """
        self._accumulate(self._batch_state(preds, labels))

    def forward(self, preds: Any, labels: Any) -> torch.Tensor:
        r"""Add a batch to the state and return the AUC of that batch alone.

        Args:
            preds (Tensor): scores, as in :meth:`update`.
            labels (Tensor): labels, as in :meth:`update`.

        Returns:
            Tensor: 0-dim ``float64`` AUC of the batch (``nan`` if it holds a single class).
        """
        state = self._batch_state(preds, labels)
        self._accumulate(state)
        if self.num_thresholds is None:
            return _exact_auc(state[0], state[1], "AUROC")
        return self._auc_from_counts(state)

    def compute(self) -> torch.Tensor:
        r"""AUC of everything accumulated since construction or the last :meth:`reset`.

        Returns:
            Tensor: 0-dim ``float64`` AUC; ``nan`` (with a warning) while fewer than two
            classes have been seen.
        """
        gather = not self.dist_sync_on_step and _dist_world_size() > 1
        if self.num_thresholds is not None:
            counts = self.confusion.clone()
            if gather:
                dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            return self._auc_from_counts(counts)
        if self._preds:
            preds = torch.cat([p.to(torch.float64) for p in self._preds])
            labels = torch.cat(self._labels)
        else:
            preds = torch.zeros(0, dtype=torch.float64)
            labels = torch.zeros(0, dtype=torch.bool)
        if gather:
            preds = _all_gather_variable(preds)
            labels = _all_gather_variable(labels.to(torch.uint8)).to(torch.bool)
        return _exact_auc(preds, labels, "AUROC")

    def reset(self) -> None:
        r"""Forget every accumulated batch."""
        self._preds = []
        self._labels = []
        if self.num_thresholds is not None:
            self.confusion.zero_()
