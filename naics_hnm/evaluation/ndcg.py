"""NDCG@k with graded tree gains, in query chunks: the ideal DCG from subtree counts, no query x corpus relation."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from naics_hnm.evaluation.nearest import nearest_columns
from naics_hnm.evaluation.rows import BLOCK, as_unit_rows, sample_codes, select_codes, subtree_counter
from naics_hnm.tree.taxonomy import Taxonomy


def _ideal_dcg(taxonomy: Taxonomy, queries: np.ndarray, corpus: np.ndarray, cum_discount: np.ndarray) -> np.ndarray:
    """Ideal DCG per query from subtree counts, O(queries x depth).

    ``at_least[:, t]``: corpus codes (not the query) under the query's depth-t ancestor; as the gain ``2**t - 1``
    is the sum of ``2**(s-1)`` for s <= t, each t adds ``2**(t-1)`` on the first ``min(at_least, k)`` ranks.
    """
    k = cum_discount.size - 1
    path = taxonomy.ancestor_path[queries].astype(np.int64)  # [Q, D+1], column 0 the root (N)
    at_least = subtree_counter(taxonomy, corpus)(path)
    at_least -= (np.isin(queries, corpus)[:, None] & (path >= 0)).astype(np.int64)
    weights = 2.0 ** np.arange(taxonomy.max_depth)
    return cum_discount[np.minimum(at_least[:, 1:], k)] @ weights


def _ndcg(unit: np.ndarray, taxonomy: Taxonomy, queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    k = min(k, corpus.size)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = _ideal_dcg(taxonomy, queries, corpus, np.concatenate([[0.0], np.cumsum(discount)]))
    top = corpus[nearest_columns(unit, queries, corpus, k)]  # a query never ranks itself
    rows = max(1, BLOCK // (k * (taxonomy.max_depth + 1)))
    dcg = np.empty(queries.size, dtype=np.float64)
    for start in range(0, queries.size, rows):
        chunk, chunk_top = queries[start : start + rows], top[start : start + rows]
        gains = np.exp2(taxonomy.lca_depth(chunk[:, None], chunk_top).astype(np.float64)) - 1.0
        gains[chunk_top == chunk[:, None]] = 0.0
        dcg[start : start + chunk.size] = gains @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def ndcg_per_query(embeddings: Any, taxonomy: Taxonomy, query_ids: Sequence[int] | np.ndarray | None = None,
                   corpus_ids: Sequence[int] | np.ndarray | None = None, k: int = 10, *,
                   depth: int | None = None) -> np.ndarray:
    """NDCG@k of each query (NaN where the ideal DCG is 0, i.e. the query is skipped).

    Queries and corpus default to the codes at ``depth``, or the leaves. Each query ranks the other corpus codes
    by cosine (:func:`comparable`; ties: lower corpus position first); gain ``2 ** lca_depth(query, code) - 1``
    (root 0, top level 1, ...), discount ``1 / log2(rank + 1)`` with ranks from 1.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}; expected a positive integer")
    unit = as_unit_rows(embeddings, len(taxonomy))
    queries = select_codes(taxonomy, query_ids, depth, "query_ids")
    corpus = select_codes(taxonomy, corpus_ids, depth, "corpus_ids")
    return _ndcg(unit, taxonomy, queries, corpus, int(k))


def ndcg_at_k(embeddings: Any, taxonomy: Taxonomy, query_ids: Sequence[int] | np.ndarray | None = None,
              corpus_ids: Sequence[int] | np.ndarray | None = None, k: int = 10, *, depth: int | None = None,
              max_queries: int | None = None, seed: int = 0) -> float:
    """Mean NDCG@k over queries with a non-zero ideal DCG (:func:`ndcg_per_query`); a sample above ``max_queries``."""
    queries = sample_codes(select_codes(taxonomy, query_ids, depth, "query_ids"), max_queries, seed, "max_queries")
    per_query = ndcg_per_query(embeddings, taxonomy, queries, corpus_ids, k, depth=depth)
    scored = per_query[~np.isnan(per_query)]
    if scored.size == 0:
        raise ValueError("no query has a related corpus code (every ideal DCG is 0); NDCG is undefined")
    return float(scored.mean())
