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

    Attributes:
        taxonomy: the code tree; ids are its dense indices.
        allowed: bool [N]; codes that may be mined (held-out codes are False).
        token_cache: tokens of every code, for re-embedding and for the mined negatives' tokens.
        phase1_end_epoch: the first epoch after the curriculum (the callback's default start).
        epoch_anchors: ``epoch -> sorted distinct anchor ids`` of that epoch's training pairs (every
            rank's) when an epoch trains on a subset of the pairs; the miner then lists neighbours for
            those anchors only. None: every allowed code may be an anchor.
    """

    taxonomy: Taxonomy
    allowed: np.ndarray
    token_cache: TokenCache
    phase1_end_epoch: int
    epoch_anchors: Callable[[int], np.ndarray] | None = None
