"""core/proposals.py: selective-search-style region proposals, label-free."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.ndimage as ndi

from igcam_cli.core.proposals import Proposals, propose
from igcam_cli.data.synthetic import _render


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _render(0, 0, 3).image  # 128 px, three objects on clutter


@pytest.fixture(scope="module")
def proposals(image) -> Proposals:
    return propose(image)


@pytest.fixture(scope="module")
def diverse(image) -> Proposals:
    """Several strategies: two scales (overlaid partitions), two similarities, two colour spaces."""
    return propose(image[:80, :96], scales=(100.0, 300.0), similarities=("ctsf", "sf"), color_spaces=("rgb", "lab"))


def _whole_image_index(p: Proposals) -> int:
    hits = [r for r, region in enumerate(p.regions) if len(region) == p.num_segments]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("which", ["proposals", "diverse"])
def test_segments_partition_the_image_and_the_top_region_covers_it(which, request):
    p: Proposals = request.getfixturevalue(which)
    assert p.segments.dtype == np.int32 and p.segments.shape == p.shape
    # labels 0..S-1, each used: the union of the base segments is every pixel, exactly once
    assert p.segments.min() == 0
    assert np.all(np.bincount(p.segments.ravel()) > 0)
    assert p.segment_areas.sum() == p.segments.size
    top = _whole_image_index(p)
    assert p.region_mask(top).all()
    assert p.areas[top] == p.segments.size
    # the first S regions are the base segments themselves
    assert all(p.regions[s].tolist() == [s] for s in range(p.num_segments))


@pytest.mark.parametrize("which", ["proposals", "diverse"])
def test_regions_are_connected_unions_of_base_segments(which, request):
    p: Proposals = request.getfixturevalue(which)
    assert len({tuple(r.tolist()) for r in p.regions}) == p.num_regions  # no duplicates
    assert p.strategy.shape == (p.num_regions,)
    eight = np.ones((3, 3), dtype=bool)
    for r, region in enumerate(p.regions):
        assert region.dtype == np.int32 and np.all(np.diff(region) > 0)
        mask = p.region_mask(r)
        # a union of whole base segments: every segment is entirely inside or entirely outside
        inside = np.bincount(p.segments[mask], minlength=p.num_segments)
        assert np.array_equal(np.flatnonzero(inside), region)
        assert np.array_equal(inside[region], p.segment_areas[region])
        assert mask.sum() == p.areas[r]
        # merges only join adjacent regions, so every proposal is one connected piece
        assert ndi.label(mask, structure=eight)[1] == 1


def test_single_strategy_is_a_binary_merge_tree(proposals):
    """Each merged region is the disjoint union of two earlier regions (the greedy hierarchy)."""
    p = proposals
    s = p.num_segments
    assert p.num_regions == 2 * s - 1
    seen = [set(r.tolist()) for r in p.regions]
    for r in range(s, p.num_regions):
        parts = [q for q in range(r) if seen[q] < seen[r]]
        maximal = [q for q in parts if not any(seen[q] < seen[o] for o in parts)]
        assert len(maximal) == 2
        a, b = (seen[q] for q in maximal)
        assert not (a & b) and (a | b) == seen[r]


def test_region_means_match_a_masked_mean_reference(proposals, diverse):
    rng = np.random.default_rng(0)
    for p in (proposals, diverse):
        maps = rng.random((3, *p.shape)).astype(np.float32)
        fast = p.region_means(maps)
        slow = np.stack([[maps[k][p.region_mask(r)].mean() for r in range(p.num_regions)] for k in range(3)])
        assert fast.shape == (3, p.num_regions)
        np.testing.assert_allclose(fast, slow, rtol=1e-6)
        first = maps[:, p.segments == 0].astype(np.float64).sum(1)
        np.testing.assert_allclose(p.region_sums(maps)[:, 0], first, rtol=1e-9)
        assert p.region_means(maps[:0]).shape == (0, p.num_regions)
        with pytest.raises(ValueError):
            p.region_means(maps[0])


def test_paint_maps_segment_values_to_pixels(proposals):
    p = proposals
    values = np.arange(2 * p.num_segments, dtype=np.float32).reshape(2, -1)
    painted = p.paint(values)
    assert painted.shape == (2, *p.shape)
    assert np.array_equal(painted[1], values[1][p.segments])


def test_propose_is_label_free():
    """The function cannot see labels, masks or CAMs: only an image and grouping parameters."""
    forbidden = ("label", "mask", "cam", "gt", "class", "map", "target", "annotation")
    params = inspect.signature(propose).parameters
    assert list(params)[0] == "image"
    for name in params:
        assert not any(word in name.lower() for word in forbidden), name
    # and nothing else can leak in: the result depends on the image (and parameters) alone
    scene = _render(0, 1, 7)
    a, b = propose(scene.image), propose(scene.image.copy())
    assert np.array_equal(a.segments, b.segments)
    assert [r.tolist() for r in a.regions] == [r.tolist() for r in b.regions]


def test_min_size_is_relative_to_the_image_area(image):
    coarse = propose(image, min_size=1e-2)
    fine = propose(image, min_size=1e-3)
    assert coarse.segment_areas.min() >= round(0.01 * image.shape[0] * image.shape[1])  # felzenszwalb min_size
    assert coarse.num_segments < fine.num_segments


def test_bad_inputs_are_refused(image):
    with pytest.raises(ValueError):
        propose(image.astype(np.float32))
    with pytest.raises(ValueError):
        propose(image[..., 0])
    with pytest.raises(ValueError):
        propose(image, similarities=("cx",))
    with pytest.raises(ValueError):
        propose(image, similarities=("cs",), color_spaces=("xyz",))
    with pytest.raises(ValueError):
        propose(image, scales=())
