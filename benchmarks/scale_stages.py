"""bench_scale's stages for one size (run in the size's own child process), each a short function.

:func:`run_size` runs them in order on a :class:`SizeRun` that carries what later stages need;
each stage is timed by the :class:`Recorder` (seconds, RSS, load) and a failing one is reported
while the stages that do not need it go on.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness import current_rss_mib, peak_rss_mib, recall_at, timed
from scale_main_job import main_job_stage
from scale_reference import (BATCH, DIM, K, M, brute_force_neighbours, check_negatives, make_small_fixture,
                             mining_batches, reference_item, tree_vectors)


@dataclass
class SizeRun:
    """One size's state, filled stage by stage."""

    n: int
    args: argparse.Namespace
    rec: Any
    tmp: Path
    rng: np.random.Generator
    small: dict | None = None
    taxonomy: Any = None
    dm: Any = None
    ds: Any = None
    vectors: np.ndarray | None = None
    allowed: np.ndarray | None = None
    mining_batches: list = field(default_factory=list)
    flat_index: Any = None
    flat_guard: Any = None
    flat_sample: np.ndarray | None = None
    miner: Any = None
    csv_path: Path | None = None

    @property
    def anchors(self) -> np.ndarray:
        return np.flatnonzero(self.allowed)


def run_size(n: int, args: argparse.Namespace, rec: Any, tmp: Path) -> None:
    import faiss
    import torch

    rec.result["env"] = {"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__,
                         "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                         "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]}
    run = SizeRun(n, args, rec, tmp, np.random.default_rng(args.seed))
    with rec.stage("small_fixture") as st:
        run.small = make_small_fixture(args.small_size, args, tmp / "small", run.rng)
        st["n"] = args.small_size
    load_stage(run)
    _stage(run, "datamodule", ("load",), datamodule_stage)
    _stage(run, "phase1", ("datamodule",), phase1_stage)
    release_validation(run)
    _stage(run, "embeddings", ("load",), embeddings_stage)
    _stage(run, "refresh_default", ("embeddings",), refresh_default_stage)
    _stage(run, "refresh_flat", ("embeddings",), refresh_flat_stage)
    _stage(run, "recall", ("refresh_flat", "refresh_default"), recall_stage)
    run.flat_index = None
    gc.collect()
    _stage(run, "mining", ("phase1", "refresh_default"), mining_stage)
    if args.main_job:
        run.taxonomy = run.dm = run.ds = run.miner = run.vectors = run.small = None
        gc.collect()
        _stage(run, "main_job", ("load",),
               lambda r, st: main_job_stage(r.csv_path, r.tmp / "main_job", r.args.seed, st))
    rec.flush()


def _stage(run: SizeRun, name: str, needs: tuple[str, ...], work: Any) -> None:
    """``work(run, st)`` recorded as stage ``name``; skipped (and recorded so) when a stage it needs failed."""
    with run.rec.stage(name, needs=needs) as st:
        if st is not None:
            work(run, st)


def embeddings_stage(run: SizeRun, st: dict) -> None:
    run.vectors = tree_vectors(run.taxonomy, DIM, run.args.seed)
    st["dim"], st["mib"] = DIM, run.vectors.nbytes / 2**20
    if run.allowed is None:
        run.allowed = np.ones(run.n, dtype=bool)


# 1-2. taxonomy load, datamodule


def load_stage(run: SizeRun) -> None:
    from naics_hnm.tree.synthetic import synthetic_tree
    from naics_hnm.tree.taxonomy import Taxonomy

    csv_path = run.csv_path = run.tmp / f"synthetic_{run.n}.csv"
    gen_s, tree = timed(lambda: synthetic_tree(run.n, depth=(5, 7), seed=run.args.seed, code_style="letters"))
    write_s, _ = timed(lambda: tree.write_csv(csv_path))
    tree = None
    gc.collect()
    run.rec.result["setup_untimed"] = {"synthetic_tree_s": gen_s, "write_csv_s": write_s,
                                       "csv_mib": csv_path.stat().st_size / 2**20, "rss_mib": current_rss_mib(),
                                       "peak_rss_mib": peak_rss_mib()}
    with run.rec.stage("load") as st:
        run.taxonomy = Taxonomy.from_csv(csv_path)
        st["levels"] = np.bincount(run.taxonomy.depth)[1:].tolist()
        st["max_depth"] = run.taxonomy.max_depth


