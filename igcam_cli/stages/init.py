"""init: write igcam.toml for a dataset, after checking that the dataset opens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from igcam_cli.config import SYNTHETIC_DEFAULTS
from igcam_cli.data import open_dataset, parse_class_list
from igcam_cli.data.synthetic import SYNTH_MARKER
from igcam_cli.errors import BadData, UsageError
from igcam_cli.workspace import Workspace

PRESETS = ("auto", "synthetic", "standard")
# Where each format keeps its splits, for the message when a dataset has none (a folder always has one)
SPLIT_FILES = {
    "voc": "ImageSets/Segmentation/<split>.txt",
    "coco": "annotations/instances_train2014.json or instances_val2014.json",
}
SIZE_SAMPLE = 32  # images read to find the size of a dataset's images
STRIDE = 16
MIN_GRID_SIDE = 256  # 16 cells of a stride-16 grid: smaller images are drawn twice as large


def choose_preset(fmt: str, root: Path | None, preset: str = "auto") -> str:
    """The stage settings `init` writes: `synthetic` (small images, ResNet-18 from scratch, CPU-sized)
    or `standard` (the built-in defaults: ImageNet ResNet-50, the IRN recipe). `auto` takes
    synthetic for the synthetic dataset and for a folder written by `igcam synth`."""
    if preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got '{preset}'")
    if preset != "auto":
        return preset
    from_synth = root is not None and (root.expanduser() / SYNTH_MARKER).is_file()
    return "synthetic" if fmt == "synthetic" or from_synth else "standard"


def run(
    path: Path,
    fmt: str,
    root: Path | None,
    classes: str | None,
    synthetic: dict[str, Any],
    force: bool = False,
    preset: str = "auto",
) -> Workspace:
    spec: dict[str, Any] = {"format": fmt}
    if fmt == "synthetic":
        if root is not None:
            raise UsageError("--root is not used with --dataset synthetic (use `igcam synth OUT` to write it to disk)")
        spec.update(synthetic)
    else:
        if root is None:
            raise UsageError(f"--dataset {fmt} needs --root PATH")
        spec["root"] = str(root.expanduser().resolve())
    if classes is not None:
        if fmt == "synthetic":
            raise UsageError("--classes is not used with --dataset synthetic")
        spec["classes"] = parse_class_list(classes)
    dataset = open_dataset(spec)  # fails here, with the file named, rather than in a later stage
    if fmt != "synthetic":
        if not dataset.splits():
            expected = SPLIT_FILES.get(fmt, "split files")
            raise BadData(f"the {fmt} dataset at {spec['root']} has no splits: expected {expected}")
        _check_labels(dataset)
    return Workspace.create(path, spec, _stage_defaults(choose_preset(fmt, root, preset), dataset), overwrite=force)


def _check_labels(dataset) -> None:
    """Read every image's labels once, so that a class missing from the class list (e.g. a VOC
    annotation naming a class that --classes lacks) fails init, naming its file."""
    for split in dataset.splits():
        for image_id in dataset.ids(split):
            dataset.labels(image_id)


def _stage_defaults(preset: str, dataset) -> dict[str, dict[str, Any]]:
    defaults: dict[str, dict[str, Any]] = {}
    if preset == "synthetic":
        defaults = {stage: dict(values) for stage, values in SYNTHETIC_DEFAULTS.items()}
    if "train_aug" in dataset.splits():  # the usual VOC recipe: classifier and segmenter on train_aug (10,582 images)
        defaults.setdefault("train-cls", {})["split"] = "train_aug"
        defaults.setdefault("train-seg", {})["split"] = "train_aug"  # `igcam run` makes its pseudo-labels there too
        defaults.setdefault("train-irn", {})["split"] = "train_aug"  # IR labels from the CAMs `igcam run` makes
    if preset == "synthetic":
        split = defaults["train-cls"].get("split", "train")
        sizes = [dataset.image_size(i) for i in dataset.ids(split)[:SIZE_SAMPLE]] if split in dataset.splits() else []
        if sizes:
            crop, crop_height = whole_image_crop(sizes)
            defaults["train-cls"]["crop"] = crop
            defaults["train-irn"]["crop"] = crop
            if crop_height != crop:
                defaults["train-cls"]["crop_height"] = crop_height
            scale = small_image_scale(sizes)
            if scale != 1:
                defaults["train-cls"]["input_scale"] = scale  # the canvas stays in the images' own pixels
                seg = defaults["train-seg"]
                seg["input_scale"] = scale
                seg["crop"] = int(seg["crop"] * scale)  # the same field of view, in the drawn pixels
    return defaults


def whole_image_crop(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The synthetic preset's classifier canvas (crop, crop_height) for images of these (height, width), so that
    training sees whole images at their own size, as make-cams' scale 1 does: the longest side, and for landscape
    images the tallest height, each rounded up to the output stride (16).
    Measured on the `textured` style cropped to 160 x 128 (160 train images), val mAP and CAM / refined
    mIoU (best tau): crop 128 (whole images downscaled by 0.8, padded to a square) 70.3, 33.2 / 44.0;
    crop 160 (padded to 160 x 160) 83.7, 34.7 / 48.1; 128 x 160 (no padding) 90.1, 35.5 / - (refined not run).
    On square 128 px data the canvas stays 128 x 128."""
    crop = _round_up(max(max(size) for size in sizes))
    landscape = all(h <= w for h, w in sizes)
    return crop, (_round_up(max(h for h, _ in sizes)) if landscape else crop)


def small_image_scale(sizes: list[tuple[int, int]]) -> float:
    """The synthetic preset's input_scale, for train-cls and train-seg alike, for images of these (height, width):
    2 where the median shorter side is under MIN_GRID_SIDE, so that a stride-16 grid has at least 16 cells across,
    else 1. Measured on all six synthetic styles at 128 px (one seed each; README, "Quality across synthetic
    styles" and "Drawing the classifier's images larger"). Segmenter, val mIoU x1 -> x2 on the same pseudo-labels:
    heads 76.3 -> 79.2, textured 45.8 -> 50.9, clutter 48.9 -> 53.3, shapes 18.8 -> 19.4, scales 37.0 -> 33.4.
    Classifier, CAM mIoU (best tau) x1 -> x2: heads 43.9 -> 43.1, textured 38.1 -> 39.9, shapes 22.1 -> 22.8,
    lookalike 32.8 -> 36.4, scales 29.6 -> 36.2, clutter 38.6 -> 35.8; CRF on refined maps, with refine's fill
    gain following the finer CAM grid: heads 77.0 -> 85.3, textured 56.9 -> 65.6, shapes 27.4 -> 27.6, lookalike
    43.9 -> 53.3, scales 37.7 -> 53.8, clutter 52.5 -> 52.6."""
    sides = sorted(min(size) for size in sizes)
    return 2.0 if sides[len(sides) // 2] < MIN_GRID_SIDE else 1.0


def _round_up(side: int) -> int:
    return -(-side // STRIDE) * STRIDE
