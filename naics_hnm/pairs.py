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
        pairs.extend(sibling_pairs(parent, allowed, max_siblings, seed))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    out = out[allowed[out[:, 0]] & allowed[out[:, 1]]]
    out = np.unique(out, axis=0)
    return out


def sibling_pairs(parent: np.ndarray, allowed: np.ndarray, max_siblings: int | None = None, seed: int = 0,
                  max_block: int = 1 << 22) -> list[np.ndarray]:
    """(anchor, sibling) pairs of allowed codes that share a parent, in blocks of about ``max_block`` pairs.

    ``max_siblings`` keeps, per anchor, the siblings with the lowest seeded score
    ``item_keys(seed, 0, anchor * N + sibling)`` (lower id first on a tie). Memory is bounded by
    the block size, never N x N.
    """
    n = len(parent)
    members = np.flatnonzero(allowed & (parent >= 0))
    members = members[np.argsort(parent[members], kind="stable")]
    if len(members) == 0:
        return []
    group_start = np.flatnonzero(np.r_[True, parent[members][1:] != parent[members][:-1]])
    group_size = np.diff(np.r_[group_start, len(members)])
    work = np.cumsum(group_size.astype(np.int64) ** 2)
    out: list[np.ndarray] = []
    first = 0
    while first < len(group_start):
        last = max(first + 1, int(np.searchsorted(work, work[first] - group_size[first] ** 2 + max_block, "right")))
        sizes, starts = group_size[first:last], group_start[first:last]
        member_group = np.repeat(np.arange(len(sizes)), sizes)
        member_pos = starts[0] + np.arange(sizes.sum())
        reps = sizes[member_group]
        a_pos = np.repeat(member_pos, reps)
        within = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
        s_pos = np.repeat(starts[member_group], reps) + within
        keep = a_pos != s_pos
        a, sib = members[a_pos[keep]], members[s_pos[keep]]
        if max_siblings is not None:
            score = item_keys(seed, 0, a * n + sib) >> np.uint64(11)
            order = np.lexsort((sib, score, a))
            a, sib = a[order], sib[order]
            run_start = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
            rank = np.arange(len(a)) - np.repeat(run_start, np.diff(np.r_[run_start, len(a)]))
            a, sib = a[rank < max_siblings], sib[rank < max_siblings]
        out.append(np.stack([a, sib], axis=1))
        first = last
    return out
