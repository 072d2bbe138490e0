"""Token cache: HDF5 roundtrip against the tokenizer, fingerprints, damaged and stale files, TokenCache API."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from naics_hnm.token_cache import (TokenCache, TokenCacheError, build_token_cache, cache_fingerprint,
                                   load_token_cache, load_tokenizer, read_fingerprint)


def test_roundtrip_equals_tokenizer(naics, tokenizer, token_cache):
    direct = tokenizer(naics.texts, truncation=True, max_length=32)["input_ids"]
    assert token_cache.size == len(token_cache) == 2125
    assert token_cache.codes == naics.codes
    for i in range(len(naics)):
        row = token_cache[i]
        assert row["input_ids"].dtype == torch.long
        assert row["input_ids"].tolist() == direct[i]
        assert row["attention_mask"].tolist() == [1] * len(direct[i])
    assert list(token_cache) == list(range(2125))
    assert token_cache.pad_token_id == tokenizer.pad_token_id


def test_max_length_truncates(naics, tokenizer, tmp_path):
    path = tmp_path / "short.h5"
    fp = build_token_cache(path, naics.codes, naics.texts, tokenizer, max_length=6)
    cache = load_token_cache(path, fp)
    lengths = cache.lengths
    assert int(lengths.max()) == 6
    long_text = max(range(len(naics)), key=lambda i: len(naics.texts[i]))
    full = tokenizer(naics.texts[long_text])["input_ids"]
    assert len(full) > 6
    assert cache[long_text]["input_ids"].tolist() == full[:5] + [tokenizer.sep_token_id]


def test_fingerprint_tracks_inputs(naics, tokenizer):
    texts = naics.texts
    base = cache_fingerprint(texts, tokenizer, 32)
    assert cache_fingerprint(list(texts), tokenizer, 32) == base
    assert cache_fingerprint(texts, tokenizer, 31) != base
    changed = list(texts)
    changed[100] += "!"
    assert cache_fingerprint(changed, tokenizer, 32) != base
    assert cache_fingerprint(texts[:-1], tokenizer, 32) != base
    # concatenation boundaries count: ["ab", "c"] is not ["a", "bc"]
    assert cache_fingerprint(["ab", "c"], tokenizer, 32) != cache_fingerprint(["a", "bc"], tokenizer, 32)


def test_fingerprint_independent_of_tokenizer_call_history(naics, token_cache_path):
    """The same tokenizer must give the same fingerprint before and after it tokenised something
    (HF tokenizers keep the last call's truncation/padding settings in backend_tokenizer.to_str())."""
    fresh = load_tokenizer()
    before = cache_fingerprint(naics.texts, fresh, 32)
    assert before == token_cache_path[1] == read_fingerprint(token_cache_path[0])
    fresh(["Soybean Farming", "Oilseed and grain farming"], truncation=True, max_length=8)
    assert cache_fingerprint(naics.texts, fresh, 32) == before
    # so a cache built with a tokenizer object checks out against that same object
    path = token_cache_path[0].parent / "same_object.h5"
    build_token_cache(path, naics.codes, naics.texts, fresh, max_length=32)
    load_token_cache(path, cache_fingerprint(naics.texts, fresh, 32))


@pytest.mark.parametrize("keep", [0, 10, 500, 0.5, 0.99])
def test_truncated_file_is_a_clear_error(token_cache_path, tmp_path, keep):
    src = token_cache_path[0]
    dst = tmp_path / "cut.h5"
    shutil.copy(src, dst)
    size = os.path.getsize(dst)
    os.truncate(dst, int(keep * size) if isinstance(keep, float) else keep)
    with pytest.raises(TokenCacheError, match=r"cut.h5' is not a readable HDF5 file"):
        load_token_cache(dst)
    assert read_fingerprint(dst) is None


def test_foreign_hdf5_file(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=np.zeros((3, 4), dtype=np.float32))
        f.create_dataset("lengths", data=np.zeros(3, dtype=np.int32))
    with pytest.raises(TokenCacheError, match=r"foreign.h5' lacks dataset\(s\) \['input_ids', 'codes'\]"):
        load_token_cache(path)
    assert read_fingerprint(path) is None
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(TokenCacheError, match="notes.h5' is not a readable HDF5 file"):
        load_token_cache(text)


def test_missing_stale_and_mismatched(token_cache_path, naics, tmp_path):
    path, fp = token_cache_path
    with pytest.raises(TokenCacheError, match=r"absent.h5' does not exist: run prepare_data\(\) first"):
        load_token_cache(tmp_path / "absent.h5")
    with pytest.raises(TokenCacheError, match=rf"is stale: fingerprint {fp[:12]} != expected 000000000000"):
        load_token_cache(path, "0" * 64)
    with pytest.raises(TokenCacheError, match="different code list"):
        load_token_cache(path, fp, expected_codes=naics.codes[::-1])
    copy = tmp_path / "old.h5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(TokenCacheError, match=r"format_version=(np\.int64\()?0\)?, expected 1"):
        load_token_cache(copy)
    with h5py.File(copy, "a") as f:
        f.attrs["format_version"] = 1
        f.attrs["n_codes"] = 7
    with pytest.raises(TokenCacheError, match="inconsistent: 2125 rows, 2125 lengths, 2125 codes, n_codes=7"):
        load_token_cache(copy)


def test_build_bad_arguments(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="2 codes but 1 texts"):
        build_token_cache(tmp_path / "x.h5", ["1", "2"], ["a"], tokenizer)
    with pytest.raises(ValueError, match="max_length=1"):
        build_token_cache(tmp_path / "x.h5", ["1"], ["a"], tokenizer, max_length=1)
    assert not (tmp_path / "x.h5").exists()


def test_from_dict_plain_mapping():
    plain = {
        0: {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1]},
        2: {"input_ids": torch.tensor([101, 8, 9, 102, 0, 0]), "attention_mask": torch.tensor([1, 1, 1, 1, 0, 0])},
        3: {"input_ids": np.array([101, 102])},  # no mask: all tokens count
    }
    cache = TokenCache.from_dict(plain, n=5)
    assert cache.size == 5 and len(cache) == 3 and list(cache) == [0, 2, 3]
    assert cache[2]["input_ids"].tolist() == [101, 8, 9, 102]  # padding dropped
    assert cache[2]["attention_mask"].tolist() == [1, 1, 1, 1]
    assert cache[3]["input_ids"].tolist() == [101, 102]
    assert cache.present.tolist() == [True, False, True, True, False]
    with pytest.raises(KeyError):
        cache[1]
    with pytest.raises(KeyError):
        cache[5]
    assert TokenCache.from_dict(cache) is cache
    assert TokenCache.from_dict(plain).size == 4  # n defaults to max key + 1
    with pytest.raises(ValueError, match="token cache key 'a'"):
        TokenCache.from_dict({"a": {"input_ids": [1]}}, n=3)
    with pytest.raises(ValueError, match="token cache key 9: expected an int code index in \\[0, 5\\)"):
        TokenCache.from_dict({9: {"input_ids": [1]}}, n=5)


