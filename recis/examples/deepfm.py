"""Train a DeepFM on dynamic embedding tables: ``python -m recis.examples.deepfm``.

Default data: the built-in synthetic click stream (new IDs keep arriving, old ones fade, so
admission and the GlobalStepFilter matter). ``--data`` trains on files in the Criteo layout
(ORC/Parquet with list or scalar columns, or CSV/TSV: label, i1..i13, c1..c26)::

    python -m recis.examples.deepfm                       # synthetic stream, ~1 minute
    python -m recis.examples.deepfm --data part-[0-3].orc --eval-data part-4.orc part-5.orc
    torchrun --standalone --nproc_per_node 2 -m recis.examples.deepfm   # 2 processes

Under torchrun the tables are sharded over the processes, the dense layers are data-parallel,
and ``--batch-size`` is the global batch (each process takes its share of every batch), so N
processes reach the results of one.

Prints a progress bar, then one JSON line with the final figures; writes
``OUTPUT/metrics.json`` and ``OUTPUT/training.png`` (loss, eval AUC, live IDs per table).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from recis.examples.deepfm_model import DeepFM
from recis.framework import Trainer, TrainingArguments
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import HashTable
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD

logger = logging.getLogger("recis.examples.deepfm")

_SPARSE_OPTIMIZERS = {"adamw": SparseAdamW, "adam": SparseAdam, "adagrad": SparseAdagrad,
                      "sgd": SparseSGD}
#: Learning rate of an optimizer chosen with --optimizer but no --lr (other than the source's).
_OPTIMIZER_LR = {"adamw": 1e-3, "adam": 1e-3, "adagrad": 0.05, "sgd": 0.5}


class HoldOut:
    """Every ``every``-th batch of a dataset (``take=True``) or all the others (``False``)."""

    def __init__(self, dataset: Iterable, every: int, take: bool):
        self.dataset, self.every, self.take = dataset, every, take

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self.dataset):
            if (i % self.every == self.every - 1) == self.take:
                yield batch


def _files(patterns: list[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p))
        if not matches:
            raise SystemExit(f"--data/--eval-data: no file matches {p!r}")
        out += matches
    return out


def build_data(args: argparse.Namespace) -> tuple[Iterable, Iterable, list[str], int, str]:
    """(train data, eval data, sparse field names, number of dense features, description).

    Every process reads the same global batches of ``--batch-size`` rows and keeps its share
    of the rows (:class:`~recis.distributed.data.RankSlice`), so N processes train on exactly
    the batches one process would."""
    from recis.distributed.data import RankSlice

    one = {"rank": 0, "world_size": 1}  # every process reads the global batches
    if args.data:
        from recis.io import criteo_columns, criteo_dataset

        files = _files(args.data)
        _, dense, sparse = criteo_columns()
        train = criteo_dataset(files, args.batch_size, shuffle=True, seed=args.seed, **one)
        if args.eval_data:
            evaluation = criteo_dataset(_files(args.eval_data), args.batch_size, **one)
        else:  # hold out every 10th batch of the training files
            evaluation = HoldOut(criteo_dataset(files, args.batch_size, **one), 10, take=True)
            train = HoldOut(train, 10, take=False)
        return RankSlice(train), RankSlice(evaluation), sparse, len(dense), f"files {files}"
    from recis.datasets import SyntheticClickStream

    steps = args.steps or 400
    train = SyntheticClickStream(num_batches=steps, batch_size=args.batch_size, seed=args.seed,
                                 drift=args.drift, vocab_per_field=args.vocab, **one)
    evaluation = train.held_out(args.eval_batches)
    return (RankSlice(train), RankSlice(evaluation), list(train.fields), train.num_dense,
            "synthetic click stream")


def init_distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process
    group first: nccl when CUDA is available, gloo otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def table_labels(model: DeepFM) -> dict[str, str]:
    """Readable names of the physical tables: their width and their logical tables."""
    labels = {}
    for module in model.modules():
        if isinstance(module, HashTable):
            kids = module.children_hashtable
            shown = ", ".join(kids[:3]) + (", ..." if len(kids) > 3 else "")
            labels[module.name] = f"dim {module.embedding_shape[0]} ({shown})"
    return labels


def plot(history: list[dict[str, Any]], labels: dict[str, str], path: str) -> bool:
    """Loss, eval AUC and live IDs per table over the steps, as a PNG. False without
    matplotlib (install the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install recis[plot])", path)
        return False
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_auc" in h]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0].set(title="training loss", xlabel="step", ylabel="log-loss")
    axes[1].plot([h["step"] for h in evals], [h["eval_auc"] for h in evals], marker="o")
    axes[1].set(title="evaluation AUC", xlabel="step", ylabel="AUC")
    for name, label in labels.items():
        axes[2].plot([h["step"] for h in train], [h["tables"].get(name, 0) for h in train],
                     label=label)
    axes[2].set(title="live IDs per table", xlabel="step", ylabel="IDs")
    axes[2].legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


