"""Class activation maps: multi-scale, flip-augmented aggregation and per-class normalisation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
        # recompute_scale_factor: sample with the exact in/out ratio, so that resizing commutes with
        # a horizontal flip also when size * scale is not an integer (e.g. 375 * 1.5).
        x = (
            images
            if scale == 1.0
            else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True
            )
        )
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


def normalize_cams(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide each map by its spatial maximum (K x H x W or B x K x H x W), so each peak is exactly 1.

    Negative values clamp to 0; maps whose maximum is at most `eps` (all zero) become all zero.
    """
    cams = cams.clamp_min(0)
    peak = cams.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > eps, cams / peak.clamp_min(eps), torch.zeros_like(cams))
