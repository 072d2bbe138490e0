"""Contrastive losses over (anchor, positive, masked negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             negative_mask: torch.Tensor | None = None, temperature: float = 0.05,
             extra_logits: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with the positive at column 0.

    anchor, positive: [B, d] unit vectors; negatives: [B, K, d]; negative_mask: bool [B, K]
    (False = padding, excluded from the softmax). ``extra_logits`` [B, U] are similarities of
    further negatives (for example guarded in-batch codes), -inf where excluded.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0")
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", anchor, negatives)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = [pos, neg]
    if extra_logits is not None:
        logits.append(extra_logits)
    logits_t = torch.cat(logits, dim=1) / temperature
    target = torch.zeros(len(anchor), dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits_t, target)
