"""Group AUC (GAUC): the size-weighted mean of per-group (e.g. per-user) AUCs."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recis.metrics.auroc import _as_tensor, _check_preds_labels, _dist_world_size

__all__ = ["GAUC", "Gauc", "group_auc_stats"]

logger = logging.getLogger(__name__)


def group_auc_stats(
    labels: Any, predictions: Any, indicators: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-group AUC statistics of one batch.

    A group is a run of equal consecutive ``indicators`` values. Each group's AUC is exact
    (Mann-Whitney, ties counted 1/2); groups holding a single class are skipped. The work is
    vectorised: one sort by ``(group, prediction)`` and segment sums, :math:`O(N \log N)`.

    Args:
        labels (Tensor): 0/1 or bool labels.
        predictions (Tensor): finite scores with as many elements as ``labels``.
        indicators (Tensor): group keys (e.g. user IDs) with as many elements as ``labels``.

    Returns:
        tuple[Tensor, Tensor]: ``(weighted_auc_sum, weight_sum)`` as 0-dim ``float64`` tensors:
        the sum over the groups with both classes of ``auc_g * size_g``, and the sum of their
        sizes. GAUC is their ratio.

    Example::

        >>> group_auc_stats(torch.tensor([1, 0, 1, 0, 1]),
        ...                 torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]),
        ...                 torch.tensor([0, 1, 1, 1, 2]))
        (tensor(1.5000, dtype=torch.float64), tensor(3., dtype=torch.float64))
    """
    where = "GAUC"
    preds, labels_b = _check_preds_labels(predictions, labels, where)
    ind = _as_tensor(indicators, "indicators", where)
    if ind.numel() != labels_b.numel():
        raise ValueError(
            f"{where}: indicators must have one entry per label ({labels_b.numel()}), "
            f"got {ind.numel()} (shape {tuple(ind.shape)})"
        )
    if ind.is_complex():
        raise TypeError(f"{where}: indicators must be real numbers, got dtype {ind.dtype}")
    ind = ind.detach().reshape(-1).to(preds.device)
    if ind.dtype.is_floating_point and not bool(torch.isfinite(ind).all()):
        raise ValueError(f"{where}: indicators must be finite, got a nan or infinite value")
    zero = torch.zeros((), dtype=torch.float64)
    n = preds.numel()
    if n == 0:
        return zero, zero.clone()

    y = labels_b.to(torch.float64)
    # Group id of each sample: runs of equal consecutive indicators.
    starts = torch.ones(n, dtype=torch.bool, device=preds.device)
    starts[1:] = ind[1:] != ind[:-1]
    gid = torch.cumsum(starts.to(torch.int64), 0) - 1
    num_groups = int(gid[-1]) + 1

    # Sort by (group, prediction): stable sort by prediction, then stable sort by group.
    by_pred = torch.argsort(preds, stable=True)
    order = by_pred[torch.argsort(gid[by_pred], stable=True)]
    g = gid[order]
    p = preds[order]
    ys = y[order]

    # Blocks: maximal runs of equal prediction inside a group (the tie blocks).
    new_block = torch.ones(n, dtype=torch.bool, device=preds.device)
    new_block[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    block = torch.cumsum(new_block.to(torch.int64), 0) - 1
    num_blocks = int(block[-1]) + 1
    pos_b = torch.bincount(block, weights=ys, minlength=num_blocks)
    neg_b = torch.bincount(block, minlength=num_blocks).to(torch.float64) - pos_b
    group_of_block = g[new_block]

    size_g = torch.bincount(gid, minlength=num_groups).to(torch.float64)
    pos_g = torch.bincount(gid, weights=y, minlength=num_groups)
    neg_g = size_g - pos_g

    # Negatives strictly below each block, counted inside its own group.
    neg_before_block = torch.cumsum(neg_b, 0) - neg_b
    neg_before_group = torch.cumsum(neg_g, 0) - neg_g
    neg_below = neg_before_block - neg_before_group[group_of_block]
    wins_b = pos_b * (neg_below + 0.5 * neg_b)
    wins_g = torch.bincount(group_of_block, weights=wins_b, minlength=num_groups)

    valid = (pos_g > 0) & (neg_g > 0)
    auc_g = wins_g[valid] / (pos_g[valid] * neg_g[valid])
    weights = size_g[valid]
    return (auc_g * weights).sum().cpu(), weights.sum().cpu()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    if float(den) == 0.0:
        warnings.warn(
            "GAUC: undefined because no group has seen both classes; returning nan",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.tensor(float("nan"), dtype=torch.float64)
    return num / den


class GAUC(nn.Module):
    r"""Group AUC: the AUC of each group (e.g. each user), averaged with group-size weights.

    Groups follow RecIS: a group is a **run of equal consecutive** ``indicators`` values within
    one batch. Samples of the same user that are not adjacent form separate groups (sort a
    batch by user first to get per-user groups), and a group never spans two batches. Each
    group's AUC is exact (ties counted 1/2, as ``sklearn.metrics.roc_auc_score``); groups whose
    labels are all equal are skipped. Unlike RecIS, which drops the first and the last group of
    every batch, every group counts.

    .. math::
        \text{GAUC} = \frac{\sum_g n_g \, \text{AUC}_g}{\sum_g n_g}
        \quad\text{over groups } g \text{ with both classes}.

    The state is two numbers (the weighted sum and the weight sum), accumulated over batches.
    Under :mod:`torch.distributed` (initialized, world size > 1), :meth:`compute` all-reduces
    them (every rank must call it). While no group has had both classes the value is ``nan``
    and a :class:`RuntimeWarning` is issued.

    Example::

        >>> gauc = GAUC()
        >>> labels = torch.tensor([1, 0, 1, 0, 1])
        >>> preds = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
        >>> users = torch.tensor([0, 1, 1, 1, 2])
        >>> gauc(labels, preds, users)
        (tensor(0.5000, dtype=torch.float64), tensor(0.5000, dtype=torch.float64))
        >>> gauc.compute()
        tensor(0.5000, dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weighted_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("weight_sum", torch.zeros((), dtype=torch.float64), persistent=False)

    def update(self, labels: Any, predictions: Any, indicators: Any) -> None:
        r"""Add a batch to the state.

        Args:
            labels (Tensor): 0/1 or bool labels.
            predictions (Tensor): finite scores, one per label.
            indicators (Tensor): group keys, one per label.
        """
        num, den = group_auc_stats(labels, predictions, indicators)
        self.weighted_sum += num.to(self.weighted_sum.device)
        self.weight_sum += den.to(self.weight_sum.device)

    def forward(
        self, labels: Any, predictions: Any, indicators: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Add a batch to the state and return the batch and cumulative GAUC.

        Args:
            labels (Tensor): 0/1 or bool labels.
            predictions (Tensor): finite scores, one per label.
            indicators (Tensor): group keys, one per label.

        Returns:
            tuple[Tensor, Tensor]: ``(batch_gauc, cumulative_gauc)``, 0-dim ``float64``
            tensors; the cumulative value is local to this process (see :meth:`compute`).
        """
        num, den = group_auc_stats(labels, predictions, indicators)
        self.weighted_sum += num.to(self.weighted_sum.device)
        self.weight_sum += den.to(self.weight_sum.device)
        return _ratio(num, den), _ratio(self.weighted_sum.cpu(), self.weight_sum.cpu())

    def compute(self) -> torch.Tensor:
        r"""GAUC of everything accumulated since construction or the last :meth:`reset`.

        Returns:
            Tensor: 0-dim ``float64`` GAUC (``nan`` with a warning if undefined).
        """
        state = torch.stack([self.weighted_sum, self.weight_sum])
        if _dist_world_size() > 1:
            state = state.clone()
            dist.all_reduce(state, op=dist.ReduceOp.SUM)
        state = state.cpu()
        return _ratio(state[0], state[1])

    def reset(self) -> None:
        r"""Forget every accumulated batch."""
        self.weighted_sum.zero_()
        self.weight_sum.zero_()


#: Alias kept for compatibility with RecIS's spelling.
Gauc = GAUC
