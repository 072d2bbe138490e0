"""Taxonomy-aware quality of code embeddings: cophenetic correlation, NDCG@k and held-out placement.

All metrics work on cosine similarity of L2-normalised rows (row ``i`` embeds code ``i``) and, by
default, on the codes at the deepest level of the taxonomy (NAICS: the 1,012 six-digit codes). The
tree is the taxonomy's: distance counts edges through the lowest common ancestor (LCA), and the
LCA depth is 0 when only the virtual root is shared.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from naics_hnm.taxonomy import Taxonomy

logger = logging.getLogger(__name__)

_QUERY_CHUNK = 1024


def as_unit_rows(embeddings: Any, n_codes: int) -> np.ndarray:
    """Validate ``embeddings`` [n_codes, d] (numpy or torch) and return float64 unit rows."""
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().float().numpy()
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != n_codes:
        raise ValueError(
            f"embeddings have shape {tuple(array.shape)}; expected [{n_codes}, d] "
            f"(one row per code of a taxonomy with {n_codes} codes)"
        )
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"embeddings row {int(np.argmin(finite))} holds NaN or inf; expected finite values")
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise ValueError(f"embeddings row {int(np.argmin(norms))} is all zeros; cosine similarity needs a non-zero row")
    return array / norms[:, None]


def _select(taxonomy: Taxonomy, ids: Sequence[int] | np.ndarray | None, depth: int | None, what: str) -> np.ndarray:
    """Code indices to evaluate: ``ids`` if given, else every code at ``depth`` (default deepest)."""
    n = len(taxonomy)
    if ids is None:
        depth = int(taxonomy.depth.max()) if depth is None else depth
        selected = taxonomy.level(depth)
        if selected.size == 0:
            raise ValueError(f"{what}: no codes at depth {depth}; expected 1..{int(taxonomy.depth.max())}")
        return selected
    selected = np.asarray(ids, dtype=np.int64).reshape(-1)
    if selected.size == 0:
        raise ValueError(f"{what} is empty; expected at least one code index")
    bad = (selected < 0) | (selected >= n)
    if bad.any():
        raise ValueError(f"{what} holds index {int(selected[np.argmax(bad)])}; expected 0..{n - 1}")
    if np.unique(selected).size != selected.size:
        raise ValueError(f"{what} holds duplicate code indices; expected each code at most once")
    return selected


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    if denominator == 0:
        logger.warning("correlation undefined: one side is constant over all pairs")
        return float("nan")
    return float((x @ y) / denominator)


def cophenetic_correlation(
    embeddings: Any,
    taxonomy: Taxonomy,
    ids: Sequence[int] | np.ndarray | None = None,
    *,
    depth: int | None = None,
    max_codes: int = 4000,
    seed: int = 0,
) -> dict[str, float]:
    """Pearson and Spearman correlation of cosine distance with tree distance over all code pairs.

    Pairs are the unordered pairs (upper triangle) of ``ids``, default the codes at ``depth``
    (default: the deepest level); above ``max_codes`` codes a seeded sample of that many is used,
    so the pair count stays bounded whatever the taxonomy's size. Returns
    ``{"pearson": ..., "spearman": ...}``.
    """
    unit = as_unit_rows(embeddings, len(taxonomy))
    selected = _select(taxonomy, ids, depth, "ids")
    if selected.size > max_codes:
        selected = np.sort(np.random.default_rng(seed).choice(selected, max_codes, replace=False))
    if selected.size < 3:
        raise ValueError(f"cophenetic correlation needs at least 3 codes, got {selected.size}")
    x = unit[selected]
    upper = np.triu_indices(selected.size, k=1)
    cosine_distance = 1.0 - (x @ x.T)[upper]
    tree = taxonomy.tree_distance(selected[upper[0]], selected[upper[1]]).astype(np.float64)
    return {
        "pearson": _pearson(cosine_distance, tree),
        "spearman": _pearson(average_ranks(cosine_distance), average_ranks(tree)),
    }


def ndcg_per_query(
    embeddings: Any,
    taxonomy: Taxonomy,
    query_ids: Sequence[int] | np.ndarray | None = None,
    corpus_ids: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    *,
    depth: int | None = None,
) -> np.ndarray:
    """NDCG@k of each query (NaN where the ideal DCG is 0, i.e. the query is skipped).

    Each query ranks every other corpus code by cosine similarity (ties: lower corpus position
    first). The gain of a corpus code is ``2 ** lca_depth(query, code) - 1`` (root 0, sector 1, ...,
    five-digit parent 15); the discount is ``1 / log2(rank + 1)`` with ranks from 1; the ideal DCG
    sorts the same gains (the query itself excluded) in descending order.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}; expected a positive integer")
    unit = as_unit_rows(embeddings, len(taxonomy))
    queries = _select(taxonomy, query_ids, depth, "query_ids")
    corpus = _select(taxonomy, corpus_ids, depth, "corpus_ids")
    k = min(int(k), corpus.size)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    result = np.empty(queries.size, dtype=np.float64)
    for start in range(0, queries.size, _QUERY_CHUNK):
        chunk = queries[start : start + _QUERY_CHUNK]
        result[start : start + chunk.size] = _ndcg_chunk(unit, taxonomy, chunk, corpus, discount)
    return result


