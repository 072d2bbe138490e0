"""Tree relations, guards and curriculum buckets on random trees, against brute force over parent pointers.

Every check here compares the vectorised, O(N x depth) machinery (DFS ranges, ancestor paths) with a
reference that only walks the parent column: ~35 seeded forests of 1..300 letter codes (parent
column; chains, wide nodes, lone roots, depth 1..8), all pairs per tree. Also the constructor and
CSV errors, each naming the offending row or line and code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import letter_code
from naics_hnm.data.counter_rng import item_keys
from naics_hnm.data.curriculum import EASY, HARD, SEMI_HARD, NegativeTable, spill, split_counts
from naics_hnm.mining.checks import GuardStats, TreeGuard, guard_mask
from naics_hnm.data.pairs import sibling_pairs, tree_pairs
from naics_hnm.tree.synthetic import random_tree, synthetic_tree
from naics_hnm.tree.taxonomy import Taxonomy, TaxonomyError
from naics_hnm.tree.structure import MAX_DEPTH

# ---------------------------------------------------------------- trees and the brute-force reference

# (seed, n codes, max depth): sizes 1..300, depths 1..8
RANDOM_CASES = [(seed, n, 1 + seed % 8) for seed, n in enumerate(
    [1, 2, 3, 4, 5, 7, 9, 12, 16, 20, 25, 31, 40, 50, 60, 75, 90, 110, 130, 150,
     170, 190, 210, 230, 250, 270, 285, 300, 300, 300])]
SHAPES = ["single", "chain8", "wide", "flat", "two_chains_and_lone_roots"]


def _shape(name: str) -> tuple[list[str], list[str]]:
    """Hand-made shapes as (codes, parent codes) in a scrambled row order."""
    if name == "single":
        parent = [-1]
    elif name == "chain8":
        parent = [-1] + list(range(7))
    elif name == "wide":
        parent = [-1] + [0] * 299
    elif name == "flat":
        parent = [-1] * 120
    else:
        parent = [-1, 0, 1, 2, 3, -1, 5, 6, -1, -1, 8, 8, 8, 11, 11, 13]
    codes = [letter_code(7 * i + 3) for i in range(len(parent))]
    order = np.random.default_rng(len(parent)).permutation(len(parent)).tolist()
    return [codes[i] for i in order], [codes[parent[i]] if parent[i] >= 0 else "" for i in order]


@dataclass
class Case:
    """A taxonomy and its brute-force relations, computed only from the parent column."""

    codes: list[str]  # input rows
    parents: list[str]
    tx: Taxonomy
    parent: np.ndarray  # canonical ids
    depth: np.ndarray
    ancestors: list[list[int]]  # nearest first
    lineage: np.ndarray  # bool [N, N]: j is i or an ancestor of i
    lca: np.ndarray  # int [N, N]
    related: np.ndarray  # bool [N, N]


def _build_case(codes: list[str], parents: list[str]) -> Case:
    titles = [f"title {c}" for c in codes]
    tx = Taxonomy(codes, parents, titles, name="random")
    canon = sorted(codes)
    assert tx.codes == canon
    idx = {c: i for i, c in enumerate(canon)}
    parent_of = dict(zip(codes, parents))
    n = len(canon)
    parent = np.array([idx[parent_of[c]] if parent_of[c] else -1 for c in canon], dtype=np.int64)
    ancestors = []
    for i in range(n):
        chain, p = [], int(parent[i])
        while p >= 0:
            chain.append(p)
            p = int(parent[p])
        ancestors.append(chain)
    depth = np.array([len(a) + 1 for a in ancestors], dtype=np.int64)
    lineage = np.zeros((n, n), dtype=bool)
    for i, anc in enumerate(ancestors):
        lineage[i, [i, *anc]] = True
    # LCA depth = the largest depth among common ancestors-or-self (0: only the virtual root)
    lca = np.stack([((lineage[i][None, :] & lineage) * depth[None, :]).max(axis=1) for i in range(n)])
    related = lineage | lineage.T
    return Case(codes, parents, tx, parent, depth, ancestors, lineage, lca, related)


@lru_cache(maxsize=None)
def get_case(key: str) -> Case:
    if key.startswith("random"):
        seed, n, max_depth = RANDOM_CASES[int(key.split("-")[1])]
        tree = random_tree(seed, n, max_depth)
        return _build_case(tree.codes, tree.parents)
    return _build_case(*_shape(key))


CASE_KEYS = [f"random-{k}" for k in range(len(RANDOM_CASES))] + SHAPES


@pytest.fixture(params=CASE_KEYS)
def case(request) -> Case:
    return get_case(request.param)


def walk_lca_depth(case: Case, i: int, j: int) -> int:
    """LCA by lifting the deeper code, then both, along parent pointers."""
    while case.depth[i] > case.depth[j]:
        i = int(case.parent[i])
    while case.depth[j] > case.depth[i]:
        j = int(case.parent[j])
    while i != j:
        i, j = int(case.parent[i]), int(case.parent[j])
        if i < 0:
            return 0
    return int(case.depth[i])


def test_random_trees_cover_the_shapes():
    """The seeded trees really include forests, chains, wide nodes, lone roots and depths 1..8."""
    depths = {int(get_case(k).depth.max()) for k in CASE_KEYS}
    assert set(range(1, 9)) <= depths
    assert min(len(get_case(k).codes) for k in CASE_KEYS) == 1
    assert max(len(get_case(k).codes) for k in CASE_KEYS) == 300
    assert sum((get_case(k).parent < 0).sum() > 1 for k in CASE_KEYS) > 20  # forests
    assert max(np.bincount(get_case(k).parent + 1).max() for k in CASE_KEYS) >= 299  # a wide node
    # codes are plain letters, one may prefix an unrelated code: the tree is the parent column's
    assert all(c.isalpha() and c.isupper() for k in CASE_KEYS for c in get_case(k).codes)


# ---------------------------------------------------------------- per-code arrays

def test_structure_matches_parent_pointers(case):
    tx, n = case.tx, len(case.codes)
    np.testing.assert_array_equal(tx.parent, case.parent)
    np.testing.assert_array_equal(tx.depth, case.depth)
    assert tx.max_depth == case.depth.max()
    # DFS numbering: a permutation whose inverse is dfs_order, children visited in ascending id
    np.testing.assert_array_equal(np.sort(tx.pre), np.arange(n))
    np.testing.assert_array_equal(tx.dfs_order[tx.pre], np.arange(n))
    expected_order: list[int] = []
    stack = sorted(np.flatnonzero(case.parent < 0).tolist(), reverse=True)
    while stack:
        node = stack.pop()
        expected_order.append(node)
        stack.extend(sorted(np.flatnonzero(case.parent == node).tolist(), reverse=True))
    assert tx.dfs_order.tolist() == expected_order
    # subtree property: positions [pre[a], end[a]) hold exactly a and its descendants
    for a in range(n):
        inside = set(tx.dfs_order[tx.pre[a] : tx.end[a]].tolist())
        assert inside == set(np.flatnonzero(case.lineage[:, a]).tolist()), a
    # ancestor_path: column 0 the virtual root (N), column t the ancestor at depth t, -1 beyond
    path = tx.ancestor_path
    assert path.shape == (n, case.depth.max() + 1) and path.dtype == np.int32
    assert (path[:, 0] == n).all()
    for i in range(n):
        d = int(case.depth[i])
        assert path[i, 1 : d + 1].tolist() == [*case.ancestors[i][::-1], i]
        assert (path[i, d + 1 :] == -1).all()


def test_pairwise_relations_match_brute_force(case):
    tx, n = case.tx, len(case.codes)
    a, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(tx.lca_depth(a, c), case.lca)
    np.testing.assert_array_equal(tx.lca_depth(np.arange(n)[:, None], np.arange(n)[None, :]), case.lca)
    np.testing.assert_array_equal(tx.related(a, c), case.related)
    np.testing.assert_array_equal(tx.is_ancestor(a, c), case.lineage & ~np.eye(n, dtype=bool))
    np.testing.assert_array_equal(tx.tree_distance(a, c), case.depth[a] + case.depth[c] - 2 * case.lca)
    # the matrix reference itself agrees with lifting along parent pointers
    rng = np.random.default_rng(n)
    for i, j in rng.integers(0, n, (min(300, n * n), 2)):
        assert case.lca[i, j] == walk_lca_depth(case, int(i), int(j))


def test_listings_match_brute_force(case):
    tx, n = case.tx, len(case.codes)
    for i in range(n):
        assert tx.ancestors(i).tolist() == case.ancestors[i]
        assert tx.descendants(i).tolist() == np.flatnonzero(case.lineage[:, i] & (np.arange(n) != i)).tolist()
        assert tx.children(i).tolist() == np.flatnonzero(case.parent == i).tolist()
        assert sorted(tx.siblings(i).tolist()) == np.flatnonzero(
            (case.parent == case.parent[i]) & (np.arange(n) != i)).tolist()
    for d in range(1, int(case.depth.max()) + 2):
        assert tx.level(d).tolist() == np.flatnonzero(case.depth == d).tolist()
    assert [tx.index(code) for code in case.codes] == [tx.codes.index(code) for code in case.codes]
    np.testing.assert_array_equal(tx.indices(case.codes), [tx.index(code) for code in case.codes])


# ---------------------------------------------------------------- TreeGuard and guard_mask

def _allowed(case: Case, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(len(case.codes)) > 0.25


def test_tree_guard_numpy_and_torch_match_brute_force(case):
    n = len(case.codes)
    allowed = _allowed(case, 1)
    guard = TreeGuard(case.tx, allowed)
    rng = np.random.default_rng(2)
    a = rng.integers(0, n, 37)
    c = rng.integers(0, n, (37, 29))
    want_lca, want_rel = case.lca[a[:, None], c], case.related[a[:, None], c]
    np.testing.assert_array_equal(guard.lca_depth(a[:, None], c), want_lca)
    np.testing.assert_array_equal(guard.related(a[:, None], c), want_rel)
    np.testing.assert_array_equal(guard.is_allowed(c), allowed[c])
    ta, tc = torch.from_numpy(a), torch.from_numpy(c)
    got_lca, got_rel = guard.lca_depth(ta[:, None], tc), guard.related(ta[:, None], tc)
    assert isinstance(got_lca, torch.Tensor) and isinstance(got_rel, torch.Tensor)
    np.testing.assert_array_equal(got_lca.numpy(), want_lca)
    np.testing.assert_array_equal(got_rel.numpy(), want_rel)
    np.testing.assert_array_equal(guard.is_allowed(tc).numpy(), allowed[c])
    # same-shape pairs, a scalar anchor against a row, and no mask
    np.testing.assert_array_equal(guard.lca_depth(a, c[:, 0]), case.lca[a, c[:, 0]])
    np.testing.assert_array_equal(guard.lca_depth(int(a[0]), c[0]), case.lca[a[0], c[0]])
    np.testing.assert_array_equal(guard.lca_depth(ta, tc[:, 0]).numpy(), case.lca[a, c[:, 0]])
    assert TreeGuard(case.tx).is_allowed(c).all() and TreeGuard(case.tx).is_allowed(tc).all()


def test_tree_guard_broadcasts_like_numpy():
    """TreeGuard.lca_depth broadcasts like Taxonomy.lca_depth and TreeGuard.related (numpy rules)."""
    case = get_case("random-27")
    guard = TreeGuard(case.tx)
    rng = np.random.default_rng(3)
    a = rng.integers(0, len(case.codes), 5)
    c = rng.integers(0, len(case.codes), (5, 5))
    want = case.lca[tuple(np.broadcast_arrays(a, c))]  # numpy: a [5] lines up with the last axis of c
    np.testing.assert_array_equal(case.tx.lca_depth(a, c), want)
    np.testing.assert_array_equal(guard.related(a, c), case.related[tuple(np.broadcast_arrays(a, c))])
    np.testing.assert_array_equal(guard.lca_depth(a, c), want)


def reference_guard(case, anchors, cands, positives, allowed, order_filter, exclude):
    """Per-pair rule walk; a removal counts under the first rule, in GuardStats field order."""
    keep = np.zeros(cands.shape, dtype=bool)
    stats = GuardStats()
    for r, a in enumerate(anchors):
        p = -1 if positives is None else int(positives[r])
        for j, cand in enumerate(cands[r]):
            if cand < 0:
                continue
            stats.candidates += 1
            if cand == a:
                stats.removed_self += 1
            elif p >= 0 and cand == p:
                stats.removed_positive += 1
            elif case.related[a, cand]:
                stats.removed_related += 1
            elif allowed is not None and not allowed[cand]:
                stats.removed_disallowed += 1
            elif order_filter and p >= 0 and case.lca[a, cand] >= case.lca[a, p]:
                stats.removed_order += 1
            elif exclude is not None and cand in exclude[r]:
                stats.removed_exclude += 1
            else:
                keep[r, j] = True
                stats.kept += 1
    return keep, stats


GUARD_KEYS = list(dict.fromkeys(CASE_KEYS[::3] + ["random-29", "wide", "two_chains_and_lone_roots"]))


@pytest.mark.parametrize("key", GUARD_KEYS)
@pytest.mark.parametrize("order_filter", [False, True])
@pytest.mark.parametrize("with_allowed", [False, True])
def test_guard_mask_matches_per_pair_reference(key, order_filter, with_allowed):
    case = get_case(key)
    n = len(case.codes)
    rng = np.random.default_rng(len(key) + 2 * order_filter + with_allowed)
    b, width = 24, 20
    anchors = rng.integers(0, n, b)
    positives = rng.integers(0, n, b)
    positives[::5] = -1  # rows without a positive
    cands = rng.integers(0, n, (b, width))
    for r, a in enumerate(anchors):  # mix in the anchor, the positive, relatives and padding
        relatives = np.flatnonzero(case.related[a])
        cands[r, :4] = rng.choice(relatives, 4)
        cands[r, 4] = a
        cands[r, 5] = positives[r]
        cands[r, 6] = -1
    exclude = [set(rng.choice(n, min(3, n), replace=False).tolist()) for _ in range(b)]
    allowed = _allowed(case, 5) if with_allowed else None
    tree = TreeGuard(case.tx, allowed) if with_allowed else case.tx
    want_keep, want_stats = reference_guard(case, anchors, cands, positives, allowed, order_filter, exclude)
    keep, stats = guard_mask(anchors, cands, positive_ids=positives, taxonomy=tree, order_filter=order_filter,
                             exclude=exclude)
    np.testing.assert_array_equal(keep, want_keep)
    assert stats == want_stats
    # torch in, torch out; an exclude mask instead of id sets
    mask = np.array([[int(x) in exclude[r] for x in row] for r, row in enumerate(cands)])
    t_keep, t_stats = guard_mask(torch.from_numpy(anchors), torch.from_numpy(cands),
                                 positive_ids=torch.from_numpy(positives), taxonomy=tree,
                                 order_filter=order_filter, exclude=torch.from_numpy(mask))
    assert isinstance(t_keep, torch.Tensor)
    np.testing.assert_array_equal(t_keep.numpy(), want_keep)
    assert t_stats == want_stats
    # the same rule through TreeGuard.keep (exclude as a bool tensor)
    guard = tree if isinstance(tree, TreeGuard) else TreeGuard(tree)
    g_keep, g_stats = guard.keep(torch.from_numpy(anchors), torch.from_numpy(cands), torch.from_numpy(positives),
                                 order_filter=order_filter, exclude=torch.from_numpy(mask))
    np.testing.assert_array_equal(g_keep.numpy(), want_keep)
    assert g_stats == want_stats
    if n > 20:  # the batch really exercises the rules
        assert stats.removed_self >= b and stats.kept > 0
        assert (stats.removed_related > 0) == bool(case.depth.max() > 1)


# ---------------------------------------------------------------- NegativeTable

def _valid(case: Case, allowed: np.ndarray, a: int) -> np.ndarray:
    return allowed & ~case.related[a]


def ref_bucket(case: Case, allowed: np.ndarray, a: int, max_lca: int | None) -> np.ndarray:
    """Bucket id per code for anchor a (3 = not eligible), from the brute-force LCA row."""
    default = max(int(case.depth[a]) - 1, 0)
    top = default if max_lca is None else min(max(max_lca, 0), default)
    lca = case.lca[a]
    bucket = np.where(lca == 0, EASY, np.where(lca == top, HARD, SEMI_HARD))
    return np.where(_valid(case, allowed, a) & (lca <= top), bucket, 3)


TABLE_KEYS = list(dict.fromkeys(CASE_KEYS[::2] + ["random-27", "random-28", "random-29", "wide", "chain8"]))


@pytest.mark.parametrize("key", TABLE_KEYS)
def test_negative_table_buckets_and_positions_match_brute_force(key):
    case = get_case(key)
    n = len(case.codes)
    allowed = _allowed(case, 7)
    table = NegativeTable(case.tx, allowed)
    anchors = np.arange(n)
    rng = np.random.default_rng(8)
    sizes = table.sizes
    assert sizes.shape == (n, 3) and sizes.dtype == np.int64
    np.testing.assert_array_equal(table.bucket_sizes(anchors[::-1]), sizes[::-1])
    for max_lca_kind in ("default", "random", "too_deep"):
        if max_lca_kind == "default":
            per_anchor = [None] * n
            max_lca = None
        elif max_lca_kind == "random":
            per_anchor = rng.integers(0, case.depth + 1).tolist()
            max_lca = np.array(per_anchor)
        else:
            per_anchor = (case.depth + 3).tolist()
            max_lca = np.array(per_anchor)
        want = np.stack([ref_bucket(case, allowed, a, per_anchor[a]) for a in range(n)])
        got = table.bucket_of(anchors[:, None], anchors[None, :], None if max_lca is None else max_lca[:, None])
        np.testing.assert_array_equal(got, want, err_msg=max_lca_kind)
        ranges = table.ranges(anchors, table.tree.ranges(anchors), max_lca)[1]
        np.testing.assert_array_equal(ranges, np.stack([(want == k).sum(axis=1) for k in range(3)], axis=1))
        if max_lca_kind != "random":  # the default and any cap at or below it agree
            np.testing.assert_array_equal(ranges, sizes)
    # list positions: valid negatives listed by LCA depth, then DFS order; invalid codes -> -1
    pos = table.position(np.repeat(anchors, n), np.tile(anchors, n)).reshape(n, n)
    for a in range(n):
        valid = np.flatnonzero(_valid(case, allowed, a))
        listed = valid[np.lexsort((case.tx.pre[valid], case.lca[a, valid]))]
        expect = np.full(n, -1)
        expect[listed] = np.arange(len(listed))
        np.testing.assert_array_equal(pos[a], expect, err_msg=f"anchor {a}")
        assert table.position(np.array([a]), np.array([-1])).tolist() == [-1]


def _enumerate_by_draw(table, anchors, max_lca, excluded_pos, bucket, uniform=False):
    """All drawable codes of one bucket per anchor: draw exactly as many as it holds (grouped by count)."""
    b = len(anchors)
    level_ranges = table.tree.ranges(anchors)
    starts, sizes = table.ranges(anchors, level_ranges, max_lca, uniform)
    inside = (excluded_pos >= starts[:, bucket]) & (excluded_pos < starts[:, bucket] + sizes[:, bucket])
    count = sizes[:, bucket] - inside
    shares = tuple(float(k == bucket) for k in range(3))
    out: list[np.ndarray] = [np.zeros(0, np.int64)] * b
    for value in np.unique(count):
        rows = np.flatnonzero(count == value)
        if value == 0:
            continue
        drawn = table.draw(item_keys(0, 0, rows), anchors[rows], excluded_pos[rows], shares, int(value), int(value),
                           None if max_lca is None else max_lca[rows], uniform)
        for r, row in zip(rows, drawn):
            out[r] = row
    return out


@pytest.mark.parametrize("key", TABLE_KEYS)
def test_draw_enumerates_each_bucket_exactly(key):
    """Drawing a bucket's full size (shares one-hot) returns its brute-force code set, minus the positive."""
    case = get_case(key)
    n = len(case.codes)
    allowed = _allowed(case, 9)
    table = NegativeTable(case.tx, allowed)
    rng = np.random.default_rng(10)
    anchors = np.arange(n)
    positives = rng.integers(0, n, n)
    excluded_pos = table.position(anchors, positives)
    for max_lca_kind in ("default", "random"):
        per_anchor = [None] * n if max_lca_kind == "default" else rng.integers(0, case.depth + 1).tolist()
        max_lca = None if max_lca_kind == "default" else np.array(per_anchor)
        want = [ref_bucket(case, allowed, a, per_anchor[a]) for a in range(n)]
        for bucket in (HARD, SEMI_HARD, EASY):
            got = _enumerate_by_draw(table, anchors, max_lca, excluded_pos, bucket)
            for a in range(n):
                expected = set(np.flatnonzero(want[a] == bucket).tolist()) - {int(positives[a])}
                assert len(got[a]) == len(set(got[a].tolist())), (a, bucket)
                assert set(got[a].tolist()) == expected, (a, bucket, max_lca_kind)
            if key.startswith("random") and n >= 200 and case.depth.max() >= 4:  # not vacuous
                assert sum(len(g) for g in got) > 0, bucket
                assert any(want[a][positives[a]] == bucket for a in range(n)), "the positive was never excluded"
        # uniform: one bucket holding every eligible code
        got = _enumerate_by_draw(table, anchors, max_lca, excluded_pos, EASY, uniform=True)
        for a in range(n):
            expected = set(np.flatnonzero(want[a] < 3).tolist()) - {int(positives[a])}
            assert set(got[a].tolist()) == expected and len(got[a]) == len(expected), (a, "uniform")


