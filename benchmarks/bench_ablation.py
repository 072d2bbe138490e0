"""Does mining earn its place? The main job, same budget: random, curriculum and mined negatives,
each with guarded in-batch negatives on and off.

    python benchmarks/bench_ablation.py [--taxonomy CSV] [--seeds 0 1] [--out outputs/ablation]
                                        [--arms mined+ib random+ib ...] [-- extra train_naics options]

Runs ``examples/train_naics.py --negatives MODE --[no-]in-batch --seed S`` for every arm and seed
(one process each, sequentially, so timings are comparable; the same tree, held-out split, epochs,
pairs per epoch and time cap for every arm), then prints a Markdown table of the final metrics
(mean over seeds, with the spread when there are several) and the verdict: mined + in-batch
against the best non-mined arm with in-batch on, on held-out NDCG@10 (target: >= +0.03).
Each run's refresh embeddings are deleted after it finishes (they are only needed to resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("mined+ib", "random+ib", "curriculum+ib", "mined", "random", "curriculum")
COLUMNS = (("heldout_ndcg@10", "held-out NDCG@10"), ("heldout_parent_hit", "held-out parent hit"),
           ("heldout_grandparent_hit", "held-out grandparent hit"), ("ndcg@10", "NDCG@10 all leaves"),
           ("cophenetic_pearson", "cophenetic"))
TARGET = 0.03


def arm_command(arm: str, seed: int, out: Path, taxonomy: Path | None, extra: list[str]) -> list[str]:
    mode, _, in_batch = arm.partition("+")
    cmd = [sys.executable, str(ROOT / "examples" / "train_naics.py"), "--output", str(out), "--negatives", mode,
           "--in-batch" if in_batch else "--no-in-batch", "--seed", str(seed), "--index", str(out / "index.faiss")]
    if taxonomy is not None:
        cmd += ["--taxonomy", str(taxonomy)]
    return cmd + extra


def summarise(results: dict[str, list[dict]]) -> dict[tuple[str, str], float]:
    header = "| arm | " + " | ".join(label for _, label in COLUMNS) + " | minutes per run |"
    print(header)
    print("|---" * (len(COLUMNS) + 2) + "|")
    means = {}
    for arm, runs in results.items():
        if not runs:
            continue
        cells = []
        for key, _ in COLUMNS:
            values = np.array([r["final"].get(key, np.nan) for r in runs], dtype=float)
            means[(arm, key)] = float(np.mean(values))
            spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{np.mean(values):.3f}{spread}")
        minutes = np.mean([r["wall_seconds"] for r in runs]) / 60
        print(f"| {arm} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return means


def verdict(means: dict[tuple[str, str], float]) -> None:
    key = "heldout_ndcg@10"
    if ("mined+ib", key) not in means:
        return
    rivals = [arm for arm in ("random+ib", "curriculum+ib") if (arm, key) in means]
    if not rivals:
        return
    best = max(rivals, key=lambda arm: means[(arm, key)])
    gain = means[("mined+ib", key)] - means[(best, key)]
    outcome = "meets" if gain >= TARGET else "misses"
    print(f"\nmined+ib - {best} (best non-mined with in-batch): held-out NDCG@10 {gain:+.3f} "
          f"({outcome} the >= +{TARGET:.2f} target)")
    for arm in ("random", "curriculum", "mined"):
        if (arm, key) in means and (f"{arm}+ib", key) in means:
            print(f"in-batch effect on {arm}: {means[(f'{arm}+ib', key)] - means[(arm, key)]:+.3f} held-out NDCG@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taxonomy", type=Path, default=None, help="taxonomy CSV (default NAICS 2022)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablation")
    parser.add_argument("--reuse", action="store_true", help="skip runs whose metrics.json exists")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="options passed to train_naics.py (after --)")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            out = args.out / f"{arm.replace('+', '_')}_seed{seed}"
            if not (args.reuse and (out / "metrics.json").exists()):
                cmd = arm_command(arm, seed, out, args.taxonomy, extra)
                print("running:", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
                if (out / "hnm_embeddings").is_dir():
                    shutil.rmtree(out / "hnm_embeddings")
            results[arm].append(json.loads((out / "metrics.json").read_text()))
    first = next(r for runs in results.values() for r in runs)
    print(f"\n{first['taxonomy']}: {first['codes']:,} codes, {first['heldout_codes']:,} held out; "
          f"seeds {args.seeds}; extra options {extra or 'none'}\n")
    verdict(summarise(results))


if __name__ == "__main__":
    main()
