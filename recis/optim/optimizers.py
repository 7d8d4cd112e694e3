"""The row-sparse optimizers: SparseAdamW, SparseAdam, SparseAdamWTF, SparseAdagrad, SparseSGD.

All update only the rows a backward pass touched, in one fused pass, and keep per-row state in
the tables' slots (reset when a filter removes the row). Dense parameters keep using any
``torch.optim`` optimizer::

    model = ...  # with DynamicEmbedding / EmbeddingEngine tables
    sparse_opt = SparseAdamW(filter_out_sparse_param(model), lr=1e-3)
    dense_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in data:
        dense_opt.zero_grad(); sparse_opt.zero_grad()
        model(batch).backward()
        dense_opt.step(); sparse_opt.step()
"""

from __future__ import annotations

from typing import Any

from recis._core.slots import SlotSpec
from recis.nn.modules.hashtable import HashTable
from recis.optim.functional import adagrad_rows, adam_rows, sgd_rows
from recis.optim.sparse_optimizer import SparseOptimizer, check_hyper

__all__ = ["SparseAdamW", "SparseAdam", "SparseAdamWTF", "SparseAdagrad", "SparseSGD"]


class _SparseAdamBase(SparseOptimizer):
    _prefix = "sparse_adamw_"

    def __init__(self, param_dict: Any, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                 **extra: Any):
        super().__init__(param_dict, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                          weight_decay=weight_decay, **extra))

    def validate(self, group):
        check_hyper("lr", group["lr"], 0.0)
        check_hyper("beta1", group["beta1"], 0.0, 1.0)
        check_hyper("beta2", group["beta2"], 0.0, 1.0)
        check_hyper("eps", group["eps"], 0.0, low_open=True)
        check_hyper("weight_decay", group["weight_decay"], 0.0)

    @property
    def exp_avg_slot(self) -> str:
        return self._prefix + "exp_avg"

    @property
    def exp_avg_sq_slot(self) -> str:
        return self._prefix + "exp_avg_sq"

    def slot_specs(self, table: HashTable) -> list[SlotSpec]:
        return [SlotSpec(name, table.embedding_shape, table.dtype, 0.0)
                for name in (self.exp_avg_slot, self.exp_avg_sq_slot)]

    def _decay(self, group: dict) -> tuple[float, float]:
        """(multiplicative decay of the rows, L2 coefficient added to the gradient)."""
        raise NotImplementedError

    def _update(self, table, rows, grad, state, group):
        decay, l2 = self._decay(group)
        adam_rows(table, rows, grad, exp_avg=self.exp_avg_slot, exp_avg_sq=self.exp_avg_sq_slot,
                  lr=group["lr"], beta1=group["beta1"], beta2=group["beta2"], eps=group["eps"],
                  step=state["step"], decay=decay, l2=l2)


