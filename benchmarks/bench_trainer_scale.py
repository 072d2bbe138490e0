"""A real Trainer with ``HardNegativeMiningCallback()`` at its defaults on a 1M-code tree, end to end.

    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer_scale.py                  # 2,000 and 1,000,000 codes
    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer_scale.py --sizes 2000 100000 --batches 10

The path a user takes: a synthetic parent-pointer tree (letter codes, depth 5-7) written as CSV,
``Taxonomy.from_csv``, ``NAICSDataModule`` (tokenise, pairs), the tiny BERT of the tests
(``TINY_BERT``: 2 layers, width 32, so embeddings are 32-d and the encoder is not what is timed),
and ``pl.Trainer(max_epochs=2)`` with ``HardNegativeMiningCallback()`` - no argument, so the index
is what the library chooses from N. Epoch 0 is Phase 1; at the start of epoch 1 the callback
embeds every code, builds the index and the guarded neighbour lists (the refresh), and every
batch of epoch 1 is mined. Each size runs in its own process, so peak RSS is per size. The 2,000-code
run is the in-run reference: the ratio column divides each figure by it. Check: every mined
negative is outside the anchor's ancestors and descendants and is not the positive (counted over
every mined batch). Targets at the largest size: end to end <= 5 minutes, peak RSS <= 6 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_line, peak_rss_mib, ratio_line  # noqa: E402

TARGET_MINUTES, TARGET_GIB = 5.0, 6.0
STEPS = ("load", "datamodule", "phase1_epoch", "refresh", "mined_epoch", "total")


def run_size(n: int, batches: int, folder: Path) -> dict:
    import lightning.pytorch as pl
    import numpy as np
    from lightning.pytorch.callbacks import Callback

    from naics_hnm import HardNegativeMiningCallback, NAICSDataModule, NAICSEncoder
    from naics_hnm.train.encoder import TINY_BERT
    from naics_hnm.tree.synthetic import synthetic_tree
    from naics_hnm.tree.taxonomy import Taxonomy

    class Clock(Callback):
        """Epoch times and a check of every mined batch against the tree."""

        def __init__(self) -> None:
            self.started: dict[int, float] = {}
            self.seconds: dict[int, float] = {}
            self.checked = self.bad = 0

        def on_train_epoch_start(self, trainer, pl_module):  # runs after the mining callback's refresh
            self.started[trainer.current_epoch] = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds[trainer.current_epoch] = time.perf_counter() - self.started[trainer.current_epoch]

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "negative_scores" not in batch:
                return
            tx = trainer.datamodule.taxonomy
            anchors, positives = batch["anchor_idx"].numpy(), batch["positive_idx"].numpy()
            for row, a in enumerate(anchors):
                chosen = batch["negative_idx"][row][batch["negative_mask"][row]].numpy()
                self.checked += chosen.size
                self.bad += int(np.isin(chosen, [positives[row], *tx.ancestors(a), *tx.descendants(a)]).sum())

    started = time.perf_counter()
    csv = folder / f"tree_{n}.csv"
    synthetic_tree(n, depth=(5, 7), seed=0, code_style="letters").write_csv(csv)
    t0 = time.perf_counter()
    taxonomy = Taxonomy.from_csv(csv)
    out = {"n": n, "load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    dm = NAICSDataModule(taxonomy, batch_size=64, cache_dir=folder / "cache", phase1_end_epoch=1, seed=0,
                         pairs_per_epoch=64 * batches)
    dm.prepare_data()
    dm.setup("fit")
    out["datamodule"] = time.perf_counter() - t0
    mining, clock = HardNegativeMiningCallback(), Clock()
    pl.seed_everything(0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=folder / f"run_{n}", callbacks=[mining, clock])
    t0 = time.perf_counter()
    trainer.fit(NAICSEncoder(config=TINY_BERT, lr=1e-3), datamodule=dm)
    fit = time.perf_counter() - t0
    out.update(phase1_epoch=clock.seconds[0], mined_epoch=clock.seconds[1],
               refresh=sum(mining.last_refresh_seconds.values()), refresh_parts=mining.last_refresh_seconds,
               fit=fit, index=mining.miner.index.index_type, checked=clock.checked, bad=clock.bad,
               total=time.perf_counter() - started, peak_rss_gib=peak_rss_mib() / 1024)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 1_000_000])
    parser.add_argument("--batches", type=int, default=20, help="training batches of 64 per epoch")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.child is not None:
            print(json.dumps(run_size(args.child, args.batches, Path(tmp))))
            return
        print(machine_line())
        rows = []
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--batches", str(args.batches)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"N={n:,}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not rows:
        return
    ref = rows[0]
    print(f"{args.batches} batches of 64 per epoch, tiny BERT (d=32), HardNegativeMiningCallback() defaults; "
          f"ratio: / the {ref['n']:,}-code run")
    print("| codes | index | " + " | ".join(f"{s} s" for s in STEPS) + " | peak RSS GiB | mined negatives bad |")
    print("|---|---|" + "---|" * len(STEPS) + "---|---|")
    for row in rows:
        cells = [f"{row[s]:.1f} ({row[s] / max(ref[s], 1e-9):.0f}x)" for s in STEPS]
        print(f"| {row['n']:,} | {row['index']} | " + " | ".join(cells)
              + f" | {row['peak_rss_gib']:.2f} | {row['bad']} of {row['checked']:,} |")
    big = rows[-1]
    print(f"refresh parts at {big['n']:,}: " + ", ".join(f"{k} {v:.1f} s" for k, v in big["refresh_parts"].items()))
    print(ratio_line(f"end to end at {big['n']:,} codes (minutes)", big["total"] / 60, TARGET_MINUTES, higher=False))
    print(ratio_line(f"peak RSS at {big['n']:,} codes (GiB)", big["peak_rss_gib"], TARGET_GIB, higher=False))
    print(machine_line())


if __name__ == "__main__":
    main()
