"""Phase 1 negatives: the false-negative proof over whole epochs, distinctness, spill, padding,
counter-keyed determinism and a curriculum that gets harder."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dict_token_cache
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.curriculum import HARD, split_counts, spill
from naics_hnm.data.datasets import Phase1MapDataset
from naics_hnm.tree.taxonomy import Taxonomy

PHASE1_END = 3


def _excluded_sample(naics) -> tuple[str, ...]:
    rng = np.random.default_rng(3)
    return tuple(sorted(naics.codes[i] for i in rng.choice(len(naics), 40, replace=False)))


@pytest.fixture(scope="module", params=["default", "all_relations_excluded"])
def dataset(request, naics, token_cache):
    if request.param == "default":
        cfg = StreamingConfig()
    else:
        cfg = StreamingConfig(seed=11, positive_relations=("parent", "child", "sibling"), max_siblings=3,
                              exclude_codes=_excluded_sample(naics))
    return Phase1MapDataset(cfg, SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)


@pytest.mark.parametrize("epoch", [0, 1, 2, 5])
def test_no_false_negatives_over_whole_epoch(dataset, naics, epoch):
    """Every item: no negative/candidate is the anchor, the positive, an ancestor, a descendant or excluded;
    negatives and candidates are distinct; negatives are the first K candidates; no padding on NAICS."""
    k, c = dataset.cfg.n_negatives, dataset.cfg.n_candidates
    excluded = {naics.index(code) for code in dataset.cfg.exclude_codes}
    forbidden: dict[int, set[int]] = {}
    items = dataset.__getitems__([(epoch, i) for i in range(len(dataset))])
    assert len(items) == len(dataset) > 6000
    for it in items:
        a, p = it["anchor_idx"], it["positive_idx"]
        if a not in forbidden:
            forbidden[a] = (set(naics.ancestors(a).tolist()) | set(naics.descendants(a).tolist()) | {a} | excluded)
        assert a not in excluded and p not in excluded
        neg, cand = it["negative_idx"].tolist(), it["candidate_idx"].tolist()
        assert len(neg) == k and len(cand) == c
        assert -1 not in cand  # every NAICS anchor has more than C valid negatives
        cand_set = set(cand)
        assert len(cand_set) == c, f"repeated candidate for {it['anchor_code']}"
        assert not cand_set & forbidden[a], (it["anchor_code"], cand_set & forbidden[a])
        assert p not in cand_set
        assert neg == cand[:k]
        assert it["negative_codes"] == [naics.codes[j] for j in neg]
        assert it["candidate_codes"] == [naics.codes[j] for j in cand]
        assert it["anchor_code"] == naics.codes[a] and it["positive_code"] == naics.codes[p]


def test_short_hard_bucket_still_gives_k_negatives(naics, token_cache):
    """Six-digit codes without siblings have an empty hard bucket; their items spill into the others."""
    ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)
    lonely = ds.pairs[:, 0] == naics.index("111110")  # only child of 11111
    assert lonely.any()
    assert ds.table.sizes[naics.index("111110"), HARD] == 0
    hard_wanted = split_counts(8, ds.mix(PHASE1_END - 1))[HARD]
    assert hard_wanted >= 3
    short_rows = np.flatnonzero(ds.table.sizes[ds.pairs[:, 0], HARD] < hard_wanted)
    assert len(short_rows) > 200
    items = ds.__getitems__([(PHASE1_END - 1, int(i)) for i in short_rows])
    for it in items:
        neg = it["negative_idx"]
        assert len(neg) == 8 and (neg >= 0).all() and len(set(neg.tolist())) == 8
        buckets = ds.table.bucket_of(np.full(8, it["anchor_idx"]), neg)
        assert (buckets < 3).all()
        assert (buckets == HARD).sum() <= ds.table.sizes[it["anchor_idx"], HARD]


def test_padding_only_when_anchor_has_too_few_valid_negatives(make_csv):
    rows = [("11", "Agriculture"), ("111", "Crops"), ("112", "Animals"), ("21", "Mining"), ("211", "Oil")]
    tx = Taxonomy.from_csv(make_csv(rows))
    anc = {i: set(tx.ancestors(i).tolist()) for i in range(len(tx))}
    cfg = StreamingConfig(n_negatives=3, n_candidates=5, positive_relations=("parent", "child", "sibling"))
    ds = Phase1MapDataset(cfg, SamplingConfig(), dict_token_cache(tx), 2, taxonomy=tx)
    padded_rows = 0
    for epoch in range(4):
        for it in ds.__getitems__([(epoch, i) for i in range(len(ds))]):
            a, p = it["anchor_idx"], it["positive_idx"]
            valid = {c for c in range(len(tx)) if c != a and c != p and c not in anc[a] and a not in anc[c]}
            neg, cand = it["negative_idx"].tolist(), it["candidate_idx"].tolist()
            n_neg, n_cand = min(3, len(valid)), min(5, len(valid))
            assert neg[:n_neg] == cand[:n_neg] and -1 not in neg[:n_neg] and neg[n_neg:] == [-1] * (3 - n_neg)
            assert -1 not in cand[:n_cand] and cand[n_cand:] == [-1] * (5 - n_cand)
            assert set(cand[:n_cand]) <= valid and len(set(cand[:n_cand])) == n_cand
            if n_cand == len(valid):
                assert set(cand[:n_cand]) == valid  # the whole pool is used
            assert len(it["negative_codes"]) == n_neg
            padded_rows += n_neg < 3
    assert padded_rows > 0  # e.g. anchor 111 with sibling positive 112 has only 21 and 211 left


def test_same_key_same_item_regardless_of_batch(naics, token_cache):
    ds = Phase1MapDataset(StreamingConfig(seed=5), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)
    rng = np.random.default_rng(0)
    batch = rng.choice(len(ds), 256, replace=False).tolist()
    in_batch = ds.__getitems__([(1, i) for i in batch])
    reversed_batch = ds.__getitems__([(1, i) for i in batch[::-1]])[::-1]
    mixed = ds.__getitems__([(e, i) for i in batch for e in (1, 0)])[::2]  # epochs interleaved in one call
    for j, i in enumerate(batch[:64]):
        alone = ds.__getitems__([(1, i)])[0]
        for other in (in_batch[j], reversed_batch[j], mixed[j]):
            np.testing.assert_array_equal(alone["candidate_idx"], other["candidate_idx"])
            np.testing.assert_array_equal(alone["negative_idx"], other["negative_idx"])
            assert alone["anchor_idx"] == other["anchor_idx"] and alone["positive_idx"] == other["positive_idx"]
    # a fresh dataset object (another worker, a restart) gives the same items
    fresh = Phase1MapDataset(StreamingConfig(seed=5), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)
    again = fresh.__getitems__([(1, i) for i in batch])
    for x, y in zip(in_batch, again):
        np.testing.assert_array_equal(x["candidate_idx"], y["candidate_idx"])


def test_epochs_draw_different_negatives(naics, token_cache):
    ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)
    idx = list(range(0, len(ds), 7))
    per_epoch = {e: np.stack([it["negative_idx"] for it in ds.__getitems__([(e, i) for i in idx])]) for e in (0, 1, 4, 5)}
    assert (per_epoch[0] != per_epoch[1]).any(axis=1).mean() > 0.95
    # after Phase 1 the mix is constant but every epoch still draws afresh
    assert ds.mix(4) == ds.mix(5)
    assert (per_epoch[4] != per_epoch[5]).any(axis=1).mean() > 0.95


def test_curriculum_gets_harder(naics, token_cache):
    ds = Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)
    mean_distance, hard_share = {}, {}
    for epoch in (0, 1, 2, 5):
        items = ds.__getitems__([(epoch, i) for i in range(len(ds))])
        a = np.array([it["anchor_idx"] for it in items])
        neg = np.stack([it["negative_idx"] for it in items])
        mean_distance[epoch] = naics.tree_distance(a[:, None], neg).astype(float).mean()
        hard_share[epoch] = (ds.table.bucket_of(a[:, None], neg) == HARD).mean()
    assert mean_distance[0] > mean_distance[1] > mean_distance[2]
    assert mean_distance[0] - mean_distance[2] > 0.5
    assert hard_share[0] < hard_share[1] < hard_share[2]
    assert abs(mean_distance[5] - mean_distance[2]) < 0.1  # past Phase 1 the mix stays at its end


def test_split_counts_and_spill_reference():
    assert split_counts(8, (0.1, 0.2, 0.7)).tolist() == [1, 2, 5]
    assert split_counts(10, (0.6, 0.3, 0.1)).tolist() == [6, 3, 1]
    assert split_counts(0, (0.2, 0.3, 0.5)).tolist() == [0, 0, 0]
    for total in range(0, 50):
        for shares in ((0.1, 0.2, 0.7), (1 / 3, 1 / 3, 1 / 3), (0.0, 0.0, 1.0)):
            counts = split_counts(total, shares)
            assert counts.sum() == total
            assert (np.abs(counts - np.array(shares) * total) < 1).all()
    request = np.array([[3, 3, 2], [3, 3, 2], [3, 3, 2], [8, 0, 0]])
    available = np.array([[0, 10, 10], [0, 0, 10], [1, 1, 1], [2, 0, 10]])
    take = spill(request, available)
    assert take.tolist() == [[0, 6, 2], [0, 0, 8], [1, 1, 1], [2, 0, 6]]
    assert (take <= available).all()
