"""Per-rank private memory of a DDP refresh with ``HardNegativeMiner(shard=..., shared_dir=...)``, world 1 vs 2.

    python benchmarks/bench_ddp_memory.py                 # N=60000 codes, d=64, 32 neighbours
    python benchmarks/bench_ddp_memory.py --n 200000

Each rank (a process, gloo on CPU) builds the same synthetic tree, generates only its own rows of
the embeddings (seeded by row block, so every world sees the same matrix), refreshes the miner
(index, ranking vectors and neighbour lists in shared mapped files) and mines a few batches. It
reads ``/proc/self/smaps_rollup`` before the refresh and after the mining, and prints per rank the
growth of: Anonymous (heap: what only this process holds), USS (Private_Clean + Private_Dirty,
which also counts file pages that no other process maps) and PSS (shared pages divided among the
processes mapping them). The state the refresh adds should be ~N / world per rank.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness import machine_line
from naics_hnm.index.sharded_search import Shard
from naics_hnm.mining.miner import HardNegativeMiner
from naics_hnm.tree.synthetic import random_tree
from naics_hnm.tree.taxonomy import Taxonomy

BLOCK = 4096
FIELDS = ("Anonymous", "Private_Clean", "Private_Dirty", "Pss")


def memory_kib() -> dict[str, int]:
    with open("/proc/self/smaps_rollup") as handle:
        values = {line.split(":")[0]: int(line.split()[1]) for line in handle if line.split(":")[0] in FIELDS}
    return {"anon": values["Anonymous"], "uss": values["Private_Clean"] + values["Private_Dirty"],
            "pss": values["Pss"]}


def rows_of(lo: int, hi: int, d: int) -> np.ndarray:
    """Rows [lo, hi) of the benchmark matrix, generated block by block (the same in any world)."""
    blocks = [np.random.default_rng(b).standard_normal((BLOCK, d)).astype(np.float32)
              for b in range(lo // BLOCK, -(-hi // BLOCK))]
    return np.concatenate(blocks)[lo - (lo // BLOCK) * BLOCK:][: hi - lo] if blocks else np.zeros((0, d), np.float32)


def rank_main(rank: int, world: int, args: argparse.Namespace, folder: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port + world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)

    def all_gather(array: np.ndarray) -> np.ndarray:
        out = [torch.empty_like(torch.from_numpy(array)) for _ in range(world)]
        dist.all_gather(out, torch.from_numpy(np.ascontiguousarray(array)))
        return torch.stack(out).numpy()

    tree = random_tree(0, args.n)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    shard = Shard(rank, world, all_gather)
    miner = HardNegativeMiner(tx, k=8, neighbours=args.neighbours, device="cpu", shard=shard,
                              shared_dir=Path(folder) / "shared", neighbour_batch_size=args.batch)
    lo, hi = shard.rows(args.n)
    before = memory_kib()
    timings = miner.refresh_local(rows_of(lo, hi, args.d), epoch=0)
    rng = np.random.default_rng(rank)
    for _ in range(20):
        anchors = rng.integers(0, args.n, 64)
        miner.mine(anchors, rng.integers(0, args.n, 64), rng.integers(0, args.n, (64, 32)))
    after = memory_kib()
    dist.barrier()  # every rank still maps the files while the others measure
    queue.put((rank, {k: (after[k] - before[k]) / 1024 for k in after}, timings))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: argparse.Namespace) -> list:
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=rank_main, args=(r, world, args, folder, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"rank exited with status {p.exitcode}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--neighbours", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="neighbour_batch_size (slices are multiples of it)")
    parser.add_argument("--port", type=int, default=29731)
    args = parser.parse_args()
    print(machine_line())
    n, d, m = args.n, args.d, args.neighbours
    print(f"N={n} d={d} M={m}: ranking vectors {n * d * 4 / 2**20:.1f} MiB, neighbour lists {n * m * 4 / 2**20:.1f} MiB")
    print("world rank  anon_MiB  uss_MiB  pss_MiB  build_s  neighbours_s   (growth from before the refresh)")
    for world in (1, 2):
        for rank, grown, timings in run(world, args):
            print(f"{world:5d} {rank:4d}  {grown['anon']:8.1f} {grown['uss']:8.1f} {grown['pss']:8.1f}  "
                  f"{timings['build']:7.2f}  {timings['neighbours']:12.2f}")


if __name__ == "__main__":
    main()
