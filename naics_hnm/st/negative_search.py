"""Exact negative search over an :class:`EmbeddingIndex` of distinct corpus texts: valid candidates are the corpus
less the anchor's text, its positives, its codes' relatives and what the score rules drop; ``range_min`` /
``range_max`` are ranks among them, and rows are searched deeper until they have them or the corpus is exhausted."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from naics_hnm.data.counter_rng import item_keys, uniforms
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import pad_ids, search_deeper, select_topk_np
from naics_hnm.tree.guard import TreeGuard, too_near
from naics_hnm.tree.taxonomy import Taxonomy

_BLOCK_ENTRIES = 1 << 20        # [rows, depth] candidates of one faiss search block
_SCAN_BLOCK_BYTES = 128 << 20   # [rows, N] float32 scores of one exact scan block
MIN_DEPTH = 64
UPPER_BOUNDS = ("absolute_margin", "relative_margin", "max_score")  # score rules that drop what scores above
REASONS = ("self", "positive", "related", "order") + UPPER_BOUNDS + ("min_score",)


@dataclass
class TextTree:
    """The tree guard through texts: code ids per corpus text and per anchor ([T, m], [A, m], -1 pad)."""

    guard: TreeGuard
    corpus_codes: np.ndarray
    anchor_codes: np.ndarray
    order_filter: bool = False

    def relations(self, anchor_rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(related [b, c], lca [b, c])`` of anchors and candidate code tables [b, c, m]: some code pair fails
        :meth:`TreeGuard.may_be_negative`; the deepest lowest common ancestor over code pairs (-1: none)."""
        anchor = self.anchor_codes[anchor_rows]
        related = np.zeros(codes.shape[:2], dtype=bool)
        lca = np.full(codes.shape[:2], -1, dtype=np.int64)
        for i in range(anchor.shape[1]):
            a = anchor[:, i][:, None]
            if not (a >= 0).any():
                continue
            for j in range(codes.shape[2]):
                c = codes[:, :, j]
                ok = (a >= 0) & (c >= 0)
                if not ok.any():
                    continue
                a_safe = np.maximum(a, 0)
                related |= ok & ~self.guard.may_be_negative(a_safe, c)
                if self.order_filter:
                    lca = np.where(ok, np.maximum(lca, self.guard.lca_depth(a_safe, np.maximum(c, 0))), lca)
        return related, lca

    def slack(self) -> np.ndarray:
        """Per anchor, at most how many codes are related to it (:meth:`TreeGuard.related_bound` per code)."""
        codes = self.anchor_codes
        return np.where(codes >= 0, self.guard.related_bound(np.maximum(codes, 0)), 0).sum(axis=1)


def text_codes(texts: Sequence[str], taxonomy: Taxonomy, codes: Mapping[str, Any] | None) -> np.ndarray:
    """int64 [T, m]: the code ids of each text (-1 padded), from ``codes`` (text -> code or list of codes),
    else every code whose title (or full text) the text equals."""
    lookup: dict[str, list[int]] = {}
    if codes is None:
        for i, (title, full) in enumerate(zip(taxonomy.titles, taxonomy.texts)):
            lookup.setdefault(title, []).append(i)
            if full != title:
                lookup.setdefault(full, []).append(i)
    else:
        if not isinstance(codes, Mapping):
            raise TypeError(f"codes must be a mapping of text -> code or list of codes, got {type(codes).__name__}")
        for text, value in codes.items():
            values = [value] if isinstance(value, str) else value
            try:
                values = list(values)
            except TypeError:
                raise TypeError(f"codes[{text!r}] = {value!r}: expected a code string or a list of codes") from None
            for code in values:
                if not isinstance(code, str):
                    raise TypeError(f"codes[{text!r}] holds {code!r}: expected code strings")
                try:
                    lookup.setdefault(text, []).append(taxonomy.index(code))
                except KeyError:
                    raise ValueError(f"codes[{text!r}] names code {code!r}, which is not a code of taxonomy "
                                     f"{taxonomy.name!r}") from None
    return pad_ids([sorted(set(lookup.get(t, ()))) for t in texts], min_width=1)


