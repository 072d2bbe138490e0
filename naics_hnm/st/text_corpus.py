"""The (anchor, positive) rows of a dataset as ids of distinct texts: :func:`collect_pairs` reads them,
:func:`embed_pairs` embeds each distinct text once, :func:`output_columns` writes mined ids back."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from naics_hnm.atomic import atomic_path
from naics_hnm.index.knn import normalise_rows

logger = logging.getLogger(__name__)

QUERY, DOCUMENT = "query", "document"
_DEFAULT_PROMPT_NAMES = {QUERY: ("query",), DOCUMENT: ("document", "passage", "corpus")}


@dataclass
class TextPairs:
    """Distinct anchors and corpus texts of a pair dataset; positives as corpus ids (CSR)."""

    anchor_column: str
    positive_column: str
    anchors: list[str]           # distinct anchor texts, first appearance order
    corpus: list[str]            # distinct corpus texts: corpus + positives, first appearance order
    pos_offsets: np.ndarray      # int64 [A + 1]: positives of anchor a are pos_ids[off[a]:off[a + 1]]
    pos_ids: np.ndarray          # int64 [P]: corpus ids, distinct per anchor, first appearance order
    self_ids: np.ndarray         # int64 [A]: corpus id of the anchor's own text, -1 if not in the corpus
    rows: int                    # rows of the input dataset

    @property
    def positives_per_anchor(self) -> np.ndarray:
        return np.diff(self.pos_offsets)

    def text_keys(self) -> np.ndarray:
        """int64 per anchor from its text (for counter-based random draws independent of row order)."""
        return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little", signed=True)
                         for t in self.anchors], dtype=np.int64)


def column_names(dataset: Any) -> list[str]:
    """Column names of a ``datasets.Dataset``, a mapping of columns, or anything with ``column_names``."""
    names = getattr(dataset, "column_names", None)
    if names is None and isinstance(dataset, Mapping):
        names = list(dataset.keys())
    if names is None:
        raise TypeError(f"dataset must be a datasets.Dataset or a mapping of column name -> list of texts, "
                        f"got {type(dataset).__name__}")
    return list(names)


def _text_column(dataset: Any, name: str) -> list[str]:
    column = dataset[name]
    values = list(column[:]) if hasattr(column, "__getitem__") else list(column)  # a Dataset column: fast slice
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"dataset column {name!r} row {row}: expected a string, got {type(value).__name__} "
                            f"{value!r}")
    return values


def resolve_columns(dataset: Any, anchor_column: str | None, positive_column: str | None) -> tuple[str, str]:
    """The anchor and positive column names: given ones must exist; None takes the first / second column."""
    names = column_names(dataset)
    for label, value in (("anchor_column_name", anchor_column), ("positive_column_name", positive_column)):
        if value is not None and value not in names:
            raise ValueError(f"{label}={value!r} is not a column of the dataset; its columns are {names}")
    if anchor_column is None:
        if not names:
            raise ValueError("the dataset has no columns; expected (anchor, positive) text columns")
        anchor_column = names[0]
    if positive_column is None:
        if len(names) < 2:
            raise ValueError(f"the dataset has the columns {names}; expected at least two (anchor, positive) "
                             "to pick the positive column, or pass positive_column_name=")
        positive_column = names[1]
    if anchor_column == positive_column:
        raise ValueError(f"anchor_column_name and positive_column_name are both {anchor_column!r}; "
                         "expected two different columns")
    return anchor_column, positive_column


def collect_pairs(dataset: Any, anchor_column: str | None, positive_column: str | None,
                  corpus: Sequence[str] | None) -> TextPairs:
    """Read the pairs; rows with the same anchor text share one anchor and all of its positives."""
    anchor_column, positive_column = resolve_columns(dataset, anchor_column, positive_column)
    anchor_rows = _text_column(dataset, anchor_column)
    positive_rows = _text_column(dataset, positive_column)
    if len(anchor_rows) != len(positive_rows):
        raise ValueError(f"column {anchor_column!r} has {len(anchor_rows)} rows but column {positive_column!r} has "
                         f"{len(positive_rows)}; expected columns of equal length, one (anchor, positive) pair a row")
    if not anchor_rows:
        raise ValueError("the dataset is empty; expected at least one (anchor, positive) row")
    if corpus is not None:
        if isinstance(corpus, (str, bytes)) or not isinstance(corpus, Sequence):
            raise TypeError(f"corpus must be a list of strings or None, got {type(corpus).__name__}")
        for i, text in enumerate(corpus):
            if not isinstance(text, str):
                raise TypeError(f"corpus[{i}]: expected a string, got {type(text).__name__} {text!r}")
    corpus_texts = list(dict.fromkeys([*(corpus or ()), *positive_rows]))
    corpus_id = {text: i for i, text in enumerate(corpus_texts)}
    anchor_id: dict[str, int] = {}
    positives: list[dict[int, None]] = []
    for anchor, positive in zip(anchor_rows, positive_rows):
        a = anchor_id.setdefault(anchor, len(anchor_id))
        if a == len(positives):
            positives.append({})
        positives[a][corpus_id[positive]] = None
    offsets = np.zeros(len(positives) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in positives], out=offsets[1:])
    pos_ids = np.fromiter((i for p in positives for i in p), dtype=np.int64, count=int(offsets[-1]))
    anchors = list(anchor_id)
    self_ids = np.array([corpus_id.get(a, -1) for a in anchors], dtype=np.int64)
    return TextPairs(anchor_column, positive_column, anchors, corpus_texts, offsets, pos_ids, self_ids,
                     len(anchor_rows))


def is_sentence_transformer(model: Any) -> bool:
    """Duck typing: a model with ``encode_query`` and ``encode_document`` (sentence-transformers >= 5)."""
    return callable(getattr(model, "encode_query", None)) and callable(getattr(model, "encode_document", None))


def resolved_prompt(model: Any, role: str, prompt: str | None, prompt_name: str | None) -> str:
    """The prompt text the model prepends for ``role``, resolved as sentence-transformers does."""
    prompts = getattr(model, "prompts", None) or {}
    if prompt is not None:
        return prompt
    label = "query_prompt_name" if role == QUERY else "corpus_prompt_name"
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise ValueError(f"{label}={prompt_name!r} is not a prompt of the model; its prompts are {sorted(prompts)}")
        return prompts[prompt_name]
    if not is_sentence_transformer(model):
        return ""
    for name in _DEFAULT_PROMPT_NAMES[role]:
        if name in prompts:
            return prompts[name]
    default = getattr(model, "default_prompt_name", None)
    return prompts.get(default) or "" if default else ""


def encodes_alike(model: Any, query: tuple[str | None, str | None], document: tuple[str | None, str | None]) -> bool:
    """Whether queries and documents get the same embedding: same prompt, and no task router."""
    modules = getattr(model, "modules", None)
    if is_sentence_transformer(model) and callable(modules) and any(type(m).__name__ == "Router" for m in modules()):
        return False
    return resolved_prompt(model, QUERY, *query) == resolved_prompt(model, DOCUMENT, *document)


def _length_order(model: Any, texts: list[str]) -> np.ndarray:
    """Longest first by token count when the model has a tokenizer, else by characters."""
    tokenizer = getattr(model, "tokenizer", None)
    if callable(tokenizer) and texts:
        try:
            limit = getattr(model, "max_seq_length", None)
            kwargs = {"truncation": True, "max_length": limit} if isinstance(limit, int) else {}
            return np.argsort(-np.array([len(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]]), kind="stable")
        except Exception:  # noqa: BLE001 - any tokenizer trouble: fall back to characters
            pass
    return np.argsort(-np.array([len(t) for t in texts]), kind="stable")


def _as_matrix(value: Any, n: int) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"model.encode returned shape {arr.shape} for {n} texts; expected [{n}, d]")
    return arr


def embed_texts(model: Any, texts: list[str], role: str, prompt: str | None, prompt_name: str | None, *,
                batch_size: int, progress: bool = False, pool: Any = None) -> np.ndarray:
    """float32 [len(texts), d], L2-normalised; one model call per batch, longest texts first."""
    if not texts:
        raise ValueError(f"no {role} texts to embed")
    if is_sentence_transformer(model):
        method = model.encode_query if role == QUERY else model.encode_document
        options = {"prompt": prompt, "prompt_name": prompt_name, "batch_size": batch_size,
                   "normalize_embeddings": True, "convert_to_numpy": True, "show_progress_bar": False}
        if pool is not None:  # one call: the pool splits the work itself
            return _normalised(_as_matrix(method(texts, pool=pool, **options), len(texts)), texts)
        encode = partial(method, **options)
    else:
        prefix = resolved_prompt(model, role, prompt, prompt_name)

        def encode(batch: list[str]) -> Any:
            return model.encode([prefix + t for t in batch] if prefix else batch)
    order = _length_order(model, texts)
    out: np.ndarray | None = None
    for start in tqdm(range(0, len(texts), batch_size), desc=f"embedding {role} texts", disable=not progress,
                      unit="batch"):
        rows = order[start : start + batch_size]
        emb = _as_matrix(encode([texts[i] for i in rows]), len(rows))
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[rows] = emb
    return _normalised(out, texts)


def _normalised(x: np.ndarray, texts: list[str]) -> np.ndarray:
    """Unit rows; rows whose norm over- or underflows float32 go through the index's ``normalise_rows``."""
    bad = ~np.isfinite(x).all(axis=1) | ~(x != 0).any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"the model embedded {texts[row]!r} as a zero or non-finite vector "
                         f"({int(bad.sum())} such texts); expected finite non-zero embeddings")
    with np.errstate(over="ignore", under="ignore"):
        norms = np.linalg.norm(x, axis=1)
    extreme = ~np.isfinite(norms) | (norms < np.finfo(np.float32).tiny)
    out = x / norms[:, None]
    if extreme.any():
        out[extreme] = normalise_rows(x[extreme], "embeddings")
    return np.ascontiguousarray(out, dtype=np.float32)


