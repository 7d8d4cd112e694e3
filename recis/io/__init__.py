"""Data readers: ORC, Parquet and CSV/TSV files streamed as batches of tensors."""

from recis.io.convert import hash_strings
from recis.io.criteo import criteo_batch_to_features, criteo_columns, criteo_dataset
from recis.io.readers import FORMATS, FileDataset, infer_format
from recis.io.sharding import current_shard, resolve_rank

__all__ = [
    "FORMATS",
    "FileDataset",
    "criteo_batch_to_features",
    "criteo_columns",
    "criteo_dataset",
    "current_shard",
    "hash_strings",
    "infer_format",
    "resolve_rank",
]
