"""Map-style datasets: on-the-fly Phase 1 curriculum sampling and pre-sampled triplets.

Items hold codes, dense ids (-1 pads) and the shared ``tokens`` cache, or are ``None`` when a code lacks tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from naics_hnm.atomic import atomic_write_text
from naics_hnm.data.config import Relation, SamplingConfig, StreamingConfig
from naics_hnm.data.counter_rng import item_keys
from naics_hnm.data.curriculum import NegativeTable
from naics_hnm.data.pairs import allowed_mask, tree_pairs
from naics_hnm.tree.taxonomy import Taxonomy, load_taxonomy
from naics_hnm.data.token_cache import TokenCache
from naics_hnm.index.ids import pad_ids

Index = int | tuple[int, int]


def _split_index(index: Index, default_epoch: int) -> tuple[int, int]:
    if isinstance(index, (tuple, list)):
        epoch, i = index
        return int(epoch), int(i)
    return default_epoch, int(index)


def _make_items(codes: np.ndarray, tokens: TokenCache, anchors: np.ndarray, positives: np.ndarray,
                negatives: np.ndarray, candidates: np.ndarray) -> list[dict[str, Any] | None]:
    needed = np.concatenate([anchors[:, None], positives[:, None], candidates, negatives], axis=1)
    present = tokens.present.numpy()
    ok = np.where(needed >= 0, present[np.maximum(needed, 0)], True).all(axis=1) & (positives >= 0)
    items: list[dict[str, Any] | None] = []
    for r, (neg, cand) in enumerate(zip(negatives, candidates)):
        items.append(None if not ok[r] else {
            "anchor_code": codes[anchors[r]], "positive_code": codes[positives[r]],
            "negative_codes": codes[neg[neg >= 0]].tolist(), "candidate_codes": codes[cand[cand >= 0]].tolist(),
            "anchor_idx": int(anchors[r]), "positive_idx": int(positives[r]),
            "negative_idx": neg, "candidate_idx": cand, "tokens": tokens,
        })
    return items


class Phase1MapDataset(Dataset):
    """(anchor, positive) pairs with negatives drawn on the fly by an epoch-aware curriculum.

    Item ``i`` at epoch ``e`` is a pure function of (``cfg.seed``, ``e``, ``i``); its candidate pool starts with its
    negatives. None of them is the anchor, the positive, a relative of the anchor or an excluded code.
    """

    def __init__(self, cfg: StreamingConfig, sampling_cfg: SamplingConfig, token_cache: Mapping[int, Any],
                 phase1_end_epoch: int, *, taxonomy: Taxonomy | None = None, pairs: np.ndarray | None = None) -> None:
        if not isinstance(cfg, StreamingConfig):
            raise TypeError(f"cfg={cfg!r}: expected a StreamingConfig")
        if not isinstance(sampling_cfg, SamplingConfig):
            raise TypeError(f"sampling_cfg={sampling_cfg!r}: expected a SamplingConfig")
        if not (isinstance(phase1_end_epoch, int) and phase1_end_epoch >= 0):
            raise ValueError(f"phase1_end_epoch={phase1_end_epoch!r}: expected an int >= 0")
        self.cfg, self.sampling_cfg, self.phase1_end_epoch = cfg, sampling_cfg, phase1_end_epoch
        self._epoch = 0
        self._epoch_owner: Any = None
        self.taxonomy = taxonomy if taxonomy is not None else load_taxonomy(cfg.taxonomy)
        n = len(self.taxonomy)
        self.token_cache = TokenCache.from_dict(token_cache, n)
        if self.token_cache.size != n:
            raise ValueError(f"token cache has {self.token_cache.size} rows, taxonomy {n} codes: expected equal")
        if self.token_cache.codes is not None and self.token_cache.codes != self.taxonomy.codes:
            raise ValueError("token cache was built for a different code list than the taxonomy")
        self.allowed = allowed_mask(self.taxonomy, cfg.exclude_codes)
        self.table = NegativeTable(self.taxonomy, self.allowed)
        if pairs is None:
            pairs = tree_pairs(self.taxonomy, cfg.positive_relations, self.allowed, cfg.max_siblings, cfg.seed)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.levels = Relation.LEVELS.value in cfg.positive_relations
        fixed = self.pairs[self.pairs[:, 1] >= 0] if self.levels else self.pairs
        if len(self.pairs) and (not self.allowed[self.pairs[:, 0]].all() or not self.allowed[fixed[:, 1]].all()):
            raise ValueError("pairs include an excluded code")
        if not self.levels and (self.pairs[:, 1] < 0).any():
            raise ValueError("pairs have a missing positive (-1) but positive_relations is not ('levels',)")
        self._codes = np.array(self.taxonomy.codes, dtype=object)

    def follow(self, owner: Any) -> None:
        """Read the epoch from ``owner`` (an object with ``epoch`` and ``set_epoch``, e.g. the EpochSampler)."""
        self._epoch_owner = owner

    @property
    def epoch(self) -> int:
        """The epoch whose negatives plain int indices draw: the owner's when following one."""
        return self._epoch if self._epoch_owner is None else int(self._epoch_owner.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose negatives plain int indices draw (the sampler's pairs carry their own)."""
        if not (isinstance(epoch, (int, np.integer)) and epoch >= 0):
            raise ValueError(f"set_epoch({epoch!r}): expected an int >= 0")
        if self._epoch_owner is None:
            self._epoch = int(epoch)
        else:
            self._epoch_owner.set_epoch(int(epoch))

    def mix(self, epoch: int | None = None) -> tuple[float, float, float]:
        """(hard, semi_hard, easy) shares used at ``epoch`` (default: the current one)."""
        return self.sampling_cfg.mix(self.epoch if epoch is None else epoch, self.phase1_end_epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: Index) -> dict[str, Any] | None:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[Index]) -> list[dict[str, Any] | None]:
        """A whole batch in one vectorised draw (the DataLoader calls this when it exists)."""
        by_epoch: dict[int, list[int]] = {}
        rows: list[int] = []
        for j, index in enumerate(indices):
            epoch, i = _split_index(index, self.epoch)
            if not 0 <= i < len(self.pairs):
                raise IndexError(f"index {i} out of range for {len(self.pairs)} pairs")
            by_epoch.setdefault(epoch, []).append(j)
            rows.append(i)
        rows_arr = np.asarray(rows, dtype=np.int64)
        anchors = self.pairs[rows_arr, 0]
        positives = self.pairs[rows_arr, 1].copy()
        cand = np.empty((len(rows), self.cfg.n_candidates), dtype=np.int64)
        for epoch, where in by_epoch.items():
            keys = item_keys(self.cfg.seed, epoch, rows_arr[where])
            batch_anchors = anchors[where]
            level_ranges = self.table.tree.ranges(batch_anchors)
            if self.levels:
                positives[where] = self.table.level_positives(keys, batch_anchors, self.allowed, self.cfg.level_decay,
                                                              level_ranges)
            pos = positives[where]
            order_filter = self.sampling_cfg.order_filter
            max_lca = self.taxonomy.lca_depth(batch_anchors, np.maximum(pos, 0)) - 1 if order_filter else None
            cand[where] = self.table.draw(keys, batch_anchors, self.table.position(batch_anchors, pos, level_ranges),
                                          self.mix(epoch), self.cfg.n_negatives, self.cfg.n_candidates, max_lca,
                                          uniform=self.sampling_cfg.uniform, level_ranges=level_ranges)
        return _make_items(self._codes, self.token_cache, anchors, positives, cand[:, : self.cfg.n_negatives], cand)

    def presample(self, epoch: int, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Plain-value triplet rows for ``epoch`` (all pairs by default), for NAICSMapDataset or a file."""
        idx = range(len(self)) if indices is None else indices
        items = self.__getitems__([(epoch, int(i)) for i in idx])
        plain = ("anchor_code", "positive_code", "negative_codes", "candidate_codes", "anchor_idx", "positive_idx")
        return [{**{key: it[key] for key in plain},
                 **{key: [int(v) for v in it[key] if v >= 0] for key in ("negative_idx", "candidate_idx")}}
                for it in items if it is not None]


class NAICSMapDataset(Dataset):
    """Pre-sampled triplets: rows with ``anchor_idx``, ``positive_idx``, ``negative_idx`` (list) and
    optionally ``candidate_idx`` (list) and the matching ``*_code(s)``."""

    def __init__(self, triplet_rows: list[dict[str, Any]], token_cache: Mapping[int, Any],
                 codes: Sequence[str] | None = None) -> None:
        self.token_cache = TokenCache.from_dict(token_cache)
        codes = codes if codes is not None else self.token_cache.codes
        n = self.token_cache.size
        parsed = []
        for r, row in enumerate(triplet_rows):
            try:
                anchor, positive = int(row["anchor_idx"]), int(row["positive_idx"])
                negs = [int(v) for v in row["negative_idx"]]
                cands = [int(v) for v in row.get("candidate_idx", negs)]
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ValueError(f"triplet row {r}: {err!s}; expected anchor_idx, positive_idx (ints) and "
                                 "negative_idx (a list of ints)") from None
            ids = [anchor, positive, *negs, *cands]
            if any(not 0 <= v < n for v in ids):
                raise ValueError(f"triplet row {r}: id out of range [0, {n}) in {ids}")
            if len(set(negs)) != len(negs):
                raise ValueError(f"triplet row {r}: repeated negative in {negs}")
            parsed.append((anchor, positive, negs, cands))
        self.anchors = np.array([p[0] for p in parsed], dtype=np.int64)
        self.positives = np.array([p[1] for p in parsed], dtype=np.int64)
        self.negatives = pad_ids([p[2] for p in parsed])
        self.candidates = pad_ids([p[3] for p in parsed])
        self._codes = np.array(codes if codes is not None else [str(i) for i in range(n)], dtype=object)

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, idx: int) -> dict[str, Any] | None:
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        rows = np.asarray([_split_index(i, 0)[1] for i in indices], dtype=np.int64)
        return _make_items(self._codes, self.token_cache, self.anchors[rows], self.positives[rows],
                           self.negatives[rows], self.candidates[rows])


def save_triplets(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write triplet rows as JSON Lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def load_triplets(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triplet file {str(path)!r} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"triplet file {str(path)!r} line {line_number}: {err.msg}") from None
    return rows

