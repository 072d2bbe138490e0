"""Token cache: HDF5 roundtrip against the tokenizer, fingerprints, damaged and stale files, TokenCache API."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch

from naics_hnm.data import token_cache as token_cache_module
from naics_hnm.data.token_cache import (FORMAT_VERSION, TokenCache, TokenCacheError, TokenizerError, build_token_cache,
                                   cache_fingerprint, ensure_token_cache, load_token_cache, load_tokenizer,
                                   read_fingerprint, token_cache_path)


def _reseal(path):
    """Store the checksum of an edited cache, so that the checks after it can object."""
    path.write_bytes(token_cache_module._seal(path.read_bytes()))


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
    with pytest.raises(TokenCacheError, match=r"cut.h5' (is not a readable HDF5 file|is corrupt \(truncated: )"):
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
    _reseal(copy)
    with pytest.raises(TokenCacheError, match=rf"format_version=0, expected {FORMAT_VERSION}"):
        load_token_cache(copy)
    with h5py.File(copy, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["n_codes"] = 7
    _reseal(copy)
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


CODES = [f"{1000 + i}" for i in range(40)]
TEXTS = [f"Code {i}: farming of crop {i}" + f" and {i * 7} widgets" * (i % 4) for i in range(40)]


def test_file_name_is_keyed_by_the_content(tokenizer, tmp_path):
    path, fp = ensure_token_cache(tmp_path, "my tax/onomy", CODES, TEXTS, tokenizer, 16)
    assert path == token_cache_path(tmp_path, "my tax/onomy", fp) == tmp_path / f"tokens_my_tax_onomy_{fp[:16]}.h5"
    assert fp == cache_fingerprint(TEXTS, tokenizer, 16)
    shorter, fp_shorter = ensure_token_cache(tmp_path, "my tax/onomy", CODES, TEXTS, tokenizer, 8)
    retitled, fp_retitled = ensure_token_cache(tmp_path, "my tax/onomy", CODES, TEXTS[::-1], tokenizer, 16)
    assert len({path, shorter, retitled}) == 3
    for p, f in [(path, fp), (shorter, fp_shorter), (retitled, fp_retitled)]:
        assert load_token_cache(p, f, expected_codes=CODES).size == len(CODES)


def test_ensure_builds_only_when_needed(tokenizer, tmp_path):
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 16)
    before = path.stat()
    assert ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 16) == (path, fp)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".lock"]


def test_token_cache_path_rejects_a_non_fingerprint(tmp_path):
    with pytest.raises(ValueError, match="fingerprint 'abc': expected a hex digest of 16\\+ characters"):
        token_cache_path(tmp_path, "tiny", "abc")


def _lengths_offset(path):
    with h5py.File(path, "r") as f:
        return f["lengths"].id.get_offset()


def test_one_changed_byte_in_lengths_is_detected(tokenizer, tmp_path):
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    data = bytearray(path.read_bytes())
    data[_lengths_offset(path) + 4 * 3] -= 1  # row 3 one token shorter (little-endian low byte)
    path.write_bytes(bytes(data))
    with pytest.raises(TokenCacheError, match=rf"'{path}' is corrupt \(.*\): prepare_data\(\) rebuilds it"):
        load_token_cache(path, fp)


def _rewrite(path, **changes):
    """Change datasets of a cache and store a matching checksum, so only the value checks can object."""
    with h5py.File(path, "a") as f:
        for name, change in changes.items():
            data = f[name][()]
            change(data)
            f[name][...] = data
    _reseal(path)


@pytest.mark.parametrize("changes, message", [
    (dict(lengths=lambda a: a.__setitem__(2, 99)), r"row 2 has length 99, expected 0\.\.\d+"),
    (dict(lengths=lambda a: a.__setitem__(2, -1)), r"row 2 has length -1"),
    (dict(input_ids=lambda a: a.__setitem__((1, 0), 30522)), r"token ids span \d+\.\.30522, expected 0\.\.30521"),
    (dict(input_ids=lambda a: a.__setitem__((1, 0), -5)), r"token ids span -5\.\."),
    (dict(lengths=lambda a: a.__setitem__(0, a[0] - 1)), r"row 0 has tokens past its length \d+ \(attention"),
])
def test_content_checks(tokenizer, tmp_path, changes, message):
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    _rewrite(path, **changes)
    with pytest.raises(TokenCacheError, match=f"is corrupt \\({message}"):
        load_token_cache(path, fp)


def test_a_changed_byte_anywhere_is_detected(tokenizer, tmp_path):
    """Before HDF5 reads the file: HDF5 itself may crash or hang on some damaged bytes."""
    path = tmp_path / "tokens.h5"
    fp = build_token_cache(path, CODES[:3], TEXTS[:3], tokenizer, 16)
    original = path.read_bytes()
    corrupt = re.compile(rf"token cache '{re.escape(str(path))}' is corrupt \((.*)\): prepare_data\(\) rebuilds it")
    problems = set()
    for position in [*range(128), *range(128, len(original), 5)]:  # every byte of the checksum line
        damaged = bytearray(original)
        damaged[position] ^= 0x20
        path.write_bytes(bytes(damaged))
        with pytest.raises(TokenCacheError) as info:
            load_token_cache(path, fp)
        reported = corrupt.fullmatch(str(info.value))
        assert reported, f"byte {position}: {info.value}"
        problems.add(reported[1])
    assert problems == {"damaged checksum block", "checksum mismatch", "its checksum block is missing"}


def test_edits_with_h5py_break_the_checksum(tokenizer, tmp_path):
    path = tmp_path / "tokens.h5"
    build_token_cache(path, CODES, TEXTS, tokenizer, 16)
    with h5py.File(path, "a") as f:
        f["codes"][5] = "9999"
    with pytest.raises(TokenCacheError, match=r"is corrupt \(checksum mismatch\)"):
        load_token_cache(path)


def test_ensure_rebuilds_a_corrupt_or_stale_file(tokenizer, tmp_path, caplog):
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    data = bytearray(path.read_bytes())
    data[_lengths_offset(path)] += 1
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="naics_hnm.data.token_cache"):
        assert ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32) == (path, fp)
    assert f"'{path}' is corrupt" in caplog.text and "rebuilding the token cache: " in caplog.text
    assert load_token_cache(path, fp, expected_codes=CODES).size == len(CODES)
    other, _ = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 8)
    shutil.copy(other, path)  # a file of other inputs under this name
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="naics_hnm.data.token_cache"):
        ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    assert "is stale" in caplog.text
    assert load_token_cache(path, fp, expected_codes=CODES).size == len(CODES)


def test_cache_of_an_earlier_format_is_rebuilt(tokenizer, tmp_path, caplog):
    path, fp = ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    cache = load_token_cache(path)
    with h5py.File(path, "w") as f:  # as format 1 wrote it: no checksum block
        f.create_dataset("input_ids", data=cache.input_ids.numpy().astype(np.int32))
        f.create_dataset("lengths", data=cache.lengths.numpy().astype(np.int32))
        f.create_dataset("codes", data=CODES, dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(format_version=1, fingerprint=fp, max_length=32, pad_token_id=0, n_codes=len(CODES))
    with caplog.at_level(logging.WARNING, logger="naics_hnm.data.token_cache"):
        ensure_token_cache(tmp_path, "tiny", CODES, TEXTS, tokenizer, 32)
    assert "rebuilding the token cache: " in caplog.text
    assert f"format_version=1, expected {FORMAT_VERSION}" in caplog.text
    load_token_cache(path, fp)


@pytest.mark.parametrize("source, message", [
    ("/nonexistent/tokenizers/mini", r"tokenizer '/nonexistent/tokenizers/mini' does not exist: expected a folder"),
    ("no-such-org/no-such-model", r"tokenizer 'no-such-org/no-such-model' is neither a local folder nor a model id"),
])
def test_unknown_tokenizer_is_a_one_line_error(source, message):
    with pytest.raises(TokenizerError, match=message) as info:
        load_tokenizer(source)
    assert "\n" not in str(info.value) and "Repo id" not in str(info.value)


def test_tokenizer_folder_or_file_without_a_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match=rf"tokenizer folder '{tmp_path}' holds no loadable tokenizer") as info:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(info.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(TokenizerError, match=rf"tokenizer '{notes}' is a file: expected a folder holding"):
        load_tokenizer(str(notes))


def _assert_clear_write_error(info, path):
    message = str(info.value)
    assert message.startswith(f"cannot write token cache '{path}': ")
    assert message.endswith("expected a writable folder with room for the file")
    assert ".tmp" not in message and "\n" not in message and "HDF5" not in message


def test_cache_dir_that_is_a_file(tokenizer, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    for cache_dir in (blocker, blocker / "sub"):
        with pytest.raises(TokenCacheError) as info:
            ensure_token_cache(cache_dir, "tiny", CODES, TEXTS, tokenizer, 16)
        _assert_clear_write_error(info, token_cache_path(cache_dir, "tiny", cache_fingerprint(TEXTS, tokenizer, 16)))
        assert f": Not a directory: '{blocker}'; expected" in str(info.value)


def _mount_tmpfs(folder, options):
    """Mount a tmpfs on ``folder`` (root only); skip the test where that is impossible."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name, options):
        folder = tmp_path / name
        _mount_tmpfs(folder, options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_cache_dir(tokenizer, tmp_path, tmpfs):
    if os.geteuid() == 0:
        read_only = tmpfs("ro", "ro,size=64k")
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    with pytest.raises(TokenCacheError) as info:
        ensure_token_cache(read_only, "tiny", CODES, TEXTS, tokenizer, 16)
    _assert_clear_write_error(info, token_cache_path(read_only, "tiny", cache_fingerprint(TEXTS, tokenizer, 16)))
    assert "Read-only file system" in str(info.value) or "Permission denied" in str(info.value)


def test_full_disk_during_the_build(naics, tokenizer, tmpfs):
    full = tmpfs("full", "size=16k")
    path = token_cache_path(full, "naics", cache_fingerprint(naics.texts, tokenizer, 32))
    with pytest.raises(TokenCacheError, match="No space left on device") as info:
        ensure_token_cache(full, "naics", naics.codes, naics.texts, tokenizer, 32)
    _assert_clear_write_error(info, path)
    assert [p.name for p in full.iterdir()] == [f"{path.name}.lock"]  # no temporary file left


def test_no_space_while_replacing_keeps_the_previous_cache(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "tokens.h5"
    fp = build_token_cache(path, CODES, TEXTS, tokenizer, 16)
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(TokenCacheError, match="No space left on device") as info:
        build_token_cache(path, CODES, TEXTS, tokenizer, 8)
    _assert_clear_write_error(info, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["tokens.h5"]
    load_token_cache(path, fp)
