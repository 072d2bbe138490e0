"""Scale: the whole pipeline on synthetic parent-pointer trees of 2k .. 1M codes on one machine.

    python benchmarks/bench_scale.py                 # 2k, 10k, 100k, 1M codes
    python benchmarks/bench_scale.py --quick         # 2k, 10k, 100k
    python benchmarks/bench_scale.py --sizes 2000 1000000 --output /tmp/scale.json

Trees come from :func:`naics_hnm.tree.synthetic.synthetic_tree` (letter codes that say nothing
about the tree, leaves at depth 5..7, short inherited titles). EACH SIZE RUNS IN ITS OWN
SUBPROCESS, so the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is that size's alone. Stages,
each timed, with the current and peak RSS after it:

1. ``load``: write the CSV (not timed), then ``Taxonomy.from_csv``.
2. ``datamodule``: ``NAICSDataModule(taxonomy, positive_relations=("levels",), order filter on)``
   ``prepare_data()`` (a fresh token cache with the real offline tokenizer) and ``setup()``.
3. ``phase1``: items/s of ``train_dataset.__getitems__`` + ``collate_fn`` for batches of 256 at
   epoch 0 and the last Phase 1 epoch, against a straightforward per-item NumPy reference measured
   in the same run (LCA depth of the anchor with all N codes, masks, ``default_rng((seed, epoch, i))
   .choice`` per bucket). Check: every drawn negative and candidate is valid (allowed, not the
   positive, not related to the anchor, shallower LCA than the positive, distinct in its row).
4. ``refresh``: ``HardNegativeMiner(...).refresh(embeddings, 0)`` (build, then guarded neighbour
   lists of every code, M=64) with a flat index and an ``IVF{nlist},Flat`` index; embeddings are
   tree-structured float32 vectors of width 32 (a code = its parent's vector + noise, normalised).
   Above ``--flat-exact-max`` codes the flat neighbour pass is timed on a random sample of anchors
   and EXTRAPOLATED to N (labelled as such). Checks: flat lists equal a NumPy brute force on a few
   anchors; recall@64 of the IVF lists against the exact flat lists on 2,000 anchors.
5. ``mining``: ``miner.widen`` and ``miner.mine(anchors, positives, pool)`` per batch of 256 anchors
   with the Phase 1 items' 48-code candidate pools (ms per batch, median); mined ids checked.
6. total seconds and peak RSS of the size.

The summary compares each size with the smallest one (targets at 1M: mining within 1.5x and
Phase 1 items/s within 2x of 2k, peak RSS <= 6 GiB, <= 15 minutes end to end) and the results go
to ``--output`` as JSON. A failing stage is reported with its error line; later stages that need
it are skipped. Nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np

log = logging.getLogger("bench_scale")

DEFAULT_SIZES = (2_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 10_000, 100_000)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_scale.json"
BATCH = 256
DIM = 32
M = 64  # neighbours per code
K = 8
TARGETS = {"phase1_vs_ref": 10.0, "mine_vs_small": 1.5, "phase1_small_vs_large": 2.0,
           "peak_rss_gib": 6.0, "total_minutes": 15.0}


# ---------------------------------------------------------------------------------------------
# memory and stage bookkeeping (child process)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class Recorder:
    """Per-stage seconds, RSS and metrics; written (atomically) after every stage so a crash keeps them."""

    def __init__(self, n: int, path: Path | None) -> None:
        self.path = path
        self.result: dict[str, Any] = {"n": n, "stages": {}, "errors": {}, "notes": []}
        self.t_start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, needs: tuple[str, ...] = ()) -> Iterator[dict[str, Any] | None]:
        """Time a stage; on an exception record its first line and go on. Yields its metric dict."""
        missing = [s for s in needs if s in self.result["errors"] or s not in self.result["stages"]]
        record: dict[str, Any] = {}
        if missing:
            self.result["errors"][name] = f"skipped: needs stage(s) {missing}"
            log.warning("stage %s skipped: needs %s", name, missing)
            yield None
            return
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            yield record
        except Exception as err:  # a failing stage is reported, not fatal
            line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.result["errors"][name] = line
            log.error("stage %s failed: %s\n%s", name, line, traceback.format_exc())
        gc.collect()
        record["seconds"] = time.perf_counter() - t0
        record["rss_mib"] = current_rss_mib()
        record["peak_rss_mib"] = peak_rss_mib()
        record["load_avg"] = os.getloadavg()[0]
        self.result["stages"][name] = record
        log.info("stage %s: %.2f s, rss %.0f MiB, peak %.0f MiB", name, record["seconds"], record["rss_mib"],
                 record["peak_rss_mib"])
        self.flush()

    def flush(self) -> None:
        self.result["total_seconds"] = time.perf_counter() - self.t_start
        self.result["peak_rss_mib"] = peak_rss_mib()
        if self.path is not None:
            from naics_hnm.atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.result, indent=1, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------
# fixtures


def ivf_nlist(n: int) -> int:
    """~4 sqrt(N) rounded to a power of two, capped at 4096 and at N / 39 (faiss wants >= 39 points per list)."""
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.log2(max(n // 39, 1)))
    return int(max(1, min(4096, target, cap)))


def ivf_nprobe(nlist: int) -> int:
    """nlist / 128 lists probed (at least 8): 32 of 4096 at 1M codes."""
    return int(max(1, min(nlist, max(8, nlist // 128))))


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


def ivf_refresh(miner_cls, taxonomy, allowed, vectors, nlist: int, nprobe: int, notes: list[str]):
    """An IVF miner refreshed with ``nprobe``: through ``search_params`` when this version of the
    library takes it, else by setting ``nprobe`` on the faiss index right after the build."""
    import faiss

    kwargs = dict(allowed=allowed, k=K, neighbours=M, device="cpu", index_factory=f"IVF{nlist},Flat")
    miner = miner_cls(taxonomy, search_params={"nprobe": nprobe}, **kwargs)
    try:
        return miner, miner.refresh(vectors, 0)
    except TypeError as err:
        if "search_params" not in str(err):
            raise
    notes.append("EmbeddingIndex.build took no search_params: nprobe set on the faiss index after the build")
    log.warning(notes[-1])
    miner = miner_cls(taxonomy, **kwargs)
    build = miner._build_index

    def build_with_nprobe(embeddings, epoch):
        index = build(embeddings, epoch)
        faiss.extract_index_ivf(index.faiss_index).nprobe = nprobe
        return index

    miner._build_index = build_with_nprobe
    return miner, miner.refresh(vectors, 0)


# ---------------------------------------------------------------------------------------------
# stage 3: the straightforward per-item reference


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


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = total = 0
    for a_row, e_row in zip(approx, exact):
        e = set(int(x) for x in e_row if x >= 0)
        hits += len(e & set(int(x) for x in a_row if x >= 0))
        total += len(e)
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------
# one size (child process)


def run_size(n: int, args: argparse.Namespace, rec: Recorder, tmp: Path) -> None:
    import faiss
    import torch

    from naics_hnm.data.collate import collate_fn
    from naics_hnm.data.config import SamplingConfig
    from naics_hnm.train.datamodule import NAICSDataModule
    from naics_hnm.index.embedding_index import EmbeddingIndex
    from naics_hnm.mining.miner import HardNegativeMiner
    from naics_hnm.mining.neighbours import guarded_neighbours
    from naics_hnm.tree.synthetic import synthetic_tree
    from naics_hnm.tree.taxonomy import Taxonomy

    res = rec.result
    res["env"] = {"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__,
                  "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                  "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    rng = np.random.default_rng(args.seed)
    csv_path = tmp / f"synthetic_{n}.csv"

    # 0. the small fixture (--small-size codes) whose per-batch work is timed interleaved with N's
    small = None
    with rec.stage("small_fixture") as st:
        small = make_small_fixture(args.small_size, args, tmp / "small", rng)
        st["n"] = args.small_size

    # 1. taxonomy load -----------------------------------------------------------------------
    gen_s, tree = timed(lambda: synthetic_tree(n, depth=(5, 7), seed=args.seed, code_style="letters"))
    write_s, _ = timed(lambda: tree.write_csv(csv_path))
    del tree
    gc.collect()
    csv_mib = csv_path.stat().st_size / 2**20
    res["setup_untimed"] = {"synthetic_tree_s": gen_s, "write_csv_s": write_s, "csv_mib": csv_mib,
                            "rss_mib": current_rss_mib(), "peak_rss_mib": peak_rss_mib()}
    log.info("synthetic tree %d codes: %.2f s, CSV %.2f s (%.1f MiB)", n, gen_s, write_s, csv_mib)
    taxonomy = None
    with rec.stage("load") as st:
        taxonomy = Taxonomy.from_csv(csv_path)
        st["levels"] = np.bincount(taxonomy.depth)[1:].tolist()
        st["max_depth"] = taxonomy.max_depth
        log.info("%r", taxonomy)

    # 2. datamodule prepare + setup ----------------------------------------------------------
    dm = ds = None
    with rec.stage("datamodule", needs=("load",)) as st:
        if st is not None:
            dm = NAICSDataModule(taxonomy=taxonomy, cache_dir=tmp / "cache", batch_size=BATCH,
                                 positive_relations=("levels",), sampling=SamplingConfig(order_filter=True),
                                 seed=args.seed)
            st["tokenizer_s"], _ = timed(dm._tokenizer)
            st["prepare_s"], _ = timed(dm.prepare_data)
            st["setup_s"], _ = timed(lambda: dm.setup("fit"))
            ds = dm.train_dataset
            st["train_items"], st["val_items"] = len(ds), len(dm.val_dataset)
            st["token_width"] = int(dm.token_cache.input_ids.shape[1])
            st["cache_mib"] = dm.cache_path.stat().st_size / 2**20

    # 3. Phase 1 items/s vs the per-item reference and vs the small fixture, interleaved ----------
    batches_for_mining: list[dict] = []
    with rec.stage("phase1", needs=("datamodule",)) as st:
        if st is not None:
            last = dm.phase1_end_epoch - 1
            epochs = sorted({0, last})
            st["epochs"] = epochs
            n_items, n_batches = len(ds), args.batches
            ref_per_batch = max(1, math.ceil(args.ref_items / n_batches))
            all_ids = np.arange(n)
            shares = ds.mix(last)

            def ours(dataset, e: int) -> tuple[float, dict]:
                idx = rng.choice(len(dataset), min(BATCH, len(dataset)), replace=False)
                t0 = time.perf_counter()
                batch = collate_fn(dataset.__getitems__([(e, int(i)) for i in idx]))
                return time.perf_counter() - t0, batch

            def reference(i: int) -> tuple[int, np.ndarray]:
                return reference_item(taxonomy, ds.allowed, all_ids, int(ds.pairs[i, 0]), args.seed, last, int(i),
                                      shares, ds.cfg.level_decay, K, ds.cfg.n_candidates)

            ours(ds, 0)  # warm-up
            reference(0)
            if small is not None:
                ours(small["ds"], 0)
            per_epoch, check_rows, ref_rows, ref_idx, ref_s = {}, [], [], [], 0.0
            for e in epochs:
                times: dict[str, list[float]] = {"ours": [], "small": []}
                for b in range(n_batches):
                    if small is not None and b % 2:
                        sec, batch = ours(small["ds"], e)
                        times["small"].append(sec / len(batch["anchor_idx"]))
                    sec, batch = ours(ds, e)
                    times["ours"].append(sec / len(batch["anchor_idx"]))
                    if b < args.check_batches:
                        check_rows.append((batch["anchor_idx"].numpy(), batch["positive_idx"].numpy(),
                                           batch["candidate_idx"].numpy()))
                    if small is not None and b % 2 == 0:  # order alternates: A B, B A, ...
                        sec, batch = ours(small["ds"], e)
                        times["small"].append(sec / len(batch["anchor_idx"]))
                    if e == last and len(ref_idx) < args.ref_items:
                        for i in rng.choice(n_items, min(ref_per_batch, args.ref_items - len(ref_idx)), replace=False):
                            t0 = time.perf_counter()
                            ref_rows.append(reference(int(i)))
                            ref_s += time.perf_counter() - t0
                            ref_idx.append(int(i))
                row = {"items_per_s": 1 / statistics.mean(times["ours"]),
                       "best_batch_items_per_s": 1 / min(times["ours"])}
                if small is not None:
                    row["small_items_per_s"] = 1 / statistics.mean(times["small"])
                    row["small_best_batch_items_per_s"] = 1 / min(times["small"])
                per_epoch[e] = row
            st["per_epoch"] = {str(e): v for e, v in per_epoch.items()}
            for key in per_epoch[epochs[0]]:
                st[key] = statistics.mean(v[key] for v in per_epoch.values())
            if small is not None:
                st["small_n"] = small["n"]
                st["small_over_n_same_run"] = st["small_items_per_s"] / st["items_per_s"]
                st["small_over_n_same_run_best"] = st["small_best_batch_items_per_s"] / st["best_batch_items_per_s"]
            # straightforward reference, interleaved with our batches of the same (last) epoch
            st["reference_items"] = len(ref_idx)
            st["reference_items_per_s"] = len(ref_idx) / ref_s
            st["ratio_vs_reference"] = per_epoch[last]["items_per_s"] / st["reference_items_per_s"]
            # correctness of our draws (and of the reference's, which must satisfy the same rule)
            a = np.concatenate([r[0] for r in check_rows])
            p = np.concatenate([r[1] for r in check_rows])
            cand = np.concatenate([r[2] for r in check_rows])
            st["check"] = check_negatives(taxonomy, ds.allowed, a, p, cand, order_filter=True)
            st["check"]["no_positive_rows"] = int((p < 0).sum())
            st["check_reference"] = check_negatives(taxonomy, ds.allowed, ds.pairs[np.array(ref_idx), 0],
                                                    np.array([r[0] for r in ref_rows]),
                                                    np.stack([r[1] for r in ref_rows]), order_filter=True)
            # the first Phase 2 epoch's collated batches (their candidate pools) for the mining stage
            batches_for_mining = mining_batches(ds, dm.phase1_end_epoch, args.mine_batches, rng)

    # 4. refresh: flat and IVF --------------------------------------------------------------
    vectors = None
    allowed = ds.allowed if ds is not None else None
    if dm is not None:
        del dm.val_dataset  # not needed below
        dm.val_dataset = None
        gc.collect()
    with rec.stage("embeddings", needs=("load",)) as st:
        if st is not None:
            vectors = tree_vectors(taxonomy, DIM, args.seed)
            st["dim"] = DIM
            st["mib"] = vectors.nbytes / 2**20
            if allowed is None:
                allowed = np.ones(n, dtype=bool)
    flat_miner = flat_index = None
    anchors_all = np.flatnonzero(allowed) if allowed is not None else None
    sample = None
    with rec.stage("refresh_flat", needs=("embeddings",)) as st:
        if st is not None:
            exact_all = n <= args.flat_exact_max
            st["mode"] = "exact, all codes" if exact_all else f"sampled {args.flat_sample} anchors, extrapolated to N"
            if exact_all:
                flat_miner = HardNegativeMiner(taxonomy, allowed=allowed, k=K, neighbours=M, device="cpu")
                t = flat_miner.refresh(vectors, 0)
                flat_index = flat_miner.index
                st["build_s"], st["neighbours_s"] = t["build"], t["neighbours"]
                st["neighbours_measured_s"] = t["neighbours"]
                st["neighbours_anchors"] = len(anchors_all)
            else:
                guard = HardNegativeMiner(taxonomy, allowed=allowed, k=K, neighbours=M, device="cpu").guard
                st["build_s"], flat_index = timed(lambda: EmbeddingIndex.build(
                    vectors, metric="cosine", device="cpu", codes=taxonomy.codes, epoch=0))
                sample = np.sort(rng.choice(anchors_all, min(args.flat_sample, len(anchors_all)), replace=False))
                measured, _ = timed(lambda: guarded_neighbours(flat_index, sample, M, guard=guard))
                st["neighbours_measured_s"] = measured
                st["neighbours_anchors"] = len(sample)
                st["neighbours_s"] = measured * len(anchors_all) / len(sample)
                st["neighbours_extrapolated"] = True
            st["refresh_s"] = st["build_s"] + st["neighbours_s"]
            # reference: one raw faiss search of the same anchors at the guarded pass's first depth
            # (on at most 5,000 of the anchors, scaled to all of them)
            measured_ids = sample if sample is not None else anchors_all
            raw_ids = rng.choice(measured_ids, min(5000, len(measured_ids)), replace=False)
            first_depth = min(n, M + 2 + taxonomy.max_depth)
            raw_s, _ = timed(lambda: flat_index.faiss_index.search(vectors[raw_ids], first_depth))
            st["raw_faiss_s"] = raw_s * len(measured_ids) / len(raw_ids)
            st["guarded_vs_raw"] = st["neighbours_measured_s"] / st["raw_faiss_s"]
            # check: flat lists equal a NumPy brute force on a few anchors
            check_ids = rng.choice(anchors_all, min(args.brute_anchors, len(anchors_all)), replace=False)
            _, ours, _ = guarded_neighbours(flat_index, check_ids, M,
                                            guard=flat_miner.guard if flat_miner is not None else guard)
            equal = 0
            for row, a in zip(ours, check_ids):
                ref = brute_force_neighbours(taxonomy, allowed, vectors, int(a), M)
                equal += int(np.array_equal(np.sort(row[row >= 0]), np.sort(ref)))
            st["brute_force_rows_equal"] = f"{equal}/{len(check_ids)}"
    ivf_miner = None
    nlist = ivf_nlist(n)
    with rec.stage("refresh_ivf", needs=("embeddings",)) as st:
        if st is not None:
            nprobe = args.nprobe or ivf_nprobe(nlist)
            st["factory"], st["nlist"], st["nprobe"] = f"IVF{nlist},Flat", nlist, nprobe
            ivf_miner, t = ivf_refresh(HardNegativeMiner, taxonomy, allowed, vectors, nlist, nprobe, res["notes"])
            st["build_s"], st["neighbours_s"] = t["build"], t["neighbours"]
            st["refresh_s"] = t["build"] + t["neighbours"]
            faiss_index = ivf_miner.index.faiss_index
            st["nprobe_in_index"] = int(faiss.extract_index_ivf(faiss_index).nprobe)
            # reference: raw faiss search of a sample at the guarded pass's first depth, scaled to N
            raw_ids = rng.choice(anchors_all, min(args.flat_sample, len(anchors_all)), replace=False)
            raw_s, _ = timed(lambda: faiss_index.search(vectors[raw_ids], min(n, M + 2 + taxonomy.max_depth)))
            st["raw_faiss_s_scaled"] = raw_s * len(anchors_all) / len(raw_ids)
            st["guarded_vs_raw"] = st["neighbours_s"] / st["raw_faiss_s_scaled"]
    with rec.stage("recall", needs=("refresh_flat", "refresh_ivf")) as st:
        if st is not None:
            pool = sample if sample is not None else anchors_all
            ids = np.sort(rng.choice(pool, min(args.recall_anchors, len(pool)), replace=False))
            _, exact, _ = guarded_neighbours(flat_index, ids, M, guard=ivf_miner.guard)
            approx = ivf_miner.neighbour_ids[torch.from_numpy(ids)].numpy()
            st["anchors"] = len(ids)
            st["recall_at_64"] = recall_at(approx, exact)
            st["ivf_padding"] = int((approx < 0).sum())
            st["exact_padding"] = int((exact < 0).sum())
            st["ivf_invalid"] = check_negatives(taxonomy, allowed, ids, np.full(len(ids), -1), approx,
                                                order_filter=False)["invalid"]
    if flat_miner is not None and ivf_miner is not None:
        # the mining stage uses one miner; drop the other's [N, M] table and index
        res["notes"].append("mining uses the IVF miner's neighbour lists")
        flat_miner = None
    flat_index = None
    gc.collect()

    # 5. per-batch mining, interleaved with the small fixture ---------------------------------
    miner = ivf_miner if ivf_miner is not None else flat_miner
    with rec.stage("mining", needs=("phase1",)) as st:
        if st is not None:
            if miner is None:
                raise RuntimeError("no refreshed miner (both refresh stages failed)")
            st["miner"] = miner.index.index_type
            default_threads = torch.get_num_threads()
            # per batch: torch's default intra-op threads, then 1 thread (as bench_dataloader does)
            modes = {"": default_threads, "_1thread": 1}
            runs = {"": (miner, batches_for_mining)}
            if small is not None:
                runs["small"] = (small["miner"], small["batches"])
            times = {(r, m): {"widen": [], "mine": []} for r in runs for m in modes}
            checks = []

            def one(which: str, b: int) -> tuple[float, float, Any, Any]:
                mnr, batches = runs[which]
                batch = batches[b % len(batches)]
                t0 = time.perf_counter()
                widened = mnr.widen(batch["anchor_idx"], batch["candidate_idx"])
                t1 = time.perf_counter()
                _, ids, _ = mnr.mine(batch["anchor_idx"], batch["positive_idx"], batch["candidate_idx"])
                return t1 - t0, time.perf_counter() - t1, ids, widened

            try:
                for b in range(2):  # warm-up
                    for threads in modes.values():
                        torch.set_num_threads(threads)
                        for which in runs:
                            one(which, b)
                for b in range(len(batches_for_mining)):
                    for mode, threads in modes.items():
                        torch.set_num_threads(threads)
                        for which in (list(runs) if b % 2 == 0 else list(runs)[::-1]):  # A B, then B A
                            w, m_s, ids, widened = one(which, b)
                            times[(which, mode)]["widen"].append(w * 1e3)
                            times[(which, mode)]["mine"].append(m_s * 1e3)
                            if which == "":
                                last_ids, st["widened_width"] = ids, int(widened.shape[1])
                    batch = batches_for_mining[b]
                    checks.append(check_negatives(taxonomy, allowed, batch["anchor_idx"], batch["positive_idx"],
                                                  last_ids, order_filter=True))
            finally:
                torch.set_num_threads(default_threads)
            st["batches"] = len(batches_for_mining)
            st["default_threads"] = default_threads
            for (which, mode), t in times.items():
                prefix = "small_" if which else ""
                st[f"{prefix}widen_ms{mode}"] = statistics.median(t["widen"])
                # mine() widens itself: this is widen + guard + rank
                st[f"{prefix}mine_ms{mode}"] = statistics.median(t["mine"])
                st[f"{prefix}mine_ms_min{mode}"] = min(t["mine"])
            if small is not None:
                for mode in modes:
                    st[f"n_over_small_same_run{mode}"] = st[f"mine_ms{mode}"] / st[f"small_mine_ms{mode}"]
                    st[f"n_over_small_same_run_min{mode}"] = st[f"mine_ms_min{mode}"] / st[f"small_mine_ms_min{mode}"]
            st["check"] = {key: sum(c[key] for c in checks) for key in checks[0]}
    rec.flush()


def child_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [N={args.child}] %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("naics_hnm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rec = Recorder(args.child, Path(args.child_output) if args.child_output else None)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_scale_{args.child}_", dir=args.tmp_dir))
    try:
        run_size(args.child, args, rec, tmp)
    except Exception as err:  # anything outside a stage
        rec.result["errors"]["child"] = f"{type(err).__name__}: {err}"
        log.error("%s", traceback.format_exc())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec.flush()
    print_size(rec.result)


# ---------------------------------------------------------------------------------------------
# reporting (parent)


def _get(res: dict, stage: str, key: str, default: Any = None) -> Any:
    return (res.get("stages", {}).get(stage) or {}).get(key, default)


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def print_size(res: dict) -> None:
    n = res.get("n")
    print(f"\n--- N = {n:,} codes: total {res.get('total_seconds', float('nan')):.1f} s, peak RSS "
          f"{res.get('peak_rss_mib', float('nan')):,.0f} MiB")
    su = res.get("setup_untimed")
    if su:
        print(f"  (untimed) synthetic_tree {su['synthetic_tree_s']:.2f} s, write CSV {su['write_csv_s']:.2f} s "
              f"({su['csv_mib']:.1f} MiB)")
    print(f"  {'stage':<14} {'seconds':>9} {'RSS MiB':>9} {'peak MiB':>9} {'load':>5}  details")
    for name, st in res.get("stages", {}).items():
        details = {k: v for k, v in st.items() if k not in ("seconds", "rss_mib", "peak_rss_mib", "load_avg")}
        text = ", ".join(f"{k}={_short(v)}" for k, v in details.items())
        print(f"  {name:<14} {st['seconds']:>9.2f} {st['rss_mib']:>9,.0f} {st['peak_rss_mib']:>9,.0f} "
              f"{st.get('load_avg', float('nan')):>5.1f}  {text}")
    for name, err in res.get("errors", {}).items():
        print(f"  ERROR {name}: {err}")


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def summary(results: list[dict]) -> list[str]:
    """The table across sizes, plus target lines; returns the lines printed."""
    lines = []
    ok = [r for r in results if r.get("stages")]
    small = min(ok, key=lambda r: r["n"]) if ok else None
    cols = ["N", "load s", "prep s", "setup s", "P1 items/s", "ref items/s", "P1/ref", "P1 2k/N same run",
            "P1 2k/N across runs", "flat build s", "flat nbr s", "IVF", "IVF build s", "IVF nbr s", "recall@64",
            "mine ms", "mine N/2k same run", "mine N/2k across runs", "total s", "peak RSS MiB", "checks", "errors"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in results:
        p1 = _get(r, "phase1", "items_per_s")
        p1_small = _get(small, "phase1", "items_per_s") if small else None
        mine = _get(r, "mining", "mine_ms")
        mine_small = _get(small, "mining", "mine_ms") if small else None
        mine_min = _get(r, "mining", "mine_ms_min")
        mine_min_small = _get(small, "mining", "mine_ms_min") if small else None
        mine1 = _get(r, "mining", "mine_ms_1thread")
        mine1_small = _get(small, "mining", "mine_ms_1thread") if small else None
        p1_best, p1_best_small = (_get(r, "phase1", "best_batch_items_per_s"),
                                  _get(small, "phase1", "best_batch_items_per_s") if small else None)
        flat_nbr = _get(r, "refresh_flat", "neighbours_s")
        flat_txt = _fmt(flat_nbr, ".1f")
        if _get(r, "refresh_flat", "neighbours_extrapolated"):
            flat_txt = (f"~{flat_nbr:.0f} (extrapolated from {_get(r, 'refresh_flat', 'neighbours_measured_s'):.1f} s"
                        f" on {_get(r, 'refresh_flat', 'neighbours_anchors'):,} anchors)")
        bad = sum((_get(r, s, "check") or {}).get("invalid", 0) for s in ("phase1", "mining"))
        bad += (_get(r, "phase1", "check_reference") or {}).get("invalid", 0)
        bad += _get(r, "recall", "ivf_invalid", 0) or 0
        brute = _get(r, "refresh_flat", "brute_force_rows_equal")
        checks = f"{bad} invalid" + (f", brute {brute}" if brute else "")
        nlist = _get(r, "refresh_ivf", "nlist")
        row = [f"{r['n']:,}", _fmt(_get(r, "load", "seconds"), ".2f"),
               _fmt(_get(r, "datamodule", "prepare_s"), ".2f"), _fmt(_get(r, "datamodule", "setup_s"), ".2f"),
               _fmt(p1, ",.0f"), _fmt(_get(r, "phase1", "reference_items_per_s"), ",.1f"),
               _fmt(_get(r, "phase1", "ratio_vs_reference"), ",.0f", ) + ("x" if p1 else ""),
               f"{_fmt(_get(r, 'phase1', 'small_over_n_same_run'), '.2f')}x (best batch "
               f"{_fmt(_get(r, 'phase1', 'small_over_n_same_run_best'), '.2f')}x)",
               (f"{p1_small / p1:.2f}x (best batch {p1_best_small / p1_best:.2f}x)") if p1 and p1_small else "-",
               _fmt(_get(r, "refresh_flat", "build_s"), ".2f"), flat_txt,
               f"{nlist}/{_get(r, 'refresh_ivf', 'nprobe')}" if nlist else "-",
               _fmt(_get(r, "refresh_ivf", "build_s"), ".2f"), _fmt(_get(r, "refresh_ivf", "neighbours_s"), ".1f"),
               _fmt(_get(r, "recall", "recall_at_64"), ".3f"),
               f"{mine:.1f} (min {mine_min:.1f}); 1 thread {mine1:.1f}" if mine else "-",
               (f"{_get(r, 'mining', 'n_over_small_same_run'):.2f}x (min "
                f"{_get(r, 'mining', 'n_over_small_same_run_min'):.2f}x); 1 thread "
                f"{_get(r, 'mining', 'n_over_small_same_run_1thread'):.2f}x (min "
                f"{_get(r, 'mining', 'n_over_small_same_run_min_1thread'):.2f}x)")
               if _get(r, "mining", "n_over_small_same_run") else "-",
               (f"{mine / mine_small:.2f}x (min {mine_min / mine_min_small:.2f}x); 1 thread {mine1 / mine1_small:.2f}x")
               if mine and mine_small else "-",
               _fmt(r.get("total_seconds"), ".0f"), _fmt(r.get("peak_rss_mib"), ",.0f"), checks,
               "; ".join(f"{k}: {v}" for k, v in r.get("errors", {}).items()) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("IVF: nlist/nprobe. P1 items/s: mean of epoch 0 and the last Phase 1 epoch, getitems + "
                 "collate, batch 256; P1/ref: ours / the straightforward per-item reference at the last Phase 1 "
                 "epoch, interleaved. 'same run': each child also builds the pipeline at --small-size codes and "
                 "times its batches interleaved with N's (ratio N-cost / 2k-cost, robust to load from other "
                 "jobs). 'across runs': against the smallest size's own child (best batch: fastest batch of "
                 "each). mine ms: median (min) per batch of 256 of miner.mine (widen + guard + rank) with "
                 "torch's default intra-op threads, then the median with torch.set_num_threads(1); both "
                 "interleaved batch by batch. flat nbr s above --flat-exact-max is an extrapolation from a "
                 "sampled pass (labelled).")
    if small is None:
        return lines
    big = max(ok, key=lambda r: r["n"])
    lines.append(f"\ntargets (largest N={big['n']:,}):")

    def verdict(name: str, value: float | None, target: float, fmt: str, less: bool = True) -> None:
        if value is None:
            lines.append(f"  {name:<72} {'-':>10}  target {'<=' if less else '>='} {target:g}  n/a")
            return
        good = value <= target if less else value >= target
        lines.append(f"  {name:<72} {format(value, fmt):>10}  target {'<=' if less else '>='} {target:g}  "
                     f"{'pass' if good else 'FAIL'}")

    ratios = [_get(r, "phase1", "ratio_vs_reference") for r in ok]
    verdict("Phase 1 ours / straightforward, worst size (x)", min([x for x in ratios if x], default=None),
            TARGETS["phase1_vs_ref"], ".1f", less=False)
    small_n = _get(big, "phase1", "small_n") or _get(big, "small_fixture", "n")
    verdict(f"Phase 1 items/s {small_n:,} / {big['n']:,} codes, same run, mean (x)",
            _get(big, "phase1", "small_over_n_same_run"), TARGETS["phase1_small_vs_large"], ".2f")
    verdict(f"Phase 1 items/s {small_n:,} / {big['n']:,} codes, same run, best batch (x)",
            _get(big, "phase1", "small_over_n_same_run_best"), TARGETS["phase1_small_vs_large"], ".2f")
    for suffix, label in (("", "default threads"), ("_1thread", "1 thread")):
        verdict(f"mining ms/batch {big['n']:,} / {small_n:,}, same run, {label}, median (x)",
                _get(big, "mining", "n_over_small_same_run" + suffix), TARGETS["mine_vs_small"], ".2f")
        verdict(f"mining ms/batch {big['n']:,} / {small_n:,}, same run, {label}, min (x)",
                _get(big, "mining", "n_over_small_same_run_min" + suffix), TARGETS["mine_vs_small"], ".2f")
    verdict("peak RSS of the largest size (GiB)", big.get("peak_rss_mib", 0) / 1024, TARGETS["peak_rss_gib"], ".2f")
    verdict("end to end, largest size (minutes)", big.get("total_seconds", 0) / 60, TARGETS["total_minutes"], ".1f")
    user = [_get(big, s, "seconds") for s in ("load", "datamodule", "refresh_ivf")]
    if all(u is not None for u in user):
        lines.append(f"  (of which what a user runs - load + datamodule + IVF refresh: {sum(user) / 60:.1f} min; "
                     "the rest is the reference, checks, flat index and recall)")
    return lines


def parent_main(args: argparse.Namespace) -> None:
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    print(f"bench_scale: sizes {', '.join(f'{n:,}' for n in sizes)}; one subprocess per size; cpu count "
          f"{os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}; batches {args.batches} x {BATCH}, reference items "
          f"{args.ref_items}, mining batches {args.mine_batches}, d={DIM}, M={M}", flush=True)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.tmp_dir) as tmp:
        for n in sizes:
            out = Path(tmp) / f"result_{n}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--child-output", str(out),
                   *child_flags(args)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            res = json.loads(out.read_text()) if out.exists() else {"n": n, "stages": {}, "errors": {}}
            res["child_wall_seconds"] = wall
            if rc != 0:
                res.setdefault("errors", {})["process"] = (f"child exited with {rc} after {wall:.0f} s"
                                                           + (" (killed: out of memory?)" if rc == -9 else ""))
                print(f"  N={n:,}: child exited with {rc}", flush=True)
            results.append(res)
    lines = summary(results)
    print("\nSummary across sizes\n")
    print("\n".join(lines))
    payload = {"sizes": list(sizes), "argv": sys.argv[1:], "targets": TARGETS, "results": results,
               "summary": lines, "wall_seconds": time.perf_counter() - started,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    from naics_hnm.atomic import atomic_path

    output = Path(args.output)
    with atomic_path(output) as tmp_path:
        tmp_path.write_text(json.dumps(payload, indent=1, default=_plain) + "\n", encoding="utf-8")
    print(f"\nresults: {output}")


CHILD_OPTIONS = ("batches", "check_batches", "ref_items", "mine_batches", "recall_anchors", "flat_sample",
                 "flat_exact_max", "brute_anchors", "small_size", "nprobe", "seed", "tmp_dir")


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in CHILD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (default {DEFAULT_SIZES})")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of codes, one subprocess each")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results (written atomically)")
    parser.add_argument("--batches", type=int, default=20, help="Phase 1 batches of 256 per epoch measured")
    parser.add_argument("--check-batches", type=int, default=4, help="Phase 1 batches per epoch checked for validity")
    parser.add_argument("--ref-items", type=int, default=20, help="items drawn by the straightforward reference")
    parser.add_argument("--mine-batches", type=int, default=50, help="batches of 256 anchors mined")
    parser.add_argument("--recall-anchors", type=int, default=2000)
    parser.add_argument("--flat-sample", type=int, default=20000, help="anchors of the sampled flat neighbour pass")
    parser.add_argument("--flat-exact-max", type=int, default=200_000,
                        help="largest N whose flat neighbour lists are built for every code")
    parser.add_argument("--brute-anchors", type=int, default=50, help="anchors checked against a NumPy brute force")
    parser.add_argument("--small-size", type=int, default=2000,
                        help="codes of the in-process reference whose batches are timed interleaved with N's")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default max(8, nlist / 128))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    parser.add_argument("--tmp-dir", default=None, help="folder for the CSVs and token caches (default: system temp)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("batches", "ref_items", "mine_batches", "recall_anchors", "flat_sample", "brute_anchors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.sizes and min(args.sizes) < 10:
        parser.error(f"--sizes {args.sizes}: expected sizes >= 10")
    if args.child is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
