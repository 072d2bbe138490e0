"""Scale: the whole pipeline on synthetic parent-pointer trees of 2k .. 1M codes on one machine.

    python benchmarks/bench_scale.py                 # 2k, 100k, 1M codes (about 15 min on 2 cores)
    python benchmarks/bench_scale.py --quick         # 2k, 100k
    python benchmarks/bench_scale.py --sizes 2000 1000000 --output /tmp/scale.json
    python benchmarks/bench_scale.py --sizes 1000000 --main-job   # + the main job end to end (~35 min)

Trees come from :func:`naics_hnm.tree.synthetic.synthetic_tree` (letter codes that say nothing
about the tree, leaves at depth 5..7, short inherited titles). EACH SIZE RUNS IN ITS OWN
SUBPROCESS, so the peak RSS is that size's alone. Stages (``scale_stages.py``), each timed, with
the current and peak RSS and the load average after it:

1. ``load``: write the CSV (not timed), then ``Taxonomy.from_csv``.
2. ``datamodule``: ``NAICSDataModule(taxonomy, positive_relations=("levels",), order filter on)``
   ``prepare_data()`` (a fresh token cache with the real offline tokenizer) and ``setup()``.
3. ``phase1``: items/s of ``__getitems__`` + ``collate_fn`` for batches of 256 at epoch 0 and the
   last Phase 1 epoch, against a straightforward per-item NumPy reference measured in the same run
   (``scale_reference.py``); every drawn negative and candidate is checked.
4. ``refresh_default``: ``HardNegativeMiner(taxonomy).refresh(embeddings, 0)`` AT ITS DEFAULTS: the
   index chosen from N (exact up to 20,000 codes, a recall-calibrated IVF above), then guarded
   neighbour lists of every code (M=64); embeddings are tree-structured float32 vectors of width 32.
   ``refresh_flat``: exact flat lists as the reference (above ``--flat-exact-max`` codes on a sample
   of anchors, EXTRAPOLATED to N and labelled), checked against a NumPy brute force;
   ``recall``: recall@64 of the default lists against the exact ones.
5. ``mining``: ``miner.mine(anchors, positives, pool)`` per batch of 256 anchors with the Phase 1
   items' 48-code pools, with torch's default threads and with one thread, interleaved batch by
   batch with a ``--small-size``-code copy of the pipeline in the same process (the ratio is the
   target); mined ids checked.
6. ``main_job`` (only with ``--main-job``): ``examples/train_naics.py --taxonomy <the size's CSV>`` at
   its defaults in a subprocess with fresh caches, the one-off frozen-encoder pass included
   (``scale_main_job.py``): minutes, the pass's seconds, the job's peak RSS and its final metrics.

The summary (``scale_report.py``) prints the table across sizes and the targets at the largest
size; the results go to ``--output`` as JSON. A failing stage is reported with its error line;
later stages that need it are skipped. Nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import current_rss_mib, machine_line, peak_rss_mib  # noqa: E402
from scale_reference import BATCH, DIM, M, tree_vectors  # noqa: E402,F401  (tree_vectors: for other benches)
from scale_report import TARGETS, print_size, summary  # noqa: E402
from scale_stages import run_size  # noqa: E402

log = logging.getLogger("bench_scale")

DEFAULT_SIZES = (2_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 100_000)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_scale.json"


class Recorder:
    """Per-stage seconds, RSS and metrics; written (atomically) after every stage so a crash keeps them."""

    def __init__(self, n: int, path: Path | None) -> None:
        self.path = path
        self.result: dict[str, Any] = {"n": n, "stages": {}, "errors": {}, "notes": []}
        self.t_start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, needs: tuple[str, ...] = ()) -> Iterator[dict[str, Any] | None]:
        """Time a stage; on an exception record its first line and go on. Yields its metric dict."""
        missing = [s for s in needs if s in self.result["errors"] or s not in self.result["stages"]]
        record: dict[str, Any] = {}
        if missing:
            self.result["errors"][name] = f"skipped: needs stage(s) {missing}"
            log.warning("stage %s skipped: needs %s", name, missing)
            yield None
            return
        log.info("stage %s ...", name)
        t0 = time.perf_counter()
        try:
            yield record
        except Exception as err:  # a failing stage is reported, not fatal
            line = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.result["errors"][name] = line
            log.error("stage %s failed: %s\n%s", name, line, traceback.format_exc())
        gc.collect()
        record["seconds"] = time.perf_counter() - t0
        record["rss_mib"] = current_rss_mib()
        record["peak_rss_mib"] = peak_rss_mib()
        record["load_avg"] = os.getloadavg()[0]
        self.result["stages"][name] = record
        log.info("stage %s: %.2f s, rss %.0f MiB, peak %.0f MiB", name, record["seconds"], record["rss_mib"],
                 record["peak_rss_mib"])
        self.flush()

    def flush(self) -> None:
        self.result["total_seconds"] = time.perf_counter() - self.t_start
        self.result["peak_rss_mib"] = peak_rss_mib()
        if self.path is not None:
            from naics_hnm.atomic import atomic_write_text

            atomic_write_text(self.path, json.dumps(self.result, indent=1, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def child_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [N={args.child}] %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("naics_hnm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rec = Recorder(args.child, Path(args.child_output) if args.child_output else None)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_scale_{args.child}_", dir=args.tmp_dir))
    try:
        run_size(args.child, args, rec, tmp)
    except Exception as err:  # anything outside a stage
        rec.result["errors"]["child"] = f"{type(err).__name__}: {err}"
        log.error("%s", traceback.format_exc())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rec.flush()
    print_size(rec.result)


def parent_main(args: argparse.Namespace) -> None:
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    print(f"bench_scale: sizes {', '.join(f'{n:,}' for n in sizes)}; one subprocess per size; {machine_line()}; "
          f"batches {args.batches} x {BATCH}, reference items {args.ref_items}, mining batches {args.mine_batches}, "
          f"d={DIM}, M={M}", flush=True)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_", dir=args.tmp_dir) as tmp:
        for n in sizes:
            out = Path(tmp) / f"result_{n}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--child-output", str(out),
                   *child_flags(args)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            res = json.loads(out.read_text()) if out.exists() else {"n": n, "stages": {}, "errors": {}}
            res["child_wall_seconds"] = wall
            if rc != 0:
                res.setdefault("errors", {})["process"] = (f"child exited with {rc} after {wall:.0f} s"
                                                           + (" (killed: out of memory?)" if rc == -9 else ""))
                print(f"  N={n:,}: child exited with {rc}", flush=True)
            results.append(res)
    lines = summary(results)
    print("\nSummary across sizes\n")
    print("\n".join(lines))
    print(f"\nat the end: {machine_line()}")
    payload = {"sizes": list(sizes), "argv": sys.argv[1:], "targets": TARGETS, "results": results,
               "summary": lines, "wall_seconds": time.perf_counter() - started,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    from naics_hnm.atomic import atomic_path

    output = Path(args.output)
    with atomic_path(output) as tmp_path:
        tmp_path.write_text(json.dumps(payload, indent=1, default=_plain) + "\n", encoding="utf-8")
    print(f"\nresults: {output}")


CHILD_OPTIONS = ("batches", "check_batches", "ref_items", "mine_batches", "recall_anchors", "flat_sample",
                 "flat_exact_max", "brute_anchors", "small_size", "nprobe", "index_factory", "seed", "tmp_dir")


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in CHILD_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags + (["--main-job"] if args.main_job else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} (default {DEFAULT_SIZES})")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of codes, one subprocess each")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON results (written atomically)")
    parser.add_argument("--batches", type=int, default=20, help="Phase 1 batches of 256 per epoch measured")
    parser.add_argument("--check-batches", type=int, default=4, help="Phase 1 batches per epoch checked for validity")
    parser.add_argument("--ref-items", type=int, default=20, help="items drawn by the straightforward reference")
    parser.add_argument("--mine-batches", type=int, default=50, help="batches of 256 anchors mined")
    parser.add_argument("--recall-anchors", type=int, default=2000)
    parser.add_argument("--flat-sample", type=int, default=5000, help="anchors of the sampled flat neighbour pass")
    parser.add_argument("--flat-exact-max", type=int, default=200_000,
                        help="largest N whose flat neighbour lists are built for every code")
    parser.add_argument("--brute-anchors", type=int, default=50, help="anchors checked against a NumPy brute force")
    parser.add_argument("--small-size", type=int, default=2000,
                        help="codes of the in-process reference whose batches are timed interleaved with N's")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="refresh with IVF<auto nlist>,Flat at this nprobe instead of the default (calibrated)")
    parser.add_argument("--index-factory", default=None, help="refresh with this factory instead of the default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--main-job", action="store_true",
                        help="also run examples/train_naics.py at its defaults on each size's tree, end to end "
                             "(about 30 min at 1M codes; scale_main_job.py)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    parser.add_argument("--tmp-dir", default=None, help="folder for the CSVs and token caches (default: system temp)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("batches", "ref_items", "mine_batches", "recall_anchors", "flat_sample", "brute_anchors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.sizes and min(args.sizes) < 10:
        parser.error(f"--sizes {args.sizes}: expected sizes >= 10")
    if args.child is not None:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
