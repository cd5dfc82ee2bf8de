"""Tests for igcam_cli.core.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from igcam_cli.core.metrics import (
    best_threshold,
    class_prior_loss,
    confusion_matrix,
    image_prior_losses,
    learned_fractions,
    scores,
    threshold_confusions,
)

# Tiny 3 x 4 example with two ignored GT pixels (255).
GT = np.array([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 255, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 2], [1, 0, 0, 0]], dtype=np.uint8)
# Counted by hand: rows = GT, cols = prediction; the two ignored pixels are not counted.
EXPECTED = np.array([[3, 1, 0], [1, 3, 0], [1, 0, 1]], dtype=np.int64)


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(GT, PRED, num_labels=3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, EXPECTED)
    assert conf.sum() == 10  # 12 pixels minus 2 ignored


def test_ignore_value_is_skipped_whatever_the_prediction():
    gt = np.full((2, 2), 255, dtype=np.uint8)
    gt[0, 0] = 1
    pred = np.array([[1, 0], [2, 2]], dtype=np.uint8)
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 3), [[0, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(GT, PRED[:, :3], 3)
    bad = PRED.copy()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(GT, bad, 3)
    bad[0, 0] = 255
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(GT, bad, 3)
    bad_gt = GT.copy()
    bad_gt[0, 0] = 7
    with pytest.raises(ValueError, match="ground-truth"):
        confusion_matrix(bad_gt, PRED, 3)


def test_scores_by_hand():
    s = scores(EXPECTED, ["background", "cat", "dog"])
    # IoU = tp / (gt + pred - tp): 3/(4+5-3), 3/(4+4-3), 1/(2+1-1)
    np.testing.assert_allclose(s["iou"], [0.5, 0.6, 0.5])
    assert s["miou"] == pytest.approx(1.6 / 3)
    assert s["pixel_accuracy"] == pytest.approx(0.7)
    np.testing.assert_allclose(s["precision"], [3 / 5, 3 / 4, 1 / 1])
    np.testing.assert_allclose(s["recall"], [3 / 4, 3 / 4, 1 / 2])
    assert s["per_class"] == pytest.approx({"background": 0.5, "cat": 0.6, "dog": 0.5})


def test_miou_over_present_classes_only():
    conf = confusion_matrix(GT, PRED, num_labels=4)  # class 3 never appears
    s = scores(conf, ["background", "cat", "dog", "bird"])
    assert math.isnan(s["iou"][3])
    assert math.isnan(s["precision"][3]) and math.isnan(s["recall"][3])
    assert s["per_class"]["bird"] is None
    assert s["miou"] == pytest.approx(1.6 / 3)  # same as with 3 labels: bird is excluded


def test_class_only_in_prediction_counts_as_zero():
    gt = np.array([[0, 0], [1, 1]], dtype=np.uint8)
    pred = np.array([[0, 2], [1, 1]], dtype=np.uint8)
    s = scores(confusion_matrix(gt, pred, 3))
    np.testing.assert_allclose(s["iou"], [0.5, 1.0, 0.0])
    assert s["miou"] == pytest.approx(0.5)
    assert s["precision"][2] == 0.0
    assert math.isnan(s["recall"][2])  # no GT pixels of class 2


def test_scores_validation():
    with pytest.raises(ValueError):
        scores(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        scores(EXPECTED, ["background", "cat"])


def _slow_threshold_confusions(gt, maps, classes, taus, n):
    """Reference: one explicit prediction and confusion matrix per threshold."""
    out = []
    for tau in taus:
        if len(maps) == 0:
            pred = np.zeros(gt.shape, dtype=np.int64)
        else:
            pred = np.asarray(classes)[maps.argmax(0)].astype(np.int64)
            pred[maps.max(0) <= tau] = 0
        out.append(confusion_matrix(gt, pred, n))
    return np.stack(out)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_threshold_confusions_matches_per_tau_loop(k):
    rng = np.random.default_rng(k)
    n, h, w = 6, 17, 23
    gt = rng.integers(0, n, size=(h, w)).astype(np.uint8)
    gt[rng.random((h, w)) < 0.1] = 255
    # Maps and thresholds on the same 1/20 grid, so ties (max == tau -> background) occur.
    maps = rng.integers(0, 21, size=(k, h, w)) / 20
    classes = np.sort(rng.choice(np.arange(1, n), size=k, replace=False)).astype(np.uint8)
    # unsorted, with a repeat (evaluate appends its fixed threshold to the sweep), on the maps' grid (ties)
    taus = np.concatenate([np.arange(1, 13) / 20, [0.15, 0.05, 0.6]])[::-1].copy()
    fast = threshold_confusions(gt, maps, classes, taus, n)
    assert fast.shape == (len(taus), n, n) and fast.dtype == np.int64
    np.testing.assert_array_equal(fast, _slow_threshold_confusions(gt, maps, classes, taus, n))
    assert (fast.sum(axis=(1, 2)) == (gt != 255).sum()).all()


def test_best_threshold_picks_the_right_tau():
    # A 2 x 2 object of class 2 (core 0.8, rim 0.5) in a halo of 0.3 on a 0.1 background.
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[2:4, 2:4] = 2
    cam = np.full((6, 6), 0.1, dtype=np.float32)
    cam[1:5, 1:5] = 0.3
    cam[2:4, 2:4] = 0.5
    cam[2, 2] = 0.8
    taus = np.array([0.2, 0.4, 0.6])  # 0.2 keeps the halo, 0.6 loses the rim, 0.4 is exact
    confs = threshold_confusions(gt, cam[None], np.array([2]), taus, num_labels=3)
    index, tau, curve = best_threshold(confs, taus)
    assert (index, tau) == (1, 0.4)
    assert curve[1] == pytest.approx(1.0)
    assert curve[0] < 1.0 and curve[2] < 1.0
    np.testing.assert_allclose(curve, [scores(c)["miou"] for c in confs])


def test_threshold_confusions_rejects_mismatches():
    gt = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(ValueError):
        threshold_confusions(gt, np.zeros((1, 4, 5)), np.array([1]), [0.5], 3)
    with pytest.raises(ValueError):
        threshold_confusions(gt, np.zeros((2, 4, 4)), np.array([1]), [0.5], 3)
    with pytest.raises(ValueError):
        threshold_confusions(gt, np.zeros((1, 4, 4)), np.array([3]), [0.5], 3)


# ---------------------------------------------------------------------------- class-prior loss

LABELS = np.array(
    [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=np.float64
)  # frequencies 3/5, 1/5, 4/5


def _constant_predictor_loss(targets: np.ndarray, weights: np.ndarray, p: np.ndarray) -> float:
    """torch's loss of the predictor that gives every image the logits of p, each image's loss
    times its weight, averaged over the images (as train-cls weighs a batch)."""
    y = torch.tensor(targets)
    logits = torch.logit(torch.tensor(p)).expand_as(y)
    per_image = F.multilabel_soft_margin_loss(logits, y, reduction="none")
    return float((per_image * torch.tensor(weights)).mean())


@pytest.mark.parametrize("weights", [None, np.array([0.5, 2.0, 1.0, 0.25, 1.25])])
def test_class_prior_loss_is_the_loss_of_the_best_constant_predictor(weights):
    w = np.ones(len(LABELS)) if weights is None else weights
    p = (w[:, None] * LABELS).sum(0) / w.sum()
    prior = class_prior_loss(LABELS, weights)
    assert prior == pytest.approx(_constant_predictor_loss(LABELS, w, p), rel=1e-12)
    if weights is None:  # by hand: mean of the binary entropies of 3/5, 1/5, 4/5 (nats)

        def h(q):
            return -q * math.log(q) - (1 - q) * math.log(1 - q)

        assert prior == pytest.approx((h(0.6) + h(0.2) + h(0.8)) / 3, rel=1e-12)
    # the best one: any other constant does worse
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = np.clip(p + rng.normal(0, 0.1, p.shape), 0.01, 0.99)
        assert _constant_predictor_loss(LABELS, w, other) > prior


def test_class_prior_loss_of_a_class_every_or_no_image_has_is_zero():
    labels = np.array([[1, 0, 1], [1, 0, 0]], dtype=np.float64)  # class 1 always, class 2 never
    assert class_prior_loss(labels) == pytest.approx(math.log(2) / 3, rel=1e-12)
    assert class_prior_loss(labels[:, :2]) == 0.0
    with pytest.raises(ValueError):
        class_prior_loss(np.zeros((0, 3)))
    with pytest.raises(ValueError):
        class_prior_loss(labels, np.array([1.0, -1.0]))


def test_learned_fractions_per_image():
    prior = image_prior_losses(LABELS)
    p = LABELS.mean(0)
    by_hand = [-np.mean([math.log(p[c]) if LABELS[i, c] else math.log(1 - p[c]) for c in range(3)]) for i in range(5)]
    np.testing.assert_allclose(prior, by_hand, rtol=1e-12)
    assert prior.mean() == pytest.approx(class_prior_loss(LABELS), rel=1e-12)
    np.testing.assert_allclose(learned_fractions(prior, LABELS), 0.0, atol=1e-12)  # the prior predictor itself
    np.testing.assert_allclose(learned_fractions(np.zeros(5), LABELS), 1.0)  # a perfect fit
    np.testing.assert_allclose(learned_fractions(prior * [0.25, 1, 2, 0.5, 0], LABELS), [0.75, 0, -1, 0.5, 1])
    constant = np.array([[1, 0], [1, 0]], dtype=np.float64)  # nothing to learn
    assert learned_fractions(np.array([0.3, 0.0]), constant).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        learned_fractions(np.zeros(4), LABELS)
