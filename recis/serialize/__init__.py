"""Checkpoints that cannot tear: safetensors files, a JSON index with checksums, atomic
publication, exact restore, resharding and incremental saves."""

from recis.serialize._files import CheckpointError
from recis.serialize.checkpoint import CheckpointReader, Loader, Saver, compact

__all__ = ["Saver", "Loader", "CheckpointReader", "CheckpointError", "compact"]
