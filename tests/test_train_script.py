"""The main job on any tree: --taxonomy, --heldout-codes, --samples-per-epoch, end to end with a Trainer.

The real script (examples/train_naics.py) runs on a small synthetic parent-pointer tree with the
offline MiniLM. A callback placed after the mining callback inspects every training and
validation batch as ``training_step`` receives it: no held-out code is ever an anchor, positive,
negative or candidate, and so never an in-batch negative (those are the batch's own codes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from naics_hnm.tree.synthetic import synthetic_tree
from naics_hnm.tree.taxonomy import Taxonomy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_naics.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_naics_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HeldOutWatch(Callback):
    """Fails the run if a held-out id appears in any id field of a batch; counts what it saw."""

    FIELDS = ("anchor_idx", "positive_idx", "negative_idx", "candidate_idx")

    def __init__(self, heldout: np.ndarray) -> None:
        self.heldout = torch.as_tensor(heldout, dtype=torch.long)
        self.train_batches = 0
        self.val_batches = 0
        self.seen: set[int] = set()
        self.mined_batches = 0

    def _check(self, batch, where: str) -> None:
        for field in self.FIELDS:
            ids = batch[field]
            ids = ids[ids >= 0]
            self.seen.update(ids.tolist())
            leaked = ids[torch.isin(ids, self.heldout)]
            if leaked.numel():
                raise AssertionError(f"{where}: held-out code id {int(leaked[0])} in batch[{field!r}]")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._check(batch, f"train epoch {trainer.current_epoch} batch {batch_idx}")
        self.train_batches += 1
        self.mined_batches += int("negative_scores" in batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._check(batch, f"validation batch {batch_idx}")
        self.val_batches += 1


@pytest.fixture(scope="module")
def tree_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tree") / "small_tree.csv"
    synthetic_tree(120, depth=(3, 4), seed=3, code_style="letters").write_csv(path)
    return path


def test_any_tree_with_heldout_codes_never_reaches_a_batch(tree_csv, tmp_path):
    script = _script()
    taxonomy = Taxonomy.from_csv(tree_csv)
    leaves = np.flatnonzero(taxonomy.end - taxonomy.pre == 1)
    rng = np.random.default_rng(0)
    held = np.sort(rng.choice(leaves, size=12, replace=False))
    inner = int(np.flatnonzero(taxonomy.end - taxonomy.pre > 1)[5])  # an interior code too
    held = np.union1d(held, [inner])
    heldout_file = tmp_path / "heldout.txt"
    heldout_file.write_text("# held out\n" + "\n".join(taxonomy.codes[i] for i in held) + "\n\n")
    out = tmp_path / "run"
    args = script.parse_args([
        "--output", str(out), "--taxonomy", str(tree_csv), "--heldout-codes", str(heldout_file),
        "--epochs", "3", "--phase1-end-epoch", "1", "--samples-per-epoch", "48", "--batch-size", "16",
        "--pool", "12", "--neighbours", "8", "--index", str(tmp_path / "index.faiss"),
        "--cache-dir", str(tmp_path / "cache"), "--max-minutes", "10",
    ])
    watch = HeldOutWatch(held)
    summary = script.run(args, taxonomy, callbacks=[watch])

    # every batch was checked, mined epochs included; 48 pairs per epoch in batches of 16
    assert watch.train_batches == 3 * 3
    assert watch.mined_batches == 2 * 3
    assert watch.val_batches > 0
    assert not set(held.tolist()) & watch.seen
    # the held-out codes are embedded with all others, in the taxonomy's order
    with h5py.File(out / "embeddings.h5", "r") as f:
        codes = [c.decode() if isinstance(c, bytes) else c for c in f["codes"][()]]
        embeddings = f["embeddings"][()]
    assert codes == taxonomy.codes
    assert embeddings.shape[0] == len(taxonomy) and np.isfinite(embeddings).all()
    norms = np.linalg.norm(embeddings[held], axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    # metrics are about the held-out leaves given, on every epoch row
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_codes"] == held.size
    assert metrics["final"]["heldout_codes"] == np.intersect1d(held, leaves).size
    assert [row["epoch"] for row in summary["per_epoch"]] == [0, 1, 2]
    for row in summary["per_epoch"]:
        assert 0.0 <= row["heldout_ndcg@10"] <= 1.0
        assert "heldout_parent_hit" in row and "heldout_grandparent_hit" in row
    assert metrics["settings"]["samples_per_epoch"] == 48
    assert metrics["epochs"] == metrics["settings"]["epochs"] == 3 and metrics["stopped_early"] is None
    assert (out / "training.png").stat().st_size > 0


def test_a_wall_clock_limit_is_opt_in_and_reported(tree_csv, tmp_path, capsys):
    """No default stops on a clock; a run stopped by --max-minutes says so everywhere it reports."""
    script = _script()
    taxonomy = Taxonomy.from_csv(tree_csv)
    for argv in (["--taxonomy", str(tree_csv)], []):
        assert script.choose_settings(script.parse_args(["--output", "x", *argv]), taxonomy)["max_minutes"] is None
    out = tmp_path / "run"
    args = script.parse_args([
        "--output", str(out), "--taxonomy", str(tree_csv), "--epochs", "4", "--phase1-end-epoch", "1",
        "--samples-per-epoch", "48", "--batch-size", "16", "--index", str(tmp_path / "index.faiss"),
        "--cache-dir", str(tmp_path / "cache"), "--max-minutes", "0.0001",  # 6 ms: the first batch exceeds it
    ])
    summary = script.run(args, taxonomy)
    script.report(summary, args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["epochs"] == 4 and metrics["epochs"] < 4
    assert metrics["stopped_early"] == f"stopped by --max-minutes after epoch {metrics['epochs']} of 4"
    printed = capsys.readouterr()
    assert f"{metrics['stopped_early']}: this is not a full run" in printed.out + printed.err
    assert f"NOT A FULL RUN: {metrics['stopped_early']}" in printed.out


def test_default_split_and_size_based_settings(tree_csv):
    script = _script()
    taxonomy = Taxonomy.from_csv(tree_csv)
    args = script.parse_args(["--output", "unused", "--taxonomy", str(tree_csv)])
    settings = script.choose_settings(args, taxonomy)
    assert settings["head"] == "none" and settings["index_factory"] is None
    assert settings["samples_per_epoch"] is None and settings["index"].endswith("small_tree_trained.faiss")
    big = script.parse_args(["--output", "unused"])

    class Sized:  # only len() and name are read by choose_settings
        name = "big"

        def __len__(self):
            return 165_026

    chosen = script.choose_settings(big, Sized())
    assert chosen["head"] == "mlp" and chosen["freeze_layers"] == 6
    assert chosen["index_factory"] == "IVF2048,Flat" and chosen["nprobe"] == 32
    assert chosen["samples_per_epoch"] == 100_000 and chosen["eval_every"] == 1 and settings["eval_every"] == 1

    class Huge(Sized):
        def __len__(self):
            return 1_000_000

    huge = script.choose_settings(script.parse_args(["--output", "unused"]), Huge())
    assert huge["eval_every"] == huge["epochs"] == 8  # one evaluation, after the last epoch
    assert script.choose_settings(script.parse_args(["--output", "u", "--eval-every", "2"]), Huge())["eval_every"] == 2
    held = script.heldout_codes(script.parse_args(["--output", "x", "--taxonomy", str(tree_csv)]), taxonomy)
    assert held and set(held) <= set(taxonomy.codes)


@pytest.mark.parametrize("lines, message", [
    (["ZZZ-NOT-A-CODE"], "line 1: code 'ZZZ-NOT-A-CODE' is not in taxonomy"),
    (["# nothing", ""], "lists no code"),
])
def test_bad_heldout_file_is_one_line_and_exit_2(tree_csv, tmp_path, lines, message):
    heldout_file = tmp_path / "heldout.txt"
    heldout_file.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(tmp_path / "out"), "--taxonomy", str(tree_csv),
         "--heldout-codes", str(heldout_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "embeddings.h5").exists()


def _user_error_cases(tree_csv: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, words the one error line must hold); each fails before the model is loaded."""
    taxonomy = Taxonomy.from_csv(tree_csv)
    leaves = taxonomy.end - taxonomy.pre == 1
    lists = {"all": taxonomy.codes, "leaves": [c for c, leaf in zip(taxonomy.codes, leaves) if leaf],
             "internal": [c for c, leaf in zip(taxonomy.codes, leaves) if not leaf]}
    for name, codes in lists.items():
        (tmp / f"{name}.txt").write_text("\n".join(codes) + "\n")
    (tmp / "one.csv").write_text("code,title\n11,Farming\n")
    (tmp / "flat.csv").write_text("code,title,parent\nA,Apples,\nB,Bananas,\nC,Cherries,\nD,Dates,\n")
    (tmp / "index_folder").mkdir()
    read_only = tmp / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    tree = ["--taxonomy", str(tree_csv)]
    cases = {
        "every code held out": ([*tree, "--heldout-codes", str(tmp / "all.txt")], "every leaf"),
        "every leaf held out": ([*tree, "--heldout-codes", str(tmp / "leaves.txt")], "every leaf"),
        "only internal codes held out": ([*tree, "--heldout-codes", str(tmp / "internal.txt")], "hold no leaf"),
        "one code": (["--taxonomy", str(tmp / "one.csv"), "--heldout-fraction", "0"], "nothing to train on"),
        "flat tree": (["--taxonomy", str(tmp / "flat.csv"), "--heldout-fraction", "0"], "nothing to train on"),
        "lr": ([*tree, "--lr", "-1"], "--lr -1.0: expected a positive number"),
        "temperature": ([*tree, "--temperature", "0"], "--temperature 0.0: expected a positive number"),
        "tree weight": ([*tree, "--tree-weight", "-1"], "--tree-weight -1.0: expected a number >= 0"),
        "ring weight": ([*tree, "--ring-weight", "inf"], "--ring-weight inf: expected a number >= 0"),
        "ring temperature": ([*tree, "--ring-temperature", "-0.1"], "--ring-temperature -0.1: expected a positive"),
        "tree sharpness": ([*tree, "--tree-sharpness", "nan"], "--tree-sharpness nan: expected a positive number"),
        "freeze layers": ([*tree, "--freeze-layers", "99"], "--freeze-layers 99: the encoder has 6 layers"),
        "negatives": ([*tree, "--negatives-per-anchor", "0"], "--negatives-per-anchor 0: expected an int >= 1"),
        "index factory": ([*tree, "--index-factory", "Garbage"], "--index-factory 'Garbage' is not a faiss"),
        "index folder": ([*tree, "--index", str(tmp / "index_folder")], "is a folder"),
    }
    if not torch.cuda.is_available():
        cases["accelerator gpu"] = ([*tree, "--accelerator", "gpu"], "--accelerator gpu:")
    if os.geteuid() == 0:  # root writes into a 0o555 folder: mount a read-only tmpfs there instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
                                 capture_output=True).returncode == 0
    else:
        mounted = True
    if mounted:
        cases["read-only cache dir"] = ([*tree, "--cache-dir", str(read_only)], "--cache-dir")
    return cases


