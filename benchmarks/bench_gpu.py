"""GPU scale check: a 1M-code refresh with faiss GPU flat and IVF, and CUDA ranking vs CPU.

    python benchmarks/bench_gpu.py [--codes 1000000]     # run by benchmarks/gpu_check.sh

One synthetic parent-pointer tree (``naics_hnm.tree.synthetic``, depth 5-7) with tree-structured
float32 vectors of width 32 (as ``bench_scale.py``). Rows of the printed table:

- ``refresh, GPU flat``: ``HardNegativeMiner(index_factory="Flat", device="cuda").refresh`` - exact
  guarded neighbour lists (M=64) of every code from a ``GpuIndexFlat``;
- ``refresh, GPU IVF``: the same with the size rule's IVF factory, nprobe calibrated on the GPU
  index (``naics_hnm.index.auto``); its lists' recall@64 against the exact GPU-flat lists;
- ``rank, CUDA`` vs ``rank, CPU``: ``EmbeddingIndex.rank`` of 200 batches of 256 anchors x 112
  candidates, ids compared (must be equal).

Exits non-zero with one line when there is no CUDA device or no faiss GPU build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, peak_rss_mib, recall_at, timed  # noqa: E402


def require_gpu() -> None:
    import faiss

    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible to torch; expected one GPU")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        sys.exit("bench_gpu: faiss has no GPU support here; expected faiss-gpu (pip install -e '.[gpu]')")


def tree_and_vectors(n: int, dim: int = 32, seed: int = 0):
    from bench_scale import tree_vectors
    from naics_hnm.tree.synthetic import synthetic_tree
    from naics_hnm.tree.taxonomy import Taxonomy

    tree = synthetic_tree(n, depth=(5, 7), seed=seed, code_style="letters")
    taxonomy = Taxonomy(tree.codes, tree.parents, tree.titles, name=f"gpu_{n}")
    return taxonomy, tree_vectors(taxonomy, dim, seed)


def rank_rows(n: int, batches: int, seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, n, 256), rng.integers(-1, n, (256, 112))) for _ in range(batches)]


def time_rank(index, rows, device: str) -> tuple[float, list[np.ndarray]]:
    out = []
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for anchors, cands in rows:
        a, c = torch.from_numpy(anchors).to(device), torch.from_numpy(cands).to(device)
        out.append(index.rank(a, c, 8)[1])
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, [ids.cpu().numpy() for ids in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=1_000_000)
    parser.add_argument("--rank-batches", type=int, default=200)
    args = parser.parse_args()
    require_gpu()
    from naics_hnm.index.auto import auto_nlist, choose_index
    from naics_hnm.index.embedding_index import EmbeddingIndex
    from naics_hnm.mining.miner import HardNegativeMiner

    print(machine_line(), "|", torch.cuda.get_device_name(0))
    taxonomy, vectors = tree_and_vectors(args.codes)
    rows: list[tuple[str, str, str]] = []
    flat = HardNegativeMiner(taxonomy, neighbours=64, device="cuda", index_factory="Flat")
    seconds, timings = timed(lambda: flat.refresh(vectors, 0))
    rows.append(("refresh, GPU flat (exact)", f"{seconds:.1f} s", f"build {timings['build']:.1f} s, lists "
                 f"{timings['neighbours']:.1f} s, on {flat.index.device}"))
    # the size rule's IVF (calibrated); below its threshold the rule is exact, so name the IVF it would use
    auto = choose_index(args.codes)
    ivf = HardNegativeMiner(taxonomy, neighbours=64, device="cuda",
                            index_factory=f"IVF{auto_nlist(args.codes)},Flat" if auto.exact else None)
    seconds, timings = timed(lambda: ivf.refresh(vectors, 0))
    sample = np.random.default_rng(2).choice(args.codes, 20_000, replace=False)
    recall = recall_at(ivf.neighbour_ids[sample].cpu().numpy(), flat.neighbour_ids[sample].cpu().numpy())
    rows.append((f"refresh, GPU {ivf.index.index_type}", f"{seconds:.1f} s",
                 f"params {ivf.index.search_params}, lists recall@64 {recall:.3f} vs flat (20k codes)"))
    cpu = EmbeddingIndex.build(vectors, device="cpu")
    gpu = EmbeddingIndex.build(vectors, device="cuda")
    batches = rank_rows(args.codes, args.rank_batches)
    time_rank(gpu, batches[:5], "cuda")
    cpu_s, cpu_ids = time_rank(cpu, batches, "cpu")
    gpu_s, gpu_ids = time_rank(gpu, batches, "cuda")
    same = all(np.array_equal(a, b) for a, b in zip(cpu_ids, gpu_ids))
    rows.append(("rank, CPU", f"{cpu_s / len(batches) * 1e3:.2f} ms/batch", "256 anchors x 112 candidates, k=8"))
    rows.append(("rank, CUDA", f"{gpu_s / len(batches) * 1e3:.2f} ms/batch",
                 f"{cpu_s / gpu_s:.1f}x CPU; ids equal to CPU: {'yes' if same else 'NO'}"))
    print(f"\n{args.codes:,} codes, d=32, M=64 | peak host RSS {peak_rss_mib() / 1024:.1f} GiB | "
          f"GPU peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (torch)")
    print("| check | time | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")
    if not same:
        sys.exit("bench_gpu: CUDA ranking differs from CPU ranking")


if __name__ == "__main__":
    main()
