"""CRC-32 of checkpoint files: the folding kernel, the combination of pieces and the threaded
computation all give zlib's ``crc32`` (the reference) on the same bytes; a flipped bit in any
piece of a file read in parts is caught. Also: tensors written while they are computed."""

import json
import zlib

import numpy as np
import pytest
import torch

from recis.nn import HashTable
from recis.serialize import CheckpointError, Loader, Saver, _files

LENGTHS = [0, 1, 7, 63, 64, 65, 4095, 4096, 4097, 4096 + 63, 100_003]


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("n", LENGTHS)
def test_crc32_equals_zlib(monkeypatch, n, use_kernel):
    if not use_kernel:
        monkeypatch.setattr(_files, "_PCLMUL", None)
    data = random_bytes(n + 1, seed=n)
    for start in (0, 1):  # an unaligned view too
        view = memoryview(data)[start : start + n]
        for seed_crc in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            assert _files.crc32(view, seed_crc) == zlib.crc32(view, seed_crc)


def test_folding_kernel_equals_zlib():
    if _files._PCLMUL is None:
        pytest.skip("this CPU has no carry-less multiplication: zlib computes every CRC")
    for n in (64, 128, 64 * 1001):
        words = np.frombuffer(random_bytes(n, seed=n), np.uint64)
        for seed_crc in (0, 12345, 0xFFFFFFFF):
            assert int(_files._PCLMUL(words, seed_crc)) == zlib.crc32(words, seed_crc)


@pytest.mark.parametrize("n1,n2", [(0, 0), (5, 0), (0, 9), (1, 1), (100, 4099), (70_000, 13)])
def test_crc32_combine(n1, n2):
    a, b = random_bytes(n1, 1), random_bytes(n2, 2)
    assert _files.crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b)
    with pytest.raises(ValueError, match="len2"):
        _files.crc32_combine(0, 0, -1)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1000, 64 * 1024 + 17, 300_001])
def test_crc32_parallel_equals_zlib(monkeypatch, threads, n):
    monkeypatch.setattr(_files, "_CRC_PIECE_MIN", 1024)  # many pieces on small data
    data = memoryview(random_bytes(n, seed=threads))
    assert _files.crc32_parallel(data, threads) == zlib.crc32(data)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_a_flipped_byte_in_any_piece_is_caught(monkeypatch, tmp_path, where):
    monkeypatch.setattr(_files, "_CRC_PIECE_MIN", 4096)  # the file is read in several pieces
    table = HashTable([8], name="t")
    table.insert(torch.arange(5000), torch.randn(5000, 8, generator=torch.Generator()
                                                 .manual_seed(0)))
    Saver(path=str(tmp_path / "c"), hashtables={"t": table}).save()
    data = tmp_path / "c" / "sparse-00000-of-00001.safetensors"
    raw = bytearray(data.read_bytes())
    raw[int(len(raw) * where)] ^= 0x10
    data.write_bytes(bytes(raw))
    target = HashTable([8], name="t")
    with pytest.raises(CheckpointError, match="corrupted"):
        Loader(str(tmp_path / "c"), {"t": target}).load()
    assert len(target) == 0


def test_deferred_tensors_are_written_after_the_others_and_checked(tmp_path):
    """A DeferredTensor (its value still being computed) is written after every other tensor,
    read back equal, and a value that differs from its announced dtype or shape is a
    ValueError naming it."""
    from concurrent.futures import Future

    from safetensors import safe_open

    def done(value):
        future = Future()
        future.set_result(value)
        return future

    path = str(tmp_path / "f.safetensors")
    late = _files.DeferredTensor(torch.int64, (5,), done(torch.arange(5)))
    info = _files.write_safetensors(path, {"late": late, "early": torch.ones(3, 2)})
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["early"]["data_offsets"] == [0, 24] and header["late"]["data_offsets"][0] == 24
    back = _files.read_safetensors(path, info)
    assert torch.equal(back["late"], torch.arange(5))
    assert torch.equal(back["early"], torch.ones(3, 2))
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("late"), torch.arange(5))
    for wrong in (torch.arange(4), torch.arange(5, dtype=torch.int32)):
        bad = _files.DeferredTensor(torch.int64, (5,), done(wrong))
        with pytest.raises(ValueError, match="tensor 'late'.*announced as torch.int64 \\[5\\]"):
            _files.write_safetensors(str(tmp_path / "g.safetensors"), {"late": bad})