def _draw_properties(case_tx, lca, related, depth, allowed, seed, n_items):
    """Random draws (sparse and dense paths): distinct, never anchor/positive/related/disallowed, right mix."""
    n = len(case_tx)
    table = NegativeTable(case_tx, allowed)
    rng = np.random.default_rng(seed)
    for trial in range(6):
        anchors = rng.integers(0, n, n_items)
        positives = rng.integers(0, n, n_items)
        n_total = int(rng.integers(1, 40))
        n_first = int(rng.integers(0, n_total + 1))
        shares = tuple(rng.dirichlet([1, 1, 1]))
        max_lca = rng.integers(0, depth[anchors] + 1) if trial % 2 else None
        uniform = trial == 5
        excluded_pos = table.position(anchors, positives)
        keys = item_keys(seed, trial, np.arange(n_items))
        drawn = table.draw(keys, anchors, excluded_pos, shares, n_first, n_total, max_lca, uniform)
        assert drawn.shape == (n_items, n_total) and drawn.dtype == np.int64
        again = table.draw(keys, anchors, excluded_pos, shares, n_first, n_total, max_lca, uniform)
        np.testing.assert_array_equal(drawn, again)  # keyed: the same keys give the same draw
        buckets = table.bucket_of(anchors[:, None], np.maximum(drawn, 0),
                                  None if max_lca is None else max_lca[:, None])
        starts, sizes = table.ranges(anchors, table.tree.ranges(anchors), max_lca, uniform)
        inside = (excluded_pos[:, None] >= starts) & (excluded_pos[:, None] < starts + sizes)
        available = sizes - inside
        first = spill(np.broadcast_to(split_counts(n_first, shares), (n_items, 3)).copy(), available)
        rest = spill(np.broadcast_to(split_counts(n_total - n_first, shares), (n_items, 3)).copy(), available - first)
        for r, a in enumerate(anchors):
            row = drawn[r]
            got = row[row >= 0]
            eligible = (allowed & ~related(a)) & (lca(a) <= (depth[a] - 1 if max_lca is None
                                                               else min(max_lca[r], depth[a] - 1)))
            eligible[positives[r]] = False
            n_eligible = int(eligible.sum())
            assert len(got) == min(n_total, n_eligible), (trial, r)
            assert (row[len(got) :] == -1).all(), "padding only at the end"
            assert len(set(got.tolist())) == len(got), "repeated negative"
            assert eligible[got].all(), "drew a related, disallowed, too-near code or the positive"
            assert a not in got and positives[r] not in got
            if not uniform:  # the selected columns follow the spilled share split, bucket by bucket
                head = buckets[r, :n_first][row[:n_first] >= 0]
                assert np.bincount(head, minlength=4)[:3].tolist() == first[r].tolist(), (trial, r)
                tail = buckets[r, n_first:][row[n_first:] >= 0]
                assert np.bincount(tail, minlength=4)[:3].tolist() == rest[r].tolist(), (trial, r)


