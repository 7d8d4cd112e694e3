"""``recis.optim.sparse_adagrad``: where RecIS code imports :class:`SparseAdagrad` from (defined in
:mod:`recis.optim.optimizers`)."""

from recis.optim.optimizers import SparseAdagrad

__all__ = ["SparseAdagrad"]
