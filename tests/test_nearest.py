"""nearest_columns: the float32 shortlist + float64 rescoring equals a full float64 ranking by the tie rule."""

from __future__ import annotations

import numpy as np
import pytest

from naics_hnm.evaluation import comparable
from naics_hnm.evaluation import nearest as nearest_module
from naics_hnm.evaluation.nearest import SHORTLIST_SLACK, float32_error, nearest_columns
from naics_hnm.evaluation.rows import as_unit_rows


def brute_nearest(unit: np.ndarray, queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    """Each query's full float64 row, the query itself at -inf, stable argsort (ties: lower position)."""
    similarity = comparable(unit[queries] @ unit[corpus].T)
    for row, q in enumerate(queries):
        similarity[row, corpus == q] = -np.inf
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


@pytest.fixture
def full_rows_calls(monkeypatch):
    """Counts the rows whose shortlist could not decide them (widened to every code near their k-th)."""
    calls = []
    original = nearest_module._widened

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(nearest_module, "_widened", counted)
    return calls


@pytest.mark.parametrize("k", [1, 10, 40])
@pytest.mark.parametrize("dim", [4, 32])
def test_equals_the_float64_ranking(k, dim, full_rows_calls):
    rng = np.random.default_rng(k * 100 + dim)
    unit = as_unit_rows(rng.normal(size=(3000, dim)), 3000)
    corpus = np.sort(rng.choice(3000, 2000, replace=False))
    queries = rng.choice(3000, 300, replace=False)  # some in the corpus (never their own neighbour), some not
    got = nearest_columns(unit, queries, corpus, k)
    np.testing.assert_array_equal(got, brute_nearest(unit, queries, corpus, k))
    assert not np.any(corpus[got] == queries[:, None])
    assert sum(full_rows_calls) < 30  # random vectors: the shortlist decides nearly every row


def test_exact_ties_widen_the_shortlist(full_rows_calls):
    """200 codes share one vector: more equal values than the shortlist holds; the lowest positions win."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(1000, 8))
    vectors[rng.choice(1000, 200, replace=False)] = vectors[0]
    unit = as_unit_rows(vectors, 1000)
    queries, corpus = np.arange(0, 1000, 7), np.arange(1000)
    got = nearest_columns(unit, queries, corpus, 10)
    np.testing.assert_array_equal(got, brute_nearest(unit, queries, corpus, 10))
    assert sum(full_rows_calls) > 0


def test_near_ties_below_float32_resolution():
    """Codes 1e-7 apart in angle: float32 cannot order them, the float64 rescoring does."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=16)
    vectors = np.concatenate([base + 1e-7 * rng.normal(size=(300, 16)), rng.normal(size=(700, 16))])
    unit = as_unit_rows(vectors[rng.permutation(1000)], 1000)
    queries, corpus = rng.choice(1000, 100, replace=False), np.arange(1000)
    for k in (1, 5, 30):
        np.testing.assert_array_equal(nearest_columns(unit, queries, corpus, k),
                                      brute_nearest(unit, queries, corpus, k))


def test_small_corpus_ranks_every_column():
    """k + SHORTLIST_SLACK >= corpus size: the shortlist is the whole corpus (the query itself last)."""
    unit = as_unit_rows(np.random.default_rng(3).normal(size=(30, 5)), 30)
    corpus = np.arange(5, 5 + SHORTLIST_SLACK)
    queries = np.arange(30)
    for k in (1, SHORTLIST_SLACK - 1, SHORTLIST_SLACK):
        np.testing.assert_array_equal(nearest_columns(unit, queries, corpus, k),
                                      brute_nearest(unit, queries, corpus, k))


@pytest.mark.parametrize("dim", [8, 384])
def test_float32_error_bounds_the_float32_products(dim):
    rng = np.random.default_rng(dim)
    unit = as_unit_rows(rng.normal(size=(600, dim)) * rng.lognormal(size=(600, 1)), 600)
    fast = unit[:300].astype(np.float32) @ unit[300:].astype(np.float32).T
    error = np.abs(fast.astype(np.float64) - unit[:300] @ unit[300:].T).max()
    assert 0 < error <= float32_error(dim)