@pytest.mark.parametrize("key", ["random-25", "random-28", "wide", "flat", "two_chains_and_lone_roots"])
def test_draws_are_valid_on_random_trees(key):
    case = get_case(key)
    _draw_properties(case.tx, lambda a: case.lca[a], lambda a: case.related[a], case.depth,
                     _allowed(case, 11), seed=12, n_items=200)


def test_draws_are_valid_on_a_larger_tree():
    """3,000 codes: big buckets take the sparse (draw and redraw) path; reference rows via the parent walk."""
    tree = synthetic_tree(3000, depth=(3, 6), seed=4)
    tx = Taxonomy(tree.codes, tree.parents, tree.titles)
    n = len(tx)
    idx = {c: i for i, c in enumerate(tx.codes)}
    parent_of = dict(zip(tree.codes, tree.parents))
    chains = []  # per code: itself and its ancestors, walking the input parent column
    for code in tx.codes:
        chain = [idx[code]]
        while parent_of[code]:
            code = parent_of[code]
            chain.append(idx[code])
        chains.append(chain)
    depth = np.array([len(ch) for ch in chains])
    width = int(depth.max())
    paths = np.array([ch + [-1] * (width - len(ch)) for ch in chains])  # [N, D], -1 padded
    depth_ext = np.append(depth, 0)

    def lca_row(a: int) -> np.ndarray:
        mine = np.zeros(n + 1, dtype=bool)
        mine[chains[a]] = True
        return (mine[paths] * depth_ext[paths]).max(axis=1)  # deepest common ancestor-or-self

    def related_row(a: int) -> np.ndarray:
        mine = np.zeros(n + 1, dtype=bool)
        mine[chains[a]] = True
        return mine[:n] | (paths == a).any(axis=1)

    _draw_properties(tx, lca_row, related_row, depth, np.random.default_rng(1).random(n) > 0.1, seed=13,
                     n_items=40)


