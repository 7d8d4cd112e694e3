"""Export a trained model for serving: frozen tables, dense weights and a manifest.

:func:`export` writes a directory::

    manifest.json        what the files hold: tables, embedding modules, row format, config
    tables.safetensors   per logical table <name>.ids (sorted int64), <name>.rows
                         (float32, float16 or int8) and, for int8, <name>.scale (float32)
    dense.safetensors    every other tensor of the model's state_dict (Linear, BatchNorm, ...)

:func:`load` turns it back into modules that serve with plain torch: each
:class:`~recis.nn.DynamicEmbedding` / :class:`~recis.nn.EmbeddingEngine` becomes its
:mod:`~recis.export.frozen` twin, which looks IDs up by binary search and gives zero rows for
unknown IDs, exactly as the training modules in eval mode. Nothing is pickled.

Importing this package needs torch and safetensors only; :func:`export` and
:func:`load` with a ``model`` import :mod:`recis.nn` when called.

Example::

    >>> export(model, "served", dtype="int8", config={"model": "DeepFM"})
    >>> frozen = load("served", build_model())  # the same class, freshly built
    >>> frozen.eval()(batch)  # equals model.eval()(batch) (int8: within the rows' error)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recis.export.frozen import (
    COMBINERS,
    FrozenEmbedding,
    FrozenEngine,
    FrozenTable,
    combine_bags,
)

__all__ = ["export", "load", "exported_program", "load_tables", "read_manifest",
           "quantize_rows", "serving_inputs", "FrozenTable", "FrozenEmbedding", "FrozenEngine",
           "combine_bags", "ROW_FORMATS"]

FORMAT = "recis-export"
VERSION = 1
MANIFEST = "manifest.json"
TABLES = "tables.safetensors"
DENSE = "dense.safetensors"
#: Row formats of :func:`export` and the dtype each is stored in.
ROW_FORMATS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def quantize_rows(rows: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """``(stored rows, scale)`` of float rows in the format ``dtype``.

    ``"fp32"`` and ``"fp16"`` are casts (scale None). ``"int8"`` is symmetric per row:
    ``scale = max|row| / 127`` and ``q = round(row / scale)``, so ``q * scale`` is within
    ``scale / 2`` of every value of the row (plus float32 rounding, under ``1e-5 * scale``).

    Example::

        >>> q, scale = quantize_rows(torch.tensor([[0.5, -1.0]]), "int8")
        >>> q, scale * 127
        (tensor([[  64, -127]], dtype=torch.int8), tensor([1.]))
    """
    if dtype not in ROW_FORMATS:
        raise ValueError(f"dtype must be one of {list(ROW_FORMATS)}, got {dtype!r}")
    rows = rows.to(torch.float32)
    if dtype == "fp32":
        return rows.contiguous(), None
    if dtype == "fp16":
        if rows.numel() and float(rows.abs().max()) > torch.finfo(torch.float16).max:
            raise ValueError(f"rows hold values beyond float16's range (max "
                             f"{float(rows.abs().max()):.3g}); export with dtype='fp32' or 'int8'")
        return rows.to(torch.float16), None
    scale = rows.abs().amax(dim=1) / 127 if rows.numel() else rows.new_zeros(rows.shape[0])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    q = (rows / safe).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def export(model: nn.Module, path: str | os.PathLike, *, dtype: str = "fp32",
           config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as a frozen export into the new directory ``path``; returns the manifest.

    Every :class:`~recis.nn.DynamicEmbedding` and :class:`~recis.nn.EmbeddingEngine` of the
    model (the model itself may be one) is written as its logical tables (the live IDs sorted,
    their rows) and, per feature, the combiner settings; the rest of the ``state_dict`` is the
    dense part. The directory appears complete or not at all (written aside, then renamed).

    Args:
        model (nn.Module): a model in one process (a table sharded over processes raises).
        path (str or PathLike): the directory to create (must not exist).
        dtype (str): row format: ``"fp32"`` (as trained), ``"fp16"`` or ``"int8"`` (per-row
            scales, see :func:`quantize_rows`). Default: ``"fp32"``.
        config (dict, optional): JSON-serialisable information stored in the manifest, e.g.
            what :func:`load` needs to rebuild the model's class.

    The manifest records, per table, its number of IDs, width and ``max_abs_error``: the
    largest difference between a stored row value and the trained one (0 for fp32).

    Example::

        >>> emb = DynamicEmbedding(EmbeddingOption(embedding_dim=8, shared_name="user"))
        >>> _ = emb(torch.tensor([1, 2, 3]))
        >>> export(emb, "user_export")["tables"]["user"]["ids"]
        3
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dtype not in ROW_FORMATS:
        raise ValueError(f"dtype must be one of {list(ROW_FORMATS)}, got {dtype!r}")
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"path {path!r} already exists; export writes a new directory")
    try:
        config = json.loads(json.dumps(dict(config or {})))
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be a JSON-serialisable dict: {e}") from None
    modules = _embedding_modules(model)
    if not modules:
        raise ValueError("model holds no DynamicEmbedding or EmbeddingEngine to export")
    _check_no_bare_tables(model, [p for p, _ in modules])
    sources: dict[str, tuple[Any, str]] = {}  # logical table -> (HashTable, child)
    module_specs = {}
    for prefix, module in modules:
        _check_unsharded(module, prefix)
        features = {fea: _feature_spec(module, fea, opt, sources, prefix)
                    for fea, opt in _options(module).items()}
        kind = type(module).__name__
        module_specs[prefix] = ({"kind": kind, **features[None]} if None in features
                                else {"kind": kind, "features": features})
    tensors: dict[str, Tensor] = {}
    tables = {}
    snapshots: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # one read per physical table
    for name, (table, child) in sources.items():
        if id(table) not in snapshots:
            snapshots[id(table)] = _snapshot(table)
        ids, rows = _child_rows(*snapshots[id(table)], table.child_index(child), child,
                                table.embedding_shape)
        stored, scale = quantize_rows(rows, dtype)
        restored = stored.to(torch.float32) if scale is None else stored.float() * scale[:, None]
        error = float((restored - rows).abs().max()) if rows.numel() else 0.0
        tensors[f"{name}.ids"], tensors[f"{name}.rows"] = ids, stored
        if scale is not None:
            tensors[f"{name}.scale"] = scale
        tables[name] = {"ids": ids.numel(), "dim": rows.shape[1], "max_abs_error": error,
                        "hashtable": table.name, "child": child}
    dense = _dense_state(model, [p for p, _ in modules])
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "tables": tables,
                "modules": module_specs, "dense": sorted(dense), "config": config}
    staging = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(os.path.abspath(path))}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a crashed export's leftovers
    os.makedirs(staging)
    try:
        save_file(tensors, os.path.join(staging, TABLES), metadata={"format": FORMAT})
        save_file(dense, os.path.join(staging, DENSE), metadata={"format": FORMAT})
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the export at ``path`` (checked to be one this version reads)."""
    file = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{os.fspath(path)!r} is not a recis export: no {MANIFEST}")
    with open(file) as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a recis export manifest (format != {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file}: export version {manifest.get('version')!r}; this recis "
                         f"reads version {VERSION}")
    for key in ("dtype", "tables", "modules", "dense"):
        if key not in manifest:
            raise ValueError(f"{file}: the manifest lacks {key!r}")
    return manifest


