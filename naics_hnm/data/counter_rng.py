"""Counter-based random numbers: each value a pure function (SplitMix64) of (seed, epoch, index, stream, column)."""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def item_keys(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """uint64 key per item from (seed, epoch, index)."""
    index = np.asarray(index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        k = _mix(np.uint64(seed) * _GOLDEN + np.uint64(0x632BE59BD9B4E019))
        k = _mix(k + np.uint64(epoch & 0xFFFFFFFFFFFFFFFF) * _GOLDEN)
        return _mix(k + index * _GOLDEN)


def uniforms(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
    """float64 [B, n] in [0, 1): column j of stream s for each key."""
    cols = np.arange(n, dtype=np.uint64) + np.uint64(stream) * np.uint64(1 << 32)
    with np.errstate(over="ignore"):
        x = _mix(keys[:, None] + (cols[None, :] + np.uint64(1)) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def later_duplicates(pos: np.ndarray, excluded_pos: np.ndarray) -> np.ndarray:
    """True where a position repeats an earlier column of its row or equals the excluded one."""
    n = pos.shape[1]
    full = np.concatenate([excluded_pos[:, None], pos], axis=1)
    full = np.where(full < 0, -np.arange(1, n + 2)[None, :] - 10, full)
    order = np.argsort(full, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(full, order, axis=1)
    dup_sorted = np.zeros_like(full, dtype=bool)
    dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup[:, 1:]
