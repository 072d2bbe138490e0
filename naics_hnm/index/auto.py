"""The mining index chosen from the number of codes, and its recall@64 estimated against exact search.

Exact flat search up to ``EXACT_MAX_CODES``; above, ``IVF{nlist},Flat`` whose ``nprobe`` is calibrated at each
build to reach recall@64 ``CALIBRATION_TARGET`` on sampled rows. An explicit factory or explicit search
parameters always win. The measurements behind the rule: ``docs/index_defaults.md``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from naics_hnm.index.approximate import FAISS_MIN_POINTS_PER_LIST
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.knn import torch_knn
from naics_hnm.index.metric import get_metric

log = logging.getLogger(__name__)

EXACT_MAX_CODES = 20_000  # codes up to which the default index is exact (flat)
RECALL_K = 64
RECALL_SAMPLE = 256
CALIBRATION_TARGET = 0.99
MAX_AUTO_NLIST = 2048


@dataclass(frozen=True)
class IndexChoice:
    """A factory string (None: exact flat) and why it was chosen; ``auto`` when chosen from N."""
    index_factory: str | None
    reason: str
    auto: bool

    @property
    def exact(self) -> bool:
        return self.index_factory in (None, "Flat")

    @property
    def name(self) -> str:
        return self.index_factory or "Flat"


def auto_nlist(n: int) -> int:
    """The power of two nearest ``4 sqrt(n)``, at most ``MAX_AUTO_NLIST`` and ``n / 39``; at least 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: expected the number of codes, an int >= 1")
    target = 2 ** round(math.log2(4 * math.sqrt(n)))
    cap = 2 ** int(math.log2(max(n // FAISS_MIN_POINTS_PER_LIST, 1)))
    return int(max(1, min(MAX_AUTO_NLIST, target, cap)))


def choose_index(n: int, index_factory: str | None = None) -> IndexChoice:
    """``index_factory`` when given, else exact up to ``EXACT_MAX_CODES`` codes, ``IVF{auto_nlist(n)},Flat`` above."""
    if index_factory is not None:
        if not (isinstance(index_factory, str) and index_factory.strip()):
            raise ValueError(f"index_factory={index_factory!r}: expected None or a faiss factory string")
        return IndexChoice(index_factory, "given", auto=False)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: expected the number of codes, an int >= 1")
    if n <= EXACT_MAX_CODES:
        return IndexChoice(None, f"N={n} <= {EXACT_MAX_CODES}: exact search is cheap", auto=True)
    return IndexChoice(f"IVF{auto_nlist(n)},Flat", f"N={n} > {EXACT_MAX_CODES}: approximate, nlist ~ 4 sqrt(N)",
                       auto=True)


def recall_sample(n: int, size: int = RECALL_SAMPLE, seed: int = 0) -> np.ndarray:
    """``min(n, size)`` distinct row ids in increasing order, drawn by ``default_rng(seed)``."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


class RecallProbe:
    """Recall@k of an index's searches on a fixed sample of its own rows; the exact top-k is computed once."""

    def __init__(self, index: EmbeddingIndex, k: int = RECALL_K, sample: int = RECALL_SAMPLE, seed: int = 0) -> None:
        self.index = index
        self.k = min(int(k), index.ntotal)
        self.rows = recall_sample(index.ntotal, sample, seed)
        vectors = index.vectors
        queries = vectors[torch.from_numpy(self.rows).to(vectors.device)].cpu().numpy()
        sq_norms = (vectors * vectors).sum(1) if get_metric(index.metric).is_distance else None
        _, self.exact_ids = torch_knn(vectors, sq_norms, index.metric, queries, self.k)

    def recall(self) -> float:
        """Mean over the sample of |approximate top-k  ∩  exact top-k| / k."""
        _, ids = self.index.search_ids(self.rows, self.k)
        return recall_of(np.asarray(ids), self.exact_ids, self.k)


def recall_of(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over rows of the fraction of each row's exact top-k ids found in its approximate top-k."""
    hits = [np.intersect1d(a[a >= 0], e[e >= 0]).size for a, e in zip(approx_ids[:, :k], exact_ids[:, :k])]
    return float(np.mean(hits) / k) if hits else 1.0


def _ladder(maximum: int, start: int = 1) -> list[int]:
    values, v = [], start
    while v < maximum:
        values.append(v)
        v *= 2
    return values + [maximum]


def calibrate(index: EmbeddingIndex, target: float = CALIBRATION_TARGET, *, k: int = RECALL_K,
              sample: int = RECALL_SAMPLE, seed: int = 0) -> float:
    """Set the smallest power-of-two ``nprobe`` or ``efSearch`` whose recall@k reaches ``target`` (else the largest
    tried); return the recall."""
    probe = RecallProbe(index, k, sample, seed)
    params = index.search_params
    if "nprobe" in params:
        key, values = "nprobe", _ladder(int(faiss.extract_index_ivf(index.faiss_index).nlist))
    elif "efSearch" in params:
        key, values = "efSearch", _ladder(1024, start=16)
    else:
        return probe.recall()
    recall = 0.0
    for value in values:
        index.set_search_params(**{key: value})
        recall = probe.recall()
        if recall >= target:
            break
    return recall


def build_index(embeddings: Any, choice: IndexChoice, *, search_params: dict | None = None,
                **build_options: Any) -> tuple[EmbeddingIndex, float]:
    """Build ``choice``, calibrate it if automatic and approximate without ``search_params``; (index, recall@64)."""
    if search_params:
        build_options["search_params"] = search_params
    index = EmbeddingIndex.build(embeddings, index_factory=choice.index_factory, **build_options)
    if choice.exact:
        recall, how = 1.0, "exact"
    elif choice.auto and not search_params:
        recall, how = calibrate(index), "calibrated"
    else:
        recall, how = RecallProbe(index).recall(), "estimated"
    log.info("mining index %s (%s%s), search params %s, recall@%d %.3f (%s on %d sampled rows vs exact search)",
             choice.name, "auto: " if choice.auto else "", choice.reason, index.search_params or "{}", RECALL_K,
             recall, how, min(RECALL_SAMPLE, index.ntotal))
    return index, recall
