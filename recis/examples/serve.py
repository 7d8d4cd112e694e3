"""Score files with a frozen DeepFM export: ``python -m recis.examples.serve EXPORT --data FILES``.

EXPORT is a directory written by the main job with ``--export`` (or by
:func:`recis.export.export` with ``config={"model": "DeepFM", "kwargs": model.structure}``)::

    python -m recis.examples.deepfm --data ../shared/data/criteo-sample/part-[0-3].orc \
        --eval-data ../shared/data/criteo-sample/part-[45].orc --export
    python -m recis.examples.serve deepfm_output/export \
        --data ../shared/data/criteo-sample/part-[45].orc

The model is rebuilt with frozen tables (:func:`recis.export.load`), traced once with
``torch.export`` (:func:`recis.export.exported_program`: any batch size, any number of IDs
per field) and the exported program scores every batch. Prints one JSON line: ``auc``,
``logloss``, ``examples``, ``examples_per_second`` (examples over the seconds spent in the
program) and the seconds the trace took. A bad argument or file is one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from recis.examples.deepfm import _USER_ERRORS, _files, _OneLineParser, report_user_error
from recis.export import exported_program, load, read_manifest, serving_inputs

PROG = "python -m recis.examples.serve"


class Scorer(nn.Module):
    """The logits of a (frozen) DeepFM for a batch without labels: what is served."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model.logits(batch)


def build_model(path: str, manifest: Mapping[str, Any] | None = None) -> nn.Module:
    """The DeepFM of the export at ``path``, with frozen tables, in eval mode."""
    from recis.examples.deepfm_model import DeepFM

    manifest = read_manifest(path) if manifest is None else manifest
    config = manifest.get("config", {})
    if config.get("model") != "DeepFM" or not isinstance(config.get("kwargs"), dict):
        raise ValueError(f"EXPORT {path!r} does not hold a DeepFM (its manifest config is "
                         f"{config!r}); write it with python -m recis.examples.deepfm --export")
    return load(path, DeepFM(**config["kwargs"]))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _OneLineParser(prog=PROG, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", metavar="EXPORT", help="directory written with --export")
    p.add_argument("--data", nargs="+", metavar="FILE", required=True,
                   help="files in the Criteo layout to score")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")
    p.add_argument("--columns", metavar="NAMES",
                   help="CSV/TSV files without a header line: their column names in order, "
                        "comma-separated, or 'criteo' for label,i1..i13,c1..c26")
    p.add_argument("--eager", action="store_true",
                   help="run the frozen model as a module, without torch.export")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        p.error(f"--batch-size must be > 0, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Score the files; returns the printed figures."""
    from recis.io import criteo_dataset
    from recis.metrics import binary_auroc

    args = _parse_args(argv)
    manifest = read_manifest(args.export)
    model = build_model(args.export, manifest)
    columns = None
    if args.columns:
        columns = "criteo" if args.columns == "criteo" else [c.strip() for c in
                                                             args.columns.split(",")]
    data = criteo_dataset(_files(args.data), args.batch_size, columns=columns)
    logits, labels, seconds, scorer, trace_seconds = [], [], 0.0, None, 0.0
    with torch.inference_mode():
        for batch in data:
            inputs = model_inputs(model, batch)
            if scorer is None:
                start = time.perf_counter()
                scorer = Scorer(model) if args.eager else \
                    exported_program(Scorer(model), inputs).module()
                scorer(inputs)  # warm-up, untimed
                trace_seconds = time.perf_counter() - start
            start = time.perf_counter()
            logits.append(scorer(inputs))
            seconds += time.perf_counter() - start
            labels.append(batch["label"])
    if not logits:
        raise ValueError("--data holds no rows")
    logit, label = torch.cat(logits), torch.cat(labels)
    result = {
        "auc": float(binary_auroc(logit, label)),
        "logloss": float(nn.functional.binary_cross_entropy_with_logits(logit, label)),
        "examples": logit.numel(),
        "examples_per_second": round(logit.numel() / max(seconds, 1e-9), 1),
        "program": "eager" if args.eager else "torch.export",
        "trace_seconds": round(trace_seconds, 2),
        "rows": manifest["dtype"],
    }
    print(json.dumps(result), flush=True)
    return result


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs from a data batch: ``dense`` then the fields, in that order (one
    structure for every batch, as an exported program needs), ragged fields as ``(values,
    offsets)`` tuples."""
    keys = (["dense"] if model.num_dense else []) + model.sparse_fields
    return serving_inputs({k: batch[k] for k in keys})


def run(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, a user error reported in one line on stderr (exit 2)."""
    try:
        main(argv)
        return 0
    except _USER_ERRORS as err:
        return report_user_error(PROG, err)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
