"""Grouping a stream of per-image items into batches the device can take in one pass."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from igcam_cli.runtime.pool import available_cpus

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


def image_loader(images: TorchDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """Items one at a time from `workers` processes (at most one per core), two batches ahead;
    `same_size_batches` groups them. Pinned memory when feeding a GPU."""
    workers = min(workers, available_cpus())
    return DataLoader(
        images,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 * batch_size if workers else None,
    )
