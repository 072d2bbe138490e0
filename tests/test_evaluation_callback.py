"""TaxonomyEvaluationCallback in a real Trainer: the logged metrics equal evaluate_embeddings on the final model."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest

from naics_hnm import NAICSDataModule
from naics_hnm.embedding import embed_codes
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder
from naics_hnm.evaluation import evaluate_embeddings, holdout_split
from naics_hnm.train.evaluation_callback import TaxonomyEvaluationCallback
from naics_hnm.tree.taxonomy import Taxonomy

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_logs_tree_metrics_each_validation_epoch(tmp_path):
    pl.seed_everything(0)
    tx = Taxonomy.naics2022()
    heldout = holdout_split(tx, 0.2, seed=0)
    excluded = tuple(c for c, h in zip(tx.codes, heldout) if h)
    dm = NAICSDataModule(tx, batch_size=32, cache_dir=tmp_path, pairs_per_epoch=64, exclude_codes=excluded)
    evaluation = TaxonomyEvaluationCallback(every_n_epochs=2)
    model = NAICSEncoder(config=TINY_BERT)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, limit_val_batches=1, callbacks=[evaluation])
    trainer.fit(model, datamodule=dm)
    assert [h["epoch"] for h in evaluation.history] == [1.0, 2.0]  # every 2nd epoch, and the last one
    expected = evaluate_embeddings(embed_codes(model.embed, dm.token_cache, module=model).numpy(), tx,
                                   heldout_mask=heldout)
    last = evaluation.history[-1]
    for key in ("ndcg@10", "cophenetic_pearson", "heldout_ndcg@10", "heldout_parent_hit", "heldout_codes"):
        assert last[key] == pytest.approx(expected[key], abs=1e-6)
        assert float(trainer.callback_metrics[f"eval/{key}"]) == pytest.approx(expected[key], abs=1e-5)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"TaxonomyEvaluationCallback\(k=0\)"):
        TaxonomyEvaluationCallback(k=0)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"TaxonomyEvaluationCallback\(max_queries={bad!r}\).*or None"):
            TaxonomyEvaluationCallback(max_queries=bad)
    assert TaxonomyEvaluationCallback(max_queries=None).max_queries is None
    assert TaxonomyEvaluationCallback().max_queries == 5000