def load_tables(path: str | os.PathLike, manifest: Mapping | None = None
                ) -> dict[str, FrozenTable]:
    """The :class:`FrozenTable` of every logical table of the export at ``path``."""
    manifest = read_manifest(path) if manifest is None else manifest
    file = os.path.join(os.fspath(path), TABLES)
    tensors = load_file(file)
    row_dtype = ROW_FORMATS.get(manifest["dtype"])
    out = {}
    for name, info in manifest["tables"].items():
        need = [f"{name}.ids", f"{name}.rows"] + ([f"{name}.scale"]
                                                  if manifest["dtype"] == "int8" else [])
        missing = [k for k in need if k not in tensors]
        if missing:
            raise ValueError(f"{file}: table {name!r} lacks the tensors {missing}")
        ids, rows = tensors[f"{name}.ids"], tensors[f"{name}.rows"]
        expected = (info["ids"], info["dim"])
        if tuple(rows.shape) != expected or rows.dtype != row_dtype:
            raise ValueError(f"{file}: table {name!r} rows are {rows.dtype} {tuple(rows.shape)}, "
                             f"the manifest says {row_dtype} {expected}")
        try:
            out[name] = FrozenTable(ids, rows, tensors.get(f"{name}.scale"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: table {name!r}: {e}") from None
    return out


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The export at ``path`` as a servable module, in eval mode.

    Args:
        path (str or PathLike): a directory written by :func:`export`.
        model (nn.Module, optional): a freshly built model of the exported class and structure
            (its tables may be empty). Its embedding modules are replaced, in place, by frozen
            twins holding the exported rows, and its dense weights are loaded (strictly).
            Without ``model`` the export must be of a bare DynamicEmbedding or EmbeddingEngine,
            whose twin is returned.

    Returns:
        ``model`` (or the twin), in eval mode. Its forward equals the exported model's in eval
        mode: exactly for fp32 rows and unweighted bags (a weighted bag may differ in the last
        bits: the training kernel fuses multiply-adds), within the rows' ``max_abs_error``
        for fp16 and int8.

    Example::

        >>> served = load("served", DeepFM(**read_manifest("served")["config"]["kwargs"]))
    """
    manifest = read_manifest(path)
    tables = load_tables(path, manifest)
    twins = {prefix: _twin(spec, tables) for prefix, spec in manifest["modules"].items()}
    if model is None:
        if list(twins) != [""]:
            raise ValueError(f"the export at {os.fspath(path)!r} holds a model with embedding "
                             f"modules at {sorted(twins)} and dense weights; pass model=, a "
                             "freshly built model of the same class")
        return twins[""].eval()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = {prefix: module for prefix, module in _embedding_modules(model)}
    if sorted(found) != sorted(twins):
        raise ValueError(f"model has embedding modules at {sorted(found)}, the export at "
                         f"{sorted(twins)}: build the model as it was exported")
    for prefix, module in found.items():
        want = set(manifest["modules"][prefix].get("features", {None: None}))
        have = set(_options(module))
        if want != have:
            raise ValueError(f"model.{prefix or '(root)'} embeds features {sorted(have, key=str)}"
                             f", the export {sorted(want, key=str)}")
    if "" in twins:
        return twins[""].eval()
    dense = load_file(os.path.join(os.fspath(path), DENSE))
    _check_dense(_dense_state(model, list(found)), dense)  # before the model is changed
    for prefix, twin in twins.items():
        model.set_submodule(prefix, twin)
    model.load_state_dict(dense, strict=True)
    return model.eval()


def serving_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with every ragged value (a two-level :class:`~recis.ragged.RaggedTensor`)
    replaced by a ``(values, offsets)`` or ``(values, offsets, weights)`` tuple of tensors,
    which the frozen modules take and ``torch.export`` can trace."""
    out = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor) and callable(getattr(value, "offsets", None)):
            levels = value.offsets()
            if len(levels) != 1:
                raise ValueError(f"batch[{key!r}]: frozen modules take one ragged level, got "
                                 f"{len(levels)}")
            weight = value.weight()
            value = (value.values(), levels[0]) + (() if weight is None else (weight,))
        out[key] = value
    return out


def exported_program(module: nn.Module, inputs: Mapping[str, Any]
                     ) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a (frozen) module whose forward takes one dict of features,
    with the batch size and the number of IDs of every ragged feature left dynamic.

    ``inputs`` (e.g. a batch through :func:`serving_inputs`) gives the structure only: the
    trace runs on a made-up example of the same structure (3 rows, a distinct number of IDs
    per ragged feature, so that no two sizes are taken to be equal). Dense tensors and ID
    tensors have the batch as dimension 0; a ragged feature is ``(values, offsets[,
    weights])``. Batches of 0 or 1 rows or IDs are allowed where this torch has
    ``backed_size_oblivious``.

    Example::

        >>> program = exported_program(Scorer(frozen_model), serving_inputs(batch))
        >>> program.module()(serving_inputs(other_batch))  # any batch size
    """
    from torch.export import Dim

    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict of features, got {type(inputs).__name__}")
    batch, rows = Dim("batch", min=1), 3
    fixed = [rows] + [d for v in inputs.values() if isinstance(v, Tensor) for d in v.shape[1:]]
    example: dict[str, Any] = {}
    dynamic: dict[str, Any] = {}
    for i, (key, value) in enumerate(inputs.items()):
        if isinstance(value, Tensor):
            example[key] = value.new_zeros(rows, *value.shape[1:])
            dynamic[key] = {0: batch}
        elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
            n = max(fixed) + 1 + i  # distinct from every other size
            ids = Dim(f"ids_{i}", min=0)
            example[key] = (value[0].new_zeros(n), torch.tensor([0, 1, 2, n]),
                            *(value[2].new_ones(n) for _ in value[2:]))
            dynamic[key] = ({0: ids}, {0: batch + 1}, *({0: ids} for _ in value[2:]))
        else:
            raise TypeError(f"inputs[{key!r}] must be a Tensor or a ragged (values, offsets"
                            f"[, weights]) tuple, got {type(value).__name__}")
    try:
        import torch.fx.experimental._config as fx_config

        sizes_0_and_1 = fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):
        sizes_0_and_1 = contextlib.nullcontext()
    with sizes_0_and_1, torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=(dynamic,))


# -- helpers -------------------------------------------------------------------------------
def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the outermost DynamicEmbedding / EmbeddingEngine modules."""
    from recis.nn import DynamicEmbedding, EmbeddingEngine

    found: list[tuple[str, nn.Module]] = []
    for prefix, module in model.named_modules():
        if isinstance(module, (DynamicEmbedding, EmbeddingEngine)) and not any(
                prefix.startswith(p + ".") or p == "" for p, _ in found):
            found.append((prefix, module))
    return found


def _options(module: nn.Module) -> dict:
    """Feature -> EmbeddingOption; a DynamicEmbedding's one feature is keyed None."""
    from recis.nn import DynamicEmbedding

    if isinstance(module, DynamicEmbedding):
        return {None: module.emb_opt}
    return module.emb_options


def _feature_spec(module: nn.Module, feature: str | None, opt: Any,
                  sources: dict[str, tuple[Any, str]], prefix: str) -> dict[str, Any]:
    """The manifest entry of one feature; registers its logical table in ``sources``."""
    from recis.nn import DynamicEmbedding

    where = f"model.{prefix}" if prefix else "model"
    if isinstance(module, DynamicEmbedding):
        table, child = module.hashtable, module.hashtable.children_hashtable[0]
    else:
        table, child = module.hashtable(feature), module.child_name(feature)
    if not table.dtype.is_floating_point:
        raise ValueError(f"{where}: table {child!r} stores {table.dtype} rows; export takes "
                         "floating-point tables")
    known = sources.setdefault(child, (table, child))
    if known[0] is not table:
        raise ValueError(f"two tables hold a logical table named {child!r} ({known[0].name!r} "
                         f"and {table.name!r}); give them distinct shared_name")
    return {"table": child, "combiner": opt.combiner, "tile_len": opt.tile_len,
            "use_weight": opt.use_weight}


def _check_no_bare_tables(model: nn.Module, embedding_prefixes: list[str]) -> None:
    from recis.nn import HashTable

    for prefix, module in model.named_modules():
        if isinstance(module, HashTable) and not any(
                p == "" or prefix.startswith(p + ".") for p in embedding_prefixes):
            raise ValueError(f"model.{prefix} is a HashTable outside any DynamicEmbedding or "
                             "EmbeddingEngine; export knows no combiner for it (wrap it in "
                             "a DynamicEmbedding)")


def _check_unsharded(module: nn.Module, prefix: str) -> None:
    from recis.nn import DynamicEmbedding

    if any(m.sharding is not None for m in module.modules() if isinstance(m, DynamicEmbedding)):
        raise ValueError(f"model.{prefix or '(root)'}: its tables are sharded over processes; "
                         "export from one process (load the checkpoint into an unsharded "
                         "model)")


def _snapshot(table: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, child indices, rows)`` of every live entry of a table, one consistent read."""
    from recis._core.store import EMBEDDING

    with table.store.lock.read():
        ids, tags, rows = table.snapshot()
        return ids.cpu(), tags.cpu(), table.slot_values(EMBEDDING, rows).cpu()


def _child_rows(ids: Tensor, tags: Tensor, values: Tensor, child_index: int, child: str,
                row_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``(ids, rows)`` of one logical table of a snapshot, sorted by ID, rows float32."""
    keep = tags == child_index
    ids, order = torch.sort(ids[keep])
    values = values[keep][order].to(torch.float32)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"table {child!r} holds non-finite values (inf/nan); nothing exported")
    return ids.contiguous(), values.reshape(ids.numel(), math.prod(row_shape)).contiguous()


