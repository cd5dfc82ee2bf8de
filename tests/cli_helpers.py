"""Helpers shared by the tests: invoking the CLI, checking error output, tiny workspaces, stage configs
and VOC folders. The fixtures built from them (trained workspaces shared by a session) are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from igcam_cli.cli import app
from igcam_cli.config import RunOptions, TrainClsConfig, TrainSegConfig, build
from igcam_cli.stages import init as init_stage
from igcam_cli.store import voc_palette
from igcam_cli.workspace import Workspace

RUNNER = CliRunner()

# Small, fast settings for every stage through the CLI (the synthetic defaults in igcam.toml are for the demo).
TRAIN = "--epochs 1 --batch-size 4 --crop 64 --input-scale 1 --workers 0 --backbone resnet18 --pretrained none".split()
CAMS = ["--workers", "0", "--scales", "1.0,0.5"]
CRF = ["--workers", "1", "--source", "cams"]
SEG = "--epochs 1 --min-steps 0 --batch-size 4 --crop 48 --workers 0 --pretrained none --quiet".split()
PREDICT = ["--workers", "0", "--scales", "1.0,0.75", "--no-crf", "--quiet"]

# ... and through the stage modules.
OPTS = RunOptions(device="cpu", seed=0, quiet=True)
SYNTH = {"n_train": 8, "n_val": 4, "size": 64}  # `init`'s synthetic dataset: 8 train / 4 val images of 64 px


def igcam(*args) -> Result:
    """Run `igcam ARGS...` in-process; the result has exit_code, stdout, stderr and output."""
    return RUNNER.invoke(app, [str(a) for a in args])


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """A copy of `args` with `option`'s value replaced."""
    args = list(args)
    args[args.index(option) + 1] = value
    return args


def ok(*args):
    """Run a command that must succeed; on failure, show what it printed."""
    result = igcam(*args)
    assert result.exit_code == 0, (
        f"igcam {' '.join(map(str, args))} -> {result.exit_code}\n{result.output}\n{result.exception!r}"
    )
    return result


