"""Grouping a stream of per-image items into batches the device can take in one pass."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def same_size_batches(items: Iterable[T], batch_size: int, size: Callable[[T], Hashable]) -> Iterator[list[T]]:
    """Consecutive items of one size, up to `batch_size` each (VOC mixes portrait and landscape).

    A full batch is yielded at once, not when the next item arrives: an unreadable next image
    must not cost the batch before it.
    """
    batch: list[T] = []
    for item in items:
        if batch and size(item) != size(batch[0]):
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
