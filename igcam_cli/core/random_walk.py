"""IRN's random walk: inter-pixel affinities from a class-boundary map, and CAM propagation with them.

Follows Ahn, Cho & Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations" (CVPR 2019) and its code (github.com/jiwoon-ahn/irn); docs/RANDOM_WALK.md states every
convention and where this code departs from IRN's.

* Pairs: each pixel is paired with the pixels at a fixed set of offsets within ``radius`` (one
  half-plane of directions; a pair counts for both of its pixels). The affinity of a pair is
  ``1 - max boundary`` over the pixels of the discretised segment joining them, both ends included.
* Walk: the affinities raised to ``beta``, made symmetric, with self-affinity 1, and normalised so
  every column sums to 1 (IRN's ``aff / aff.sum(0)``) give the transition matrix T; a map x (a row
  vector over pixels) takes ``steps`` steps ``x <- x T``. Each step reads shifted views of the grid,
  so memory stays linear in the number of pixels (IRN builds the dense (HW)^2 matrix and squares it).
* Training: pair labels (both background / same class / different classes) from IR labels on the
  boundary map's grid, and IRN's affinity loss on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BG_THRESHOLD",
    "BETA",
    "IGNORE_LABEL",
    "STEPS",
    "STRIDE",
    "TRAIN_RADIUS",
    "WALK_RADIUS",
    "Offset",
    "PairLabels",
    "TransitionWeights",
    "affinities",
    "affinity_pair_labels",
    "apply_transition",
    "boundary_loss",
    "dense_transition",
    "downsample_ir_labels",
    "pair_affinities",
    "path_offsets",
    "path_points",
    "random_walk",
    "transition_weights",
    "walk_step",
    "walk_to_maps",
]

Offset = tuple[int, int]  # (dy, dx) from a pixel to its partner

WALK_RADIUS = 5  # IRN's make_sem_seg_labels: propagate_to_edge(radius=5)
TRAIN_RADIUS = 10  # IRN's train_irn: PathIndex(radius=10)
BETA = 10.0
STEPS = 256  # IRN squares T exp_times=8 times: T^(2^8)
BG_THRESHOLD = 0.25  # IRN's sem_seg_bg_thres
STRIDE = 4  # the boundary map's (and the walk's) grid, in input pixels
IGNORE_LABEL = 255
_EPS = 1e-5  # IRN's epsilon in the affinity loss


@cache
def path_offsets(radius: int = WALK_RADIUS) -> tuple[Offset, ...]:
    """IRN's pair offsets: (0, 1..r-1), and (dy, dx) with dy in 1..r-1, |dx| <= r-1 and dy²+dx² < r².

    One half-plane, so each unordered pair appears once. Ordered as IRN's PathIndex orders them:
    grouped by the number of pixels on the path, in search order within a group (34 for radius 5).
    """
    if radius < 2:
        raise ValueError(f"radius must be at least 2, got {radius}")
    reach = radius - 1
    found = [(0, dx) for dx in range(1, reach + 1)]
    found += [
        (dy, dx) for dy in range(1, reach + 1) for dx in range(-reach, reach + 1) if dy * dy + dx * dx < radius * radius
    ]
    return tuple(sorted(found, key=lambda offset: len(path_points(offset))))


@cache
def path_points(offset: Offset) -> tuple[Offset, ...]:
    """The pixels of the segment from (0, 0) to `offset`, both ends included.

    IRN's rule: the pixels of the bounding box whose distance to the line through both ends is below 1
    (in integers, ``(dy·x - dx·y)² < dy² + dx²``). Destination first, as IRN sorts them.
    """
    dy, dx = offset
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq
    ]
    return tuple(sorted(points, key=lambda p: -abs(p[0]) - abs(p[1])))


def _reach(offsets: Sequence[Offset]) -> int:
    return max(max(abs(dy), abs(dx)) for dy, dx in offsets)


def pair_affinities(boundary: torch.Tensor, offsets: Sequence[Offset]) -> torch.Tensor:
    """B x h x w boundary in [0, 1] -> B x D x h x w: ``1 - max boundary`` on the path to each offset's partner.

    As IRN, the map is padded with boundary 1 on the left, right and bottom (the offsets point down or
    right), so a pair whose partner lies outside the image gets affinity exactly 0.
    """
    if any(dy < 0 or (dy == 0 and dx <= 0) for dy, dx in offsets):
        raise ValueError("offsets must point into the lower half-plane: dy > 0, or dy == 0 and dx > 0")
    _, h, w = boundary.shape
    r = _reach(offsets)
    padded = F.pad(boundary, (r, r, 0, r), value=1.0)
    per_offset = []
    for offset in offsets:
        on_path = [padded[:, y : y + h, r + x : r + x + w] for y, x in path_points(offset)]
        per_offset.append(torch.stack(on_path, dim=1).amax(dim=1))
    return 1.0 - torch.stack(per_offset, dim=1)


def affinities(boundary: torch.Tensor, radius: int = WALK_RADIUS) -> tuple[tuple[Offset, ...], torch.Tensor]:
    """IRN's affinities within `radius`: (offsets, B x D x h x w affinity of each pixel to pixel + offset)."""
    offsets = path_offsets(radius)
    return offsets, pair_affinities(boundary, offsets)


