"""core/cam.py: multi-scale + flip CAM aggregation and per-class normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from igcam_cli.core.cam import multiscale_cams, normalize_cams, pyramid_cams, strided_cams
from igcam_cli.data.synthetic import SyntheticDataset
from igcam_cli.data.transforms import normalize, normalize_on_device
from igcam_cli.models.classifier import CamClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_cam_fn(seed: int = 0, classes: int = 3, stride: int = 2) -> nn.Module:
    """A deliberately non-symmetric cam_fn: random asymmetric 3x3 kernels, a stride, then ReLU."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, classes, kernel_size=3, stride=stride, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
        conv.weight[:, :, :, 0] += 2.0  # left column heavier than the right: not mirror-symmetric
    return nn.Sequential(conv, nn.ReLU()).eval()


def _pointwise_cam_fn(weights: torch.Tensor) -> nn.Module:
    """1x1 conv without bias + ReLU: the output at a pixel depends only on that pixel."""
    conv = nn.Conv2d(3, weights.shape[0], kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weights[:, :, None, None])
    return nn.Sequential(conv, nn.ReLU()).eval()


def _reference(cam_fn, images: torch.Tensor, scales, flip: bool) -> torch.Tensor:
    """Slow reference: one image, one scale and one orientation at a time, flips done by index."""
    results = []
    h, w = images.shape[-2:]
    for image in images:
        total = torch.zeros(0)
        for scale in scales:
            size = (int(h * scale), int(w * scale))  # floor, as F.interpolate(scale_factor=...) does
            x = (
                image[None]
                if scale == 1.0
                else F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)
            )
            passes = [cam_fn(x)]
            if flip:
                mirrored = cam_fn(x.index_select(-1, torch.arange(x.shape[-1] - 1, -1, -1)))
                passes.append(mirrored.index_select(-1, torch.arange(mirrored.shape[-1] - 1, -1, -1)))
            for out in passes:
                up = F.interpolate(out.float(), size=(h, w), mode="bilinear", align_corners=False)[0]
                total = up if total.numel() == 0 else total + up
        results.append(total)
    return torch.stack(results)


@pytest.mark.parametrize("size", [(32, 48), (37, 53)])
@pytest.mark.parametrize("scales", [[1.0], [1.0, 0.5, 1.5, 2.0], [0.5], [1.5, 0.75]])
def test_flip_of_input_gives_flipped_cams(size, scales):
    cam_fn = _conv_cam_fn()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        direct = multiscale_cams(cam_fn, x, scales, flip=True)
        mirrored = multiscale_cams(cam_fn, x.flip(-1), scales, flip=True)
    assert direct.abs().max() > 0.1  # the test is about real maps, not zeros
    torch.testing.assert_close(mirrored, direct.flip(-1), atol=1e-4, rtol=1e-4)


def test_without_flip_the_asymmetric_cam_fn_is_not_flip_equivariant():
    # Guards the test above: the cam_fn really is asymmetric, so only the flip pass makes it equivariant.
    cam_fn = _conv_cam_fn()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        direct = multiscale_cams(cam_fn, x, [1.0], flip=False)
        mirrored = multiscale_cams(cam_fn, x.flip(-1), [1.0], flip=False)
    assert (mirrored - direct.flip(-1)).abs().max() > 1e-2