class SparseAdamW(_SparseAdamBase):
    r"""Adam with decoupled weight decay on the touched rows (RecIS ``SparseAdamW``).

    Per update of a table (count ``t``) and touched row ``e`` with gradient ``g``:
    ``e *= 1 - lr * weight_decay``; ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``e -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.

    Bias correction counts the table's updates, not the row's (TF style, as RecIS): a row first
    touched at table step 1000 gets the step-1000 correction with fresh moments.

    Args:
        param_dict (dict[str, HashTable] | list | nn.Module): the tables.
        lr (float): learning rate. Default: 1e-3.
        beta1, beta2 (float): moment decay rates in [0, 1). Default: 0.9, 0.999.
        eps (float): added to ``sqrt(v)``. Default: 1e-8.
        weight_decay (float): decoupled decay. Default: 1e-2.
        amsgrad (bool): not supported (``True`` raises). Default: False.
    """

    _prefix = "sparse_adamw_"

    def __init__(self, param_dict: Any, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by SparseAdamW")
        super().__init__(param_dict, lr, beta1, beta2, eps, weight_decay)

    def _decay(self, group):
        return 1.0 - group["lr"] * group["weight_decay"], 0.0


class SparseAdam(_SparseAdamBase):
    r"""Adam on the touched rows; equals ``torch.optim.SparseAdam`` when ``weight_decay=0``.

    Same update as :class:`SparseAdamW` without the decoupled decay. ``weight_decay > 0`` adds
    ``weight_decay * e`` to the gradient (classic L2, as ``torch.optim.Adam``). RecIS accepts
    and ignores ``weight_decay`` (default 1e-2); our default 0 keeps its behaviour.
    """

    _prefix = "sparse_adam_"

    def __init__(self, param_dict: Any, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by SparseAdam")
        super().__init__(param_dict, lr, beta1, beta2, eps, weight_decay)

    def _decay(self, group):
        return 1.0, group["weight_decay"]


class SparseAdamWTF(_SparseAdamBase):
    r"""AdamW as in TensorFlow's decoupled-decay optimizers (RecIS ``SparseAdamWTF``): the row
    decays by ``1 - weight_decay`` per update, without the learning-rate factor; otherwise as
    :class:`SparseAdamW`. ``use_nesterov=True`` is not supported (raises)."""

    _prefix = "sparse_adamw_tf_"

    def __init__(self, param_dict: Any, lr: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2,
                 use_nesterov: bool = False):
        if use_nesterov:
            raise ValueError("use_nesterov=True is not supported by SparseAdamWTF")
        super().__init__(param_dict, lr, beta1, beta2, eps, weight_decay)

    def _decay(self, group):
        return 1.0 - group["weight_decay"], 0.0


class SparseAdagrad(SparseOptimizer):
    r"""Adagrad on the touched rows; equals ``torch.optim.Adagrad`` on those rows.

    ``s += g^2``; ``e -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)`` with ``t`` the
    table's update count and ``g`` including ``weight_decay * e``. The accumulator slot
    ``sparse_adagrad_sum`` starts at ``initial_accumulator_value``.

    Args:
        param_dict: the tables. lr (float): Default: 1e-2. lr_decay (float): Default: 0.
        weight_decay (float): L2 coefficient. Default: 0.
        initial_accumulator_value (float): Default: 0. eps (float): Default: 1e-10.
    """

    slot = "sparse_adagrad_sum"

    def __init__(self, param_dict: Any, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10):
        super().__init__(param_dict, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                          initial_accumulator_value=initial_accumulator_value,
                                          eps=eps))

    def validate(self, group):
        check_hyper("lr", group["lr"], 0.0)
        check_hyper("lr_decay", group["lr_decay"], 0.0)
        check_hyper("weight_decay", group["weight_decay"], 0.0)
        check_hyper("initial_accumulator_value", group["initial_accumulator_value"], 0.0)
        check_hyper("eps", group["eps"], 0.0, low_open=True)

    def slot_specs(self, table):
        return [SlotSpec(self.slot, table.embedding_shape, table.dtype,
                         self.defaults["initial_accumulator_value"])]

    def _update(self, table, rows, grad, state, group):
        adagrad_rows(table, rows, grad, state_sum=self.slot, lr=group["lr"], eps=group["eps"],
                     step=state["step"], lr_decay=group["lr_decay"],
                     l2=group["weight_decay"])


class SparseSGD(SparseOptimizer):
    r"""SGD on the touched rows; equals ``torch.optim.SGD`` (``dampening=0``) on those rows.

    With ``momentum > 0`` a per-row buffer (slot ``sparse_sgd_momentum``) is kept; rows not
    touched in a step are not moved by their momentum (lazy, as every sparse optimizer here).

    Args:
        param_dict: the tables. lr (float): Default: 1e-2. momentum (float): Default: 0.
        weight_decay (float): L2 coefficient. Default: 0. nesterov (bool): Default: False.
    """

    slot = "sparse_sgd_momentum"

    def __init__(self, param_dict: Any, lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(param_dict, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          nesterov=nesterov))

    def validate(self, group):
        check_hyper("lr", group["lr"], 0.0)
        check_hyper("momentum", group["momentum"], 0.0)
        check_hyper("weight_decay", group["weight_decay"], 0.0)
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("nesterov=True needs momentum > 0")

    def slot_specs(self, table):
        if self.defaults["momentum"] <= 0:
            return []
        return [SlotSpec(self.slot, table.embedding_shape, table.dtype, 0.0)]

    def _update(self, table, rows, grad, state, group):
        momentum = group["momentum"] if table.has_slot(self.slot) else 0.0
        sgd_rows(table, rows, grad, lr=group["lr"], momentum=momentum,
                 momentum_buffer=self.slot, nesterov=group["nesterov"],
                 l2=group["weight_decay"])
