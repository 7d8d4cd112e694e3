"""``recis.optim.sparse_adamw_tf``: where RecIS code imports :class:`SparseAdamWTF` from (defined in
:mod:`recis.optim.optimizers`)."""

from recis.optim.optimizers import SparseAdamWTF

__all__ = ["SparseAdamWTF"]
