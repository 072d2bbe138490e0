"""Contrastive losses over (anchor, positive, masked negatives)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             negative_mask: torch.Tensor | None = None, temperature: float = 0.05,
             extra_logits: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with the positive at column 0.

    anchor, positive: [B, d] unit vectors; negatives: [B, K, d]; negative_mask: bool [B, K] (False =
    padding); ``extra_logits`` [B, U]: similarities of further negatives, -inf where excluded.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0")
    pos = (anchor * positive).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", anchor, negatives)
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([pos, neg] if extra_logits is None else [pos, neg, extra_logits], dim=1) / temperature
    target = torch.zeros(len(anchor), dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def tree_listwise(anchor: torch.Tensor, codes: torch.Tensor, lca_depth: torch.Tensor, same: torch.Tensor,
                  temperature: float = 0.05, sharpness: float = 1.0) -> torch.Tensor:
    """Listwise loss (ListNet) that ranks every batch code by its tree nearness to each anchor.

    anchor: [B, d] and codes: [U, d] unit vectors; lca_depth: [B, U] depth of each pair's lowest common
    ancestor (0 = only the root); same: bool [B, U], True where the code is the anchor (left out). The loss is
    the cross entropy of ``softmax(sharpness * lca_depth)`` and ``softmax(similarity / temperature)``.
    """
    if temperature <= 0 or sharpness <= 0:
        raise ValueError(f"temperature={temperature!r}, sharpness={sharpness!r}: expected both > 0")
    logits = (anchor @ codes.T / temperature).masked_fill(same, float("-inf"))
    target = torch.softmax((sharpness * lca_depth.to(logits.dtype)).masked_fill(same, float("-inf")), dim=1)
    log_p = torch.log_softmax(logits, dim=1).masked_fill(same, 0.0)
    return -(target * log_p).sum(1).mean()
