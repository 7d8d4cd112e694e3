"""``Feature``: a named pipeline of feature ops."""

from __future__ import annotations

from typing import Any

from torch import nn

from .op import SelectField, SelectFields, _Op

__all__ = ["Feature"]


class Feature(nn.Module):
    """A named op pipeline: the first op selects the input columns (:class:`SelectField` or
    :class:`SelectFields`), the next ones transform them; the last op's result is the
    feature's output, under ``name``.

    Args:
        name (str): the output key.

    Example::

        >>> feature = Feature("user").add_op(SelectField("user_id")).add_op(Mod(100))
        >>> feature({"user_id": torch.tensor([1234])})
        tensor([34])
    """

    def __init__(self, name: str):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise TypeError(f"Feature: name must be a non-empty str, got {name!r}")
        self.name = name
        self.ops = nn.ModuleList()

    def add_op(self, op: _Op) -> Feature:
        """Append ``op``; returns the feature, so that calls chain."""
        where = f"Feature({self.name!r}).add_op"
        if not isinstance(op, _Op):
            raise TypeError(f"{where}: op must be a feature op (recis.features.op), got "
                            f"{type(op).__name__}")
        selecting = isinstance(op, (SelectField, SelectFields))
        if not self.ops and not selecting:
            raise ValueError(f"{where}: the first op must be SelectField or SelectFields, got "
                             f"{type(op).__name__}")
        if self.ops and selecting:
            raise ValueError(f"{where}: {type(op).__name__} may only be the first op")
        self.ops.append(op)
        return self

    def signature(self) -> tuple:
        """The ops' signatures in order: equal for features that compute the same thing."""
        return tuple(op.signature() for op in self.ops)

    def forward(self, data: dict) -> Any:
        """Run the pipeline on one batch dict (without the engine's fusion)."""
        if not self.ops:
            raise ValueError(f"Feature({self.name!r}): has no ops; add a SelectField first")
        x = data
        for op in self.ops:
            x = op(x)
        return x