def model_fingerprint(model: Any) -> str | None:
    """A cheap identity of the weights (a strided sample of every tensor); None when unknown."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    state_dict = getattr(model, "state_dict", None)
    if callable(state_dict):
        for name, tensor in state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu().numpy()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(sample.tobytes())
        return digest.hexdigest()
    key = getattr(model, "cache_key", None)
    if key is None:
        return None
    digest.update(repr(key).encode())
    return digest.hexdigest()


def cached_embeddings(cache_folder: str | Path | None, fingerprint: str | None, role: str, prompt_key: Any,
                      texts: list[str], compute: Any) -> np.ndarray:
    """``compute()`` or the cached result for (model, role, prompt, texts) under ``cache_folder``."""
    if cache_folder is None or fingerprint is None:
        if cache_folder is not None:
            logger.warning("cache_folder: the model has no state_dict() or cache_key attribute to identify it; "
                           "embeddings are not cached")
        return compute()
    key = hashlib.sha256(repr((fingerprint, role, prompt_key, texts)).encode()).hexdigest()[:32]
    path = Path(cache_folder) / f"naics_hnm_{role}_embeddings_{key}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.ndim == 2 and cached.shape[0] == len(texts) and cached.dtype == np.float32:
                logger.info("loaded %d %s embeddings from %s", len(texts), role, path)
                return cached
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable embedding cache %s: %s", path, exc)
    vectors = compute()
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.save(handle, vectors)
    logger.info("cached %d %s embeddings in %s", len(texts), role, path)
    return vectors


def embed_pairs(model: Any, pairs: TextPairs, query_args: tuple[str | None, str | None],
                document_args: tuple[str | None, str | None], *, batch_size: int, progress: bool,
                cache_folder: str | Path | None, use_multi_process: Any,
                shard: Any = None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(corpus vectors [T, d], query vectors [A, d], texts embedded)``, unit norm; with a ``shard`` each rank
    embeds a slice of the texts and every rank receives all vectors."""
    fingerprint = model_fingerprint(model) if cache_folder is not None else None
    pool = None
    if use_multi_process:
        pool = model.start_multi_process_pool(target_devices=None if use_multi_process is True
                                              else list(use_multi_process))
    try:
        def embed(texts: list[str], role: str, args: tuple[str | None, str | None]) -> np.ndarray:
            key = (resolved_prompt(model, role, *args), is_sentence_transformer(model))

            def run(part: list[str]) -> np.ndarray:
                return cached_embeddings(cache_folder, fingerprint, role, key, part, lambda: embed_texts(
                    model, part, role, *args, batch_size=batch_size, progress=progress, pool=pool))

            if shard is None:
                return run(texts)
            from naics_hnm.st.distributed_mining import embed_sharded
            return embed_sharded(shard, texts, run)

        if encodes_alike(model, query_args, document_args):
            outside = pairs.self_ids < 0
            vectors = embed(pairs.corpus + [a for a, out in zip(pairs.anchors, outside) if out], DOCUMENT,
                            document_args)
            corpus = vectors[: len(pairs.corpus)]
            queries = np.empty((len(pairs.anchors), vectors.shape[1]), dtype=np.float32)
            queries[~outside] = corpus[pairs.self_ids[~outside]]
            queries[outside] = vectors[len(pairs.corpus):]
            return corpus, queries, len(vectors)
        corpus = embed(pairs.corpus, DOCUMENT, document_args)
        queries = embed(pairs.anchors, QUERY, query_args)
        if queries.shape[1] != corpus.shape[1]:
            raise ValueError(f"the model embeds queries with dim {queries.shape[1]} but documents with dim "
                             f"{corpus.shape[1]}; expected one dim")
        return corpus, queries, len(corpus) + len(queries)
    finally:
        if pool is not None:
            model.stop_multi_process_pool(pool)


