"""Id and top-k helpers over arrays: validation of id arguments and stable masked top-k.

Ids address rows ``0..N-1`` of an index; ``-1`` is padding, with the score :func:`worst_score`."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from naics_hnm.index.metric import get_metric

DEVICES = ("auto", "cpu", "cuda")  # where an index lives: auto takes a faiss GPU when there is one


def worst_score(metric: str) -> float:
    """The padding score: ``-inf`` for similarities, ``+inf`` for l2 distances."""
    return get_metric(metric).worst


def check_k(k: Any) -> int:
    """``k`` as an int, or ValueError naming it unless it is an integer >= 1 (bools refused)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: expected an integer >= 1")
    return int(k)


def as_id_tensor(ids: Any, name: str, device: torch.device | str, ndim: int) -> torch.Tensor:
    """Integer ids (numpy, torch or a nested list) as an ``ndim``-D int64 tensor on ``device``; TypeError for
    floating, complex and bool inputs, ValueError for a wrong rank."""
    if not isinstance(ids, torch.Tensor):
        ids = np.asarray(ids)
        if ids.size == 0 and ids.dtype == np.float64:  # np.asarray([]) is float64
            ids = ids.astype(np.int64)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    elif ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64)


def check_id_range(ids: torch.Tensor, name: str, n: int, allow_padding: bool) -> None:
    """Raise ValueError naming the first id outside ``[-1, n)`` (or ``[0, n)`` without padding)."""
    low = -1 if allow_padding else 0
    bad = (ids < low) | (ids >= n)
    if bool(bad.any()):
        raise ValueError(f"{name} holds id {int(ids[bad][0])}, expected ids in [{low}, {n})")


def check_ids(anchor_ids: Any, candidate_ids: Any, positive_ids: Any, device: Any,
              n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """int64 tensors on ``device``: anchors [B] in ``[0, n)``, candidates [B, C] and positives [B] (each
    optional) in ``[-1, n)``; TypeError / ValueError naming the argument."""
    anchors = as_id_tensor(anchor_ids, "anchor_ids", device, 1)
    check_id_range(anchors, "anchor_ids", n, allow_padding=False)
    b, candidates, positives = anchors.shape[0], None, None
    if candidate_ids is not None:
        candidates = as_id_tensor(candidate_ids, "candidate_ids", device, 2)
        if candidates.shape[0] != b:
            raise ValueError(f"candidate_ids has {candidates.shape[0]} rows but anchor_ids has {b}; "
                             "expected [B, C] and [B]")
        check_id_range(candidates, "candidate_ids", n, allow_padding=True)
    if positive_ids is not None:
        positives = as_id_tensor(positive_ids, "positive_ids", device, 1)
        if positives.shape != anchors.shape:
            raise ValueError(f"positive_ids has shape {tuple(positives.shape)}, expected [B] = [{b}]")
        check_id_range(positives, "positive_ids", n, allow_padding=True)
    return anchors, candidates, positives


def pad_ids(rows: Sequence[Any], fill: int = -1, min_width: int = 0) -> np.ndarray:
    """int64 [len(rows), width]: id rows of any lengths, left-aligned and ``fill`` padded (width >= ``min_width``)."""
    width = max(max((len(r) for r in rows), default=0), min_width)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def like_input(template: Any, *arrays: torch.Tensor) -> tuple:
    """The tensors as numpy when ``template`` is not a tensor, else on the template's device."""
    if isinstance(template, torch.Tensor):
        return tuple(a.to(template.device) for a in arrays)
    return tuple(a.cpu().numpy() for a in arrays)


def duplicate_mask(ids: torch.Tensor) -> torch.Tensor:
    """bool [B, C]: True at every repeat of an id already seen earlier in its row."""
    if ids.shape[1] < 2:
        return torch.zeros_like(ids, dtype=torch.bool)
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.zeros_like(repeat).scatter_(1, order, repeat)


def select_topk(scores: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, k: int, metric: str, *,
                ties: str = "column") -> tuple[torch.Tensor, torch.Tensor]:
    """Stable top-k ``(scores [B, k], ids [B, k])`` among ``keep`` entries, best first; ties keep the earlier
    column (``ties="column"``) or the lower id (``ties="id"``); short rows are padded with id -1."""
    worst = worst_score(metric)
    masked = scores.masked_fill(~keep, worst)
    by_id = None
    if ties == "id":  # a stable sort by id first, so the stable sort by score breaks ties by id
        by_id = torch.sort(ids.masked_fill(~keep, torch.iinfo(ids.dtype).max), dim=1, stable=True).indices
        masked, ids, keep = masked.gather(1, by_id), ids.gather(1, by_id), keep.gather(1, by_id)
    order = torch.sort(masked, dim=1, descending=get_metric(metric).higher_is_better, stable=True).indices[:, :k]
    top_scores = masked.gather(1, order)
    top_ids = ids.gather(1, order).masked_fill(~keep.gather(1, order), -1)
    top_scores = top_scores.masked_fill(top_ids < 0, worst)
    if top_ids.shape[1] < k:
        pad = k - top_ids.shape[1]
        top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=worst)
        top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
    return top_scores, top_ids


def select_topk_np(scores: np.ndarray, ids: np.ndarray, keep: np.ndarray, k: int, metric: str, *,
                   ties: str = "column") -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_topk` for numpy arrays (run by torch on the CPU, without copies in)."""
    top_scores, top_ids = select_topk(torch.from_numpy(np.ascontiguousarray(scores)),
                                      torch.from_numpy(np.ascontiguousarray(ids)),
                                      torch.from_numpy(np.ascontiguousarray(keep)), k, metric, ties=ties)
    return top_scores.numpy(), top_ids.numpy()


def search_deeper(rows: Any, depth: int, limit: int, search_round: Callable[[Any, int, bool], Any], *,
                  factor: int = 2) -> None:
    """The one "search deeper until k survive" loop: ``search_round(rows, depth, last)`` returns a bool mask of
    the rows it settled (all when ``last``); the others go ``factor`` times deeper, up to ``limit``."""
    while len(rows):
        done = search_round(rows, depth, depth >= limit)
        rows = rows[~done]
        depth = min(limit, depth * factor)
