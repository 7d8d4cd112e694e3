"""``FeatureEngine``: run many features over a batch, deduplicated and fused by step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .feature import Feature
from .op import _Op

__all__ = ["FeatureEngine"]


class FeatureEngine(nn.Module):
    """Turn a batch dict into model inputs with a list of :class:`Feature` pipelines.

    * **Deduplication**: features whose pipelines are equal (same ops with the same
      settings, in the same order) are computed once; the others get the same output under
      their own names. (RecIS's key also includes the name and sorts the op hashes.)
    * **Steps**: step ``k`` runs the ``k``-th op of every feature that has one.
    * **Fusion**: within a step, ops of one type run together through the op class's
      ``run_fused`` (e.g. all ``Hash`` ops in one kernel call, all ``Mod`` ops in one pass).

    Every step keeps each feature's intermediate value; the result is a dict with one entry
    per feature name. An op returning a dict (``IDMultiHash``) gives one entry per key,
    named ``f"{feature}_{key}"``. The engine holds no state between calls, so it can run
    in DataLoader workers (it pickles with its ops).

    Args:
        feature_list (list of Feature): the features; names must be distinct.

    Example::

        >>> engine = FeatureEngine([
        ...     Feature("user").add_op(SelectField("user_id")).add_op(Mod(100)),
        ...     Feature("age").add_op(SelectField("age")).add_op(Bucketize([18, 30])),
        ... ])
        >>> out = engine({"user_id": torch.tensor([1234]), "age": torch.tensor([20.0])})
        >>> out["user"], out["age"]
        (tensor([34]), tensor([1]))
    """

    def __init__(self, feature_list: Sequence[Feature]):
        super().__init__()
        if isinstance(feature_list, Feature) or not isinstance(feature_list, Sequence):
            raise TypeError("FeatureEngine: feature_list must be a list of Feature, got "
                            f"{type(feature_list).__name__}")
        names: set[str] = set()
        primary_of_signature: dict[tuple, str] = {}
        self.features = nn.ModuleDict()
        #: name of a duplicate feature -> name of the feature computed in its place
        self.aliases: dict[str, str] = {}
        for feature in feature_list:
            if not isinstance(feature, Feature):
                raise TypeError("FeatureEngine: feature_list entries must be Feature, got "
                                f"{type(feature).__name__}")
            if feature.name in names:
                raise ValueError(f"FeatureEngine: duplicate feature name {feature.name!r}")
            if not len(feature.ops):
                raise ValueError(f"FeatureEngine: feature {feature.name!r} has no ops; add a "
                                 "SelectField first")
            names.add(feature.name)
            signature = feature.signature()
            if signature in primary_of_signature:
                self.aliases[feature.name] = primary_of_signature[signature]
            else:
                primary_of_signature[signature] = feature.name
                self.features[feature.name] = feature
        self.steps = self._compile()

    def _compile(self) -> list[list[tuple[type, list[str], list[_Op]]]]:
        """Per step, the groups ``(op type, feature names, ops)`` that run together."""
        depth = max((len(f.ops) for f in self.features.values()), default=0)
        steps = []
        for k in range(depth):
            groups: dict[type, tuple[list[str], list[_Op]]] = {}
            for name, feature in self.features.items():
                if k < len(feature.ops):
                    op = feature.ops[k]
                    names, ops = groups.setdefault(type(op), ([], []))
                    names.append(name)
                    ops.append(op)
            steps.append([(cls, names, ops) for cls, (names, ops) in groups.items()])
        return steps

    def forward(self, data: dict, remain_no_use_data: bool = True) -> dict[str, Any]:
        """The features of one batch.

        Args:
            data (dict): the batch, column name -> Tensor or RaggedTensor.
            remain_no_use_data (bool): also return the batch's columns that no feature
                output replaces. Default: ``True``.

        Returns:
            dict: feature name -> output (plus the other columns, see above).
        """
        if not isinstance(data, dict):
            raise TypeError(f"FeatureEngine: data must be a dict, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for step in self.steps:
            for cls, names, ops in step:
                inputs = [values.get(name, data) for name in names]
                for name, out in zip(names, cls.run_fused(ops, inputs), strict=True):
                    values[name] = out
        results: dict[str, Any] = dict(data) if remain_no_use_data else {}
        for name in [*self.features, *self.aliases]:
            out = values[self.aliases.get(name, name)]
            if isinstance(out, dict):
                results.pop(name, None)
                for key, value in out.items():
                    results[f"{name}_{key}"] = value
            else:
                results[name] = out
        return results
