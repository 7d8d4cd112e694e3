"""Trainer: a plain PyTorch training loop for models with dynamic embedding tables.

The model returns its loss, or a dict with ``"loss"`` and, for evaluation metrics,
``"preds"`` (probabilities in [0, 1]) and ``"labels"``::

    args = TrainingArguments(train_steps=1000, eval_steps=200, log_steps=100)
    trainer = Trainer(model, args, train_data, eval_data,
                      hooks=[HashTableFilterHook(filter_interval=100)],
                      dense_optimizers=(torch.optim.AdamW(model.parameters()), None),
                      sparse_optimizer=SparseAdamW(filter_out_sparse_param(model)))
    trainer.train()
    print(trainer.evaluate())
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from recis.distributed.sharding import collective_device
from recis.hooks.hook import Hook
from recis.hooks.logger_hook import LoggerHook
from recis.nn.modules.hashtable import HashTable
from recis.ragged.tensor import RaggedTensor
from recis.serialize._files import CheckpointError
from recis.utils.checks import check_positive_int
from recis.utils.logger import Logger

logger = Logger(__name__)

__all__ = ["Trainer", "TrainingArguments", "TrainingInterrupted", "table_label"]


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :meth:`Trainer.train` after a Ctrl-C (SIGINT) stopped it at a step boundary.

    Attributes:
        step (int): the global step training stopped at (steps done).
        checkpoint (str or None): the checkpoint saved on the way out (with ``save_steps``).
    """

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"training interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


def table_label(table: HashTable) -> str:
    """A readable name of a physical table: its width and (up to 3 of) its logical tables,
    e.g. ``"dim 16 (c1, c2, c3, ...)"``."""
    return table.label


@dataclass
class TrainingArguments:
    """Training-loop settings (RecIS's fields and defaults).

    A *step* is one batch: hooks see ``after_step`` once per batch, and the optimizers update
    every ``gradient_accumulation_steps`` batches with the mean gradient of those batches.
    """

    gradient_accumulation_steps: int = 1
    output_dir: str = "output_dir"
    model_bank: Any = None  # RecIS: warm-start sources; not used here
    log_steps: int = 100  # LoggerHook interval
    train_steps: int | None = None  # stop after this many batches (None: train_epoch epochs)
    train_epoch: int = 1  # passes over train_dataset when train_steps is None
    eval_steps: int | None = None  # evaluate every eval_steps batches (None: only at the end)
    save_steps: int | None = None  # checkpoint every N steps into output_dir (None: never;
    # RecIS defaults to 1000 and always writes; we write only when asked)
    max_to_keep: int = 5
    save_concurrency_per_rank: int = 4
    max_eval_batches: int | None = None  # cap on evaluation batches (None: the whole set)
    progress_bar: bool = True  # tqdm bar with loss and examples/s
    resume: bool = True  # with save_steps: continue from output_dir's latest checkpoint
    incremental_every: int = 0  # every save but one in N is incremental (0: always full)
    async_save: bool = False  # save_steps checkpoints are copied at the step and written by a
    # background thread while training goes on (train() waits for the last one before it returns)
    tensorboard_dir: str | None = None  # write history records as TensorBoard scalars here
    # (rank 0; needs the ``tensorboard`` package: pip install "recis[tensorboard]")

    def __post_init__(self):
        for name in ("gradient_accumulation_steps", "log_steps", "train_epoch"):
            check_positive_int(getattr(self, name), name)
        for name in ("train_steps", "eval_steps", "max_eval_batches", "save_steps"):
            check_positive_int(getattr(self, name), name, allow_none=True)


def batch_size_of(batch: Any) -> int:
    """Rows in a batch: the first tensor's first dim (or a RaggedTensor's rows)."""
    if isinstance(batch, Mapping):
        values = list(batch.values())
        if "label" in batch:
            values.insert(0, batch["label"])
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        values = [batch]
    for v in values:
        if isinstance(v, RaggedTensor):
            return v.offsets()[0].numel() - 1
        if isinstance(v, Tensor) and v.dim() > 0:
            return v.shape[0]
    return 0


