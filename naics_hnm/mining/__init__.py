"""The mining core: input checks (:mod:`.checks`), :func:`mine_candidates` (:mod:`.candidates`), guarded neighbour
lists (:mod:`.neighbours`) and :class:`HardNegativeMiner` (:mod:`.miner`). Old ``naics_hnm.mining.<name>`` imports
of :mod:`.candidates` names still work, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module 'naics_hnm.mining' has no attribute {name!r}")
    candidates = importlib.import_module("naics_hnm.mining.candidates")
    if not hasattr(candidates, name):
        raise AttributeError(f"module 'naics_hnm.mining' has no attribute {name!r}")
    warnings.warn(f"naics_hnm.mining.{name} moved to naics_hnm.mining.candidates.{name}; import it from there "
                  "(or from naics_hnm)", DeprecationWarning, stacklevel=2)
    return getattr(candidates, name)
