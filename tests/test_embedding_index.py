"""EmbeddingIndex against NumPy brute force: rank, search, factory indexes, save/load, devices."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import naics_hnm.index.index_file as index_file
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.index_file import IndexFileError
from naics_hnm.index.index_file import current_index_file, sha256_file

METRICS = ("cosine", "ip", "l2")
HAS_GPU = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
gpu_only = pytest.mark.skipif(not HAS_GPU, reason="needs CUDA and a faiss GPU build")


def prepared(x: np.ndarray, metric: str) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x


def score_matrix(x: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Brute-force float64 scores: inner products, or squared L2 distances."""
    if metric == "l2":
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return x @ y.T


def ref_rank(x: np.ndarray, metric: str, anchors, candidates, k: int):
    v = prepared(x, metric)
    worst = np.inf if metric == "l2" else -np.inf
    scores = np.full((len(anchors), k), worst)
    ids = np.full((len(anchors), k), -1, dtype=np.int64)
    for row, (a, cands) in enumerate(zip(anchors, candidates)):
        seen: list[int] = []
        for c in cands:
            if c >= 0 and c not in seen:
                seen.append(int(c))
        s = score_matrix(v[[a]], v[seen], metric)[0] if seen else np.empty(0)
        order = np.argsort(s if metric == "l2" else -s, kind="stable")[:k]
        ids[row, : order.size] = np.asarray(seen, dtype=np.int64)[order]
        scores[row, : order.size] = s[order]
    return scores, ids


def ref_search(x: np.ndarray, q: np.ndarray, metric: str, k: int):
    v, qv = prepared(x, metric), prepared(q, metric)
    s = score_matrix(qv, v, metric)
    order = np.argsort(s if metric == "l2" else -s, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(s, order, axis=1)
    pad = k - order.shape[1]
    worst = np.inf if metric == "l2" else -np.inf
    padded_scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=worst)
    return padded_scores, np.pad(order, ((0, 0), (0, pad)), constant_values=-1)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)


