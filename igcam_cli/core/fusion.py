"""Mixing spatial influence maps into CAMs (make-cams --influence-fusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igcam_cli.core.cam import normalize_cams


def influence_heat(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Spatial influence maps (K x h x w, any scale and sign) -> K x H x W in [0, 1]: the positive
    part (regions that help their class), bilinearly upsampled to `size`, divided by its maximum
    (an all-non-positive map becomes all zero)."""
    pos = maps.float().clamp_min(0)[None]
    if pos.shape[-2:] != tuple(size):
        pos = F.interpolate(pos, size=tuple(size), mode="bilinear", align_corners=False)
    # Not normalize_cams: its + 1e-5 would flatten maps whose whole scale is small (influence
    # values can be 1e-6 and less); any positive peak counts.
    peak = pos[0].flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, pos[0] / peak.clamp_min(torch.finfo(pos.dtype).tiny), torch.zeros_like(pos[0]))


def fuse(cams: torch.Tensor, influence: torch.Tensor, lam: float) -> torch.Tensor:
    """``normalize((1 - lam) cams + lam influence_heat)`` for normalised K x H x W CAMs and K x h x w
    influence maps of the same classes. ``lam = 0`` returns ``cams`` itself (untouched)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"influence fusion must be in [0, 1], got {lam}")
    if lam == 0.0:
        return cams
    heat = influence_heat(influence.to(cams.device), tuple(cams.shape[-2:]))
    return normalize_cams((1.0 - lam) * cams + lam * heat)
