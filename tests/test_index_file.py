"""The index file set: generations switched by one sidecar, surviving SIGKILL at every step of a save."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.index_file import IndexFileError
from naics_hnm.index.index_file import current_index_file, read_sidecar, sha256_file, sidecar_path

ROOT = Path(__file__).resolve().parents[1]

# Saves a new HNSW index (epoch 2) to argv[1], killing itself with SIGKILL just before or after the
# n-th os.replace, or at the n-th os.unlink (the clean-up of older generations).
CHILD = """
import os, sys
import numpy as np
from naics_hnm.index.embedding_index import EmbeddingIndex

path, when, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
index = EmbeddingIndex.build(np.load(sys.argv[4]), device="cpu", index_factory="HNSW8", epoch=2)
calls = {"replace": 0, "unlink": 0}

def hooked(name, real):
    def call(*args, **kwargs):
        calls[name] += 1
        hit = calls[name] == n and (name == "unlink") == (when == "unlink")
        if hit and when in ("before", "unlink"):
            os.kill(os.getpid(), 9)
        result = real(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), 9)
        return result
    return call

os.replace = hooked("replace", os.replace)
os.unlink = hooked("unlink", os.unlink)
index.save(path)
sys.exit(3)
"""

# os.replace calls of an approximate save: 1 index file, 2 vectors file, 3 sidecar (the commit).
KILL_POINTS = [("before", 1, "old"), ("after", 1, "old"), ("after", 2, "old"), ("before", 3, "old"),
               ("after", 3, "new"), ("unlink", 1, "new")]


def vectors(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_sigkill_at_every_step_of_a_save_leaves_one_whole_set(tmp_path):
    old_x, new_x = vectors(1, 200), vectors(2, 300)
    np.save(tmp_path / "new.npy", new_x)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    children = []
    for when, n, _ in KILL_POINTS:
        folder = tmp_path / f"{when}{n}"
        EmbeddingIndex.build(vectors(0, 50), device="cpu", index_factory="HNSW8", epoch=0).save(folder / "x.faiss")
        EmbeddingIndex.build(old_x, device="cpu", index_factory="HNSW8", epoch=1).save(folder / "x.faiss")
        args = [sys.executable, "-c", CHILD, str(folder / "x.faiss"), when, str(n), str(tmp_path / "new.npy")]
        children.append(subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True))
    for (when, n, expected), child in zip(KILL_POINTS, children):
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL, (when, n, child.returncode, stderr[-2000:])
        path = tmp_path / f"{when}{n}" / "x.faiss"
        loaded = EmbeddingIndex.load(path, device="cpu")
        want = old_x if expected == "old" else new_x
        assert (loaded.epoch, loaded.ntotal) == ((1, 200) if expected == "old" else (2, 300)), (when, n)
        unit = want / np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(loaded.vectors.numpy(), unit, rtol=1e-6, atol=1e-6)
        assert loaded.search(want[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
        EmbeddingIndex.build(old_x, device="cpu", epoch=3).save(path)  # the next save clears what the kill left
        left = sorted(p.name for p in path.parent.iterdir())
        assert left == ["x.faiss", current_index_file(path).name, "x.faiss.json"], (when, n, left)
        assert os.path.samefile(path, current_index_file(path))  # path is the committed index, for faiss tools
        assert EmbeddingIndex.load(path, device="cpu").epoch == 3


def test_generations_replace_each_other(tmp_path):
    path = tmp_path / "x.faiss"
    for epoch in range(3):
        EmbeddingIndex.build(vectors(epoch, 40), device="cpu", index_factory="HNSW8", epoch=epoch).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x.faiss", "x.faiss.g000003.index", "x.faiss.g000003.vectors.npy", "x.faiss.json"]
    assert faiss.read_index(str(path)).ntotal == 40
    assert current_index_file(path) == tmp_path / "x.faiss.g000003.index"
    assert faiss.read_index(str(current_index_file(path))).ntotal == 40
    assert EmbeddingIndex.load(path).epoch == 2


def test_save_removes_our_stale_temporaries_only(tmp_path):
    path = tmp_path / "x.faiss"
    ours = [".x.faiss.g000007.index.abc_1234.tmp", ".x.faiss.g000007.vectors.npy.zz99zz99.tmp",
            ".x.faiss.json.a1b2c3d4.tmp", "x.faiss.g000005.index", "x.faiss.g000005.vectors.npy"]
    others = [".y.faiss.json.a1b2c3d4.tmp", ".x.faiss.bak.a1b2c3d4.tmp", "x.faiss.bak", "x.faiss.g1.notes.txt"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"left over")
    EmbeddingIndex.build(vectors(0, 30), device="cpu").save(path)
    assert read_sidecar(path)["generation"] == 6  # after the highest generation file on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others + ["x.faiss", "x.faiss.g000006.index", "x.faiss.json"])


@pytest.mark.parametrize("name", ["../x.faiss.g000001.index", "/etc/passwd", "sub/x.index", "..", "", "a\\b", 7])
def test_sidecar_naming_a_file_outside_its_folder_is_refused(tmp_path, name):
    path = tmp_path / "x.faiss"
    EmbeddingIndex.build(vectors(0, 30), device="cpu").save(path)
    meta = json.loads(sidecar_path(path).read_text())
    meta["index_file"] = name
    sidecar_path(path).write_text(json.dumps(meta))
    message = re.escape(f"names index_file {name!r}; expected a plain file name inside")
    with pytest.raises(IndexFileError, match=message):
        EmbeddingIndex.load(path)


def test_vectors_file_outside_its_folder_is_refused(tmp_path):
    path = tmp_path / "x.faiss"
    EmbeddingIndex.build(vectors(0, 30), device="cpu", index_factory="HNSW8").save(path)
    meta = json.loads(sidecar_path(path).read_text())
    meta["vectors_file"] = "../x.faiss.g000001.vectors.npy"
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="names vectors_file '../x.faiss.g000001.vectors.npy'"):
        EmbeddingIndex.load(path)


def write_format1(path: Path, x: np.ndarray) -> None:
    """An index set as format 1 wrote it: the faiss file at ``path`` itself."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    faiss.write_index(index, str(path))
    meta = {"format_version": 1, "metric": "l2", "dim": x.shape[1], "ntotal": len(x), "index_type": "Flat",
            "codes_fingerprint": None, "model_fingerprint": "old", "epoch": 5,
            "index_sha256": sha256_file(path),
            "vectors_file": None, "vectors_sha256": None}
    sidecar_path(path).write_text(json.dumps(meta))


