"""Under DDP the miner's index, ranking vectors and neighbour lists are shared mapped files, equal to one process."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.shared_files import read_mapped_index, write_flat_index_rows, write_npy_rows
from naics_hnm.mining.miner import HardNegativeMiner
from naics_hnm.mining.shared_refresh import aligned_slice
from naics_hnm.tree.taxonomy import Taxonomy
from test_miner import tree_and_vectors
from thread_group import run_ranks


def batches(n: int, allowed: np.ndarray, seed: int = 0, count: int = 6, b: int = 32, c: int = 10):
    rng = np.random.default_rng(seed)
    codes = np.flatnonzero(allowed)
    for _ in range(count):
        anchors = rng.choice(codes, b)
        positives = rng.choice(codes, b)
        pool = rng.choice(codes, (b, c))
        pool[rng.random((b, c)) < 0.2] = -1
        yield anchors, positives, pool


def mined(miner: HardNegativeMiner, n: int, allowed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [miner.mine(a, p, pool)[:2] for a, p, pool in batches(n, allowed)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ranks_hold_exactly_what_one_process_builds(tmp_path, world, metric):
    tx, x, allowed = tree_and_vectors(11, n=700, d=16)
    x[::9] = x[4]  # identical vectors: ties, broken the same way
    options = dict(allowed=allowed, k=5, metric=metric, neighbours=12, neighbour_batch_size=64, device="cpu")
    one = HardNegativeMiner(tx, **options)
    one.refresh(x, epoch=3)
    want = mined(one, len(tx), allowed)

    def rank(shard):
        miner = HardNegativeMiner(tx, shard=shard, shared_dir=tmp_path / "shared", **options)
        lo, hi = shard.rows(len(tx))
        miner.refresh_local(x[lo:hi], epoch=3)
        assert isinstance(miner.neighbour_ids, np.memmap) and not miner.neighbour_ids.flags.writeable
        return (miner.index.vectors.numpy().copy(), np.array(miner.neighbour_ids),
                mined(miner, len(tx), allowed))

    for vectors, table, got in run_ranks(world, rank):
        assert np.array_equal(vectors, one.index.vectors.numpy())
        assert np.array_equal(table, one.neighbour_ids.numpy())
        for (s1, i1), (s2, i2) in zip(want, got):
            assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["epoch0003.flat.faiss",
                                                                       "epoch0003.neighbours.npy"]


def test_a_second_refresh_replaces_the_files_and_an_approximate_index_is_shared(tmp_path):
    tx, x, allowed = tree_and_vectors(12, n=900, d=8)
    options = dict(allowed=allowed, k=4, neighbours=8, neighbour_batch_size=128, device="cpu",
                   index_factory="IVF8,Flat", search_params={"nprobe": 8})
    one = HardNegativeMiner(tx, **options)
    one.refresh(x * 2, epoch=1)

    def rank(shard):
        miner = HardNegativeMiner(tx, shard=shard, shared_dir=tmp_path, **options)
        miner.refresh(x, epoch=0)
        miner.refresh(x * 2, epoch=1)  # the whole matrix: each rank takes its rows
        return miner.index.index_type, miner.index.search_params, np.array(miner.neighbour_ids)

    results = run_ranks(2, rank)
    assert results[0][0] == "IVF8,Flat" and results[0][1] == {"nprobe": 8}
    # nprobe = nlist: the IVF search is exhaustive, so the lists are the exact ones of one process
    for _, _, table in results:
        assert np.array_equal(table, one.neighbour_ids.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0001.IVF8_Flat.faiss", "epoch0001.flat.faiss",
                                                          "epoch0001.neighbours.npy"]


def test_flat_file_written_by_slices_is_faiss_own_file(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    whole = faiss.IndexFlatL2(6)
    whole.add(x)
    faiss.write_index(whole, str(tmp_path / "whole.faiss"))

    def rank(shard):
        lo, hi = shard.rows(50)
        write_flat_index_rows(tmp_path / "sliced.faiss", shard, x[lo:hi], lo, 50, "l2")
        write_npy_rows(tmp_path / "t.npy", shard, x[lo:hi, :2].astype(np.int32), lo, 50)

    run_ranks(4, rank)
    assert (tmp_path / "sliced.faiss").read_bytes() == (tmp_path / "whole.faiss").read_bytes()
    assert np.array_equal(np.load(tmp_path / "t.npy"), x[:, :2].astype(np.int32))
    mapped = EmbeddingIndex.from_faiss(read_mapped_index(tmp_path / "sliced.faiss"), "l2")
    assert np.array_equal(mapped.vectors.numpy(), x)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_aligned_slices_cover_everything_once():
    for n, world, align in [(10, 3, 1), (700, 2, 64), (5, 4, 8), (0, 2, 4)]:
        slices = [aligned_slice(n, r, world, align) for r in range(world)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        assert all(lo % align == 0 or lo == n for lo, _ in slices)


def test_shard_needs_a_shared_dir():
    tx = Taxonomy(["a", "b"], [None, None], ["a", "b"])
    with pytest.raises(ValueError, match="shared_dir"):
        run_ranks(1, lambda shard: HardNegativeMiner(tx, shard=shard))
    with pytest.raises(RuntimeError, match="needs shard="):
        HardNegativeMiner(tx).refresh_local(np.ones((1, 2), np.float32))
