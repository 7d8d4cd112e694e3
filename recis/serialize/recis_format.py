"""RecIS's checkpoint layout: load checkpoints written by RecIS, and write them for RecIS.

A RecIS checkpoint directory holds::

    model-000000-of-000002.safetensors  blocks of writer 0 (file number shard*parallel+writer
    model-000001-of-000002.safetensors  of parallel*shard_num); an empty writer makes no file
    index             {"file_index": {file: i}, "block_index": {key: i}}
    tensorkey.json    {"user.embedding/part_0_1": "user@embedding^00000@65536@65536", ...}
    torch_rank_weights_embs_table_multi_shard.json   describes the dense and embedding keys

Keys in the data files: ``<child>.<slot>/part_<shard>_<shard_num>`` for a logical table's
(child's) ``id`` block (int64 ``[n]``) and each slot (``embedding``, optimizer moments such as
``sparse_adamw_exp_avg``, filter stamps), rows in the order of the IDs; ``<name>^ `` (a caret and
a space) for a dense tensor. ``tensorkey.json`` maps each table key to its block name
``<child>@<slot>^<slice>``, the slice string ``begin@end@size`` being the slices the writing
shard owned (``begin`` and ``end`` zero-padded to the digits of ``size``).

Loading (:func:`load_recis`) follows RecIS's rule: a target table takes, for each child, the
blocks whose slice has its ``slice_size`` and intersects its slice, and of those the IDs with
``(uint64)id % slice_size`` in its slice; so N writers load into M tables. Unlike RecIS, the
target's rows are **replaced** (as :class:`~recis.serialize.checkpoint.Loader` does) and every
fault is a :class:`CheckpointError` naming the file and key, raised before any table is
touched. RecIS's coalesced tables store ``id & (2**52 - 1)`` per child; recis tables keep the
child as a tag beside the full ID, so loaded IDs go to the child of the same name unchanged.

Saving (:func:`save_recis`, ``Saver(..., format="recis")``) writes this layout under a hidden
staging directory, renamed to its final name when complete. Shards need no collective: each
writes its data files and its parts of the three JSON files (RecIS's names
``ckpt-%07d.index``, ``<shard>tensorkey.json``,
``<shard>torch_rank_weights_embs_table_multi_shard.json``, the index part last); the shard that
finds all ``shard_num`` index parts present merges them (one shard only: it creates a lock file
exclusively), deletes the parts and publishes. With ``torch.distributed`` initialised, shards
meet at a barrier and shard 0 merges. Nobody polls or sleeps.

Example::

    Saver(path="ckpt_for_recis", hashtables={"user": table}, tensors=dense,
          format="recis").save()
    Loader("ckpt_from_recis", hashtables={"user": table}, tensors=dense).load()
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from recis.nn.modules.hashtable import HashTable, Slice, in_slice
from recis.serialize._files import (
    _FROM_CODE,
    CheckpointError,
    _checked_header,
    _read_exactly,
    atomic_write_bytes,
    dtype_name,
    fsync_path,
    is_plain_name,
    open_regular,
    read_regular,
    write_safetensors,
)

__all__ = ["is_recis_layout", "load_recis", "read_recis_tensors", "save_recis", "parse_slice",
           "slice_string", "ID_BITS"]

INDEX = "index"
TENSORKEY = "tensorkey.json"
RANK_JSON = "torch_rank_weights_embs_table_multi_shard.json"
DENSE_SUFFIX = "^ "
ID_BITS = 52  # RecIS's coalesced IDs: child << 52 | (id & (2**52 - 1))
ID_MASK = (1 << ID_BITS) - 1
MAX_JSON_BYTES = 1 << 30
_SLICE = re.compile(r"([0-9]+)@([0-9]+)@([0-9]+)")
_PART = re.compile(r"/part_(0|[1-9][0-9]*)_([1-9][0-9]*)")


def slice_string(s: Slice) -> str:
    """RecIS's string of a slice: ``begin@end@size``, begin and end zero-padded to the digits
    of size. Example: ``slice_string(Slice(0, 32768, 65536)) == "00000@32768@65536"``."""
    width = len(str(s.slice_size))
    return f"{s.slice_begin:0{width}d}@{s.slice_end:0{width}d}@{s.slice_size}"


def parse_slice(text: str, where: str) -> Slice:
    """The :class:`Slice` of a slice string ``begin@end@size`` (``0 <= begin < end <= size``);
    a :class:`CheckpointError` naming ``where`` otherwise."""
    m = _SLICE.fullmatch(text) if isinstance(text, str) else None
    if m is not None:
        begin, end, size = (int(g) for g in m.groups())
        if 0 <= begin < end <= size:
            return Slice(begin, end, size)
    raise CheckpointError(f"{where}: {text!r} is not a slice string 'begin@end@size' with "
                          "0 <= begin < end <= size")


def is_recis_layout(path: str) -> bool:
    """True if ``path`` is a directory in RecIS's layout: it holds ``index`` and
    ``tensorkey.json`` (their contents are checked when loaded)."""
    return (os.path.isdir(path) and os.path.lexists(os.path.join(path, INDEX))
            and os.path.lexists(os.path.join(path, TENSORKEY)))


# -- reading -------------------------------------------------------------------------------------

@dataclass
class _Block:
    """One table block: a child's field (``id`` or a slot) of one source slice."""

    child: str
    field: str
    slice: Slice
    file: str
    key: str
    tensor: Tensor


