"""Held-out codes: the whole-text-group split and the placement of held-out leaves next to trained ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from naics_hnm.evaluation.nearest import nearest_columns
from naics_hnm.evaluation.rows import as_unit_rows, evaluation_codes, sample_codes, subtree_counter
from naics_hnm.tree.taxonomy import Taxonomy


def holdout_split(taxonomy: Taxonomy, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """bool[N] mask of held-out codes: whole text groups until ``round(fraction * leaves)`` leaves are out.

    A text group is every code sharing one casefolded text, so that a held-out text never appears in training.
    The groups holding a leaf, by smallest code id, are shuffled with ``np.random.default_rng(seed).permutation``
    and held out whole in that order until the held-out leaves reach the target (possibly passing it).
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


def check_mask(heldout_mask: Any, n_codes: int) -> np.ndarray:
    mask = np.asarray(heldout_mask)
    if mask.dtype != bool or mask.shape != (n_codes,):
        raise ValueError(f"heldout_mask has dtype {mask.dtype} and shape {tuple(mask.shape)}; "
                         f"expected bool [{n_codes}]")
    return mask


def placement_hits(embeddings: Any, taxonomy: Taxonomy, heldout_mask: Any, *, max_queries: int | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Share of held-out leaves whose nearest trained leaf (cosine, ties: lowest id) shares their parent / grandparent.

    A leaf is *eligible* at a level when that ancestor exists and its subtree holds a trained leaf. Returns
    ``parent`` / ``grandparent`` (hit rate among the eligible; NaN if none), ``{level}_all`` (over all, ineligible =
    miss), ``{level}_eligible`` (eligible share) and ``heldout_leaves`` (all of them). Above ``max_queries`` held-out
    leaves the rates are over a seeded sample of that many.
    """
    unit = as_unit_rows(embeddings, len(taxonomy))
    mask = check_mask(heldout_mask, len(taxonomy))
    leaves = evaluation_codes(taxonomy)
    held, trained = leaves[mask[leaves]], leaves[~mask[leaves]]
    if held.size == 0 or trained.size == 0:
        raise ValueError(f"heldout_mask holds out {held.size} of {leaves.size} leaves; "
                         "expected at least one held-out and one trained leaf")
    heldout_leaves = held.size
    held = sample_codes(held, max_queries, seed, "max_queries")
    nearest = trained[nearest_columns(unit, held, trained, 1)[:, 0]]
    shared = taxonomy.lca_depth(held, nearest)
    depth = taxonomy.depth[held].astype(np.int64)
    count_trained = subtree_counter(taxonomy, trained)
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
    out["heldout_leaves"] = float(heldout_leaves)
    return out
