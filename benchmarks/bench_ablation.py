"""Does mining earn its place? The main job, same budget, three ways: random, curriculum, mined.

    python benchmarks/bench_ablation.py [--seeds 0 1 2] [--out outputs/ablation] [-- extra train_naics options]

Runs ``examples/train_naics.py --negatives MODE --seed S`` for every mode and seed (one process each,
sequentially, so timings are comparable), then prints a Markdown table of the final metrics (mean
over seeds, with the spread when there are several) and the mined-minus-baseline differences. The
targets: mined beats curriculum and random on NDCG@10 over all six-digit codes by >= 0.03 and is not
worse on held-out codes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("random", "curriculum", "mined")
COLUMNS = (("ndcg@10", "NDCG@10 all"), ("cophenetic_pearson", "cophenetic"),
           ("heldout_ndcg@10", "held-out NDCG@10"), ("heldout_parent5_hit", "held-out 5-digit hit"),
           ("heldout_parent5_hit_reachable", "5-digit hit (reachable)"),
           ("heldout_parent4_hit", "held-out 4-digit hit"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json exists")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="options passed to train_naics.py (after --)")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for seed in args.seeds:
        for mode in MODES:
            out = args.out / f"{mode}_seed{seed}"
            if not (args.reuse and (out / "metrics.json").exists()):
                cmd = [sys.executable, str(ROOT / "examples" / "train_naics.py"), "--output", str(out),
                       "--negatives", mode, "--seed", str(seed),
                       "--index", str(out / "index.faiss"), *extra]
                print("running:", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
            results[mode].append(json.loads((out / "metrics.json").read_text()))
    print(f"\nseeds {args.seeds}; extra options {extra or 'none'}\n")
    print("| negatives | " + " | ".join(label for _, label in COLUMNS) + " | minutes |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    means = {}
    for mode in MODES:
        runs = results[mode]
        cells = []
        for key, _ in COLUMNS:
            values = np.array([r["final"].get(key, np.nan) for r in runs], dtype=float)
            means[(mode, key)] = float(np.mean(values))
            spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        minutes = np.mean([r["wall_seconds"] for r in runs]) / 60
        print(f"| {mode} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    for base in ("random", "curriculum"):
        all_gain = means[("mined", "ndcg@10")] - means[(base, "ndcg@10")]
        held_gain = means[("mined", "heldout_ndcg@10")] - means[(base, "heldout_ndcg@10")]
        verdict = "meets" if all_gain >= 0.03 and held_gain >= 0 else "misses"
        print(f"\nmined - {base}: NDCG@10 all {all_gain:+.3f}, held-out {held_gain:+.3f} "
              f"({verdict} the >= +0.03 / not-worse target)")


if __name__ == "__main__":
    main()
