"""Row-sparse optimizer updates, applied in place to the touched rows of a table.

Each function takes a table, its unique touched ``rows`` and their gradient ``grad`` (one row per
entry, already summed over occurrences and divided by the accumulation steps) and updates the
embedding slot and the optimizer's slots of those rows, and nothing else ("lazy" updates: rows
without a gradient keep their values and state). The rows must be unique: the updates are not
linear.

The update runs as the table's backend kernel (one fused pass over the rows on CPU, split
across threads; gather, compute, scatter in plain torch elsewhere), under the table's write
lock, and marks the rows written. Both compute in the table's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recis._core.backends import check_rows
from recis.nn.modules.hashtable import EMBEDDING_SLOT, HashTable

__all__ = ["adam_rows", "adagrad_rows", "sgd_rows"]


def _run(table: HashTable, kernel: str, slots: tuple[str | None, ...], rows: Tensor,
         grad: Tensor, **scalars) -> None:
    store = table.store
    with store.lock.write():
        check_rows(rows, store.capacity, "rows of the gradient")
        if bool((rows < 0).any()):
            raise IndexError("rows of the gradient must be >= 0")
        blocks = [None if s is None else store.block_list(s) for s in (EMBEDDING_SLOT, *slots)]
        getattr(store.backend, kernel)(*blocks, rows, grad, **scalars)
        store.mark_written(rows)


@torch.no_grad()
def adam_rows(
    table: HashTable,
    rows: Tensor,
    grad: Tensor,
    *,
    exp_avg: str,
    exp_avg_sq: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    decay: float = 1.0,
    l2: float = 0.0,
) -> None:
    r"""Adam-family update of ``rows`` (RecIS's formula, TF style).

    .. math::
        g &\leftarrow g + \lambda_{2} e \\
        e &\leftarrow e \cdot \mathrm{decay} \\
        m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        e &\leftarrow e - \mathrm{lr} \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
             \frac{m}{\sqrt{v} + \epsilon}

    with ``t = step`` the table's update count (bias correction per table, not per row).
    ``decay = 1 - lr * wd`` gives AdamW, ``1 - wd`` AdamWTF; ``l2 = wd`` gives Adam's L2 decay.
    """
    if rows.numel() == 0:
        return
    alpha = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    _run(table, "adam_update", (exp_avg, exp_avg_sq), rows, grad, decay=decay, beta1=beta1,
         beta2=beta2, alpha=alpha, eps=eps, l2=l2)


@torch.no_grad()
def adagrad_rows(
    table: HashTable,
    rows: Tensor,
    grad: Tensor,
    *,
    state_sum: str,
    lr: float,
    eps: float,
    step: int,
    lr_decay: float = 0.0,
    l2: float = 0.0,
) -> None:
    r"""Adagrad update of ``rows`` (``torch.optim.Adagrad``'s formula).

    .. math::
        g \leftarrow g + \lambda_2 e, \quad s \leftarrow s + g^2, \quad
        e \leftarrow e - \frac{\mathrm{lr}}{1 + (t - 1)\,\mathrm{lr\_decay}}
             \frac{g}{\sqrt{s} + \epsilon}
    """
    if rows.numel() == 0:
        return
    clr = lr / (1 + (step - 1) * lr_decay)
    _run(table, "adagrad_update", (state_sum,), rows, grad, clr=clr, eps=eps, l2=l2)


@torch.no_grad()
def sgd_rows(
    table: HashTable,
    rows: Tensor,
    grad: Tensor,
    *,
    lr: float,
    momentum: float = 0.0,
    momentum_buffer: str | None = None,
    nesterov: bool = False,
    l2: float = 0.0,
) -> None:
    r"""SGD update of ``rows`` (``torch.optim.SGD`` with ``dampening=0``).

    .. math::
        g \leftarrow g + \lambda_2 e, \quad b \leftarrow \mu b + g, \quad
        e \leftarrow e - \mathrm{lr} \cdot (g + \mu b \text{ if nesterov else } b)

    (``b = g`` without momentum). A row's momentum buffer starts at 0, so its first update
    equals torch's, where the buffer starts at the first gradient.
    """
    if rows.numel() == 0:
        return
    _run(table, "sgd_update", (momentum_buffer if momentum else None,), rows, grad, lr=lr,
         momentum=momentum, l2=l2, nesterov=nesterov)
