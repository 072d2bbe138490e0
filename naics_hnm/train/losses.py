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


def tree_listwise(similarity: torch.Tensor, lca_depth: torch.Tensor, same: torch.Tensor, temperature: float = 0.05,
                  sharpness: float = 1.0) -> torch.Tensor:
    """Listwise loss (ListNet) that ranks every batch code by its tree nearness to each anchor.

    similarity: [B, U] cosine of each anchor with each distinct batch code; lca_depth: [B, U] depth of each pair's
    lowest common ancestor (0 = only the root); same: bool [B, U], True where the code is the anchor (left out).
    The loss is the cross entropy of ``softmax(sharpness * lca_depth)`` and ``softmax(similarity / temperature)``.
    """
    if temperature <= 0 or sharpness <= 0:
        raise ValueError(f"temperature={temperature!r}, sharpness={sharpness!r}: expected both > 0")
    logits = (similarity / temperature).masked_fill(same, float("-inf"))
    target = torch.softmax((sharpness * lca_depth.to(logits.dtype)).masked_fill(same, float("-inf")), dim=1)
    log_p = torch.log_softmax(logits, dim=1).masked_fill(same, 0.0)
    return -(target * log_p).sum(1).mean()


def tree_rings(similarity: torch.Tensor, lca_depth: torch.Tensor, same: torch.Tensor,
               temperature: float = 0.1) -> torch.Tensor:
    """Ring contrast: at each tree level, the anchor's ring (codes whose lowest common ancestor with it lies at
    exactly that depth) against every code further out, with the ring's codes made equally near.

    For anchor ``a`` and depth ``t >= 1`` where the ring ``R = {j: lca(a, j) = t}`` and the codes outside it
    (``lca < t``) are both present in the batch, the term is SupCon's ``L_out`` over that level:
    ``-mean_{j in R} log(exp(s_j / T) / sum_{i: lca <= t} exp(s_i / T))``; the loss is the mean over all such
    (anchor, level) terms. Every level counts once per anchor, however few of its codes the batch holds, so the
    far levels (another body system against the own one) get a gradient of their own; and as each ring code's own
    log-probability counts, the term is lowest when a ring's similarities are equal, which is what a correlation of
    similarity with tree distance asks for. Arguments as :func:`tree_listwise`.

    One pass over the [B, U] similarities: per-level sums by ``scatter_add``, the normaliser of every level at once
    as a ``logcumsumexp`` over the levels' log-sum-exps (each shifted by its own maximum, so no level underflows).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0")
    logits = similarity / temperature
    levels = int(lca_depth.max()) + 1 if lca_depth.numel() else 1
    bucket = lca_depth.long().masked_fill(same, levels)  # the anchor itself goes to a bucket that is never read
    shape = (len(logits), levels + 1)
    count = logits.new_zeros(shape).scatter_add_(1, bucket, torch.ones_like(logits))
    ring_sum = logits.new_zeros(shape).scatter_add_(1, bucket, logits)
    top = logits.detach().new_full(shape, float("-inf")).scatter_reduce_(1, bucket, logits.detach(), reduce="amax")
    top = top.masked_fill(count == 0, 0.0)
    level_sum = logits.new_zeros(shape).scatter_add_(1, bucket, torch.exp(logits - top.gather(1, bucket)))
    level_lse = (top + torch.log(level_sum))[:, :levels]  # -inf for empty levels
    log_norm = torch.logcumsumexp(level_lse, dim=1)
    count = count[:, :levels]
    valid = (count > 0) & (torch.cumsum(count, dim=1) - count > 0)  # a ring, and something further out (never at 0)
    if not bool(valid.any()):
        return similarity.sum() * 0.0  # nothing to contrast; keeps the graph connected
    terms = log_norm - ring_sum[:, :levels] / count.clamp(min=1)
    return terms[valid].mean()
