"""The index chosen from the number of codes, its recall@64 estimate and calibration, against brute force."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from naics_hnm.index import auto
from naics_hnm.index.auto import RecallProbe, auto_nlist, build_index, calibrate, choose_index, recall_sample
from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.mining.miner import HardNegativeMiner
from naics_hnm.tree.synthetic import random_tree
from naics_hnm.tree.taxonomy import Taxonomy


def clustered(n: int, d: int = 16, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("n, factory", [
    (1, None), (2_125, None), (auto.EXACT_MAX_CODES, None), (auto.EXACT_MAX_CODES + 1, "IVF512,Flat"),
    (165_026, "IVF2048,Flat"), (1_000_000, "IVF2048,Flat"), (10_000_000, "IVF2048,Flat"),
])
def test_choice_per_number_of_codes(n, factory):
    choice = choose_index(n)
    assert choice.index_factory == factory and choice.auto
    assert choice.exact == (factory is None)


def test_nlist_rule_keeps_39_points_per_list():
    for n in (1, 38, 39, 1000, 20_001, 100_000, 999_999):
        nlist = auto_nlist(n)
        assert nlist & (nlist - 1) == 0 and (nlist == 1 or n >= 39 * nlist)


def test_explicit_factory_wins_and_flat_forces_exact():
    assert choose_index(10, "HNSW32").index_factory == "HNSW32" and not choose_index(10, "HNSW32").auto
    forced = choose_index(10_000_000, "Flat")
    assert forced.exact and forced.index_factory == "Flat" and not forced.auto


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_n_names_the_value(bad):
    with pytest.raises(ValueError, match=f"n={bad!r}"):
        choose_index(bad)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_recall_estimate_equals_brute_force(metric):
    x = clustered(3000)
    index = EmbeddingIndex.build(x, metric=metric, device="cpu", index_factory="IVF32,Flat",
                                 search_params={"nprobe": 2})
    probe = RecallProbe(index, k=64, sample=100, seed=3)
    rows = recall_sample(3000, 100, 3)
    v = index.vectors.numpy().astype(np.float64)
    q = v[rows]
    if metric == "l2":
        key = ((q[:, None, :] - v[None, :, :]) ** 2).sum(-1)
    else:
        key = -(q @ v.T)
    exact = np.argsort(key, axis=1, kind="stable")[:, :64]
    _, approx = index.search_ids(rows, 64)
    expected = np.mean([len(set(a) & set(e)) / 64 for a, e in zip(approx, exact)])
    assert probe.recall() == pytest.approx(expected, abs=1e-9)
    assert 0.0 < probe.recall() < 1.0  # nprobe 2 of 32 lists misses some


def test_calibration_picks_the_smallest_nprobe_reaching_the_target():
    x = clustered(4000)
    index = EmbeddingIndex.build(x, device="cpu", index_factory="IVF64,Flat")
    recall = calibrate(index, 0.97)
    nprobe = index.search_params["nprobe"]
    assert recall >= 0.97 and recall == RecallProbe(index).recall()
    if nprobe > 1:
        index.set_search_params(nprobe=nprobe // 2)
        assert RecallProbe(index).recall() < 0.97


def test_flat_choice_is_exact_without_estimate():
    index, recall = build_index(clustered(500), choose_index(500), metric="cosine", device="cpu")
    assert index.index_type == "Flat" and recall == 1.0


def _miner_tree(n: int = 3000):
    rng = np.random.default_rng(7)
    tree = random_tree(rng, n, max_depth=5)
    return Taxonomy(tree.codes, tree.parents, tree.titles), clustered(n, seed=7)


def test_miner_default_switches_to_calibrated_ivf_and_logs(monkeypatch, caplog):
    tx, x = _miner_tree()
    monkeypatch.setattr(auto, "EXACT_MAX_CODES", 1000)
    with caplog.at_level(logging.INFO, logger="naics_hnm.index.auto"):
        miner = HardNegativeMiner(tx, device="cpu", neighbours=8)
        miner.refresh(x, 0)
    assert miner.index.index_type == "IVF64,Flat"  # 3000 // 39 caps nlist at 64
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("mining index"))
    assert "IVF64,Flat (auto: N=3000 > 1000" in line and "recall@64" in line and "calibrated" in line
    recall = float(line.split("recall@64 ")[1].split()[0])
    assert recall >= auto.CALIBRATION_TARGET


def test_miner_explicit_factory_wins_over_the_size_rule(monkeypatch, caplog):
    tx, x = _miner_tree()
    monkeypatch.setattr(auto, "EXACT_MAX_CODES", 1000)
    with caplog.at_level(logging.INFO, logger="naics_hnm.index.auto"):
        forced = HardNegativeMiner(tx, device="cpu", neighbours=8, index_factory="Flat")
        forced.refresh(x, 0)
        given = HardNegativeMiner(tx, device="cpu", neighbours=8, index_factory="IVF16,Flat",
                                  search_params={"nprobe": 3})
        given.refresh(x, 0)
    assert forced.index.index_type == "Flat" and given.index.search_params == {"nprobe": 3}
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mining index")]
    assert "mining index Flat (given)" in messages[0] and "recall@64 1.000 (exact" in messages[0]
    assert "mining index IVF16,Flat (given)" in messages[1] and "estimated" in messages[1]
    monkeypatch.setattr(auto, "EXACT_MAX_CODES", 10_000)
    default = HardNegativeMiner(tx, device="cpu", neighbours=8)
    default.refresh(x, 0)
    np.testing.assert_array_equal(default.neighbour_ids.numpy(), forced.neighbour_ids.numpy())
