"""Train a DeepFM on dynamic embedding tables: ``python -m recis.examples.deepfm``.

Default data: the built-in synthetic click stream (new IDs keep arriving, old ones fade, so
admission and the GlobalStepFilter matter). ``--data`` trains on files in the Criteo layout
(label, i1..i13, c1..c26; ORC/Parquet, or CSV/TSV with a header line; read by column name;
``--columns`` for header-less text files), with defaults tuned for such data::

    python -m recis.examples.deepfm                       # synthetic stream, ~30 s
    python -m recis.examples.deepfm --data ../shared/data/criteo-sample/part-[0-3].orc \
        --eval-data ../shared/data/criteo-sample/part-[45].orc
    python -m recis.examples.deepfm --data ../shared/data/criteo-sample/part-0.orc --features
    torchrun --standalone --nproc_per_node 2 -m recis.examples.deepfm   # 2 processes

``--features`` turns the raw Criteo values into IDs with a
:class:`~recis.features.FeatureEngine` (:func:`criteo_feature_engine`): each categorical value
is hashed (FarmHash64 of its decimal text, as RecIS's ``Hash("farm")``) and each integer column
is bucketized into an extra ID field; the same model embeds them.

Under torchrun the tables are sharded over the processes, the dense layers are data-parallel,
and ``--batch-size`` is the global batch (each process takes its share of every batch), so N
processes reach the results of one.

Prints a progress bar, then one JSON line with the final figures; writes
``OUTPUT/metrics.json`` and ``OUTPUT/training.png`` (loss, eval AUC, live IDs per table);
with ``--export``, ``OUTPUT/export``: the model frozen for serving (``recis.export``), which
``python -m recis.examples.serve OUTPUT/export --data FILES`` scores files with.
Ctrl-C stops at the next step (saving a checkpoint with ``--save-steps``; exit 130); a bad
argument or file is one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from recis.examples.deepfm_model import DeepFM
from recis.features import Bucketize, Feature, FeatureEngine, Hash, Int64ToString, SelectField
from recis.framework import Trainer, TrainingArguments
from recis.framework.trainer import TrainingInterrupted, table_label
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import HashTable
from recis.nn.modules.hashtable import filter_out_sparse_param, sum_stats
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

    def __len__(self) -> int:
        held_out = len(self.dataset) // self.every  # type: ignore[arg-type]
        return held_out if self.take else len(self.dataset) - held_out  # type: ignore[arg-type]


#: Bucket boundaries of the integer columns in ``--features`` mode: Criteo's counts are
#: heavy-tailed, so the buckets grow about geometrically (a missing value reads as 0).
INTEGER_BOUNDARIES = [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100, 150, 256, 512, 1024,
                      4096, 16384, 65536]


def criteo_feature_engine(sparse: list[str], dense: list[str]) -> FeatureEngine:
    """The ``--features`` engine: categorical column ``c`` becomes the FarmHash64 of each
    value's decimal text (``SelectField -> Int64ToString -> Hash("farm")``), integer column
    ``i`` becomes its bucket in :data:`INTEGER_BOUNDARIES` (``SelectField -> Bucketize``),
    an ID field named ``i``.

    Example::

        >>> from recis.ragged import RaggedTensor
        >>> engine = criteo_feature_engine(["c1"], ["i1"])
        >>> out = engine({"c1": RaggedTensor(torch.tensor([7]), torch.tensor([0, 1])),
        ...               "i1": torch.tensor([[5.0]])})
        >>> out["i1"]
        tensor([[5]])
    """
    features = [Feature(c).add_op(SelectField(c)).add_op(Int64ToString()).add_op(Hash("farm"))
                for c in sparse]
    features += [Feature(i).add_op(SelectField(i, dtype=torch.float32))
                 .add_op(Bucketize(INTEGER_BOUNDARIES)) for i in dense]
    return FeatureEngine(features)


class CriteoFeatureTransform:
    """Run a FeatureEngine on a batch in the Criteo model layout (``{"label", "dense", "c1",
    ...}``): the integer columns ``dense_names`` are first added as ``[B, 1]`` columns from
    ``batch["dense"]`` so that the engine can turn them into IDs too. Picklable, so it can
    run in DataLoader workers."""

    def __init__(self, engine: FeatureEngine, dense_names: list[str]):
        self.engine, self.dense_names = engine, list(dense_names)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        columns = {name: batch["dense"][:, k:k + 1] for k, name in enumerate(self.dense_names)}
        return self.engine({**batch, **columns})


class FeatureBatches:
    """Every batch of ``dataset`` passed through ``transform`` (the ``--features`` mode)."""

    def __init__(self, dataset: Iterable, transform: CriteoFeatureTransform):
        self.dataset, self.transform = dataset, transform

    def __iter__(self) -> Iterator:
        for batch in self.dataset:
            yield self.transform(batch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _files(patterns: list[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p))
        if not matches:
            raise ValueError(f"--data/--eval-data: no file matches {p!r}")
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
        columns = None
        if args.columns:
            columns = ("criteo" if args.columns == "criteo" else
                       [c.strip() for c in args.columns.split(",")])
        read = {**one, "columns": columns}
        train = criteo_dataset(files, args.batch_size, shuffle=True, seed=args.seed, **read)
        if args.eval_data:
            evaluation = criteo_dataset(_files(args.eval_data), args.batch_size, **read)
        else:  # hold out every 10th batch of the training files
            evaluation = HoldOut(criteo_dataset(files, args.batch_size, **read), 10, take=True)
            train = HoldOut(train, 10, take=False)
        description = f"files {files}"
        if args.features:
            transform = CriteoFeatureTransform(criteo_feature_engine(sparse, dense), dense)
            train = FeatureBatches(train, transform)
            evaluation = FeatureBatches(evaluation, transform)
            sparse = [*sparse, *dense]
            description += " through the feature engine (--features)"
        return RankSlice(train), RankSlice(evaluation), sparse, len(dense), description
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


def plot(history: list[dict[str, Any]], path: str) -> bool:
    """Loss, eval AUC, live IDs per table and IDs admitted / evicted per table (since the
    start) over the steps, as a PNG. False without
    matplotlib (install the ``plot`` extra). Tables get distinct line styles and markers, so
    that tables with equal counts stay visible."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install recis[plot])", path)
        return False
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_auc" in h]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    axes[0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0].set(title="training loss", xlabel="step", ylabel="log-loss")
    axes[1].plot([h["step"] for h in evals], [h["eval_auc"] for h in evals], marker="o")
    axes[1].set(title="evaluation AUC", xlabel="step", ylabel="AUC")
    labels = sorted({name for h in train for name in h["tables"]})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "x", "d", "v"]
    for i, label in enumerate(labels):
        axes[2].plot([h["step"] for h in train], [h["tables"].get(label, 0) for h in train],
                     label=label, linestyle=styles[i % len(styles)],
                     marker=markers[i % len(markers)], markevery=max(len(train) // 8, 1),
                     linewidth=2.5 - 1.5 * i / max(len(labels) - 1, 1))
    axes[2].set(title="live IDs per table", xlabel="step", ylabel="IDs")
    axes[2].legend(fontsize="small")
    counted = [h for h in train if "table_stats" in h]
    for i, label in enumerate(labels):
        steps = [h["step"] for h in counted]
        stats = [h["table_stats"].get(label, {}) for h in counted]
        axes[3].plot(steps, [s.get("admitted", 0) for s in stats], color=f"C{i}",
                     label=f"{label} admitted")
        axes[3].plot(steps, [sum(s.get("evicted", {}).values()) for s in stats], color=f"C{i}",
                     linestyle="--", label=f"{label} evicted")
    axes[3].set(title="IDs admitted (solid) / evicted (dashed)", xlabel="step", ylabel="IDs")
    axes[3].legend(fontsize="small")
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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _OneLineParser(prog="python -m recis.examples.deepfm", description=__doc__,
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
    p.add_argument("--columns", metavar="NAMES",
                   help="CSV/TSV files without a header line: their column names in order, "
                        "comma-separated, or 'criteo' for label,i1..i13,c1..c26 (files with a "
                        "header, ORC and Parquet are read by column name)")
    p.add_argument("--features", action="store_true",
                   help="with --data: hash the raw categorical values and bucketize the integer "
                        "columns into ID fields with recis.features.FeatureEngine")
    p.add_argument("--save-steps", type=int, default=None,
                   help="save a checkpoint every N steps into OUTPUT/checkpoints and resume "
                        "from it when run again (default: no checkpoints)")
    p.add_argument("--export", nargs="?", const="fp32", choices=["fp32", "fp16", "int8"],
                   metavar="ROWS",
                   help="after training, write the model for serving into OUTPUT/export "
                        "(recis.export), rows as fp32 (the default: as trained), fp16 or int8; "
                        "python -m recis.examples.serve OUTPUT/export --data FILES scores files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run's results in --output")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard scalars to OUTPUT/tensorboard (needs the "
                        "tensorboard package: pip install 'recis[tensorboard]')")
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
    for name in ("steps", "save_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.columns is not None and not args.data:
        p.error("--columns applies to --data files")
    if args.features and not args.data:
        p.error("--features applies to --data files (the synthetic stream has no raw values)")
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


def _check_output(args: argparse.Namespace) -> None:
    """Refuse to overwrite an earlier run's results in ``--output`` (unless ``--overwrite``,
    or ``--save-steps`` with a checkpoint there: that run is resumed)."""
    from recis.framework.checkpoint_manager import CheckpointManager

    if args.overwrite or not os.path.exists(os.path.join(args.output, "metrics.json")):
        return
    checkpoints = os.path.join(args.output, "checkpoints")
    if args.save_steps and CheckpointManager(torch.nn.Module(), output_dir=checkpoints).latest():
        return
    raise ValueError(f"--output {args.output!r} holds an earlier run (metrics.json); pass "
                     "--overwrite to replace it, or another --output")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns the result dict (also printed as a JSON line by rank 0). Raises
    :class:`~recis.framework.trainer.TrainingInterrupted` after a Ctrl-C (see :func:`run`)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank, world = init_distributed()
    if args.export and world > 1:
        raise ValueError("--export needs one process (the tables are sharded under torchrun); "
                         "export from a checkpoint loaded in one process")
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the number of "
                         f"processes ({world})")
    _check_output(args)  # on every rank, so that none is left waiting for rank 0
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
        output_dir=os.path.join(args.output, "checkpoints"), save_steps=args.save_steps,
        train_steps=args.steps if args.data else (args.steps or 400),
        train_epoch=args.epochs, eval_steps=args.eval_every, log_steps=10,
        progress_bar=not args.no_progress,
        tensorboard_dir=os.path.join(args.output, "tensorboard") if args.tensorboard else None,
    )
    trainer = Trainer(model, training, train, evaluation, hooks=hooks,
                      dense_optimizers=(dense_opt, None), sparse_optimizer=sparse_opt)
    start = time.perf_counter()
    try:
        trainer.train()
    except TrainingInterrupted as stop:
        stop.metrics = os.path.join(args.output, "metrics.json")
        if rank == 0:
            _write_metrics(args, {"interrupted_at_step": trainer.global_step,
                                  "history": trainer.history})
        raise
    train_seconds = time.perf_counter() - start
    evals = [h for h in trainer.history if "eval_loss" in h]
    if evals and evals[-1]["step"] == trainer.global_step:
        final = evals[-1]  # the last step was just evaluated
    else:
        final = trainer.evaluate()
    if "eval_auc" not in final and rank == 0:
        where = ("--eval-data" if args.eval_data else
                 "the held-out split (every 10th batch of --data)" if args.data else
                 "--eval-batches")
        logger.warning("no evaluation: %s gave no batch; pass --eval-data FILES, or a smaller "
                       "--batch-size so that every 10th of --data's batches can be held out",
                       where)
    tables = {}
    for module in model.modules():
        if isinstance(module, HashTable):
            local = module.stats()
            local["logical_tables"] = {c: module.ids(c).numel()
                                       for c in module.children_hashtable}
            tables[table_label(module)] = sum_stats(_gather(local, trainer.world))  # shards
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
    if args.export:
        from recis.export import export

        path = os.path.join(args.output, "export")
        if args.overwrite:
            shutil.rmtree(path, ignore_errors=True)  # an earlier run's export
        export(model, path, dtype=args.export, config={"model": "DeepFM",
                                                       "kwargs": model.structure})
        result["export"] = path
    if rank == 0:
        _write_metrics(args, {**result, "history": trainer.history})
        plot(trainer.history, os.path.join(args.output, "training.png"))
        summary = {k: v for k, v in result.items() if k != "tables"}
        summary["live_ids"] = {k: v["live"] for k, v in tables.items()}
        print(json.dumps(summary), flush=True)
    return result


def _gather(record: dict[str, Any], world: int) -> list[dict[str, Any]]:
    """``record`` of every rank (a list of one without a process group)."""
    if world == 1:
        return [record]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, record)
    return out


