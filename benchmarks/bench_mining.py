"""Cost of Phase 2 hard-negative mining next to the training it serves (NAICS 2022, MiniLM).

    python benchmarks/bench_mining.py            # B in {64, 256}, N=100k for the search check
    python benchmarks/bench_mining.py --quick    # fewer repetitions, N=20k for the search check

Three measurements, each timed INTERLEAVED with what it is compared to (A, B, A, B, ...; medians):

1. per-batch mining vs one training step. Mining = ``mine_candidates`` over the batch's 48-code
   pool, over the widened pool (48 + 64 guarded neighbours), and the callback's whole per-batch
   work ``HardNegativeMiningCallback.mine_batch`` (widen + rank + token gather), run on a real
   collated ``NAICSDataModule`` batch. Step = ``NAICSEncoder()`` (offline all-MiniLM-L6-v2)
   forward + backward + AdamW step on the same batch (2 + K = 10 sequences per anchor).
   Target: mining < 2 % of a step.
2. index refresh: embed all 2,125 codes (``embed_codes``, eval, no grad, batch 512) vs build
   (``EmbeddingIndex.build`` + ``guarded_neighbours(..., 64)``, i.e. ``HardNegativeMiner.refresh``).
   Target: build < 1 % of the refresh.
3. ``EmbeddingIndex.search`` vs raw ``faiss.knn`` (cosine, d=384, k in {10, 64}). Target <= 1.2x.

Correctness lines compare the miner with a NumPy brute force, the neighbour lists with a brute
force, and search ids with faiss. Nothing asserts on speed: the table reports pass/fail.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import paired_median_seconds, unit_rows  # noqa: E402

from naics_hnm import EmbeddingIndex, HardNegativeMiningCallback, NAICSDataModule, mine_candidates  # noqa: E402
from naics_hnm.embedding import embed_codes  # noqa: E402
from naics_hnm.mining.miner import HardNegativeMiner  # noqa: E402
from naics_hnm.mining.neighbours import guarded_neighbours  # noqa: E402
from naics_hnm.train.encoder import NAICSEncoder  # noqa: E402
from naics_hnm.tree.guard import TreeGuard  # noqa: E402

MARGIN = 0.05
K = 8
PHASE2_EPOCH = 2  # the datamodule's default phase1_end_epoch: the first mined epoch


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of several functions run round-robin (one warm-up round first)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# reference implementations (NumPy brute force)


def reference_pool_mine(v: np.ndarray, related: np.ndarray, lca: np.ndarray, anchors: np.ndarray,
                        positives: np.ndarray, pool: np.ndarray, k: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Guard + order filter + relative margin + stable top-k, row by row in float64."""
    b = len(anchors)
    out_s = np.full((b, k), -np.inf)
    out_i = np.full((b, k), -1, dtype=np.int64)
    for r in range(b):
        a, p = anchors[r], positives[r]
        pos = float(v[a].astype(np.float64) @ v[p].astype(np.float64))
        seen, cands = set(), []
        for c in pool[r]:
            c = int(c)
            if c < 0 or c in seen:
                continue
            seen.add(c)
            if c == a or c == p or related[a, c] or lca[a, c] >= lca[a, p]:
                continue
            s = float(v[a].astype(np.float64) @ v[c].astype(np.float64))
            if s > pos - margin * abs(pos):
                continue
            cands.append((s, c))
        cands.sort(key=lambda t: -t[0])  # stable: ties keep pool order
        for j, (s, c) in enumerate(cands[:k]):
            out_s[r, j], out_i[r, j] = s, c
    return out_s, out_i


