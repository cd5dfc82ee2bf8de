"""The permutohedral lattice (Adams, Baek and Davis 2010) as Krähenbühl's densecrf builds it, in torch.

`Lattice(features).filter(values)` approximates Gaussian filtering in feature space: each point's value
is the sum over all points of exp(-|f_i - f_j|^2 / 2) times their values, up to the lattice's
approximation. The point features are embedded in the (d+1)-dimensional permutohedral lattice, each
point's value is splatted onto the d+1 vertices of its enclosing simplex with barycentric weights, the
lattice is blurred with a [1/2, 1, 1/2] kernel along each of its d+1 axes in turn, and the result is
sliced back with the same weights, scaled by 1 / (1 + 2^-d). Every step follows densecrf's
permutohedral.cpp (the embedding's scale, the rounding to the nearest remainder-0 point, the rank
ordering and its ties, the blur order), so the filter agrees with pydensecrf's to float rounding.

Points carry a `group` (e.g. the image they belong to): points of different groups never share a
vertex, so one lattice filters a batch of images as if each were alone.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["Lattice"]


class Lattice:
    def __init__(self, features: torch.Tensor, groups: torch.Tensor | None = None):
        """`features`: N x d float (already divided by the kernel's standard deviations); `groups`: N ints."""
        if features.ndim != 2 or features.shape[1] < 1:
            raise ValueError(f"features must be N x d with d >= 1, got shape {tuple(features.shape)}")
        n, d = features.shape
        device = features.device
        self.d = d
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long, device=device)
        rank, rem0, weights = _simplices(features.float())
        self.weights = weights  # N x (d+1): barycentric weights of the simplex's vertices
        keys = _vertex_keys(rank, rem0)  # N x (d+1) x d
        codec = _Codec(keys, groups, margin=d + 1)
        codes = codec.encode(keys, groups[:, None].expand(n, d + 1))
        unique, inverse = torch.unique(codes.flatten(), return_inverse=True)
        self.size = len(unique)  # M lattice vertices; index M is a zero row (a missing neighbour)
        self.offsets = inverse.view(n, d + 1)
        # splatting and slicing as sparse products (M x N and N x M, d+1 weights a point): no N x (d+1) x V
        # temporary, and a multithreaded (CPU) or cuSPARSE (CUDA) kernel
        points = torch.arange(n, device=device).repeat_interleave(d + 1)
        vertices, weights_flat = self.offsets.flatten(), self.weights.flatten()
        self.splat = _csr(vertices, points, weights_flat, (self.size, n))
        self.slice = _csr(points, vertices, weights_flat, (n, self.size))
        vertex_keys, vertex_groups = codec.decode(unique)
        self.neighbours = [
            (
                _lookup(unique, codec.encode(vertex_keys + shift, vertex_groups)),
                _lookup(unique, codec.encode(vertex_keys - shift, vertex_groups)),
            )
            for shift in _axis_shifts(d, device)
        ]

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat, blur, slice: N x V -> N x V (float32)."""
        d = self.d
        lattice = torch.sparse.mm(self.splat, values.float())
        zero = lattice.new_zeros(1, lattice.shape[1])
        for n1, n2 in self.neighbours:
            padded = torch.cat([lattice, zero])
            lattice = lattice + 0.5 * (padded[n1] + padded[n2])
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        return torch.sparse.mm(self.slice, lattice) * alpha


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix (entries of one (row, col) summed; its indices are valid by construction). CSR, not
    COO: its products were 1.8x faster on the CPU (500 x 375, 21 labels). torch calls CSR support beta and
    says so once a process; the warning is silenced, as the agreement tests check the results."""
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


