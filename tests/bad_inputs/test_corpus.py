"""The bad-input corpus, for the voc, folder and coco adapters (coco's annotation files: tests/test_coco.py; image
sizes from 1 x 1 to a large photo: test_image_sizes.py): every kind of image file a user may have, each either
read correctly or refused in one line naming the file.

Documented behaviour: CMYK, greyscale, greyscale + alpha, RGBA, palette and 1-bit images are read as RGB (alpha is
dropped, not composited); 16-bit greyscale keeps its grey levels; truncated, empty and non-image files are BadData
naming the file. Masks hold class indices (palette or greyscale PNG); values above the class count (but 255) and a
size other than the image's are BadData naming the mask. labels.csv may carry a BOM, CRLF line ends, blank lines
and quoted fields; bytes that are not UTF-8 are BadData naming the file. Ids with spaces or non-ASCII letters work.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_error, build_voc, igcam, write_palette_png
from igcam_cli.data.coco import CocoDataset
from igcam_cli.data.folder import FolderDataset
from igcam_cli.data.voc import VocDataset
from igcam_cli.errors import BadData

RED = (200, 30, 40)


def _image_bytes(mode: str) -> bytes:
    """A 6 x 5 image of one red-ish colour in `mode`, as the bytes of the file a user would have."""
    rgb = Image.new("RGB", (6, 5), RED)
    out = io.BytesIO()
    if mode == "CMYK":
        rgb.convert("CMYK").save(out, format="JPEG", quality=100)
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(out, format="PNG")
    else:
        rgb.convert(mode).save(out, format="PNG")
    return out.getvalue()


def _folder(tmp_path: Path, files: dict[str, bytes], labels: bytes | None = None) -> Path:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    for name, data in files.items():
        (root / "images" / name).write_bytes(data)
    rows = "".join(f"{Path(name).stem},cat\n" for name in files)
    (root / "labels.csv").write_bytes(labels if labels is not None else f"id,labels\n{rows}".encode())
    return root


def _coco(tmp_path: Path, name: str, data: bytes) -> tuple[CocoDataset, Path]:
    """A COCO 2014 layout whose one train image is `name` holding `data` (6 x 5 in the JSON)."""
    from test_coco import write_instances

    root = tmp_path / "coco"
    entry = {"id": 1, "file_name": name, "height": 5, "width": 6}
    box = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "iscrowd": 0}
    write_instances(root, "train", {"images": [entry], "annotations": [box], "categories": [{"id": 1, "name": "cat"}]})
    (root / "train2014").mkdir(parents=True)
    (root / "train2014" / name).write_bytes(data)
    return CocoDataset(root), root / "train2014" / name


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "P", "1"])
@pytest.mark.parametrize("adapter", ["folder", "coco"])
def test_every_image_mode_is_read_as_rgb(tmp_path, mode, adapter):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    if adapter == "folder":
        dataset, image_id = FolderDataset(_folder(tmp_path, {f"a{suffix}": _image_bytes(mode)}), ["cat"]), "a"
    else:
        dataset, _ = _coco(tmp_path, f"COCO_train2014_000000000001{suffix}", _image_bytes(mode))
        image_id = dataset.ids("train")[0]
    image = dataset.load(image_id, with_mask=False).image
    assert image.shape == (5, 6, 3) and image.dtype == np.uint8
    expected = np.asarray(Image.new("RGB", (6, 5), RED).convert(mode).convert("RGB"), dtype=np.int32)
    if mode == "P":  # an adaptive palette keeps the colour itself
        expected = np.broadcast_to(np.array(RED, np.int32), expected.shape)
    tolerance = 12 if mode == "CMYK" else 0  # JPEG
    assert np.abs(image.astype(np.int32) - expected).max() <= tolerance


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (_image_bytes("RGB")[:40], "truncated"),
        (b"", "zero bytes"),
        (b"id,labels\nthis is text, not an image\n", "text"),
    ],
)
@pytest.mark.parametrize("adapter", ["folder", "voc", "coco"])
def test_a_broken_image_file_is_bad_data_naming_it(tmp_path, content, why, adapter):
    if adapter == "coco":
        dataset, path = _coco(tmp_path, "COCO_train2014_000000000001.jpg", content)
        image_id = dataset.ids("train")[0]
    elif adapter == "folder":
        root = _folder(tmp_path, {"good.png": _image_bytes("RGB"), "bad.jpg": content})
        dataset, path = FolderDataset(root, ["cat"]), root / "images" / "bad.jpg"
        image_id = "bad"
    else:
        root = build_voc(tmp_path / "VOC2012")
        path = root / "JPEGImages" / "img_a.jpg"
        path.write_bytes(content)
        dataset, image_id = VocDataset(root, ["cat", "dog"]), "img_a"
    with pytest.raises(BadData, match="cannot read image") as error:
        dataset.load(image_id)
    assert str(path) in error.value.message, why


def test_a_mask_with_an_unknown_class_or_the_wrong_size_is_bad_data_naming_it(tmp_path):
    root = build_voc(tmp_path / "VOC2012")
    mask = root / "SegmentationClass" / "img_a.png"
    values = np.zeros((64, 48), np.uint8)
    values[3, 3] = 7  # two classes: 7 is neither a class nor 255
    write_palette_png(mask, values)
    with pytest.raises(BadData, match=r"holds class index 7, but there are only 2 classes") as error:
        VocDataset(root, ["cat", "dog"]).load("img_a")
    assert str(mask) in error.value.message
    write_palette_png(mask, np.zeros((10, 10), np.uint8))
    with pytest.raises(BadData, match=r"is 10x10 but its image is 48x64") as error:
        VocDataset(root, ["cat", "dog"]).load("img_a")
    assert str(mask) in error.value.message


def test_labels_csv_with_bom_crlf_blank_lines_and_quotes(tmp_path):
    labels = '\ufeffid,labels\r\n\r\na,cat\r\n"b","cat dog"\r\n\r\n'.encode()
    root = _folder(tmp_path, {"a.png": _image_bytes("RGB"), "b.png": _image_bytes("RGB")}, labels)
    dataset = FolderDataset(root, ["cat", "dog"])
    assert dataset.ids("train") == ["a", "b"]
    assert dataset.labels("a").tolist() == [1] and dataset.labels("b").tolist() == [1, 2]


def test_labels_csv_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    root = _folder(tmp_path, {"a.png": _image_bytes("RGB")}, b"id,labels\na,caf\xe9\n")
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "folder", "--root", root)
    assert_error(result, 4, str(root / "labels.csv"))


def test_ids_with_spaces_and_non_ascii_letters(tmp_path):
    files = {"my photo 1.png": _image_bytes("RGB"), "café_ü.png": _image_bytes("L")}
    labels = "id,labels\nmy photo 1,cat\ncafé_ü,cat\n".encode()
    root = _folder(tmp_path, files, labels)
    dataset = FolderDataset(root, ["cat"])
    assert sorted(dataset.ids("train")) == ["café_ü", "my photo 1"]
    assert dataset.load("my photo 1", with_mask=False).image.shape == (5, 6, 3)
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "folder", "--root", root, "--classes", "cat")
    assert result.exit_code == 0, result.output
