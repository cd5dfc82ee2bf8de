"""Image transforms for the classifier: ImageNet normalisation, random rescale/flip/crop."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from igcam_cli.models.classifier import IMAGENET_MEAN, IMAGENET_STD

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
_STD = np.array(IMAGENET_STD, dtype=np.float32) * 255


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> float32 3 x H x W, ImageNet mean/std."""
    return torch.from_numpy(((image.astype(np.float32) - _MEAN) / _STD).transpose(2, 0, 1).copy())


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W float images with uint8 values -> ImageNet mean/std, on their device."""
    mean = torch.tensor(_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def multi_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Class indices 1..C -> the classifier's float target of length C."""
    target = torch.zeros(num_classes)
    target[torch.as_tensor(labels, dtype=torch.long) - 1] = 1.0
    return target


def resize_long(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))  # IRN's resize


def train_view(
    image: np.ndarray, crop: int, scale_min: float, scale_max: float, rng: np.random.Generator, crop_height: int = 0
) -> torch.Tensor:
    """IRN-style augmentation: long side to s * crop, random flip, random crop padded with zeros.
    The canvas is crop x crop, or crop_height x crop (rows x columns) when crop_height is set."""
    image = resize_long(image, round(crop * rng.uniform(scale_min, scale_max)))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    x = normalize(image)
    return _random_crop(x, crop_height or crop, crop, rng)


def eval_view(image: np.ndarray, size: int, height: int = 0) -> torch.Tensor:
    """Long side to `size`, centred on a zero canvas of size x size, or height x size (batchable)."""
    x = normalize(resize_long(image, size))
    rows = height or size
    canvas = torch.zeros(3, rows, size)
    h, w = min(x.shape[1], rows), x.shape[2]
    src, top, left = (x.shape[1] - h) // 2, (rows - h) // 2, (size - w) // 2
    canvas[:, top : top + h, left : left + w] = x[:, src : src + h]
    return canvas


def _random_crop(x: torch.Tensor, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    _, h, w = x.shape
    canvas = torch.zeros(3, rows, cols)
    # Offsets pick a window of the image (when larger) and a place on the canvas (when smaller).
    src_y, dst_y = _offsets(h, rows, rng)
    src_x, dst_x = _offsets(w, cols, rng)
    ch, cw = min(h, rows), min(w, cols)
    canvas[:, dst_y : dst_y + ch, dst_x : dst_x + cw] = x[:, src_y : src_y + ch, src_x : src_x + cw]
    return canvas


def _offsets(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    if length > crop:
        return int(rng.integers(0, length - crop + 1)), 0
    return 0, int(rng.integers(0, crop - length + 1))


def seg_train_view(
    image: np.ndarray, label: np.ndarray, crop: int, scale_min: float, scale_max: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation augmentation, the same on image and label: the image rescaled by s in
    [scale_min, scale_max] (label: nearest neighbour), a random flip, a random crop x crop window
    (image padded with zeros after normalisation, i.e. the mean colour; label padded with 255).

    Returns (float32 3 x crop x crop, int64 crop x crop).
    """
    h, w = image.shape[:2]
    scale = rng.uniform(scale_min, scale_max)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    x = normalize(image)
    y = torch.from_numpy(label.astype(np.int64))
    ih, iw = y.shape
    src_y, dst_y = _offsets(ih, crop, rng)
    src_x, dst_x = _offsets(iw, crop, rng)
    ch, cw = min(ih, crop), min(iw, crop)
    x_out = torch.zeros(3, crop, crop)
    y_out = torch.full((crop, crop), 255, dtype=torch.int64)
    x_out[:, dst_y : dst_y + ch, dst_x : dst_x + cw] = x[:, src_y : src_y + ch, src_x : src_x + cw]
    y_out[dst_y : dst_y + ch, dst_x : dst_x + cw] = y[src_y : src_y + ch, src_x : src_x + cw]
    return x_out, y_out