def _simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank N x (d+1) long, rem0 N x (d+1) float, barycentric weights N x (d+1)) of each point's simplex."""
    n, d = features.shape
    device = features.device
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)], device=device)
    cf = features * scale
    # elevated[j] = sum_{i >= j} cf[i] - j * cf[j-1]: the point on the plane x_0 + ... + x_d = 0
    suffix = torch.cat([cf.flip(1).cumsum(1).flip(1), cf.new_zeros(n, 1)], dim=1)
    elevated = suffix.clone()
    elevated[:, 1:] -= torch.arange(1, d + 1, device=device, dtype=cf.dtype) * cf
    # the nearest remainder-0 lattice point, coordinate by coordinate
    nearest = torch.round(elevated / (d + 1))
    rem0 = nearest * (d + 1)
    total = nearest.sum(1).long()
    # rank[i]: how many coordinates lie further from their remainder-0 point than i (ties: the earlier one)
    delta = elevated - rem0
    index = torch.arange(d + 1, device=device)
    after = (delta[:, :, None] < delta[:, None, :]) & (index[None, :] > index[:, None])[None]
    before = (delta[:, None, :] >= delta[:, :, None]) & (index[None, :] < index[:, None])[None]
    rank = (after | before).sum(2) + total[:, None]
    low, high = rank < 0, rank > d  # bring the point back onto the plane
    rank = rank + (d + 1) * (low.long() - high.long())
    rem0 = rem0 + (d + 1) * (low.float() - high.float())
    v = (elevated - rem0) / (d + 1)
    bary = features.new_zeros(n, d + 2)
    bary.scatter_add_(1, d - rank, v)
    bary.scatter_add_(1, d - rank + 1, -v)
    bary[:, 0] += 1.0 + bary[:, d + 1]
    return rank, rem0, bary[:, : d + 1]


def _vertex_keys(rank: torch.Tensor, rem0: torch.Tensor) -> torch.Tensor:
    """N x (d+1) x d integer keys of the simplex's vertices (the first d coordinates; the last is implied)."""
    d = rank.shape[1] - 1
    canonical = torch.tensor(
        [[r if k <= d - r else r - (d + 1) for k in range(d + 1)] for r in range(d + 1)], device=rank.device
    )
    return rem0[:, None, :d].long() + canonical[:, rank[:, :d]].permute(1, 0, 2)


def _axis_shifts(d: int, device: torch.device) -> list[torch.Tensor]:
    """The neighbour offset along each lattice axis j: +1 on every coordinate but j, which moves by -d
    (for j = d, whose coordinate is implied, +1 on all d). `key - shift` is the other neighbour."""
    shifts = []
    for j in range(d + 1):
        shift = torch.full((d,), -1, dtype=torch.long, device=device)
        if j < d:
            shift[j] = d
        shifts.append(shift)
    return shifts


class _Codec:
    """Packs (group, key) into one int64 per vertex, each coordinate in its own range (with a margin for
    the neighbours' keys), so that vertices can be sorted and looked up."""

    def __init__(self, keys: torch.Tensor, groups: torch.Tensor, margin: int):
        flat = keys.reshape(-1, keys.shape[-1])
        self.low = flat.amin(0) - margin
        spans = (flat.amax(0) + margin - self.low + 1).tolist()
        self.spans = [int(groups.max().item()) + 1 if len(groups) else 1, *spans]
        if math.prod(self.spans) >= 2**62:
            raise ValueError("the lattice's features span too wide a range to be indexed (features too large?)")
        self.radix = torch.tensor(
            [math.prod(self.spans[i + 1 :]) for i in range(len(self.spans))], device=keys.device, dtype=torch.long
        )

    def encode(self, keys: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        shifted = keys - self.low
        inside = ((shifted >= 0) & (shifted < torch.tensor(self.spans[1:], device=keys.device))).all(-1)
        code = groups * self.radix[0] + (shifted * self.radix[1:]).sum(-1)
        return torch.where(inside, code, torch.full_like(code, -1))

    def decode(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        digits = (codes[:, None] // self.radix) % torch.tensor(self.spans, device=codes.device)
        return digits[:, 1:] + self.low, digits[:, 0]


def _lookup(sorted_codes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The index of each code in `sorted_codes`, or len(sorted_codes) where it is absent."""
    m = len(sorted_codes)
    at = torch.searchsorted(sorted_codes, codes).clamp_(max=m - 1)
    found = (sorted_codes[at] == codes) & (codes >= 0)
    return torch.where(found, at, torch.full_like(at, m))
