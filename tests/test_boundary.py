"""core/boundary.py: pixel-adaptive affinity kernel, propagation and coarse-to-fine boundary enhancement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from igcam_cli.core.boundary import (
    BoundaryParams,
    affinity_kernel,
    multiscale_boundary,
    neighbour_offsets,
    propagate,
    working_scales,
)

LEFT, RIGHT = (0.8, 0.2, 0.2), (0.2, 0.3, 0.8)  # two well-separated RGB colours


pytestmark = pytest.mark.usefixtures("one_thread")


def _textured(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random smooth colour blobs plus pixel noise: edges and texture everywhere."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, h // 6), max(2, w // 6), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.randn(batch, 3, h, w, generator=g)).clamp(0, 1)


def _two_colour(h: int = 24, w: int = 40, edge: int = 20, noise: float = 0.02) -> torch.Tensor:
    """1 x 3 x h x w image: colour LEFT on columns < edge, RIGHT from edge on, plus a little noise."""
    img = torch.empty(1, 3, h, w)
    img[:, :, :, :edge] = torch.tensor(LEFT)[:, None, None]
    img[:, :, :, edge:] = torch.tensor(RIGHT)[:, None, None]
    g = torch.Generator().manual_seed(1)
    return img + noise * torch.randn(img.shape, generator=g)


# --------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("include_centre", [True, False])
@pytest.mark.parametrize("sigma_xy", [16.0, math.inf])
def test_weights_are_nonnegative_and_sum_to_one(include_centre: bool, sigma_xy: float) -> None:
    dilations = (1, 3, 9)
    kernel = affinity_kernel(_textured(2, 23, 31), dilations, sigma_xy=sigma_xy, include_centre=include_centre)
    assert kernel.shape == (2, len(neighbour_offsets(dilations, include_centre)), 23, 31)
    assert (kernel >= 0).all()
    torch.testing.assert_close(kernel.sum(1), torch.ones(2, 23, 31), atol=1e-5, rtol=0)


def test_kernel_ignores_the_image_value_range() -> None:
    """Normalised by the local colour spread: [0, 1], 0..255 and mean/std-normalised images agree."""
    img = _textured(1, 20, 20)
    ref = affinity_kernel(img)
    normalised = (img - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / 0.226
    torch.testing.assert_close(affinity_kernel(img * 255), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(affinity_kernel(normalised), ref, atol=1e-4, rtol=0)


def test_kernel_prefers_same_colour_neighbours() -> None:
    """Just left of the edge, the right-hand neighbour (other colour) gets almost no weight."""
    kernel = affinity_kernel(_two_colour(), dilations=(1,), include_centre=True)
    offsets = neighbour_offsets((1,), include_centre=True)
    left_n, right_n = offsets.index((0, -1)), offsets.index((0, 1))
    pixel = kernel[0, :, 12, 19]  # last column of the left colour
    assert pixel[right_n] < 1e-3 * pixel[left_n]


# --------------------------------------------------------------------------- propagation


def test_constant_map_stays_constant_everywhere_including_borders() -> None:
    img = _textured(2, 29, 37, seed=3)
    maps = torch.tensor([0.7, -2.0, 5.0])[None, :, None, None].expand(2, 3, 29, 37).contiguous()
    out = propagate(maps, affinity_kernel(img), iterations=8)
    torch.testing.assert_close(out, maps, atol=1e-5, rtol=0)
    out = multiscale_boundary(img, maps, rescale=False)
    torch.testing.assert_close(out, maps, atol=1e-5, rtol=0)


def test_blurred_edge_is_sharpened_at_the_colour_edge() -> None:
    """Map = 1 on the left colour but blurred over columns 15..24: it becomes a step at column 20.

    Propagation averages within each colour region, so the mass that had leaked right of the edge
    is spread thinly over the right region instead of piling up next to the edge, and every
    threshold in [0.1, 0.9] (not just 0.5, as for the blurred input) recovers the true edge.
    """
    img = _two_colour()
    cols = torch.arange(40, dtype=torch.float32)
    blurred = ((24.5 - cols) / 10).clamp(0, 1).expand(1, 1, 24, 40).contiguous()
    step = (cols < 20).expand(1, 1, 24, 40)
    thresholds = torch.linspace(0.1, 0.9, 9)

    out = propagate(blurred, affinity_kernel(img), iterations=10)
    assert out[..., 20:25].sum() < 0.35 * blurred[..., 20:25].sum()  # the leak next to the edge
    assert out[..., 19].min() > out[..., 20].max() + 0.8  # one sharp jump, exactly at the edge
    assert not all(torch.equal(blurred > t, step) for t in thresholds)
    assert all(torch.equal(out > t, step) for t in thresholds)

    for rescale in (False, True):  # every scale of this 24 x 40 image, 10 steps each
        ms = multiscale_boundary(img, blurred, rescale=rescale, min_side=0, iterations=10)
        assert all(torch.equal(ms > t, step) for t in thresholds)


def test_mass_spreads_over_its_colour_region_and_stops_at_the_edge() -> None:
    img = _two_colour()
    patch = torch.zeros(1, 1, 24, 40)
    patch[..., 10:14, 5:9] = 1.0
    out = propagate(patch, affinity_kernel(img), iterations=10)
    left, right = out[..., :20], out[..., 20:]
    assert left.min() > 0.5 * left.mean()  # the whole left region is filled, nearly evenly
    assert left.std() < 0.2 * left.mean()
    assert right.max() < 1e-6 * left.min()  # nothing crosses the edge


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_propagation_stays_within_the_input_range(alpha: float) -> None:
    """Convex combinations only: no value outside each map's [min, max]."""
    g = torch.Generator().manual_seed(5)
    img = _textured(2, 26, 33, seed=5)
    maps = torch.randn(2, 4, 26, 33, generator=g) * torch.tensor([1.0, 3.0, 0.1, 10.0])[:, None, None]
    lo = maps.flatten(-2).amin(-1)[..., None, None]
    hi = maps.flatten(-2).amax(-1)[..., None, None]
    tol = 1e-5 * hi.abs().clamp_min(1)
    out = propagate(maps, affinity_kernel(img), iterations=15, alpha=alpha)
    assert (out >= lo - tol).all() and (out <= hi + tol).all()
    out = multiscale_boundary(img, maps, rescale=False, alpha=alpha)
    assert (out >= lo - tol).all() and (out <= hi + tol).all()


