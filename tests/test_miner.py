"""HardNegativeMiner, guarded neighbour lists and the sharded search against brute force on random trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.mining.miner import HardNegativeMiner
from naics_hnm.mining.neighbours import first_search_depth, guarded_neighbours
from naics_hnm.index.sharded_search import Shard, merge_topk, sharded_search
from naics_hnm.tree.synthetic import random_tree
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.tree.guard import TreeGuard
from test_mining import TreeReference, brute_force, scores_of
from thread_group import run_ranks


def tree_and_vectors(seed: int, n: int = 400, d: int = 12):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, n, max_depth=6)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    x = rng.standard_normal((n, d)).astype(np.float32)
    allowed = rng.random(n) > 0.1
    return tx, x, allowed


def reference_neighbours(x, metric, tx, allowed, anchors, m):
    ref = TreeReference(tx)
    out = []
    for a in anchors:
        ids = [c for c in range(len(tx)) if allowed[c] and not ref.related(int(a), c)]
        s = scores_of(x, metric, int(a), ids)
        order = np.lexsort((np.asarray(ids), s if metric == "l2" else -s))[:m]
        out.append([ids[i] for i in order] + [-1] * (m - len(order)))
    return np.array(out)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_guarded_neighbours_equal_brute_force(metric):
    tx, x, allowed = tree_and_vectors(1)
    index = EmbeddingIndex.build(x, metric=metric, device="cpu")
    anchors = np.flatnonzero(allowed)
    _, ids, report = guarded_neighbours(index, anchors, 16, guard=TreeGuard(tx, allowed), batch_size=64)
    np.testing.assert_array_equal(ids, reference_neighbours(x, metric, tx, allowed, anchors, 16))
    assert report.searches > len(range(0, len(anchors), 64))  # some rows needed a deeper search


def test_first_search_is_deep_enough_when_a_share_of_codes_is_held_out():
    # a two-level tree: 40 parents of 25 leaves each; 30 % of the leaves held out (disallowed), as in the main job
    rng = np.random.default_rng(5)
    parents = [f"P{p:02d}" for p in range(40)]
    leaves = [f"P{p:02d}L{c:02d}" for p in range(40) for c in range(25)]
    tx = Taxonomy(parents + leaves, [""] * 40 + [code[:3] for code in leaves], parents + leaves)
    allowed = np.ones(len(tx), dtype=bool)
    allowed[40 + rng.choice(1000, 300, replace=False)] = False
    x = rng.standard_normal((len(tx), 8)).astype(np.float32)
    index = EmbeddingIndex.build(x, device="cpu")
    guard = TreeGuard(tx, allowed)
    assert first_search_depth(20, guard) > first_search_depth(20, TreeGuard(tx)) / 0.75
    anchors = np.flatnonzero(allowed[40:]) + 40  # the allowed leaves: their only relative is their parent
    _, ids, report = guarded_neighbours(index, anchors, 20, guard=guard, batch_size=len(anchors))
    np.testing.assert_array_equal(ids, reference_neighbours(x, "cosine", tx, allowed, anchors, 20))
    assert report.searches == 1  # every row settled in the first search
    # the unscaled depth (m + 2 + tree depth = 24 results) holds too few allowed codes for some rows
    kept_of_first = [allowed[row].sum() for row in index.search_ids(anchors, 24)[1]]
    assert min(kept_of_first) < 20 + 2


def test_guarded_neighbours_small_search_limit_pads_and_counts():
    tx, x, _ = tree_and_vectors(2, n=200)
    index = EmbeddingIndex.build(x, device="cpu")
    _, ids, report = guarded_neighbours(index, np.arange(200), 30, guard=TreeGuard(tx), max_search=31)
    ref = TreeReference(tx)
    for a, row in enumerate(ids):
        assert not any(ref.related(a, int(c)) for c in row if c >= 0)
    assert report.short_rows == int(((ids >= 0).sum(1) < 30).sum())


def test_miner_mines_the_widened_pool_exactly():
    tx, x, allowed = tree_and_vectors(3)
    miner = HardNegativeMiner(tx, allowed=allowed, k=6, neighbours=10, relative_margin=0.05, order_filter=True,
                              device="cpu")
    with pytest.raises(RuntimeError, match="before refresh"):
        miner.mine(np.array([0]), np.array([1]))
    timings = miner.refresh(x, epoch=4)
    assert set(timings) == {"build", "neighbours"} and miner.epoch == 4
    rng = np.random.default_rng(4)
    anchors = rng.choice(np.flatnonzero(allowed), 32)
    positives = np.array([tx.parent[a] for a in anchors])
    pool = rng.integers(-1, len(tx), (32, 20))
    scores, ids, stats = miner.mine(anchors, positives, pool)
    assert isinstance(ids, np.ndarray) and stats.removed_related + stats.removed_disallowed > 0
    widened = miner.widen(anchors, pool).numpy()
    neighbours = reference_neighbours(x, "cosine", tx, allowed, anchors, 10)
    for row in range(32):
        assert set(neighbours[row][neighbours[row] >= 0]) <= set(widened[row].tolist())
    excluded = [set(np.flatnonzero(~allowed).tolist())] * 32
    want_s, want_i = brute_force(x, "cosine", anchors, 6, pools=widened, positives=positives, exclude=excluded,
                                 margin=0.05, tree=TreeReference(tx), order_filter=True)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)
    t_scores, t_ids, _ = miner.mine(torch.from_numpy(anchors), torch.from_numpy(positives), torch.from_numpy(pool))
    assert isinstance(t_ids, torch.Tensor) and np.array_equal(t_ids.numpy(), ids)
    assert miner.state_dict() == {"epoch": 4, "k": 6, "metric": "cosine", "neighbours": 10, "index_factory": None}


def test_lists_for_given_anchors_now_and_for_others_when_first_widened():
    """refresh(anchors=...) lists those anchors only (what an epoch over a subset of a large tree uses);
    another anchor's list is built the first time widen() needs it; every list equals brute force."""
    tx, x, allowed = tree_and_vectors(5)
    rng = np.random.default_rng(5)
    subset = rng.choice(len(tx), 60, replace=False)  # some disallowed: they are never listed
    miner = HardNegativeMiner(tx, allowed=allowed, k=4, neighbours=10, device="cpu")
    miner.refresh(x, epoch=2, anchors=subset)
    table = miner.neighbour_ids.numpy()
    listed = np.unique(subset[allowed[subset]])
    assert np.array_equal(np.flatnonzero((table >= 0).any(1)), listed)
    np.testing.assert_array_equal(table[listed], reference_neighbours(x, "cosine", tx, allowed, listed, 10))
    others = rng.choice(np.setdiff1d(np.flatnonzero(allowed), listed), 8, replace=False)
    widened = miner.widen(others).numpy()
    want = reference_neighbours(x, "cosine", tx, allowed, others, 10)
    np.testing.assert_array_equal(miner.neighbour_ids.numpy()[others], want)
    for row in range(len(others)):
        assert sorted(widened[row][widened[row] >= 0]) == sorted(want[row][want[row] >= 0])
    full = HardNegativeMiner(tx, allowed=allowed, k=4, neighbours=10, device="cpu")
    full.refresh(x, epoch=2)
    positives = np.array([tx.parent[a] for a in others])
    assert np.array_equal(miner.mine(others, positives)[1], full.mine(others, positives)[1])


