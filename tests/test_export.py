"""recis.export: frozen tables reproduce eval-mode lookups; the exported DeepFM serves under
torch.export with the trained model's outputs (fp32 exactly, int8 within its rows' error)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recis.datasets import SyntheticClickStream
from recis.examples.deepfm_model import DeepFM
from recis.examples.serve import Scorer
from recis.export import (
    FrozenEmbedding,
    FrozenEngine,
    FrozenTable,
    export,
    exported_program,
    load,
    quantize_rows,
    read_manifest,
    serving_inputs,
)
from recis.nn import DynamicEmbedding, EmbeddingEngine, EmbeddingOption, HashTable
from recis.nn.initializers import NormalInitializer
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdamW
from recis.ragged.tensor import RaggedTensor

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT.parent / "shared" / "data" / "criteo-sample"


def _option(name: str, **kw) -> EmbeddingOption:
    init = NormalInitializer(std=1.0, generator=torch.Generator().manual_seed(len(name)))
    return EmbeddingOption(embedding_dim=kw.pop("dim", 6), shared_name=name, initializer=init,
                           **kw)


def _ragged(seed: int, bags: int = 50, vocab: int = 400) -> RaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 9, (bags,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return RaggedTensor(torch.randint(0, vocab, (int(offsets[-1]),), generator=g), offsets)


# -- FrozenTable ------------------------------------------------------------------------------
def test_frozen_table_reads_known_ids_and_zero_rows_for_unknown_ones():
    g = torch.Generator().manual_seed(0)
    ids = torch.unique(torch.randint(-2**62, 2**62, (1000,), generator=g))
    rows = torch.randn(ids.numel(), 5, generator=g)
    table = FrozenTable(ids, rows)
    queries = torch.cat([ids[torch.randperm(ids.numel(), generator=g)[:300]],
                         torch.tensor([0, -1, 2**63 - 1, -2**63])]).view(4, -1)
    reference = {int(i): r for i, r in zip(ids, rows, strict=True)}
    expected = torch.stack([reference.get(int(q), torch.zeros(5)) for q in queries.view(-1)])
    assert torch.equal(table(queries), expected)
    empty = FrozenTable(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3))
    assert torch.equal(empty(torch.tensor([1, 2])), torch.zeros(2, 3))


def test_frozen_table_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strictly increasing"):
        FrozenTable(torch.tensor([2, 1]), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="ids must be a 1-D int64"):
        FrozenTable(torch.tensor([1.0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="one row per ID"):
        FrozenTable(torch.tensor([1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="int8 rows need scale"):
        FrozenTable(torch.tensor([1]), torch.zeros(1, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="ids must be an integer tensor"):
        FrozenTable(torch.tensor([1]), torch.zeros(1, 3))(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="tile_len"):
        FrozenEmbedding(FrozenTable(torch.tensor([1]), torch.zeros(1, 3)), "tile")
    with pytest.raises(ValueError, match="combiner must be one of"):
        FrozenEmbedding(FrozenTable(torch.tensor([1]), torch.zeros(1, 3)), "max")


# -- one embedding: export -> load equals the trained module in eval mode ---------------------
@pytest.mark.parametrize("combiner", ["sum", "mean", "tile"])
def test_frozen_embedding_equals_dynamic_embedding_in_eval(combiner, tmp_path):
    kw = {"combiner_kwargs": {"tile_len": 3}} if combiner == "tile" else {}
    emb = DynamicEmbedding(_option("user", combiner=combiner, **kw))
    emb(_ragged(0, bags=400))  # training mode: inserts the IDs
    export(emb, tmp_path / "e")
    frozen = load(tmp_path / "e")
    assert isinstance(frozen, FrozenEmbedding) and frozen.combiner == combiner
    emb.eval()
    dense = torch.randint(0, 500, (30, 4))  # IDs up to 500: some were never inserted
    with torch.no_grad():
        for ids in (_ragged(1, vocab=500), _ragged(2, bags=1), dense, dense[:, 0]):
            assert torch.equal(frozen(ids), emb(ids))
        rt = _ragged(3, vocab=500)
        assert torch.equal(frozen((rt.values(), rt.offsets()[0])), emb(rt))
        # weighted bags: kernels may fuse multiply-adds differently, so the last bits may differ
        weighted = RaggedTensor(rt.values(), rt.offsets(), torch.rand(rt.values().numel()))
        torch.testing.assert_close(frozen(weighted), emb(weighted), rtol=1e-5, atol=1e-6)
        w = torch.rand(dense.shape)
        torch.testing.assert_close(frozen(dense, w), emb(dense, w), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="either inside the ragged input or as"):
            frozen(weighted, torch.rand(rt.values().numel()))


def test_an_empty_table_exports_and_reads_zeros(tmp_path):
    emb = DynamicEmbedding(_option("user", dim=4))
    assert export(emb, tmp_path / "e", dtype="int8")["tables"]["user"]["ids"] == 0
    assert torch.equal(load(tmp_path / "e")(torch.tensor([[1, 2]])), torch.zeros(1, 4))


def test_engine_export_keeps_shared_and_coalesced_tables(tmp_path):
    engine = EmbeddingEngine({
        "user": _option("user"), "friend": _option("user"),  # one logical table
        "item": _option("item", combiner="mean"),  # same config: a child of user's table
        "tag": _option("tag", dim=3),
    })
    batch = {"user": _ragged(0), "friend": _ragged(1), "item": _ragged(2),
             "tag": torch.randint(0, 400, (50, 2))}
    engine(batch)
    manifest = export(engine, tmp_path / "e")
    assert sorted(manifest["tables"]) == ["item", "tag", "user"]
    assert manifest["tables"]["user"]["ids"] == len(engine.hashtable("user").ids("user"))
    frozen = load(tmp_path / "e")
    assert isinstance(frozen, FrozenEngine)
    assert frozen.embedding("user").table is frozen.embedding("friend").table
    engine.eval()
    queries = {"user": _ragged(5, vocab=600), "friend": _ragged(6, vocab=600),
               "item": _ragged(7, vocab=600), "tag": torch.randint(0, 600, (9, 2)),
               "other": torch.arange(3)}
    with torch.no_grad():
        want, got = engine(queries), frozen(queries)
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


# -- row formats -----------------------------------------------------------------------------
def test_int8_rows_are_within_half_a_scale_and_fp16_within_its_rounding():
    rows = torch.randn(500, 16) * torch.logspace(-6, 2, 500).unsqueeze(1)
    rows[7] = 0.0
    q, scale = quantize_rows(rows, "int8")
    assert q.dtype == torch.int8 and scale.shape == (500,) and scale[7] == 0
    error = (q.float() * scale.unsqueeze(1) - rows).abs()
    assert bool((error <= scale.unsqueeze(1) * (0.5 + 1e-5)).all())
    half, none = quantize_rows(rows, "fp16")
    assert none is None and half.dtype == torch.float16
    assert bool(((half.float() - rows).abs() <= rows.abs() * 2**-11 + 2**-24).all())
    with pytest.raises(ValueError, match="float16's range"):
        quantize_rows(torch.tensor([[1e6]]), "fp16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize_rows(rows, "int4")


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantized_export_outputs_stay_within_the_rows_error(dtype, tmp_path):
    emb = DynamicEmbedding(_option("user"))
    emb(torch.arange(300))
    manifest = export(emb, tmp_path / "e", dtype=dtype)
    bound = manifest["tables"]["user"]["max_abs_error"]
    assert 0 < bound < 0.05  # rows ~ N(0, 1): int8 about 3 / 254, fp16 about 4 * 2**-11
    emb.eval()
    ids = torch.randint(0, 300, (40, 5))
    with torch.no_grad():
        diff = (load(tmp_path / "e")(ids) - emb(ids)).abs().max()
    assert diff <= 5 * bound * (1 + 1e-5)  # a sum of 5 rows


# -- the DeepFM: torch.export, equal outputs -----------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DeepFM trained a few steps on the synthetic stream (one ragged field), its eval
    batches and its exports in every row format."""
    torch.manual_seed(0)
    stream = SyntheticClickStream(num_batches=6, batch_size=256, num_sparse=3, num_dense=2,
                                  vocab_per_field=500, seed=1)
    model = DeepFM(stream.fields, stream.num_dense, dim=8, hidden=(16,))
    sparse = SparseAdamW(filter_out_sparse_param(model), lr=0.05)
    dense = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in stream:
        model(batch)["loss"].backward()
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
    model.eval()
    held_out = [next(iter(stream.held_out(1))),
                next(iter(SyntheticClickStream(num_batches=1, batch_size=37, num_sparse=3,
                                               num_dense=2, vocab_per_field=900, seed=2)))]
    root = tmp_path_factory.mktemp("export")
    paths = {}
    for dtype in ("fp32", "int8"):
        paths[dtype] = root / dtype
        export(model, paths[dtype], dtype=dtype,
               config={"model": "DeepFM", "kwargs": model.structure})
    return model, held_out, paths


