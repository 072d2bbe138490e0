"""k-nearest-neighbour search over arrays in bounded memory; every function returns ``(scores, ids)``.

Missing neighbours are id ``-1`` with :func:`naics_hnm.index.ids.worst_score`. Nothing here depends on faiss."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from naics_hnm.index.ids import select_topk_np, worst_score
from naics_hnm.index.metric import get_metric

MAX_PADDED_BYTES = 1 << 30

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def search_in_batches(search: SearchFn, source: np.ndarray, rows: np.ndarray | None, k: int, ntotal: int,
                      metric: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run ``search(q, min(k, ntotal))`` over the queries ``source`` (or ``source[rows]``) ``batch_size`` at a time,
    into preallocated [Q, k] outputs; ValueError when ``k > ntotal`` and that padding would exceed 1 GiB."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1 or None")
    nq = source.shape[0] if rows is None else rows.shape[0]
    if k > ntotal and nq * k * 12 > MAX_PADDED_BYTES:
        raise ValueError(f"k={k} exceeds the index size N={ntotal} and padding {nq} queries to k would take "
                         f"{nq * k * 12 / 2**30:.1f} GiB; expected k <= {ntotal}")
    k_eff = min(k, ntotal)
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    scores[:, k_eff:] = worst_score(metric)
    ids[:, k_eff:] = -1
    for start in range(0, nq, int(batch_size)):
        stop = min(nq, start + int(batch_size))
        q = source[start:stop] if rows is None else source[rows[start:stop]]
        scores[start:stop, :k_eff], ids[start:stop, :k_eff] = search(q, k_eff)
    return scores, ids


def rescore_topk(vectors: np.ndarray, sq_norms: np.ndarray | None, metric: str, queries: np.ndarray,
                 candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query's candidate ids (int64 [Q, C], -1 = none) from ``vectors`` (``sq_norms`` for l2),
    best first, ties keeping the earlier column."""
    safe = np.maximum(candidates, 0)
    scores = np.matmul(vectors[safe], queries[:, :, None])[:, :, 0]
    if get_metric(metric).is_distance:
        scores = sq_norms[safe] + np.einsum("qd,qd->q", queries, queries)[:, None] - 2 * scores
        np.maximum(scores, 0, out=scores)
    return select_topk_np(scores, candidates, candidates >= 0, k, metric)


def torch_knn(vectors: torch.Tensor, sq_norms: torch.Tensor | None, metric: str, queries: np.ndarray, k: int,
              chunk_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (k <= N) by matmul + topk on the vectors' device, ``chunk_bytes`` of scores at a time."""
    chunk = max(1, chunk_bytes // (4 * vectors.shape[0]))
    out_scores, out_ids = [], []
    with torch.no_grad():
        for start in range(0, queries.shape[0], chunk):
            q = torch.from_numpy(queries[start : start + chunk]).to(vectors.device)
            scores = q @ vectors.T
            if get_metric(metric).is_distance:
                scores = (sq_norms.unsqueeze(0) + (q * q).sum(1, keepdim=True) - 2 * scores).clamp_min_(0)
            s, i = torch.topk(scores, k, dim=1, largest=get_metric(metric).higher_is_better)
            out_scores.append(s.cpu())
            out_ids.append(i.cpu())
    return torch.cat(out_scores).numpy(), torch.cat(out_ids).numpy()


def as_float_matrix(x: Any, name: str, copy: bool = False) -> np.ndarray:
    """A finite float32 C-contiguous [n, d] array of ``x``, a fresh copy if ``copy`` (else possibly a view)."""
    fresh = False
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        x, fresh = x.detach().to(device="cpu", dtype=torch.float32, copy=copy).numpy(), copy
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D [n >= 1, d >= 1], got shape {x.shape}")
    x = (np.array(x, dtype=np.float32, order="C", copy=True) if copy and not fresh
         else np.ascontiguousarray(x, dtype=np.float32))
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} row {rows[0]} holds NaN or inf ({rows.size} such rows); expected finite values")
    return x


def normalise_rows(x: np.ndarray, name: str) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (by their largest absolute entry first), as a new float32 array."""
    scale = np.maximum(x.max(axis=1), -x.min(axis=1))[:, None]
    zero = np.flatnonzero(scale[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} row {zero[0]} is all zeros ({zero.size} such rows); cosine needs non-zero vectors")
    out = x / scale
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out
