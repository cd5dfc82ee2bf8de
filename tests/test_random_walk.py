"""core/random_walk.py and models/boundary_net.py: IRN's affinities, random walk, pair labels, loss, boundary net."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from igcam_cli.core import random_walk as rw
from igcam_cli.models.boundary_net import BoundaryNet, boundary_net_loss
from igcam_cli.models.classifier import CamClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- IRN, restated plainly (loops, for small maps)


def irn_directions(radius: int) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """PathIndex.get_all_dir_paths: the search order and IRN's float test dist² < 1."""
    dirs = [(0, x) for x in range(1, radius)]
    dirs += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius) if x * x + y * y < radius**2]
    out = []
    for dy, dx in dirs:
        length_sq = dy * dy + dx * dx
        points = [
            (y, x)
            for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1)
            if (dy * x - dx * y) ** 2 / length_sq < 1
        ]
        out.append(((dy, dx), points))
    return out


def irn_dense_transition(edge: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """indexing.propagate_to_edge's T for one h x w edge map: pad (1 = edge) left/right/bottom by `radius`,
    sources at least radius-1 from those borders, sparse -> dense with transposes and identity, crop, ^beta,
    columns normalised."""
    h, w = edge.shape
    floor = radius - 1
    padded = F.pad(edge, (radius, radius, 0, radius), value=1.0).tolist()
    big_h, big_w = h + radius, w + 2 * radius
    dense = torch.eye(big_h * big_w, dtype=edge.dtype)
    for sy in range(big_h - floor):
        for sx in range(floor, big_w - floor):
            for (dy, dx), points in irn_directions(radius):
                aff = 1.0 - max(padded[sy + y][sx + x] for y, x in points)
                src, dst = sy * big_w + sx, (sy + dy) * big_w + sx + dx
                dense[src, dst] = dense[dst, src] = aff
    dense = dense.view(big_h, big_w, big_h, big_w)[:-radius, radius:-radius, :-radius, radius:-radius]
    scaled = dense.reshape(h * w, h * w).pow(beta)
    return scaled / scaled.sum(dim=0, keepdim=True)


def dense_power_by_squaring(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """to_transition_matrix's exp_times squarings: T^(2^exp_times)."""
    for _ in range(int(math.log2(steps))):
        matrix = matrix @ matrix
    return matrix


# ---------------------------------------------------------------- offsets and paths


def test_offsets_are_irns_directions():
    for radius in (2, 5, 10):
        expected = irn_directions(radius)
        offsets = rw.path_offsets(radius)
        assert set(offsets) == {d for d, _ in expected}
        assert all(set(rw.path_points(d)) == set(points) for d, points in expected)
        assert [len(rw.path_points(d)) for d in offsets] == sorted(len(p) for _, p in expected)
    assert len(rw.path_offsets(5)) == 34  # IRN's walk radius
    assert len(rw.path_offsets(10)) == 152  # IRN's training radius
    assert len(rw.path_offsets(2)) == 4


def test_path_points_by_hand():
    assert set(rw.path_points((0, 3))) == {(0, 0), (0, 1), (0, 2), (0, 3)}
    # the diagonal's path is a band |x - y| <= 1: its off-band corners are not on it
    assert set(rw.path_points((2, 2))) == {(0, 0), (1, 1), (2, 2), (0, 1), (1, 0), (1, 2), (2, 1)}
    assert rw.path_points((3, -1))[0] == (3, -1)  # destination first, as IRN


def test_affinity_is_one_minus_max_boundary_on_path():
    boundary = torch.zeros(1, 7, 7)
    boundary[0, 2, 3] = 0.7  # on the path (1, 1) -> (3, 3)
    boundary[0, 1, 3] = 0.9  # a corner of that pair's box, off its path
    boundary[0, 4, 2] = 0.4  # on the path (4, 0) -> (4, 3)
    offsets, aff = rw.affinities(boundary)
    assert aff.shape == (1, 34, 7, 7)
    diagonal, horizontal = offsets.index((2, 2)), offsets.index((0, 3))
    assert aff[0, diagonal, 1, 1].item() == pytest.approx(0.3)
    assert aff[0, horizontal, 4, 0].item() == pytest.approx(0.6)
    assert aff[0, horizontal, 5, 0].item() == 1.0


def test_pairs_leaving_the_image_get_zero_affinity_and_weight():
    boundary = torch.zeros(1, 6, 8)
    offsets, aff = rw.affinities(boundary)
    right, down, down_left = offsets.index((0, 1)), offsets.index((1, 0)), offsets.index((1, -1))
    assert (aff[0, right, :, -1] == 0).all() and (aff[0, right, :, :-1] == 1).all()
    assert (aff[0, down, -1] == 0).all() and (aff[0, down_left, :, 0] == 0).all()
    weights = rw.transition_weights(aff, offsets)
    assert (weights.forward[0, right, :, -1] == 0).all()
    assert (weights.backward[0, right, :, 0] == 0).all()  # nobody to the left of column 0


# ---------------------------------------------------------------- the transition matrix and the walk


def test_transition_is_column_stochastic_and_matches_irns_dense_matrix():
    torch.manual_seed(0)
    boundary = torch.rand(2, 9, 11, dtype=torch.float64)
    dense = rw.dense_transition(boundary)
    assert dense.shape == (2, 99, 99)
    assert (dense >= 0).all()
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(2, 99, dtype=torch.float64))
    for b in range(2):
        torch.testing.assert_close(dense[b], irn_dense_transition(boundary[b], radius=5, beta=10.0))
    # one sparse step on the pixel basis (one map per pixel) gives T row by row
    offsets, aff = rw.affinities(boundary)
    basis = torch.eye(99, dtype=torch.float64).view(1, 99, 9, 11).expand(2, -1, -1, -1)
    torch.testing.assert_close(rw.apply_transition(basis, aff, offsets).flatten(2), dense)


def test_sparse_walk_equals_dense_matrix_squared_irns_way():
    torch.manual_seed(1)
    boundary = torch.rand(1, 9, 11, dtype=torch.float64) ** 3  # mostly low, some strong edges
    cams = torch.rand(1, 3, 9, 11, dtype=torch.float64)
    walked = rw.random_walk(cams, boundary, steps=256)
    start = (cams * (1 - boundary)).flatten(2)
    dense = start @ dense_power_by_squaring(irn_dense_transition(boundary[0], 5, 10.0), 256)
    torch.testing.assert_close(walked.flatten(2), dense, rtol=1e-5, atol=1e-12)


def test_walk_stays_inside_a_closed_boundary():
    boundary = torch.zeros(1, 20, 20)
    boundary[0, 4:16, 4:16] = 1.0
    boundary[0, 5:15, 5:15] = 0.0  # a square ring of ones around rows/columns 5..14
    inside = torch.zeros(20, 20, dtype=torch.bool)
    inside[5:15, 5:15] = True
    torch.manual_seed(2)
    cams = torch.zeros(1, 2, 20, 20)
    cams[0, 0][inside] = 1.0
    cams[0, 1][inside] = torch.rand(100)
    walked = rw.random_walk(cams, boundary)
    torch.testing.assert_close(walked[0, 0][inside], torch.ones(100))
    spread = walked[0, 1][inside]
    assert spread.max() - spread.min() < 1e-3
    assert (walked[0][:, ~inside] == 0).all()
    # without the ring the same maps leak out
    leaked = rw.random_walk(cams, torch.zeros(1, 20, 20))
    assert leaked[0, 0][~inside].min() > 0.1


def test_random_walk_keeps_dtype_and_shape():
    cams = torch.rand(2, 3, 10, 12)
    walked = rw.random_walk(cams, torch.rand(2, 10, 12), steps=4)
    assert walked.shape == cams.shape and walked.dtype == torch.float32
    assert (walked >= 0).all()


def test_walk_to_maps_upsamples_crops_and_normalises_by_the_image_max():
    walked = torch.zeros(2, 2, 5, 6)
    walked[0, 0, 1:3, 1:3] = 4.0
    walked[0, 1, 3:5, 3:5] = 1.0
    maps = rw.walk_to_maps(walked, (18, 22))
    assert maps.shape == (2, 2, 18, 22)
    assert maps[0, 0].max().item() == pytest.approx(1.0)
    assert maps[0, 1].max().item() == pytest.approx(0.25)  # one max for all classes, as IRN
    assert (maps[1] == 0).all()  # an all-zero walk stays zero, no NaN
    bilinear = F.interpolate(walked, scale_factor=4, mode="bilinear", align_corners=False)[..., :18, :22]
    torch.testing.assert_close(maps[0], bilinear[0] / 4.0)


# ---------------------------------------------------------------- pair labels and the loss


def test_downsample_ir_labels_samples_every_fourth_pixel():
    labels = torch.arange(70 * 50).view(70, 50)
    reduced = rw.downsample_ir_labels(labels)
    assert reduced.shape == (18, 13)  # ceil(70/4) x ceil(50/4): the boundary grid
    assert reduced[2, 3].item() == labels[8, 12].item()


def test_pair_labels_by_hand():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]], dtype=torch.uint8)
    offsets = rw.path_offsets(2)  # (0, 1), (1, 0), (1, -1), (1, 1)
    pairs = rw.affinity_pair_labels(labels, offsets)
    assert pairs.bg_pos.shape == (1, 4, 2, 4)
    assert pairs.bg_pos.sum().item() == 6
    assert pairs.fg_pos.sum().item() == 3  # 6 less the 3 pairs with the ignored pixel
    assert pairs.neg.sum().item() == 4
    right = offsets.index((0, 1))
    assert pairs.neg[0, right, 0].tolist() == [0, 1, 0, 0]


