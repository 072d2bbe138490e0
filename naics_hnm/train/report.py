"""What a training run shows a person: one table row per epoch, JSON per epoch, and a plot."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm
from typing_extensions import override

from naics_hnm.atomic import atomic_path, atomic_write_text
from naics_hnm.train.callback import HardNegativeMiningCallback
from naics_hnm.train.evaluation_callback import TaxonomyEvaluationCallback

COLUMNS = (  # (key, header, width, format)
    ("epoch", "ep", 3, "d"), ("phase", "phase", 13, "s"), ("mix", "hard/semi/easy", 15, "s"),
    ("refresh", "refresh", 7, "s"), ("train_loss", "loss", 6, ".3f"), ("ndcg@10", "ndcg@10", 7, ".3f"),
    ("cophenetic_pearson", "coph", 5, ".3f"), ("heldout_ndcg@10", "ho_ndcg", 7, ".3f"),
    ("heldout_parent_hit", "ho_par", 6, ".3f"), ("heldout_grandparent_hit", "ho_gpar", 7, ".3f"),
    ("epoch_s", "sec", 6, ".1f"))
PLOTTED = (("ndcg@10", "NDCG@10 (all leaves)"), ("cophenetic_pearson", "cophenetic (Pearson)"),
           ("heldout_ndcg@10", "held-out NDCG@10"), ("heldout_parent_hit", "held-out parent hit"),
           ("heldout_grandparent_hit", "held-out grandparent hit"))


def format_cell(value: Any, width: int, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    if fmt == "s":
        return f"{value:<{width}}" if width >= 10 else f"{value:>{width}}"
    return f"{value:{width}{fmt}}"


def header_line() -> str:
    return " ".join(f"{h:<{w}}" if w >= 10 else f"{h:>{w}}" for _, h, w, _ in COLUMNS)


def row_line(row: dict[str, Any]) -> str:
    return " ".join(format_cell(row.get(key), width, fmt) for key, _, width, fmt in COLUMNS)


def write_line(line: str, file: TextIO | None = None) -> None:
    """Print ``line`` on its own terminal line even while progress bars are drawn."""
    tqdm.write(line, file=file if file is not None else sys.stdout)


class EpochTable(Callback):
    """One row per evaluated epoch (phase, curriculum mix, refresh time, loss, tree metrics), also written to
    ``metrics_dir/epoch_NNN.json``; ``mode`` is the run's negatives (``random``, ``curriculum`` or ``mined``)."""

    def __init__(self, mode: str, evaluation: TaxonomyEvaluationCallback, metrics_dir: Path,
                 file: TextIO | None = None) -> None:
        self.mode, self.evaluation, self.metrics_dir, self.file = mode, evaluation, Path(metrics_dir), file
        self.rows: list[dict[str, Any]] = []
        self._start = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.evaluation.history:
            return
        epoch = trainer.current_epoch
        metrics = self.evaluation.history[-1]
        if metrics.get("epoch") != epoch:
            return
        dm = trainer.datamodule
        mined = self.mode == "mined" and epoch >= dm.phase1_end_epoch
        hard, semi, easy = dm.train_dataset.mix(epoch)
        mining = next((c for c in trainer.callbacks if isinstance(c, HardNegativeMiningCallback)), None)
        refreshed = mining is not None and mining.last_refresh_epoch == epoch
        logged = trainer.callback_metrics
        row: dict[str, Any] = {
            "epoch": epoch, "phase": "2 mined" if mined else ("random" if self.mode == "random" else "1 curriculum"),
            "mix_hard": hard, "mix_semi_hard": semi, "mix_easy": easy,
            "mix": "-" if self.mode == "random" else f"{hard:.2f}/{semi:.2f}/{easy:.2f}",
            "refresh_embed_s": mining.last_refresh_seconds["embed"] if refreshed else None,
            "refresh_build_s": mining.last_refresh_seconds["build"] if refreshed else None,
            "train_loss": float(logged["train_loss"]) if "train_loss" in logged else None,
            "epoch_s": time.perf_counter() - self._start, **{k: v for k, v in metrics.items() if k != "epoch"},
        }
        row["refresh"] = f"{row['refresh_embed_s'] + row['refresh_build_s']:.1f}s" if refreshed else "-"
        self.add(row)

    def add(self, row: dict[str, Any]) -> None:
        """Record, save and print one row (the header before the first)."""
        self.rows.append(row)
        atomic_write_text(self.metrics_dir / f"epoch_{int(row['epoch']):03d}.json", json.dumps(row, indent=2))
        if len(self.rows) == 1:
            write_line("\n" + header_line(), self.file)
        write_line(row_line(row), self.file)


def plot_history(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Tree metrics per epoch (left) and the curriculum mix with the mined epochs shaded (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in PLOTTED:
        values = [r.get(key) for r in rows]
        if any(v is not None and not math.isnan(v) for v in values):
            left.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=label)
    left.set(xlabel="epoch", ylim=(0, 1), title="quality")
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    right.stackplot(epochs, [r.get("mix_hard", 0.0) for r in rows], [r.get("mix_semi_hard", 0.0) for r in rows],
                    [r.get("mix_easy", 0.0) for r in rows], labels=["hard", "semi-hard", "easy"], alpha=0.7)
    mined = [r["epoch"] for r in rows if str(r.get("phase", "")).startswith("2")]
    if mined:
        right.axvspan(min(mined) - 0.5, max(epochs) + 0.5, color="grey", alpha=0.25, label="Phase 2: mined")
    right.set(xlabel="epoch", ylim=(0, 1), title="Phase 1 curriculum mix")
    right.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


__all__ = ["EpochTable", "plot_history", "write_line", "row_line", "header_line"]
