"""The main job: train code embeddings on a taxonomy with a Phase 1 curriculum, then FAISS-mined hard negatives.

    python examples/train_naics.py --output outputs/naics [--taxonomy CSV] [--heldout-codes FILE]
                                   [--negatives random|curriculum|mined] [--samples-per-epoch N]

Without ``--taxonomy`` it trains on NAICS 2022 (the embedded default). The reference encoder is
the offline all-MiniLM-L6-v2: on trees up to 20,000 codes its lower layers are frozen and cached
and the top layers are fine-tuned; on larger trees every layer is frozen (run once per code, kept
in a file) and a residual MLP head is trained, so any tree fits a bounded time. Settings left out
are chosen from the tree's size and printed. Held-out codes (``--heldout-codes FILE``, else 20 %
of the leaves as whole same-text groups) never reach a training batch and are embedded with all
others at the end. Writes into --output: ``embeddings.h5`` (final embeddings of every code),
``metrics/epoch_NNN.json``, ``metrics.json``, ``training.png``; and the final index
``indexes/<taxonomy>_trained.faiss`` (+ sidecar).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import signal
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
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from naics_hnm import EmbeddingIndex, HardNegativeMiningCallback, NAICSDataModule, NAICSEncoder  # noqa: E402
from naics_hnm.atomic import atomic_write_text, pid_alive  # noqa: E402
from naics_hnm.data.config import SamplingConfig  # noqa: E402
from naics_hnm.data.pairs import allowed_mask, tree_pairs  # noqa: E402
from naics_hnm.data.token_cache import default_tokenizer_path  # noqa: E402
from naics_hnm.embeddings_file import save_embeddings  # noqa: E402
from naics_hnm.evaluation import holdout_split  # noqa: E402
from naics_hnm.index.auto import EXACT_MAX_CODES, choose_index  # noqa: E402
from naics_hnm.index.index_file import check_index_path  # noqa: E402
from naics_hnm.train.evaluation_callback import TaxonomyEvaluationCallback  # noqa: E402
from naics_hnm.train.report import EpochTable, plot_history, write_line  # noqa: E402
from naics_hnm.tree.taxonomy import Taxonomy, TaxonomyError  # noqa: E402
from naics_hnm.writable import ensure_writable_dir  # noqa: E402

log = logging.getLogger("train_naics")
MODES = ("random", "curriculum", "mined")
LARGE_TREE = 20_000
"""Codes above which the encoder is frozen whole and only a head trains (the fine-tuned top layers
would need hours per pass over the tree on a 2-core CPU)."""
EVERY_EPOCH_EVAL = 200_000
"""Codes up to which every epoch is evaluated; above, only the last epoch (one evaluation of a
1M-code tree takes about 4 minutes on a 2-core CPU: 5,000 sampled queries against every leaf)."""
APPROXIMATE_INDEX = EXACT_MAX_CODES
"""Codes above which the mining index is IVF (the library's rule: :func:`naics_hnm.index.auto.choose_index`)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Options marked 'auto' are chosen from the tree size; the run prints them.")
    p.add_argument("--output", type=Path, required=True, help="folder for embeddings, metrics and the plot")
    p.add_argument("--taxonomy", type=Path, default=None,
                   help="taxonomy CSV (code,title[,parent,...]; see the README); default NAICS 2022")
    p.add_argument("--heldout-codes", type=Path, default=None,
                   help="file with one code per line kept out of training (still embedded and evaluated); "
                        "default: --heldout-fraction of the leaves, as whole same-text groups")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="without --heldout-codes; 0 holds out none")
    p.add_argument("--negatives", choices=MODES, default="mined",
                   help="random: uniform guarded negatives; curriculum: Phase 1 curriculum all along; "
                        "mined: curriculum, then FAISS-mined from --phase1-end-epoch (default)")
    p.add_argument("--epochs", type=int, default=None, help="auto: 16 (small trees), 8 (large)")
    p.add_argument("--samples-per-epoch", type=int, default=None,
                   help="training pairs per epoch, a fresh seeded subset each epoch; auto: every pair on "
                        "small trees, at most 100,000 on large ones")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="opt-in wall-clock limit: stop training after this long (the final evaluation follows; "
                        "the table, the summary and metrics.json say so); default: none, every epoch runs")
    p.add_argument("--phase1-end-epoch", type=int, default=3, help="first mined epoch (0-based)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="auto: 64 (small trees), 256 (large)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the trained layers")
    p.add_argument("--freeze-layers", type=int, default=None,
                   help="frozen (cached) lower transformer layers; auto: 4 (small trees), all 6 (large)")
    p.add_argument("--head", choices=("none", "mlp"), default=None,
                   help="trained residual MLP on the pooled vector; auto: none (small), mlp (large)")
    p.add_argument("--tree-weight", type=float, default=3.0,
                   help="weight of the listwise tree term (batch codes ranked by common-ancestor depth); 0: off")
    p.add_argument("--tree-sharpness", type=float, default=3.0, help="target preference per tree level (nats)")
    p.add_argument("--ring-weight", type=float, default=3.0,
                   help="weight of the ring term (each tree level's codes against those further out, each level "
                        "evened out); 0: off")
    p.add_argument("--ring-temperature", type=float, default=0.1, help="softmax temperature of the ring term")
    p.add_argument("--negatives-per-anchor", type=int, default=8)
    p.add_argument("--pool", type=int, default=48, help="curriculum candidates per item ranked in Phase 2+")
    p.add_argument("--neighbours", type=int, default=48, help="index neighbours added to each pool")
    p.add_argument("--margin", type=float, default=-1.0,
                   help="relative margin: drop candidates more similar than (1 - m) x the positive; negative: "
                        "off (default: the tree guard already excludes false negatives; see README)")
    p.add_argument("--refresh-every", type=int, default=1, help="re-embed and rebuild the index every n epochs")
    p.add_argument("--in-batch", action=argparse.BooleanOptionalAction, default=True,
                   help="also use guarded in-batch negatives (default on)")
    p.add_argument("--index-factory", default=None,
                   help="faiss factory string for the mining index ('Flat': exact); auto: the library's rule, "
                        "exact up to 20,000 codes, IVF<4 sqrt(N), at most 2048>,Flat above")
    p.add_argument("--nprobe", type=int, default=None,
                   help="IVF lists searched per query; auto: 32 for the auto IVF index, else faiss-side defaults")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate (and print a row) every n epochs; the last epoch always; auto: 1 up to "
                        f"{EVERY_EPOCH_EVAL:,} codes, above only the last")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", choices=("32", "bf16"), default="32",
                   help="training steps in fp32 (default) or under bf16 autocast (Lightning bf16-mixed); embedding "
                        "passes use bf16 where the CPU has it either way (see README)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--index", type=Path, default=None,
                   help="final index path; default indexes/<taxonomy name>_trained.faiss")
    p.add_argument("--cache-dir", type=Path, default=None, help="token and frozen-encoder caches")
    return p.parse_args(argv)