def test_pair_labels_match_a_loop_over_pairs():
    torch.manual_seed(3)
    labels = torch.randint(0, 3, (6, 7))
    labels[labels == 2] = 255
    labels[0, 0] = 2
    offsets = rw.path_offsets(5)
    pairs = rw.affinity_pair_labels(labels, offsets)
    counts = {"bg_pos": 0, "fg_pos": 0, "neg": 0}
    for y in range(6):
        for x in range(7):
            for dy, dx in offsets:
                if not (0 <= y + dy < 6 and 0 <= x + dx < 7):
                    continue
                a, b = labels[y, x].item(), labels[y + dy, x + dx].item()
                if 255 in (a, b):
                    continue
                kind = "neg" if a != b else ("bg_pos" if a == 0 else "fg_pos")
                counts[kind] += 1
    assert {k: int(getattr(pairs, k).sum().item()) for k in counts} == counts


def two_region_labels() -> torch.Tensor:
    labels = torch.zeros(1, 8, 12, dtype=torch.long)
    labels[:, :, 6:] = 1
    return labels


def test_loss_of_a_flat_boundary_is_irns_formula():
    offsets = rw.path_offsets(5)
    pairs = rw.affinity_pair_labels(two_region_labels(), offsets)
    loss = rw.boundary_loss(torch.full((1, 8, 12), 0.5, dtype=torch.float64), pairs, offsets)
    # every term is -log(0.5 + 1e-5); pos = bg/2 + fg/2, total = (pos + neg) / 2
    assert loss.item() == pytest.approx(-math.log(0.5 + 1e-5), rel=1e-6)