def _write_metrics(args: argparse.Namespace, record: dict[str, Any]) -> None:
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)


#: Errors that a bad argument, file or environment causes: reported in one line.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError)


def error_line(err: BaseException) -> str:
    """A user error in one line; one that may not be the user's says how to see the traceback."""
    message = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (ValueError, OSError)):
        message += f" ({type(err).__name__}; RECIS_TRACEBACK=1 shows the traceback)"
    return message


def report_user_error(prog: str, err: BaseException) -> int:
    """Print a user error in one line on stderr and return the exit status 2; re-raise it
    (with its traceback) when ``RECIS_TRACEBACK`` is set. Call inside ``except``."""
    if os.environ.get("RECIS_TRACEBACK"):
        raise err
    print(f"{prog}: error: {error_line(err)}", file=sys.stderr, flush=True)
    return 2


def run(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with every user error reported in one line on stderr
    (exit 2; set ``RECIS_TRACEBACK=1`` for the traceback) and Ctrl-C stopping at the next
    step boundary, saving a checkpoint with ``--save-steps``, saying where things are in one
    line (exit 130)."""
    prog = "python -m recis.examples.deepfm"
    rank = int(os.environ.get("RANK", "0"))
    try:
        main(argv)
        return 0
    except TrainingInterrupted as stop:
        if rank == 0:
            saved = (f"checkpoint {stop.checkpoint} saved (run the same command to resume)"
                     if stop.checkpoint else "no checkpoint (pass --save-steps N to resume "
                     "later)")
            print(f"{prog}: interrupted at step {stop.step}: {saved}; metrics so far in "
                  f"{stop.metrics}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        if rank == 0:
            print(f"{prog}: interrupted before training started or during an evaluation; "
                  "nothing saved", file=sys.stderr, flush=True)
        return 130
    except _USER_ERRORS as err:
        return report_user_error(prog, err)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
