"""The on-disk format of an index: generation-named payload files (``x.faiss.g000042.index`` and, if approximate,
``.vectors.npy``) switched by one sidecar ``x.faiss.json`` whose atomic rename is the one commit point; ``x.faiss``
is then a hard link to (or copy of) the index file. One writer per path at a time, under ``flock``. Format 1
(index at ``path``) is still read. The guarantees and their tests: README, "Reliability"."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePath
from typing import Any, Callable

import faiss
import numpy as np

from naics_hnm.atomic import create_temp, ensure_folder, exclusive_lock, is_stale_temp
from naics_hnm.index.metric import METRICS, get_metric

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("format_version", "metric", "dim", "ntotal", "index_type", "codes_fingerprint",
                 "model_fingerprint", "epoch", "index_sha256")
LOCK_TIMEOUT_S = 600.0  # seconds a save waits for another process saving the same path
READ_ATTEMPTS = 5


class IndexFileError(ValueError):
    """An index file or its sidecar is missing, corrupt or does not match what was expected."""


def sidecar_path(path: str | Path) -> Path:
    """The sidecar of the index set named ``path``: ``path + ".json"``."""
    return Path(str(path) + ".json")


def vectors_path(path: str | Path) -> Path:
    """Where format 1 kept the vectors of an approximate index: ``path + ".vectors.npy"``."""
    return Path(str(path) + ".vectors.npy")


def faiss_metric(metric: str) -> int:
    """The faiss metric constant behind one of :data:`METRICS`."""
    return getattr(faiss, get_metric(metric).faiss_name)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index_files(path: str | Path, index: faiss.Index, vectors: np.ndarray | None,
                      meta: dict[str, Any], lock_timeout: float | None = None) -> dict[str, Any]:
    """Write a new generation of CPU ``index`` and ``vectors`` (or None) as the set named ``path``, switch to it
    under the path's lock (``lock_timeout`` seconds) and return the sidecar; a failure leaves the previous set."""
    path = Path(path)
    check_index_path(path)
    ensure_folder(path.parent)
    with exclusive_lock(path, timeout=LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout,
                        hidden=True, remove=True):
        generation = _next_generation(path)
        stem = f"{path.name}.g{generation:06d}"
        index_file, vectors_file = path.parent / f"{stem}.index", path.parent / f"{stem}.vectors.npy"
        sidecar = {**meta, "format_version": FORMAT_VERSION, "generation": generation,
                   "index_file": index_file.name, "vectors_file": None, "vectors_sha256": None}
        written: list[Path] = []
        try:
            sidecar["index_sha256"] = _write_durably(index_file, lambda tmp: faiss.write_index(index, str(tmp)))
            written.append(index_file)
            if vectors is not None:
                sidecar["vectors_sha256"] = _write_durably(vectors_file, lambda tmp: _save_npy(tmp, vectors))
                sidecar["vectors_file"] = vectors_file.name
                written.append(vectors_file)
            _fsync_dir(path.parent)
            _write_durably(sidecar_path(path), lambda tmp: _write_json(tmp, sidecar))
        except BaseException:
            for file in written:
                file.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        _publish(path, index_file)
        _remove_stale(path, generation)
        return sidecar


