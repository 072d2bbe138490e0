"""What a datamodule hands the miner: one explicit object instead of attributes looked up by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from naics_hnm.data.token_cache import TokenCache
from naics_hnm.tree.taxonomy import Taxonomy


@dataclass(frozen=True)
class MiningData:
    """The id space and tokens of a training run, as ``datamodule.mining_data()`` returns them.

    ``allowed``: bool [N], codes that may be mined; ``epoch_anchors``: ``epoch -> sorted distinct anchor
    ids`` of that epoch's training pairs when an epoch trains on a subset (None: every allowed code).
    """

    taxonomy: Taxonomy
    allowed: np.ndarray
    token_cache: TokenCache
    phase1_end_epoch: int
    epoch_anchors: Callable[[int], np.ndarray] | None = None
