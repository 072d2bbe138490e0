"""The packed per-code rows of the tree guard give the same answers as the separate arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naics_hnm.tree.guard import TreeGuard, guard_tensors
from naics_hnm.tree.synthetic import random_tree
from naics_hnm.tree.taxonomy import Taxonomy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_mask_equals_guard_tensors_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 300, max_depth=6)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    allowed = rng.random(300) > 0.2 if seed else None
    guard = TreeGuard(tx, allowed)
    anchors = rng.integers(0, 300, 50)
    cands = rng.integers(-1, 300, (50, 40))
    cands[:, 0] = anchors  # the anchor itself
    cands[:, 1] = tx.parent[anchors]  # an ancestor (or -1)
    fast = guard.keep_mask(anchors, cands)
    slow, _ = guard_tensors(torch.from_numpy(anchors), torch.from_numpy(cands), tree=guard)
    np.testing.assert_array_equal(fast, slow.numpy())
    for b, a in enumerate(anchors):
        for j, c in enumerate(cands[b]):
            ancestors = set(tx.ancestors(int(c))) if c >= 0 else set()
            expected = (c >= 0 and c != a and a not in ancestors and c not in set(tx.ancestors(int(a)))
                        and (allowed is None or allowed[c]))
            assert fast[b, j] == expected


def test_packed_rows_match_the_tree_arrays():
    rng = np.random.default_rng(5)
    tree = random_tree(rng, 200, max_depth=5)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    ids = np.arange(200)
    rows = TreeGuard(tx).rows(ids)
    np.testing.assert_array_equal(rows[:, 0], tx.pre)
    np.testing.assert_array_equal(rows[:, 1], tx.end)
    np.testing.assert_array_equal(rows[:, 3:], tx.ancestor_path[:, 1:])
    a, c = rng.integers(0, 200, 500), rng.integers(0, 200, 500)
    guard = TreeGuard(tx)
    np.testing.assert_array_equal(guard.lca_depth(a, c), tx.lca_depth(a, c))
