"""Each query's k nearest corpus codes under the tie rule, fast: a float32 shortlist, rescored in float64.

Exactly the float64 row-by-row ranking: each row's ``k + SHORTLIST_SLACK`` largest float32 values are rescored in
float64; a row whose k-th exact value some code outside the shortlist could reach (within ``float32_error(d)``) is
ranked again from every code within that bound.
"""

from __future__ import annotations

import numpy as np
import torch

from naics_hnm.evaluation.rows import BLOCK, comparable
from naics_hnm.index.ids import select_topk_np

SHORTLIST_SLACK = 16  # shortlist columns beyond k: near-ties around the k-th code stay inside it
MIN_ROWS = 64  # queries per float32 chunk at least: each chunk reads the whole corpus
ROUNDING = 10.0 ** -9  # how far comparable()'s rounding may move two values together (two half steps of 1e-9)


def float32_error(dim: int) -> float:
    """A bound on |float32 - float64| for the dot product of two unit rows of width ``dim`` (any summation order)."""
    u = 2.0**-24
    return 2.0 * (dim + 2) * u / (1.0 - (dim + 2) * u)


def _by_tie_rule(values: np.ndarray, columns: np.ndarray, k: int) -> np.ndarray:
    """Per row, ``columns`` of the k best ``values``: the library's one top-k, ties to the lower column."""
    return select_topk_np(values, columns, np.ones(values.shape, dtype=bool), k, "cosine", ties="id")[1]


def _widened(unit: np.ndarray, query: int, corpus: np.ndarray, own: int, fast_row: np.ndarray, floor: float,
             k: int) -> np.ndarray:
    """One doubtful row: every column whose float32 value reaches ``floor``, rescored in float64, best k."""
    columns = np.flatnonzero(fast_row >= floor)
    exact = comparable(unit[corpus[columns]] @ unit[query])
    exact[columns == own] = -np.inf
    return _by_tie_rule(exact[None, :], columns[None, :], k)[0]


def nearest_columns(unit: np.ndarray, queries: np.ndarray, corpus: np.ndarray, k: int,
                    position: np.ndarray | None = None) -> np.ndarray:
    """int64 [Q, k]: positions in ``corpus`` (code ids) of each query's k most similar codes (``k <= corpus.size``).

    ``unit``: float64 unit rows of every code; ``position``: each code's position in ``corpus`` or -1 (a query never
    ranks itself).
    """
    if position is None:
        position = np.full(unit.shape[0], -1, dtype=np.int64)
        position[corpus] = np.arange(corpus.size)
    corpus32 = np.empty((corpus.size, unit.shape[1]), dtype=np.float32)
    step = BLOCK // unit.shape[1]
    for start in range(0, corpus.size, step):  # no float64 copy of the corpus
        corpus32[start : start + step] = unit[corpus[start : start + step]]
    width = min(corpus.size, k + SHORTLIST_SLACK)
    bound = float32_error(unit.shape[1]) + ROUNDING
    rows = min(queries.size, max(MIN_ROWS, 4 * BLOCK // corpus.size))  # 64 MiB of float32, or MIN_ROWS rows
    block = np.empty((rows, corpus.size), dtype=np.float32)  # reused: no fresh pages per chunk
    out = np.empty((queries.size, k), dtype=np.int64)
    for start in range(0, queries.size, rows):
        chunk = queries[start : start + rows]
        own = position[chunk]
        inside = np.flatnonzero(own >= 0)
        fast = np.matmul(unit[chunk].astype(np.float32), corpus32.T, out=block[: chunk.size])
        fast[inside, own[inside]] = -np.inf
        low, shortlist = torch.topk(torch.from_numpy(fast), width, dim=1)
        shortlist = shortlist.numpy()
        exact = comparable(np.einsum("qd,qcd->qc", unit[chunk], unit[corpus[shortlist]]))
        exact[shortlist == own[:, None]] = -np.inf
        best = _by_tie_rule(exact, shortlist, k)
        kth = np.sort(exact, axis=1)[:, width - k]  # each row's k-th largest exact value
        doubtful = (low[:, -1].numpy().astype(np.float64) + bound >= kth) & (width < corpus.size)
        for row in np.flatnonzero(doubtful):  # every code within the bound of the k-th: a superset of the top k
            best[row] = _widened(unit, chunk[row], corpus, own[row], fast[row], kth[row] - bound, k)
        out[start : start + chunk.size] = best
    return out