def test_alpha_anchors_to_the_input() -> None:
    img, patch = _two_colour(), torch.zeros(1, 1, 24, 40)
    patch[..., 10:14, 5:9] = 1.0
    kernel = affinity_kernel(img)
    free, anchored = propagate(patch, kernel, 10), propagate(patch, kernel, 10, alpha=0.5)
    assert anchored[..., 10:14, 5:9].min() > 0.5 > free[..., 10:14, 5:9].max()


def test_kernel_and_dilations_must_match() -> None:
    kernel = affinity_kernel(_textured(1, 12, 12), dilations=(1, 2))
    with pytest.raises(ValueError, match="neighbours"):
        propagate(torch.zeros(1, 1, 12, 12), kernel, 1, dilations=(1, 2, 4))
    with pytest.raises(ValueError, match="differ"):
        propagate(torch.zeros(1, 1, 12, 13), kernel, 1, dilations=(1, 2))


# --------------------------------------------------------------------------- coarse to fine


def test_batched_equals_one_by_one() -> None:
    images = _textured(3, 40, 52, seed=7)
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(3, 2, 40, 52, generator=g)
    together = multiscale_boundary(images, maps)
    alone = torch.cat([multiscale_boundary(images[i : i + 1], maps[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_odd_sizes_and_coarse_maps_come_back_at_image_size() -> None:
    img = _textured(2, 45, 61, seed=2)
    maps = torch.rand(2, 3, 45, 61)
    assert multiscale_boundary(img, maps).shape == (2, 3, 45, 61)
    stride16 = torch.rand(2, 3, 3, 4)  # CAMs at network resolution are accepted too
    assert multiscale_boundary(img, stride16, scales=(0.3, 0.7, 1.0)).shape == (2, 3, 45, 61)
    assert multiscale_boundary(img, maps[:, :0]).shape == (2, 0, 45, 61)
    assert multiscale_boundary(img[:0], maps[:0]).shape == (0, 3, 45, 61)


def test_min_side_skips_coarse_scales_of_small_images() -> None:
    params = BoundaryParams(scales=(0.25, 0.5, 1.0), min_side=64)
    assert working_scales((128, 160), params) == (0.5, 1.0)
    assert working_scales((375, 500), params) == (0.25, 0.5, 1.0)
    assert working_scales((40, 40), params) == (1.0,)  # the finest scale always runs
    img, maps = _textured(1, 128, 136, seed=3), torch.rand(1, 2, 128, 136)
    torch.testing.assert_close(
        multiscale_boundary(img, maps, params), multiscale_boundary(img, maps, scales=(0.5, 1.0)), atol=0, rtol=0
    )


def test_deterministic() -> None:
    img, maps = _textured(2, 33, 35, seed=4), torch.rand(2, 2, 33, 35)
    assert torch.equal(multiscale_boundary(img, maps), multiscale_boundary(img, maps))


def test_rescale_restores_each_input_peak_and_keeps_zero_maps() -> None:
    img = _textured(1, 32, 32, seed=6)
    maps = torch.zeros(1, 3, 32, 32)
    maps[0, 0, 4:8, 4:8] = 1.0  # small blob: its peak drops when propagated
    maps[0, 1, 20:30, 2:30] = 0.6
    out = multiscale_boundary(img, maps)
    torch.testing.assert_close(out.flatten(-2).amax(-1), torch.tensor([[1.0, 0.6, 0.0]]), atol=1e-6, rtol=0)
    assert (out >= 0).all() and not out[0, 2].any()
    assert multiscale_boundary(img, maps, rescale=False)[0, 0].max() < 1.0


def test_dtype_is_kept() -> None:
    img, maps = _textured(1, 20, 24), torch.rand(1, 2, 20, 24)
    out = multiscale_boundary(img.double(), maps.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), multiscale_boundary(img, maps), atol=2e-2, rtol=0)
    reference = multiscale_boundary(img, maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # elementwise math only: autocast changes nothing
        auto = multiscale_boundary(img, maps)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(scales=()),
        dict(scales=(1.0, 0.5)),
        dict(scales=(0.5, 2.0)),
        dict(iterations=-1),
        dict(dilations=(0, 2)),
        dict(sigma_rgb=0.0),
        dict(alpha=1.0),
        dict(eps=0.0),
        dict(min_side=-1),
    ],
)
def test_params_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError):
        BoundaryParams(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    img, maps = _textured(2, 45, 61, seed=8), torch.rand(2, 3, 45, 61)
    cpu = multiscale_boundary(img, maps)
    gpu = multiscale_boundary(img.cuda(), maps.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = multiscale_boundary(img.cuda(), maps.cuda())
    torch.testing.assert_close(auto.float().cpu(), cpu, atol=1e-4, rtol=0)
