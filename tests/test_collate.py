"""collate_fn: the contract's batch layout, token rows equal to the cache, masks, None and bad batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import dict_token_cache
from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.datasets import NAICSMapDataset, Phase1MapDataset
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.data.token_cache import TokenCache


@pytest.fixture(scope="module")
def ds(naics, token_cache):
    return Phase1MapDataset(StreamingConfig(n_negatives=6, n_candidates=20), SamplingConfig(), token_cache, 3,
                            taxonomy=naics)


def _check_tokens(tokens, ids, cache: TokenCache):
    """tokens[..., L] rows equal the cache rows of ids (unpadded part); the rest is padding with attention 0."""
    input_ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert input_ids.dtype == torch.long and mask.dtype == torch.long
    assert input_ids.shape == mask.shape == (*ids.shape, input_ids.shape[-1])
    flat_ids, flat_tok, flat_mask = ids.reshape(-1), input_ids.reshape(-1, input_ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    for i, row, m in zip(flat_ids.tolist(), flat_tok, flat_mask):
        n = 0 if i < 0 else int(cache.lengths[i])
        if i >= 0:
            assert row[:n].tolist() == cache[i]["input_ids"].tolist()
        assert m.tolist() == [1] * n + [0] * (len(m) - n)
        assert row[n:].eq(cache.pad_token_id).all()


def test_layout_and_tokens(ds, token_cache):
    items = ds.__getitems__([(1, i) for i in range(0, 3000, 47)])
    batch = collate_fn(items)
    b, k, c = len(items), 6, 20
    for key in ("anchor", "positive"):
        assert set(batch[key]) >= {"input_ids", "attention_mask"}
        assert batch[key]["input_ids"].ndim == 2 and batch[key]["input_ids"].shape[0] == b
    width = batch["anchor"]["input_ids"].shape[1]
    assert batch["negatives"]["input_ids"].shape == (b, k, width)
    assert batch["negative_mask"].dtype == torch.bool and batch["negative_mask"].shape == (b, k)
    for key, shape in (("anchor_idx", (b,)), ("positive_idx", (b,)), ("negative_idx", (b, k)), ("candidate_idx", (b, c))):
        assert batch[key].dtype == torch.int64 and batch[key].shape == shape, key
    assert batch["anchor_idx"].tolist() == [it["anchor_idx"] for it in items]
    assert batch["positive_idx"].tolist() == [it["positive_idx"] for it in items]
    assert batch["negative_idx"].tolist() == [it["negative_idx"].tolist() for it in items]
    assert batch["candidate_idx"].tolist() == [it["candidate_idx"].tolist() for it in items]
    assert batch["anchor_code"] == [it["anchor_code"] for it in items]
    assert batch["negative_mask"].all()
    for row in batch["negative_idx"].tolist():
        assert len(set(row)) == len(row)  # no repeated entry hides behind a True mask
    # L is the longest anchor / positive / negative text of the batch
    used = torch.cat([batch["anchor_idx"], batch["positive_idx"], batch["negative_idx"].flatten()])
    assert width == int(token_cache.lengths[used].max())
    _check_tokens(batch["anchor"], batch["anchor_idx"], token_cache)
    _check_tokens(batch["positive"], batch["positive_idx"], token_cache)
    _check_tokens(batch["negatives"], batch["negative_idx"], token_cache)


def test_padding_and_mask(token_cache):
    rows = [
        {"anchor_idx": 10, "positive_idx": 1, "negative_idx": [30, 31, 32], "candidate_idx": [30, 31, 32, 33, 34]},
        {"anchor_idx": 11, "positive_idx": 1, "negative_idx": [40]},
        {"anchor_idx": 12, "positive_idx": 1, "negative_idx": []},
    ]
    batch = collate_fn(NAICSMapDataset(rows, token_cache).__getitems__([0, 1, 2]))
    assert batch["negative_idx"].tolist() == [[30, 31, 32], [40, -1, -1], [-1, -1, -1]]
    assert batch["negative_mask"].tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert batch["candidate_idx"].tolist() == [[30, 31, 32, 33, 34], [40, -1, -1, -1, -1], [-1] * 5]
    _check_tokens(batch["negatives"], batch["negative_idx"], token_cache)
    assert batch["negatives"]["attention_mask"][~batch["negative_mask"]].sum() == 0
    for row, mask in zip(batch["negative_idx"], batch["negative_mask"]):
        valid = row[mask].tolist()
        assert len(valid) == len(set(valid)) and -1 not in valid


def test_padding_from_a_tiny_taxonomy(make_csv):
    tx = Taxonomy.from_csv(make_csv([("11", "A"), ("111", "B"), ("112", "C"), ("21", "D"), ("211", "E")]))
    cache = TokenCache.from_dict(dict_token_cache(tx), len(tx))
    ds = Phase1MapDataset(StreamingConfig(n_negatives=3, n_candidates=4, positive_relations=("parent", "sibling")),
                          SamplingConfig(), cache, 2, taxonomy=tx)
    items = ds.__getitems__(list(range(len(ds))))
    batch = collate_fn(items)
    assert (batch["negative_mask"] == (batch["negative_idx"] >= 0)).all()
    assert not batch["negative_mask"].all()  # some anchors have fewer than 3 valid negatives
    for it, row, mask in zip(items, batch["negative_idx"], batch["negative_mask"]):
        assert row[mask].tolist() == [v for v in it["negative_idx"].tolist() if v >= 0]
    _check_tokens(batch["negatives"], batch["negative_idx"], cache)


def test_padding_in_the_middle_is_compacted(token_cache):
    item = {"anchor_idx": 3, "positive_idx": 0, "negative_idx": np.array([5, -1, 7]),
            "candidate_idx": np.array([-1, 5, 7, 9]), "anchor_code": "x", "positive_code": "y", "tokens": token_cache}
    batch = collate_fn([item])
    assert batch["negative_idx"].tolist() == [[5, 7, -1]]
    assert batch["negative_mask"].tolist() == [[True, True, False]]
    assert batch["candidate_idx"].tolist() == [[5, 7, 9, -1]]
    _check_tokens(batch["negatives"], batch["negative_idx"], token_cache)


def test_none_items_dropped(ds):
    items = ds.__getitems__([(0, i) for i in range(8)])
    with_none = [None, items[0], items[1], None, items[2], None]
    batch = collate_fn(with_none)
    assert batch["anchor_idx"].tolist() == [items[j]["anchor_idx"] for j in range(3)]
    ref = collate_fn(items[:3])
    for key in ("negative_idx", "candidate_idx", "negative_mask"):
        assert torch.equal(batch[key], ref[key])
    assert torch.equal(batch["negatives"]["input_ids"], ref["negatives"]["input_ids"])


def test_empty_and_bad_batches(ds, naics):
    with pytest.raises(ValueError, match=r"empty batch \(0 items"):
        collate_fn([])
    with pytest.raises(ValueError, match=r"empty batch \(3 items, all None"):
        collate_fn([None, None, None])
    items = ds.__getitems__([0, 1])
    other = dict(items[1], tokens=TokenCache.from_dict(dict_token_cache(naics), len(naics)))
    with pytest.raises(ValueError, match="same TokenCache"):
        collate_fn([items[0], other])


def test_does_not_mutate_input(ds, token_cache):
    items = ds.__getitems__([(2, i) for i in range(0, 600, 3)]) + [None]
    before = [None if it is None else copy.deepcopy({k: v for k, v in it.items() if k != "tokens"}) for it in items]
    ids_before, lengths_before = token_cache.input_ids.clone(), token_cache.lengths.clone()
    batch = collate_fn(items)
    batch["negative_idx"].fill_(-5)  # the batch does not alias the items either
    batch["candidate_idx"].fill_(-5)
    batch["anchor"]["input_ids"].fill_(-5)
    for it, old in zip(items, before):
        if it is None:
            assert old is None
            continue
        assert it.keys() - {"tokens"} == old.keys() and it["tokens"] is token_cache
        for key, value in old.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(it[key], value)
            else:
                assert it[key] == value
    assert torch.equal(token_cache.input_ids, ids_before) and torch.equal(token_cache.lengths, lengths_before)
