"""Functional ops: combiners over bags of looked-up embeddings and RecIS's segment and ragged
ops (:mod:`.embedding_ops`, :mod:`.ragged_ops`)."""

from recis.nn.functional.embedding_ops import (
    bag_reduce,
    ids_encode,
    merge_offsets,
    ragged_embedding_segment_reduce,
    segment_sum_sparse,
    sparse_embedding_segment_reduce,
    weight_norm_sparse,
)
from recis.nn.functional.ragged_ops import (
    dense_to_ragged,
    fused_ragged_cutoff_2D,
    fused_ragged_cutoff_3D,
    ragged_tile,
    ragged_to_dense,
    ragged_to_sparse,
)

__all__ = ["bag_reduce", "segment_sum_sparse", "weight_norm_sparse",
           "sparse_embedding_segment_reduce", "ragged_embedding_segment_reduce", "merge_offsets",
           "ids_encode", "ragged_tile", "dense_to_ragged", "ragged_to_dense", "ragged_to_sparse",
           "fused_ragged_cutoff_2D", "fused_ragged_cutoff_3D"]
