import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.data

from recis.datasets import SyntheticClickStream
from recis.metrics import AUROC
from recis.ragged import RaggedTensor


def same_batch(a, b):
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, RaggedTensor):
            if not (
                torch.equal(x.values(), y.values()) and torch.equal(x.offsets()[0], y.offsets()[0])
            ):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def ids_of(batch, field):
    value = batch[field]
    return value.values() if isinstance(value, RaggedTensor) else value.reshape(-1)


def test_layout_and_dtypes():
    stream = SyntheticClickStream(
        num_batches=2,
        batch_size=512,
        num_sparse=5,
        num_dense=3,
        multi_hot=["c2", "c5"],
        vocab_per_field=1000,
    )
    batches = list(stream)
    assert len(batches) == 2
    batch = batches[0]
    assert list(batch) == ["label", "dense", "c1", "c2", "c3", "c4", "c5"]
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (512,)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    assert batch["dense"].dtype == torch.float32 and batch["dense"].shape == (512, 3)
    for name in ("c1", "c3", "c4"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (512, 1)
    for name in ("c2", "c5"):
        rt = batch[name]
        assert isinstance(rt, RaggedTensor) and rt.dtype == torch.int64
        lengths = rt.lengths()
        assert lengths.numel() == 512 and int(lengths.max()) <= 8
        assert int((lengths == 0).sum()) > 0  # empty bags occur
        assert rt.offsets()[0].dtype == torch.int64
    for name in stream.fields:
        ids = ids_of(batch, name)
        assert int(ids.min()) >= 0 and int(ids.max()) < 2**40
    # Defaults: 8 fields, the last one multi-hot, 4 dense features.
    default = SyntheticClickStream(batch_size=16).batch(0)
    assert isinstance(default["c8"], RaggedTensor) and default["c7"].shape == (16, 1)
    assert default["dense"].shape == (16, 4)
    no_dense = SyntheticClickStream(batch_size=8, num_dense=0, multi_hot=0).batch(0)
    assert no_dense["dense"].shape == (8, 0)


def test_determinism_by_seed():
    kwargs = dict(num_batches=3, batch_size=256, vocab_per_field=5000)
    first = list(SyntheticClickStream(seed=1, **kwargs))
    again = list(SyntheticClickStream(seed=1, **kwargs))
    other = list(SyntheticClickStream(seed=2, **kwargs))
    assert all(same_batch(a, b) for a, b in zip(first, again, strict=True))
    assert not any(same_batch(a, b) for a, b in zip(first, other, strict=True))
    assert not set(ids_of(first[0], "c1").tolist()) & set(ids_of(other[0], "c1").tolist())
    # Iterating again replays the stream; batches differ from each other.
    stream = SyntheticClickStream(seed=1, **kwargs)
    assert same_batch(next(iter(stream)), next(iter(stream)))
    assert not same_batch(first[0], first[1])


def test_fields_differ_and_popularity_is_skewed():
    batch = SyntheticClickStream(batch_size=4096, num_sparse=2, multi_hot=0).batch(0)
    c1, c2 = ids_of(batch, "c1"), ids_of(batch, "c2")
    assert not set(c1.tolist()) & set(c2.tolist())
    _, counts = torch.unique(c1, return_counts=True)
    top = torch.sort(counts, descending=True).values
    assert int(top[0]) > 100  # the head item is frequent
    assert int((counts == 1).sum()) > 200  # and there is a long tail


def test_click_rate():
    for base_ctr in (0.05, 0.1, 0.2):
        stream = SyntheticClickStream(num_batches=4, batch_size=4096, base_ctr=base_ctr)
        ctr = float(torch.cat([b["label"] for b in stream]).mean())
        assert abs(ctr - base_ctr) < 0.25 * base_ctr


def test_drift_replaces_ids():
    stream = SyntheticClickStream(drift=0.3)
    slots = np.arange(20_000)
    before, after = stream.ids_at("c1", slots, 0), stream.ids_at("c1", slots, 1000)
    changed = float((before != after).float().mean())
    assert changed == pytest.approx(0.3, abs=0.02)
    still = SyntheticClickStream(drift=0.0)
    assert torch.equal(still.ids_at("c1", slots, 0), still.ids_at("c1", slots, 10**6))


def test_new_ids_arrive_in_later_batches():
    def new_fraction(drift):
        kwargs = dict(batch_size=2048, num_sparse=1, multi_hot=0, vocab_per_field=2000, drift=drift)
        early = SyntheticClickStream(num_batches=5, **kwargs)
        late = SyntheticClickStream(num_batches=5, start_batch=5000, **kwargs)
        seen = set(torch.cat([ids_of(b, "c1") for b in early]).tolist())
        later = torch.cat([ids_of(b, "c1") for b in late]).tolist()
        return sum(i not in seen for i in later) / len(later)

    # drift 0.1 per 1000 batches over 5000 batches: about half the items are replaced.
    baseline, drifting = new_fraction(0.0), new_fraction(0.1)
    assert baseline < 0.1  # only unseen tail items
    assert 0.35 < drifting - baseline < 0.65


def test_sharding_is_disjoint_and_complete(monkeypatch):
    kwargs = dict(num_batches=7, batch_size=64, vocab_per_field=1000)
    full = SyntheticClickStream(**kwargs, rank=0, world_size=1)
    reference = [full.batch(i) for i in range(7)]
    got = []
    for rank in range(2):
        shard = list(SyntheticClickStream(**kwargs, rank=rank, world_size=2))
        assert len(shard) == (4 if rank == 0 else 3)
        got.append(shard)
    for rank, shard in enumerate(got):
        for j, batch in enumerate(shard):
            assert same_batch(batch, reference[rank + 2 * j])

    class Info:
        num_workers = 2
        id = 1

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Info())
    worker = list(SyntheticClickStream(**kwargs, rank=1, world_size=2))
    assert [same_batch(b, reference[i]) for b, i in zip(worker, [3], strict=True)] == [True]