def _ndcg_chunk(
    unit: np.ndarray, taxonomy: Taxonomy, queries: np.ndarray, corpus: np.ndarray, discount: np.ndarray
) -> np.ndarray:
    k = discount.size
    similarity = unit[queries] @ unit[corpus].T
    gains = np.exp2(taxonomy.lca_depth(queries[:, None], corpus[None, :]).astype(np.float64)) - 1.0
    is_self = queries[:, None] == corpus[None, :]
    similarity[is_self] = -np.inf
    gains[is_self] = 0.0
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    dcg = np.take_along_axis(gains, order, axis=1) @ discount
    ideal = -np.sort(-gains, axis=1)[:, :k] @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def ndcg_at_k(
    embeddings: Any,
    taxonomy: Taxonomy,
    query_ids: Sequence[int] | np.ndarray | None = None,
    corpus_ids: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    *,
    depth: int | None = None,
) -> float:
    """Mean NDCG@k over the queries with a non-zero ideal DCG (see :func:`ndcg_per_query`)."""
    per_query = ndcg_per_query(embeddings, taxonomy, query_ids, corpus_ids, k, depth=depth)
    scored = per_query[~np.isnan(per_query)]
    if scored.size == 0:
        raise ValueError("no query has a related corpus code (every ideal DCG is 0); NDCG is undefined")
    return float(scored.mean())


