"""DeepFM over dynamic embedding tables (the model of ``python -m recis.examples.deepfm``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import NormalInitializer, TruncNormalInitializer
from recis.nn.modules.norm import DistributedBatchNorm1d

__all__ = ["DeepFM"]


class DeepFM(nn.Module):
    """DeepFM: ``logit = bias + first order + FM pairwise term + DNN``.

    Every sparse field ``c`` has a ``dim``-wide embedding (logical table ``c``) and a 1-wide
    first-order weight (logical table ``c_w``); fields with equal settings share one physical
    table per width, with separate ID spaces. Dense features are ``log1p(max(x, 0))`` followed
    by batch normalisation.

    Args:
        sparse_fields (list[str]): names of the ID features in the batch.
        num_dense (int): width of the ``dense`` feature tensor (0 for none).
        dim (int): embedding width. Default: 16.
        hidden (tuple[int, ...]): DNN layer widths; empty for an FM without DNN.
            Default: (256, 128).
        filter_step (int, optional): GlobalStepFilter steps on every table (None: no filter).
        seed (int): seed of the embedding initializers. Default: 0.
        dropout (float): dropout after each hidden layer. Default: 0.
        min_count (int): admit an ID after this many occurrences (``MinCount``). Default: 1.
        filter_hook (FilterHook, optional): any eviction policy for every table, instead of
            ``filter_step``'s GlobalStepFilter (e.g. ``FilterHook("LFU", {"max_rows": n})``).

    Input batch: ``{"label": (B,), "dense": (B, num_dense), field: (B, K) ids or RaggedTensor}``.
    Returns ``{"loss", "preds", "labels"}`` (what :class:`~recis.framework.Trainer` expects).
    """

    def __init__(self, sparse_fields: Sequence[str], num_dense: int, dim: int = 16,
                 hidden: Sequence[int] = (256, 128), filter_step: int | None = None,
                 seed: int = 0, dropout: float = 0.0, min_count: int = 1,
                 filter_hook: FilterHook | None = None):
        super().__init__()
        if not sparse_fields:
            raise ValueError("sparse_fields must name at least one ID feature")
        self.sparse_fields = list(sparse_fields)
        self.num_dense = num_dense
        #: the arguments that shape the layers: ``DeepFM(**structure)`` rebuilds an empty twin
        #: (what :func:`recis.export.load` fills with an export)
        self.structure = {"sparse_fields": self.sparse_fields, "num_dense": num_dense,
                          "dim": dim, "hidden": list(hidden), "dropout": dropout}
        if filter_hook is not None and filter_step:
            raise ValueError("give filter_step or filter_hook, not both")
        hook = filter_hook or (FilterHook("GlobalStepFilter", {"filter_step": filter_step})
                               if filter_step else None)
        admit = AdmitHook("MinCount", {"min_count": min_count}) if min_count > 1 else None
        gen = torch.Generator().manual_seed(seed)
        emb_init = TruncNormalInitializer(std=0.01, a=-0.02, b=0.02, generator=gen)
        w_init = NormalInitializer(std=1e-4, generator=torch.Generator().manual_seed(seed + 1))
        options = {}
        for field in self.sparse_fields:
            options[field] = EmbeddingOption(embedding_dim=dim, shared_name=field,
                                             initializer=emb_init, filter_hook=hook,
                                             admit_hook=admit)
            options[f"{field}_w"] = EmbeddingOption(embedding_dim=1, shared_name=f"{field}_w",
                                                    initializer=w_init, filter_hook=hook,
                                                    admit_hook=admit)
        self.embedding = EmbeddingEngine(options)
        # batch statistics over every process's rows: N processes train as one
        self.dense_norm = DistributedBatchNorm1d(num_dense) if num_dense else None
        layers: list[nn.Module] = []
        width = dim * len(self.sparse_fields) + num_dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.dnn = nn.Sequential(*layers)
        self.dense_linear = nn.Linear(num_dense, 1) if num_dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def logits(self, batch: dict) -> Tensor:
        feats = {f: batch[f] for f in self.sparse_fields}
        feats.update({f"{f}_w": batch[f] for f in self.sparse_fields})
        out = self.embedding(feats)
        emb = torch.stack([out[f] for f in self.sparse_fields], dim=1)  # (B, F, D)
        first = torch.cat([out[f"{f}_w"] for f in self.sparse_fields], dim=1).sum(1)  # (B,)
        summed = emb.sum(1)
        fm = 0.5 * (summed.pow(2) - emb.pow(2).sum(1)).sum(1)  # (B,)
        parts = [emb.flatten(1)]
        logit = self.bias + first + fm
        if self.num_dense:
            dense = self.dense_norm(torch.log1p(batch["dense"].clamp(min=0)))
            parts.append(dense)
            logit = logit + self.dense_linear(dense).squeeze(1)
        return logit + self.dnn(torch.cat(parts, dim=1)).squeeze(1)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        logit = self.logits(batch)
        label = batch["label"].reshape(-1).to(logit.dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(logit, label)
        return {"loss": loss, "preds": torch.sigmoid(logit.detach()), "labels": label}
