"""The false-negative rule, written once: :class:`TreeGuard` over (anchor, candidate) id blocks.

A candidate ``c`` of anchor ``a`` is dropped when it is padding (-1), ``a`` itself, the positive
``p``, related to ``a`` in the tree (an ancestor or a descendant), outside the ``allowed`` mask, in
the row's ``exclude`` collection or - with the order filter - at least as near ``a`` in the tree as
the positive (``lca_depth(a, c) >= lca_depth(a, p)``). The Phase 1 curriculum, the miner, the
neighbour lists, guarded in-batch negatives and the evaluation all ask this object.

Relations come from per-code arrays (DFS numbers and ancestor paths, O(N x depth)), for ids given
as numpy arrays (computed with numpy) or torch tensors (computed on the tensors' device, where
copies of the per-code arrays are cached). Nothing is N x N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from naics_hnm.tree.structure import lca_depth_of, related_of
from naics_hnm.tree.taxonomy import Taxonomy


@dataclass
class GuardStats:
    """Counts of candidates (valid, non-padding) and why they were removed."""

    candidates: int = 0
    removed_self: int = 0
    removed_positive: int = 0
    removed_related: int = 0
    removed_disallowed: int = 0
    removed_order: int = 0
    removed_exclude: int = 0
    removed_margin: int = 0
    kept: int = 0

    def __add__(self, other: "GuardStats") -> "GuardStats":
        if not isinstance(other, GuardStats):
            return NotImplemented
        return GuardStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_fractions(self) -> dict[str, float]:
        """``removed_*`` and ``kept`` as fractions of ``candidates`` (0.0 when there are none)."""
        total = self.candidates
        return {name: (value / total if total else 0.0) for name, value in asdict(self).items() if name != "candidates"}


class TreeGuard:
    """Tree relations and the false-negative rule of one taxonomy, on CPU (numpy) or any torch device.

    Args:
        taxonomy: the code tree; ids are its dense indices.
        allowed: optional bool [N]; False codes are never kept as candidates (e.g. held-out codes).
    """

    def __init__(self, taxonomy: Taxonomy, allowed: np.ndarray | None = None) -> None:
        if not isinstance(taxonomy, Taxonomy):
            raise TypeError(f"TreeGuard(taxonomy={type(taxonomy).__name__}): expected a Taxonomy")
        n = len(taxonomy)
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.dtype != np.bool_ or allowed.shape != (n,):
                raise ValueError(f"TreeGuard(allowed=...): got {allowed.dtype} {allowed.shape}, expected bool ({n},)")
        self.taxonomy = taxonomy
        self.allowed = allowed
        self._numpy = {"path": taxonomy.ancestor_path[:, 1:], "pre": taxonomy.pre, "end": taxonomy.end,
                       "allowed": allowed}
        self._on_device: dict[torch.device, dict[str, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self.taxonomy)

    def _arrays(self, like: Any) -> dict[str, Any]:
        if not isinstance(like, torch.Tensor):
            return self._numpy
        device = like.device
        if device not in self._on_device:
            self._on_device[device] = {k: None if v is None else torch.from_numpy(np.ascontiguousarray(v)).to(device)
                                       for k, v in self._numpy.items()}
        return self._on_device[device]

    def lca_depth(self, a: Any, c: Any) -> Any:
        """Depth of the lowest common ancestor of each (a, c) pair (0 = the root); broadcasts."""
        arr = self._arrays(c)
        if isinstance(c, torch.Tensor):
            a, c = torch.broadcast_tensors(torch.as_tensor(a, device=c.device), c)
        else:
            a, c = np.broadcast_arrays(np.asarray(a), np.asarray(c))
        depth = lca_depth_of(arr["path"], a, c)
        return depth if isinstance(depth, torch.Tensor) else depth.astype(np.int64)

    def related(self, a: Any, c: Any) -> Any:
        """a == c, or one is an ancestor of the other; broadcasts."""
        arr = self._arrays(c)
        return related_of(arr["pre"], arr["end"], a, c)

    def is_allowed(self, c: Any) -> Any:
        """bool per id: inside the ``allowed`` mask (all True without one)."""
        allowed = self._arrays(c)["allowed"]
        if allowed is None:
            return torch.ones_like(c, dtype=torch.bool) if isinstance(c, torch.Tensor) else np.ones(np.shape(c), bool)
        return allowed[c]

    def may_be_negative(self, a: Any, c: Any) -> Any:
        """The tree's part of the rule, the one entry point: ``c`` is an id (not -1 padding), neither
        related to ``a`` nor outside ``allowed``; numpy or torch, broadcasts."""
        safe = c.clamp(min=0) if isinstance(c, torch.Tensor) else np.maximum(c, 0)
        return (c >= 0) & ~self.related(a, safe) & self.is_allowed(safe)

    def keep(self, anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor | None = None, *,
             order_filter: bool = False, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, GuardStats]:
        """:func:`guard_tensors` with this tree."""
        return guard_tensors(anchors, candidates, positives, tree=self, order_filter=order_filter, exclude=exclude)


def too_near(lca: Any, positive_lca: Any) -> Any:
    """The order filter, written once: a candidate whose LCA depth with the anchor is at least the
    positive's (``positive_lca``; -1 where a row has no positive: nothing is too near)."""
    return (lca >= positive_lca) & (positive_lca >= 0)


def guard_tensors(anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor | None = None, *,
                  tree: TreeGuard | None = None, order_filter: bool = False,
                  exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, GuardStats]:
    """``(keep [B, C], stats)`` for validated int64 tensors on one device; -1 pads.

    Without ``tree`` only the anchor, positive and exclude rules apply (any id space).
    ``positives`` may hold -1 (no positive: neither the positive rule nor the order filter applies
    to that row). ``exclude`` is a bool [B, C] mask of ids to drop. Each removed candidate is
    counted under the first rule that removes it, in the order of :class:`GuardStats`.
    """
    if order_filter and (positives is None or tree is None):
        raise ValueError("order_filter=True needs positive ids and a taxonomy")
    valid = candidates >= 0
    safe = candidates.clamp(min=0)
    rows = anchors.unsqueeze(1)
    rules: list[tuple[str, torch.Tensor]] = [("removed_self", candidates == rows)]
    if positives is not None:
        has_pos = (positives >= 0).unsqueeze(1)
        rules.append(("removed_positive", (candidates == positives.unsqueeze(1)) & has_pos))
    if tree is not None:
        rules.append(("removed_related", tree.related(rows, safe)))
        if tree.allowed is not None:
            rules.append(("removed_disallowed", ~tree.is_allowed(safe)))
        if order_filter:
            pos_depth = tree.lca_depth(anchors, positives.clamp(min=0)).unsqueeze(1).masked_fill(~has_pos, -1)
            rules.append(("removed_order", too_near(tree.lca_depth(rows, safe), pos_depth)))
    if exclude is not None:
        rules.append(("removed_exclude", exclude))
    stats = GuardStats(candidates=int(valid.sum()))
    keep = valid
    for name, removed in rules:
        setattr(stats, name, int((keep & removed).sum()))
        keep = keep & ~removed
    stats.kept = int(keep.sum())
    return keep, stats