@pytest.mark.parametrize("key", TABLE_KEYS)
@pytest.mark.parametrize("decay", [0.5, 2.0])
def test_level_positives_stay_above_the_anchor(key, decay):
    """A level positive shares an LCA in 1..depth-1 with the anchor: an ancestor or another subtree's code,
    never the anchor or its descendant; -1 exactly when no such allowed code exists."""
    case = get_case(key)
    n = len(case.codes)
    allowed = _allowed(case, 14)
    table = NegativeTable(case.tx, allowed)
    anchors = np.repeat(np.arange(n), 8)
    keys = item_keys(3, 1, np.arange(len(anchors)))
    got = table.level_positives(keys, anchors, allowed, decay)
    assert got.shape == anchors.shape and got.dtype == np.int64
    kinds = set()
    for a, p in zip(anchors, got):
        candidates = allowed & (case.lca[a] >= 1) & (case.lca[a] < case.depth[a])
        if not candidates.any():
            assert p == -1, a
            continue
        assert p >= 0 and candidates[p], (a, p)
        assert p != a and not case.lineage[p, a], "the anchor or its descendant"
        kinds.add("ancestor" if case.lineage[a, p] else "other subtree")
    if key.startswith("random") and n >= 200 and case.depth.max() >= 3:
        assert kinds == {"ancestor", "other subtree"}
    np.testing.assert_array_equal(table.level_positives(keys, anchors, allowed, decay), got)