def _shifted(grid: torch.Tensor, reach: int, dy: int, dx: int, size: tuple[int, int]) -> torch.Tensor:
    """grid padded by `reach` on all four sides -> the h x w view whose pixel p holds grid[p + (dy, dx)]."""
    h, w = size
    return grid[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w]


@dataclass(frozen=True)
class TransitionWeights:
    """T, column by column: new x(q) = self(q)·x(q) + Σ_d fwd_d(q)·x(q + o_d) + bwd_d(q)·x(q - o_d).

    Each B x [D x] h x w; together they are column q of T (self + Σ fwd + Σ bwd = 1 at every pixel).
    """

    offsets: tuple[Offset, ...]
    self_weight: torch.Tensor
    forward: torch.Tensor
    backward: torch.Tensor


def transition_weights(aff: torch.Tensor, offsets: Sequence[Offset], beta: float = BETA) -> TransitionWeights:
    """The column-stochastic T of IRN's walk from B x D x h x w pair affinities (see `pair_affinities`).

    The symmetric affinity matrix holds aff^beta for both orders of each pair and 1 on its diagonal;
    each column is divided by its sum. Pairs leaving the image have affinity 0 and so weight 0.
    """
    offsets = tuple(offsets)
    h, w = aff.shape[-2:]
    r = _reach(offsets)
    scaled = aff.clamp(0.0, 1.0).pow(beta)
    # the pair (q - o, q) is stored at q - o: read it back at q
    padded = F.pad(scaled, (r, r, r, r))
    backward = torch.stack([_shifted(padded[:, d], r, -dy, -dx, (h, w)) for d, (dy, dx) in enumerate(offsets)], dim=1)
    column_sum = 1.0 + scaled.sum(dim=1) + backward.sum(dim=1)
    return TransitionWeights(
        offsets=offsets,
        self_weight=1.0 / column_sum,
        forward=scaled / column_sum.unsqueeze(1),
        backward=backward / column_sum.unsqueeze(1),
    )


def walk_step(x: torch.Tensor, weights: TransitionWeights) -> torch.Tensor:
    """One step ``x <- x T`` for B x K x h x w maps, every class of an image with the same T."""
    h, w = x.shape[-2:]
    r = _reach(weights.offsets)
    padded = F.pad(x, (r, r, r, r))
    out = x * weights.self_weight.unsqueeze(1)
    for d, (dy, dx) in enumerate(weights.offsets):
        out.addcmul_(weights.forward[:, d : d + 1], _shifted(padded, r, dy, dx, (h, w)))
        out.addcmul_(weights.backward[:, d : d + 1], _shifted(padded, r, -dy, -dx, (h, w)))
    return out


def apply_transition(x: torch.Tensor, aff: torch.Tensor, offsets: Sequence[Offset], beta: float = BETA) -> torch.Tensor:
    """One step ``x <- x T``: x B x K x h x w, aff B x D x h x w from `affinities` with the same offsets."""
    return walk_step(x, transition_weights(aff, offsets, beta))


def random_walk(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    radius: int = WALK_RADIUS,
    beta: float = BETA,
    steps: int = STEPS,
) -> torch.Tensor:
    """IRN's propagation: cams B x K x h x w times (1 - boundary) (B x h x w), then `steps` steps of T.

    256 steps equal IRN's T^(2^8) (exp_times 8).
    """
    offsets, aff = affinities(boundary, radius)
    weights = transition_weights(aff, offsets, beta)
    x = cams * (1.0 - boundary).unsqueeze(1)
    for _ in range(steps):
        x = walk_step(x, weights)
    return x


