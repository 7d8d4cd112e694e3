"""The parallel range kernels give the single-threaded result, whichever threads run them.

``numba_backend.run_ranges`` runs a kernel on torch's OpenMP threads (``backends.omp``) or, as a
fallback, on a thread pool of its own. Every parallel kernel is checked bitwise against one
call over the whole range, on inputs large enough to be split (more than ``PARALLEL_MIN``
items): on the OpenMP path (team sizes that do and do not divide the work), with several
Python threads calling at once, in a forked child process (which must not hang: libgomp's
pool does not survive fork) and on the fallback paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

from recis._core.backends import numba_backend as kernels
from recis._core.backends import numba_kernels as _numba
from recis._core.backends import omp as _omp
from recis._core.backends.torch_backend import new_table

N = 3 * kernels.PARALLEL_MIN + 123  # split into uneven chunks
WIDTH = 24
FLOATS = (np.float32, np.float64)
OMP = _omp._gomp_parallel is not None
needs_omp = pytest.mark.skipif(not OMP, reason=f"no OpenMP path here: {_omp.status()}")


class Case:
    """One kernel call: ``build()`` returns fresh ``(args, outputs)`` (the same inputs every
    time, the outputs being arrays that the call writes, in place state included)."""

    def __init__(self, name, fn, n, build, work=None, keep=None):
        self.name, self.fn, self.n, self.build, self.work = name, fn, n, build, work
        self.keep = keep  # the row store that the addresses point into

    def __repr__(self):
        return self.name

    def reference(self):
        args, outs = self.build()
        self.fn(*args, 0, self.n)
        return outs


def _rows(rng, dtype, n_rows=N):
    """A row store ``[n_rows, WIDTH]`` of ``dtype``."""
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal((n_rows, WIDTH)).astype(dtype)
    return rng.integers(-100, 100, (n_rows, WIDTH)).astype(dtype)


def _addresses(store, order):
    """Data address of ``store[order[i]]`` (0 where ``order[i] < 0``)."""
    row_bytes = store.shape[1] * store.itemsize
    return np.where(order >= 0, store.ctypes.data + order * row_bytes, 0).astype(np.int64)


def lookup_case(tagged):
    rng = np.random.default_rng(1)
    keys = rng.integers(-(2**62), 2**62, 2 * N, dtype=np.int64)
    key_tags = rng.integers(0, 3, 2 * N, dtype=np.int64) if tagged else np.zeros(0, np.int64)
    table = new_table(1 << 16, torch.device("cpu")).numpy()
    rows = np.full(N, -1, np.int64)  # insert the first N keys (the map stays below half full)
    _numba.map_insert_missing(table, keys[:N], key_tags[:N], rows, np.zeros(0, np.int64), 0, 0)
    pick = rng.integers(0, 2 * N, N)  # half present, half absent
    ids = keys[pick].copy()
    tags = key_tags[pick].copy() if tagged else key_tags

    def build():
        out = np.empty(N, np.int64)
        return (table, ids, tags, out), [out]

    return Case(f"map_lookup_range(tags={tagged})", _numba.map_lookup_range, N, build)


def gather_case(dtype):
    rng = np.random.default_rng(2)
    store = _rows(rng, dtype)
    order = rng.permutation(N)
    order[::5] = -1  # absent rows give zeros
    addresses = _addresses(store, order)

    def build():
        out = np.full((N, WIDTH), 7, dtype)
        return (addresses, out), [out]

    return Case(f"gather_range({np.dtype(dtype).name})", _numba.gather_range, N, build,
                keep=store)


def _bags(rng, n_bags):
    lengths = rng.integers(0, 6, n_bags)  # empty bags included
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets


def bag_reduce_case(dtype, weighted, mean):
    rng = np.random.default_rng(3)
    n_unique = 5000
    store = _rows(rng, dtype, n_unique)
    order = rng.permutation(n_unique)
    order[::11] = -1
    addresses = _addresses(store, order)
    offsets = _bags(rng, N)
    inverse = rng.integers(0, n_unique, offsets[-1]).astype(np.int64)
    weights = (rng.random(offsets[-1]) + 0.1).astype(dtype) if weighted else np.zeros(0, dtype)

    def build():
        out = np.full((N, WIDTH), 3, dtype)
        return (addresses, inverse, offsets, weights, mean, out), [out]

    name = f"bag_reduce_range({np.dtype(dtype).name}, weighted={weighted}, mean={mean})"
    return Case(name, _numba.bag_reduce_range, N, build, work=int(offsets[-1]), keep=store)


def bag_backward_case(dtype, weighted, mean):
    rng = np.random.default_rng(4)
    n_bags = 4096
    offsets = _bags(rng, n_bags)
    inverse = rng.integers(0, N, offsets[-1]).astype(np.int64)
    weights = (rng.random(offsets[-1]) + 0.1).astype(dtype) if weighted else np.zeros(0, dtype)
    plan = _numba.bag_backward_plan(inverse, offsets, weights, mean, N)
    grad_out = rng.standard_normal((n_bags, WIDTH)).astype(dtype)

    def build():
        grad = np.full((N, WIDTH), 5, dtype)
        return (*plan, grad_out, grad), [grad]

    name = f"bag_backward_range({np.dtype(dtype).name}, weighted={weighted}, mean={mean})"
    return Case(name, _numba.bag_backward_range, N, build, work=int(offsets[-1]))


def _update_case(name, fn, dtype, n_slots, scalars):
    """An optimizer kernel over N unique rows of ``n_slots`` row stores (embedding first)."""
    rng = np.random.default_rng(5)
    stores = [_rows(rng, dtype) for _ in range(n_slots)]
    stores[1:] = [np.abs(s) for s in stores[1:]]  # sums of squares must be >= 0
    order = rng.permutation(N)
    grads = rng.standard_normal((N, WIDTH)).astype(dtype)

    def build():
        copies = [s.copy() for s in stores]
        return (*[_addresses(c, order) for c in copies], grads, *scalars), copies

    return Case(f"{name}({np.dtype(dtype).name})", fn, N, build)


def update_cases(dtype):
    return [
        _update_case("adam_update_range", _numba.adam_update_range, dtype, 3,
                     (0.99, 0.9, 0.1, 0.999, 0.001, 1e-3, 1e-8, 0.01)),
        _update_case("adagrad_update_range", _numba.adagrad_update_range, dtype, 2,
                     (0.05, 1e-10, 0.001)),
        _update_case("sgd_update_range", _numba.sgd_update_range, dtype, 2,
                     (0.1, 0.0, 0.0, False)),
        _update_case("sgd_update_range(momentum)", _numba.sgd_update_range, dtype, 2,
                     (0.1, 0.9, 0.01, True)),
    ]


CASES = [
    lookup_case(False),
    lookup_case(True),
    *[gather_case(t) for t in (np.float32, np.float64, np.int64, np.int32, np.int8)],
    *[bag_reduce_case(t, w, m) for t in FLOATS for w in (False, True) for m in (False, True)],
    *[bag_backward_case(t, w, m) for t in FLOATS for w in (False, True) for m in (False, True)],
    *[c for t in FLOATS for c in update_cases(t)],
]


def assert_same(got, expected):
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)  # bitwise: each range is one thread's work


def test_every_parallel_kernel_is_covered():
    assert {c.fn for c in CASES} == set(_omp._SPECS)


@needs_omp
@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_omp_path_matches_single_thread(case, threads):
    expected = case.reference()
    args, outs = case.build()
    before = _omp.calls
    assert _omp.run(case.fn, case.n, args, threads)
    assert _omp.calls == before + 1
    assert_same(outs, expected)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_in_ranges_matches_single_thread(case):
    """Through the dispatcher, with torch's thread count (OpenMP path where available)."""
    expected = case.reference()
    args, outs = case.build()
    before = _omp.calls
    kernels.run_ranges(case.fn, case.n, *args, work=case.work)
    if OMP and kernels._threads() > 1:
        assert _omp.calls == before + 1, "the call should have run on OpenMP threads"
    assert_same(outs, expected)


