"""Segmentation metrics: confusion matrices, IoU scores and background-threshold sweeps.

Conventions: label 0 is background, labels 1..C are classes, ``ignore`` (255) marks GT pixels
that are not counted. Confusion matrices have rows = ground truth, columns = prediction.
All IoU / mIoU values are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import xlogy

__all__ = [
    "confusion_matrix",
    "threshold_confusions",
    "scores",
    "best_threshold",
    "class_prior_loss",
    "image_prior_losses",
    "learned_fractions",
]


def _check_labels(name: str, values: np.ndarray, num_labels: int) -> None:
    """Raise ValueError unless every value lies in [0, num_labels)."""
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"{name} values must lie in [0, {num_labels}); found range [{lo}, {hi}]")


def _counted_gt(gt: np.ndarray, shape: tuple[int, ...], num_labels: int, ignore: int):
    """Validate ``gt`` against ``shape``; return (mask of counted pixels, counted GT as int64)."""
    gt = np.asarray(gt)
    if gt.shape != shape:
        raise ValueError(f"ground truth has shape {gt.shape}, prediction has shape {shape}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    keep = gt != ignore
    gt_kept = gt[keep].astype(np.int64)
    _check_labels("ground-truth", gt_kept, num_labels)
    return keep, gt_kept


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_labels: int, ignore: int = 255) -> np.ndarray:
    """(n, n) int64 confusion matrix, rows = GT, cols = prediction; GT pixels == ``ignore`` skipped.

    Raises ValueError on a shape mismatch or a label outside [0, n) (prediction: any pixel;
    GT: any pixel other than ``ignore``).
    """
    pred = np.asarray(pred)
    keep, gt_kept = _counted_gt(gt, pred.shape, num_labels, ignore)
    _check_labels("prediction", pred, num_labels)
    index = gt_kept * num_labels + pred[keep].astype(np.int64)
    counts = np.bincount(index, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels).astype(np.int64)


def threshold_confusions(
    gt: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    taus: np.ndarray,
    num_labels: int,
    ignore: int = 255,
) -> np.ndarray:
    """(T, n, n) confusion matrices of map predictions, one per background threshold.

    For threshold ``tau`` a pixel is predicted ``classes[argmax_k maps[k]]`` where
    ``max_k maps[k] > tau`` and background (0) otherwise. ``maps`` is K x H x W in [0, 1],
    ``classes`` K labels in 1..n-1; K == 0 predicts background everywhere.
    All thresholds come from one ``bincount`` over (gt, label, number of thresholds below the peak), so
    memory stays linear in the pixels whatever the number of thresholds.
    """
    maps = np.asarray(maps)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    taus = np.asarray(taus, dtype=np.float64).reshape(-1)
    if maps.ndim != 3:
        raise ValueError(f"maps must be K x H x W, got shape {maps.shape}")
    if classes.shape[0] != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {classes.shape[0]} class labels")
    keep, gt_kept = _counted_gt(gt, maps.shape[1:], num_labels, ignore)
    _check_labels("class", classes, num_labels)

    n, n_taus = num_labels, taus.shape[0]
    if maps.shape[0] == 0:
        peak = np.zeros(gt_kept.shape, dtype=np.float64)
        label = np.zeros(gt_kept.shape, dtype=np.int64)
    else:
        kept_maps = maps[:, keep]  # K x P
        peak = kept_maps.max(axis=0)
        label = classes[kept_maps.argmax(axis=0)]
    # Memory linear in the pixels, not T x P (a 4000 x 3000 image over 56 thresholds took 5 GB): count pixels
    # by (gt, label, how many thresholds their peak exceeds), then sum those counts over the thresholds.
    order = np.argsort(taus, kind="stable")
    above = np.searchsorted(taus[order], peak, side="left")  # thresholds strictly below each pixel's peak
    bins = n_taus + 1
    counts = np.bincount((gt_kept * n + label) * bins + above, minlength=n * n * bins).reshape(n, n, bins)
    # foreground at sorted threshold j: the pixels whose peak exceeds more than j thresholds
    foreground = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # n x n x T
    background = (counts.sum(axis=-1, keepdims=True) - foreground).sum(axis=1)  # n x T: predicted 0
    by_sorted = np.moveaxis(foreground, -1, 0).copy()  # T x n (gt) x n (pred)
    by_sorted[:, :, 0] += background.T
    conf = np.empty_like(by_sorted)
    conf[order] = by_sorted
    return conf.astype(np.int64)


def _iou(conf: np.ndarray) -> np.ndarray:
    """Per-class IoU over the last two axes; NaN where a class is absent from GT and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    union = conf.sum(axis=-1) + conf.sum(axis=-2) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _nanmean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over non-NaN entries; NaN (without a warning) where all entries are NaN."""
    present = ~np.isnan(values)
    total = np.where(present, values, 0.0).sum(axis=axis)
    count = present.sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / count, np.nan)


def scores(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict:
    """Scores of an (n, n) confusion matrix (rows = GT, cols = prediction).

    Returns ``iou`` (n,) with NaN for classes absent from both GT and prediction, ``miou`` (mean
    over the other classes), ``pixel_accuracy``, ``precision`` and ``recall`` (n,) with NaN where
    undefined, and, when ``class_names`` is given (background first), ``per_class``
    {name: iou or None}. NaN scalars mean "no counted pixels".
    """
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
    conf = conf.astype(np.float64)
    tp = np.diagonal(conf)
    gt_total, pred_total, total = conf.sum(axis=1), conf.sum(axis=0), conf.sum()
    iou = _iou(conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_total > 0, tp / pred_total, np.nan)
        recall = np.where(gt_total > 0, tp / gt_total, np.nan)
    result = {
        "iou": iou,
        "miou": float(_nanmean(iou)),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "precision": precision,
        "recall": recall,
    }
    if class_names is not None:
        if len(class_names) != conf.shape[0]:
            raise ValueError(f"{len(class_names)} class names for a {conf.shape[0]}-label confusion matrix")
        result["per_class"] = {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)}
    return result


def best_threshold(confs: np.ndarray, taus) -> tuple[int, float, np.ndarray]:
    """Pick the threshold with the highest mIoU: (index, tau, mIoU curve (T,)). Ties -> lowest index."""
    confs = np.asarray(confs)
    taus = np.asarray(taus, dtype=np.float64).reshape(-1)
    if confs.ndim != 3 or confs.shape[0] != taus.shape[0]:
        raise ValueError(f"need T x n x n confusions for {taus.shape[0]} thresholds, got {confs.shape}")
    curve = _nanmean(_iou(confs))
    if np.all(np.isnan(curve)):
        raise ValueError("no counted pixels: mIoU is undefined for every threshold")
    index = int(np.nanargmax(curve))
    return index, float(taus[index]), curve


def average_precision(scores_: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP of one class: mean precision at the rank of each positive (NaN without positives)."""
    order = np.argsort(-np.asarray(scores_, dtype=np.float64), kind="stable")
    hits = np.asarray(targets)[order] > 0
    if not hits.any():
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def mean_average_precision(scores_: np.ndarray, targets: np.ndarray) -> float:
    """mAP over the columns (classes) of N x C scores and 0/1 targets, skipping classes without positives."""
    aps = np.array([average_precision(scores_[:, c], targets[:, c]) for c in range(scores_.shape[1])])
    return float(_nanmean(aps))


