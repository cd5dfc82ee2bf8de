"""Influence functions for the CAM classifier: EK-FAC / K-FAC / identity, scores and spatial maps.

Pure tensor math on a model that is handed in (no file I/O). Everything the ``compute-influence``
stage needs comes out of one ordinary batched forward + backward per batch: forward hooks keep each
tracked layer's input and output, and ``torch.autograd.grad`` w.r.t. those outputs gives the output
gradients. Only the tracked weights require grad while this runs, so no graph is built for the
trunk before the first tracked layer (the trunk runs as if under ``torch.no_grad``).

Notation
--------
Per tracked layer l (a ``Conv2d`` or ``Linear``) and training image i:

* ``a_u``  in R^{d_in}: the layer's input at output location u -- for a k x k conv the unfolded
  patch (im2col, ``d_in = C_in k^2``), for a 1x1 conv / Linear the feature vector; a trailing 1 is
  appended when the layer has a bias. Shapes here: ``a`` is B x d_in x T (T = output locations).
* ``delta_u`` in R^{d_out}: gradient of the per-sample loss w.r.t. the layer's output at u.
* per-sample weight gradient ``G_i = sum_u delta_u a_u^T`` (d_out x d_in; for a conv it is the
  weight reshaped to d_out x (C_in k^2), bias as the last column).

Loss: the classifier's multilabel soft-margin loss, per sample
``L_i = w_i (1/C) sum_c BCEWithLogits(z_ic, y_ic)`` (``w_i`` optional per-sample weights; the
training stage averages ``L_i`` over the batch). Everything is seeded in output space: with
``dz = dL/dz`` (B x C) we backpropagate ``dz`` from the logits, so per-class restricted losses and
Gauss-Newton pseudo-gradients need no new loss functions.

Curvature H (the damped GGN of the mean training loss, block-diagonal over layers):

* ``fisher="ggn"`` (default): the exact GGN of the soft-margin loss,
  ``H_i = J_i^T (w_i/C) diag(p_i (1-p_i)) J_i`` (p = sigmoid(z)), as a sum of C pseudo-gradients,
  one backward seed per class ``dz = e_c sqrt(w_i p_c (1-p_c) / C)``. Deterministic; C backward
  passes of the tracked part per batch.
* ``fisher="sampled"``: one seed ``dz = sqrt(w_i/C) (p - yhat)``, ``yhat ~ Bernoulli(p)`` -- an
  unbiased Monte-Carlo estimate of the same GGN (one backward pass).
* ``fisher="empirical"``: ``dz = sqrt(w_i/C) (p - y)`` with the true labels (empirical Fisher,
  same scale as the GGN).

Kronecker factors (KFC, Grosse & Martens 2016; expansion over locations):
``A = E_{i,u}[a_u a_u^T]``, ``S = E_i[sum_seeds sum_u delta_u delta_u^T]``, so that
``H_l ~ A (x) S`` (exact for the head when features are constant over locations, otherwise the
spatially-uncorrelated-derivatives approximation). ``A = Q_A diag(l_A) Q_A^T``,
``S = Q_S diag(l_S) Q_S^T``.

* ``ekfac`` (George et al. 2018; Grosse et al. 2023): eigenvalue correction fitted in the
  Kronecker eigenbasis, ``Lambda[j,k] = E_i[sum_seeds (Q_S^T G_i Q_A)[j,k]^2]``.
* ``kfac``: ``Lambda = l_S l_A^T`` (Kronecker eigenvalues).
* ``none``: H = identity, damping ignored (plain gradient dot products = TracIn, one checkpoint).

Preconditioning (the damped inverse applied to a gradient matrix V, d_out x d_in):
``precond(V) = Q_S [ (Q_S^T V Q_A) / (Lambda + lambda_l) ] Q_A^T``.
Damping: ``damping_mode="relative"`` (default, ``damping=0.1``): ``lambda_l = damping * mean(Lambda_l)``,
the mean eigenvalue of layer l's curvature block (kronfluence's heuristic when its damping is None);
``"absolute"``: ``lambda_l = damping`` for every layer.

Scores (sign as kronfluence: positive = training image i helps, i.e. up-weighting it lowers the
query loss; this is minus Koh & Liang's I_up,loss):

* query for class c: ``V_c = mean`` (or sum) over query images j with y_jc = 1 of
  ``grad_theta (1/C) BCE(z_jc, 1)`` -- the class-c term of the query image's loss
  (sum over classes of these terms = the full loss); ``Vt_c = precond(V_c)``.
* ``per_class[i, c] = sum_l <Vt_{c,l}, G_{i,l}>``                                        (N x C)
* ``self_influence[i] = sum_l <precond(G_{i,l}), G_{i,l}>  = g_i^T H^-1 g_i``  (>= 0)
* spatial map: ``maps[i, c, u] = sum_l delta_{i,u}^T Vt_{c,l} a_{i,u}`` -- the exact split of
  ``per_class[i, c]`` over the output locations u of the layers (a k x k conv's patch term is
  attributed to its output location). Summed over u it equals the score. Layers on a finer grid
  than the coarsest tracked grid are sum-pooled to it (integer ratios only), which keeps the sums.
  For the head, ``delta_u = (p - y)/(C T)`` and ``a_u`` is the feature vector at u.
* ``sample_weights``: from robust z-scores of log self-influence (see that function).
* ``suggest_labels``: new labels for atypical images whose labels the classifier contradicts.

Costs and memory (float32; ResNet-50, default tracking = last bottleneck ``layer4.2`` conv1/2/3 +
head, output stride 16 so T = 28 x 28 = 784 at 448 px, 1 x 1 conv d_in x d_out; p = 4.46M + 20 x 2048):

* factors: A 2048^2 + 4608^2 + 512^2, S 512^2 + 512^2 + 2048^2 + 20^2 floats (~118 MB; eigenvectors
  as much again; e.g. conv3 is 2048 x 512: A 512^2, S 2048^2), Lambda = one weight-sized matrix
  per layer (p floats, 18 MB); preconditioned queries C x p (20 x 4.5M x 4 B = 357 MB).
* per batch of B: unfolded input of conv2 B x 4608 x 784 (14 MB per image), per-sample gradients
  B x p (18 MB per image), maps B x C x T. Batch 32-64 fits in a few GB.
* flops per image (multiply-adds), last block: forming G ~ 3.4 G; EK-FAC rotation for self-influence
  ~ 17 G; 20 class maps ~ 20 x 3.4 G; A statistics ~ 20 G; GGN seeds multiply the S / Lambda work by C
  (``fisher="sampled"`` avoids that).

Requirements on the model: BatchNorm in eval mode (so samples stay independent: checked), tracked
convs with groups = 1 and zero padding, and no in-place change of a tracked layer's captured input
or output after it ran (checked through tensor version counters; torchvision ResNets are fine).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Self, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Fisher",
    "Hessian",
    "DampingMode",
    "MapMode",
    "tracked_layers",
    "per_sample_gradients",
    "FactorStats",
    "KroneckerEigen",
    "EigenvalueStats",
    "QueryStats",
    "Preconditioner",
    "covariance_stats",
    "eigenvalue_stats",
    "query_stats",
    "fit_preconditioner",
    "BatchInfluence",
    "score_batch",
    "robust_zscores",
    "atypicality",
    "sample_weights",
    "suggest_labels",
    "weight_matrix",
]

Fisher = Literal["ggn", "sampled", "empirical"]
Hessian = Literal["ekfac", "kfac", "none"]
DampingMode = Literal["relative", "absolute"]
Layers = Mapping[str, nn.Module]
LogitsFn = Callable[[Tensor], Tensor]
MapMode = Literal["labelled", "all", "none"]


# ---------------------------------------------------------------------------------------------
# Tracked layers
# ---------------------------------------------------------------------------------------------


def tracked_layers(model: nn.Module, scope: str | Sequence[str] = "last_block") -> dict[str, nn.Module]:
    """The layers whose weights influence is computed for, by qualified module name.

    For a ``CamClassifier`` (``model.backbone.layer4`` and ``model.head``):
    ``"last_block"`` = the convs of the last residual block of layer4 + the head (default);
    ``"layer4"`` = every Conv2d/Linear in layer4 (downsample conv included) + the head.
    A sequence of module names selects those modules of any model. BN, stem and downsample
    parameters outside the scope are not tracked.
    """
    named = dict(model.named_modules())
    if isinstance(scope, str):
        if scope not in ("last_block", "layer4"):
            raise ValueError(f"unknown influence scope '{scope}' (last_block, layer4 or a list of module names)")
        if not (hasattr(model, "backbone") and hasattr(model.backbone, "layer4") and hasattr(model, "head")):
            raise ValueError(f"scope '{scope}' needs a CamClassifier-like model (backbone.layer4 and head)")
        prefix = "backbone.layer4."
        if scope == "last_block":
            prefix += f"{len(cast(nn.Sequential, model.backbone.layer4)) - 1}."
        names = [
            n
            for n, m in named.items()
            if n.startswith(prefix)
            and isinstance(m, (nn.Conv2d, nn.Linear))
            and (scope == "layer4" or ".downsample." not in n)
        ]
        names.append("head")
    else:
        names = list(scope)
    layers = {}
    for name in names:
        if name not in named:
            raise ValueError(f"no module named '{name}' in the model")
        layers[name] = _check_layer(name, named[name])
    return layers


def _check_layer(name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"{name}: only zero padding is supported")
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: only Conv2d and Linear layers can be tracked, not {type(module).__name__}")
    return module


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    padding = conv.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even receptive field is not supported")
        return (total[0] // 2, total[1] // 2)
    if isinstance(padding, str):  # torch accepts no other string
        raise ValueError(f"unsupported padding '{padding}'")
    ph, pw = padding
    return ph, pw


# ---------------------------------------------------------------------------------------------
# Capture: inputs a (B x d_in x T) and output gradients delta (B x d_out x T) from hooks
# ---------------------------------------------------------------------------------------------


@dataclass
class _Captured:
    """One batch through the tracked layers: logits, and per layer a and the outputs to seed."""

    logits: Tensor  # B x C (float32, or float64 for a float64 model)
    inputs: dict[str, Tensor]  # raw layer inputs (detached)
    outputs: dict[str, Tensor]  # raw layer outputs (in the graph)
    versions: dict[str, tuple[int, int]]

    def activations(self, layers: Layers) -> dict[str, Tensor]:
        """a per layer, B x d_in x T (logits dtype), unfolded for k x k convs, 1 appended for a bias."""
        self._check_versions()
        return {
            name: _layer_activations(module, self.inputs[name].to(self.logits.dtype)) for name, module in layers.items()
        }

    def output_grads(self, dz: Tensor, retain_graph: bool) -> dict[str, Tensor]:
        """delta per layer, B x d_out x T (logits dtype): backpropagate dz = dL/dlogits (B x C)."""
        self._check_versions()
        names = list(self.outputs)
        grads = torch.autograd.grad(
            self.logits, [self.outputs[n] for n in names], grad_outputs=dz, retain_graph=retain_graph, allow_unused=True
        )
        out = {}
        for name, g in zip(names, grads):
            if g is None:  # the layer does not reach the logits
                g = torch.zeros_like(self.outputs[name])
            out[name] = _flatten_locations(g).to(self.logits.dtype)
        return out

    def grids(self) -> dict[str, tuple[int, ...]]:
        return {name: _grid(out) for name, out in self.outputs.items()}

    def _check_versions(self) -> None:
        for name, (vin, vout) in self.versions.items():
            if self.inputs[name]._version != vin or self.outputs[name]._version != vout:
                raise RuntimeError(
                    f"{name}: its input or output was modified in place after the layer ran; "
                    "influence needs the original tensors (use inplace=False there)"
                )


def _grid(out: Tensor) -> tuple[int, ...]:
    """Output locations of a layer: (h, w) for a conv, the middle dims for a Linear ((1, 1) if none)."""
    if out.dim() == 4:
        return tuple(out.shape[-2:])
    mid = tuple(out.shape[1:-1])
    return mid if len(mid) == 2 else (math.prod(mid), 1)


def _flatten_locations(t: Tensor) -> Tensor:
    """Conv output B x D x h x w -> B x D x T; Linear B x ... x D -> B x D x T."""
    if t.dim() == 4:
        return t.flatten(2)
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def _layer_activations(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and _conv_padding(module) == (0, 0):
            a = x.flatten(2)
        else:
            a = F.unfold(
                x, module.kernel_size, dilation=module.dilation, padding=_conv_padding(module), stride=module.stride
            )
    else:
        a = _flatten_locations(x)
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], dim=1)
    return a


class _OnlyTrackedRequireGrad:
    """Context: tracked weights (and biases) require grad, every other parameter does not."""

    def __init__(self, model: nn.Module, layers: Layers):
        self.model, self.tracked = model, {id(p) for m in layers.values() for p in m.parameters(recurse=False)}

    def __enter__(self) -> None:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(id(p) in self.tracked)

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _default_logits(model: nn.Module) -> LogitsFn:
    def logits(x: Tensor) -> Tensor:
        out = model(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    return logits


def _capture(model: nn.Module, layers: Layers, x: Tensor, logits_fn: LogitsFn | None) -> _Captured:
    """Forward x once with hooks on the tracked layers (graph only from the first tracked layer)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise RuntimeError("BatchNorm in training mode mixes samples: call model.eval() before influence")
    inputs, outputs, versions = {}, {}, {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), out
            versions[name] = (args[0]._version, out._version)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad(), _OnlyTrackedRequireGrad(model, layers):
            logits = (logits_fn or _default_logits(model))(x)
            # Influence math runs in float32 (float64 if the model computes in float64, e.g. in
            # tests); a caller's autocast (bf16 trunk) is fine: a and delta are cast up.
            logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise RuntimeError(f"tracked layers not used by the forward pass: {missing}")
    return _Captured(logits, inputs, outputs, versions)


