"""Multi-scale boundary enhancement: training-free, pixel-adaptive affinity propagation (docs/METHOD.md §5).

Why
---
CAMs come out of a stride-16 network and are bilinearly upsampled, so their boundaries are blurred
over ~16 pixels and ignore the image's edges. Here every pixel repeatedly takes a weighted average of
its neighbours' map values, with weights that are large for neighbours of similar colour and tiny
across colour edges (a random walk on the image, as in PAR of AFA/ToCo and the random walk of IRN,
but with hand-set affinities, so nothing is trained). Mass then flows within colour regions and not
across their edges: blurred boundaries snap to image edges, and a region's interior evens out.

How
---
* Neighbours: the 8 pixels of a 3x3 neighbourhood dilated by each of ``dilations`` (N = 8·L), plus
  optionally the centre pixel itself. They are read as shifted views of a replicate-padded tensor
  (no copies, no unfold), and neighbours that fall outside the image get weight exactly 0, so the
  weights sum to 1 over real pixels: a constant map stays constant up to the border, and border
  pixels mix as fast as inner ones (with replicate padding alone, a border pixel would see itself
  and its own row many times over and lag behind).
* Weights (`affinity_kernel`), a softmax over the in-image neighbours q of p of

      -mean_c (ΔI_c / σ_c(p))² / sigma_rgb²  -  |p - q|² / (2 sigma_xy²)

  where ``ΔI = I_q - I_p`` and ``σ_c(p)`` is the standard deviation of channel c over p's neighbours
  (PAR's pixel-adaptive normalisation). Dividing by the *local* spread makes the kernel independent
  of the image's value range (RGB in [0, 1], 0..255 or ImageNet-normalised give the same weights)
  and adapts it to texture: an edge counts relative to how busy the neighbourhood is. The softmax
  makes the weights non-negative and sum to 1, so each step is a convex combination: a propagated
  map never leaves the [min, max] of its input and a constant map is a fixed point.
* Coarse to fine (`multiscale_boundary`): the same dilations reach 4x further at scale 0.25 than at
  full resolution, so the coarse scales move mass across whole objects cheaply and the fine scale
  snaps it to the exact edges. Each scale starts from the previous scale's result, upsampled.
  Averaging spreads a map's mass over its colour region, so a small object's peak drops; the
  final ``rescale`` gives every map its input peak back (see `BoundaryParams`).

Cost
----
The kernel is a B x N x H x W float32 tensor: for one 500 x 375 VOC image with the default 48
neighbours, 48 · 187,500 · 4 B = 36 MB (twice that at the peak, while the softmax runs). The coarser
scales' kernels are 1/16 and 1/4 of it and are freed before the next one is built. A batch of 16
VOC images thus peaks near 1.2 GB. Propagation never materialises the B x K x N x H x W neighbour
stack: it accumulates ``Σ_q w_q · (m(q) - m(p))`` one neighbour at a time (a Python loop over the N
*offsets*, each step a whole-batch tensor op), so it needs only a few maps-sized buffers.
All arithmetic is float32 whatever the input dtype (elementwise ops only, no matmul/conv, so bf16
autocast leaves it alone); results are returned in the maps' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "BoundaryParams",
    "neighbour_offsets",
    "affinity_kernel",
    "propagate",
    "multiscale_boundary",
    "working_scales",
]

Offset = tuple[int, int]  # (dy, dx)


@dataclass(frozen=True)
class BoundaryParams:
    """Parameters of multi-scale boundary enhancement; the defaults are `igcam refine`'s
    (config.RefineConfig), chosen on real CAMs across the synthetic styles (3 iterations, min_side 64;
    the numbers are in RefineConfig's comments).

    scales: image scales visited coarse to fine; the result is always returned at full resolution.
    min_side: skip the scales at which the image's shorter side would be below this many pixels
        (the finest scale always runs). The dilations are in pixels of the working scale, so on a
        small image a coarse scale lets the largest ones span most of the image and mass flows
        everywhere; this makes the same `scales` right for 128 px and 500 px images.
    iterations: propagation steps per scale. Each step moves mass by up to max(dilations) pixels
        of that scale, so 10 steps at scale 0.25 can cross a whole 500 px VOC image.
    dilations: 3x3 neighbourhood dilations (PAR's set). N = 8 · len(dilations) neighbours.
    sigma_rgb: colour bandwidth in units of the local colour standard deviation (PAR's w1 = 0.3).
        Smaller = edges stop propagation more strictly.
    sigma_xy: position bandwidth in pixels *of the working scale* (weight ∝ exp(-|p-q|²/2σ²)).
        At 16, a diagonal neighbour at dilation 24 (34 px) weighs e^-2.25 ≈ 0.1 of an equally
        coloured adjacent one: far neighbours still carry mass across an object, near ones
        dominate. ``math.inf`` disables the term so all dilations are equal (PAR).
    include_centre: also give the pixel itself a (colour-similarity 1) weight, a "lazy" random
        walk. Off by default, as in PAR: a noisy pixel that differs from all its neighbours by a
        few local standard deviations would put almost all its weight on itself and keep its
        input value for ever (salt-and-pepper in the output); without the centre it takes the
        value of its most similar neighbours.
    alpha: anchoring to the starting map of each scale, ``m ← (1-α)·A·m + α·m₀``. 0 = pure
        propagation (PAR); larger keeps more of the input and limits how far mass travels.
    rescale: after the last scale, multiply each map by (input max / output max), so each map
        keeps its input peak (the CAM convention of `core.cam.normalize_cams`). Why: propagation
        averages, so a small object's peak drops as its mass spreads (and some of it leaks through
        weak edges); a fixed threshold would then lose the object. On the synthetic dataset
        (blurred GT-shaped maps, threshold 0.5) it is the difference between IoU 0.89 and 0.97.
        Meant for non-negative maps; all-zero maps stay zero. `propagate` never rescales.
    eps: added to the local colour standard deviation, for perfectly flat neighbourhoods.
    """

    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    min_side: int = 64
    iterations: int = 3
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    sigma_rgb: float = 0.3
    sigma_xy: float = 16.0
    include_centre: bool = False
    alpha: float = 0.0
    rescale: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.scales or any(not 0.0 < s <= 1.0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty sequence in (0, 1], got {self.scales}")
        if list(self.scales) != sorted(self.scales):
            raise ValueError(f"scales must go coarse to fine (ascending), got {self.scales}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if self.min_side < 0:
            raise ValueError(f"min_side must be >= 0, got {self.min_side}")
        if not self.dilations or any(int(d) != d or d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be positive integers, got {self.dilations}")
        if self.sigma_rgb <= 0 or self.sigma_xy <= 0:
            raise ValueError(f"sigma_rgb and sigma_xy must be > 0, got {self.sigma_rgb}, {self.sigma_xy}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"alpha must lie in [0, 1), got {self.alpha}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


_DEFAULT = BoundaryParams()
_OUTSIDE = -1e30  # logit of a neighbour outside the image: weight exactly 0 (finite, so never NaN)


# --------------------------------------------------------------------------- neighbourhoods


def neighbour_offsets(dilations: Sequence[int], include_centre: bool = False) -> list[Offset]:
    """(dy, dx) of the N neighbours, in kernel channel order: 8 per dilation, then the centre."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = [(dy * int(d), dx * int(d)) for d in dilations for dy, dx in ring]
    return offsets + [(0, 0)] if include_centre else offsets


def _pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Replicate-pad the last two dims. Out-of-image neighbours get weight 0 (see `_inside`), so
    the padding only has to be finite; replicate is also the natural value if one ever leaks in."""
    return F.pad(x, [pad] * 4, mode="replicate") if pad > 0 else x


def _shifted(padded: torch.Tensor, offset: Offset, pad: int, size: Sequence[int]) -> torch.Tensor:
    """View of ``x[..., p + offset]`` for every pixel p, from ``_pad(x, pad)`` (no copy)."""
    (dy, dx), (h, w) = offset, size
    return padded[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _offsets_for(n: int, dilations: Sequence[int]) -> list[Offset]:
    """Recover the offsets of an N-channel kernel: N = 8·L (no centre) or 8·L + 1 (centre)."""
    ring = 8 * len(dilations)
    if n not in (ring, ring + 1):
        raise ValueError(f"kernel has {n} neighbours; dilations {tuple(dilations)} give {ring} or {ring + 1}")
    return neighbour_offsets(dilations, include_centre=n == ring + 1)


# --------------------------------------------------------------------------- the kernel


def _inside(offset: Offset, size: Sequence[int], device: torch.device) -> torch.Tensor:
    """1 x H x W bool: where the neighbour at ``offset`` lies inside the image."""
    (dy, dx), (h, w) = offset, size
    y = torch.arange(h, device=device) + dy
    x = torch.arange(w, device=device) + dx
    return (((y >= 0) & (y < h))[:, None] & ((x >= 0) & (x < w))[None, :])[None]


def _local_colour_std(image: torch.Tensor, padded: torch.Tensor, offsets: Sequence[Offset], pad: int) -> torch.Tensor:
    """B x 3 x H x W standard deviation of each channel over each pixel's in-image neighbours.

    Computed from differences to the centre (shift-invariant, and small numbers, so the
    E[x²] - E[x]² formula loses little precision) without storing the neighbour stack.
    """
    size = image.shape[-2:]
    total = torch.zeros_like(image)
    total_sq = torch.zeros_like(image)
    count = torch.zeros_like(image[:1, :1])
    for offset in offsets:
        inside = _inside(offset, size, image.device)
        diff = (_shifted(padded, offset, pad, size) - image).mul_(inside)
        total += diff
        total_sq += diff * diff
        count += inside
    count.clamp_(min=1)
    mean = total / count
    return (total_sq / count - mean * mean).clamp_min(0).sqrt()


def _position_logits(offsets: Sequence[Offset], sigma_xy: float, like: torch.Tensor) -> torch.Tensor:
    """1 x N x 1 x 1 log position weights -|p-q|² / (2 sigma_xy²) (zeros when sigma_xy is inf)."""
    dist_sq = torch.tensor([dy * dy + dx * dx for dy, dx in offsets], dtype=like.dtype, device=like.device)
    return (-dist_sq / (2.0 * sigma_xy**2)).view(1, -1, 1, 1)


def affinity_kernel(
    image: torch.Tensor,
    dilations: Sequence[int] = _DEFAULT.dilations,
    sigma_rgb: float = _DEFAULT.sigma_rgb,
    sigma_xy: float = _DEFAULT.sigma_xy,
    include_centre: bool = _DEFAULT.include_centre,
    eps: float = _DEFAULT.eps,
) -> torch.Tensor:
    """Affinity weights B x N x H x W (non-negative, summing to 1 over N) from images B x 3 x H x W.

    Channel n is the weight of neighbour ``neighbour_offsets(dilations, include_centre)[n]``.
    Any value range works (the colour term is scale-invariant, see the module docstring).
    """
    if image.ndim != 4:
        raise ValueError(f"image must be B x C x H x W, got shape {tuple(image.shape)}")
    image = image.float()
    size = image.shape[-2:]
    pad = max(int(d) for d in dilations)
    padded = _pad(image, pad)
    ring = neighbour_offsets(dilations)
    # -1 / (C · sigma_rgb² · σ_c²): the mean over channels and the bandwidth folded into one factor
    factor = (_local_colour_std(image, padded, ring, pad) + eps).square_().mul_(-image.shape[1] * sigma_rgb**2)
    factor = factor.reciprocal_()  # B x C x H x W

    offsets = neighbour_offsets(dilations, include_centre)
    logits = torch.empty(image.shape[0], len(offsets), *size, dtype=image.dtype, device=image.device)
    for n, offset in enumerate(offsets):
        diff = _shifted(padded, offset, pad, size) - image
        outside = ~_inside(offset, size, image.device)
        logits[:, n] = diff.square_().mul_(factor).sum(1).masked_fill_(outside, _OUTSIDE)
    if math.isfinite(sigma_xy):
        logits += _position_logits(offsets, sigma_xy, logits)
    return torch.softmax(logits, dim=1)


# --------------------------------------------------------------------------- propagation


def propagate(
    maps: torch.Tensor,
    kernel: torch.Tensor,
    iterations: int,
    dilations: Sequence[int] = _DEFAULT.dilations,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Iterate ``m ← (1-α) · Σ_q kernel(p, q) · m(q) + α · m₀`` on maps B x K x H x W.

    Computed as ``m + Σ_q kernel(p, q) · (m(q) - m(p))`` (the same thing, as the weights sum to 1)
    so that constant maps are preserved to the last bit.

    ``kernel`` comes from `affinity_kernel` with the same ``dilations`` (with or without centre,
    read from its N). Every step is a convex combination, so the result stays within the
    per-map [min, max] of the input. alpha = 0 is pure propagation (a random walk, as PAR).
    Returns the maps' dtype; computes in float32.
    """
    if maps.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"maps and kernel must be 4-d, got {tuple(maps.shape)} and {tuple(kernel.shape)}")
    if maps.shape[0] != kernel.shape[0] or maps.shape[-2:] != kernel.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} and kernel {tuple(kernel.shape)} differ in batch or size")
    offsets = _offsets_for(kernel.shape[1], dilations)
    start = maps.float()
    kernel = kernel.float().unsqueeze(2)  # B x N x 1 x H x W: broadcasts over the K maps
    pad = max(int(d) for d in dilations)
    size = maps.shape[-2:]
    current = start
    step, buffer = torch.empty_like(start), torch.empty_like(start)
    for _ in range(iterations):
        padded = _pad(current, pad)
        # m(p) + Σ_q w(p,q) · (m(q) - m(p)) equals Σ_q w(p,q) · m(q) because the weights sum to 1,
        # but in floating point it keeps constant regions *exactly* constant (every difference is
        # 0), instead of drifting by the rounding of Σ w at every iteration.
        step.zero_()
        for n, offset in enumerate(offsets):
            if offset != (0, 0):  # the centre's difference is zero
                torch.sub(_shifted(padded, offset, pad, size), current, out=buffer)
                step.addcmul_(kernel[:, n], buffer)
        current = current + step
        if alpha > 0:
            current = current.mul_(1.0 - alpha).add_(start, alpha=alpha)
    return current.to(maps.dtype)


