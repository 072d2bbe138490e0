"""Batch layout: token tensors with explicit masks, dense ids with -1 padding."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from naics_hnm.token_cache import TokenCache


def _pad_rows(rows: Sequence[np.ndarray]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _compact(ids: torch.Tensor) -> torch.Tensor:
    """Move valid ids (>= 0) to the front of each row, keeping their order; pad with -1."""
    valid = ids >= 0
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return torch.where(torch.gather(valid, 1, order), torch.gather(ids, 1, order), torch.full_like(ids, -1))


def collate_fn(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate dataset items into the training batch; ``None`` items are dropped.

    Returns ``anchor``/``positive`` token dicts [B, L], ``negatives`` token dict [B, K, L] with
    ``negative_mask`` [B, K] (False = padding), and ``anchor_idx`` [B], ``positive_idx`` [B],
    ``negative_idx`` [B, K], ``candidate_idx`` [B, C] (int64, -1 pad), plus the code strings.
    The input items are not modified.
    """
    items = [item for item in batch if item is not None]
    if not items:
        raise ValueError(f"collate_fn got an empty batch ({len(batch)} items, all None or none at all)")
    tokens = items[0]["tokens"]
    if not isinstance(tokens, TokenCache) or any(item["tokens"] is not tokens for item in items):
        raise ValueError("collate_fn: every item must reference the same TokenCache under 'tokens'")
    anchor_idx = torch.tensor([item["anchor_idx"] for item in items], dtype=torch.long)
    positive_idx = torch.tensor([item["positive_idx"] for item in items], dtype=torch.long)
    negative_idx = _compact(_pad_rows([np.asarray(item["negative_idx"]) for item in items]))
    candidate_idx = _compact(_pad_rows([np.asarray(item["candidate_idx"]) for item in items]))
    negative_mask = negative_idx >= 0
    everything = torch.cat([anchor_idx, positive_idx, negative_idx[negative_mask]])
    width = max(int(tokens.lengths[everything].max()), 1)
    return {
        "anchor": tokens.gather(anchor_idx, width),
        "positive": tokens.gather(positive_idx, width),
        "negatives": tokens.gather(negative_idx, width),
        "negative_mask": negative_mask,
        "anchor_idx": anchor_idx,
        "positive_idx": positive_idx,
        "negative_idx": negative_idx,
        "candidate_idx": candidate_idx,
        "anchor_code": [item["anchor_code"] for item in items],
        "positive_code": [item["positive_code"] for item in items],
    }