SUBPROCESS_CASES = ("every leaf held out", "index factory", "accelerator gpu")


def _check_one_line(name: str, code: int, stderr: str, words: str, out: Path, tmp_path: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (name, code, stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in stderr, (name, stderr[-3000:])
    assert lines[0].startswith("train_naics: error: ") and words in lines[0], (name, lines[0])
    assert not list(out.rglob("*.h5")) and not list(tmp_path.glob("cache*/tokens_*")), name


def test_every_user_error_is_one_line_and_exit_2_before_any_work(tree_csv, tmp_path, capfd):
    """In-process through main() for all cases, and a few as real processes."""
    cases = _user_error_cases(tree_csv, tmp_path)
    try:
        _run_user_error_cases(cases, tree_csv, tmp_path, capfd)
    finally:
        if os.geteuid() == 0 and "read-only cache dir" in cases:
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def _run_user_error_cases(cases, tree_csv, tmp_path, capfd) -> None:
    script = _script()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    children = {}
    for i, (name, (args, _)) in enumerate(cases.items()):
        argv = ["--output", str(tmp_path / f"out{i}"), "--cache-dir", str(tmp_path / f"cache{i}"), *args]
        if name in SUBPROCESS_CASES:
            children[name] = (tmp_path / f"out{i}", subprocess.Popen(
                [sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd=tmp_path, env=env))
    for i, (name, (args, words)) in enumerate(cases.items()):
        code = script.main(["--output", str(tmp_path / f"out{i}"), "--cache-dir", str(tmp_path / f"cache{i}"), *args])
        _check_one_line(name, code, capfd.readouterr().err, words, tmp_path / f"out{i}", tmp_path)
    for name, (out, child) in children.items():
        _, stderr = child.communicate(timeout=300)
        _check_one_line(name, child.returncode, stderr, cases[name][1], out, tmp_path)


def test_ctrl_c_during_training_is_one_line_exit_130_and_leaves_the_previous_results(tree_csv, tmp_path):
    out = tmp_path / "run"
    (out / "metrics").mkdir(parents=True)
    previous = {"metrics.json": b'{"previous": true}', "metrics/epoch_000.json": b"previous epoch 0",
                "metrics/epoch_001.json": b"previous epoch 1", "embeddings.h5": b"previous", "training.png": b"png"}
    for name, data in previous.items():
        (out / name).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output", str(out), "--taxonomy", str(tree_csv), "--epochs", "200",
         "--phase1-end-epoch", "150", "--samples-per-epoch", "32", "--batch-size", "16",
         "--index", str(tmp_path / "index.faiss"), "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.time() + 400
        while not list(out.glob(".run-*/metrics/epoch_000.json")):  # the first epoch is done
            assert child.poll() is None and time.time() < deadline, child.communicate()[1][-3000:]
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]  # the run's own progress lines come before
    assert re.fullmatch(rf"train_naics: interrupted during epoch \d+; the previous results in {re.escape(str(out))} "
                        "are untouched", lines[-1]), lines[-3:]
    assert {name: (out / name).read_bytes() for name in previous} == previous
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["epoch_000.json", "epoch_001.json"]
    assert not list(out.glob(".run-*")) and not (tmp_path / "index.faiss.json").exists()


class PrecisionWatch(Callback):
    """Records the Trainer's precision and the dtype autocast gives a matmul inside training_step."""

    def __init__(self) -> None:
        self.precision = None
        self.step_dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer, pl_module):
        self.precision = trainer.precision

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with trainer.precision_plugin.train_step_context():
            self.step_dtypes.add((torch.ones(2, 2) @ torch.ones(2, 2)).dtype)


@pytest.mark.parametrize("flag, precision, dtype", [(None, "32-true", torch.float32),
                                                    ("bf16", "bf16-mixed", torch.bfloat16)])
def test_training_precision_is_fp32_unless_asked(tree_csv, tmp_path, flag, precision, dtype):
    script = _script()
    taxonomy = Taxonomy.from_csv(tree_csv)
    args = script.parse_args([
        "--output", str(tmp_path / "run"), "--taxonomy", str(tree_csv), "--epochs", "2", "--phase1-end-epoch", "1",
        "--samples-per-epoch", "32", "--batch-size", "16", "--index", str(tmp_path / "index.faiss"),
        "--cache-dir", str(tmp_path / "cache"), *(["--precision", flag] if flag else []),
    ])
    watch = PrecisionWatch()
    summary = script.run(args, taxonomy, callbacks=[watch])
    assert watch.precision == precision and watch.step_dtypes == {dtype}
    assert summary["settings"]["precision"] == (flag or "32") and np.isfinite(summary["final"]["ndcg@10"])
