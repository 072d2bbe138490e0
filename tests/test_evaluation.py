import math

import numpy as np
import pytest

from naics_hnm.evaluation import (
    average_ranks,
    cophenetic_correlation,
    evaluate_embeddings,
    holdout_split,
    ndcg_at_k,
    ndcg_per_query,
    placement_hits,
)
from naics_hnm.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return Taxonomy.naics2022()


@pytest.fixture(scope="module")
def six(taxonomy) -> np.ndarray:
    return taxonomy.level(5)


@pytest.fixture(scope="module")
def tree_embedding(taxonomy) -> np.ndarray:
    """Row i = sum of one-hot vectors of i and its ancestors: cosine of two codes grows with LCA depth."""
    n = len(taxonomy)
    path = taxonomy.ancestor_path[:, 1:]
    rows, cols = np.nonzero(path >= 0)
    vectors = np.zeros((n, n))
    vectors[rows, path[rows, cols]] = 1.0
    return vectors


def brute_lca(taxonomy, i, j) -> int:
    """LCA depth from the ancestor lists, one pair at a time."""
    left = set(taxonomy.ancestors(i).tolist()) | {i}
    right = set(taxonomy.ancestors(j).tolist()) | {j}
    return len(left & right)


def brute_ndcg(embeddings, taxonomy, queries, corpus, k):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    scores = []
    for q in queries:
        others = [(pos, c) for pos, c in enumerate(corpus) if c != q]
        ranked = sorted(others, key=lambda pc: (-float(unit[q] @ unit[pc[1]]), pc[0]))
        gains = [2 ** brute_lca(taxonomy, q, c) - 1 for _, c in ranked]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains[:k]))
        ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(gains, reverse=True)[:k]))
        if ideal > 0:
            scores.append(dcg / ideal)
    return float(np.mean(scores))


def test_average_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    values = np.random.default_rng(1).integers(0, 7, size=300).astype(float)
    np.testing.assert_allclose(average_ranks(values), stats.rankdata(values))


def test_cophenetic_matches_brute_force(taxonomy, six):
    rng = np.random.default_rng(0)
    ids = rng.choice(six, size=150, replace=False)
    embeddings = rng.normal(size=(len(taxonomy), 16))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine, tree = [], []
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            i, j = ids[a], ids[b]
            cosine.append(1.0 - float(unit[i] @ unit[j]))
            tree.append(5 + 5 - 2 * brute_lca(taxonomy, i, j))
    result = cophenetic_correlation(embeddings, taxonomy, ids=ids)
    assert result["pearson"] == pytest.approx(np.corrcoef(cosine, tree)[0, 1], abs=1e-9)
    stats = pytest.importorskip("scipy.stats")
    assert result["spearman"] == pytest.approx(stats.spearmanr(cosine, tree)[0], abs=1e-9)


def test_ndcg_matches_brute_force_with_ties(taxonomy, six):
    rng = np.random.default_rng(2)
    corpus = rng.choice(six, size=150, replace=False)
    queries = np.concatenate([corpus[:30], rng.choice(np.setdiff1d(six, corpus), size=10, replace=False)])
    embeddings = rng.normal(size=(len(taxonomy), 8))
    tied = rng.normal(size=(4, 8))[rng.integers(0, 4, size=len(taxonomy))]  # only 4 distinct rows
    for emb in (embeddings, tied):
        for k in (1, 10):
            expected = brute_ndcg(emb, taxonomy, queries, corpus, k)
            assert ndcg_at_k(emb, taxonomy, queries, corpus, k=k) == pytest.approx(expected, abs=1e-12)


def test_tree_embedding_is_perfect(taxonomy, tree_embedding):
    cophenetic = cophenetic_correlation(tree_embedding, taxonomy)
    assert cophenetic["pearson"] == pytest.approx(1.0)
    assert cophenetic["spearman"] == pytest.approx(1.0)
    assert ndcg_at_k(tree_embedding, taxonomy, k=10) == pytest.approx(1.0)


def test_random_embeddings_score_low(taxonomy):
    embeddings = np.random.default_rng(3).normal(size=(len(taxonomy), 32))
    metrics = evaluate_embeddings(embeddings, taxonomy)
    assert metrics["ndcg@10"] < 0.3
    assert abs(metrics["cophenetic_pearson"]) < 0.1


def test_ndcg_default_level_and_skipped_queries(taxonomy, six, tree_embedding):
    per_query = ndcg_per_query(tree_embedding, taxonomy)
    assert per_query.shape == (six.size,)
    # a sector as its only corpus entry has no related code: skipped (NaN), and alone it is an error
    sector, other_sector = taxonomy.level(1)[:2]
    assert np.isnan(ndcg_per_query(tree_embedding, taxonomy, [sector], [sector, other_sector])).all()
    with pytest.raises(ValueError, match="ideal DCG"):
        ndcg_at_k(tree_embedding, taxonomy, [sector], [sector, other_sector])


def test_holdout_split_fraction_and_text_twins(taxonomy, six):
    mask = holdout_split(taxonomy, fraction=0.2, seed=0)
    assert mask.dtype == bool and mask.shape == (len(taxonomy),)
    assert 202 <= mask[six].sum() <= 215
    for group in taxonomy.same_text_groups():
        assert mask[group].all() or not mask[group].any()
    assert np.array_equal(mask, holdout_split(taxonomy, fraction=0.2, seed=0))
    assert not np.array_equal(mask, holdout_split(taxonomy, fraction=0.2, seed=1))
    seed = next(s for s in range(100) if holdout_split(taxonomy, seed=s)[taxonomy.index("111110")])
    assert holdout_split(taxonomy, seed=seed)[taxonomy.index("11111")]
    with pytest.raises(ValueError, match="fraction=1.5"):
        holdout_split(taxonomy, fraction=1.5)


