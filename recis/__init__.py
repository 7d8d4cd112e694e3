"""recis: dynamic embedding tables keyed by raw int64 IDs, for PyTorch recommendation models."""

__version__ = "0.1.0"
