"""Batch layout: token tensors with explicit masks, dense ids with -1 padding."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from naics_hnm.data.token_cache import TokenCache, gather_tokens
from naics_hnm.index.ids import pad_ids


def _pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Stack id rows of any lengths, -1 padded, valid ids first (their order kept)."""
    if rows and all(len(r) == len(rows[0]) for r in rows):
        stacked = np.stack(rows).astype(np.int64, copy=False)
        valid = stacked >= 0
        if valid.all():
            return stacked
        order = np.argsort(~valid, axis=1, kind="stable")
        return np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(stacked, order, 1), -1)
    return pad_ids([r[r >= 0] for r in (np.asarray(r, dtype=np.int64) for r in rows)])


def collate_fn(batch: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate dataset items into the training batch; ``None`` items are dropped.

    Returns ``anchor``/``positive`` token dicts [B, L], ``negatives`` [B, K, L] with ``negative_mask`` [B, K], the
    ``*_idx`` id tensors (int64, -1 pad: anchor/positive [B], negative [B, K], candidate [B, C]) and the code strings.
    """
    items = [item for item in batch if item is not None]
    if not items:
        raise ValueError(f"collate_fn got an empty batch ({len(batch)} items, all None or none at all)")
    tokens = items[0]["tokens"]
    if not isinstance(tokens, TokenCache) or any(item["tokens"] is not tokens for item in items):
        raise ValueError("collate_fn: every item must reference the same TokenCache under 'tokens'")
    ids = {key: np.array([item[key] for item in items], dtype=np.int64) for key in ("anchor_idx", "positive_idx")}
    ids.update({key: _pad_rows([item[key] for item in items]) for key in ("negative_idx", "candidate_idx")})
    groups = {"anchor": ids["anchor_idx"], "positive": ids["positive_idx"], "negatives": ids["negative_idx"]}
    return {
        **gather_tokens(tokens, groups),
        "negative_mask": torch.from_numpy(ids["negative_idx"] >= 0),
        **{key: torch.from_numpy(value) for key, value in ids.items()},
        "anchor_code": [item["anchor_code"] for item in items],
        "positive_code": [item["positive_code"] for item in items],
    }
