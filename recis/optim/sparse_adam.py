"""``recis.optim.sparse_adam``: where RecIS code imports :class:`SparseAdam` from (defined in
:mod:`recis.optim.optimizers`)."""

from recis.optim.optimizers import SparseAdam

__all__ = ["SparseAdam"]
