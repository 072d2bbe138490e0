"""Time EmbeddingIndex.search against raw faiss.knn, EmbeddingIndex.rank against brute force, and
approximate indexes against exact flat search.

    python benchmarks/bench_search.py            # N in {2125, 100000}, d=384, Q=2125, k in {10, 64}
    python benchmarks/bench_search.py --quick    # N in {2125, 20000}, fewer repetitions

Prints a table of median seconds; ``ratio`` is ours / faiss (target <= 1.2x). Correctness lines
compare ids with faiss (search) and with a NumPy reference (rank). The approximate section builds
IVF, HNSW and IVF-PQ indexes over a clustered Gaussian mixture (N=100000, d=128; --quick: 20000,
d=64) with their default search parameters and reports build time (sampled training, and training
on all N with raw faiss for comparison), recall@64 against exact search, and search time as a
ratio to the exact flat index measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import faiss
import numpy as np
import torch

from naics_hnm.index.embedding_index import EmbeddingIndex


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(first: Callable[[], object], second: Callable[[], object], reps: int) -> tuple[float, float]:
    """Medians of two functions timed alternately, so load from other jobs hits both alike."""
    first(), second()
    a, b = [], []
    for _ in range(reps):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_search(n: int, d: int, q: int, ks: list[int], reps: int, rng: np.random.Generator) -> None:
    xb, xq = unit_rows(rng, n, d), unit_rows(rng, q, d)
    start = time.perf_counter()
    index = EmbeddingIndex.build(xb, metric="cosine", device="auto")
    print(f"build N={n} d={d}: {time.perf_counter() - start:.3f}s on {index.device}")
    for k in ks:
        ours, raw = paired_median_seconds(
            lambda: index.search(xq, k), lambda: faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT), reps
        )
        our_s, our_i = index.search(xq, k)
        ref_s, ref_i = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        same = float(np.mean(our_i == ref_i))
        score_err = float(np.abs(our_s - ref_s).max())
        print(
            f"search N={n:>6} Q={q} k={k:>3}: ours {ours:.4f}s  faiss.knn {raw:.4f}s  ratio {ours / raw:.2f}x  "
            f"| ids equal {same:.4%}  max |score diff| {score_err:.2e}"
        )


def reference_rank(v: np.ndarray, anchors: np.ndarray, cands: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.einsum("bcd,bd->bc", v[cands].astype(np.float64), v[anchors].astype(np.float64))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(cands, order, 1)


def bench_rank(n: int, d: int, b: int, widths: list[int], k: int, reps: int, rng: np.random.Generator) -> None:
    index = EmbeddingIndex.build(unit_rows(rng, n, d), metric="cosine", device="auto")
    v = index.vectors.cpu().numpy()
    for c in widths:
        anchors = rng.integers(0, n, b)
        cands = np.stack([rng.choice(n, c, replace=False) for _ in range(b)])
        for kind, a, cd in (("numpy", anchors, cands), ("torch", torch.from_numpy(anchors), torch.from_numpy(cands))):
            seconds = median_seconds(lambda: index.rank(a, cd, k), reps)
            scores, ids = index.rank(a, cd, k)
            ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids
            scores = scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores
            want_s, want_i = reference_rank(v, anchors, cands, k)
            print(
                f"rank  B={b} C={c:>3} k={k} d={d} ({kind} ids): median {seconds * 1e3:.2f} ms over {reps} reps "
                f"| ids equal reference {bool((ids == want_i).all())}  max |score diff| "
                f"{float(np.abs(scores - want_s).max()):.2e}"
            )


def clustered_rows(rng: np.random.Generator, n: int, d: int, clusters: int, sigma: float = 1.0) -> np.ndarray:
    """Unit rows of a Gaussian mixture: centres ~ N(0, I), points = centre + sigma * N(0, I)."""
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + sigma * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_trained_on_all(xb: np.ndarray, factory: str) -> float:
    """Seconds for raw faiss to build ``factory`` training on every row (faiss's own subsampling only)."""
    start = time.perf_counter()
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    return time.perf_counter() - start


def bench_approximate(n: int, d: int, q: int, factories: list[str], reps: int, rng: np.random.Generator) -> None:
    rows = clustered_rows(rng, n + q, d, clusters=max(10, n // 200))
    xb, xq = rows[:n], rows[n:]
    exact = EmbeddingIndex.build(xb, metric="cosine", device="auto")
    _, want = exact.search(xq, 64)
    print(f"approximate vs exact: clustered mixture N={n} d={d} ({max(10, n // 200)} clusters, sigma 1), "
          f"Q={q}, k=64, {exact.device}")
    for factory in factories:
        start = time.perf_counter()
        index = EmbeddingIndex.build(xb, metric="cosine", device="auto", index_factory=factory)
        build_s = time.perf_counter() - start
        all_s = f"{build_trained_on_all(xb, factory):.2f}s" if not faiss.index_factory(d, factory).is_trained else "n/a"
        ours, flat = paired_median_seconds(lambda: index.search(xq, 64), lambda: exact.search(xq, 64), reps)
        _, got = index.search(xq, 64)
        recall = float(np.mean([len(np.intersect1d(g, w)) / 64 for g, w in zip(got, want)]))
        print(f"  {factory:<14} build {build_s:6.2f}s (training on all N: {all_s:>7}) | {index.search_params} | "
              f"recall@64 {recall:.4f} | search {ours:.4f}s vs exact {flat:.4f}s: {ours / flat:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)
    print(f"faiss {faiss.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"faiss GPUs {faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0}")
    sizes = [(2125, 5), (20000, 3)] if args.quick else [(2125, 10), (100000, 3)]
    for n, reps in sizes:
        bench_search(n, 384, 2125, [10, 64], reps, rng)
    bench_rank(2125, 384, 256, [48, 112], 8, 10 if args.quick else 50, rng)
    if args.quick:
        bench_approximate(20000, 64, 1000, ["IVF256,Flat", "HNSW32", "IVF256,PQ16x4"], 3, rng)
    else:
        bench_approximate(100000, 128, 2000, ["IVF1024,Flat", "HNSW32", "IVF1024,PQ32"], 5, rng)


if __name__ == "__main__":
    main()
