"""The three recipes of docs/architecture.md run as written and add a working toy policy,
kernel backend and sparse optimizer."""

import pathlib
import re

import pytest
import torch

from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import DynamicEmbedding, EmbeddingOption, HashTable
from recis.nn.hashtable_hook import FilterHook
from recis.serialize import Loader, Saver

DOC = pathlib.Path(__file__).parent.parent / "docs" / "architecture.md"


def recipe(title: str) -> dict:
    """Run the Python block under the recipe heading ``title``; returns its namespace."""
    text = DOC.read_text()
    section = text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 15, f"recipe {title!r} has {len(lines)} lines, more than 15"
    namespace: dict = {}
    exec(compile(code, f"{DOC}:{title}", "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


@pytest.fixture(scope="module")
def recipes():
    return {"policy": recipe("Add an admission or eviction policy"),
            "backend": recipe("Add a kernel backend"),
            "optimizer": recipe("Add a sparse optimizer")}


def test_the_policy_recipe_evicts_rare_rows_and_saves_its_counts(recipes, tmp_path):
    def table():
        return HashTable([4], name="t", filter_hook=FilterHook("RareRows", {"min_hits": 3}))

    t = table()
    t(torch.tensor([1, 2, 3]))
    t(torch.tensor([1, 2, 1]))
    t(torch.tensor([1, 2]))
    hook = HashTableFilterHook(1, tables=[t])
    Saver(path=str(tmp_path / "c"), hashtables={"t": t}).save()
    hook.after_step(global_step=0)
    hook.after_step(global_step=1)  # a filter run
    assert sorted(t.ids().tolist()) == [1, 2]
    loaded = table()
    Loader(str(tmp_path / "c"), {"t": loaded}).load()  # the hit counts come back
    hits = loaded.store.read("hits", loaded.store.lookup(torch.tensor([1, 2, 3])))
    assert hits.view(-1).tolist() == [3, 3, 1]


def test_the_backend_recipe_serves_tables_created_under_it(recipes):
    from recis._core.backends import use_backend

    with use_backend("checked"):
        emb = DynamicEmbedding(EmbeddingOption(embedding_dim=4, shared_name="c"))
    table = emb.hashtable
    assert type(table.store.backend).__name__ == "CheckedBackend"
    table.insert(torch.tensor([5]), torch.tensor([[float("nan")] * 4]))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        table(torch.tensor([5]))
    out = emb(torch.tensor([[1, 2]]))  # the fused combiner runs on the new backend too
    assert out.shape == (1, 4)


def test_the_optimizer_recipe_matches_torch_rmsprop(recipes):
    rmsprop = recipes["optimizer"]["SparseRMSprop"]
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(10, 4, generator=gen)
    table = HashTable([4], name="t")
    table.insert(torch.arange(10), start.clone())
    opt = rmsprop({"t": table}, lr=0.05, alpha=0.9)
    dense = torch.nn.Parameter(start.clone())
    ref = torch.optim.RMSprop([dense], lr=0.05, alpha=0.9, eps=1e-8)
    for _ in range(5):
        # rows 0 and 1 in every batch: torch's dense RMSprop decays the state of untouched
        # rows, the sparse (lazy) one does not, so only always-touched rows share a history
        ids = torch.cat([torch.tensor([0, 1, 1]), torch.randint(2, 10, (3,), generator=gen)])
        weight = torch.randn(6, 4, generator=gen)
        opt.zero_grad()
        (table(ids) * weight).sum().backward()
        opt.step()
        ref.zero_grad()
        (dense[ids] * weight).sum().backward()
        ref.step()
    rows = torch.tensor([0, 1])
    torch.testing.assert_close(table(rows), dense.detach()[rows])
    assert not torch.equal(table(rows), start[:2])
    with pytest.raises(ValueError, match="eps must be > 0"):
        rmsprop({"u": HashTable([4], name="u")}, eps=0.0)