def holdout_split(taxonomy: Taxonomy, fraction: float = 0.2, seed: int = 0, depth: int | None = None) -> np.ndarray:
    """bool[N] mask of held-out codes: ``round(fraction * n)`` codes at ``depth`` plus their text twins.

    The codes at ``depth`` (default: deepest level) are drawn with ``np.random.default_rng(seed)``.
    Every code, at any level, whose text equals (casefold) a drawn code's text is held out too, so
    a held-out text never appears in training (NAICS: '111110' and its one-child parent '11111'
    share a title). Twins at ``depth`` itself can push the share slightly above ``fraction``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}; expected a number strictly between 0 and 1")
    level = _select(taxonomy, None, depth, "holdout level")
    n_held = int(round(fraction * level.size))
    if n_held == 0:
        raise ValueError(f"fraction={fraction} of {level.size} codes holds out none; expected a larger fraction")
    mask = np.zeros(len(taxonomy), dtype=bool)
    mask[np.random.default_rng(seed).choice(level, size=n_held, replace=False)] = True
    for group in taxonomy.same_text_groups():
        if mask[group].any():
            mask[group] = True
    return mask


def _check_mask(heldout_mask: Any, n_codes: int) -> np.ndarray:
    mask = np.asarray(heldout_mask)
    if mask.dtype != bool or mask.shape != (n_codes,):
        raise ValueError(
            f"heldout_mask has dtype {mask.dtype} and shape {tuple(mask.shape)}; expected bool [{n_codes}]"
        )
    return mask


def placement_hits(
    embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any, *, depth: int | None = None
) -> dict[str, float]:
    """Share of held-out codes whose nearest trained code shares their parent / grandparent.

    Over the codes at ``depth`` (default deepest): each held-out one is matched to its nearest
    (cosine; ties: lowest index) code at that level not held out. ``parent5``: same parent (NAICS:
    five-digit industry); ``parent4``: same grandparent (NAICS: four-digit industry group).

    A held-out code whose parent has no trained child at that level cannot score a ``parent5``
    hit (NAICS 2022 with the default split: 55% of held-out codes). ``parent5_ceiling`` is the
    share that can, and ``parent5_reachable`` the hit rate among those codes only; likewise for
    ``parent4``.
    """
    unit = as_unit_rows(embeddings, len(taxonomy))
    mask = _check_mask(heldout_mask, len(taxonomy))
    depth = int(taxonomy.depth.max()) if depth is None else depth
    level = _select(taxonomy, None, depth, "placement level")
    held, trained = level[mask[level]], level[~mask[level]]
    if held.size == 0 or trained.size == 0:
        raise ValueError(
            f"heldout_mask holds out {held.size} of {level.size} codes at depth {depth}; "
            "expected at least one held-out and one trained code"
        )
    nearest = np.concatenate([trained[np.argmax(unit[held[i : i + _QUERY_CHUNK]] @ unit[trained].T, axis=1)]
                              for i in range(0, held.size, _QUERY_CHUNK)])
    shared = taxonomy.lca_depth(held, nearest)
    best = np.concatenate([taxonomy.lca_depth(held[i : i + _QUERY_CHUNK, None], trained[None, :]).max(axis=1)
                           for i in range(0, held.size, _QUERY_CHUNK)])
    out: dict[str, float] = {}
    for name, need in (("parent5", depth - 1), ("parent4", depth - 2)):
        hit, reachable = shared >= need, best >= need
        out[name] = float(hit.mean())
        out[f"{name}_ceiling"] = float(reachable.mean())
        out[f"{name}_reachable"] = float(hit[reachable].mean()) if reachable.any() else float("nan")
    return out


def evaluate_embeddings(
    embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any = None, k: int = 10
) -> dict[str, float]:
    """All metrics on the deepest level, as flat keys.

    ``cophenetic_pearson``, ``cophenetic_spearman``, ``ndcg@k`` (every deepest code as query and
    corpus) and, with ``heldout_mask``: ``heldout_ndcg@k`` (held-out deepest codes as queries
    against all other deepest codes), ``heldout_parent5_hit``, ``heldout_parent4_hit`` and, for each,
    ``*_hit_reachable`` / ``*_ceiling`` (see :func:`placement_hits`).
    """
    started = time.perf_counter()
    unit = as_unit_rows(embeddings, len(taxonomy))
    cophenetic = cophenetic_correlation(unit, taxonomy)
    metrics = {
        "cophenetic_pearson": cophenetic["pearson"],
        "cophenetic_spearman": cophenetic["spearman"],
        f"ndcg@{k}": ndcg_at_k(unit, taxonomy, k=k),
    }
    if heldout_mask is not None:
        mask = _check_mask(heldout_mask, len(taxonomy))
        hits = placement_hits(unit, taxonomy, mask)
        level = taxonomy.level(int(taxonomy.depth.max()))
        metrics[f"heldout_ndcg@{k}"] = ndcg_at_k(unit, taxonomy, query_ids=level[mask[level]], corpus_ids=level, k=k)
        for name in ("parent5", "parent4"):
            metrics[f"heldout_{name}_hit"] = hits[name]
            metrics[f"heldout_{name}_hit_reachable"] = hits[f"{name}_reachable"]
            metrics[f"heldout_{name}_ceiling"] = hits[f"{name}_ceiling"]
    logger.info("evaluated embeddings in %.2f s: %s", time.perf_counter() - started, metrics)
    return metrics