def datamodule_stage(run: SizeRun, st: dict) -> None:
    from naics_hnm.data.config import SamplingConfig
    from naics_hnm.train.datamodule import NAICSDataModule

    dm = NAICSDataModule(taxonomy=run.taxonomy, cache_dir=run.tmp / "cache", batch_size=BATCH,
                         positive_relations=("levels",), sampling=SamplingConfig(order_filter=True),
                         seed=run.args.seed)
    st["tokenizer_s"], _ = timed(dm._tokenizer)
    st["prepare_s"], _ = timed(dm.prepare_data)
    st["setup_s"], _ = timed(lambda: dm.setup("fit"))
    run.dm, run.ds, run.allowed = dm, dm.train_dataset, dm.train_dataset.allowed
    st["train_items"], st["val_items"] = len(run.ds), len(dm.val_dataset)
    st["token_width"] = int(dm.token_cache.input_ids.shape[1])
    st["cache_mib"] = dm.cache_path.stat().st_size / 2**20


def release_validation(run: SizeRun) -> None:
    if run.dm is not None:
        run.dm.val_dataset = None  # not needed below
        gc.collect()


# 3. Phase 1 items/s vs the per-item reference and vs the small fixture, interleaved


def _collated(run: SizeRun, dataset, epoch: int) -> tuple[float, dict]:
    from naics_hnm.data.collate import collate_fn

    idx = run.rng.choice(len(dataset), min(BATCH, len(dataset)), replace=False)
    t0 = time.perf_counter()
    batch = collate_fn(dataset.__getitems__([(epoch, int(i)) for i in idx]))
    return time.perf_counter() - t0, batch


def _reference(run: SizeRun, i: int) -> tuple[int, np.ndarray]:
    ds, last = run.ds, run.dm.phase1_end_epoch - 1
    return reference_item(run.taxonomy, ds.allowed, np.arange(run.n), int(ds.pairs[i, 0]), run.args.seed, last,
                          int(i), ds.mix(last), ds.cfg.level_decay, K, ds.cfg.n_candidates)


def _phase1_epoch(run: SizeRun, epoch: int, checked: list, reference: dict) -> dict[str, float]:
    """Batches of ``epoch``, ours and the small fixture's interleaved (A B, B A, ...); at the last
    Phase 1 epoch the straightforward reference draws its items between them."""
    args, small = run.args, run.small
    times: dict[str, list[float]] = {"ours": [], "small": []}
    per_batch = max(1, math.ceil(args.ref_items / args.batches))
    for b in range(args.batches):
        order = ("small", "ours") if b % 2 else ("ours", "small")
        for which in order:
            if which == "small" and small is None:
                continue
            sec, batch = _collated(run, small["ds"] if which == "small" else run.ds, epoch)
            times[which].append(sec / len(batch["anchor_idx"]))
            if which == "ours" and b < args.check_batches:
                checked.append(tuple(batch[k].numpy() for k in ("anchor_idx", "positive_idx", "candidate_idx")))
        if epoch == run.dm.phase1_end_epoch - 1 and len(reference["idx"]) < args.ref_items:
            for i in run.rng.choice(len(run.ds), min(per_batch, args.ref_items - len(reference["idx"])), False):
                seconds, row = timed(lambda: _reference(run, int(i)))
                reference["rows"].append(row)
                reference["idx"].append(int(i))
                reference["seconds"] += seconds
    row = {"items_per_s": 1 / statistics.mean(times["ours"]), "best_batch_items_per_s": 1 / min(times["ours"])}
    if small is not None:
        row["small_items_per_s"] = 1 / statistics.mean(times["small"])
        row["small_best_batch_items_per_s"] = 1 / min(times["small"])
    return row