def assert_error(result, code: int, *fragments: str) -> str:
    """One `igcam: error:` line on stderr with the exit code and every fragment; no traceback.

    Returns the error line.
    """
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}\n{result.output}\n{result.exception!r}"
    # CliRunner turns an uncaught exception into exit code 1 and keeps it: an error must be a clean exit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("igcam: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def copy_workspace(src: Path, dst: Path) -> Path:
    """A private copy of a workspace; big checkpoints are hard-linked (stages replace them, never edit them)."""

    def link_or_copy(s, d):
        if s.endswith(".pt"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    return Path(shutil.copytree(src, dst, copy_function=link_or_copy))


def snapshot(root: Path, exclude: tuple[str, ...] = ("logs", "manifest.json", ".manifest.lock")) -> dict[str, tuple]:
    """relative path -> (inode, size, mtime) of every file under `root`, logs and the manifest left out.

    Stages replace files atomically and never edit them, so a rewrite shows as a new inode or mtime.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in exclude:
            st = path.stat()
            out[str(rel)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def assert_intact(before: dict[str, tuple], root: Path) -> None:
    """Every file of `before` is still there, not rewritten."""
    after = snapshot(root)
    changed = {k for k, v in before.items() if after.get(k) != v}
    assert not changed, f"changed or removed: {sorted(changed)}"


def pseudo_mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.png")}


def records(ws: Path) -> list[dict]:
    """Every run record of the workspace's manifest, oldest first."""
    return json.loads((Path(ws) / "manifest.json").read_text())["runs"]


# ---- tiny synthetic workspaces and stage configs ------------------------------------------------


def init_synthetic(ws: Path, n_train: int = 12, n_val: int = 4, size: int = 64) -> Path:
    """`igcam init` of a synthetic workspace (nothing run yet)."""
    ok("init", "-w", ws, "--dataset", "synthetic", "--n-train", n_train, "--n-val", n_val, "--image-size", size)
    return ws


def make_workspace(path: Path, n_train: int = 8, n_val: int = 4, size: int = 64) -> Workspace:
    """The same through the init stage's module."""
    return init_stage.run(path, "synthetic", None, None, {"n_train": n_train, "n_val": n_val, "size": size})


def tiny_cls_config(ws: Workspace, **overrides) -> TrainClsConfig:
    """train-cls for tiny images: 32 px crops drawn at their own size, batch 4, 2 epochs, no loader processes; the
    rest from igcam.toml."""
    return build(
        TrainClsConfig,
        ws.stage_table("train-cls"),
        {"crop": 32, "input_scale": 1.0, "batch_size": 4, "workers": 0, "epochs": 2, **overrides},
    )


def tiny_seg_config(ws: Workspace, **overrides) -> TrainSegConfig:
    """train-seg for tiny images: 48 px crops, batch 4, 2 epochs and no step minimum, random init."""
    values = {"crop": 48, "batch_size": 4, "workers": 0, "epochs": 2, "min_steps": 0, "pretrained": "none"}
    return build(TrainSegConfig, ws.stage_table("train-seg"), {**values, **overrides})


# ---- a tiny VOC-layout dataset -----------------------------------------------------------------

# id -> (width, height, {class name: box (x0, y0, x1, y1)})
VOC_IMAGES = {
    "img_a": (48, 64, {"cat": (6, 8, 30, 40)}),
    "img_b": (64, 48, {"dog": (20, 6, 56, 40)}),
    "img_c": (48, 64, {"cat": (4, 30, 26, 60), "dog": (28, 4, 44, 28)}),
    "img_d": (64, 48, {"cat": (8, 8, 28, 36)}),
    "img_e": (48, 64, {"dog": (10, 10, 40, 50)}),
    "img_f": (64, 48, {"cat": (36, 10, 60, 40), "dog": (4, 4, 30, 30)}),
}
VOC_SPLITS = {"train": ["img_a", "img_b", "img_c", "img_d"], "val": ["img_e", "img_f"]}
VOC_CLASSES = ["cat", "dog"]
COLOURS = {"cat": (220, 60, 40), "dog": (40, 80, 220)}


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    image.putpalette(voc_palette())
    image.save(path)


def build_voc(
    root: Path, images: dict = VOC_IMAGES, splits: dict = VOC_SPLITS, classes: list[str] = VOC_CLASSES
) -> Path:
    """JPEGImages/, SegmentationClass/ (palette PNGs, 255 borders), Annotations/, ImageSets/Segmentation/."""
    index = {name: i + 1 for i, name in enumerate(classes)}
    for seed, (image_id, (w, h, boxes)) in enumerate(images.items()):
        rng = np.random.default_rng(seed)
        pixels = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for name, (x0, y0, x1, y1) in boxes.items():
            pixels[y0:y1, x0:x1] = COLOURS.get(name, (0, 200, 0))
            mask[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 255
        for name, (x0, y0, x1, y1) in boxes.items():
            mask[y0:y1, x0:x1] = index.get(name, 255)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        objects = "".join(f"<object><name>{n}</name><difficult>0</difficult></object>" for n in boxes)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"</size>{objects}</annotation>"
        )
    split_dir = root / "ImageSets" / "Segmentation"
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (split_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def write_class_file(path: Path, classes: list[str] = VOC_CLASSES) -> Path:
    path.write_text("background\n" + "".join(f"{c}\n" for c in classes))
    return path


class Interrupted(KeyboardInterrupt):
    pass


@contextmanager
def interrupted_after_first_save(monkeypatch, stage_module) -> Iterator[None]:
    """A training stage run inside stops (KeyboardInterrupt) right after it saves its first epoch's last.pt."""
    original_save = stage_module._save

    def save_then_interrupt(*args):
        original_save(*args)
        raise Interrupted("stopped after the first epoch")

    monkeypatch.setattr(stage_module, "_save", save_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(stage_module, "_save", original_save)
