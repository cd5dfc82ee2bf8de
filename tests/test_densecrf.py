"""Tests for igcam_cli.core.densecrf on small synthetic images."""

import numpy as np
import pytest

from igcam_cli.core.densecrf import (
    PRESETS,
    CrfParams,
    background_score,
    crf_labels,
    dense_crf,
)

H, W, EDGE = 60, 80, 40  # two flat-colour regions split at column EDGE


def two_region_image(seed: int = 0) -> np.ndarray:
    """Red left half, blue right half, with a little noise; H x W x 3 uint8."""
    image = np.zeros((H, W, 3), dtype=np.int64)
    image[:, :EDGE] = (200, 60, 60)
    image[:, EDGE:] = (60, 60, 200)
    noise = np.random.default_rng(seed).integers(-10, 11, size=image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def blurry_offset_foreground(shift: int = 10, width: float = 4.0) -> np.ndarray:
    """H x W foreground probability: a soft ramp that puts the edge ``shift`` columns too far left."""
    x = np.arange(W)
    ramp = 1.0 / (1.0 + np.exp(-(x - (EDGE - shift - 0.5)) / width))
    return np.broadcast_to(ramp, (H, W)).astype(np.float32)


TRUE_FG = np.broadcast_to(np.arange(W) >= EDGE, (H, W))


def test_presets_have_the_stated_numbers():
    def numbers(p: CrfParams):
        return (p.gauss_sxy, p.gauss_compat, p.bi_sxy, p.bi_srgb, p.bi_compat, p.iterations, p.unary)

    assert numbers(PRESETS["psa"]) == (3, 3, 80, 13, 10, 10, "softmax")
    assert numbers(PRESETS["irn"]) == (3, 3, 50, 5, 10, 10, "labels")
    assert PRESETS["irn"].gt_prob == 0.7
    assert numbers(PRESETS["deeplab"]) == (1, 3, 67, 3, 4, 10, "softmax")
    assert numbers(PRESETS["toco"]) == (1, 1, 121, 5, 4, 10, "softmax")


def test_params_validation():
    with pytest.raises(ValueError):
        CrfParams(3, 3, 80, 13, 10, unary="logits")
    with pytest.raises(ValueError):
        CrfParams(3, 3, 80, 13, 10, gt_prob=1.0)


def test_background_score_modes():
    maps = np.array([[[0.0, 0.5]], [[0.2, 1.0]]], dtype=np.float32)  # K=2, 1 x 2
    np.testing.assert_allclose(background_score(maps, "constant", tau=0.3), [[0.3, 0.3]])
    np.testing.assert_allclose(background_score(maps, "power", alpha=2.0), [[0.64, 0.0]])
    np.testing.assert_array_equal(background_score(np.zeros((0, 2, 3))), np.ones((2, 3)))
    with pytest.raises(ValueError):
        background_score(maps, "softmax")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_marginals_shape_dtype_and_normalisation(preset):
    rng = np.random.default_rng(1)
    probs = rng.random((3, H, W)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    marginals = dense_crf(two_region_image(), probs, PRESETS[preset])
    assert marginals.shape == (3, H, W)
    assert marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)
    assert marginals.min() >= 0.0


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_crf_snaps_to_the_colour_edge(preset):
    fg = blurry_offset_foreground()
    probs = np.stack([1.0 - fg, fg])
    before = ((probs.argmax(axis=0) == 1) == TRUE_FG).mean()
    after = ((dense_crf(two_region_image(), probs, PRESETS[preset]).argmax(axis=0) == 1) == TRUE_FG).mean()
    assert before == pytest.approx(1 - 10 / 80)  # columns 30..39 wrong
    assert after >= before + 0.1 and after > 0.98


def test_label_unary_uses_only_the_argmax():
    fg = blurry_offset_foreground()
    sharp = (fg > 0.5).astype(np.float32)
    soft = np.where(fg > 0.5, 0.6, 0.4).astype(np.float32)
    image, params = two_region_image(), PRESETS["irn"]
    from_sharp = dense_crf(image, np.stack([1 - sharp, sharp]), params)
    from_soft = dense_crf(image, np.stack([1 - soft, soft]), params)
    np.testing.assert_allclose(from_sharp, from_soft, atol=1e-6)
    # The softmax unary, by contrast, does see the difference.
    softmax = CrfParams(3, 3, 50, 5, 10)
    assert not np.allclose(
        dense_crf(image, np.stack([1 - sharp, sharp]), softmax),
        dense_crf(image, np.stack([1 - soft, soft]), softmax),
        atol=1e-3,
    )


def test_crf_labels_maps_class_indices_and_fixes_the_edge():
    fg = blurry_offset_foreground()
    maps = np.stack([fg, fg[:, ::-1]])  # class 3 on the right, class 7 on the left
    labels = crf_labels(
        two_region_image(), maps, np.array([3, 7], dtype=np.uint8), PRESETS["psa"], bg_mode="constant", bg_tau=0.05
    )
    assert labels.dtype == np.uint8 and labels.shape == (H, W)
    assert set(np.unique(labels)) <= {0, 3, 7}
    expected = np.where(TRUE_FG, 3, 7)
    assert (labels == expected).mean() > 0.95


def test_crf_labels_background_where_maps_are_weak():
    maps = np.zeros((1, H, W), dtype=np.float32)
    maps[0, :, EDGE:] = 0.9
    labels = crf_labels(two_region_image(), maps, np.array([5]), PRESETS["psa"])
    np.testing.assert_array_equal(labels, np.where(TRUE_FG, 5, 0))


def test_crf_labels_without_classes_is_all_background():
    labels = crf_labels(two_region_image(), np.zeros((0, H, W), np.float32), np.zeros(0, np.uint8), PRESETS["psa"])
    assert labels.dtype == np.uint8 and labels.shape == (H, W)
    assert not labels.any()


def test_confidence_threshold_marks_uncertain_pixels_255():
    # Left half: class 5 is certain. Right half: map 0.5 with alpha=1 gives background 0.5, a tie.
    # Near-zero pairwise weights keep the marginals close to the input, so the tie survives.
    maps = np.ones((1, H, W), dtype=np.float32)
    maps[0, :, EDGE:] = 0.5
    weak = CrfParams(gauss_sxy=3, gauss_compat=0.01, bi_sxy=80, bi_srgb=13, bi_compat=0.01)
    image, classes = two_region_image(), np.array([5])
    plain = crf_labels(image, maps, classes, weak, bg_alpha=1.0)
    assert not (plain == 255).any()
    labels = crf_labels(image, maps, classes, weak, bg_alpha=1.0, confidence=0.8)
    assert (labels[:, :EDGE] == 5).all()
    assert (labels[:, EDGE:] == 255).all()


def test_uncertain_band_of_the_maps_becomes_255():
    """Pixels whose largest map value lies strictly inside (low, high) are ignored, whatever the CRF says;
    at or outside the band the labels are the CRF's."""
    maps = np.full((2, H, W), 0.05, dtype=np.float32)
    maps[0, :, :EDGE] = 0.9  # confidently class 2 on the left
    maps[1, : H // 2, EDGE:] = 0.3  # class 6 half-sure in the top right; bottom right confidently background
    image, classes = two_region_image(), np.array([2, 6])
    plain = crf_labels(image, maps, classes, PRESETS["psa"])
    banded = crf_labels(image, maps, classes, PRESETS["psa"], uncertain=(0.15, 0.45))
    assert (banded[: H // 2, EDGE:] == 255).all()
    outside = np.ones((H, W), bool)
    outside[: H // 2, EDGE:] = False
    np.testing.assert_array_equal(banded[outside], plain[outside])
    assert (banded[:, :EDGE] == 2).all() and not (plain == 255).any()


def test_no_evidence_stays_uncertain_under_a_real_preset():
    # A tie everywhere is symmetric, so the CRF cannot break it: every marginal stays 0.5.
    maps = np.full((1, H, W), 0.5, dtype=np.float32)
    labels = crf_labels(two_region_image(), maps, np.array([5]), PRESETS["psa"], bg_alpha=1.0, confidence=0.6)
    assert (labels == 255).all()


def test_bad_shapes_raise_value_error():
    image = two_region_image()
    probs = np.full((2, H, W), 0.5, dtype=np.float32)
    params = PRESETS["psa"]
    with pytest.raises(ValueError, match="H x W x 3"):
        dense_crf(image[..., :2], probs, params)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32), probs, params)
    with pytest.raises(ValueError, match="image is"):
        dense_crf(image, probs[:, :, :-1], params)
    with pytest.raises(ValueError, match="L x H x W"):
        dense_crf(image, probs[0], params)
    with pytest.raises(ValueError, match="class labels"):
        crf_labels(image, probs, np.array([1]), params)
    with pytest.raises(ValueError, match="K x H x W"):
        crf_labels(image, probs[0], np.array([1]), params)
