"""(anchor, positive) pairs from the tree: the fixed, deterministic index space of Phase 1."""

from __future__ import annotations

import numpy as np

from naics_hnm.config import Relation
from naics_hnm.counter_rng import item_keys
from naics_hnm.taxonomy import Taxonomy


def allowed_mask(taxonomy: Taxonomy, exclude_codes: tuple[str, ...] = ()) -> np.ndarray:
    """bool[N]: True for codes that may appear in training (not in ``exclude_codes``)."""
    allowed = np.ones(len(taxonomy), dtype=bool)
    if exclude_codes:
        allowed[taxonomy.indices(exclude_codes)] = False
    return allowed


def tree_pairs(taxonomy: Taxonomy, relations: tuple[str, ...], allowed: np.ndarray | None = None,
               max_siblings: int | None = None, seed: int = 0) -> np.ndarray:
    """int64 [P, 2] (anchor, positive) pairs, sorted, both ends in ``allowed``.

    With the ``levels`` relation: one row per allowed non-top-level anchor, positive -1 (drawn later).

    Siblings share a parent; top-level codes are not siblings of each other (a sector is no
    positive for another sector).
    ``max_siblings`` keeps a seeded choice of that many siblings per anchor (the same on every run).
    """
    n = len(taxonomy)
    allowed = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    parent = taxonomy.parent
    if Relation.LEVELS.value in relations:
        # one item per anchor below the top level; the positive (-1 here) is drawn per epoch
        anchors = np.flatnonzero(allowed & (parent >= 0))
        return np.stack([anchors, np.full_like(anchors, -1)], axis=1).astype(np.int64)
    pairs: list[np.ndarray] = []
    has_parent = np.flatnonzero(parent >= 0)
    if Relation.PARENT.value in relations:
        pairs.append(np.stack([has_parent, parent[has_parent]], axis=1))
    if Relation.CHILD.value in relations:
        pairs.append(np.stack([parent[has_parent], has_parent], axis=1))
    if Relation.SIBLING.value in relations:
        same = (parent[:, None] == parent[None, :]) & (parent[:, None] >= 0)
        np.fill_diagonal(same, False)
        same &= allowed[:, None] & allowed[None, :]
        if max_siblings is not None:
            # a seeded random score per ordered pair; keep each anchor's max_siblings lowest
            score = (item_keys(seed, 0, np.arange(n * n)).reshape(n, n) >> np.uint64(11)).astype(np.float64)
            score[~same] = np.inf
            keep = np.argsort(score, axis=1, kind="stable")[:, :max_siblings]
            rows = np.repeat(np.arange(n), keep.shape[1])
            chosen = np.zeros_like(same)
            chosen[rows, keep.ravel()] = True
            same &= chosen
        pairs.append(np.argwhere(same))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    out = out[allowed[out[:, 0]] & allowed[out[:, 1]]]
    out = np.unique(out, axis=0)
    return out
