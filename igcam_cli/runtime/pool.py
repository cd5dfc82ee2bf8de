"""CPU process pools for per-image work (CRF) that must not run in the main process."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cluster job's allocation, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(workers: int | None) -> int:
    """A stage's `workers` setting as a count: None means every available CPU."""
    return available_cpus() if workers is None else workers


class process_pool:
    """A spawn-context process pool (no fork after torch started threads), or None for <= 1 worker."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self.pool

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def map_ordered(pool, fn: Callable, jobs: Iterable[tuple[Any, tuple]], ahead: int) -> Iterator[tuple[Any, Any]]:
    """(key, fn(*args)) for each (key, args) of `jobs`, in order.

    The job iterator is advanced in the calling thread (it may run a GPU model), and at most
    `ahead` jobs wait in the pool at a time, so memory stays bounded. Without a pool, inline.
    """
    if pool is None:
        for key, args in jobs:
            yield key, fn(*args)
        return
    pending: deque = deque()
    for key, args in jobs:
        pending.append((key, pool.apply_async(fn, args)))
        while len(pending) > ahead:
            done_key, result = pending.popleft()
            yield done_key, result.get()
    while pending:
        done_key, result = pending.popleft()
        yield done_key, result.get()
