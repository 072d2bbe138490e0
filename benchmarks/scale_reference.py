"""bench_scale's fixtures and straightforward references: tree vectors, batches, the per-item
Phase 1 reference, validity checks and brute-force guarded neighbours."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 256
DIM = 32
M = 64  # neighbours per code
K = 8


def tree_vectors(taxonomy, dim: int, seed: int) -> np.ndarray:
    """float32 [N, dim], unit rows: each code = its parent's vector + noise shrinking with depth."""
    rng = np.random.default_rng(seed)
    n = len(taxonomy)
    v = np.zeros((n, dim), dtype=np.float32)
    parent = taxonomy.parent
    by_depth = np.argsort(taxonomy.depth, kind="stable")
    bounds = np.searchsorted(taxonomy.depth[by_depth], np.arange(1, taxonomy.max_depth + 2))
    for d in range(1, taxonomy.max_depth + 1):
        idx = by_depth[bounds[d - 1] : bounds[d]]
        noise = rng.standard_normal((len(idx), dim), dtype=np.float32) * np.float32(0.8 ** (d - 1))
        v[idx] = noise if d == 1 else v[parent[idx]] + noise
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def mining_batches(ds, epoch: int, count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """``count`` collated batches of 256 items of ``epoch``: anchor, positive and candidate ids."""
    from naics_hnm.data.collate import collate_fn

    out = []
    for _ in range(count):
        idx = rng.choice(len(ds), min(BATCH, len(ds)), replace=False)
        batch = collate_fn(ds.__getitems__([(epoch, int(i)) for i in idx]))
        out.append({k: batch[k].numpy() for k in ("anchor_idx", "positive_idx", "candidate_idx")})
    return out


def make_small_fixture(n: int, args: argparse.Namespace, folder: Path, rng: np.random.Generator) -> dict[str, Any]:
    """The same pipeline at ``n`` codes (flat miner): the in-process reference for per-batch costs."""
    from naics_hnm.data.config import SamplingConfig
    from naics_hnm.train.datamodule import NAICSDataModule
    from naics_hnm.mining.miner import HardNegativeMiner
    from naics_hnm.tree.synthetic import synthetic_tree
    from naics_hnm.tree.taxonomy import Taxonomy

    tree = synthetic_tree(n, depth=(5, 7), seed=args.seed + 1, code_style="letters")
    taxonomy = Taxonomy(tree.codes, tree.parents, tree.titles, name=f"small_{n}")
    dm = NAICSDataModule(taxonomy=taxonomy, cache_dir=folder, batch_size=BATCH, positive_relations=("levels",),
                         sampling=SamplingConfig(order_filter=True), seed=args.seed)
    dm.prepare_data()
    dm.setup("fit")
    miner = HardNegativeMiner(taxonomy, allowed=dm.train_dataset.allowed, k=K, neighbours=M, device="cpu")
    miner.refresh(tree_vectors(taxonomy, DIM, args.seed), 0)
    return {"n": n, "ds": dm.train_dataset, "miner": miner,
            "batches": mining_batches(dm.train_dataset, dm.phase1_end_epoch, args.mine_batches, rng)}


def _split(total: int, shares: tuple[float, float, float]) -> list[int]:
    raw = [s * total for s in shares]
    counts = [int(math.floor(r)) for r in raw]
    for b in sorted(range(3), key=lambda b: -(raw[b] - counts[b]))[: total - sum(counts)]:
        counts[b] += 1
    return counts


def _spill(want: list[int], available: list[int]) -> list[int]:
    take, carry = [0, 0, 0], 0
    for b in range(3):
        take[b] = min(want[b] + carry, available[b])
        carry = want[b] + carry - take[b]
    for b in (2, 1, 0):
        extra = min(carry, available[b] - take[b])
        take[b] += extra
        carry -= extra
    return take


def reference_item(taxonomy, allowed: np.ndarray, all_ids: np.ndarray, anchor: int, seed: int, epoch: int,
                   i: int, shares: tuple[float, float, float], level_decay: float, k: int,
                   c: int) -> tuple[int, np.ndarray]:
    """One Phase 1 item the plain way: (positive, negatives + candidates [<= c]) for ``anchor``."""
    rng = np.random.default_rng((seed, epoch, i))
    lca = taxonomy.lca_depth(anchor, all_ids)
    valid = allowed & ~taxonomy.related(anchor, all_ids)
    depth = int(taxonomy.depth[anchor])
    # the positive: a tree level d < depth (weight decay**d), then any allowed code with LCA depth d
    levels = [d for d in range(1, depth) if (allowed & (lca == d)).any()]
    if not levels:
        return -1, np.full(c, -1)
    weights = np.array([level_decay ** d for d in levels])
    d = levels[int(rng.choice(len(levels), p=weights / weights.sum()))]
    positive = int(rng.choice(np.flatnonzero(allowed & (lca == d))))
    top = min(int(lca[positive]) - 1, depth - 1)  # the order filter: strictly shallower LCA than the positive
    eligible = valid & (lca <= top) & (all_ids != positive)
    buckets = [np.flatnonzero(eligible & (lca == top)) if top >= 1 else np.zeros(0, np.int64),
               np.flatnonzero(eligible & (lca > 0) & (lca < top)),
               np.flatnonzero(eligible & (lca == 0))]
    available = [len(b) for b in buckets]
    first = _spill(_split(k, shares), available)
    rest = _spill(_split(c - k, shares), [a - f for a, f in zip(available, first)])
    picked = [rng.choice(b, f + r, replace=False) for b, f, r in zip(buckets, first, rest)]
    out = np.concatenate([p[:f] for p, f in zip(picked, first)] + [p[f:] for p, f in zip(picked, first)])
    return positive, np.pad(out, (0, c - len(out)), constant_values=-1)


# ---------------------------------------------------------------------------------------------
# checks


def check_negatives(taxonomy, allowed: np.ndarray, anchors: np.ndarray, positives: np.ndarray,
                    ids: np.ndarray, order_filter: bool) -> dict[str, int]:
    """Counts of invalid entries in ids [B, C] (-1 = padding)."""
    anchors, positives, ids = (np.asarray(x, dtype=np.int64) for x in (anchors, positives, ids))
    real = ids >= 0
    safe = np.maximum(ids, 0)
    a = anchors[:, None]
    out = {
        "checked": int(real.sum()),
        "padding": int((~real).sum()),
        "related": int((real & taxonomy.related(a, safe)).sum()),
        "positive": int((real & (ids == positives[:, None])).sum()),
        "disallowed": int((real & ~allowed[safe]).sum()),
    }
    srt = np.sort(np.where(real, ids, -np.arange(1, ids.shape[1] + 1)[None, :] - 1), axis=1)
    out["repeated"] = int((srt[:, 1:] == srt[:, :-1]).sum())
    if order_filter:
        has = positives >= 0
        pos_lca = taxonomy.lca_depth(anchors, np.maximum(positives, 0))
        out["order"] = int((real & has[:, None] & (taxonomy.lca_depth(a, safe) >= pos_lca[:, None])).sum())
    out["invalid"] = sum(v for key, v in out.items() if key not in ("checked", "padding"))
    return out


def brute_force_neighbours(taxonomy, allowed: np.ndarray, vectors: np.ndarray, anchor: int, m: int) -> np.ndarray:
    scores = vectors @ vectors[anchor]
    all_ids = np.arange(len(vectors))
    keep = allowed & ~taxonomy.related(anchor, all_ids)
    scores = np.where(keep, scores, -np.inf)
    top = np.argsort(-scores, kind="stable")[:m]
    return top[np.isfinite(scores[top])]
