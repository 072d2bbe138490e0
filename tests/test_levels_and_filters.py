"""Level positives, the Phase 1 order filter and uniform negatives: guarantees and effect of each field."""

from __future__ import annotations

import numpy as np
import pytest

from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.curriculum import EASY
from naics_hnm.data.datasets import Phase1MapDataset


def _epoch(ds, epoch):
    return [it for it in ds.__getitems__([(epoch, i) for i in range(len(ds))]) if it is not None]


def test_levels_items_and_false_negative_guard(naics, token_cache, naics_ancestors, naics_descendants):
    excluded = ("111110", "11111", "311111")
    cfg = StreamingConfig(positive_relations=("levels",), exclude_codes=excluded, seed=3)
    ds = Phase1MapDataset(cfg, SamplingConfig(order_filter=True), token_cache, 3, taxonomy=naics)
    banned_codes = {naics.index(c) for c in excluded}
    expected_anchors = [i for i in range(len(naics)) if naics.parent[i] >= 0 and i not in banned_codes]
    assert ds.pairs[:, 0].tolist() == expected_anchors  # one item per non-top-level allowed anchor
    saw_ancestor = saw_cousin = False
    for epoch in (0, 2, 4):
        for it in _epoch(ds, epoch):
            a, p = it["anchor_idx"], it["positive_idx"]
            lca_p = naics.lca_depth(a, p)
            assert 1 <= lca_p < naics.depth[a] and p not in naics_descendants[a] and p != a
            assert p not in banned_codes
            saw_ancestor |= p in naics_ancestors[a]
            saw_cousin |= p not in naics_ancestors[a]
            cands = it["candidate_idx"][it["candidate_idx"] >= 0].tolist()
            assert len(cands) == cfg.n_candidates and len(set(cands)) == len(cands)
            forbidden = {a, p} | naics_ancestors[a] | naics_descendants[a] | banned_codes
            assert not forbidden & set(cands)
            # order filter: every negative is strictly farther in the tree than the positive
            assert all(naics.lca_depth(a, c) < lca_p for c in cands)
            assert (naics.lca_depth(a, np.array(cands)) < lca_p).all()
    assert saw_ancestor and saw_cousin


def test_order_filter_changes_which_negatives_are_eligible(naics, token_cache):
    def violations(order_filter):
        ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(order_filter=order_filter), token_cache, 3,
                              taxonomy=naics)
        count = 0
        for it in _epoch(ds, 2):
            a, p = it["anchor_idx"], it["positive_idx"]
            cands = it["candidate_idx"][it["candidate_idx"] >= 0]
            count += int((naics.lca_depth(a, cands) >= naics.lca_depth(a, p)).sum())
        return count

    assert violations(False) > 1000  # siblings' subtrees are "hard" negatives without the filter
    assert violations(True) == 0


def test_level_decay_moves_the_positive_level(naics, token_cache):
    def mean_lca(decay):
        cfg = StreamingConfig(positive_relations=("levels",), level_decay=decay)
        ds = Phase1MapDataset(cfg, SamplingConfig(), token_cache, 3, taxonomy=naics)
        return np.mean([naics.lca_depth(it["anchor_idx"], it["positive_idx"]) for it in _epoch(ds, 0)])

    near, far = mean_lca(4.0), mean_lca(0.25)
    assert near > far + 0.5  # a large decay base favours near relatives
    with pytest.raises(ValueError, match="level_decay=0"):
        StreamingConfig(level_decay=0)
    with pytest.raises(ValueError, match="positive_relations"):
        StreamingConfig(positive_relations=("levels", "parent"))


def test_uniform_ignores_the_curriculum_buckets(naics, token_cache):
    def easy_share(uniform):
        ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(uniform=uniform, easy_start=0.0, easy_end=0.0),
                              token_cache, 3, taxonomy=naics)
        items = _epoch(ds, 0)
        anchors = np.array([it["anchor_idx"] for it in items])[:, None]
        negatives = np.stack([it["negative_idx"] for it in items])
        return float((ds.table.bucket_of(np.broadcast_to(anchors, negatives.shape), negatives) == EASY).mean()), ds

    curriculum_share, _ = easy_share(False)
    uniform_share, ds = easy_share(True)
    sizes = ds.table.sizes[ds.pairs[:, 0]]
    expected = float((sizes[:, EASY] / sizes.sum(axis=1)).mean())  # uniform over all eligible codes
    assert curriculum_share < 0.05  # no easy share requested, only spill-over
    assert uniform_share == pytest.approx(expected, abs=0.02)
    with pytest.raises(ValueError, match="uniform"):
        SamplingConfig(uniform="yes")
    with pytest.raises(ValueError, match="order_filter"):
        SamplingConfig(order_filter=1)
