"""Guarded global nearest neighbours of indexed codes: the pool-widening step of Phase 2+."""

from __future__ import annotations

import torch

from naics_hnm.embedding_index import EmbeddingIndex


@torch.no_grad()
def guarded_neighbours(index: EmbeddingIndex, anchor_ids: torch.Tensor, m: int, *,
                       related: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``m`` most similar codes per anchor, never the anchor, a related code or a disallowed one.

    ``related`` is bool [N, N] (anchor, ancestor or descendant); ``allowed`` bool [N]. Returns
    ``(scores, ids)`` [B, m] on the index device, most similar first; -1 / worst score pads rows
    with fewer than ``m`` eligible codes. Scores are similarities (negated squared distance for l2).
    Equal similarities are listed lower id first (which of several codes tied exactly at the m-th
    place is kept is up to ``torch.topk``).
    """
    if not (isinstance(m, int) and m >= 1):
        raise ValueError(f"m={m!r}: expected an int >= 1")
    vectors = index.vectors
    device = vectors.device
    anchor_ids = torch.as_tensor(anchor_ids, dtype=torch.long, device=device)
    n = vectors.shape[0]
    k = min(m, n)
    scores_out = torch.full((len(anchor_ids), m), float("-inf"), device=device)
    ids_out = torch.full((len(anchor_ids), m), -1, dtype=torch.long, device=device)
    norms = (vectors * vectors).sum(1) if index.metric == "l2" else None
    column_ban = None if allowed is None else ~allowed.to(device)[None, :]
    for start in range(0, len(anchor_ids), chunk):
        rows = anchor_ids[start : start + chunk]
        sim = vectors[rows] @ vectors.T
        if norms is not None:
            sim = 2 * sim - norms[rows, None] - norms[None, :]
        banned = related[rows].to(device) if related is not None else torch.zeros_like(sim, dtype=torch.bool)
        if column_ban is not None:
            banned = banned | column_ban
        banned[torch.arange(len(rows), device=device), rows] = True
        sim.masked_fill_(banned, float("-inf"))
        top, order = torch.topk(sim, k, dim=1)
        # deterministic order among equal similarities: lower id first
        order, by_id = torch.sort(order, dim=1)
        top = torch.gather(top, 1, by_id)
        top, by_score = torch.sort(top, dim=1, descending=True, stable=True)
        order = torch.gather(order, 1, by_score)
        ok = torch.isfinite(top)
        scores_out[start : start + len(rows), :k] = top
        ids_out[start : start + len(rows), :k] = torch.where(ok, order, torch.full_like(order, -1))
    return scores_out, ids_out