@dataclass
class SearchRequest:
    index: EmbeddingIndex
    queries: np.ndarray            # float32 [A, d], unit norm
    self_ids: np.ndarray           # int64 [A], -1: the anchor text is not in the corpus
    pos_offsets: np.ndarray        # int64 [A + 1]
    pos_ids: np.ndarray            # int64 [P]
    positive_scores: np.ndarray    # float32 [P]
    keys: np.ndarray               # int64 [A]: per-anchor random key (text hash)
    num_negatives: int
    range_min: int
    range_max: int
    strategy: str                  # "top" | "random"
    seed: int
    include_positives: bool = False
    max_score: float | None = None
    min_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    tree: TextTree | None = None
    batch_size: int = 16384


@dataclass
class SearchResult:
    ids: np.ndarray                # int64 [A, n], -1 padded, most similar first
    scores: np.ndarray             # float32 [A, n], -inf padded
    removed: dict[str, int] = field(default_factory=dict)        # over all rows (final depth)
    short_removed: dict[str, int] = field(default_factory=dict)  # over short rows only

    @property
    def found(self) -> np.ndarray:
        return (self.ids >= 0).sum(axis=1)


def search_negatives(request: SearchRequest, progress: bool = False) -> SearchResult:
    """Negatives for every anchor; rows with too few valid candidates are searched deeper."""
    r = request
    need = r.range_min + r.num_negatives if r.strategy == "top" else r.range_max
    depth = 2 * (need + 1 + np.diff(r.pos_offsets) + (r.tree.slack() if r.tree else 0))
    depth = np.minimum(r.index.ntotal, 2 ** np.ceil(np.log2(np.maximum(depth, MIN_DEPTH))).astype(np.int64))
    with search_run(r, need, "searching negatives", progress) as run:
        (_scan if r.index.index_type == "Flat" else _search)(run, depth)
    return run.out


class Removals:
    """A keep mask over candidates (numpy or torch) and per rule how many each row lost, each counted once."""

    def __init__(self, keep: Any, removed: dict[str, Any] | None = None) -> None:
        self.keep, self.removed = keep, dict(removed or {})

    def drop(self, reason: str, mask: Any) -> None:
        self.removed[reason] = self.removed.get(reason, 0) + (self.keep & mask).sum(1)
        self.keep = self.keep & ~mask


@dataclass
class SearchRun:
    """One search under way: the request, its per-anchor rule limits, the result it fills, a progress bar."""

    r: SearchRequest
    need: int                          # valid candidates that settle a row
    bounds: dict[str, np.ndarray]      # per anchor, the score above which each UPPER_BOUNDS rule drops
    order_limit: np.ndarray | None     # per anchor, the positives' least LCA depth (order filter)
    out: SearchResult
    bar: Any

    def guard(self, rows: np.ndarray, ids: np.ndarray, removed: dict[str, Any] | None = None) -> Removals:
        """The text rules on sorted candidates (-1 pads): the anchor's text, its positives, tree relatives."""
        r, kept = self.r, Removals(ids >= 0, removed)
        unless = ~_is_positive(r, rows, ids) if r.include_positives else True  # include_positives protects them
        kept.drop("self", (ids == r.self_ids[rows][:, None]) & (ids >= 0) & unless)
        if not r.include_positives:
            kept.drop("positive", _is_positive(r, rows, ids))
        if r.tree is not None:
            related, lca = r.tree.relations(rows, r.tree.corpus_codes[np.maximum(ids, 0)])
            kept.drop("related", related & unless)
            if self.order_limit is not None:
                kept.drop("order", too_near(lca, self.order_limit[rows][:, None]) & unless)
        return kept

    def drop_by_score(self, kept: Removals, rows: np.ndarray, scores: Any,
                      as_bound: Callable[[np.ndarray], Any] = lambda bound: bound) -> None:
        """The score rules: margins and ``max_score`` (bounds of ``rows``, through ``as_bound``), ``min_score``."""
        for reason in UPPER_BOUNDS:
            if reason in self.bounds:
                kept.drop(reason, scores > as_bound(self.bounds[reason][rows])[:, None])
        if self.r.min_score is not None:
            kept.drop("min_score", scores < self.r.min_score)

    def settle(self, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray, kept: Removals,
               exhausted: Any) -> np.ndarray:
        """Pick and record the negatives of rows with ``need`` valid candidates or ``exhausted``; which settled."""
        done = (kept.keep.sum(axis=1) >= self.need) | exhausted
        settled, out = rows[done], self.out
        if settled.size:
            picked = _pick(self.r, settled, scores[done], ids[done], kept.keep[done])
            out.ids[settled], out.scores[settled] = picked
            short = (picked[0] >= 0).sum(axis=1) < self.r.num_negatives
            for reason, counts in kept.removed.items():
                counts = np.broadcast_to(counts, done.shape)[done]
                out.removed[reason] += int(counts.sum())
                out.short_removed[reason] += int(counts[short].sum())
        self.bar.update(int(done.sum()))
        return done

    def search_in_blocks(self, rows: np.ndarray, depth: int, factor: int, block_rows: Callable[[int], int],
                         settle: Callable[..., np.ndarray]) -> None:
        """Search ``rows`` ``depth`` deep in blocks, ``settle`` each block; unsettled rows ``factor`` x deeper."""
        r = self.r

        def search_round(rows: np.ndarray, d: int, last: bool) -> np.ndarray:
            done, step = np.zeros(rows.size, dtype=bool), block_rows(d)
            for start in range(0, rows.size, step):
                block = rows[start : start + step]
                scores, ids = r.index.search(r.queries[block], d)
                done[start : start + step] = settle(block, scores, np.asarray(ids, dtype=np.int64), last, d)
            return done

        search_deeper(rows, depth, r.index.ntotal, search_round, factor=factor)


