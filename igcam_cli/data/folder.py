"""Plain folder layout: images/, labels.csv (id,labels), optional masks/, classes.txt, splits/."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from igcam_cli.data.base import Dataset, Sample
from igcam_cli.data.classes import clean_class_list, format_class_list, read_class_file
from igcam_cli.data.imageio import check_same_size, read_image, read_mask
from igcam_cli.data.splits import read_split_file
from igcam_cli.errors import BadData

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_SPLIT = "train"


@dataclass
class LabelRow:
    line: int  # line number in labels.csv, for messages
    names: list[str]


def read_labels_csv(path: Path) -> dict[str, LabelRow]:
    """Rows of labels.csv by id, in file order. The header must be `id,labels`."""
    if not path.is_file():
        raise BadData(f"labels file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return _parse_labels_rows(f, path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadData(f"cannot read {path}: {exc}") from None


def _parse_labels_rows(f: TextIO, path: Path) -> dict[str, LabelRow]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise BadData(f"{path} is empty; expected a header line 'id,labels'")
    if [h.strip().lower() for h in header] != ["id", "labels"]:
        raise BadData(f"{path}, line {reader.line_num}: expected the header 'id,labels', found '{','.join(header)}'")
    rows: dict[str, LabelRow] = {}
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) > 2:
            raise BadData(
                f"{path}, line {line}: expected 'id,labels' (labels separated by spaces), found {len(fields)} fields"
            )
        image_id = fields[0].strip()
        if not image_id:
            raise BadData(f"{path}, line {line}: empty image id")
        if image_id in rows:
            raise BadData(f"{path}, line {line}: image id '{image_id}' repeats line {rows[image_id].line}")
        names = fields[1].split() if len(fields) == 2 else []
        rows[image_id] = LabelRow(line, names)
    return rows


def index_files(folder: Path, suffixes: frozenset[str]) -> dict[str, Path]:
    """Files of `folder` by stem, for the given (lower-case) suffixes. Two files with one stem -> BadData."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in found:
            raise BadData(f"two files for image '{path.stem}': {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


class FolderDataset(Dataset):
    """Images with image-level labels in labels.csv; see the module docstring for the layout."""

    name = "folder"

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BadData(f"dataset root not found: {self.root}")
        if not (self.root / "images").is_dir():
            raise BadData(f"no images/ folder in dataset root {self.root}")
        self.labels_path = self.root / "labels.csv"
        self._rows = read_labels_csv(self.labels_path)
        self.classes = self._class_list(classes)
        self._labels = self._label_indices()
        self._images = index_files(self.root / "images", IMAGE_SUFFIXES)
        self._masks = index_files(self.root / "masks", frozenset({".png"}))
        self._ids: dict[str, list[str]] = {}

    def _class_list(self, classes: list[str] | None) -> list[str]:
        """Given classes, else classes.txt, else the sorted names used in labels.csv."""
        if classes is not None:
            return clean_class_list(list(classes), "classes")
        classes_path = self.root / "classes.txt"
        if classes_path.is_file():
            return read_class_file(classes_path)
        used = sorted({name for row in self._rows.values() for name in row.names})
        if not used:
            raise BadData(f"{self.labels_path} names no classes and there is no {classes_path}")
        return used

    def _label_indices(self) -> dict[str, np.ndarray]:
        index = {name: i + 1 for i, name in enumerate(self.classes)}
        labels = {}
        for image_id, row in self._rows.items():
            for name in row.names:
                if name not in index:
                    raise BadData(
                        f"{self.labels_path}, line {row.line}: class '{name}' is not in the class list "
                        f"({format_class_list(self.classes)})"
                    )
            labels[image_id] = np.array(sorted({index[n] for n in row.names}), dtype=np.int64)
        return labels

    # splits and ids

    @property
    def split_dir(self) -> Path:
        return self.root / "splits"

    def _split_files(self) -> dict[str, Path]:
        if not self.split_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.split_dir.glob("*.txt"))}

    def splits(self) -> list[str]:
        return sorted(self._split_files()) or [DEFAULT_SPLIT]

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            self._ids[split] = self._read_split(split)
        return list(self._ids[split])

    def _read_split(self, split: str) -> list[str]:
        files = self._split_files()
        if not files and split == DEFAULT_SPLIT:
            return list(self._rows)
        path = self.split_dir / f"{split}.txt"
        if split not in files:
            raise BadData(f"split file not found: {path} (available splits: {', '.join(self.splits())})")
        ids = []
        for number, image_id in read_split_file(path):
            if image_id not in self._rows:
                raise BadData(f"{path}, line {number}: image '{image_id}' has no row in {self.labels_path}")
            ids.append(image_id)
        return ids

    # one image

    def labels(self, image_id: str) -> np.ndarray:
        if image_id not in self._labels:
            raise BadData(f"image '{image_id}' has no row in {self.labels_path}")
        return self._labels[image_id].copy()

    def image_path(self, image_id: str) -> Path:
        if image_id not in self._images:
            expected = self.root / "images" / f"{image_id}.jpg"
            line = self._rows[image_id].line if image_id in self._rows else "?"
            raise BadData(
                f"image not found: {expected} (or .jpeg/.png/.bmp/.webp), listed in {self.labels_path} line {line}"
            )
        return self._images[image_id]

    def mask_path(self, image_id: str) -> Path | None:
        return self._masks.get(image_id)

    def load(self, image_id: str, with_mask: bool = True) -> Sample:
        labels = self.labels(image_id)
        image = read_image(self.image_path(image_id))
        mask = None
        mask_path = self.mask_path(image_id) if with_mask else None
        if mask_path is not None:
            mask = read_mask(mask_path, self.num_classes)
            check_same_size(image, mask, mask_path)
        return Sample(id=image_id, image=image, labels=labels, mask=mask)

    # ground truth

    def has_masks(self, split: str) -> bool:
        return all(i in self._masks for i in self.ids(split))

    @property
    def gt_source(self) -> str:
        return "masks/"
