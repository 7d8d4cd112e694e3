"""Row-sparse optimizer updates, applied in place to the touched rows of a table.

Each function takes a table, its unique touched ``rows`` and their gradient ``grad`` (one row per
entry, already summed over occurrences and divided by the accumulation steps) and updates the
embedding slot and the optimizer's slots of those rows, and nothing else ("lazy" updates: rows
without a gradient keep their values and state).

On CPU tables the update is one fused numba pass over the rows (reading and writing the slots
in place, split across threads); elsewhere, and as the reference, a plain-torch twin gathers the
rows, computes the same formula and writes them back. Both compute in the table's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from recis._core import kernels
from recis.nn.modules.hashtable import EMBEDDING_SLOT, HashTable

__all__ = ["adam_rows", "adagrad_rows", "sgd_rows"]


def _numba_ok(table: HashTable, *slots: str) -> bool:
    store = table._slots
    return all(store.uses_numba(s) for s in (EMBEDDING_SLOT, *slots))


def _addresses(table: HashTable, rows: Tensor, *slots: str):
    return [table._slots.row_addresses(s, rows) for s in slots]


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
    if _numba_ok(table, exp_avg, exp_avg_sq):
        addresses = _addresses(table, rows, EMBEDDING_SLOT, exp_avg, exp_avg_sq)
        kernels.update_rows("adam_update_range", addresses, grad.to(table.dtype), decay, beta1,
                            1 - beta1, beta2, 1 - beta2, alpha, eps, l2)
        return
    slots = table._slots
    e = slots.gather(EMBEDDING_SLOT, rows)
    m = slots.gather(exp_avg, rows)
    v = slots.gather(exp_avg_sq, rows)
    g = grad.to(e.dtype) + l2 * e
    e.mul_(decay)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    e.sub_(alpha * m / (v.sqrt() + eps))
    slots.scatter(EMBEDDING_SLOT, rows, e)
    slots.scatter(exp_avg, rows, m)
    slots.scatter(exp_avg_sq, rows, v)


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
    if _numba_ok(table, state_sum):
        addresses = _addresses(table, rows, EMBEDDING_SLOT, state_sum)
        kernels.update_rows("adagrad_update_range", addresses, grad.to(table.dtype), clr, eps,
                            l2)
        return
    slots = table._slots
    e = slots.gather(EMBEDDING_SLOT, rows)
    s = slots.gather(state_sum, rows)
    g = grad.to(e.dtype) + l2 * e
    s.addcmul_(g, g)
    e.sub_(clr * g / (s.sqrt() + eps))
    slots.scatter(EMBEDDING_SLOT, rows, e)
    slots.scatter(state_sum, rows, s)


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
    slots_needed = (momentum_buffer,) if momentum else ()
    if _numba_ok(table, *slots_needed):
        addresses = _addresses(table, rows, EMBEDDING_SLOT, *slots_needed)
        if not momentum:
            addresses.append(addresses[0])  # unused buffer argument
        kernels.update_rows("sgd_update_range", addresses, grad.to(table.dtype), lr, momentum,
                            l2, nesterov)
        return
    slots = table._slots
    e = slots.gather(EMBEDDING_SLOT, rows)
    g = grad.to(e.dtype) + l2 * e
    if momentum:
        b = slots.gather(momentum_buffer, rows)
        b.mul_(momentum).add_(g)
        slots.scatter(momentum_buffer, rows, b)
        g = g + momentum * b if nesterov else b
    e.sub_(lr * g)
    slots.scatter(EMBEDDING_SLOT, rows, e)
