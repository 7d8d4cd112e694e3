"""Full train step (lookup, sum forward, backward, optimizer update) vs static baselines.

A step is ``opt.zero_grad(); out = model(batch); (out * upstream).sum().backward();
opt.step()`` on one batch of 4096 bags x 20 IDs (dim 64, ``upstream`` a fixed random
[4096, 64] tensor), timed end to end. Candidates, each with its own table and optimizer
state, alternate inside every repeat:

* ours: ``DynamicEmbedding`` (sum) on the raw int64 IDs, table pre-filled with the whole
  1M-ID support (steady state), with ``recis.optim.SparseAdagrad`` (lr 0.01) and
  ``SparseAdam`` (lr 1e-3);
* ``nn.EmbeddingBag(1M, 64, mode="sum")`` on the Zipf ranks in ``[0, 1M)``: dense grad +
  ``torch.optim.Adagrad``; ``sparse=True`` + ``torch.optim.SparseAdam``; and (info)
  ``sparse=True`` + ``torch.optim.Adagrad``, which accepts sparse gradients;
* TorchRec ``FusedEmbeddingBagCollection`` (fbgemm CPU kernels; the optimizer runs inside
  backward) with Adagrad (``EmbOptimType.EXACT_ADAGRAD``) and, for information, Adam where
  fbgemm supports it (1.8.0 has no Adam on CPU; the row then says so). Skipped
  with a message when ``import torchrec`` fails. Install it without touching torch::

      pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0  # + its pure-python deps

Before timing, every candidate takes one step from fresh optimizer state on the same batch,
and its change of the (no-grad) forward output is checked against ours: on a first step
Adagrad and Adam both move every touched element by ``-lr * sign(grad)``, so the deltas must
agree (this also proves the fused module really updates its weights).

Also: a phase breakdown of our step (zero_grad / forward / backward / optimizer step, with
``time.perf_counter`` in a separate pass) and a cold variant where 25% of the ID occurrences
are new keys (the table grows; information only).

    PYTHONPATH=. python benchmarks/bench_train_step.py [--quick]
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable

import torch
from _common import (
    BATCH,
    DIM,
    IDS_PER_ROW,
    SUPPORT,
    Profiler,
    Workload,
    header,
    interleaved,
    median,
    paired_ratio,
    parse_args,
    print_table,
    setup_torch,
    target_line,
)
from torch import nn

from recis._core.rwlock import RWLock
from recis.nn import DynamicEmbedding, EmbeddingOption
from recis.nn.modules.hashtable import filter_out_sparse_param
from recis.optim import SparseAdagrad, SparseAdam

TARGET_VS_TORCHREC = 1.0
TARGET_LOCK_COST = 1.03
NO_LOCKS = "ours + SparseAdagrad, table locks off (info)"
TARGET_ADAM_VS_TORCH = 0.5
LR_ADAGRAD = 0.01
LR_ADAM = 1e-3
N_WARM_BATCHES = 8
FILL_CHUNK = 100_000


@contextlib.contextmanager
def _no_lock(self):
    yield


# Wrapped in the phase pass (exclusive time; absent ones are skipped).
PROFILE_TARGETS = [
    ("recis.nn.modules.hashtable", "HashTable", "grad_rows"),
    ("recis.nn.modules.hashtable", "HashTable", "clear_grad"),
    ("recis.optim.optimizers", "SparseAdagrad", "_update"),
    ("recis.optim.optimizers", "_SparseAdamBase", "_update"),
    ("recis.optim.functional", None, "adagrad_rows"),
    ("recis.optim.functional", None, "adam_rows"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "adam_update"),
    ("recis._core.backends.numba_backend", "NumbaBackend", "adagrad_update"),
    ("recis._core.slots", "SlotStore", "gather"),
    ("recis._core.slots", "SlotStore", "scatter"),
]

Batch = tuple[torch.Tensor, torch.Tensor, object]  # (ids 2-D, ranks 2-D, torchrec KJT or None)


class Candidate:
    """One model + optimizer; ``step(batch)`` runs a full train step, ``forward_eval(batch)``
    returns the no-grad forward output (for the update check)."""

    def __init__(self, name: str, step: Callable[[Batch], None],
                 forward_eval: Callable[[Batch], torch.Tensor]):
        self.name = name
        self.step = step
        self.forward_eval = forward_eval


def load_torchrec():
    """``(torchrec module, pieces)`` or ``(None, reason)``."""
    try:
        import torchrec
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except Exception as e:  # ImportError, or a missing fbgemm op library
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return torchrec, (EmbeddingBagConfig, FusedEmbeddingBagCollection, KeyedJaggedTensor)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    setup_torch()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch Adagrad, sparse
    repeats, warmup = (4, 1) if args.quick else (30, 5)
    cold_repeats, cold_warmup = (3, 1) if args.quick else (10, 2)
    n_phase = 4 if args.quick else 20
    header("bench_train_step: full train step (lookup, fwd, bwd, optimizer) vs static tables",
           args.quick, repeats, warmup)
    torchrec, trec = load_torchrec()
    if torchrec is None:
        print(f"torchrec: SKIPPED (import failed: {trec})")
    else:
        import fbgemm_gpu

        print(f"torchrec {torchrec.__version__}, fbgemm_gpu {fbgemm_gpu.__version__} "
              "(FusedEmbeddingBagCollection on CPU)")

    t0 = time.perf_counter()
    w = Workload()
    gen = torch.Generator().manual_seed(7)
    shape = (BATCH, IDS_PER_ROW)
    lengths = torch.full((BATCH,), IDS_PER_ROW, dtype=torch.int64)

    def make_batch(ids: torch.Tensor, ranks: torch.Tensor) -> Batch:
        kjt = None
        if torchrec is not None:
            kjt = trec[2].from_lengths_sync(keys=["f0"], values=ranks, lengths=lengths)
        return ids.view(shape), ranks.view(shape), kjt

    warm = [make_batch(*w.warm_batch()) for _ in range(N_WARM_BATCHES)]
    cold = [make_batch(*w.cold_batch()) for _ in range(cold_repeats + cold_warmup)]
    check_batch = make_batch(*w.warm_batch())
    upstream = torch.randn(BATCH, DIM, generator=gen)
    support_ids = torch.from_numpy(w.rank_ids.copy())

    # -- ours ---------------------------------------------------------------------------------
    def ours(name: str, opt_cls, lr: float) -> tuple[Candidate, DynamicEmbedding, object]:
        emb = DynamicEmbedding(EmbeddingOption(embedding_dim=DIM, shared_name=name))
        with torch.no_grad():
            for i in range(0, SUPPORT, FILL_CHUNK):
                chunk = support_ids[i : i + FILL_CHUNK]
                emb.hashtable.insert(chunk, torch.randn(chunk.numel(), DIM, generator=gen) * 0.01)
        opt = opt_cls(filter_out_sparse_param(emb), lr=lr)

        def step(b: Batch) -> None:
            opt.zero_grad()
            out = emb(b[0])
            (out * upstream).sum().backward()
            opt.step()

        def fwd(b: Batch) -> torch.Tensor:
            emb.eval()
            with torch.no_grad():
                out = emb(b[0])
            emb.train()
            return out

        return Candidate(f"ours DynamicEmbedding + {opt_cls.__name__}", step, fwd), emb, opt

    # -- nn.EmbeddingBag + torch.optim ----------------------------------------------------------
    def static(label: str, sparse: bool, opt_cls, lr: float) -> Candidate:
        bag = nn.EmbeddingBag(SUPPORT, DIM, mode="sum", sparse=sparse)
        opt = opt_cls(bag.parameters(), lr=lr)

        def step(b: Batch) -> None:
            opt.zero_grad()
            (bag(b[1]) * upstream).sum().backward()
            opt.step()

        def fwd(b: Batch) -> torch.Tensor:
            with torch.no_grad():
                return bag(b[1])

        return Candidate(label, step, fwd)

    # -- TorchRec FusedEmbeddingBagCollection ---------------------------------------------------
    def fused(label: str, opt_cls, lr: float) -> Candidate:
        config, collection, _ = trec
        cfg = config(name="t0", embedding_dim=DIM, num_embeddings=SUPPORT, feature_names=["f0"])
        ebc = collection(tables=[cfg], optimizer_type=opt_cls, optimizer_kwargs={"lr": lr},
                         device=torch.device("cpu"))

        def step(b: Batch) -> None:  # the optimizer runs inside backward
            (ebc(b[2]).values() * upstream).sum().backward()

        def fwd(b: Batch) -> torch.Tensor:
            with torch.no_grad():
                return ebc(b[2])["f0"].detach().clone()

        return Candidate(label, step, fwd)

    ada, ada_emb, ada_opt = ours("ada", SparseAdagrad, LR_ADAGRAD)
    adam, adam_emb, adam_opt = ours("adam", SparseAdam, LR_ADAM)
    cands = [
        ada,
        adam,
        static("EmbeddingBag dense grad + torch Adagrad", False, torch.optim.Adagrad, LR_ADAGRAD),
        static("EmbeddingBag sparse + torch SparseAdam", True, torch.optim.SparseAdam, LR_ADAM),
        static("EmbeddingBag sparse + torch Adagrad", True, torch.optim.Adagrad, LR_ADAGRAD),
    ]
    trec_ada = trec_adam = None
    if torchrec is not None:
        trec_ada = fused("TorchRec fused EBC + Adagrad (EXACT_ADAGRAD)", torch.optim.Adagrad,
                         LR_ADAGRAD)
        cands.append(trec_ada)
        try:
            trec_adam = fused("TorchRec fused EBC + Adam (info)", torch.optim.Adam, LR_ADAM)
            cands.append(trec_adam)
        except (AssertionError, RuntimeError, ValueError) as e:
            print(f"TorchRec fused Adam: skipped ({str(e).splitlines()[0][:120]})")
    print(f"setup {time.perf_counter() - t0:.1f}s: our tables pre-filled with the {SUPPORT:,}-ID "
          f"support (len {len(ada_emb.hashtable):,} / {len(adam_emb.hashtable):,})")

    # -- update check: one step each from fresh state, same batch; compare output deltas ------
    lr_of = {c.name: LR_ADAM if "Adam" in c.name else LR_ADAGRAD for c in cands}
    deltas = {}
    for c in cands:
        before = c.forward_eval(check_batch)
        c.step(check_batch)
        deltas[c.name] = (c.forward_eval(check_batch) - before) / lr_of[c.name]
    rows = []
    for c in cands:
        ref = deltas[adam.name if "Adam" in c.name else ada.name]
        d = deltas[c.name]
        diff = (d - ref).abs()
        off = (diff > 0.01).float().mean().item()
        rows.append([c.name, f"{d.abs().max().item():.1f}", f"{diff.max().item():.1e}",
                     f"{off:.4%}"])
        assert d.abs().max() > 1.0, f"{c.name}: a step did not change the weights"
        assert off < 1e-3, f"{c.name}: first-step update differs from ours ({off:.2%} off)"
    print("\n-- update check: one step from fresh state on one batch; delta of the forward output "
          "/ lr (= -sum over the bag of sign(grad)) vs ours with the same optimizer family "
          "(elements with a tiny grad differ by the optimizers' eps)")
    print_table(["candidate", "max |delta|/lr", "max diff", "elements off > 0.01"], rows)

    # -- warm timing ----------------------------------------------------------------------------
    state: dict = {}

    def pick(i: int) -> None:
        state["b"] = warm[i % len(warm)]

    def timer(c: Candidate):
        def run() -> float:
            a = time.perf_counter()
            c.step(state["b"])
            return time.perf_counter() - a

        return run

    def without_locks(c: Candidate):
        """The same step with the tables' readers-writer locks replaced by no-ops: what
        thread safety costs a single-threaded step."""
        def run() -> float:
            saved = RWLock.read, RWLock.write
            RWLock.read = RWLock.write = _no_lock
            try:
                a = time.perf_counter()
                c.step(state["b"])
                return time.perf_counter() - a
            finally:
                RWLock.read, RWLock.write = saved

        return run

    timers = {c.name: timer(c) for c in cands}
    timers[NO_LOCKS] = without_locks(ada)
    t1 = time.perf_counter()
    s = interleaved(timers, repeats, warmup, pick)
    n_uniq = sum(torch.unique(b[0]).numel() for b in warm) / len(warm)
    print(f"\n-- warm (steady state): {len(warm)} batches, mean U={n_uniq:,.0f} unique IDs of "
          f"N={BATCH * IDS_PER_ROW}; full step ms (median), paired ratio ours/candidate "
          f"({time.perf_counter() - t1:.0f}s)")
    rows = []
    for c in cands:
        ref_name = adam.name if "Adam" in c.name else ada.name
        rows.append([c.name, f"{median(s[c.name]) * 1e3:.2f}",
                     f"{paired_ratio(s[ref_name], s[c.name]):.2f}" if c.name != ref_name else "-",
                     "ours SparseAdam" if ref_name == adam.name else "ours SparseAdagrad"])
    print_table(["candidate", "step ms", "ours/cand", "ours is"], rows)


    # -- phase breakdown --------------------------------------------------------------------
    print(f"\n-- phase breakdown of our steps (separate pass, {n_phase} steps each, medians ms)")
    prof = Profiler()
    phase_rows = []
    detail: list[list[str]] = []
    with prof.installed(PROFILE_TARGETS):
        for emb, opt, label in ((ada_emb, ada_opt, "SparseAdagrad"),
                                (adam_emb, adam_opt, "SparseAdam")):
            ph: dict[str, list[float]] = {k: [] for k in ("zero_grad", "forward", "backward",
                                                          "opt.step", "total")}
            prof.reset()
            for i in range(n_phase + 1):
                b = warm[i % len(warm)]
                prof.phase = "zero_grad"
                t_a = time.perf_counter()
                opt.zero_grad()
                t_b = time.perf_counter()
                prof.phase = "forward"
                out = emb(b[0])
                loss = (out * upstream).sum()
                t_c = time.perf_counter()
                prof.phase = "backward"
                loss.backward()
                t_d = time.perf_counter()
                prof.phase = "opt.step"
                opt.step()
                t_e = time.perf_counter()
                if i == 0:  # warm the wrappers
                    prof.reset()
                    continue
                for k, v in (("zero_grad", t_b - t_a), ("forward", t_c - t_b),
                             ("backward", t_d - t_c), ("opt.step", t_e - t_d),
                             ("total", t_e - t_a)):
                    ph[k].append(v)
                    prof.phase_wall[k] += v
            phase_rows.append([f"ours + {label}"] + [f"{median(ph[k]) * 1e3:.2f}" for k in ph])
            table = prof.table(n_phase, ("opt.step",))
            table[0][0] = f"opt.step ({label})"
            detail += table
    print_table(["step", "zero_grad", "forward", "backward", "opt.step", "total"], phase_rows)
    print("   inside opt.step (profiled pass, wrapped functions, exclusive mean ms/step):")
    print_table(["phase / function", "calls/step", "ms/step", "of phase"], detail)

    # -- cold -------------------------------------------------------------------------------------
    cstate: dict = {}

    def cpick(i: int) -> None:
        state["b"] = cold[i]
        cstate["i"] = i

    cold_cands = {ada.name + " (cold)": timer(ada), cands[4].name: timer(cands[4])}
    if trec_ada is not None:
        cold_cands[trec_ada.name] = timer(trec_ada)
    before = len(ada_emb.hashtable)
    cs = interleaved(cold_cands, cold_repeats, cold_warmup, cpick)
    print(f"\n-- cold: 25% of occurrences new keys ({len(ada_emb.hashtable) - before:,} rows "
          f"inserted over {len(cold)} steps; baselines get uniform ranks for the new keys)")
    cold_ours = cs[ada.name + " (cold)"]
    print_table(["candidate", "step ms", "ours cold/cand"],
                [[n, f"{median(v) * 1e3:.2f}",
                  "-" if v is cold_ours else f"{paired_ratio(cold_ours, v):.2f}"]
                 for n, v in cs.items()])

    # -- targets ----------------------------------------------------------------------------------
    print()
    if trec_ada is not None:
        target_line("train step ours SparseAdagrad / TorchRec fused Adagrad",
                    paired_ratio(s[ada.name], s[trec_ada.name]), "<=", TARGET_VS_TORCHREC,
                    f"{TARGET_VS_TORCHREC}x")
    else:
        print("target train step ours SparseAdagrad / TorchRec fused Adagrad <= 1.0x: "
              "SKIPPED (torchrec not importable)")
    target_line("train step ours SparseAdam / EmbeddingBag(sparse) + torch SparseAdam",
                paired_ratio(s[adam.name], s[cands[3].name]), "<=", TARGET_ADAM_VS_TORCH,
                f"{TARGET_ADAM_VS_TORCH}x")
    target_line("thread safety: ours SparseAdagrad step with locks / with no-op locks",
                paired_ratio(s[ada.name], s[NO_LOCKS]), "<=", TARGET_LOCK_COST,
                f"{TARGET_LOCK_COST}x")
    info = [f"ours Adagrad / EmbeddingBag dense + Adagrad "
            f"{paired_ratio(s[ada.name], s[cands[2].name]):.2f}x",
            f"ours Adagrad / EmbeddingBag sparse + Adagrad "
            f"{paired_ratio(s[ada.name], s[cands[4].name]):.2f}x"]
    if trec_adam is not None:
        info.append(f"ours Adam / TorchRec fused Adam "
                    f"{paired_ratio(s[adam.name], s[trec_adam.name]):.2f}x")
    print("info: " + ", ".join(info))


if __name__ == "__main__":
    main()