@dataclass
class _Source:
    """What a RecIS checkpoint holds: table blocks by ``(child, slice string)`` and field, and
    dense tensors by name."""

    blocks: dict[tuple[str, str], dict[str, _Block]]
    dense: dict[str, Tensor]


def _read_json(path: str, what: str) -> object:
    raw = read_regular(path, what, MAX_JSON_BYTES)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None


def _read_data_file(path: str) -> dict[str, Tensor]:
    """All tensors of a safetensors file that no index vouches for: the header's listing is
    checked for well-formed dtypes and shapes, then by the same checks as an indexed file
    (offsets tiling the data section exactly). Extra fields of an entry (RecIS writes
    ``dense``) are ignored."""
    fd, size = open_regular(path)
    try:
        data = _read_exactly(fd, size, path, "checkpoint file")
    finally:
        os.close(fd)
    if size < 8:
        raise CheckpointError(f"checkpoint file {path}: shorter than a safetensors header")
    header_size = int.from_bytes(data[:8].tobytes(), "little")
    if header_size > size - 8:
        raise CheckpointError(f"checkpoint file {path}: the header claims {header_size} bytes, "
                              f"the file has {size - 8} after it")
    try:
        header = json.loads(data[8:8 + header_size].tobytes().decode("utf-8"))
    except ValueError as e:
        raise CheckpointError(f"checkpoint file {path}: the safetensors header is not valid "
                              f"JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint file {path}: the safetensors header is not a JSON "
                              "object")
    listing = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if dtype not in _FROM_CODE or not (isinstance(shape, list) and all(
                type(d) is int and d >= 0 for d in shape)):
            raise CheckpointError(f"checkpoint file {path}: tensor {key!r} must have a dtype "
                                  f"among {sorted(_FROM_CODE)} and a list of sizes as shape; "
                                  f"got {info!r:.200}")
        listing[key] = {"dtype": dtype, "shape": shape}
    header, base = _checked_header(path, data, listing)
    out = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        dtype = _FROM_CODE[info["dtype"]]
        raw = torch.from_numpy(data[base + start:base + end])
        if end == start:
            t = torch.zeros(0, dtype=dtype)
        elif dtype == torch.bfloat16:
            t = raw.view(torch.int16).view(torch.bfloat16)
        else:
            t = raw.view(dtype)
        out[key] = t.reshape(info["shape"])
    return out


