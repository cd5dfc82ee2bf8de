"""FolderDataset on tiny folder-layout datasets built in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igcam_cli.data import open_dataset
from igcam_cli.data.folder import FolderDataset
from igcam_cli.errors import BadData, UsageError

LABELS_CSV = "id,labels\na,cat dog\nb,\nc,dog\n\nd,cat\n"
# id -> file name, width, height
IMAGES = {"a": ("a.jpg", 40, 30), "b": ("b.png", 30, 40), "c": ("c.JPG", 20, 20), "d": ("d.bmp", 25, 15)}


def write_image(path: Path, width: int, height: int) -> None:
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    fmt = {".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
    Image.fromarray(pixels).save(path, format=fmt)


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    im.save(path)


def a_mask() -> np.ndarray:
    mask = np.zeros((30, 40), np.uint8)
    mask[4:16, 4:16] = 255
    mask[5:15, 5:15] = 1
    mask[10:28, 20:38] = 2
    return mask


def build_folder(root: Path, labels_csv: str = LABELS_CSV, masks: bool = True) -> Path:
    (root / "images").mkdir(parents=True)
    for name, w, h in IMAGES.values():
        write_image(root / "images" / name, w, h)
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text(labels_csv)
    if masks:
        write_mask(root / "masks" / "a.png", a_mask())
        write_mask(root / "masks" / "b.png", np.zeros((40, 30), np.uint8))
    return root


@pytest.fixture(scope="session")
def plain(tmp_path_factory) -> Path:
    return build_folder(tmp_path_factory.mktemp("plain"))


@pytest.fixture
def root(tmp_path) -> Path:
    """A fresh writable dataset, for tests that change it."""
    return build_folder(tmp_path / "ds")


def test_classes_from_labels_csv(plain):
    ds = FolderDataset(plain)
    assert ds.name == "folder"
    assert ds.classes == ["cat", "dog"]


def test_labels(plain):
    ds = FolderDataset(plain)
    assert ds.labels("a").tolist() == [1, 2]
    assert ds.labels("b").tolist() == []  # background only
    assert ds.labels("c").tolist() == [2]
    assert ds.labels("d").tolist() == [1]
    assert all(ds.labels(i).dtype == np.int64 for i in "abcd")


def test_single_train_split_without_splits_dir(plain):
    ds = FolderDataset(plain)
    assert ds.splits() == ["train"]
    assert ds.ids("train") == ["a", "b", "c", "d"]
    with pytest.raises(BadData, match=r"val\.txt.*available splits: train"):
        ds.ids("val")


def test_images_of_different_sizes_and_extensions(plain):
    ds = FolderDataset(plain)
    shapes = {i: ds.load(i).image.shape for i in "abcd"}
    assert shapes == {"a": (30, 40, 3), "b": (40, 30, 3), "c": (20, 20, 3), "d": (15, 25, 3)}
    assert ds.load("b").image.dtype == np.uint8


def test_masks_are_optional(plain):
    ds = FolderDataset(plain)
    sample = ds.load("a")
    np.testing.assert_array_equal(sample.mask, a_mask())
    assert sample.mask.dtype == np.uint8 and 255 in sample.mask
    assert ds.load("c").mask is None
    assert ds.load("a", with_mask=False).mask is None
    assert not ds.has_masks("train")
    assert ds.gt_source == "masks/"


def test_no_masks_folder(tmp_path):
    ds = FolderDataset(build_folder(tmp_path / "ds", masks=False))
    assert ds.load("a").mask is None and not ds.has_masks("train")


def test_splits_dir(root):
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n\n")
    (root / "splits" / "val.txt").write_text("c\n")
    ds = FolderDataset(root)
    assert ds.splits() == ["train", "val"]
    assert ds.ids("train") == ["a", "b"] and ds.ids("val") == ["c"]
    assert ds.has_masks("train") and not ds.has_masks("val")
    with pytest.raises(BadData, match=r"splits/test\.txt.*available splits: train, val"):
        ds.ids("test")


def test_split_listing_unknown_id(root):
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(BadData, match=r"train\.txt, line 2: image 'zzz' has no row in .*labels\.csv"):
        FolderDataset(root).ids("train")


def test_classes_txt(root):
    (root / "classes.txt").write_text("background\ndog\ncat\nbird\n")
    ds = FolderDataset(root)
    assert ds.classes == ["dog", "cat", "bird"]
    assert ds.labels("a").tolist() == [1, 2] and ds.labels("d").tolist() == [2]


def test_given_classes_win(root):
    (root / "classes.txt").write_text("dog\ncat\n")
    ds = open_dataset({"format": "folder", "root": str(root), "classes": ["bird", "cat", "dog"]})
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["bird", "cat", "dog"] and ds.labels("a").tolist() == [2, 3]


def test_quoted_csv_and_bom(root):
    (root / "labels.csv").write_text('\ufeffid,labels\n"a","cat  dog"\nb\n', encoding="utf-8")
    ds = FolderDataset(root)
    assert ds.ids("train") == ["a", "b"]
    assert ds.labels("a").tolist() == [1, 2] and ds.labels("b").tolist() == []


# bad data


def test_missing_root(tmp_path):
    with pytest.raises(BadData, match="nowhere"):
        FolderDataset(tmp_path / "nowhere")


def test_missing_labels_csv(root):
    (root / "labels.csv").unlink()
    with pytest.raises(BadData, match=r"labels\.csv"):
        FolderDataset(root)


@pytest.mark.parametrize("text", ["a,cat dog\nb,dog\n", "name,tags\na,cat\n", ""])
def test_missing_or_bad_header(root, text):
    (root / "labels.csv").write_text(text)
    with pytest.raises(BadData, match=r"labels\.csv"):
        FolderDataset(root)


def test_bad_header_names_line(root):
    (root / "labels.csv").write_text("a,cat dog\n")
    with pytest.raises(BadData, match=r"labels\.csv, line 1: expected the header 'id,labels'"):
        FolderDataset(root)


def test_unknown_class(root):
    (root / "classes.txt").write_text("cat\ndog\n")
    (root / "labels.csv").write_text("id,labels\na,cat\nb,cow dog\n")
    with pytest.raises(BadData, match=r"labels\.csv, line 3: class 'cow' is not in the class list \(cat, dog\)"):
        FolderDataset(root)


def test_comma_separated_labels(root):
    (root / "labels.csv").write_text("id,labels\na,cat,dog\n")
    with pytest.raises(BadData, match=r"labels\.csv, line 2: .*separated by spaces"):
        FolderDataset(root)


def test_duplicate_id(root):
    (root / "labels.csv").write_text("id,labels\na,cat\nb,dog\na,dog\n")
    with pytest.raises(BadData, match=r"labels\.csv, line 4: image id 'a' repeats line 2"):
        FolderDataset(root)


def test_row_without_image(root):
    (root / "labels.csv").write_text("id,labels\na,cat\nghost,dog\n")
    ds = FolderDataset(root)
    assert ds.ids("train") == ["a", "ghost"]
    assert ds.labels("ghost").tolist() == [2]
    with pytest.raises(BadData, match=r"images/ghost\.jpg.*line 3"):
        ds.load("ghost")


def test_unknown_id(plain):
    with pytest.raises(BadData, match=r"'zzz' has no row in .*labels\.csv"):
        FolderDataset(plain).labels("zzz")


def test_truncated_image(root):
    path = root / "images" / "a.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadData, match=r"a\.jpg"):
        FolderDataset(root).load("a")


def test_mask_of_wrong_size(root):
    write_mask(root / "masks" / "c.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(BadData, match=r"c\.png is 10x10 but its image is 20x20"):
        FolderDataset(root).load("c")


def test_mask_with_index_above_num_classes(root):
    write_mask(root / "masks" / "c.png", np.full((20, 20), 3, np.uint8))
    with pytest.raises(BadData, match=r"c\.png holds class index 3"):
        FolderDataset(root).load("c")


def test_two_images_with_one_id(root):
    write_image(root / "images" / "a.png", 10, 10)
    with pytest.raises(BadData, match=r"a\.jpg and .*a\.png"):
        FolderDataset(root)


def test_duplicate_in_classes_txt(root):
    (root / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(BadData, match=r"classes\.txt: class 'cat' is listed twice"):
        FolderDataset(root)


def test_open_dataset_folder_needs_root():
    with pytest.raises(UsageError, match="root"):
        open_dataset({"format": "folder"})
