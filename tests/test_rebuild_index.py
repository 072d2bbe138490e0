"""python -m naics_hnm.rebuild_index: sources, summary, and bad input that leaves the old index intact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from naics_hnm.index.embedding_index import EmbeddingIndex
from naics_hnm.embeddings_file import save_embeddings
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.rebuild_index import main
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.data.token_cache import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def naics() -> Taxonomy:
    return Taxonomy.naics2022()


@pytest.fixture()
def embeddings_file(tmp_path, naics) -> tuple[Path, np.ndarray]:
    emb = np.random.default_rng(0).normal(size=(len(naics), 24)).astype(np.float32)
    path = tmp_path / "emb.h5"
    save_embeddings(path, emb, naics.codes, model="random", epoch=3)
    return path, emb


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "naics_hnm.rebuild_index", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_from_embeddings_file(tmp_path, embeddings_file, naics, capsys):
    path, emb = embeddings_file
    out = tmp_path / "idx" / "trained.faiss"
    assert main(["--embeddings", str(path), "--output", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "Indexed 2125 codes (dim 24" in summary and str(out) in summary
    index = EmbeddingIndex.load(out, expected_codes=naics.codes)
    assert index.epoch == 3 and index.model_fingerprint == "random"
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores, ids = index.search(unit[:5], 4)
    expected = np.argsort(-(unit[:5] @ unit.T), axis=1, kind="stable")[:, :4]
    assert np.array_equal(ids, expected)


def test_from_checkpoint_matches_the_model(tmp_path, naics, capsys):
    torch.manual_seed(0)
    model = NAICSEncoder(config=TINY_BERT)
    trainer = pl.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "ckpt.faiss"
    assert main(["--checkpoint", str(ckpt), "--output", str(out), "--quiet", "--batch-size", "300"]) == 0
    index = EmbeddingIndex.load(out, expected_codes=naics.codes)
    tokens = load_tokenizer()(naics.texts[:7], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval().embed({k: tokens[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(index.vectors[:7].numpy(), expected.numpy(), atol=1e-5)


def index_set_bytes(out: Path) -> dict[str, bytes]:
    """Every file of the index set named ``out`` (sidecar and generation files), by name."""
    return {p.name: p.read_bytes() for p in sorted(out.parent.glob(out.name + "*"))}


def test_bad_input_leaves_the_previous_index_untouched(tmp_path, embeddings_file, naics, capsys):
    path, emb = embeddings_file
    out = tmp_path / "keep.faiss"
    assert main(["--embeddings", str(path), "--output", str(out), "--quiet"]) == 0
    before = index_set_bytes(out)
    assert sorted(before) == ["keep.faiss", "keep.faiss.g000001.index", "keep.faiss.json"]

    nan = emb.copy()
    nan[5, 2] = np.nan
    nan_path = tmp_path / "nan.h5"
    with h5py.File(nan_path, "w") as f:  # written directly: save_embeddings refuses NaN itself
        f["embeddings"] = nan
        f["codes"] = np.array(naics.codes, dtype=object).astype(h5py.string_dtype("utf-8"))
    other = tmp_path / "other.h5"
    save_embeddings(other, emb[:100], naics.codes[:100])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {"config": TINY_BERT}}, wrong)
    cases = [
        (["--embeddings", str(tmp_path / "missing.h5")], "does not exist"),
        (["--embeddings", str(nan_path)], "NaN"),
        (["--embeddings", str(other)], "100"),
        (["--checkpoint", str(corrupt)], "not a readable"),
        (["--checkpoint", str(wrong)], "does not fit"),
        (["--checkpoint", str(tmp_path / "none.ckpt")], "no such file"),
        (["--embeddings", str(path), "--index-factory", "IVF4096,Flat"],
         "nlist=4096 inverted lists but there are only N=2125"),
        (["--embeddings", str(path), "--index-factory", "NOT_A_FACTORY"],
         "index_factory='NOT_A_FACTORY' is not a faiss"),
        (["--embeddings", str(path), "--index-factory", "HNSW16", "--search-params", "nprobe=4"],
         "search parameter 'nprobe' does not apply: index 'HNSW16' takes only ['k_factor', 'efSearch']"),
        (["--embeddings", str(path), "--index-factory", "IVF16,Flat", "--search-params", "nprobe=17"],
         "nprobe=17 exceeds the index's nlist=16"),
    ]
    for args, message in cases:
        assert main([*args, "--output", str(out), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err, (args, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert index_set_bytes(out) == before, args
    for args, message in [
        (["--batch-size", "0"], "--batch-size 0: expected an int >= 1 (see --help)"),
        (["--index-factory", "HNSW16", "--search-params", "efSearch"],
         "argument --search-params: 'efSearch': expected KEY=INT[,KEY=INT], e.g. nprobe=64 (see --help)"),
        (["--index-factory", "HNSW16", "--search-params", "efSearch=-3"], "expected KEY=INT[,KEY=INT]"),
        (["--search-params", "nprobe=8"], "--search-params needs --index-factory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--embeddings", str(path), "--output", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rebuild_index: error: ") and message in err and len(err.splitlines()) == 1, err
        assert index_set_bytes(out) == before, args


def test_approximate_index_with_search_params(tmp_path, embeddings_file, naics, capsys):
    path, emb = embeddings_file
    out = tmp_path / "approx.faiss"
    args = ["--embeddings", str(path), "--output", str(out), "--quiet", "--index-factory", "IVF32,Flat"]
    assert main([*args, "--search-params", "nprobe=32, k_factor=2"]) == 0
    summary = capsys.readouterr().out
    assert "IVF32,Flat, search params {'nprobe': 32, 'k_factor': 2}" in summary
    assert "approx.faiss.json + approx.faiss.g000001.index" in summary
    index = EmbeddingIndex.load(out, expected_codes=naics.codes)
    assert index.index_type == "IVF32,Flat" and index.search_params == {"nprobe": 32, "k_factor": 2}
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    expected = np.argsort(-(unit[:20] @ unit.T), axis=1, kind="stable")[:, :5]
    assert np.array_equal(index.search(unit[:20], 5)[1], expected)  # nprobe = nlist: exact
    assert main(args) == 0  # a second build replaces the first generation and uses the defaults
    assert sorted(p.name for p in tmp_path.glob("approx.faiss*")) == [
        "approx.faiss", "approx.faiss.g000002.index", "approx.faiss.g000002.vectors.npy", "approx.faiss.json"]
    assert EmbeddingIndex.load(out).search_params == {"nprobe": 24}


def test_subprocess_error_is_one_line_and_help_lists_options(tmp_path):
    result = _run_cli("--embeddings", str(tmp_path / "nope.h5"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("rebuild_index: error:")
    help_text = _run_cli("--help", cwd=tmp_path).stdout
    for option in ("--checkpoint", "--embeddings", "--model", "--model-class", "--taxonomy", "--output",
                   "--metric", "--device", "--batch-size", "--max-length", "--quiet", "--index-factory",
                   "--search-params"):
        assert option in help_text


@pytest.mark.slow
def test_default_builds_the_naics_index_with_the_pretrained_encoder(tmp_path):
    result = _run_cli("--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    index = EmbeddingIndex.load(tmp_path / "indexes" / "naics2022_minilm.faiss",
                                expected_codes=Taxonomy.naics2022().codes)
    assert index.ntotal == 2125 and index.dim == 384
    # pretrained MiniLM places "Soybean Farming" (111110) next to its same-titled parent 11111
    tx = Taxonomy.naics2022()
    _, ids = index.search_ids([tx.index("111110")], 2)
    assert tx.codes[int(ids[0][1])] == "11111"


class _Payload:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("args", [["--max-length", "-3"], ["--max-length", "0"], ["--model", "/nonexistent/model"]])
def test_bad_options_are_one_line(tmp_path, args):
    result = _run_cli(*args, "--output", str(tmp_path / "x.faiss"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and args[1] in result.stderr
    assert not list(tmp_path.glob("x.faiss*"))


def test_checkpoint_pointing_at_a_malicious_model_folder_is_one_line_and_never_runs_it(tmp_path):
    import json
    import pickle

    folder = tmp_path / "evil_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_BERT, "model_type": "bert"}))
    marker = tmp_path / "payload_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    model = NAICSEncoder(config=TINY_BERT)
    trainer = pl.Trainer(max_epochs=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "evil.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "model": str(folder), "config": None}
    torch.save(checkpoint, ckpt)
    result = _run_cli("--checkpoint", str(ckpt), "--output", str(tmp_path / "x.faiss"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "evil.ckpt" in result.stderr
    assert not marker.exists()


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_model_folder_with_a_pickled_payload_is_one_line_and_never_runs_it(tmp_path):
    import json
    import pickle

    folder = tmp_path / "evil_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY_BERT, "model_type": "bert"}))
    marker = tmp_path / "payload_ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    result = _run_cli("--model", str(folder), "--output", str(tmp_path / "x.faiss"), cwd=tmp_path)
    line = _one_line_error(result)
    assert "evil_model" in line and "--model" in line
    assert not marker.exists() and not list(tmp_path.glob("x.faiss*"))


def test_output_an_existing_folder_or_under_a_file_writes_nothing(tmp_path, embeddings_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "plain").write_text("a file")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = _one_line_error(_run_cli("--embeddings", str(embeddings_file[0]), "--output", str(tmp_path / "out"),
                                    cwd=tmp_path))
    assert "is a folder" in line and "out" in line
    line = _one_line_error(_run_cli("--embeddings", str(embeddings_file[0]), "--output",
                                    str(tmp_path / "plain" / "x.faiss"), cwd=tmp_path))
    assert "which is a file" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