def choose_settings(args: argparse.Namespace, taxonomy: Taxonomy) -> dict:
    """Fill every 'auto' option from the tree size; returns what was chosen (also kept in metrics.json)."""
    n = len(taxonomy)
    large = n > LARGE_TREE
    if args.epochs is None:
        args.epochs = 8 if large else 16
    if args.batch_size is None:
        args.batch_size = 256 if large else 64
    if args.freeze_layers is None:
        args.freeze_layers = 6 if large else 4
    if args.head is None:
        args.head = "mlp" if large else "none"
    if args.eval_every is None:
        args.eval_every = 1 if n <= EVERY_EPOCH_EVAL else args.epochs
    if args.samples_per_epoch is None and large:
        args.samples_per_epoch = 100_000
    if args.index_factory is None and n > APPROXIMATE_INDEX:
        args.index_factory = choose_index(n).index_factory
        if args.nprobe is None:
            args.nprobe = 32
    if args.index is None:
        args.index = Path("indexes") / f"{taxonomy.name}_trained.faiss"
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def read_heldout_codes(path: Path, taxonomy: Taxonomy) -> list[str]:
    """Codes listed one per line (blank lines and '#' comments skipped), each checked against the tree."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--heldout-codes {path}: cannot be read ({err}); expected a UTF-8 text file, "
                         "one code per line") from None
    codes: list[str] = []
    known = set(taxonomy.codes)
    for number, line in enumerate(lines, start=1):
        code = line.strip()
        if not code or code.startswith("#"):
            continue
        if code not in known:
            raise ValueError(f"--heldout-codes {path} line {number}: code {code!r} is not in taxonomy "
                             f"{taxonomy.name!r} ({len(taxonomy):,} codes)")
        codes.append(code)
    if not codes:
        raise ValueError(f"--heldout-codes {path} lists no code; expected one code per line")
    return sorted(set(codes))


def check_training_inputs(args: argparse.Namespace, taxonomy: Taxonomy, excluded: list[str]) -> None:
    """Every user error that training would otherwise meet late (or as a traceback), as a ValueError.

    Cheap: reads the model's config (not its weights), builds an empty faiss index, creates a Trainer.
    """
    for name, value in (("lr", args.lr), ("temperature", args.temperature), ("tree-sharpness", args.tree_sharpness),
                        ("ring-temperature", args.ring_temperature)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} {value}: expected a positive number")
    for name, value in (("tree-weight", args.tree_weight), ("ring-weight", args.ring_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} {value}: expected a number >= 0 (0 turns the term off)")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout {args.dropout}: expected a number in [0, 1)")
    for name in ("negatives_per_anchor", "pool"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an int >= 1")
    if args.neighbours < 0:
        raise ValueError(f"--neighbours {args.neighbours}: expected an int >= 0")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(default_tokenizer_path())
    if args.freeze_layers > config.num_hidden_layers:
        raise ValueError(f"--freeze-layers {args.freeze_layers}: the encoder has {config.num_hidden_layers} layers; "
                         f"expected 0..{config.num_hidden_layers}")
    if args.freeze_layers == config.num_hidden_layers and args.head == "none":
        raise ValueError(f"--freeze-layers {args.freeze_layers} freezes every layer and --head none trains nothing; "
                         "expected fewer frozen layers or --head mlp")
    if args.index_factory is not None:
        import faiss

        try:
            faiss.index_factory(config.hidden_size, args.index_factory)
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else "rejected"
            raise ValueError(f"--index-factory {args.index_factory!r} is not a faiss factory string for "
                             f"{config.hidden_size}-dimensional vectors ({reason[:200]}); expected e.g. 'IVF1024,Flat' "
                             "or 'HNSW32'") from None
    if args.cache_dir is not None:
        ensure_writable_dir(args.cache_dir, "--cache-dir")
    leaves = np.flatnonzero(taxonomy.end - taxonomy.pre == 1)
    held = np.isin(np.arange(len(taxonomy)), [taxonomy.index(c) for c in excluded])
    if excluded and not held[leaves].any():
        raise ValueError(f"the {len(excluded):,} held-out codes hold no leaf: held-out evaluation ranks leaves; "
                         "expected at least one leaf code among them")
    if held[leaves].all():
        raise ValueError(f"every leaf of {taxonomy.name!r} is held out ({leaves.size:,} leaves); expected some "
                         "leaves left to train on")
    pairs = tree_pairs(taxonomy, ("levels",), allowed_mask(taxonomy, tuple(excluded)))
    if len(pairs) == 0:
        raise ValueError(f"nothing to train on: taxonomy {taxonomy.name!r} ({len(taxonomy):,} codes, depth "
                         f"{taxonomy.max_depth}) has no (code, ancestor) pair outside the held-out codes; expected a "
                         "tree with at least two levels")
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # the Trainer's device lines belong to the run, not to this check
    try:
        pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    except (ValueError, RuntimeError, MisconfigurationException) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--accelerator {args.accelerator}: {reason}; expected auto, cpu or an accelerator "
                         "present on this machine") from None
    finally:
        lightning_log.setLevel(level)


def load_tree(args: argparse.Namespace) -> Taxonomy:
    if args.taxonomy is None:
        return Taxonomy.naics2022()
    return Taxonomy.from_csv(args.taxonomy)


def heldout_codes(args: argparse.Namespace, taxonomy: Taxonomy) -> list[str]:
    if args.heldout_codes is not None:
        return read_heldout_codes(args.heldout_codes, taxonomy)
    if args.heldout_fraction <= 0:
        return []
    mask = holdout_split(taxonomy, args.heldout_fraction, seed=0)
    return [taxonomy.codes[i] for i in np.flatnonzero(mask)]


def run(args: argparse.Namespace, taxonomy: Taxonomy, callbacks: list[Callback] | None = None,
        excluded: list[str] | None = None) -> dict:
    """Train, evaluate, write embeddings / index / metrics / plot; ``callbacks`` are added to the Trainer.

    ``excluded``: the held-out codes when the caller already read them (default: from ``args``).
    """
    started = time.perf_counter()
    settings = choose_settings(args, taxonomy)
    pl.seed_everything(args.seed, workers=True)
    if args.accelerator in ("auto", "cpu") and not torch.cuda.is_available():
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        torch.set_num_threads(len(cores))
    args.output.mkdir(parents=True, exist_ok=True)
    staging = new_staging_dir(args.output)
    if excluded is None:
        excluded = heldout_codes(args, taxonomy)
    write_line(f"{taxonomy.name}: {len(taxonomy):,} codes, depth {taxonomy.max_depth}, {len(excluded):,} held out; "
               f"{args.negatives} negatives, {args.epochs} epochs of "
               f"{args.samples_per_epoch or 'all'} pairs, batch {args.batch_size}, "
               f"freeze {args.freeze_layers} layers, head {args.head}, in-batch {'on' if args.in_batch else 'off'}, "
               f"index {args.index_factory or 'exact'}{f' nprobe {args.nprobe}' if args.nprobe else ''}"
               f"{f', at most {args.max_minutes:g} min (--max-minutes)' if args.max_minutes else ''}")
    dm = NAICSDataModule(
        taxonomy, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        phase1_end_epoch=args.phase1_end_epoch, cache_dir=args.cache_dir,
        n_negatives=args.negatives_per_anchor, n_candidates=max(args.pool, args.negatives_per_anchor),
        positive_relations=("levels",), exclude_codes=tuple(excluded), val_fraction=0.03,
        pairs_per_epoch=args.samples_per_epoch,
        sampling=SamplingConfig(order_filter=True, uniform=args.negatives == "random"),
    )
    model = NAICSEncoder(lr=args.lr, temperature=args.temperature, freeze_layers=args.freeze_layers,
                         in_batch_negatives=args.in_batch, cosine_schedule=True, dropout=args.dropout,
                         head=None if args.head == "none" else args.head, tree_weight=args.tree_weight,
                         tree_sharpness=args.tree_sharpness, ring_weight=args.ring_weight,
                         ring_temperature=args.ring_temperature)
    evaluation = TaxonomyEvaluationCallback(every_n_epochs=args.eval_every)
    table = EpochTable(args.negatives, evaluation, staging / "metrics")
    trainer_callbacks: list[Callback] = [evaluation, table, *(callbacks or [])]
    if args.negatives == "mined":
        trainer_callbacks.insert(0, HardNegativeMiningCallback(
            k=args.negatives_per_anchor, relative_margin=args.margin if args.margin >= 0 else None,
            order_filter=True, neighbours=args.neighbours, index_factory=args.index_factory,
            search_params={"nprobe": args.nprobe} if args.nprobe is not None else None,
            refresh_every_n_epochs=args.refresh_every))
    precision = {"32": "32-true", "bf16": "bf16-mixed"}[args.precision]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, default_root_dir=args.output,
                         precision=precision,
                         gradient_clip_val=1.0, logger=CSVLogger(args.output, name="logs"),
                         enable_checkpointing=False, callbacks=trainer_callbacks, num_sanity_val_steps=0,
                         max_time={"minutes": args.max_minutes} if args.max_minutes else None,
                         enable_model_summary=False,
                         log_every_n_steps=10)
    progress["trainer"] = trainer
    trainer.fit(model, datamodule=dm)
    stopped = None
    if trainer.current_epoch < args.epochs:  # only --max-minutes ends fit() early
        stopped = f"stopped by --max-minutes after epoch {trainer.current_epoch} of {args.epochs}"
        write_line(f"{stopped}: this is not a full run")
    embeddings = evaluation.last_embeddings
    if embeddings is None or not table.rows or table.rows[-1]["epoch"] != trainer.current_epoch - 1:
        metrics = evaluation.evaluate(trainer, model)
        embeddings = evaluation.last_embeddings
        table.add({"epoch": trainer.current_epoch - 1, "phase": "final", "mix": "-", "mix_hard": 0.0,
                   "mix_semi_hard": 0.0, "mix_easy": 0.0, **metrics})
    final = table.rows[-1]
    save_embeddings(staging / "embeddings.h5", embeddings.numpy(), taxonomy.codes,
                    model=f"{model.model_name} fine-tuned ({args.negatives})", epoch=int(final["epoch"]))
    index = EmbeddingIndex.build(embeddings, metric="cosine", device="auto", codes=taxonomy.codes,
                                 model_fingerprint=f"train_naics {taxonomy.name} {args.negatives} seed {args.seed}",
                                 epoch=int(final["epoch"]))
    summary = {"taxonomy": taxonomy.name, "codes": len(taxonomy), "heldout_codes": len(excluded),
               "negatives": args.negatives, "seed": args.seed, "settings": settings,
               "epochs": trainer.current_epoch, "stopped_early": stopped,
               "wall_seconds": time.perf_counter() - started, "final": final, "per_epoch": table.rows}
    atomic_write_text(staging / "metrics.json", json.dumps(summary, indent=2))
    plot_history(table.rows, staging / "training.png",
                 f"{taxonomy.name} ({len(taxonomy):,} codes), negatives={args.negatives}, seed={args.seed}")
    with deferred_interrupts():
        index.save(args.index)
        publish(staging, args.output)
    return summary


STAGING_PREFIX = ".run-"
PUBLISHED = ("metrics", "embeddings.h5", "training.png", "metrics.json")
"""What a run writes into its staging folder and publishes into --output at its end, metrics.json last."""
progress: dict = {}
"""The running Trainer, for the message of an interrupted run."""


def new_staging_dir(output: Path) -> Path:
    """A run-private folder inside ``output`` (``.run-PID-RANDOM``); those of runs no longer alive are removed."""
    for old in output.glob(f"{STAGING_PREFIX}*"):
        pid = old.name[len(STAGING_PREFIX):].split("-")[0]
        if old.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = output / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    progress["staging"] = staging
    return staging


def publish(staging: Path, output: Path) -> None:
    """Move the run's files from ``staging`` into ``output``, each by one rename, metrics.json last.

    The previous run's ``metrics`` folder is moved aside first (into ``staging``, removed with it), so
    ``metrics/`` only ever holds one run's epoch files.
    """
    for name in PUBLISHED:
        source, target = staging / name, output / name
        if not source.exists():
            continue
        if source.is_dir() and target.is_dir():
            os.replace(target, staging / f".previous-{name}")
        os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


class RunInterrupted(BaseException):
    """SIGINT (Ctrl-C) during the main job; a BaseException so that nothing on the way swallows it."""


class deferred_interrupts:
    """A block that a Ctrl-C does not cut short (publishing the results): SIGINT is ignored until it ends."""

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGINT, lambda signum, frame: None)

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def _raise_interrupted(signum, frame) -> None:
    raise RunInterrupted()


def interrupted_message(output: Path) -> str:
    """The one line of an interrupted run; its staging folder is removed."""
    staging = progress.get("staging")
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    trainer = progress.get("trainer")
    where = f"during epoch {trainer.current_epoch}" if trainer is not None else "before training"
    return f"train_naics: interrupted {where}; the previous results in {output} are untouched"


def report(summary: dict, args: argparse.Namespace) -> None:
    final = summary["final"]
    print(f"\nDone in {summary['wall_seconds'] / 60:.1f} min ({args.negatives} negatives, seed {args.seed}).")
    if summary["stopped_early"]:
        print(f"  NOT A FULL RUN: {summary['stopped_early']}")
    print(f"  all leaves: NDCG@10 {final['ndcg@10']:.3f}, cophenetic {final['cophenetic_pearson']:.3f} "
          f"(Spearman {final['cophenetic_spearman']:.3f})")
    if "heldout_ndcg@10" in final:
        print(f"  held-out leaves ({final['heldout_codes']:.0f}): NDCG@10 {final['heldout_ndcg@10']:.3f}; "
              f"nearest trained leaf under the same parent {final['heldout_parent_hit']:.3f} "
              f"(of the {final['heldout_parent_eligible']:.0%} with a trained sibling), "
              f"same grandparent {final['heldout_grandparent_hit']:.3f}")
    print(f"  embeddings: {args.output / 'embeddings.h5'}")
    print(f"  index:      {args.index} (+ {args.index.name}.json)")
    print(f"  metrics:    {args.output / 'metrics.json'} and {args.output / 'metrics'}/epoch_*.json")
    print(f"  plot:       {args.output / 'training.png'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # fail now, not after training, on bad input or a folder that cannot take the results
        for name in ("epochs", "samples_per_epoch", "batch_size", "freeze_layers", "refresh_every", "nprobe",
                     "eval_every"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "freeze_layers" else 1):
                raise ValueError(f"--{name.replace('_', '-')} {value}: expected a positive integer")
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise ValueError(f"--max-minutes {args.max_minutes}: expected a positive number")
        if not 0 <= args.heldout_fraction < 1:
            raise ValueError(f"--heldout-fraction {args.heldout_fraction}: expected a number in [0, 1)")
        taxonomy = load_tree(args)
        ensure_writable_dir(args.output, "--output")
        excluded = heldout_codes(args, taxonomy)
        choose_settings(args, taxonomy)
        ensure_writable_dir(args.index.parent, "--index folder")
        check_index_path(args.index)
        check_training_inputs(args, taxonomy, excluded)
    except (ValueError, TaxonomyError, OSError) as err:
        print(f"train_naics: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("naics_hnm").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # the frozen lower layers stay in eval mode on purpose (their outputs are cached)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    previous = signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        summary = run(args, taxonomy, excluded=excluded)
    except RunInterrupted:
        print(interrupted_message(args.output), file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    report(summary, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