def _inputs(model, batch):
    return serving_inputs({k: batch[k] for k in ["dense", *model.sparse_fields]})


def test_exported_deepfm_equals_the_trained_model_in_eval_mode(trained):
    model, held_out, paths = trained
    served = load(paths["fp32"], DeepFM(**read_manifest(paths["fp32"])["config"]["kwargs"]))
    assert not any(isinstance(m, (DynamicEmbedding, EmbeddingEngine)) for m in served.modules())
    program = exported_program(Scorer(served), _inputs(served, held_out[0])).module()
    with torch.no_grad():
        for batch in held_out:  # 256 and 37 rows, unknown IDs among them
            want = model.logits(batch)
            assert torch.equal(served.logits(serving_inputs(batch)), want)
            assert torch.equal(program(_inputs(served, batch)), want)


def test_int8_deepfm_logits_stay_close(trained):
    model, held_out, paths = trained
    served = load(paths["int8"], DeepFM(**model.structure))
    with torch.no_grad():
        diff = max(float((served.logits(serving_inputs(b)) - model.logits(b)).abs().max())
                   for b in held_out)
    # the rows' own error (max_abs_error per table) carried through one FM layer and a small
    # MLP; measured about 1e-3 here
    assert 0 < diff < 0.02


def test_frozen_modules_need_neither_numba_nor_the_training_stack(trained, tmp_path):
    tree = ast.parse((ROOT / "recis" / "export" / "frozen.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "collections", "typing", "torch"}, imported
    emb = DynamicEmbedding(_option("user"))
    emb(torch.arange(100))
    export(emb, tmp_path / "e")
    emb.eval()
    ids = torch.randint(0, 150, (20, 3))
    torch.save({"ids": ids, "out": emb(ids).detach()}, tmp_path / "expected.pt")
    code = """if True:
        import sys
        sys.modules["numba"] = None  # importing numba now fails
        import torch
        from recis.export import load
        expected = torch.load(sys.argv[2], weights_only=True)
        assert torch.equal(load(sys.argv[1])(expected["ids"]), expected["out"])
        stack = ("recis.nn", "recis._core", "recis.optim", "recis.serialize", "recis.framework")
        loaded = sorted(m for m in sys.modules if m.startswith(stack))
        assert not loaded, loaded
    """
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "e"),
                           str(tmp_path / "expected.pt")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300)
    assert done.returncode == 0, done.stderr


