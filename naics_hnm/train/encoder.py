"""The reference encoder: a transformers model, mean pooling, L2-normalised, InfoNCE."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from naics_hnm.data.token_cache import TokenCache, default_tokenizer_path
from naics_hnm.train.frozen_prefix import (FrozenPrefix, frozen_modules, mean_pool, pooled_cache_file, run_layers,
                                           transformer_layers)
from naics_hnm.train.losses import info_nce, tree_listwise, tree_rings
from naics_hnm.tree.guard import TreeGuard, too_near

LENGTH_BUCKET = 128
"""Rows per length-sorted chunk in ``NAICSEncoder.embed``."""
HEADS = (None, "mlp")


class ResidualHead(torch.nn.Module):
    """``x + W2 gelu(W1 x)`` on the pooled vector; W2 starts at zero, so training starts from the encoder."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


def _without_pooler(factory, source):
    """Mean pooling ignores a BERT-style pooler; leaving it out keeps DDP free of unused parameters."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped pooler weights are expected, not worth a report
    try:
        return factory(source, add_pooling_layer=False)
    except TypeError:
        return factory(source)
    finally:
        hf_logging.set_verbosity(previous)


class NAICSEncoder(pl.LightningModule):
    """Sentence encoder for code texts; ``embed(tokens) -> Tensor[n, d]`` per the naics_hnm contract.

    Args:
        model: a transformers model name or local path (default: the offline all-MiniLM-L6-v2).
        config: build an untrained model from this config dict instead (``model_type`` required).
        lr, weight_decay: AdamW settings; temperature: InfoNCE temperature.
        in_batch_negatives: also use every other code of the batch as a negative, guarded by the taxonomy.
        freeze_layers: freeze the embeddings and this many lower transformer layers (kept in eval mode).
        cache_frozen: with ``freeze_layers > 0``, run the frozen part once per code at fit start (same result).
        cosine_schedule: linear warm-up over ``warmup_fraction`` of the steps, then cosine decay.
        dropout: every dropout probability of the encoder (None keeps the model's).
        head: ``"mlp"`` adds a trained residual MLP on the pooled vector; with every layer frozen only it trains.
        tree_weight: weight of :func:`~naics_hnm.train.losses.tree_listwise` added to InfoNCE (0: off).
        tree_sharpness: how strongly that target favours deeper common ancestors (per level, in nats).
        ring_weight: weight of :func:`~naics_hnm.train.losses.tree_rings` (every tree level contrasted, each ring
            evened out) added to the loss (0: off); ``ring_temperature`` its softmax temperature.
    """

    def __init__(self, model: str | None = None, *, config: dict[str, Any] | None = None, lr: float = 5e-5,
                 weight_decay: float = 0.01, temperature: float = 0.05, in_batch_negatives: bool = False,
                 freeze_layers: int = 0, cache_frozen: bool = True, cosine_schedule: bool = False,
                 warmup_fraction: float = 0.05, dropout: float | None = None, head: str | None = None,
                 tree_weight: float = 0.0, tree_sharpness: float = 1.0, ring_weight: float = 0.0,
                 ring_temperature: float = 0.1) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}: expected one of {HEADS}")
        if model is not None and config is not None:
            raise ValueError("NAICSEncoder(model=..., config=...): give one of them, not both")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature!r}: expected > 0")
        if not (tree_weight >= 0 and tree_sharpness > 0):
            raise ValueError(f"tree_weight={tree_weight!r}, tree_sharpness={tree_sharpness!r}: expected "
                             "tree_weight >= 0 and tree_sharpness > 0")
        if not (ring_weight >= 0 and ring_temperature > 0):
            raise ValueError(f"ring_weight={ring_weight!r}, ring_temperature={ring_temperature!r}: expected "
                             "ring_weight >= 0 (0 turns the ring term off) and ring_temperature > 0")
        self.save_hyperparameters()
        if config is not None:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError(f"config={config!r}: expected a 'model_type' key (e.g. 'bert')")
            self.encoder = _without_pooler(AutoModel.from_config, AutoConfig.for_model(model_type, **cfg))
        else:
            self.encoder = _without_pooler(AutoModel.from_pretrained, model or default_tokenizer_path())
        if dropout is not None:
            if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
                raise ValueError(f"dropout={dropout!r}: expected None or a number in [0, 1)")
            for module in self.encoder.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = float(dropout)
        layers = transformer_layers(self.encoder)
        if not (isinstance(freeze_layers, int) and 0 <= freeze_layers <= len(layers)):
            raise ValueError(f"freeze_layers={freeze_layers!r}: expected an int in [0, {len(layers)}]")
        if freeze_layers == len(layers) and head is None:
            raise ValueError(f"freeze_layers={freeze_layers} freezes every layer and head=None leaves nothing "
                             "to train: pass head='mlp' or freeze fewer layers")
        hidden_size = int(self.encoder.config.hidden_size)
        self.head = ResidualHead(hidden_size, 2 * hidden_size) if head == "mlp" else None
        self._frozen = frozen_modules(self.encoder, freeze_layers)
        for module in self._frozen:
            module.requires_grad_(False)
        self._prefix: FrozenPrefix | None = None
        self._guard: TreeGuard | None = None

    def train(self, mode: bool = True) -> "NAICSEncoder":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        cache = getattr(dm, "token_cache", None)
        if stage == "fit" and self.hparams.freeze_layers and self.hparams.cache_frozen and cache is not None:
            path = getattr(dm, "cache_path", None)
            self.cache_frozen_prefix(cache, token_cache_path=str(path) if path is not None else None)
        wants_tree = self.hparams.in_batch_negatives or self.hparams.tree_weight > 0 or self.hparams.ring_weight > 0
        if wants_tree and getattr(dm, "taxonomy", None) is not None and self._guard is None:
            self.set_taxonomy(dm.taxonomy)

    @property
    def fully_frozen(self) -> bool:
        """Every transformer layer frozen: only the head trains."""
        return self.hparams.freeze_layers == len(transformer_layers(self.encoder))

    @torch.no_grad()
    def cache_frozen_prefix(self, token_cache: TokenCache, batch_size: int = 256,
                            token_cache_path: str | None = None) -> None:
        """The frozen layers' output for every code (all layers frozen: kept in a file beside ``token_cache_path``)."""
        if not self.hparams.freeze_layers:
            raise ValueError("cache_frozen_prefix() needs freeze_layers > 0")
        cache_file = pooled_cache_file(token_cache_path, self) if token_cache_path and self.fully_frozen else None
        self._prefix = FrozenPrefix.build(self, token_cache, batch_size, cache_file=cache_file)

    @property
    def model_name(self) -> str:
        return self.hparams.model or ("config:" + str(self.hparams.config.get("model_type")) if self.hparams.config
                                      else "all-MiniLM-L6-v2 (offline)")

    def embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit-norm embeddings [n, d] for ``{"input_ids", "attention_mask"}`` of shape [..., L] (right padding)."""
        input_ids = tokens["input_ids"]
        lead = input_ids.shape[:-1]
        ids = input_ids.reshape(-1, input_ids.shape[-1])
        mask = tokens["attention_mask"].reshape(-1, input_ids.shape[-1])
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        chunks = []
        for part in order.split(LENGTH_BUCKET):
            width = max(int(lengths[part].max()), 1)
            chunks.append(self._embed_rows(ids[part, :width], mask[part, :width]))
        out = torch.cat(chunks)[torch.argsort(order)]
        return out.reshape(*lead, -1) if len(lead) != 1 else out

    def _embed_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = self._prefix.lookup(ids, mask) if self._prefix is not None else None
        if rows is None or bool((rows < 0).any()):
            pooled = mean_pool(self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        elif self._prefix.pooled is not None:
            pooled = self._prefix.pooled_rows(rows, ids.device)
        else:
            start = self._prefix.hidden(rows, ids.shape[1], ids.device)
            hidden = run_layers(start, mask, transformer_layers(self.encoder)[self.hparams.freeze_layers:])
            pooled = mean_pool(hidden, mask)
        return F.normalize(pooled if self.head is None else self.head(pooled), dim=-1)

    def set_taxonomy(self, taxonomy) -> None:
        """Tree relations for the in-batch negative guard (done by setup() from the datamodule)."""
        self._guard = TreeGuard(taxonomy)

    def _unique_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed each distinct code of the batch once: (embeddings [U, d], code ids [U], row of each slot)."""
        mask = batch["negative_mask"]
        ids = torch.cat([batch["anchor_idx"], batch["positive_idx"], batch["negative_idx"][mask]])
        token_rows = {key: torch.cat([batch["anchor"][key], batch["positive"][key], batch["negatives"][key][mask]])
                      for key in ("input_ids", "attention_mask")}
        unique, inverse = torch.unique(ids, return_inverse=True)
        first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")
        emb = self.embed({key: v[first] for key, v in token_rows.items()})
        return emb, unique, inverse

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["negative_mask"]
        b, k = mask.shape
        emb, unique, inverse = self._unique_embeddings(batch)
        anchor, positive = emb[inverse[:b]], emb[inverse[b : 2 * b]]
        negatives = torch.zeros(b, k, emb.shape[-1], device=emb.device, dtype=emb.dtype)
        negatives[mask] = emb[inverse[2 * b :]]
        lca = self._batch_lca(batch["anchor_idx"], unique)  # one [B, U] pass for the guard and the tree terms
        # one [B, U] product for the in-batch negatives and the tree terms, when either is on
        similarity = anchor @ emb.T if self.hparams.in_batch_negatives or lca is not None else None
        extra = None
        if self.hparams.in_batch_negatives:
            extra = similarity.masked_fill(~self._in_batch_allowed(batch, unique, inverse, lca), float("-inf"))
        loss = info_nce(anchor, positive, negatives, mask, self.hparams.temperature, extra_logits=extra)
        if lca is None:
            return loss
        same = unique.unsqueeze(0) == batch["anchor_idx"].unsqueeze(1)
        if self.hparams.tree_weight > 0:
            loss = loss + self.hparams.tree_weight * tree_listwise(similarity, lca, same, self.hparams.temperature,
                                                                   self.hparams.tree_sharpness)
        if self.hparams.ring_weight > 0:
            loss = loss + self.hparams.ring_weight * tree_rings(similarity, lca, same, self.hparams.ring_temperature)
        return loss

    def _batch_lca(self, anchors: torch.Tensor, unique: torch.Tensor) -> torch.Tensor | None:
        """int [B, U]: LCA depth of each anchor with each distinct batch code; None without a taxonomy."""
        if self._guard is None:
            return None
        return self._guard.lca_depth(anchors.unsqueeze(1), unique.unsqueeze(0).expand(len(anchors), -1))

    def _in_batch_allowed(self, batch: dict[str, Any], unique: torch.Tensor, inverse: torch.Tensor,
                          lca: torch.Tensor | None = None) -> torch.Tensor:
        """bool [B, U]: distinct batch codes that may be extra negatives of each anchor: never the anchor, its
        positive, one of its negatives or (taxonomy known) a related code or one as near as the positive."""
        anchors, positives, mask = batch["anchor_idx"], batch["positive_idx"], batch["negative_mask"]
        b = len(anchors)
        ok = (unique[None, :] != anchors[:, None]) & (unique[None, :] != positives[:, None])
        rows = torch.arange(b, device=unique.device).unsqueeze(1).expand_as(mask)[mask]
        ok[rows, inverse[2 * b :]] = False
        if self._guard is not None:
            lca = self._batch_lca(anchors, unique) if lca is None else lca
            ok &= ~self._guard.related(anchors.unsqueeze(1), unique.unsqueeze(0).expand(b, -1))
            ok &= ~too_near(lca, self._guard.lca_depth(anchors, positives).unsqueeze(1))
        return ok

    def _logged_loss(self, batch: dict[str, Any], name: str) -> torch.Tensor:
        loss = self._loss(batch)
        self.log(name, loss, prog_bar=True, batch_size=len(batch["anchor_idx"]))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "train_loss")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "val_loss")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine_schedule:
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


TINY_BERT = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
"""A tiny BERT config (no download) for tests and smoke runs; uses the MiniLM tokenizer's vocabulary."""
