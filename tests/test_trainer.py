"""Trainer: hook calls, accumulation, read-only evaluation, learning on a simple task."""

import pytest
import torch
from torch import nn

from recis.framework import Trainer, TrainingArguments
from recis.hooks.filter_hook import HashTableFilterHook
from recis.hooks.hook import Hook
from recis.nn import DynamicEmbedding, EmbeddingOption
from recis.nn.hashtable_hook import FilterHook
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseSGD


class CountingHook(Hook):
    def __init__(self):
        self.steps, self.evals, self.ended = [], 0, False

    def after_step(self, metrics=None, global_step=None):
        self.steps.append((global_step, metrics["loss"]))

    def after_evaluate(self, metrics=None, *a, **k):
        self.evals += 1

    def end(self, *a, **k):
        self.ended = True


class TinyCTR(nn.Module):
    """Logistic regression on one dynamic table: label = 1 for even IDs."""

    def __init__(self, filter_hook=None):
        super().__init__()
        self.emb = DynamicEmbedding(EmbeddingOption(embedding_dim=1, shared_name="ids",
                                                    filter_hook=filter_hook))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        logits = self.emb(batch["ids"]).squeeze(1) + self.bias
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
        return {"loss": loss, "preds": torch.sigmoid(logits), "labels": batch["label"]}


def stream(n_batches, seed=0, batch=64):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        ids = torch.randint(0, 200, (batch, 1), generator=gen)
        yield {"ids": ids, "label": (ids.squeeze(1) % 2 == 0).float()}


class Stream:
    def __init__(self, n, seed=0):
        self.n, self.seed = n, seed

    def __iter__(self):
        return stream(self.n, self.seed)


def make_trainer(model, steps, hooks=(), accum=1, eval_data=None, eval_steps=None):
    args = TrainingArguments(train_steps=steps, gradient_accumulation_steps=accum,
                             log_steps=5, eval_steps=eval_steps, progress_bar=False)
    return Trainer(model, args, Stream(7), eval_data, hooks=list(hooks),
                   dense_optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                   sparse_optimizer=SparseAdagrad(filter_out_sparse_param(model), lr=0.5))


def test_after_step_runs_exactly_train_steps_times_across_epochs():
    hook = CountingHook()
    trainer = make_trainer(TinyCTR(), steps=17, hooks=[hook])  # dataset has 7 batches
    trainer.train()
    assert [s for s, _ in hook.steps] == list(range(17))
    assert trainer.global_step == 17 and hook.ended
    assert [h["step"] for h in trainer.history] == [5, 10, 15, 17]


def test_learns_and_evaluates_read_only():
    model = TinyCTR()
    hook = CountingHook()
    trainer = make_trainer(model, steps=60, hooks=[hook], eval_data=Stream(3, seed=9),
                           eval_steps=30)
    trainer.train()
    assert hook.evals == 2
    size = len(model.emb.hashtable)
    unseen = [{"ids": torch.arange(10_000, 10_064).view(64, 1), "label": torch.ones(64)}]
    with pytest.warns(RuntimeWarning, match="undefined"):  # one class only: AUC is nan
        trainer.evaluate(unseen)
    assert len(model.emb.hashtable) == size  # eval never admits
    assert model.training
    metrics = trainer.evaluate(Stream(3, seed=9))
    assert metrics["eval_auc"] > 0.95 and metrics["eval_logloss"] < 0.5
    first, last = hook.steps[0][1], hook.steps[-1][1]
    assert last < first
    assert [s for s, _ in hook.steps] == list(range(60))  # evaluation did not call after_step


def test_gradient_accumulation_matches_a_bigger_batch():
    torch.manual_seed(0)
    data = list(stream(4, seed=3, batch=16))
    merged = [{k: torch.cat([data[i][k], data[i + 1][k]]) for k in data[0]} for i in (0, 2)]

    def run(batches, accum):
        model = TinyCTR()
        args = TrainingArguments(train_steps=len(batches), gradient_accumulation_steps=accum,
                                 progress_bar=False)
        Trainer(model, args, batches, dense_optimizers=(
            torch.optim.SGD(model.parameters(), lr=0.5), None),
            sparse_optimizer=SparseSGD(filter_out_sparse_param(model), lr=0.5)).train()
        return model.bias.detach().clone(), dict(zip(model.emb.hashtable.ids().tolist(),
                                                     model.emb.hashtable.embeddings(), strict=True))

    (bias_a, rows_a), (bias_b, rows_b) = run(data, 2), run(merged, 1)
    torch.testing.assert_close(bias_a, bias_b)
    assert rows_a.keys() == rows_b.keys()
    for k in rows_a:
        torch.testing.assert_close(rows_a[k], rows_b[k])


def test_filter_hook_runs_inside_the_trainer():
    model = TinyCTR(filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 2}))
    hook = HashTableFilterHook(filter_interval=1, tables=[model])
    data = [{"ids": torch.tensor([[i]]), "label": torch.ones(1)} for i in range(6)]
    args = TrainingArguments(train_steps=6, progress_bar=False)
    Trainer(model, args, data, hooks=[hook],
            sparse_optimizer=SparseSGD(filter_out_sparse_param(model))).train()
    assert sorted(model.emb.hashtable.ids().tolist()) == [4, 5]


def test_errors():
    with pytest.raises(ValueError, match="train_steps"):
        TrainingArguments(train_steps=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainingArguments(gradient_accumulation_steps=0)

    class Bad(nn.Module):
        def forward(self, batch):
            return [1]

    with pytest.raises(TypeError, match="must return its loss"):
        Trainer(Bad(), TrainingArguments(train_steps=1, progress_bar=False), [{}]).train()
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer(object())