@pytest.mark.parametrize("flip", [False, True])
def test_pointwise_cam_of_constant_image_is_scale_consistent(flip):
    weights = torch.tensor([[1.0, -0.5, 0.25], [-1.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    cam_fn = _pointwise_cam_fn(weights)
    colour = torch.tensor([0.8, -0.4, 1.2])
    x = colour[None, :, None, None].expand(1, 3, 37, 53).contiguous()
    single = torch.relu(weights @ colour)  # the map value each scale must give, per class
    assert single[0] > 0 and single[1] == 0 and single[2] > 0
    per_scale = []
    with torch.no_grad():
        for scale in (1.0, 0.5, 1.5, 2.0):
            one = multiscale_cams(cam_fn, x, [scale], flip=flip)
            per_scale.append(one)
            expected = single[None, :, None, None].expand_as(one) * (2 if flip else 1)
            torch.testing.assert_close(one, expected, atol=1e-5, rtol=1e-5)
        total = multiscale_cams(cam_fn, x, [1.0, 0.5, 1.5, 2.0], flip=flip)
    torch.testing.assert_close(total, 4 * per_scale[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        total, (4 * (2 if flip else 1)) * single[None, :, None, None].expand_as(total), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("size", [(37, 53), (33, 33), (64, 41)])
@pytest.mark.parametrize("scales", [[0.5], [1.5], [1.0, 0.5, 1.5, 2.0], [0.3]])
def test_output_has_input_size_and_float32(size, scales):
    cam_fn = _conv_cam_fn(stride=4)
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        out = multiscale_cams(cam_fn, x, scales, flip=True)
    assert out.shape == (3, 3, *size)
    assert out.dtype == torch.float32
    assert (out >= 0).all()


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("size", [(32, 48), (37, 53)])
def test_matches_slow_reference(flip, size):
    cam_fn = _conv_cam_fn(seed=3)
    scales = [1.0, 0.5, 1.5, 2.0]
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        got = multiscale_cams(cam_fn, x, scales, flip=flip)
        want = _reference(cam_fn, x, scales, flip)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_batch_result_equals_per_image_results():
    cam_fn = _conv_cam_fn(seed=5)
    x = torch.randn(3, 3, 37, 53)
    with torch.no_grad():
        batch = multiscale_cams(cam_fn, x, [1.0, 0.5, 1.5], flip=True)
        single = torch.cat([multiscale_cams(cam_fn, x[i : i + 1], [1.0, 0.5, 1.5], flip=True) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- normalize_cams


def _maps() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 7, 9, generator=g)
    maps[0] *= 40.0  # large
    maps[1] *= 0.01  # weak, but not zero
    maps[2] = 0.0  # all zero
    maps[3] -= 0.5  # mixed signs: negatives clamp to zero
    maps[4] *= 1e-3  # very weak
    return maps


def test_normalize_divides_by_max_plus_irns_epsilon():
    maps = _maps()
    out = normalize_cams(maps)
    assert out.shape == maps.shape
    for k in range(len(maps)):
        positive = maps[k].clamp_min(0)
        torch.testing.assert_close(out[k], positive / (positive.max() + 1e-5), atol=1e-7, rtol=1e-6)
    peaks = out.flatten(-2).amax(-1)
    assert abs(peaks[0].item() - 1.0) < 1e-6  # a strong map peaks at 1 to within IRN's epsilon
    assert 0.98 < peaks[4].item() < 0.995  # a map peaking near 1e-3 is visibly shrunk, as IRN's would be
    assert (out >= 0).all() and (out < 1).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    negative = maps[3] < 0
    assert negative.any() and (out[3][negative] == 0).all()


def test_normalize_all_negative_and_zero_maps_are_zero():
    maps = torch.stack([-torch.rand(4, 4) - 0.1, torch.zeros(4, 4), torch.full((4, 4), -1e-5)])
    out = normalize_cams(maps)
    assert torch.equal(out.abs(), torch.zeros_like(out))


def test_normalize_batched_equals_unbatched():
    maps = torch.stack([_maps(), 3 * _maps().flip(-1)])
    batched = normalize_cams(maps)
    assert batched.shape == (2, 5, 7, 9)
    for b in range(2):
        torch.testing.assert_close(batched[b], normalize_cams(maps[b]), atol=0, rtol=0)


def test_normalize_empty_class_set():
    out = normalize_cams(torch.zeros(0, 6, 5))
    assert out.shape == (0, 6, 5)


# ---------------------------------------------------------------------------- pyramid_cams (IRN's make_cam)


def _irn_reference(model: CamClassifier, image: np.ndarray, scales, classes: np.ndarray) -> torch.Tensor:
    """IRN's make_cam written from its description, one image and one scale at a time: PIL bicubic
    resize of the uint8 image to round(s*H) x round(s*W), normalise, ReLU(CAM) of the image plus the
    flipped-back ReLU(CAM) of its mirror, upsample to ceil(H/16)*16 x ceil(W/16)*16 and crop H x W,
    sum over scales, keep the labelled classes, divide each by its max + 1e-5."""
    height, width = image.shape[:2]
    canvas = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    total = torch.zeros(model.num_classes, height, width)
    for scale in scales:
        size = (round(width * scale), round(height * scale))  # PIL takes (width, height)
        resized = image if scale == 1.0 else np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        x = normalize(resized)[None]
        mirror = normalize(np.ascontiguousarray(resized[:, ::-1]))[None]
        with torch.no_grad():
            view = torch.relu(model(x)[1]) + torch.relu(model(mirror)[1]).flip(-1)
        total += F.interpolate(view, size=canvas, mode="bilinear", align_corners=False)[0, :, :height, :width]
    chosen = total[torch.as_tensor(classes - 1)]
    return chosen / (chosen.flatten(1).amax(1)[:, None, None] + 1e-5)


@pytest.mark.parametrize("size", [(45, 61), (64, 48)])
def test_pyramid_cams_batched_equal_irns_reference(size):
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 3).eval()
    dataset = SyntheticDataset(n_train=2, n_val=0, size=96)
    images = [dataset.load(i, with_mask=False).image[: size[0], : size[1]].copy() for i in dataset.ids("train")]
    scales = [1.0, 0.5, 1.5, 2.0]
    classes = np.array([1, 3])
    batch = torch.stack([torch.from_numpy(im.transpose(2, 0, 1).copy()) for im in images])  # uint8
    with torch.no_grad():
        cams = pyramid_cams(model.cams, batch, scales, flip=True, prepare=normalize_on_device)
    got = normalize_cams(cams[:, torch.as_tensor(classes - 1)])
    assert got.shape == (2, 2, *size)
    for b, image in enumerate(images):
        want = _irn_reference(model, image, scales, classes)
        assert (got[b] - want).abs().max().item() < 1e-3
        assert want.amax().item() > 0.99  # the maps are not trivially zero


def test_pyramid_cams_do_not_stretch_the_stride_grid():
    """A cam_fn that marks only its last feature column: on the ceil(W/16)*16 canvas the mark rises
    from the centre of the middle cell (pixel 24) and peaks at the last cell's centre (39.5); stretched
    over the 40-pixel image, the same 3 cells would already reach pixel 20."""

    def last_column(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 1, math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16))
        out[..., -1] = 1.0
        return out

    image = torch.zeros(1, 3, 32, 40)
    cams = pyramid_cams(last_column, image, [1.0], flip=False)[0, 0]
    assert cams.shape == (32, 40)
    assert cams[:, :24].abs().max() == 0 and (cams[:, 24] > 0).all() and (cams[:, 39] > 0.96).all()
    stretched = multiscale_cams(last_column, image, [1.0], flip=False)[0, 0]
    assert (stretched[:, 20] > 0).all()


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (2, 3)])
def test_tiny_images_keep_at_least_one_pixel_per_scale(size):
    """A 1 x 1 image: scale 0.5 rounds to 0 pixels, which no network takes; every level keeps one."""
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 2).eval()
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    with torch.no_grad():
        cams = pyramid_cams(model.cams, image, [1.0, 0.5, 1.5, 2.0], flip=True, prepare=normalize_on_device)
        probs = multiscale_cams(model.cams, normalize_on_device(image.float()), [1.0, 0.5, 0.75], flip=True)
    assert cams.shape == probs.shape == (1, 2, *size)
    assert torch.isfinite(cams).all() and torch.isfinite(probs).all()


def test_strided_cams_equal_irns_stride_4_reference():
    """IRN's strided_cam (the random walk's input): each scale's map, PIL-resized image as above, resized
    bilinearly onto the ((H - 1) // 4 + 1) x ((W - 1) // 4 + 1) grid and summed."""
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 3).eval()
    dataset = SyntheticDataset(n_train=1, n_val=0, size=96)
    image = dataset.load(dataset.ids("train")[0], with_mask=False).image[:45, :61].copy()
    scales = [1.0, 0.5, 1.5, 2.0]
    grid = ((45 - 1) // 4 + 1, (61 - 1) // 4 + 1)
    want = torch.zeros(3, *grid)
    for scale in scales:
        size = (round(61 * scale), round(45 * scale))
        resized = image if scale == 1.0 else np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        with torch.no_grad():
            view = torch.relu(model(normalize(resized)[None])[1])
            view = view + torch.relu(model(normalize(np.ascontiguousarray(resized[:, ::-1]))[None])[1]).flip(-1)
        want += F.interpolate(view, size=grid, mode="bilinear", align_corners=False)[0]
    batch = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        got = strided_cams(model.cams, batch, scales, flip=True, prepare=normalize_on_device)[0]
    assert got.shape == (3, *grid)
    assert (normalize_cams(got) - normalize_cams(want)).abs().max().item() < 1e-3