@contextmanager
def search_run(r: SearchRequest, need: int, desc: str, progress: bool) -> Iterator[SearchRun]:
    """A :class:`SearchRun` with an empty result and the request's rule limits, its progress bar open."""
    n_anchors, n = r.queries.shape[0], r.num_negatives
    out = SearchResult(np.full((n_anchors, n), -1, dtype=np.int64), np.full((n_anchors, n), -np.inf, dtype=np.float32),
                       dict.fromkeys(REASONS, 0), dict.fromkeys(REASONS, 0))
    order_limit = _order_limits(r) if r.tree is not None and r.tree.order_filter else None
    with tqdm(total=n_anchors, desc=desc, disable=not progress, unit="anchor") as bar:
        yield SearchRun(r, need, _upper_bounds(r), order_limit, out, bar)


def _scan(run: SearchRun, depth: np.ndarray) -> None:
    """Exact index: one matrix product per block of anchors, score rules as a mask, a top-k growing 4x."""
    r = run.r
    vectors = r.index.vectors
    ntotal = vectors.shape[0]
    rows_per_block = max(1, min(r.batch_size, _SCAN_BLOCK_BYTES // (4 * ntotal)))
    by_depth = np.argsort(depth, kind="stable")
    with torch.no_grad():
        for start in range(0, by_depth.size, rows_per_block):
            rows = by_depth[start : start + rows_per_block]
            scores = torch.from_numpy(r.queries[rows]).to(vectors.device) @ vectors.T
            masked = Removals(torch.ones_like(scores, dtype=torch.bool))
            run.drop_by_score(masked, rows, scores, lambda bound: torch.from_numpy(bound).to(scores))
            if masked.removed:
                scores.masked_fill_(~masked.keep, float("-inf"))
            removed = {reason: count.cpu().numpy() for reason, count in masked.removed.items()}

            def top_round(pending: np.ndarray, k: int, last: bool) -> np.ndarray:
                # the flat search itself (matmul + topk, as index.knn.torch_knn), on the masked scores
                top, cols = torch.topk(scores[torch.from_numpy(pending).to(vectors.device)], k, dim=1)
                top, ids = top.cpu().numpy(), cols.cpu().numpy().astype(np.int64)
                ids[np.isneginf(top)] = -1
                kept = run.guard(rows[pending], ids, {reason: count[pending] for reason, count in removed.items()})
                return run.settle(rows[pending], top, ids, kept, (ids[:, -1] < 0) | last)

            search_deeper(np.arange(rows.size), min(int(depth[rows].max()), ntotal), ntotal, top_round, factor=4)


def _search(run: SearchRun, depth: np.ndarray) -> None:
    """Approximate index: faiss searches, each unsettled row again at 4x the depth."""
    r = run.r

    def settle(rows: np.ndarray, scores: np.ndarray, ids: np.ndarray, last: bool, _depth: int) -> np.ndarray:
        exhausted = last | (ids[:, -1] < 0)
        if r.min_score is not None:
            exhausted |= scores[:, -1] < r.min_score  # deeper candidates score lower still
        kept = run.guard(rows, ids)
        run.drop_by_score(kept, rows, scores)
        return run.settle(rows, scores, ids, kept, exhausted)

    for d in np.unique(depth):
        run.search_in_blocks(np.flatnonzero(depth == d), int(d), 4,
                             lambda d: max(1, min(r.batch_size, _BLOCK_ENTRIES // d)), settle)


def _upper_bounds(r: SearchRequest) -> dict[str, np.ndarray]:
    """Per anchor, the score above which each margin / max_score rule drops a candidate."""
    least = np.minimum.reduceat(r.positive_scores, r.pos_offsets[:-1]).astype(np.float64)
    bounds = {}
    if r.absolute_margin is not None:
        bounds["absolute_margin"] = least - r.absolute_margin
    if r.relative_margin is not None:
        bounds["relative_margin"] = least - np.abs(least) * r.relative_margin
    if r.max_score is not None:
        bounds["max_score"] = np.full(least.shape, r.max_score)
    return bounds


def _order_limits(r: SearchRequest) -> np.ndarray:
    """Per anchor, the least LCA depth of its positives (-1: no positive with codes, no order rule)."""
    anchor_of = np.repeat(np.arange(len(r.self_ids)), np.diff(r.pos_offsets))
    _, lca = r.tree.relations(anchor_of, r.tree.corpus_codes[r.pos_ids][:, None, :])
    lca = lca[:, 0].astype(np.float64)
    lca[lca < 0] = np.inf
    limits = np.minimum.reduceat(lca, r.pos_offsets[:-1])
    return np.where(np.isinf(limits), -1, limits).astype(np.int64)


def _is_positive(r: SearchRequest, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool [b, depth]: the candidate is a positive of its row's anchor (one sorted lookup)."""
    width = np.int64(r.index.ntotal + 1)
    starts, counts = r.pos_offsets[rows], np.diff(r.pos_offsets)[rows]
    local = np.repeat(np.arange(rows.size, dtype=np.int64), counts)
    if local.size == 0:
        return np.zeros(ids.shape, dtype=bool)
    within = np.arange(local.size) - np.repeat(np.cumsum(counts) - counts, counts)
    table = np.sort(local * width + r.pos_ids[np.repeat(starts, counts) + within])
    keys = np.arange(rows.size, dtype=np.int64)[:, None] * width + ids
    found = np.minimum(np.searchsorted(table, keys), table.size - 1)
    return (table[found] == keys) & (ids >= 0)


def _pick(r: SearchRequest, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray,
          keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chosen ranks of each row's valid candidates -> ``(ids [b, n], scores [b, n])``, best first."""
    b, n, width = rows.size, r.num_negatives, keep.shape[1]
    scores, ids = select_topk_np(scores, ids, keep, width, "cosine")  # valid ones first, ties by column
    available = np.clip(keep.sum(axis=1) - r.range_min, 0, r.range_max - r.range_min)
    if r.strategy == "top":
        ranks = np.broadcast_to(np.arange(n), (b, n))
    else:
        # column j is a pure function of (seed, anchor text, j): fewer columns change no draw
        draws = uniforms(item_keys(r.seed, 0, r.keys[rows]), 0, max(min(r.range_max - r.range_min, width), n))
        draws[np.arange(draws.shape[1])[None, :] >= available[:, None]] = np.inf
        ranks = np.sort(np.argsort(draws, axis=1, kind="stable")[:, :n], axis=1)
    valid = ranks < available[:, None]
    cols = np.minimum(r.range_min + ranks, width - 1)
    return (np.where(valid, np.take_along_axis(ids, cols, axis=1), -1),
            np.where(valid, np.take_along_axis(scores, cols, axis=1), -np.inf).astype(np.float32))
