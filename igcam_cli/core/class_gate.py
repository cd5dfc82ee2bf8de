"""Dropping the classes an image classifier says are absent from a segmentation (predict's class gate)."""

from __future__ import annotations

import torch


def gate_classes(probs: torch.Tensor, class_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """probs B x (1 + C) x H x W (background first) and class_probs B x C in [0, 1]: a copy of probs in which
    each image's classes with class_probs below tau are 0, so that no pixel can take them. Background and
    each image's most probable class are always kept: a gate never leaves an image without a class."""
    if probs.shape[:2] != (class_probs.shape[0], class_probs.shape[1] + 1):
        raise ValueError(f"probs {tuple(probs.shape)} are not B x (1 + C) x H x W for {tuple(class_probs.shape)}")
    keep = class_probs >= tau
    keep[torch.arange(len(keep)), class_probs.argmax(1)] = True
    gated = probs.clone()
    gated[:, 1:] *= keep[..., None, None].to(probs.dtype)
    return gated
