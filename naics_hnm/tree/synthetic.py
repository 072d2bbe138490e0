"""Deterministic synthetic code trees (codes, parents, titles) for tests and scale benchmarks: :func:`synthetic_tree`
builds realistic forests of up to millions of codes level by level with NumPy; :func:`random_tree` makes small
irregular forests (chains, wide nodes, lone roots) for property tests."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from naics_hnm.atomic import atomic_path

CODE_STYLES = ("letters", "icd", "mesh")
_ALNUM = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
_WORDS = np.array("""
    retail wholesale frozen fresh dried canned organic industrial domestic marine rural urban steel timber glass
    paper cotton wool leather rubber plastic copper silver grain dairy meat poultry seafood fruit vegetable bakery
    beverage tobacco textile apparel footwear furniture printing chemical fertilizer paint soap cosmetic drug
    vaccine cement brick ceramic engine turbine pump valve motor battery cable lamp clock radio camera sensor robot
    vehicle truck bicycle aircraft ship rail pipeline freight courier warehouse storage software hardware network
    data cloud security insurance banking credit lending leasing rental brokerage advisory legal accounting design
    survey mapping testing research training school college clinic hospital nursing dental veterinary laboratory
    therapy hotel camping restaurant catering repair cleaning laundry funeral parking waste recycling water sewage
    electric gas solar wind nuclear hydro mining quarry drilling forestry fishing hunting farming nursery
    greenhouse vineyard orchard livestock equipment machinery supplies parts materials products services systems
    components instruments devices tools goods structures installation maintenance manufacturing processing
    assembly distribution operation management supply
    """.split())


@dataclass(frozen=True)
class SyntheticTree:
    """A code tree as three parallel columns; ``parents[i]`` is '' for a top-level code."""

    codes: list[str]
    parents: list[str]
    titles: list[str]

    def write_csv(self, path: str | Path) -> None:
        """Write ``code,title,parent`` rows to ``path`` atomically (temporary file + ``os.replace``)."""
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("code", "title", "parent"))
            writer.writerows(zip(self.codes, self.titles, self.parents))


def synthetic_tree(n_codes: int, *, depth: tuple[int, int] = (5, 7), seed: int = 0,
                   code_style: str = "letters", forest: bool = True) -> SyntheticTree:
    """A random tree of exactly ``n_codes`` codes whose leaves all lie at depths ``depth[0]..depth[1]``.

    10 to 30 top-level codes when ``forest`` (fewer if ``n_codes`` is too small for a chain of ``depth[0]`` each; all
    codes if ``depth`` is ``(1, 1)``), else one. Rows in pre-order. Code styles: ``letters`` (``QXB.A7-3``, unrelated
    to the parent's code: the tree is only in the parent column), ``icd`` (``A00`` -> ``A004`` -> ``A004K``), ``mesh``
    (``C04`` -> ``C04.588``). Titles: 3-6 words, 1-2 new then the parent's first. Same arguments, same tree."""
    if not isinstance(n_codes, int) or n_codes < 1:
        raise ValueError(f"n_codes must be a positive int, got {n_codes!r}")
    lo, hi = depth
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"depth must be (min, max) ints with 1 <= min <= max, got {depth!r}")
    if code_style not in CODE_STYLES:
        raise ValueError(f"code_style must be one of {CODE_STYLES}, got {code_style!r}")
    if n_codes < lo:
        raise ValueError(f"n_codes={n_codes} is too small for minimum depth {lo}: needs at least {lo} codes")
    if hi == 1 and not forest and n_codes > 1:
        raise ValueError(f"a single tree of depth 1 has one code, got n_codes={n_codes}")
    rng = np.random.default_rng(seed)
    if hi == 1:
        roots = n_codes
    else:
        roots = min(int(rng.integers(10, 31)), n_codes // lo) if forest else 1
    sizes = _level_sizes(n_codes, roots, lo, hi)
    parent_of = [np.zeros(0, np.int64)] + [_assign_parents(rng, sizes[d - 1], sizes[d], all_branch=d < lo)
                                           for d in range(1, len(sizes))]
    counts = [np.bincount(parent_of[d], minlength=sizes[d - 1]) for d in range(1, len(sizes))]
    codes = np.concatenate(_level_codes(rng, code_style, sizes, parent_of, counts))
    words, lengths = _titles(rng, sizes, parent_of)
    order, parent = _preorder(sizes, parent_of)
    parent_codes = np.where(parent >= 0, codes[np.maximum(parent, 0)], b"")[order]
    vocab = _WORDS.tolist()
    titles = [" ".join([vocab[w] for w in row[:k]]) for row, k in zip(words[order].tolist(), lengths[order].tolist())]
    return SyntheticTree(codes[order].astype(str).tolist(), parent_codes.astype(str).tolist(), titles)


def random_tree(rng: np.random.Generator | int, n: int, max_depth: int = 8) -> SyntheticTree:
    """A small irregular forest of ``n`` codes and depth at most ``max_depth``, rows in random order. ``rng``: a
    NumPy Generator (advanced in place) or a seed. Codes are distinct strings of 1 to 6 upper-case letters (one may be
    a prefix of an unrelated code); a parent may come after its children."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"max_depth must be a positive int, got {max_depth!r}")
    rng = np.random.default_rng(rng)
    depths, parents, hubs, open_ = [], [], [], []
    for i in range(n):
        kind = rng.random()
        if not open_ or kind < 0.15:
            p = -1
        elif kind < 0.45 and depths[-1] < max_depth:
            p = i - 1
        elif kind < 0.75 and hubs:
            p = hubs[int(rng.integers(len(hubs)))]
        else:
            p = open_[int(rng.integers(len(open_)))]
        parents.append(p)
        depths.append(1 if p < 0 else depths[p] + 1)
        if depths[-1] < max_depth:
            open_.append(i)
            if rng.random() < 0.1:
                hubs.append(i)
    drawn: dict[str, None] = {}  # distinct codes in the order drawn
    while len(drawn) < n:
        drawn["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), int(rng.integers(1, 7))))] = None
    codes = list(drawn)
    titles = [" ".join(rng.choice(_WORDS, int(rng.integers(1, 5)))) for _ in range(n)]
    order = rng.permutation(n).tolist()
    return SyntheticTree([codes[i] for i in order], [codes[parents[i]] if parents[i] >= 0 else "" for i in order],
                         [titles[i] for i in order])


def _level_sizes(n: int, roots: int, lo: int, hi: int) -> list[int]:
    """Codes per depth: geometric growth summing to ``n``, non-decreasing down to depth ``lo``."""
    if hi == 1:
        return [n]
    low, high = 0.0, (n / roots) ** (1 / (hi - 1)) + 1
    for _ in range(100):
        g = (low + high) / 2
        low, high = (g, high) if roots * sum(g**k for k in range(hi)) < n else (low, g)
    sizes = [roots] + [max(0, round(roots * g**k)) for k in range(1, hi)]
    for d in range(1, lo):
        sizes[d] = max(sizes[d], sizes[d - 1])
    excess = sum(sizes) - n
    for d in range(hi - 1, 0, -1):
        cut = max(0, min(excess, sizes[d] - (sizes[d - 1] if d < lo else 0)))
        sizes[d] -= cut
        excess -= cut
    sizes[max(1, max(d for d in range(hi) if sizes[d]))] -= excess
    return [s for s in sizes if s]


def _assign_parents(rng: np.random.Generator, n_parents: int, n_children: int, all_branch: bool) -> np.ndarray:
    """Parent (index within the level above) of each child, grouped by parent; lognormal fan-out."""
    weights = rng.lognormal(0.0, 1.0, n_parents)
    if all_branch:
        extra = rng.multinomial(n_children - n_parents, weights / weights.sum())
        return np.repeat(np.arange(n_parents), extra + 1)
    weights[rng.random(n_parents) < 0.25] = 0.0
    if not weights.any():
        weights[rng.integers(n_parents)] = 1.0
    return np.repeat(np.arange(n_parents), rng.multinomial(n_children, weights / weights.sum()))


def _preorder(sizes: list[int], parent_of: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pre-order of the level-by-level rows, and each row's parent row (-1 at the top)."""
    offsets = np.cumsum([0] + sizes)
    path = np.full((len(sizes), offsets[-1]), -1, np.int32)
    parent = np.full(offsets[-1], -1, np.int64)
    for d, size in enumerate(sizes):
        rows = slice(offsets[d], offsets[d + 1])
        path[d, rows] = np.arange(size)
        if d:
            parent[rows] = offsets[d - 1] + parent_of[d]
            path[:d, rows] = path[:d, parent[rows]]
    return np.lexsort(path[::-1]), parent


def _level_codes(rng: np.random.Generator, style: str, sizes: list[int], parent_of: list[np.ndarray],
                 counts: list[np.ndarray]) -> list[np.ndarray]:
    """Per depth, fixed-width ASCII codes as an ``S`` array; longer at each depth, so all distinct."""
    if style == "letters":
        pattern = "LLL.LD-D" + "L.DD-L" * (len(sizes) + 10)
        cuts = [i + 1 for i, ch in enumerate(pattern) if ch != "." and ch != "-"]
        levels, k = [], 2
        for size in sizes:
            while math.prod(26 if ch == "L" else 10 for ch in pattern[: cuts[k]] if ch in "LD") < 16 * size:
                k += 1
            levels.append(_fill(rng, pattern[: cuts[k]], size))
            k += 1
        return [m.view(f"S{m.shape[1]}").ravel() for m in levels]
    digits = 2
    while 26 * 10**digits < 16 * sizes[0]:
        digits += 1
    mats = [_fill(rng, "L" + "D" * digits, sizes[0])]
    for d in range(1, len(sizes)):
        n_child, fan = counts[d - 1][parent_of[d]], int(counts[d - 1].max())
        rank = np.arange(sizes[d]) - (np.cumsum(counts[d - 1]) - counts[d - 1])[parent_of[d]]
        if style == "icd":
            width, base, alphabet, value, prefix = 1, 36, _ALNUM, rank, ""
            while 36**width < fan:
                width += 1
        else:
            width, base, alphabet = max(3, len(str(fan))), 10, _ALNUM[:10]
            stride = 10**width // n_child
            value, prefix = rank * stride + rng.integers(0, stride), "."
        suffix = np.empty((sizes[d], len(prefix) + width), np.uint8)
        suffix[:, : len(prefix)] = np.frombuffer(prefix.encode(), np.uint8)
        for col in range(suffix.shape[1] - 1, len(prefix) - 1, -1):
            suffix[:, col] = alphabet[value % base]
            value = value // base
        mats.append(np.hstack([mats[d - 1][parent_of[d]], suffix]))
    return [m.view(f"S{m.shape[1]}").ravel() for m in mats]


def _fill(rng: np.random.Generator, template: str, size: int) -> np.ndarray:
    """``size`` distinct random codes shaped like ``template`` (L: letter, D: digit, else literal): the rightmost L/D
    positions, enough for 16 x ``size`` values, spell a sample without replacement."""
    positions = [col for col in range(len(template) - 1, -1, -1) if template[col] in "LD"]
    space, n_unique = 1, 0
    while n_unique < len(positions) and space < 16 * size:
        space *= 26 if template[positions[n_unique]] == "L" else 10
        n_unique += 1
    value = rng.choice(space, size, replace=False)
    mat = np.empty((size, len(template)), np.uint8)
    for col, ch in enumerate(template):
        if ch not in "LD":
            mat[:, col] = ord(ch)
    for k, col in enumerate(positions):
        base, alphabet = (26, _ALNUM[10:]) if template[col] == "L" else (10, _ALNUM[:10])
        if k < n_unique:
            digit, value = value % base, value // base
        else:
            digit = rng.integers(0, base, size)
        mat[:, col] = alphabet[digit]
    return mat


def _titles(rng: np.random.Generator, sizes: list[int], parent_of: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Word ids (n, 6) and lengths (3..6) per code, by depth: 1-2 new words, then the parent's first words."""
    words = [rng.integers(0, len(_WORDS), (sizes[0], 6), dtype=np.int16)]
    lengths = [rng.integers(3, 7, sizes[0])]
    for d in range(1, len(sizes)):
        parent_words, parent_len = words[d - 1][parent_of[d]], lengths[d - 1][parent_of[d]]
        new = rng.integers(1, 3, sizes[d])
        length = np.minimum(rng.integers(3, 7, sizes[d]), new + parent_len)
        source = np.arange(6) - new[:, None]
        inherited = np.take_along_axis(parent_words, np.maximum(source, 0), axis=1)
        words.append(np.where(source < 0, rng.integers(0, len(_WORDS), (sizes[d], 6), dtype=np.int16), inherited))
        lengths.append(length)
    return np.concatenate(words), np.concatenate(lengths)
