"""Old flat module paths (``naics_hnm.callback``, ...) keep working: each is the module object at its new path,
imported with a DeprecationWarning naming that path. ``naics_hnm.mining`` forwards the old module's names itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

_HOMES = {  # package: its modules' old flat names (old:new where the module was renamed)
    "tree": "taxonomy taxonomy_csv prefix_tree:prefix tree_structure:structure tree_guard:guard tree_ranges:ranges "
            "synthetic_tree:synthetic",
    "index": "ids embedding_index knn approximate sharded_search index_file",
    "mining": "guard:checks miner neighbours",
    "data": "token_cache counter_rng pairs curriculum datasets collate epoch_sampler resumable_loader config",
    "train": "datamodule mining_data callback encoder frozen_prefix losses evaluation_callback training_report:report",
    "st": "hard_negatives negative_search text_corpus",
}
MOVED = {old: f"{package}.{new or old}" for package, names in _HOMES.items()  # old name -> new, under naics_hnm.
         for old, _, new in (name.partition(":") for name in names.split())}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``naics_hnm.<old>`` and loads it as the module at its new path."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        return importlib.machinery.ModuleSpec(fullname, self) if package == "naics_hnm" and old in MOVED else None

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
