"""naics_hnm: FAISS-backed hard-negative mining for contrastive taxonomy embeddings."""

from __future__ import annotations

import importlib
from typing import Any

from naics_hnm import _moved

__version__ = "0.1.0"

_EXPORTS = {
    "NAICSDataModule": "naics_hnm.train.datamodule",
    "NAICSMapDataset": "naics_hnm.data.datasets",
    "Phase1MapDataset": "naics_hnm.data.datasets",
    "collate_fn": "naics_hnm.data.collate",
    "StreamingConfig": "naics_hnm.data.config",
    "SamplingConfig": "naics_hnm.data.config",
    "EmbeddingIndex": "naics_hnm.index.embedding_index",
    "mine_candidates": "naics_hnm.mining.candidates",
    "mine_hard_negatives": "naics_hnm.st.hard_negatives",
    "HardNegativeMiningCallback": "naics_hnm.train.callback",
    "Taxonomy": "naics_hnm.tree.taxonomy",
    "TreeGuard": "naics_hnm.tree.guard",
    "HardNegativeMiner": "naics_hnm.mining.miner",
    "NAICSEncoder": "naics_hnm.train.encoder",
    "evaluate_embeddings": "naics_hnm.evaluation",
}
__all__ = sorted(_EXPORTS)
_moved.install()  # old flat module paths (naics_hnm.callback, ...) keep working, with a DeprecationWarning


def __getattr__(name: str) -> Any:
    """Import on first use, so ``import naics_hnm`` stays cheap and light modules need no torch."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'naics_hnm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
