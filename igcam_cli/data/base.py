"""The one interface every dataset adapter implements.

Class indices follow the house convention: 0 = background, 1..C = the foreground
classes in `classes` order, 255 = ignore (in masks only).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from igcam_cli.errors import BadData


@dataclass
class Sample:
    id: str
    image: np.ndarray  # H x W x 3, uint8, RGB
    labels: np.ndarray  # sorted int64 foreground class indices present (values in 1..C)
    mask: np.ndarray | None  # H x W uint8 (0 bg, k class k, 255 ignore), or None without GT


@dataclass
class Unreadable:
    """What a `--skip-bad` run has in place of an image it could not read (picklable: it comes from
    data-loader workers); `reason` is the BadData line."""

    id: str
    reason: str


def load_or_skip(dataset: Dataset, image_id: str, skip_bad: bool, with_mask: bool = False) -> Sample | Unreadable:
    """The image, or with `skip_bad` an Unreadable in place of the BadData its file raises."""
    try:
        return dataset.load(image_id, with_mask=with_mask)
    except BadData as exc:
        if not skip_bad:
            raise
        return Unreadable(image_id, str(exc))


class Dataset(ABC):
    """A labelled image collection with named splits.

    `classes` lists the C foreground class names (background is implicit, index 0).
    Methods raise `igcam_cli.errors.BadData` naming the offending file.
    """

    name: str  # "voc", "folder", "synthetic"
    classes: list[str]

    @abstractmethod
    def splits(self) -> list[str]:
        """Names of the splits this dataset offers."""

    @abstractmethod
    def ids(self, split: str) -> list[str]:
        """Image ids of a split, in a stable order. Unknown split -> BadData naming the split file."""

    @abstractmethod
    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels (sorted int64 indices in 1..C), without decoding the image."""

    @abstractmethod
    def load(self, image_id: str, with_mask: bool = True) -> Sample:
        """Decode the image (and its GT mask when available and asked for)."""

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) of an image; adapters that know it without decoding say so."""
        return self.load(image_id, with_mask=False).image.shape[:2]

    @abstractmethod
    def has_masks(self, split: str) -> bool:
        """Whether every image of the split has a GT mask."""

    @property
    @abstractmethod
    def gt_source(self) -> str:
        """Where GT masks come from, for honest reports (e.g. 'SegmentationClass', 'masks/', 'synthetic')."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def known_mislabelled(self) -> set[str] | None:
        """Ids whose image labels are known to be wrong (a synthetic dataset made with label noise), else None."""
        return None
