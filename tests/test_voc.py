"""VocDataset, class lists and open_dataset on a tiny VOC-layout folder built in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import write_palette_png
from igcam_cli.data import VOC_CLASSES, open_dataset, parse_class_list
from igcam_cli.data.voc import VocDataset
from igcam_cli.errors import BadData, UsageError

# id -> (width, height, XML object names or None, {class index: box}, mask folder or None)
IMAGES = {
    "2007_000001": (40, 30, ["dog", "person"], {12: (2, 2, 18, 20), 15: (22, 5, 38, 28)}, "SegmentationClass"),
    "2007_000002": (30, 40, ["cat", "chair"], {8: (5, 5, 25, 35)}, "SegmentationClass"),
    "2007_000003": (40, 30, ["aeroplane"], {}, None),
    "2007_000004": (30, 40, None, {5: (3, 3, 12, 30), 20: (15, 10, 28, 38)}, "SegmentationClass"),
    "2007_000005": (40, 30, ["bus"], {6: (10, 5, 30, 25)}, "SegmentationClassAug"),
}
SPLITS = {
    "train": ["2007_000001", "2007_000002", "2007_000005"],
    "val": ["2007_000004"],
    "trainaug": list(IMAGES),
}


def make_mask(width: int, height: int, boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Rectangles of class k, each inside a 1-pixel 255 border, as real VOC masks have."""
    mask = np.zeros((height, width), np.uint8)
    for k, (x0, y0, x1, y1) in boxes.items():
        mask[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
        mask[y0:y1, x0:x1] = k
    return mask


def write_xml(path: Path, names: list[str]) -> None:
    objects = "".join(
        f"<object><name>{n}</name><difficult>{int(i == 1)}</difficult></object>" for i, n in enumerate(names)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>x.jpg</filename>{objects}</annotation>")


def write_image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def build_voc(voc: Path, images: dict = IMAGES, splits: dict = SPLITS) -> Path:
    for seed, (image_id, (w, h, names, boxes, mask_dir)) in enumerate(images.items()):
        write_image(voc / "JPEGImages" / f"{image_id}.jpg", w, h, seed)
        if names is not None:
            write_xml(voc / "Annotations" / f"{image_id}.xml", names)
        if mask_dir is not None:
            write_palette_png(voc / mask_dir / f"{image_id}.png", make_mask(w, h, boxes))
    for split, ids in splits.items():
        path = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(ids) + "\n\n")
    return voc


@pytest.fixture(scope="session")
def voc_base(tmp_path_factory) -> Path:
    """A read-only dataset under <tmp>/VOCdevkit/VOC2012; returns <tmp>."""
    root = tmp_path_factory.mktemp("voc")
    build_voc(root / "VOCdevkit" / "VOC2012")
    return root


@pytest.fixture
def voc_copy(voc_base, tmp_path) -> Path:
    """A writable copy of the VOC2012 folder, for tests that break it."""
    return Path(shutil.copytree(voc_base / "VOCdevkit" / "VOC2012", tmp_path / "VOC2012"))


@pytest.fixture(scope="session")
def ds(voc_base) -> VocDataset:
    return VocDataset(voc_base)


# layout and splits


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_is_resolved(voc_base, sub):
    ds = VocDataset(voc_base / sub if sub else voc_base)
    assert ds.root == voc_base / "VOCdevkit" / "VOC2012"
    assert ds.name == "voc"
    assert ds.classes == VOC_CLASSES and ds.num_classes == 20


def test_splits_and_ids(ds):
    assert ds.splits() == ["train", "trainaug", "val"]
    assert ds.ids("train") == SPLITS["train"]
    assert ds.ids("val") == ["2007_000004"]
    assert ds.ids("trainaug") == list(IMAGES)


# labels


def test_labels_from_xml_include_difficult_objects(ds):
    assert ds.labels("2007_000001").tolist() == [12, 15]  # dog, person
    assert ds.labels("2007_000002").tolist() == [8, 9]  # cat, chair (difficult)
    assert ds.labels("2007_000003").tolist() == [1]
    assert ds.labels("2007_000005").tolist() == [6]
    assert ds.labels("2007_000001").dtype == np.int64


def test_labels_from_mask_when_xml_missing(ds):
    labels = ds.labels("2007_000004")
    assert labels.tolist() == [5, 20]
    assert labels.dtype == np.int64


# images and masks


def test_load_image_and_mask(ds):
    sample = ds.load("2007_000001")
    assert sample.id == "2007_000001"
    assert sample.image.shape == (30, 40, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (30, 40) and sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask).tolist()) == {0, 12, 15, 255}
    np.testing.assert_array_equal(sample.mask, make_mask(40, 30, IMAGES["2007_000001"][3]))
    assert sample.labels.tolist() == [12, 15]


