"""Each anchor's valid negatives as position ranges in DFS order: the curriculum without N x N tables. The codes
whose LCA with anchor ``a`` is at depth ``t`` are two ranges, ``[pre[A_t] + 1, pre[A_t+1])`` and
``[end[A_t+1], end[A_t])`` (``A_t``: a's depth-t ancestor; the root has pre -1, end N); disallowed codes are squeezed
out. Negatives listed level by level, then in DFS order, get a *list position*."""

from __future__ import annotations

import numpy as np

from naics_hnm.tree.guard import TreeGuard
from naics_hnm.tree.taxonomy import Taxonomy


class LevelRanges:
    """List positions <-> codes for one batch of anchors (built by :meth:`TreeIndex.ranges`), O(B x depth).
    ``offsets``: int64 [B, L+1]; level t of row b spans list positions ``[offsets[b, t], offsets[b, t+1])``."""

    def __init__(self, owner: "TreeIndex", anchors: np.ndarray) -> None:
        self._owner = owner
        path = owner.path[anchors]  # [B, L+1], column 0 = root (N), then ancestors, -1 beyond
        n, levels = owner.n, owner.levels
        top, below = path[:, :levels], path[:, 1 : levels + 1]
        has_level = below >= 0  # level t exists when the anchor has an ancestor (or itself) at depth t+1
        safe_top, safe_below = np.maximum(top, 0), np.maximum(below, 0)
        pre_ext, end_ext = np.append(owner.pre, -1), np.append(owner.end, n)  # index N = the virtual root
        rank = owner.rank
        lo1, hi1 = rank[pre_ext[safe_top] + 1], rank[owner.pre[safe_below]]
        lo2, hi2 = rank[owner.end[safe_below]], rank[end_ext[safe_top]]
        self.lo1 = np.where(has_level, lo1, 0)
        self.len1 = np.where(has_level, hi1 - lo1, 0)
        self.lo2 = np.where(has_level, lo2, 0)
        counts = self.len1 + np.where(has_level, hi2 - lo2, 0)
        self.offsets = np.concatenate([np.zeros((len(anchors), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)

    def codes_at(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Code ids at list ``positions`` [R, K] of batch ``rows`` [R] (positions must be valid)."""
        off = self.offsets[rows]
        level = np.minimum((positions[:, :, None] >= off[:, None, 1:]).sum(axis=2), off.shape[1] - 2)
        local = positions - np.take_along_axis(off, level, axis=1)
        len1 = np.take_along_axis(self.len1[rows], level, axis=1)
        squeezed = np.where(local < len1, np.take_along_axis(self.lo1[rows], level, axis=1) + local,
                            np.take_along_axis(self.lo2[rows], level, axis=1) + local - len1)
        codes = self._owner.squeezed_codes
        return codes[np.clip(squeezed, 0, max(len(codes) - 1, 0))]

    def positions_of(self, anchors: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """List position of each code [B] in its anchor's list, -1 if it is not a valid negative."""
        owner = self._owner
        safe = np.maximum(codes, 0)
        ok = owner.guard.may_be_negative(anchors, codes)
        level = np.where(ok, owner.guard.lca_depth(anchors, safe), 0)
        rows = np.arange(len(anchors))
        squeezed = owner.rank[owner.pre[safe]]
        lo1, len1 = self.lo1[rows, level], self.len1[rows, level]
        in_first = (squeezed >= lo1) & (squeezed < lo1 + len1)
        local = np.where(in_first, squeezed - lo1, len1 + squeezed - self.lo2[rows, level])
        return np.where(ok, self.offsets[rows, level] + local, -1)


class TreeIndex:
    """The taxonomy's DFS numbering with an ``allowed`` mask squeezed out; hands out :class:`LevelRanges`."""

    def __init__(self, taxonomy: Taxonomy, allowed: np.ndarray | None = None) -> None:
        n = len(taxonomy)
        allowed = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
        if allowed.shape != (n,):
            raise ValueError(f"allowed mask of shape {allowed.shape}: expected ({n},)")
        self.n = n
        self.levels = taxonomy.max_depth
        self.path = np.concatenate([taxonomy.ancestor_path, np.full((n, 1), -1, np.int32)], axis=1)
        self.pre, self.end = taxonomy.pre, taxonomy.end
        in_dfs = allowed[taxonomy.dfs_order]
        self.rank = np.concatenate([[0], np.cumsum(in_dfs)]).astype(np.int64)  # allowed codes before a position
        self.squeezed_codes = taxonomy.dfs_order[in_dfs]
        self.guard = TreeGuard(taxonomy, allowed)

    def ranges(self, anchors: np.ndarray) -> LevelRanges:
        return LevelRanges(self, np.asarray(anchors, dtype=np.int64))