def _read_source(path: str) -> _Source:
    """Read and check everything of the RecIS checkpoint at ``path``.

    Checked, each fault a :class:`CheckpointError` naming the file and key: ``index`` is a
    JSON object with ``file_index`` (plain file names of the directory -> distinct integers)
    and ``block_index`` (key -> one of those integers); ``tensorkey.json`` maps each table
    key of ``block_index`` (and nothing else) to a block name ``<child>@<field>^<slice>``
    with a valid slice; every indexed key is in its file; within a ``(child, slice)`` there is
    an int64 ``[n]`` id block and every slot block has ``n`` rows; the slices of one child's
    blocks do not overlap; a field has one dtype and row shape in all blocks.
    """
    index_path, keys_path = os.path.join(path, INDEX), os.path.join(path, TENSORKEY)
    index = _read_json(index_path, "checkpoint index")
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: must be a JSON object with 'file_index' and "
                              "'block_index'")
    file_index, block_index = index.get("file_index"), index.get("block_index")
    if not isinstance(file_index, dict) or not all(
            is_plain_name(f) and type(i) is int for f, i in file_index.items()):
        raise CheckpointError(f"{index_path}: 'file_index' must map plain file names of the "
                              "checkpoint directory (no separator, no leading dot) to integers;"
                              f" got {file_index!r:.200}")
    files_by_number = {i: f for f, i in file_index.items()}
    if len(files_by_number) != len(file_index):
        raise CheckpointError(f"{index_path}: 'file_index' gives two files the same number")
    if not isinstance(block_index, dict):
        raise CheckpointError(f"{index_path}: 'block_index' must be a JSON object; got "
                              f"{block_index!r:.200}")
    for key, number in block_index.items():
        if type(number) is not int or number not in files_by_number:
            raise CheckpointError(f"{index_path}: block_index[{key!r}] must be a number of "
                                  f"'file_index' {sorted(files_by_number)}; got {number!r}")
    tensorkey = _read_json(keys_path, "checkpoint tensor keys")
    if not isinstance(tensorkey, dict) or not all(isinstance(v, str) for v in tensorkey.values()):
        raise CheckpointError(f"{keys_path}: must be a JSON object of header key -> block name")
    for key in tensorkey:
        if key not in block_index:
            raise CheckpointError(f"{keys_path}: {key!r} is not in {index_path}'s block_index")
    for key in block_index:
        if not key.endswith(DENSE_SUFFIX) and key not in tensorkey:
            raise CheckpointError(f"{index_path}: block_index key {key!r} is neither a dense "
                                  f"key ('<name>^ ') nor a table key of {keys_path}")

    contents = {}
    for number in sorted(set(block_index.values())):
        fname = files_by_number[number]
        contents[fname] = _read_data_file(os.path.join(path, fname))
    source = _Source({}, {})
    seen_blocks: dict[str, str] = {}
    for key, number in block_index.items():
        fname = files_by_number[number]
        where = os.path.join(path, fname)
        tensor = contents[fname].get(key)
        if tensor is None:
            raise CheckpointError(f"checkpoint file {where}: key {key!r} is in {index_path} but "
                                  "not in the file")
        if key.endswith(DENSE_SUFFIX):
            source.dense[key[:-len(DENSE_SUFFIX)]] = tensor
            continue
        block = tensorkey[key]
        name, caret, slice_text = block.rpartition("^")
        child, at, field = name.rpartition("@")
        if not (caret and at and child and field):
            raise CheckpointError(f"{keys_path}: {key!r} maps to {block!r}, not a block name "
                                  "'<child>@<field>^<begin>@<end>@<size>'")
        if block in seen_blocks:
            raise CheckpointError(f"{keys_path}: {key!r} and {seen_blocks[block]!r} both map to "
                                  f"block {block!r}")
        seen_blocks[block] = key
        piece = _Block(child, field, parse_slice(slice_text, f"{keys_path}[{key!r}]"), fname,
                       key, tensor)
        source.blocks.setdefault((child, slice_text), {})[field] = piece
    _check_blocks(path, source)
    return source


