"""Sparse optimizers against torch.optim on a dense copy of the touched rows.

Tolerances: float32 tables, 1e-6 absolute for SGD/Adagrad/SparseAdam (same formulas as torch),
1e-5 relative for the hand-computed AdamW/AdamWTF references in float64.
"""

import math

import pytest
import torch
from torch import nn

from recis._core import backends
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import DynamicEmbedding, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.nn.initializers import ConstantInitializer, NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdam, SparseAdamW, SparseAdamWTF, SparseSGD

DIM = 4
UNIVERSE = torch.tensor([3, -7, 2**60, 11, 5])


@pytest.fixture(params=["numba", "torch"])
def backend(request):
    with backends.use_backend(request.param):
        yield request.param


def batches(steps, seed=0):
    """Bags over UNIVERSE with repeated IDs; every ID is used in every step (so torch's dense
    optimizers, which also move rows with a zero gradient, are comparable)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        perm = UNIVERSE[torch.randperm(5, generator=gen)]
        ids = torch.cat([perm, UNIVERSE[torch.randint(0, 5, (7,), generator=gen)]]).view(4, 3)
        out.append((ids, torch.randn(4, DIM, generator=gen)))
    return out


def make_pair(seed=0):
    emb = DynamicEmbedding(EmbeddingOption(
        embedding_dim=DIM, shared_name="t",
        initializer=NormalInitializer(generator=torch.Generator().manual_seed(seed))))
    emb.hashtable(UNIVERSE)  # admit the universe; rows in UNIVERSE order
    ids, rows = emb.hashtable.ids_map()
    index = {i: k for k, i in enumerate(ids.tolist())}
    dense = nn.EmbeddingBag.from_pretrained(emb.hashtable.embeddings().clone(), freeze=False,
                                            mode="sum")
    return emb, dense, index


def dense_ids(index, ids):
    return torch.tensor([[index[i] for i in row] for row in ids.tolist()])


def table_weights(emb, index):
    ids, _ = emb.hashtable.ids_map()
    got = emb.hashtable.embeddings()
    order = torch.tensor([ids.tolist().index(i) for i in sorted(index, key=index.get)])
    return got[order]


@pytest.mark.parametrize(
    "sparse_cls, kwargs, torch_cls, torch_kwargs",
    [
        (SparseSGD, {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
        (SparseSGD, {"lr": 0.1, "weight_decay": 0.05}, torch.optim.SGD,
         {"lr": 0.1, "weight_decay": 0.05}),
        (SparseSGD, {"lr": 0.1, "momentum": 0.9}, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (SparseSGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, torch.optim.SGD,
         {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (SparseAdagrad, {"lr": 0.1}, torch.optim.Adagrad, {"lr": 0.1}),
        (SparseAdagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                         "initial_accumulator_value": 0.1},
         torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01,
                               "initial_accumulator_value": 0.1}),
    ],
)
def test_matches_torch_dense_optimizer(backend, sparse_cls, kwargs, torch_cls, torch_kwargs):
    emb, dense, index = make_pair()
    sparse_opt = sparse_cls(filter_out_sparse_param(emb), **kwargs)
    dense_opt = torch_cls(dense.parameters(), **torch_kwargs)
    for ids, upstream in batches(5):
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        (emb(ids) * upstream).sum().backward()
        (dense(dense_ids(index, ids)) * upstream).sum().backward()
        sparse_opt.step()
        dense_opt.step()
        torch.testing.assert_close(table_weights(emb, index), dense.weight.detach(),
                                   rtol=0, atol=1e-6)


def test_sparse_adam_matches_torch_sparse_adam(backend):
    emb, _, index = make_pair()
    dense = nn.EmbeddingBag.from_pretrained(emb.hashtable.embeddings().clone(), freeze=False,
                                            mode="sum", sparse=True)
    sparse_opt = SparseAdam(filter_out_sparse_param(emb), lr=0.05)
    dense_opt = torch.optim.SparseAdam(dense.parameters(), lr=0.05)
    for ids, upstream in batches(6, seed=1):
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        (emb(ids) * upstream).sum().backward()
        (dense(dense_ids(index, ids)) * upstream).sum().backward()
        sparse_opt.step()
        dense_opt.step()
    torch.testing.assert_close(table_weights(emb, index), dense.weight.detach(), rtol=0,
                               atol=1e-6)


def adam_reference(e, grads, lr, b1, b2, eps, wd, tf):
    """Hand-written float64 RecIS formula over a list of per-step gradients of one row."""
    e, m, v = e.double().clone(), torch.zeros_like(e.double()), torch.zeros_like(e.double())
    for t, g in enumerate(grads, start=1):
        g = g.double()
        e = e * ((1 - wd) if tf else (1 - lr * wd))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        e = e - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return e


@pytest.mark.parametrize("cls, tf", [(SparseAdamW, False), (SparseAdamWTF, True)])
def test_adamw_variants_match_their_formula(backend, cls, tf):
    ht = HashTable([DIM], initializer=ConstantInitializer(0.5))
    opt = cls([ht], lr=0.01, weight_decay=0.1)
    ids = torch.tensor([1, 1, 2])
    grads = {1: [], 2: []}
    start = {1: torch.full((DIM,), 0.5), 2: torch.full((DIM,), 0.5)}
    for step in range(4):
        opt.zero_grad()
        upstream = torch.arange(3 * DIM, dtype=torch.float32).view(3, DIM) / 10 + step
        (ht(ids) * upstream).sum().backward()
        grads[1].append(upstream[0] + upstream[1])
        grads[2].append(upstream[2])
        opt.step()
    got = dict(zip(ht.ids().tolist(), ht.embeddings(), strict=True))
    for i in (1, 2):
        ref = adam_reference(start[i], grads[i], 0.01, 0.9, 0.999, 1e-8, 0.1, tf)
        torch.testing.assert_close(got[i].double(), ref, rtol=1e-5, atol=1e-7)


def test_bias_correction_counts_table_steps_not_row_steps():
    ht = HashTable([DIM])
    opt = SparseAdam([ht], lr=0.1)
    for step in range(3):
        opt.zero_grad()
        ids = torch.tensor([1]) if step < 2 else torch.tensor([1, 2])
        ht(ids).sum().backward()
        opt.step()
    assert opt.state["hashtable"]["step"] == 3
    # Row 2 first seen at table step 3: m = 0.1, v = 0.001, alpha = lr*sqrt(1-b2^3)/(1-b1^3)
    alpha = 0.1 * math.sqrt(1 - 0.999**3) / (1 - 0.9**3)
    expected = -alpha * 0.1 / (math.sqrt(0.001) + 1e-8)
    row2 = ht.embeddings()[ht.ids().tolist().index(2)]
    torch.testing.assert_close(row2, torch.full((DIM,), expected), rtol=1e-5, atol=0)


def test_gradient_accumulation_averages(backend):
    emb, dense, index = make_pair()
    sparse_opt = SparseSGD(filter_out_sparse_param(emb), lr=0.1)
    sparse_opt.set_grad_accum_steps(2)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    (ids_a, up_a), (ids_b, up_b) = batches(2, seed=3)
    before = table_weights(emb, index).clone()
    for ids, up in [(ids_a, up_a), (ids_b, up_b)]:
        sparse_opt.zero_grad()
        (emb(ids) * up).sum().backward()
        sparse_opt.step()
        if ids is ids_a:  # first micro-step: nothing moves yet
            assert torch.equal(table_weights(emb, index), before)
    loss = ((dense(dense_ids(index, ids_a)) * up_a).sum()
            + (dense(dense_ids(index, ids_b)) * up_b).sum()) / 2
    loss.backward()
    dense_opt.step()
    torch.testing.assert_close(table_weights(emb, index), dense.weight.detach(), rtol=0,
                               atol=1e-6)
    assert sparse_opt.state["t"]["step"] == 1


def test_eviction_resets_row_state_and_readmission_starts_fresh(backend):
    opt_cfg = EmbeddingOption(embedding_dim=DIM, shared_name="ev",
                              initializer=ConstantInitializer(1.0),
                              filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    emb = DynamicEmbedding(opt_cfg)
    opt = SparseAdagrad(filter_out_sparse_param(emb), lr=0.5)
    hook = HashTableFilterHook(filter_interval=1, tables=[emb])
    table = emb.hashtable
    for step, ids in enumerate([[1, 2], [1, 2], [1], [1]]):
        opt.zero_grad()
        emb(torch.tensor([ids])).sum().backward()
        opt.step()
        hook.after_step(None, step)
    assert table.ids().tolist() == [1]
    freed = torch.tensor([r for r in range(2) if r not in table.ids_map()[1].tolist()])
    assert torch.equal(table.slot_values(SparseAdagrad.slot, freed), torch.zeros(1, DIM))
    assert torch.equal(table.slot_values("embedding", freed), torch.zeros(1, DIM))  # no ID
    opt.zero_grad()
    emb(torch.tensor([[2]])).sum().backward()  # re-admitted: fresh row, zero accumulator
    opt.step()
    row = table.embeddings()[table.ids().tolist().index(2)]
    torch.testing.assert_close(row, torch.full((DIM,), 1.0 - 0.5 * 1 / (1 + 1e-10)))


def test_optimizer_created_after_rows_exist(backend):
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="late"))
    emb(torch.arange(30).view(10, 3))
    opt = SparseAdamW(filter_out_sparse_param(emb), lr=0.1)
    rows = emb.hashtable.ids_map()[1]
    assert torch.equal(emb.hashtable.slot_values(opt.exp_avg_slot, rows), torch.zeros(30, DIM))
    opt.zero_grad()
    emb(torch.arange(30).view(10, 3)).sum().backward()
    opt.step()
    assert (emb.hashtable.embeddings() != 0).all()


def test_lr_scheduler_drives_the_learning_rate():
    ht = HashTable([DIM])
    opt = SparseSGD([ht], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    moves = []
    for _ in range(3):
        before = ht(torch.tensor([1])).detach().clone() if len(ht) else torch.zeros(1, DIM)
        opt.zero_grad()
        ht(torch.tensor([1])).sum().backward()
        opt.step()
        sched.step()
        moves.append((before - ht.embeddings()).mean().item())
    assert moves == pytest.approx([1.0, 0.5, 0.25])


def test_state_dict_round_trip_keyed_by_table():
    a, b = HashTable([DIM], name="a"), HashTable([DIM], name="b")
    opt = SparseAdamW({"a": a, "b": b}, lr=0.1)
    for step in range(3):
        opt.zero_grad()
        ids = torch.tensor([1, 2])
        (a(ids).sum() + (b(ids).sum() if step < 1 else 0)).backward()
        opt.step()
    sd = opt.state_dict()
    assert sd["state"] == {"a": {"step": 3}, "b": {"step": 1}}
    fresh = SparseAdamW({"a": a, "b": b}, lr=0.5)
    fresh.load_state_dict(sd)
    assert fresh.state_dict() == sd and fresh.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match="tables"):
        SparseAdamW({"a": a}).load_state_dict(sd)


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda t: SparseAdamW([t], lr=-1), ValueError, "lr must be >= 0"),
        (lambda t: SparseAdamW([t], beta1=1.0), ValueError, r"beta1 must be in \[0.0, 1.0\)"),
        (lambda t: SparseAdamW([t], amsgrad=True), ValueError, "amsgrad"),
        (lambda t: SparseAdamWTF([t], use_nesterov=True), ValueError, "use_nesterov"),
        (lambda t: SparseSGD([t], nesterov=True), ValueError, "momentum > 0"),
        (lambda t: SparseSGD({"x": t, "y": t}), ValueError, "given twice"),
        (lambda t: SparseSGD({"x": torch.zeros(2)}), TypeError, "must be a HashTable"),
        (lambda t: SparseSGD(5), TypeError, "params must be"),
    ],
)
def test_validation(make, err, match):
    with pytest.raises(err, match=match):
        make(HashTable([DIM]))


def test_dense_parameters_are_not_touched():
    emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name="mix"))
    model = nn.ModuleDict({"emb": emb, "lin": nn.Linear(DIM, 1)})
    opt = SparseSGD(filter_out_sparse_param(model), lr=0.1)
    assert list(opt.tables) == ["mix"]
    w = model["lin"].weight.detach().clone()
    opt.zero_grad()
    model["lin"](emb(torch.tensor([[1, 2]]))).sum().backward()
    opt.step()
    assert torch.equal(model["lin"].weight, w)