def test_load_portrait_image(ds):
    sample = ds.load("2007_000004")
    assert sample.image.shape == (40, 30, 3)
    assert sample.mask.shape == (40, 30)
    assert sample.mask[2, 2] == 255 and sample.mask[3, 3] == 5 and sample.mask[0, 0] == 0


def test_mask_falls_back_to_segmentation_class_aug(ds):
    sample = ds.load("2007_000005")
    assert set(np.unique(sample.mask).tolist()) == {0, 6, 255}
    assert ds.mask_path("2007_000005").parent.name == "SegmentationClassAug"


def test_no_mask_or_not_asked(ds):
    assert ds.load("2007_000003").mask is None
    assert ds.load("2007_000001", with_mask=False).mask is None


def test_has_masks_and_gt_source(ds):
    assert ds.has_masks("train") and ds.has_masks("val")
    assert not ds.has_masks("trainaug")
    assert ds.gt_source == "SegmentationClass+SegmentationClassAug"
    assert ds.gt_source_for("val") == "SegmentationClass"
    assert ds.gt_source_for("train") == "SegmentationClass+SegmentationClassAug"


def test_png_images_are_accepted(voc_copy):
    jpg = voc_copy / "JPEGImages" / "2007_000003.jpg"
    Image.open(jpg).save(jpg.with_suffix(".png"))
    jpg.unlink()
    assert VocDataset(voc_copy).load("2007_000003").image.shape == (30, 40, 3)


# custom class lists


@pytest.fixture(scope="session")
def custom_voc(tmp_path_factory) -> Path:
    images = {
        "img_a": (20, 16, ["a", "c"], {1: (2, 2, 8, 8), 3: (10, 4, 18, 14)}, "SegmentationClass"),
        "img_b": (16, 20, None, {2: (3, 3, 12, 17)}, "SegmentationClass"),
    }
    return build_voc(tmp_path_factory.mktemp("custom") / "VOC2012", images, {"train": list(images)})


def test_custom_classes_from_comma_list(custom_voc):
    classes = parse_class_list("a,b,c")
    assert classes == ["a", "b", "c"]
    ds = VocDataset(custom_voc, classes)
    assert ds.labels("img_a").tolist() == [1, 3]
    assert ds.labels("img_b").tolist() == [2]
    assert set(np.unique(ds.load("img_b").mask).tolist()) == {0, 2, 255}


