"""A faiss-backed index over code embeddings (row ``i`` = code index ``i``) with exact batched ranking.

Every query returns ``(scores, ids)``, most similar first, padded with id ``-1`` and the metric's worst score.
A flat index ranks with faiss's own storage, an approximate one keeps a float32 copy for exact ranking."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch

from naics_hnm.fingerprint import codes_fingerprint
from naics_hnm.hugepages import on_hugepages
from naics_hnm.index.approximate import SearchTraits, apply_search_params, build_faiss_index
from naics_hnm.index.ids import DEVICES, check_ids, check_k, duplicate_mask, like_input, select_topk, worst_score
from naics_hnm.index.index_file import (IndexFileError, faiss_metric, read_index_file, read_index_set,
                                        read_vectors_file, sidecar_path, write_index_files)
from naics_hnm.index.ivf_scan import BUFFER_FACTOR, ListMajorIVF
from naics_hnm.index.knn import as_float_matrix, normalise_rows, rescore_topk, search_in_batches, torch_knn
from naics_hnm.index.metric import get_metric

logger = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048
_SEARCH_BLOCK_BYTES = 128 << 20
_RANK_BLOCK_BYTES = 4 << 20


class EmbeddingIndex:
    """Exact (flat) or approximate faiss index plus float32 vectors for exact ranking; use :meth:`build` or
    :meth:`load`. ``device="auto"`` puts flat and IVF indexes and ``vectors`` on a GPU when faiss and torch see one."""

    def __init__(self, cpu_index: faiss.Index, vectors: np.ndarray, metric: str, device: str, *, index_type: str,
                 search_params: dict[str, int] | None = None, codes_fingerprint: str | None = None,
                 model_fingerprint: str | None = None, epoch: int | None = None, reason: str = "") -> None:
        self._metric = metric
        self._index_type = index_type
        self._codes_fingerprint = codes_fingerprint
        self._model_fingerprint = model_fingerprint
        self._epoch = epoch
        self._traits = SearchTraits.of(cpu_index)
        self._exact = isinstance(cpu_index, faiss.IndexFlat)
        self._vectors_np = vectors  # for a flat index, a view of cpu_index's storage: keep cpu_index alive
        self._sq_norms_np = np.einsum("nd,nd->n", vectors, vectors) if get_metric(metric).is_distance else None
        self._device = device
        self._gpu_resources = None
        self._index = self._place(cpu_index, device, reason)
        self._cpu_index = cpu_index if self._exact or self._gpu_resources is None else None
        self._list_major = ListMajorIVF.of(cpu_index, metric) if self._gpu_resources is None else None
        self._search_params: dict[str, int] = {}
        self.set_search_params(**{**self._traits.defaults(), **self._traits.check(search_params, index_type)})
        target = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
        self._vectors = torch.from_numpy(vectors).to(target)
        self._sq_norms = None if self._sq_norms_np is None else torch.from_numpy(self._sq_norms_np).to(target)

    def _place(self, cpu_index: faiss.Index, device: str, reason: str) -> faiss.Index:
        """The index to search: moved to the GPU where faiss can (flat, IVF), always logged."""
        where = f"({reason}; {self._index_type}, metric={self._metric}, N={cpu_index.ntotal}, d={cpu_index.d})"
        if device != "cuda":
            logger.info("faiss index on CPU %s", where)
            return cpu_index
        gpu = torch.cuda.current_device()
        if not self._exact and faiss.try_extract_index_ivf(cpu_index) is None:
            logger.info("faiss index on CPU (faiss has no GPU version of %r; rank on GPU %d) %s",
                        self._index_type, gpu, where)
            return cpu_index
        resources = faiss.StandardGpuResources()
        try:
            index = faiss.index_cpu_to_gpu(resources, gpu, cpu_index)
        except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
            logger.info("faiss index on CPU (faiss cannot move %r to GPU %d: %s) %s",
                        self._index_type, gpu, str(exc).strip().splitlines()[0], where)
            return cpu_index
        self._gpu_resources = resources
        logger.info("faiss index on GPU %d %s", gpu, where)
        return index

    @classmethod
    def build(cls, embeddings: Any, metric: str = "cosine", device: str = "auto", *, index_factory: str | None = None,
              search_params: dict[str, int] | None = None, seed: int = 0, model_fingerprint: str | None = None,
              epoch: int | None = None, codes: Sequence[str] | None = None) -> "EmbeddingIndex":
        """Index float [N, d] embeddings (numpy or torch on any device); row i = id i. ``index_factory`` (e.g.
        ``"IVF1024,PQ32"``) builds an approximate index trained on a sample drawn with ``seed``."""
        normalise = get_metric(metric).normalise
        if index_factory is not None and not isinstance(index_factory, str):
            raise TypeError(f"index_factory must be a faiss factory string or None, got {type(index_factory).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed={seed}: expected an integer >= 0")
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise TypeError(f"model_fingerprint must be a str or None, got {type(model_fingerprint).__name__}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer))):
            raise TypeError(f"epoch must be an int or None, got {epoch!r}")
        resolved, reason = _resolve_device(device)
        keeps_input = not normalise and index_factory not in (None, "Flat")
        x = as_float_matrix(embeddings, "embeddings", copy=keeps_input)
        if normalise:
            x = normalise_rows(x, "embeddings")
        n, d = x.shape
        fingerprint = None
        if codes is not None:
            codes = list(codes)
            if len(codes) != n or not all(isinstance(c, str) for c in codes):
                raise ValueError(f"codes must be {n} strings (one per embedding row), got {len(codes)} items")
            fingerprint = codes_fingerprint(codes)
        if index_factory is None:
            index = faiss.IndexFlatL2(d) if get_metric(metric).is_distance else faiss.IndexFlatIP(d)
            index.add(x)
        else:
            index = build_faiss_index(x, faiss_metric(metric), index_factory, int(seed))
        # an approximate index keeps its float32 copy on huge pages, as ranking gathers its rows at random
        vectors = _storage_view(index) if isinstance(index, faiss.IndexFlat) else on_hugepages(x)
        return cls(index, vectors, metric, resolved, index_type=index_factory or "Flat", search_params=search_params,
                   codes_fingerprint=fingerprint, model_fingerprint=model_fingerprint,
                   epoch=None if epoch is None else int(epoch), reason=reason)

    @classmethod
    def from_faiss(cls, index: faiss.Index, metric: str, *, vectors: np.ndarray | None = None,
                   index_type: str = "Flat", search_params: dict[str, int] | None = None,
                   codes: Sequence[str] | None = None, epoch: int | None = None) -> "EmbeddingIndex":
        """Wrap a built CPU faiss index without copying it; ``vectors`` (float32 [N, d], normalised for cosine)
        rank exactly, None takes a flat index's own storage."""
        if vectors is None:
            if not isinstance(index, faiss.IndexFlat):
                raise ValueError(f"EmbeddingIndex.from_faiss({index_type!r}): an approximate index needs vectors=")
            vectors = _storage_view(index)
        return cls(index, vectors, metric, "cpu", index_type=index_type, search_params=search_params,
                   codes_fingerprint=None if codes is None else codes_fingerprint(list(codes)),
                   epoch=epoch, reason="a prebuilt index")

    @property
    def metric(self) -> str:
        return self._metric

    @property
    def dim(self) -> int:
        return int(self._vectors_np.shape[1])

    @property
    def ntotal(self) -> int:
        return int(self._vectors_np.shape[0])

    @property
    def device(self) -> str:
        """Where ranking runs and ``vectors`` live: "cuda" or "cpu"."""
        return self._device

    @property
    def vectors(self) -> torch.Tensor:
        """float32 [N, d] (L2-normalised for cosine) on :attr:`device`; read-only by convention."""
        return self._vectors

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def on_gpu(self) -> bool:
        """Whether the faiss index itself lives on a GPU."""
        return self._gpu_resources is not None

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying faiss index (GPU or CPU): set search parameters with :meth:`set_search_params`."""
        return self._index

    @property
    def search_params(self) -> dict[str, int]:
        """The search parameters in force (empty for a flat index)."""
        return dict(self._search_params)

    @property
    def codes_fingerprint(self) -> str | None:
        return self._codes_fingerprint

    @property
    def model_fingerprint(self) -> str | None:
        return self._model_fingerprint

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (f"EmbeddingIndex(metric={self.metric!r}, ntotal={self.ntotal}, dim={self.dim}, "
                f"index_type={self.index_type!r}, device={self.device!r}, epoch={self.epoch})")

    def set_search_params(self, **params: int) -> None:
        """Update search parameters (``nprobe``, ``efSearch``, ``k_factor``), e.g. ``set_search_params(nprobe=64)``;
        others keep their value. A key the index does not take or a value below 1 raises ValueError naming it."""
        checked = self._traits.check(params, self._index_type)
        apply_search_params(self._index, checked)
        self._search_params.update(checked)

    def pair_scores(self, anchor_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Exact float32 [B, C] scores of (anchor, candidate) pairs; ids are validated int64 tensors on
        :attr:`device`, ``-1`` entries get an arbitrary score for the caller to mask."""
        safe = candidate_ids.clamp(min=0)
        if self._device == "cpu":
            ip = torch.from_numpy(self._cpu_inner_products(anchor_ids.numpy(), safe.numpy()))
        else:
            ip = torch.bmm(self._vectors[safe], self._vectors[anchor_ids].unsqueeze(2)).squeeze(2)
        if not get_metric(self._metric).is_distance:
            return ip
        return (self._sq_norms[safe] + self._sq_norms[anchor_ids].unsqueeze(1) - 2 * ip).clamp_min_(0)

    def _cpu_inner_products(self, anchors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Batched gather + matmul in cache-sized blocks of anchors (NumPy beat torch.bmm on CPU)."""
        v = self._vectors_np
        b, c = candidates.shape
        out = np.empty((b, c), dtype=np.float32)
        if b == 0 or c == 0:
            return out
        anchor_vectors = np.take(v, anchors, axis=0)  # np.take: 2-4x faster than v[ids] for row gathers
        rows = max(1, _RANK_BLOCK_BYTES // (c * v.shape[1] * 4))
        for start in range(0, b, rows):
            stop = start + rows
            block = np.take(v, candidates[start:stop], axis=0)
            out[start:stop] = np.matmul(block, anchor_vectors[start:stop, :, None])[:, :, 0]
        return out

    def rank(self, anchor_ids: Any, candidate_ids: Any, k: int) -> tuple[Any, Any]:
        """Top-k ``(scores [B, k], ids [B, k])`` of each anchor's candidates (int64 [B, C], ``-1`` padding), hardest
        first; duplicates count once, ties keep the earlier column. Numpy in, numpy out; else torch."""
        k = check_k(k)
        anchors, candidates, _ = check_ids(anchor_ids, candidate_ids, None, self._vectors.device, self.ntotal)
        with torch.no_grad():
            scores = self.pair_scores(anchors, candidates)
            keep = (candidates >= 0) & ~duplicate_mask(candidates)
            top_scores, top_ids = select_topk(scores, candidates, keep, k, self._metric)
        return like_input(candidate_ids, top_scores, top_ids)

    def search(self, queries: Any, k: int, *, batch_size: int | None = None) -> tuple[Any, Any]:
        """Global k nearest rows of query vectors [Q, d], ``batch_size`` at a time (None: ~128 MiB of working memory);
        ``k > N`` pads with id ``-1``, unless that padding would take more than 1 GiB (ValueError)."""
        k = check_k(k)
        q = as_float_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, expected {self.dim} (the index dim)")
        if get_metric(self._metric).normalise:
            q = normalise_rows(q, "queries")
        scores, ids = self._search_rows(q, None, k, batch_size)
        return like_input(queries, torch.from_numpy(scores), torch.from_numpy(ids))

    def search_ids(self, anchor_ids: Any, k: int, *, batch_size: int | None = None) -> tuple[Any, Any]:
        """Nearest neighbours of indexed rows by id (each row's own id included), ``batch_size`` rows at a time."""
        k = check_k(k)
        anchors = check_ids(anchor_ids, None, None, "cpu", self.ntotal)[0]
        scores, ids = self._search_rows(self._vectors_np, anchors.numpy(), k, batch_size)
        return like_input(anchor_ids, torch.from_numpy(scores), torch.from_numpy(ids))

    def _search_rows(self, source: np.ndarray, rows: np.ndarray | None, k: int,
                     batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Search ``source`` (or its ``rows``) batch by batch; exact re-scoring where asked or lossy."""
        fetch_factor = self._search_params.get("k_factor", 1)
        rescore = fetch_factor > 1 or not self._traits.exact_storage
        fetch = min(self.ntotal, k * fetch_factor)
        n_queries = len(source if rows is None else rows)
        list_major = self._list_major is not None and self._list_major.pays_off(n_queries, fetch)
        per_query = fetch * 12 * (1 + BUFFER_FACTOR * list_major) + self.dim * 4 + fetch * self.dim * 4 * rescore
        batch = max(1, _SEARCH_BLOCK_BYTES // per_query) if batch_size is None else batch_size

        def search(q: np.ndarray, k_eff: int) -> tuple[np.ndarray, np.ndarray]:
            fetched = min(self.ntotal, k_eff * fetch_factor)
            if self._gpu_resources is not None and fetched > FAISS_GPU_MAX_K:
                return torch_knn(self._vectors, self._sq_norms, self._metric, q, k_eff)
            if list_major and self._list_major.pays_off(len(q), fetched):
                scores, ids = self._list_major.search(q, fetched)
            else:
                scores, ids = self._index.search(q, fetched)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            if rescore:
                return rescore_topk(self._vectors_np, self._sq_norms_np, self._metric, q, ids, k_eff)
            scores = np.ascontiguousarray(scores, dtype=np.float32)
            scores[ids < 0] = worst_score(self._metric)
            return scores, ids

        return search_in_batches(search, source, rows, k, self.ntotal, self._metric, batch)

    def save(self, path: str | Path) -> Path:
        """Write the index set named ``path`` atomically (:mod:`naics_hnm.index.index_file`); returns ``path``."""
        path = Path(path)
        cpu_index = self._cpu_index if self._cpu_index is not None else faiss.index_gpu_to_cpu(self._index)
        write_index_files(path, cpu_index, None if self._exact else self._vectors_np, self._metadata())
        logger.info("saved %r to %s (+ %s)", self, path, sidecar_path(path).name)
        return path

    @staticmethod
    def _read_set(path: Path, meta: dict[str, Any], expected_codes: Sequence[str] | None,
                  expected_dim: int | None) -> tuple[faiss.Index, np.ndarray, dict[str, Any], dict[str, int]]:
        """The faiss index, vectors and search parameters of the set ``meta`` describes, all checked."""
        if expected_dim is not None and int(expected_dim) != meta["dim"]:
            raise IndexFileError(f"index {str(path)!r} has dim {meta['dim']}, expected dim {expected_dim}")
        if expected_codes is not None:
            codes = getattr(expected_codes, "codes", expected_codes)
            want = codes_fingerprint(list(codes))
            if meta["codes_fingerprint"] != want:
                raise IndexFileError(f"index {str(path)!r} was built for code list fingerprint "
                                     f"{meta['codes_fingerprint']}, expected {want} (the given {len(codes)} codes); "
                                     "rebuild the index")
        index = read_index_file(path, meta)
        vectors = _storage_view(index) if isinstance(index, faiss.IndexFlat) else read_vectors_file(path, meta)
        try:
            params = SearchTraits.of(index).check(meta["search_params"], meta["index_type"])
        except (TypeError, ValueError) as exc:
            raise IndexFileError(f"index sidecar {str(sidecar_path(path))!r}: {exc}") from exc
        return index, vectors, meta, params

    def _metadata(self) -> dict[str, Any]:
        return {"metric": self._metric, "dim": self.dim, "ntotal": self.ntotal, "index_type": self._index_type,
                "search_params": self.search_params, "codes_fingerprint": self._codes_fingerprint,
                "model_fingerprint": self._model_fingerprint, "epoch": self._epoch,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "naics_hnm_version": _package_version(), "faiss_version": faiss.__version__}

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", *, expected_codes: Sequence[str] | None = None,
             expected_dim: int | None = None) -> "EmbeddingIndex":
        """Read an index written by :meth:`save`. ``expected_codes`` (a code list, or anything with ``.codes``) and
        ``expected_dim`` must match the sidecar; mismatches and corrupt files raise :class:`IndexFileError`."""
        path = Path(path)
        resolved, reason = _resolve_device(device)
        index, vectors, meta, params = read_index_set(path, lambda meta: cls._read_set(path, meta, expected_codes,
                                                                                        expected_dim))
        return cls(index, vectors, meta["metric"], resolved, index_type=meta["index_type"], search_params=params,
                   codes_fingerprint=meta["codes_fingerprint"], model_fingerprint=meta["model_fingerprint"],
                   epoch=meta["epoch"], reason=reason)


def knn_rows(index: EmbeddingIndex, row_ids: Any, k: int, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`EmbeddingIndex.search_ids` as numpy ``(scores float32 [Q, k], ids int64 [Q, k])``, for any ``row_ids``."""
    return tuple(np.asarray(torch.as_tensor(a).cpu()) for a in index.search_ids(row_ids, k, batch_size=batch_size))


class _StorageOwner:
    """Exposes a flat index's storage to numpy and keeps the index alive while arrays use it."""

    def __init__(self, index: faiss.IndexFlat) -> None:
        self.index = index
        address = faiss.rev_swig_ptr(index.get_xb(), 1).__array_interface__["data"][0]
        self.__array_interface__ = {"shape": (index.ntotal, index.d), "typestr": "<f4",
                                    "data": (address, False), "version": 3}


def _storage_view(index: faiss.IndexFlat) -> np.ndarray:
    """float32 [ntotal, d] zero-copy view of a flat index's vectors; it keeps the index alive."""
    return np.asarray(_StorageOwner(index))


def _resolve_device(device: str) -> tuple[str, str]:
    """``(device, reason)`` where device is "cpu" or "cuda"."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {DEVICES}")
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    n_gpus = faiss.get_num_gpus() if has_gpu_build else 0
    usable = n_gpus > 0 and torch.cuda.is_available()
    if device == "cuda" and not usable:
        raise ValueError(f"device='cuda' needs a faiss GPU build with a visible GPU and torch CUDA; found faiss GPU "
                         f"build={has_gpu_build}, faiss GPUs={n_gpus}, torch.cuda={torch.cuda.is_available()}; "
                         "use device='auto' or 'cpu'")
    if device == "cpu":
        return "cpu", "device='cpu' requested"
    if usable:
        return "cuda", f"device={device!r}"
    return "cpu", "no faiss GPU build" if not has_gpu_build else "no GPU"


def _package_version() -> str:
    try:
        return importlib.metadata.version("naics_hnm")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(sys.modules.get("naics_hnm"), "__version__", "unknown"))
