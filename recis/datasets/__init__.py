"""Built-in datasets: a synthetic, drifting click stream."""

from recis.datasets.synthetic import SyntheticClickStream

__all__ = ["SyntheticClickStream"]
