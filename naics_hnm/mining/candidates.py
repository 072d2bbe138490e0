"""The standalone hard-negative miner over any :class:`EmbeddingIndex` and any id space. Pool mode (``candidate_ids``
given) scores, guards and ranks every candidate; global mode searches ``k + slack`` nearest rows, guards them and
searches deeper for anchors left short: the brute-force result, for a flat index."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import check_ids, check_k, duplicate_mask, like_input, search_deeper, select_topk, worst_score
from naics_hnm.mining.checks import (as_tree_guard, check_exclude, check_margin, check_order_filter, exclude_mask,
                                     is_bool_mask, margin_tensors)
from naics_hnm.tree.guard import GuardStats, TreeGuard, guard_tensors


@dataclass
class _Request:
    """Validated mining inputs, ids as int64 tensors on the index device."""

    index: EmbeddingIndex
    anchors: torch.Tensor
    candidates: torch.Tensor | None
    k: int
    positives: torch.Tensor | None
    exclude: Any
    margin: float | None
    tree: TreeGuard | None
    order_filter: bool

    def subset(self, rows: torch.Tensor) -> "_Request":
        """The same request restricted to some anchor rows (global mode only)."""
        exclude = None if self.exclude is None else [self.exclude[i] for i in rows.tolist()]
        positives = None if self.positives is None else self.positives[rows]
        return replace(self, anchors=self.anchors[rows], candidates=None, positives=positives, exclude=exclude)


def mine_candidates(index: EmbeddingIndex, anchor_ids: Any, candidate_ids: Any = None, *, k: int,
                    positive_ids: Any = None, exclude: Any = None, relative_margin: float | None = None,
                    taxonomy: Any = None, order_filter: bool = False, return_stats: bool = False) -> tuple:
    """The k hardest guarded candidates per anchor: ``(scores [B, k], ids [B, k])`` (+ stats).

    Never the anchor, its positive (``positive_ids``, -1 = none) or anything in ``exclude`` (B id collections, or a
    bool mask [B, C] in pool mode). ``taxonomy`` (a Taxonomy or a :class:`TreeGuard`) adds the tree guard (no
    ancestor, descendant or disallowed code); ``order_filter`` keeps only codes whose LCA with the anchor is
    shallower than the positive's; ``relative_margin=m`` drops candidates more similar than ``(1 - m)`` times the
    positive (:func:`margin_mask`). Pads with -1 / -inf (+inf for l2); numpy or torch like the input ids."""
    request = _validate(index, anchor_ids, candidate_ids, k, positive_ids, exclude, relative_margin, order_filter,
                        taxonomy)
    with torch.no_grad():
        if request.candidates is None:
            scores, ids, stats = _mine_global(request)
        else:
            (scores, ids), stats, _ = _mine_pool(request, request.candidates)
    scores, ids = like_input(anchor_ids if candidate_ids is None else candidate_ids, scores, ids)
    return (scores, ids, stats) if return_stats else (scores, ids)


def _validate(index: Any, anchor_ids: Any, candidate_ids: Any, k: Any, positive_ids: Any, exclude: Any,
              relative_margin: Any, order_filter: bool, taxonomy: Any) -> _Request:
    if not isinstance(index, EmbeddingIndex):
        raise TypeError(f"index must be an EmbeddingIndex, got {type(index).__name__}")
    k = check_k(k)
    n, device = index.ntotal, index.vectors.device
    anchors, candidates, positives = check_ids(anchor_ids, candidate_ids, positive_ids, device, n)
    if candidates is None and is_bool_mask(exclude):
        raise ValueError("exclude as a bool mask [B, C] needs candidate_ids; pass per-anchor id collections instead")
    if exclude is not None and not is_bool_mask(exclude):
        check_exclude(exclude, anchors.shape[0])
    margin = None if relative_margin is None else check_margin(relative_margin)
    if margin is not None and positives is None:
        raise ValueError(f"relative_margin={relative_margin!r} needs positive_ids (the margin is relative to the "
                         "positive)")
    tree = as_tree_guard(taxonomy)
    if tree is not None:
        if len(tree) != n:
            raise ValueError(f"taxonomy has {len(tree)} codes but the index has {n} rows; expected the same id space")
        fingerprint = tree.taxonomy.fingerprint
        if index.codes_fingerprint is not None and index.codes_fingerprint != fingerprint:
            raise ValueError(f"taxonomy fingerprint {fingerprint} differs from the index's {index.codes_fingerprint}")
    check_order_filter(order_filter, positives, tree, "taxonomy=")
    if candidates is not None and exclude is not None:
        exclude = exclude_mask(candidates, exclude)
    return _Request(index, anchors, candidates, k, positives, exclude, margin, tree, bool(order_filter))


def _positive_scores(request: _Request) -> torch.Tensor:
    """score(anchor, positive) per row; NaN where there is no positive (margin off for that row)."""
    positives = request.positives
    scores = request.index.pair_scores(request.anchors, positives.clamp(min=0).unsqueeze(1))[:, 0]
    return scores.masked_fill(positives.to(scores.device) < 0, float("nan"))


def _mine_pool(request: _Request,
               candidates: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], GuardStats, torch.Tensor]:
    """Guard + margin + stable top-k over a candidate pool; also survivors per row."""
    index = request.index
    candidates = candidates.masked_fill(duplicate_mask(candidates), -1)
    exclude = request.exclude
    if exclude is not None and not isinstance(exclude, torch.Tensor):
        exclude = exclude_mask(candidates, exclude)
    keep, stats = guard_tensors(request.anchors, candidates, request.positives, tree=request.tree,
                                order_filter=request.order_filter, exclude=exclude)
    scores = index.pair_scores(request.anchors, candidates)
    keep = keep.to(scores.device)
    if request.margin is not None:
        within = margin_tensors(scores, _positive_scores(request), request.margin, index.metric)
        stats.removed_margin = int((keep & ~within).sum())
        keep = keep & within
        stats.kept = int(keep.sum())
    top = select_topk(scores, candidates, keep, request.k, index.metric)
    return top, stats, keep.sum(dim=1)


def _initial_depth(request: _Request) -> int:
    """k plus the most rows one anchor can lose to self, positive, relatives and exclude."""
    slack = 2
    if request.tree is not None and request.anchors.numel():
        slack += int(request.tree.related_bound(request.anchors.cpu().numpy()).max())
    if request.exclude is not None:
        slack += max((len(list(e)) for e in request.exclude if e is not None), default=0)
    return min(request.index.ntotal, request.k + slack)


def _mine_global(request: _Request) -> tuple[torch.Tensor, torch.Tensor, GuardStats]:
    """Search, guard, and deepen the search for anchors with fewer than k survivors."""
    index, k = request.index, request.k
    b, device = request.anchors.shape[0], request.anchors.device
    out_scores = torch.full((b, k), worst_score(index.metric), dtype=torch.float32, device=device)
    out_ids = torch.full((b, k), -1, dtype=torch.int64, device=device)
    stats = GuardStats()

    def search_round(rows: torch.Tensor, depth: int, last: bool) -> torch.Tensor:
        nonlocal stats
        current = request.subset(rows) if len(rows) < b else request
        _, neighbours = index.search_ids(current.anchors.cpu().numpy(), depth)
        neighbours = torch.from_numpy(neighbours).to(device)
        (scores, ids), round_stats, survivors = _mine_pool(current, neighbours)
        done = (survivors >= k) | last
        out_scores[rows[done]] = scores[done]
        out_ids[rows[done]] = ids[done]
        if bool(done.all()):
            stats = stats + round_stats
        elif bool(done.any()):
            done_rows = torch.nonzero(done).squeeze(1)
            stats = stats + _mine_pool(current.subset(done_rows), neighbours[done_rows])[1]
        return done

    search_deeper(torch.arange(b, device=device), _initial_depth(request), index.ntotal, search_round)
    return out_scores, out_ids, stats
