"""Row-sparse optimizers for dynamic embedding tables."""

from recis.optim.adamw_tf import AdamWTF
from recis.optim.optimizers import (
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseAdamWTF,
    SparseSGD,
)
from recis.optim.sparse_optimizer import SparseOptimizer, check_hyper

__all__ = [
    "AdamWTF",
    "SparseOptimizer",
    "SparseAdamW",
    "SparseAdam",
    "SparseAdamWTF",
    "SparseAdagrad",
    "SparseSGD",
    "check_hyper",
]