def check_index_path(path: str | Path) -> Path:
    """Refuse, before anything is written, an index path that names a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise IndexFileError(f"index path {str(path)!r} is a folder; expected a file path inside it, "
                             f"such as {str(path / 'index.faiss')!r}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise IndexFileError(f"index path {str(path)!r} lies under {str(blocker)!r}, which is a file; "
                             "expected a folder there")
    if sidecar_path(path).is_dir():
        raise IndexFileError(f"index sidecar path {str(sidecar_path(path))!r} is a folder; expected a file or "
                             "nothing there")
    return path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The validated sidecar of ``path``; format 1 gains the ``index_file`` / ``vectors_file`` it implied."""
    path = Path(path)
    meta_path = sidecar_path(path)
    where = f"index sidecar {str(meta_path)!r}"
    if not meta_path.is_file():
        raise IndexFileError(f"{where} does not exist; expected it beside {str(path)!r}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise IndexFileError(f"{where} holds {type(meta).__name__}, expected a JSON object")
    required = REQUIRED_KEYS + (("index_file", "generation") if meta.get("format_version") == FORMAT_VERSION else ())
    missing = [key for key in required if key not in meta]
    if missing:
        raise IndexFileError(f"{where} lacks key(s) {missing}")
    if meta["format_version"] not in READABLE_VERSIONS:
        raise IndexFileError(f"{where} has format_version {meta['format_version']!r}, expected one of "
                             f"{READABLE_VERSIONS}")
    if meta["metric"] not in METRICS:
        raise IndexFileError(f"{where} has metric {meta['metric']!r}, expected one of {METRICS}")
    for key, least in (("dim", 1), ("ntotal", 0)) + ((("generation", 1),) if meta["format_version"] == 2 else ()):
        value = meta[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise IndexFileError(f"{where} has {key} {value!r}, expected an integer >= {least}")
    if not isinstance(meta["index_sha256"], str):
        raise IndexFileError(f"{where} has index_sha256 {meta['index_sha256']!r}, expected a hex string")
    if meta["format_version"] == 1:
        meta = {**meta, "index_file": path.name, "vectors_file": meta.get("vectors_file") or vectors_path(path).name}
    for key in ("index_file", "vectors_file"):
        _check_member(meta_path, key, meta.get(key), required=key == "index_file")
    params = meta.setdefault("search_params", {})
    if not isinstance(params, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in params.values()):
        raise IndexFileError(f"{where} has search_params {params!r}, expected an object of integer values")
    return meta


def read_index_set(path: str | Path, read: Callable[[dict[str, Any]], Any]) -> Any:
    """``read(meta)`` with the validated sidecar of ``path``; again with the new sidecar when a save
    committed in between and removed the files ``meta`` names (loads take no lock)."""
    meta = read_sidecar(path)
    for attempt in range(READ_ATTEMPTS):
        try:
            return read(meta)
        except (IndexFileError, OSError):
            newer = read_sidecar(path)
            same = all(newer.get(key) == meta.get(key) for key in ("generation", "index_sha256"))
            if attempt + 1 == READ_ATTEMPTS or same:
                raise
            meta = newer


def current_index_file(path: str | Path) -> Path:
    """The faiss file the sidecar of ``path`` names now (for tools that read it with faiss)."""
    return Path(path).parent / read_sidecar(path)["index_file"]


def read_index_file(path: str | Path, meta: dict[str, Any]) -> faiss.Index:
    """The faiss index named by ``meta``, checked against its checksum, sizes and metric."""
    file = Path(path).parent / meta["index_file"]
    _check_checksum(file, meta["index_sha256"], "index file")
    try:
        index = faiss.read_index(str(file))
    except RuntimeError as exc:
        raise IndexFileError(f"index file {str(file)!r} cannot be read by faiss: {exc}") from exc
    if index.ntotal != meta["ntotal"] or index.d != meta["dim"]:
        raise IndexFileError(f"index file {str(file)!r} holds ntotal={index.ntotal}, d={index.d}; "
                             f"its sidecar says ntotal={meta['ntotal']}, dim={meta['dim']}")
    if index.metric_type != faiss_metric(meta["metric"]):
        raise IndexFileError(f"index file {str(file)!r} has faiss metric {index.metric_type}, "
                             f"sidecar says {meta['metric']!r}")
    return index


def read_vectors_file(path: str | Path, meta: dict[str, Any]) -> np.ndarray:
    """The float32 [ntotal, dim] vectors named by ``meta``, checked against checksum and shape."""
    file = Path(path).parent / meta["vectors_file"]
    _check_checksum(file, meta.get("vectors_sha256"), f"vectors file of approximate index {str(path)!r},")
    vectors = np.load(file, allow_pickle=False)
    expected = (meta["ntotal"], meta["dim"])
    if vectors.shape != expected or vectors.dtype != np.float32:
        raise IndexFileError(f"vectors file {str(file)!r} holds {vectors.dtype} {vectors.shape}, "
                             f"expected float32 {expected}")
    return np.ascontiguousarray(vectors)


def _check_member(meta_path: Path, key: str, name: Any, required: bool) -> None:
    """Refuse a sidecar file name that is not a plain name inside the sidecar's own folder."""
    if name is None and not required:
        return
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
    if not plain or PurePath(name).is_absolute() or PurePath(name).name != name:
        raise IndexFileError(f"index sidecar {str(meta_path)!r} names {key} {name!r}; expected a plain file name "
                             f"inside {str(meta_path.parent)!r}")


def _check_checksum(file: Path, expected: Any, what: str) -> None:
    if not file.is_file():
        raise IndexFileError(f"{what} {str(file)!r} does not exist")
    digest = sha256_file(file)
    if digest != expected:
        raise IndexFileError(f"{what} {str(file)!r} has sha256 {digest}, but its sidecar says {expected} "
                             "(corrupt, truncated or replaced); rebuild the index")


def _write_json(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_npy(path: Path, vectors: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, vectors, allow_pickle=False)


def _write_durably(target: Path, write: Callable[[Path], None]) -> str:
    """Write ``target`` through a fsynced temporary renamed over it (else left as it was); return its sha256."""
    tmp = create_temp(target)
    try:
        write(tmp)
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _publish(path: Path, index_file: Path) -> None:
    """Put the committed index file at ``path`` too: a hard link, else a copy, renamed into place."""
    tmp = create_temp(path)
    tmp.unlink()
    try:
        try:
            os.link(index_file, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(index_file, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_files(path: Path) -> tuple[re.Pattern, re.Pattern]:
    """Patterns of this set's generation files (group 1 = generation) and of our temporaries (older mkstemp too)."""
    name = re.escape(path.name)
    generation = re.compile(rf"{name}\.g(\d+)\.(?:index|vectors\.npy)")
    payload = r"(?:g\d+\.index\.|g\d+\.vectors\.npy\.|json\.|vectors\.npy\.)?"
    temporary = re.compile(rf"\.{name}\.{payload}(?:(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}"
                           rf"|[a-z0-9_]{{8}})\.tmp")
    return generation, temporary


def _next_generation(path: Path) -> int:
    """One more than any generation on disk or in the sidecar being replaced (chosen under the lock)."""
    try:
        previous = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or corrupt: nothing to carry over, it is replaced anyway
        previous = None
    generation, _ = _own_files(path)
    seen = [int(m.group(1)) for p in path.parent.iterdir() if (m := generation.fullmatch(p.name))]
    last = previous.get("generation") if isinstance(previous, dict) else None
    if isinstance(last, int) and not isinstance(last, bool):
        seen.append(last)
    return max(seen, default=0) + 1


def _remove_stale(path: Path, committed: int) -> None:
    """Delete the set's generations older than ``committed``, format 1 files and dead writers' temporaries."""
    generation, temporary = _own_files(path)
    for file in path.parent.iterdir():
        if (m := generation.fullmatch(file.name)) is not None:
            stale = int(m.group(1)) < committed
        elif (m := temporary.fullmatch(file.name)) is not None:
            # mkstemp names of earlier versions carry no writer: under the lock we hold, theirs is gone
            stale = m["pid"] is None or is_stale_temp(file, m, time.time())
        else:
            continue
        if stale and file.is_file():
            file.unlink(missing_ok=True)
    vectors_path(path).unlink(missing_ok=True)