def test_held_out_is_disjoint_and_at_the_same_time_point():
    train = SyntheticClickStream(num_batches=50, batch_size=128, drift=50.0, vocab_per_field=500)
    test = train.held_out(3)
    assert test.time == 49 and test.num_batches == 3 and test.batch_size == 128
    train_batches = [train.batch(i) for i in range(50)]
    test_batches = list(test)
    assert len(test_batches) == 3
    assert not any(same_batch(a, b) for a in test_batches for b in train_batches)
    # Evaluation items are those active at batch 49.
    vocab_49 = set(train.ids_at("c1", np.arange(500), 49).tolist())
    vocab_0 = set(train.ids_at("c1", np.arange(500), 0).tolist())
    eval_ids = set(torch.cat([ids_of(b, "c1") for b in test_batches]).tolist())
    assert eval_ids <= vocab_49 and not eval_ids <= vocab_0
    assert same_batch(test.batch(0), train.held_out(3).batch(0))
    bigger = train.held_out(1, at_batch=0, batch_size=32).batch(0)
    assert bigger["label"].shape == (32,)
    assert set(ids_of(bigger, "c1").tolist()) <= vocab_0


@pytest.fixture
def one_thread():
    # A tiny model: extra intra-op threads only add overhead (and stall on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_labels_are_learnable(one_thread):
    torch.manual_seed(0)
    train = SyntheticClickStream(num_batches=150, batch_size=256, vocab_per_field=10_000, seed=3)
    test = train.held_out(4, batch_size=2048)
    buckets = 2**18
    bag = torch.nn.EmbeddingBag(buckets, 1, mode="sum", sparse=True)
    torch.nn.init.zeros_(bag.weight)
    linear = torch.nn.Linear(train.num_dense, 1)
    opt = torch.optim.Adagrad([*bag.parameters(), *linear.parameters()], lr=0.1)

    def logits(batch):
        # One bag per (field, row): all fields in one EmbeddingBag call, then summed per row.
        ids, offsets, start = [], [], 0
        for f, name in enumerate(train.fields):
            value = batch[name]
            if isinstance(value, RaggedTensor):
                vals, offs = value.values(), value.offsets()[0][:-1]
            else:
                vals, offs = value[:, 0], torch.arange(value.shape[0])
            ids.append((vals * 31 + f) % buckets)
            offsets.append(offs + start)
            start += vals.numel()
        per_field = bag(torch.cat(ids), torch.cat(offsets)).reshape(len(train.fields), -1)
        return linear(batch["dense"])[:, 0] + per_field.sum(0)

    for batch in train:
        loss = F.binary_cross_entropy_with_logits(logits(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    metric = AUROC()
    with torch.no_grad():
        for batch in test:
            metric.update(torch.sigmoid(logits(batch)), batch["label"])
    assert float(metric.compute()) > 0.6  # about 0.71


def test_validation():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        SyntheticClickStream(batch_size=0)
    with pytest.raises(TypeError, match="num_sparse must be an int"):
        SyntheticClickStream(num_sparse=2.0)
    with pytest.raises(ValueError, match="zipf_a must be > 0"):
        SyntheticClickStream(zipf_a=0)
    with pytest.raises(ValueError, match=r"base_ctr must be in \(0, 1\)"):
        SyntheticClickStream(base_ctr=1.0)
    with pytest.raises(ValueError, match="drift must be finite"):
        SyntheticClickStream(drift=-1)
    with pytest.raises(ValueError, match="multi_hot names unknown fields"):
        SyntheticClickStream(num_sparse=2, multi_hot=["c3"])
    with pytest.raises(ValueError, match="multi_hot must be <= num_sparse"):
        SyntheticClickStream(num_sparse=2, multi_hot=3)
    with pytest.raises(ValueError, match="id_space must be <= 2\\*\\*63"):
        SyntheticClickStream(id_space=2**64)
    with pytest.raises(ValueError, match="index must be < num_batches"):
        SyntheticClickStream(num_batches=2, batch_size=4).batch(2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        SyntheticClickStream(rank=2, world_size=2)
