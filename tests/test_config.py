"""StreamingConfig / SamplingConfig: every field validates its value and every field changes behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import TINY_ROWS, dict_token_cache
from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, Schedule, StreamingConfig
from naics_hnm.data.datasets import Phase1MapDataset
from naics_hnm.tree.taxonomy import Taxonomy, TaxonomyError


def make(naics, token_cache, phase1_end_epoch=3, sampling=None, **cfg):
    return Phase1MapDataset(StreamingConfig(**cfg), sampling or SamplingConfig(), token_cache, phase1_end_epoch,
                            taxonomy=naics)


def epoch_items(ds, epoch):
    items = ds.__getitems__([(epoch, i) for i in range(len(ds))])
    assert all(it is not None for it in items)
    return items


def as_arrays(items):
    anchors = np.array([it["anchor_idx"] for it in items])
    positives = np.array([it["positive_idx"] for it in items])
    negatives = np.stack([it["negative_idx"] for it in items])
    candidates = np.stack([it["candidate_idx"] for it in items])
    return anchors, positives, negatives, candidates


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=-1), r"seed=-1"),
        (dict(seed=2**63), r"seed=9223372036854775808"),
        (dict(seed=1.5), r"seed=1.5"),
        (dict(seed="7"), r"seed='7'"),
        (dict(n_negatives=0), r"n_negatives=0"),
        (dict(n_negatives=2.0), r"n_negatives=2.0"),
        (dict(n_negatives=8, n_candidates=7), r"n_candidates=7: expected an int >= n_negatives \(8\)"),
        (dict(n_candidates="48"), r"n_candidates='48'"),
        (dict(positive_relations=()), r"positive_relations=\(\)"),
        (dict(positive_relations=("parent", "cousin")), r"positive_relations=\('parent', 'cousin'\)"),
        (dict(positive_relations=("parent", "parent")), r"positive_relations=\('parent', 'parent'\)"),
        (dict(max_siblings=0), r"max_siblings=0"),
        (dict(max_siblings=2.5), r"max_siblings=2.5"),
    ],
)
def test_streaming_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingConfig(**kwargs)


@pytest.mark.parametrize("name", ["easy_start", "easy_end", "semi_hard_start", "semi_hard_end"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None])
def test_sampling_config_rejects_each_share(name, value):
    with pytest.raises(ValueError, match=rf"{name}={value!r}".replace("(", r"\(").replace(".", r"\.")):
        SamplingConfig(**{name: value})


@pytest.mark.parametrize("when", ["start", "end"])
def test_sampling_config_rejects_shares_above_one(when):
    with pytest.raises(ValueError, match=rf"easy_{when} \+ semi_hard_{when}=1\.(3|29)"):
        SamplingConfig(**{f"easy_{when}": 0.6, f"semi_hard_{when}": 0.7})


def test_sampling_config_rejects_schedule():
    with pytest.raises(ValueError, match=r"schedule='exponential'.*linear"):
        SamplingConfig(schedule="exponential")
    assert SamplingConfig(schedule="cosine").schedule is Schedule.COSINE


def test_exclude_codes_and_taxonomy_bad_values_named(naics, token_cache, make_csv, tmp_path):
    with pytest.raises(KeyError, match="unknown code '999999'"):
        make(naics, token_cache, exclude_codes=("111110", "999999"))
    with pytest.raises(TypeError, match="taxonomy=3"):
        Phase1MapDataset(StreamingConfig(taxonomy=3), SamplingConfig(), {}, 2)
    missing = tmp_path / "absent.csv"
    with pytest.raises(TaxonomyError, match="absent.csv.*does not exist"):
        Phase1MapDataset(StreamingConfig(taxonomy=str(missing)), SamplingConfig(), {}, 2)


def test_exclude_codes_given_as_a_string_is_not_split_into_characters():
    """A single code passed as a string must not become ('3', '1', '1', ...)."""
    try:
        cfg = StreamingConfig(exclude_codes="311111")
    except (TypeError, ValueError) as err:
        assert "exclude_codes" in str(err) and "311111" in str(err)
        return
    assert cfg.exclude_codes == ("311111",)


# ---------------------------------------------------------------- every field changes behaviour

def test_seed_changes_negatives(naics, token_cache):
    a = as_arrays(epoch_items(make(naics, token_cache, seed=1), 0))
    a2 = as_arrays(epoch_items(make(naics, token_cache, seed=1), 0))
    b = as_arrays(epoch_items(make(naics, token_cache, seed=2), 0))
    np.testing.assert_array_equal(a[0], b[0])  # same pairs
    np.testing.assert_array_equal(a[2], a2[2])  # same seed, same negatives
    differ = (a[2] != b[2]).any(axis=1).mean()
    assert differ > 0.95


def test_widths_follow_n_negatives_and_n_candidates(naics, token_cache):
    ds = make(naics, token_cache, n_negatives=3, n_candidates=5)
    items = ds.__getitems__(list(range(64)))
    assert all(len(it["negative_idx"]) == 3 and len(it["negative_codes"]) == 3 for it in items)
    assert all(len(it["candidate_idx"]) == 5 and len(it["candidate_codes"]) == 5 for it in items)
    batch = collate_fn(items)
    assert batch["negative_idx"].shape == (64, 3)
    assert batch["candidate_idx"].shape == (64, 5)
    assert batch["negatives"]["input_ids"].shape[:2] == (64, 3)


def _pairs_of(ds):
    items = epoch_items(ds, 0)
    got = [(it["anchor_idx"], it["positive_idx"]) for it in items]
    assert len(got) == len(set(got)), "a pair appears twice"
    return set(got)


def test_positive_relations_choose_pairs(naics, token_cache):
    n = len(naics)
    parent = naics.parent
    parents = {(i, int(parent[i])) for i in range(n) if parent[i] >= 0}
    children = {(p, c) for c, p in parents}
    siblings = {(i, j) for i in range(n) if parent[i] >= 0 for j in naics.children(parent[i]).tolist() if i != j}
    assert _pairs_of(make(naics, token_cache, positive_relations=("parent",))) == parents
    assert _pairs_of(make(naics, token_cache, positive_relations=("child",))) == children
    assert _pairs_of(make(naics, token_cache, positive_relations=("sibling",))) == siblings
    assert _pairs_of(make(naics, token_cache, positive_relations=("parent", "child"))) == parents | children
    assert len(parents) == n - 20 and ("111", "11") in {(naics.codes[a], naics.codes[p]) for a, p in parents}
    # sectors are no sibling positives of each other
    assert not any(naics.depth[a] == 1 for a, _ in siblings)


def _sibling_positives(ds):
    out: dict[int, set[int]] = {}
    for a, p in ds.pairs.tolist():
        out.setdefault(a, set()).add(p)
    return out


def test_max_siblings_caps_and_is_deterministic(naics, token_cache):
    full = _sibling_positives(make(naics, token_cache, positive_relations=("sibling",)))
    capped = _sibling_positives(make(naics, token_cache, positive_relations=("sibling",), max_siblings=2))
    again = _sibling_positives(make(naics, token_cache, positive_relations=("sibling",), max_siblings=2))
    other_seed = _sibling_positives(make(naics, token_cache, positive_relations=("sibling",), max_siblings=2, seed=7))
    assert capped == again
    assert set(capped) == set(full)
    for a, sibs in full.items():
        assert capped[a] <= sibs
        assert len(capped[a]) == min(2, len(sibs))
    assert any(len(s) > 2 for s in full.values())
    assert other_seed != capped  # the choice is keyed by the seed


def test_exclude_codes_never_appear(naics, token_cache):
    excluded = ("111110", "5417", "31-33", "44111", "541511", "11")
    ex = set(naics.indices(excluded).tolist())
    plain = make(naics, token_cache)
    seen = set()
    for it in epoch_items(plain, 2):
        seen |= {it["anchor_idx"], it["positive_idx"], *it["candidate_idx"].tolist()}
    assert ex <= seen  # without the option they do appear
    ds = make(naics, token_cache, exclude_codes=excluded)
    for epoch in (0, 2):
        for it in epoch_items(ds, epoch):
            ids = {it["anchor_idx"], it["positive_idx"], *it["negative_idx"].tolist(), *it["candidate_idx"].tolist()}
            assert not ids & ex
            codes = {it["anchor_code"], it["positive_code"], *it["negative_codes"], *it["candidate_codes"]}
            assert not codes & set(excluded)


def test_taxonomy_field_selects_csv(make_csv):
    path = make_csv(TINY_ROWS)
    tx = Taxonomy.from_csv(path)
    ds = Phase1MapDataset(StreamingConfig(taxonomy=str(path), n_negatives=1, n_candidates=2), SamplingConfig(),
                          dict_token_cache(tx), 2)
    assert ds.taxonomy.codes == tx.codes
    item = ds[0]
    assert {item["anchor_code"], item["positive_code"], *item["candidate_codes"]} <= set(tx.codes)
    assert len(ds) == len({(a, p) for a, p in ds.pairs.tolist()})


# ---------------------------------------------------------------- curriculum shares

def _available(ds, anchors, positives):
    """[B, 3] negatives available per bucket, the positive removed from its bucket."""
    avail = ds.table.sizes[anchors].copy()
    pb = ds.table.bucket_of(anchors, positives)
    rows = np.flatnonzero(pb < 3)
    avail[rows, pb[rows]] -= 1
    return avail


def _bucket_counts(ds, anchors, ids):
    b = ds.table.bucket_of(anchors[:, None], np.maximum(ids, 0))
    b = np.where(ids >= 0, b, 4)
    assert not (b == 3).any()
    return np.stack([(b == k).sum(axis=1) for k in range(3)], axis=1)


@pytest.mark.parametrize("epoch, expected", [(0, (1, 3, 6)), (2, (6, 3, 1))])
def test_shares_at_curriculum_ends(naics, token_cache, epoch, expected):
    """hard/semi/easy = (0.1, 0.3, 0.6) at epoch 0 and (0.6, 0.3, 0.1) at the last Phase 1 epoch."""
    sampling = SamplingConfig(easy_start=0.6, semi_hard_start=0.3, easy_end=0.1, semi_hard_end=0.3)
    ds = make(naics, token_cache, sampling=sampling, n_negatives=10, n_candidates=10)
    anchors, positives, negatives, _ = as_arrays(epoch_items(ds, epoch))
    counts = _bucket_counts(ds, anchors, negatives)
    assert (counts.sum(axis=1) == 10).all()
    roomy = (_available(ds, anchors, positives) >= np.array(expected)).all(axis=1)
    assert roomy.sum() > 1000
    # items whose buckets can serve the request get exactly the configured shares
    assert (counts[roomy] == np.array(expected)).all()
    # over the whole epoch the measured shares follow the configuration (spill explains the rest)
    shares = counts.sum(axis=0) / counts.sum()
    if epoch == 0:
        np.testing.assert_allclose(shares, [0.1, 0.3, 0.6], atol=0.05)
    else:
        assert shares[0] > 0.4 and shares[2] < 0.2


def _reference_spill(request, available):
    take, carry = [0, 0, 0], 0
    for b in range(3):
        want = request[b] + carry
        take[b] = min(want, available[b])
        carry = want - take[b]
    for b in (2, 1, 0):
        extra = min(carry, available[b] - take[b])
        take[b] += extra
        carry -= extra
    return take


def test_short_buckets_spill_to_neighbours(naics, token_cache):
    sampling = SamplingConfig(easy_start=0.6, semi_hard_start=0.3, easy_end=0.1, semi_hard_end=0.3)
    ds = make(naics, token_cache, sampling=sampling, n_negatives=10, n_candidates=10)
    anchors, positives, negatives, _ = as_arrays(epoch_items(ds, 2))
    counts = _bucket_counts(ds, anchors, negatives)
    avail = _available(ds, anchors, positives)
    short = 0
    for r in range(len(anchors)):
        assert counts[r].tolist() == _reference_spill([6, 3, 1], avail[r].tolist())
        short += avail[r][0] < 6
    assert short > 100


@pytest.mark.parametrize("schedule, hard_at_1, hard_at_3", [("linear", 5, 15), ("cosine", 3, 17), ("step", 0, 20)])
def test_schedule_shapes_middle_epochs(naics, token_cache, schedule, hard_at_1, hard_at_3):
    """easy 1 -> 0, hard 0 -> 1 over 5 Phase 1 epochs: progress t=0.25 and 0.75 at epochs 1 and 3."""
    sampling = SamplingConfig(easy_start=1.0, semi_hard_start=0.0, easy_end=0.0, semi_hard_end=0.0, schedule=schedule)
    ds = make(naics, token_cache, phase1_end_epoch=5, sampling=sampling, n_negatives=20, n_candidates=20)
    t_of = {"linear": lambda t: t, "cosine": lambda t: 0.5 - 0.5 * math.cos(math.pi * t),
            "step": lambda t: float(t >= 0.5)}[schedule]
    for epoch, hard in ((1, hard_at_1), (3, hard_at_3)):
        np.testing.assert_allclose(ds.mix(epoch), (t_of(epoch / 4), 0.0, 1 - t_of(epoch / 4)), atol=1e-12)
        anchors, positives, negatives, _ = as_arrays(epoch_items(ds, epoch))
        counts = _bucket_counts(ds, anchors, negatives)
        roomy = (_available(ds, anchors, positives)[:, [0, 2]] >= 20).all(axis=1)
        assert roomy.sum() > 50
        assert (counts[roomy] == np.array([hard, 0, 20 - hard])).all()
    np.testing.assert_allclose(ds.mix(0), (0, 0, 1), atol=1e-12)
    np.testing.assert_allclose(ds.mix(4), (1, 0, 0), atol=1e-12)
    np.testing.assert_allclose(ds.mix(9), (1, 0, 0), atol=1e-12)
