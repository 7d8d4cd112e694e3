"""Checkpoint hardening: regression tests of the faults a fault-injection run found.

Each test is named after the defect it pins down: names that break checkpoint keys, an index
without a checksum, paths that lead out of the checkpoint directory (and files that are not
what the index says), temporary files left by killed saves, and slots dropped by a save's
``filter_func`` that a strict load did not notice.
"""

import json
import os
import shutil
import struct
import threading
import time
import zlib

import pytest
import torch
from safetensors import safe_open

from recis.nn import HashTable
from recis.nn.initializers import NormalInitializer
from recis.serialize import CheckpointError, Loader, Saver

DIM = 4
DATA = "sparse-00000-of-00001.safetensors"


def make_table(name="t", seed=0, **kw):
    table = HashTable([DIM], block_size=8, name=name, initializer=NormalInitializer(
        generator=torch.Generator().manual_seed(seed)), **kw)
    table.add_slot("m", [DIM], torch.float32, 0.0)
    return table


def filled(name="t", n=100, **kw):
    table = make_table(name, **kw)
    table(torch.arange(n))
    table.delete(torch.arange(0, n, 7))
    table.set_slot_values("m", table.ids_map()[1], torch.rand(len(table), DIM))
    return table


def reseal(index):
    """Give a hand-edited index a valid checksum (a consistent forgery), where indexes have
    one: the checks below must hold even when the checksum does."""
    try:
        from recis.serialize.checkpoint import index_checksum
    except ImportError:  # an index format without a checksum
        return index
    index = {k: v for k, v in index.items() if k != "index_checksum"}
    index["index_checksum"] = index_checksum(index)
    return index


def edit_index(path, edit):
    index_path = os.path.join(path, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    edit(index)
    with open(index_path, "w") as f:
        json.dump(reseal(index), f)


def run_with_timeout(fn, seconds=10.0):
    """fn() in a thread; fails the test (instead of hanging it) when it does not return."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: B036 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive(), result


# -- 3. paths out of the checkpoint, special files, headers ------------------------------------

def _saved(tmp_path, name="c"):
    path = str(tmp_path / name)
    Saver(path=path, hashtables={"t": filled()}).save()
    return path


def _must_reject(path, match, table=None):
    table = table or make_table()
    table.insert(torch.tensor([42]), torch.ones(1, DIM))
    with pytest.raises(CheckpointError, match=match):
        Loader(path, {"t": table}).load()
    assert table.ids().tolist() == [42]  # untouched


def test_symlinked_data_file_is_rejected(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(os.path.join(path, DATA), outside)
    os.symlink(outside, os.path.join(path, DATA))
    _must_reject(path, f"{DATA}.*symbolic link")


def test_fifo_in_place_of_a_data_file_fails_fast(tmp_path):
    path = _saved(tmp_path)
    data = os.path.join(path, DATA)
    os.unlink(data)
    os.mkfifo(data)
    table = make_table()
    alive, result = run_with_timeout(lambda: Loader(path, {"t": table}).load(), 10.0)
    if alive:  # unblock the reader so that the thread ends, then fail
        fd = os.open(data, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("loading a checkpoint whose data file is a FIFO blocked")
    assert isinstance(result.get("error"), CheckpointError), result
    assert DATA in str(result["error"]) and "regular file" in str(result["error"])


def _rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
def test_oversized_data_file_is_rejected_before_reading(tmp_path):
    path = _saved(tmp_path)
    os.truncate(os.path.join(path, DATA), 1 << 30)  # sparse: no disk space used
    before, start = _rchar(), time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{DATA}.*bytes"):
        Loader(path, {"t": make_table()}).load()
    read = _rchar() - before
    assert read < 16 << 20, f"{read} bytes were read before the size was checked"
    assert time.perf_counter() - start < 5


def _rewrite_header(data_path, old, new):
    raw = bytearray(open(data_path, "rb").read())
    (size,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + size].decode()
    assert old in header
    header = header.replace(old, new, 1).encode()
    assert len(header) == size
    raw[8 : 8 + size] = header
    with open(data_path, "wb") as f:
        f.write(raw)
    return zlib.crc32(raw)


def test_header_dtype_forgery_is_detected(tmp_path):
    path = _saved(tmp_path)
    key = "t.embedding/part_0_1"
    crc = _rewrite_header(os.path.join(path, DATA), f'"{key}":{{"dtype":"F32"',
                          f'"{key}":{{"dtype":"I32"')
    edit_index(path, lambda ix: ix["files"][DATA].update(crc32=crc))  # CRC and checksum fixed
    _must_reject(path, f"{DATA}.*{key}.*I32")


def test_header_shape_forgery_is_detected(tmp_path):
    path = _saved(tmp_path)
    with safe_open(os.path.join(path, DATA), "pt") as f:
        rows = f.get_slice("t.m/part_0_1").get_shape()[0]
    crc = _rewrite_header(os.path.join(path, DATA), f'"shape":[{rows},{DIM}]',
                          f'"shape":[{DIM},{rows}]')  # same size, other shape
    edit_index(path, lambda ix: ix["files"][DATA].update(crc32=crc))
    _must_reject(path, f"{DATA}.*shape")