def test_from_dict_non_int_key_without_n_is_a_clear_error():
    with pytest.raises(ValueError, match="token cache key 'a'"):
        TokenCache.from_dict({"a": {"input_ids": [1]}})


def test_gather_with_padding_ids(token_cache):
    ids = torch.tensor([[5, -1, 17], [-1, -1, 2124]])
    out = token_cache.gather(ids)
    width = max(int(token_cache.lengths[i]) for i in (5, 17, 2124))
    assert out["input_ids"].shape == (2, 3, width) == out["attention_mask"].shape
    for (r, c), i in np.ndenumerate(ids.numpy()):
        row_ids, row_mask = out["input_ids"][r, c], out["attention_mask"][r, c]
        if i < 0:
            assert row_ids.eq(token_cache.pad_token_id).all() and row_mask.eq(0).all()
        else:
            n = int(token_cache.lengths[i])
            assert row_ids[:n].tolist() == token_cache[i]["input_ids"].tolist()
            assert row_mask.tolist() == [1] * n + [0] * (width - n)
            assert row_ids[n:].eq(token_cache.pad_token_id).all()
    all_pad = token_cache.gather(torch.tensor([-1, -1]))
    assert all_pad["input_ids"].shape == (2, 1) and all_pad["attention_mask"].sum() == 0
    narrow = token_cache.gather(torch.tensor([5]), width=3)
    assert narrow["input_ids"][0].tolist() == token_cache[5]["input_ids"][:3].tolist()