def test_several_python_threads_at_once():
    """Each calling thread is the master of its own OpenMP team; results stay exact."""
    cases = [CASES[0], CASES[1], CASES[2], CASES[8], CASES[16], CASES[24], CASES[26]]
    expected = [c.reference() for c in cases]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(k):
        try:
            start.wait()
            for r in range(6):
                i = (k + r) % len(cases)
                args, outs = cases[i].build()
                kernels.run_ranges(cases[i].fn, cases[i].n, *args, work=cases[i].work)
                assert_same(outs, expected[i])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "kernel threads hung"
    assert not errors, errors[0]


def test_pool_fallback_selected_by_environment(monkeypatch):
    monkeypatch.setenv(_omp.ENV, "pool")
    assert not _omp.enabled()
    assert "pool" in _omp.status()
    for case in (CASES[0], CASES[3], CASES[10], CASES[-1]):
        expected = case.reference()
        args, outs = case.build()
        before = _omp.calls
        kernels.run_ranges(case.fn, case.n, *args, work=case.work)
        assert _omp.calls == before
        assert_same(outs, expected)
    monkeypatch.setenv(_omp.ENV, "bogus")
    with pytest.raises(ValueError, match=_omp.ENV):
        _omp.enabled()


def test_pool_fallback_without_libgomp(monkeypatch):
    """What a torch without libgomp gets (e.g. another OpenMP runtime, or a native pool)."""
    monkeypatch.setattr(_omp, "_gomp_parallel", None)
    assert not _omp.enabled()
    case = CASES[20]
    expected = case.reference()
    args, outs = case.build()
    assert not _omp.run(case.fn, case.n, args, 2)
    kernels.run_ranges(case.fn, case.n, *args, work=case.work)
    assert_same(outs, expected)


