"""Ragged (variable-length) tensors."""

from recis.ragged.tensor import RaggedTensor

__all__ = ["RaggedTensor"]
