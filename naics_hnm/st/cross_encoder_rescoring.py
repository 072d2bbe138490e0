"""Cross-encoder rescoring of mined candidates as in sentence-transformers 6.3: its scores rank the bi-encoder's
nearest candidates and feed every score rule; each distinct (anchor, text) pair is scored once."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from naics_hnm.st.negative_search import SearchRequest, SearchResult, search_run
from naics_hnm.st.text_corpus import TextPairs

logger = logging.getLogger(__name__)


def check_cross_encoder(cross_encoder: Any) -> None:
    """ValueError unless ``cross_encoder`` has ``predict(list[(str, str)]) -> scores`` (a CrossEncoder)."""
    if not callable(getattr(cross_encoder, "predict", None)):
        raise ValueError(f"cross_encoder={type(cross_encoder).__name__}: expected a model with "
                         "predict(list of (query, document) pairs) -> scores (a sentence_transformers.CrossEncoder) "
                         "or None")


class PairScorer:
    """Scores (anchor id, corpus id) pairs of ``texts`` with a cross-encoder, each distinct pair once, longest first;
    with a ``shard`` each rank scores an interleaved slice and all ranks get every score."""

    def __init__(self, cross_encoder: Any, texts: TextPairs, *, batch_size: int, progress: bool,
                 pool: Any = None, shard: Any = None) -> None:
        self.model, self.texts, self.batch_size, self.progress, self.pool, self.shard = (
            cross_encoder, texts, batch_size, progress, pool, shard)
        self.width = np.int64(len(texts.corpus) + 1)
        self._keys = np.zeros(0, dtype=np.int64)      # sorted pair keys anchor * width + corpus id
        self._scores = np.zeros(0, dtype=np.float32)
        self._anchor_len = self._lengths(texts.anchors)
        self._corpus_len = np.full(len(texts.corpus), -1, dtype=np.int64)
        self.pairs_scored = self.calls = 0

    def scores(self, anchors: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float32 scores of the pairs (anchors [m], ids [m]) (ids >= 0); new pairs are scored now."""
        keys = anchors.astype(np.int64) * self.width + ids
        new = np.unique(keys[~self._known(keys)])
        if new.size:
            self._score(new)
        return self._scores[np.searchsorted(self._keys, keys)]

    def _known(self, keys: np.ndarray) -> np.ndarray:
        if not self._keys.size:
            return np.zeros(keys.shape, dtype=bool)
        at = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
        return self._keys[at] == keys

    def _lengths(self, texts: list[str]) -> np.ndarray:
        tokenizer = getattr(self.model, "tokenizer", None)
        if callable(tokenizer) and texts:  # token counts, else characters
            texts = tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
        return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))

    def _score(self, keys: np.ndarray) -> None:
        anchors, ids = keys // self.width, keys % self.width
        unknown = np.unique(ids[self._corpus_len[ids] < 0])
        if unknown.size:
            self._corpus_len[unknown] = self._lengths([self.texts.corpus[i] for i in unknown])
        order = np.argsort(-(self._anchor_len[anchors] + self._corpus_len[ids]), kind="stable")
        pairs = [(self.texts.anchors[a], self.texts.corpus[i]) for a, i in zip(anchors[order], ids[order])]

        def run(positions: np.ndarray) -> np.ndarray:  # positions in the length order
            if self.pool is not None:
                self.calls += 1
                return self._predict([pairs[i] for i in positions])
            scores = np.empty(positions.size, dtype=np.float32)
            for start in tqdm(range(0, positions.size, self.batch_size), desc="rescoring with the cross-encoder",
                              disable=not self.progress, unit="batch"):
                self.calls += 1
                scores[start : start + self.batch_size] = self._predict(
                    [pairs[i] for i in positions[start : start + self.batch_size]])
            return scores

        out = np.empty(keys.size, dtype=np.float32)
        if self.shard is None or self.shard.world_size == 1:
            out[order] = run(np.arange(len(pairs)))
        else:
            from naics_hnm.st.distributed_mining import gather_scores
            out[order] = gather_scores(self.shard, len(pairs), run)
        self.pairs_scored += keys.size
        merged = np.concatenate([self._keys, keys])
        at = np.argsort(merged, kind="stable")
        self._keys, self._scores = merged[at], np.concatenate([self._scores, out])[at]

    def _predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        options = {"batch_size": self.batch_size, "convert_to_numpy": True, "show_progress_bar": False}
        if self.pool is not None:
            options["pool"] = self.pool
        value = self.model.predict(pairs, **options)
        if hasattr(value, "detach"):
            value = value.detach().float().cpu().numpy()
        scores = np.asarray(value, dtype=np.float32)
        if scores.shape != (len(pairs),):
            raise ValueError(f"cross_encoder.predict returned shape {scores.shape} for {len(pairs)} pairs; expected "
                             f"one score per pair ({len(pairs)},): a cross-encoder with num_labels=1")
        if not np.isfinite(scores).all():
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise ValueError(f"cross_encoder.predict scored the pair {pairs[bad]!r} as {scores[bad]}; expected "
                             "finite scores")
        return scores


