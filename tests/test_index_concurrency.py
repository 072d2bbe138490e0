"""Concurrent saves of one index path by real processes, with a reader loading all the while."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from naics_hnm.atomic import LockTimeoutError, exclusive_lock
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.index_file import write_index_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
N, D, ROUNDS, INTERVAL = 40_000, 32, 8, 1.2

# Writer: builds a flat index per round (epoch = 1000 * writer + round, row 0 = writer + round) and
# saves it to argv[1] at start + round * interval, together with the other writer; one JSON line each.
WRITER = """
import json, sys, time
import numpy as np
from naics_hnm.index.embedding_index import EmbeddingIndex
path, writer, start, rounds, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
x = np.random.default_rng(writer).standard_normal((%d, %d)).astype(np.float32)
for r in range(rounds):
    x[0] = writer + r + 1.0
    index = EmbeddingIndex.build(x, device="cpu", epoch=1000 * writer + r)
    time.sleep(max(0.0, start + r * interval - time.time()))
    try:
        index.save(path)
        print(json.dumps({"round": r, "ok": True}), flush=True)
    except Exception as err:  # reported to the test, which fails on it
        print(json.dumps({"round": r, "ok": False, "error": f"{type(err).__name__}: {err}"}), flush=True)
""" % (N, D)

# Reader: loads argv[1] until argv[2] (wall clock); every load must be one whole set.
READER = """
import json, sys, time
import numpy as np
from naics_hnm.index.embedding_index import EmbeddingIndex
path, end = sys.argv[1], float(sys.argv[2])
loads, bad = 0, []
while time.time() < end:
    try:
        index = EmbeddingIndex.load(path, device="cpu")
    except Exception as err:
        bad.append(f"{type(err).__name__}: {err}")
        continue
    writer, r = divmod(index.epoch, 1000)
    first = index.vectors[0].numpy()
    if writer > 0 and not np.allclose(first, np.full_like(first, 1 / np.sqrt(first.size)), atol=1e-6):
        bad.append(f"epoch {index.epoch}: row 0 is not that save's row 0")
    loads += 1
print(json.dumps({"loads": loads, "bad": bad[:5], "n_bad": len(bad)}))
"""


def test_two_writers_and_a_reader_on_one_index_path(tmp_path):
    path = tmp_path / "k" / "x.faiss"
    EmbeddingIndex.build(np.ones((10, D), np.float32), device="cpu", epoch=0).save(path)
    start = time.time() + 8.0  # both writers have imported faiss and built their first index by then
    end = start + ROUNDS * INTERVAL + 2.0
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), str(start), str(ROUNDS),
                                 str(INTERVAL)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in (1, 2)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(end)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [w.communicate(timeout=300) for w in writers]
    out, err = reader.communicate(timeout=300)
    for w, (stdout, stderr) in zip(writers, results):
        lines = [json.loads(line) for line in stdout.splitlines()]
        assert [line["round"] for line in lines] == list(range(ROUNDS)), stderr[-2000:]
        assert all(line["ok"] for line in lines), [line for line in lines if not line["ok"]]
    seen = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert seen is not None, err[-2000:]
    assert seen["n_bad"] == 0 and seen["loads"] > 0, "\n".join(seen["bad"])
    final = EmbeddingIndex.load(path, device="cpu")
    assert final.epoch % 1000 == ROUNDS - 1 and final.ntotal == N  # a save of the last round committed last
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == ["x.faiss", f"x.faiss.g{ROUNDS * 2 + 1:06d}.index", "x.faiss.json"], left


HOLDER = """
import sys, time
from naics_hnm.atomic import exclusive_lock
with exclusive_lock(sys.argv[1], hidden=True, remove=True):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_save_waiting_too_long_names_the_holder_and_writes_nothing(tmp_path):
    path = tmp_path / "x.faiss"
    EmbeddingIndex.build(np.ones((10, D), np.float32), device="cpu", epoch=0).save(path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        index = EmbeddingIndex.build(np.ones((5, D), np.float32), device="cpu", epoch=1)
        with pytest.raises(LockTimeoutError, match=rf"'{path}' is being written by pid {holder.pid} on "):
            write_index_files(path, index._cpu_index, None, index._metadata(), lock_timeout=0.5)
    finally:
        holder.kill()
        holder.wait()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".x.faiss.lock"}
    assert after == before  # the holder died holding it: its lock file stays until the next save
    EmbeddingIndex.build(np.ones((5, D), np.float32), device="cpu", epoch=1).save(path)
    assert EmbeddingIndex.load(path).epoch == 1 and not (tmp_path / ".x.faiss.lock").exists()


