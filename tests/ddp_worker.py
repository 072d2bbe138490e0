"""Run by tests/test_callback.py: a 2-process CPU DDP fit with the mining callback.

Each rank saves the refreshed index vectors, its neighbour lists, a single-process reference
embedding of every code computed with the same weights, and the anchors it trained on. A second
argument ``shard`` turns on the sharded index (each rank searches only its half of the codes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from naics_hnm import HardNegativeMiningCallback, NAICSDataModule
from naics_hnm.embedding import embed_codes
from naics_hnm.train.encoder import TINY_BERT, NAICSEncoder


class Dump(Callback):
    def __init__(self, mining: HardNegativeMiningCallback, out: Path):
        self.mining, self.out, self.anchors = mining, out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.anchors.append(batch["anchor_idx"].cpu().numpy())

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        reference = embed_codes(pl_module.embed, trainer.datamodule.token_cache, module=pl_module)
        np.savez(self.out / f"rank{trainer.global_rank}.npz", vectors=self.mining.index.vectors.cpu().numpy(),
                 reference=reference.numpy(), anchors=np.zeros(0),
                 neighbours=self.mining.miner.neighbour_ids.cpu().numpy())

    def on_train_end(self, trainer, pl_module):
        path = self.out / f"rank{trainer.global_rank}.npz"
        data = dict(np.load(path))
        data["anchors"] = np.concatenate(self.anchors)
        np.savez(path, **data)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(3)
    dm = NAICSDataModule(batch_size=16, num_workers=0, cache_dir=out / "cache", phase1_end_epoch=1,
                         pairs_per_epoch=64)
    mining = HardNegativeMiningCallback(k=4, neighbours=8, shard_index=len(sys.argv) > 2 and sys.argv[2] == "shard")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[mining, Dump(mining, out)])
    trainer.fit(NAICSEncoder(config=TINY_BERT), datamodule=dm)
    if trainer.global_rank == 0:
        assert mining.refresh_count == 1, mining.refresh_count
    os.environ.pop("LOCAL_RANK", None)


if __name__ == "__main__":
    main()