def test_loss_is_lower_with_the_boundary_on_the_region_border():
    offsets = rw.path_offsets(5)
    pairs = rw.affinity_pair_labels(two_region_labels(), offsets)

    def loss_with_boundary_at(column: int) -> float:
        boundary = torch.full((1, 8, 12), 0.05)
        boundary[:, :, column] = 0.9
        return rw.boundary_loss(boundary, pairs, offsets).item()

    assert loss_with_boundary_at(6) < loss_with_boundary_at(2) / 3
    assert loss_with_boundary_at(6) < loss_with_boundary_at(9) / 3


def test_loss_has_finite_gradients():
    offsets = rw.path_offsets(10)
    pairs = rw.affinity_pair_labels(two_region_labels(), offsets)
    boundary = torch.rand(1, 8, 12, requires_grad=True)
    rw.boundary_loss(boundary, pairs, offsets).backward()
    assert boundary.grad is not None and torch.isfinite(boundary.grad).all()
    assert boundary.grad.abs().sum() > 0


# ---------------------------------------------------------------- the boundary net


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_boundary_net_shape_range_and_frozen_backbone(backbone):
    torch.manual_seed(0)
    classifier = CamClassifier(backbone, 3)
    net = BoundaryNet.from_classifier(classifier).train()
    assert not net.backbone.training  # frozen BatchNorm statistics, as IRN
    images = torch.randn(2, 3, 70, 50)
    logits = net(images)
    assert logits.shape == (2, 18, 13)  # ceil(70/4) x ceil(50/4)

    offsets = rw.path_offsets(rw.TRAIN_RADIUS)
    labels = torch.randint(0, 3, (2, 18, 13))
    loss = boundary_net_loss(net, images, rw.affinity_pair_labels(labels, offsets), offsets)
    loss.backward()
    assert all(p.grad is None for p in classifier.backbone.parameters())
    assert all(p.grad is not None for p in net.trainable_parameters())
    assert len(net.fuse.weight[0]) == 160

    probs = net.eval().boundary(images)
    assert probs.shape == (2, 18, 13)
    assert ((probs >= 0) & (probs <= 1)).all()


