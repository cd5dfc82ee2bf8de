"""COCO 2014 layout: annotations/instances_{train,val}2014.json, images in train2014/ and val2014/.

Choices (the README's "COCO 2014" section says the same for users):

* classes: the JSON's categories sorted by id (real COCO: 80 with gaps in the ids, 1..90) become
  classes 1..80 in that order, named by the JSON's names;
* image-level labels: the categories of ALL of an image's annotations, crowd ones included, as the
  scripts that write the `cls_labels_coco.npy` of IRN-based COCO ports (ReCAM, AMN, ...) do
  (`coco.getAnnIds(img_id)`, whose default `iscrowd=None` keeps crowds); a crowd region is painted
  in the mask too, so labels and masks name the same classes;
* masks: every annotation (polygons, compressed or uncompressed RLE) painted with its class, crowd
  regions like any other and nothing marked 255 (there is no ignore region in the COCO annotations);
  where annotations overlap the smaller one wins (larger areas are painted first, ties in file
  order), as coco2voc does, so that a cup on a table stays visible;
* images without any annotation are left out of `ids()` (the classifier learns nothing from an empty
  label set); `labels()` and `load()` still answer for them (no labels, an all-background mask).

The JSON (instances_train2014.json is 450 MB) is parsed with plain `json`, not `pycocotools.coco.COCO`:
COCO() prints to stdout and keeps the whole parsed file alive, while only a compact per-image index
is needed here (`pycocotools.mask` does the rasterising). Each JSON is parsed at most once per process
(a module-level cache, so that `init` and the workspace it opens share it), lazily, and a pickled
dataset (a DataLoader worker's copy) carries the index built so far, so workers never parse it again.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_api

from igcam_cli.data.base import Dataset, Sample
from igcam_cli.data.classes import clean_class_list, format_class_list
from igcam_cli.data.imageio import read_image
from igcam_cli.errors import BadData

SPLITS = ("train", "val")
REQUIRED_LISTS = ("images", "annotations", "categories")


def instances_name(split: str) -> str:
    return f"instances_{split}2014.json"


class CocoObject(NamedTuple):
    """One annotation, compactly: polygon parts as float64 bytes, or an RLE as compressed counts."""

    annotation_id: Any  # as the JSON gives it, for messages
    category_id: int
    iscrowd: bool
    polygons: tuple[bytes, ...]  # each a flat x1, y1, x2, y2, ... array's bytes (empty for an RLE)
    rle_counts: bytes | None  # compressed RLE counts of an image-sized mask (None for polygons)


class CocoImage(NamedTuple):
    file_name: str
    height: int
    width: int
    objects: tuple[CocoObject, ...]


@dataclass
class CocoIndex:
    """What the dataset keeps of one instances JSON."""

    path: Path
    categories: list[tuple[int, str]]  # (category id, name), sorted by id
    images: dict[str, CocoImage]  # by file stem, in image-id order


# ---- reading an instances JSON ------------------------------------------------------------------

_PARSED: dict[Path, tuple[tuple[int, int], CocoIndex]] = {}  # path -> ((mtime_ns, size), index)


def cached_instances(path: Path) -> CocoIndex:
    """`read_instances(path)`, once per process while the file is unchanged."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise BadData(f"COCO annotations not found: {path} ({exc.strerror})") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _PARSED.get(path)
    if cached is None or cached[0] != stamp:
        _PARSED[path] = (stamp, read_instances(path))
    return _PARSED[path][1]


