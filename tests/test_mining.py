"""mine_candidates in pool and global mode against brute force over every guarded id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.mining.candidates import mine_candidates
from naics_hnm.tree.synthetic import random_tree
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.tree.guard import TreeGuard

METRICS = ("cosine", "ip", "l2")


def scores_of(x: np.ndarray, metric: str, a: int, ids) -> np.ndarray:
    v = x.astype(np.float64)
    if metric == "cosine":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.asarray(ids, dtype=np.int64)
    if metric == "l2":
        return ((v[ids] - v[a]) ** 2).sum(1)
    return v[ids] @ v[a]


class TreeReference:
    """Relations by walking parent pointers, independent of the library's DFS arrays."""

    def __init__(self, tx: Taxonomy):
        self.lineage = []
        for i in range(len(tx)):
            chain, p = [i], int(tx.parent[i])
            while p >= 0:
                chain.append(p)
                p = int(tx.parent[p])
            self.lineage.append(chain[::-1])  # root side first, i last

    def related(self, a: int, c: int) -> bool:
        return a in self.lineage[c] or c in self.lineage[a]

    def lca(self, a: int, c: int) -> int:
        depth = 0
        for x, y in zip(self.lineage[a], self.lineage[c]):
            if x != y:
                break
            depth += 1
        return depth


def brute_force(x, metric, anchors, k, pools=None, positives=None, exclude=None, margin=None,
                tree=None, order_filter=False):
    """Per anchor: drop anchor, positive, excluded, related, order, margin; stable top-k."""
    n = len(x)
    worst = np.inf if metric == "l2" else -np.inf
    out_s, out_i = np.full((len(anchors), k), worst), np.full((len(anchors), k), -1, dtype=np.int64)
    for r, a in enumerate(anchors):
        p = -1 if positives is None else int(positives[r])
        row = range(n) if pools is None else pools[r]
        ids = []
        for c in row:
            c = int(c)
            if c < 0 or c in ids or c == a or c == p:
                continue
            if exclude is not None and c in set(exclude[r]):
                continue
            if tree is not None and tree.related(a, c):
                continue
            if order_filter and p >= 0 and tree.lca(a, c) >= tree.lca(a, p):
                continue
            ids.append(c)
        s = scores_of(x, metric, a, ids) if ids else np.empty(0)
        if margin is not None and p >= 0:
            sp = scores_of(x, metric, a, [p])[0]
            keep = s >= sp + margin * abs(sp) if metric == "l2" else s <= sp - margin * abs(sp)
            s, ids = s[keep], np.asarray(ids)[keep]
        order = np.argsort(s if metric == "l2" else -s, kind="stable")[:k]
        out_i[r, : order.size] = np.asarray(ids, dtype=np.int64)[order]
        out_s[r, : order.size] = s[order]
    return out_s, out_i


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(20).standard_normal((300, 16)).astype(np.float32)


