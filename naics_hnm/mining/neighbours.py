"""Guarded nearest neighbours of indexed codes: the pool-widening lists of Phase 2+. Each anchor's ``m`` most
similar codes that the tree guard keeps come from the index in batches of queries (memory O(batch x depth) beyond
the [N, m] result); rows left short are searched deeper, up to ``max_search``, then padded with -1."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import search_deeper, select_topk_np
from naics_hnm.tree.guard import TreeGuard, guard_tensors

log = logging.getLogger(__name__)

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class NeighbourReport:
    rows: int = 0
    short_rows: int = 0
    searches: int = 0


def first_search_depth(m: int, guard: TreeGuard | None) -> int:
    """Results fetched by an anchor's first search: ``m``, itself, its positive and its ancestors (up to the tree
    depth), scaled up where the guard disallows a share of the codes (held-out codes), with three standard deviations
    of room, so that most rows settle in one search instead of a second one four times as deep."""
    need = m + 2 + (guard.taxonomy.max_depth if guard is not None else 0)
    if guard is None or guard.allowed is None:
        return need
    share = max(float(np.count_nonzero(guard.allowed)) / len(guard.allowed), 1 / 64)
    return int(math.ceil((need + 3 * math.sqrt(need * (1 - share))) / share))


def guarded_neighbours(index: EmbeddingIndex, anchor_ids: np.ndarray, m: int, *, guard: TreeGuard | None = None,
                       batch_size: int = 8192, max_search: int = 4096, search: SearchFn | None = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray, NeighbourReport]:
    """``(scores [B, m], ids [B, m] int32, report)``: each anchor's ``m`` nearest guarded codes, best first; -1 pads.
    Scores follow the index metric (squared distance for l2). ``search(query_ids, k) -> (scores, ids)`` replaces the
    index search (the sharded DDP search plugs in here)."""
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m={m!r}: expected an int >= 1")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
    anchor_ids = np.asarray(anchor_ids, dtype=np.int64)
    n = index.ntotal
    search = search or (lambda rows, k: index.search_ids(rows, k))
    limit = min(n, max(max_search, m + 1))
    first_depth = min(limit, first_search_depth(m, guard))
    out_scores = np.empty((len(anchor_ids), m), dtype=np.float32)
    out_ids = np.empty((len(anchor_ids), m), dtype=np.int32)
    report = NeighbourReport(rows=len(anchor_ids))

    def search_round(rows: np.ndarray, depth: int, last: bool) -> np.ndarray:
        scores, ids = search(anchor_ids[rows], depth)
        report.searches += 1
        keep = guard.keep_mask(anchor_ids[rows], ids) if guard is not None else \
            guard_tensors(torch.from_numpy(anchor_ids[rows]), torch.from_numpy(ids))[0].numpy()
        top_s, top_i = select_topk_np(scores, ids, keep, m, index.metric, ties="id")
        kept = keep.sum(axis=1)
        done = (kept >= m) | last
        out_scores[rows[done]], out_ids[rows[done]] = top_s[done], top_i[done]
        report.short_rows += int((kept[done] < min(m, n - 1)).sum())
        return done

    for start in tqdm(range(0, len(anchor_ids), batch_size), desc="neighbour lists", disable=not progress, leave=False):
        search_deeper(np.arange(start, min(start + batch_size, len(anchor_ids))), first_depth, limit, search_round,
                      factor=4)
    if report.short_rows:
        log.info("neighbour lists: %d of %d codes have fewer than %d guarded neighbours within the first %d "
                 "search results (padded with -1)", report.short_rows, report.rows, m, limit)
    return out_scores, out_ids, report
