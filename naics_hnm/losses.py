"""Contrastive losses over (anchor, positive, masked negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             negative_mask: torch.Tensor | None = None, temperature: float = 0.05,
             in_batch: bool = False) -> torch.Tensor:
    """InfoNCE with the positive at column 0.

    anchor, positive: [B, d] unit vectors; negatives: [B, K, d]; negative_mask: bool [B, K]
    (False = padding, excluded from the softmax). With ``in_batch`` the other rows' positives are
    extra negatives, except where they equal this row's positive.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0")
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", anchor, negatives)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = [pos, neg]
    if in_batch:
        cross = anchor @ positive.T
        same = (positive @ positive.T) > 1 - 1e-6
        logits.append(cross.masked_fill(same, float("-inf")))
    logits_t = torch.cat(logits, dim=1) / temperature
    target = torch.zeros(len(anchor), dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits_t, target)
