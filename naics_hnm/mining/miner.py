"""HardNegativeMiner: the Phase 2+ miner without Lightning (:mod:`naics_hnm.train.callback` is thin hooks around it).
``miner.refresh(embeddings_of_every_code, epoch)`` indexes every code and builds guarded neighbour lists;
``scores, ids, stats = miner.mine(anchor_ids, positive_ids, pool_ids)`` returns the k hardest of each widened pool."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naics_hnm.index.auto import build_index, choose_index
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import DEVICES, as_id_tensor, duplicate_mask, like_input
from naics_hnm.index.metric import METRICS
from naics_hnm.index.sharded_search import Shard
from naics_hnm.mining.candidates import mine_candidates
from naics_hnm.mining.neighbours import guarded_neighbours
from naics_hnm.mining.shared_refresh import SharedRefresh
from naics_hnm.tree.guard import GuardStats, TreeGuard
from naics_hnm.tree.taxonomy import Taxonomy

log = logging.getLogger(__name__)


def compact_unique(ids: torch.Tensor) -> torch.Tensor:
    """Drop repeated ids within each row (first occurrence wins) and move valid ids to the front."""
    ids = ids.masked_fill(duplicate_mask(ids), -1)
    front = torch.sort((ids < 0).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, front)


def check_miner_args(call: str, *, k: Any, metric: Any, relative_margin: Any, neighbours: Any, device: Any,
                     index_factory: Any, search_params: Any) -> None:
    """Validate the miner's settings; errors quote ``call`` (the miner's or the callback's name)."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"{call}(k={k!r}): expected an int >= 1")
    if metric not in METRICS:
        raise ValueError(f"{call}(metric={metric!r}): expected one of {METRICS}")
    if relative_margin is not None and not (isinstance(relative_margin, (int, float)) and 0.0 <= relative_margin < 1.0):
        raise ValueError(f"{call}(relative_margin={relative_margin!r}): expected None or a number in [0, 1)")
    if not (isinstance(neighbours, int) and neighbours >= 0):
        raise ValueError(f"{call}(neighbours={neighbours!r}): expected an int >= 0")
    if device not in DEVICES:
        raise ValueError(f"{call}(device={device!r}): expected one of {DEVICES}")
    if index_factory is not None and not (isinstance(index_factory, str) and index_factory.strip()):
        raise ValueError(f"{call}(index_factory={index_factory!r}): expected None or a faiss factory string")
    if search_params is not None and not isinstance(search_params, dict):
        raise TypeError(f"{call}(search_params={search_params!r}): expected None or a dict such as {{'nprobe': 64}}")