def _check_blocks(path: str, source: _Source) -> None:
    specs: dict[tuple[str, str], tuple[torch.dtype, tuple[int, ...], str]] = {}
    by_child: dict[str, list[Slice]] = {}
    for (child, slice_text), fields in source.blocks.items():
        ids = fields.get("id")
        if ids is None:
            some = next(iter(fields.values()))
            raise CheckpointError(f"checkpoint file {os.path.join(path, some.file)}: "
                                  f"{some.key!r} has no id block ({child}@id^{slice_text})")
        if ids.tensor.dtype != torch.int64 or ids.tensor.dim() != 1:
            raise CheckpointError(f"checkpoint file {os.path.join(path, ids.file)}: {ids.key!r} "
                                  f"must be int64 of shape [n]; got {ids.tensor.dtype} "
                                  f"{list(ids.tensor.shape)}")
        n = ids.tensor.numel()
        if torch.unique(ids.tensor).numel() != n:
            raise CheckpointError(f"checkpoint file {os.path.join(path, ids.file)}: {ids.key!r} "
                                  "holds an ID twice")
        for field, block in fields.items():
            if field == "id":
                continue
            t = block.tensor
            where = f"checkpoint file {os.path.join(path, block.file)}: {block.key!r}"
            if t.dim() == 0 or t.shape[0] != n:
                raise CheckpointError(f"{where} has shape {list(t.shape)}; it needs one row per "
                                      f"ID of {ids.key!r} ({n})")
            spec = (t.dtype, tuple(t.shape[1:]), block.key)
            first = specs.setdefault((child, field), spec)
            if first[:2] != spec[:2]:
                raise CheckpointError(f"{where} is {t.dtype} with rows {list(t.shape[1:])}, "
                                      f"but {first[2]!r} is {first[0]} with rows "
                                      f"{list(first[1])}")
        by_child.setdefault(child, []).append(ids.slice)
    for child, slices in by_child.items():
        slices.sort(key=lambda s: (s.slice_size, s.slice_begin))
        for a, b in zip(slices, slices[1:], strict=False):
            if a.slice_size == b.slice_size and b.slice_begin < a.slice_end:
                raise CheckpointError(f"{os.path.join(path, TENSORKEY)}: table {child!r} has "
                                      f"blocks of overlapping slices {slice_string(a)} and "
                                      f"{slice_string(b)}")


def read_recis_tensors(path: str) -> dict[str, Tensor]:
    """Every tensor of a RecIS checkpoint, named as RecIS's ``CheckpointReader`` names them:
    ``child@field`` (the blocks of all slices concatenated in the order of their slice
    strings) and dense tensors by name. Example::

        read_recis_tensors("ckpt")["user@embedding"]   # rows of read_...["user@id"]
    """
    source = _read_source(os.path.abspath(path))
    parts: dict[str, list[tuple[str, Tensor]]] = {}
    for (child, slice_text), fields in source.blocks.items():
        for field, block in fields.items():
            parts.setdefault(f"{child}@{field}", []).append((slice_text, block.tensor))
    out = {name: torch.cat([t for _, t in sorted(p, key=lambda x: x[0])])
           for name, p in parts.items()}
    for name, t in source.dense.items():
        if name in out:
            raise CheckpointError(f"{path}: dense tensor {name!r} is named like a table block")
        out[name] = t
    return out