@dataclass
class OutputRows:
    """The output columns, how many (anchor, positive) rows were left out, the scores written."""

    columns: dict[str, list]
    dropped_rows: int
    positive_scores: np.ndarray
    negative_scores: np.ndarray


def output_columns(pairs: TextPairs, neg_ids: np.ndarray, neg_scores_all: np.ndarray, positive_scores: np.ndarray,
                   output_format: str, output_scores: bool, num_negatives: int) -> OutputRows:
    """sentence-transformers' columns, rows grouped by anchor then positive, from ``neg_ids`` / ``neg_scores_all``
    [A, n] (valid entries first); rows without the negatives their format needs are left out, as it does."""
    corpus, off = pairs.corpus, pairs.pos_offsets
    found = (neg_ids >= 0).sum(axis=1)
    columns = empty_columns(pairs.anchor_column, pairs.positive_column, output_format, output_scores, num_negatives)
    negative_scores: list[np.ndarray] = []
    kept_positive_scores: list[np.ndarray] = []
    dropped = 0
    for a, anchor in enumerate(pairs.anchors):
        negs = neg_ids[a, : found[a]].tolist()
        pos = pairs.pos_ids[off[a] : off[a + 1]].tolist()
        if (output_format == "n-tuple" and len(negs) < num_negatives) or (
                output_format in ("triplet", "labeled-list") and not negs):
            dropped += len(pos)
            continue
        kept_positive_scores.append(positive_scores[off[a] : off[a + 1]])
        negative_scores.append(np.tile(neg_scores_all[a, : found[a]], len(pos)))
        _add_rows(columns, output_format, output_scores, anchor, [corpus[p] for p in pos],
                  positive_scores[off[a] : off[a + 1]].tolist(), [corpus[i] for i in negs],
                  neg_scores_all[a, : found[a]].tolist(), num_negatives)
    empty = np.zeros(0, np.float32)
    return OutputRows(columns, dropped, np.concatenate(kept_positive_scores) if kept_positive_scores else empty,
                      np.concatenate(negative_scores) if negative_scores else empty)


