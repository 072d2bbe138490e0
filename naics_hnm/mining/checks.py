"""Public guard and margin masks over batches of (anchor, candidate) ids, numpy or torch; ``True`` means keep. The
false-negative rule lives in :mod:`naics_hnm.tree.guard`; here are its input checks and the positive-aware margin."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from naics_hnm.index.ids import check_ids, like_input, pad_ids
from naics_hnm.index.metric import check_metric, get_metric
from naics_hnm.tree.guard import GuardStats, TreeGuard, guard_tensors
from naics_hnm.tree.taxonomy import Taxonomy

__all__ = ["GuardStats", "TreeGuard", "as_tree_guard", "check_exclude", "check_margin", "check_order_filter",
           "exclude_mask", "guard_mask", "margin_mask", "margin_tensors"]


def as_tree_guard(tree: Any) -> TreeGuard | None:
    """None, a :class:`TreeGuard`, or a :class:`Taxonomy` (wrapped) -> TreeGuard or None."""
    if tree is None or isinstance(tree, TreeGuard):
        return tree
    if isinstance(tree, Taxonomy):
        return TreeGuard(tree)
    raise TypeError(f"taxonomy={type(tree).__name__}: expected a Taxonomy, a TreeGuard or None")


def is_bool_mask(x: Any) -> bool:
    """Whether ``x`` is a numpy or torch bool array."""
    if isinstance(x, np.ndarray):
        return x.dtype == np.bool_
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def exclude_mask(candidates: torch.Tensor, exclude: Any) -> torch.Tensor:
    """bool [B, C]: True where a candidate is excluded; ``exclude`` is a bool mask [B, C] (numpy or torch) or B id
    collections (``None`` entries allowed)."""
    b, c = candidates.shape
    if is_bool_mask(exclude):
        if tuple(exclude.shape) != (b, c):
            raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}, expected [B, C] = {(b, c)}")
        mask = exclude if isinstance(exclude, torch.Tensor) else torch.from_numpy(np.asarray(exclude))
        return mask.to(candidates.device)
    check_exclude(exclude, b)
    rows = []
    for i, ids in enumerate(exclude):
        if ids is None:
            ids = ()
        elif isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(list(ids) if isinstance(ids, (set, frozenset)) else ids).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"exclude[{i}] must hold integer ids, got dtype {arr.dtype}")
        rows.append(arr.astype(np.int64))
    if c == 0 or not any(r.size for r in rows):
        return torch.zeros((b, c), dtype=torch.bool, device=candidates.device)
    table = torch.from_numpy(pad_ids(rows, fill=-2)).to(candidates.device)
    return (candidates.unsqueeze(2) == table.unsqueeze(1)).any(dim=2)


def guard_mask(anchor_ids: Any, candidate_ids: Any, *, positive_ids: Any = None, taxonomy: Any = None,
               order_filter: bool = False, exclude: Any = None) -> tuple[Any, GuardStats]:
    """``(keep [B, C], stats)``: drop padding, the anchor, its positive, relatives, order, exclude.

    ``taxonomy`` (a Taxonomy or a :class:`TreeGuard`) adds the tree rules: no ancestor, descendant or disallowed
    code, and with ``order_filter`` no code as near the anchor as its positive. ``positive_ids`` -1: no positive.
    ``exclude``: a bool mask [B, C] or B id collections. Output is numpy or torch like ``candidate_ids``."""
    if candidate_ids is None:
        raise TypeError("candidate_ids=None: expected integer ids [B, C]")
    device = candidate_ids.device if isinstance(candidate_ids, torch.Tensor) else "cpu"
    tree = as_tree_guard(taxonomy)
    n = len(tree) if tree is not None else 2**62
    anchors, candidates, positives = check_ids(anchor_ids, candidate_ids, positive_ids, device, n)
    check_order_filter(order_filter, positives, tree, "a taxonomy")
    excluded = None if exclude is None else exclude_mask(candidates, exclude)
    keep, stats = guard_tensors(anchors, candidates, positives, tree=tree, order_filter=order_filter, exclude=excluded)
    return like_input(candidate_ids, keep)[0], stats


def check_order_filter(order_filter: bool, positives: Any, tree: Any, taxonomy_argument: str) -> None:
    if order_filter and (positives is None or tree is None):
        raise ValueError(f"order_filter=True needs positive_ids and {taxonomy_argument}")


def check_exclude(exclude: Any, b: int) -> None:
    """TypeError / ValueError unless ``exclude`` (not a bool mask) is a list of ``b`` id collections."""
    if isinstance(exclude, (str, bytes)) or not hasattr(exclude, "__len__"):
        raise TypeError(f"exclude must be a bool mask [B, C] or a list of B id collections, got "
                        f"{type(exclude).__name__}")
    if len(exclude) != b:
        raise ValueError(f"exclude has {len(exclude)} entries, expected one id collection per anchor (B={b})")


def margin_mask(candidate_scores: Any, positive_scores: Any, relative_margin: float, metric: str) -> Any:
    """Positive-aware relative margin (NV-Retriever TopK-PercPos); True = keep. Similarities: keep
    ``s <= pos - m * |pos|``; l2 distances: keep ``d >= pos + m * |pos|``; a non-finite ``pos`` keeps its whole row."""
    m = check_margin(relative_margin)
    check_metric(metric)
    scores, pos = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                   for x in (candidate_scores, positive_scores))
    pos = pos.to(device=scores.device, dtype=scores.dtype)
    if scores.dim() != 2 or pos.shape != scores.shape[:1]:
        raise ValueError(f"candidate_scores {tuple(scores.shape)} and positive_scores {tuple(pos.shape)}: expected "
                         "[B, C] and [B]")
    return like_input(candidate_scores, margin_tensors(scores, pos, m, metric))[0]


def margin_tensors(scores: torch.Tensor, pos: torch.Tensor, m: float, metric: str) -> torch.Tensor:
    """:func:`margin_mask` on validated tensors."""
    finite = torch.isfinite(pos)
    safe = torch.where(finite, pos, torch.zeros_like(pos)).unsqueeze(1)
    keep = scores >= safe + m * safe.abs() if get_metric(metric).is_distance else scores <= safe - m * safe.abs()
    return keep | ~finite.unsqueeze(1)


def check_margin(relative_margin: Any) -> float:
    if isinstance(relative_margin, bool) or not isinstance(relative_margin, (int, float, np.floating, np.integer)):
        raise TypeError(f"relative_margin={relative_margin!r}: expected a number in [0, 1)")
    m = float(relative_margin)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"relative_margin={relative_margin!r}: expected a number in [0, 1)")
    return m
