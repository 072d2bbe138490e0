"""What the tree terms add to a training step: ``tree_rings`` and ``tree_listwise`` forward + backward.

    python benchmarks/bench_tree_terms.py                  # batches of 64 and 256, one thread
    python benchmarks/bench_tree_terms.py --batch-sizes 256 --threads 2 --reps 50

The encoder's ``_loss`` computes one [B, U] similarity block (B anchors, U distinct batch codes: anchors,
positives and 8 negatives each, so U <= 10 B) and hands it to the in-batch negatives and both tree terms. Each
row times, on random unit vectors (d = 384) and a random LCA-depth table over 7 levels: the similarity product
alone (forward + backward), then the product with each tree term on it; the terms' own cost is the difference,
reported as a ratio to the product's. Reference: a straightforward ``tree_rings`` (one masked log-sum-exp per
level, as a loop) - checked equal to the library's (loss and gradient, rel. 1e-5) and timed for the speed-up.
Target: the ring term's own cost <= the product's (ratio <= 1). Nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import median_seconds  # noqa: E402
from harness import machine_line, ratio_line  # noqa: E402

from naics_hnm.train.losses import tree_listwise, tree_rings  # noqa: E402

LEVELS, DIM, TARGET = 7, 384, 1.0


def rings_by_loop(similarity: torch.Tensor, lca: torch.Tensor, same: torch.Tensor, temperature: float) -> torch.Tensor:
    """The ring term written plainly: for each level a masked log-sum-exp over the codes at or beyond it."""
    logits = (similarity / temperature).masked_fill(same, float("-inf"))
    lca = lca.masked_fill(same, -1)
    terms = []
    for t in range(1, int(lca.max()) + 1):
        ring, inside = lca == t, (lca >= 0) & (lca <= t)
        valid = ring.any(1) & (inside & ~ring).any(1)
        rows, ring = logits[valid], ring[valid]
        log_norm = torch.logsumexp(rows.masked_fill(~inside[valid], float("-inf")), dim=1)
        terms.append(log_norm - rows.masked_fill(~ring, 0.0).sum(1) / ring.sum(1))
    return torch.cat(terms).mean()


def inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = 10 * batch
    anchor = F.normalize(torch.randn(batch, DIM, generator=g), dim=1).requires_grad_(True)
    emb = F.normalize(torch.randn(codes, DIM, generator=g), dim=1).requires_grad_(True)
    lca = torch.randint(0, LEVELS, (batch, codes), generator=g)
    same = torch.zeros(batch, codes, dtype=torch.bool)
    same[torch.arange(batch), torch.arange(batch)] = True  # each anchor is one of the batch codes
    lca[same] = LEVELS
    return anchor, emb, lca, same


def check(batch: int) -> float:
    """Largest relative difference of loss and gradient, library vs loop."""
    anchor, emb, lca, same = inputs(batch, seed=1)
    grads = []
    for fn in (tree_rings, rings_by_loop):
        anchor.grad = None
        loss = fn(anchor @ emb.T, lca, same, 0.1)
        loss.backward()
        grads.append((loss.detach(), anchor.grad.clone()))
    (a, ga), (b, gb) = grads
    return max(float((a - b).abs() / b.abs()), float((ga - gb).norm() / gb.norm()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line() + f", torch threads {args.threads}")
    print(f"{'B':>5} {'U':>6} {'product ms':>11} {'+listwise':>10} {'+rings':>8} {'+rings (loop)':>14} "
          f"{'rings/product':>14} {'loop/rings':>11} {'max rel diff':>13}")
    ratios = []
    for batch in args.batch_sizes:
        anchor, emb, lca, same = inputs(batch)

        def run(term=None):
            def step():
                similarity = anchor @ emb.T
                loss = similarity.sum() if term is None else term(similarity)
                loss.backward()
            return 1000 * median_seconds(step, args.reps)

        product = run()
        listwise = run(lambda s: tree_listwise(s, lca, same, 0.05, 3.0))
        rings = run(lambda s: tree_rings(s, lca, same, 0.1))
        loop = run(lambda s: rings_by_loop(s, lca, same, 0.1))
        diff = check(batch)
        own = (rings - product) / product
        ratios.append(own)
        print(f"{batch:>5} {10 * batch:>6} {product:>11.1f} {listwise:>10.1f} {rings:>8.1f} {loop:>14.1f} "
              f"{own:>14.2f} {(loop - product) / max(rings - product, 1e-9):>11.1f} {diff:>13.1e}")
        if diff > 1e-5:
            print(f"CHECK FAILED: tree_rings differs from the loop by {diff:.1e} at B={batch}")
            return 1
    print(ratio_line("ring term's own cost / the similarity product's (largest batch)", ratios[-1], TARGET,
                     higher=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
