"""Tree reconstruction (mean rank, MAP) against a brute-force reference on random trees and NAICS 2022.

The reference builds the dense similarity matrix, finds ancestors and descendants by walking parent
pointers, and counts "at or above" by comparing every pair; it shares only the tie rule
(:func:`naics_hnm.evaluation.comparable`) with the implementation.
"""

import numpy as np
import pytest
from test_evaluation import EXACT_ROWS, TREE_KEYS, Case, get_case

from naics_hnm.evaluation import comparable, evaluate_embeddings, reconstruction
from naics_hnm.tree.taxonomy import Taxonomy


def brute_reconstruction(embeddings, case: Case, queries) -> tuple[float, float]:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = comparable(unit @ unit.T)
    n = len(case.tx)
    ranks, precisions = [], []
    for u in queries:
        relevant = set()
        p = int(case.parent[u])
        while p >= 0:
            relevant.add(p)
            p = int(case.parent[p])
        relevant |= {c for c in range(n) if c != u and u in _ancestors(case, c)}
        if not relevant:
            continue
        others = [w for w in range(n) if w != u]
        precision = []
        for v in relevant:
            above = [w for w in others if similarity[u, w] >= similarity[u, v]]
            relevant_above = sum(w in relevant for w in above)
            ranks.append(1 + len(above) - relevant_above)
            precision.append(relevant_above / len(above))
        precisions.append(np.mean(precision))
    return float(np.mean(ranks)), float(np.mean(precisions))


def _ancestors(case: Case, c: int) -> set[int]:
    out, p = set(), int(case.parent[c])
    while p >= 0:
        out.add(p)
        p = int(case.parent[p])
    return out


def _embeddings(case: Case, seed: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = len(case.tx)
    if kind == "tied":  # bit-exact ties on every machine: 6 distinct exactly representable rows
        return EXACT_ROWS[rng.choice(len(EXACT_ROWS), 6, replace=False)][rng.integers(0, 6, size=n)]
    emb = rng.normal(size=(n, 8)) * 0.7
    if kind == "tree":  # ancestors' directions added: far better than random
        directions = rng.normal(size=(n, 8))
        for i in range(n):
            for a in [i, *_ancestors(case, i)]:
                emb[i] += directions[a]
    return emb


@pytest.mark.parametrize("key", TREE_KEYS)
@pytest.mark.parametrize("kind", ["random", "tree", "tied"])
def test_reconstruction_matches_brute_force(key, kind):
    case = get_case(key)
    emb = _embeddings(case, len(key), kind)
    got = reconstruction(emb, case.tx, max_queries=None)
    queries = range(len(case.tx))
    mean_rank, mean_ap = brute_reconstruction(emb, case, queries)
    assert got["mean_rank"] == pytest.approx(mean_rank, rel=1e-12)
    assert got["map"] == pytest.approx(mean_ap, rel=1e-12)
    has_relevant = [u for u in queries if case.depth[u] > 1 or (case.parent == u).any()]
    assert got["queries"] == len(has_relevant)


def test_reconstruction_samples_queries_with_a_seed():
    case = get_case("random-8")
    emb = _embeddings(case, 2, "random")
    has_relevant = np.array([u for u in range(len(case.tx)) if case.depth[u] > 1 or (case.parent == u).any()])
    sample = np.sort(np.random.default_rng(7).choice(has_relevant, 30, replace=False))
    got = reconstruction(emb, case.tx, max_queries=30, seed=7)
    assert (got["mean_rank"], got["map"]) == pytest.approx(brute_reconstruction(emb, case, sample), rel=1e-12)
    assert got != reconstruction(emb, case.tx, max_queries=30, seed=8)


def test_reconstruction_orders_embeddings_by_quality():
    """Perfect on an embedding that encodes the tree exactly; the worst possible for a constant one."""
    case = get_case("random-3")
    n = len(case.tx)
    tree_aware = reconstruction(_embeddings(case, 1, "tree"), case.tx, max_queries=None)
    random = reconstruction(_embeddings(case, 1, "random"), case.tx, max_queries=None)
    assert tree_aware["map"] > random["map"] + 0.1 and tree_aware["mean_rank"] < random["mean_rank"]
    constant = reconstruction(np.ones((n, 4)), case.tx, max_queries=None)  # every code tied: ties count against
    assert constant["map"] < random["map"]
    chain = Taxonomy(["a", "b", "c"], ["", "a", "b"], ["A", "B", "C"])
    assert reconstruction(np.eye(3), chain, max_queries=None) == {"mean_rank": 1.0, "map": 1.0, "queries": 3.0}


def test_reconstruction_rejects_a_flat_list():
    flat = Taxonomy(["a", "b", "c"], ["", "", ""], ["A", "B", "C"])
    with pytest.raises(ValueError, match="flat list"):
        reconstruction(np.eye(3), flat)


def test_reconstruction_in_evaluate_embeddings(naics):
    emb = np.random.default_rng(0).normal(size=(len(naics), 16))
    metrics = evaluate_embeddings(emb, naics, reconstruction_queries=300, seed=2)
    direct = reconstruction(emb, naics, max_queries=300, seed=2)
    assert metrics["reconstruction_map"] == direct["map"] and metrics["reconstruction_mean_rank"] == direct["mean_rank"]
    assert direct["mean_rank"] > 100  # random vectors rank ancestors and descendants nowhere near the top
