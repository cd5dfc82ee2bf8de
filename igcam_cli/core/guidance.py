"""Instance guidance: grow CAMs from their discriminative part to whole objects along regions.

Two sources of regions, one rule
--------------------------------
* ``instance_guidance`` (default, label-free): class-agnostic proposals from
  ``core.proposals.propose`` -- nested regions of a selective-search hierarchy, made from the
  image alone.
* ``gt_guidance`` (ORACLE, the honesty rule of docs/METHOD.md): the connected components of each class in a
  ground-truth mask. Not weakly supervised; callers must mark everything derived from it
  ``oracle = true``.

For class c (maps are K x H x W in [0, 1], each max-normalised) and region r:

    s_{c,r}  = mean of CAM_c inside r                                 (the paper's region score)
    q_c      = mean of CAM_c over its *core* {CAM_c >= anchor_threshold}
    s'_{c,r} = s_{c,r} / q_c                                          (1 = as dense as the core)
    fill     = min(1, fill_gain * s'_{c,r})

and, on selected regions, ``CAM'_c = max(CAM_c, fill)`` (a pixel in several selected regions
takes the largest fill), ``CAM'_c = outside_damping * CAM_c`` outside all of them; each map is
then divided by its maximum again.

Why this normalisation: a region that is exactly the discriminative part scores s' ~ 1; the whole
object, of which the CAM's core covers a fraction f, scores s' ~ f; the object plus as much
background scores ~ f / 2. With f ~ 0.2-0.5 (heads in the synthetic data, typical VOC CAMs) and
the default gain 2, the object's interior gets fill ~ 0.4-1, above usual background thresholds,
while every extra stretch of background dilutes the score and lowers the fill: since nested
proposals give a pixel the fill of the *smallest* selected region that reaches it from the
anchor, the guided map stays graded and a background threshold (or the CRF) still separates the
object from leakage. The price of this max rule: a small background piece that the hierarchy
merges with the discriminative part early gets a high fill too (tested only away from objects).

Selection (proposals only; ``gt_guidance`` selects every component of a present class):
* anchored: r holds at least ``min_anchor_cover`` of one connected component of the core, so a
  region is only grown from where the classifier actually fired;
* not too large: area <= ``max_area`` x image area (the top of the hierarchy is the whole image);
* dense enough: s'_{c,r} >= ``select_threshold`` (bounds how much unexplained area a region may
  carry -- region ~ 1 / select_threshold times the core at most);
* exclusive: class c holds at least ``min_share`` of the CAM mass of all classes inside r, so a
  region spanning two objects of different classes fills neither.

The key property (tested): an object whose CAM covers only its head, and whose body is a
homogeneous region merged with the head somewhere in the hierarchy, gets its body filled, while
background far from it is not raised (it lies in no selected region; damping only lowers it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp

from igcam_cli.core.proposals import Proposals

__all__ = ["GuidanceParams", "grid_fill_gain", "instance_guidance", "gt_guidance"]

_EPS = 1e-8


@dataclass(frozen=True)
class GuidanceParams:
    """Parameters of instance guidance; the defaults are `igcam refine`'s (config.RefineConfig).

    They were chosen on real CAMs across all six synthetic styles with benchmarks/refine_sweep.py,
    scored by refined mIoU and by CRF(refined) against CRF(CAM); config.RefineConfig's comments give
    the numbers. On simulated head-only CAMs (blurred head masks, which do not leak as real CAMs
    do) a stronger fill was better (fill_gain 2, anchor 0.5, max_area 0.5: IoU 0.72 vs 0.65 at
    fill_gain 1.5), and real CAMs disagreed: there a gain of 2 fills whole background regions from
    diffuse activation. max_area = 0.25 suits objects up to a quarter of the image; raise it for
    datasets with larger objects (VOC has some).

    anchor_threshold: CAM value (maps are max-normalised) that defines a class's core.
    min_anchor_cover: fraction of a core component a region must contain to be anchored on it.
    max_area:         largest selectable region, as a fraction of the image area.
    select_threshold: smallest normalised score s' = mean CAM / core mean of a selected region.
    min_share:        smallest share of the region's CAM mass (summed over classes) held by the class.
    fill_gain:        lambda in fill = min(1, lambda * s').
    outside_damping:  factor applied to the CAM outside every selected region (1 = no damping).
    """

    anchor_threshold: float = 0.6
    min_anchor_cover: float = 0.5
    max_area: float = 0.25
    select_threshold: float = 0.12
    min_share: float = 0.5
    fill_gain: float = 1.0
    outside_damping: float = 0.5

    def __post_init__(self) -> None:
        for name in ("anchor_threshold", "min_anchor_cover", "max_area", "min_share", "outside_damping"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.anchor_threshold <= 0.0:
            raise ValueError("anchor_threshold must be positive")
        if self.select_threshold < 0.0:
            raise ValueError(f"select_threshold must be >= 0, got {self.select_threshold}")
        if self.fill_gain <= 0.0:
            raise ValueError(f"fill_gain must be positive, got {self.fill_gain}")


def grid_fill_gain(cells: float) -> float:
    """The fill gain for CAMs with `cells` feature cells across the image's shorter side: 1 up to 8 cells, rising
    linearly to 2 at 16 cells and beyond. A coarse grid (a 128 px image at output stride 16) spreads each
    cell's activation over a patch larger than most objects, so its core already covers much of them and a
    gain of 1 fills enough; a finer one (the same image drawn twice as large, or a 500 px photo) peaks on the
    discriminative part, whose core covers a smaller share f of the object, and a region score s' ~ f needs
    the larger gain to fill it. Measured on six synthetic styles: README, "Drawing the classifier's images
    larger"."""
    return min(2.0, max(1.0, cells / 8.0))


# --------------------------------------------------------------------------- entry points


def instance_guidance(maps: np.ndarray, proposals: Proposals, params: GuidanceParams = GuidanceParams()) -> np.ndarray:
    """Guide K x H x W maps in [0, 1] with label-free region proposals; returns float32 K x H x W."""
    maps = _check_maps(maps, proposals.shape)
    if maps.shape[0] == 0:
        return maps.astype(np.float32)
    means = proposals.region_means(maps)  # K x R: s_{c,r}
    scores = means / _core_means(maps, params)[:, None]  # K x R: s'_{c,r}
    selected = (
        _anchored(maps, proposals, params)
        & (proposals.areas <= params.max_area * maps.shape[1] * maps.shape[2])[None, :]
        & (scores >= params.select_threshold)
        & (scores > 0.0)  # even with select_threshold 0, a region without activation is not "inside"
        & (_class_share(means) >= params.min_share)
    )
    fill = np.minimum(1.0, params.fill_gain * scores)
    seg_fill, seg_inside = _segment_fill(proposals.membership, fill, selected)
    return _apply(maps, proposals.paint(seg_fill), proposals.paint(seg_inside), params)


def gt_guidance(
    maps: np.ndarray, gt_mask: np.ndarray, classes: np.ndarray, params: GuidanceParams = GuidanceParams()
) -> np.ndarray:
    """ORACLE guidance: the regions of class ``classes[k]`` are the (4-connected) components of
    ``gt_mask == classes[k]``; every such component is selected, with the same fill/damp rule.

    gt_mask: H x W class indices (0 background, 255 ignore: neither is in ``classes``).
    Uses ground truth: anything derived from it must be marked ``oracle = true``."""
    maps = _check_maps(maps, np.asarray(gt_mask).shape)
    classes = np.asarray(classes).reshape(-1)
    if classes.shape[0] != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {classes.shape[0]} class labels")
    cores = _core_means(maps, params)
    fill_maps = np.zeros(maps.shape, dtype=np.float32)
    inside = np.zeros(maps.shape, dtype=bool)
    for k, c in enumerate(classes.tolist()):
        components, n = ndi.label(np.asarray(gt_mask) == c)
        if n == 0:
            continue
        flat = components.ravel()
        sums = np.bincount(flat, weights=maps[k].ravel().astype(np.float64), minlength=n + 1)[1:]
        areas = np.bincount(flat, minlength=n + 1)[1:]
        fill = np.minimum(1.0, params.fill_gain * sums / np.maximum(areas, 1) / cores[k])
        fill_maps[k] = np.concatenate([[0.0], fill])[components]
        inside[k] = components > 0
    return _apply(maps, fill_maps, inside, params)


# --------------------------------------------------------------------------- pieces


def _check_maps(maps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[1:] != tuple(shape):
        raise ValueError(f"maps must be K x {shape[0]} x {shape[1]}, got shape {maps.shape}")
    return maps


def _core_means(maps: np.ndarray, params: GuidanceParams) -> np.ndarray:
    """K mean CAM values over each class's core {CAM >= anchor_threshold} (1 when it is empty:
    such a map has no anchor, so nothing is selected and the value only avoids dividing by 0)."""
    core = maps >= params.anchor_threshold
    total = np.where(core, maps, 0.0).sum(axis=(1, 2), dtype=np.float64)
    count = core.sum(axis=(1, 2))
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def _class_share(means: np.ndarray) -> np.ndarray:
    """K x R share of each class in the region's CAM mass summed over classes (1 for one class)."""
    return means / np.maximum(means.sum(axis=0, keepdims=True), _EPS)


def _anchored(maps: np.ndarray, proposals: Proposals, params: GuidanceParams) -> np.ndarray:
    """K x R: region r holds >= min_anchor_cover of some connected component of class k's core."""
    out = np.zeros((maps.shape[0], proposals.num_regions), dtype=bool)
    segments = proposals.segments.ravel()
    s = proposals.num_segments
    for k in range(maps.shape[0]):
        components, n = ndi.label(maps[k] >= params.anchor_threshold)
        if n == 0:
            continue
        # S x n pixel counts of each core component in each segment, then R x n per region
        index = segments * (n + 1) + components.ravel()
        counts = np.bincount(index, minlength=s * (n + 1)).reshape(s, n + 1)[:, 1:]
        in_region = np.asarray(proposals.membership.T @ counts)
        sizes = counts.sum(axis=0)
        out[k] = (in_region >= params.min_anchor_cover * sizes[None, :]).any(axis=1)
    return out


def _segment_fill(membership: sp.csr_matrix, fill: np.ndarray, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K x S largest fill over the selected regions containing each segment, and K x S 'inside any'."""
    k = fill.shape[0]
    s = membership.shape[0]
    seg_fill = np.zeros((k, s))
    inside = np.zeros((k, s), dtype=bool)
    for i in range(k):
        cols = np.flatnonzero(selected[i])
        if cols.size == 0:
            continue
        sub = membership[:, cols]
        inside[i] = sub.getnnz(axis=1) > 0
        seg_fill[i] = (sub @ sp.diags(fill[i, cols])).max(axis=1).toarray().ravel()
    return seg_fill, inside


def _apply(maps: np.ndarray, fill: np.ndarray, inside: np.ndarray, params: GuidanceParams) -> np.ndarray:
    """max(CAM, fill) inside selected regions, damped CAM outside, each map renormalised to max 1."""
    maps = maps.astype(np.float32)
    out = np.where(inside, np.maximum(maps, fill.astype(np.float32)), params.outside_damping * maps)
    peak = out.reshape(out.shape[0], -1).max(axis=1) if out.size else np.zeros(out.shape[0], np.float32)
    return (out / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)
