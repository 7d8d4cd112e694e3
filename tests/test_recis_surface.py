"""RecIS's wider public surface (issue #12): the module paths its code imports, the dense
AdamWTF, and slot groups."""

import importlib
import math

import pytest
import torch

from recis.nn import DynamicEmbedding, EmbeddingOption, HashTable
from recis.nn.initializers import NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param


@pytest.mark.parametrize("module, name, home", [
    ("recis.optim.sparse_adamw", "SparseAdamW", "recis.optim"),
    ("recis.optim.sparse_adam", "SparseAdam", "recis.optim"),
    ("recis.optim.sparse_adamw_tf", "SparseAdamWTF", "recis.optim"),
    ("recis.optim.sparse_adagrad", "SparseAdagrad", "recis.optim"),
    ("recis.optim.adamw_tf", "AdamWTF", "recis.optim"),
    ("recis.serialize.saver", "Saver", "recis.serialize"),
    ("recis.serialize.loader", "Loader", "recis.serialize"),
])
def test_recis_module_paths_give_the_same_classes(module, name, home):
    assert getattr(importlib.import_module(module), name) is \
        getattr(importlib.import_module(home), name)


def _adamw_tf_reference(w, grads, lr, b1, b2, eps, wd):
    """AdamWTF written out step by step in float64."""
    w = w.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        w *= 1 - wd
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        w -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return w


def test_adamw_tf_follows_its_formula():
    from recis.optim import AdamWTF

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 3, generator=gen)
    grads = [torch.randn(5, 3, generator=gen) for _ in range(6)]
    p = torch.nn.Parameter(w0.clone())
    opt = AdamWTF([p], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _adamw_tf_reference(w0, grads, 0.05, 0.8, 0.99, 1e-6, 0.01)
    torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


def test_adamw_tf_equals_sparse_adamw_tf_when_every_row_is_touched():
    from recis.optim import AdamWTF, SparseAdamWTF

    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=4, shared_name="t", initializer=(
        NormalInitializer(generator=torch.Generator().manual_seed(1)))))
    universe = torch.arange(6)
    emb.hashtable(universe)
    ids, rows = emb.hashtable.ids_map()
    dense = torch.nn.Parameter(emb.hashtable.slot_values("embedding", rows).clone())
    sparse_opt = SparseAdamWTF(filter_out_sparse_param(emb), lr=0.1, weight_decay=0.02)
    dense_opt = AdamWTF([dense], lr=0.1, weight_decay=0.02)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        upstream = torch.randn(6, 4, generator=gen)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        (emb(ids.view(-1, 1)) * upstream).sum().backward()
        (dense * upstream).sum().backward()
        sparse_opt.step()
        dense_opt.step()
    torch.testing.assert_close(emb.hashtable.slot_values("embedding", rows), dense.detach(),
                               rtol=0, atol=1e-6)


def test_adamw_tf_drives_an_lr_scheduler_and_rejects_bad_arguments():
    from recis.optim import AdamWTF

    p = torch.nn.Parameter(torch.ones(2))
    opt = AdamWTF([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(2)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    for kwargs, message in [({"lr": -1}, "lr must be"), ({"eps": -1.0}, "eps must be"),
                            ({"betas": (1.0, 0.9)}, "betas must be"),
                            ({"weight_decay": 1.5}, "weight_decay must be"),
                            ({"use_nesterov": True}, "use_nesterov")]:
        with pytest.raises(ValueError, match=message):
            AdamWTF([p], **kwargs)
    sparse = torch.nn.Embedding(3, 2, sparse=True)
    sparse(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        AdamWTF(sparse.parameters()).step()


def test_slot_group_exposes_the_slots_as_recis_does():
    from recis.optim import SparseAdam

    ht = HashTable([2, 3], block_size=4)
    SparseAdam({"t": ht}, lr=0.1)
    ht(torch.tensor([10, 20, 30, 40, 50]))
    group = ht.slot_group()
    names = [s.name() for s in group.slots()]
    assert names == ["embedding", "sparse_adam_exp_avg", "sparse_adam_exp_avg_sq"]
    emb = group.slot_by_name("embedding")
    assert emb.block_size() == 4 and emb.flat_size() == 6
    assert group.slot_by_index(1).name() == "sparse_adam_exp_avg"
    assert group.slot_by_index(-1).name() == "sparse_adam_exp_avg_sq"
    blocks = emb.values()
    assert len(blocks) * 4 == ht.store.capacity and blocks[0].shape == (4, 2, 3)
    value = emb.value()
    assert torch.equal(value, torch.cat(blocks))
    ids, rows = ht.ids_map()
    assert torch.equal(value[rows], ht.slot_values("embedding", rows))
    blocks[int(rows[0]) // 4][int(rows[0]) % 4] = 7.0  # the blocks are the table's storage
    assert torch.equal(ht.slot_values("embedding", rows[:1]), torch.full((1, 2, 3), 7.0))
    with pytest.raises(KeyError, match="no slot 'nope'"):
        group.slot_by_name("nope")
    with pytest.raises(IndexError, match=r"slot index must be an int in \[0, 3\)"):
        group.slot_by_index(3)
    empty = HashTable([5]).slot_group().slot_by_name("embedding").value()
    assert empty.shape == (0, 5)


def test_a_saver_publishes_into_an_existing_empty_directory(tmp_path):
    """RecIS's tests create the checkpoint directory before saving: an empty directory is
    replaced by the complete checkpoint; anything else is still never overwritten."""
    from recis.serialize import CheckpointError, Loader, Saver

    source = HashTable([3], name="t")
    source.insert(torch.tensor([5, -9, 2**40]), torch.randn(3, 3))
    target_dir = tmp_path / "ckpt"
    target_dir.mkdir()
    Saver(path=str(target_dir), hashtables={"t": source}).save()
    assert (target_dir / "index.json").is_file()
    loaded = HashTable([3], name="t")
    Loader(str(target_dir), {"t": loaded}).load()
    assert sorted(loaded.ids().tolist()) == sorted(source.ids().tolist())
    with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
        Saver(path=str(target_dir), hashtables={"t": source}).save()  # now it holds files
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        Saver(path=str(tmp_path / "link"), hashtables={"t": source}).save()
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for k in (1, 0):
        Saver(shard_index=k, shard_num=2, path=str(sharded), hashtables={"t": source}).save()
    assert (sharded / "index.json").is_file()
    recis_layout = tmp_path / "recis_layout"
    recis_layout.mkdir()
    Saver(path=str(recis_layout), hashtables={"t": source}, format="recis").save()
    assert (recis_layout / "index").is_file() and (recis_layout / "tensorkey.json").is_file()