def test_level_positives_follow_the_level_weights():
    """Level d is picked with weight decay**d among non-empty levels, then a code uniformly within it."""
    case = get_case("random-29")
    n = len(case.codes)
    allowed = _allowed(case, 15)
    table = NegativeTable(case.tx, allowed)
    decay = 2.0
    deep = [a for a in range(n) if case.depth[a] >= 3][:4]
    assert deep
    draws = 20000
    for a in deep:
        keys = item_keys(5, 0, np.arange(draws))
        got = table.level_positives(keys, np.full(draws, a), allowed, decay)
        lca = case.lca[a]
        levels = {d: np.flatnonzero(allowed & (lca == d)) for d in range(1, int(case.depth[a]))}
        weights = {d: decay**d for d, codes in levels.items() if len(codes)}
        total = sum(weights.values())
        expected = np.zeros(n)
        for d, w in weights.items():
            expected[levels[d]] = w / total / len(levels[d])
        freq = np.bincount(got, minlength=n) / draws
        assert (freq[expected == 0] == 0).all()
        np.testing.assert_allclose(freq, expected, atol=0.015)


# ---------------------------------------------------------------- tree pairs on random trees

@pytest.mark.parametrize("key", ["random-20", "random-29", "wide", "flat", "two_chains_and_lone_roots"])
def test_tree_pairs_match_brute_force(key):
    case = get_case(key)
    n = len(case.codes)
    allowed = _allowed(case, 16)
    ok = lambda a, b: allowed[a] and allowed[b]  # noqa: E731
    parent = case.parent
    parents = {(i, int(parent[i])) for i in range(n) if parent[i] >= 0 and ok(i, parent[i])}
    siblings = {(i, j) for i in range(n) for j in range(n)
                if i != j and parent[i] >= 0 and parent[i] == parent[j] and ok(i, j)}
    as_set = lambda pairs: {tuple(p) for p in pairs.tolist()}  # noqa: E731
    assert as_set(tree_pairs(case.tx, ("parent",), allowed)) == parents
    assert as_set(tree_pairs(case.tx, ("child",), allowed)) == {(p, c) for c, p in parents}
    assert as_set(tree_pairs(case.tx, ("sibling",), allowed)) == siblings
    levels = tree_pairs(case.tx, ("levels",), allowed)
    assert levels[:, 0].tolist() == [i for i in range(n) if allowed[i] and parent[i] >= 0]
    assert (levels[:, 1] == -1).all()
    capped = tree_pairs(case.tx, ("parent", "sibling"), allowed, max_siblings=2, seed=3)
    capped_sibs = as_set(capped) - parents
    assert capped_sibs <= siblings
    for i in range(n):
        mine = {j for a, j in siblings if a == i}
        assert len({j for a, j in capped_sibs if a == i}) == min(2, len(mine))
    # blocks do not change the result
    blocks = sibling_pairs(parent, allowed, max_siblings=2, seed=3, max_block=7)
    small = {tuple(p) for block in blocks for p in block.tolist()}
    assert small == capped_sibs


