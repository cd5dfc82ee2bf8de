"""Pictures: label overlays, CAM heat maps and contact sheets (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from igcam_cli.atomic import write_atomically
from igcam_cli.store import voc_palette

_PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
# A small perceptual ramp (black -> purple -> orange -> yellow) for heat maps.
_HEAT_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colorize(label: np.ndarray) -> np.ndarray:
    """Class-index map -> RGB with the VOC palette (255 = ignore shows as cream)."""
    return _PALETTE[label]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend label colours over the image where the label is not background."""
    colour = colorize(label).astype(np.float32)
    weight = np.where(label[..., None] > 0, alpha, 0.0)
    return (image * (1 - weight) + colour * weight).astype(np.uint8)


def heatmap(maps: np.ndarray) -> np.ndarray:
    """K x H x W maps in [0, 1] -> RGB heat map of their per-pixel maximum."""
    peak = maps.max(axis=0) if len(maps) else np.zeros(maps.shape[1:], dtype=np.float32)
    x = np.clip(peak, 0, 1) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (x - low)[..., None]
    return (_HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac).astype(np.uint8)


def contact_sheet(rows: list[list[np.ndarray]], titles: list[str], path: Path, cell: int = 160) -> Path:
    """A grid of RGB images, one row per image id, one titled column per view."""
    pad, header = 4, 18
    width = len(titles) * (cell + pad) + pad
    height = header + len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad) + 2, 3), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), header + r * (cell + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_overlay(path: Path, image: np.ndarray, label: np.ndarray, quality: int = 90) -> Path:
    """`overlay(image, label)` as a JPEG, written under a temporary name and renamed."""
    return write_atomically(
        path, lambda tmp: Image.fromarray(overlay(image, label)).save(tmp, format="JPEG", quality=quality)
    )


def caption(image: np.ndarray, text: str, cell: int = 128) -> np.ndarray:
    """The image resized to cell x cell with `text` on a white band at its top (for contact sheets)."""
    tile = Image.fromarray(np.ascontiguousarray(image)).convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(tile)
    lines = text.split("\n")
    draw.rectangle((0, 0, cell, 11 * len(lines)), fill=(255, 255, 255))
    for k, line in enumerate(lines):
        draw.text((2, 11 * k), line[: cell // 6], fill=(0, 0, 0))
    return np.asarray(tile)