# -- errors ------------------------------------------------------------------------------------
def test_export_and_load_reject_bad_input_with_clear_errors(trained, tmp_path):
    model, _, paths = trained
    with pytest.raises(FileExistsError, match="already exists"):
        export(model, paths["fp32"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        export(model, tmp_path / "a", dtype="bf16")
    with pytest.raises(ValueError, match="no DynamicEmbedding or EmbeddingEngine"):
        export(torch.nn.Linear(2, 2), tmp_path / "b")
    mixed = torch.nn.ModuleDict({"emb": DynamicEmbedding(_option("a")),
                                 "raw": HashTable([4], name="raw")})
    with pytest.raises(ValueError, match="HashTable outside any DynamicEmbedding"):
        export(mixed, tmp_path / "d")
    with pytest.raises(TypeError, match="config must be a JSON-serialisable dict"):
        export(model, tmp_path / "c", config={"f": object()})
    assert not any((tmp_path / name).exists() for name in "abcd")
    with pytest.raises(FileNotFoundError, match="not a recis export"):
        load(tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        load(paths["fp32"])
    other = DeepFM(model.sparse_fields[:2], model.num_dense, dim=8, hidden=(16,))
    with pytest.raises(ValueError, match="embeds features"):
        load(paths["fp32"], other)
    wider = DeepFM(model.sparse_fields, model.num_dense, dim=8, hidden=(32,))
    with pytest.raises(ValueError, match="dense weights do not match"):
        load(paths["fp32"], wider)
    manifest = json.loads((paths["int8"] / "manifest.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="export version 99"):
        load(broken)


# -- the command line ----------------------------------------------------------------------
def test_serve_rejects_bad_arguments_in_one_line(trained, tmp_path, capsys):
    from recis.examples import serve

    emb = DynamicEmbedding(_option("user"))
    emb(torch.arange(3))
    export(emb, tmp_path / "emb")
    for argv, message in [([str(tmp_path / "none"), "--data", "x.orc"], "not a recis export"),
                          ([str(tmp_path / "emb"), "--data", "x.orc"], "does not hold a DeepFM"),
                          ([str(trained[2]["fp32"]), "--data", "/nonexistent/*.orc"],
                           "no file matches"),
                          ([str(trained[2]["fp32"]), "--data", "x", "--batch-size", "0"],
                           "--batch-size must be > 0")]:
        try:
            code = serve.run(argv)
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)


@pytest.mark.skipif(not CRITEO.is_dir(), reason="../shared/data/criteo-sample not present")
def test_serve_scores_criteo_files_with_the_trained_models_auc(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    train = [sys.executable, "-m", "recis.examples.deepfm", "--data", str(CRITEO / "part-0.orc"),
             "--eval-data", str(CRITEO / "part-5.orc"), "--steps", "6", "--batch-size", "512",
             "--no-progress", "--output", str(tmp_path), "--export"]
    done = subprocess.run(train, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert read_manifest(tmp_path / "export")["dtype"] == "fp32"
    serve = [sys.executable, "-m", "recis.examples.serve", str(tmp_path / "export"),
             "--data", str(CRITEO / "part-5.orc"), "--batch-size", "1000"]
    done = subprocess.run(serve, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["examples"] == 10_000 and served["program"] == "torch.export"
    assert served["examples_per_second"] > 0
    assert served["auc"] == pytest.approx(trained["eval_auc"], abs=1e-12)