def setup_batch(seed: int, n: int, b: int = 24):
    rng = np.random.default_rng(seed)
    anchors = rng.integers(0, n, b)
    positives = rng.integers(0, n, b)
    positives[positives == anchors] = (positives[positives == anchors] + 1) % n
    positives[-1] = -1
    exclude = [set(rng.integers(0, n, 5).tolist()) for _ in range(b)]
    tree = random_tree(rng, n, max_depth=6)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    return anchors, positives, exclude, tx


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("margin", [None, 0.05])
def test_global_mode_equals_brute_force(data, metric, margin):
    anchors, positives, exclude, tx = setup_batch(21, len(data))
    index = EmbeddingIndex.build(data, metric=metric, device="cpu")
    scores, ids, stats = mine_candidates(
        index, anchors, k=8, positive_ids=positives, exclude=exclude, relative_margin=margin,
        taxonomy=tx, order_filter=True, return_stats=True,
    )
    want_s, want_i = brute_force(data, metric, anchors, 8, positives=positives, exclude=exclude,
                                 margin=margin, tree=TreeReference(tx), order_filter=True)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)
    assert stats.kept >= (ids >= 0).sum()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_global_mode_deepens_search(data, metric):
    """A wide margin drops most near neighbours, so the first search depth is not enough."""
    anchors, positives, _, _ = setup_batch(22, len(data))
    nearest = EmbeddingIndex.build(data, metric=metric, device="cpu").search_ids(anchors, 3)[1]
    positives = nearest[:, 1]
    index = EmbeddingIndex.build(data, metric=metric, device="cpu")
    depths = []
    search_ids = index.search_ids

    def recording(rows, depth):
        depths.append((len(rows), depth))
        return search_ids(rows, depth)

    index.search_ids = recording
    scores, ids = mine_candidates(index, anchors, k=20, positive_ids=positives, relative_margin=0.5)
    assert len(depths) > 1 and depths[1][1] == 2 * depths[0][1] and depths[-1][0] < depths[0][0]
    want_s, want_i = brute_force(data, metric, anchors, 20, positives=positives, margin=0.5)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_pool_mode_equals_brute_force(data, metric):
    anchors, positives, exclude, tx = setup_batch(23, len(data))
    rng = np.random.default_rng(24)
    pools = rng.integers(0, len(data), (len(anchors), 40))
    pools[:, :2] = np.stack([anchors, positives], 1)
    pools[:, 5] = pools[:, 6]
    pools[rng.random(pools.shape) < 0.1] = -1
    index = EmbeddingIndex.build(data, metric=metric, device="cpu")
    for k in (4, 45):
        scores, ids = mine_candidates(index, anchors, pools, k=k, positive_ids=positives, exclude=exclude,
                                      relative_margin=0.1, taxonomy=TreeGuard(tx))
        want_s, want_i = brute_force(data, metric, anchors, k, pools=pools, positives=positives,
                                     exclude=exclude, margin=0.1, tree=TreeReference(tx))
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)


def test_never_returns_anchor_positive_or_excluded(data):
    anchors, positives, exclude, _ = setup_batch(25, len(data), b=40)
    index = EmbeddingIndex.build(data, device="cpu")
    nearest = index.search_ids(anchors, 12)[1]
    for pools in (None, nearest):
        ids = mine_candidates(index, anchors, pools, k=10, positive_ids=positives, exclude=exclude)[1]
        for r, a in enumerate(anchors):
            row = set(ids[r][ids[r] >= 0].tolist())
            assert a not in row and positives[r] not in row and not row & exclude[r]
            assert len(row) == (ids[r] >= 0).sum()


def test_works_without_taxonomy_and_with_torch(data):
    index = EmbeddingIndex.build(torch.from_numpy(data), device="cpu")
    anchors = torch.tensor([0, 5, 7])
    scores, ids = mine_candidates(index, anchors, k=3)
    assert isinstance(ids, torch.Tensor) and ids.shape == (3, 3)
    want_s, want_i = brute_force(data, "cosine", anchors.numpy(), 3)
    np.testing.assert_array_equal(ids.numpy(), want_i)
    pools = torch.tensor([[1, 2, -1], [5, 3, 3], [-1, -1, -1]])
    scores, ids = mine_candidates(index, anchors, pools, k=4)
    assert ids.tolist()[2] == [-1, -1, -1, -1] and torch.isinf(scores[2]).all()
    assert ids.tolist()[1][1:] == [-1, -1, -1]


def test_k_beyond_guarded_rows_pads(data):
    small = data[:12]
    index = EmbeddingIndex.build(small, metric="l2", device="cpu")
    scores, ids = mine_candidates(index, np.array([0]), k=15, positive_ids=np.array([1]), exclude=[[2, 3]])
    assert (ids[0, :8] >= 0).all() and (ids[0, 8:] == -1).all()
    assert np.isposinf(scores[0, 8:]).all()
    assert set(ids[0, :8].tolist()) == set(range(4, 12))


