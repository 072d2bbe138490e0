"""Bucketed negative tables and vectorised, counter-keyed curriculum draws.

For every anchor the valid negatives (not the anchor, not an ancestor or descendant, not an
excluded code) are stored once, grouped by difficulty bucket (hard | semi-hard | easy) in one flat
int32 array with per-anchor offsets. A draw for a batch of items is then a handful of NumPy
operations: split the requested counts over the buckets (spilling into neighbours when one runs
short), pick distinct positions per bucket, and map positions to code ids.
"""

from __future__ import annotations

import numpy as np

from naics_hnm.counter_rng import uniforms
from naics_hnm.taxonomy import Taxonomy

HARD, SEMI_HARD, EASY = 0, 1, 2
BUCKETS = ("hard", "semi_hard", "easy")
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
    """Per-anchor valid negatives grouped by bucket, for a taxonomy and a set of allowed codes."""

    def __init__(self, taxonomy: Taxonomy, allowed: np.ndarray | None = None) -> None:
        n = len(taxonomy)
        allowed = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if allowed.shape != (n,):
            raise ValueError(f"allowed mask of shape {allowed.shape}: expected ({n},)")
        lca = taxonomy.lca_depth
        depth = taxonomy.depth.astype(np.int16)
        bucket = np.where(lca == 0, EASY, SEMI_HARD).astype(np.int8)
        hard = (lca == (depth[:, None] - 1)) & (depth[:, None] >= 2)
        bucket[hard] = HARD
        bucket[taxonomy.related | ~allowed[None, :]] = 3
        order = np.argsort(bucket, axis=1, kind="stable")
        counts = np.stack([(bucket == b).sum(axis=1) for b in range(3)], axis=1).astype(np.int64)
        valid = counts.sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(valid)[:-1]])
        self.offsets = np.concatenate([starts[:, None], starts[:, None] + np.cumsum(counts, axis=1)], axis=1)
        self.sizes = counts
        keep = np.arange(n)[None, :] < valid[:, None]
        self.flat = order[keep].astype(np.int32)
        self._position = np.empty((n, n), dtype=np.int64 if n > 32767 else np.int16)
        self._position[np.arange(n)[:, None], order] = np.arange(n)[None, :]
        self._bucket = bucket

    def position(self, anchors: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Absolute position of ``codes`` in their anchor's list (into ``flat``), -1 if not a valid negative."""
        anchors, codes = np.asarray(anchors), np.asarray(codes)
        ok = self._bucket[anchors, codes] < 3
        pos = self.offsets[anchors, 0] + self._position[anchors, codes]
        return np.where(ok, pos, -1)

    def bucket_of(self, anchors: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Bucket id (0 hard, 1 semi-hard, 2 easy, 3 not a valid negative) of each (anchor, code)."""
        return self._bucket[np.asarray(anchors), np.asarray(codes)]

    def draw(self, keys: np.ndarray, anchors: np.ndarray, excluded_pos: np.ndarray,
             shares: tuple[float, float, float], n_first: int, n_total: int) -> np.ndarray:
        """Distinct negatives per item: int64 [B, n_total], -1 where an anchor has too few.

        Columns ``[:n_first]`` follow ``shares`` on their own (the selected negatives); the rest
        follow ``shares`` for the remaining slots. ``excluded_pos`` [B] is one absolute position
        per item that must not be drawn (the positive), or -1.
        """
        anchors = np.asarray(anchors, dtype=np.int64)
        b = len(anchors)
        sizes = self.sizes[anchors]
        ex_bucket = np.full(b, -1)
        has_ex = excluded_pos >= 0
        ex_bucket[has_ex] = (excluded_pos[has_ex][:, None] >= self.offsets[anchors[has_ex], 1:3]).sum(axis=1)
        available = sizes.copy()
        available[np.flatnonzero(has_ex), ex_bucket[has_ex]] -= 1
        first = spill(np.broadcast_to(split_counts(n_first, shares), (b, 3)).copy(), available)
        rest = spill(np.broadcast_to(split_counts(n_total - n_first, shares), (b, 3)).copy(), available - first)
        slot_bucket = np.full((b, n_total), 3, dtype=np.int64)
        cols = np.arange(n_total)
        for counts, start in ((first, 0), (rest, n_first)):
            edges = start + np.cumsum(counts, axis=1)
            in_range = (cols[None, :] >= start) & (cols[None, :] < edges[:, 2:3])
            slot_bucket = np.where(in_range, (cols[None, :, None] >= edges[:, None, :]).sum(axis=2), slot_bucket)
        totals = first + rest
        pos = np.full((b, n_total), -1, dtype=np.int64)
        onehot = slot_bucket[:, :, None] == np.arange(3)[None, None, :]
        rank = np.take_along_axis(np.cumsum(onehot, axis=1) - 1, np.minimum(slot_bucket, 2)[:, :, None], 2)[:, :, 0]
        dense = 2 * totals > available
        self._fill_dense(keys, anchors, excluded_pos, slot_bucket, rank, dense, pos)
        self._fill_sparse(keys, anchors, excluded_pos, slot_bucket, dense, pos)
        out = np.full((b, n_total), -1, dtype=np.int64)
        ok = pos >= 0
        out[ok] = self.flat[pos[ok]]
        return out

    def _fill_dense(self, keys, anchors, excluded_pos, slot_bucket, rank, dense, pos) -> None:
        """Buckets asking for more than half of what they hold: a keyed shuffle of the whole bucket."""
        rows, buckets = np.nonzero(dense & (self.sizes[anchors] > 0))
        if len(rows) == 0:
            return
        sizes = self.sizes[anchors[rows], buckets]
        width = int(sizes.max())
        cand = self.offsets[anchors[rows], buckets][:, None] + np.arange(width)[None, :]
        u = _bucket_uniforms(keys[rows], buckets, width)
        u[(np.arange(width)[None, :] >= sizes[:, None]) | (cand == excluded_pos[rows][:, None])] = np.inf
        shuffled = np.take_along_axis(cand, np.argsort(u, axis=1, kind="stable"), axis=1)
        lookup = np.full((len(anchors), 3), -1, dtype=np.int64)
        lookup[rows, buckets] = np.arange(len(rows))
        r, c = np.nonzero((slot_bucket < 3) & dense[np.arange(len(anchors))[:, None], np.minimum(slot_bucket, 2)])
        which = lookup[r, slot_bucket[r, c]]
        good = which >= 0
        pos[r[good], c[good]] = shuffled[which[good], rank[r[good], c[good]]]

    def _fill_sparse(self, keys, anchors, excluded_pos, slot_bucket, dense, pos) -> None:
        """Buckets asking for at most half of what they hold: draw, then redraw collisions."""
        b, n = slot_bucket.shape
        bk = np.minimum(slot_bucket, 2)
        sparse = (slot_bucket < 3) & ~dense[np.arange(b)[:, None], bk]
        base = self.offsets[anchors[:, None], bk]
        size = self.sizes[anchors[:, None], bk]
        todo = sparse
        for round_ in range(_MAX_ROUNDS):
            if not todo.any():
                return
            u = uniforms(keys, round_, n)
            pos[todo] = (base + np.floor(u * size).astype(np.int64))[todo]
            # a redrawn slot may hit a later, settled one: the later one is redrawn then
            todo = _later_duplicates(pos, excluded_pos) & sparse
        pos[todo] = -1


def _bucket_uniforms(keys: np.ndarray, buckets: np.ndarray, width: int) -> np.ndarray:
    """Uniforms [R, width] on streams separate from the sparse rounds, one stream per bucket."""
    out = np.empty((len(keys), width))
    for bucket in np.unique(buckets):
        sel = buckets == bucket
        out[sel] = uniforms(keys[sel], 1000 + int(bucket), width)
    return out


def _later_duplicates(pos: np.ndarray, excluded_pos: np.ndarray) -> np.ndarray:
    """True where a position repeats an earlier column of its row or equals the excluded one."""
    b, n = pos.shape
    full = np.concatenate([excluded_pos[:, None], pos], axis=1)
    full = np.where(full < 0, -np.arange(1, n + 2)[None, :] - 10, full)
    order = np.argsort(full, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(full, order, axis=1)
    dup_sorted = np.zeros_like(full, dtype=bool)
    dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup[:, 1:]