def auroc(scores_: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties
    counting half (Mann-Whitney U with average ranks). NaN without positives or negatives."""
    scores_ = np.asarray(scores_, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    n1, n0 = int(positives.sum()), int((~positives).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(scores_, kind="stable")
    ranks = np.empty(len(scores_), dtype=np.float64)
    sorted_scores = scores_[order]
    start = 0
    while start < len(sorted_scores):  # average ranks over ties
        stop = start + 1
        while stop < len(sorted_scores) and sorted_scores[stop] == sorted_scores[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1
        start = stop
    return float((ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -p ln p - (1 - p) ln(1 - p) in nats, 0 at p = 0 and p = 1."""
    p = np.asarray(p, dtype=np.float64)
    return -(xlogy(p, p) + xlogy(1 - p, 1 - p))


def class_prior_loss(targets: np.ndarray, weights: ArrayLike | None = None) -> float:
    """The multi-label soft-margin loss (mean over classes, then over images, each image's loss
    times its weight) of the best constant predictor, which knows only the labels' frequencies:
    ``mean(w) * mean_c H(p_c)`` with ``p_c = sum_i w_i y_ic / sum_i w_i`` (the logit of p_c is that
    predictor). A classifier whose training loss is not clearly below it has learned nothing the
    label counts do not say. ``targets``: N x C 0/1; ``weights``: N, >= 0 (None: all 1)."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty N x C array, got shape {targets.shape}")
    w = np.ones(targets.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != targets.shape[0] or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {targets.shape[0]} weights >= 0 with a positive sum")
    p = (w[:, None] * targets).sum(axis=0) / w.sum()
    return float(w.mean() * binary_entropy(p).mean())


def image_prior_losses(targets: np.ndarray) -> np.ndarray:
    """Each image's loss (mean over classes) under the best constant predictor of its split, the
    one at the labels' frequencies; their mean is ``class_prior_loss(targets)``."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 2 or targets.shape[0] == 0:
        raise ValueError(f"targets must be a non-empty N x C array, got shape {targets.shape}")
    p = targets.mean(axis=0)
    return -(xlogy(targets, p) + xlogy(1 - targets, 1 - p)).mean(axis=1)


def learned_fractions(losses: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per image, ``1 - loss / prior loss``: the share of what its labels say beyond the label
    frequencies that the classifier gets (1: a perfect fit, 0: no better than the frequencies,
    < 0: worse). An image whose prior loss is 0 (every class in every image or in none) gets 0:
    there was nothing to learn."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    prior = image_prior_losses(targets)
    if losses.shape != prior.shape:
        raise ValueError(f"{losses.shape[0]} losses for {prior.shape[0]} images")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(prior > 0, 1.0 - losses / np.where(prior > 0, prior, 1.0), 0.0)