def move_batch(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (Tensor, RaggedTensor)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def _split_output(out: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(out, Tensor):
        return out, None, None
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"], out.get("preds"), out.get("labels")
    raise TypeError(
        "the model must return its loss (a scalar Tensor) or a dict with 'loss' (and 'preds', "
        f"'labels' for metrics), got {type(out).__name__}"
    )


class Trainer:
    """Train and evaluate a model whose embeddings live in dynamic tables.

    Each batch: ``zero_grad`` (dense and sparse), ``loss = model(batch)``, ``backward``, then
    at accumulation boundaries the dense optimizer and scheduler step and the sparse optimizer
    steps; every hook's ``after_step(metrics, global_step)`` is called once per batch, exactly
    ``train_steps`` times (RecIS stops one short). Evaluation runs in eval mode (read-only
    lookups, no gradient) and does not advance the hooks (RecIS calls ``after_step`` there too,
    moving the filter clocks).

    Args:
        model (nn.Module): returns the loss, or ``{"loss", "preds", "labels"}``.
        args (TrainingArguments): loop settings.
        train_dataset (iterable): batches (any iterable; a DataLoader or IterableDataset).
        eval_dataset (iterable, optional): evaluation batches.
        hooks (list[Hook], optional): e.g. ``HashTableFilterHook``; a ``LoggerHook`` with
            ``args.log_steps`` is added.
        dense_optimizers (tuple, optional): ``(optimizer, lr_scheduler)``; either may be None.
        sparse_optimizer (SparseOptimizer, optional): for the tables.
        data_to_cuda (bool): move batches to CUDA. Default: False.
        checkpoint_manager (CheckpointManager, optional): built from ``args`` (output_dir,
            save_steps, max_to_keep) when ``args.save_steps`` is set.

    Checkpoints and resume: with ``save_steps``, the state is saved every ``save_steps`` batches
    and at the end; ``train()`` first restores the latest checkpoint in ``output_dir`` and skips
    the batches already trained on (the datasets must replay the same batches in the same
    order, as the recis readers and the synthetic stream do with a fixed seed). Training then
    continues exactly as if it had not stopped. With ``async_save`` the state at each save step
    is copied and written by a background thread while training goes on; ``train()`` waits for
    the last save before it returns or raises (see
    :class:`~recis.framework.checkpoint_manager.CheckpointManager`).

    Several processes (``torch.distributed`` initialised, more than one rank): the model is
    wrapped in ``DistributedDataParallel`` (its tables shard themselves), every rank steps
    while all ranks have a batch (a rank that runs out stops them all: the sharded lookups are
    collective), logged losses and evaluation metrics are over all ranks, and only rank 0
    shows the progress bar.

    Ctrl-C (SIGINT in the main thread) stops training at the next step boundary (every rank
    at the same one): with ``save_steps`` a checkpoint of that step is saved, then
    :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) is raised, carrying the step and the
    checkpoint. A second Ctrl-C interrupts at once.

    Attributes:
        history (list[dict]): one record per logged step and per evaluation: ``step``,
            ``loss``, ``examples_per_second``, ``tables`` (live IDs per table, by
            :func:`table_label`), ``table_stats`` (:meth:`table_stats`: admitted, rejected,
            evicted, bytes, ... per table), and ``eval_auc``/``eval_logloss``/``eval_loss``
            after evaluations. With ``args.tensorboard_dir`` every record is also written as
            TensorBoard scalars (``train/loss``, ``eval/auc``,
            ``tables/<label>/{live,admitted,evicted,bytes}``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments | None = None,
        train_dataset: Iterable | None = None,
        eval_dataset: Iterable | None = None,
        hooks: list[Hook] | None = None,
        dense_optimizers: tuple[Any, Any] = (None, None),
        sparse_optimizer: Any = None,
        data_to_cuda: bool = False,
        checkpoint_manager: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.args = args if args is not None else TrainingArguments()
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.hooks: list[Hook] = list(hooks or [])
        self.hooks.append(LoggerHook(self.args.log_steps))
        self.dense_optimizer, self.lr_scheduler = dense_optimizers
        self.sparse_optimizer = sparse_optimizer
        if sparse_optimizer is not None:
            sparse_optimizer.set_grad_accum_steps(self.args.gradient_accumulation_steps)
        self.device = torch.device("cuda") if data_to_cuda else None
        self.global_step = 0
        self.examples_seen = 0  # training rows processed by this process
        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        self.ddp_model = self._wrap(model)
        if checkpoint_manager is None and self.args.save_steps:
            from recis.framework.checkpoint_manager import CheckpointManager

            checkpoint_manager = CheckpointManager(
                model, sparse_optimizer, self.dense_optimizer, self.lr_scheduler,
                output_dir=self.args.output_dir, save_interval=self.args.save_steps,
                max_keep=self.args.max_to_keep, incremental_every=self.args.incremental_every,
                async_save=self.args.async_save)
        self.checkpoint_manager = checkpoint_manager
        self.history: list[dict[str, Any]] = []
        self._interrupted = False
        self._writer = None
        if self.args.tensorboard_dir and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("TrainingArguments.tensorboard_dir needs the tensorboard "
                                  'package: pip install "recis[tensorboard]"') from None
            self._writer = SummaryWriter(self.args.tensorboard_dir)

    # -- distributed -------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        """The model in ``DistributedDataParallel`` when several processes train (its dense
        parameters' gradients are averaged over the ranks; the tables shard themselves)."""
        if self.world == 1 or not any(p.requires_grad for p in model.parameters()):
            return model
        from torch.nn.parallel import DistributedDataParallel

        param = next(p for p in model.parameters() if p.requires_grad)
        device_ids = [param.device.index] if param.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _all_have(self, has: bool) -> bool:
        """Whether every rank has a batch (a rank that runs out ends the loop on all of them:
        the sharded tables' lookups are collective)."""
        if self.world == 1:
            return has
        flag = torch.tensor([1 if has else 0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _sum(self, *values: float) -> list[float]:
        """Sums over the ranks (collective)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        return t.tolist()

    # -- helpers -----------------------------------------------------------------------------
    def table_sizes(self) -> dict[str, int]:
        """Live IDs per table of the model (this rank's shard), by :func:`table_label`."""
        return {table_label(m): len(m) for m in self.model.modules()
                if isinstance(m, HashTable)}

    def table_stats(self) -> dict[str, dict[str, Any]]:
        """Per table of the model (this rank's shard), by :func:`table_label`: ``live``,
        ``bytes``, and the counters ``lookups``, ``hits``, ``misses``, ``admitted``,
        ``rejected`` (by admission policy), ``evicted`` (by reason) of
        :meth:`HashTable.stats`."""
        keys = ("live", "bytes", "lookups", "hits", "misses", "admitted", "rejected", "evicted")
        out = {}
        for m in self.model.modules():
            if isinstance(m, HashTable):
                stats = m.stats()
                out[table_label(m)] = {k: stats[k] for k in keys}
        return out

    def _local_batches(self) -> Iterable:
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset")
        if self.args.train_steps is not None:
            step = 0
            while True:
                yielded = False
                for batch in self.train_dataset:
                    yielded = True
                    yield batch
                    step += 1
                    if step >= self.args.train_steps:
                        return
                if not yielded:
                    return
        else:
            for _ in range(self.args.train_epoch):
                yield from self.train_dataset

    def _batches(self) -> Iterable:
        """This rank's batches, as long as every rank has one and none was interrupted."""
        it = iter(self._local_batches())
        while True:
            batch = None if self._interrupted else next(it, None)
            if not self._all_have(batch is not None):
                if batch is not None:  # another rank was interrupted: stop with it
                    self._interrupted = True
                return
            yield batch

    def planned_steps(self) -> int | None:
        """Batches :meth:`train` will run: ``train_steps``, else ``train_epoch`` times the
        dataset's length when it has one (ORC/Parquet footers give it), else None."""
        if self.args.train_steps is not None:
            return self.args.train_steps
        try:
            return self.args.train_epoch * len(self.train_dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    @contextlib.contextmanager
    def _stop_on_sigint(self):
        """Turn the first Ctrl-C into a stop at the next step boundary."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def request_stop(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _record(self, entry: dict[str, Any]) -> None:
        """Append a history record (with ``table_stats`` when it has ``tables``), let the
        hooks see it, and write it to TensorBoard."""
        if "tables" in entry and "table_stats" not in entry:
            entry["table_stats"] = self.table_stats()
        self.history.append(entry)
        for hook in self.hooks:
            after_record = getattr(hook, "after_record", None)  # hooks need not subclass Hook
            if after_record is not None:
                after_record(entry)
        if self._writer is None:
            return
        step = entry["step"]
        for key, value in entry.items():
            if key == "tables":
                for name, count in value.items():
                    self._writer.add_scalar(f"tables/{name}/live", count, step)
            elif key == "table_stats":
                for name, stats in value.items():
                    self._writer.add_scalar(f"tables/{name}/admitted", stats["admitted"], step)
                    self._writer.add_scalar(f"tables/{name}/evicted",
                                            sum(stats["evicted"].values()), step)
                    self._writer.add_scalar(f"tables/{name}/bytes", stats["bytes"], step)
            elif key != "step" and isinstance(value, (int, float)):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def _dense_step(self) -> None:
        n = self.args.gradient_accumulation_steps
        if self.dense_optimizer is None:
            return
        if n > 1:  # gradients summed over n batches -> their mean, like the sparse side
            for group in self.dense_optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(n)
        self.dense_optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint_extra(self) -> dict[str, Any]:
        hooks = [h.state_dict() if hasattr(h, "state_dict") else None for h in self.hooks]
        return {"examples_seen": self.examples_seen, "hooks": hooks}

    def save_checkpoint(self) -> str | None:
        if self.checkpoint_manager is None:
            return None
        return self.checkpoint_manager.save(self.global_step, self._checkpoint_extra())

    def _wait_for_saves(self, raise_error: bool) -> None:
        """Wait for the checkpoint manager's background save (``async_save``), if any."""
        wait = getattr(self.checkpoint_manager, "wait", None)
        if wait is None:
            return
        try:
            wait()
        except CheckpointError:
            if raise_error:
                raise
            logger.exception("the background save failed too")

    def _resume(self) -> int:
        manager = self.checkpoint_manager
        if manager is None or not self.args.resume or manager.latest() is None:
            return 0
        step = manager.restore()
        extra = getattr(manager, "restored_extra", {})
        self.examples_seen = extra.get("examples_seen", 0)
        for hook, state in zip(self.hooks, extra.get("hooks", []), strict=False):
            if state is not None and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state)
        self.global_step = step
        return step

    # -- training ----------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run the loop; returns :attr:`history`. Raises :class:`TrainingInterrupted` after a
        Ctrl-C (see the class docstring)."""
        self._interrupted = False
        try:
            with self._stop_on_sigint():
                history = self._train()
        except BaseException:
            self._wait_for_saves(raise_error=False)  # the error that stopped training wins
            raise
        if self._interrupted:
            raise TrainingInterrupted(self.global_step, self._saved_on_stop)
        return history

    def _train(self) -> list[dict[str, Any]]:
        args = self.args
        self._saved_on_stop = None
        n_acc = args.gradient_accumulation_steps
        skip = self._resume()
        for hook in self.hooks:
            hook.before_train()
        bar = None
        if args.progress_bar and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.planned_steps(), desc="train", unit="step",
                       dynamic_ncols=True)
        self.model.train()
        window_loss, window_examples, window_start = 0.0, 0, time.perf_counter()
        window_steps = 0
        if bar is not None and skip:
            bar.update(skip)
        for position, batch in enumerate(self._batches()):
            if position < skip:  # resumed: these batches were trained on before the save
                continue
            if self.device is not None:
                batch = move_batch(batch, self.device)
            boundary_before = self.global_step % n_acc == 0
            if boundary_before:
                if self.dense_optimizer is not None:
                    self.dense_optimizer.zero_grad()
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.zero_grad()
            sync = (self.global_step + 1) % n_acc == 0 or not hasattr(self.ddp_model, "no_sync")
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                loss, _, _ = _split_output(self.ddp_model(batch))
                loss.backward()
            if (self.global_step + 1) % n_acc == 0:
                self._dense_step()
            if self.sparse_optimizer is not None:
                self.sparse_optimizer.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {self.global_step}")
            examples = batch_size_of(batch)
            self.examples_seen += examples
            window_loss += loss_value
            window_examples += examples
            window_steps += 1
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            metrics = {"loss": loss_value, "examples_per_second": window_examples / elapsed}
            for hook in self.hooks:
                hook.after_step(metrics, self.global_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{window_loss / window_steps:.4f}",
                                ex_per_s=f"{window_examples / elapsed:,.0f}")
            self.global_step += 1
            if self.global_step % args.log_steps == 0:
                loss_sum, examples_sum = self._sum(window_loss, window_examples)
                self._record({
                    "step": self.global_step,
                    "loss": loss_sum / (window_steps * self.world),
                    "examples_per_second": examples_sum / elapsed,
                    "tables": self.table_sizes(),
                })
                window_loss, window_examples, window_steps = 0.0, 0, 0
                window_start = time.perf_counter()
            if args.eval_steps and self.eval_dataset is not None and (
                self.global_step % args.eval_steps == 0
            ):
                self.evaluate()
                self.model.train()
            if self.checkpoint_manager is not None:
                self.checkpoint_manager.step(self.global_step, self._checkpoint_extra())
        if bar is not None:
            bar.close()
        manager = self.checkpoint_manager
        if manager is not None and self.global_step > skip and (
            self.global_step % manager.save_interval
        ):
            self.save_checkpoint()  # the final state, unless the last step just saved it
        self._wait_for_saves(raise_error=True)
        if manager is not None and self._interrupted:
            self._saved_on_stop = manager.latest()
        if window_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            loss_sum, examples_sum = self._sum(window_loss, window_examples)
            self._record({
                "step": self.global_step, "loss": loss_sum / (window_steps * self.world),
                "examples_per_second": examples_sum / elapsed, "tables": self.table_sizes(),
            })
        for hook in self.hooks:
            hook.after_train()
            hook.end()
        return self.history

    @torch.no_grad()
    def evaluate(self, eval_dataset: Iterable | None = None) -> dict[str, float]:
        """Mean loss, and AUC / log-loss when the model returns ``preds`` and ``labels``;
        ``{}`` (with a warning) when the evaluation data gives no batch."""
        from recis.metrics import AUROC

        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if data is None:
            raise ValueError("evaluate() needs an eval_dataset")
        for hook in self.hooks:
            hook.before_evaluate()
        was_training = self.model.training
        self.model.eval()
        auc = AUROC()
        total_loss, batches, logloss_sum, count = 0.0, 0, 0.0, 0
        it = iter(data)
        while True:
            more = self.args.max_eval_batches is None or batches < self.args.max_eval_batches
            batch = next(it, None) if more else None
            if not self._all_have(batch is not None):
                break
            if self.device is not None:
                batch = move_batch(batch, self.device)
            loss, preds, labels = _split_output(self.model(batch))
            total_loss += float(loss)
            batches += 1
            if preds is not None and labels is not None:
                preds, labels = preds.reshape(-1).float(), labels.reshape(-1).float()
                auc.update(preds, labels)
                p = preds.clamp(1e-7, 1 - 1e-7)
                logloss_sum += float(-(labels * p.log() + (1 - labels) * (1 - p).log()).sum())
                count += labels.numel()
        self.model.train(was_training)
        total_loss, batches, logloss_sum, count = self._sum(total_loss, batches, logloss_sum,
                                                            count)
        if not batches:
            logger.warning("evaluate: the evaluation data gave no batch; no metrics")
            return {}
        metrics: dict[str, float] = {"eval_loss": total_loss / batches}
        if count:
            metrics["eval_auc"] = float(auc.compute())  # gathers every rank's predictions
            metrics["eval_logloss"] = logloss_sum / count
        self._record({"step": self.global_step, **metrics, "tables": self.table_sizes()})
        for hook in self.hooks:
            hook.after_evaluate(metrics)
        return metrics
