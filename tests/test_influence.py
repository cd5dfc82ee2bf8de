"""core/influence.py: hook gradients, EK-FAC / K-FAC / identity, exact spatial split, shards, weights.

Oracles are independent of the hook code: per-example autograd loops, and an explicit damped
Gauss-Newton matrix built from torch.func Jacobians on a model with a few hundred parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from igcam_cli.core import influence as inf
from igcam_cli.models.classifier import CamClassifier

C = 3
ALL = ["conv_a", "conv_b", "head"]


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyCam(nn.Module):
    """CamClassifier in miniature: an untracked trunk, then tracked conv_a (3x3, with bias),
    conv_b (1x1) and a bias-free 1x1 head; logits are the spatial mean of the head maps.
    ``pool`` halves the grid after conv_a, so conv_a's maps live on a 2x finer grid."""

    def __init__(
        self, cin: int = 3, trunk: int = 8, hid: int = 4, classes: int = C, conv_b: bool = True, pool: bool = False
    ):
        super().__init__()
        self.trunk = nn.Conv2d(cin, trunk, 3, padding=1)
        self.conv_a = nn.Conv2d(trunk, hid, 3, padding=1, bias=True)
        self.conv_b = nn.Conv2d(hid, hid, 1, bias=False) if conv_b else None
        self.head = nn.Conv2d(hid, classes, 1, bias=False)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv_a(torch.relu(self.trunk(x))))
        if self.pool:
            f = F.avg_pool2d(f, 2)
        if self.conv_b is not None:
            f = torch.relu(self.conv_b(f))
        maps = self.head(f)
        return maps.mean((2, 3)), maps


