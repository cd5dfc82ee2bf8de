"""The torch dense CRF against pydensecrf (the reference implementation of the same model), for every preset;
its invariants; and one batch against one image at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from igcam_cli.core.densecrf import PRESETS, crf_labels, dense_crf
from igcam_cli.core.permutohedral import Lattice
from igcam_cli.core.torch_crf import dense_crf_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _scene(seed: int, height: int, width: int, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of a few noisy colour blocks and smooth, noisy probabilities over `n_labels` labels."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.int32)
    for _ in range(4):
        y0, x0 = rng.integers(0, max(1, height - 8)), rng.integers(0, max(1, width - 8))
        image[y0 : y0 + rng.integers(1, height + 1), x0 : x0 + rng.integers(1, width + 1)] = rng.integers(0, 256, 3)
    image = np.clip(image + rng.integers(-25, 26, image.shape), 0, 255).astype(np.uint8)
    coarse = torch.from_numpy(rng.normal(size=(1, n_labels, max(1, height // 8), max(1, width // 8))) * 2.5)
    probs = torch.softmax(F.interpolate(coarse.float(), (height, width), mode="bilinear")[0], 0).numpy()
    return image, probs


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _torch(image: np.ndarray, probs: np.ndarray, params, device: str = "cpu") -> np.ndarray:
    images, probs_ = [torch.from_numpy(image).to(device)], [torch.from_numpy(probs).to(device)]
    return dense_crf_batch(images, probs_, params, device)[0].cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize(("seed", "height", "width", "n_labels"), [(0, 75, 100, 3), (1, 96, 64, 6)])
def test_labels_and_marginals_agree_with_pydensecrf(preset, seed, height, width, n_labels, device):
    image, probs = _scene(seed, height, width, n_labels)
    params = PRESETS[preset]
    want, got = dense_crf(image, probs, params), _torch(image, probs, params, device)
    assert got.shape == want.shape and got.dtype == np.float32
    assert (got.argmax(0) == want.argmax(0)).mean() >= 0.995
    # equal to float rounding, but for a few pixels whose lattice point lies on a rounding tie (deeplab's sxy 1:
    # integer features), where the two float orders of summation round to neighbouring simplices
    difference = np.abs(got - want)
    assert difference.mean() < 1e-4 and difference.max() < 1e-2
    assert (want.argmax(0) != probs.argmax(0)).mean() > 0.01  # the CRF did change labels: the check is not idle


def test_a_constant_image_with_constant_unaries_keeps_their_arg_max():
    probs = np.broadcast_to(np.array([0.2, 0.5, 0.3], np.float32)[:, None, None], (3, 40, 50)).copy()
    image = np.full((40, 50, 3), 128, np.uint8)
    for preset in PRESETS.values():
        marginals = _torch(image, probs, preset)
        assert (marginals.argmax(0) == 1).all()
        np.testing.assert_allclose(marginals.sum(0), 1.0, atol=1e-5)


def test_a_batch_equals_one_image_at_a_time():
    scenes = [_scene(2, 40, 56, 2), _scene(3, 64, 48, 5), _scene(4, 1, 1, 3)]
    params = PRESETS["deeplab"]
    batch = dense_crf_batch([torch.from_numpy(i) for i, _ in scenes], [torch.from_numpy(p) for _, p in scenes], params)
    for (image, probs), together in zip(scenes, batch):
        alone = _torch(image, probs, params)
        assert together.shape == probs.shape
        np.testing.assert_allclose(together.numpy(), alone, atol=1e-6, rtol=0)


def test_an_image_with_one_label_keeps_marginals_of_ones_and_chunks_equal_one_batch(monkeypatch):
    from igcam_cli.core import torch_crf

    scenes = [_scene(6, 30, 40, 3), _scene(7, 20, 20, 1), _scene(8, 50, 30, 2)]
    images, probs = [torch.from_numpy(i) for i, _ in scenes], [torch.from_numpy(p) for _, p in scenes]
    params = PRESETS["irn"]  # labels unaries: one label would divide by zero
    whole = dense_crf_batch(images, probs, params)
    assert torch.equal(whole[1], torch.ones(1, 20, 20))
    monkeypatch.setattr(torch_crf, "MAX_PIXELS", 1300)  # 1200 + 400 pixels do not fit together; 1500 > the budget
    chunked = torch_crf.dense_crf_chunked(images, probs, params)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and (a.argmax(0) == b.argmax(0)).float().mean() >= 0.995
    np.testing.assert_allclose(chunked[0].numpy(), whole[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(chunked[2].numpy(), dense_crf(scenes[2][0], scenes[2][1], params), atol=1e-6)


def test_crf_labels_with_the_torch_backend_equal_pydensecrfs():
    image, probs = _scene(5, 60, 80, 3)
    maps = probs[1:] / probs[1:].max()
    classes = np.array([4, 9])
    want = crf_labels(image, maps, classes, PRESETS["psa"], confidence=0.6, uncertain=(0.2, 0.4))
    got = crf_labels(image, maps, classes, PRESETS["psa"], confidence=0.6, uncertain=(0.2, 0.4), backend="torch")
    assert (got == want).mean() >= 0.995 and set(np.unique(got)) <= {0, 4, 9, 255}


def test_the_lattice_filter_of_one_point_is_its_value_and_points_of_two_groups_do_not_meet():
    features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.0]])
    lattice = Lattice(features, groups=torch.tensor([0, 0, 1]))
    out = lattice.filter(torch.tensor([[1.0], [1.0], [5.0]]))
    alone = Lattice(features[2:]).filter(torch.tensor([[5.0]]))
    assert torch.allclose(out[2], alone[0])  # the group-1 point does not see the two group-0 ones
    assert out[0, 0] > alone[0, 0] / 5  # a near neighbour adds to a point's own value


@pytest.mark.slow
def test_the_crf_stage_with_the_torch_backend_labels_as_pydensecrf_does(chain_ws):
    from cli_helpers import ok
    from igcam_cli.workspace import Workspace

    pseudo = chain_ws / "pseudo" / "train"
    want = {p.stem: np.asarray(Image.open(p)) for p in sorted(pseudo.glob("*.png"))}  # the chain's: pydensecrf
    ok("crf", "-w", chain_ws, "--split", "train", "--source", "cams", "--backend", "torch", "--batch-size", "3",
       "--force", "--quiet")  # fmt: skip
    got = {p.stem: np.asarray(Image.open(p)) for p in sorted(pseudo.glob("*.png"))}
    assert got.keys() == want.keys() and len(got) == 12
    assert np.mean([(got[i] == want[i]).mean() for i in got]) >= 0.995
    record = Workspace.open(chain_ws).latest("crf", "train")
    assert record["backend"] == "torch" and record["workers"] >= 1
