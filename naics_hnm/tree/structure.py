"""Per-code arrays of a rooted forest, built level by level from parent pointers in O(N x depth): ``depth`` (1: top
level), ``pre`` / ``end`` (DFS numbers, children in ascending id: the subtree of ``a`` is positions
``[pre[a], end[a])``), ``dfs_order`` (position -> id), ``ancestor_path`` int32 [N, D+1] (column t: the ancestor at
depth t; column 0 the virtual root written N, -1 past the code's depth)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

MAX_DEPTH = 64


def paths_lca_depth(pa, pc):
    """Depth of the lowest common ancestor from two ancestor paths (depths 1..D, -1 past a code's depth)."""
    return ((pa == pc) & (pa >= 0)).sum(-1)


def spans_related(pre_a, end_a, pre_c, end_c):
    """a == c, or one is an ancestor of the other, from DFS spans ``[pre, end)``: the one relation formula."""
    return ((pre_a <= pre_c) & (pre_c < end_a)) | ((pre_c <= pre_a) & (pre_a < end_c))


def lca_depth_of(path, a, c):
    """LCA depth of each (a, c) pair (numpy or torch, one broadcast shape), ``path`` = ``ancestor_path[:, 1:]``."""
    return paths_lca_depth(path[a], path[c])


def related_of(pre, end, a, c):
    """a == c, or one is an ancestor of the other: the one formula, for numpy arrays or torch tensors."""
    return spans_related(pre[a], end[a], pre[c], end[c])


class TreeError(ValueError):
    """A parent array that is not a forest: names the offending code."""


@dataclass(frozen=True)
class TreeArrays:
    parent: np.ndarray
    depth: np.ndarray
    pre: np.ndarray
    end: np.ndarray
    dfs_order: np.ndarray
    ancestor_path: np.ndarray


def _levels(parent: np.ndarray, name: Callable[[int], str]) -> list[np.ndarray]:
    """Codes grouped by depth (index 0 = depth 1), children of a node in ascending id."""
    n = len(parent)
    order = np.argsort(parent, kind="stable")  # children grouped by parent, ascending id within
    sorted_parent = parent[order]
    first_child = np.searchsorted(sorted_parent, np.arange(-1, n), side="left")
    last_child = np.searchsorted(sorted_parent, np.arange(-1, n), side="right")
    levels = [order[first_child[0] : last_child[0]]]  # parent -1: the top level
    reached = len(levels[0])
    while reached < n:
        frontier = levels[-1]
        starts, stops = first_child[frontier + 1], last_child[frontier + 1]
        counts = stops - starts
        if counts.sum() == 0:
            break
        if len(levels) >= MAX_DEPTH:
            deep = frontier[counts > 0][0]
            raise TreeError(f"code {name(int(deep))} at depth {MAX_DEPTH} has children: expected a tree at "
                            f"most {MAX_DEPTH} levels deep")
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        levels.append(order[offsets])
        reached += len(levels[-1])
    if reached < n:
        unseen = int(np.setdiff1d(np.arange(n), np.concatenate(levels))[0])
        raise TreeError(f"code {name(_on_cycle(parent, unseen))} is on a parent cycle "
                        f"({n - reached} codes never reach a top-level code)")
    return levels


def _on_cycle(parent: np.ndarray, start: int) -> int:
    """A code on the cycle that ``start``'s parent chain runs into."""
    visited: set[int] = set()
    node = start
    while node not in visited:
        visited.add(node)
        node = int(parent[node])
    return node


def build_tree(parent: np.ndarray, name: Callable[[int], str] = str) -> TreeArrays:
    """Depth, DFS numbering and ancestor paths of the forest ``parent`` (int64 [N], -1 = top level).
    ``name(i)`` formats code i in errors. :class:`TreeError` for a self-parent, a parent out of range, a cycle, or
    more than ``MAX_DEPTH`` levels."""
    parent = np.ascontiguousarray(parent, dtype=np.int64)
    n = len(parent)
    bad = np.flatnonzero((parent < -1) | (parent >= n))
    if bad.size:
        raise TreeError(f"code {name(int(bad[0]))} has parent id {int(parent[bad[0]])}: expected -1 or [0, {n})")
    own = np.flatnonzero(parent == np.arange(n))
    if own.size:
        raise TreeError(f"code {name(int(own[0]))} is its own parent")
    levels = _levels(parent, name)
    size = np.ones(n, dtype=np.int64)
    for level in reversed(levels[1:]):
        np.add.at(size, parent[level], size[level])
    pre = np.zeros(n, dtype=np.int64)
    for d, level in enumerate(levels):
        # levels list children of one parent together, ascending id: an exclusive cumsum per group
        group_parent = parent[level]
        before = np.cumsum(size[level]) - size[level]
        group_start = np.r_[True, group_parent[1:] != group_parent[:-1]]
        first_of_group = np.maximum.accumulate(np.where(group_start, np.arange(len(level)), 0))
        offset = before - before[first_of_group]
        pre[level] = offset if d == 0 else pre[group_parent] + 1 + offset
    end = pre + size
    dfs_order = np.empty(n, dtype=np.int64)
    dfs_order[pre] = np.arange(n)
    depth = np.zeros(n, dtype=np.int16)
    path = np.full((n, len(levels) + 1), -1, dtype=np.int32)
    path[:, 0] = n
    for d, level in enumerate(levels, start=1):
        depth[level] = d
        if d > 1:
            path[level, :d] = path[parent[level], :d]
        path[level, d] = level
    return TreeArrays(parent, depth, pre, end, dfs_order, path)