def phase1_stage(run: SizeRun, st: dict) -> None:
    last = run.dm.phase1_end_epoch - 1
    epochs = sorted({0, last})
    st["epochs"] = epochs
    _collated(run, run.ds, 0)  # warm-up
    _reference(run, 0)
    if run.small is not None:
        _collated(run, run.small["ds"], 0)
    checked: list = []
    reference: dict = {"rows": [], "idx": [], "seconds": 0.0}
    per_epoch = {e: _phase1_epoch(run, e, checked, reference) for e in epochs}
    st["per_epoch"] = {str(e): v for e, v in per_epoch.items()}
    for key in per_epoch[epochs[0]]:
        st[key] = statistics.mean(v[key] for v in per_epoch.values())
    if run.small is not None:
        st["small_n"] = run.small["n"]
        st["small_over_n_same_run"] = st["small_items_per_s"] / st["items_per_s"]
        st["small_over_n_same_run_best"] = st["small_best_batch_items_per_s"] / st["best_batch_items_per_s"]
    st["reference_items"] = len(reference["idx"])
    st["reference_items_per_s"] = len(reference["idx"]) / reference["seconds"]
    st["ratio_vs_reference"] = per_epoch[last]["items_per_s"] / st["reference_items_per_s"]
    a, p, cand = (np.concatenate([r[j] for r in checked]) for j in range(3))
    st["check"] = check_negatives(run.taxonomy, run.ds.allowed, a, p, cand, order_filter=True)
    st["check"]["no_positive_rows"] = int((p < 0).sum())
    st["check_reference"] = check_negatives(
        run.taxonomy, run.ds.allowed, run.ds.pairs[np.array(reference["idx"]), 0],
        np.array([r[0] for r in reference["rows"]]), np.stack([r[1] for r in reference["rows"]]), order_filter=True)
    run.mining_batches = mining_batches(run.ds, run.dm.phase1_end_epoch, run.args.mine_batches, run.rng)


# 4. refresh: the library's default index (chosen from N), then exact flat lists as the reference


def refresh_default_stage(run: SizeRun, st: dict) -> None:
    """``HardNegativeMiner(taxonomy).refresh`` at its defaults (or ``--index-factory``/``--nprobe``)."""
    from naics_hnm.index.auto import auto_nlist
    from naics_hnm.mining.miner import HardNegativeMiner

    factory, params = run.args.index_factory, None
    if run.args.nprobe:
        factory, params = factory or f"IVF{auto_nlist(run.n)},Flat", {"nprobe": run.args.nprobe}
    miner = HardNegativeMiner(run.taxonomy, allowed=run.allowed, k=K, neighbours=M, device="cpu",
                              index_factory=factory, search_params=params)
    seconds, t = timed(lambda: miner.refresh(run.vectors, 0))
    st["factory"], st["search_params"] = miner.index.index_type, miner.index.search_params
    st["chosen"] = "given" if factory else "default (chosen from N)"
    st["build_s"], st["neighbours_s"], st["refresh_s"] = t["build"], t["neighbours"], seconds
    run.miner = miner


def refresh_flat_stage(run: SizeRun, st: dict) -> None:
    """Exact guarded lists: every code up to ``--flat-exact-max``, else a sample extrapolated to N."""
    from naics_hnm.index.embedding_index import EmbeddingIndex
    from naics_hnm.mining.neighbours import guarded_neighbours
    from naics_hnm.tree.guard import TreeGuard

    anchors = run.anchors
    run.flat_guard = TreeGuard(run.taxonomy, run.allowed)
    st["build_s"], run.flat_index = timed(lambda: EmbeddingIndex.build(run.vectors, device="cpu"))
    exact_all = run.n <= run.args.flat_exact_max
    sample = anchors if exact_all else np.sort(run.rng.choice(anchors, min(run.args.flat_sample, len(anchors)),
                                                              replace=False))
    measured, _ = timed(lambda: guarded_neighbours(run.flat_index, sample, M, guard=run.flat_guard))
    st["mode"] = "exact, all codes" if exact_all else f"sampled {len(sample)} anchors, extrapolated to N"
    st["neighbours_measured_s"], st["neighbours_anchors"] = measured, len(sample)
    st["neighbours_s"] = measured * len(anchors) / len(sample)
    st["neighbours_extrapolated"] = not exact_all
    st["refresh_s"] = st["build_s"] + st["neighbours_s"]
    run.flat_sample = sample
    check = run.rng.choice(anchors, min(run.args.brute_anchors, len(anchors)), replace=False)
    _, ours, _ = guarded_neighbours(run.flat_index, check, M, guard=run.flat_guard)
    equal = sum(int(np.array_equal(np.sort(row[row >= 0]),
                                   np.sort(brute_force_neighbours(run.taxonomy, run.allowed, run.vectors, int(a), M))))
                for row, a in zip(ours, check))
    st["brute_force_rows_equal"] = f"{equal}/{len(check)}"


