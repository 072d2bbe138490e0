"""Resume from any step: the same anchors and the same negatives as the uninterrupted run.

Checkpoints are written every training step; resuming from one in Phase 1, at the last batch of
the last Phase 1 epoch (the switch to mining) or in the middle of a mined epoch must continue
with exactly the batches the uninterrupted run trained on next, in the main process and with two
persistent workers. Dropout is off so that the model itself (and with it the mined negatives)
evolves identically after the resume.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from naics_hnm import HardNegativeMiningCallback, NAICSDataModule
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder

BATCHES_PER_EPOCH = 5  # 80 pairs per epoch, batch 16


class Recorder(NAICSEncoder):
    def __init__(self):
        super().__init__(config=TINY_BERT, lr=1e-3, dropout=0.0)
        self.seen: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        self.seen[(self.current_epoch, batch_idx)] = {
            key: batch[key].detach().clone() for key in ("anchor_idx", "positive_idx", "negative_idx")}
        return super().training_step(batch, batch_idx)


def _fit(root, cache, num_workers, *, ckpt_path=None, checkpoint_every=None):
    pl.seed_everything(5, workers=True)
    dm = NAICSDataModule(batch_size=16, num_workers=num_workers, cache_dir=cache, seed=5, phase1_end_epoch=1,
                         pairs_per_epoch=16 * BATCHES_PER_EPOCH)
    model = Recorder()
    callbacks = [HardNegativeMiningCallback(k=4, neighbours=8)]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=checkpoint_every,
                                         save_top_k=-1, filename="{step}"))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                         enable_checkpointing=checkpoint_every is not None, callbacks=callbacks, deterministic=True)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    return root, _fit(root, root / "cache", 0, checkpoint_every=1)


@pytest.mark.slow
@pytest.mark.parametrize(("num_workers", "step"), [(0, 2), (0, 5), (0, 8), (2, 5), (2, 8)],
                         ids=["phase1", "switch", "mid-phase2", "switch-workers2", "mid-phase2-workers2"])
def test_resume_from_any_step_gives_the_same_batches(tmp_path, uninterrupted, num_workers, step):
    root, full = uninterrupted
    assert len(full.seen) == 3 * BATCHES_PER_EPOCH
    resumed = _fit(tmp_path, root / "cache", num_workers, ckpt_path=str(root / "ckpt" / f"step={step}.ckpt"))
    expected = [key for key in sorted(full.seen) if key[0] * BATCHES_PER_EPOCH + key[1] >= step]
    assert sorted(resumed.seen) == expected
    for key in expected:
        for name, value in full.seen[key].items():
            assert torch.equal(resumed.seen[key][name], value), (key, name)
    # the resumed part includes mined batches (Phase 2 from epoch 1)
    assert any(key[0] >= 1 for key in expected)
