"""stats(): what a table holds and what happened to it, per table, per engine, in the Trainer's
history, metrics.json and TensorBoard; counters checked against hand-computed sequences."""

import json
import logging
import threading

import pytest
import torch

from recis.examples import deepfm
from recis.framework import Trainer, TrainingArguments
from recis.hooks.filter_hook import HashTableFilterHook
from recis.nn import EmbeddingEngine, EmbeddingOption
from recis.nn.hashtable_hook import AdmitHook, FilterHook
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param
from recis.optim import SparseSGD

COUNTERS = ("lookups", "ids_looked_up", "hits", "misses", "admitted", "rejected", "evicted",
            "removed")


def counters(ht):
    stats = ht.stats()
    return {k: stats[k] for k in COUNTERS}


def test_counters_follow_a_hand_computed_sequence():
    ht = HashTable([2], filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 1}))
    min_count = AdmitHook("MinCount", {"min_count": 2})
    ht(torch.tensor([1, 1, 2]), admit_hook=min_count)  # 1 seen twice: in; 2 once: out
    assert counters(ht) == {"lookups": 1, "ids_looked_up": 2, "hits": 0, "misses": 2,
                            "admitted": 1, "rejected": {"MinCount": 1}, "evicted": {},
                            "removed": 0}
    ht(torch.tensor([2, 3, 1]), admit_hook=min_count)  # 1 hit; 2 reaches 2: in; 3 out
    ht(torch.tensor([4, 1]), admit_hook=AdmitHook("ReadOnly"))  # 4 refused, 1 hit
    ht(torch.tensor([5, 5, 6]))  # no admission policy: both in
    ht.eval()
    ht(torch.tensor([7, 2, 7]))  # eval: 7 is refused as a read-only lookup, 2 hit
    ht.train()
    assert counters(ht) == {"lookups": 5, "ids_looked_up": 11, "hits": 3, "misses": 8,
                            "admitted": 4, "evicted": {}, "removed": 0,
                            "rejected": {"MinCount": 2, "ReadOnly": 1, "read_only": 1}}
    assert ht.stats()["live"] == 4
    ht.delete(torch.tensor([5, 99]))  # 99 is unknown: not counted
    hook = HashTableFilterHook(filter_interval=1, tables=[ht])
    hook.after_step(None, 0)
    hook.after_step(None, 1)  # everything is stale now
    ht.insert(torch.tensor([8]), torch.ones(1, 2))
    ht.clear()
    stats = ht.stats()
    assert stats["evicted"] == {"user": 1, "GlobalStepFilter": 3, "clear": 1}
    assert stats["removed"] == 5 and stats["admitted"] == 5 and stats["live"] == 0
    assert stats["admitted"] == stats["live"] + stats["removed"]


def test_reset_stats_resets_counters_not_state():
    ht = HashTable([3])
    ht(torch.tensor([1, 2, 3]))
    ht.delete(torch.tensor([1]))
    before = ht.stats()
    ht.reset_stats()
    after = ht.stats()
    for key in ("live", "capacity", "bytes", "bytes_by_slot"):
        assert after[key] == before[key]
    assert counters(ht) == {"lookups": 0, "ids_looked_up": 0, "hits": 0, "misses": 0,
                            "admitted": 0, "rejected": {}, "evicted": {}, "removed": 0}
    ht(torch.tensor([2, 4]))
    assert (ht.stats()["hits"], ht.stats()["misses"], ht.stats()["admitted"]) == (1, 1, 1)


def test_bytes_by_slot_sums_to_bytes():
    ht = HashTable([4], filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 3}))
    ht.add_slot("m", (4,), torch.float32)
    ht(torch.arange(100))
    ht.delete(torch.arange(10))
    stats = ht.stats()
    by_slot = stats["bytes_by_slot"]
    assert set(by_slot) == {"embedding", "step_filter", "m", "id_map", "tracking"}
    assert sum(by_slot.values()) == stats["bytes"] == ht.memory_bytes()
    assert by_slot["embedding"] == by_slot["m"] == stats["capacity"] * 4 * 4


def test_counts_stay_exact_under_concurrent_eval_lookups():
    ht = HashTable([2])
    ht(torch.arange(50))
    ht.eval()
    ht.reset_stats()

    def work():
        for _ in range(50):
            ht(torch.arange(40, 60))  # 10 hits, 10 misses

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = ht.stats()
    assert (stats["lookups"], stats["hits"], stats["misses"]) == (200, 2000, 2000)
    assert stats["rejected"] == {"read_only": 2000}


def test_stats_survive_a_deepcopy():
    import copy

    ht = HashTable([2])
    ht(torch.tensor([1, 2]))
    ht.eval()
    ht(torch.tensor([3]))
    assert counters(copy.deepcopy(ht)) == counters(ht)


