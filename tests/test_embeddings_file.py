from datetime import datetime, timezone

import h5py
import numpy as np
import pytest

from naics_hnm.embeddings_file import (
    EmbeddingsFile,
    EmbeddingsFileError,
    load_embeddings,
    save_embeddings,
)
from naics_hnm.tree.taxonomy import Taxonomy


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return Taxonomy.naics2022()


@pytest.fixture()
def data(taxonomy):
    embeddings = np.random.default_rng(0).normal(size=(len(taxonomy), 8)).astype(np.float32)
    return embeddings, list(taxonomy.codes)


def write_raw(path, embeddings=None, codes=None):
    with h5py.File(path, "w") as handle:
        if embeddings is not None:
            handle.create_dataset("embeddings", data=embeddings)
        if codes is not None:
            handle.create_dataset("codes", data=codes, dtype=h5py.string_dtype("utf-8"))


def test_roundtrip_and_attributes(tmp_path, taxonomy, data):
    embeddings, codes = data
    path = save_embeddings(tmp_path / "sub" / "emb.h5", embeddings, codes, model="minilm", epoch=3,
                           extra_attrs={"note": "é ok", "dims": np.array([1, 2])})
    loaded = load_embeddings(path, expected_codes=taxonomy.codes)
    assert isinstance(loaded, EmbeddingsFile)
    assert loaded.embeddings.dtype == np.float32
    np.testing.assert_array_equal(loaded.embeddings, embeddings)
    assert loaded.codes == codes
    attrs = loaded.attrs
    assert attrs["model"] == "minilm" and attrs["epoch"] == 3 and attrs["format_version"] == 1
    assert attrs["codes_fingerprint"] == taxonomy.fingerprint
    assert attrs["note"] == "é ok" and attrs["dims"] == [1, 2]
    created = datetime.fromisoformat(attrs["created"])
    assert created.tzinfo is not None and abs(datetime.now(timezone.utc) - created).total_seconds() < 60
    with h5py.File(path, "r") as handle:
        assert h5py.check_string_dtype(handle["codes"].dtype).encoding == "utf-8"
        assert handle["embeddings"].dtype == np.float32


def test_defaults_and_torch_input(tmp_path, data):
    torch = pytest.importorskip("torch")
    embeddings, codes = data
    path = save_embeddings(tmp_path / "emb.h5", torch.from_numpy(embeddings.astype(np.float64)), codes)
    loaded = load_embeddings(path)
    np.testing.assert_array_equal(loaded.embeddings, embeddings)
    assert loaded.attrs["model"] == "" and loaded.attrs["epoch"] == -1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e, c: (e[0], c), r"shape \(8,\); expected \[N, d\]"),
        (lambda e, c: (np.where(np.arange(len(e))[:, None] == 5, np.inf, e), c), "row 5"),
        (lambda e, c: (e, c[:-1]), "2124 codes for 2125 embedding rows"),
        (lambda e, c: (e, c[:-1] + [c[0]]), "code '11' appears more than once"),
    ],
)
def test_save_rejects_bad_input(tmp_path, data, change, message):
    embeddings, codes = change(*data)
    with pytest.raises(EmbeddingsFileError, match=message):
        save_embeddings(tmp_path / "emb.h5", embeddings, codes)
    assert not (tmp_path / "emb.h5").exists()


def test_failed_write_keeps_previous_file(tmp_path, data):
    embeddings, codes = data
    path = save_embeddings(tmp_path / "emb.h5", embeddings, codes, epoch=1)
    before = path.read_bytes()
    with pytest.raises(EmbeddingsFileError, match="'bad'"):
        save_embeddings(path, embeddings * 2, codes, epoch=2, extra_attrs={"bad": object()})
    with pytest.raises(EmbeddingsFileError, match="reserved"):
        save_embeddings(path, embeddings * 2, codes, extra_attrs={"epoch": 7})
    assert path.read_bytes() == before
    assert load_embeddings(path).attrs["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.h5"]


