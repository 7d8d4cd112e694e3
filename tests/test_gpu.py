"""The CUDA path against the CPU path: the same model, policies and checkpoints on a GPU give
the CPU's tables (the torch backend on CUDA, numba on CPU). Skipped without CUDA; run on a GPU
machine with ``python -m pytest -m gpu``.

``RECIS_GPU_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for the GPU and the
torch backend (the CUDA path's kernels) on the "GPU" side: it checks the tests themselves on a
machine without CUDA."""

import contextlib
import os
import random

import pytest
import torch
from test_distributed import _assert_same, _train

from recis._core.backends import use_backend
from recis.nn import EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.initializers import NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdam
from recis.serialize import Loader, Saver

GPU = os.environ.get("RECIS_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(),
                                 reason="needs CUDA")]


def _on(device: str):
    """Build tables for ``device``: the "gpu" side uses the torch backend."""
    return use_backend("torch") if device == "gpu" else contextlib.nullcontext()


def _dev(device: str) -> str:
    return GPU if device == "gpu" else "cpu"


def _by_id(table: HashTable, slot: str = "embedding") -> dict[int, torch.Tensor]:
    ids, rows = table.ids_map()
    values = table.slot_values(slot, rows).cpu()
    return dict(zip(ids.cpu().tolist(), values, strict=True))


def _assert_tables_close(a: HashTable, b: HashTable, slots=("embedding",), atol=1e-5):
    for slot in slots:
        left, right = _by_id(a, slot), _by_id(b, slot)
        assert left.keys() == right.keys(), slot
        for i in left:
            torch.testing.assert_close(left[i], right[i], atol=atol, rtol=1e-5,
                                       msg=f"{slot} of ID {i}")


@pytest.mark.skipif(GPU != "cuda", reason="the scenario's processes pick the device themselves")
def test_one_process_on_a_gpu_trains_as_on_the_cpu(tmp_path):
    """The distributed tests' model (two features, GlobalStepFilter, MinCount, AdamW, dense
    layers) for the same steps on cuda and on cpu."""
    cpu_tables, cpu_dense = _train(tmp_path, 1, "cpu")
    gpu_tables, gpu_dense = _train(tmp_path, 1, "gpu", device="cuda")
    _assert_same(cpu_tables, gpu_tables, atol=1e-4, rtol=1e-3)
    _assert_same(cpu_dense, gpu_dense, atol=1e-4, rtol=1e-3)


def _engine(device: str) -> EmbeddingEngine:
    init = NormalInitializer(std=0.1, generator=torch.Generator().manual_seed(3))
    with _on(device):
        return EmbeddingEngine({
            "user": EmbeddingOption(embedding_dim=8, shared_name="user", initializer=init,
                                    device=_dev(device)),
            "item": EmbeddingOption(embedding_dim=8, shared_name="item", combiner="mean",
                                    initializer=init, device=_dev(device),
                                    filter_hook=FilterHook("LFU", {"max_rows": 60})),
        })


def test_an_engine_with_sparse_adam_on_cuda_equals_the_cpu():
    engines = {d: _engine(d) for d in ("cpu", "gpu")}
    opts = {d: SparseAdam(filter_out_sparse_param(e), lr=0.05) for d, e in engines.items()}
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        users = torch.randint(0, 200, (32, 3), generator=gen)
        items = torch.randint(0, 100, (32, 2), generator=gen)
        target = torch.randn(32, 8, generator=gen)
        for device, engine in engines.items():
            d = _dev(device)
            out = engine({"user": users.to(d), "item": items.to(d)})
            loss = ((out["user"] * out["item"]).sum(1) - target.to(d).sum(1)).pow(2).mean()
            opts[device].zero_grad()
            loss.backward()
            opts[device].step()
        if step % 4 == 3:
            for engine in engines.values():
                engine.hashtable("item")._filter_hook_impl.do_filter()
    for feature in ("user", "item"):
        cpu, gpu = (engines[d].hashtable(feature) for d in ("cpu", "gpu"))
        assert gpu.device.type == GPU
        _assert_tables_close(cpu, gpu, slots=("embedding", "sparse_adam_exp_avg",
                                              "sparse_adam_exp_avg_sq"))


def test_lifecycle_policies_on_cuda_remove_what_they_remove_on_the_cpu():
    hooks = [FilterHook("LRU", {"max_rows": 80, "cap_on_insert": True}),
             FilterHook("MemoryBudget", {"budget": 60 * 200, "decay": 0.9})]
    tables = {}
    for d in ("cpu", "gpu"):
        with _on(d):
            tables[d] = HashTable([4], name="t", device=_dev(d), filter_hook=hooks)
    admit = AdmitHook("MinCount", {"min_count": 2, "width": 1 << 10})
    rng = random.Random(1)
    for step in range(50):
        batch = torch.tensor([rng.randrange(400) for _ in range(rng.randrange(1, 40))])
        for device, table in tables.items():
            table(batch.to(_dev(device)), admit)
            table._filter_hook_impl.update_step()
            if step % 5 == 4:
                table._filter_hook_impl.do_filter()
        assert set(tables["cpu"].ids().tolist()) == set(tables["gpu"].ids().cpu().tolist())
    assert tables["gpu"].stats()["evicted"] == tables["cpu"].stats()["evicted"]
    assert sum(tables["gpu"].stats()["evicted"].values()) > 0


def test_a_cuda_table_checkpoint_loads_on_cpu_and_on_cuda(tmp_path):
    with _on("gpu"):
        source = HashTable([6], name="t", device=GPU, initializer=NormalInitializer(
            generator=torch.Generator().manual_seed(0)))
    opt = SparseAdam({"t": source}, lr=0.1)
    source(torch.randint(-(2**62), 2**62, (500,)).to(GPU)).sum().backward()
    opt.step()
    Saver(path=str(tmp_path / "c"), hashtables={"t": source}).save()
    for device in ("cpu", "gpu"):
        with _on(device):
            target = HashTable([6], name="t", device=_dev(device))
        SparseAdam({"t": target}, lr=0.1)
        Loader(str(tmp_path / "c"), {"t": target}).load()
        assert target.device.type == _dev(device)
        _assert_tables_close(source, target, slots=("embedding", "sparse_adam_exp_avg"),
                             atol=0)