def test_boundary_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    net = BoundaryNet(CamClassifier("resnet18", 2).backbone).eval()
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = torch.sigmoid((net(image) + net(image.flip(-1)).flip(-1)) / 2)
    torch.testing.assert_close(net.boundary(image), expected)


def test_refine_walks_a_large_image_at_make_cams_drawn_size_and_upsamples():
    """refine's walk_batch with max_side: the boundary net and the stride-4 CAMs see the image drawn at the
    capped size make-cams drew it at, and the walked maps come back at the image's own size, equal to the walk
    of the drawn image upsampled. walk_max_side reads that size from the make-cams record."""
    import numpy as np

    from igcam_cli.config import RefineConfig
    from igcam_cli.core.cam import resize_bicubic_like_pil
    from igcam_cli.stages.refine import RefineItem, StridedCams, walk_batch, walk_max_side

    torch.manual_seed(0)
    classifier = CamClassifier("resnet18", 3).eval()
    walker = BoundaryNet(CamClassifier("resnet18", 3).backbone).eval()
    cfg = RefineConfig(walk_steps=4)
    image = (torch.rand(3, 48, 80) * 255).to(torch.uint8)
    classes = np.array([1, 3], dtype=np.uint8)
    batch = [RefineItem("a", image, torch.zeros(2, 48, 80), classes)]
    strided = StridedCams(classifier, [1.0, 0.5], flip=True)
    seen = []
    walker.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))  # image, mirror
    cpu = torch.device("cpu")

    capped = walk_batch(batch, [], walker, cfg, cpu, strided, max_side=40)[0]
    assert capped.shape == (2, 48, 80) and set(seen) == {(24, 40)}
    drawn = resize_bicubic_like_pil(image[None].float(), (24, 40))[0]
    small = walk_batch([RefineItem("a", drawn, torch.zeros(2, 24, 40), classes)], [], walker, cfg, cpu, strided)[0]
    upsampled = F.interpolate(torch.from_numpy(small)[None], size=(48, 80), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(torch.from_numpy(capped), upsampled)
    assert walk_batch(batch, [], walker, cfg, cpu, strided, max_side=80)[0].shape == (2, 48, 80)
    assert seen[-1] == (48, 80)  # within the cap: drawn as it is

    record = {"config": {"max_side": 1024}, "classifier": {"input_scale": 2.0}}
    assert walk_max_side(record) == 512 and walk_max_side({"config": {}}) == 0
