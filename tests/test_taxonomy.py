"""Taxonomy: NAICS 2022 facts, relation methods vs a parent-pointer reference, CSV loading."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_ROWS, reference_ancestors
from naics_hnm.tree.taxonomy import Taxonomy, TaxonomyError, load_taxonomy


# ---------------------------------------------------------------- NAICS 2022 facts

def test_naics2022_level_counts(naics):
    assert len(naics) == 2125
    assert [len(naics.level(d)) for d in range(1, 6)] == [20, 96, 308, 689, 1012]
    assert naics.codes == sorted(naics.codes)
    assert [naics.index(c) for c in naics.codes] == list(range(2125))


def test_naics2022_merged_sectors(naics):
    sectors = {naics.codes[i] for i in naics.level(1)}
    assert {"31-33", "44-45", "48-49"} <= sectors
    assert not {"31", "32", "33", "44", "45", "48", "49"} & set(naics.codes)
    parent = lambda c: naics.codes[naics.parent[naics.index(c)]]  # noqa: E731
    assert parent("311") == "31-33"
    assert parent("325") == "31-33"  # '32' belongs to the range too
    assert parent("4411") == "441"
    assert parent("441") == "44-45"
    assert parent("493") == "48-49"
    assert naics.parent[naics.index("31-33")] == -1
    assert [naics.codes[a] for a in naics.ancestors(naics.index("441110"))] == ["44111", "4411", "441", "44-45"]


def test_naics2022_parent_is_longest_code_prefix(naics):
    """Every non-sector's parent is the longest proper prefix that is a code (ranges own their prefixes)."""
    owner = {}
    for code in naics.codes:
        if "-" in code:
            lo, hi = code.split("-")
            for v in range(int(lo), int(hi) + 1):
                owner[str(v)] = code
        else:
            owner[code] = code
    for i, code in enumerate(naics.codes):
        if naics.depth[i] == 1:
            assert naics.parent[i] == -1
            continue
        expected = next(owner[code[:cut]] for cut in range(len(code) - 1, 1, -1) if code[:cut] in owner)
        assert naics.codes[naics.parent[i]] == expected, code
        assert naics.depth[i] == len(code) - 1


def test_tree_distance_known_pairs(naics):
    d = naics.tree_distance
    i = naics.index
    assert d(i("111110"), i("111120")) == 4  # LCA 1111
    assert d(i("111110"), i("211120")) == 10  # different sectors: only the root in common
    assert d(i("111110"), i("111110")) == 0
    assert d(i("111110"), i("11")) == 4
    assert d(i("311111"), i("325110")) == 8  # both in 31-33
    assert naics.lca_depth(i("311111"), i("325110")) == 1
    assert naics.lca_depth(i("111110"), i("211120")) == 0
    assert naics.lca_depth(i("111110"), i("11")) == 1 and naics.lca_depth(i("11"), i("111110")) == 1
    assert naics.is_ancestor(i("111110"), i("11")) and not naics.is_ancestor(i("11"), i("111110"))
    assert not naics.is_ancestor(i("11"), i("11"))  # proper ancestors only
    assert naics.related(i("11"), i("111110")) and naics.related(i("111110"), i("11"))
    assert naics.related(i("11"), i("11")) and not naics.related(i("111110"), i("111120"))


