"""Row-sparse optimizers for dynamic embedding tables."""

from recis.optim.optimizers import (
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseAdamWTF,
    SparseSGD,
)
from recis.optim.sparse_optimizer import SparseOptimizer, check_hyper

__all__ = [
    "SparseOptimizer",
    "SparseAdamW",
    "SparseAdam",
    "SparseAdamWTF",
    "SparseAdagrad",
    "SparseSGD",
    "check_hyper",
]
