"""(anchor, positive) pairs from the tree: the fixed, deterministic index space of Phase 1."""

from __future__ import annotations

import numpy as np

from naics_hnm.data.config import Relation
from naics_hnm.data.counter_rng import item_keys, later_duplicates, uniforms
from naics_hnm.tree.taxonomy import Taxonomy


def allowed_mask(taxonomy: Taxonomy, exclude_codes: tuple[str, ...] = ()) -> np.ndarray:
    """bool[N]: True for codes that may appear in training (not in ``exclude_codes``)."""
    allowed = np.ones(len(taxonomy), dtype=bool)
    if exclude_codes:
        allowed[taxonomy.indices(exclude_codes)] = False
    return allowed


def tree_pairs(taxonomy: Taxonomy, relations: tuple[str, ...], allowed: np.ndarray | None = None,
               max_siblings: int | None = None, seed: int = 0) -> np.ndarray:
    """int64 [P, 2] (anchor, positive) pairs, sorted, both ends in ``allowed``.

    ``levels``: one row per allowed non-top-level anchor, positive -1 (drawn later). Top-level codes are not
    siblings; ``max_siblings`` keeps a seeded choice of that many siblings per anchor.
    """
    allowed = np.ones(len(taxonomy), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    parent = taxonomy.parent
    if Relation.LEVELS.value in relations:
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
    return np.unique(out[allowed[out[:, 0]] & allowed[out[:, 1]]], axis=0)


def sibling_pairs(parent: np.ndarray, allowed: np.ndarray, max_siblings: int | None = None, seed: int = 0,
                  max_block: int = 1 << 22) -> list[np.ndarray]:
    """(anchor, sibling) pairs of allowed codes that share a parent, in blocks of about ``max_block`` pairs.

    With ``max_siblings`` an anchor with more siblings keeps a distinct sample of that many, keyed by (seed, anchor).
    """
    members = np.flatnonzero(allowed & (parent >= 0))
    members = members[np.argsort(parent[members], kind="stable")]
    group_start = np.flatnonzero(np.r_[True, parent[members][1:] != parent[members][:-1]])
    group_size = np.diff(np.r_[group_start, len(members)])
    member_group = np.repeat(np.arange(len(group_size)), group_size)
    start, size = group_start[member_group], group_size[member_group]
    self_pos = np.arange(len(members)) - start
    per_member = size - 1 if max_siblings is None else np.minimum(size - 1, max_siblings)
    work = np.cumsum(np.maximum(per_member, 1))
    out: list[np.ndarray] = []
    first = 0
    while first < len(members):
        last = max(first + 1, int(np.searchsorted(work, work[first] - max(per_member[first], 1) + max_block, "right")))
        rows = np.arange(first, last)
        full = per_member[rows] == size[rows] - 1
        out.append(_all_siblings(members, rows[full], start, size, self_pos))
        if max_siblings is not None and not full.all():
            out.append(_sampled_siblings(members, rows[~full], start, size, self_pos, max_siblings, seed))
        first = last
    return [block for block in out if len(block)]


def _all_siblings(members, rows, start, size, self_pos) -> np.ndarray:
    """Every (anchor, sibling) pair of the member ``rows``."""
    reps = size[rows] - 1
    within = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
    within = within + (within >= np.repeat(self_pos[rows], reps))  # skip the anchor itself
    return np.stack([np.repeat(members[rows], reps), members[np.repeat(start[rows], reps) + within]], axis=1)


def _sampled_siblings(members, rows, start, size, self_pos, m: int, seed: int) -> np.ndarray:
    """``m`` distinct siblings per member row (each has more than ``m``), keyed by (seed, anchor)."""
    anchors = members[rows]
    keys = item_keys(seed, 1, anchors)
    picked = np.full((len(rows), m), -1, dtype=np.int64)
    for round_ in range(64):
        todo = np.flatnonzero((picked < 0).any(axis=1))
        if len(todo) == 0:
            break
        draw = np.floor(uniforms(keys[todo], round_, m) * (size[rows[todo], None] - 1)).astype(np.int64)
        draw += draw >= self_pos[rows[todo], None]
        sub = np.where(picked[todo] < 0, draw, picked[todo])
        sub[later_duplicates(sub, np.full(len(todo), -1))] = -1
        picked[todo] = sub
    if (picked < 0).any():
        raise RuntimeError("sibling sampling did not converge; this is a bug")
    return np.stack([np.repeat(anchors, m), members[(start[rows, None] + picked).ravel()]], axis=1)