def empty_columns(anchor_col: str, positive_col: str, fmt: str, with_scores: bool, n: int) -> dict[str, list]:
    """The column names of each output format, as sentence-transformers writes them."""
    if fmt == "triplet":
        names = ["negative"] + (["scores"] if with_scores else [])
    elif fmt == "n-tuple":
        names = [f"negative_{j + 1}" for j in range(n)] + (["scores"] if with_scores else [])
    elif fmt == "labeled-pair":
        names = ["score" if with_scores else "label"]
    else:
        names = ["scores" if with_scores else "labels"]
    if {anchor_col, positive_col} & set(names):
        raise ValueError(f"the dataset columns {anchor_col!r}, {positive_col!r} clash with the output columns {names} "
                         f"of output_format={fmt!r}; rename them")
    return {name: [] for name in (anchor_col, positive_col, *names)}


def _add_rows(columns: dict[str, list], fmt: str, with_scores: bool, anchor: str, positives: list[str],
              pos_scores: list[float], negatives: list[str], neg_scores: list[float], n: int) -> None:
    """Append one anchor's rows in format ``fmt``."""
    anchor_list, positive_list = list(columns.values())[:2]
    if fmt == "triplet":
        for positive, ps in zip(positives, pos_scores):
            anchor_list += [anchor] * len(negatives)
            positive_list += [positive] * len(negatives)
            columns["negative"] += negatives
            if with_scores:
                columns["scores"] += [[ps, ns] for ns in neg_scores]
    elif fmt == "n-tuple":
        for positive, ps in zip(positives, pos_scores):
            anchor_list.append(anchor)
            positive_list.append(positive)
            for j in range(n):
                columns[f"negative_{j + 1}"].append(negatives[j])
            if with_scores:
                columns["scores"].append([ps, *neg_scores])
    elif fmt == "labeled-pair":
        anchor_list += [anchor] * (len(positives) + len(negatives))
        positive_list += positives + negatives
        if with_scores:
            columns["score"] += pos_scores + neg_scores
        else:
            columns["label"] += [1] * len(positives) + [0] * len(negatives)
    else:  # labeled-list
        for positive, ps in zip(positives, pos_scores):
            anchor_list.append(anchor)
            positive_list.append([positive, *negatives])
            if with_scores:
                columns["scores"].append([ps, *neg_scores])
            else:
                columns["labels"].append([1] + [0] * len(negatives))


def as_output(columns: dict[str, list], like: Any) -> Any:
    """A ``datasets.Dataset`` when the input was one, else the dict of columns."""
    if type(like).__module__.split(".")[0] == "datasets":
        from datasets import Dataset
        return Dataset.from_dict(columns)
    return columns
