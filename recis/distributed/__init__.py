"""Training on several processes with torch.distributed (gloo on CPU, nccl on CUDA).

Launch with ``torchrun``; after ``torch.distributed.init_process_group``, ``DynamicEmbedding``
and ``EmbeddingEngine`` shard their rows over the ranks (:mod:`recis.distributed.sharding`),
dense parameters go through ``DistributedDataParallel`` (the ``Trainer`` wraps the model), and
checkpoints are written by every rank into one directory.
"""

from recis.distributed.sharding import Request, ShardingContext, sharded_lookup, world_of

__all__ = ["ShardingContext", "Request", "sharded_lookup", "world_of"]
