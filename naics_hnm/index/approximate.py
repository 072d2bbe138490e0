"""Building and tuning approximate faiss indexes: a seeded training sample and search parameters.

``nprobe`` (IVF) and ``efSearch`` (HNSW) are faiss's own; ``k_factor`` fetches ``k * k_factor`` candidates,
re-scored exactly from float32 vectors. The defaults and their measurements: ``docs/index_defaults.md``."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

import faiss
import numpy as np

logger = logging.getLogger(__name__)

TRAIN_POINTS_PER_LIST = 64
TRAIN_POINTS_MIN = 16384
FAISS_MIN_POINTS_PER_LIST = 39
DEFAULT_EF_SEARCH = 128
DEFAULT_K_FACTOR = 4


def default_nprobe(nlist: int) -> int:
    """The measured default: ``min(nlist, max(16, 4 * ceil(sqrt(nlist))))`` (docs/index_defaults.md)."""
    return min(nlist, max(16, 4 * math.ceil(math.sqrt(nlist))))


def train_size(n: int, nlist: int, codebooks: bool) -> int:
    """Rows used to train: ``min(n, 64 * nlist)``, raised to 16384 when ``codebooks`` need training too."""
    wanted = TRAIN_POINTS_PER_LIST * nlist
    return min(n, max(wanted, TRAIN_POINTS_MIN) if codebooks else wanted)


def training_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` distinct rows of ``x`` in row order, drawn by ``default_rng(seed)``; ``x`` itself if all."""
    if size >= x.shape[0]:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=size, replace=False))
    return x[rows]


def build_faiss_index(x: np.ndarray, metric_type: int, index_factory: str, seed: int) -> faiss.Index:
    """A CPU faiss index from ``index_factory`` holding ``x``; ValueError if faiss refuses it or N < nlist."""
    n, d = x.shape
    try:
        index = faiss.index_factory(d, index_factory, metric_type)
    except RuntimeError as exc:
        raise ValueError(f"index_factory={index_factory!r} is not a faiss factory string for dim {d}: "
                         f"{_faiss_message(exc)}") from exc
    traits = SearchTraits.of(index)
    nlist = traits.nlist
    if n < nlist:
        suggested = 2 ** int(math.log2(max(1, n // FAISS_MIN_POINTS_PER_LIST)))
        raise ValueError(f"index_factory={index_factory!r} has nlist={nlist} inverted lists but there are only "
                         f"N={n} vectors; expected N >= nlist (ideally N >= {FAISS_MIN_POINTS_PER_LIST} * nlist), "
                         f"e.g. IVF{suggested}")
    if n < FAISS_MIN_POINTS_PER_LIST * nlist:
        logger.warning("index_factory=%r: N=%d vectors train nlist=%d lists poorly; expected N >= %d",
                       index_factory, n, nlist, FAISS_MIN_POINTS_PER_LIST * nlist)
    try:
        if not index.is_trained:
            sample = training_sample(x, train_size(n, nlist, codebooks=not traits.exact_storage), seed)
            start = time.perf_counter()
            index.train(sample)
            logger.info("trained %r on %d of %d vectors (seed %d) in %.2fs", index_factory, len(sample), n, seed,
                        time.perf_counter() - start)
        index.add(x)
    except RuntimeError as exc:
        raise ValueError(f"index_factory={index_factory!r} failed for {n} vectors of dim {d}: "
                         f"{_faiss_message(exc)}") from exc
    return index


@dataclass(frozen=True)
class SearchTraits:
    """The search parameters an index takes (``keys``), its ``nlist`` (0 without IVF), whether its scores are exact."""
    keys: tuple[str, ...]
    nlist: int
    exact_storage: bool

    @classmethod
    def of(cls, index: faiss.Index) -> "SearchTraits":
        ivf = faiss.try_extract_index_ivf(index)
        if isinstance(index, faiss.IndexFlat):
            return cls((), 0, True)
        keys = ["k_factor"]
        if ivf is not None:
            keys.append("nprobe")
        if isinstance(_unwrap(index), faiss.IndexHNSW):
            keys.append("efSearch")
        exact = isinstance(index, (faiss.IndexIVFFlat, faiss.IndexHNSWFlat))
        return cls(tuple(keys), int(ivf.nlist) if ivf is not None else 0, exact)

    def defaults(self) -> dict[str, int]:
        """The measured defaults (see the module docstring)."""
        params: dict[str, int] = {}
        if "nprobe" in self.keys:
            params["nprobe"] = default_nprobe(self.nlist)
        if "efSearch" in self.keys:
            params["efSearch"] = DEFAULT_EF_SEARCH
        if self.keys and not self.exact_storage:
            params["k_factor"] = DEFAULT_K_FACTOR
        return params

    def check(self, params: Mapping[str, Any] | None, index_type: str) -> dict[str, int]:
        """``params`` as a dict of ints; TypeError for a non-mapping or non-integer, ValueError naming a key this
        index does not take, a value below 1 or an nprobe above nlist."""
        if params is None:
            return {}
        if not isinstance(params, Mapping):
            raise TypeError(f"search_params must be a dict such as {{'nprobe': 64}}, got {type(params).__name__}")
        checked: dict[str, int] = {}
        for key, value in params.items():
            if key not in self.keys:
                takes = f"takes only {list(self.keys)}" if self.keys else "is exact and takes no search parameters"
                raise ValueError(f"search parameter {key!r} does not apply: index {index_type!r} {takes}")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"search parameter {key}={value!r}: expected an integer")
            if value < 1:
                raise ValueError(f"search parameter {key}={value}: expected an integer >= 1")
            checked[key] = int(value)
        if checked.get("nprobe", 0) > self.nlist:
            raise ValueError(f"search parameter nprobe={checked['nprobe']} exceeds the index's nlist={self.nlist}; "
                             f"expected 1 <= nprobe <= {self.nlist}")
        return checked


def apply_search_params(index: faiss.Index, params: Mapping[str, int]) -> None:
    """Set faiss's own parameters (all but ``k_factor``) on ``index``, CPU or GPU."""
    space = faiss.GpuParameterSpace() if _is_gpu(index) else faiss.ParameterSpace()
    for key, value in params.items():
        if key == "k_factor":
            continue
        try:
            space.set_index_parameter(index, key, value)
        except RuntimeError as exc:
            raise ValueError(f"search parameter {key}={value} cannot be set on this index: "
                             f"{_faiss_message(exc)}") from exc


def _unwrap(index: faiss.Index) -> faiss.Index:
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def _is_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _faiss_message(exc: BaseException) -> str:
    """The first line of a faiss error without its "Error in <function> at <file>:<line>: " prefix."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", line)
