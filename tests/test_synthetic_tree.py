"""Synthetic code trees: determinism, exact size, depth range, a valid forest, CSV round trip."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from naics_hnm.tree.synthetic import CODE_STYLES, SyntheticTree, random_tree, synthetic_tree


def depths_of(tree: SyntheticTree) -> dict[str, int]:
    """Depth of every code (1 at the top), walking parent links; fails on a cycle or a missing parent."""
    parent = dict(zip(tree.codes, tree.parents))
    depth: dict[str, int] = {}
    for code in tree.codes:
        chain = []
        while code and code not in depth:
            assert code in parent, f"parent {code!r} is not a code of the tree"
            assert code not in chain, f"cycle through {code!r}"
            chain.append(code)
            code = parent[code]
        base = depth[code] if code else 0
        for offset, node in enumerate(reversed(chain), start=1):
            depth[node] = base + offset
    return depth


def check_forest(tree: SyntheticTree, n: int) -> dict[str, int]:
    assert len(tree.codes) == len(tree.parents) == len(tree.titles) == n
    assert len(set(tree.codes)) == n
    assert all(isinstance(c, str) and c and c == c.strip() for c in tree.codes)
    assert all(t.strip() for t in tree.titles)
    return depths_of(tree)


@pytest.mark.parametrize("style", CODE_STYLES)
@pytest.mark.parametrize("depth", [(5, 7), (1, 3), (3, 3), (2, 9)])
@pytest.mark.parametrize("n", [1, 4, 9, 37, 500, 5000])
@pytest.mark.parametrize("forest", [True, False])
def test_size_depth_range_and_valid_forest(style, depth, n, forest):
    lo, hi = depth
    if n < lo or (hi == 1 and not forest and n > 1):
        with pytest.raises(ValueError):
            synthetic_tree(n, depth=depth, code_style=style, forest=forest)
        return
    tree = synthetic_tree(n, depth=depth, seed=n, code_style=style, forest=forest)
    depths = check_forest(tree, n)
    has_child = set(tree.parents)
    leaf_depths = {depths[c] for c in tree.codes if c not in has_child}
    assert lo <= min(leaf_depths) and max(depths.values()) <= hi
    roots = sum(1 for p in tree.parents if not p)
    assert (roots == 1) if not forest else (1 <= roots <= 30)
    position = {c: i for i, c in enumerate(tree.codes)}
    assert all(position[p] < i for i, p in enumerate(tree.parents) if p), "rows are not in pre-order"


def test_large_tree_is_realistic():
    tree = synthetic_tree(20_000, seed=3)
    depths = check_forest(tree, 20_000)
    has_child = set(tree.parents)
    assert 10 <= sum(1 for p in tree.parents if not p) <= 30
    assert {depths[c] for c in tree.codes if c not in has_child} == {5, 6, 7}
    fan_out = np.unique([p for p in tree.parents if p], return_counts=True)[1]
    assert fan_out.max() >= 5 * np.median(fan_out)
    prefixed = sum(1 for c, p in zip(tree.codes, tree.parents) if p and c.startswith(p))
    assert prefixed < 0.01 * len(tree.codes), "letters codes must not encode their parent"


@pytest.mark.parametrize("style", ["icd", "mesh"])
def test_prefix_styles_extend_the_parent_code(style):
    tree = synthetic_tree(3000, code_style=style, seed=1)
    assert all(c.startswith(p) and len(c) > len(p) for c, p in zip(tree.codes, tree.parents) if p)
    if style == "mesh":
        assert all(c[len(p)] == "." for c, p in zip(tree.codes, tree.parents) if p)


def test_same_arguments_same_tree_and_seed_matters():
    assert synthetic_tree(3000, seed=7) == synthetic_tree(3000, seed=7)
    assert synthetic_tree(3000, seed=7) != synthetic_tree(3000, seed=8)
    assert random_tree(5, 300) == random_tree(np.random.default_rng(5), 300)


def test_titles_inherit_words_from_the_parent():
    tree = synthetic_tree(5000, seed=2)
    title = dict(zip(tree.codes, tree.titles))
    pairs = [(title[c], title[p]) for c, p in zip(tree.codes, tree.parents) if p]
    assert all(3 <= len(t.split()) <= 6 for t in tree.titles)
    assert all(set(child.split()) & set(parent.split()) for child, parent in pairs)


@pytest.mark.parametrize("seed", range(40))
def test_random_tree_is_a_valid_forest(seed):
    rng = np.random.default_rng(seed)
    n, max_depth = int(rng.integers(1, 200)), int(rng.integers(1, 9))
    tree = random_tree(rng, n, max_depth)
    depths = check_forest(tree, n)
    assert max(depths.values()) <= max_depth


def test_random_tree_shapes():
    trees = [random_tree(seed, 150) for seed in range(20)]
    depths = [check_forest(t, 150) for t in trees]
    assert max(max(d.values()) for d in depths) == 8
    singletons = sum(1 for t in trees for c, p in zip(t.codes, t.parents) if not p and c not in set(t.parents))
    assert singletons > 0
    assert max(np.unique([p for t in trees for p in t.parents if p], return_counts=True)[1]) >= 10


@pytest.mark.parametrize("make", [lambda: synthetic_tree(400, code_style="mesh"), lambda: random_tree(0, 50)])
def test_write_csv_round_trip(tmp_path, make):
    tree = make()
    path = tmp_path / "sub" / "tree.csv"
    tree.write_csv(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["code", "title", "parent"]
    assert rows[1:] == [list(r) for r in zip(tree.codes, tree.titles, tree.parents)]
    assert [p.name for p in path.parent.iterdir()] == ["tree.csv"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_codes=0), "n_codes must be a positive int"),
    (dict(n_codes=10, depth=(0, 3)), "depth must be"),
    (dict(n_codes=10, depth=(4, 3)), "depth must be"),
    (dict(n_codes=10, code_style="naics"), "code_style must be one of"),
    (dict(n_codes=3), "too small for minimum depth 5"),
    (dict(n_codes=2, depth=(1, 1), forest=False), "single tree of depth 1"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic_tree(**kwargs)
    with pytest.raises(ValueError, match="max_depth must be a positive int, got 0"):
        random_tree(0, 5, 0)
