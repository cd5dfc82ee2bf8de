"""CocoDataset on a tiny COCO 2014 layout built in tmp_path: classes, labels, masks, the one-time parse, bad inputs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api

from cli_helpers import assert_error, igcam, ok
from igcam_cli.data import coco, open_dataset
from igcam_cli.data.coco import CocoDataset
from igcam_cli.errors import BadData
from igcam_cli.workspace import Workspace

H, W = 40, 50
# Listed out of id order, with gaps in the ids as real COCO has: classes follow the ids (person 1, car 2, train 3).
CATEGORIES = [{"id": 7, "name": "train"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
CLASSES = ["person", "car", "train"]
PERSON, CAR, TRAIN = 1, 2, 3

TRAIN_9 = "COCO_train2014_000000000009"  # person polygon, overlapped by a smaller car polygon
TRAIN_25 = "COCO_train2014_000000000025"  # a crowd train (uncompressed RLE) and a person (compressed RLE)
TRAIN_30 = "COCO_train2014_000000000030"  # no annotation
VAL_42 = "COCO_val2014_000000000042"  # a two-part car polygon


def box_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def region(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[rows, cols] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's iscrowd format: run lengths of the column-major pixels, starting with a run of 0s."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] + counts) if flat[0] else counts}


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_api.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


CROWD_TRAIN = region(slice(0, 10), slice(None))
RLE_PERSON = region(slice(20, 35), slice(10, 30))


def image_entry(image_id: int, stem: str, height: int = H, width: int = W, suffix: str = ".jpg") -> dict:
    return {"id": image_id, "file_name": stem + suffix, "height": height, "width": width}


def annotation(ann_id: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "iscrowd": iscrowd, "area": 0.0, "bbox": [0, 0, 1, 1]}  # fmt: skip


def train_instances() -> dict:
    return {
        "images": [image_entry(25, TRAIN_25, suffix=".png"), image_entry(9, TRAIN_9), image_entry(30, TRAIN_30)],
        "annotations": [
            # the small car comes first in the file: file order alone would let the person cover it
            annotation(101, 9, 3, [box_polygon(20, 10, 35, 20)]),
            annotation(102, 9, 1, [box_polygon(5, 5, 25, 30)]),
            annotation(103, 25, 7, uncompressed_rle(CROWD_TRAIN), iscrowd=1),
            annotation(104, 25, 1, compressed_rle(RLE_PERSON)),
        ],
        "categories": CATEGORIES,
    }


def val_instances() -> dict:
    two_parts = [box_polygon(2, 2, 12, 12), box_polygon(30, 25, 45, 38), [1, 1, 2, 2]]  # the last: a stray segment
    return {
        "images": [image_entry(42, VAL_42)],
        "annotations": [annotation(201, 42, 3, two_parts)],
        "categories": CATEGORIES,
    }


def write_image(path: Path, height: int = H, width: int = W, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_instances(root: Path, split: str, instances: dict) -> Path:
    path = root / "annotations" / f"instances_{split}2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(instances))
    return path


def build_coco(root: Path) -> Path:
    for split, instances in (("train", train_instances()), ("val", val_instances())):
        write_instances(root, split, instances)
        for seed, entry in enumerate(instances["images"]):
            write_image(root / f"{split}2014" / entry["file_name"], seed=seed)
    return root


@pytest.fixture(autouse=True)
def fresh_parse_cache(monkeypatch):
    monkeypatch.setattr(coco, "_PARSED", {})


@pytest.fixture
def root(tmp_path) -> Path:
    return build_coco(tmp_path / "coco")


@pytest.fixture
def parse_calls(monkeypatch) -> list[Path]:
    """The JSON files `read_instances` parses, in order."""
    calls: list[Path] = []
    original = coco.read_instances

    def counting(path: Path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(coco, "read_instances", counting)
    return calls


# ---- classes, ids, labels, masks ------------------------------------------------------------------


def test_classes_follow_category_ids_and_ids_follow_image_ids(root):
    ds = CocoDataset(root)
    assert ds.name == "coco"
    assert ds.classes == CLASSES
    assert ds.splits() == ["train", "val"]
    assert ds.ids("train") == [TRAIN_9, TRAIN_25]  # sorted by image id; the unannotated image 30 left out
    assert ds.ids("val") == [VAL_42]
    assert ds.has_masks("train") and ds.has_masks("val")
    assert ds.gt_source == "instances_train2014.json+instances_val2014.json"
    assert ds.gt_source_for("val") == "instances_val2014.json"


def test_labels_count_every_annotation_crowds_included(root):
    ds = CocoDataset(root)
    assert ds.labels(TRAIN_9).tolist() == [PERSON, CAR]
    assert ds.labels(TRAIN_25).tolist() == [PERSON, TRAIN]  # the crowd's train counts
    assert ds.labels(VAL_42).tolist() == [CAR]
    assert ds.labels(TRAIN_30).tolist() == []
    assert ds.labels(TRAIN_9).dtype == np.int64


def test_polygon_mask_with_the_smaller_object_on_top(root):
    sample = CocoDataset(root).load(TRAIN_9)
    assert sample.image.shape == (H, W, 3)
    assert sample.mask is not None and sample.mask.shape == (H, W) and sample.mask.dtype == np.uint8
    mask = sample.mask
    assert mask[15, 10] == PERSON  # person only
    assert mask[15, 22] == CAR  # both: the car (150 px) is painted over the person (500 px)
    assert mask[15, 30] == CAR  # car only
    assert mask[25, 22] == PERSON
    assert mask[2, 2] == 0 and mask[35, 45] == 0
    assert set(np.unique(mask).tolist()) == {0, PERSON, CAR}
    assert sample.labels.tolist() == [PERSON, CAR]


def test_rle_masks_uncompressed_crowd_and_compressed(root):
    mask = CocoDataset(root).load(TRAIN_25).mask
    expected = np.zeros((H, W), np.uint8)
    expected[CROWD_TRAIN > 0] = TRAIN  # the crowd region is painted with its class, not ignored
    expected[RLE_PERSON > 0] = PERSON
    np.testing.assert_array_equal(mask, expected)


def test_every_polygon_part_is_painted(root):
    mask = CocoDataset(root).load(VAL_42).mask
    assert mask[7, 7] == CAR and mask[30, 38] == CAR
    assert mask[20, 20] == 0
    assert mask[1, 1] == 0  # the two-point stray segment paints nothing (pycocotools would read it as a box)


def test_unannotated_image_loads_as_background(root):
    sample = CocoDataset(root).load(TRAIN_30)
    assert sample.mask is not None and not sample.mask.any()
    assert sample.labels.size == 0


def test_image_size_comes_from_the_json(root):
    ds = CocoDataset(root)
    (root / "val2014" / f"{VAL_42}.jpg").unlink()  # not read
    assert ds.image_size(VAL_42) == (H, W)


def test_load_without_mask(root):
    assert CocoDataset(root).load(TRAIN_9, with_mask=False).mask is None


def test_given_classes_set_the_order(root):
    ds = CocoDataset(root, classes=["train", "car", "person"])
    assert ds.labels(TRAIN_25).tolist() == [1, 3]
    assert ds.load(TRAIN_25).mask[0, 0] == 1


def test_only_train_json(tmp_path):
    root = tmp_path / "coco"
    write_instances(root, "train", train_instances())
    ds = CocoDataset(root)
    assert ds.splits() == ["train"]
    with pytest.raises(BadData, match="instances_val2014.json"):
        ds.ids("val")


# ---- one parse per file and process ---------------------------------------------------------------


def test_each_json_is_parsed_once_and_lazily(root, parse_calls):
    ds = CocoDataset(root)
    assert parse_calls == []  # opening parses nothing
    ds.ids("train")
    for image_id in ds.ids("train"):
        ds.labels(image_id)
        ds.load(image_id)
    assert parse_calls == [root / "annotations" / "instances_train2014.json"]
    again = open_dataset({"format": "coco", "root": str(root)})  # a second instance in the same process
    again.load(TRAIN_9)
    assert len(parse_calls) == 1


def test_a_pickled_copy_does_not_read_the_json_again(root, parse_calls, monkeypatch):
    ds = CocoDataset(root)
    ds.ids("train")
    expected = ds.load(TRAIN_25).mask
    payload = pickle.dumps(ds)
    assert b"segmentation" not in payload and len(payload) < 20_000  # the compact index, not the JSON
    (root / "annotations" / "instances_train2014.json").unlink()
    monkeypatch.setattr(coco, "_PARSED", {})
    copy = pickle.loads(payload)
    np.testing.assert_array_equal(copy.load(TRAIN_25).mask, expected)
    assert copy.ids("train") == [TRAIN_9, TRAIN_25] and copy.classes == CLASSES
    assert len(parse_calls) == 1


# ---- bad input ------------------------------------------------------------------------------------


def test_no_json(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    with pytest.raises(BadData, match="instances_train2014.json") as err:
        CocoDataset(tmp_path / "coco")
    assert "instances_val2014.json" in err.value.message


def test_missing_root(tmp_path):
    with pytest.raises(BadData, match="COCO dataset root not found"):
        CocoDataset(tmp_path / "nowhere")


def bad_json(root: Path, instances: dict | str) -> tuple[CocoDataset, Path]:
    text = instances if isinstance(instances, str) else json.dumps(instances)
    path = root / "annotations" / "instances_train2014.json"
    path.write_text(text)
    return CocoDataset(root), path


def test_truncated_json(root):
    text = json.dumps(train_instances())
    ds, path = bad_json(root, text[: len(text) // 2])
    with pytest.raises(BadData, match="not valid JSON") as err:
        ds.ids("train")
    assert str(path) in err.value.message


def test_not_a_json_object(root):
    ds, path = bad_json(root, "[1, 2]")
    with pytest.raises(BadData, match="expected a JSON object") as err:
        ds.ids("train")
    assert str(path) in err.value.message


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_list(root, key):
    instances = train_instances()
    del instances[key]
    ds, path = bad_json(root, instances)
    with pytest.raises(BadData, match=f"no '{key}' list") as err:
        ds.ids("train")
    assert str(path) in err.value.message


def test_annotation_of_an_unknown_image(root):
    instances = train_instances()
    instances["annotations"][1]["image_id"] = 77
    ds, path = bad_json(root, instances)
    with pytest.raises(BadData, match="annotation 102 is of image_id 77, which is not in 'images'") as err:
        ds.labels(TRAIN_9)
    assert str(path) in err.value.message


def test_unknown_category(root):
    instances = train_instances()
    instances["annotations"][0]["category_id"] = 2  # between the real ids 1 and 3
    ds, path = bad_json(root, instances)
    with pytest.raises(BadData, match="annotation 101 has category_id 2, which is not in 'categories'") as err:
        ds.ids("train")
    assert str(path) in err.value.message


def test_malformed_entries(root):
    instances = train_instances()
    del instances["images"][1]["file_name"]
    ds, path = bad_json(root, instances)
    with pytest.raises(BadData, match="'images' entry 1 is malformed \\(missing key 'file_name'\\)") as err:
        ds.ids("train")
    assert str(path) in err.value.message


def test_bad_rle(root):
    instances = train_instances()
    instances["annotations"][2]["segmentation"]["counts"][-1] += 5  # runs past the image
    ds, path = bad_json(root, instances)
    with pytest.raises(BadData, match="annotation 103 has a bad segmentation: uncompressed RLE counts") as err:
        ds.ids("train")
    assert str(path) in err.value.message


def test_class_list_without_a_category(root):
    ds = CocoDataset(root, classes=["person", "car"])
    with pytest.raises(BadData, match="category 'train' \\(id 7\\) is not in the class list") as err:
        ds.labels(TRAIN_9)
    assert "instances_train2014.json" in err.value.message


def test_unknown_image_id(root):
    with pytest.raises(BadData, match="image 'nope' is in none of") as err:
        CocoDataset(root).load("nope")
    assert "instances_val2014.json" in err.value.message


def test_missing_image_file_is_found_at_load_time(root):
    image = root / "train2014" / f"{TRAIN_9}.jpg"
    image.unlink()
    ds = CocoDataset(root)
    assert ds.labels(TRAIN_9).tolist() == [PERSON, CAR]  # labels need no image
    with pytest.raises(BadData, match="image not found") as err:
        ds.load(TRAIN_9)
    assert str(image) in err.value.message and "instances_train2014.json" in err.value.message


def test_corrupt_image(root):
    image = root / "train2014" / f"{TRAIN_9}.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(BadData, match="cannot read image") as err:
        CocoDataset(root).load(TRAIN_9)
    assert str(image) in err.value.message


def test_image_size_differs_from_the_json(root):
    image = root / "val2014" / f"{VAL_42}.jpg"
    write_image(image, height=W, width=H)
    with pytest.raises(BadData, match="is 40x50 but .* says 50x40") as err:
        CocoDataset(root).load(VAL_42)
    assert str(image) in err.value.message and "instances_val2014.json" in err.value.message


# ---- through the CLI ------------------------------------------------------------------------------


def test_init_coco_workspace(root, tmp_path):
    ws = tmp_path / "ws"
    result = ok("init", "-w", ws, "--dataset", "coco", "--root", root)
    assert "coco dataset, 3 classes, splits train, val; standard settings" in result.output
    workspace = Workspace.open(ws)
    assert workspace.dataset_spec == {"format": "coco", "root": str(root.resolve())}
    sample = workspace.dataset().load(TRAIN_9)
    assert sample.mask[15, 22] == CAR and sample.labels.tolist() == [PERSON, CAR]
    ok("status", "-w", ws)


def test_init_coco_with_bad_json_exits_4(root, tmp_path):
    path = root / "annotations" / "instances_val2014.json"
    path.write_text('{"images": [')
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "coco", "--root", root)
    assert_error(result, 4, str(path), "not valid JSON")