def test_engine_stats_and_totals():
    engine = EmbeddingEngine({
        "user": EmbeddingOption(embedding_dim=4, shared_name="user"),
        "item": EmbeddingOption(embedding_dim=8, shared_name="item"),
    })
    engine({"user": torch.LongTensor([[1, 2], [2, 3]]), "item": torch.LongTensor([[7], [7]])})
    engine.eval()
    engine({"user": torch.LongTensor([[1, 9]]), "item": torch.LongTensor([[8]])})
    stats = engine.stats()
    assert set(stats) == {"dim 4 (user)", "dim 8 (item)", "total"}
    user, item, total = stats["dim 4 (user)"], stats["dim 8 (item)"], stats["total"]
    assert (user["admitted"], user["hits"], user["misses"]) == (3, 1, 4)
    assert (item["admitted"], item["hits"], item["misses"]) == (1, 0, 2)
    assert user["rejected"] == {"read_only": 1} and item["rejected"] == {"read_only": 1}
    assert total["admitted"] == 4 and total["live"] == 4 and total["lookups"] == 4
    assert total["rejected"] == {"read_only": 2}
    assert total["bytes"] == user["bytes"] + item["bytes"]
    engine.reset_stats()
    assert engine.stats()["total"]["lookups"] == 0
    assert engine.stats()["total"]["live"] == 4


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = EmbeddingEngine({"ids": EmbeddingOption(
            embedding_dim=2, shared_name="ids",
            filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 2}))})

    def forward(self, batch):
        out = self.emb({"ids": batch["ids"]})["ids"].sum(1)
        return torch.nn.functional.binary_cross_entropy_with_logits(out, batch["label"])


def batches(n):
    for step in range(n):
        ids = torch.arange(4).view(4, 1) + 4 * step  # fresh IDs every step
        yield {"ids": ids, "label": torch.ones(4)}


def test_trainer_history_logger_and_tensorboard_carry_table_stats(tmp_path, caplog):
    model = TinyModel()
    tb = tmp_path / "tb"
    try:
        import tensorboard  # noqa: F401
        has_tb = True
    except ImportError:
        has_tb = False
    args = TrainingArguments(train_steps=6, log_steps=3, progress_bar=False,
                             tensorboard_dir=str(tb) if has_tb else None)
    trainer = Trainer(model, args, list(batches(6)),
                      hooks=[HashTableFilterHook(filter_interval=3)],
                      sparse_optimizer=SparseSGD(filter_out_sparse_param(model), lr=0.1))
    with caplog.at_level(logging.INFO):
        history = trainer.train()
    label = "dim 2 (ids)"
    records = [h for h in history if "loss" in h]
    assert [h["tables"] for h in records] == [{label: h["table_stats"][label]["live"]}
                                              for h in records]  # tables: live counts
    last = records[-1]["table_stats"][label]
    assert last["admitted"] == 24  # 4 fresh IDs each of 6 steps
    assert last["evicted"].get("GlobalStepFilter", 0) > 0
    assert last["admitted"] == last["live"] + sum(last["evicted"].values())
    assert any("tables:" in r.message and "admitted=24" in r.getMessage()
               for r in caplog.records)
    if has_tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {f"tables/{label}/{k}" for k in ("live", "admitted", "evicted", "bytes")} <= tags
        assert events.Scalars(f"tables/{label}/admitted")[-1].value == 24


def test_deepfm_metrics_json_has_full_table_stats(tmp_path):
    deepfm.main(["--steps", "6", "--batch-size", "64", "--vocab", "300", "--eval-every", "6",
                 "--eval-batches", "1", "--filter-step", "2", "--filter-interval", "3",
                 "--no-progress", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for table in saved["tables"].values():
        for key in ("live", "capacity", "bytes", "bytes_by_slot", "lookups", "hits", "misses",
                    "admitted", "rejected", "evicted", "removed", "logical_tables"):
            assert key in table
        assert sum(table["bytes_by_slot"].values()) == table["bytes"]
        assert table["admitted"] == table["live"] + table["removed"]
        assert table["hits"] + table["misses"] == table["ids_looked_up"]
    assert any("read_only" in t["rejected"] for t in saved["tables"].values())  # the eval
    records = [h for h in saved["history"] if "loss" in h]
    assert records and all("table_stats" in h for h in records)


def test_plot_draws_admitted_and_evicted(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: saved.append(fig))
    history = [{"step": s, "loss": 0.5, "tables": {"t": 10},
                "table_stats": {"t": {"admitted": s, "evicted": {"GlobalStepFilter": s // 2}}}}
               for s in (10, 20)]
    assert deepfm.plot(history, str(tmp_path / "p.png"))
    lines = saved[0].axes[3].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[10, 20], [5, 10]]
