"""What a datamodule hands the miner: one explicit object instead of attributes looked up by name."""

from __future__ import annotations

from dataclasses import dataclass
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
    """

    taxonomy: Taxonomy
    allowed: np.ndarray
    token_cache: TokenCache
    phase1_end_epoch: int
