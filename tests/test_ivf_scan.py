"""The list-major IVF-Flat search against a float64 brute force over the same probed lists."""

import faiss
import numpy as np
import pytest

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.index.ivf_scan import ListMajorIVF


def _ivf(x: np.ndarray, nlist: int, l2: bool) -> faiss.IndexIVFFlat:
    d = x.shape[1]
    quantizer = faiss.IndexFlatL2(d) if l2 else faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    return index


def _probed(index: faiss.IndexIVFFlat, queries: np.ndarray) -> list[np.ndarray]:
    """Per query, the ids of every code in its ``nprobe`` nearest lists."""
    _, probes = index.quantizer.search(queries, index.nprobe)
    invlists = faiss.downcast_InvertedLists(index.invlists)
    return [np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(int(lst)), invlists.list_size(int(lst)))
                            .view(np.int64).copy() for lst in row]) for row in probes]


def _brute(x: np.ndarray, queries: np.ndarray, probed: list[np.ndarray], k: int, l2: bool):
    """float64 scores and the ids ranked best first, ties by lower id, per query (higher score = nearer)."""
    out = []
    for q, ids in zip(queries.astype(np.float64), probed):
        v = x[ids].astype(np.float64)
        s = -((v - q) ** 2).sum(1) if l2 else v @ q
        order = np.lexsort((ids, -s))[:k]
        out.append((s[order], ids[order]))
    return out


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("nprobe,k", [(1, 7), (3, 40), (8, 40), (8, 300), (16, 5)])
def test_integer_vectors_give_the_brute_force_ranking_ties_by_id(l2, nprobe, k):
    # small-integer vectors: every float32 product is exact in any summation order, and ties abound
    rng = np.random.default_rng(nprobe * 100 + k + l2)
    x = rng.integers(-2, 3, size=(3000, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(400, 8)).astype(np.float32)
    index = _ivf(x, 16, l2)
    index.nprobe = nprobe
    scores, ids = ListMajorIVF.of(index, "l2" if l2 else "ip").search(queries, k)
    for row, (q, (ref_s, ref_ids)) in enumerate(zip(queries, _brute(x, queries, _probed(index, queries), k, l2))):
        n = len(ref_ids)
        np.testing.assert_array_equal(ids[row, :n], ref_ids)
        assert (ids[row, n:] == -1).all()
        np.testing.assert_allclose(scores[row, :n], -ref_s if l2 else ref_s, rtol=0, atol=1e-4)


@pytest.mark.parametrize("l2", [False, True])
def test_float_vectors_match_brute_force_within_float32_error(l2):
    rng = np.random.default_rng(3 + l2)
    x = rng.standard_normal((6000, 24)).astype(np.float32)
    x[::5] = x[1]  # identical codes: equal scores wherever BLAS rounds alike
    queries = x[rng.choice(len(x), 500, replace=False)] + 0.05 * rng.standard_normal((500, 24)).astype(np.float32)
    index = _ivf(x, 32, l2)
    index.nprobe = 6
    k = 60
    scores, ids = ListMajorIVF.of(index, "l2" if l2 else "ip").search(queries, k)
    probed = _probed(index, queries)
    for row, (q, (ref_s, _)) in enumerate(zip(queries, _brute(x, queries, probed, k, l2))):
        got = ids[row]
        assert len(set(got.tolist())) == k and np.isin(got, probed[row]).all()
        v = x[got].astype(np.float64)
        exact = -((v - q) ** 2).sum(1) if l2 else v @ q.astype(np.float64)
        # the k-th best score is the brute force's: only near-ties below float32 resolution may swap places
        np.testing.assert_allclose(np.sort(exact)[::-1], ref_s, rtol=0, atol=1e-4)
        np.testing.assert_allclose(scores[row], -exact if l2 else exact, rtol=0, atol=1e-3)


def test_only_ivf_flat_with_array_lists_is_scanned_list_major():
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    assert ListMajorIVF.of(faiss.IndexFlatIP(8), "ip") is None
    pq = faiss.index_factory(8, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    pq.train(x)
    assert ListMajorIVF.of(pq, "ip") is None
    assert ListMajorIVF.of(_ivf(x, 8, False), "ip") is not None


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_embedding_index_searches_many_queries_list_major_like_faiss(metric):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4000, 256)).astype(np.float32)
    index = EmbeddingIndex.build(x, metric=metric, device="cpu", index_factory="IVF64,Flat",
                                 search_params={"nprobe": 8})
    scan = index._list_major
    rows = np.sort(rng.choice(len(x), 600, replace=False))
    assert scan is not None and scan.pays_off(len(rows), 30) and not scan.pays_off(50, 30)
    assert not scan.pays_off(len(rows), 100)  # deep searches stay with faiss
    low = EmbeddingIndex.build(x[:, :32], metric=metric, device="cpu", index_factory="IVF64,Flat")
    assert not low._list_major.pays_off(len(rows), 30)  # so do low dimensions
    scores, ids = index.search_ids(rows, 30)  # list-major
    for start in range(0, len(rows), 50):  # faiss's own scan, 50 queries at a time
        few_scores, few_ids = index.search_ids(rows[start:start + 50], 30)
        # l2 by |q|^2 - 2 q.x + |x|^2 (|x|^2 ~ 256 here) loses about 2^-24 |q|^2 per term to cancellation
        np.testing.assert_allclose(scores[start:start + 50], few_scores, rtol=1e-5,
                                   atol=2e-5 if metric == "cosine" else 5e-4)
        same = (ids[start:start + 50] == few_ids).mean()
        assert same > 0.99  # equal but for near-ties that float rounding orders either way
    assert (ids[:, 0] == rows).all()  # each row's nearest is itself