def test_lock_file_removed_by_its_holder_is_not_shared(tmp_path):
    """A waiter that opened the lock file before its holder removed it takes a fresh one, not the dead inode."""
    target = tmp_path / "t"
    with exclusive_lock(target, hidden=True, remove=True) as lock_path:
        assert lock_path.read_text().split()[0] == str(os.getpid())
    assert not lock_path.exists()
    with exclusive_lock(target) as kept:
        pass
    assert kept.exists() and kept.name == "t.lock"


# Embeddings file writer: argv[2] writer, saves ROUNDS files at start + round * interval (epoch = 1000 * writer + round).
EMB_WRITER = """
import json, sys, time
import numpy as np
from naics_hnm.embeddings_file import save_embeddings
path, writer, start, rounds, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
codes = [f"c{i}" for i in range(20000)]
for r in range(rounds):
    x = np.full((20000, 16), float(1000 * writer + r), np.float32)
    time.sleep(max(0.0, start + r * interval - time.time()))
    try:
        save_embeddings(path, x, codes, epoch=1000 * writer + r)
        print(json.dumps({"round": r, "ok": True}), flush=True)
    except Exception as err:  # reported to the test, which fails on it
        print(json.dumps({"round": r, "ok": False, "error": f"{type(err).__name__}: {err}"}), flush=True)
"""

EMB_READER = """
import json, sys, time
from naics_hnm.embeddings_file import load_embeddings
path, end = sys.argv[1], float(sys.argv[2])
loads, bad = 0, []
while time.time() < end:
    try:
        f = load_embeddings(path)
    except Exception as err:
        bad.append(f"{type(err).__name__}: {err}")
        continue
    if not (f.embeddings == f.attrs["epoch"]).all():
        bad.append(f"epoch {f.attrs['epoch']}: vectors of another save")
    loads += 1
print(json.dumps({"loads": loads, "bad": bad[:5], "n_bad": len(bad)}))
"""


def test_two_writers_and_a_reader_on_one_embeddings_file(tmp_path):
    """One file, replaced by os.replace of a writer-named temporary: the last writer wins, readers see whole files."""
    from naics_hnm.embeddings_file import load_embeddings, save_embeddings

    path = tmp_path / "refresh_epoch0001.h5"
    save_embeddings(path, np.zeros((20000, 16), np.float32), [f"c{i}" for i in range(20000)], epoch=0)
    rounds, interval = 6, 0.8
    start = time.time() + 6.0
    writers = [subprocess.Popen([sys.executable, "-c", EMB_WRITER, str(path), str(w), str(start), str(rounds),
                                 str(interval)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in (1, 2)]
    reader = subprocess.Popen([sys.executable, "-c", EMB_READER, str(path), str(start + rounds * interval + 1.5)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for w in writers:
        stdout, stderr = w.communicate(timeout=300)
        lines = [json.loads(line) for line in stdout.splitlines()]
        assert [line["round"] for line in lines] == list(range(rounds)) and all(line["ok"] for line in lines), (
            lines, stderr[-2000:])
    out, err = reader.communicate(timeout=300)
    seen = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    assert seen is not None and seen["n_bad"] == 0 and seen["loads"] > 0, (seen, err[-2000:])
    assert load_embeddings(path).attrs["epoch"] % 1000 == rounds - 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left
