"""naics_hnm: FAISS-backed hard-negative mining for contrastive taxonomy embeddings."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NAICSDataModule": "naics_hnm.datamodule",
    "NAICSMapDataset": "naics_hnm.datasets",
    "Phase1MapDataset": "naics_hnm.datasets",
    "collate_fn": "naics_hnm.collate",
    "StreamingConfig": "naics_hnm.config",
    "SamplingConfig": "naics_hnm.config",
    "EmbeddingIndex": "naics_hnm.embedding_index",
    "mine_candidates": "naics_hnm.mining",
    "mine_hard_negatives": "naics_hnm.hard_negatives",
    "HardNegativeMiningCallback": "naics_hnm.callback",
    "Taxonomy": "naics_hnm.taxonomy",
    "NAICSEncoder": "naics_hnm.encoder",
    "evaluate_embeddings": "naics_hnm.evaluation",
}
__all__ = sorted(_EXPORTS)


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
