"""Old flat module paths (``naics_hnm.callback``, ``naics_hnm.taxonomy``, ...) keep working.

Importing ``naics_hnm.<old>`` imports the module's new home, registers that same module object under
the old name and emits a DeprecationWarning naming the new path. ``naics_hnm.mining`` is now the
mining package; it forwards the old module's names itself (see :mod:`naics_hnm.mining`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "approximate": "index.approximate",
    "callback": "train.callback",
    "collate": "data.collate",
    "config": "data.config",
    "counter_rng": "data.counter_rng",
    "curriculum": "data.curriculum",
    "datamodule": "train.datamodule",
    "datasets": "data.datasets",
    "embedding_index": "index.embedding_index",
    "encoder": "train.encoder",
    "epoch_sampler": "data.epoch_sampler",
    "evaluation_callback": "train.evaluation_callback",
    "frozen_prefix": "train.frozen_prefix",
    "guard": "mining.checks",
    "hard_negatives": "st.hard_negatives",
    "ids": "index.ids",
    "index_file": "index.index_file",
    "knn": "index.knn",
    "losses": "train.losses",
    "miner": "mining.miner",
    "mining_data": "train.mining_data",
    "negative_search": "st.negative_search",
    "neighbours": "mining.neighbours",
    "pairs": "data.pairs",
    "prefix_tree": "tree.prefix",
    "resumable_loader": "data.resumable_loader",
    "sharded_search": "index.sharded_search",
    "synthetic_tree": "tree.synthetic",
    "taxonomy": "tree.taxonomy",
    "taxonomy_csv": "tree.taxonomy_csv",
    "text_corpus": "st.text_corpus",
    "token_cache": "data.token_cache",
    "training_report": "train.report",
    "tree_guard": "tree.guard",
    "tree_ranges": "tree.ranges",
    "tree_structure": "tree.structure",
}
"""Old module name (under ``naics_hnm.``) -> new module name (under ``naics_hnm.``)."""


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``naics_hnm.<old>`` and loads it as the module at its new path."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        if package != "naics_hnm" or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = "naics_hnm." + MOVED[spec.name.rpartition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The new module ran when it was imported; give back the spec that the import system replaced."""
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


def install() -> None:
    if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModule())
