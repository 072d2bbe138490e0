"""A faiss-backed index over code embeddings with exact batched ranking of candidate pools.

Row ``i`` of the index is code index ``i``. Three metrics are supported: ``"cosine"`` (rows are
L2-normalised, then inner product), ``"ip"`` (raw inner product) and ``"l2"`` (squared Euclidean
distance, as faiss ``IndexFlatL2`` reports it; smaller = more similar). Every query returns
``(scores, ids)`` arrays, most similar first, padded with id ``-1`` and score ``-inf`` (``+inf`` for
l2).

Files written by :meth:`EmbeddingIndex.save` for ``path``:

- ``path``: the faiss index (``faiss.write_index`` of its CPU version);
- ``path + ".json"``: the metadata sidecar (format version, metric, sizes, fingerprints, checksums);
- ``path + ".vectors.npy"``: float32 vectors, only for approximate (non-flat) indexes, whose vectors
  cannot be read back exactly from the index; written with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch

from naics_hnm.atomic import atomic_path
from naics_hnm.taxonomy import codes_fingerprint

logger = logging.getLogger(__name__)

METRICS = ("cosine", "ip", "l2")
DEVICES = ("auto", "cpu", "cuda")
FORMAT_VERSION = 1
FAISS_GPU_MAX_K = 2048
_SEARCH_CHUNK_BYTES = 256 << 20
_RANK_BLOCK_BYTES = 4 << 20


class IndexFileError(ValueError):
    """An index file or its sidecar is missing, corrupt or does not match what was expected."""


def worst_score(metric: str) -> float:
    """The padding score: ``-inf`` for similarities, ``+inf`` for l2 distances."""
    return float("inf") if metric == "l2" else float("-inf")


def as_id_tensor(ids: Any, name: str, device: torch.device | str, ndim: int) -> torch.Tensor:
    """Integer ids (numpy, torch or a nested list) as an int64 tensor on ``device``."""
    if not isinstance(ids, torch.Tensor):
        ids = np.asarray(ids)
        if ids.size == 0 and ids.dtype == np.float64:  # np.asarray([]) is float64
            ids = ids.astype(np.int64)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    elif ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    if ids.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64)


def check_id_range(ids: torch.Tensor, name: str, n: int, allow_padding: bool) -> None:
    """Raise naming the first id outside ``[-1, n)`` (or ``[0, n)`` without padding)."""
    if ids.numel() == 0:
        return
    low = -1 if allow_padding else 0
    bad = (ids < low) | (ids >= n)
    if bool(bad.any()):
        first = int(ids[bad][0])
        expected = f"[-1, {n})" if allow_padding else f"[0, {n})"
        raise ValueError(f"{name} holds id {first}, expected ids in {expected}")


def like_input(template: Any, *arrays: torch.Tensor) -> tuple:
    """Return tensors as numpy when ``template`` is not a tensor, else on the template's device."""
    if isinstance(template, torch.Tensor):
        return tuple(a.to(template.device) for a in arrays)
    return tuple(a.cpu().numpy() for a in arrays)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: expected an integer >= 1")
    return int(k)


def _as_float_matrix(x: Any, name: str) -> np.ndarray:
    """A finite float32 [n, d] numpy copy-or-view of ``x``; errors name the first bad row."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point()):
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    elif isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D [n >= 1, d >= 1], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} row {rows[0]} holds NaN or inf ({rows.size} such rows); expected finite values")
    return x


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} row {zero[0]} is all zeros ({zero.size} such rows); cosine needs non-zero vectors")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _faiss_metric(metric: str) -> int:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def _resolve_device(device: str) -> tuple[str, str]:
    """``(device, reason)`` where device is "cpu" or "cuda"."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r}: expected one of {DEVICES}")
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    n_gpus = faiss.get_num_gpus() if has_gpu_build else 0
    usable = n_gpus > 0 and torch.cuda.is_available()
    if device == "cuda" and not usable:
        raise ValueError(
            f"device='cuda' needs a faiss GPU build with a visible GPU and torch CUDA; found "
            f"faiss GPU build={has_gpu_build}, faiss GPUs={n_gpus}, torch.cuda={torch.cuda.is_available()}; "
            "use device='auto' or 'cpu'"
        )
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: str | Path) -> Path:
    return Path(str(path) + ".json")


