"""Threads standing in for the ranks of a process group: an all_gather on a barrier, as DDP does it."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from naics_hnm.index.sharded_search import Shard


def run_ranks(world: int, work: Callable[[Shard], Any], timeout: float = 300.0) -> list[Any]:
    """``work(shard)`` on ``world`` threads, one :class:`Shard` each; their results in rank order.

    A rank that raises breaks the barrier, so the others stop too, and the first error is raised here.
    """
    slots: list = [None] * world
    barrier = threading.Barrier(world, timeout=timeout)
    results: list = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        def all_gather(array: np.ndarray) -> np.ndarray:
            barrier.wait()
            slots[rank] = np.array(array, copy=True)
            barrier.wait()
            out = np.stack(slots)
            barrier.wait()
            return out

        try:
            results[rank] = work(Shard(rank, world, all_gather))
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    return results