def test_placement_hits_parent_direction(taxonomy, six, tree_embedding):
    # held-out codes embedded as their parent's direction land next to a trained sibling
    parents = taxonomy.parent[six]
    with_siblings = six[np.bincount(parents, minlength=len(taxonomy))[parents] >= 2]
    mask = np.zeros(len(taxonomy), dtype=bool)
    for p in np.unique(taxonomy.parent[with_siblings])[::3]:
        mask[with_siblings[taxonomy.parent[with_siblings] == p][0]] = True
    embeddings = tree_embedding.copy()
    embeddings[mask] = tree_embedding[taxonomy.parent[mask]]
    hits = placement_hits(embeddings, taxonomy, mask)
    assert {k: hits[k] for k in ("parent5", "parent4", "parent5_reachable", "parent5_ceiling")} == {
        "parent5": 1.0, "parent4": 1.0, "parent5_reachable": 1.0, "parent5_ceiling": 1.0}


def test_placement_ceiling_on_default_split(taxonomy):
    """Held-out codes without a trained sibling cannot hit their parent: the ceiling says how many can."""
    mask = holdout_split(taxonomy, 0.2, seed=0)
    six = taxonomy.level(5)
    held, trained = six[mask[six]], six[~mask[six]]
    reachable = np.array([(taxonomy.parent[trained] == taxonomy.parent[h]).any() for h in held])
    rng = np.random.default_rng(1)
    hits = placement_hits(rng.normal(size=(len(taxonomy), 16)), taxonomy, mask)
    assert hits["parent5_ceiling"] == pytest.approx(reachable.mean())
    assert hits["parent5"] <= hits["parent5_ceiling"]
    assert hits["parent5_reachable"] == pytest.approx(hits["parent5"] / hits["parent5_ceiling"])


def test_placement_hits_with_holdout_split(taxonomy, six, tree_embedding):
    mask = holdout_split(taxonomy, seed=0)
    embeddings = tree_embedding.copy()
    embeddings[mask] = tree_embedding[taxonomy.parent[mask]]
    held, trained = six[mask[six]], six[~mask[six]]
    lca = taxonomy.lca_depth(held[:, None], trained[None, :])
    hits = placement_hits(embeddings, taxonomy, mask)
    assert hits["parent5"] == pytest.approx((lca >= 4).any(axis=1).mean())
    assert hits["parent4"] == pytest.approx((lca >= 3).any(axis=1).mean())


def test_evaluate_embeddings_keys_and_torch(taxonomy, tree_embedding):
    torch = pytest.importorskip("torch")
    mask = holdout_split(taxonomy, seed=0)
    metrics = evaluate_embeddings(tree_embedding, taxonomy, heldout_mask=mask)
    assert set(metrics) == {
        "cophenetic_pearson", "cophenetic_spearman", "ndcg@10",
        "heldout_ndcg@10", "heldout_parent5_hit", "heldout_parent4_hit",
        "heldout_parent5_hit_reachable", "heldout_parent4_hit_reachable",
        "heldout_parent5_ceiling", "heldout_parent4_ceiling",
    }
    assert metrics["heldout_ndcg@10"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in metrics.values())
    from_torch = evaluate_embeddings(torch.from_numpy(tree_embedding).float(), taxonomy, heldout_mask=mask)
    assert from_torch == pytest.approx(metrics, abs=1e-5)


def test_input_errors(taxonomy):
    n = len(taxonomy)
    with pytest.raises(ValueError, match=rf"\(10, 4\).*\[{n}, d\]"):
        evaluate_embeddings(np.ones((10, 4)), taxonomy)
    bad = np.ones((n, 4))
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        evaluate_embeddings(bad, taxonomy)
    bad[7] = 0.0
    with pytest.raises(ValueError, match="row 7 is all zeros"):
        evaluate_embeddings(bad, taxonomy)
    good = np.random.default_rng(0).normal(size=(n, 4))
    with pytest.raises(ValueError, match="heldout_mask"):
        evaluate_embeddings(good, taxonomy, heldout_mask=np.zeros(5, dtype=bool))
    with pytest.raises(ValueError, match=f"index {n}"):
        ndcg_at_k(good, taxonomy, query_ids=[0, n])
    with pytest.raises(ValueError, match="k=0"):
        ndcg_at_k(good, taxonomy, k=0)
    with pytest.raises(ValueError, match="held-out"):
        placement_hits(good, taxonomy, np.zeros(n, dtype=bool))


def test_cophenetic_samples_large_levels_with_a_seed(taxonomy, six, tree_embedding):
    """Above max_codes the pairs come from a seeded sample: the result equals that subset's correlation."""
    got = cophenetic_correlation(tree_embedding, taxonomy, max_codes=300, seed=4)
    sample = np.sort(np.random.default_rng(4).choice(six, 300, replace=False))
    assert got == cophenetic_correlation(tree_embedding, taxonomy, sample)
    assert got != cophenetic_correlation(tree_embedding, taxonomy, max_codes=300, seed=5)
    assert cophenetic_correlation(tree_embedding, taxonomy) == cophenetic_correlation(tree_embedding, taxonomy, six)