def test_format1_is_read_and_replaced_by_the_next_save(tmp_path):
    path, x = tmp_path / "old.faiss", vectors(4, 60)
    write_format1(path, x)
    loaded = EmbeddingIndex.load(path, device="cpu")
    assert (loaded.epoch, loaded.metric, loaded.model_fingerprint) == (5, "l2", "old")
    np.testing.assert_array_equal(loaded.vectors.numpy(), x)
    assert loaded.search(x[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    loaded.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.faiss", "old.faiss.g000001.index", "old.faiss.json"]
    np.testing.assert_array_equal(EmbeddingIndex.load(path).vectors.numpy(), x)


def test_bad_search_params_in_a_sidecar_are_an_index_file_error(tmp_path):
    path = tmp_path / "x.faiss"
    EmbeddingIndex.build(vectors(0, 400), device="cpu", index_factory="IVF4,Flat").save(path)
    meta = json.loads(sidecar_path(path).read_text())
    for params, message in [({"efSearch": 16}, "'efSearch' does not apply: index 'IVF4,Flat' takes only"),
                            ({"nprobe": 9}, "nprobe=9 exceeds the index's nlist=4"),
                            ({"nprobe": "4"}, "expected an object of integer values")]:
        sidecar_path(path).write_text(json.dumps({**meta, "search_params": params}))
        with pytest.raises(IndexFileError, match=message):
            EmbeddingIndex.load(path)


@pytest.mark.parametrize("key, value", [("metric", "cosine2"), ("dim", "16"), ("generation", "seven"),
                                        ("ntotal", -1), ("dim", True)])
def test_hand_edited_sidecar_values_are_refused(tmp_path, key, value):
    path = tmp_path / "x.faiss"
    EmbeddingIndex.build(vectors(0, 30), device="cpu").save(path)
    meta = json.loads(sidecar_path(path).read_text())
    meta[key] = value
    sidecar_path(path).write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=rf"has {key} {re.escape(repr(value))}, expected"):
        EmbeddingIndex.load(path)


def test_save_to_a_folder_or_under_a_file_writes_nothing(tmp_path):
    index = EmbeddingIndex.build(vectors(0, 30), device="cpu")
    (tmp_path / "out").mkdir()
    (tmp_path / "plain").write_text("a file")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(IndexFileError, match=r"index path '.*out' is a folder; expected a file path inside it"):
        index.save(tmp_path / "out")
    with pytest.raises(IndexFileError, match=r"lies under '.*plain', which is a file"):
        index.save(tmp_path / "plain" / "x.faiss")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
