"""Phase 1 data throughput: items per second of ``__getitems__`` + ``collate_fn`` (batch 256, K=8, C=48).

(a) the in-process loop, with 1 intra-op thread and with torch's default;
(b) a DataLoader over the EpochSampler with num_workers=0 and num_workers=2 (persistent), over a few epochs.
Checks that the loaders' batches equal the in-process ones and prints the ratio to the 50,000 items/s target.

    python benchmarks/bench_dataloader.py --batches 40
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch.utils.data import DataLoader

from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.datasets import Phase1MapDataset
from naics_hnm.data.epoch_sampler import EpochSampler
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.data.token_cache import build_token_cache, load_token_cache, load_tokenizer

TARGET = 50_000
BATCH = 256


def in_process(ds, batches: int, epoch: int, threads: int | None) -> tuple[float, float, float]:
    """items/s of getitems + collate, and the share of time in each."""
    default = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        order = np.random.default_rng(epoch).permutation(len(ds))
        t_get = t_col = 0.0
        n = 0
        for b in range(batches):
            idx = order[(b * BATCH) % (len(ds) - BATCH):][:BATCH]
            t0 = time.perf_counter()
            items = ds.__getitems__([(epoch, int(i)) for i in idx])
            t1 = time.perf_counter()
            batch = collate_fn(items)
            t2 = time.perf_counter()
            t_get, t_col, n = t_get + t1 - t0, t_col + t2 - t1, n + len(batch["anchor_idx"])
        return n / (t_get + t_col), t_get / (t_get + t_col), t_col / (t_get + t_col)
    finally:
        torch.set_num_threads(default)


def loader_run(ds, batches: int, epochs: int, num_workers: int):
    """Per-epoch items/s through a real DataLoader; returns (rates, batches of the last epoch)."""
    sampler = EpochSampler(len(ds), seed=1, shuffle=True, samples_per_epoch=min(batches * BATCH, len(ds)))
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    rates, last = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        kept = []
        for batch in loader:
            n += len(batch["anchor_idx"])
            kept.append(batch)
        rates.append(n / (time.perf_counter() - t0))
        last = kept
    del loader
    return rates, last, sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=26, help="batches of 256 per measurement / per loader epoch")
    parser.add_argument("--epochs", type=int, default=3, help="DataLoader epochs (the first includes worker start)")
    parser.add_argument("--phase1-end-epoch", type=int, default=3)
    args = parser.parse_args()
    if args.batches < 1 or args.epochs < 1:
        parser.error(f"--batches={args.batches} and --epochs={args.epochs}: expected >= 1")

    taxonomy = Taxonomy.naics2022()
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        fp = build_token_cache(os.path.join(tmp, "tokens.h5"), taxonomy.codes, taxonomy.texts, tokenizer)
        cache = load_token_cache(os.path.join(tmp, "tokens.h5"), fp, expected_codes=taxonomy.codes)
    t0 = time.perf_counter()
    ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(), cache, args.phase1_end_epoch, taxonomy=taxonomy)
    build_s = time.perf_counter() - t0
    print(f"taxonomy: {len(taxonomy)} codes; pairs: {len(ds)}; K={ds.cfg.n_negatives}, C={ds.cfg.n_candidates}, "
          f"batch={BATCH}, token width<={int(cache.lengths.max())}; dataset build {build_s:.2f}s")
    print(f"cpu cores: {os.cpu_count()}, torch default intra-op threads: {torch.get_num_threads()}, "
          f"load average: {os.getloadavg()[0]:.2f}")

    in_process(ds, 2, 0, 1)  # warm-up
    print(f"\n(a) in-process __getitems__ + collate_fn, {args.batches} batches")
    for threads in (1, None):
        for epoch in (0, args.phase1_end_epoch - 1):
            rate, g, c = in_process(ds, args.batches, epoch, threads)
            label = "1 thread " if threads == 1 else f"{torch.get_num_threads()} threads"
            print(f"  {label} epoch {epoch}: {rate:10,.0f} items/s  ({rate / TARGET:5.2f}x target; "
                  f"getitems {g:.0%}, collate {c:.0%})")

    print(f"\n(b) DataLoader + EpochSampler, {args.epochs} epochs x {args.batches} batches")
    results = {}
    for num_workers in (0, 2):
        rates, last, sampler = loader_run(ds, args.batches, args.epochs, num_workers)
        results[num_workers] = last
        steady = rates[1:] or rates
        print(f"  num_workers={num_workers}{' (persistent)' if num_workers else ''}: per epoch "
              + ", ".join(f"{r:,.0f}" for r in rates)
              + f" items/s; steady {np.mean(steady):,.0f} items/s ({np.mean(steady) / TARGET:.2f}x target)")

    # correctness: both loaders give the dataset's own items for the last epoch, in sampler order
    epoch = args.epochs - 1
    indices = sampler.epoch_indices(epoch)
    ref = [collate_fn(ds.__getitems__([(epoch, i) for i in indices[s:s + BATCH]]))
           for s in range(0, len(indices), BATCH)]
    ok = len(results[0]) == len(results[2]) == len(ref)
    for a, b, r in zip(results[0], results[2], ref):
        for key in ("anchor_idx", "positive_idx", "negative_idx", "candidate_idx", "negative_mask"):
            ok &= torch.equal(a[key], r[key]) and torch.equal(b[key], r[key])
        ok &= torch.equal(a["negatives"]["input_ids"], r["negatives"]["input_ids"])
        ok &= torch.equal(b["negatives"]["input_ids"], r["negatives"]["input_ids"])
    print(f"\ncorrectness: workers=2 batches == workers=0 batches == in-process items for epoch {epoch}: {ok}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
