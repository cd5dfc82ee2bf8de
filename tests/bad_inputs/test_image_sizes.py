"""Image sizes at both ends, through the stages that read images whole: a 1 x 1 image and a large photo in
one VOC-layout split. make-cams and predict draw an image longer than `max_side` (1024 px by default; 300 here,
to keep the test quick) at that longer side and upsample its maps, so a large photo costs what a `max_side` one
does; the maps and labels keep the image's own size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli_helpers import CAMS, PREDICT, SEG, TRAIN, VOC_IMAGES, build_voc, ok
from igcam_cli.core.cam import capped_size, normalize_cams, pyramid_cams, resize_bicubic_like_pil
from igcam_cli.data.transforms import normalize_on_device
from igcam_cli.models.classifier import load_checkpoint
from igcam_cli.store import MapStore

pytestmark = pytest.mark.slow

LARGE = (1200, 900)  # width, height: drawn at 300 x 225
MAX_SIDE = ["--max-side", "300"]


def test_capped_size_keeps_the_aspect_and_leaves_small_images_alone():
    assert capped_size((375, 500), 1024) is None and capped_size((3000, 4000), 0) is None
    assert capped_size((3000, 4000), 1024) == (768, 1024)
    assert capped_size((1, 5000), 1000) == (1, 1000)


def test_a_one_pixel_image_and_a_large_photo_go_through_make_cams_and_predict(tmp_path):
    images = {
        **VOC_IMAGES,
        "tiny": (1, 1, {"cat": (0, 0, 1, 1)}),
        "large": (*LARGE, {"dog": (150, 100, 750, 700)}),
    }
    splits = {"train": ["img_a", "img_b", "img_c", "tiny", "large"], "val": ["img_e", "tiny", "large"]}
    root = build_voc(tmp_path / "VOC2012", images, splits)
    ws = tmp_path / "ws"
    ok("init", "-w", ws, "--dataset", "voc", "--root", root, "--classes", "cat,dog")
    ok("train-cls", "-w", ws, *TRAIN, "--quiet")
    ok("make-cams", "-w", ws, "--split", "train", "--workers", "0", *MAX_SIDE, "--quiet")  # scales up to 2.0
    cams = MapStore(ws / "cams" / "train")
    assert cams.read("tiny").maps.shape == (1, 1, 1)
    large = cams.read("large")
    assert large.maps.shape == (1, LARGE[1], LARGE[0])

    # the large photo's maps: IRN's pyramid on the photo drawn at 300 x 225, upsampled to its size
    model = load_checkpoint(ws / "cls" / "model.pt", "igcam train-cls").eval()
    photo = np.asarray(Image.open(root / "JPEGImages" / "large.jpg").convert("RGB"))
    x = resize_bicubic_like_pil(torch.from_numpy(photo.transpose(2, 0, 1).copy())[None].float(), (225, 300))
    with torch.no_grad():
        drawn = pyramid_cams(model.cams, x, [1.0, 0.5, 1.5, 2.0], True, prepare=normalize_on_device)[:, 1:2]
    want = normalize_cams(F.interpolate(drawn, size=(LARGE[1], LARGE[0]), mode="bilinear", align_corners=False))[0]
    np.testing.assert_allclose(large.maps, want.numpy(), atol=2e-3, rtol=0)
    assert large.maps.max() == 1.0  # a real map, not an empty one

    ok("evaluate", "-w", ws, "--artifact", "cams", "--split", "train", "--quiet")
    assert json.loads((ws / "eval" / "cams-train.json").read_text())["n_images"] == 5
    ok("crf", "-w", ws, "--split", "train", *CAMS[:2], "--source", "cams", "--quiet")
    ok("train-seg", "-w", ws, *SEG)
    ok("predict", "-w", ws, "--split", "val", *PREDICT, *MAX_SIDE)
    for image_id, (width, height) in (("tiny", (1, 1)), ("large", LARGE)):
        with Image.open(ws / "pred" / "val" / f"{image_id}.png") as label:
            assert label.size == (width, height)
    ok("evaluate", "-w", ws, "--artifact", "seg", "--split", "val", "--quiet")
