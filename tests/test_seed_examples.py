"""Every code example of RecIS's ``recis.nn.hashtable_hook`` documentation, run unchanged
(with the inputs the examples leave undefined), with the documented behaviour asserted."""

import torch


def test_read_only_hashtable():
    from recis.nn import HashTable
    from recis.nn.hashtable_hook import AdmitHook

    ht = HashTable(embedding_shape=[64])
    ht.insert(torch.tensor([1, 2]), torch.ones(2, 64))
    ids = torch.tensor([1, 3, 2])

    ro_hook = AdmitHook("ReadOnly")
    embeddings = ht(ids, admit_hook=ro_hook)

    # Known IDs return their embeddings, unknown IDs return zeros
    assert torch.equal(embeddings, torch.stack([torch.ones(64), torch.zeros(64), torch.ones(64)]))
    assert sorted(ht.ids().tolist()) == [1, 2]


def test_read_only_dynamic_embedding():
    from recis.nn import DynamicEmbedding, EmbeddingOption
    from recis.nn.hashtable_hook import AdmitHook

    emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="user_embedding",
        combiner="sum",
        admit_hook=AdmitHook("ReadOnly"),
    )
    embedding = DynamicEmbedding(emb_opt)
    ids = torch.LongTensor([1, 2, 3, 4])
    emb_output = embedding(ids)

    assert emb_output.shape == (4, 64)
    assert torch.equal(emb_output, torch.zeros(4, 64))
    assert len(embedding.hashtable) == 0  # no new embeddings created


def test_mixed_mode_engine():
    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.hashtable_hook import AdmitHook

    user_emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="user_emb",
        admit_hook=AdmitHook("ReadOnly"),  # Read-only for users
    )
    item_emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="item_emb",
    )
    embedding_engine = EmbeddingEngine({"user_emb": user_emb_opt, "item_emb": item_emb_opt})
    user_ids = torch.LongTensor([[1, 2], [3, 4]])
    item_ids = torch.LongTensor([[1, 2], [5, 6]])

    samples = {"user_emb": user_ids, "item_emb": item_ids}
    outputs = embedding_engine(samples)

    assert outputs["user_emb"].shape == outputs["item_emb"].shape == (2, 64)
    table = embedding_engine.hashtable("user_emb")
    assert table is embedding_engine.hashtable("item_emb")  # one physical table
    assert table.ids("user_emb").numel() == 0  # read-only: users were not admitted
    assert sorted(table.ids("item_emb").tolist()) == [1, 2, 5, 6]


def test_global_step_filter_training_loop():
    from recis.hooks.filter_hook import HashTableFilterHook
    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.hashtable_hook import FilterHook

    user_emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="user_emb",
        combiner="sum",
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 20}),
    )
    embedding_engine = EmbeddingEngine({"user_emb": user_emb_opt})
    filter_hook = HashTableFilterHook(filter_interval=10)  # Check every 10 steps

    table = embedding_engine.hashtable("user_emb")
    sizes = {}
    for step in range(100):
        # IDs 0..9 are seen every step; ID 1000+step only at its step.
        samples = {"user_emb": torch.LongTensor([[i for i in range(10)] + [1000 + step]])}
        outputs = embedding_engine(samples)
        assert outputs["user_emb"].shape == (1, 64)
        filter_hook.after_step(global_step=step)
        sizes[step] = len(table)

    # At a run at step c, ID 1000+s is gone iff c - s >= 20; it stays in the table otherwise.
    live = set(table.ids().tolist())
    assert live == set(range(10)) | {1000 + s for s in range(90 - 19, 100)}
    assert sizes[89] == 10 + 29  # the run at 80 dropped s <= 60; s in 61..89 remain
    assert sizes[90] == 10 + 20  # after the run at 90, s in 71..90 remain


def test_three_table_filter_configuration():
    from recis.hooks.filter_hook import HashTableFilterHook
    from recis.nn import EmbeddingEngine, EmbeddingOption
    from recis.nn.hashtable_hook import FilterHook

    user_emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="user_emb",
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 5}),
    )
    item_emb_opt = EmbeddingOption(
        embedding_dim=64,
        shared_name="item_emb",
        filter_hook=FilterHook("GlobalStepFilter", {"filter_step": 50}),
    )
    category_emb_opt = EmbeddingOption(
        embedding_dim=32,
        shared_name="category_emb",
    )
    embedding_engine = EmbeddingEngine(
        {
            "user_emb": user_emb_opt,
            "item_emb": item_emb_opt,
            "category_emb": category_emb_opt,
        }
    )
    assert len(embedding_engine._ht) == 3  # three different filter settings: three tables

    hook = HashTableFilterHook(filter_interval=1, tables=[embedding_engine])
    ids = torch.LongTensor([[1, 2]])
    embedding_engine({"user_emb": ids, "item_emb": ids, "category_emb": ids})
    for step in range(10):
        hook.after_step(global_step=step)
    assert len(embedding_engine.hashtable("user_emb")) == 0  # aggressive: gone after 5 steps
    assert len(embedding_engine.hashtable("item_emb")) == 2  # conservative: kept
    assert len(embedding_engine.hashtable("category_emb")) == 2  # no filtering