def read_instances(path: Path) -> CocoIndex:
    data = _load_json(path)
    categories = _read_categories(data["categories"], path)
    images = _read_images(data["images"], path)
    objects = _read_annotations(data["annotations"], path, images, {cid for cid, _ in categories})
    ordered = sorted(images.items(), key=lambda item: item[0])
    return CocoIndex(
        path=path,
        categories=categories,
        images={
            stem: CocoImage(file_name, height, width, tuple(objects.get(image_id, ())))
            for image_id, (stem, file_name, height, width) in ordered
        },
    )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except OSError as exc:
        raise BadData(f"cannot read COCO annotations {path}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadData(f"{path} is not valid JSON (truncated?): {exc}") from None
    if not isinstance(data, dict):
        raise BadData(f"{path} is not a COCO instances file: expected a JSON object, found {type(data).__name__}")
    for key in REQUIRED_LISTS:
        if not isinstance(data.get(key), list):
            raise BadData(f"{path} is not a COCO instances file: it has no '{key}' list")
    return data


def _malformed(path: Path, kind: str, position: int, exc: Exception) -> BadData:
    reason = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
    return BadData(f"{path}: {kind} entry {position} is malformed ({reason})")


def _read_categories(entries: list[Any], path: Path) -> list[tuple[int, str]]:
    categories: dict[int, str] = {}
    for position, entry in enumerate(entries):
        try:
            category_id, name = int(entry["id"]), str(entry["name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed(path, "'categories'", position, exc) from None
        if category_id in categories:
            raise BadData(f"{path}: category id {category_id} is listed twice")
        categories[category_id] = name
    return sorted(categories.items())


def _read_images(entries: list[Any], path: Path) -> dict[int, tuple[str, str, int, int]]:
    """image id -> (file stem, file name, height, width); stems must be unique (they are the ids)."""
    images: dict[int, tuple[str, str, int, int]] = {}
    stems: dict[str, int] = {}
    for position, entry in enumerate(entries):
        try:
            image_id, file_name = int(entry["id"]), str(entry["file_name"])
            height, width = int(entry["height"]), int(entry["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed(path, "'images'", position, exc) from None
        stem = Path(file_name).stem
        if image_id in images or stem in stems:
            raise BadData(f"{path}: image id {image_id} ('{file_name}') is listed twice")
        images[image_id] = (stem, file_name, height, width)
        stems[stem] = image_id
    return images


def _read_annotations(
    entries: list[Any], path: Path, images: dict[int, tuple[str, str, int, int]], category_ids: set[int]
) -> dict[int, list[CocoObject]]:
    """image id -> its annotations, in file order."""
    objects: dict[int, list[CocoObject]] = {}
    for position, entry in enumerate(entries):
        try:
            annotation_id = entry.get("id", f"#{position}")
            image_id, category_id = int(entry["image_id"]), int(entry["category_id"])
            segmentation, iscrowd = entry["segmentation"], bool(entry.get("iscrowd", 0))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _malformed(path, "'annotations'", position, exc) from None
        if image_id not in images:
            raise BadData(f"{path}: annotation {annotation_id} is of image_id {image_id}, which is not in 'images'")
        if category_id not in category_ids:
            raise BadData(
                f"{path}: annotation {annotation_id} has category_id {category_id}, which is not in 'categories'"
            )
        _, _, height, width = images[image_id]
        try:
            polygons, rle_counts = _compact_segmentation(segmentation, height, width)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadData(f"{path}: annotation {annotation_id} has a bad segmentation: {exc}") from None
        objects.setdefault(image_id, []).append(CocoObject(annotation_id, category_id, iscrowd, polygons, rle_counts))
    return objects


def _compact_segmentation(segmentation: Any, height: int, width: int) -> tuple[tuple[bytes, ...], bytes | None]:
    """(polygon parts, None) or ((), compressed RLE counts)."""
    if isinstance(segmentation, list):
        # Parts of fewer than 3 points (6 numbers) enclose nothing, and frPyObjects would read 4 numbers as a box.
        return tuple(_polygon_bytes(part) for part in segmentation if len(part) >= 6), None
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        raise ValueError("expected a list of polygons or an RLE {counts, size}")
    size = [int(side) for side in segmentation["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} is not its image's [height, width] [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        return (), counts.encode("ascii")
    return (), _compress_counts(np.asarray(counts, dtype=np.uint32), height, width)


def _polygon_bytes(part: Any) -> bytes:
    coordinates = np.asarray(part, dtype=np.float64)
    if coordinates.ndim != 1 or coordinates.size % 2:
        raise ValueError("a polygon must be a flat list x1, y1, x2, y2, ...")
    return coordinates.tobytes()


def _compress_counts(counts: np.ndarray, height: int, width: int) -> bytes:
    # pycocotools decodes RLE counts without a bounds check: counts that overrun the image would write past the mask.
    if counts.ndim != 1 or int(counts.sum(dtype=np.int64)) != height * width:
        raise ValueError(f"uncompressed RLE counts do not add up to height x width = {height * width}")
    rle = mask_api.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return bytes(rle["counts"])


# ---- rasterising --------------------------------------------------------------------------------


def _object_rle(obj: CocoObject, height: int, width: int) -> dict[str, Any] | None:
    if obj.rle_counts is not None:
        return {"size": [height, width], "counts": obj.rle_counts}
    if not obj.polygons:
        return None
    parts = [np.frombuffer(part, dtype=np.float64) for part in obj.polygons]
    return mask_api.merge(mask_api.frPyObjects(parts, height, width))


def semantic_mask(image: CocoImage, class_of: dict[int, int]) -> np.ndarray:
    """H x W uint8: 0 background, each annotation painted with its class, larger areas first (smaller ones win)."""
    mask = np.zeros((image.height, image.width), np.uint8)
    painted = [
        (rle, class_of[obj.category_id])
        for obj in image.objects
        if (rle := _object_rle(obj, image.height, image.width)) is not None
    ]
    if not painted:
        return mask
    rles = [rle for rle, _ in painted]
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's copy=False deprecation inside its own code; nothing to act on here
        warnings.simplefilter("ignore", DeprecationWarning)
        binary = mask_api.decode(rles)  # H x W x N
    for i in np.argsort(-mask_api.area(rles), kind="stable"):
        mask[binary[:, :, i] > 0] = painted[i][1]
    return mask


# ---- the dataset --------------------------------------------------------------------------------


class CocoDataset(Dataset):
    """COCO 2014 instances; `classes` defaults to the JSON's categories in id order."""

    name = "coco"

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise BadData(f"COCO dataset root not found: {self.root}")
        self._classes = None if classes is None else clean_class_list(list(classes), "classes")
        self._indexes: dict[str, CocoIndex] = {}
        self._class_maps: dict[str, dict[int, int]] = {}
        if not self.splits():
            looked = " or ".join(str(self.instances_path(split)) for split in SPLITS)
            raise BadData(f"no COCO annotations under {self.root} (looked for {looked})")

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker gets the dataset pickled: it takes the compact index built so far
        # (bytes and small tuples, quick to pickle), never the JSON, so it does not parse the file again.
        return {
            "root": self.root,
            "_classes": self._classes,
            "_indexes": self._indexes,
            "_class_maps": self._class_maps,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # classes: from the JSON, read when first needed

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            index = self._index(self.splits()[0])
            self._classes = clean_class_list([name for _, name in index.categories], str(index.path), BadData)
        return self._classes

    @classes.setter
    def classes(self, names: list[str]) -> None:  # writable, as the base class's attribute is
        self._classes = clean_class_list(list(names), "classes")
        self._class_maps = {}

    def _class_map(self, split: str) -> dict[int, int]:
        """category id -> class index (1..C) for the split's JSON, by category name."""
        if split not in self._class_maps:
            index, classes = self._index(split), self.classes
            position = {name: i + 1 for i, name in enumerate(classes)}
            for category_id, name in index.categories:
                if name not in position:
                    raise BadData(
                        f"{index.path}: category '{name}' (id {category_id}) is not in the class list "
                        f"({format_class_list(classes)})"
                    )
            self._class_maps[split] = {category_id: position[name] for category_id, name in index.categories}
        return self._class_maps[split]

    # splits and ids

    def instances_path(self, split: str) -> Path:
        return self.root / "annotations" / instances_name(split)

    def image_dir(self, split: str) -> Path:
        return self.root / f"{split}2014"

    def splits(self) -> list[str]:
        """Those whose JSON exists, or was indexed before this copy was made (a worker's copy needs no file)."""
        return [split for split in SPLITS if split in self._indexes or self.instances_path(split).is_file()]

    def _require_split(self, split: str) -> None:
        if split not in self.splits():
            available = ", ".join(self.splits()) or "none"
            raise BadData(f"COCO annotations not found: {self.instances_path(split)} (available splits: {available})")

    def _index(self, split: str) -> CocoIndex:
        if split not in self._indexes:
            self._require_split(split)
            self._indexes[split] = cached_instances(self.instances_path(split))
        return self._indexes[split]

    def ids(self, split: str) -> list[str]:
        """File stems in image-id order, images without any annotation left out."""
        return [stem for stem, image in self._index(split).images.items() if image.objects]

    def _find(self, image_id: str) -> tuple[str, CocoImage]:
        """(split, entry) of an image, looking in the splits already indexed first."""
        ordered = sorted(self.splits(), key=lambda split: split not in self._indexes)
        for split in ordered:
            image = self._index(split).images.get(image_id)
            if image is not None:
                return split, image
        looked = ", ".join(str(self.instances_path(split)) for split in ordered)
        raise BadData(f"image '{image_id}' is in none of {looked}")

    # one image

    def labels(self, image_id: str) -> np.ndarray:
        split, image = self._find(image_id)
        class_of = self._class_map(split)
        return np.array(sorted({class_of[obj.category_id] for obj in image.objects}), dtype=np.int64)

    def image_size(self, image_id: str) -> tuple[int, int]:
        _, image = self._find(image_id)
        return image.height, image.width

    def image_path(self, image_id: str) -> Path:
        split, image = self._find(image_id)
        return self.image_dir(split) / image.file_name

    def load(self, image_id: str, with_mask: bool = True) -> Sample:
        split, entry = self._find(image_id)
        path = self.image_dir(split) / entry.file_name
        if not path.is_file():
            raise BadData(f"image not found: {path} (listed in {self.instances_path(split)})")
        image = read_image(path)
        if image.shape[:2] != (entry.height, entry.width):
            raise BadData(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but {self.instances_path(split)} "
                f"says {entry.width}x{entry.height}"
            )
        mask = semantic_mask(entry, self._class_map(split)) if with_mask else None
        return Sample(id=image_id, image=image, labels=self.labels(image_id), mask=mask)

    # ground truth

    def has_masks(self, split: str) -> bool:
        self._require_split(split)
        return True  # every image has a mask, all background when it has no annotation

    def gt_source_for(self, split: str) -> str:
        return instances_name(split)

    @property
    def gt_source(self) -> str:
        return "+".join(instances_name(split) for split in self.splits())
