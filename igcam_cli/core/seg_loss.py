"""The segmenter's per-pixel loss: cross-entropy over the labelled pixels (255: ignored)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, balanced: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled 255 (0 when every pixel is 255, not NaN). `balanced`: the
    mean over background pixels and the mean over object pixels count half each (where the batch has both)."""
    if not balanced:
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        return total / (labels != IGNORE).sum().clamp_min(1)
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    groups = [labels == 0, (labels != 0) & (labels != IGNORE)]
    means = [per_pixel[g].mean() for g in groups if g.any()]
    return torch.stack(means).mean() if means else per_pixel.sum()  # all ignored: per_pixel is all 0
