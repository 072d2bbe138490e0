"""HardNegativeMiningCallback: Lightning hooks around :class:`naics_hnm.mining.miner.HardNegativeMiner`."""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from naics_hnm.data.token_cache import TokenCache, gather_tokens
from naics_hnm.embedding import EmbedFn, embed_codes
from naics_hnm.embeddings_file import (EmbeddingsFileError, create_embeddings_file, embedding_rows, embeddings_sha256,
                                       load_embeddings, save_embeddings, write_embedding_rows)
from naics_hnm.index.shared_files import write_together
from naics_hnm.index.sharded_search import Shard
from naics_hnm.mining.miner import HardNegativeMiner, check_miner_args
from naics_hnm.train.mining_data import MiningData
from naics_hnm.tree.guard import GuardStats
from naics_hnm.writable import ensure_writable_dir

log = logging.getLogger(__name__)


class EmbeddingDtype(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


class HardNegativeMiningCallback(Callback):
    """Phase 2+ hard-negative mining for a datamodule that offers ``mining_data()`` (NAICSDataModule).

    From ``start_epoch`` (None: ``phase1_end_epoch``), every ``refresh_every_n_epochs`` epochs, it re-embeds
    every code and refreshes a :class:`HardNegativeMiner` (whose arguments it shares); each batch's negatives
    become the ``k`` hardest guarded candidates. ``embed_fn`` defaults to ``pl_module.embed``. Refresh
    embeddings are HDF5 files in ``embeddings_dir`` (default ``<default_root_dir>/hnm_embeddings``); with
    ``shard_index`` (DDP) the index files live in its ``shared`` folder, which every machine must see.
    ``save_dir``: each refreshed index is saved there as ``epoch{e}.faiss``.
    """

    def __init__(self, k: int = 8, start_epoch: int | None = None, relative_margin: float | None = 0.05,
                 order_filter: bool = True, refresh_every_n_epochs: int = 1, embed_fn: EmbedFn | None = None,
                 device: str = "auto", *, metric: str = "cosine", neighbours: int = 64,
                 index_factory: str | None = None, search_params: dict | None = None, embed_batch_size: int = 512,
                 embedding_dtype: str = "float32", shard_index: bool = False,
                 embeddings_dir: str | Path | None = None, save_dir: str | Path | None = None) -> None:
        call = "HardNegativeMiningCallback"
        check_miner_args(call, k=k, metric=metric, relative_margin=relative_margin, neighbours=neighbours,
                         device=device, index_factory=index_factory, search_params=search_params)
        if start_epoch is not None and not (isinstance(start_epoch, int) and start_epoch >= 0):
            raise ValueError(f"{call}(start_epoch={start_epoch!r}): expected None or an int >= 0")
        if not (isinstance(refresh_every_n_epochs, int) and refresh_every_n_epochs >= 1):
            raise ValueError(f"{call}(refresh_every_n_epochs={refresh_every_n_epochs!r}): expected an int >= 1")
        if embed_fn is not None and not callable(embed_fn):
            raise TypeError(f"{call}(embed_fn={embed_fn!r}): expected a callable tokens -> Tensor[n, d]")
        if not (isinstance(embed_batch_size, int) and embed_batch_size >= 1):
            raise ValueError(f"{call}(embed_batch_size={embed_batch_size!r}): expected an int >= 1")
        try:
            self.embedding_dtype = EmbeddingDtype(embedding_dtype)
        except ValueError:
            raise ValueError(f"{call}(embedding_dtype={embedding_dtype!r}): expected one of "
                             f"{[d.value for d in EmbeddingDtype]}") from None
        self.k = k
        self.start_epoch = start_epoch
        self.refresh_every_n_epochs = refresh_every_n_epochs
        self.relative_margin = None if relative_margin is None else float(relative_margin)
        self.order_filter = bool(order_filter)
        self.shard_index = bool(shard_index)
        self.embed_fn = embed_fn
        self.device = device
        self.metric = metric
        self.neighbours = neighbours
        self.index_factory = index_factory
        self.search_params = search_params
        self.embed_batch_size = embed_batch_size
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.miner: HardNegativeMiner | None = None
        self.refresh_count = 0
        self.last_refresh_epoch: int | None = None
        self.last_refresh_seconds: dict[str, float] = {}
        self._embeddings_file: dict[str, Any] | None = None
        self._prepared_epoch: int | None = None
        self._previous_top: torch.Tensor | None = None
        self._stats = GuardStats()
        self._similarity_sum, self._similarity_count = 0.0, 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, metric=self.metric)

    @property
    def index(self):
        """The current :class:`EmbeddingIndex` (None before the first refresh)."""
        return None if self.miner is None else self.miner.index

    def _data(self, trainer: pl.Trainer) -> MiningData:
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "mining_data", None)):
            raise RuntimeError("HardNegativeMiningCallback needs trainer.fit(model, datamodule=...) with a datamodule "
                               f"that has mining_data() (such as NAICSDataModule); got {type(dm).__name__}")
        return dm.mining_data()

    def first_mined_epoch(self, trainer: pl.Trainer) -> int:
        return self.start_epoch if self.start_epoch is not None else int(self._data(trainer).phase1_end_epoch)

    def is_mining(self, trainer: pl.Trainer) -> bool:
        """True from the Phase 2 start epoch on."""
        return trainer.current_epoch >= self.first_mined_epoch(trainer)

    def _make_miner(self, trainer: pl.Trainer) -> HardNegativeMiner:
        data = self._data(trainer)
        shard = None
        if self.shard_index and trainer.world_size > 1:
            def all_gather(array: np.ndarray) -> np.ndarray:
                gathered = trainer.strategy.all_gather(torch.from_numpy(array).to(trainer.strategy.root_device))
                return gathered.cpu().numpy()
            shard = Shard(trainer.global_rank, trainer.world_size, all_gather)
        return HardNegativeMiner(
            data.taxonomy, allowed=data.allowed, k=self.k, metric=self.metric, relative_margin=self.relative_margin,
            order_filter=self.order_filter, neighbours=self.neighbours, index_factory=self.index_factory,
            search_params=self.search_params, device=self.device, shard=shard,
            shared_dir=None if shard is None else self.embeddings_dir / "shared")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.embed_fn is None and not callable(getattr(pl_module, "embed", None)):
            raise TypeError(f"HardNegativeMiningCallback: {type(pl_module).__name__} has no embed(tokens) method; "
                            "add one or pass embed_fn=...")
        self._data(trainer)
        if self.embeddings_dir is None:
            self.embeddings_dir = Path(trainer.default_root_dir) / "hnm_embeddings"
        if trainer.is_global_zero:
            for what, folder in (("embeddings_dir", self.embeddings_dir), ("save_dir", self.save_dir)):
                if folder is not None:
                    ensure_writable_dir(folder, f"HardNegativeMiningCallback({what})")
        start = self.first_mined_epoch(trainer)
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs <= start:
            log.warning("HardNegativeMiningCallback: mining starts at epoch %d but max_epochs=%d; no epoch is mined",
                        start, trainer.max_epochs)
        self.miner = self._make_miner(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare_epoch(trainer, pl_module)

    def _prepare_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the epoch's index ready, once per epoch; also called before each batch, since Lightning skips
        ``on_train_epoch_start`` when it resumes mid-epoch."""
        epoch = trainer.current_epoch
        if self._prepared_epoch == epoch:
            return
        self._prepared_epoch = epoch
        self._stats = GuardStats()
        self._similarity_sum, self._similarity_count = 0.0, 0
        if not self.is_mining(trainer):
            return
        due = (epoch - self.first_mined_epoch(trainer)) % self.refresh_every_n_epochs == 0
        due = bool(trainer.strategy.broadcast(due, src=0))
        if due and self.last_refresh_epoch != epoch:
            self.refresh(trainer, pl_module)
        else:
            self._restore(trainer)

    def _restore(self, trainer: pl.Trainer) -> None:
        """After a resume: rebuild the index of the last refresh from its embeddings file."""
        if self.miner is None or self.miner.index is not None or self._embeddings_file is None:
            return
        info, codes = self._embeddings_file, self.miner.taxonomy.codes
        try:
            if self.miner.shard is None:
                embeddings = load_embeddings(info["path"], expected_codes=codes).embeddings
                digest = _digest(embeddings)
            else:  # this rank's rows only
                embeddings = embedding_rows(info["path"], *self.miner.own_rows(), expected_codes=codes)
                digest = embeddings_sha256(info["path"])
        except EmbeddingsFileError as err:
            raise RuntimeError(f"HardNegativeMiningCallback: cannot resume mining from {info['path']!r} ({err}); "
                               "the refresh embeddings file of this checkpoint is needed") from None
        if digest != info["sha256"]:
            raise RuntimeError(f"HardNegativeMiningCallback: {info['path']!r} does not hold the embeddings this "
                               "checkpoint was refreshed with (sha256 differs)")
        self._refresh_miner(trainer, embeddings, info["epoch"])
        self._previous_top = self._top_neighbours()

    def _refresh_miner(self, trainer: pl.Trainer, embeddings: np.ndarray, epoch: int) -> dict[str, float]:
        refresh = self.miner.refresh if self.miner.shard is None else self.miner.refresh_local
        return refresh(embeddings, epoch, anchors=self._served_anchors(trainer, epoch), progress=trainer.is_global_zero)

    def _served_anchors(self, trainer: pl.Trainer, epoch: int) -> np.ndarray | None:
        """The anchors of the epochs a refresh at ``epoch`` serves (None: every code; repeats allowed)."""
        epoch_anchors = self._data(trainer).epoch_anchors
        if epoch_anchors is None:
            return None
        return np.concatenate([epoch_anchors(e) for e in range(epoch, epoch + self.refresh_every_n_epochs)])

    def _embed_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """Every code's embedding, all-gathered under DDP (with ``shard_index``: this rank's rows only)."""
        n, world, rank = self._data(trainer).token_cache.size, trainer.world_size, trainer.global_rank
        if self.miner.shard is not None:
            return self._embed(trainer, pl_module, torch.arange(*self.miner.own_rows()))
        per_rank = -(-n // world)
        shard = torch.arange(rank * per_rank, min(n, (rank + 1) * per_rank))
        shard = torch.cat([shard, torch.zeros(per_rank - len(shard), dtype=torch.long)])  # pad to equal shards
        emb = self._embed(trainer, pl_module, shard)
        if world == 1:
            return emb
        gathered = trainer.strategy.all_gather(emb.to(pl_module.device))  # [world, per_rank, d]
        return gathered.reshape(world * per_rank, -1)[:n].cpu()

    def _embed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor:
        cache = self._data(trainer).token_cache
        return embed_codes(self.embed_fn or pl_module.embed, cache, rows, batch_size=self.embed_batch_size,
                           device=pl_module.device, module=pl_module, progress=trainer.is_global_zero,
                           desc=f"epoch {trainer.current_epoch}: embedding {cache.size} codes",
                           dtype=getattr(torch, self.embedding_dtype.value))

    def _top_neighbours(self) -> torch.Tensor | None:
        """The first k neighbours of this rank's rows (every row in one process)."""
        ids = None if self.miner is None else self.miner.neighbour_ids
        if ids is None:
            return None
        lo, hi = self.miner.own_rows()
        block = ids[lo:hi, : self.k]
        return block.clone() if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block))

    def _overlap(self, top: torch.Tensor | None) -> float:
        """Share of this refresh's top-k neighbours that were in the previous refresh's (over every rank)."""
        counts = np.zeros(2, dtype=np.int64)
        if top is not None and self._previous_top is not None:
            same = (top[:, :, None] == self._previous_top.to(top.device)[:, None, :]) & (top[:, :, None] >= 0)
            counts[:] = int(same.any(2).sum()), int((top >= 0).sum())
        if self.miner.shard is not None:  # a collective: every rank takes part
            counts = self.miner.shard.all_gather(counts).sum(axis=0)
        return float("nan") if top is None or self._previous_top is None else float(counts[0]) / max(int(counts[1]), 1)

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-embed every code with the current model and rebuild the index and neighbour lists."""
        epoch = trainer.current_epoch
        t0 = time.perf_counter()
        embeddings = self._embed_all(trainer, pl_module).float().numpy()
        t1 = time.perf_counter()
        timings = self._refresh_miner(trainer, embeddings, epoch)
        t2 = time.perf_counter()
        self._save_embeddings(trainer, embeddings, epoch)
        self.refresh_count += 1
        self.last_refresh_epoch = epoch
        self.last_refresh_seconds = {"embed": t1 - t0, "build": t2 - t1, **timings}
        top = self._top_neighbours()
        overlap = self._overlap(top)
        self._previous_top = top
        pl_module.log_dict({"hnm/refresh_embed_s": t1 - t0, "hnm/refresh_build_s": t2 - t1,
                            "hnm/neighbour_overlap": overlap, "hnm/refresh_count": float(self.refresh_count)},
                           on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False)
        rank_zero_info(f"hard-negative index refreshed at epoch {epoch}: embed {t1 - t0:.2f}s, index "
                       f"{timings['build']:.3f}s, neighbours {timings['neighbours']:.3f}s, {self.index.ntotal} codes "
                       f"on {self.index.device}, overlap {overlap:.3f}")
        if self.save_dir is not None and trainer.is_global_zero:
            self.index.save(self.save_dir / f"epoch{epoch}.faiss")

    def _save_embeddings(self, trainer: pl.Trainer, embeddings: np.ndarray, epoch: int) -> None:
        """The refresh embeddings file; with ``shard_index`` each rank writes its rows, one rank after the other."""
        path = self.embeddings_dir / f"refresh_epoch{epoch:04d}.h5"
        codes, model, shard = self.miner.taxonomy.codes, type(trainer.lightning_module).__name__, self.miner.shard
        if shard is not None:
            lo, _ = self.miner.own_rows()
            write_together(path, shard, lambda temp: create_embeddings_file(
                temp, (len(codes), embeddings.shape[1]), codes, model=model, epoch=epoch),
                lambda temp: write_embedding_rows(temp, lo, embeddings), by_turns=True)
            digest = embeddings_sha256(path)
        else:
            if trainer.is_global_zero:
                save_embeddings(path, embeddings, codes, model=model, epoch=epoch)
            trainer.strategy.barrier("hnm_embeddings_saved")
            digest = _digest(embeddings)
        self._embeddings_file = {"path": str(path.resolve()), "sha256": digest, "epoch": epoch}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._prepare_epoch(trainer, pl_module)
        if self.is_mining(trainer) and self.index is not None:
            self.mine_batch(batch, self._data(trainer).token_cache)

    def mine_batch(self, batch: dict[str, Any], token_cache: TokenCache) -> None:
        """Replace the batch's negatives in place with the k hardest guarded candidates (tokens: ``token_cache``)."""
        if self.miner is None or self.miner.index is None:
            raise RuntimeError("HardNegativeMiningCallback.mine_batch() before the first refresh")
        device = self.index.vectors.device
        anchors = batch["anchor_idx"].to(device)
        pool = self.miner.widen(anchors, batch["candidate_idx"].to(device))
        scores, ids, stats = self.miner.mine(anchors, batch["positive_idx"].to(device), pool, widen=False)
        self._stats = self._stats + stats
        valid = ids >= 0
        if valid.any():
            self._similarity_sum += float(scores[valid].sum())
            self._similarity_count += int(valid.sum())
        out_device = batch["anchor_idx"].device
        ids = ids.to(out_device)
        tokens = gather_tokens(token_cache, {"anchor": batch["anchor_idx"], "positive": batch["positive_idx"],
                                             "negatives": ids})
        batch.update({key: {name: t.to(out_device) for name, t in group.items()} for key, group in tokens.items()})
        batch.update(negative_idx=ids, negative_mask=ids >= 0, negative_scores=scores.to(out_device),
                     candidate_idx=pool.to(out_device))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_mining(trainer) or self._stats.candidates == 0:
            return
        metrics = {f"hnm/{name}": value for name, value in self._stats.as_fractions().items()}
        if self._similarity_count:
            metrics["hnm/mean_negative_similarity"] = self._similarity_sum / self._similarity_count
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain values; the refresh embeddings live in a file named here (never N x d in the checkpoint)."""
        return {"refresh_count": self.refresh_count, "last_refresh_epoch": self.last_refresh_epoch,
                "embeddings_file": None if self._embeddings_file is None else dict(self._embeddings_file)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refresh_count = int(state_dict.get("refresh_count", 0))
        self.last_refresh_epoch = state_dict.get("last_refresh_epoch")
        self._embeddings_file = state_dict.get("embeddings_file")
        self._previous_top, self._prepared_epoch = None, None
        if self.miner is not None:
            self.miner.index = None
