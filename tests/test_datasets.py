"""Phase1MapDataset indexing and missing tokens; NAICSMapDataset from pre-sampled triplets; triplet files."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from conftest import TINY_ROWS, dict_token_cache
from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.datasets import NAICSMapDataset, Phase1MapDataset, load_triplets, save_triplets
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.data.token_cache import TokenCache

PHASE1_END = 3


@pytest.fixture(scope="module")
def ds(naics, token_cache):
    return Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, PHASE1_END, taxonomy=naics)


def _same_item(x, y):
    assert x.keys() == y.keys()
    for key in x:
        if isinstance(x[key], np.ndarray):
            np.testing.assert_array_equal(x[key], y[key])
        else:
            assert x[key] is y[key] or x[key] == y[key], key


def test_contract_attributes(ds, naics, token_cache):
    assert ds.cfg == StreamingConfig() and ds.sampling_cfg == SamplingConfig()
    assert ds.phase1_end_epoch == PHASE1_END and ds.epoch == 0
    assert ds.token_cache is token_cache
    item = ds[0]
    for key in ("anchor_code", "positive_code", "negative_codes", "candidate_codes"):
        assert key in item
    assert isinstance(item["anchor_code"], str) and all(isinstance(c, str) for c in item["negative_codes"])


def test_set_epoch_int_indices_equal_epoch_tuples(ds):
    idx = list(range(0, len(ds), 37))
    try:
        for epoch in (0, 2, 5):
            ds.set_epoch(epoch)
            assert ds.epoch == epoch
            plain = ds.__getitems__(idx)
            tupled = ds.__getitems__([(epoch, i) for i in idx])
            for x, y in zip(plain, tupled):
                _same_item(x, y)
            _same_item(ds[idx[3]], plain[3])
            _same_item(ds[(epoch, idx[3])], plain[3])
        # a tuple overrides the dataset epoch
        ds.set_epoch(0)
        _same_item(ds[(2, idx[1])], ds.__getitems__([(2, idx[1])])[0])
        assert not np.array_equal(ds[(2, idx[1])]["candidate_idx"], ds[idx[1]]["candidate_idx"])
    finally:
        ds.set_epoch(0)


def test_bad_indices_and_epochs(ds, naics, token_cache):
    with pytest.raises(IndexError, match=f"index {len(ds)} out of range for {len(ds)} pairs"):
        ds[len(ds)]
    with pytest.raises(IndexError, match="index -1 out of range"):
        ds[(0, -1)]
    with pytest.raises(ValueError, match=r"set_epoch\(-1\)"):
        ds.set_epoch(-1)
    with pytest.raises(ValueError, match=r"set_epoch\('1'\)"):
        ds.set_epoch("1")
    with pytest.raises(TypeError, match="cfg=.*expected a StreamingConfig"):
        Phase1MapDataset({"seed": 1}, SamplingConfig(), token_cache, 2, taxonomy=naics)
    with pytest.raises(TypeError, match="sampling_cfg=None"):
        Phase1MapDataset(StreamingConfig(), None, token_cache, 2, taxonomy=naics)
    with pytest.raises(ValueError, match="phase1_end_epoch=-1"):
        Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, -1, taxonomy=naics)


def test_token_cache_must_match_taxonomy(naics, token_cache, make_csv):
    tiny = Taxonomy.from_csv(make_csv(TINY_ROWS))
    with pytest.raises(ValueError, match=f"token cache has 2125 rows, taxonomy {len(tiny)} codes"):
        Phase1MapDataset(StreamingConfig(), SamplingConfig(), token_cache, 2, taxonomy=tiny)
    shuffled = TokenCache(token_cache.input_ids, token_cache.lengths, codes=naics.codes[::-1])
    with pytest.raises(ValueError, match="different code list"):
        Phase1MapDataset(StreamingConfig(), SamplingConfig(), shuffled, 2, taxonomy=naics)


def test_missing_tokens_give_none_exactly_when_needed(naics, ds):
    missing = naics.index("5417")
    partial = Phase1MapDataset(StreamingConfig(), SamplingConfig(), dict_token_cache(naics, skip={missing}),
                               PHASE1_END, taxonomy=naics)
    for epoch in (0, 2):
        full_items = ds.__getitems__([(epoch, i) for i in range(len(ds))])
        partial_items = partial.__getitems__([(epoch, i) for i in range(len(ds))])
        n_none = 0
        for full, part in zip(full_items, partial_items):
            needed = {full["anchor_idx"], full["positive_idx"], *full["candidate_idx"].tolist()}
            if missing in needed:
                assert part is None
                n_none += 1
            else:
                assert part is not None
                np.testing.assert_array_equal(part["candidate_idx"], full["candidate_idx"])
        assert 0 < n_none < len(ds) // 2
        batch = collate_fn(partial_items[:256])  # None items are dropped by collation
        assert len(batch["anchor_idx"]) == sum(it is not None for it in partial_items[:256])


def test_presampled_map_dataset_matches_phase1(ds, naics, token_cache):
    rows = ds.presample(2, indices=range(0, len(ds), 5))
    assert all(isinstance(v, int) for r in rows for v in (r["anchor_idx"], r["positive_idx"], *r["negative_idx"]))
    mapped = NAICSMapDataset(rows, token_cache, codes=naics.codes)
    assert len(mapped) == len(rows)
    originals = ds.__getitems__([(2, i) for i in range(0, len(ds), 5)])
    for j in (0, 1, len(rows) // 2, len(rows) - 1):
        got, want = mapped[j], originals[j]
        for key in ("anchor_code", "positive_code", "negative_codes", "candidate_codes", "anchor_idx", "positive_idx"):
            assert got[key] == want[key], key
        np.testing.assert_array_equal(got["negative_idx"], want["negative_idx"])
        np.testing.assert_array_equal(got["candidate_idx"], want["candidate_idx"])
    a = collate_fn(mapped.__getitems__(list(range(64))))
    b = collate_fn(originals[:64])
    for key in ("anchor_idx", "positive_idx", "negative_idx", "candidate_idx", "negative_mask"):
        assert torch.equal(a[key], b[key]), key
    for key in ("anchor", "positive", "negatives"):
        assert torch.equal(a[key]["input_ids"], b[key]["input_ids"])


def test_map_dataset_variable_widths_and_default_codes(token_cache):
    rows = [{"anchor_idx": 1, "positive_idx": 0, "negative_idx": [5, 6]},
            {"anchor_idx": 2, "positive_idx": 0, "negative_idx": [7], "candidate_idx": [7, 8, 9]}]
    mapped = NAICSMapDataset(rows, token_cache)
    assert mapped[0]["negative_idx"].tolist() == [5, 6]
    assert mapped[0]["candidate_idx"].tolist() == [5, 6, -1]  # candidates default to the negatives
    assert mapped[1]["negative_idx"].tolist() == [7, -1]
    assert mapped[1]["negative_codes"] == [token_cache.codes[7]]
    plain = NAICSMapDataset(rows, dict_token_cache(Taxonomy.from_records(
        [{"code": c, "title": t} for c, t in TINY_ROWS + [("1112", "V"), ("1113", "F"), ("1114", "G")]])))
    assert plain[0]["anchor_code"] == "1"  # no code list: the index as text


@pytest.mark.parametrize(
    "row, match",
    [
        ({"positive_idx": 0, "negative_idx": [1]}, r"triplet row 0: .*anchor_idx"),
        ({"anchor_idx": 1, "positive_idx": 0}, r"triplet row 0: .*negative_idx"),
        ({"anchor_idx": 1, "positive_idx": 0, "negative_idx": 5}, r"triplet row 0"),
        ({"anchor_idx": "x", "positive_idx": 0, "negative_idx": [1]}, r"triplet row 0"),
        ({"anchor_idx": 1, "positive_idx": 0, "negative_idx": [9999]}, r"triplet row 0: id out of range \[0, 2125\)"),
        ({"anchor_idx": 1, "positive_idx": -1, "negative_idx": [2]}, r"id out of range"),
        ({"anchor_idx": 1, "positive_idx": 0, "negative_idx": [4, 4]}, r"repeated negative in \[4, 4\]"),
    ],
)
def test_map_dataset_bad_rows(token_cache, row, match):
    good = {"anchor_idx": 1, "positive_idx": 0, "negative_idx": [2, 3]}
    with pytest.raises(ValueError, match=match.replace("row 0", "row 1")):
        NAICSMapDataset([good, row], token_cache)


def test_triplet_file_roundtrip_and_atomicity(ds, tmp_path):
    rows = ds.presample(1, indices=range(100))
    path = tmp_path / "triplets.jsonl"
    save_triplets(rows, path)
    assert load_triplets(path) == rows
    before = path.read_bytes()
    bad = copy.deepcopy(rows)
    bad[50]["anchor_idx"] = {1, 2}  # not JSON serialisable: the write fails half-way
    with pytest.raises(TypeError):
        save_triplets(bad, path)
    assert path.read_bytes() == before  # the previous file is untouched
    assert os.listdir(tmp_path) == ["triplets.jsonl"]  # no temporary file left behind
    save_triplets(rows[:3], path)
    assert load_triplets(path) == rows[:3]


def test_triplet_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_triplets(tmp_path / "absent.jsonl")
    path = tmp_path / "broken.jsonl"
    path.write_text('{"anchor_idx": 1, "positive_idx": 0, "negative_idx": [2]}\n\n{"anchor_idx": 1,\n')
    with pytest.raises(ValueError, match=r"broken.jsonl' line 3"):
        load_triplets(path)
