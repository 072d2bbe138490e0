"""TaxonomyEvaluationCallback: embed every code at each validation epoch end and log tree metrics."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from naics_hnm.embedding import embed_codes
from naics_hnm.evaluation import evaluate_embeddings


class TaxonomyEvaluationCallback(Callback):
    """Logs cophenetic correlation, NDCG@k and held-out placement (of the datamodule's excluded codes) under
    ``eval/...``, kept per epoch in :attr:`history`. Evaluates every ``every_n_epochs`` validation epochs and
    the last; ``max_queries``: NDCG and placement queries per evaluation (a seeded sample; None: every leaf)."""

    def __init__(self, k: int = 10, every_n_epochs: int = 1, embed_batch_size: int = 512,
                 max_queries: int | None = 5000) -> None:
        for name, value in (("k", k), ("every_n_epochs", every_n_epochs), ("embed_batch_size", embed_batch_size),
                            ("max_queries", 1 if max_queries is None else max_queries)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"TaxonomyEvaluationCallback({name}={value!r}): expected an int >= 1"
                                 + (" or None" if name == "max_queries" else ""))
        self.k, self.max_queries = k, max_queries
        self.every_n_epochs, self.embed_batch_size = every_n_epochs, embed_batch_size
        self.history: list[dict[str, float]] = []
        self.last_embeddings: torch.Tensor | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        dm = trainer.datamodule
        started = time.perf_counter()
        embeddings = embed_codes(pl_module.embed, dm.token_cache, batch_size=self.embed_batch_size,
                                 device=pl_module.device, module=pl_module).cpu()
        self.last_embeddings = embeddings
        excluded = ~dm.train_dataset.allowed
        metrics = evaluate_embeddings(embeddings.numpy(), dm.taxonomy, k=self.k, max_queries=self.max_queries,
                                      heldout_mask=excluded if excluded.any() else None)
        metrics = {key: float(value) for key, value in metrics.items()}
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if (trainer.current_epoch + 1) % self.every_n_epochs and not last:
            return
        metrics = self.evaluate(trainer, pl_module)
        self.history.append({"epoch": float(trainer.current_epoch), **metrics})
        finite = {f"eval/{k}": v for k, v in metrics.items() if np.isfinite(v)}
        pl_module.log_dict(finite, on_step=False, on_epoch=True, rank_zero_only=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
