"""Exact negative search for query vectors over an :class:`EmbeddingIndex` of distinct corpus texts.

For each anchor the valid candidates are the corpus texts, most similar first, less:

- the anchor's own text and every one of its positives (unless ``include_positives``);
- with a :class:`TextTree`, every text standing for an ancestor or a descendant of a code of the
  anchor, and with ``order_filter`` every text as near the anchor in the tree as its farthest positive;
- texts above ``max_score``, above ``p - absolute_margin`` or ``p - |p| * relative_margin`` where
  ``p`` is the score of the anchor's *least* similar positive, or below ``min_score``.

``range_min`` / ``range_max`` are ranks in that list. ``"top"`` takes ranks ``range_min ..
range_min + n - 1``; ``"random"`` draws ``n`` of the ranks ``[range_min, range_max)`` from a
counter-based generator keyed by (seed, anchor text), then orders them by score. A row is searched
deeper (4x the depth) until it has the ranks it needs or the corpus is exhausted, so a row is
short only when the whole corpus holds too few valid candidates.

With the exact (flat) index each block of anchors is scored against the corpus once, by one
matrix product on the index's device (what a faiss flat search computes); the score rules are
applied as a mask before a top-k, so a margin that removes an anchor's nearest thousand texts
costs no deeper scan. With an approximate index (``index_factory``) faiss searches, and an
unsettled row is searched again deeper. Memory is bounded by blocks of ``[rows, N]`` scores (128
MiB) or ``[rows, depth]`` candidates; nothing is corpus x corpus.

The tree guard works through texts: :func:`text_codes` gives each text the codes it stands for
(titles are not unique: a text may stand for several) and :class:`TextTree` relates an anchor's
codes to a candidate's - one related pair makes the candidate related.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from naics_hnm.data.counter_rng import item_keys, uniforms
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ids import search_deeper
from naics_hnm.tree.guard import too_near
from naics_hnm.tree.taxonomy import Taxonomy

_BLOCK_ENTRIES = 1 << 20        # [rows, depth] candidates of one faiss search block
_SCAN_BLOCK_BYTES = 128 << 20   # [rows, N] float32 scores of one exact scan block
MIN_DEPTH = 64
REASONS = ("self", "positive", "related", "order", "absolute_margin", "relative_margin", "max_score", "min_score")


@dataclass
class TextTree:
    """The tree guard through texts: code ids per corpus text and per anchor ([T, m], [A, m], -1 pad)."""

    taxonomy: Taxonomy
    corpus_codes: np.ndarray
    anchor_codes: np.ndarray
    order_filter: bool = False

    def relations(self, anchor_rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(related [b, c], lca [b, c])`` of anchors and candidates given as code tables [b, c, m].

        Related: some code pair is equal or an ancestor/descendant pair. ``lca``: the deepest lowest
        common ancestor over code pairs, -1 where either side has no code.
        """
        tx = self.taxonomy
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
                a_safe, c_safe = np.maximum(a, 0), np.maximum(c, 0)
                related |= ok & tx.related(a_safe, c_safe)
                if self.order_filter:
                    lca = np.where(ok, np.maximum(lca, tx.lca_depth(a_safe, c_safe)), lca)
        return related, lca

    def slack(self) -> np.ndarray:
        """Per anchor, at most how many codes are related to it (ancestors + subtree per code)."""
        tx, codes = self.taxonomy, self.anchor_codes
        safe = np.maximum(codes, 0)
        per_code = tx.depth[safe].astype(np.int64) + tx.end[safe] - tx.pre[safe]
        return np.where(codes >= 0, per_code, 0).sum(axis=1)


def text_codes(texts: Sequence[str], taxonomy: Taxonomy, codes: Mapping[str, Any] | None) -> np.ndarray:
    """int64 [T, m]: the code ids of each text (-1 padded); a text without codes gets a row of -1.

    Without ``codes``, a text stands for every code whose title (or full text) it equals - titles
    need not be unique. ``codes`` maps a text to one code or a list of codes.
    """
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
    rows = [sorted(set(lookup.get(t, ()))) for t in texts]
    width = max((len(r) for r in rows), default=0)
    table = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


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
    searched: np.ndarray           # int64 [A]: search depth that settled the row
    removed: dict[str, int] = field(default_factory=dict)        # over all rows (final depth)
    short_removed: dict[str, int] = field(default_factory=dict)  # over short rows only

    @property
    def found(self) -> np.ndarray:
        return (self.ids >= 0).sum(axis=1)


