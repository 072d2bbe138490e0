"""The package layout: layers that import only downwards, no import cycle, old module paths kept.

- Walking ``naics_hnm/`` with ``ast``: every import of a ``naics_hnm`` module goes to the same
  sub-package or to a lower layer, and the module import graph has no cycle.
- Every old flat module path (``naics_hnm.callback``, ``naics_hnm.taxonomy``, ...) imports the very
  module object at its new path, with a DeprecationWarning that names the new path.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

from naics_hnm._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "naics_hnm"

# Unit (a sub-package or a top-level module) -> layer. A module may import its own unit or a lower layer;
# units on one layer (tree and index, st and train) do not import each other.
LAYERS = {
    "_moved": 0, "atomic": 0, "writable": 0, "fingerprint": 0, "precision": 0, "hugepages": 0,
    "tree": 1, "index": 1, "embeddings_file": 1,
    "mining": 2, "evaluation": 2,
    "data": 3,
    "embedding": 4,
    "st": 5, "train": 5,
    "rebuild_index": 6, "mine": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The naics_hnm modules that ``name`` imports anywhere in its body (functions included)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != "naics_hnm")
    return found


def _unit(name: str) -> str:
    return name.split(".")[1]


def test_every_module_has_a_layer():
    assert {_unit(m) for m in MODULES if m != "naics_hnm"} == set(LAYERS)


def test_imports_go_only_downwards():
    upward = []
    for name in MODULES:
        if name == "naics_hnm":
            continue  # the package's lazy exports name modules as strings
        for target in _imports(name):
            if _unit(target) != _unit(name) and LAYERS[_unit(target)] >= LAYERS[_unit(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_no_import_cycle():
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_index_and_the_embeddings_file_know_no_tree():
    for name in ("naics_hnm.index.embedding_index", "naics_hnm.embeddings_file"):
        assert not {t for t in _imports(name) if _unit(t) == "tree"}, name


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module_with_a_warning(old):
    new = "naics_hnm." + MOVED[old]
    module = importlib.import_module(new)
    saved = sys.modules.pop(f"naics_hnm.{old}", None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moved = importlib.import_module(f"naics_hnm.{old}")
        assert moved is module
        assert moved.__spec__.name == new  # the new module keeps its own spec
        messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        assert any(new in m and f"naics_hnm.{old}" in m for m in messages), messages
    finally:
        if saved is not None:
            sys.modules[f"naics_hnm.{old}"] = saved


def test_old_mining_module_names_are_forwarded_with_a_warning():
    from naics_hnm.mining.candidates import mine_candidates

    with pytest.warns(DeprecationWarning, match=r"naics_hnm\.mining\.candidates"):
        from naics_hnm.mining import mine_candidates as old
    assert old is mine_candidates
    with pytest.raises(AttributeError):
        importlib.import_module("naics_hnm.mining").no_such_name


def test_every_old_flat_module_is_mapped():
    """The 45 flat modules: moved ones through MOVED, the rest still at the top level."""
    kept = {"__init__", "atomic", "embedding", "embeddings_file", "evaluation", "mine", "rebuild_index", "writable"}
    assert len(set(MOVED) | {"mining"} | kept) == 45
    for name in kept - {"__init__"}:
        assert f"naics_hnm.{name}" in MODULES


def test_contract_names_import_from_the_package():
    import naics_hnm

    names = ("NAICSDataModule NAICSMapDataset Phase1MapDataset collate_fn StreamingConfig SamplingConfig "
             "EmbeddingIndex mine_candidates HardNegativeMiningCallback Taxonomy TreeGuard HardNegativeMiner "
             "mine_hard_negatives").split()
    for name in names:
        assert getattr(naics_hnm, name).__name__ == name


def test_the_project_itself_imports_only_current_paths():
    """Library, tests, examples and benchmarks name modules where they are now, never by an old path."""
    root = PACKAGE.parent
    current = set(MODULES) | {"naics_hnm"}
    stale = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "examples").glob("*.py"),
                 *(root / "benchmarks").glob("*.py")]:
        if path.name in ("_moved.py", "test_layout.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("naics_hnm"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("naics_hnm")]
            else:
                continue
            stale += [f"{path.relative_to(root)}:{node.lineno} {name}" for name in names if name not in current]
    assert not stale, stale
