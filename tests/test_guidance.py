"""core/guidance.py: instance guidance from label-free proposals, and the ORACLE GT guidance."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from igcam_cli.core.guidance import GuidanceParams, gt_guidance, instance_guidance
from igcam_cli.core.proposals import Proposals, propose
from igcam_cli.data.synthetic import _render

SIZE = 128


def _background(rng: np.random.Generator) -> np.ndarray:
    """Dull, busy background: low-frequency colour noise, grain and small clutter boxes."""
    low = ndi.zoom(rng.normal(0.0, 18.0, (8, 8, 3)), (SIZE / 8, SIZE / 8, 1), order=1)
    img = np.array([115.0, 108.0, 98.0]) + low + rng.normal(0.0, 9.0, (SIZE, SIZE, 1))
    for _ in range(20):
        y, x = rng.integers(0, SIZE - 6, 2)
        img[y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = rng.uniform(40, 200, 3)
    return img


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _object(img: np.ndarray, rng: np.random.Generator, cy: float, cx: float, body_rgb, head_rgb):
    """Paint a flat-colour ellipse body and a striped disc head on its right end; return masks."""
    body = _ellipse(cy, cx, 17, 27)
    head = _ellipse(cy, cx + 30, 12, 12)
    stripes = np.broadcast_to(np.arange(SIZE) // 3 % 2 == 0, (SIZE, SIZE))  # vertical bands
    img[body] = np.asarray(body_rgb) + rng.normal(0.0, 3.0, (int(body.sum()), 1))
    img[head] = np.where(stripes[head][:, None], head_rgb, (30, 20, 10))
    return body | head, head


def _blob(cy: float, cx: float, sigma: float = 7.0) -> np.ndarray:
    """A CAM that sees only the head: a Gaussian blob on it, max 1."""
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return (blob / blob.max()).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def scene():
    """One object (blue body + yellow striped head) on clutter; CAM = blob on the head."""
    rng = np.random.default_rng(0)
    img = _background(rng)
    obj, head = _object(img, rng, 64, 46, (60, 110, 200), (240, 200, 20))
    image = np.clip(np.rint(ndi.uniform_filter(img, (3, 3, 1))), 0, 255).astype(np.uint8)
    cams = _blob(64, 76)[None]
    return image, obj, cams


@pytest.fixture(scope="module")
def two_classes():
    """Two objects of different classes, side by side, each CAM on its own head."""
    rng = np.random.default_rng(1)
    img = _background(rng)
    obj_a, _ = _object(img, rng, 32, 40, (60, 110, 200), (240, 200, 20))
    obj_b, _ = _object(img, rng, 94, 40, (170, 90, 140), (30, 210, 60))
    image = np.clip(np.rint(ndi.uniform_filter(img, (3, 3, 1))), 0, 255).astype(np.uint8)
    cams = np.stack([_blob(32, 70), _blob(94, 70)])
    return image, (obj_a, obj_b), cams


# A blob on the head is a CAM that does not leak at all; filling the body from it takes a strong fill
# (gain 2 on regions up to half the image). The shipped defaults fill more gently, because real CAMs
# leak and a gain of 2 filled background regions from them (config.RefineConfig's comments).
STRONG_FILL = GuidanceParams(anchor_threshold=0.5, max_area=0.5, fill_gain=2.0)


def test_guidance_fills_the_body_of_a_head_only_cam(scene):
    image, obj, cams = scene
    guided = instance_guidance(cams, propose(image), STRONG_FILL)
    before, after = _iou(cams[0] > 0.3, obj), _iou(guided[0] > 0.3, obj)
    assert before < 0.4
    assert after > 0.7, (before, after)


def test_background_far_from_the_object_is_not_raised(scene):
    """(Near the object, a small clutter piece merged with the head early may be filled too.)"""
    image, obj, cams = scene
    guided = instance_guidance(cams, propose(image))
    far = ndi.distance_transform_edt(~obj) > 12
    assert np.all(guided[0][far] <= cams[0][far] + 1e-6)
    assert guided[0][far].max() < 0.3


def test_guidance_keeps_classes_apart(two_classes):
    image, (obj_a, obj_b), cams = two_classes
    guided = instance_guidance(cams, propose(image), STRONG_FILL)
    for k, (mine, other) in enumerate([(obj_a, obj_b), (obj_b, obj_a)]):
        assert _iou(guided[k] > 0.3, mine) > 0.7
        raised = guided[k][other] > cams[k][other] + 1e-3
        assert raised.mean() < 0.02  # regions shared with the other class's object are not selected


def test_activation_outside_selected_regions_is_damped(scene):
    """A weak spurious blob far from any anchor (below the core threshold) is only scaled down."""
    image, obj, cams = scene
    spurious = 0.4 * _blob(20, 110, sigma=4.0)
    maps = np.maximum(cams, spurious[None])
    params = GuidanceParams(outside_damping=0.5)
    guided = instance_guidance(maps, propose(image), params)
    spot = spurious > 0.2
    np.testing.assert_allclose(guided[0][spot], 0.5 * maps[0][spot], rtol=1e-5)
    no_damping = instance_guidance(maps, propose(image), GuidanceParams(outside_damping=1.0))
    np.testing.assert_allclose(no_damping[0][spot], maps[0][spot], rtol=1e-5)


def test_gt_guidance_fills_the_gt_object_exactly(scene):
    image, obj, cams = scene
    gt = obj.astype(np.uint8) * 3  # class 3
    guided = gt_guidance(cams, gt, np.array([3]), STRONG_FILL)
    assert np.array_equal(guided[0] > 0.3, obj)
    # the fill is the region's normalised score: mean CAM over the object / mean over the CAM core
    core = cams[0] >= STRONG_FILL.anchor_threshold
    expected = min(
        1.0, STRONG_FILL.fill_gain * cams[0][obj].mean(dtype=np.float64) / cams[0][core].mean(dtype=np.float64)
    )
    inside_low = obj & (cams[0] < expected)
    assert inside_low.sum() > 0.5 * obj.sum()
    np.testing.assert_allclose(guided[0][inside_low], expected, rtol=1e-5)


def test_gt_guidance_uses_each_component_of_the_class(two_classes):
    image, (obj_a, obj_b), cams = two_classes
    gt = np.zeros((SIZE, SIZE), np.uint8)
    gt[obj_a], gt[obj_b] = 1, 2
    guided = gt_guidance(cams, gt, np.array([1, 2]), STRONG_FILL)
    assert np.array_equal(guided[0] > 0.3, obj_a)
    assert np.array_equal(guided[1] > 0.3, obj_b)
    with pytest.raises(ValueError):
        gt_guidance(cams, gt, np.array([1]))


def test_guidance_on_synthetic_dataset_scenes():
    """Head-only CAMs (blurred head masks) of real generator scenes: guidance helps on average."""
    before, after = [], []
    for i in range(8):
        s = _render(0, 1, i)
        classes = sorted(set(s.classes))
        cams = []
        for c in classes:
            heads = s.head & np.isin(s.owner, [j for j, cj in enumerate(s.classes) if cj == c])
            cam = ndi.gaussian_filter(heads.astype(np.float32), 3.0)
            cams.append(cam / cam.max())
        guided = instance_guidance(np.stack(cams), propose(s.image), STRONG_FILL)
        for k, c in enumerate(classes):
            before.append(_iou(cams[k] > 0.3, s.mask == c))
            after.append(_iou(guided[k] > 0.3, s.mask == c))
    assert np.mean(after) > np.mean(before) + 0.3, (np.mean(before), np.mean(after))


def test_shapes_dtypes_range_and_empty_maps(scene):
    image, obj, cams = scene
    props = propose(image)
    for maps in (cams, cams.astype(np.float64), np.concatenate([cams, 0.5 * cams, np.zeros_like(cams)])):
        out = instance_guidance(maps, props)
        assert out.shape == maps.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        peaks = out.reshape(len(out), -1).max(1)
        assert np.allclose(peaks[maps.reshape(len(maps), -1).max(1) > 0], 1.0)
    assert not out[2].any()  # an all-zero map stays zero
    empty = np.zeros((0, SIZE, SIZE), np.float32)
    for out in (instance_guidance(empty, props), gt_guidance(empty, np.zeros((SIZE, SIZE), np.uint8), [])):
        assert out.shape == (0, SIZE, SIZE) and out.dtype == np.float32
    with pytest.raises(ValueError):
        instance_guidance(cams[:, :64], props)


def test_hand_made_proposals_select_only_anchored_regions():
    """Tiny exact case: 3 segments in a row; the CAM fires on segment 0 only."""
    segments = np.repeat(np.array([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]], np.int32), 4, axis=0)
    regions = [np.array([0]), np.array([1]), np.array([2]), np.array([0, 1]), np.array([0, 1, 2])]
    props = Proposals(segments, [r.astype(np.int32) for r in regions])
    cam = np.where(segments == 0, 1.0, 0.0)[None].astype(np.float32)
    params = GuidanceParams(max_area=0.6, select_threshold=0.1, fill_gain=1.0, outside_damping=0.5)
    out = instance_guidance(cam, props, params)
    # region {0,1} is anchored, within max_area (24/48) and scores 8/24 = 1/3: filled with 1/3;
    # segment 2 is only in the whole image (too large) -> outside, damped (CAM 0 there)
    np.testing.assert_allclose(out[0][segments == 0], 1.0)
    np.testing.assert_allclose(out[0][segments == 1], 1.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(out[0][segments == 2], 0.0)
    # allowing the whole image (score 8/48) fills segment 2 with 1/6; segment 1 keeps the best fill
    out = instance_guidance(cam, props, GuidanceParams(max_area=1.0, select_threshold=0.1, fill_gain=1.0))
    np.testing.assert_allclose(out[0][segments == 2], 1.0 / 6.0, rtol=1e-6)
    np.testing.assert_allclose(out[0][segments == 1], 1.0 / 3.0, rtol=1e-6)
    # a higher threshold drops region {0,1}: segment 1 is no longer filled
    out = instance_guidance(cam, props, GuidanceParams(max_area=0.6, select_threshold=0.5))
    np.testing.assert_allclose(out[0][segments == 1], 0.0)
    # a second class owning segment 1 takes region {0,1} away from class 0 (min_share)
    other = np.where(segments == 1, 1.0, 0.0).astype(np.float32)
    out = instance_guidance(np.stack([cam[0], other]), props, params)
    np.testing.assert_allclose(out[0][segments == 1], 0.0)
    np.testing.assert_allclose(out[1][segments == 1], 1.0)


def test_regions_without_an_anchor_are_not_selected():
    """Segment 1 has some activation (0.4, below the core threshold 0.5) but no core: its own
    region is not anchored, so it is not filled but damped like any unselected activation."""
    segments = np.repeat(np.array([[0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]], np.int32), 4, axis=0)
    props = Proposals(segments, [np.array([s], np.int32) for s in range(3)] + [np.arange(3, dtype=np.int32)])
    cam = np.select([segments == 0, segments == 1], [1.0, 0.4], 0.0)[None].astype(np.float32)
    out = instance_guidance(cam, props, GuidanceParams(select_threshold=0.1, outside_damping=0.5))
    np.testing.assert_allclose(out[0][segments == 0], 1.0)
    np.testing.assert_allclose(out[0][segments == 1], 0.2, rtol=1e-6)


def test_params_are_validated():
    with pytest.raises(ValueError):
        GuidanceParams(max_area=1.5)
    with pytest.raises(ValueError):
        GuidanceParams(fill_gain=0.0)
    with pytest.raises(ValueError):
        GuidanceParams(outside_damping=-0.1)
    with pytest.raises(ValueError):
        GuidanceParams(anchor_threshold=0.0)


def test_grid_fill_gain_rises_from_1_at_8_cells_to_2_at_16():
    from igcam_cli.core.guidance import grid_fill_gain

    assert [grid_fill_gain(c) for c in (1, 8, 12, 16, 31.25)] == [1.0, 1.0, 1.5, 2.0, 2.0]
