"""Fully connected CRF (Krähenbühl & Koltun) over CAM-derived scores: pydensecrf, or the same model in torch.

pydensecrf comes from the ``pydensecrf2`` package, which imports as ``pydensecrf``; ``backend="torch"``
runs core/torch_crf.py instead (the same model and inference, batched, on any device; labels agree with
pydensecrf's, tests/test_torch_crf.py). Labels are always the image's present classes plus background
(L = K + 1), never all C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

__all__ = [
    "BACKENDS",
    "CrfParams",
    "PRESETS",
    "background_score",
    "crf_labels",
    "crf_probabilities",
    "crf_refine",
    "dense_crf",
    "labels_from_marginals",
]

BACKENDS = ("pydensecrf", "torch")

_EPS = 1e-5


@dataclass(frozen=True)
class CrfParams:
    """Kernel parameters: Gaussian (sxy, compat) and bilateral (sxy, srgb, compat), as in pydensecrf."""

    gauss_sxy: float
    gauss_compat: float
    bi_sxy: float
    bi_srgb: float
    bi_compat: float
    iterations: int = 10
    unary: str = "softmax"  # "softmax" (probabilities) or "labels" (hard labels with gt_prob)
    gt_prob: float = 0.7

    def __post_init__(self) -> None:
        if self.unary not in ("softmax", "labels"):
            raise ValueError(f"unary must be 'softmax' or 'labels', got {self.unary!r}")
        if not 0.0 < self.gt_prob < 1.0:
            raise ValueError(f"gt_prob must lie in (0, 1), got {self.gt_prob}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")


# Parameter families of the field's codebases (PSA, IRN, DeepLab, ToCo; docs/METHOD.md §6).
PRESETS: dict[str, CrfParams] = {
    "psa": CrfParams(gauss_sxy=3, gauss_compat=3, bi_sxy=80, bi_srgb=13, bi_compat=10),
    "irn": CrfParams(gauss_sxy=3, gauss_compat=3, bi_sxy=50, bi_srgb=5, bi_compat=10, unary="labels", gt_prob=0.7),
    "deeplab": CrfParams(gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4),
    "toco": CrfParams(gauss_sxy=1, gauss_compat=1, bi_sxy=121, bi_srgb=5, bi_compat=4),
}


def background_score(maps: np.ndarray, mode: str = "power", tau: float = 0.25, alpha: float = 4.0) -> np.ndarray:
    """H x W background score from K x H x W maps in [0, 1].

    ``"constant"``: ``tau`` everywhere; ``"power"``: ``(1 - max_k maps)^alpha`` (ones when K == 0).
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be K x H x W, got shape {maps.shape}")
    shape = maps.shape[1:]
    if mode == "constant":
        return np.full(shape, tau, dtype=np.float32)
    if mode == "power":
        if maps.shape[0] == 0:
            return np.ones(shape, dtype=np.float32)
        peak = np.clip(maps.max(axis=0), 0.0, 1.0)
        return np.power(1.0 - peak, alpha).astype(np.float32)
    raise ValueError(f"background mode must be 'constant' or 'power', got {mode!r}")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams, backend: str = "pydensecrf") -> np.ndarray:
    """Run the CRF; image H x W x 3 uint8, probs L x H x W (sum 1 over L) -> marginals L x H x W float32.

    ``params.unary == "labels"`` uses only ``argmax(probs)``, trusted with ``params.gt_prob``.
    ``backend="torch"`` runs torch_crf on the CPU (torch_crf.dense_crf_batch batches, on any device).
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if probs.ndim != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must be L x H x W with L >= 1, got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs are {probs.shape[1]} x {probs.shape[2]} but the image is {image.shape[0]} x {image.shape[1]}"
        )
    n_labels, height, width = probs.shape
    if n_labels == 1:
        return np.ones(probs.shape, dtype=np.float32)
    if backend == "torch":  # imported here: the CPU pool's workers need only pydensecrf, and start faster without torch
        import torch

        from igcam_cli.core.torch_crf import dense_crf_batch

        return dense_crf_batch([torch.from_numpy(image)], [torch.from_numpy(probs)], params)[0].numpy()
    if backend != "pydensecrf":
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    if params.unary == "labels":
        unary = unary_from_labels(probs.argmax(axis=0), n_labels, gt_prob=params.gt_prob, zero_unsure=False)
    else:
        unary = unary_from_softmax(probs.astype(np.float32))
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(
        sxy=params.bi_sxy, srgb=params.bi_srgb, rgbim=np.ascontiguousarray(image), compat=params.bi_compat
    )
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(n_labels, height, width)


def crf_labels(
    image: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    params: CrfParams,
    bg_mode: str = "power",
    bg_tau: float = 0.25,
    bg_alpha: float = 4.0,
    confidence: float | None = None,
    uncertain: tuple[float, float] | None = None,
    backend: str = "pydensecrf",
) -> np.ndarray:
    """H x W uint8 class-index label map from K x H x W maps of the present ``classes`` (K labels in 1..C):
    ``crf_probabilities``, ``dense_crf``, ``labels_from_marginals``. K == 0 gives all zeros."""
    probs = crf_probabilities(maps, classes, bg_mode, bg_tau, bg_alpha)
    if probs.shape[0] == 1:
        return np.zeros(probs.shape[1:], dtype=np.uint8)
    marginals = dense_crf(image, probs, params, backend)
    return labels_from_marginals(marginals, maps, classes, confidence, uncertain)


def crf_probabilities(
    maps: np.ndarray, classes: np.ndarray, bg_mode: str = "power", bg_tau: float = 0.25, bg_alpha: float = 4.0
) -> np.ndarray:
    """(K + 1) x H x W probabilities over (background, classes...): the scores [background, maps...]
    normalised per pixel."""
    maps = np.asarray(maps)
    classes = np.asarray(classes).reshape(-1)
    if maps.ndim != 3:
        raise ValueError(f"maps must be K x H x W, got shape {maps.shape}")
    if classes.shape[0] != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {classes.shape[0]} class labels")
    if classes.size and (classes.min() < 1 or classes.max() > 254):
        raise ValueError(f"class labels must lie in 1..254, got {classes.tolist()}")
    bg = background_score(maps, bg_mode, bg_tau, bg_alpha)
    scores = np.concatenate([bg[None], maps.astype(np.float32)], axis=0)
    scores = np.clip(scores, 0.0, None) + _EPS
    return scores / scores.sum(axis=0, keepdims=True)


def labels_from_marginals(
    marginals: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    confidence: float | None = None,
    uncertain: tuple[float, float] | None = None,
) -> np.ndarray:
    """The arg-max of the CRF's (K + 1) x H x W marginals as class indices. Pixels whose largest marginal
    is below ``confidence`` become 255 (ignore), and so do pixels whose largest map value lies strictly
    between ``uncertain = (low, high)``: neither confidently an object nor confidently background (IRN's
    confident-foreground / confident-background split)."""
    maps = np.asarray(maps)
    classes = np.asarray(classes).reshape(-1)
    lookup = np.concatenate([[0], classes]).astype(np.uint8)  # CRF label l -> class index
    labels = lookup[marginals.argmax(axis=0)]
    if confidence is not None:
        labels[marginals.max(axis=0) < confidence] = 255
    if uncertain is not None:
        peak = maps.max(axis=0)
        labels[(peak > uncertain[0]) & (peak < uncertain[1])] = 255
    return labels


def ir_labels(
    image: np.ndarray, maps: np.ndarray, classes: np.ndarray, fg_threshold: float = 0.30, bg_threshold: float = 0.05
) -> np.ndarray:
    """IRN's inter-pixel relation labels (`cam_to_ir_label`): H x W uint8 with the class of confident
    foreground, 0 for confident background and 255 in between.

    Two CRF passes (IRN's preset, unary from labels) of the maps arg-maxed against a constant background:
    at `fg_threshold` what stays an object is confident foreground; at `bg_threshold` what is still
    background is confident background.
    """
    params = PRESETS["irn"]
    foreground = crf_labels(image, maps, classes, params, bg_mode="constant", bg_tau=fg_threshold)
    background = crf_labels(image, maps, classes, params, bg_mode="constant", bg_tau=bg_threshold)
    labels = np.where(foreground == 0, 255, foreground).astype(np.uint8)
    labels[(foreground == 0) & (background == 0)] = 0
    return labels


def crf_refine(
    image: np.ndarray, probs: np.ndarray, labels: np.ndarray, params: CrfParams, backend: str = "pydensecrf"
) -> np.ndarray:
    """Refine a segmentation's probabilities: ``probs`` K x H x W over the label indices ``labels`` (K,
    e.g. the classes that win some pixel), renormalised per pixel, then the CRF and an arg-max.

    Returns an H x W uint8 label map with values from ``labels``.
    """
    probs = np.asarray(probs, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 3 or probs.shape[0] != labels.shape[0] or labels.size == 0:
        raise ValueError(f"probs must be K x H x W for K = {labels.size} >= 1 labels, got shape {probs.shape}")
    probs = np.clip(probs, 0.0, None) + _EPS
    probs /= probs.sum(axis=0, keepdims=True)
    marginals = dense_crf(image, probs, params, backend)
    return labels.astype(np.uint8)[marginals.argmax(axis=0)]
