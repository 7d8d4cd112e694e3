"""Evaluation metrics: exact or thresholded AUROC, and group AUC."""

from recis.metrics.auroc import AUROC, binary_auroc
from recis.metrics.gauc import GAUC, Gauc, group_auc_stats

__all__ = ["AUROC", "GAUC", "Gauc", "binary_auroc", "group_auc_stats"]
