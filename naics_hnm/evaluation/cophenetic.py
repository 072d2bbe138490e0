"""Cophenetic correlation: cosine distance against tree distance over all pairs of a bounded sample."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from naics_hnm.evaluation.rows import BLOCK, as_unit_rows, comparable, sample_codes, select_codes
from naics_hnm.tree.taxonomy import Taxonomy

logger = logging.getLogger(__name__)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    if denominator == 0:
        logger.warning("correlation undefined: one side is constant over all pairs")
        return float("nan")
    return float((x @ y) / denominator)


def cophenetic_correlation(embeddings: Any, taxonomy: Taxonomy, ids: Sequence[int] | np.ndarray | None = None, *,
                           depth: int | None = None, max_codes: int = 4000, seed: int = 0) -> dict[str, float]:
    """``{"pearson", "spearman"}`` correlation of cosine distance with tree distance over all pairs of ``ids``, else
    of the codes at ``depth``, else of the leaves (a seeded sample of ``max_codes`` above that)."""
    unit = as_unit_rows(embeddings, len(taxonomy))
    selected = sample_codes(select_codes(taxonomy, ids, depth, "ids"), max_codes, seed, "max_codes")
    if selected.size < 3:
        raise ValueError(f"cophenetic correlation needs at least 3 codes, got {selected.size}")
    x = unit[selected]
    upper = np.triu_indices(selected.size, k=1)
    cosine_distance = 1.0 - (x @ x.T)[upper]
    left, right, step = selected[upper[0]], selected[upper[1]], BLOCK // 16  # bounds the [pairs, depth] blocks
    tree = np.concatenate([taxonomy.tree_distance(left[i : i + step], right[i : i + step])
                           for i in range(0, left.size, step)]).astype(np.float64)
    return {"pearson": _pearson(cosine_distance, tree),
            "spearman": _pearson(average_ranks(comparable(cosine_distance)), average_ranks(tree))}