def test_relations_broadcast_over_id_blocks(naics):
    """The relation methods take broadcastable id arrays: a [B, 1] x [1, C] block equals per-pair calls."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, len(naics), 17)
    c = rng.integers(0, len(naics), 23)
    for method in (naics.lca_depth, naics.related, naics.tree_distance, naics.is_ancestor):
        block = method(a[:, None], c[None, :])
        assert block.shape == (17, 23), method.__name__
        want = np.array([[method(int(x), int(y)) for y in c] for x in a])
        np.testing.assert_array_equal(block, want, err_msg=method.__name__)
        np.testing.assert_array_equal(method(a[:, None], c), block, err_msg=method.__name__)
        row = method(int(a[0]), c)  # a scalar against a vector
        np.testing.assert_array_equal(row, block[0], err_msg=method.__name__)
    assert naics.lca_depth(a[:, None], c).dtype == np.int64
    assert naics.related(a[:, None], c).dtype == np.bool_


def _reference_lca(anc_or_self, depth, i, j):
    common = anc_or_self[i] & anc_or_self[j]
    return max((int(depth[c]) for c in common), default=0)


def test_relations_match_parent_pointer_reference(naics):
    anc = reference_ancestors(naics)
    anc_or_self = [a | {i} for i, a in enumerate(anc)]
    rng = np.random.default_rng(0)
    n = len(naics)
    pairs = rng.integers(0, n, size=(3000, 2))
    # plus pairs guaranteed to be related: (code, an ancestor) and (code, sibling)
    for i in rng.integers(0, n, size=300):
        if anc[i]:
            pairs = np.vstack([pairs, [[i, rng.choice(sorted(anc[i]))]], [[rng.choice(sorted(anc[i])), i]]])
        sibs = [j for j in range(n) if naics.parent[j] == naics.parent[i] and j != i]
        if sibs:
            pairs = np.vstack([pairs, [[i, rng.choice(sibs)]]])
    lca_ref = np.array([_reference_lca(anc_or_self, naics.depth, i, j) for i, j in pairs])
    ancestor_ref = np.array([j in anc[i] for i, j in pairs])
    related_ref = np.array([i == j or j in anc[i] or i in anc[j] for i, j in pairs])
    depth = naics.depth.astype(np.int64)
    # vectorised over all pairs at once, and one pair at a time
    a, c = pairs[:, 0], pairs[:, 1]
    np.testing.assert_array_equal(naics.lca_depth(a, c), lca_ref)
    np.testing.assert_array_equal(naics.tree_distance(a, c), depth[a] + depth[c] - 2 * lca_ref)
    np.testing.assert_array_equal(naics.is_ancestor(a, c), ancestor_ref)
    np.testing.assert_array_equal(naics.related(a, c), related_ref)
    for k, (i, j) in enumerate(pairs):
        assert naics.lca_depth(i, j) == lca_ref[k]
        assert naics.tree_distance(i, j) == naics.depth[i] + naics.depth[j] - 2 * lca_ref[k]
        assert naics.is_ancestor(i, j) == ancestor_ref[k]
        assert naics.related(i, j) == related_ref[k]
    assert related_ref.sum() > 300 and ancestor_ref.sum() > 200
    for i in rng.integers(0, n, size=200):
        assert naics.ancestors(i).tolist() == sorted(anc[i], key=lambda a: -naics.depth[a])
        assert naics.descendants(i).tolist() == sorted(j for j in range(n) if i in anc[j])
        assert set(naics.siblings(i).tolist()) == {j for j in range(n) if naics.parent[j] == naics.parent[i] and j != i}
        assert naics.children(i).tolist() == [j for j in range(n) if naics.parent[j] == i]


def test_descendants_by_code_prefix(naics):
    """NAICS fact: a code's descendants are exactly the codes it prefixes (a range: any of its prefixes)."""
    for code in ["11", "31-33", "44-45", "5417", "54171", "111110"]:
        if "-" in code:
            lo, hi = code.split("-")
            heads = tuple(str(v) for v in range(int(lo), int(hi) + 1))
        else:
            heads = (code,)
        expected = {c for c in naics.codes if c != code and c.startswith(heads)}
        got = {naics.codes[j] for j in naics.descendants(naics.index(code))}
        assert got == expected, code
    assert len(naics.descendants(naics.index("111110"))) == 0


def test_index_unknown_code(naics):
    with pytest.raises(KeyError, match="unknown code '999999'"):
        naics.index("999999")
    with pytest.raises(KeyError, match="'31'"):
        naics.indices(["11", "31"])


def test_fingerprint_follows_code_list():
    base = Taxonomy.from_records([{"code": c, "title": t} for c, t in TINY_ROWS])
    retitled = Taxonomy.from_records([{"code": c, "title": t + " x"} for c, t in TINY_ROWS])
    grown = Taxonomy.from_records([{"code": c, "title": t} for c, t in TINY_ROWS + [("1112", "Vegetables")]])
    assert base.fingerprint == retitled.fingerprint  # the id space, not the text
    assert base.fingerprint != grown.fingerprint
    assert Taxonomy.naics2022().fingerprint != base.fingerprint


