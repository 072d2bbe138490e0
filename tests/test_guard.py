"""guard_mask / margin_mask on the real NAICS tree against per-pair Python references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naics_hnm.mining.checks import GuardStats, TreeGuard, guard_mask, margin_mask
from naics_hnm.tree.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def tx() -> Taxonomy:
    return Taxonomy.naics2022()


def lineage(tx: Taxonomy, i: int) -> set[int]:
    return {i, *tx.ancestors(i).tolist()}


def ref_related(tx: Taxonomy, a: int, c: int) -> bool:
    return a == c or c in set(tx.ancestors(a).tolist()) or c in set(tx.descendants(a).tolist())


def ref_lca_depth(tx: Taxonomy, a: int, c: int) -> int:
    common = lineage(tx, a) & lineage(tx, c)
    return max((int(tx.depth[i]) for i in common), default=0)


def batch(tx: Taxonomy, seed: int, b: int = 48, c: int = 30):
    """Anchors at depth >= 3, positives among their siblings/children, pools mixing relatives."""
    rng = np.random.default_rng(seed)
    deep = np.flatnonzero(tx.depth >= 3)
    anchors = rng.choice(deep, b)
    positives = np.array([rng.choice(tx.siblings(a)) if tx.siblings(a).size else tx.parent[a] for a in anchors])
    cands = rng.integers(0, len(tx), (b, c))
    for row, a in enumerate(anchors):
        relatives = np.concatenate([tx.ancestors(a), tx.descendants(a), tx.siblings(a)])
        take = min(relatives.size, 10)
        cands[row, :take] = rng.choice(relatives, take, replace=False)
        cands[row, 10] = a
        cands[row, 11] = positives[row]
        cands[row, 12:14] = -1
    return anchors, positives, cands


def reference(tx, anchors, positives, cands, order_filter, exclude, allowed=None):
    """Per-pair rule walk; each removal is counted under the first rule, in GuardStats field order."""
    keep = np.zeros(cands.shape, dtype=bool)
    counts = dict.fromkeys(["self", "positive", "related", "disallowed", "order", "exclude"], 0)
    total = 0
    for r, (a, p) in enumerate(zip(anchors, positives)):
        for j, cand in enumerate(cands[r]):
            if cand < 0:
                continue
            total += 1
            if cand == a:
                counts["self"] += 1
            elif cand == p:
                counts["positive"] += 1
            elif ref_related(tx, a, cand):
                counts["related"] += 1
            elif allowed is not None and not allowed[cand]:
                counts["disallowed"] += 1
            elif order_filter and p >= 0 and ref_lca_depth(tx, a, cand) >= ref_lca_depth(tx, a, p):
                counts["order"] += 1
            elif exclude is not None and cand in set(exclude[r]):
                counts["exclude"] += 1
            else:
                keep[r, j] = True
    return keep, counts, total


@pytest.mark.parametrize("with_allowed", [False, True])
@pytest.mark.parametrize("order_filter", [False, True])
def test_guard_matches_per_pair_reference(tx, order_filter, with_allowed):
    anchors, positives, cands = batch(tx, seed=int(order_filter))
    rng = np.random.default_rng(10)
    exclude = [set(rng.choice(row[row >= 0], 3).tolist()) for row in cands]
    allowed = None
    tree = tx
    if with_allowed:
        allowed = rng.random(len(tx)) > 0.2
        allowed[anchors] = True
        tree = TreeGuard(tx, allowed)
    keep, stats = guard_mask(
        anchors, cands, positive_ids=positives, taxonomy=tree, order_filter=order_filter, exclude=exclude,
    )
    want_keep, counts, total = reference(tx, anchors, positives, cands, order_filter, exclude, allowed)
    assert isinstance(keep, np.ndarray) and keep.dtype == np.bool_
    np.testing.assert_array_equal(keep, want_keep)
    assert stats.candidates == total
    for rule in ("self", "positive", "related", "disallowed", "order", "exclude"):
        assert getattr(stats, f"removed_{rule}") == counts[rule], rule
    assert stats.kept == int(want_keep.sum())
    assert stats.removed_related > 0 and stats.removed_self >= len(anchors)
    assert stats.removed_exclude > 0
    assert (stats.removed_disallowed > 0) == with_allowed
    if order_filter:
        assert stats.removed_order > 0


def test_order_filter_keeps_only_shallower_lca(tx):
    anchors, positives, cands = batch(tx, seed=3)
    keep, _ = guard_mask(anchors, cands, positive_ids=positives, taxonomy=tx, order_filter=True)
    assert keep.any()
    for r, (a, p) in enumerate(zip(anchors, positives)):
        for j, cand in enumerate(cands[r]):
            if keep[r, j]:
                assert ref_lca_depth(tx, a, cand) < ref_lca_depth(tx, a, p)


def test_guard_torch_inputs_and_tree_guard(tx):
    anchors, positives, cands = batch(tx, seed=4)
    want, want_stats = guard_mask(anchors, cands, positive_ids=positives, taxonomy=tx, order_filter=True)
    for tree in (tx, TreeGuard(tx)):
        got, stats = guard_mask(
            torch.from_numpy(anchors), torch.from_numpy(cands), positive_ids=torch.from_numpy(positives),
            taxonomy=tree, order_filter=True,
        )
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bool
        np.testing.assert_array_equal(got.numpy(), want)
        assert stats == want_stats
    # the same guard through TreeGuard.keep on int64 tensors
    keep, stats = TreeGuard(tx).keep(torch.from_numpy(anchors), torch.from_numpy(cands),
                                     torch.from_numpy(positives), order_filter=True)
    np.testing.assert_array_equal(keep.numpy(), want)
    assert stats == want_stats


def test_positive_padding_disables_positive_and_order_rules(tx):
    """A row whose positive is -1 drops only self/related codes, even with the order filter."""
    anchors, positives, cands = batch(tx, seed=6, b=6)
    positives = positives.copy()
    positives[::2] = -1
    keep, stats = guard_mask(anchors, cands, positive_ids=positives, taxonomy=tx, order_filter=True)
    for r, (a, p) in enumerate(zip(anchors, positives)):
        for j, cand in enumerate(cands[r]):
            if cand < 0 or cand == a or ref_related(tx, a, cand):
                assert not keep[r, j]
            elif p < 0:
                assert keep[r, j]
            else:
                assert keep[r, j] == (cand != p and ref_lca_depth(tx, a, cand) < ref_lca_depth(tx, a, p))
    want_keep, counts, total = reference(tx, anchors, positives, cands, True, None)
    np.testing.assert_array_equal(keep, want_keep)
    assert (stats.removed_positive, stats.removed_order) == (counts["positive"], counts["order"])


def test_guard_without_taxonomy_and_exclude_mask():
    anchors = np.array([0, 1])
    cands = np.array([[0, 2, 3, -1, 2], [4, 1, 5, 6, 7]])
    mask = np.zeros(cands.shape, dtype=bool)
    mask[1, 3] = True
    keep, stats = guard_mask(anchors, cands, positive_ids=np.array([3, -1]), exclude=mask)
    assert keep.tolist() == [[False, True, False, False, True], [True, False, True, False, True]]
    counts = (stats.candidates, stats.removed_self, stats.removed_positive, stats.removed_exclude, stats.kept)
    assert counts == (9, 2, 1, 1, 5)


def test_guard_rejects_bad_input(tx):
    anchors, positives, cands = batch(tx, seed=5, b=4)
    with pytest.raises(ValueError, match="order_filter=True needs positive_ids and a taxonomy"):
        guard_mask(anchors, cands, taxonomy=tx, order_filter=True)
    with pytest.raises(ValueError, match="order_filter=True needs positive_ids and a taxonomy"):
        guard_mask(anchors, cands, positive_ids=positives, order_filter=True)
    bad = cands.copy()
    bad[0, 0] = len(tx)
    with pytest.raises(ValueError, match=f"candidate_ids holds id {len(tx)}, expected ids in \\[-1, {len(tx)}\\)"):
        guard_mask(anchors, bad, taxonomy=tx)
    bad_anchor = anchors.copy()
    bad_anchor[1] = -1
    with pytest.raises(ValueError, match="anchor_ids holds id -1"):
        guard_mask(bad_anchor, cands, taxonomy=tx)
    with pytest.raises(ValueError, match="exclude has 2 entries, expected one id collection per anchor \\(B=4\\)"):
        guard_mask(anchors, cands, exclude=[[1], [2]])
    # the tree comes as a Taxonomy or a TreeGuard; the old relation-matrix keywords are gone
    with pytest.raises(TypeError, match="taxonomy=ndarray: expected a Taxonomy, a TreeGuard or None"):
        guard_mask(anchors, cands, taxonomy=np.zeros((len(tx), len(tx)), dtype=bool))
    with pytest.raises(TypeError, match="related"):
        guard_mask(anchors, cands, related=np.zeros((3, 4), dtype=bool))
    with pytest.raises(TypeError, match="lca_depth"):
        guard_mask(anchors, cands, lca_depth=np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="TreeGuard\\(taxonomy=str\\): expected a Taxonomy"):
        TreeGuard("naics")
    with pytest.raises(ValueError, match="allowed=.*expected bool"):
        TreeGuard(tx, np.ones(len(tx) - 1, dtype=bool))


def test_margin_sign_similarity_and_distance():
    scores = np.array([[0.75, 0.72, 0.70, 0.9], [-0.52, -0.55, -0.56, -0.4]], dtype=np.float32)
    pos = np.array([0.8, -0.5], dtype=np.float32)
    keep = margin_mask(scores, pos, 0.1, "cosine")
    # thresholds: 0.8 - 0.08 = 0.72 and -0.5 - 0.05 = -0.55 (more similar than these are dropped)
    assert keep.tolist() == [[False, True, True, False], [False, True, True, False]]
    dist = np.array([[1.9, 2.1, 2.2, 3.0]], dtype=np.float32)
    assert margin_mask(dist, np.array([2.0], dtype=np.float32), 0.1, "l2").tolist() == [[False, False, True, True]]
    assert margin_mask(scores, pos, 0.0, "ip").tolist() == [[True, True, True, False], [True, True, True, False]]
    open_row = margin_mask(scores, np.array([np.nan, -np.inf], dtype=np.float32), 0.1, "ip")
    assert open_row.all()
    t = margin_mask(torch.from_numpy(scores), torch.from_numpy(pos), 0.1, "cosine")
    assert isinstance(t, torch.Tensor) and t.numpy().tolist() == keep.tolist()


@pytest.mark.parametrize("m", [1.0, -0.1, float("nan")])
def test_margin_rejects_out_of_range(m):
    with pytest.raises(ValueError, match="relative_margin=.*expected a number in \\[0, 1\\)"):
        margin_mask(np.zeros((1, 1)), np.zeros(1), m, "cosine")


def test_margin_rejects_bad_metric_and_shapes():
    with pytest.raises(ValueError, match="metric='dot'"):
        margin_mask(np.zeros((1, 1)), np.zeros(1), 0.1, "dot")
    with pytest.raises(ValueError, match="expected \\[B, C\\] and \\[B\\]"):
        margin_mask(np.zeros((2, 1)), np.zeros(3), 0.1, "ip")


def test_stats_add_up_and_accumulate(tx):
    total = GuardStats()
    for seed in range(3):
        anchors, positives, cands = batch(tx, seed=seed)
        allowed = np.random.default_rng(seed).random(len(tx)) > 0.1
        _, stats = guard_mask(anchors, cands, positive_ids=positives, taxonomy=TreeGuard(tx, allowed),
                              order_filter=True)
        removed = (stats.removed_self + stats.removed_positive + stats.removed_related + stats.removed_disallowed
                   + stats.removed_order)
        assert removed + stats.removed_exclude + stats.removed_margin + stats.kept == stats.candidates
        total = total + stats
    fractions = total.as_fractions()
    assert set(fractions) == {"removed_self", "removed_positive", "removed_related", "removed_disallowed",
                              "removed_order", "removed_exclude", "removed_margin", "kept"}
    assert total.removed_disallowed > 0
    assert abs(sum(fractions.values()) - 1.0) < 1e-9
    assert GuardStats().as_fractions()["kept"] == 0.0