# ---------------------------------------------------------------------------------------------
# Output-space seeds dz = dL/dlogits
# ---------------------------------------------------------------------------------------------


def _loss_grad(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """dL_i/dz for L_i = w_i (1/C) sum_c BCE(z_ic, y_ic): w_i (sigmoid(z) - y) / C."""
    dz = (torch.sigmoid(logits) - labels) / logits.shape[1]
    return dz if weights is None else dz * weights[:, None]


def _fisher_seeds(
    logits: Tensor, labels: Tensor, fisher: Fisher, weights: Tensor | None, generator: torch.Generator | None
) -> list[Tensor]:
    """Seeds whose pseudo-gradients g~ satisfy sum_seeds g~ g~^T = (an estimate of) the GGN H_i."""
    p = torch.sigmoid(logits)
    num_classes = logits.shape[1]
    scale = torch.full_like(p[:, :1], 1.0 / num_classes) if weights is None else (weights[:, None] / num_classes)
    if fisher == "ggn":
        std = torch.sqrt(scale * p * (1 - p))
        seeds = []
        for c in range(num_classes):
            dz = torch.zeros_like(p)
            dz[:, c] = std[:, c]
            seeds.append(dz)
        return seeds
    if fisher == "sampled":
        u = torch.rand(p.shape, generator=generator, device=p.device if generator is None else generator.device)
        sampled = (u.to(p.device) < p).to(p.dtype)  # yhat ~ Bernoulli(p)
        return [scale.sqrt() * (p - sampled)]
    if fisher == "empirical":
        return [scale.sqrt() * (p - labels)]
    raise ValueError(f"unknown fisher '{fisher}' (ggn, sampled, empirical)")


def _as_labels(labels: Tensor, logits: Tensor) -> Tensor:
    if labels.shape != logits.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return labels.to(logits.device, logits.dtype)


def _as_weights(weights: Tensor | None, logits: Tensor) -> Tensor | None:
    return None if weights is None else weights.to(logits.device, logits.dtype).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Per-sample gradients
# ---------------------------------------------------------------------------------------------


def _outer(delta: Tensor, a: Tensor) -> Tensor:
    """G = sum_u delta_u a_u^T per sample: (B x d_out x T, B x d_in x T) -> B x d_out x d_in."""
    return torch.bmm(delta, a.transpose(1, 2))


def per_sample_gradients(
    model: nn.Module,
    layers: Layers,
    images: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    logits_fn: LogitsFn | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients of ``L_i = w_i (1/C) sum_c BCE(z_ic, y_ic)`` for each tracked layer.

    Returns name -> B x d_out x d_in with ``G_i = sum_u delta_u a_u^T`` (one batched backward; conv
    weights reshaped to d_out x (C_in k_h k_w), a bias as the last column).
    """
    cap = _capture(model, layers, images, logits_fn)
    dz = _loss_grad(cap.logits.detach(), _as_labels(labels, cap.logits), _as_weights(weights, cap.logits))
    deltas = cap.output_grads(dz, retain_graph=False)
    acts = cap.activations(layers)
    with torch.no_grad():
        return {n: _outer(deltas[n], acts[n]) for n in layers}


def weight_matrix(module: nn.Module) -> Tensor:
    """A tracked layer's parameters as the d_out x d_in matrix the gradients use (bias last)."""
    weight, bias = cast(Tensor, module.weight), cast(Tensor | None, module.bias)  # Conv2d or Linear
    w = weight.reshape(weight.shape[0], -1)
    return w if bias is None else torch.cat([w, bias[:, None]], dim=1)


# ---------------------------------------------------------------------------------------------
# Mergeable sums
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sums:
    """Sums over samples plus counts, keyed "<part>/<layer>"; shards add up with ``+``.

    Sums are kept in float64 so that the order in which shards are added does not matter
    (to rounding). ``to_state()`` gives a flat dict of CPU tensors for ``torch.save`` or HDF5.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)

    def __add__(self, other: Self) -> Self:
        if not isinstance(other, type(self)):
            return NotImplemented
        if not self.sums or not other.sums:
            return (other if not self.sums else self).copy()
        if self.sums.keys() != other.sums.keys():
            raise ValueError(f"cannot add {type(self).__name__}: different layers or parts")
        return type(self)(
            {k: v + other.sums[k].to(v.device) for k, v in self.sums.items()},
            {k: v + other.counts[k].to(v.device) for k, v in self.counts.items()},
        )

    def __radd__(self, other):  # sum(parts) starts from 0
        return self if isinstance(other, int) and other == 0 else NotImplemented

    def copy(self) -> Self:
        return type(self)({k: v.clone() for k, v in self.sums.items()}, {k: v.clone() for k, v in self.counts.items()})

    @classmethod
    def merge(cls, parts: Iterable[Self]) -> Self:
        total = cls()
        for part in parts:
            total = total + part
        return total

    def accumulate(self, key: str, value: Tensor, count: float | Tensor) -> None:
        value = value.detach().double()
        count = torch.as_tensor(count, dtype=torch.float64, device=value.device)
        if key in self.sums:
            self.sums[key] += value
            self.counts[key] += count
        else:
            self.sums[key], self.counts[key] = value.clone(), count.clone()

    def to(self, device: torch.device | str) -> Self:
        return type(self)(
            {k: v.to(device) for k, v in self.sums.items()}, {k: v.to(device) for k, v in self.counts.items()}
        )

    def to_state(self) -> dict[str, Tensor]:
        state = {f"sum/{k}": v.cpu() for k, v in self.sums.items()}
        state.update({f"count/{k}": v.cpu() for k, v in self.counts.items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], device: torch.device | str = "cpu") -> Self:
        sums = {k[4:]: torch.as_tensor(v).to(device) for k, v in state.items() if k.startswith("sum/")}
        counts = {k[6:]: torch.as_tensor(v).to(device) for k, v in state.items() if k.startswith("count/")}
        return cls(sums, counts)

    def layers(self, part: str) -> list[str]:
        return [k.split("/", 1)[1] for k in self.sums if k.split("/", 1)[0] == part]


@dataclass
class KroneckerEigen:
    """Eigendecompositions of the K-FAC factors per layer: A = Q_A diag(l_A) Q_A^T, S likewise."""

    q_a: dict[str, Tensor]
    l_a: dict[str, Tensor]
    q_s: dict[str, Tensor]
    l_s: dict[str, Tensor]

    def to(self, device: torch.device | str) -> KroneckerEigen:
        return KroneckerEigen(
            *({k: v.to(device) for k, v in d.items()} for d in (self.q_a, self.l_a, self.q_s, self.l_s))
        )

    def to_state(self) -> dict[str, Tensor]:
        return {
            f"{part}/{k}": v.cpu()
            for part, d in zip(("q_a", "l_a", "q_s", "l_s"), (self.q_a, self.l_a, self.q_s, self.l_s))
            for k, v in d.items()
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor], device: torch.device | str = "cpu") -> KroneckerEigen:
        parts = {
            p: {k.split("/", 1)[1]: torch.as_tensor(v).to(device) for k, v in state.items() if k.split("/", 1)[0] == p}
            for p in ("q_a", "l_a", "q_s", "l_s")
        }
        return cls(**parts)


class FactorStats(_Sums):
    """K-FAC factor sums: ``A/<l>`` = sum_{i,u} a a^T (count: locations), ``S/<l>`` =
    sum_i sum_seeds sum_u delta delta^T (count: samples). Add shards, then ``finalize()``."""

    def finalize(self, eigh_dtype: torch.dtype = torch.float64) -> KroneckerEigen:
        """A = sum/locations, S = sum/samples, then symmetric eigendecompositions (after merging).

        Eigenvalues are clamped at 0 (rounding); the decomposition runs in ``eigh_dtype`` and the
        result is stored in float32.
        """
        q_a: dict[str, Tensor] = {}
        l_a: dict[str, Tensor] = {}
        q_s: dict[str, Tensor] = {}
        l_s: dict[str, Tensor] = {}
        for name in self.layers("A"):
            for part, q, lam in (("A", q_a, l_a), ("S", q_s, l_s)):
                mat = self.sums[f"{part}/{name}"] / self.counts[f"{part}/{name}"].clamp_min(1)
                mat = 0.5 * (mat + mat.T)
                vals, vecs = torch.linalg.eigh(mat.to(eigh_dtype))
                q[name], lam[name] = vecs.float(), vals.clamp_min(0).float()
        return KroneckerEigen(q_a, l_a, q_s, l_s)


class EigenvalueStats(_Sums):
    """EK-FAC eigenvalue-correction sums ``lambda/<l>`` = sum_i sum_seeds (Q_S^T G_i Q_A)^2
    (count: samples). Add shards, then ``finalize()``."""

    def finalize(self) -> dict[str, Tensor]:
        """Lambda_l = E_i[sum_seeds (Q_S^T G_i Q_A)^2] per layer (d_out x d_in, float32)."""
        return {
            n: (self.sums[f"lambda/{n}"] / self.counts[f"lambda/{n}"].clamp_min(1)).float()
            for n in self.layers("lambda")
        }


class QueryStats(_Sums):
    """Per-class query gradient sums ``grad/<l>`` (C x d_out x d_in) with per-class counts (C,).

    Row c sums, over query images that have class c, the gradient of their class-c loss term
    (1/C) BCE(z_c, 1). Add shards, then ``finalize()``.
    """

    def finalize(
        self, reduce: Literal["mean", "sum"] = "mean", dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """name -> C x d_out x d_in; ``mean`` divides row c by the number of query images with c
        (a class without query images gets a zero row: its scores and maps are 0)."""
        out = {}
        for name in self.layers("grad"):
            total = self.sums[f"grad/{name}"]
            if reduce == "mean":
                total = total / self.counts[f"grad/{name}"].clamp_min(1)[:, None, None]
            elif reduce != "sum":
                raise ValueError(f"unknown reduce '{reduce}' (mean, sum)")
            out[name] = total.to(dtype)
        return out


# ---------------------------------------------------------------------------------------------
# Passes over the data (one batch each; the stage loops, shards and adds the results)
# ---------------------------------------------------------------------------------------------


def covariance_stats(
    model: nn.Module,
    layers: Layers,
    images: Tensor,
    labels: Tensor,
    *,
    fisher: Fisher = "ggn",
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    logits_fn: LogitsFn | None = None,
) -> FactorStats:
    """Pass 1 (K-FAC / EK-FAC): factor sums of one batch. Sum the results over batches and shards."""
    cap = _capture(model, layers, images, logits_fn)
    logits = cap.logits.detach()
    seeds = _fisher_seeds(logits, _as_labels(labels, logits), fisher, _as_weights(weights, logits), generator)
    stats = FactorStats()
    with torch.no_grad():
        for name, a in cap.activations(layers).items():
            flat = a.transpose(1, 2).reshape(-1, a.shape[1])
            stats.accumulate(f"A/{name}", flat.T @ flat, flat.shape[0])
    s_sums: dict[str, Tensor] = {}
    for k, dz in enumerate(seeds):
        deltas = cap.output_grads(dz, retain_graph=k + 1 < len(seeds))
        with torch.no_grad():
            for name, d in deltas.items():
                flat = d.transpose(1, 2).reshape(-1, d.shape[1])
                s_sums[name] = flat.T @ flat + s_sums.get(name, 0)
    for name in layers:
        stats.accumulate(f"S/{name}", s_sums[name], images.shape[0])
    return stats


def eigenvalue_stats(
    model: nn.Module,
    layers: Layers,
    eigen: KroneckerEigen,
    images: Tensor,
    labels: Tensor,
    *,
    fisher: Fisher = "ggn",
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    logits_fn: LogitsFn | None = None,
) -> EigenvalueStats:
    """Pass 2 (EK-FAC only): sums of squared per-sample (pseudo-)gradients in the eigenbasis,
    one seed at a time (memory: one seed's delta per layer)."""
    cap = _capture(model, layers, images, logits_fn)
    logits = cap.logits.detach()
    seeds = _fisher_seeds(logits, _as_labels(labels, logits), fisher, _as_weights(weights, logits), generator)
    acts = cap.activations(layers)
    routes: dict[str, Route] = {}
    squares: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, a in acts.items():
            routes[name] = _rotation_route(a.shape[1], eigen.q_s[name].shape[0], a.shape[2], len(seeds))
            acts[name] = _prepare_rotation(a, eigen.q_a[name].to(a), routes[name])
    for k, dz in enumerate(seeds):
        deltas = cap.output_grads(dz, retain_graph=k + 1 < len(seeds))
        with torch.no_grad():
            for name in layers:
                r = _rotate(
                    acts[name],
                    deltas[name],
                    eigen.q_a[name].to(acts[name]),
                    eigen.q_s[name].to(acts[name]),
                    routes[name],
                )
                squares[name] = r.square().sum(0) + squares.get(name, 0)
    stats = EigenvalueStats()
    for name in layers:
        stats.accumulate(f"lambda/{name}", squares[name], images.shape[0])
    return stats


Route = Literal["gradient", "factors"]


def _rotation_route(d_in: int, d_out: int, t: int, n_seeds: int) -> Route:
    """The cheaper of two equal ways to get Q_S^T G Q_A for n_seeds seeds (multiply-adds):
    rotate each per-sample gradient, n_seeds (o d T + o^2 d + o d^2), or rotate a once and each
    delta, T d^2 + n_seeds (T o^2 + o d T) -- which pays off with the C seeds of the exact GGN."""
    via_gradient = n_seeds * (d_out * d_in * t + d_out * d_out * d_in + d_out * d_in * d_in)
    via_factors = t * d_in * d_in + n_seeds * (t * d_out * d_out + d_out * d_in * t)
    return "gradient" if via_gradient <= via_factors else "factors"


def _prepare_rotation(a: Tensor, q_a: Tensor, route: Route) -> Tensor:
    """a (B x d_in x T) as the route needs it: Q_A^T a for ``factors``, a itself for ``gradient``."""
    return q_a.T @ a if route == "factors" else a


def _rotate(prepared: Tensor, delta: Tensor, q_a: Tensor, q_s: Tensor, route: Route) -> Tensor:
    """Q_S^T G Q_A per sample (B x d_out x d_in), G = sum_u delta_u a_u^T."""
    if route == "factors":
        return _outer(q_s.T @ delta, prepared)
    return q_s.T @ _outer(delta, prepared) @ q_a


def query_stats(
    model: nn.Module, layers: Layers, images: Tensor, labels: Tensor, *, logits_fn: LogitsFn | None = None
) -> QueryStats:
    """Pass 3: per-class query gradient sums of one batch of query images with image-level labels.

    For each class c present in the batch: one backward of dz = e_c (sigmoid(z_c) - 1) / C over the
    images having c (others seeded with 0), then sum_{j,u} delta_u a_u^T over the batch -- the
    batch's summed gradient, no per-sample gradients needed.
    """
    cap = _capture(model, layers, images, logits_fn)
    logits = cap.logits.detach()
    labels = _as_labels(labels, logits)
    num_classes = logits.shape[1]
    dz_all = _loss_grad(logits, labels) * (labels > 0.5)
    present = [c for c in range(num_classes) if bool((labels[:, c] > 0.5).any())]
    acts = cap.activations(layers)
    sums: dict[str, Tensor] = {}
    for k, c in enumerate(present):
        dz = torch.zeros_like(dz_all)
        dz[:, c] = dz_all[:, c]
        deltas = cap.output_grads(dz, retain_graph=k + 1 < len(present))
        with torch.no_grad():
            for name in layers:
                grad = torch.einsum("bot,bit->oi", deltas[name], acts[name])
                if name not in sums:
                    sums[name] = grad.new_zeros((num_classes,) + grad.shape)
                sums[name][c] = grad
    counts = (labels > 0.5).sum(0).double()
    stats = QueryStats()
    for name, module in layers.items():
        if name not in sums:  # no positive label in this batch
            sums[name] = torch.zeros((num_classes,) + tuple(weight_matrix(module).shape), device=logits.device)
        stats.accumulate(f"grad/{name}", sums[name], counts)
    return stats


# ---------------------------------------------------------------------------------------------
# Preconditioner
# ---------------------------------------------------------------------------------------------


@dataclass
class Preconditioner:
    """The damped inverse curvature per layer: precond(V) = Q_S [(Q_S^T V Q_A) / D] Q_A^T with
    D = Lambda + lambda_l (EK-FAC or K-FAC), or the identity (``kind="none"``)."""

    kind: Hessian
    q_a: dict[str, Tensor] = field(default_factory=dict)
    q_s: dict[str, Tensor] = field(default_factory=dict)
    denom: dict[str, Tensor] = field(default_factory=dict)  # d_out x d_in, Lambda + lambda_l
    damping: dict[str, float] = field(default_factory=dict)  # lambda_l actually used per layer

    def precondition(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """name -> (..., d_out, d_in) gradient matrices -> preconditioned matrices of the same shape."""
        if self.kind == "none":
            return dict(grads)
        out = {}
        for n, g in grads.items():
            q_a, q_s, denom = (t.to(g.device, g.dtype) for t in (self.q_a[n], self.q_s[n], self.denom[n]))
            out[n] = q_s @ ((q_s.T @ g @ q_a) / denom) @ q_a.T
        return out

    def self_influence(
        self,
        grads: Mapping[str, Tensor],
        acts: Mapping[str, Tensor] | None = None,
        deltas: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """sum_l <precond(G_l), G_l> for per-sample gradients name -> B x d_out x d_in; returns (B,).

        Given the layer inputs ``acts`` and output gradients ``deltas`` (B x d x T) that formed
        G, each rotation Q_S^T G Q_A takes the cheaper route (``_rotation_route``): rotating a and
        delta beats rotating G when there are few locations (small images), e.g. 8x fewer
        multiply-adds for a ResNet conv at 8 x 8 outputs."""
        total: Tensor | None = None
        for n, g in grads.items():
            if self.kind == "none":
                term = g.square().sum((1, 2))
            else:
                q_a, q_s, denom = (t.to(g.device, g.dtype) for t in (self.q_a[n], self.q_s[n], self.denom[n]))
                a = acts[n] if acts is not None else None
                d = deltas[n] if deltas is not None else None
                if (
                    a is not None
                    and d is not None
                    and _rotation_route(a.shape[1], d.shape[1], a.shape[2], 1) == "factors"
                ):
                    rotated = _rotate(_prepare_rotation(a, q_a, "factors"), d, q_a, q_s, "factors")
                else:
                    rotated = q_s.T @ g @ q_a
                term = (rotated.square() / denom).sum((1, 2))
            total = term if total is None else total + term
        if total is None:
            raise ValueError("self_influence needs the gradients of at least one layer")
        return total

    def to(self, device: torch.device | str) -> Preconditioner:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Preconditioner(self.kind, move(self.q_a), move(self.q_s), move(self.denom), dict(self.damping))

    def to_state(self) -> dict[str, object]:
        state: dict[str, object] = {"kind": self.kind}
        for part in ("q_a", "q_s", "denom"):
            state.update({f"{part}/{k}": v.cpu() for k, v in getattr(self, part).items()})
        state.update({f"damping/{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.damping.items()})
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, object], device: torch.device | str = "cpu") -> Preconditioner:
        kind = state["kind"]
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        parts: dict[str, dict] = {"q_a": {}, "q_s": {}, "denom": {}, "damping": {}}
        for key, value in state.items():
            part, _, name = key.partition("/")
            if part in ("q_a", "q_s", "denom"):
                parts[part][name] = torch.as_tensor(value).to(device)
            elif part == "damping":
                parts[part][name] = float(torch.as_tensor(value))
        return cls(kind, **parts)  # type: ignore[arg-type]


def fit_preconditioner(
    kind: Hessian,
    eigen: KroneckerEigen | None = None,
    eigenvalues: Mapping[str, Tensor] | None = None,
    *,
    damping: float = 0.1,
    damping_mode: DampingMode = "relative",
) -> Preconditioner:
    """Build the preconditioner from merged statistics.

    ``ekfac`` needs ``eigen`` (``FactorStats.finalize()``) and ``eigenvalues``
    (``EigenvalueStats.finalize()``); ``kfac`` needs ``eigen``; ``none`` needs nothing.
    Damping: ``relative`` -> lambda_l = damping * mean(Lambda_l) (mean eigenvalue of the layer's
    curvature block); ``absolute`` -> lambda_l = damping.
    """
    if kind == "none":
        return Preconditioner("none")
    if kind not in ("ekfac", "kfac"):
        raise ValueError(f"unknown hessian '{kind}' (ekfac, kfac, none)")
    if eigen is None or (kind == "ekfac" and eigenvalues is None):
        raise ValueError(
            f"hessian '{kind}' needs the factor eigendecompositions"
            + (" and the EK-FAC eigenvalues" if kind == "ekfac" else "")
        )
    if damping_mode not in ("relative", "absolute"):
        raise ValueError(f"unknown damping mode '{damping_mode}' (relative, absolute)")
    if damping < 0:
        raise ValueError("damping must be >= 0")
    ekfac_values = eigenvalues if kind == "ekfac" else None  # not None for ekfac (checked above)
    denom, used = {}, {}
    for name in eigen.q_a:
        lam = ekfac_values[name] if ekfac_values is not None else torch.outer(eigen.l_s[name], eigen.l_a[name])
        lam = lam.float().clamp_min(0)
        used[name] = float(damping * lam.mean()) if damping_mode == "relative" else float(damping)
        if used[name] <= 0:
            used[name] = 1e-12  # all-zero curvature with zero damping: avoid 0/0
        denom[name] = lam + used[name]
    return Preconditioner(kind, dict(eigen.q_a), dict(eigen.q_s), denom, used)


# ---------------------------------------------------------------------------------------------
# Scoring a batch of training images
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchInfluence:
    """Influence of one batch of training images (B images, C classes, maps on an h x w grid)."""

    self_influence: Tensor  # B        g_i^T H^-1 g_i (>= 0)
    per_class: Tensor  # B x C    <precond(V_c), g_i>, positive = helps class c's queries
    maps: Tensor | None  # B x C x h x w; maps.sum((-2, -1)) == per_class (to rounding) where computed
    loss: Tensor  # B        per-sample loss (1/C) sum_c BCE
    probs: Tensor  # B x C    the classifier's sigmoid scores (for label suggestions)


def score_batch(
    model: nn.Module,
    layers: Layers,
    preconditioner: Preconditioner,
    queries: Mapping[str, Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    maps: MapMode = "labelled",
    logits_fn: LogitsFn | None = None,
) -> BatchInfluence:
    """Pass 4: self-influence, per-class influence and spatial maps of a batch of training images.

    ``queries``: the preconditioned per-class query gradients,
    ``preconditioner.precondition(merged_query_stats.finalize())`` (name -> C x d_out x d_in; any
    leading size Q works for other query sets, e.g. Q single images for pairwise scores).
    The training loss is the unweighted per-sample loss.

    ``maps``: ``"labelled"`` (default) computes the map of class c only for images labelled with
    c (zeros elsewhere; about C / labels-per-image times cheaper), ``"all"`` for every class,
    ``"none"`` skips them. Maps are per (image, class) on the coarsest tracked output grid (the
    head's for a CamClassifier); the stage upsamples them.
    """
    if maps not in ("labelled", "all", "none"):
        raise ValueError(f"unknown maps mode '{maps}' (labelled, all, none)")
    cap = _capture(model, layers, images, logits_fn)
    logits = cap.logits.detach()
    labels = _as_labels(labels, logits)
    deltas = cap.output_grads(_loss_grad(logits, labels), retain_graph=False)
    acts = cap.activations(layers)
    with torch.no_grad():
        grads = {n: _outer(deltas[n], acts[n]) for n in layers}
        self_inf = preconditioner.self_influence(grads, acts, deltas)
        per_class = functools.reduce(
            operator.add,
            (torch.einsum("boi,coi->bc", grads[n], queries[n].to(grads[n].device, grads[n].dtype)) for n in layers),
        )
        spatial = None
        if maps != "none":
            spatial = _spatial_maps(acts, deltas, queries, cap.grids(), labels > 0.5 if maps == "labelled" else None)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return BatchInfluence(self_inf, per_class, spatial, loss, torch.sigmoid(logits))


def _spatial_maps(
    acts: Mapping[str, Tensor],
    deltas: Mapping[str, Tensor],
    queries: Mapping[str, Tensor],
    grids: Mapping[str, tuple[int, ...]],
    mask: Tensor | None,
) -> Tensor:
    """maps[b, c, u] = sum_l delta_{b,u}^T Vt_{c,l} a_{b,u}, each layer sum-pooled to the coarsest
    grid; only where ``mask[b, c]`` (B x Q bool) when a mask is given, zeros elsewhere."""
    target = min(grids.values(), key=lambda g: g[0] * g[1])
    first = next(iter(acts.values()))
    n_queries = next(iter(queries.values())).shape[0]
    if mask is not None and mask.shape[1] != n_queries:
        raise ValueError(f"maps='labelled' needs one query per class ({mask.shape[1]}), got {n_queries}")
    total = first.new_zeros((first.shape[0], n_queries) + tuple(target))
    for name, a in acts.items():
        delta, vt = deltas[name], queries[name].to(a.device, a.dtype)
        for c in range(n_queries):  # one class at a time bounds memory to B x min(d_in, d_out) x T
            rows: slice | Tensor = slice(None)
            if mask is not None:
                rows = mask[:, c].nonzero().flatten()
                if rows.numel() == 0:
                    continue
            a_c, d_c = a[rows], delta[rows]
            if d_c.shape[1] <= a_c.shape[1]:
                terms = ((vt[c] @ a_c) * d_c).sum(1)  # (Vt a_u) . delta_u
            else:
                terms = ((vt[c].T @ d_c) * a_c).sum(1)  # (Vt^T delta_u) . a_u
            terms = _sum_pool_to(terms.reshape(terms.shape[0], 1, *grids[name]), target, name)[:, 0]
            total[rows, c] += terms
    return total


def _sum_pool_to(maps: Tensor, grid: tuple[int, ...], name: str) -> Tensor:
    h, w = maps.shape[-2:]
    if (h, w) == tuple(grid):
        return maps
    if h % grid[0] or w % grid[1]:
        raise ValueError(
            f"{name}: output grid {h}x{w} is not an integer multiple of {grid[0]}x{grid[1]}; "
            "track layers on one grid to get maps"
        )
    kernel = (h // grid[0], w // grid[1])
    return F.avg_pool2d(maps, kernel, divisor_override=1)  # a sum pool: the map keeps its total


# ---------------------------------------------------------------------------------------------
# From scores to an atypicality ranking and sample weights
# ---------------------------------------------------------------------------------------------


def robust_zscores(values: Tensor) -> Tensor:
    """(v - median) / (1.4826 MAD): a z-score that a few extreme values cannot drag."""
    values = values.double()
    med = values.median()
    mad = (values - med).abs().median() * 1.4826
    if mad <= 0:
        mad = values.std() if values.numel() > 1 and values.std() > 0 else torch.tensor(1.0, dtype=values.dtype)
    return (values - med) / mad


def atypicality(self_influence: Tensor, eps: float = 1e-30) -> Tensor:
    """Mislabel / atypicality score per training image (higher = more suspicious):
    ``robust_z(log self_influence)`` (self-influence spans orders of magnitude, hence the log).

    The ranking the mislabel report sorts by, and the input of ``sample_weights``.
    """
    return robust_zscores(torch.log(self_influence.double().clamp_min(eps)))


def sample_weights(
    score: Tensor, w_min: float = 0.2, w_max: float = 2.0, threshold: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """Per-sample loss weights for round 2 from an atypicality score (e.g. ``atypicality(...)``).

    Rule: ``raw_i = exp(-max(score_i - threshold, 0) / temperature)`` (images up to ``threshold``
    robust standard deviations above the median keep raw weight 1; more atypical ones decay), then
    ``w_i = clip(s * raw_i, w_min, w_max)`` with the scale s > 0 found by bisection so that
    ``mean(w) = 1``. Requires ``w_min <= 1 <= w_max``. Returns float32 weights.
    """
    if not w_min <= 1.0 <= w_max:
        raise ValueError(f"need w_min <= 1 <= w_max, got [{w_min}, {w_max}]")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    raw = torch.exp(-(score.double() - threshold).clamp_min(0) / temperature).clamp_min(1e-300)
    lo, hi = 0.0, w_max / float(raw.min())
    for _ in range(200):  # mean(clip(s raw)) grows monotonically with s, from w_min to w_max
        mid = 0.5 * (lo + hi)
        if float(raw.mul(mid).clamp(w_min, w_max).mean()) < 1.0:
            lo = mid
        else:
            hi = mid
    return raw.mul(0.5 * (lo + hi)).clamp(w_min, w_max).float()


def suggest_labels(
    labels: Tensor,
    probs: Tensor,
    score: Tensor,
    threshold: float = 1.0,
    confidence: float = 0.5,
    drop_below: float = 0.0,
) -> Tensor:
    """Suggested image labels (N x C bool) for the images that look mislabelled.

    An image is a suspect when its atypicality ``score`` exceeds ``threshold``. A suspect is
    relabelled when the classifier confidently sees a class it is not labelled with
    (``p > confidence``): those classes are added and its labelled classes scoring
    ``p < 1 - confidence`` are dropped. Without an addition, a suspect's labelled class is dropped
    only when the classifier all but rules it out (``p < drop_below``; 0: never), which is
    rarer: the classifier was trained to score its labels high. Atypical images whose labels the
    classifier does not contradict (hard but correctly labelled ones) keep their labels, and so
    does every image below the threshold. A suggestion never empties a label set: an image it would
    leave without labels keeps its labelled class that scores highest.
    """
    labels = labels > 0.5
    suspect = (score > threshold).reshape(-1, 1)
    add = ~labels & (probs > confidence) & suspect
    relabel = add.any(dim=1, keepdim=True)
    drop = labels & suspect & (((probs < 1 - confidence) & relabel) | (probs < drop_below))
    out = (labels & ~drop) | add
    emptied = ~out.any(dim=1) & labels.any(dim=1)
    if emptied.any():
        best = probs.masked_fill(~labels, -1.0).argmax(dim=1)
        out[emptied, best[emptied]] = True
    return out


def fit_trust(learned: float, low: float, high: float) -> float:
    """How far to act on influence scores, from the classifier's learned fraction g (e.g. the
    median of ``core.metrics.learned_fractions``): 0 at or below ``low``, 1 at or above ``high``, linear
    between (a step at ``low == high``). Atypicality is a statement about a model; a model that
    explains little of its labels ranks images by noise."""
    if not low <= high:
        raise ValueError(f"need low <= high, got {low}, {high}")
    if learned >= high:
        return 1.0
    if learned <= low:
        return 0.0
    return (learned - low) / (high - low)


def damp_weights(weights: Tensor, trust: float) -> Tensor:
    """``1 + trust (w - 1)``: the weights pulled towards 1 (trust 0: all 1, trust 1: as they are).
    Keeps their mean at 1 and their range within [min(w), max(w)] and 1."""
    if not 0.0 <= trust <= 1.0:
        raise ValueError(f"trust must be in [0, 1], got {trust}")
    return 1.0 + trust * (weights - 1.0)