def vectors_path(path: str | Path) -> Path:
    return Path(str(path) + ".vectors.npy")


class EmbeddingIndex:
    """Exact (flat) or approximate faiss index plus a float32 copy of the vectors for ranking.

    Build with :meth:`build` or :meth:`load`; the constructor is internal. With a faiss GPU build,
    a visible GPU and torch CUDA, ``device="auto"`` puts flat indexes on the GPU; approximate
    indexes stay on CPU while ``vectors`` (used by :meth:`rank`) still live on the GPU.
    """

    def __init__(
        self,
        cpu_index: faiss.Index,
        vectors: np.ndarray,
        metric: str,
        device: str,
        *,
        index_type: str,
        codes_fingerprint: str | None = None,
        model_fingerprint: str | None = None,
        epoch: int | None = None,
        reason: str = "",
    ) -> None:
        self._metric = metric
        self._index_type = index_type
        self._codes_fingerprint = codes_fingerprint
        self._model_fingerprint = model_fingerprint
        self._epoch = epoch
        self._cpu_index = cpu_index
        self._gpu_resources = None
        self._index = cpu_index
        self._device = device
        self._vectors_np = vectors
        is_flat = isinstance(cpu_index, faiss.IndexFlat)
        where = f"({reason}; {index_type}, metric={metric}, N={cpu_index.ntotal}, d={cpu_index.d})"
        if device == "cuda":
            gpu = torch.cuda.current_device()
            if is_flat:
                self._gpu_resources = faiss.StandardGpuResources()
                self._index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, cpu_index)
                self._cpu_index = None
                logger.info("faiss index on GPU %d %s", gpu, where)
            else:
                logger.info(
                    "faiss index on CPU (approximate index %r stays on CPU; rank on GPU %d) %s", index_type, gpu, where
                )
            self._vectors = torch.from_numpy(vectors).to(f"cuda:{gpu}")
        else:
            logger.info("faiss index on CPU %s", where)
            self._vectors = torch.from_numpy(vectors)
        self._sq_norms = (self._vectors * self._vectors).sum(dim=1) if metric == "l2" else None

    @classmethod
    def build(
        cls,
        embeddings: Any,
        metric: str = "cosine",
        device: str = "auto",
        *,
        index_factory: str | None = None,
        model_fingerprint: str | None = None,
        epoch: int | None = None,
        codes: Sequence[str] | None = None,
    ) -> "EmbeddingIndex":
        """Index float [N, d] embeddings (numpy or torch on any device); row i = id i."""
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
        x = _as_float_matrix(embeddings, "embeddings")
        if metric == "cosine":
            x = _normalise(x, "embeddings")
        n, d = x.shape
        fingerprint = None
        if codes is not None:
            codes = list(codes)
            if len(codes) != n or not all(isinstance(c, str) for c in codes):
                raise ValueError(f"codes must be {n} strings (one per embedding row), got {len(codes)} items")
            fingerprint = codes_fingerprint(codes)
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise TypeError(f"model_fingerprint must be a str or None, got {type(model_fingerprint).__name__}")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer))):
            raise TypeError(f"epoch must be an int or None, got {epoch!r}")
        resolved, reason = _resolve_device(device)
        index_type = index_factory or "Flat"
        if index_factory is None:
            index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        else:
            try:
                index = faiss.index_factory(d, index_factory, _faiss_metric(metric))
                if not index.is_trained:
                    index.train(x)
            except RuntimeError as exc:
                raise ValueError(f"index_factory={index_factory!r} failed for {n} vectors of dim {d}: {exc}") from exc
        index.add(x)
        return cls(
            index, x, metric, resolved, index_type=index_type, codes_fingerprint=fingerprint,
            model_fingerprint=model_fingerprint, epoch=None if epoch is None else int(epoch), reason=reason,
        )

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
        """float32 [N, d] (L2-normalised for cosine) on :attr:`device`."""
        return self._vectors

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def on_gpu(self) -> bool:
        """Whether the faiss index itself lives on a GPU (approximate indexes stay on CPU)."""
        return self._gpu_resources is not None

    @property
    def faiss_index(self) -> faiss.Index:
        """The underlying faiss index (GPU or CPU), e.g. to set ``nprobe``."""
        return self._index

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
        return (
            f"EmbeddingIndex(metric={self.metric!r}, ntotal={self.ntotal}, dim={self.dim}, "
            f"index_type={self.index_type!r}, device={self.device!r}, epoch={self.epoch})"
        )

    def pair_scores(self, anchor_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Exact float32 [B, C] scores of (anchor, candidate) pairs on :attr:`device`.

        Ids must already be validated int64 tensors on :attr:`device`; ``-1`` entries get an
        arbitrary score and must be masked by the caller.
        """
        safe = candidate_ids.clamp(min=0)
        if self._device == "cpu":
            ip = torch.from_numpy(self._cpu_inner_products(anchor_ids.numpy(), safe.numpy()))
        else:
            ip = torch.bmm(self._vectors[safe], self._vectors[anchor_ids].unsqueeze(2)).squeeze(2)
        if self._metric != "l2":
            return ip
        return (self._sq_norms[safe] + self._sq_norms[anchor_ids].unsqueeze(1) - 2 * ip).clamp_min_(0)

    def _cpu_inner_products(self, anchors: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Batched gather + matmul in cache-sized blocks of anchors (NumPy beat torch.bmm on CPU)."""
        v = self._vectors_np
        b, c = candidates.shape
        out = np.empty((b, c), dtype=np.float32)
        if b == 0 or c == 0:
            return out
        anchor_vectors = v[anchors]
        rows = max(1, _RANK_BLOCK_BYTES // (c * v.shape[1] * 4))
        for start in range(0, b, rows):
            stop = start + rows
            block = v[candidates[start:stop]]
            out[start:stop] = np.matmul(block, anchor_vectors[start:stop, :, None])[:, :, 0]
        return out

    def rank(self, anchor_ids: Any, candidate_ids: Any, k: int) -> tuple[Any, Any]:
        """Top-k of each anchor's candidate row: ``(scores [B, k], ids [B, k])``, hardest first.

        ``candidate_ids`` is int64 [B, C] with ``-1`` padding; duplicates count once; ties keep the
        earlier candidate position. Output is numpy for numpy input, else torch on the input's device.
        """
        k = check_k(k)
        anchors, candidates = self._validate_pairs(anchor_ids, candidate_ids)
        with torch.no_grad():
            scores = self.pair_scores(anchors, candidates)
            keep = (candidates >= 0) & ~duplicate_mask(candidates)
            top_scores, top_ids = select_topk(scores, candidates, keep, k, self._metric)
        return like_input(candidate_ids, top_scores, top_ids)

    def _validate_pairs(self, anchor_ids: Any, candidate_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = as_id_tensor(anchor_ids, "anchor_ids", self._vectors.device, 1)
        candidates = as_id_tensor(candidate_ids, "candidate_ids", self._vectors.device, 2)
        if candidates.shape[0] != anchors.shape[0]:
            raise ValueError(
                f"candidate_ids has {candidates.shape[0]} rows but anchor_ids has {anchors.shape[0]}; "
                "expected [B, C] and [B]"
            )
        check_id_range(anchors, "anchor_ids", self.ntotal, allow_padding=False)
        check_id_range(candidates, "candidate_ids", self.ntotal, allow_padding=True)
        return anchors, candidates

    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """Global k nearest rows of query vectors [Q, d] (normalised for cosine).

        ``k > N`` pads with ``-1`` / ``-inf`` (``+inf`` for l2). Output kind follows ``queries``.
        """
        k = check_k(k)
        q = _as_float_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}, expected {self.dim} (the index dim)")
        if self._metric == "cosine":
            q = _normalise(q, "queries")
        scores, ids = self._search_array(q, k)
        return like_input(queries, torch.from_numpy(scores), torch.from_numpy(ids))

    def search_ids(self, anchor_ids: Any, k: int) -> tuple[Any, Any]:
        """Nearest neighbours of indexed rows by id (each row's own id is included)."""
        k = check_k(k)
        anchors = as_id_tensor(anchor_ids, "anchor_ids", "cpu", 1)
        check_id_range(anchors, "anchor_ids", self.ntotal, allow_padding=False)
        scores, ids = self._search_array(self._vectors_np[anchors.numpy()], k)
        return like_input(anchor_ids, torch.from_numpy(scores), torch.from_numpy(ids))

    def _search_array(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k_eff = min(k, self.ntotal)
        if self._gpu_resources is not None and k_eff > FAISS_GPU_MAX_K:
            scores, ids = self._torch_topk(q, k_eff)
        else:
            scores, ids = self._index.search(q, k_eff)
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        scores[ids < 0] = worst_score(self._metric)
        if k_eff < k:
            pad = k - k_eff
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=worst_score(self._metric))
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def _torch_topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN by chunked matmul + topk on the vectors' device (faiss GPU caps k at 2048)."""
        chunk = max(1, _SEARCH_CHUNK_BYTES // (4 * self.ntotal))
        out_scores, out_ids = [], []
        with torch.no_grad():
            for start in range(0, q.shape[0], chunk):
                qt = torch.from_numpy(q[start : start + chunk]).to(self._vectors.device)
                sim = qt @ self._vectors.T
                if self._metric == "l2":
                    dist = (self._sq_norms.unsqueeze(0) + (qt * qt).sum(1, keepdim=True) - 2 * sim).clamp_min_(0)
                    s, i = torch.topk(dist, k, dim=1, largest=False)
                else:
                    s, i = torch.topk(sim, k, dim=1, largest=True)
                out_scores.append(s.cpu())
                out_ids.append(i.cpu())
        return torch.cat(out_scores).numpy(), torch.cat(out_ids).numpy()

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` and its sidecar to ``path + ".json"`` atomically.

        All files are written to temporaries first; the index (and vectors file) replace their
        targets before the sidecar, which is replaced last. A failure while writing leaves the
        previous files untouched. Returns the index path.
        """
        path = Path(path)
        cpu_index = self._cpu_index if self._cpu_index is not None else faiss.index_gpu_to_cpu(self._index)
        flat = isinstance(cpu_index, faiss.IndexFlat)
        with atomic_path(sidecar_path(path)) as tmp_meta:
            with atomic_path(path) as tmp_index:
                faiss.write_index(cpu_index, str(tmp_index))
                meta = self._metadata(_sha256_file(tmp_index))
                if not flat:
                    with atomic_path(vectors_path(path)) as tmp_vectors:
                        with tmp_vectors.open("wb") as handle:
                            np.save(handle, self._vectors_np, allow_pickle=False)
                        meta["vectors_file"] = vectors_path(path).name
                        meta["vectors_sha256"] = _sha256_file(tmp_vectors)
                _write_json(tmp_meta, meta)
        logger.info("saved %r to %s (+ %s)", self, path, sidecar_path(path).name)
        return path

    def _metadata(self, index_sha256: str) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "metric": self._metric,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "index_type": self._index_type,
            "codes_fingerprint": self._codes_fingerprint,
            "model_fingerprint": self._model_fingerprint,
            "epoch": self._epoch,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "naics_hnm_version": _package_version(),
            "faiss_version": faiss.__version__,
            "index_sha256": index_sha256,
            "vectors_file": None,
            "vectors_sha256": None,
        }

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        *,
        expected_codes: Sequence[str] | None = None,
        expected_dim: int | None = None,
    ) -> "EmbeddingIndex":
        """Read an index written by :meth:`save`, checking it against its sidecar and expectations.

        ``expected_codes`` (a code list, or anything with ``.codes`` such as a Taxonomy) must match
        the sidecar's code fingerprint; ``expected_dim`` its dim. Mismatches and corrupt files raise
        :class:`IndexFileError` naming the file and both values.
        """
        path = Path(path)
        meta = _read_sidecar(path)
        if expected_dim is not None and int(expected_dim) != meta["dim"]:
            raise IndexFileError(f"index {str(path)!r} has dim {meta['dim']}, expected dim {expected_dim}")
        if expected_codes is not None:
            codes = getattr(expected_codes, "codes", expected_codes)
            want = codes_fingerprint(list(codes))
            if meta["codes_fingerprint"] != want:
                raise IndexFileError(
                    f"index {str(path)!r} was built for code list fingerprint {meta['codes_fingerprint']}, "
                    f"expected {want} (the given {len(codes)} codes); rebuild the index"
                )
        index = _read_index(path, meta)
        if isinstance(index, faiss.IndexFlat):
            vectors = np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)
        else:
            vectors = _read_vectors(path, meta)
        resolved, reason = _resolve_device(device)
        return cls(
            index, vectors, meta["metric"], resolved, index_type=meta["index_type"],
            codes_fingerprint=meta["codes_fingerprint"], model_fingerprint=meta["model_fingerprint"],
            epoch=meta["epoch"], reason=reason,
        )


def duplicate_mask(ids: torch.Tensor) -> torch.Tensor:
    """bool [B, C]: True at every repeat of an id already seen earlier in its row."""
    if ids.shape[1] < 2:
        return torch.zeros_like(ids, dtype=torch.bool)
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    return torch.zeros_like(repeat).scatter_(1, order, repeat)


def select_topk(
    scores: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable top-k of ``scores`` among ``keep`` entries; padded with -1 and the worst score."""
    worst = worst_score(metric)
    masked = scores.masked_fill(~keep, worst)
    order = torch.sort(masked, dim=1, descending=metric != "l2", stable=True).indices[:, :k]
    top_scores = masked.gather(1, order)
    top_ids = ids.gather(1, order).masked_fill(~keep.gather(1, order), -1)
    top_scores = top_scores.masked_fill(top_ids < 0, worst)
    if top_ids.shape[1] < k:
        pad = k - top_ids.shape[1]
        top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=worst)
        top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
    return top_scores, top_ids


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_SIDECAR_KEYS = ("format_version", "metric", "dim", "ntotal", "index_type", "codes_fingerprint",
                 "model_fingerprint", "epoch", "index_sha256")


def _read_sidecar(path: Path) -> dict[str, Any]:
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise IndexFileError(f"index sidecar {str(meta_path)!r} does not exist; expected it beside {str(path)!r}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"index sidecar {str(meta_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise IndexFileError(f"index sidecar {str(meta_path)!r} holds {type(meta).__name__}, expected a JSON object")
    missing = [key for key in _SIDECAR_KEYS if key not in meta]
    if missing:
        raise IndexFileError(f"index sidecar {str(meta_path)!r} lacks key(s) {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexFileError(
            f"index sidecar {str(meta_path)!r} has format_version {meta['format_version']!r}, expected {FORMAT_VERSION}"
        )
    if meta["metric"] not in METRICS:
        raise IndexFileError(
            f"index sidecar {str(meta_path)!r} has metric {meta['metric']!r}, expected one of {METRICS}"
        )
    return meta


def _read_index(path: Path, meta: dict[str, Any]) -> faiss.Index:
    if not path.is_file():
        raise IndexFileError(f"index file {str(path)!r} does not exist")
    digest = _sha256_file(path)
    if digest != meta["index_sha256"]:
        raise IndexFileError(
            f"index file {str(path)!r} has sha256 {digest}, but its sidecar says {meta['index_sha256']} "
            "(corrupt, truncated or replaced); rebuild the index"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexFileError(f"index file {str(path)!r} cannot be read by faiss: {exc}") from exc
    if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
        raise IndexFileError(
            f"index file {str(path)!r} holds ntotal={index.ntotal}, d={index.d}; "
            f"its sidecar says ntotal={meta['ntotal']}, dim={meta['dim']}"
        )
    if index.metric_type != _faiss_metric(meta["metric"]):
        raise IndexFileError(
            f"index file {str(path)!r} has faiss metric {index.metric_type}, sidecar says {meta['metric']!r}"
        )
    return index


def _read_vectors(path: Path, meta: dict[str, Any]) -> np.ndarray:
    file = path.with_name(meta.get("vectors_file") or vectors_path(path).name)
    if not file.is_file():
        raise IndexFileError(f"vectors file {str(file)!r} for approximate index {str(path)!r} does not exist")
    digest = _sha256_file(file)
    if digest != meta.get("vectors_sha256"):
        raise IndexFileError(
            f"vectors file {str(file)!r} has sha256 {digest}, sidecar says {meta.get('vectors_sha256')}"
        )
    vectors = np.load(file, allow_pickle=False)
    expected = (meta["ntotal"], meta["dim"])
    if vectors.shape != expected or vectors.dtype != np.float32:
        raise IndexFileError(
            f"vectors file {str(file)!r} holds {vectors.dtype} {vectors.shape}, expected float32 {expected}"
        )
    return np.ascontiguousarray(vectors)
