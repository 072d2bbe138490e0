"""Approximate indexes against NumPy brute force: recall, exact scores, training sample, search params."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest
import torch

import naics_hnm.index.approximate as approximate
from naics_hnm.index.approximate import default_nprobe, train_size, training_sample
from naics_hnm.index.embedding_index import EmbeddingIndex, knn_rows
from naics_hnm.index.index_file import sidecar_path
from naics_hnm.index.knn import search_in_batches

HAS_GPU = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and a faiss GPU build")
K = 64


def mixture(n: int, d: int, clusters: int, sigma: float, seed: int) -> np.ndarray:
    """A Gaussian mixture: centres ~ N(0, I), points = centre + sigma * N(0, I)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + sigma * rng.standard_normal((n, d)).astype(np.float32)


def exact(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """float64 brute-force scores [Q, N]: cosine similarity, or squared L2 distance."""
    x, q = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        return (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * q @ x.T
    return (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """20000 points in 32-D from 100 overlapping clusters, and 500 of them as queries."""
    x = mixture(20000, 32, 100, 1.0, 0)
    return x, np.sort(np.random.default_rng(1).choice(len(x), 500, replace=False))


@pytest.mark.parametrize("factory,metric,defaults", [
    ("IVF256,Flat", "cosine", {"nprobe": 64}),
    ("HNSW32", "cosine", {"efSearch": 128}),
    ("IVF256,PQ32x4", "cosine", {"nprobe": 64, "k_factor": 4}),
])
def test_default_params_reach_recall_at_64_with_exact_scores(clustered, factory, metric, defaults):
    x, rows = clustered
    index = EmbeddingIndex.build(x, metric=metric, device="cpu", index_factory=factory)
    assert index.search_params == defaults
    scores, ids = index.search_ids(rows, K)
    s = exact(x, x[rows], metric)
    want = np.argsort(s if metric == "l2" else -s, axis=1, kind="stable")[:, :K]
    assert recall(ids, want) >= 0.95
    assert (ids >= 0).all()
    np.testing.assert_allclose(scores, np.take_along_axis(s, ids, 1), rtol=1e-4, atol=1e-3)  # exact, even for PQ
    assert (np.diff(scores, axis=1) >= -1e-6 if metric == "l2" else np.diff(scores, axis=1) <= 1e-6).all()


def test_training_uses_a_deterministic_sample_of_64_points_per_list(clustered, monkeypatch):
    x, rows = clustered
    sizes = []
    real = approximate.training_sample

    def spy(data, size, seed):
        sample = real(data, size, seed)
        sizes.append(len(sample))
        return sample

    monkeypatch.setattr(approximate, "training_sample", spy)
    a = EmbeddingIndex.build(x, device="cpu", index_factory="IVF256,Flat")
    b = EmbeddingIndex.build(x.copy(), device="cpu", index_factory="IVF256,Flat")
    assert sizes == [16384, 16384] and train_size(20000, 1024, False) == 20000
    assert [train_size(20000, 16, False), train_size(20000, 16, True), train_size(9000, 16, True)] == [
        1024, 16384, 9000]
    for got, same in zip(a.search_ids(rows, K), b.search_ids(rows, K)):
        np.testing.assert_array_equal(got, same)

    def centroids(index: EmbeddingIndex) -> np.ndarray:
        quantizer = faiss.extract_index_ivf(index.faiss_index).quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)

    np.testing.assert_array_equal(centroids(a), centroids(b))
    other = EmbeddingIndex.build(x, device="cpu", index_factory="IVF256,Flat", seed=1)
    assert not np.array_equal(centroids(other), centroids(a))


def test_training_sample_is_seeded_sorted_and_distinct():
    x = np.arange(1000, dtype=np.float32)[:, None]
    first, again = training_sample(x, 100, 7), training_sample(x, 100, 7)
    np.testing.assert_array_equal(first, again)
    assert len(np.unique(first)) == 100 and (np.diff(first[:, 0]) > 0).all()
    assert not np.array_equal(first, training_sample(x, 100, 8))
    assert training_sample(x, 5000, 7) is x


def test_too_few_vectors_for_nlist(caplog):
    x = mixture(300, 8, 5, 0.5, 0)
    with pytest.raises(ValueError, match=r"'IVF512,Flat' has nlist=512 .* only N=300 vectors; expected N >= nlist"
                                         r" \(ideally N >= 39 \* nlist\), e.g. IVF4"):
        EmbeddingIndex.build(x, device="cpu", index_factory="IVF512,Flat")
    with caplog.at_level(logging.WARNING, logger="naics_hnm.index.approximate"):
        EmbeddingIndex.build(x, device="cpu", index_factory="IVF16,Flat")
    assert "N=300 vectors train nlist=16 lists poorly; expected N >= 624" in caplog.text
    with pytest.raises(ValueError, match="index_factory='IVF8,Bogus' is not a faiss factory string for dim 8"):
        EmbeddingIndex.build(x, device="cpu", index_factory="IVF8,Bogus")


def test_search_params_are_validated_and_applied():
    x = mixture(2000, 16, 20, 1.0, 0)
    index = EmbeddingIndex.build(x, device="cpu", index_factory="IVF32,Flat", search_params={"nprobe": 3})
    assert index.search_params == {"nprobe": 3} and faiss.extract_index_ivf(index.faiss_index).nprobe == 3
    index.set_search_params(nprobe=32, k_factor=2)
    assert index.search_params == {"nprobe": 32, "k_factor": 2}
    s = exact(x, x[:40], "cosine")
    np.testing.assert_array_equal(index.search_ids(np.arange(40), 20)[1], np.argsort(-s, axis=1, kind="stable")[:, :20])
    for params, error, message in [
        ({"nprobe": 33}, ValueError, "nprobe=33 exceeds the index's nlist=32; expected 1 <= nprobe <= 32"),
        ({"efSearch": 64}, ValueError,
         r"'efSearch' does not apply: index 'IVF32,Flat' takes only \['k_factor', 'nprobe'\]"),
        ({"k_factor": 0}, ValueError, "k_factor=0: expected an integer >= 1"),
        ({"nprobe": True}, TypeError, "nprobe=True: expected an integer"),
        ({"nprobe": 2.5}, TypeError, "nprobe=2.5: expected an integer"),
    ]:
        with pytest.raises(error, match=message):
            index.set_search_params(**params)
    assert index.search_params == {"nprobe": 32, "k_factor": 2}
    with pytest.raises(ValueError, match="index 'Flat' is exact and takes no search parameters"):
        EmbeddingIndex.build(x, device="cpu", search_params={"nprobe": 4})
    with pytest.raises(TypeError, match="search_params must be a dict"):
        EmbeddingIndex.build(x, device="cpu", index_factory="HNSW8", search_params=[("efSearch", 4)])


@pytest.mark.parametrize("factory,params", [("IVF32,Flat", {"nprobe": 5, "k_factor": 2}),
                                            ("HNSW16", {"efSearch": 40}), ("IVF16,PQ8x4", None)])
def test_save_load_keeps_search_params_and_results(tmp_path, factory, params):
    x = mixture(3000, 16, 30, 1.0, 2)
    index = EmbeddingIndex.build(x, metric="ip", device="cpu", index_factory=factory, search_params=params, epoch=4)
    path = tmp_path / "approx.faiss"
    index.save(path)
    assert json.loads(sidecar_path(path).read_text())["search_params"] == index.search_params
    loaded = EmbeddingIndex.load(path, device="cpu")
    assert (loaded.index_type, loaded.search_params, loaded.epoch) == (factory, index.search_params, 4)
    if "nprobe" in index.search_params:
        assert faiss.extract_index_ivf(loaded.faiss_index).nprobe == index.search_params["nprobe"]
    if "efSearch" in index.search_params:
        assert loaded.faiss_index.hnsw.efSearch == index.search_params["efSearch"]
    q = x[:50] + 0.1
    for a, b in zip(index.search(q, 12), loaded.search(q, 12)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vectors.numpy(), index.vectors.numpy())


@pytest.mark.parametrize("scale", [1e20, 3e37, 1e-30, 1e-42])
def test_cosine_of_huge_and_tiny_vectors(scale):
    x = mixture(300, 16, 5, 0.5, 3)
    unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    scaled = (x.astype(np.float64) * scale).astype(np.float32)  # finite; its float32 norm over/underflows
    assert np.isfinite(scaled).all() and (np.abs(scaled).max(axis=1) > 0).all()
    index = EmbeddingIndex.build(scaled, device="cpu")
    np.testing.assert_allclose(index.vectors.numpy(), unit, rtol=1e-3, atol=1e-3 if scale < 1e-40 else 1e-6)
    scores, ids = index.search(scaled[:5], 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-3)


def test_k_is_capped_at_the_index_size():
    x = mixture(200, 8, 4, 0.5, 4)
    index = EmbeddingIndex.build(x, device="cpu")
    scores, ids = index.search(x[:3], 210)
    assert (ids[:, :200] >= 0).all() and (ids[:, 200:] == -1).all() and np.isneginf(scores[:, 200:]).all()
    assert sorted(ids[0, :200]) == list(range(200))
    with pytest.raises(ValueError, match="k=1000000000 exceeds the index size N=200 .* 11.2 GiB; expected k <= 200"):
        index.search(x[:1], 10**9)
    with pytest.raises(ValueError, match="k=100000000 exceeds the index size N=200"):
        knn_rows(index, np.arange(5), 10**8)
    assert index.search_ids(np.arange(2), 10**6)[1].shape == (2, 10**6)  # 24 MB of padding is fine


def test_batched_search_equals_one_batch_and_bounds_each_batch():
    x = mixture(1500, 16, 10, 1.0, 5)
    for factory in (None, "IVF16,SQ8"):  # exact, and lossy codes re-scored exactly (l2)
        index = EmbeddingIndex.build(x, metric="l2", device="cpu", index_factory=factory)
        rows = np.random.default_rng(0).integers(0, 1500, 333)
        whole = index.search_ids(rows, 9)
        for got, want in zip(index.search_ids(rows, 9, batch_size=50), whole):
            np.testing.assert_array_equal(got, want)
        t_scores, t_ids = knn_rows(index, torch.from_numpy(rows), 9, batch_size=7)
        assert isinstance(t_ids, np.ndarray) and t_ids.dtype == np.int64 and t_scores.dtype == np.float32
        np.testing.assert_array_equal(t_ids, whole[1])
    seen = []

    def search(q, k):
        seen.append(q.shape[0])
        return np.zeros((len(q), k), np.float32), np.tile(np.arange(k), (len(q), 1))

    scores, ids = search_in_batches(search, x, np.arange(1000), 5, 3, "cosine", 256)
    assert seen == [256, 256, 256, 232] and ids.shape == (1000, 5) and (ids[:, 3:] == -1).all()
    with pytest.raises(ValueError, match="batch_size=0: expected an integer >= 1"):
        index.search_ids(rows, 3, batch_size=0)


def test_flat_vectors_are_a_view_of_faiss_storage_that_outlives_the_index():
    x = mixture(500, 16, 5, 1.0, 6)
    index = EmbeddingIndex.build(x, metric="l2", device="cpu")
    storage = faiss.rev_swig_ptr(index.faiss_index.get_xb(), 500 * 16)
    assert np.shares_memory(index.vectors.numpy(), storage)
    vectors = index.vectors
    del index, storage
    np.testing.assert_array_equal(vectors.numpy(), x)


def test_approximate_vectors_are_one_owned_copy():
    x = mixture(500, 16, 5, 1.0, 7)
    index = EmbeddingIndex.build(x, metric="ip", device="cpu", index_factory="HNSW8")
    x[:] = 0
    assert np.abs(index.vectors.numpy()).max() > 0


def test_default_nprobe_rule():
    assert [default_nprobe(n) for n in (8, 16, 32, 64, 256, 1024, 4096)] == [8, 16, 24, 32, 64, 128, 256]


@gpu_only
@pytest.mark.gpu
def test_gpu_ivf_matches_cpu_and_handles_large_k(clustered):
    x, rows = clustered
    cpu = EmbeddingIndex.build(x, device="cpu", index_factory="IVF256,Flat")
    gpu = EmbeddingIndex.build(x, device="cuda", index_factory="IVF256,Flat")
    assert gpu.on_gpu and gpu.search_params == cpu.search_params
    assert recall(gpu.search_ids(rows, K)[1], cpu.search_ids(rows, K)[1]) >= 0.99
    scores, ids = gpu.search_ids(rows[:3], 3000)
    s = exact(x, x[rows[:3]], "cosine")
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(np.argsort(-s, axis=1)[:, :3000], axis=1))
    hnsw = EmbeddingIndex.build(x, device="cuda", index_factory="HNSW16")
    assert not hnsw.on_gpu and hnsw.vectors.is_cuda