def load_recis(path: str, tables: Mapping[str, HashTable], tensors: Mapping[str, Tensor],
               filter_func: Callable | None = None, strict: bool = True) -> dict[str, list[str]]:
    """Load a RecIS checkpoint into recis ``tables`` (their rows replaced) and dense
    ``tensors`` (in place); see the module docstring for the slice rule.

    ``filter_func(plan) -> plan`` selects, as for the recis layout, with plan
    ``{child: [slots]}``. Missing (a planned child or slot, or a dense tensor, the checkpoint
    lacks) and unexpected (a checkpoint child or slot not planned) names are returned, and
    are an error when ``strict``. Returns ``{"missing": [...], "unexpected": [...]}``.
    """
    from recis.serialize.checkpoint import _children, _saved_slots

    path = os.path.abspath(path)
    source = _read_source(path)  # everything read and checked before a table is touched
    children = _children(tables)
    plan = {c: _saved_slots(t.store) for c, (t, _) in children.items()}
    if filter_func is not None:
        plan = filter_func(plan)
    saved: dict[str, dict[str, _Block]] = {}  # child -> field -> a block of it (for checks)
    for (child, _), fields in source.blocks.items():
        saved.setdefault(child, {}).update(fields)
    missing, unexpected = [], []
    for child, slots in plan.items():
        if child not in children:
            raise ValueError(f"filter_func planned {child!r}, which no table holds")
        if child not in saved:
            missing.append(child)
            continue
        table = children[child][0]
        for slot in slots:
            block = saved[child].get(slot)
            if block is None:
                missing.append(f"{child}.{slot}")
                continue
            spec = table.store.slot_spec(slot)
            if block.tensor.dtype != spec.dtype or tuple(block.tensor.shape[1:]) != tuple(
                    spec.row_shape):
                raise CheckpointError(
                    f"checkpoint file {os.path.join(path, block.file)}: {block.key!r} is "
                    f"{block.tensor.dtype} with rows {list(block.tensor.shape[1:])}; the slot "
                    f"{slot!r} of table {child!r} is {spec.dtype} with rows "
                    f"{list(spec.row_shape)}")
        unexpected += [f"{child}.{s}" for s in saved[child] if s != "id" and s not in slots]
    unexpected += [c for c in saved if c not in plan]
    missing += [name for name in tensors if name not in source.dense]
    for name, target in tensors.items():
        got = source.dense.get(name)
        if got is not None and (got.shape != target.shape or got.dtype != target.dtype):
            raise CheckpointError(f"{path}: dense tensor {name + DENSE_SUFFIX!r} is {got.dtype} "
                                  f"{list(got.shape)}, the target {target.dtype} "
                                  f"{list(target.shape)}")
    sizes_saved: dict[str, set[int]] = {}
    for (child, _), fields in source.blocks.items():
        sizes_saved.setdefault(child, set()).add(fields["id"].slice.slice_size)
    for child, sizes in sizes_saved.items():
        if child in plan:
            size = children[child][0].slice.slice_size
            if size not in sizes:
                raise CheckpointError(f"{path}: table {child!r} was saved with slices of size "
                                      f"{sorted(sizes)}, the table's slice has size {size}; "
                                      "only equal slice sizes can be resharded")
    if strict and (missing or unexpected):
        raise CheckpointError(f"Error(s) in loading RecIS checkpoint {path}:\n"
                              f"    Missing: {sorted(missing)}\n"
                              f"    Unexpected: {sorted(unexpected)}\n"
                              "(pass strict=False to load what matches)")
    for table in list({id(t): t for t, _ in children.values()}.values()):
        if not any(c in plan and c in saved for c in table.children_hashtable):
            continue
        table.clear()
        for idx, child in enumerate(table.children_hashtable):
            if child in plan:
                _load_child(table, idx, child, plan[child], source)
        table.store.mark_saved()
    with torch.no_grad():
        for name, target in tensors.items():
            if name in source.dense:
                target.copy_(source.dense[name])
    return {"missing": sorted(missing), "unexpected": sorted(unexpected)}


def _load_child(table: HashTable, idx: int, child: str, slots: list[str],
                source: _Source) -> None:
    """Insert the IDs of ``child`` that the table's slice owns, from every block of a slice
    of the same size intersecting it, and write their slots."""
    target = table.slice
    for (name, _), fields in source.blocks.items():
        src = fields["id"].slice
        if (name != child or src.slice_size != target.slice_size
                or src.slice_end <= target.slice_begin or target.slice_end <= src.slice_begin):
            continue
        ids = fields["id"].tensor.to(table.device)
        keep = in_slice(ids, target)
        ids = ids[keep]
        if ids.numel() == 0:
            continue
        rows = table.store.lookup_or_insert(ids, None if idx == 0 else torch.full_like(ids, idx))
        for slot in slots:
            if slot in fields:
                table.store.write(slot, rows, fields[slot].tensor.to(table.device)[keep])


# -- writing -------------------------------------------------------------------------------------