def search_negatives(request: SearchRequest, progress: bool = False) -> SearchResult:
    """Negatives for every anchor; rows with too few valid candidates are searched deeper."""
    r = request
    n_anchors, n = r.queries.shape[0], r.num_negatives
    need = r.range_min + n if r.strategy == "top" else r.range_max
    bounds = _upper_bounds(r)
    order_limit = _order_limits(r) if r.tree is not None and r.tree.order_filter else None
    depth = 2 * (need + 1 + np.diff(r.pos_offsets) + (r.tree.slack() if r.tree else 0))
    depth = np.minimum(r.index.ntotal, 2 ** np.ceil(np.log2(np.maximum(depth, MIN_DEPTH))).astype(np.int64))
    result = SearchResult(np.full((n_anchors, n), -1, dtype=np.int64),
                          np.full((n_anchors, n), -np.inf, dtype=np.float32),
                          np.zeros(n_anchors, dtype=np.int64),
                          dict.fromkeys(REASONS, 0), dict.fromkeys(REASONS, 0))
    with tqdm(total=n_anchors, desc="searching negatives", disable=not progress, unit="anchor") as bar:
        if r.index.index_type == "Flat":
            _scan(r, depth, need, bounds, order_limit, result, bar)
        else:
            _search(r, depth, need, bounds, order_limit, result, bar)
    return result


