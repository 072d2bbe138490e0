"""The false-negative rule, written once: :class:`TreeGuard` over (anchor, candidate) id blocks. A candidate is
dropped when it is padding (-1), the anchor, the positive, related to the anchor (ancestor or descendant), outside
``allowed``, excluded, or - with the order filter - at least as near the anchor in the tree as the positive."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from naics_hnm.hugepages import hugepage_empty
from naics_hnm.tree.structure import lca_depth_of, paths_lca_depth, related_of, spans_related
from naics_hnm.tree.taxonomy import Taxonomy

PRE, END, ALLOWED = 0, 1, 2
PACKED_COLUMNS = 3  # pre, end, allowed (0/1); the ancestor path (depths 1..D, -1 past the code's depth) follows


def pack_rows(taxonomy: Taxonomy, allowed: np.ndarray | None) -> np.ndarray:
    """int32 [N, 3 + D]: per code (pre, end, allowed, ancestor path at depths 1..D), C-contiguous."""
    path = taxonomy.ancestor_path[:, 1:]
    packed = hugepage_empty((len(taxonomy), PACKED_COLUMNS + path.shape[1]), np.int32)
    packed[:, PRE] = taxonomy.pre
    packed[:, END] = taxonomy.end
    packed[:, ALLOWED] = 1 if allowed is None else allowed
    packed[:, PACKED_COLUMNS:] = path
    return packed


def _lca_rows(a: Any, c: Any) -> Any:
    """Depth of the lowest common ancestor, from packed rows (broadcast over leading dims)."""
    return paths_lca_depth(a[..., PACKED_COLUMNS:], c[..., PACKED_COLUMNS:])


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
    """Tree relations and the false-negative rule of ``taxonomy`` (ids: its dense indices), numpy or torch;
    ``allowed``: optional bool [N], False codes are never kept as candidates (e.g. held-out codes)."""

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
                       "allowed": allowed, "packed": pack_rows(taxonomy, allowed)}
        # the DFS span of each code as one int64 (pre in the low, end in the high 32 bits): keep_mask's one gather
        self._span = hugepage_empty((n,), np.int64)
        np.bitwise_or(taxonomy.pre.astype(np.int64), taxonomy.end.astype(np.int64) << 32, out=self._span)
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

    def rows(self, ids: Any) -> Any:
        """Packed per-code rows (see :func:`pack_rows`) of valid ids, shape ``ids.shape + (3 + D,)``."""
        packed = self._arrays(ids)["packed"]
        if isinstance(ids, torch.Tensor) and ids.device.type != "cpu":  # whole rows, not element by element
            return torch.index_select(packed, 0, ids.reshape(-1)).reshape(*ids.shape, packed.shape[1])
        if isinstance(ids, torch.Tensor):  # np.take copies rows fastest on CPU (1.5x index_select at 1M codes)
            return torch.from_numpy(np.take(packed.numpy(), ids.numpy(), axis=0))
        return np.take(packed, ids, axis=0)

    def keep_mask(self, anchors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """bool [B, C] for numpy ids (-1 pads): valid, not the anchor, not related, allowed; the same as
        ``guard_tensors(anchors, candidates, tree=self)[0]``, with one int64 gather per candidate."""
        anchors = np.asarray(anchors)[:, None]
        valid = candidates >= 0
        safe = np.where(valid, candidates, 0)
        span_a, span_c = self._span[anchors], self._span[safe]
        pre_a, end_a = span_a & 0xFFFFFFFF, span_a >> 32
        pre_c, end_c = span_c & 0xFFFFFFFF, span_c >> 32
        keep = valid & (candidates != anchors) & ~spans_related(pre_a, end_a, pre_c, end_c)
        if self.allowed is not None:
            keep &= self.allowed[safe]
        return keep

    def related_bound(self, ids: np.ndarray) -> np.ndarray:
        """int64 per id: at most this many codes are related to it (its ancestors and its subtree, with itself)."""
        tx = self.taxonomy
        return tx.depth[ids].astype(np.int64) + tx.end[ids] - tx.pre[ids]

    def is_allowed(self, c: Any) -> Any:
        """bool per id: inside the ``allowed`` mask (all True without one)."""
        allowed = self._arrays(c)["allowed"]
        if allowed is None:
            return torch.ones_like(c, dtype=torch.bool) if isinstance(c, torch.Tensor) else np.ones(np.shape(c), bool)
        return allowed[c]

    def may_be_negative(self, a: Any, c: Any) -> Any:
        """The tree's part of the rule: ``c`` is an id (not -1), not related to ``a``, allowed; broadcasts."""
        safe = c.clamp(min=0) if isinstance(c, torch.Tensor) else np.maximum(c, 0)
        return (c >= 0) & ~self.related(a, safe) & self.is_allowed(safe)

    def keep(self, anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor | None = None, *,
             order_filter: bool = False, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, GuardStats]:
        """:func:`guard_tensors` with this tree."""
        return guard_tensors(anchors, candidates, positives, tree=self, order_filter=order_filter, exclude=exclude)


def too_near(lca: Any, positive_lca: Any) -> Any:
    """The order filter: LCA depth at least the positive's (``positive_lca`` -1: no positive, nothing too near)."""
    return (lca >= positive_lca) & (positive_lca >= 0)


def guard_tensors(anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor | None = None, *,
                  tree: TreeGuard | None = None, order_filter: bool = False,
                  exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, GuardStats]:
    """``(keep [B, C], stats)`` for validated int64 tensors on one device; -1 pads.

    Without ``tree`` only the anchor, positive and exclude rules apply. ``positives`` -1: no positive for that row.
    ``exclude``: bool [B, C]. A removal counts under the first rule, in the order of :class:`GuardStats`."""
    if order_filter and (positives is None or tree is None):
        raise ValueError("order_filter=True needs positive ids and a taxonomy")
    valid = candidates >= 0
    rules: list[tuple[str, torch.Tensor]] = [("removed_self", candidates == anchors.unsqueeze(1))]
    if positives is not None:
        has_pos = (positives >= 0).unsqueeze(1)
        rules.append(("removed_positive", (candidates == positives.unsqueeze(1)) & has_pos))
    if tree is not None:
        cand, anc = tree.rows(candidates.clamp(min=0)), tree.rows(anchors).unsqueeze(1)  # one gather per candidate
        rules.append(("removed_related", spans_related(anc[..., PRE], anc[..., END], cand[..., PRE], cand[..., END])))
        if tree.allowed is not None:
            rules.append(("removed_disallowed", cand[..., ALLOWED] == 0))
        if order_filter:
            pos_depth = _lca_rows(anc[:, 0], tree.rows(positives.clamp(min=0))).unsqueeze(1).masked_fill(~has_pos, -1)
            rules.append(("removed_order", too_near(_lca_rows(anc, cand), pos_depth)))
    if exclude is not None:
        rules.append(("removed_exclude", exclude))
    stats = GuardStats(candidates=int(valid.sum()))
    keep = valid
    for name, removed in rules:
        setattr(stats, name, int((keep & removed).sum()))
        keep = keep & ~removed
    stats.kept = int(keep.sum())
    return keep, stats
