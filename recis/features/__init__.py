"""Feature engine: turn raw batch columns into IDs with op pipelines (RecIS's
``recis.features``): :class:`Feature`, :class:`FeatureEngine` and the ops of
:mod:`recis.features.op`."""

from .feature import Feature
from .feature_engine import FeatureEngine
from .op import (
    Bucketize,
    FeatureCross,
    Hash,
    IDMultiHash,
    Int64ToString,
    Mod,
    SelectField,
    SelectFields,
    SequenceTruncate,
)

__all__ = [
    "Feature", "FeatureEngine", "SelectField", "SelectFields", "Mod", "Bucketize",
    "FeatureCross", "SequenceTruncate", "IDMultiHash", "Hash", "Int64ToString",
]