def _data_file(number: int, total: int) -> str:
    return f"model-{number:06d}-of-{total:06d}.safetensors"


def _index_part(shard: int) -> str:
    return f"ckpt-{shard:07d}.index"


def _tensorkey_part(shard: int) -> str:
    return f"{shard}{TENSORKEY}"


def _rank_json_part(shard: int) -> str:
    return f"{shard}{RANK_JSON}"


_MERGE_LOCK = "merge.lock"


def _dump(obj: object) -> bytes:
    return json.dumps(obj, indent=4).encode()


def _table_blocks(table: HashTable, shard: int, shard_num: int
                  ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A table's blocks ``{header key: tensor}`` (per child: ``id``, then each saved slot) and
    their block names ``{header key: "<child>@<field>^<slice>"}``."""
    from recis.serialize.checkpoint import _saved_slots

    store = table.store
    slice_text = slice_string(table.slice)
    blocks: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    with store.lock.read():  # one consistent state of the table
        ids, tags, rows = store.items()
        values = {slot: store.read(slot, rows) for slot in _saved_slots(store)}
    for idx, child in enumerate(table.children_hashtable):
        keep = tags == idx
        child_ids = ids[keep]
        if table.coalesce and child_ids.numel() and (
                bool((child_ids < 0).any()) or bool((child_ids > ID_MASK).any())):
            raise ValueError(f"table {table.name!r}, child {child!r}: RecIS's coalesced layout "
                             f"stores IDs in {ID_BITS} bits, and this child holds IDs outside "
                             f"[0, 2**{ID_BITS}); save it in recis's own format instead")
        for field, tensor in [("id", child_ids)] + [(s, v[keep]) for s, v in values.items()]:
            key = f"{child}.{field}/part_{shard}_{shard_num}".replace("@", ".")
            if key in blocks:
                raise ValueError(f"table {table.name!r}: two blocks get the key {key!r}; "
                                 "RecIS's layout cannot hold these child or slot names")
            blocks[key] = tensor.detach().cpu()
            names[key] = f"{child}@{field}^{slice_text}"
    return blocks, names


def _describe(key: str, t: Tensor, dense: bool) -> dict:
    """The entry of the rank json for a dense or an embedding key."""
    entry = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "dense": dense, "name": key}
    if dense:
        return {**entry, "dimension": 0, "is_hashmap": False}
    return {**entry, "dimension": int(t.shape[-1]),
            "hashmap_key": key.replace(".embedding/", ".id/"), "hashmap_key_dtype": "int64",
            "hashmap_value": key, "is_hashmap": True}


def save_recis(path: str, tables: Mapping[str, HashTable], tensors: Mapping[str, Tensor],
               shard_index: int = 0, shard_num: int = 1, parallel: int = 8,
               filter_func: Callable | None = None) -> str:
    """Write this shard's part of a RecIS-layout checkpoint at ``path`` (which must not exist);
    the shard that completes the set publishes it (see the module docstring). Dense
    ``tensors`` are written by shard 0; ``filter_func(list of table keys) -> list`` keeps a
    subset of the table blocks. Returns the path.

    Example::

        save_recis("ckpt", {"user": table}, {"w": w}, shard_index=0, shard_num=2)
    """
    from recis.serialize.checkpoint import _children, _empty_dir, _staging

    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be a positive int, got {parallel!r}")
    path = os.path.abspath(path)
    if os.path.lexists(path) and not _empty_dir(path):
        raise CheckpointError(f"{path} already exists and is not an empty directory; "
                              "checkpoints are never overwritten")
    _children(tables)  # distinct child names
    blocks: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    for table in tables.values():
        table_blocks, table_names = _table_blocks(table, shard_index, shard_num)
        clash = blocks.keys() & table_blocks.keys()
        if clash:
            raise ValueError(f"two tables write the keys {sorted(clash)}")
        blocks.update(table_blocks)
        names.update(table_names)
    if filter_func is not None:
        keep = set(filter_func(list(blocks)))
        blocks = {k: v for k, v in blocks.items() if k in keep}
        child_field = {k: names[k].rpartition("^")[0].rpartition("@")[::2] for k in blocks}
        kept_ids = {child for child, field in child_field.values() if field == "id"}
        orphans = sorted(k for k, (child, _) in child_field.items() if child not in kept_ids)
        if orphans:
            raise ValueError(f"filter_func kept {orphans} without the id block of their table: "
                             "rows cannot be loaded without their IDs")
    dense = {name + DENSE_SUFFIX: t.detach().cpu() for name, t in tensors.items()} \
        if shard_index == 0 else {}
    writers: list[dict[str, Tensor]] = [{} for _ in range(parallel)]
    for i, (key, t) in enumerate([*dense.items(), *blocks.items()]):
        writers[i % parallel][key] = t  # round robin, as RecIS spreads its blocks
    staging = _staging(path)
    os.makedirs(staging, exist_ok=True)
    block_files: dict[str, str] = {}
    rank_entries: dict[str, dict] = {}
    for writer, content in enumerate(writers):
        if not content:
            continue  # an empty writer makes no file
        fname = _data_file(shard_index * parallel + writer, parallel * shard_num)
        write_safetensors(os.path.join(staging, fname), content)
        for key, t in content.items():
            block_files[key] = fname
            if key in dense or key.split("/part_")[0].endswith(".embedding"):
                rank_entries[key] = _describe(key, t, key in dense)
    atomic_write_bytes(os.path.join(staging, _tensorkey_part(shard_index)),
                       _dump({k: names[k] for k in blocks}))
    atomic_write_bytes(os.path.join(staging, _rank_json_part(shard_index)), _dump(rank_entries))
    # the index part last: its presence says this shard is done
    atomic_write_bytes(os.path.join(staging, _index_part(shard_index)), _dump(block_files))
    if dist.is_available() and dist.is_initialized() and shard_num > 1:
        dist.barrier()
        if shard_index == 0:
            _merge(staging, path, shard_num)
    elif all(os.path.exists(os.path.join(staging, _index_part(s))) for s in range(shard_num)):
        try:
            os.close(os.open(os.path.join(staging, _MERGE_LOCK), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return path  # another shard saw the set complete at the same moment and merges
        _merge(staging, path, shard_num)
    return path


def _merge(staging: str, path: str, shard_num: int) -> None:
    """Merge the shards' parts into ``index``, ``tensorkey.json`` and the rank json, delete
    the parts, and make the directory visible under its final name."""
    block_files: dict[str, str] = {}
    tensorkey: dict[str, str] = {}
    rank: dict[str, dict] = {}
    for shard in range(shard_num):
        for name, into in ((_index_part(shard), block_files),
                           (_tensorkey_part(shard), tensorkey),
                           (_rank_json_part(shard), rank)):
            part = _read_json(os.path.join(staging, name), "checkpoint part")
            if not isinstance(part, dict) or into.keys() & part.keys():
                raise CheckpointError(f"{os.path.join(staging, name)}: not a JSON object, or "
                                      "it repeats another shard's keys (two shards with the "
                                      "same shard_index?)")
            into.update(part)
    file_index = {f: i for i, f in enumerate(sorted(set(block_files.values())))}
    index = {"file_index": file_index,
             "block_index": {k: file_index[f] for k, f in block_files.items()}}
    atomic_write_bytes(os.path.join(staging, TENSORKEY), _dump(tensorkey))
    atomic_write_bytes(os.path.join(staging, RANK_JSON), _dump(rank))
    atomic_write_bytes(os.path.join(staging, INDEX), _dump(index))
    for shard in range(shard_num):
        for name in (_index_part(shard), _tensorkey_part(shard), _rank_json_part(shard)):
            os.remove(os.path.join(staging, name))
    if os.path.exists(os.path.join(staging, _MERGE_LOCK)):
        os.remove(os.path.join(staging, _MERGE_LOCK))
    fsync_path(staging)
    os.rename(staging, path)  # the moment the checkpoint becomes visible
    fsync_path(os.path.dirname(path))