def test_custom_classes_from_file(custom_voc, tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\n__background__\na\n\nb  \nc\n")
    classes = parse_class_list(str(path))
    assert classes == ["a", "b", "c"]
    ds = open_dataset({"format": "voc", "root": str(custom_voc), "classes": classes})
    assert ds.classes == ["a", "b", "c"] and ds.labels("img_a").tolist() == [1, 3]


def test_custom_classes_reject_unknown_name(custom_voc):
    ds = VocDataset(custom_voc, ["a", "b"])
    with pytest.raises(BadData, match=r"img_a\.xml: class 'c' is not in the class list \(a, b\)"):
        ds.labels("img_a")


def test_parse_class_list_variants():
    assert parse_class_list("background, cat ,dog") == ["cat", "dog"]
    assert parse_class_list("_background_,cat") == ["cat"]
    assert parse_class_list("cat") == ["cat"]


@pytest.mark.parametrize("text", ["a,b,a", "background", "", "a,,b"])
def test_parse_class_list_rejects_bad_lists(text):
    with pytest.raises(UsageError):
        parse_class_list(text)


def test_parse_class_list_missing_file():
    with pytest.raises(UsageError, match="nope/classes.txt"):
        parse_class_list("nope/classes.txt")
    with pytest.raises(UsageError, match="mine.txt"):
        parse_class_list("mine.txt")


def test_parse_class_list_duplicate_in_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(UsageError, match="'cat' is listed twice"):
        parse_class_list(str(path))


# open_dataset


def test_open_dataset_voc(voc_base):
    ds = open_dataset({"format": "voc", "root": str(voc_base)})
    assert isinstance(ds, VocDataset) and ds.ids("val") == ["2007_000004"]


def test_open_dataset_string_classes(custom_voc):
    ds = open_dataset({"format": "voc", "root": str(custom_voc), "classes": "a,b,c"})
    assert ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    "spec",
    [{"format": "kitti", "root": "x"}, {"root": "x"}, {"format": "voc"}, {"format": "voc", "root": "x", "rot": 1}],
)
def test_open_dataset_usage_errors(spec):
    with pytest.raises(UsageError):
        open_dataset(spec)


# bad data: each error names the offending file


def test_missing_root(tmp_path):
    with pytest.raises(BadData, match="does_not_exist"):
        VocDataset(tmp_path / "does_not_exist")


def test_root_without_jpeg_images(tmp_path):
    with pytest.raises(BadData, match="JPEGImages"):
        VocDataset(tmp_path)


def test_missing_split_file(ds):
    with pytest.raises(BadData, match=r"test\.txt.*available splits: train, trainaug, val"):
        ds.ids("test")


def test_missing_image(voc_copy):
    (voc_copy / "JPEGImages" / "2007_000002.jpg").unlink()
    ds = VocDataset(voc_copy)
    assert ds.labels("2007_000002").tolist() == [8, 9]  # labels need no image
    with pytest.raises(BadData, match=r"2007_000002\.jpg"):
        ds.load("2007_000002")


def test_truncated_jpeg(voc_copy):
    path = voc_copy / "JPEGImages" / "2007_000001.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadData, match=r"2007_000001\.jpg"):
        VocDataset(voc_copy).load("2007_000001")


def test_xml_with_unknown_class(voc_copy):
    write_xml(voc_copy / "Annotations" / "2007_000003.xml", ["aeroplane", "foo"])
    with pytest.raises(BadData, match=r"2007_000003\.xml: class 'foo' is not in the class list \(aeroplane, bicycle"):
        VocDataset(voc_copy).labels("2007_000003")


def test_malformed_xml(voc_copy):
    (voc_copy / "Annotations" / "2007_000003.xml").write_text("<annotation><object><name>dog")
    with pytest.raises(BadData, match=r"2007_000003\.xml"):
        VocDataset(voc_copy).labels("2007_000003")


def test_mask_of_wrong_size(voc_copy):
    write_palette_png(voc_copy / "SegmentationClass" / "2007_000001.png", np.zeros((40, 30), np.uint8))
    with pytest.raises(BadData, match=r"2007_000001\.png is 30x40 but its image is 40x30"):
        VocDataset(voc_copy).load("2007_000001")


def test_mask_with_index_above_num_classes(voc_copy):
    mask = make_mask(30, 40, {21: (3, 3, 10, 10)})
    write_palette_png(voc_copy / "SegmentationClass" / "2007_000004.png", mask)
    ds = VocDataset(voc_copy)
    with pytest.raises(BadData, match=r"2007_000004\.png holds class index 21"):
        ds.labels("2007_000004")  # no XML: labels come from the mask
    with pytest.raises(BadData, match=r"2007_000004\.png"):
        ds.load("2007_000004")


def test_no_xml_and_no_mask(voc_copy):
    (voc_copy / "Annotations" / "2007_000003.xml").unlink()
    with pytest.raises(BadData, match=r"2007_000003\.xml"):
        VocDataset(voc_copy).labels("2007_000003")