def test_missing_and_unreadable_files(tmp_path, data):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        load_embeddings(missing)
    with pytest.raises(EmbeddingsFileError, match="does not exist"):
        load_embeddings(missing)
    text = tmp_path / "text.h5"
    text.write_text("code,title\n11,Agriculture\n")
    with pytest.raises(EmbeddingsFileError, match="text.h5.*not a readable HDF5"):
        load_embeddings(text)
    path = save_embeddings(tmp_path / "emb.h5", *data)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EmbeddingsFileError, match="truncated.h5"):
        load_embeddings(truncated)
    with pytest.raises(EmbeddingsFileError, match="not a file"):
        load_embeddings(tmp_path)


def test_malformed_contents(tmp_path):
    path = tmp_path / "raw.h5"
    write_raw(path, embeddings=np.zeros((3, 2), np.float32))
    with pytest.raises(EmbeddingsFileError, match=r"lacks dataset\(s\) \['codes'\]"):
        load_embeddings(path)
    write_raw(path, embeddings=np.zeros(3, np.float32), codes=["1", "2", "3"])
    with pytest.raises(EmbeddingsFileError, match=r"shape \(3,\)"):
        load_embeddings(path)
    write_raw(path, embeddings=np.zeros((3, 2), np.float32), codes=["1", "2"])
    with pytest.raises(EmbeddingsFileError, match="2 codes for 3 embedding rows"):
        load_embeddings(path)
    bad = np.zeros((3, 2), np.float32)
    bad[2, 1] = np.nan
    write_raw(path, embeddings=bad, codes=["1", "2", "3"])
    with pytest.raises(EmbeddingsFileError, match="row 2 holds NaN"):
        load_embeddings(path)


def test_expected_codes_mismatch(tmp_path, taxonomy, data):
    path = save_embeddings(tmp_path / "emb.h5", *data)
    expected = list(taxonomy.codes)
    expected[10], expected[20] = "x10", "x20"
    with pytest.raises(EmbeddingsFileError, match=rf"2 of 2125 codes differ.*row 10: '{taxonomy.codes[10]}', expected 'x10'"):
        load_embeddings(path, expected_codes=expected)
    with pytest.raises(EmbeddingsFileError, match="holds 2125 codes; expected 2124"):
        load_embeddings(path, expected_codes=expected[:-1])


KILLED_SAVE = """
import os, signal, sys
import numpy as np
from naics_hnm.embeddings_file import save_embeddings

target, step = sys.argv[1], sys.argv[2]
real_replace = os.replace

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def replace_then_die(*args):
    real_replace(*args)
    die()

if step == "written":
    os.replace = die
elif step == "replaced":
    os.replace = replace_then_die
save_embeddings(target, np.full((3, 4), 2.0, dtype=np.float32), ["a", "b", "c"], epoch=2)
sys.exit("the save finished: the step was never reached")
"""


@pytest.mark.parametrize("step", ["written", "replaced"])
def test_kill_9_during_a_save_leaves_a_whole_file(tmp_path, step):
    """SIGKILL before and after the final rename: the file holds the old or the new set, never a mix."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "emb.h5"
    save_embeddings(path, np.ones((3, 4), dtype=np.float32), ["a", "b", "c"], epoch=1)
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path), step], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    loaded = load_embeddings(path, expected_codes=["a", "b", "c"])
    want_epoch, want_value = (1, 1.0) if step == "written" else (2, 2.0)
    assert loaded.attrs["epoch"] == want_epoch and (loaded.embeddings == want_value).all()
    orphans = sorted(p.name for p in tmp_path.glob(".*.tmp"))
    assert len(orphans) == (1 if step == "written" else 0)
    save_embeddings(path, np.zeros((3, 4), dtype=np.float32), ["a", "b", "c"], epoch=3)
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == []  # the next write cleans what the kill left