def compare(ours_s, ours_i, ref_s, ref_i) -> str:
    ours_s = np.asarray(ours_s, dtype=np.float64)
    ours_i = np.asarray(ours_i)
    ids_equal = float(np.mean(ours_i == ref_i))
    finite = np.isfinite(ref_s)
    pad_equal = bool(((ours_i < 0) == (ref_i < 0)).all())
    err = float(np.abs(ours_s[finite] - ref_s[finite]).max()) if finite.any() else 0.0
    # identical code texts give identical vectors: exact ties may legally swap ids
    tie_ok = bool(np.allclose(np.where(finite, ours_s, 0), np.where(finite, ref_s, 0), atol=1e-5))
    return f"ids equal {ids_equal:.2%}, padding equal {pad_equal}, score lists equal {tie_ok}, max |score diff| {err:.1e}"


# ---------------------------------------------------------------------------------------------
# fixtures


def training_step_fn(model: NAICSEncoder, optimizer: torch.optim.Optimizer, batch: dict) -> Callable[[], float]:
    """One optimisation step, the work of ``training_step`` (without Lightning's logging)."""

    def step() -> float:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = model._loss(batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def dense_relations(tx) -> tuple[np.ndarray, np.ndarray]:
    """related and lca_depth as dense [N, N] arrays: a brute-force reference for a small tree only."""
    ids = np.arange(len(tx))
    return tx.related(ids[:, None], ids[None, :]), tx.lca_depth(ids[:, None], ids[None, :])


def first_batch(batch_size: int, cache_dir: str | None, epoch: int) -> tuple[NAICSDataModule, dict]:
    dm = NAICSDataModule(batch_size=batch_size, cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    dm.set_epoch(epoch)
    return dm, next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------------------------
# 1. per-batch mining vs a training step


def bench_batch(model, embeddings, batch_sizes, reps_step, reps_mine, cache_dir) -> list[tuple[str, float]]:
    results = []
    for b in batch_sizes:
        dm, batch = first_batch(b, cache_dir, epoch=PHASE2_EPOCH)
        tx = dm.taxonomy
        cb = HardNegativeMiningCallback(k=K, relative_margin=MARGIN, order_filter=True, device="cpu")
        data = dm.mining_data()
        cb.miner = HardNegativeMiner(tx, allowed=data.allowed, k=K, relative_margin=MARGIN, order_filter=True,
                                     device="cpu")
        cb.miner.refresh(embeddings, epoch=0)
        index = cb.index
        related, lca = dense_relations(tx)
        anchors, positives, pool = batch["anchor_idx"], batch["positive_idx"], batch["candidate_idx"]
        widened = cb.miner.widen(anchors, pool)
        neg = batch["negatives"]["input_ids"]
        print(f"\n[1] B={b}: pool C={pool.shape[1]} (valid/row {float((pool >= 0).sum(1).float().mean()):.1f}), "
              f"widened C={widened.shape[1]} (valid/row {float((widened >= 0).sum(1).float().mean()):.1f}), "
              f"k={K}, d={index.dim}, N={index.ntotal}; step batch: anchor {tuple(batch['anchor']['input_ids'].shape)}"
              f", negatives {tuple(neg.shape)} -> {b * (2 + neg.shape[1])} sequences")

        def mine(cands):
            return lambda: mine_candidates(index, anchors, cands, k=K, positive_ids=positives, relative_margin=MARGIN,
                                           taxonomy=cb.miner.guard, order_filter=True)

        # correctness: both pools against brute force
        v = index.vectors.numpy()
        for name, cands in (("pool 48", pool), ("widened", widened)):
            s, i = mine(cands)()
            rs, ri = reference_pool_mine(v, related, lca, anchors.numpy(), positives.numpy(),
                                         cands.numpy(), K, MARGIN)
            print(f"    check mine_candidates ({name}) vs NumPy brute force: {compare(s.numpy(), i.numpy(), rs, ri)}")
        probe = dict(batch)
        cb.mine_batch(probe, data.token_cache)
        ids = probe["negative_idx"]
        bad = sum(bool(related[a, c]) or c == p for a, p, row in zip(anchors.tolist(), positives.tolist(),
                                                                         ids.tolist()) for c in row if c >= 0)
        print(f"    check mine_batch: negatives {tuple(probe['negatives']['input_ids'].shape)}, "
              f"filled {float(probe['negative_mask'].float().mean()):.1%}, related/positive among them: {bad}")

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.01)
        step = training_step_fn(model, optimizer, batch)
        # the step dominates; time it reps_step times and each miner reps_mine times between steps
        mined: dict[str, list[float]] = {"pool48": [], "widened": [], "mine_batch": []}
        fns = {"pool48": mine(pool), "widened": mine(widened), "mine_batch": lambda: cb.mine_batch(dict(batch), data.token_cache)}
        step_times = []
        step()
        for fn in fns.values():
            fn()
        for _ in range(reps_step):
            for name, fn in fns.items():
                for _ in range(reps_mine):
                    start = time.perf_counter()
                    fn()
                    mined[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - start)
        step_s = statistics.median(step_times)
        print(f"    training step (MiniLM fwd+bwd+AdamW, B={b}): median {step_s * 1e3:8.1f} ms over {reps_step}")
        for name, label in (("pool48", "mine_candidates, pool 48      "),
                            ("widened", "mine_candidates, pool 48+64   "),
                            ("mine_batch", "callback.mine_batch (whole)   ")):
            sec = statistics.median(mined[name])
            print(f"    {label}: median {sec * 1e3:8.2f} ms over {len(mined[name])}  ratio to step {sec / step_s:.3%}")
            results.append((f"B={b} {name}", sec / step_s))
        model.zero_grad(set_to_none=True)
        del optimizer
    return results


# ---------------------------------------------------------------------------------------------
# 2. refresh: embed vs build


def bench_refresh(model, cache_dir, reps) -> float:
    dm = NAICSDataModule(cache_dir=cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    miner = HardNegativeMiner(dm.taxonomy, allowed=dm.train_dataset.allowed, k=K, device="cpu")
    cache = dm.token_cache

    def embed():
        return embed_codes(model.embed, cache, batch_size=512, module=model)

    emb = embed()
    start = time.perf_counter()
    miner.refresh(emb, epoch=0)
    cold = time.perf_counter() - start
    # correctness of the neighbour lists against brute force (dense relations: fine for a reference at N=2,125)
    v = miner.index.vectors.numpy().astype(np.float64)
    sim = v @ v.T
    banned = dense_relations(dm.taxonomy)[0] | ~dm.train_dataset.allowed[None, :]
    sim[banned] = -np.inf
    ref = np.sort(-sim, axis=1)[:, :64]
    nearest = miner.neighbour_ids.numpy().astype(np.int64)
    allowed = dm.train_dataset.allowed
    ref, sim, nearest = ref[allowed], sim[allowed], nearest[allowed]  # lists are built for allowed anchors
    got = np.take_along_axis(sim, np.where(nearest >= 0, nearest, 0), 1)
    got = np.where(nearest >= 0, got, -np.inf)
    ok = np.allclose(np.nan_to_num(-ref, neginf=-9), np.nan_to_num(got, neginf=-9), atol=1e-5)
    n = cache.size
    print(f"\n[2] refresh of N={n} codes, d={emb.shape[1]}: first refresh {cold * 1e3:.1f} ms (cold); "
          f"neighbour lists (64) match brute-force similarities: {ok}")

    times = interleaved({"embed": embed, "build": lambda: miner.refresh(emb, epoch=0)}, reps)
    # breakdown of build, interleaved too
    index = miner.index
    ids = np.flatnonzero(dm.train_dataset.allowed)
    guard = TreeGuard(dm.taxonomy, dm.train_dataset.allowed)
    parts = interleaved({
        "EmbeddingIndex.build": lambda: EmbeddingIndex.build(emb, metric="cosine", device="cpu",
                                                             codes=dm.taxonomy.codes, epoch=0),
        "guarded_neighbours (index search + guard)": lambda: guarded_neighbours(index, ids, 64, guard=guard),
    }, reps)
    refresh = times["embed"] + times["build"]
    ratio = times["build"] / refresh
    print(f"    embed (embed_codes, MiniLM eval/no_grad, batch 512): median {times['embed'] * 1e3:9.1f} ms")
    print(f"    build (miner.refresh: index + 64 neighbours)        : median {times['build'] * 1e3:9.1f} ms")
    print(f"    build / refresh = {ratio:.3%}   (build / embed = {times['build'] / times['embed']:.3%})")
    print("    build breakdown (medians):")
    for name, sec in parts.items():
        print(f"      {name:<44} {sec * 1e3:8.2f} ms")
    return ratio


# ---------------------------------------------------------------------------------------------
# 3. EmbeddingIndex.search vs faiss.knn


def bench_search(sizes, ks, q, reps, rng) -> list[tuple[str, float]]:
    out = []
    print()
    for n in sizes:
        xb, xq = unit_rows(rng, n, 384), unit_rows(rng, q, 384)
        index = EmbeddingIndex.build(xb, metric="cosine", device="cpu")
        for k in ks:
            ours, raw = paired_median_seconds(
                lambda: index.search(xq, k), lambda: faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT), reps)
            our_s, our_i = index.search(xq, k)
            ref_s, ref_i = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
            print(f"[3] search N={n:>6} Q={q} d=384 k={k:>2}: ours {ours * 1e3:8.1f} ms  faiss.knn {raw * 1e3:8.1f} ms"
                  f"  ratio {ours / raw:.2f}x | ids equal {np.mean(our_i == ref_i):.4%}, "
                  f"max |score diff| {np.abs(our_s - ref_s).max():.1e}")
            out.append((f"N={n} k={k}", ours / raw))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller search sizes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 64 256 (quick: 64)")
    parser.add_argument("--step-reps", type=int, default=None, help="timed training steps per B (default 3, quick 2)")
    parser.add_argument("--cache-dir", default=None, help="token cache folder (default: the package default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    batch_sizes = args.batch_sizes or ([64] if args.quick else [64, 256])
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"faiss threads {faiss.omp_get_max_threads()}, cpu count {os.cpu_count()}, load avg "
          f"{os.getloadavg()[0]:.2f}")

    model = NAICSEncoder()  # offline all-MiniLM-L6-v2, mean pooling, L2 norm
    refresh_ratio = bench_refresh(model, args.cache_dir, 3 if args.quick else 5)
    dm = NAICSDataModule(cache_dir=args.cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    embeddings = embed_codes(model.embed, dm.token_cache, batch_size=512, module=model)
    batch_ratios = bench_batch(model, embeddings, batch_sizes, args.step_reps or (2 if args.quick else 3), 3 if args.quick else 5,
                               args.cache_dir)
    search_ratios = bench_search([2125, 20000] if args.quick else [2125, 100000], [10, 64], 2125,
                                 3 if args.quick else 5, rng)

    print("\nSummary (medians of interleaved runs; machine load makes absolute times noisy)")
    print(f"{'measurement':<48} {'value':>10} {'target':>10} {'result':>7}")
    worst_batch = max(batch_ratios, key=lambda t: t[1])
    for name, value in batch_ratios:
        print(f"{'mining / training step, ' + name:<48} {value:>10.3%} {'< 2 %':>10} {'pass' if value < 0.02 else 'FAIL':>7}")
    print(f"{'index build / refresh (embed + build)':<48} {refresh_ratio:>10.3%} {'< 1 %':>10} "
          f"{'pass' if refresh_ratio < 0.01 else 'FAIL':>7}")
    for name, value in search_ratios:
        print(f"{'EmbeddingIndex.search / faiss.knn, ' + name:<48} {value:>9.2f}x {'<= 1.2x':>10} "
              f"{'pass' if value <= 1.2 else 'FAIL':>7}")
    worst_search = max(v for _, v in search_ratios)
    print(f"\nthree ratios: mining/step (worst, {worst_batch[0]}) {worst_batch[1]:.3%}, build/refresh "
          f"{refresh_ratio:.3%}, search/faiss (worst) {worst_search:.2f}x")


if __name__ == "__main__":
    main()