def recall_stage(run: SizeRun, st: dict) -> None:
    """recall@64 of the default refresh's guarded lists against the exact flat ones."""
    import torch

    from naics_hnm.mining.neighbours import guarded_neighbours

    ids = np.sort(run.rng.choice(run.flat_sample, min(run.args.recall_anchors, len(run.flat_sample)), replace=False))
    _, exact, _ = guarded_neighbours(run.flat_index, ids, M, guard=run.flat_guard)
    approx = run.miner.neighbour_ids[torch.from_numpy(ids)].numpy()
    st["anchors"] = len(ids)
    st["recall_at_64"] = recall_at(approx, exact)
    st["default_padding"], st["exact_padding"] = int((approx < 0).sum()), int((exact < 0).sum())
    st["default_invalid"] = check_negatives(run.taxonomy, run.allowed, ids, np.full(len(ids), -1), approx,
                                            order_filter=False)["invalid"]


# 5. per-batch mining, interleaved with the small fixture


def _mine_once(miner, batch: dict) -> tuple[float, float, Any, Any]:
    t0 = time.perf_counter()
    widened = miner.widen(batch["anchor_idx"], batch["candidate_idx"])
    t1 = time.perf_counter()
    _, ids, _ = miner.mine(batch["anchor_idx"], batch["positive_idx"], batch["candidate_idx"])
    return t1 - t0, time.perf_counter() - t1, ids, widened


def _mining_times(run: SizeRun, st: dict, modes: dict[str, int]) -> tuple[dict, list]:
    """Per batch, each thread mode, N's miner and the small fixture's in alternating order (A B, B A)."""
    import torch

    runs = {"": (run.miner, run.mining_batches)}
    if run.small is not None:
        runs["small"] = (run.small["miner"], run.small["batches"])
    times = {(r, m): {"widen": [], "mine": []} for r in runs for m in modes}
    checks = []
    for b in range(2):  # warm-up
        for threads in modes.values():
            torch.set_num_threads(threads)
            for miner, batches in runs.values():
                _mine_once(miner, batches[b % len(batches)])
    for b, batch in enumerate(run.mining_batches):
        for mode, threads in modes.items():
            torch.set_num_threads(threads)
            for which in (list(runs) if b % 2 == 0 else list(runs)[::-1]):
                miner, batches = runs[which]
                w, m_s, ids, widened = _mine_once(miner, batches[b % len(batches)])
                times[(which, mode)]["widen"].append(w * 1e3)
                times[(which, mode)]["mine"].append(m_s * 1e3)
                if which == "":
                    last_ids, st["widened_width"] = ids, int(widened.shape[1])
        checks.append(check_negatives(run.taxonomy, run.allowed, batch["anchor_idx"], batch["positive_idx"],
                                      last_ids, order_filter=True))
    return times, checks


def mining_stage(run: SizeRun, st: dict) -> None:
    import torch

    st["miner"] = run.miner.index.index_type
    default_threads = torch.get_num_threads()
    modes = {"": default_threads, "_1thread": 1}
    try:
        times, checks = _mining_times(run, st, modes)
    finally:
        torch.set_num_threads(default_threads)
    st["batches"], st["default_threads"] = len(run.mining_batches), default_threads
    for (which, mode), t in times.items():
        prefix = "small_" if which else ""
        st[f"{prefix}widen_ms{mode}"] = statistics.median(t["widen"])
        st[f"{prefix}mine_ms{mode}"] = statistics.median(t["mine"])  # mine() widens itself: widen + guard + rank
        st[f"{prefix}mine_ms_min{mode}"] = min(t["mine"])
    if run.small is not None:
        for mode in modes:
            st[f"n_over_small_same_run{mode}"] = st[f"mine_ms{mode}"] / st[f"small_mine_ms{mode}"]
            st[f"n_over_small_same_run_min{mode}"] = st[f"mine_ms_min{mode}"] / st[f"small_mine_ms_min{mode}"]
    st["check"] = {key: sum(c[key] for c in checks) for key in checks[0]}
