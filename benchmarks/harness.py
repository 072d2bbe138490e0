"""Small shared harness for the benchmarks: timing, peak RSS, the machine line, ratio lines, recall."""

from __future__ import annotations

import os
import resource
import time
from typing import Any, Callable

import numpy as np


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Current resident set size of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def load_average() -> str:
    """The 1/5/15-minute load average, e.g. '4.9 5.0 2.9' ('?' where unavailable)."""
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_line() -> str:
    """One line: cores and load, so every table says how busy the machine was."""
    return f"machine: {os.cpu_count()} cores, load average {load_average()} (1/5/15 min)"


def ratio_line(what: str, value: float, target: float, *, higher: bool) -> str:
    """'what: 2.71 (target >= 2.5): PASS' - one pass/fail line against a target."""
    ok = value >= target if higher else value <= target
    return f"{what}: {value:.4g} (target {'>=' if higher else '<='} {target:g}): {'PASS' if ok else 'FAIL'}"


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / |exact| (ids < 0 ignored; rows with no exact id skipped)."""
    hits, total = 0, 0
    for a, e in zip(approx, exact):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e).size
        total += e.size
    return hits / total if total else 1.0
