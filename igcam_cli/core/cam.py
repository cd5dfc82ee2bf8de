"""Class activation maps: multi-scale, flip-augmented aggregation and per-class normalisation.

`pyramid_cams` is IRN's `make_cam` (docs/METHOD.md §3) for the classifier's CAMs; `multiscale_cams`
is the plain bilinear test-time augmentation that `predict` uses for the segmenter's probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

CamFn = Callable[[torch.Tensor], torch.Tensor]  # B x 3 x h x w -> B x C x h' x w' (non-negative)


def multiscale_cams(cam_fn: CamFn, images: torch.Tensor, scales: Sequence[float], flip: bool = True) -> torch.Tensor:
    """Sum over scales (and horizontal flips) of the CAMs, each resized to the input size.

    images: B x 3 x H x W (normalised). Returns float32 B x C x H x W. A flipped pass is flipped
    back before summing, so the result of a flipped image is the flipped result.
    """
    size = images.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        # An explicit size samples with the exact in/out ratio, so that resizing commutes with a horizontal
        # flip also when size * scale is not an integer (e.g. 375 * 1.5); at least one pixel (a 1 x 1 image).
        scaled = (max(1, int(size[0] * scale)), max(1, int(size[1] * scale)))
        x = images if scale == 1.0 else F.interpolate(images, size=scaled, mode="bilinear", align_corners=False)
        if flip:
            out = cam_fn(torch.cat([x, x.flip(-1)])).float()
            out = out[: len(images)] + out[len(images) :].flip(-1)
        else:
            out = cam_fn(x).float()
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        total = out if total is None else total + out
    if total is None:
        raise ValueError("multiscale_cams needs at least one scale")
    return total


def pyramid_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """IRN's pyramid level: `np.round(s * H) x np.round(s * W)` (round half to even, as Python's round),
    at least 1 (where IRN would fail on an empty image)."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def capped_size(size: tuple[int, int], max_side: int) -> tuple[int, int] | None:
    """The size an H x W image is drawn at so that its longer side is at most `max_side` (aspect kept,
    rounded, at least 1), or None when it already fits (or `max_side` is 0: no cap)."""
    height, width = size
    if max_side <= 0 or max(height, width) <= max_side:
        return None
    ratio = max_side / max(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def own_side_cap(max_side: int, input_scale: float) -> int:
    """The cap on an image's own longer side that keeps it within `max_side` once drawn `input_scale` times as
    large (0: no cap), as make-cams applies it and refine's random walk follows it."""
    return max(1, round(max_side / input_scale)) if max_side else 0


def resize_bicubic_like_pil(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of uint8-valued float images (B x 3 x H x W, 0..255) the way PIL resizes uint8.

    PIL resamples rows along x, rounds half up to uint8, then resamples along y; torch's antialiased
    bicubic uses PIL's kernel (a = -0.5, support widened when shrinking). One torch pass differs from
    PIL by up to 20 grey levels when enlarging (PIL clips the overshoot between its passes); these two
    passes equal PIL at scales 0.5 and 2.0 and differ by 1 level on 0.1-0.2 % of pixels at 1.5 (PIL's
    fixed-point weights), measured on synthetic images.
    """
    wide = _round_half_up(F.interpolate(images, size=(images.shape[-2], size[1]), mode="bicubic", antialias=True))
    return _round_half_up(F.interpolate(wide, size=size, mode="bicubic", antialias=True))


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5).clamp(0, 255)


def pyramid_cams(
    cam_fn: CamFn,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool = True,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    stride: int = 16,
) -> torch.Tensor:
    """IRN's multi-scale CAM: the sum over scales of each scale's map on a stride-aligned canvas.

    images: B x 3 x H x W holding uint8 values (0..255, any float or integer dtype). Each scale
    resizes them as PIL does (`resize_bicubic_like_pil`) to `pyramid_size`, applies `prepare`
    (the normalisation), and runs `cam_fn` on the image and its mirror (ReLU per view, the mirror's
    map flipped back and added at feature resolution). The stride-`stride` map is upsampled to
    ceil(H/stride)*stride x ceil(W/stride)*stride and cropped to its top-left H x W, so a feature
    cell keeps covering `stride` pixels instead of being stretched over the image.
    Returns float32 B x C x H x W.
    """
    height, width = images.shape[-2:]
    canvas = (math.ceil(height / stride) * stride, math.ceil(width / stride) * stride)
    return _sum_over_scales(
        F.interpolate(out, size=canvas, mode="bilinear", align_corners=False)[..., :height, :width]
        for out in _scale_maps(cam_fn, images, scales, flip, prepare)
    )


def strided_cams(
    cam_fn: CamFn,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool = True,
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    stride: int = 4,
) -> torch.Tensor:
    """IRN's `strided_cam`, the input of its random walk: each scale's map (as in `pyramid_cams`) resized
    bilinearly onto the ceil(H/stride) x ceil(W/stride) grid and summed. Returns float32 B x C x h x w."""
    height, width = images.shape[-2:]
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    return _sum_over_scales(
        F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
        for out in _scale_maps(cam_fn, images, scales, flip, prepare)
    )


def _scale_maps(
    cam_fn: CamFn,
    images: torch.Tensor,
    scales: Sequence[float],
    flip: bool,
    prepare: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[torch.Tensor]:
    """Each scale's CAM at feature resolution: the PIL-like bicubic resize of the uint8 images, `prepare`,
    ReLU(CAM) of the image plus the flipped-back ReLU(CAM) of its mirror."""
    size = (images.shape[-2], images.shape[-1])
    images = images.float()
    for scale in scales:
        x = images if scale == 1.0 else resize_bicubic_like_pil(images, pyramid_size(size, scale))
        x = prepare(x)
        if flip:
            out = cam_fn(torch.cat([x, x.flip(-1)])).float()
            yield out[: len(images)] + out[len(images) :].flip(-1)
        else:
            yield cam_fn(x).float()


def _sum_over_scales(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    total: torch.Tensor | None = None
    for out in maps:
        total = out if total is None else total + out
    if total is None:
        raise ValueError("CAMs need at least one scale")
    return total


def normalize_cams(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """IRN's normalisation: each map (K x H x W or B x K x H x W) divided by its spatial maximum + `eps`.

    Negative values clamp to 0 first; an all-zero map stays all zero.
    """
    cams = cams.clamp_min(0)
    return cams / (cams.flatten(-2).amax(-1)[..., None, None] + eps)