def test_finds_torchs_libgomp_only_for_an_openmp_torch(monkeypatch):
    info = torch.__config__.parallel_info()
    fn, where = _omp.find_gomp_parallel()
    if "ATen parallel backend: OpenMP" in info and fn is not None:
        assert "gomp" in os.path.basename(where)
    monkeypatch.setattr(torch.__config__, "parallel_info",
                        lambda: info.replace("OpenMP", "native thread pool"))
    fn, why = _omp.find_gomp_parallel()
    assert fn is None and "not OpenMP" in why


def test_unsupported_layout_falls_back():
    """A non-contiguous output is not something the trampolines decode: the pool runs it."""
    case = gather_case(np.float32)
    expected = case.reference()
    (addresses, _), _ = case.build()
    wide = np.zeros((N, 2 * WIDTH), np.float32)
    out = wide[:, ::2]
    assert not _omp.run(case.fn, case.n, (addresses, out), 2)
    kernels.run_ranges(case.fn, case.n, addresses, out)
    np.testing.assert_array_equal(out, expected[0])
    assert not _omp.run(case.fn, case.n, (addresses, np.zeros((N, WIDTH), np.float16)), 2)


def test_one_thread_runs_inline(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    case = CASES[4]
    expected = case.reference()
    args, outs = case.build()
    before = _omp.calls
    kernels.run_ranges(case.fn, case.n, *args, work=case.work)
    assert _omp.calls == before
    assert_same(outs, expected)


_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_kernel_threads import CASES, assert_same
    from recis._core.backends import numba_backend as kernels
    from recis._core.backends import omp as _omp

    torch.set_num_threads(2)
    x = torch.randn(2000, 2000)
    (x @ x).sum()  # torch's OpenMP pool is started in the parent
    cases = [CASES[0], CASES[4], CASES[12], CASES[20], CASES[24]]
    expected = [c.reference() for c in cases]
    for c in cases:  # and our kernels ran on it
        args, outs = c.build()
        kernels.run_ranges(c.fn, c.n, *args, work=c.work)
    assert _omp.calls >= len(cases) or not {omp!r}, _omp.calls

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert "forked" in _omp.status() or not {omp!r}, _omp.status()
            before = _omp.calls
            for c, e in zip(cases, expected):
                args, outs = c.build()
                kernels.run_ranges(c.fn, c.n, *args, work=c.work)
                assert_same(outs, e)
            assert _omp.calls == before
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(os.waitstatus_to_exitcode(status))
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    sys.exit("forked child hung")
    """
)


def _run_script(code: str, timeout: int = 240) -> None:
    import recis

    env = dict(os.environ)  # the child imports this very copy of recis
    root = os.path.dirname(os.path.dirname(os.path.abspath(recis.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"script hung for {timeout}s: {e.stdout}{e.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_forked_child_falls_back_and_does_not_hang():
    tests = os.path.dirname(os.path.abspath(__file__))
    _run_script(_FORK_SCRIPT.format(tests=tests, omp=OMP))


_DATALOADER_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, Dataset
    from recis.nn import DynamicEmbedding, EmbeddingOption

    torch.set_num_threads(2)
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=8, shared_name="t"))
    ids = torch.arange(20000, dtype=torch.int64).view(2000, 10)
    with torch.no_grad():
        expected = emb(ids)  # the parent ran kernels on OpenMP threads

    class Lookups(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            with torch.no_grad():
                return emb(ids)

    loader = DataLoader(Lookups(), batch_size=None, num_workers=2,
                        multiprocessing_context="fork", timeout=60)
    for out in loader:
        assert torch.equal(out, expected)
    """
)


def test_dataloader_fork_workers_do_not_hang():
    _run_script(_DATALOADER_SCRIPT)


def test_training_steps_identical_on_both_paths(monkeypatch):
    """End to end: forward, backward and SparseAdamW steps give bitwise equal tables."""
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.nn.modules.hashtable import filter_out_sparse_param
    from recis.optim import SparseAdamW

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 30000, (1024, 20), generator=gen) for _ in range(3)]
    upstream = torch.randn(1024, 16, generator=gen)

    def train(mode):
        monkeypatch.setenv(_omp.ENV, mode)
        torch.manual_seed(0)
        emb = DynamicEmbedding(EmbeddingOption(embedding_dim=16, shared_name=f"e_{mode}"))
        opt = SparseAdamW(filter_out_sparse_param(emb), lr=0.01)
        before = _omp.calls
        for ids in batches:
            opt.zero_grad()
            (emb(ids) * upstream).sum().backward()
            opt.step()
        with torch.no_grad():
            return emb(batches[0]), _omp.calls - before

    pool_out, pool_calls = train("pool")
    omp_out, omp_calls = train("omp")
    assert pool_calls == 0
    if OMP and kernels._threads() > 1:
        assert omp_calls > 0
    assert torch.equal(pool_out, omp_out)
