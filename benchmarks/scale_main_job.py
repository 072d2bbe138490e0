"""bench_scale's ``main_job`` stage: the main job (``examples/train_naics.py``) on the size's tree, end to end.

Runs with ``bench_scale.py --main-job``. The command is what a user runs on their own tree,
``python examples/train_naics.py --taxonomy tree.csv --output out`` at its defaults (the
large-tree defaults above 20,000 codes: every encoder layer frozen, an MLP head, 8 epochs of
100,000 pairs), in a subprocess with a fresh ``--cache-dir``, so the one-off frozen-encoder pass
over every code is in the time. Reported: wall minutes, the pass's share (from the job's log), the
child's peak RSS, the epochs run and the final metrics the job wrote (``metrics.json``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRAIN_NAICS = Path(__file__).resolve().parent.parent / "examples" / "train_naics.py"
FINAL_KEYS = ("ndcg@10", "cophenetic_pearson", "heldout_ndcg@10", "reconstruction_map")


def main_job_command(csv_path: Path, out: Path, seed: int) -> list[str]:
    """The main job at its defaults on ``csv_path``, its caches under ``out`` (so nothing is reused)."""
    return [sys.executable, str(TRAIN_NAICS), "--taxonomy", str(csv_path), "--output", str(out / "run"),
            "--index", str(out / "run" / "index.faiss"), "--cache-dir", str(out / "cache"), "--seed", str(seed)]


def _last_line(text: str) -> str:
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def frozen_pass_seconds(log_text: str) -> float | None:
    """Seconds of the one-off frozen-encoder pass, from its progress bar's last ``[mm:ss<`` reading."""
    times = re.findall(r"frozen encoder over [\d,]+ codes: +\d+%.*?\[(\d+):(\d+)(?::(\d+))?<", log_text)
    if not times:
        return None
    a, b, c = times[-1]
    return int(a) * 3600 + int(b) * 60 + int(c) if c else int(a) * 60 + int(b)


def main_job_stage(csv_path: Path, out: Path, seed: int, st: dict[str, Any]) -> None:
    """Run the main job on ``csv_path`` and fill ``st``; raises with the job's last line if it fails."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TQDM_DISABLE", None)  # the pass's progress bar gives its time
    t0 = time.perf_counter()
    proc = subprocess.run(main_job_command(csv_path, out, seed), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    (out / "main_job.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"train_naics.py exited {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}")
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    st["minutes"] = seconds / 60
    st["frozen_pass_s"] = frozen_pass_seconds(proc.stderr + proc.stdout)
    st["child_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    st["epochs"] = metrics["epochs"]
    st["final"] = {k: metrics["final"].get(k) for k in FINAL_KEYS}
