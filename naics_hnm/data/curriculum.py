"""Bucketed negatives and vectorised, counter-keyed curriculum draws.

Each anchor's valid negatives form a virtual list in buckets (hard | semi-hard | easy), given by DFS ranges.
"""

from __future__ import annotations

import numpy as np

from naics_hnm.data.counter_rng import later_duplicates, uniforms
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.tree.ranges import LevelRanges, TreeIndex

HARD, SEMI_HARD, EASY = 0, 1, 2
_MAX_ROUNDS = 64


def split_counts(total: int, shares: tuple[float, float, float]) -> np.ndarray:
    """Largest-remainder split of ``total`` slots over (hard, semi-hard, easy) shares."""
    raw = np.asarray(shares, dtype=np.float64) * total
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def spill(request: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Take ``request`` [B, 3] from ``available`` [B, 3]; shortfalls move hard -> easy, then back."""
    take = np.zeros_like(request)
    carry = np.zeros(request.shape[0], dtype=np.int64)
    for b in range(3):
        want = request[:, b] + carry
        take[:, b] = np.minimum(want, available[:, b])
        carry = want - take[:, b]
    for b in (2, 1, 0):
        extra = np.minimum(carry, available[:, b] - take[:, b])
        take[:, b] += extra
        carry -= extra
    return take


class NegativeTable:
    """Per-anchor valid negatives (not itself, not an ancestor or descendant, allowed), without per-anchor tables.

    An anchor's list is sorted by LCA depth with the anchor, then DFS order, so each bucket is a range of positions:
    easy = LCA at the root, hard = LCA at ``max_lca`` (default: the anchor's parent level), semi-hard between.
    """

    def __init__(self, taxonomy: Taxonomy, allowed: np.ndarray | None = None) -> None:
        self.tree = TreeIndex(taxonomy, allowed)
        self.depth = taxonomy.depth.astype(np.int64)
        self.guard = self.tree.guard

    @property
    def sizes(self) -> np.ndarray:
        """int64 [N, 3]: each anchor's default bucket sizes (hard, semi-hard, easy)."""
        return self.bucket_sizes(np.arange(len(self.depth)))

    def bucket_sizes(self, anchors: np.ndarray) -> np.ndarray:
        """int64 [B, 3]: the anchors' default bucket sizes (hard, semi-hard, easy)."""
        anchors = np.asarray(anchors, dtype=np.int64)
        return self.ranges(anchors, self.tree.ranges(anchors))[1]

    def default_max_lca(self, anchors: np.ndarray) -> np.ndarray:
        """The anchor's parent level: every valid negative is eligible."""
        return np.maximum(self.depth[np.asarray(anchors)] - 1, 0)

    def ranges(self, anchors: np.ndarray, level_ranges: LevelRanges, max_lca: np.ndarray | None = None,
               uniform: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(starts, sizes), int64 [B, 3] in list positions (hard, semi-hard, easy); ``uniform``: all in easy."""
        anchors = np.asarray(anchors, dtype=np.int64)
        top = self.default_max_lca(anchors) if max_lca is None else np.minimum(
            np.maximum(np.asarray(max_lca, dtype=np.int64), 0), self.default_max_lca(anchors))
        off = level_ranges.offsets
        at = lambda t: np.take_along_axis(off, t[:, None], axis=1)[:, 0]  # noqa: E731
        easy_lo, easy_hi = off[:, 0], off[:, 1]
        hard_lo = np.where(top >= 1, at(top), easy_hi)
        hard_hi = np.where(top >= 1, at(top + 1), easy_hi)
        starts = np.stack([hard_lo, easy_hi, easy_lo], axis=1)
        sizes = np.stack([hard_hi - hard_lo, np.maximum(hard_lo - easy_hi, 0), easy_hi - easy_lo], axis=1)
        if uniform:
            starts = np.stack([hard_hi, hard_hi, easy_lo], axis=1)
            sizes = np.stack([np.zeros_like(hard_hi), np.zeros_like(hard_hi), hard_hi - easy_lo], axis=1)
        return starts, sizes

    def bucket_of(self, anchors: np.ndarray, codes: np.ndarray, max_lca: np.ndarray | None = None) -> np.ndarray:
        """Bucket id (0 hard, 1 semi-hard, 2 easy, 3 not eligible) of each (anchor, code)."""
        anchors, codes = np.broadcast_arrays(np.asarray(anchors), np.asarray(codes))
        top = self.default_max_lca(anchors) if max_lca is None else np.minimum(
            np.broadcast_to(max_lca, anchors.shape), self.default_max_lca(anchors))
        lca = self.guard.lca_depth(anchors, np.maximum(codes, 0))
        valid = self.guard.may_be_negative(anchors, codes)
        bucket = np.where(lca == 0, EASY, np.where(lca == top, HARD, SEMI_HARD))
        return np.where(valid & (lca <= top), bucket, 3)

    def level_positives(self, keys: np.ndarray, anchors: np.ndarray, allowed: np.ndarray, decay: float,
                        level_ranges: LevelRanges | None = None) -> np.ndarray:
        """One positive per anchor (-1 if none): a level d (weight ``decay**d``, non-empty levels only), then
        a uniform code whose LCA with the anchor is at depth d (the anchor's ancestor at d included)."""
        anchors = np.asarray(anchors, dtype=np.int64)
        level_ranges = level_ranges or self.tree.ranges(anchors)
        off = level_ranges.offsets
        levels = off.shape[1] - 1
        seg = np.diff(off, axis=1)[:, 1:]  # [B, levels-1]: codes with LCA at depth 1 .. levels-1
        d = np.arange(1, levels)
        anc = self.tree.path[anchors][:, 1:levels].astype(np.int64)
        anc_ok = (anc >= 0) & (anc < len(allowed)) & (d[None, :] < self.depth[anchors][:, None])
        anc_ok &= allowed[np.clip(anc, 0, len(allowed) - 1)]
        count = np.where(d[None, :] < self.depth[anchors][:, None], seg, 0) + anc_ok
        weight = np.where(count > 0, float(decay) ** d[None, :], 0.0)
        total = weight.sum(axis=1)
        u = uniforms(keys, 2000, 2)
        level = np.minimum((u[:, :1] * total[:, None] >= np.cumsum(weight, axis=1)).sum(axis=1), max(levels - 2, 0))
        rows = np.arange(len(anchors))
        if levels < 2:
            return np.full(len(anchors), -1, dtype=np.int64)
        n_at = count[rows, level]
        j = np.minimum(np.floor(u[:, 1] * n_at).astype(np.int64), np.maximum(n_at - 1, 0))
        use_anc = anc_ok[rows, level] & (j == n_at - 1)
        list_pos = np.minimum(off[rows, level + 1] + j, np.maximum(off[:, -1] - 1, 0))
        drawn = level_ranges.codes_at(rows, list_pos[:, None])[:, 0]
        return np.where(total > 0, np.where(use_anc, anc[rows, level], drawn), -1)

    def position(self, anchors: np.ndarray, codes: np.ndarray, level_ranges: LevelRanges | None = None) -> np.ndarray:
        """List position of ``codes`` in their anchor's list, -1 if not a valid negative."""
        anchors = np.asarray(anchors, dtype=np.int64)
        level_ranges = level_ranges or self.tree.ranges(anchors)
        return level_ranges.positions_of(anchors, np.asarray(codes, dtype=np.int64))

    def draw(self, keys: np.ndarray, anchors: np.ndarray, excluded_pos: np.ndarray, shares: tuple[float, float, float],
             n_first: int, n_total: int, max_lca: np.ndarray | None = None, uniform: bool = False,
             level_ranges: LevelRanges | None = None) -> np.ndarray:
        """Distinct negatives per item: int64 [B, n_total], -1 where an anchor has too few.

        Columns ``[:n_first]`` follow ``shares`` on their own, the rest likewise. ``excluded_pos`` [B]: a position
        never drawn (the positive) or -1; ``max_lca`` [B] caps the LCA depth; ``uniform`` ignores ``shares``.
        """
        anchors = np.asarray(anchors, dtype=np.int64)
        b = len(anchors)
        level_ranges = level_ranges or self.tree.ranges(anchors)
        starts, sizes = self.ranges(anchors, level_ranges, max_lca, uniform)
        inside = (excluded_pos[:, None] >= starts) & (excluded_pos[:, None] < starts + sizes)
        available = sizes - inside
        first = spill(np.broadcast_to(split_counts(n_first, shares), (b, 3)).copy(), available)
        rest = spill(np.broadcast_to(split_counts(n_total - n_first, shares), (b, 3)).copy(), available - first)
        slot_bucket = np.full((b, n_total), 3, dtype=np.int64)
        cols = np.arange(n_total)
        for counts, start in ((first, 0), (rest, n_first)):
            edges = start + np.cumsum(counts, axis=1)
            in_range = (cols[None, :] >= start) & (cols[None, :] < edges[:, 2:3])
            slot_bucket = np.where(in_range, (cols[None, :, None] >= edges[:, None, :]).sum(axis=2), slot_bucket)
        pos = np.full((b, n_total), -1, dtype=np.int64)
        onehot = slot_bucket[:, :, None] == np.arange(3)[None, None, :]
        rank = np.take_along_axis(np.cumsum(onehot, axis=1) - 1, np.minimum(slot_bucket, 2)[:, :, None], 2)[:, :, 0]
        dense = 2 * (first + rest) > available
        _fill_dense(keys, starts, sizes, excluded_pos, slot_bucket, rank, dense, pos)
        _fill_sparse(keys, starts, sizes, excluded_pos, slot_bucket, dense, pos)
        return np.where(pos >= 0, level_ranges.codes_at(np.arange(b), np.maximum(pos, 0)), -1)


def _fill_dense(keys, starts, sizes, excluded_pos, slot_bucket, rank, dense, pos) -> None:
    """Buckets asking for more than half of what they hold: a keyed shuffle of the whole bucket."""
    rows, buckets = np.nonzero(dense & (sizes > 0))
    if len(rows) == 0:
        return
    n_items = len(sizes)
    sizes = sizes[rows, buckets]
    width = int(sizes.max())
    cand = starts[rows, buckets][:, None] + np.arange(width)[None, :]
    u = _bucket_uniforms(keys[rows], buckets, width)
    u[(np.arange(width)[None, :] >= sizes[:, None]) | (cand == excluded_pos[rows][:, None])] = np.inf
    shuffled = np.take_along_axis(cand, np.argsort(u, axis=1, kind="stable"), axis=1)
    lookup = np.full((n_items, 3), -1, dtype=np.int64)
    lookup[rows, buckets] = np.arange(len(rows))
    r, c = np.nonzero((slot_bucket < 3) & dense[np.arange(n_items)[:, None], np.minimum(slot_bucket, 2)])
    which = lookup[r, slot_bucket[r, c]]
    good = which >= 0
    pos[r[good], c[good]] = shuffled[which[good], rank[r[good], c[good]]]


def _fill_sparse(keys, starts, sizes, excluded_pos, slot_bucket, dense, pos) -> None:
    """Buckets asking for at most half of what they hold: draw, then redraw collisions."""
    b, n = slot_bucket.shape
    bk = np.minimum(slot_bucket, 2)
    sparse = (slot_bucket < 3) & ~dense[np.arange(b)[:, None], bk]
    base = np.take_along_axis(starts, bk, axis=1)
    size = np.take_along_axis(sizes, bk, axis=1)
    todo = sparse.copy()
    for round_ in range(_MAX_ROUNDS):
        rows = np.flatnonzero(todo.any(axis=1))
        if len(rows) == 0:
            return
        fresh = base[rows] + np.floor(uniforms(keys[rows], round_, n) * size[rows]).astype(np.int64)
        pos[rows] = np.where(todo[rows], fresh, pos[rows])
        # a redrawn slot may hit a later, settled one: the later one is redrawn then
        todo[rows] = later_duplicates(pos[rows], excluded_pos[rows]) & sparse[rows]
    pos[todo] = -1


def _bucket_uniforms(keys: np.ndarray, buckets: np.ndarray, width: int) -> np.ndarray:
    """Uniforms [R, width] on streams separate from the sparse rounds, one stream per bucket."""
    out = np.empty((len(keys), width))
    for bucket in np.unique(buckets):
        sel = buckets == bucket
        out[sel] = uniforms(keys[sel], 1000 + int(bucket), width)
    return out
