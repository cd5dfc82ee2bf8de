"""Reading images and masks from disk, with one clear error per bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from igcam_cli.errors import BadData

# Pillow's modes for 16-bit greyscale PNGs (and 32-bit integer images), whose values run to 65535
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I")


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H x W x 3. Missing, unreadable or truncated files raise BadData."""
    if not path.is_file():
        raise BadData(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in WIDE_GREY:  # 16-bit greyscale: PIL's convert("RGB") would clip it to white
                grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadData(f"cannot read image {path}: {exc}") from None


def read_mask(path: Path, num_classes: int | None = None) -> np.ndarray:
    """Class-index mask, uint8 H x W (palette PNGs give their indices, not colours).

    With `num_classes` (C), values other than 0..C and 255 raise BadData.
    """
    if not path.is_file():
        raise BadData(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L", "I", "I;16"):
                raise BadData(f"mask {path} has mode {im.mode}; expected class indices (palette or greyscale PNG)")
            mask = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadData(f"cannot read mask {path}: {exc}") from None
    if mask.ndim != 2:
        raise BadData(f"mask {path} is not a single-channel image")
    if num_classes is not None:
        bad = (mask > num_classes) & (mask != 255)
        if bad.any():
            raise BadData(
                f"mask {path} holds class index {int(mask[bad].max())}, but there are only {num_classes} classes"
            )
    return mask.astype(np.uint8)


def check_same_size(image: np.ndarray, mask: np.ndarray, mask_path: Path) -> None:
    if image.shape[:2] != mask.shape:
        raise BadData(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}"
        )
