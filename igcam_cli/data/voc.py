"""PASCAL VOC layout: JPEGImages/, SegmentationClass[Aug]/, Annotations/, ImageSets/Segmentation/."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from igcam_cli.data.base import Dataset, Sample
from igcam_cli.data.classes import VOC_CLASSES, clean_class_list, format_class_list
from igcam_cli.data.imageio import check_same_size, read_image, read_mask
from igcam_cli.data.splits import read_split_file
from igcam_cli.errors import BadData

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")  # in order of preference


def resolve_voc_root(root: str | Path) -> Path:
    """The folder holding JPEGImages/: `root` itself, `root/VOC2012` or `root/VOCdevkit/VOC2012`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadData(f"VOC dataset root not found: {root}")
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    looked = ", ".join(str(c / "JPEGImages") for c in candidates)
    raise BadData(f"no JPEGImages/ folder under VOC root {root} (looked for {looked})")


class VocDataset(Dataset):
    """A VOC2012-style dataset; `classes` defaults to the 20 VOC classes."""

    name = "voc"

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = resolve_voc_root(root)
        self.classes = VOC_CLASSES.copy() if classes is None else clean_class_list(list(classes), "classes")
        self._class_index = {name: i + 1 for i, name in enumerate(self.classes)}
        self._ids: dict[str, list[str]] = {}
        self._labels: dict[str, np.ndarray] = {}

    # splits and ids

    @property
    def split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def splits(self) -> list[str]:
        if not self.split_dir.is_dir():
            return []
        return sorted(p.stem for p in self.split_dir.glob("*.txt"))

    def ids(self, split: str) -> list[str]:
        if split not in self._ids:
            path = self.split_dir / f"{split}.txt"
            if not path.is_file():
                available = ", ".join(self.splits()) or "none"
                raise BadData(f"split file not found: {path} (available splits: {available})")
            self._ids[split] = [image_id for _, image_id in read_split_file(path)]
        return list(self._ids[split])

    # files of one image

    def image_path(self, image_id: str) -> Path:
        """JPEGImages/<id>.jpg (or .jpeg/.png); the .jpg path when none exists, for the error message."""
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "JPEGImages" / f"{image_id}{suffix}"
            if path.is_file():
                return path
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path | None:
        """SegmentationClass/<id>.png, else SegmentationClassAug/<id>.png, else None."""
        for folder in MASK_DIRS:
            path = self.root / folder / f"{image_id}.png"
            if path.is_file():
                return path
        return None

    def annotation_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    # labels

    def labels(self, image_id: str) -> np.ndarray:
        if image_id not in self._labels:
            self._labels[image_id] = self._read_labels(image_id)
        return self._labels[image_id].copy()

    def _read_labels(self, image_id: str) -> np.ndarray:
        xml_path = self.annotation_path(image_id)
        if xml_path.is_file():
            return self._labels_from_xml(xml_path)
        mask_path = self.mask_path(image_id)
        if mask_path is not None:
            mask = read_mask(mask_path, self.num_classes)
            values = np.unique(mask)
            return values[(values != 0) & (values != 255)].astype(np.int64)
        raise BadData(
            f"no labels for image '{image_id}': neither {xml_path} nor a mask in "
            f"{self.root / MASK_DIRS[0]} or {self.root / MASK_DIRS[1]} exists"
        )

    def _labels_from_xml(self, path: Path) -> np.ndarray:
        """Every object's <name>, difficult ones included (as IRN does)."""
        try:
            tree = ET.parse(path)
        except (ET.ParseError, OSError) as exc:
            raise BadData(f"cannot parse annotation {path}: {exc}") from None
        indices = set()
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in self._class_index:
                raise BadData(f"{path}: class '{name}' is not in the class list ({format_class_list(self.classes)})")
            indices.add(self._class_index[name])
        return np.array(sorted(indices), dtype=np.int64)

    # decoding

    def load(self, image_id: str, with_mask: bool = True) -> Sample:
        image = read_image(self.image_path(image_id))
        labels = self.labels(image_id)
        mask = None
        mask_path = self.mask_path(image_id) if with_mask else None
        if mask_path is not None:
            mask = read_mask(mask_path, self.num_classes)
            check_same_size(image, mask, mask_path)
        return Sample(id=image_id, image=image, labels=labels, mask=mask)

    # ground truth

    def has_masks(self, split: str) -> bool:
        return all(self.mask_path(i) is not None for i in self.ids(split))

    def gt_source_for(self, split: str) -> str:
        """The mask folder(s) the split's masks actually come from ("none" when it has none)."""
        paths = [self.mask_path(i) for i in self.ids(split)]
        used = {p.parent.name for p in paths if p is not None}
        return "+".join(folder for folder in MASK_DIRS if folder in used) or "none"

    @property
    def gt_source(self) -> str:
        """The mask folder(s) present in the dataset ("none" when there are none)."""
        return "+".join(folder for folder in MASK_DIRS if (self.root / folder).is_dir()) or "none"
