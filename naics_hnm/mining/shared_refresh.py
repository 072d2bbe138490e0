"""A refresh under DDP whose N-sized state lives in shared read-only files: ~N / world private memory per rank.
Each rank writes its rows of one flat faiss index file (an approximate index is built on rank 0) and the neighbour
lists of its slice of the anchors (slices aligned to ``batch_size``); every rank maps, bit for bit, what one process
would build (:mod:`naics_hnm.index.shared_files`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from naics_hnm.index.auto import build_index, choose_index
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.knn import as_float_matrix, normalise_rows
from naics_hnm.index.metric import get_metric
from naics_hnm.index.shared_files import (broadcast_text, read_mapped_index, write_flat_index_rows,
                                          write_index_together, write_npy_rows)
from naics_hnm.index.sharded_search import Shard
from naics_hnm.mining.neighbours import guarded_neighbours
from naics_hnm.tree.guard import TreeGuard

log = logging.getLogger(__name__)


def aligned_slice(n: int, rank: int, world_size: int, align: int) -> tuple[int, int]:
    """Rank ``rank``'s ``[lo, hi)`` of ``n`` items, slice sizes a multiple of ``align``."""
    size = -(-(-(-n // world_size)) // align) * align
    return min(n, rank * size), min(n, (rank + 1) * size)


@dataclass
class SharedRefresh:
    """One refresh's files in ``folder`` (named by ``name``) and what every rank maps from them."""

    shard: Shard
    folder: Path
    metric: str

    def index(self, rows: np.ndarray, n: int, name: str, *, index_factory: str | None, search_params: dict | None,
              codes: list[str], epoch: int | None) -> EmbeddingIndex:
        """Collective: the index over every rank's ``rows`` (this rank's are ``shard.rows(n)``)."""
        lo, hi = self.shard.rows(n)
        rows = as_float_matrix(rows, "embeddings")
        if len(rows) != hi - lo:
            raise ValueError(f"refresh_local(embeddings of {len(rows)} rows): expected rank {self.shard.rank}'s "
                             f"{hi - lo} rows [{lo}, {hi}) of {n}")
        if get_metric(self.metric).normalise and len(rows):
            rows = normalise_rows(rows, "embeddings")
        path = write_flat_index_rows(self.folder / f"{name}.flat.faiss", self.shard, rows, lo, n, self.metric)
        flat = EmbeddingIndex.from_faiss(read_mapped_index(path), self.metric, codes=codes, epoch=epoch)
        choice = choose_index(n, index_factory)
        if choice.exact:
            return flat
        vectors = flat.vectors.numpy()
        ivf_path = self.folder / f"{name}.{choice.name.replace(',', '_')}.faiss"
        built: dict[str, Any] = {}

        def build() -> Any:  # rank 0 only: the approximate index over the mapped vectors
            index, _ = build_index(vectors, choice, search_params=search_params, metric=self.metric, device="cpu")
            built["params"] = index.search_params
            return index.faiss_index

        write_index_together(ivf_path, self.shard, build)
        params = json.loads(broadcast_text(self.shard, json.dumps(built.get("params", {}))))
        return EmbeddingIndex.from_faiss(read_mapped_index(ivf_path), self.metric, vectors=vectors,
                                         index_type=choice.name, search_params=params, codes=codes, epoch=epoch)

    def neighbours(self, index: EmbeddingIndex, anchors: np.ndarray, m: int, name: str, *, guard: TreeGuard,
                   batch_size: int, max_search: int, progress: bool) -> np.ndarray:
        """Collective: the [N, m] int32 neighbour table (-1 rows for codes not in ``anchors``), mapped read-only."""
        n = index.ntotal
        rank, world = self.shard.rank, self.shard.world_size
        p_lo, p_hi = aligned_slice(len(anchors), rank, world, batch_size)
        # rank r owns the table rows from its first anchor up to the next rank's first anchor
        firsts = [aligned_slice(len(anchors), r, world, batch_size)[0] for r in range(world)]
        starts = [0, *(int(anchors[p]) if p < len(anchors) else n for p in firsts[1:]), n]
        id_lo, id_hi = starts[rank], starts[rank + 1]
        table = np.full((id_hi - id_lo, m), -1, dtype=np.int32)
        if p_hi > p_lo:
            _, ids, _ = guarded_neighbours(index, anchors[p_lo:p_hi], m, guard=guard, batch_size=batch_size,
                                           max_search=max_search, progress=progress)
            table[anchors[p_lo:p_hi] - id_lo] = ids
        return write_npy_rows(self.folder / f"{name}.neighbours.npy", self.shard, table, id_lo, n)

    def remove(self, name: str) -> None:
        """Rank 0 deletes the files of an older refresh (ranks that still map them keep their pages)."""
        if self.shard.rank == 0:
            for path in self.folder.glob(f"{name}.*"):
                path.unlink(missing_ok=True)
