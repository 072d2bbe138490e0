"""HardNegativeMiningCallback: refresh a FAISS index of the current model each epoch and mine each batch."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from naics_hnm.embedding import EmbedFn, embed_codes
from naics_hnm.embedding_index import EmbeddingIndex
from naics_hnm.guard import GuardStats
from naics_hnm.mining import mine_candidates
from naics_hnm.neighbours import guarded_neighbours

log = logging.getLogger(__name__)
_METRICS = ("cosine", "ip", "l2")
_DEVICES = ("auto", "cpu", "cuda")


def _compact_unique(ids: torch.Tensor) -> torch.Tensor:
    """Drop repeated ids within each row (first occurrence wins) and move valid ids to the front."""
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(ids, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter(1, order, repeat_sorted)
    ids = ids.masked_fill(repeat, -1)
    valid = ids >= 0
    front = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, front)


class HardNegativeMiningCallback(Callback):
    """Phase 2+ hard-negative mining for a NAICSDataModule-style datamodule.

    At every train epoch start it delivers the epoch to the datamodule (so the Phase 1 curriculum
    moves, even with persistent workers). From ``start_epoch`` on, every ``refresh_every_n_epochs``
    epochs, it embeds every code with the model being trained (eval mode, no grad), builds an
    :class:`EmbeddingIndex` and finds each code's ``neighbours`` nearest guarded codes. Each
    training batch's ``candidate_idx`` pool is widened with its anchors' neighbours, ranked exactly
    with the index, and the ``k`` hardest survivors replace ``negatives`` / ``negative_idx`` /
    ``negative_mask`` (plus ``negative_scores``) before ``training_step`` sees the batch. Never the
    anchor, its positive, an ancestor or a descendant; with ``order_filter`` only codes whose lowest
    common ancestor with the anchor is shallower than the positive's; with ``relative_margin`` no
    candidate above ``(1 - m) * sim(anchor, positive)``.

    Args:
        k: negatives per anchor in Phase 2+.
        start_epoch: first mined (0-based) epoch; None takes the datamodule's ``phase1_end_epoch``.
        relative_margin: positive-aware margin (TopK-PercPos); None turns it off.
        order_filter: keep only candidates strictly farther in the tree than the positive.
        refresh_every_n_epochs: rebuild the index every n mined epochs.
        embed_fn: ``tokens -> Tensor[n, d]``; default ``pl_module.embed``.
        device: "auto" (faiss GPU when available), "cpu" or "cuda" for the index.
        metric: "cosine", "ip" or "l2".
        neighbours: M nearest guarded codes per anchor added to each pool (0: rank the pool only).
        embed_batch_size: codes per forward pass while refreshing.
        save_dir: when set, each refreshed index is saved there as ``epoch{e}.faiss`` (+ sidecar).
    """

    def __init__(self, k: int = 8, start_epoch: int | None = None, relative_margin: float | None = 0.05,
                 order_filter: bool = True, refresh_every_n_epochs: int = 1, embed_fn: EmbedFn | None = None,
                 device: str = "auto", *, metric: str = "cosine", neighbours: int = 64,
                 embed_batch_size: int = 512, save_dir: str | Path | None = None) -> None:
        call = "HardNegativeMiningCallback"
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"{call}(k={k!r}): expected an int >= 1")
        if start_epoch is not None and not (isinstance(start_epoch, int) and start_epoch >= 0):
            raise ValueError(f"{call}(start_epoch={start_epoch!r}): expected None or an int >= 0")
        if relative_margin is not None and not (isinstance(relative_margin, (int, float))
                                                and 0.0 <= relative_margin < 1.0):
            raise ValueError(f"{call}(relative_margin={relative_margin!r}): expected None or a number in [0, 1)")
        if not (isinstance(refresh_every_n_epochs, int) and refresh_every_n_epochs >= 1):
            raise ValueError(f"{call}(refresh_every_n_epochs={refresh_every_n_epochs!r}): expected an int >= 1")
        if embed_fn is not None and not callable(embed_fn):
            raise TypeError(f"{call}(embed_fn={embed_fn!r}): expected a callable tokens -> Tensor[n, d]")
        if device not in _DEVICES:
            raise ValueError(f"{call}(device={device!r}): expected one of {_DEVICES}")
        if metric not in _METRICS:
            raise ValueError(f"{call}(metric={metric!r}): expected one of {_METRICS}")
        if not (isinstance(neighbours, int) and neighbours >= 0):
            raise ValueError(f"{call}(neighbours={neighbours!r}): expected an int >= 0")
        if not (isinstance(embed_batch_size, int) and embed_batch_size >= 1):
            raise ValueError(f"{call}(embed_batch_size={embed_batch_size!r}): expected an int >= 1")
        self.k = k
        self.start_epoch = start_epoch
        self.relative_margin = None if relative_margin is None else float(relative_margin)
        self.order_filter = bool(order_filter)
        self.refresh_every_n_epochs = refresh_every_n_epochs
        self.embed_fn = embed_fn
        self.device = device
        self.metric = metric
        self.neighbours = neighbours
        self.embed_batch_size = embed_batch_size
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.index: EmbeddingIndex | None = None
        self.refresh_count = 0
        self.last_refresh_epoch: int | None = None
        self.last_refresh_seconds: dict[str, float] = {}
        self._embeddings: torch.Tensor | None = None
        self._nearest: torch.Tensor | None = None
        self._previous_top: torch.Tensor | None = None
        self._stats = GuardStats()
        self._similarity_sum = 0.0
        self._similarity_count = 0
        self._related: torch.Tensor | None = None
        self._lca: torch.Tensor | None = None
        self._allowed: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, metric=self.metric)

    def _datamodule(self, trainer: pl.Trainer):
        dm = trainer.datamodule
        needed = ("taxonomy", "token_cache", "train_dataset", "set_epoch", "phase1_end_epoch")
        if dm is None or any(not hasattr(dm, name) for name in needed):
            raise RuntimeError(
                "HardNegativeMiningCallback needs trainer.fit(model, datamodule=NAICSDataModule(...)) "
                f"(a datamodule with {', '.join(needed)}); got {type(dm).__name__}"
            )
        return dm

    def first_mined_epoch(self, trainer: pl.Trainer) -> int:
        return self.start_epoch if self.start_epoch is not None else int(self._datamodule(trainer).phase1_end_epoch)

    def is_mining(self, trainer: pl.Trainer) -> bool:
        """True from the Phase 2 start epoch on."""
        return trainer.current_epoch >= self.first_mined_epoch(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = self._datamodule(trainer)
        if self.embed_fn is None and not callable(getattr(pl_module, "embed", None)):
            raise TypeError(
                f"HardNegativeMiningCallback: {type(pl_module).__name__} has no embed(tokens) method; "
                "add one or pass embed_fn=..."
            )
        if dm.train_dataset is None:
            dm.setup("fit")

    def _relations(self, trainer: pl.Trainer, device: torch.device) -> None:
        if self._related is not None and self._related.device == device:
            return
        dm = self._datamodule(trainer)
        self._related = torch.from_numpy(dm.taxonomy.related).to(device)
        self._lca = torch.from_numpy(dm.taxonomy.lca_depth).to(device)
        self._allowed = torch.from_numpy(dm.train_dataset.allowed.copy()).to(device)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = self._datamodule(trainer)
        dm.set_epoch(trainer.current_epoch)
        self._stats = GuardStats()
        self._similarity_sum, self._similarity_count = 0.0, 0
        if not self.is_mining(trainer):
            return
        due = (trainer.current_epoch - self.first_mined_epoch(trainer)) % self.refresh_every_n_epochs == 0
        due = bool(trainer.strategy.broadcast(due, src=0))
        if due and self.last_refresh_epoch != trainer.current_epoch:
            self.refresh(trainer, pl_module)
        elif self.index is None and self._embeddings is not None:
            self._build(trainer, self._embeddings.to(pl_module.device), trainer.current_epoch)

    def _embed_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """Every code's embedding; under DDP each rank embeds a shard and the shards are all-gathered."""
        dm = self._datamodule(trainer)
        cache = dm.token_cache
        n, world, rank = cache.size, trainer.world_size, trainer.global_rank
        embed_fn = self.embed_fn or pl_module.embed
        ids = torch.arange(n)
        per_rank = -(-n // world)
        shard = ids[rank * per_rank : (rank + 1) * per_rank]
        pad = per_rank - len(shard)
        if pad:
            shard = torch.cat([shard, torch.zeros(pad, dtype=torch.long)])
        emb = embed_codes(embed_fn, cache, shard, batch_size=self.embed_batch_size, device=pl_module.device,
                          module=pl_module, progress=trainer.is_global_zero,
                          desc=f"epoch {trainer.current_epoch}: embedding {n} codes")
        if world == 1:
            return emb
        gathered = trainer.strategy.all_gather(emb)  # [world, per_rank, d]
        return gathered.reshape(world * per_rank, -1)[:n]

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-embed every code with the current model and rebuild the index and neighbour lists."""
        epoch = trainer.current_epoch
        t0 = time.perf_counter()
        embeddings = self._embed_all(trainer, pl_module)
        t1 = time.perf_counter()
        self._build(trainer, embeddings, epoch)
        t2 = time.perf_counter()
        self.refresh_count += 1
        self.last_refresh_epoch = epoch
        self.last_refresh_seconds = {"embed": t1 - t0, "build": t2 - t1}
        self._embeddings = embeddings.detach().cpu()
        overlap = float("nan")
        if self._nearest is not None and self.k:
            top = self._nearest[:, : self.k]
            if self._previous_top is not None:
                same = (top[:, :, None] == self._previous_top.to(top.device)[:, None, :]) & (top[:, :, None] >= 0)
                overlap = same.any(2).float().sum().item() / max(int((top >= 0).sum()), 1)
            self._previous_top = top.cpu()
        metrics = {"hnm/refresh_embed_s": t1 - t0, "hnm/refresh_build_s": t2 - t1, "hnm/neighbour_overlap": overlap,
                   "hnm/refresh_count": float(self.refresh_count)}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False)
        rank_zero_info(f"hard-negative index refreshed at epoch {epoch}: embed {t1 - t0:.2f}s, build "
                       f"{t2 - t1:.3f}s, {self.index.ntotal} codes on {self.index.device}, overlap {overlap:.3f}")
        if self.save_dir is not None and trainer.is_global_zero:
            self.index.save(self.save_dir / f"epoch{epoch}.faiss")

    def _build(self, trainer: pl.Trainer, embeddings: torch.Tensor, epoch: int) -> None:
        dm = self._datamodule(trainer)
        self.index = EmbeddingIndex.build(embeddings, metric=self.metric, device=self.device,
                                          codes=dm.taxonomy.codes, epoch=epoch)
        device = self.index.vectors.device
        self._relations(trainer, device)
        self._nearest = None
        if self.neighbours:
            _, self._nearest = guarded_neighbours(self.index, torch.arange(self.index.ntotal, device=device),
                                                  self.neighbours, related=self._related, allowed=self._allowed)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.index is None or not self.is_mining(trainer):
            return
        self.mine_batch(trainer, batch)

    def mine_batch(self, trainer: pl.Trainer, batch: dict[str, Any]) -> None:
        """Replace the batch's negatives in place with the k hardest guarded candidates."""
        dm = self._datamodule(trainer)
        assert self.index is not None
        device = self.index.vectors.device
        anchors = batch["anchor_idx"].to(device)
        positives = batch["positive_idx"].to(device)
        pool = batch["candidate_idx"].to(device)
        if self._nearest is not None:
            pool = _compact_unique(torch.cat([pool, self._nearest[anchors]], dim=1))
        scores, ids, stats = mine_candidates(
            self.index, anchors, pool, k=self.k, positive_ids=positives, relative_margin=self.relative_margin,
            related=self._related, lca_depth=self._lca if self.order_filter else None,
            order_filter=self.order_filter, return_stats=True,
        )
        self._stats = self._stats + stats
        valid = ids >= 0
        if valid.any():
            self._similarity_sum += float(scores[valid].sum())
            self._similarity_count += int(valid.sum())
        out_device = batch["anchor_idx"].device
        ids = ids.to(out_device)
        cache = dm.token_cache
        everything = torch.cat([batch["anchor_idx"].cpu(), batch["positive_idx"].cpu(), ids[ids >= 0].cpu()])
        width = max(int(cache.lengths[everything].max()), 1)
        for key, rows in (("anchor", batch["anchor_idx"]), ("positive", batch["positive_idx"]), ("negatives", ids)):
            batch[key] = {name: t.to(out_device) for name, t in cache.gather(rows.cpu(), width).items()}
        batch["negative_idx"] = ids
        batch["negative_mask"] = ids >= 0
        batch["negative_scores"] = scores.to(out_device)
        batch["candidate_idx"] = pool.to(out_device)

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
        return {
            "refresh_count": self.refresh_count,
            "last_refresh_epoch": self.last_refresh_epoch,
            "embeddings": self._embeddings,
            "previous_top": self._previous_top,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refresh_count = int(state_dict.get("refresh_count", 0))
        self.last_refresh_epoch = state_dict.get("last_refresh_epoch")
        self._embeddings = state_dict.get("embeddings")
        self._previous_top = state_dict.get("previous_top")
        self.index = None