# ---------------------------------------------------------------- CSV

def test_csv_minimal(make_csv):
    tx = Taxonomy.from_csv(make_csv(TINY_ROWS))
    assert tx.codes == sorted(c for c, _ in TINY_ROWS)
    assert tx.codes[tx.parent[tx.index("311")]] == "31-33"
    assert tx.codes[tx.parent[tx.index("1111")]] == "111"
    assert tx.depth[tx.index("3111")] == 3
    assert tx.text(tx.index("111")) == "Crop Production"
    assert load_taxonomy(make_csv(TINY_ROWS)).codes == tx.codes


def test_csv_optional_columns(make_csv):
    header = ("code", "title", "description", "examples", "excluded_codes")
    rows = [("11", "Agriculture", "Growing crops", "corn; wheat", ""),
            ("111", "Crops", "", "soy", "112"),
            ("112", "Animals", "Raising animals", "", "")]
    tx = Taxonomy.from_csv(make_csv(rows, header=header))
    assert tx.text(tx.index("11")) == "Agriculture. Growing crops. corn; wheat"
    assert tx.text(tx.index("111")) == "Crops. soy"
    assert tx.texts[tx.index("112")] == "Animals. Raising animals"
    # a subset of the optional columns, in another order
    tx2 = Taxonomy.from_csv(make_csv([("Agri", "11", "Farms")], header=("title", "code", "description")))
    assert tx2.texts == ["Agri. Farms"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rows=[("11", "A", "x")], header=("code", "title", "colour")), r"unknown column.*'colour'"),
        (dict(rows=[("11",)], header=("code",)), r"lacks column.*'title'"),
        (dict(rows=[("A",)], header=("title",)), r"lacks column.*'code'"),
        (dict(rows=[("11", "A"), ("111", "B"), ("111", "C")]), r"line 4: .*duplicate code '111'"),
        (dict(rows=[("11", "A"), ("2111", "B")]), r"code '2111' has no parent"),
        (dict(rows=[("11", "A"), ("12a", "B")]), r"line 3: code '12a'"),
        (dict(rows=[("11", "A"), ("111", "  ")]), r"code '111' has an empty title"),
        (dict(rows=[("33-31", "A")]), r"'33-31' is malformed"),
        (dict(rows=[("3-33", "A")]), r"'3-33' is malformed"),
        (dict(rows=[("31-33", "A"), ("32", "B")]), r"overlaps"),
        (dict(rows=[("31-33", "A"), ("33-34", "B")]), r"'33'"),
        (dict(raw="code,title\n11,A,extra\n"), r"line 2: 3 fields, more fields than the header's 2"),
        (dict(rows=[]), r"has a header but no rows"),
    ],
)
def test_csv_bad_input(make_csv, kwargs, match):
    with pytest.raises(TaxonomyError, match=match):
        Taxonomy.from_csv(make_csv(**kwargs))


def test_constructor_needs_a_code():
    with pytest.raises(TaxonomyError, match="at least one code"):
        Taxonomy([], None, [])
    with pytest.raises(TaxonomyError, match="at least one code"):
        Taxonomy([], [], [])


def test_csv_missing_file(tmp_path):
    with pytest.raises(TaxonomyError, match="nope.csv.*does not exist"):
        Taxonomy.from_csv(tmp_path / "nope.csv")
    with pytest.raises(TypeError, match="taxonomy=3"):
        load_taxonomy(3)


def test_csv_short_rows_keep_the_parent_column(tmp_path):
    """The issue's p.csv: the first row omits its empty parent field; the column still decides the tree."""
    path = tmp_path / "p.csv"
    path.write_text("code,title,parent\n11,A\n111,B,\n1111,C,11\n")
    tx = Taxonomy.from_csv(path)
    parent_of = {code: (tx.codes[p] if p >= 0 else "") for code, p in zip(tx.codes, tx.parent.tolist())}
    assert parent_of == {"11": "", "111": "", "1111": "11"}
