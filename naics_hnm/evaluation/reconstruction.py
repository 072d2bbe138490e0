"""Tree reconstruction (Nickel & Kiela 2017): do a code's ancestors and descendants rank above the rest?

Relevant codes of a query ``u``: its proper ancestors and descendants, among all codes ranked by cosine.
**Mean rank**: over (query, relevant ``v``) pairs, ``1 +`` the non-relevant codes at or above ``v`` (1 is perfect).
**MAP**: the mean over queries of the mean precision at each relevant code. Ties count against the embedding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from naics_hnm.evaluation.rows import WIDE_BLOCK, as_unit_rows, comparable, sample_codes
from naics_hnm.tree.taxonomy import Taxonomy


FEW_RELEVANT = 32  # up to this many relevant codes, count the codes at or above each instead of sorting the row


def _relevant(taxonomy: Taxonomy, u: int) -> np.ndarray:
    """Proper ancestors and proper descendants of ``u``."""
    ancestors = taxonomy.ancestor_path[u, 1 : taxonomy.depth[u]].astype(np.int64)
    return np.concatenate([ancestors, taxonomy.dfs_order[taxonomy.pre[u] + 1 : taxonomy.end[u]]])


def _query_scores(similarity: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, float]:
    """One query's ranks of its relevant codes among the others, and its average precision (itself at -inf)."""
    scores = similarity[relevant]
    if scores.size <= FEW_RELEVANT:  # one pass per relevant code beats sorting the row
        at_or_above = np.array([np.count_nonzero(similarity >= s) for s in scores.tolist()], dtype=np.int64)
    else:
        at_or_above = similarity.size - np.searchsorted(np.sort(similarity), scores, side="left")
    relevant_at_or_above = scores.size - np.searchsorted(np.sort(scores), scores, side="left")
    ranks = 1 + at_or_above - relevant_at_or_above
    return ranks, float(np.mean(relevant_at_or_above / at_or_above))


def reconstruction(embeddings: Any, taxonomy: Taxonomy, *, max_queries: int | None = 1000,
                   seed: int = 0) -> dict[str, float]:
    """``{"mean_rank", "map", "queries"}`` of tree reconstruction; a seeded sample of queries above ``max_queries``."""
    unit = as_unit_rows(embeddings, len(taxonomy))
    n = len(taxonomy)
    has_relevant = (taxonomy.depth > 1) | (taxonomy.end - taxonomy.pre > 1)
    queries = sample_codes(np.flatnonzero(has_relevant).astype(np.int64), max_queries, seed, "max_queries")
    if queries.size == 0:
        raise ValueError("no code has an ancestor or a descendant (a flat list of codes); reconstruction is undefined")
    rows = max(1, WIDE_BLOCK // n)  # rows against all N codes: the corpus is read once per chunk
    rank_sum, rank_count, precisions = 0.0, 0, []
    for start in range(0, queries.size, rows):
        chunk = queries[start : start + rows]
        similarity = comparable(unit[chunk] @ unit.T)
        similarity[np.arange(chunk.size), chunk] = -np.inf
        for row, u in enumerate(chunk.tolist()):
            ranks, average_precision = _query_scores(similarity[row], _relevant(taxonomy, u))
            rank_sum += float(ranks.sum())
            rank_count += ranks.size
            precisions.append(average_precision)
    return {"mean_rank": rank_sum / rank_count, "map": float(np.mean(precisions)), "queries": float(queries.size)}