def _dense_state(model: nn.Module, embedding_prefixes: list[str]) -> dict[str, Tensor]:
    """The model's state_dict without tables and embedding modules: tensors only, unshared."""
    from recis.nn.modules.hashtable import split_sparse_dense_state_dict

    if "" in embedding_prefixes:
        return {}
    _, dense = split_sparse_dense_state_dict(model.state_dict())
    out = {}
    for key, value in dense.items():
        if any(key.startswith(p + ".") for p in embedding_prefixes):
            continue  # policy state of the tables
        if not isinstance(value, Tensor):
            raise ValueError(f"model.state_dict()[{key!r}] is a {type(value).__name__}; "
                             "export writes tensors only")
        out[key] = value.detach().cpu().clone().contiguous()
    return out


def _check_dense(want: Mapping[str, Tensor], have: Mapping[str, Tensor]) -> None:
    problems = [f"missing {sorted(set(want) - set(have))}"] if set(want) - set(have) else []
    if set(have) - set(want):
        problems.append(f"unexpected {sorted(set(have) - set(want))}")
    problems += [f"{k}: {tuple(have[k].shape)} in the export, {tuple(v.shape)} in the model"
                 for k, v in want.items() if k in have and have[k].shape != v.shape]
    if problems:
        raise ValueError("model's dense weights do not match the export: " + "; ".join(problems))


def _twin(spec: Mapping[str, Any], tables: Mapping[str, FrozenTable]) -> nn.Module:
    def embedding(feature: Mapping[str, Any]) -> FrozenEmbedding:
        if feature.get("table") not in tables or feature.get("combiner") not in COMBINERS:
            raise ValueError(f"manifest: bad feature entry {dict(feature)!r}")
        return FrozenEmbedding(tables[feature["table"]], feature["combiner"],
                               feature.get("tile_len"), feature.get("use_weight", True))

    if spec.get("kind") == "DynamicEmbedding":
        return embedding(spec)
    if spec.get("kind") == "EmbeddingEngine":
        return FrozenEngine({name: embedding(f) for name, f in spec["features"].items()})
    raise ValueError(f"manifest: unknown module kind {spec.get('kind')!r}")
