"""NAICSDataModule: taxonomy, token cache, Phase 1 datasets and their loaders."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from naics_hnm.data.collate import collate_fn
from naics_hnm.data.config import SamplingConfig, StreamingConfig
from naics_hnm.data.datasets import NAICSMapDataset, Phase1MapDataset
from naics_hnm.data.epoch_sampler import EpochSampler
from naics_hnm.data.pairs import allowed_mask, tree_pairs
from naics_hnm.data.resumable_loader import ResumableLoader
from naics_hnm.data.token_cache import (TokenCache, cache_fingerprint, ensure_token_cache, load_token_cache,
                                        load_tokenizer, token_cache_path)
from naics_hnm.train.mining_data import MiningData
from naics_hnm.tree.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

MAX_VAL_PAIRS = 10_000
"""Validation pairs at most: they are presampled once (fixed negatives) and held in memory."""


def default_cache_dir() -> Path:
    """``$NAICS_HNM_CACHE``, else ``~/.cache/naics_hnm``."""
    return Path(os.environ.get("NAICS_HNM_CACHE", Path.home() / ".cache" / "naics_hnm"))


class NAICSDataModule(pl.LightningDataModule):
    """Phase 1 curriculum data for a code taxonomy (NAICS 2022 by default).

    ``taxonomy``: CSV path, Taxonomy or None (NAICS 2022); ``cache_dir`` defaults to :func:`default_cache_dir`;
    ``seed`` keys every negative draw and the shuffling; ``phase1_end_epoch``: first epoch after the curriculum;
    ``n_negatives``, ``n_candidates``, ``positive_relations``, ``max_siblings``: see :class:`StreamingConfig`;
    ``exclude_codes``: kept out of training; ``val_fraction``: share of pairs for validation (at most
    ``MAX_VAL_PAIRS``); ``pairs_per_epoch``: a fresh shuffled subset of this many pairs per epoch (None: all).
    ``tokenizer``: name or local path (default: the offline all-MiniLM-L6-v2); workers persist if ``num_workers > 0``.
    """

    def __init__(self, taxonomy: str | Path | Taxonomy | None = None, *, batch_size: int = 256, num_workers: int = 0,
                 seed: int = 42, phase1_end_epoch: int = 2, cache_dir: str | Path | None = None,
                 tokenizer: str | None = None, max_length: int = 32, n_negatives: int = 8, n_candidates: int = 48,
                 positive_relations: Sequence[str] = ("parent", "sibling"), max_siblings: int | None = None,
                 sampling: SamplingConfig | None = None, exclude_codes: Sequence[str] = (),
                 val_fraction: float = 0.05, pairs_per_epoch: int | None = None) -> None:
        super().__init__()
        for name, value, minimum in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                     ("phase1_end_epoch", phase1_end_epoch, 0), ("max_length", max_length, 2)):
            if not (isinstance(value, int) and value >= minimum):
                raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
        if pairs_per_epoch is not None and not (isinstance(pairs_per_epoch, int) and pairs_per_epoch >= 1):
            raise ValueError(f"pairs_per_epoch={pairs_per_epoch!r}: expected None or an int >= 1")
        if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
            raise ValueError(f"val_fraction={val_fraction!r}: expected a number in [0, 1)")
        self.taxonomy_source, self.tokenizer_name, self.max_length = taxonomy, tokenizer, max_length
        self.batch_size, self.num_workers, self.phase1_end_epoch = batch_size, num_workers, phase1_end_epoch
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.val_fraction, self.pairs_per_epoch = float(val_fraction), pairs_per_epoch
        self.cfg = StreamingConfig(seed=seed, n_negatives=n_negatives, n_candidates=n_candidates,
                                   positive_relations=tuple(positive_relations), max_siblings=max_siblings,
                                   exclude_codes=tuple(exclude_codes),
                                   taxonomy=str(taxonomy) if isinstance(taxonomy, (str, Path)) else None)
        self.sampling_cfg = sampling if sampling is not None else SamplingConfig()
        self.taxonomy: Taxonomy | None = taxonomy if isinstance(taxonomy, Taxonomy) else None
        self.token_cache: TokenCache | None = None
        self.train_dataset: Phase1MapDataset | None = None
        self.val_dataset: NAICSMapDataset | None = None
        self._train_sampler: EpochSampler | None = None
        self._loaded_tokenizer = None
        self._content_fingerprint: str | None = None

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def _taxonomy(self) -> Taxonomy:
        if self.taxonomy is None:
            self.taxonomy = load_taxonomy(self.taxonomy_source)
        return self.taxonomy

    @property
    def cache_path(self) -> Path:
        """The token cache file, named by the code list and the content (texts, tokenizer, max_length)."""
        return token_cache_path(self.cache_dir, self._cache_name(), self._fingerprint())

    def _cache_name(self) -> str:
        """The taxonomy's name and its code list's fingerprint: trees with other codes get files of their own."""
        taxonomy = self._taxonomy()
        return f"{taxonomy.name}_{taxonomy.fingerprint[:8]}"

    def _fingerprint(self) -> str:
        if self._content_fingerprint is None:
            self._content_fingerprint = cache_fingerprint(self._taxonomy().texts, self._tokenizer(), self.max_length)
        return self._content_fingerprint

    def _tokenizer(self):
        if self._loaded_tokenizer is None:
            self._loaded_tokenizer = load_tokenizer(self.tokenizer_name)
        return self._loaded_tokenizer

    def prepare_data(self) -> None:
        """Build the token cache unless a valid one for this content exists (under a lock, atomically)."""
        taxonomy = self._taxonomy()
        ensure_token_cache(self.cache_dir, self._cache_name(), taxonomy.codes, taxonomy.texts, self._tokenizer(),
                           self.max_length, tokenizer_name=self.tokenizer_name or "all-MiniLM-L6-v2 (offline)")

    def setup(self, stage: str | None = None) -> None:
        """Load the token cache and create the train and validation datasets."""
        if self.train_dataset is not None:
            return
        taxonomy = self._taxonomy()
        self.token_cache = load_token_cache(self.cache_path, self._fingerprint(), expected_codes=taxonomy.codes)
        allowed = allowed_mask(taxonomy, self.cfg.exclude_codes)
        pairs = tree_pairs(taxonomy, self.cfg.positive_relations, allowed, self.cfg.max_siblings, self.cfg.seed)
        order = np.random.default_rng(self.cfg.seed).permutation(len(pairs))
        n_val = min(int(round(self.val_fraction * len(pairs))), MAX_VAL_PAIRS)
        val_pairs, train_pairs = pairs[np.sort(order[:n_val])], pairs[np.sort(order[n_val:])]
        if len(train_pairs) == 0:
            raise ValueError(f"{taxonomy}: no training pairs ({len(pairs)} (code, positive) pairs of relations "
                             f"{list(self.cfg.positive_relations)} outside the {int((~allowed).sum())} excluded codes, "
                             f"{n_val} of them for validation); expected a tree with at least two levels and codes "
                             "left to train on")
        self.train_dataset = Phase1MapDataset(self.cfg, self.sampling_cfg, self.token_cache,
                                              self.phase1_end_epoch, taxonomy=taxonomy, pairs=train_pairs)
        # the one owner of the training epoch; the dataset and the loader read it from here
        self._train_sampler = EpochSampler(len(self.train_dataset), seed=self.cfg.seed, shuffle=True,
                                           samples_per_epoch=self.pairs_per_epoch)
        self.train_dataset.follow(self._train_sampler)
        val_source = Phase1MapDataset(self.cfg, self.sampling_cfg, self.token_cache, self.phase1_end_epoch,
                                      taxonomy=taxonomy, pairs=val_pairs)
        # fixed negatives: drawn once at the end of the curriculum, the same every epoch
        self.val_dataset = NAICSMapDataset(val_source.presample(self.phase1_end_epoch), self.token_cache,
                                           codes=taxonomy.codes)
        log.info("%s: %d train pairs, %d validation pairs, %d excluded codes", taxonomy,
                 len(train_pairs), len(val_pairs), int((~allowed).sum()))

    def mining_data(self) -> MiningData:
        """What :class:`HardNegativeMiningCallback` needs: taxonomy, allowed codes, tokens, epochs."""
        if self.train_dataset is None:
            self.setup("fit")
        return MiningData(taxonomy=self._taxonomy(), allowed=self.train_dataset.allowed,
                          token_cache=self.token_cache, phase1_end_epoch=self.phase1_end_epoch,
                          epoch_anchors=None if self.pairs_per_epoch is None else self.epoch_anchors)

    def epoch_anchors(self, epoch: int) -> np.ndarray:
        """Sorted distinct anchor ids of the training pairs of ``epoch``, every rank's together."""
        indices = self._after_setup(self._train_sampler, "epoch_anchors()").all_indices(epoch)
        return np.unique(self.train_dataset.pairs[indices, 0])

    @staticmethod
    def _after_setup(value: Any, caller: str) -> Any:
        if value is None:
            raise RuntimeError(f"{caller} called before setup(): call prepare_data() and setup() first")
        return value

    @property
    def epoch(self) -> int:
        """The training epoch: the sampler's (0 before setup)."""
        return 0 if self._train_sampler is None else int(self._train_sampler.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Move the training data to ``epoch``: the sampler, which every worker and the dataset read."""
        self._after_setup(self._train_sampler, "set_epoch()").set_epoch(int(epoch))

    def on_train_epoch_start(self) -> None:
        """Move the training data to the trainer's current epoch (the seed's API; Lightning never calls it,
        ``fit`` sets the sampler's epoch itself)."""
        if self.trainer is not None:
            self.set_epoch(self.trainer.current_epoch)

    def _loader(self, dataset, loader: type[DataLoader] = DataLoader, **kwargs: Any) -> DataLoader:
        return loader(dataset, batch_size=self.batch_size, collate_fn=collate_fn, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader whose sampler sends the epoch with every index."""
        dataset = self._after_setup(self.train_dataset, "train_dataloader()")
        if self.trainer is not None:
            # the loader's first iterator comes before Lightning's set_epoch: set the epoch about to run early
            self.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
        return self._loader(dataset, ResumableLoader, sampler=self._train_sampler,
                            batches_started=self._batches_started)

    def _batches_started(self) -> int:
        """Batches of the current epoch the training loop has started (0 outside a Trainer)."""
        return 0 if self.trainer is None else int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def val_dataloader(self) -> DataLoader:
        """Validation pairs with fixed negatives, in order."""
        return self._loader(self._after_setup(self.val_dataset, "val_dataloader()"), shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Move the sampler to the saved epoch (Lightning restores state after ``setup``)."""
        if self._train_sampler is not None:
            self.set_epoch(int(state_dict.get("epoch", 0)))
