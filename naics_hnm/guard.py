"""False-negative guard and positive-aware margin over batches of (anchor, candidate) ids.

All masks are vectorised over ``[B, C]`` candidate arrays (numpy, or torch on any device) and
returned in the kind of ``candidate_ids``. ``True`` in a mask means *keep*.

Rules, in the order used to attribute each removed candidate in :class:`GuardStats`:
padding (``-1``, never counted), the anchor itself, the positive, taxonomy relatives
(``related[a, c]``), the order filter (``lca_depth[a, c] >= lca_depth[a, p]``), ``exclude``; the
margin (:func:`margin_mask`) is applied afterwards by the miner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from naics_hnm.embedding_index import METRICS, as_id_tensor, check_id_range, like_input


@dataclass
class GuardStats:
    """Counts of candidates (valid, non-padding) and why they were removed."""

    candidates: int = 0
    removed_self: int = 0
    removed_positive: int = 0
    removed_related: int = 0
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
        return {
            name: (value / total if total else 0.0)
            for name, value in asdict(self).items()
            if name != "candidates"
        }


def as_relation_matrix(matrix: Any, name: str, n: int | None = None) -> torch.Tensor:
    """A square [N, N] relation matrix as a tensor (zero-copy for numpy)."""
    if not isinstance(matrix, torch.Tensor):
        matrix = torch.from_numpy(np.asarray(matrix))
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] matrix, got shape {tuple(matrix.shape)}")
    if n is not None and matrix.shape[0] != n:
        raise ValueError(f"{name} is {tuple(matrix.shape)}, expected [{n}, {n}] (one row per id)")
    return matrix


def _lookup(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``matrix[rows, cols]`` gathered where the matrix lives; the small result moves to the ids."""
    out = matrix[rows.to(matrix.device), cols.to(matrix.device)]
    return out.to(cols.device)


def is_bool_mask(x: Any) -> bool:
    """Whether ``x`` is a numpy or torch bool array."""
    if isinstance(x, np.ndarray):
        return x.dtype == np.bool_
    return isinstance(x, torch.Tensor) and x.dtype == torch.bool


def exclude_mask(candidates: torch.Tensor, exclude: Any) -> torch.Tensor:
    """bool [B, C]: True where a candidate is in its row's exclude collection.

    ``exclude`` is a bool mask [B, C] (numpy or torch) or a length-B sequence of id collections
    (``None`` entries allowed).
    """
    b, c = candidates.shape
    if is_bool_mask(exclude):
        if tuple(exclude.shape) != (b, c):
            raise ValueError(f"exclude mask has shape {tuple(exclude.shape)}, expected [B, C] = {(b, c)}")
        mask = exclude if isinstance(exclude, torch.Tensor) else torch.from_numpy(np.asarray(exclude))
        return mask.to(candidates.device)
    if isinstance(exclude, (str, bytes)) or not hasattr(exclude, "__len__"):
        raise TypeError(
            f"exclude must be a bool mask [B, C] or a list of B id collections, got {type(exclude).__name__}"
        )
    if len(exclude) != b:
        raise ValueError(f"exclude has {len(exclude)} entries, expected one id collection per anchor (B={b})")
    rows = []
    for i, ids in enumerate(exclude):
        if ids is None:
            rows.append(np.empty(0, dtype=np.int64))
            continue
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(list(ids) if isinstance(ids, (set, frozenset)) else ids).reshape(-1)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"exclude[{i}] must hold integer ids, got dtype {arr.dtype}")
        rows.append(arr.astype(np.int64))
    width = max((r.size for r in rows), default=0)
    if width == 0 or c == 0:
        return torch.zeros((b, c), dtype=torch.bool, device=candidates.device)
    padded = np.full((b, width), -2, dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, : r.size] = r
    table = torch.from_numpy(padded).to(candidates.device)
    return (candidates.unsqueeze(2) == table.unsqueeze(1)).any(dim=2)


def guard_mask(
    anchor_ids: Any,
    candidate_ids: Any,
    *,
    positive_ids: Any = None,
    related: Any = None,
    lca_depth: Any = None,
    order_filter: bool = False,
    exclude: Any = None,
) -> tuple[Any, GuardStats]:
    """``(keep [B, C], stats)``: drop padding, the anchor, its positive, relatives, order, exclude.

    ``positive_ids`` may hold ``-1`` (no positive: neither the positive rule nor the order filter
    applies to that row). ``related`` (bool [N, N]) and ``lca_depth`` (int [N, N]) may be numpy or
    torch; lookups run where the matrix lives and only the [B, C] result moves.
    """
    device = candidate_ids.device if isinstance(candidate_ids, torch.Tensor) else "cpu"
    keep, stats = guard_tensors(
        as_id_tensor(anchor_ids, "anchor_ids", device, 1),
        as_id_tensor(candidate_ids, "candidate_ids", device, 2),
        positives=None if positive_ids is None else as_id_tensor(positive_ids, "positive_ids", device, 1),
        related=related, lca_depth=lca_depth, order_filter=order_filter, exclude=exclude,
    )
    return like_input(candidate_ids, keep)[0], stats