class HardNegativeMiner:
    """Index the current embeddings of every code and mine guarded hard negatives per batch.

    Args:
        taxonomy: the code tree (ids are its dense indices).
        allowed: optional bool [N]; codes outside it are never mined (held-out codes).
        k: negatives per anchor. metric: "cosine", "ip" or "l2".
        relative_margin: positive-aware margin (drop candidates above ``(1 - m) * sim(anchor, positive)``); None: off.
        order_filter: keep only codes whose LCA with the anchor is shallower than the positive's.
        neighbours: M nearest guarded codes per anchor added to each pool (0: rank the pool only).
        index_factory, search_params: a faiss factory (e.g. "IVF4096,Flat", {"nprobe": 64}; "Flat": exact);
            None: :func:`naics_hnm.index.auto.choose_index` picks from the number of codes.
        device: "auto" (faiss GPU when available, logged), "cpu" or "cuda".
        shard, shared_dir: under DDP, the index and neighbour lists are files in ``shared_dir`` mapped read-only by
            every rank; ``refresh`` and :meth:`refresh_local` are then collectives (:mod:`.shared_refresh`)."""

    def __init__(self, taxonomy: Taxonomy, *, allowed: np.ndarray | None = None, k: int = 8,
                 metric: str = "cosine", relative_margin: float | None = 0.05, order_filter: bool = True,
                 neighbours: int = 64, index_factory: str | None = None, search_params: dict | None = None,
                 device: str = "auto", neighbour_batch_size: int = 32768, max_search: int = 4096,
                 shard: Shard | None = None, shared_dir: str | Path | None = None) -> None:
        if not isinstance(taxonomy, Taxonomy):
            raise TypeError(f"HardNegativeMiner(taxonomy={type(taxonomy).__name__}): expected a Taxonomy")
        check_miner_args("HardNegativeMiner", k=k, metric=metric, relative_margin=relative_margin,
                         neighbours=neighbours, device=device, index_factory=index_factory, search_params=search_params)
        self.guard = TreeGuard(taxonomy, allowed)
        self.k = k
        self.metric = metric
        self.neighbours = neighbours
        self.device = device
        self.relative_margin = None if relative_margin is None else float(relative_margin)
        self.order_filter = bool(order_filter)
        self.index_factory = index_factory
        self.search_params = dict(search_params) if search_params else None
        self.neighbour_batch_size, self.max_search = neighbour_batch_size, max_search
        if shard is not None and shared_dir is None:
            raise ValueError("HardNegativeMiner(shard=...): expected shared_dir= too, a folder every rank can read")
        self.shard = shard
        self.shared = None if shard is None else SharedRefresh(shard, Path(shared_dir), metric)
        self._shared_name: str | None = None
        self._refreshes = 0
        self.index: EmbeddingIndex | None = None
        self.neighbour_ids: torch.Tensor | np.ndarray | None = None  # a read-only mapped array under DDP
        self._listed: np.ndarray | None = None  # bool [N]: rows of neighbour_ids computed (one process)
        self.epoch: int | None = None
        self.last_timings: dict[str, float] = {}

    @property
    def taxonomy(self) -> Taxonomy:
        return self.guard.taxonomy

    def _anchors(self, anchors: Any = None) -> np.ndarray:
        """The rows to list: ``anchors`` (default: every code) that the guard allows, sorted, distinct."""
        n = len(self.taxonomy)
        rows = np.arange(n) if anchors is None else np.unique(as_id_tensor(anchors, "anchors", "cpu", 1).numpy())
        return rows if self.guard.allowed is None else rows[self.guard.allowed[rows]]

    def refresh(self, embeddings: Any, epoch: int | None = None, *, anchors: Any = None,
                progress: bool = False) -> dict[str, float]:
        """Index ``embeddings`` (float [N, d], row i = code i) and rebuild the neighbour lists; returns the seconds
        spent on each. ``anchors``: the codes whose lists are built now (default: every allowed code). In one
        process another anchor's list is built when :meth:`widen` first needs it; under DDP only the given anchors
        are widened."""
        n = len(self.taxonomy)
        if tuple(getattr(embeddings, "shape", ())[:1]) != (n,):
            raise ValueError(f"refresh(embeddings of shape {tuple(getattr(embeddings, 'shape', ()))}): expected "
                             f"[{n}, d], one row per code of the taxonomy")
        if self.shard is not None:
            lo, hi = self.shard.rows(n)
            return self.refresh_local(embeddings[lo:hi], epoch, anchors=anchors, progress=progress)
        t0 = time.perf_counter()
        index, _ = build_index(embeddings, choose_index(n, self.index_factory), search_params=self.search_params,
                               metric=self.metric, device=self.device, codes=self.taxonomy.codes, epoch=epoch)
        t1 = time.perf_counter()
        table = listed = None
        if self.neighbours:  # built aside: a refresh that fails leaves the previous index and lists in place
            table = torch.full((n, self.neighbours), -1, dtype=torch.int32, device=index.vectors.device)
            listed = np.zeros(n, dtype=bool)
            self._list(index, table, listed, self._anchors(anchors), progress)
        t2 = time.perf_counter()
        self.index, self.neighbour_ids, self._listed, self.epoch = index, table, listed, epoch
        self.last_timings = {"build": t1 - t0, "neighbours": t2 - t1}
        return dict(self.last_timings)

    def _list(self, index: EmbeddingIndex, table: torch.Tensor, listed: np.ndarray, anchors: np.ndarray,
              progress: bool = False) -> None:
        """Write the neighbour lists of ``anchors`` (sorted allowed ids) into ``table`` and mark them ``listed``."""
        _, ids, _ = guarded_neighbours(index, anchors, self.neighbours, guard=self.guard, progress=progress,
                                       batch_size=self.neighbour_batch_size, max_search=self.max_search)
        table[torch.from_numpy(anchors).to(table.device)] = torch.from_numpy(ids).to(table.device)
        listed[anchors] = True

    def refresh_local(self, rows: Any, epoch: int | None = None, *, anchors: Any = None,
                      progress: bool = False) -> dict[str, float]:
        """Under DDP (``shard`` given), a collective over this rank's rows ``shard.rows(N)`` of the embeddings:
        every rank maps the index and neighbour lists one process builds from the whole matrix."""
        if self.shared is None:
            raise RuntimeError("HardNegativeMiner.refresh_local() needs shard= (DDP); use refresh() in one process")
        n = len(self.taxonomy)
        self._refreshes += 1
        name = f"epoch{epoch:04d}" if epoch is not None else f"refresh{self._refreshes:04d}"
        t0 = time.perf_counter()
        index = self.shared.index(rows, n, name, index_factory=self.index_factory, search_params=self.search_params,
                                  codes=self.taxonomy.codes, epoch=epoch)
        t1 = time.perf_counter()
        neighbour_ids = None
        if self.neighbours:
            neighbour_ids = self.shared.neighbours(index, self._anchors(anchors), self.neighbours, name,
                                                   guard=self.guard, batch_size=self.neighbour_batch_size,
                                                   max_search=self.max_search, progress=progress)
        t2 = time.perf_counter()
        if self._shared_name not in (None, name):
            self.shared.remove(self._shared_name)
        self._shared_name = name
        self.index, self.neighbour_ids, self.epoch = index, neighbour_ids, epoch
        self.last_timings = {"build": t1 - t0, "neighbours": t2 - t1}
        return dict(self.last_timings)

    def own_rows(self) -> tuple[int, int]:
        """The code rows ``[lo, hi)`` this rank reports on (all of them in one process)."""
        n = len(self.taxonomy)
        return (0, n) if self.shard is None else self.shard.rows(n)

    def neighbour_rows(self, anchors: torch.Tensor) -> torch.Tensor:
        """int64 [B, M] neighbour lists of ``anchors`` (gathered from the mapped table under DDP)."""
        if self._listed is not None:  # one process: lists not built at the refresh are built on first use
            ids = anchors.cpu().numpy()
            todo = self._anchors(ids[~self._listed[ids]])
            if len(todo):
                self._list(self.index, self.neighbour_ids, self._listed, todo)
        if isinstance(self.neighbour_ids, torch.Tensor):
            return self.neighbour_ids[anchors].to(torch.int64)
        return torch.from_numpy(self.neighbour_ids[anchors.cpu().numpy()].astype(np.int64)).to(anchors.device)

    def widen(self, anchors: Any, pool: Any = None) -> torch.Tensor:
        """Each anchor's pool [B, C] (-1 pads; None: empty) plus its neighbours, repeats removed."""
        if self.index is None:
            raise RuntimeError("HardNegativeMiner.widen() before refresh(): index the embeddings first")
        device = self.index.vectors.device
        anchors = as_id_tensor(anchors, "anchor_ids", device, 1)
        pool = torch.empty((len(anchors), 0), dtype=torch.int64, device=device) if pool is None \
            else as_id_tensor(pool, "pool", device, 2)
        if self.neighbour_ids is None:
            return pool
        return compact_unique(torch.cat([pool, self.neighbour_rows(anchors)], dim=1))

    def mine(self, anchors: Any, positives: Any, pool: Any = None, *,
             widen: bool = True) -> tuple[Any, Any, GuardStats]:
        """``(scores [B, k], ids [B, k], stats)``: the k hardest guarded codes of each widened pool: never the anchor,
        its positive (-1: none), an ancestor, a descendant or a disallowed code, nor (with the order filter) a code as
        near as the positive, nor one above the margin. Numpy or torch like ``anchors``."""
        if self.index is None:
            raise RuntimeError("HardNegativeMiner.mine() before refresh(): index the embeddings first")
        candidates = self.widen(anchors, pool) if widen else pool
        scores, ids, stats = mine_candidates(
            self.index, anchors, candidates, k=self.k, positive_ids=positives, relative_margin=self.relative_margin,
            taxonomy=self.guard, order_filter=self.order_filter, return_stats=True)
        return (*like_input(anchors, torch.as_tensor(scores), torch.as_tensor(ids)), stats)

    def state_dict(self) -> dict[str, Any]:
        """Plain values only: what was refreshed when (the embeddings themselves live in files)."""
        return {"epoch": self.epoch, "k": self.k, "metric": self.metric, "neighbours": self.neighbours,
                "index_factory": self.index_factory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state.get("epoch")
