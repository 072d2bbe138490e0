"""Mining over several processes (``torchrun --nproc-per-node N -m naics_hnm.mine ...``): each rank embeds,
indexes and scores its slice; every rank runs the same search loop, so collectives line up and all hold the result."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import numpy as np
import torch

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.knn import normalise_rows
from naics_hnm.index.sharded_search import Shard, merge_topk

logger = logging.getLogger(__name__)
_started_group = False  # whether process_group_shard initialised the default process group


def process_group_shard() -> Shard | None:
    """A :class:`Shard` of the torchrun process group (gloo on CPU, nccl on GPU); None unless ``WORLD_SIZE`` > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist
    if not dist.is_initialized():
        global _started_group
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        _started_group = True
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dist.get_backend() == "nccl" else None

    def all_gather(array: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if device is not None:
            tensor = tensor.to(device)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return torch.stack(out).cpu().numpy()

    shard = Shard(dist.get_rank(), dist.get_world_size(), all_gather)
    logger.info("mining as rank %d of %d (%s)", shard.rank, shard.world_size, dist.get_backend())
    return shard


def leave_process_group(*, finished: bool = False) -> None:
    """Destroy the process group if :func:`process_group_shard` started it; ``finished=True`` (every rank got
    through its work) first waits at a barrier, so that no rank closes its connections while a peer still sends."""
    global _started_group
    if _started_group:
        import torch.distributed as dist
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        _started_group = False


def embed_sharded(shard: Shard, texts: list[str], embed: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``embed(texts)`` with each rank embedding its contiguous slice; every rank gets all rows."""
    lo, hi = shard.rows(len(texts))
    local = embed(texts[lo:hi] if hi > lo else texts[:1])  # an empty slice embeds one text for the width
    padded = np.zeros((-(-len(texts) // shard.world_size), local.shape[1]), dtype=np.float32)
    padded[: hi - lo] = local[: hi - lo]
    gathered = shard.all_gather(padded)
    slices = [Shard(r, shard.world_size, shard.all_gather).rows(len(texts)) for r in range(shard.world_size)]
    return np.ascontiguousarray(np.concatenate([gathered[r, : b - a] for r, (a, b) in enumerate(slices)]),
                                dtype=np.float32)


def gather_scores(shard: Shard, n: int, score: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """float32 [n]: ``score(positions)`` of items ``0..n-1``, rank r taking positions r, r + W, ... (interleaved)."""
    mine = np.arange(shard.rank, n, shard.world_size)
    padded = np.zeros(-(-n // shard.world_size), dtype=np.float32)
    padded[: mine.size] = score(mine) if mine.size else padded[:0]
    # gathered[r, j] is the score of position r + j * W: read column by column
    return np.ascontiguousarray(shard.all_gather(padded).T.reshape(-1)[:n], dtype=np.float32)


class ShardedIndex:
    """The part of :class:`EmbeddingIndex` the negative search uses, over a corpus sharded by rank: ``vectors``
    holds every row (unit norm), this rank's index rows ``shard.rows(N)``; ``search`` is a collective."""

    def __init__(self, vectors: np.ndarray, shard: Shard, *, device: str = "auto", index_factory: str | None = None,
                 search_params: dict | None = None, seed: int = 0) -> None:
        self.vectors = torch.from_numpy(normalise_rows(np.asarray(vectors, dtype=np.float32), "embeddings"))
        self.shard, self.ntotal, self.device = shard, int(vectors.shape[0]), "cpu"
        self.index_type = f"{index_factory or 'Flat'} sharded x{shard.world_size}"  # not "Flat": faiss search path
        self.lo, self.hi = shard.rows(self.ntotal)
        self.local = None if self.hi <= self.lo else EmbeddingIndex.build(
            self.vectors[self.lo : self.hi].numpy(), metric="cosine", device=device, index_factory=index_factory,
            search_params=search_params, seed=seed)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.ntotal)
        if self.local is None:
            scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
            ids = np.full((len(queries), k), -1, dtype=np.int64)
        else:
            scores, ids = self.local.search(np.asarray(queries, dtype=np.float32), k)
            scores, ids = np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            ids = np.where(ids >= 0, ids + self.lo, -1)
        return merge_topk(self.shard.all_gather(np.ascontiguousarray(scores)),
                          self.shard.all_gather(np.ascontiguousarray(ids)), k, "cosine")


def build_index(vectors: np.ndarray, shard: Shard | None, **options: Any) -> Any:
    """An :class:`EmbeddingIndex` (one process) or a :class:`ShardedIndex` (a process group)."""
    if shard is None or shard.world_size == 1:
        return EmbeddingIndex.build(vectors, metric="cosine", **options)
    return ShardedIndex(vectors, shard, **options)
