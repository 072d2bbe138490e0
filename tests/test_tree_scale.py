"""No N x N allocation: a 200,000-code taxonomy through the whole Phase 1 path within a small memory cap.

Each check runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. An N x N
array at N = 200,000 would take 40 GB as bool (320 GB as int64); the O(N x depth) machinery needs
a few hundred MB. ``RLIMIT_AS`` is only used where torch is not imported (torch reserves large
virtual ranges), to make a quadratic blow-up fail fast instead of swapping the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Random recursive forest: code i >= 20 hangs below a uniform earlier code (height ~ e ln N ~ 33),
# ids permuted, 4-letter codes unrelated to the parent's, so only the parent column gives the tree.
_GENERATOR = """
import numpy as np

def random_forest(n, tops, seed):
    rng = np.random.default_rng(seed)
    parent = np.floor(rng.random(n) * np.arange(n)).astype(np.int64)
    parent[:tops] = -1
    perm = rng.permutation(n)  # node k gets code number perm[k]
    digits = (perm[:, None] // 26 ** np.arange(3, -1, -1)[None, :]) % 26
    codes = (digits + 65).astype(np.uint8).view("S4").ravel().astype(str)
    parents = np.where(parent >= 0, codes[np.maximum(parent, 0)], "")
    return codes.tolist(), parents.tolist()
"""

_PHASE1_SCRIPT = _GENERATOR + """
import json, resource, time

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import torch
from naics_hnm.data.counter_rng import item_keys
from naics_hnm.data.curriculum import NegativeTable
from naics_hnm.data.pairs import tree_pairs
from naics_hnm.tree.taxonomy import Taxonomy
from naics_hnm.tree.guard import TreeGuard

base = peak_mb()
t0 = time.time()
n = 200_000
codes, parents = random_forest(n, 20, 0)
tx = Taxonomy(codes, parents, ["t"] * n, name="scale")
del codes, parents
after_taxonomy = peak_mb()
rng = np.random.default_rng(1)
allowed = rng.random(n) > 0.05
table = NegativeTable(tx, allowed)
pool = np.flatnonzero(allowed & (tx.parent >= 0))
drawn_ok = 0
for epoch in range(4):
    anchors = rng.choice(pool, 256)
    keys = item_keys(0, epoch, np.arange(256))
    positives = table.level_positives(keys, anchors, allowed, 2.0)
    max_lca = tx.lca_depth(anchors, np.maximum(positives, 0)) - 1 if epoch % 2 else None
    neg = table.draw(keys, anchors, table.position(anchors, positives), (0.3, 0.3, 0.4), 8, 24, max_lca)
    assert neg.shape == (256, 24) and (neg >= 0).all()
    assert not tx.related(anchors[:, None], neg).any() and allowed[neg].all()
    assert all(len(set(row)) == 24 for row in neg.tolist())
    drawn_ok += neg.size
levels = tree_pairs(tx, ("levels",), allowed)
siblings = tree_pairs(tx, ("parent", "sibling"), allowed, max_siblings=4)
a = rng.integers(0, n, 256)
c = rng.integers(0, n, (256, 112))
lca, rel = tx.lca_depth(a[:, None], c), tx.related(a[:, None], c)
guard = TreeGuard(tx, allowed)
assert (guard.lca_depth(torch.from_numpy(a)[:, None], torch.from_numpy(c)).numpy() == lca).all()
assert (guard.related(torch.from_numpy(a)[:, None], torch.from_numpy(c)).numpy() == rel).all()
print(json.dumps(dict(base_mb=base, after_taxonomy_mb=after_taxonomy, peak_mb=peak_mb(),
                      seconds=time.time() - t0, max_depth=tx.max_depth, drawn=drawn_ok,
                      levels=len(levels), parent_sibling=len(siblings), lca_shape=list(lca.shape))))
"""

_WIDE_SIBLINGS_SCRIPT = """
import json, resource, sys, time
import numpy as np

from naics_hnm.data.pairs import tree_pairs
from naics_hnm.tree.taxonomy import Taxonomy
assert "torch" not in sys.modules

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def vm_bytes():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:"))

tops, width = 20, 9_999  # 200,000 codes: 20 tops with 9,999 children each (a two-level taxonomy)
codes = [f"T{t:02d}" for t in range(tops)] + [f"T{t:02d}.{k:04d}" for t in range(tops) for k in range(width)]
parents = [""] * tops + [f"T{t:02d}" for t in range(tops) for _ in range(width)]
tx = Taxonomy(codes, parents, ["t"] * len(codes), name="wide")
base = peak_mb()
cap = 1 << 30  # 1 GiB of address space on top of what is mapped now: a quadratic blow-up fails fast
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + cap, resource.RLIM_INFINITY))
t0 = time.time()
try:
    pairs = tree_pairs(tx, ("sibling",), max_siblings=4)
