"""List-major search of a CPU IVF-Flat index: the queries that probe an inverted list are scored together by one
matrix product, where faiss scans the probed lists one query at a time.

The result is faiss's search over the same probed lists: exact scores of every code in them, best first, ties
keeping the lower id (:func:`naics_hnm.index.ids.select_topk`). Each query's first probed list sets a bound (its
k-th best score); later lists hand on only the scores that reach the query's bound, into a buffer that is cut back
to k, raising the bound, when it fills. Measured on 1M codes at d = 384 (``benchmarks/bench_ivf_scan.py``):
2.6x faster than faiss's own search for 32,768 queries of depth 57 at nprobe 32; :meth:`ListMajorIVF.pays_off`
says where it is used."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from naics_hnm.index.ids import select_topk
from naics_hnm.index.metric import get_metric

MIN_DIM = 256  # measured: d = 384 2.6x faster than faiss, d = 32 3x slower (faiss's scan is not memory-bound there)
MIN_PAIRS_PER_LIST = 48  # below this many (query, list) pairs per list on average, faiss's own scan is as fast
BUFFER_FACTOR = 4  # each query keeps up to BUFFER_FACTOR * k candidates before it is cut back to k
# Known limit: the scan issues thousands of small torch ops on torch's threads. On a machine whose cores are busy
# with other work they stall (32,768 queries at d = 384, load 4-5 on 2 cores: 78 s on 2 threads against faiss's
# 35 s; the same scan on one thread 15 s). On one thread, quiet, a 1M refresh's lists took 39.3 s against 28.6 s on
# two, so the scan keeps torch's thread count.


class ListMajorIVF:
    """Zero-copy views of an ``IndexIVFFlat``'s inverted lists, searched list by list.

    The views stay valid while the faiss index is alive and unchanged (nothing is added after a build)."""

    def __init__(self, index: faiss.IndexIVFFlat, metric: str) -> None:
        self.index = index
        self.is_distance = get_metric(metric).is_distance
        invlists, d = index.invlists, index.d
        self.vectors: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.half_sq_norms: list[torch.Tensor | None] = []
        for lst in range(index.nlist):
            size = invlists.list_size(lst)
            if size:
                codes = faiss.rev_swig_ptr(invlists.get_codes(lst), size * d * 4).view(np.float32).reshape(size, d)
                ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size).view(np.int64)
            else:
                codes, ids = np.empty((0, d), dtype=np.float32), np.empty(0, dtype=np.int64)
            vectors = torch.from_numpy(codes)
            self.vectors.append(vectors)
            self.ids.append(torch.from_numpy(ids))
            self.half_sq_norms.append(0.5 * (vectors * vectors).sum(1) if self.is_distance else None)

    @classmethod
    def of(cls, index: faiss.Index, metric: str) -> "ListMajorIVF | None":
        """A list-major searcher for a CPU ``IndexIVFFlat`` with array inverted lists; None for any other index."""
        index = faiss.downcast_index(index)
        if type(index) is not faiss.IndexIVFFlat:
            return None
        if not isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.ArrayInvertedLists):
            return None
        return cls(index, metric)

    def pays_off(self, nq: int, k: int) -> bool:
        """Whether scoring list by list beats faiss for ``nq`` queries of depth ``k``: from about 48 (query, list)
        pairs per list, for k up to half a list's average length (measured: k = 57 2.8x, 228 1.1-1.8x, 912 0.5x)
        and from ``MIN_DIM`` dimensions."""
        nlist = int(self.index.nlist)
        pairs = nq * min(int(self.index.nprobe), nlist)
        return (pairs >= MIN_PAIRS_PER_LIST * nlist and 2 * k * nlist <= int(self.index.ntotal)
                and int(self.index.d) >= MIN_DIM)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [Q, k], ids int64 [Q, k])`` over the ``index.nprobe`` lists nearest each query;
        squared distances for l2; -1 pads rows whose probed lists hold fewer than k codes."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = min(int(self.index.nprobe), int(self.index.nlist))
        _, probes = self.index.quantizer.search(queries, nprobe)
        q = torch.from_numpy(queries)
        buffer = _Buffer(len(queries), k)
        self._scan(q, torch.from_numpy(probes[:, 0].copy()), None, buffer)
        if nprobe > 1:
            self._scan(q, torch.from_numpy(probes[:, 1:].reshape(-1)), nprobe - 1, buffer)
        # ranking by q.x - |x|^2 / 2 is ranking by distance; |q|^2 is added back for the l2 scores
        sims, ids = buffer.top(k)
        if not self.is_distance:
            return sims.numpy(), ids.numpy()
        dists = ((q * q).sum(1, keepdim=True) - 2 * sims).clamp_min_(0)
        return dists.masked_fill_(ids < 0, float("inf")).numpy(), ids.numpy()

    def _scan(self, q: torch.Tensor, lists: torch.Tensor, per_query: int | None, buffer: "_Buffer") -> None:
        """Score every (query, list) pair of ``lists`` (flat [Q * per_query], or [Q] when ``per_query`` is None)."""
        lists = lists.clamp_min(0)  # faiss pads with -1 only when nprobe > nlist, which search() rules out
        order = torch.argsort(lists, stable=True)
        counts = torch.bincount(lists, minlength=len(self.vectors)).tolist()
        start = 0
        for lst, count in enumerate(counts):
            if count == 0 or len(self.ids[lst]) == 0:
                start += count
                continue
            rows = order[start:start + count]
            start += count
            if per_query is not None:
                rows = rows // per_query
            sims = q[rows] @ self.vectors[lst].T
            if self.is_distance:
                sims -= self.half_sq_norms[lst]
            buffer.add(rows, sims, self.ids[lst])


class _Buffer:
    """Per query, at most ``BUFFER_FACTOR * k`` candidates, each at or above the query's bound when it was added
    (the bound: a k-th best score seen so far); a cut keeps the k best and raises the bound."""

    def __init__(self, nq: int, k: int) -> None:
        self.k = k
        self.width = BUFFER_FACTOR * k
        self.scores = torch.full((nq, self.width), -torch.inf)
        self.ids = torch.full((nq, self.width), -1, dtype=torch.int64)
        self.fill = torch.zeros(nq, dtype=torch.int64)
        self.bound = torch.full((nq,), -torch.inf)

    def add(self, rows: torch.Tensor, sims: torch.Tensor, list_ids: torch.Tensor) -> None:
        """Hand on each row's scores that reach its bound (``rows`` are distinct within one list)."""
        passing = sims >= self.bound[rows, None]
        count = passing.sum(1)
        over = self.fill[rows] + count > self.width
        if bool(over.any()):
            self._make_room(rows[over], sims[over])
            passing = sims >= self.bound[rows, None]
            count = passing.sum(1)
            tied = self.fill[rows] + count > self.width  # more than 2k codes tied at the bound: keep this list's k
            if bool(tied.any()):
                top, ids = select_topk(sims[tied], list_ids.expand(int(tied.sum()), -1), passing[tied], self.k, "ip",
                                       ties="id")
                self._put(rows[tied], top, ids >= 0, ids)
                rows, sims, passing, count = rows[~tied], sims[~tied], passing[~tied], count[~tied]
        self._put(rows, sims, passing, list_ids, count)

    def _make_room(self, rows: torch.Tensor, sims: torch.Tensor) -> None:
        """Raise the bound of ``rows`` to their k-th best score in this list (when it holds k codes), then cut their
        buffers back to k."""
        if sims.shape[1] >= self.k:
            kth = torch.topk(sims, self.k, dim=1, sorted=False).values.min(1).values
            self.bound[rows] = torch.maximum(self.bound[rows], kth)
        filled = rows[self.fill[rows] > 0]
        if len(filled):
            self._cut(filled)

    def _put(self, rows: torch.Tensor, sims: torch.Tensor, passing: torch.Tensor, list_ids: torch.Tensor,
             count: torch.Tensor | None = None) -> None:
        """Append the ``passing`` entries of each row after its filled columns (``list_ids``: [C] or [R, C])."""
        r, c = passing.nonzero(as_tuple=True)  # row-major order
        if len(r) == 0:
            return
        count = passing.sum(1) if count is None else count
        first = torch.cumsum(count, 0) - count  # where each row's entries start in (r, c)
        cols = self.fill[rows][r] + torch.arange(len(r)) - first[r]
        self.scores[rows[r], cols] = sims[r, c]
        self.ids[rows[r], cols] = list_ids[c] if list_ids.dim() == 1 else list_ids[r, c]
        self.fill[rows] += count

    def _cut(self, rows: torch.Tensor) -> None:
        """Keep the k best of each row (ties: lower id) and raise its bound to its k-th score."""
        keep = self.ids[rows] >= 0
        scores, ids = select_topk(self.scores[rows], self.ids[rows], keep, self.k, "ip", ties="id")
        self.scores[rows] = -torch.inf
        self.ids[rows] = -1
        self.scores[rows, : self.k], self.ids[rows, : self.k] = scores, ids
        self.fill[rows] = (ids >= 0).sum(1)
        full = self.fill[rows] == self.k
        self.bound[rows[full]] = scores[full, -1]

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_topk(self.scores, self.ids, self.ids >= 0, k, "ip", ties="id")