def guard_tensors(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    *,
    positives: torch.Tensor | None = None,
    related: Any = None,
    lca_depth: Any = None,
    order_filter: bool = False,
    exclude: Any = None,
) -> tuple[torch.Tensor, GuardStats]:
    """:func:`guard_mask` on int64 tensors that share a device; returns a bool tensor there."""
    b = anchors.shape[0]
    if candidates.shape[0] != b:
        raise ValueError(f"candidate_ids has {candidates.shape[0]} rows, expected B={b} (one per anchor)")
    if positives is not None and positives.shape != anchors.shape:
        raise ValueError(f"positive_ids has shape {tuple(positives.shape)}, expected [B] = [{b}]")
    if order_filter and (positives is None or lca_depth is None):
        raise ValueError("order_filter=True needs positive_ids and lca_depth (or a taxonomy)")
    related_t = None if related is None else as_relation_matrix(related, "related")
    lca_t = None if lca_depth is None else as_relation_matrix(lca_depth, "lca_depth")
    n = next((m.shape[0] for m in (related_t, lca_t) if m is not None), None)
    if related_t is not None and lca_t is not None and lca_t.shape != related_t.shape:
        raise ValueError(
            f"lca_depth is {tuple(lca_t.shape)} but related is {tuple(related_t.shape)}; expected equal shapes"
        )
    if n is not None:
        check_id_range(anchors, "anchor_ids", n, allow_padding=False)
        check_id_range(candidates, "candidate_ids", n, allow_padding=True)
        if positives is not None:
            check_id_range(positives, "positive_ids", n, allow_padding=True)
    else:
        check_id_range(anchors, "anchor_ids", 2**62, allow_padding=False)
        check_id_range(candidates, "candidate_ids", 2**62, allow_padding=True)

    valid = candidates >= 0
    safe = candidates.clamp(min=0)
    rows = anchors.unsqueeze(1).expand_as(candidates)
    rules: list[tuple[str, torch.Tensor]] = [("removed_self", candidates == rows)]
    if positives is not None:
        rules.append(("removed_positive", (candidates == positives.unsqueeze(1)) & (positives.unsqueeze(1) >= 0)))
    if related_t is not None:
        rules.append(("removed_related", _lookup(related_t, rows, safe).bool()))
    if order_filter:
        has_pos = positives >= 0
        pos_depth = _lookup(lca_t, anchors, positives.clamp(min=0)).to(torch.int64)
        cand_depth = _lookup(lca_t, rows, safe).to(torch.int64)
        rules.append(("removed_order", (cand_depth >= pos_depth.unsqueeze(1)) & has_pos.unsqueeze(1)))
    if exclude is not None:
        rules.append(("removed_exclude", exclude_mask(candidates, exclude)))

    stats = GuardStats(candidates=int(valid.sum()))
    keep = valid
    for name, removed in rules:
        hit = keep & removed
        setattr(stats, name, int(hit.sum()))
        keep = keep & ~removed
    stats.kept = int(keep.sum())
    return keep, stats


def margin_mask(candidate_scores: Any, positive_scores: Any, relative_margin: float, metric: str) -> Any:
    """Positive-aware relative margin (NV-Retriever TopK-PercPos); True = keep.

    Similarities (cosine/ip): keep ``s <= pos - m * |pos|`` (``(1 - m) * pos`` for ``pos >= 0``).
    l2 distances: keep ``d >= pos + m * |pos|``. Rows with a non-finite positive score keep all.
    """
    m = check_margin(relative_margin)
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
    scores, pos = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                   for x in (candidate_scores, positive_scores))
    pos = pos.to(device=scores.device, dtype=scores.dtype)
    if scores.dim() != 2 or pos.shape != scores.shape[:1]:
        raise ValueError(
            f"candidate_scores {tuple(scores.shape)} and positive_scores {tuple(pos.shape)}: expected [B, C] and [B]"
        )
    keep = margin_tensors(scores, pos, m, metric)
    return like_input(candidate_scores, keep)[0]


def margin_tensors(scores: torch.Tensor, pos: torch.Tensor, m: float, metric: str) -> torch.Tensor:
    """:func:`margin_mask` on validated tensors."""
    finite = torch.isfinite(pos).unsqueeze(1)
    safe = torch.where(torch.isfinite(pos), pos, torch.zeros_like(pos)).unsqueeze(1)
    if metric == "l2":
        keep = scores >= safe + m * safe.abs()
    else:
        keep = scores <= safe - m * safe.abs()
    return keep | ~finite


def check_margin(relative_margin: Any) -> float:
    if isinstance(relative_margin, bool) or not isinstance(relative_margin, (int, float, np.floating, np.integer)):
        raise TypeError(f"relative_margin={relative_margin!r}: expected a number in [0, 1)")
    m = float(relative_margin)
    if not 0.0 <= m < 1.0:
        raise ValueError(f"relative_margin={relative_margin!r}: expected a number in [0, 1)")
    return m
