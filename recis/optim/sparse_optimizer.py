"""SparseOptimizer: the torch.optim.Optimizer base of the row-sparse table optimizers."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from recis._core.slots import SlotSpec
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.utils.checks import check_positive_int

__all__ = ["SparseOptimizer", "check_hyper"]


def check_hyper(name: str, value: Any, low: float, high: float | None = None, *,
                low_open: bool = False, high_open: bool = True) -> None:
    """Raise unless ``value`` is a real number in the given range; the message names it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        bound = (f"in {left}{low}, {high}{')' if high_open else ']'}" if high is not None
                 else f"{'>' if low_open else '>='} {low}")
        raise ValueError(f"{name} must be {bound}, got {value}")


def _tables_of(params: Any) -> dict[str, HashTable]:
    if isinstance(params, nn.Module) and not isinstance(params, HashTable):
        params = filter_out_sparse_param(params)
    if isinstance(params, HashTable):
        params = [params]
    if isinstance(params, Mapping):
        items = list(params.items())
    elif isinstance(params, Iterable):
        items = [(getattr(t, "name", None), t) for t in params]
    else:
        raise TypeError(
            "params must be a dict {name: HashTable} (e.g. filter_out_sparse_param(model)), a "
            f"list of HashTables or a model, got {type(params).__name__}"
        )
    tables: dict[str, HashTable] = {}
    for name, table in items:
        if not isinstance(table, HashTable):
            raise TypeError(f"params[{name!r}] must be a HashTable, got {type(table).__name__}")
        if name in tables or any(t is table for t in tables.values()):
            raise ValueError(f"table {name!r} is given twice")
        tables[name] = table
    return tables


class SparseOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that update table rows touched by a backward pass.

    Subclasses declare their per-row slots (:meth:`slot_specs`, added to every table, so the
    state moves, filters and checkpoints with the rows), check their hyperparameters
    (:meth:`validate`, at construction and before every step, so a scheduler or a user editing
    ``param_groups`` cannot make a step fail half-way) and implement :meth:`_update`. The base
    class keeps one param group holding the hyperparameters (so LR schedulers work), the
    per-table counters in ``self.state[table_name]``, gradient accumulation and
    ``state_dict``. A step either updates every table or, if a hyperparameter is invalid,
    changes nothing.

    Gradient accumulation: with ``set_grad_accum_steps(n)`` every ``n``-th :meth:`step` updates
    the rows with the gradient summed over the ``n`` backward passes and divided by ``n``;
    :meth:`zero_grad` only clears at those boundaries, so a loop may call ``zero_grad``,
    ``backward`` and ``step`` every micro-step.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]):
        self.validate(defaults)
        tables = _tables_of(params)
        super().__init__([{"params": [], **defaults}], defaults)
        self._tables: dict[str, HashTable] = {}
        self._grad_accum_steps = 1
        self._local_step = 0
        self.add_params(tables)

    # -- tables ------------------------------------------------------------------------------
    def slot_specs(self, table: HashTable) -> list[SlotSpec]:
        """The per-row state this optimizer keeps in ``table``."""
        return []

    def validate(self, group: Mapping[str, Any]) -> None:
        """Raise if a hyperparameter of ``group`` is invalid (see :func:`check_hyper`)."""

    def add_params(self, params: Any) -> None:
        """Add tables (a dict name -> HashTable, a list, or a model); their slots are created
        now, also for rows the tables already hold."""
        for name, table in _tables_of(params).items():
            if name in self._tables or any(t is table for t in self._tables.values()):
                raise ValueError(f"table {name!r} is already handled by this optimizer")
            for spec in self.slot_specs(table):
                if table.has_slot(spec.name):
                    have = table.store.slot_spec(spec.name)
                    if (have.row_shape, have.dtype) != (spec.row_shape, spec.dtype):
                        raise ValueError(f"table {name!r} already has a slot {spec.name!r} of "
                                         f"shape {have.row_shape} {have.dtype}, this optimizer "
                                         f"needs {spec.row_shape} {spec.dtype}")
                else:
                    table.store.declare_slot(spec)
            self._tables[name] = table
            self.state[name] = {"step": 0}

    @property
    def tables(self) -> dict[str, HashTable]:
        return dict(self._tables)

    # -- steps -------------------------------------------------------------------------------
    def set_grad_accum_steps(self, steps: int) -> None:
        self._grad_accum_steps = check_positive_int(steps, "grad accumulation steps")

    @property
    def grad_accum_steps(self) -> int:
        return self._grad_accum_steps

    def _at_boundary(self) -> bool:
        return self._local_step % self._grad_accum_steps == 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the tables' gradients (only at accumulation boundaries)."""
        if self._at_boundary():
            for table in self._tables.values():
                table.clear_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """Update every table that received a gradient (at accumulation boundaries)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._local_step += 1
        if not self._at_boundary():
            return loss
        group = self.param_groups[0]
        self.validate(group)  # before any table changes
        pending = []
        for name, table in self._tables.items():
            rows, grad = table.grad_rows(self._grad_accum_steps)
            if rows.numel() or table.grad_pending:
                pending.append((name, table, rows, grad))
        for name, table, rows, grad in pending:
            state = self.state[name]
            state["step"] += 1  # per training step of the table, on every shard
            if rows.numel():
                with table.store.lock.write():  # no other thread sees half-updated rows
                    self._update(table, rows, grad, state, group)
                    table.store.mark_written(rows)
        return loss

    def _update(self, table: HashTable, rows, grad, state: dict, group: dict) -> None:
        """Update ``rows`` (unique, ascending or in lookup order) of ``table`` with ``grad``
        (per-row sums divided by the accumulation steps); ``state["step"]`` counts this
        table's updates, ``group`` holds the hyperparameters. Runs under the table's write
        lock; the rows are marked written afterwards."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and per-table counters, keyed by table name::

            {"state": {"user": {"step": 12}, "item": {"step": 9}},
             "param_groups": [{"lr": 0.001, ..., "tables": ["user", "item"]}],
             "grad_accum_steps": 1, "local_step": 12}

        Per-row state (moments, accumulators) lives in the tables' slots and is saved with
        the tables.
        """
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["tables"] = list(self._tables)
        return {
            "state": {name: dict(self.state[name]) for name in self._tables},
            "param_groups": [group],
            "grad_accum_steps": self._grad_accum_steps,
            "local_step": self._local_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the tables must be the same by name."""
        try:
            group = dict(state_dict["param_groups"][0])
            states = state_dict["state"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("not a SparseOptimizer state_dict") from None
        saved = group.pop("tables", list(states))
        if set(saved) != set(self._tables):
            raise ValueError(
                f"loaded state is for tables {sorted(saved)}, this optimizer has "
                f"{sorted(self._tables)}"
            )
        merged = {**self.param_groups[0], **group}
        self.validate(merged)
        for name in self._tables:
            self.state[name] = dict(states[name])
        self.param_groups[0].update(group)
        self._grad_accum_steps = int(state_dict.get("grad_accum_steps", 1))
        self._local_step = int(state_dict.get("local_step", 0))

    def __repr__(self) -> str:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}(tables={list(self._tables)}, {group})"