# --------------------------------------------------------------------------- coarse to fine


def working_scales(size: Sequence[int], params: BoundaryParams) -> tuple[float, ...]:
    """The scales of ``params.scales`` that `multiscale_boundary` visits for an image of ``size`` (H, W)."""
    kept = tuple(s for s in params.scales if min(_scaled_size(size, s)) >= params.min_side)
    return kept or params.scales[-1:]


def _scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking). Convex weights: values stay in [min, max]."""
    if tuple(x.shape[-2:]) == size:
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def multiscale_boundary(
    image: torch.Tensor, maps: torch.Tensor, params: BoundaryParams | None = None, **overrides: Any
) -> torch.Tensor:
    """Coarse-to-fine affinity propagation of maps B x K x h x w guided by images B x 3 x H x W.

    At each scale s in ``params.scales``: resize the image to round(s·H) x round(s·W), resize the
    current maps to it (the input maps at the first scale, the previous scale's result after),
    compute the kernel there and propagate ``params.iterations`` steps. Returns B x K x H x W maps
    (the *image's* size) in the maps' dtype. Keyword ``overrides`` replace fields of ``params``,
    e.g. ``multiscale_boundary(img, cams, scales=(0.5, 1.0))``. With ``rescale=False`` values stay
    within each input map's [min, max]; with ``rescale=True`` (default) each non-negative map
    additionally gets its input maximum back (values in [0, input max]).
    """
    params = dataclasses.replace(params or _DEFAULT, **overrides)
    if image.ndim != 4 or maps.ndim != 4 or image.shape[0] != maps.shape[0]:
        raise ValueError(
            f"image B x 3 x H x W and maps B x K x h x w expected, got {tuple(image.shape)} and {tuple(maps.shape)}"
        )
    full = tuple(image.shape[-2:])
    if maps.numel() == 0:
        return maps.new_zeros(*maps.shape[:2], *full)
    current, image = maps.float(), image.float()
    for scale in working_scales(full, params):
        size = _scaled_size(full, scale)
        current = _resize(current, size)
        kernel = affinity_kernel(
            _resize(image, size),
            params.dilations,
            params.sigma_rgb,
            params.sigma_xy,
            params.include_centre,
            params.eps,
        )
        current = propagate(current, kernel, params.iterations, params.dilations, params.alpha)
        del kernel  # free this scale's kernel before the next, larger one is built
    current = _resize(current, full)
    if params.rescale:
        current = _rescale_to_peak(current, maps.float())
    return current.to(maps.dtype)


def _rescale_to_peak(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``out`` so its maximum equals that of the same map in ``reference``.

    Maps whose output or reference maximum is not positive are left as they are.
    """
    peak_out = out.flatten(-2).amax(-1)[..., None, None]
    peak_ref = reference.flatten(-2).amax(-1)[..., None, None]
    ok = (peak_out > 0) & (peak_ref > 0)
    factor = torch.where(ok, peak_ref / peak_out.clamp_min(torch.finfo(out.dtype).tiny), 1.0)
    return out * factor