def random_pools(rng: np.random.Generator, n: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    anchors = rng.integers(0, n, b)
    cands = rng.integers(0, n, (b, c))
    cands[rng.random((b, c)) < 0.2] = -1
    cands[:, 3] = cands[:, 1]  # duplicates
    cands[0] = -1  # a row of padding only
    return anchors, cands


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_rank_matches_brute_force(data, metric, k):
    index = EmbeddingIndex.build(data, metric=metric, device="cpu")
    anchors, cands = random_pools(np.random.default_rng(1), len(data), 32, 24)
    scores, ids = index.rank(anchors, cands, k)
    want_scores, want_ids = ref_rank(data, metric, anchors, cands, k)
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.shape == (32, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
def test_rank_torch_in_torch_out(data, metric):
    index = EmbeddingIndex.build(torch.from_numpy(data), metric=metric, device="cpu")
    anchors, cands = random_pools(np.random.default_rng(2), len(data), 8, 10)
    scores, ids = index.rank(torch.from_numpy(anchors), torch.from_numpy(cands), 4)
    assert isinstance(scores, torch.Tensor) and ids.dtype == torch.int64
    np_scores, np_ids = index.rank(anchors, cands, 4)
    np.testing.assert_array_equal(ids.numpy(), np_ids)
    np.testing.assert_array_equal(scores.numpy(), np_scores)


@pytest.mark.parametrize("metric", METRICS)
def test_rank_exact_ties_keep_candidate_order(metric):
    rng = np.random.default_rng(3)
    if metric == "cosine":
        x = rng.choice([-1.0, 1.0], size=(30, 16)).astype(np.float32)  # norms are exactly 4
    else:
        x = rng.integers(-3, 4, size=(30, 8)).astype(np.float32)
    x[11] = x[5]
    x[17] = x[5]
    x[0] = x[5] * 0 + 1
    anchors = np.array([0, 0, 0])
    cands = np.array([[17, 5, 11, 2, -1], [11, 17, 5, 17, 3], [5, 2, 11, 17, 4]])
    scores, ids = EmbeddingIndex.build(x, metric=metric, device="cpu").rank(anchors, cands, 5)
    want_scores, want_ids = ref_rank(x, metric, anchors, cands, 5)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    for row in ids:
        tied = [i for i in row if i in (5, 11, 17)]
        assert len(tied) == 3


def test_rank_k_larger_than_pool_pads(data):
    index = EmbeddingIndex.build(data, metric="l2", device="cpu")
    scores, ids = index.rank(np.array([1]), np.array([[4, 4, -1]]), 6)
    assert ids.tolist() == [[4, -1, -1, -1, -1, -1]]
    assert np.isinf(scores[0, 1:]).all() and (scores[0, 1:] > 0).all()
    scores, ids = EmbeddingIndex.build(data, device="cpu").rank(np.array([1]), np.zeros((1, 0), np.int64), 2)
    assert ids.tolist() == [[-1, -1]] and np.all(scores == -np.inf)


def test_rank_rejects_bad_input(data):
    index = EmbeddingIndex.build(data, device="cpu")
    with pytest.raises(ValueError, match="candidate_ids holds id 200, expected ids in \\[-1, 200\\)"):
        index.rank(np.array([0]), np.array([[1, 200]]), 1)
    with pytest.raises(ValueError, match="anchor_ids holds id -1"):
        index.rank(np.array([-1]), np.array([[1, 2]]), 1)
    with pytest.raises(ValueError, match="2 rows but anchor_ids has 1"):
        index.rank(np.array([0]), np.array([[1], [2]]), 1)
    with pytest.raises(ValueError, match="k=0"):
        index.rank(np.array([0]), np.array([[1]]), 0)
    with pytest.raises(TypeError, match="integer ids"):
        index.rank(np.array([0]), np.array([[1.5]]), 1)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [7, 230])
def test_search_matches_brute_force(data, metric, k):
    index = EmbeddingIndex.build(data, metric=metric, device="cpu")
    q = np.random.default_rng(4).standard_normal((12, 16)).astype(np.float32)
    scores, ids = index.search(q, k)
    want_scores, want_ids = ref_search(data, q, metric, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    t_scores, t_ids = index.search(torch.from_numpy(q), k)
    assert isinstance(t_ids, torch.Tensor)
    np.testing.assert_array_equal(t_ids.numpy(), ids)


def test_search_ids_includes_self(data):
    index = EmbeddingIndex.build(data, device="cpu")
    scores, ids = index.search_ids(np.array([3, 9]), 4)
    assert ids[:, 0].tolist() == [3, 9]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_approximate_indexes_recall_and_exact_rank():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    q = x[:50] + 0.1 * rng.standard_normal((50, 16)).astype(np.float32)
    _, want = ref_search(x, q, "cosine", 10)
    hnsw = EmbeddingIndex.build(x, index_factory="HNSW32", device="cpu")
    _, got = hnsw.search(q, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.9, recall
    ivf = EmbeddingIndex.build(x, index_factory="IVF16,Flat", device="cpu")
    ivf.set_search_params(nprobe=16)
    assert faiss.extract_index_ivf(ivf.faiss_index).nprobe == 16
    _, got = ivf.search(q, 10)
    np.testing.assert_array_equal(got, want)
    anchors, cands = random_pools(rng, 1000, 8, 12)
    np.testing.assert_array_equal(hnsw.rank(anchors, cands, 5)[1], ref_rank(x, "cosine", anchors, cands, 5)[1])


def test_build_rejects_bad_embeddings(data):
    bad = data.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="row 3 holds NaN or inf"):
        EmbeddingIndex.build(bad, device="cpu")
    bad[3, 2] = 0
    bad[3] = 0
    with pytest.raises(ValueError, match="row 3 is all zeros"):
        EmbeddingIndex.build(bad, metric="cosine", device="cpu")
    EmbeddingIndex.build(bad, metric="ip", device="cpu")
    with pytest.raises(ValueError, match="2-D"):
        EmbeddingIndex.build(data[0], device="cpu")
    with pytest.raises(TypeError, match="floating"):
        EmbeddingIndex.build(np.ones((3, 2), dtype=np.int64), device="cpu")
    with pytest.raises(ValueError, match="metric='dot'"):
        EmbeddingIndex.build(data, metric="dot")
    with pytest.raises(ValueError, match="device='tpu'"):
        EmbeddingIndex.build(data, device="tpu")
    with pytest.raises(ValueError, match="codes must be 200 strings"):
        EmbeddingIndex.build(data, codes=["1", "2"], device="cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_an_error(data):
    with pytest.raises(ValueError, match="device='cuda' needs a faiss GPU build"):
        EmbeddingIndex.build(data, device="cuda")


def test_auto_logs_backend(data, caplog):
    with caplog.at_level(logging.INFO, logger="naics_hnm.index.embedding_index"):
        index = EmbeddingIndex.build(data, device="auto")
    expected = "faiss index on GPU" if HAS_GPU else "faiss index on CPU (no"
    assert expected in caplog.text
    assert index.device == ("cuda" if HAS_GPU else "cpu")


def codes_for(n: int) -> list[str]:
    return [f"{i:06d}" for i in range(n)]


@pytest.mark.parametrize("metric,factory", [("cosine", None), ("l2", None), ("ip", "HNSW16")])
def test_save_load_roundtrip(tmp_path, data, metric, factory):
    index = EmbeddingIndex.build(
        data, metric=metric, device="cpu", index_factory=factory, codes=codes_for(200), model_fingerprint="m1", epoch=3
    )
    path = tmp_path / "codes.faiss"
    index.save(path)
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["metric"] == metric and meta["ntotal"] == 200 and meta["dim"] == 16 and meta["epoch"] == 3
    assert meta["index_type"] == (factory or "Flat") and meta["model_fingerprint"] == "m1"
    assert meta["codes_fingerprint"] == index.codes_fingerprint and meta["format_version"] == 2
    assert meta["index_file"] == "codes.faiss.g000001.index" and meta["generation"] == 1
    assert meta["vectors_file"] == ("codes.faiss.g000001.vectors.npy" if factory else None)
    assert meta["search_params"] == index.search_params == ({"efSearch": 128} if factory else {})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["codes.faiss", "codes.faiss.json", meta["index_file"]] + ([meta["vectors_file"]] if factory else []))
    loaded = EmbeddingIndex.load(path, device="cpu", expected_codes=codes_for(200), expected_dim=16)
    assert (loaded.metric, loaded.epoch, loaded.model_fingerprint, len(loaded)) == (metric, 3, "m1", 200)
    anchors, cands = random_pools(np.random.default_rng(6), 200, 16, 20)
    for a, b in zip(index.rank(anchors, cands, 5), loaded.rank(anchors, cands, 5)):
        np.testing.assert_array_equal(a, b)
    q = data[:10] + 0.5
    for a, b in zip(index.search(q, 8), loaded.search(q, 8)):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_refuses_mismatches(tmp_path, data):
    path = tmp_path / "idx.faiss"
    EmbeddingIndex.build(data, device="cpu", codes=codes_for(200)).save(path)
    other = codes_for(199) + ["999999"]
    with pytest.raises(IndexFileError, match="idx.faiss.*fingerprint .* expected .*200 codes"):
        EmbeddingIndex.load(path, expected_codes=other)
    with pytest.raises(IndexFileError, match="idx.faiss' has dim 16, expected dim 32"):
        EmbeddingIndex.load(path, expected_dim=32)


def test_load_detects_corrupt_files(tmp_path, data):
    path = tmp_path / "idx.faiss"
    EmbeddingIndex.build(data, device="cpu").save(path)
    sidecar = Path(str(path) + ".json")
    payload = current_index_file(path)
    good_index, good_meta = payload.read_bytes(), sidecar.read_text()

    payload.write_bytes(good_index[: len(good_index) // 2])
    with pytest.raises(IndexFileError, match="idx.faiss.g000001.index' has sha256 .*corrupt, truncated"):
        EmbeddingIndex.load(path)

    meta = json.loads(good_meta)
    meta["index_sha256"] = sha256_file(payload)
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="cannot be read by faiss"):
        EmbeddingIndex.load(path)

    payload.write_bytes(good_index)
    sidecar.write_text(good_meta[:40])
    with pytest.raises(IndexFileError, match="idx.faiss.json' is not valid JSON"):
        EmbeddingIndex.load(path)
    sidecar.write_text(good_meta.replace('"format_version": 2', '"format_version": 99'))
    with pytest.raises(IndexFileError, match="format_version 99, expected one of \\(1, 2\\)"):
        EmbeddingIndex.load(path)
    sidecar.write_text(good_meta.replace('"ntotal": 200', '"ntotal": 201'))
    with pytest.raises(IndexFileError, match="ntotal=200, d=16; its sidecar says ntotal=201"):
        EmbeddingIndex.load(path)
    sidecar.unlink()
    with pytest.raises(IndexFileError, match="sidecar .* does not exist"):
        EmbeddingIndex.load(path)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_leaves_previous_files(tmp_path, data, monkeypatch):
    path = tmp_path / "idx.faiss"
    EmbeddingIndex.build(data, device="cpu", epoch=1).save(path)
    before = folder_bytes(tmp_path)
    newer = EmbeddingIndex.build(data[:100], device="cpu", epoch=2, index_factory="HNSW8")

    real_write = faiss.write_index

    def write_then_fail(index, name):
        real_write(index, name)
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        newer.save(path)
    monkeypatch.setattr(faiss, "write_index", real_write)

    def fail_json(target, meta):
        raise OSError("sidecar write failed")

    monkeypatch.setattr(index_file, "_write_json", fail_json)
    with pytest.raises(OSError, match="sidecar write failed"):
        newer.save(path)
    assert folder_bytes(tmp_path) == before
    assert sorted(before) == ["idx.faiss", "idx.faiss.g000001.index", "idx.faiss.json"]
    assert EmbeddingIndex.load(path).epoch == 1


def test_repr_and_properties(data):
    index = EmbeddingIndex.build(data, metric="ip", device="cpu", epoch=4)
    assert (index.dim, index.ntotal, index.device, index.epoch, index.codes_fingerprint) == (16, 200, "cpu", 4, None)
    assert "metric='ip'" in repr(index) and "ntotal=200" in repr(index)
    assert index.vectors.dtype == torch.float32 and tuple(index.vectors.shape) == (200, 16)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_gpu_matches_cpu(data, metric):
    cpu = EmbeddingIndex.build(data, metric=metric, device="cpu")
    gpu = EmbeddingIndex.build(torch.from_numpy(data).cuda(), metric=metric, device="cuda")
    assert gpu.device == "cuda" and gpu.vectors.is_cuda
    anchors, cands = random_pools(np.random.default_rng(7), 200, 32, 24)
    c_scores, c_ids = cpu.rank(anchors, cands, 6)
    g_scores, g_ids = gpu.rank(torch.from_numpy(anchors).cuda(), torch.from_numpy(cands).cuda(), 6)
    assert g_ids.is_cuda
    np.testing.assert_array_equal(g_ids.cpu().numpy(), c_ids)
    np.testing.assert_allclose(g_scores.cpu().numpy(), c_scores, rtol=1e-4, atol=1e-4)
    q = np.random.default_rng(8).standard_normal((9, 16)).astype(np.float32)
    for k in (5, 250):
        c_s, c_i = cpu.search(q, k)
        g_s, g_i = gpu.search(q, k)
        np.testing.assert_array_equal(g_i, c_i)
        np.testing.assert_allclose(g_s, c_s, rtol=1e-4, atol=1e-4)


@gpu_only
@pytest.mark.gpu
def test_gpu_search_beyond_faiss_k_limit():
    x = np.random.default_rng(9).standard_normal((3000, 8)).astype(np.float32)
    gpu = EmbeddingIndex.build(x, metric="cosine", device="cuda")
    scores, ids = gpu.search(x[:4], 2500)
    want_scores, want_ids = ref_search(x, x[:4], "cosine", 2500)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    assert (ids[:, 0] == np.arange(4)).all()


@gpu_only
@pytest.mark.gpu
def test_gpu_save_load(tmp_path, data):
    path = tmp_path / "gpu.faiss"
    gpu = EmbeddingIndex.build(data, device="cuda")
    gpu.save(path)
    loaded = EmbeddingIndex.load(path, device="cpu")
    np.testing.assert_array_equal(loaded.search(data[:5], 4)[1], gpu.search(data[:5], 4)[1])
