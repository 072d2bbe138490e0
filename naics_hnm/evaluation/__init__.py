"""Taxonomy-aware quality of code embeddings: cophenetic correlation, NDCG@k, held-out placement and reconstruction.

Cosine similarity of L2-normalised rows (row ``i`` embeds code ``i``), on the leaves by default. LCA depth 0 means
only the virtual root is shared; ties follow :func:`comparable`. Memory stays bounded: nothing N x N is built.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from naics_hnm.evaluation.cophenetic import average_ranks, cophenetic_correlation
from naics_hnm.evaluation.ndcg import ndcg_at_k, ndcg_per_query
from naics_hnm.evaluation.placement import check_mask, holdout_split, placement_hits
from naics_hnm.evaluation.reconstruction import reconstruction
from naics_hnm.evaluation.rows import SIMILARITY_DECIMALS, as_unit_rows, comparable, evaluation_codes
from naics_hnm.tree.taxonomy import Taxonomy

__all__ = ["SIMILARITY_DECIMALS", "as_unit_rows", "average_ranks", "comparable", "cophenetic_correlation",
           "evaluate_embeddings", "evaluation_codes", "holdout_split", "ndcg_at_k", "ndcg_per_query",
           "placement_hits", "reconstruction"]
logger = logging.getLogger(__name__)


def evaluate_embeddings(embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any = None, k: int = 10, *,
                        max_queries: int | None = 5000, seed: int = 0,
                        reconstruction_queries: int | None = 1000) -> dict[str, float]:
    """All metrics on the leaves, as flat keys (plain floats).

    ``cophenetic_pearson``, ``cophenetic_spearman``, ``ndcg@k`` (leaf queries against all leaves, a seeded
    sample of ``max_queries`` above that), ``reconstruction_map``, ``reconstruction_mean_rank`` (a seeded sample
    of ``reconstruction_queries`` codes) and, with ``heldout_mask``: ``heldout_ndcg@k`` (held-out leaves as
    queries, sampled likewise), ``heldout_codes`` (held-out leaves) and, over the same sample,
    ``heldout_{parent,grandparent}_hit``, ``..._hit_all``, ``..._eligible`` (see :func:`placement_hits`).
    """
    started = time.perf_counter()
    unit = as_unit_rows(embeddings, len(taxonomy))
    mask = None if heldout_mask is None else check_mask(heldout_mask, len(taxonomy))
    leaves = evaluation_codes(taxonomy)
    cophenetic = cophenetic_correlation(unit, taxonomy)
    metrics = {"cophenetic_pearson": cophenetic["pearson"], "cophenetic_spearman": cophenetic["spearman"],
               f"ndcg@{k}": ndcg_at_k(unit, taxonomy, k=k, max_queries=max_queries, seed=seed)}
    rebuilt = reconstruction(unit, taxonomy, max_queries=reconstruction_queries, seed=seed)
    metrics.update(reconstruction_map=rebuilt["map"], reconstruction_mean_rank=rebuilt["mean_rank"])
    if mask is not None:
        hits = placement_hits(unit, taxonomy, mask, max_queries=max_queries, seed=seed)
        metrics[f"heldout_ndcg@{k}"] = ndcg_at_k(unit, taxonomy, query_ids=leaves[mask[leaves]], corpus_ids=leaves,
                                                 k=k, max_queries=max_queries, seed=seed)
        for name in ("parent", "grandparent"):
            metrics[f"heldout_{name}_hit"] = hits[name]
            metrics[f"heldout_{name}_hit_all"] = hits[f"{name}_all"]
            metrics[f"heldout_{name}_eligible"] = hits[f"{name}_eligible"]
        metrics["heldout_codes"] = hits["heldout_leaves"]
    logger.info("evaluated embeddings in %.2f s: %s", time.perf_counter() - started, metrics)
    return {key: float(value) for key, value in metrics.items()}