#: Defaults of the options that depend on the data source: the synthetic stream (many steps,
#: IDs that keep arriving) and files in the Criteo layout (a small, skewed click log).
#: ``--data`` alone uses the "files" column, so that it is as good as a tuned command.
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "synthetic": {"batch_size": 1024, "dim": 16, "optimizer": "adamw", "lr": 1e-3,
                  "weight_decay": 0.0, "min_count": 1, "filter_step": 200,
                  "hidden": "256,128", "dropout": 0.0, "dense_lr": 1e-3, "epochs": 1},
    "files": {"batch_size": 256, "dim": 16, "optimizer": "adamw", "lr": 3e-3,
              "weight_decay": 0.0, "min_count": 1, "filter_step": 200,
              "hidden": "256,128", "dropout": 0.0, "dense_lr": 1e-3, "epochs": 1},
}


def _by_source(name: str) -> str:
    synthetic, files = SOURCE_DEFAULTS["synthetic"][name], SOURCE_DEFAULTS["files"][name]
    if synthetic == files:
        return f"default {synthetic}"
    return f"default {synthetic} on the synthetic stream, {files} with --data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recis.examples.deepfm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="training files in the Criteo layout (default: synthetic stream)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE",
                   help="evaluation files (default: every 10th batch of --data held out)")
    p.add_argument("--epochs", type=int, help=f"passes over --data ({_by_source('epochs')})")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this many batches (default: 400 on the synthetic stream, "
                        "every batch of --epochs passes with --data)")
    p.add_argument("--batch-size", type=int,
                   help=f"global batch, split over processes ({_by_source('batch_size')})")
    p.add_argument("--dim", type=int, help=f"embedding width ({_by_source('dim')})")
    p.add_argument("--filter-step", type=int,
                   help="remove IDs unseen for this many steps, 0 for no filter "
                        f"({_by_source('filter_step')})")
    p.add_argument("--filter-interval", type=int, default=50,
                   help="steps between filter runs (default 50)")
    p.add_argument("--min-count", type=int,
                   help="admit an ID into the tables after this many occurrences "
                        f"({_by_source('min_count')})")
    p.add_argument("--optimizer", choices=sorted(_SPARSE_OPTIMIZERS),
                   help=f"sparse optimizer of the tables ({_by_source('optimizer')})")
    p.add_argument("--lr", type=float,
                   help=f"sparse learning rate ({_by_source('lr')}; with another --optimizer: "
                        + ", ".join(f"{k} {v}" for k, v in _OPTIMIZER_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float,
                   help="weight decay of the table rows, L2 for adam/adagrad/sgd "
                        f"({_by_source('weight_decay')})")
    p.add_argument("--hidden",
                   help="DNN widths, comma-separated; empty for FM only "
                        f"({_by_source('hidden')})")
    p.add_argument("--dropout", type=float, help=f"DNN dropout ({_by_source('dropout')})")
    p.add_argument("--dense-lr", type=float,
                   help=f"learning rate of the dense layers ({_by_source('dense_lr')})")
    p.add_argument("--eval-every", type=int, default=100,
                   help="evaluate every N steps (default 100)")
    p.add_argument("--eval-batches", type=int, default=20,
                   help="synthetic: evaluation batches (default 20)")
    p.add_argument("--drift", type=float, default=0.5,
                   help="synthetic: share of each field's IDs replaced per 1000 batches "
                        "(default 0.5)")
    p.add_argument("--vocab", type=int, default=100_000,
                   help="synthetic: active IDs per field (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and initial values "
                                                       "(default 0)")
    p.add_argument("--output", default="deepfm_output",
                   help="directory for metrics and plot (default deepfm_output)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.source = "files" if args.data else "synthetic"
    defaults = SOURCE_DEFAULTS[args.source]
    if args.lr is None and args.optimizer not in (None, defaults["optimizer"]):
        args.lr = _OPTIMIZER_LR[args.optimizer]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("epochs", "batch_size", "dim", "filter_interval", "eval_every", "min_count",
                 "eval_batches", "vocab"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps must be > 0, got {args.steps}")
    if args.filter_step < 0:
        p.error(f"--filter-step must be >= 0, got {args.filter_step}")
    for name in ("lr", "dense_lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.weight_decay >= 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    try:
        args.hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    except ValueError:
        p.error(f"--hidden must be comma-separated ints, got {args.hidden!r}")
    if any(h <= 0 for h in args.hidden):
        p.error(f"--hidden widths must be > 0, got {args.hidden}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank, world = init_distributed()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes ({world})")
    torch.manual_seed(args.seed)
    train, evaluation, fields, num_dense, source = build_data(args)
    model = DeepFM(fields, num_dense, dim=args.dim, hidden=args.hidden,
                   filter_step=args.filter_step or None, seed=args.seed, dropout=args.dropout,
                   min_count=args.min_count)
    cls = _SPARSE_OPTIMIZERS[args.optimizer]
    sparse_opt = cls(filter_out_sparse_param(model), lr=args.lr, weight_decay=args.weight_decay)
    dense_opt = torch.optim.Adam(model.parameters(), lr=args.dense_lr)
    hooks = [HashTableFilterHook(args.filter_interval, tables=[model])] if args.filter_step else []
    training = TrainingArguments(
        output_dir=args.output, train_steps=args.steps if args.data else (args.steps or 400),
        train_epoch=args.epochs, eval_steps=args.eval_every, log_steps=10,
        progress_bar=not args.no_progress,
    )
    trainer = Trainer(model, training, train, evaluation, hooks=hooks,
                      dense_optimizers=(dense_opt, None), sparse_optimizer=sparse_opt)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    final = trainer.evaluate()
    labels = table_labels(model)
    tables = {}
    for module in model.modules():
        if isinstance(module, HashTable):
            counts = [float(v) for v in module.stats().values()]
            counts += [float(module.ids(c).numel()) for c in module.children_hashtable]
            totals = [int(v) for v in trainer._sum(*counts)]  # over the shards
            stats = dict(zip(module.stats(), totals, strict=False))
            stats["logical_tables"] = dict(zip(module.children_hashtable,
                                               totals[len(module.stats()):], strict=True))
            tables[labels[module.name]] = stats
    examples = int(trainer._sum(trainer.examples_seen)[0])
    result = {
        "eval_auc": final.get("eval_auc"),
        "eval_logloss": final.get("eval_logloss"),
        "train_steps": trainer.global_step,
        "train_examples": examples,
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": round(examples / max(train_seconds, 1e-9), 1),
        "processes": world,
        "optimizer": args.optimizer,
        "data": source,
        "tables": tables,
    }
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "metrics.json"), "w") as f:
            json.dump({**result, "history": trainer.history}, f, indent=2)
        plot(trainer.history, labels, os.path.join(args.output, "training.png"))
        summary = {k: v for k, v in result.items() if k != "tables"}
        summary["live_ids"] = {k: v["live"] for k, v in tables.items()}
        print(json.dumps(summary), flush=True)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
