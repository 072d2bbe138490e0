"""The HDF5 embeddings file: dataset ``embeddings`` float32 [N, d], dataset ``codes`` UTF-8 strings [N] in the same
order, attributes ``model`` ('' if unknown), ``epoch`` (-1 if unknown), ``created`` (ISO 8601 UTC),
``format_version``, ``codes_fingerprint`` (as ``Taxonomy.fingerprint``) and any caller attributes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from naics_hnm.atomic import atomic_path
from naics_hnm.fingerprint import codes_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESERVED_ATTRS = ("model", "epoch", "created", "format_version", "codes_fingerprint")


class EmbeddingsFileError(ValueError):
    """An embeddings file that cannot be written or read as expected; names the path."""


class EmbeddingsFileNotFoundError(EmbeddingsFileError, FileNotFoundError):
    """The embeddings file does not exist (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class EmbeddingsFile:
    """A loaded embeddings file: ``embeddings`` float32 [N, d], ``codes`` [N], ``attrs``."""

    embeddings: np.ndarray
    codes: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


def _check_finite(path: Path, array: np.ndarray, lo: int = 0) -> None:
    """EmbeddingsFileError naming the first row (numbered from ``lo``) that holds NaN or inf."""
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise EmbeddingsFileError(f"{str(path)!r}: embeddings row {lo + int(np.argmin(finite))} holds NaN or inf; "
                                  "expected finite values")


def _check_code_list(path: Path, codes: list[str], n: int) -> None:
    """EmbeddingsFileError unless ``codes`` are ``n`` unique codes."""
    if len(codes) != n:
        raise EmbeddingsFileError(f"{str(path)!r}: {len(codes)} codes for {n} embedding rows; "
                                  "expected one code per row")
    seen: set[str] = set()
    for code in codes:
        if code in seen:
            raise EmbeddingsFileError(f"{str(path)!r}: code {code!r} appears more than once; expected unique codes")
        seen.add(code)


def _as_matrix(embeddings: Any) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().float().numpy()
    return np.asarray(embeddings, dtype=np.float32)


def _checked_attrs(path: Path, codes: Sequence[str], n: int, model: str | None, epoch: int | None,
                   extra_attrs: Mapping[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    codes = [str(c) for c in codes]
    _check_code_list(path, codes, n)
    extra = dict(extra_attrs or {})
    clash = sorted(set(extra) & set(RESERVED_ATTRS))
    if clash:
        raise EmbeddingsFileError(f"extra_attrs {clash} clash with reserved attributes {list(RESERVED_ATTRS)}")
    return codes, {"model": "" if model is None else str(model), "epoch": -1 if epoch is None else int(epoch),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "format_version": FORMAT_VERSION, "codes_fingerprint": codes_fingerprint(codes), **extra}


def _write_file(file: Path, embeddings: np.ndarray | tuple[int, int], codes: list[str], attrs: dict[str, Any]) -> None:
    """The datasets and attributes; ``embeddings`` as a shape leaves the rows to :func:`write_embedding_rows`."""
    with h5py.File(file, "w") as handle:
        if isinstance(embeddings, tuple):
            handle.create_dataset("embeddings", shape=embeddings, dtype=np.float32)
        else:
            handle.create_dataset("embeddings", data=embeddings)
        handle.create_dataset("codes", data=codes, dtype=h5py.string_dtype("utf-8"))
        for key, value in attrs.items():
            try:
                handle.attrs[key] = value
            except (TypeError, ValueError) as error:
                raise EmbeddingsFileError(f"attribute {key!r}={value!r} cannot be stored in HDF5 ({error}); "
                                          "expected a string, number or array") from None


def save_embeddings(path: str | Path, embeddings: Any, codes: Sequence[str], *, model: str | None = None,
                    epoch: int | None = None, extra_attrs: Mapping[str, Any] | None = None) -> Path:
    """Write ``embeddings`` [N, d] (numpy or torch) and ``codes`` [N] atomically to ``path``."""
    path = Path(path)
    array = _as_matrix(embeddings)
    if array.ndim != 2:
        raise EmbeddingsFileError(f"{str(path)!r}: embeddings have shape {tuple(array.shape)}; expected [N, d]")
    _check_finite(path, array)
    codes, attrs = _checked_attrs(path, codes, array.shape[0], model, epoch, extra_attrs)
    with atomic_path(path) as tmp:
        _write_file(tmp, array, codes, attrs)
    logger.info("wrote %d embeddings of dimension %d to %s", array.shape[0], array.shape[1], path)
    return path


def create_embeddings_file(file: str | Path, shape: tuple[int, int], codes: Sequence[str], *,
                           model: str | None = None, epoch: int | None = None) -> None:
    """Write at ``file`` (a temporary name) an embeddings file of ``shape``; :func:`write_embedding_rows` fills it."""
    file = Path(file)
    codes, attrs = _checked_attrs(file, codes, shape[0], model, epoch, None)
    _write_file(file, (int(shape[0]), int(shape[1])), codes, attrs)


def write_embedding_rows(file: str | Path, lo: int, rows: Any) -> None:
    """Fill rows ``[lo, lo + len(rows))`` of a file made by :func:`create_embeddings_file` (one writer at a time)."""
    array = _as_matrix(rows)
    _check_finite(Path(file), array, lo)
    with h5py.File(file, "r+") as handle:
        handle["embeddings"][lo:lo + len(array)] = array


def embedding_rows(path: str | Path, lo: int, hi: int, *, expected_codes: Sequence[str]) -> np.ndarray:
    """Rows ``[lo, hi)`` of an embeddings file written for ``expected_codes`` (its fingerprint is checked)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingsFileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    want = codes_fingerprint(list(expected_codes))
    try:
        with h5py.File(path, "r") as handle:
            if _plain(handle.attrs.get("codes_fingerprint")) != want:
                raise EmbeddingsFileError(f"{str(path)!r} was not written for the expected {len(expected_codes)} codes "
                                          f"(codes fingerprint differs from {want})")
            return np.asarray(handle["embeddings"][lo:hi], dtype=np.float32)
    except (OSError, KeyError) as error:
        raise EmbeddingsFileError(f"{str(path)!r} is not a readable HDF5 embeddings file: {error}") from None


def embeddings_sha256(path: str | Path, chunk_rows: int = 65536) -> str:
    """sha256 of the float32 bytes of dataset ``embeddings``, read ``chunk_rows`` at a time (bounded memory)."""
    digest = hashlib.sha256()
    with h5py.File(path, "r") as handle:
        dataset = handle["embeddings"]
        for start in range(0, dataset.shape[0], chunk_rows):
            digest.update(np.ascontiguousarray(dataset[start:start + chunk_rows], dtype=np.float32).view(np.uint8))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, float, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype.kind in "OS" else value.tolist()
    return value


def _read(path: Path) -> EmbeddingsFile:
    with h5py.File(path, "r") as handle:
        missing = [name for name in ("embeddings", "codes") if not isinstance(handle.get(name), h5py.Dataset)]
        if missing:
            raise EmbeddingsFileError(f"{str(path)!r} lacks dataset(s) {missing}; expected 'embeddings' and 'codes'")
        dataset = handle["embeddings"]
        if dataset.ndim != 2 or dataset.dtype.kind != "f":
            raise EmbeddingsFileError(f"{str(path)!r}: dataset 'embeddings' has shape {dataset.shape} and dtype "
                                      f"{dataset.dtype}; expected float [N, d]")
        code_set = handle["codes"]
        if code_set.ndim != 1 or code_set.dtype.kind not in "OS":
            raise EmbeddingsFileError(f"{str(path)!r}: dataset 'codes' has shape {code_set.shape} and dtype "
                                      f"{code_set.dtype}; expected strings [N]")
        return EmbeddingsFile(embeddings=np.asarray(dataset[()], dtype=np.float32),
                              codes=[str(c) for c in code_set.asstr()[()]],
                              attrs={key: _plain(value) for key, value in handle.attrs.items()})


def _check_codes(path: Path, codes: list[str], expected: Sequence[str]) -> None:
    expected = list(expected)
    if len(codes) != len(expected):
        raise EmbeddingsFileError(f"{str(path)!r} holds {len(codes)} codes; expected {len(expected)}")
    differ = np.flatnonzero(np.asarray(codes, dtype=object) != np.asarray(expected, dtype=object))
    if differ.size:
        first = int(differ[0])
        raise EmbeddingsFileError(f"{str(path)!r}: {differ.size} of {len(codes)} codes differ from the expected codes; "
                                  f"first at row {first}: {codes[first]!r}, expected {expected[first]!r}")


def load_embeddings(path: str | Path, *, expected_codes: Sequence[str] | None = None) -> EmbeddingsFile:
    """Read and check an embeddings file; every problem is an :class:`EmbeddingsFileError`."""
    path = Path(path)
    if not path.exists():
        raise EmbeddingsFileNotFoundError(f"embeddings file {str(path)!r} does not exist")
    if not path.is_file():
        raise EmbeddingsFileError(f"embeddings file {str(path)!r} is not a file")
    try:
        loaded = _read(path)
    except OSError as error:
        raise EmbeddingsFileError(f"{str(path)!r} is not a readable HDF5 embeddings file (truncated or another "
                                  f"format?): {error}") from None
    _check_code_list(path, loaded.codes, loaded.embeddings.shape[0])
    _check_finite(path, loaded.embeddings)
    stored = loaded.attrs.get("codes_fingerprint")
    if stored is not None and stored != codes_fingerprint(loaded.codes):
        raise EmbeddingsFileError(f"{str(path)!r}: codes do not match the file's codes_fingerprint attribute "
                                  "(corrupted?)")
    if expected_codes is not None:
        _check_codes(path, loaded.codes, expected_codes)
    return loaded