def dense_transition(boundary: torch.Tensor, radius: int = WALK_RADIUS, beta: float = BETA) -> torch.Tensor:
    """B x h x w boundary -> B x hw x hw column-stochastic T, built densely as IRN does (small maps only).

    Row/column index of pixel (i, j) is i·w + j; ``x.flatten(-2) @ T`` is one walk step.
    """
    b, h, w = boundary.shape
    offsets, aff = affinities(boundary, radius)
    index = torch.arange(h * w, device=boundary.device).view(h, w)
    matrix = torch.eye(h * w, dtype=boundary.dtype, device=boundary.device).repeat(b, 1, 1)
    scaled = aff.clamp(0.0, 1.0).pow(beta)
    for d, (dy, dx) in enumerate(offsets):
        if dy >= h or abs(dx) >= w:
            continue
        rows, cols = slice(0, h - dy), slice(max(0, -dx), w - max(0, dx))
        src = index[rows, cols].flatten()
        dst = index[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx].flatten()
        value = scaled[:, d, rows, cols].flatten(1)
        matrix[:, src, dst] = value
        matrix[:, dst, src] = value
    return matrix / matrix.sum(dim=1, keepdim=True)


def walk_to_maps(walked: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Walked B x K x h x w maps -> B x K x H x W: upsampled x4 (bilinear), cropped to `size`, / their max.

    As IRN, the max is taken over all classes and pixels of an image (one number per image), so the
    classes keep their relative strength; IRN then puts a background score of 0.25 (`BG_THRESHOLD`) in
    front and takes the argmax. An all-zero image stays zero (IRN would divide by 0).
    """
    height, width = size
    up = F.interpolate(walked, scale_factor=STRIDE, mode="bilinear", align_corners=False)
    up = up[..., :height, :width]
    peak = up.flatten(1).amax(dim=1).clamp_min(_EPS)
    return up / peak.view(-1, 1, 1, 1)


def downsample_ir_labels(labels: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """H x W (or B x H x W) IR labels -> the boundary map's ceil(H/4) x ceil(W/4) grid, by nearest sampling.

    Keeps pixel (stride·i, stride·j), as IRN's cv2.resize(fx=0.25, INTER_NEAREST) on its 512 crops.
    """
    return labels[..., ::stride, ::stride]


class PairLabels(NamedTuple):
    """Float masks, B x D x h x w each, for the pair (p, p + offset_d): what IRN's loss expects."""

    bg_pos: torch.Tensor  # both background
    fg_pos: torch.Tensor  # both the same foreground class
    neg: torch.Tensor  # different labels, neither ignored


def affinity_pair_labels(
    labels: torch.Tensor, offsets: Sequence[Offset], ignore_index: int = IGNORE_LABEL
) -> PairLabels:
    """IR labels on the boundary grid (B x h x w, or h x w: 0 bg, 1..C classes, `ignore_index`) -> pair labels.

    Every pair with both pixels inside the image and neither ignored is labelled (see docs/RANDOM_WALK.md
    for how this differs from IRN's pair set at the borders).
    """
    if labels.dim() == 2:
        labels = labels.unsqueeze(0)
    labels = labels.long()
    h, w = labels.shape[-2:]
    r = _reach(offsets)
    padded = F.pad(labels, (r, r, r, r), value=ignore_index)
    partner = torch.stack([_shifted(padded, r, dy, dx, (h, w)) for dy, dx in offsets], dim=1)
    source = labels.unsqueeze(1)
    valid = (source != ignore_index) & (partner != ignore_index)
    same = valid & (source == partner)
    return PairLabels(
        bg_pos=(same & (source == 0)).float(),
        fg_pos=(same & (source > 0)).float(),
        neg=(valid & (source != partner)).float(),
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / (mask.sum() + _EPS)


def boundary_loss(boundary: torch.Tensor, pair_labels: PairLabels, offsets: Sequence[Offset]) -> torch.Tensor:
    """IRN's affinity loss for B x h x w boundary probabilities (sigmoid of the net's logits).

    With a = 1 - max boundary on a pair's path: positive pairs pay -log(a + 1e-5), negative pairs
    -log(1 + 1e-5 - a); each kind is averaged over its pairs in the whole batch, and the loss is
    (bg_pos/2 + fg_pos/2 + neg) / 2, the affinity half of IRN's total loss.
    """
    aff = pair_affinities(boundary, offsets)
    to_keep = -torch.log(aff + _EPS)
    to_cut = -torch.log(1.0 + _EPS - aff)
    positive = _masked_mean(to_keep, pair_labels.bg_pos) / 2 + _masked_mean(to_keep, pair_labels.fg_pos) / 2
    return (positive + _masked_mean(to_cut, pair_labels.neg)) / 2