def toy_data(n: int, seed: int, size: int = 8, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable multi-label toy images: class c present = a bright 3x3 blob in channel c."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, C, generator=g) < 0.4).float()
    images = noise * torch.randn(n, C, size, size, generator=g)
    for i, c in labels.nonzero().tolist():
        r, q = torch.randint(0, size - 2, (2,), generator=g).tolist()
        images[i, c, r : r + 3, q : q + 3] += 2.0
    return images, labels


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.multilabel_soft_margin_loss(model(images)[0], labels).backward()
        opt.step()
    return model.eval()


def make_model(seed: int = 0, **kwargs) -> TinyCam:
    torch.manual_seed(seed)
    return TinyCam(**kwargs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    ranks = score.double().argsort().argsort().double() + 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fit_all(model, layers, images, labels, queries_x, queries_y, **fit):
    """Factors, EK-FAC eigenvalues and per-class query gradients (mean) in one go."""
    eigen = inf.covariance_stats(model, layers, images, labels, **fit).finalize()
    lam = inf.eigenvalue_stats(model, layers, eigen, images, labels, **fit).finalize()
    queries = inf.query_stats(model, layers, queries_x, queries_y).finalize()
    return eigen, lam, queries


def flat_jacobians(model: nn.Module, layers: dict, images: torch.Tensor) -> torch.Tensor:
    """dz/dtheta per image (n x C x p, float64) with torch.func, theta in weight_matrix layout."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p, x):
        return functional_call(model, p, (x[None],))[0][0]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, images)
    blocks = []
    for name, module in layers.items():
        w = jac[f"{name}.weight"].reshape(len(images), C, module.weight.shape[0], -1)
        if module.bias is not None:
            w = torch.cat([w, jac[f"{name}.bias"][..., None]], dim=-1)
        blocks.append(w.reshape(len(images), C, -1))
    return torch.cat(blocks, dim=-1).double()


def exact_ggn(model, layers, images, labels, queries_x, queries_y):
    """Explicit GGN H = mean_i J_i^T diag(p(1-p))/C J_i, training gradients g_i and per-class
    query gradients V_c (mean over query images having c of the class-c loss term)."""
    jac, jac_q = flat_jacobians(model, layers, images), flat_jacobians(model, layers, queries_x)
    with torch.no_grad():
        p, pq = torch.sigmoid(model(images)[0].double()), torch.sigmoid(model(queries_x)[0].double())
    ggn = torch.einsum("ncp,nc,ncq->pq", jac, p * (1 - p) / C, jac) / len(images)
    grads = torch.einsum("ncp,nc->np", jac, (p - labels.double()) / C)
    yq = queries_y.double()
    v = torch.stack(
        [torch.einsum("np,n->p", jac_q[:, c], (pq[:, c] - 1) / C * yq[:, c]) / yq[:, c].sum() for c in range(C)]
    )
    return ggn, grads, v


def layer_sizes(layers: dict) -> list[int]:
    return [inf.weight_matrix(m).numel() for m in layers.values()]


# ---------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------


def test_tracked_layers_of_cam_classifier():
    model = CamClassifier("resnet18", C)
    assert list(inf.tracked_layers(model)) == ["backbone.layer4.1.conv1", "backbone.layer4.1.conv2", "head"]
    layer4 = inf.tracked_layers(model, "layer4")
    assert "backbone.layer4.0.downsample.0" in layer4 and "backbone.layer4.0.conv1" in layer4
    assert list(layer4)[-1] == "head" and len(layer4) == 6
    with pytest.raises(ValueError):
        inf.tracked_layers(model, ["backbone.layer4.1.bn1"])
    with pytest.raises(ValueError):
        inf.tracked_layers(model, "layer3")


# ---------------------------------------------------------------------------------------------
# Per-sample gradients
# ---------------------------------------------------------------------------------------------


def loop_gradients(model, layers, images, labels, weights=None):
    """Oracle: one autograd call per image, with the training stage's loss."""
    out = {n: [] for n in layers}
    for i in range(len(images)):
        loss = F.multilabel_soft_margin_loss(model(images[i : i + 1])[0], labels[i : i + 1])
        if weights is not None:
            loss = loss * weights[i]
        params = [p for m in layers.values() for p in m.parameters(recurse=False)]
        grads = iter(torch.autograd.grad(loss, params))
        for name, module in layers.items():
            g = next(grads).reshape(module.weight.shape[0], -1)
            if module.bias is not None:
                g = torch.cat([g, next(grads)[:, None]], dim=1)
            out[name].append(g)
    return {n: torch.stack(v) for n, v in out.items()}


def test_hook_gradients_equal_per_example_autograd_tiny():
    images, labels = toy_data(6, seed=1)
    model = make_model().eval()
    layers = inf.tracked_layers(model, ALL)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.5])
    hooks = inf.per_sample_gradients(model, layers, images, labels, weights=weights)
    loop = loop_gradients(model, layers, images, labels, weights)
    for name in layers:
        assert hooks[name].shape == loop[name].shape
        torch.testing.assert_close(hooks[name], loop[name], rtol=1e-5, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("scope", ["last_block", "layer4"])
def test_hook_gradients_equal_per_example_autograd_resnet18(scope):
    torch.manual_seed(0)
    model = CamClassifier("resnet18", C).eval()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    layers = inf.tracked_layers(model, scope)
    hooks = inf.per_sample_gradients(model, layers, images, labels)
    loop = loop_gradients(model, layers, images, labels)
    for name in layers:
        torch.testing.assert_close(hooks[name], loop[name], rtol=1e-4, atol=1e-6)


def test_batchnorm_in_training_mode_and_inplace_changes_are_refused():
    model = CamClassifier("resnet18", C).train()
    x, y = torch.randn(2, 3, 32, 32), torch.ones(2, C)
    with pytest.raises(RuntimeError, match="eval"):
        inf.per_sample_gradients(model, inf.tracked_layers(model), x, y)

    class InPlace(TinyCam):
        def forward(self, x):
            out = self.head(torch.relu(self.conv_a(torch.relu(self.trunk(x)))))
            return out.mul_(1.0).mean((2, 3)), out

    model = InPlace(conv_b=False).eval()
    with pytest.raises(RuntimeError, match="in place"):
        inf.per_sample_gradients(model, inf.tracked_layers(model, ["head"]), *toy_data(2, seed=0))


# ---------------------------------------------------------------------------------------------
# Identity preconditioner = plain gradient dot products
# ---------------------------------------------------------------------------------------------


def test_none_equals_gradient_dot_products():
    images, labels = toy_data(8, seed=2)
    qx, qy = toy_data(6, seed=3)
    model = train(make_model(), images, labels, steps=20)
    layers = inf.tracked_layers(model, ALL)
    params = [p for m in layers.values() for p in m.parameters(recurse=False)]

    def flat_grad(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    # query per class: mean over query images having c of grad (1/C) BCE(z_c, 1), by autograd
    v = torch.zeros(C, sum(p.numel() for p in params))
    for c in range(C):
        having = qy[:, c].nonzero().flatten()
        for j in having.tolist():
            z = model(qx[j : j + 1])[0][0, c]
            v[c] += flat_grad(F.binary_cross_entropy_with_logits(z, torch.tensor(1.0)) / C) / len(having)
    g = torch.stack(
        [
            flat_grad(F.multilabel_soft_margin_loss(model(images[i : i + 1])[0], labels[i : i + 1]))
            for i in range(len(images))
        ]
    )
    # the hook code flattens weight then bias per layer, in layer order: same order as `params`
    pre = inf.fit_preconditioner("none")
    out = inf.score_batch(
        model,
        layers,
        pre,
        pre.precondition(inf.query_stats(model, layers, qx, qy).finalize()),
        images,
        labels,
        maps="none",
    )
    assert out.maps is None
    torch.testing.assert_close(out.per_class, g @ v.T, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.self_influence, g.square().sum(1), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out.loss, F.multilabel_soft_margin_loss(model(images)[0], labels, reduction="none"))


# ---------------------------------------------------------------------------------------------
# Spatial maps: the exact split of the scores over locations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tracked,pool", [(["head"], False), (["conv_b"], False), (["conv_a"], False), (ALL, False), (ALL, True)]
)
@pytest.mark.parametrize("kind", ["ekfac", "none"])
def test_maps_sum_to_scores(tracked, pool, kind):
    images, labels = toy_data(10, seed=4)
    model = train(make_model(pool=pool), images, labels, steps=20)
    layers = inf.tracked_layers(model, tracked)
    eigen, lam, queries = fit_all(model, layers, images, labels, images, labels)
    pre = inf.fit_preconditioner(kind, eigen, lam)
    out = inf.score_batch(model, layers, pre, pre.precondition(queries), images, labels, maps="all")
    grid = (4, 4) if pool else (8, 8)
    assert out.maps.shape == (len(images), C) + grid
    assert out.per_class.abs().max() > 0
    torch.testing.assert_close(
        out.maps.sum((-2, -1)), out.per_class, rtol=1e-4, atol=1e-5 * float(out.per_class.abs().max())
    )


def test_labelled_maps_are_the_all_maps_of_labelled_classes():
    images, labels = toy_data(10, seed=5)
    model = train(make_model(), images, labels, steps=20)
    layers = inf.tracked_layers(model, ALL)
    pre = inf.fit_preconditioner("none")
    queries = inf.query_stats(model, layers, images, labels).finalize()
    every = inf.score_batch(model, layers, pre, queries, images, labels, maps="all").maps
    labelled = inf.score_batch(model, layers, pre, queries, images, labels, maps="labelled").maps
    present = labels.bool()
    torch.testing.assert_close(labelled[present], every[present])
    assert bool((labelled[~present] == 0).all()) and bool((every[~present] != 0).any())


@pytest.mark.parametrize(
    "scope,dtype,rtol",
    [("last_block", torch.float64, 1e-10), ("layer4", torch.float64, 1e-10), ("last_block", torch.float32, 1e-3)],
)
def test_maps_sum_to_scores_resnet18(scope, dtype, rtol):
    """Exact in float64; float32 sums over 2.4M products per layer agree to rounding."""
    torch.manual_seed(0)
    model = CamClassifier("resnet18", C).eval().to(dtype)
    images = torch.randn(3, 3, 32, 32, dtype=dtype)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0]])
    layers = inf.tracked_layers(model, scope)
    pre = inf.fit_preconditioner("none")
    queries = inf.query_stats(model, layers, images, labels).finalize(dtype=dtype)
    out = inf.score_batch(model, layers, pre, queries, images, labels, maps="all")
    assert out.maps.shape == (3, C, 2, 2) and out.maps.dtype == dtype  # output stride 16 at 32 px
    torch.testing.assert_close(
        out.maps.sum((-2, -1)), out.per_class, rtol=rtol, atol=rtol * float(out.per_class.abs().max())
    )