def test_miner_rejects_bad_arguments():
    tx, x, _ = tree_and_vectors(5, n=50)
    with pytest.raises(ValueError, match=r"HardNegativeMiner\(k=0\)"):
        HardNegativeMiner(tx, k=0)
    with pytest.raises(TypeError, match=r"HardNegativeMiner\(taxonomy=ndarray\)"):
        HardNegativeMiner(x, k=2)
    with pytest.raises(ValueError, match=r"index_factory=''"):
        HardNegativeMiner(tx, index_factory="")
    with pytest.raises(ValueError, match=r"refresh\(embeddings of shape \(49, 12\)\): expected \[50, d\]"):
        HardNegativeMiner(tx).refresh(x[:49])


def test_merge_topk_keeps_best_and_breaks_ties_by_id():
    scores = np.array([[[0.9, 0.5, -np.inf]], [[0.7, 0.5, 0.1]]], dtype=np.float32)
    ids = np.array([[[4, 9, -1]], [[2, 3, 8]]])
    s, i = merge_topk(scores, ids, 4, "ip")
    assert i.tolist() == [[4, 2, 3, 9]] and s.tolist()[0][:2] == pytest.approx([0.9, 0.7])
    s, i = merge_topk(np.array([[[1.0, 2.0]], [[0.5, 3.0]]]), np.array([[[5, 6]], [[7, 8]]]), 3, "l2")
    assert i.tolist() == [[7, 5, 6]]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_search_equals_one_process(world):
    """``world`` threads stand in for ranks: an all_gather on a barrier, as DDP would do it."""
    tx, x, allowed = tree_and_vectors(6, n=500)
    full = EmbeddingIndex.build(x, metric="cosine", device="cpu")
    want_s, want_i, _ = guarded_neighbours(full, np.arange(500), 12, guard=TreeGuard(tx, allowed), batch_size=100)
    vectors = full.vectors.numpy()

    def run(shard: Shard):
        search = sharded_search(vectors, shard, metric="cosine", device="cpu")
        return guarded_neighbours(full, np.arange(500), 12, guard=TreeGuard(tx, allowed), batch_size=100,
                                  search=search)

    results = run_ranks(world, run)
    for got_s, got_i, _ in results:
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-6)
    assert Shard(1, 3, lambda a: a).rows(10) == (4, 8) and Shard(2, 3, lambda a: a).rows(10) == (8, 10)
