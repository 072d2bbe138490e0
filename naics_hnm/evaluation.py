"""Taxonomy-aware quality of code embeddings: cophenetic correlation, NDCG@k and held-out placement.

All metrics work on cosine similarity of L2-normalised rows (row ``i`` embeds code ``i``) and, by
default, on the leaves of the tree (:func:`evaluation_codes`; NAICS 2022: its 1,012 six-digit
codes). The tree is the taxonomy's, of any shape and uneven depth: distance counts edges through
the lowest common ancestor (LCA), and the LCA depth is 0 when only the virtual root is shared.

Ties: similarities are compared after rounding to ``SIMILARITY_DECIMALS`` (9) decimals
(:func:`comparable`), and equal rounded values are ordered by lower corpus position (lower code id
for placement). Mathematically equal similarities come out of BLAS with different last bits
depending on the kernel (AVX2 vs AVX-512), the thread count and a row's place in a block; at
float64 those differences are ~1e-16, far below the rounding step, so every machine ranks the
same. Genuinely different similarities closer than 1e-9 count as tied, which no metric here can
notice. The brute-force references in the tests apply the same function.

Memory stays bounded for any taxonomy size: similarities are computed for one chunk of queries at
a time (about ``2**22`` floats), relations only for the top-k hits and nearest codes, and
everything that needs all corpus codes (ideal DCG, placement eligibility) comes from subtree
counts over the DFS order, O(queries x depth). No N x N or queries x corpus relation is built.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from naics_hnm.tree.taxonomy import Taxonomy

logger = logging.getLogger(__name__)

_BLOCK = 2**22  # floats of one chunk of similarities (32 MiB in float64)
SIMILARITY_DECIMALS = 9  # the tie rule: see the module docstring


def comparable(similarity: np.ndarray) -> np.ndarray:
    """``similarity`` rounded to :data:`SIMILARITY_DECIMALS`: the values every ranking here compares."""
    return np.round(similarity, SIMILARITY_DECIMALS)


class _UnitRows(np.ndarray):
    """float64 unit rows already validated by :func:`as_unit_rows` (passed on without a second copy)."""


def as_unit_rows(embeddings: Any, n_codes: int) -> np.ndarray:
    """Validate ``embeddings`` [n_codes, d] (numpy or torch) and return float64 unit rows.

    The result is marked as validated, so metrics called with it (as :func:`evaluate_embeddings`
    does) do not copy and normalise N x d again.
    """
    if isinstance(embeddings, _UnitRows) and embeddings.shape[0] == n_codes:
        return embeddings
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
    return (array / norms[:, None]).view(_UnitRows)


def evaluation_codes(taxonomy: Taxonomy) -> np.ndarray:
    """int64 ids of the leaves (codes without children), ascending: the default evaluation set."""
    return np.flatnonzero(taxonomy.end - taxonomy.pre == 1).astype(np.int64)


def _select(taxonomy: Taxonomy, ids: Sequence[int] | np.ndarray | None, depth: int | None, what: str) -> np.ndarray:
    """Code indices to evaluate: ``ids`` if given, else the codes at ``depth``, else the leaves."""
    n = len(taxonomy)
    if ids is None:
        if depth is None:
            return evaluation_codes(taxonomy)
        selected = taxonomy.level(depth)
        if selected.size == 0:
            raise ValueError(f"{what}: no codes at depth {depth}; expected 1..{taxonomy.max_depth}")
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


def _sample(ids: np.ndarray, max_n: int | None, seed: int, what: str) -> np.ndarray:
    """``ids`` itself, or above ``max_n`` a seeded sample of that many (sorted)."""
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 1):
        raise ValueError(f"{what}={max_n!r}; expected a positive integer or None")
    if max_n is None or ids.size <= max_n:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, int(max_n), replace=False))


def _subtree_counter(taxonomy: Taxonomy, members: np.ndarray):
    """A function: ancestor ids (-1 = none, ``N`` = the root) -> how many ``members`` lie in each subtree."""
    marked = np.zeros(len(taxonomy) + 1, dtype=np.int64)
    marked[taxonomy.pre[members] + 1] = 1
    prefix = np.cumsum(marked)  # prefix[p]: members at DFS positions < p
    n = len(taxonomy)

    def count(nodes: np.ndarray) -> np.ndarray:
        safe = np.where((nodes >= 0) & (nodes < n), nodes, 0)
        inside = prefix[taxonomy.end[safe]] - prefix[taxonomy.pre[safe]]
        return np.where(nodes == n, members.size, np.where(nodes >= 0, inside, 0))

    return count


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

    Pairs are the unordered pairs (upper triangle) of ``ids``, default the codes at ``depth``, or
    the leaves without either; above ``max_codes`` codes a seeded sample of that many is used, so
    the pair count stays bounded whatever the taxonomy's size. Returns ``{"pearson", "spearman"}``.
    """
    unit = as_unit_rows(embeddings, len(taxonomy))
    selected = _sample(_select(taxonomy, ids, depth, "ids"), max_codes, seed, "max_codes")
    if selected.size < 3:
        raise ValueError(f"cophenetic correlation needs at least 3 codes, got {selected.size}")
    x = unit[selected]
    upper = np.triu_indices(selected.size, k=1)
    cosine_distance = 1.0 - (x @ x.T)[upper]
    left, right, step = selected[upper[0]], selected[upper[1]], _BLOCK // 16  # bounds the [pairs, depth] blocks
    tree = np.concatenate([taxonomy.tree_distance(left[i : i + step], right[i : i + step])
                           for i in range(0, left.size, step)]).astype(np.float64)
    return {
        "pearson": _pearson(cosine_distance, tree),
        "spearman": _pearson(average_ranks(comparable(cosine_distance)), average_ranks(tree)),
    }