# ---------------------------------------------------------------------------------------------
# Curvature: EK-FAC and K-FAC against explicit matrices
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_small():
    """A TinyCam (conv_a 3x3 with bias, conv_b 1x1, head: 320 tracked parameters), 30 Adam steps
    on 128 toy images (~70 % label accuracy: not saturated), and 128 query images."""
    images, labels = toy_data(128, seed=10)
    qx, qy = toy_data(128, seed=11)
    model = train(make_model(), images, labels, steps=30)
    return model, images, labels, qx, qy


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis(trained_small):
    """Lambda_l[j, k] = (q_S_j (x) q_A_k)^T H_l (q_S_j (x) q_A_k) for the exact GGN block H_l."""
    model, images, labels, qx, qy = trained_small
    layers = inf.tracked_layers(model, ALL)
    eigen, lam, _ = fit_all(model, layers, images, labels, qx, qy)
    ggn, _, _ = exact_ggn(model, layers, images, labels, qx, qy)
    start = 0
    for name, size in zip(layers, layer_sizes(layers)):
        block = ggn[start : start + size, start : start + size]
        start += size
        basis = torch.kron(eigen.q_s[name].double(), eigen.q_a[name].double())  # row-major vec(G)
        expected = torch.einsum("pj,pq,qj->j", basis, block, basis).reshape(lam[name].shape)
        torch.testing.assert_close(lam[name].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_kfac_preconditioner_is_the_damped_kronecker_inverse(trained_small):
    model, images, labels, qx, qy = trained_small
    layers = inf.tracked_layers(model, ["conv_a"])
    stats = inf.covariance_stats(model, layers, images, labels)
    eigen = stats.finalize()
    a = stats.sums["A/conv_a"] / stats.counts["A/conv_a"]
    s = stats.sums["S/conv_a"] / stats.counts["S/conv_a"]
    damping = 0.01 * float(torch.linalg.eigvalsh(torch.kron(s, a)).mean())
    pre = inf.fit_preconditioner("kfac", eigen, damping=damping, damping_mode="absolute")
    torch.manual_seed(0)
    v = torch.randn(s.shape[0], a.shape[0])
    # row-major vec(S V A) = (S (x) A) vec(V): the K-FAC block in this layout is kron(S, A)
    explicit = torch.linalg.solve(
        torch.kron(s, a) + damping * torch.eye(s.shape[0] * a.shape[0], dtype=a.dtype), v.double().flatten()
    )
    torch.testing.assert_close(
        pre.precondition({"conv_a": v})["conv_a"].double().flatten(),
        explicit,
        rtol=1e-3,
        atol=1e-4 * float(explicit.abs().max()),
    )
    assert pre.damping["conv_a"] == pytest.approx(damping)
    relative = inf.fit_preconditioner("kfac", eigen, damping=0.1)
    mean_eig = float(torch.outer(eigen.l_s["conv_a"], eigen.l_a["conv_a"]).mean())
    assert relative.damping["conv_a"] == pytest.approx(0.1 * mean_eig, rel=1e-5)


def test_ekfac_correlates_with_exact_damped_ggn_influence(trained_small):
    """EK-FAC vs exact influence with the explicit GGN H (320 x 320) and the same absolute damping
    lambda = mean eigenvalue of H for every method: self-influence g_i^T (H + lambda I)^-1 g_i and
    per-class scores g_i^T (H + lambda I)^-1 V_c.

    Tight bound (> 0.9) against the layer-block-diagonal H: the matrix every K-FAC-family method
    approximates (cross-layer blocks are dropped by construction). Against the full H the numbers
    are printed, bounded loosely, and EK-FAC must beat K-FAC and plain gradient dot products.
    """
    model, images, labels, qx, qy = trained_small
    layers = inf.tracked_layers(model, ALL)
    eigen, lam, queries = fit_all(model, layers, images, labels, qx, qy)
    ggn, grads, v = exact_ggn(model, layers, images, labels, qx, qy)
    assert ggn.shape == (320, 320)
    damping = float(ggn.diagonal().mean())
    block = torch.cat([torch.full((n,), i) for i, n in enumerate(layer_sizes(layers))])
    eye = damping * torch.eye(len(ggn), dtype=ggn.dtype)
    full, diag = torch.linalg.inv(ggn + eye), torch.linalg.inv(ggn * (block[:, None] == block[None, :]) + eye)
    exact_self, blockdiag_self = (torch.einsum("np,pq,nq->n", grads, m, grads) for m in (full, diag))
    exact_class, blockdiag_class = grads @ full @ v.T, grads @ diag @ v.T
    rho = {}
    for kind in ("ekfac", "kfac", "none"):
        pre = inf.fit_preconditioner(kind, eigen, lam, damping=damping, damping_mode="absolute")
        out = inf.score_batch(model, layers, pre, pre.precondition(queries), images, labels, maps="none")
        rho[kind] = {
            "self_blockdiag": spearman(out.self_influence, blockdiag_self),
            "class_blockdiag": spearman(out.per_class, blockdiag_class),
            "self_full": spearman(out.self_influence, exact_self),
            "class_full": spearman(out.per_class, exact_class),
        }
    rho["blockdiag"] = {
        "self_full": spearman(blockdiag_self, exact_self),
        "class_full": spearman(blockdiag_class, exact_class),
    }
    print(
        "Spearman vs exact damped GGN influence:", {k: {m: round(x, 3) for m, x in r.items()} for k, r in rho.items()}
    )
    assert rho["ekfac"]["self_blockdiag"] > 0.9 and rho["ekfac"]["class_blockdiag"] > 0.9
    assert rho["ekfac"]["self_full"] > 0.8 and rho["ekfac"]["class_full"] > 0.7
    for other in ("kfac", "none"):
        for metric in rho["ekfac"]:
            assert rho["ekfac"][metric] > rho[other][metric], (metric, other)


def test_ggn_seeds_match_the_sampled_fisher_in_expectation(trained_small):
    model, images, labels, _, _ = trained_small
    layers = inf.tracked_layers(model, ["head"])
    exact = inf.covariance_stats(model, layers, images, labels, fisher="ggn")
    gen = torch.Generator().manual_seed(0)
    sampled = sum(
        inf.covariance_stats(model, layers, images, labels, fisher="sampled", generator=gen) for _ in range(200)
    )
    s_exact = exact.sums["S/head"] / exact.counts["S/head"]
    s_mc = sampled.sums["S/head"] / sampled.counts["S/head"]
    assert float((s_mc - s_exact).norm() / s_exact.norm()) < 0.05
    torch.testing.assert_close(sampled.sums["A/head"] / 200, exact.sums["A/head"])


# ---------------------------------------------------------------------------------------------
# Shards, states, rotations
# ---------------------------------------------------------------------------------------------


def test_sharded_statistics_equal_unsharded(trained_small):
    model, images, labels, qx, qy = trained_small
    layers = inf.tracked_layers(model, ["conv_a", "head"])
    halves = [slice(0, 50), slice(50, None)]

    def roundtrip(stats):
        return type(stats).from_state(stats.to_state())

    full = inf.covariance_stats(model, layers, images, labels)
    shards = sum(roundtrip(inf.covariance_stats(model, layers, images[h], labels[h])) for h in halves)
    for key in full.sums:
        scale = float(full.sums[key].abs().max())  # float32 rounding of the per-batch products
        torch.testing.assert_close(shards.sums[key], full.sums[key], rtol=1e-5, atol=1e-6 * scale)
        assert float(shards.counts[key]) == float(full.counts[key])
    eigen = inf.KroneckerEigen.from_state(full.finalize().to_state())
    lam_full = inf.eigenvalue_stats(model, layers, eigen, images, labels)
    lam_shards = inf.EigenvalueStats.merge(
        roundtrip(inf.eigenvalue_stats(model, layers, eigen, images[h], labels[h])) for h in halves
    )
    q_full = inf.query_stats(model, layers, qx, qy)
    q_shards = sum(roundtrip(inf.query_stats(model, layers, qx[h], qy[h])) for h in halves)
    name = q_shards.layers("grad")[0]
    torch.testing.assert_close(q_shards.counts[f"grad/{name}"], qy.sum(0).double())
    scores = []
    for lam, q in ((lam_full, q_full), (lam_shards, q_shards)):
        pre = inf.Preconditioner.from_state(inf.fit_preconditioner("ekfac", eigen, lam.finalize()).to_state())
        queries = pre.precondition(q.finalize())
        scores.append(inf.score_batch(model, layers, pre, queries, images[:20], labels[:20]))
    for field in ("per_class", "self_influence", "maps"):
        a, b = getattr(scores[0], field), getattr(scores[1], field)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_rotation_routes_agree():
    torch.manual_seed(0)
    a, delta = torch.randn(4, 6, 9), torch.randn(4, 5, 9)
    q_a, q_s = torch.linalg.qr(torch.randn(6, 6))[0], torch.linalg.qr(torch.randn(5, 5))[0]
    rotated = [
        inf._rotate(inf._prepare_rotation(a, q_a, route), delta, q_a, q_s, route) for route in ("gradient", "factors")
    ]
    torch.testing.assert_close(rotated[0], rotated[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated[0], q_s.T @ inf._outer(delta, a) @ q_a, rtol=1e-5, atol=1e-5)
    assert inf._rotation_route(4608, 512, 784, 1) == "gradient"  # ResNet-50 conv2, one seed
    assert inf._rotation_route(4608, 512, 784, 20) == "factors"  # ... with 20 GGN seeds


# ---------------------------------------------------------------------------------------------
# Self-influence finds mislabelled images; sample weights
# ---------------------------------------------------------------------------------------------


def test_self_influence_ranks_mislabelled_images_high():
    images, labels = toy_data(200, seed=20)
    qx, qy = toy_data(64, seed=21)
    gen = torch.Generator().manual_seed(22)
    bad = torch.randperm(200, generator=gen)[:20]  # 10 % of the images: one class bit flipped
    flipped = torch.randint(0, C, (20,), generator=gen)
    noisy = labels.clone()
    noisy[bad, flipped] = 1 - noisy[bad, flipped]
    is_bad = torch.zeros(200, dtype=torch.bool)
    is_bad[bad] = True
    model = train(make_model(hid=8), images, noisy, steps=100)
    layers = inf.tracked_layers(model, ALL)
    eigen, lam, queries = fit_all(model, layers, images, noisy, qx, qy)
    pre = inf.fit_preconditioner("ekfac", eigen, lam)
    out = inf.score_batch(model, layers, pre, pre.precondition(queries), images, noisy, maps="none")
    score = inf.atypicality(out.self_influence)
    print(f"mislabel AUROC: self-influence {auroc(score, is_bad):.3f}, loss {auroc(out.loss, is_bad):.3f}")
    assert auroc(score, is_bad) > 0.8
    weights = inf.sample_weights(score)
    assert weights[is_bad].mean() < weights[~is_bad].mean()


def test_sample_weights_have_mean_one_and_respect_the_clip():
    gen = torch.Generator().manual_seed(0)
    self_influence = torch.exp(torch.randn(500, generator=gen) * 2)  # heavy tailed, like the real thing
    self_influence[:25] *= 1e3
    score = inf.atypicality(self_influence)
    for w_min, w_max in ((0.2, 2.0), (0.5, 1.2), (0.0, 10.0)):
        w = inf.sample_weights(score, w_min=w_min, w_max=w_max)
        assert float(w.double().mean()) == pytest.approx(1.0, abs=1e-6)
        assert float(w.min()) >= w_min - 1e-7 and float(w.max()) <= w_max + 1e-7
        order = score.argsort()
        assert bool((w[order][1:] <= w[order][:-1] + 1e-7).all())  # more atypical -> no larger weight
        assert float(w[:25].max()) < float(w[25:].median())
    torch.testing.assert_close(inf.sample_weights(torch.zeros(7)), torch.ones(7))
    with pytest.raises(ValueError):
        inf.sample_weights(score, w_min=1.5, w_max=2.0)


def test_suggest_labels_swaps_only_confident_contradictions_of_atypical_images():
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    probs = torch.tensor(
        [
            [0.2, 0.9, 0.1],  # atypical, sees class 2 instead of 1: swapped
            [0.2, 0.9, 0.1],  # the same scores but typical: kept
            [0.9, 0.05, 0.1],  # atypical, doubts class 2 but sees nothing new: kept
            [0.4, 0.8, 0.75],  # atypical, sees 2 and 3; class 1 is unsure (0.4 > 0.3): kept
            [0.95, 0.6, 0.02],
        ]
    )  # atypical: 1 added, 3 dropped, 2 kept
    score = torch.tensor([3.0, 0.5, 3.0, 3.0, 3.0])
    out = inf.suggest_labels(labels, probs, score, threshold=1.0, confidence=0.7)
    expected = torch.tensor([[0, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(out, expected)
    assert bool(out.any(dim=1).all())  # never an empty label set
    # At confidence 0.5 the unsure class 1 of image 4 (p 0.4) is dropped.
    assert inf.suggest_labels(labels, probs, score, confidence=0.5)[3].tolist() == [False, True, True]


def test_suggest_labels_drops_a_ruled_out_label_only_when_asked():
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.1],  # atypical, class 2 ruled out: dropped at drop_below 0.1
            [0.9, 0.05, 0.1],  # the same but typical: kept
            [0.02, 0.1, 0.1],  # its only label ruled out: kept (never empty)
            [0.3, 0.01, 0.02],
        ]
    )  # both labels ruled out: the likelier one (3) stays
    score = torch.tensor([3.0, 0.5, 3.0, 3.0])
    assert torch.equal(inf.suggest_labels(labels, probs, score), labels)  # default: no drop without an addition
    out = inf.suggest_labels(labels, probs, score, drop_below=0.1)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(out, expected)


def test_self_influence_is_the_same_by_either_rotation_route():
    """score_batch rotates a and delta instead of G when that is cheaper (few locations, as here)."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Conv2d(3, 8, 3, padding=1)
            self.conv_a = nn.Conv2d(8, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 3, 1, bias=False)

        def forward(self, x):
            f = torch.relu(self.conv_a(F.avg_pool2d(torch.relu(self.trunk(x)), 4)))  # 2 x 2 locations
            return self.head(f).mean((2, 3)), None

    torch.manual_seed(0)
    model = Tiny().eval()
    layers = inf.tracked_layers(model, ["conv_a", "head"])
    x, y = torch.randn(6, 3, 8, 8), (torch.rand(6, 3) < 0.5).float()
    assert inf._rotation_route(8 * 9 + 1, 16, 4, 1) == "factors"
    eigen = inf.covariance_stats(model, layers, x, y).finalize()
    pre = inf.fit_preconditioner("ekfac", eigen, inf.eigenvalue_stats(model, layers, eigen, x, y).finalize())
    queries = pre.precondition(inf.query_stats(model, layers, x, y).finalize())
    out = inf.score_batch(model, layers, pre, queries, x, y, maps="none")
    expected = pre.self_influence(inf.per_sample_gradients(model, layers, x, y))
    torch.testing.assert_close(out.self_influence, expected, rtol=1e-4, atol=0)


def test_fit_trust_ramps_from_low_to_high_and_damped_weights_keep_their_mean():
    assert [inf.fit_trust(g, 0.2, 0.5) for g in (-3.0, 0.2, 0.35, 0.5, 0.9)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert (inf.fit_trust(0.3, 0.4, 0.4), inf.fit_trust(0.4, 0.4, 0.4)) == (0.0, 1.0)  # a step
    with pytest.raises(ValueError):
        inf.fit_trust(0.3, 0.5, 0.2)
    w = inf.sample_weights(torch.tensor([-1.0, 0.0, 0.5, 2.0, 4.0]), threshold=0.0).double()
    assert torch.equal(inf.damp_weights(w, 1.0), w)
    assert torch.equal(inf.damp_weights(w, 0.0), torch.ones_like(w))
    half = inf.damp_weights(w, 0.5)
    assert torch.allclose(half, (w + 1) / 2) and float(half.mean()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        inf.damp_weights(w, 1.5)