except MemoryError:
    print(json.dumps(dict(error="MemoryError", base_mb=base, peak_mb=peak_mb(), seconds=time.time() - t0)))
    sys.exit(0)
per_anchor = np.bincount(pairs[:, 0], minlength=len(tx))
print(json.dumps(dict(pairs=len(pairs), min_per_child=int(per_anchor[tx.parent >= 0].min()),
                      max_per_anchor=int(per_anchor.max()), base_mb=base, peak_mb=peak_mb(),
                      seconds=time.time() - t0)))
"""


def _run(script: str, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Measured on the 2-core dev box (torch CPU build): imports 266 MB; then the taxonomy (+104 MB), the
# table, four 256-item draws, tree_pairs (levels; parent + sibling with max_siblings=4) and the
# [256, 112] blocks (numpy and torch) peak at 429 MB, i.e. +162 MB over the imports, in 1.6 s
# (max depth 25). The cap is ~2x that growth; an N x N bool array alone would be 40 GB.
PHASE1_GROWTH_CAP_MB = 330


def test_phase1_path_at_200k_codes_has_no_quadratic_memory():
    out = _run(_PHASE1_SCRIPT, timeout=120)
    growth = out["peak_mb"] - out["base_mb"]
    assert growth < PHASE1_GROWTH_CAP_MB, out
    assert out["max_depth"] < 64 and out["drawn"] == 4 * 256 * 24 and out["lca_shape"] == [256, 112]
    assert out["levels"] > 180_000 and out["parent_sibling"] > out["levels"]
    assert out["seconds"] < 30, out


# A correct sibling sampler needs O(N x max_siblings) memory here: 200k x 4 pairs (~13 MB) plus
# per-group work arrays. Building every (anchor, sibling) pair of a 9,999-wide group first takes
# ~10^8 pairs (~0.8 GB per int64 array) per group: that is the N x N pattern this test rules out.
# (At the time of writing it does: MemoryError under the 1 GiB RLIMIT_AS; unbounded it is O(g^2) in
# memory and time per group g, e.g. 1.15 GB and 14 s for a single 4,000-wide group.)
WIDE_SIBLINGS_GROWTH_CAP_MB = 400


def test_sibling_pairs_of_a_wide_group_stay_bounded():
    out = _run(_WIDE_SIBLINGS_SCRIPT, timeout=120)
    assert "error" not in out, f"max_siblings=4 on 9,999-wide sibling groups ran out of a 1 GiB budget: {out}"
    assert out["pairs"] == 20 * 9_999 * 4 and out["min_per_child"] == 4 and out["max_per_anchor"] == 4, out
    assert out["peak_mb"] - out["base_mb"] < WIDE_SIBLINGS_GROWTH_CAP_MB, out
    assert out["seconds"] < 30, out


if __name__ == "__main__":  # print the measurements behind the caps
    print(_run(_PHASE1_SCRIPT, timeout=300))
    print(_run(_WIDE_SIBLINGS_SCRIPT, timeout=300))
    sys.exit(pytest.main([__file__, "-q"]))