def rescore_negatives(request: SearchRequest, scorer: PairScorer, window: int,
                      progress: bool = False) -> tuple[SearchResult, np.ndarray]:
    """``(result, positive scores)`` by the cross-encoder, among the bi-encoder's ``window`` nearest texts."""
    n_anchors = request.queries.shape[0]
    anchor_of = np.repeat(np.arange(n_anchors), np.diff(request.pos_offsets))
    positive_scores = scorer.scores(anchor_of, request.pos_ids)
    r = replace(request, positive_scores=positive_scores)
    with search_run(r, r.range_min + r.num_negatives, "ranking negatives by the cross-encoder", progress) as run:

        def settle(rows: np.ndarray, _: np.ndarray, ids: np.ndarray, last: bool, _depth: int) -> np.ndarray:
            """Guard, score the survivors, apply the score rules to those scores and pick (ties: bi-encoder order)."""
            kept = run.guard(rows, ids)
            scores = np.full(ids.shape, -np.inf, dtype=np.float32)
            at = np.nonzero(kept.keep)
            scores[at] = scorer.scores(rows[at[0]], ids[at])
            run.drop_by_score(kept, rows, scores)
            return run.settle(rows, scores, ids, kept, last)

        run.search_in_blocks(np.arange(n_anchors), min(window, r.index.ntotal), 2, lambda _: r.batch_size, settle)
    return run.out, positive_scores


def rescore_with_cross_encoder(cross_encoder: Any, pairs: TextPairs, request: SearchRequest, window: int, *,
                               batch_size: int, progress: bool, use_multi_process: Any = False,
                               shard: Any = None) -> tuple[SearchResult, np.ndarray, int]:
    """``(result, positive scores, pairs scored)`` over the ``window`` nearest texts per anchor; with
    ``use_multi_process`` (True, or a list of devices) through the cross-encoder's multi-process pool."""
    pool = None
    if use_multi_process and callable(getattr(cross_encoder, "start_multi_process_pool", None)):
        pool = cross_encoder.start_multi_process_pool(
            target_devices=None if use_multi_process is True else list(use_multi_process))
    try:
        scorer = PairScorer(cross_encoder, pairs, batch_size=batch_size, progress=progress, pool=pool, shard=shard)
        result, positive_scores = rescore_negatives(request, scorer, window, progress=progress)
    finally:
        if pool is not None:
            cross_encoder.stop_multi_process_pool(pool)
    logger.info("the cross-encoder scored %s distinct (anchor, text) pairs in %s calls", f"{scorer.pairs_scored:,}",
                f"{scorer.calls:,}")
    return result, positive_scores, scorer.pairs_scored
