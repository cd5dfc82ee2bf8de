"""The fully connected CRF of Krähenbühl and Koltun in torch: pydensecrf's model, batched, on any device.

The model is densecrf's (and so pydensecrf's) `DenseCRF2D` with a Gaussian kernel over (x/sxy, y/sxy) and a
bilateral kernel over (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), both with Potts compatibility and symmetric
normalisation, and its mean-field inference:

    Q = softmax(-U)
    repeat: Q = softmax(-U + sum_k w_k * n_k * filter_k(n_k * Q)),   n_k = 1 / sqrt(filter_k(1))

where filter_k is the permutohedral lattice of kernel k (core/permutohedral.py) and w_k its compatibility.
Unaries are pydensecrf.utils' `unary_from_softmax` (-log of the probabilities clipped at 1e-5) or
`unary_from_labels` (-log gt_prob on the arg-max label, -log((1 - gt_prob) / (L - 1)) elsewhere).

A batch is one lattice per kernel over every pixel of every image, each image its own group, so images of
different sizes and label counts share the passes; labels beyond an image's own count are masked out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from igcam_cli.core.permutohedral import Lattice

__all__ = ["MAX_PIXELS", "dense_crf_batch", "dense_crf_chunked", "unaries"]

_CLIP = 1e-5  # pydensecrf.utils.unary_from_softmax's default clip
# Pixels in one pass: building the lattices peaks at 2-3 KB a pixel (measured on the CPU, 21 labels, 1-4 VOC images), so
# 2 M pixels (about 11 VOC images) stay under 7 GB
MAX_PIXELS = 2_000_000


def unaries(probs: torch.Tensor, mode: str, gt_prob: float) -> torch.Tensor:
    """L x N unary energies from L x N probabilities, as pydensecrf.utils computes them."""
    if mode == "softmax":
        return -torch.log(probs.float().clamp(_CLIP, 1.0))
    n_labels = probs.shape[0]
    energy = torch.full(probs.shape, -math.log((1.0 - gt_prob) / (n_labels - 1)), device=probs.device)
    winner = probs.argmax(0)
    energy[winner, torch.arange(probs.shape[1], device=probs.device)] = -math.log(gt_prob)
    return energy


def dense_crf_batch(
    images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], params, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """Marginals (L_b x H_b x W_b float32) of each image (H_b x W_b x 3 uint8) and its probabilities
    (L_b x H_b x W_b, summing to 1 over L_b); `params` a densecrf.CrfParams. An image with one label keeps
    marginals of ones, as pydensecrf's wrapper (core/densecrf.py dense_crf) gives."""
    device = torch.device(device)
    single = [i for i, p in enumerate(probs) if p.shape[0] == 1]
    if single:
        several = [i for i in range(len(probs)) if i not in single]
        out = dense_crf_batch([images[i] for i in several], [probs[i] for i in several], params, device)
        found = dict(zip(several, out))
        return [found[i] if i in found else torch.ones(tuple(probs[i].shape), device=device) for i in range(len(probs))]
    if not probs:
        return []
    sizes = [tuple(p.shape) for p in probs]
    for image, size in zip(images, sizes):
        if tuple(image.shape) != (size[1], size[2], 3):
            raise ValueError(f"an image of shape {tuple(image.shape)} for probabilities of shape {size}")
    width = max(size[0] for size in sizes)
    energies, masks, groups, positions, colours = [], [], [], [], []
    for b, (image, p) in enumerate(zip(images, probs)):
        n_labels, height, wide = p.shape
        u = unaries(p.reshape(n_labels, -1).to(device), params.unary, params.gt_prob)
        energies.append(torch.cat([u, u.new_zeros(width - n_labels, u.shape[1])]).T)
        mask = torch.zeros(height * wide, width, dtype=torch.bool, device=device)
        mask[:, n_labels:] = True
        masks.append(mask)
        groups.append(torch.full((height * wide,), b, dtype=torch.long, device=device))
        ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(wide, device=device), indexing="ij")
        positions.append(torch.stack([xs.flatten(), ys.flatten()], 1).float())
        colours.append(image.to(device).reshape(-1, 3).float())
    unary, padded, group = torch.cat(energies), torch.cat(masks), torch.cat(groups)
    position, colour = torch.cat(positions), torch.cat(colours)
    kernels = [
        (Lattice(position / params.gauss_sxy, group), params.gauss_compat),
        (Lattice(torch.cat([position / params.bi_sxy, colour / params.bi_srgb], 1), group), params.bi_compat),
    ]
    ones = unary.new_ones(len(unary), 1)
    norms = [torch.rsqrt(lattice.filter(ones) + 1e-20) for lattice, _ in kernels]
    q = _softmax(-unary, padded)
    for _ in range(params.iterations):
        logits = -unary
        for (lattice, weight), norm in zip(kernels, norms):
            logits = logits + weight * norm * lattice.filter(norm * q)
        q = _softmax(logits, padded)
    out, start = [], 0
    for n_labels, height, wide in sizes:
        n = height * wide
        out.append(q[start : start + n, :n_labels].T.reshape(n_labels, height, wide).contiguous())
        start += n
    return out


def dense_crf_chunked(
    images: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], params, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """`dense_crf_batch` in passes of at most MAX_PIXELS pixels; an image larger than that alone goes to
    pydensecrf (whose memory grows far more slowly), its marginals brought to `device`."""
    out: list[torch.Tensor | None] = [None] * len(probs)
    chunk: list[int] = []
    in_chunk = 0  # pixels

    def flush() -> None:
        nonlocal in_chunk
        for i, m in zip(chunk, dense_crf_batch([images[i] for i in chunk], [probs[i] for i in chunk], params, device)):
            out[i] = m
        chunk.clear()
        in_chunk = 0

    for i, p in enumerate(probs):
        pixels = p.shape[1] * p.shape[2]
        if pixels > MAX_PIXELS:
            from igcam_cli.core.densecrf import dense_crf

            marginals = dense_crf(images[i].cpu().numpy(), p.float().cpu().numpy(), params)
            out[i] = torch.from_numpy(marginals).to(device)
            continue
        if chunk and in_chunk + pixels > MAX_PIXELS:
            flush()
        chunk.append(i)
        in_chunk += pixels
    flush()
    return [m for m in out if m is not None]


def _softmax(logits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(padded, float("-inf")), dim=1)