def test_naics_taxonomy_guard_global_and_pool():
    tx = Taxonomy.naics2022()
    rng = np.random.default_rng(26)
    x = rng.standard_normal((len(tx), 16)).astype(np.float32)
    x += 2.0 * rng.standard_normal((len(tx), 16)).astype(np.float32)[tx.ancestor_path[:, 1]]  # sector structure
    index = EmbeddingIndex.build(x, device="cpu", codes=tx.codes)
    anchors = rng.choice(np.flatnonzero(tx.depth == 5), 16)
    positives = np.array([tx.parent[a] if not tx.siblings(a).size else tx.siblings(a)[0] for a in anchors])
    scores, ids, stats = mine_candidates(index, anchors, k=8, positive_ids=positives, taxonomy=tx,
                                         order_filter=True, relative_margin=0.05, return_stats=True)
    want_s, want_i = brute_force(x, "cosine", anchors, 8, positives=positives, margin=0.05,
                                 tree=TreeReference(tx), order_filter=True)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-4, atol=1e-4)
    assert stats.removed_related > 0 and stats.removed_order > 0
    pools = rng.integers(0, len(tx), (16, 60))
    pools[:, :5] = np.stack([tx.ancestor_path[a, 1:6] for a in anchors])
    got = mine_candidates(index, anchors, pools, k=8, positive_ids=positives, taxonomy=tx, order_filter=True)[1]
    want = brute_force(x, "cosine", anchors, 8, pools=pools, positives=positives, tree=TreeReference(tx),
                       order_filter=True)[1]
    np.testing.assert_array_equal(got, want)


def test_rejects_bad_input(data):
    index = EmbeddingIndex.build(data, device="cpu")
    with pytest.raises(TypeError, match="index must be an EmbeddingIndex"):
        mine_candidates(data, np.array([0]), k=2)
    with pytest.raises(ValueError, match="relative_margin=0.1 needs positive_ids"):
        mine_candidates(index, np.array([0]), k=2, relative_margin=0.1)
    with pytest.raises(ValueError, match="relative_margin=1.5"):
        mine_candidates(index, np.array([0]), k=2, positive_ids=np.array([1]), relative_margin=1.5)
    with pytest.raises(ValueError, match="order_filter=True needs positive_ids and taxonomy="):
        mine_candidates(index, np.array([0]), k=2, order_filter=True)
    with pytest.raises(TypeError, match="taxonomy=ndarray: expected a Taxonomy, a TreeGuard or None"):
        mine_candidates(index, np.array([0]), k=2, taxonomy=np.eye(3, dtype=bool))
    with pytest.raises(ValueError, match="exclude as a bool mask"):
        mine_candidates(index, np.array([0]), k=2, exclude=np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="positive_ids holds id 300"):
        mine_candidates(index, np.array([0]), k=2, positive_ids=np.array([300]))
    with pytest.raises(ValueError, match="taxonomy has 2125 codes but the index has 300 rows"):
        mine_candidates(index, np.array([0]), k=2, taxonomy=Taxonomy.naics2022())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_mining_matches_cpu(data):
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss has no GPU build")
    anchors, positives, exclude, tx = setup_batch(27, len(data))
    cpu = EmbeddingIndex.build(data, device="cpu")
    gpu = EmbeddingIndex.build(data, device="cuda")
    kwargs = dict(k=6, positive_ids=positives, exclude=exclude, taxonomy=tx, order_filter=True, relative_margin=0.05)
    c_s, c_i = mine_candidates(cpu, anchors, **kwargs)
    g_s, g_i = mine_candidates(gpu, torch.from_numpy(anchors).cuda(), **kwargs)
    np.testing.assert_array_equal(g_i.cpu().numpy(), c_i)
    np.testing.assert_allclose(g_s.cpu().numpy(), c_s, rtol=1e-4, atol=1e-4)
