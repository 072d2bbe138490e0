"""Sharded nearest-neighbour search under DDP: each rank indexes only its slice of the codes.

The ranks' per-shard top-k lists are all-gathered and merged (ties by lower id), so the result equals one process
searching everything (exactly, for flat shards). Every rank must call the search with the same queries in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import select_topk_np, worst_score

AllGather = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: ``all_gather(array) -> [world_size, *array.shape]``."""
    rank: int
    world_size: int
    all_gather: AllGather

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"Shard(world_size={self.world_size!r}): expected an int >= 1")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ValueError(f"Shard(rank={self.rank!r}): expected an int in [0, {self.world_size})")

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's slice ``[lo, hi)`` of ``n`` rows."""
        size = -(-n // self.world_size)
        return min(n, self.rank * size), min(n, (self.rank + 1) * size)


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard lists [W, Q, k'] into the global top-k [Q, k] (-1 ids last, ties by lower id)."""
    w, q, kk = scores.shape
    scores = scores.transpose(1, 0, 2).reshape(q, w * kk)
    ids = ids.transpose(1, 0, 2).reshape(q, w * kk)
    return select_topk_np(scores, ids, ids >= 0, k, metric, ties="id")


def sharded_search(vectors: np.ndarray, shard: Shard, *, metric: str, device: str = "auto",
                   index_factory: str | None = None,
                   search_params: dict | None = None) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """A ``search(query_ids, k) -> (scores, ids)`` over all rows of ``vectors`` (normalised for cosine) that
    indexes only this rank's shard."""
    n = len(vectors)
    lo, hi = shard.rows(n)
    local = None
    if hi > lo:
        options = {"search_params": search_params} if search_params else {}
        local = EmbeddingIndex.build(vectors[lo:hi], metric="ip" if metric == "cosine" else metric, device=device,
                                     index_factory=index_factory, **options)

    def search(query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, n)
        if local is None:
            scores = np.full((len(query_ids), k), worst_score(metric), dtype=np.float32)
            ids = np.full((len(query_ids), k), -1, dtype=np.int64)
        else:
            scores, ids = local.search(vectors[query_ids], k)
            ids = np.where(ids >= 0, ids + lo, -1)
        return merge_topk(shard.all_gather(np.ascontiguousarray(scores, dtype=np.float32)),
                          shard.all_gather(np.ascontiguousarray(ids, dtype=np.int64)), k, metric)

    return search
