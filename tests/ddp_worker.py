"""Run by tests/test_callback.py: a 2-process CPU DDP fit with the mining callback.

Each rank saves the refreshed index vectors, its neighbour lists, a single-process reference
embedding of every code computed with the same weights, the anchors it trained on and, per mined
batch, the pool it received, its positives and the negatives the callback chose. A second argument
``shard`` turns on ``shard_index`` (the index, ranking vectors and neighbour lists in shared files).
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
    """Placed before the mining callback: sees each batch's pool before widening, and the mined batch after."""

    def __init__(self, mining: HardNegativeMiningCallback, out: Path):
        self.mining, self.out, self.anchors, self.mined = mining, out, [], {"anchor": [], "positive": [], "pool": [],
                                                                             "negative": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.anchors.append(batch["anchor_idx"].cpu().numpy())
        self._pool = batch["candidate_idx"].cpu().numpy().copy()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1:
            for key, value in (("anchor", batch["anchor_idx"]), ("positive", batch["positive_idx"]),
                               ("pool", self._pool), ("negative", batch["negative_idx"])):
                self.mined[key].append(np.asarray(value))

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != 1:
            return
        self._reference = embed_codes(pl_module.embed, trainer.datamodule.token_cache, module=pl_module)

    def on_train_end(self, trainer, pl_module):  # the index is still epoch 1's, the last refresh
        path = self.out / f"rank{trainer.global_rank}.npz"
        data = {"vectors": self.mining.index.vectors.cpu().numpy(), "reference": self._reference.numpy(),
                "neighbours": np.array(self.mining.miner.neighbour_ids), "anchors": np.concatenate(self.anchors)}
        data.update({f"mined_{key}": np.concatenate(value) for key, value in self.mined.items()})
        data["embeddings_file"] = np.array(self.mining.state_dict()["embeddings_file"]["path"])
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
                         limit_val_batches=0, callbacks=[Dump(mining, out), mining], default_root_dir=out)
    trainer.fit(NAICSEncoder(config=TINY_BERT), datamodule=dm)
    if trainer.global_rank == 0:
        assert mining.refresh_count == 1, mining.refresh_count
    os.environ.pop("LOCAL_RANK", None)


if __name__ == "__main__":
    main()
