"""Functional ops: combiners over bags of looked-up embeddings and RecIS's segment ops
(:mod:`.embedding_ops`)."""

from recis.nn.functional.embedding_ops import (
    bag_reduce,
    ids_encode,
    merge_offsets,
    ragged_embedding_segment_reduce,
    segment_sum_sparse,
    sparse_embedding_segment_reduce,
    weight_norm_sparse,
)

__all__ = ["bag_reduce", "segment_sum_sparse", "weight_norm_sparse",
           "sparse_embedding_segment_reduce", "ragged_embedding_segment_reduce", "merge_offsets",
           "ids_encode"]