def _scan(r: SearchRequest, depth: np.ndarray, need: int, bounds: dict[str, np.ndarray],
          order_limit: np.ndarray | None, out: SearchResult, bar: Any) -> None:
    """Exact index: one matrix product per block of anchors (on the index's device), the score
    rules applied as a mask, then a top-k that grows 4x (on the same scores) until rows settle."""
    vectors = r.index.vectors
    ntotal = vectors.shape[0]
    rows_per_block = max(1, min(r.batch_size, _SCAN_BLOCK_BYTES // (4 * ntotal)))
    by_depth = np.argsort(depth, kind="stable")
    with torch.no_grad():
        for start in range(0, by_depth.size, rows_per_block):
            rows = by_depth[start : start + rows_per_block]
            scores = torch.from_numpy(r.queries[rows]).to(vectors.device) @ vectors.T
            removed = _mask_score_rules(r, rows, scores, bounds)

            def top_round(pending: np.ndarray, k: int, last: bool) -> np.ndarray:
                top, cols = torch.topk(scores[torch.from_numpy(pending).to(vectors.device)], k, dim=1)
                top, ids = top.cpu().numpy(), cols.cpu().numpy().astype(np.int64)
                ids[np.isneginf(top)] = -1
                exhausted = (ids[:, -1] < 0) | last
                done = _settle(r, rows[pending], top, ids, exhausted, need, None, order_limit, out,
                               {reason: count[pending] for reason, count in removed.items()}, k)
                bar.update(int(done.sum()))
                return done

            search_deeper(np.arange(rows.size), min(int(depth[rows].max()), ntotal), ntotal, top_round, factor=4)


def _mask_score_rules(r: SearchRequest, rows: np.ndarray, scores: torch.Tensor,
                      bounds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Set the scores that break a margin, max_score or min_score to -inf; per-row counts by rule."""
    removed: dict[str, np.ndarray] = {}
    keep = torch.ones_like(scores, dtype=torch.bool)
    rules = [(reason, scores > torch.from_numpy(bounds[reason][rows]).to(scores)[:, None])
             for reason in ("absolute_margin", "relative_margin", "max_score") if reason in bounds]
    if r.min_score is not None:
        rules.append(("min_score", scores < r.min_score))
    for reason, mask in rules:
        removed[reason] = (mask & keep).sum(dim=1).cpu().numpy()
        keep &= ~mask
    if rules:
        scores.masked_fill_(~keep, float("-inf"))
    return removed


def _search(r: SearchRequest, depth: np.ndarray, need: int, bounds: dict[str, np.ndarray],
            order_limit: np.ndarray | None, out: SearchResult, bar: Any) -> None:
    """Approximate index: faiss searches, each unsettled row again at 4x the depth."""
    ntotal = r.index.ntotal

    def search_round(rows: np.ndarray, d: int, last: bool) -> np.ndarray:
        done = np.zeros(rows.size, dtype=bool)
        rows_per_block = max(1, min(r.batch_size, _BLOCK_ENTRIES // d))
        for start in range(0, rows.size, rows_per_block):
            block = slice(start, start + rows_per_block)
            scores, ids = r.index.search(r.queries[rows[block]], d)
            exhausted = last | (ids[:, -1] < 0)
            if r.min_score is not None:
                exhausted |= scores[:, -1] < r.min_score  # deeper candidates score lower still
            done[block] = _settle(r, rows[block], scores, ids, exhausted, need, bounds, order_limit, out, {}, d)
            bar.update(int(done[block].sum()))
        return done

    for d in np.unique(depth):
        search_deeper(np.flatnonzero(depth == d), int(d), ntotal, search_round, factor=4)


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
    tree = r.tree
    anchor_of = np.repeat(np.arange(len(r.self_ids)), np.diff(r.pos_offsets))
    _, lca = tree.relations(anchor_of, tree.corpus_codes[r.pos_ids][:, None, :])
    lca = lca[:, 0].astype(np.float64)
    lca[lca < 0] = np.inf
    limits = np.minimum.reduceat(lca, r.pos_offsets[:-1])
    return np.where(np.isinf(limits), -1, limits).astype(np.int64)


def _settle(r: SearchRequest, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray, exhausted: np.ndarray,
            need: int, bounds: dict[str, np.ndarray] | None, order_limit: np.ndarray | None, out: SearchResult,
            removed: dict[str, np.ndarray], depth: int) -> np.ndarray:
    """Guard ``rows``' candidates (sorted, -1 padded); settle rows with enough valid ones or no more.

    ``bounds=None``: the score rules were applied already (their counts are in ``removed``).
    """
    keep = ids >= 0
    removed = dict(removed)

    def drop(reason: str, mask: np.ndarray) -> None:
        nonlocal keep
        removed[reason] = removed.get(reason, 0) + (keep & mask).sum(axis=1)
        keep &= ~mask

    protected = _is_positive(r, rows, ids) if r.include_positives else None
    drop("self", (ids == r.self_ids[rows][:, None]) & (ids >= 0) & _unless(protected))
    if not r.include_positives:
        drop("positive", _is_positive(r, rows, ids))
    if r.tree is not None:
        related, lca = r.tree.relations(rows, r.tree.corpus_codes[np.maximum(ids, 0)])
        drop("related", related & _unless(protected))
        if order_limit is not None:
            limit = order_limit[rows][:, None]
            drop("order", too_near(lca, limit) & _unless(protected))
    if bounds is not None:
        for reason in ("absolute_margin", "relative_margin", "max_score"):
            if reason in bounds:
                drop(reason, scores > bounds[reason][rows][:, None])
        if r.min_score is not None:
            drop("min_score", scores < r.min_score)
    return settle_rows(r, out, rows, scores, ids, keep, removed, (keep.sum(axis=1) >= need) | exhausted, depth)


def settle_rows(r: SearchRequest, out: SearchResult, rows: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                keep: np.ndarray, removed: dict[str, Any], done: np.ndarray, depth: int) -> np.ndarray:
    """Pick the negatives of the ``done`` rows, record them in ``out`` with what each rule removed; returns ``done``."""
    settled = rows[done]
    if settled.size:
        picked = _pick(r, settled, scores[done], ids[done], keep[done])
        out.ids[settled], out.scores[settled] = picked
        out.searched[settled] = depth
        short = (picked[0] >= 0).sum(axis=1) < r.num_negatives
        for reason, counts in removed.items():
            counts = np.broadcast_to(counts, done.shape)[done]
            out.removed[reason] += int(counts.sum())
            out.short_removed[reason] += int(counts[short].sum())
    return done


def _unless(protected: np.ndarray | None) -> Any:
    return True if protected is None else ~protected


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
    b, n = rows.size, r.num_negatives
    kept_cols = np.argsort(~keep, axis=1, kind="stable")  # valid columns first, in score order
    available = np.clip(keep.sum(axis=1) - r.range_min, 0, r.range_max - r.range_min)
    if r.strategy == "top":
        ranks = np.broadcast_to(np.arange(n), (b, n))
    else:
        # column j is a pure function of (seed, anchor text, j): fewer columns change no draw
        width = max(min(r.range_max - r.range_min, keep.shape[1]), n)
        draws = uniforms(item_keys(r.seed, 0, r.keys[rows]), 0, width)
        draws[np.arange(draws.shape[1])[None, :] >= available[:, None]] = np.inf
        ranks = np.sort(np.argsort(draws, axis=1, kind="stable")[:, :n], axis=1)
    valid = ranks < available[:, None]
    cols = np.take_along_axis(kept_cols, np.minimum(r.range_min + ranks, keep.shape[1] - 1), axis=1)
    out_ids = np.where(valid, np.take_along_axis(ids, cols, axis=1), -1)
    out_scores = np.where(valid, np.take_along_axis(scores, cols, axis=1), -np.inf).astype(np.float32)
    return out_ids, out_scores