# ---------------------------------------------------------------- constructor and CSV errors

def _csv(make_csv, rows):
    return make_csv(rows, header=("code", "title", "parent"))


@pytest.mark.parametrize("rows, match", [
    ([("A", "a", ""), ("B", "b", "X")], r"line 3: code 'B' has parent 'X', which is not a code of the taxonomy"),
    ([("A", "a", "B"), ("B", "b", "A"), ("C", "c", "")],
     r"code 'A' \('[^']*' line 2\) is on a parent cycle|code 'B' \('[^']*' line 3\) is on a parent cycle"),
    ([("Q", "q", ""), ("A", "a", "C"), ("B", "b", "A"), ("C", "c", "B"), ("D", "d", "A")],
     r"code 'A' \('[^']*' line 3\)|code 'B' \('[^']*' line 4\)|code 'C' \('[^']*' line 5\)"),
    ([("A", "a", ""), ("B", "b", "B")], r"code 'B' \('[^']*' line 3\) is its own parent"),
    ([("A", "a", ""), ("B", "b", "A"), ("A", "again", "")], r"line 4: duplicate code 'A'"),
    ([("A", "a", ""), ("", "b", "A")], r"line 3: code '' is not a non-empty string"),
    ([("A", "a", ""), ("B", " ", "A")], r"line 3: code 'B' has an empty title"),
])
def test_csv_parent_column_errors_name_the_line(make_csv, rows, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy.from_csv(_csv(make_csv, rows))


def test_cycle_error_names_a_code_on_the_cycle():
    """D hangs below the cycle A -> C -> B -> A: the error names a cycle member, not D."""
    with pytest.raises(TaxonomyError, match=r"code '[ABC]' \(row [234]\) is on a parent cycle") as err:
        Taxonomy(["Q", "A", "B", "C", "D"], ["", "C", "A", "B", "A"], list("qabcd"))
    row_of = {"A": 2, "B": 3, "C": 4}
    code = str(err.value).split("'")[1]
    assert f"(row {row_of[code]})" in str(err.value)


@pytest.mark.parametrize("codes, parents, match", [
    (["A", "B"], ["", "X"], r"row 2: code 'B' has parent 'X'"),
    (["A", "B"], ["B", "A"], r"is on a parent cycle"),
    (["A", "B"], ["A", ""], r"code 'A' \(row 1\) is its own parent"),
    (["A", "B", "A"], ["", "A", ""], r"row 3: duplicate code 'A'"),
    (["A", ""], ["", ""], r"row 2: code ''"),
    (["A", " B"], ["", ""], r"row 2: code ' B'"),
    (["A", "B"], ["", ""], r"texts has 3 entries"),
    (["A", "B"], [""], r"parent has 1 entries, expected one per code \(2\)"),
])
def test_constructor_errors_name_the_row(codes, parents, match):
    texts = ["a", "b", "c"] if "texts" in match else ["a"] * len(codes)
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy(codes, parents, texts)


def test_depth_limit():
    chain = [letter_code(i) for i in range(MAX_DEPTH)]
    tx = Taxonomy(chain, [""] + chain[:-1], ["t"] * MAX_DEPTH)
    assert tx.max_depth == MAX_DEPTH and tx.depth.max() == MAX_DEPTH
    longer = chain + ["ZZZZ"]
    with pytest.raises(TaxonomyError, match=f"at depth {MAX_DEPTH} has children"):
        Taxonomy(longer, [""] + longer[:-1], ["t"] * (MAX_DEPTH + 1))


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("code,title\n11,Farms\n111,Caf\xe9s\n".encode("latin-1"))
    with pytest.raises(TaxonomyError, match=r"latin1\.csv' line 3: byte 0xe9 is not UTF-8"):
        Taxonomy.from_csv(path)


def test_parent_column_tree_is_exactly_the_column(make_csv):
    """MeSH/ICD-like codes; prefixes are never consulted when a parent column is present."""
    rows = [("C04", "Neoplasms", ""), ("C04.588", "By site", "C04"), ("C04.588.322", "Endocrine", "C04.588"),
            ("A00", "Cholera", ""), ("A000", "Classical cholera", "A00"),
            ("A001", "El Tor", ""),  # a prefix of A00 but declared top level
            ("31-33", "Manufacturing", "C04")]  # a NAICS-looking range is just a string here
    tx = Taxonomy.from_csv(_csv(make_csv, rows))
    parent = {tx.codes[i]: (tx.codes[p] if p >= 0 else "") for i, p in enumerate(tx.parent)}
    assert parent == {c: p for c, _, p in rows}
    depth = dict(zip(tx.codes, tx.depth.tolist()))
    assert depth == {"C04": 1, "C04.588": 2, "C04.588.322": 3, "A00": 1, "A000": 2, "A001": 1, "31-33": 2}
    i = tx.index
    assert tx.lca_depth(i("C04.588.322"), i("31-33")) == 1 and not tx.related(i("A00"), i("A001"))
    # from_records: the same tree, the parent key is what counts
    again = Taxonomy.from_records([{"code": c, "title": t, "parent": p} for c, t, p in rows])
    np.testing.assert_array_equal(again.parent, tx.parent)


def test_one_digit_prefix_tops(make_csv):
    rows = [("1", "One"), ("11", "Eleven"), ("111", "One-eleven"), ("2", "Two"), ("21", "Twenty-one"),
            ("2111", "Deep")]
    tx = Taxonomy.from_csv(make_csv(rows))
    parent = {tx.codes[i]: (tx.codes[p] if p >= 0 else "") for i, p in enumerate(tx.parent)}
    assert parent == {"1": "", "11": "1", "111": "11", "2": "", "21": "2", "2111": "21"}
    assert dict(zip(tx.codes, tx.depth.tolist())) == {"1": 1, "11": 2, "111": 3, "2": 1, "21": 2, "2111": 3}
    tx2 = Taxonomy(["1", "11", "111"], None, ["a", "b", "c"])
    assert tx2.parent.tolist() == [-1, 0, 1]


@pytest.mark.parametrize("codes, match", [
    (["11", "111", "2111"], r"row 3: code '2111' has no parent"),
    (["1", "11", "333"], r"row 3: code '333' has no parent"),
    (["11", "1A1"], r"row 2: code '1A1' is not digits"),
    (["11", "111", "111"], r"row 3: .*duplicate code '111'"),
])
def test_digit_prefix_errors(codes, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy(codes, None, ["t"] * len(codes))
