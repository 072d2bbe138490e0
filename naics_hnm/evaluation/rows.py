"""What every metric shares: validated unit rows, the tie rule, the evaluated codes and subtree counts.

Ties: similarities are compared rounded to ``SIMILARITY_DECIMALS`` decimals (:func:`comparable`), far above BLAS's
last-bit noise, so every machine ranks the same; equal values go to the lower corpus position (lower code id).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from naics_hnm.tree.taxonomy import Taxonomy

BLOCK = 2**22  # floats of one chunk of similarities (32 MiB in float64)
WIDE_BLOCK = 2**25  # floats of a chunk whose rows span a large corpus (256 MiB in float64): enough rows per read
SIMILARITY_DECIMALS = 9  # the tie rule: see the module docstring


def comparable(similarity: np.ndarray) -> np.ndarray:
    """``similarity`` rounded to :data:`SIMILARITY_DECIMALS`: the values every ranking here compares."""
    return np.round(similarity, SIMILARITY_DECIMALS)


class _UnitRows(np.ndarray):
    """float64 unit rows already validated by :func:`as_unit_rows` (passed on without a second copy)."""


def as_unit_rows(embeddings: Any, n_codes: int) -> np.ndarray:
    """Validate ``embeddings`` [n_codes, d] (numpy or torch) and return float64 unit rows, marked as validated."""
    if isinstance(embeddings, _UnitRows) and embeddings.shape[0] == n_codes:
        return embeddings
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().float().numpy()
    array = np.array(embeddings, dtype=np.float64)  # our own copy: normalised in place below
    if array.ndim != 2 or array.shape[0] != n_codes:
        raise ValueError(f"embeddings have shape {tuple(array.shape)}; expected [{n_codes}, d] "
                         f"(one row per code of a taxonomy with {n_codes} codes)")
    step = max(1, BLOCK // max(1, array.shape[1]))  # row blocks: no second [n, d] temporary
    finite = np.concatenate([np.isfinite(array[i : i + step]).all(axis=1) for i in range(0, n_codes, step)])
    if not finite.all():
        raise ValueError(f"embeddings row {int(np.argmin(finite))} holds NaN or inf; expected finite values")
    norms = np.concatenate([np.linalg.norm(array[i : i + step], axis=1) for i in range(0, n_codes, step)])
    if (norms == 0).any():
        raise ValueError(f"embeddings row {int(np.argmin(norms))} is all zeros; cosine similarity needs a non-zero row")
    array /= norms[:, None]
    return array.view(_UnitRows)


def evaluation_codes(taxonomy: Taxonomy) -> np.ndarray:
    """int64 ids of the leaves (codes without children), ascending: the default evaluation set."""
    return np.flatnonzero(taxonomy.end - taxonomy.pre == 1).astype(np.int64)


def select_codes(taxonomy: Taxonomy, ids: Sequence[int] | np.ndarray | None, depth: int | None,
                 what: str) -> np.ndarray:
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


def sample_codes(ids: np.ndarray, max_n: int | None, seed: int, what: str) -> np.ndarray:
    """``ids`` itself, or above ``max_n`` a seeded sample of that many (sorted)."""
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer)) or max_n < 1):
        raise ValueError(f"{what}={max_n!r}; expected a positive integer or None")
    if max_n is None or ids.size <= max_n:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, int(max_n), replace=False))


def subtree_counter(taxonomy: Taxonomy, members: np.ndarray):
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