def _top_k(similarity: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's k largest values, by (value descending, position ascending)."""
    n = similarity.shape[1]
    kth = np.partition(similarity, n - k, axis=1)[:, n - k]  # the k-th largest value per row
    rows, cols = np.nonzero(similarity >= kth[:, None])  # at least k per row; ties at kth give more
    order = np.lexsort((cols, -similarity[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows)  # rank within the row
    return cols[rank < k].reshape(similarity.shape[0], k)


def _ideal_dcg(taxonomy: Taxonomy, queries: np.ndarray, corpus: np.ndarray, cum_discount: np.ndarray) -> np.ndarray:
    """Ideal DCG per query from subtree counts: O(queries x depth), no query x corpus block.

    ``at_least[:, t]`` counts the corpus codes (other than the query) whose LCA with the query has
    depth >= t: those in the subtree of the query's ancestor at depth t. The best ranks go to the
    deepest LCAs, so the gain ``2**t - 1 = sum of 2**(s-1), s <= t`` adds ``2**(t-1)`` on each of
    the first ``min(at_least[:, t], k)`` ranks.
    """
    k = cum_discount.size - 1
    path = taxonomy.ancestor_path[queries].astype(np.int64)  # [Q, D+1], column 0 the root (N)
    at_least = _subtree_counter(taxonomy, corpus)(path)
    in_corpus = np.zeros(len(taxonomy), dtype=bool)
    in_corpus[corpus] = True
    at_least -= (in_corpus[queries][:, None] & (path >= 0)).astype(np.int64)
    weights = 2.0 ** np.arange(taxonomy.max_depth)
    return cum_discount[np.minimum(at_least[:, 1:], k)] @ weights


def _ndcg(unit: np.ndarray, taxonomy: Taxonomy, queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    k = min(k, corpus.size)
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    ideal = _ideal_dcg(taxonomy, queries, corpus, np.concatenate([[0.0], np.cumsum(discount)]))
    position = np.full(len(taxonomy), -1, dtype=np.int64)
    position[corpus] = np.arange(corpus.size)
    corpus_unit = unit[corpus]
    rows = max(1, _BLOCK // max(corpus.size, k * (taxonomy.max_depth + 1)))
    dcg = np.empty(queries.size, dtype=np.float64)
    for start in range(0, queries.size, rows):
        chunk = queries[start : start + rows]
        similarity = comparable(unit[chunk] @ corpus_unit.T)
        own = position[chunk]
        similarity[np.flatnonzero(own >= 0), own[own >= 0]] = -np.inf  # a query never ranks itself
        top = corpus[_top_k(similarity, k)]
        gains = np.exp2(taxonomy.lca_depth(chunk[:, None], top).astype(np.float64)) - 1.0
        gains[top == chunk[:, None]] = 0.0
        dcg[start : start + chunk.size] = gains @ discount
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


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

    Queries and corpus default to the codes at ``depth``, or the leaves. Each query ranks every
    other corpus code by cosine similarity (:func:`comparable`; ties: lower corpus position first). The gain of a
    corpus code is ``2 ** lca_depth(query, code) - 1`` (root 0, top level 1, ...); the discount is
    ``1 / log2(rank + 1)`` with ranks from 1; the ideal DCG sorts the same gains (the query itself
    excluded) in descending order.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}; expected a positive integer")
    unit = as_unit_rows(embeddings, len(taxonomy))
    queries = _select(taxonomy, query_ids, depth, "query_ids")
    corpus = _select(taxonomy, corpus_ids, depth, "corpus_ids")
    return _ndcg(unit, taxonomy, queries, corpus, int(k))


def ndcg_at_k(
    embeddings: Any,
    taxonomy: Taxonomy,
    query_ids: Sequence[int] | np.ndarray | None = None,
    corpus_ids: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    *,
    depth: int | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> float:
    """Mean NDCG@k over the queries with a non-zero ideal DCG (see :func:`ndcg_per_query`).

    Above ``max_queries`` queries a seeded sample of that many is scored (None: all).
    """
    queries = _sample(_select(taxonomy, query_ids, depth, "query_ids"), max_queries, seed, "max_queries")
    per_query = ndcg_per_query(embeddings, taxonomy, queries, corpus_ids, k, depth=depth)
    scored = per_query[~np.isnan(per_query)]
    if scored.size == 0:
        raise ValueError("no query has a related corpus code (every ideal DCG is 0); NDCG is undefined")
    return float(scored.mean())


def holdout_split(taxonomy: Taxonomy, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """bool[N] mask of held-out codes: whole text groups until ``round(fraction * leaves)`` leaves are out.

    A text group is every code sharing one casefolded text (a code with a unique text is a group
    of one). The groups holding at least one leaf, ordered by their smallest code id, are shuffled
    with ``np.random.default_rng(seed).permutation`` and held out whole (every code, at any level)
    in that order until the held-out leaves first reach the target. Whole groups, so that a held-out text never appears in training (NAICS:
    '111110' and its one-child parent '11111' share a title); the leaf share can exceed
    ``fraction`` by the last group's size.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}; expected a number strictly between 0 and 1")
    n = len(taxonomy)
    leaves = evaluation_codes(taxonomy)
    target = int(round(fraction * leaves.size))
    if target == 0:
        raise ValueError(f"fraction={fraction} of {leaves.size} leaves holds out none; expected a larger fraction")
    group = np.arange(n)  # group id = the smallest code id of the group
    for members in taxonomy.same_text_groups():
        group[members] = members.min()
    group_leaves = np.bincount(group[leaves], minlength=n)
    candidates = np.flatnonzero(group_leaves)  # ascending, then shuffled
    shuffled = candidates[np.random.default_rng(seed).permutation(candidates.size)]
    taken = int(np.searchsorted(np.cumsum(group_leaves[shuffled]), target)) + 1
    return np.isin(group, shuffled[:taken])


def _check_mask(heldout_mask: Any, n_codes: int) -> np.ndarray:
    mask = np.asarray(heldout_mask)
    if mask.dtype != bool or mask.shape != (n_codes,):
        raise ValueError(
            f"heldout_mask has dtype {mask.dtype} and shape {tuple(mask.shape)}; expected bool [{n_codes}]"
        )
    return mask


def placement_hits(embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any) -> dict[str, float]:
    """Share of held-out leaves whose nearest trained leaf shares their parent / grandparent.

    Each held-out leaf ``h`` is matched to its nearest (cosine, :func:`comparable`; ties: lowest id) leaf not held
    out. ``parent``: a hit when their LCA is at least ``h``'s parent (depth >= depth(h) - 1);
    ``grandparent``: at least its grandparent. A leaf is *eligible* at a level when that ancestor
    exists (depth(h) >= 2, resp. >= 3) and its subtree holds a trained leaf, i.e. a hit is
    possible at all. Returns ``parent`` / ``grandparent`` (hit rate among the eligible; NaN if
    none), ``parent_all`` / ``grandparent_all`` (over all held-out leaves, ineligible = miss),
    ``parent_eligible`` / ``grandparent_eligible`` (eligible share) and ``heldout_leaves``.
    """
    unit = as_unit_rows(embeddings, len(taxonomy))
    mask = _check_mask(heldout_mask, len(taxonomy))
    leaves = evaluation_codes(taxonomy)
    held, trained = leaves[mask[leaves]], leaves[~mask[leaves]]
    if held.size == 0 or trained.size == 0:
        raise ValueError(
            f"heldout_mask holds out {held.size} of {leaves.size} leaves; "
            "expected at least one held-out and one trained leaf"
        )
    rows = max(1, _BLOCK // trained.size)
    trained_unit = unit[trained]
    nearest = np.concatenate([trained[np.argmax(comparable(unit[held[i : i + rows]] @ trained_unit.T), axis=1)]
                              for i in range(0, held.size, rows)])
    shared = taxonomy.lca_depth(held, nearest)
    depth = taxonomy.depth[held].astype(np.int64)
    count_trained = _subtree_counter(taxonomy, trained)
    out: dict[str, float] = {}
    for name, up in (("parent", 1), ("grandparent", 2)):
        need = depth - up
        exists = need >= 1
        ancestor = np.where(exists, taxonomy.ancestor_path[held, np.maximum(need, 0)], -1)
        eligible = exists & (count_trained(ancestor) > 0)
        hit = exists & (shared >= need)  # implies eligible: the nearest is a trained leaf under it
        out[name] = float(hit[eligible].mean()) if eligible.any() else float("nan")
        out[f"{name}_all"] = float(hit.mean())
        out[f"{name}_eligible"] = float(eligible.mean())
    out["heldout_leaves"] = float(held.size)
    return out


def evaluate_embeddings(
    embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any = None, k: int = 10, *,
    max_queries: int | None = 5000, seed: int = 0,
) -> dict[str, float]:
    """All metrics on the leaves, as flat keys (plain floats).

    ``cophenetic_pearson``, ``cophenetic_spearman``, ``ndcg@k`` (leaves as queries, a seeded
    sample of ``max_queries`` above that, against all leaves) and, with ``heldout_mask``:
    ``heldout_ndcg@k`` (held-out leaves as queries, sampled likewise, against all leaves),
    ``heldout_parent_hit``, ``heldout_grandparent_hit``, ``heldout_parent_hit_all``,
    ``heldout_grandparent_hit_all``, ``heldout_parent_eligible``, ``heldout_grandparent_eligible``
    (see :func:`placement_hits`) and ``heldout_codes`` (the number of held-out leaves).
    """
    started = time.perf_counter()
    unit = as_unit_rows(embeddings, len(taxonomy))
    mask = None if heldout_mask is None else _check_mask(heldout_mask, len(taxonomy))
    leaves = evaluation_codes(taxonomy)
    cophenetic = cophenetic_correlation(unit, taxonomy)
    metrics = {
        "cophenetic_pearson": cophenetic["pearson"],
        "cophenetic_spearman": cophenetic["spearman"],
        f"ndcg@{k}": ndcg_at_k(unit, taxonomy, k=k, max_queries=max_queries, seed=seed),
    }
    if mask is not None:
        hits = placement_hits(unit, taxonomy, mask)
        metrics[f"heldout_ndcg@{k}"] = ndcg_at_k(unit, taxonomy, query_ids=leaves[mask[leaves]], corpus_ids=leaves,
                                                 k=k, max_queries=max_queries, seed=seed)
        for name in ("parent", "grandparent"):
            metrics[f"heldout_{name}_hit"] = hits[name]
            metrics[f"heldout_{name}_hit_all"] = hits[f"{name}_all"]
            metrics[f"heldout_{name}_eligible"] = hits[f"{name}_eligible"]
        metrics["heldout_codes"] = hits["heldout_leaves"]
    logger.info("evaluated embeddings in %.2f s: %s", time.perf_counter() - started, metrics)
    return {key: float(value) for key, value in metrics.items()}
