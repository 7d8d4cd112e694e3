"""``recis.optim.sparse_adamw``: where RecIS code imports :class:`SparseAdamW` from (defined in
:mod:`recis.optim.optimizers`)."""

from recis.optim.optimizers import SparseAdamW

__all__ = ["SparseAdamW"]
