"""List-major IVF-Flat search (``naics_hnm.index.ivf_scan``) against faiss's own IVF search, same index, same run.

    python benchmarks/bench_ivf_scan.py                                  # 1M clustered vectors, d = 384
    python benchmarks/bench_ivf_scan.py --embeddings refresh_epoch0004.h5 # a refresh's embeddings file

Both scan the same ``nprobe`` lists of one ``IVF<nlist>,Flat`` index (cosine) for ``--queries`` indexed rows,
in batches of 32,768 (the miner's neighbour-list batch), at each k and nprobe. Interleaved (faiss, list-major,
faiss, ...), medians of ``--repeats``. Correctness: the share of faiss's top-k ids that the list-major top-k
holds (only float near-ties may differ) and the largest score difference. Also the guarded neighbour lists of
the refresh (``guarded_neighbours``, m = 48) through ``EmbeddingIndex`` with the list-major scan on and off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from naics_hnm.embeddings_file import load_embeddings  # noqa: E402
from naics_hnm.index.embedding_index import EmbeddingIndex  # noqa: E402
from naics_hnm.index.ivf_scan import ListMajorIVF  # noqa: E402
from naics_hnm.mining.neighbours import guarded_neighbours  # noqa: E402

BATCH = 32768  # the miner's neighbour_batch_size


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """Unit rows around 4 sqrt(n) random centres (a stand-in for trained embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(4 * n ** 0.5), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batched(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [search(queries[s:s + BATCH], k) for s in range(0, len(queries), BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--embeddings", default=None, help="an embeddings .h5 file instead of clustered vectors")
    p.add_argument("--nlist", type=int, default=2048)
    p.add_argument("--nprobe", type=int, nargs="+", default=[32, 64])
    p.add_argument("--k", type=int, nargs="+", default=[57, 228])
    p.add_argument("--queries", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.embeddings:
        x = np.ascontiguousarray(load_embeddings(args.embeddings).embeddings, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        source = args.embeddings
    else:
        x = clustered(args.n, args.dim, 0)
        source = "clustered"
    n, d = x.shape
    print(f"{source}: N={n:,} d={d}, IVF{args.nlist},Flat (cosine), {args.queries:,} queries in batches of {BATCH}, "
          f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}", flush=True)
    t = time.perf_counter()
    index = EmbeddingIndex.build(x, device="cpu", index_factory=f"IVF{args.nlist},Flat")
    print(f"build {time.perf_counter() - t:.1f} s", flush=True)
    ivf = faiss.downcast_index(index._index)
    list_major = ListMajorIVF.of(ivf, "cosine")
    rows = np.sort(np.random.default_rng(1).choice(n, args.queries, replace=False))
    queries = x[rows]
    results = []
    print("| nprobe | k | faiss IVF search | list-major | speed-up | id overlap | max score diff |")
    print("|---|---|---|---|---|---|---|")
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        for k in args.k:
            times = {"faiss": [], "list_major": []}
            for _ in range(args.repeats):
                t = time.perf_counter()
                f_scores, f_ids = batched(ivf.search, queries, k)
                times["faiss"].append(time.perf_counter() - t)
                t = time.perf_counter()
                l_scores, l_ids = batched(list_major.search, queries, k)
                times["list_major"].append(time.perf_counter() - t)
            tf, tl = statistics.median(times["faiss"]), statistics.median(times["list_major"])
            equal = float(np.mean([np.intersect1d(a, b).size / k for a, b in zip(f_ids, l_ids)]))
            diff = float(np.abs(f_scores - l_scores).max())
            results.append({"nprobe": nprobe, "k": k, "faiss_s": tf, "list_major_s": tl, "speedup": tf / tl,
                            "ids_equal": equal, "max_score_diff": diff})
            print(f"| {nprobe} | {k} | {tf:.2f} s | {tl:.2f} s | **{tf / tl:.2f}x** | {equal:.5f} | {diff:.1e} |",
                  flush=True)
    ivf.nprobe = args.nprobe[0]
    lists = {}
    for name, scan in (("faiss", None), ("list_major", list_major)):
        index._list_major = scan
        t = time.perf_counter()
        _, lists[name], report = guarded_neighbours(index, rows, 48, batch_size=BATCH)
        lists[name + "_s"] = time.perf_counter() - t
    index._list_major = list_major
    same = float((lists["faiss"] == lists["list_major"]).mean())
    print(f"guarded neighbour lists (m=48, nprobe {args.nprobe[0]}, {len(rows):,} anchors, {report.searches} "
          f"searches): faiss {lists['faiss_s']:.2f} s, list-major {lists['list_major_s']:.2f} s, "
          f"**{lists['faiss_s'] / lists['list_major_s']:.2f}x**; entries equal {same:.5f}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"source": source, "n": n, "dim": d, "nlist": args.nlist,
                                                 "queries": args.queries, "search": results,
                                                 "neighbours": {"faiss_s": lists["faiss_s"],
                                                                "list_major_s": lists["list_major_s"],
                                                                "entries_equal": same}}, indent=1))


if __name__ == "__main__":
    main()
