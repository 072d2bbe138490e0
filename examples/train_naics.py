"""The main job: train NAICS 2022 embeddings with a Phase 1 curriculum, then FAISS-mined hard negatives.

    python examples/train_naics.py --output outputs/naics [--negatives random|curriculum|mined]

The reference encoder (offline all-MiniLM-L6-v2, lower layers frozen and cached, top layer
trained) learns from the real NAICS 2022 tree with a Trainer, a NAICSDataModule and, for
``--negatives mined``, the HardNegativeMiningCallback. 20 % of the six-digit codes (and every code
with the same text) are held out of training to measure generalisation. It writes into --output:
``embeddings.h5`` (final embeddings of every code), ``metrics/epoch_NNN.json`` and ``metrics.json``,
``training.png``; and the final index ``indexes/naics2022_trained.faiss`` (+ sidecar).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from naics_hnm import EmbeddingIndex, HardNegativeMiningCallback, NAICSDataModule, NAICSEncoder  # noqa: E402
from naics_hnm.atomic import atomic_write_text  # noqa: E402
from naics_hnm.config import SamplingConfig  # noqa: E402
from naics_hnm.embeddings_file import save_embeddings  # noqa: E402
from naics_hnm.evaluation import holdout_split  # noqa: E402
from naics_hnm.evaluation_callback import TaxonomyEvaluationCallback  # noqa: E402
from naics_hnm.taxonomy import Taxonomy  # noqa: E402
from naics_hnm.writable import ensure_writable_dir  # noqa: E402

log = logging.getLogger("train_naics")
MODES = ("random", "curriculum", "mined")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True, help="folder for embeddings, metrics and the plot")
    p.add_argument("--negatives", choices=MODES, default="mined",
                   help="random: uniform guarded negatives; curriculum: Phase 1 curriculum all along; "
                        "mined: curriculum, then FAISS-mined from --phase1-end-epoch (default)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--phase1-end-epoch", type=int, default=3, help="first mined epoch (0-based)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--freeze-layers", type=int, default=5, help="frozen (cached) lower transformer layers")
    p.add_argument("--negatives-per-anchor", type=int, default=8)
    p.add_argument("--pool", type=int, default=48, help="curriculum candidates per item ranked in Phase 2+")
    p.add_argument("--neighbours", type=int, default=48, help="index neighbours added to each pool")
    p.add_argument("--margin", type=float, default=0.05, help="relative margin (negative: off)")
    p.add_argument("--in-batch", action="store_true",
                   help="also use guarded in-batch negatives (helps random negatives most; see README)")
    p.add_argument("--heldout-fraction", type=float, default=0.2)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=9.0, help="stop training after this long")
    p.add_argument("--index", type=Path, default=Path("indexes") / "naics2022_trained.faiss")
    return p.parse_args(argv)


class EpochTable(Callback):
    """Prints one row per epoch: phase, curriculum mix, refresh time, metrics."""

    def __init__(self, mode: str, evaluation: TaxonomyEvaluationCallback, metrics_dir: Path) -> None:
        self.mode, self.evaluation, self.metrics_dir = mode, evaluation, metrics_dir
        self.rows: list[dict] = []
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self.evaluation.history:
            return
        dm, epoch = trainer.datamodule, trainer.current_epoch
        metrics = self.evaluation.history[-1]
        if metrics.get("epoch") != epoch:
            return
        mined = self.mode == "mined" and epoch >= dm.phase1_end_epoch
        hard, semi, easy = dm.train_dataset.mix(epoch)
        logged = trainer.callback_metrics
        mining = next((c for c in trainer.callbacks if isinstance(c, HardNegativeMiningCallback)), None)
        refreshed = mining is not None and mining.last_refresh_epoch == epoch
        row = {
            "epoch": epoch,
            "phase": "2 mined" if mined else ("random" if self.mode == "random" else "1 curriculum"),
            "mix_hard": hard, "mix_semi_hard": semi, "mix_easy": easy,
            "refresh_embed_s": mining.last_refresh_seconds["embed"] if refreshed else None,
            "refresh_build_s": mining.last_refresh_seconds["build"] if refreshed else None,
            "train_loss": float(logged["train_loss"]) if "train_loss" in logged else None,
            "epoch_s": time.perf_counter() - self._start,
            **{k: v for k, v in metrics.items() if k != "epoch"},
        }
        self.rows.append(row)
        atomic_write_text(self.metrics_dir / f"epoch_{epoch:03d}.json", json.dumps(row, indent=2))
        if len(self.rows) == 1:
            print(f"\n{'ep':>3} {'phase':<13} {'hard/semi/easy':<15} {'refresh':>7} {'loss':>6} "
                  f"{'ndcg@10':>7} {'coph':>5} {'ho_ndcg':>7} {'ho_p5':>5} {'ho_p4':>5} {'sec':>5}", flush=True)
        mix = "-" if self.mode == "random" else f"{hard:.2f}/{semi:.2f}/{easy:.2f}"
        refresh = (f"{row['refresh_embed_s'] + row['refresh_build_s']:.1f}s"
                   if row["refresh_embed_s"] is not None else "-")
        loss = f"{row['train_loss']:.3f}" if row["train_loss"] is not None else "-"
        print(f"{epoch:>3} {row['phase']:<13} {mix:<15} {refresh:>7} {loss:>6} {row['ndcg@10']:7.3f} "
              f"{row['cophenetic_pearson']:5.3f} {row.get('heldout_ndcg@10', float('nan')):7.3f} "
              f"{row.get('heldout_parent5_hit', float('nan')):5.3f} {row.get('heldout_parent4_hit', float('nan')):5.3f} "
              f"{row['epoch_s']:5.1f}", flush=True)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("ndcg@10", "NDCG@10 (all six-digit)"), ("cophenetic_pearson", "cophenetic (Pearson)"),
                       ("heldout_ndcg@10", "held-out NDCG@10"), ("heldout_parent4_hit", "held-out 4-digit hit")):
        if all(key in r for r in rows):
            left.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    left.set_xlabel("epoch")
    left.set_ylim(0, 1)
    left.set_title("quality")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    right.stackplot(epochs, [r["mix_hard"] for r in rows], [r["mix_semi_hard"] for r in rows],
                    [r["mix_easy"] for r in rows], labels=["hard", "semi-hard", "easy"], alpha=0.7)
    mined = [r["epoch"] for r in rows if r["phase"].startswith("2")]
    if mined:
        right.axvspan(min(mined) - 0.5, max(epochs) + 0.5, color="grey", alpha=0.25, label="Phase 2: mined")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.set_title("Phase 1 curriculum mix")
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    pl.seed_everything(args.seed, workers=True)
    if args.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    args.output.mkdir(parents=True, exist_ok=True)
    taxonomy = Taxonomy.naics2022()
    heldout = holdout_split(taxonomy, args.heldout_fraction, seed=0) if args.heldout_fraction > 0 else None
    excluded = tuple(np.array(taxonomy.codes)[heldout]) if heldout is not None else ()
    dm = NAICSDataModule(
        taxonomy, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        phase1_end_epoch=args.phase1_end_epoch,
        n_negatives=args.negatives_per_anchor, n_candidates=max(args.pool, args.negatives_per_anchor),
        positive_relations=("levels",), exclude_codes=excluded, val_fraction=0.03,
        sampling=SamplingConfig(order_filter=True, uniform=args.negatives == "random"),
    )
    model = NAICSEncoder(lr=args.lr, temperature=args.temperature, freeze_layers=args.freeze_layers,
                         in_batch_negatives=args.in_batch, cosine_schedule=True, dropout=0.0)
    evaluation = TaxonomyEvaluationCallback()
    table = EpochTable(args.negatives, evaluation, args.output / "metrics")
    callbacks: list[Callback] = [evaluation, table]
    if args.negatives == "mined":
        callbacks.insert(0, HardNegativeMiningCallback(
            k=args.negatives_per_anchor, relative_margin=args.margin if args.margin >= 0 else None,
            order_filter=True, neighbours=args.neighbours))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, default_root_dir=args.output,
                         gradient_clip_val=1.0, logger=CSVLogger(args.output, name="logs"),
                         enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0,
                         max_time={"minutes": args.max_minutes}, enable_model_summary=False,
                         log_every_n_steps=10)
    trainer.fit(model, datamodule=dm)
    embeddings = evaluation.last_embeddings
    if embeddings is None or not table.rows or table.rows[-1]["epoch"] != trainer.current_epoch - 1:
        metrics = evaluation.evaluate(trainer, model)
        embeddings = evaluation.last_embeddings
        table.rows.append({"epoch": trainer.current_epoch - 1, "phase": "final", "mix_hard": 0.0,
                           "mix_semi_hard": 0.0, "mix_easy": 0.0, **metrics})
    final = table.rows[-1]
    save_embeddings(args.output / "embeddings.h5", embeddings.numpy(), taxonomy.codes,
                    model=f"{model.model_name} fine-tuned ({args.negatives})", epoch=int(final["epoch"]))
    index = EmbeddingIndex.build(embeddings, metric="cosine", device="auto", codes=taxonomy.codes,
                                 model_fingerprint=f"train_naics {args.negatives} seed {args.seed}",
                                 epoch=int(final["epoch"]))
    index.save(args.index)
    summary = {"negatives": args.negatives, "seed": args.seed, "epochs": len(table.rows),
               "wall_seconds": time.perf_counter() - started, "final": final, "per_epoch": table.rows}
    atomic_write_text(args.output / "metrics.json", json.dumps(summary, indent=2))
    plot(table.rows, args.output / "training.png",
         f"NAICS 2022, negatives={args.negatives}, seed={args.seed}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # fail now, not after training, on a folder that cannot take the results
        ensure_writable_dir(args.output, "--output")
        ensure_writable_dir(args.index.parent, "--index folder")
    except ValueError as err:
        print(f"train_naics: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("naics_hnm").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # the frozen lower layers stay in eval mode on purpose (their outputs are cached)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    summary = run(args)
    final = summary["final"]
    print(f"\nDone in {summary['wall_seconds'] / 60:.1f} min ({args.negatives} negatives, seed {args.seed}).")
    print(f"  all six-digit codes: NDCG@10 {final['ndcg@10']:.3f}, cophenetic {final['cophenetic_pearson']:.3f} "
          f"(Spearman {final['cophenetic_spearman']:.3f})")
    if "heldout_ndcg@10" in final:
        print(f"  held-out codes: NDCG@10 {final['heldout_ndcg@10']:.3f}, five-digit parent hit "
              f"{final['heldout_parent5_hit']:.3f} ({final['heldout_parent5_hit_reachable']:.3f} of the "
              f"{final['heldout_parent5_ceiling']:.0%} that have a trained sibling), four-digit hit "
              f"{final['heldout_parent4_hit']:.3f}")
    print(f"  embeddings: {args.output / 'embeddings.h5'}")
    print(f"  index:      {args.index} (+ {args.index.name}.json)")
    print(f"  metrics:    {args.output / 'metrics.json'} and {args.output / 'metrics'}/epoch_*.json")
    print(f"  plot:       {args.output / 'training.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
