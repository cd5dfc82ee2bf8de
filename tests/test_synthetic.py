"""The synthetic dataset: deterministic, consistent, and built so that plain CAMs are incomplete
(class-specific heads, class-agnostic bodies)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igcam_cli.data.base import Dataset
from igcam_cli.data.synthetic import CLASS_NAMES, SyntheticDataset, _render, write_folder
from igcam_cli.errors import BadData, UsageError


def _scenes(n: int, seed: int = 0, num_classes: int = 5) -> list:
    return [_render(seed, 0, i, num_classes=num_classes) for i in range(n)]


@pytest.fixture(scope="module")
def scenes():
    return _scenes(120)


def test_is_a_dataset_with_two_splits():
    ds = SyntheticDataset(n_train=7, n_val=3)
    assert isinstance(ds, Dataset)
    assert ds.name == "synthetic" and ds.gt_source == "synthetic"
    assert ds.splits() == ["train", "val"]
    assert ds.ids("train") == [f"train_{i:05d}" for i in range(7)]
    assert ds.ids("val") == ["val_00000", "val_00001", "val_00002"]
    assert ds.has_masks("train") and ds.has_masks("val")
    assert ds.classes == list(CLASS_NAMES[:5]) and ds.num_classes == 5
    assert SyntheticDataset(num_classes=8).classes == list(CLASS_NAMES[:8])


def test_unknown_split_id_and_bad_parameters_are_reported():
    ds = SyntheticDataset(n_train=4, n_val=2)
    with pytest.raises(BadData, match="test"):
        ds.ids("test")
    for bad in ("train_00004", "val_00009", "foo_00000", "train_x"):
        with pytest.raises(BadData, match=bad):
            ds.load(bad)
    with pytest.raises(UsageError):
        SyntheticDataset(num_classes=len(CLASS_NAMES) + 1)
    with pytest.raises(UsageError):
        SyntheticDataset(num_classes=0)


def test_same_id_same_pixels_whatever_the_order():
    a, b = SyntheticDataset(seed=3), SyntheticDataset(seed=3)
    ids = a.ids("train")[:6] + a.ids("val")[:3]
    first = {i: a.load(i) for i in ids}
    for i in reversed(ids):
        s = b.load(i)
        assert np.array_equal(s.image, first[i].image)
        assert np.array_equal(s.mask, first[i].mask)
        assert np.array_equal(s.labels, first[i].labels)
    # loading again from the same object also gives the same pixels
    assert np.array_equal(a.load(ids[0]).image, first[ids[0]].image)


def test_seeds_and_splits_differ():
    a, b = SyntheticDataset(seed=0), SyntheticDataset(seed=1)
    assert not np.array_equal(a.load("train_00000").image, b.load("train_00000").image)
    assert not np.array_equal(a.load("train_00000").image, a.load("val_00000").image)
    assert not np.array_equal(a.load("train_00000").image, a.load("train_00001").image)


@pytest.mark.parametrize("size", [128, 64])
def test_shapes_and_dtypes(size):
    ds = SyntheticDataset(size=size, n_train=3, n_val=1)
    s = ds.load("train_00001")
    assert s.id == "train_00001"
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (size, size) and s.mask.dtype == np.uint8
    assert s.labels.dtype == np.int64 and np.all(np.diff(s.labels) > 0)
    assert ds.load("train_00001", with_mask=False).mask is None


def test_labels_are_exactly_the_mask_classes():
    ds = SyntheticDataset(n_train=40, n_val=20, seed=5)
    for image_id in ds.ids("train") + ds.ids("val"):
        cheap = ds.labels(image_id)  # layout only, before any load
        s = ds.load(image_id)
        present = np.unique(s.mask)
        assert 255 not in present
        assert np.array_equal(cheap, present[present > 0])
        assert np.array_equal(s.labels, cheap)
        assert 1 <= len(cheap) <= 3 and cheap.max() <= ds.num_classes


def test_objects_and_heads(scenes):
    """Every object shows a head, heads are a minority of each object, several objects appear."""
    fractions = []
    for s in scenes:
        assert 1 <= len(s.classes) <= 3
        assert np.array_equal(np.unique(s.mask[s.owner >= 0]), s.labels)
        assert not s.head[s.owner < 0].any()
        for j, cls in enumerate(s.classes):
            obj = s.owner == j
            assert np.all(s.mask[obj] == cls)
            head = (s.head & obj).sum()
            assert head > 0
            fractions.append(head / obj.sum())
    fractions = np.array(fractions)
    assert 0.1 < fractions.mean() < 0.35
    assert np.mean(fractions < 0.5) > 0.95
    assert any(len(s.classes) > 1 for s in scenes) and any(len(s.labels) > 1 for s in scenes)


def test_classes_are_balanced():
    ds = SyntheticDataset(n_train=300, num_classes=5, seed=2)
    labels = [ds.labels(i) for i in ds.ids("train")]
    presence = [np.mean([k in lab for lab in labels]) for k in range(1, 6)]
    assert min(presence) >= 0.10
    assert max(presence) / min(presence) < 2.0


def _nearest_centroid_accuracy(features: np.ndarray, classes: np.ndarray) -> float:
    half = len(classes) // 2
    train_x, train_y, test_x, test_y = features[:half], classes[:half], features[half:], classes[half:]
    labels = np.unique(train_y)
    centroids = np.stack([train_x[train_y == k].mean(0) for k in labels])
    pred = labels[np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    return float(np.mean(pred == test_y))


def test_heads_tell_the_class_bodies_do_not(scenes):
    heads, bodies, classes = [], [], []
    for s in scenes:
        for j, cls in enumerate(s.classes):
            obj = s.owner == j
            heads.append(s.image[obj & s.head].mean(0))
            bodies.append(s.image[obj & ~s.head].mean(0))
            classes.append(cls)
    heads, bodies, classes = np.array(heads), np.array(bodies), np.array(classes)
    assert _nearest_centroid_accuracy(heads, classes) > 0.95
    assert _nearest_centroid_accuracy(bodies, classes) < 0.4  # chance is 0.2 with 5 classes
    # and the body colour distribution is the same for every class: class means lie close together
    means = np.stack([bodies[classes == k].mean(0) for k in np.unique(classes)])
    assert np.ptp(means, axis=0).max() < 0.5 * bodies.std(0).min() + 15


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return (hi - lo) / np.maximum(hi, 1.0)


def test_bodies_stand_out_from_the_background_most_of_the_time(scenes):
    """Bodies are more saturated and more uniform than the cluttered background (not always)."""
    more_saturated, smoother = [], []
    for s in scenes:
        body = (s.owner >= 0) & ~s.head
        bg = s.owner < 0
        sat = _saturation(s.image)
        more_saturated.append(sat[body].mean() > sat[bg].mean())
        # local roughness: mean absolute horizontal difference inside each region
        grad = np.abs(np.diff(s.image.astype(np.float32), axis=1)).sum(-1)
        inner_body = body[:, 1:] & body[:, :-1]
        inner_bg = bg[:, 1:] & bg[:, :-1]
        smoother.append(grad[inner_body].mean() < grad[inner_bg].mean())
    assert np.mean(more_saturated) > 0.75
    assert np.mean(smoother) > 0.75


def test_write_folder_round_trips(tmp_path: Path):
    ds = SyntheticDataset(n_train=5, n_val=3, seed=4, num_classes=6)
    out = tmp_path / "synth"
    write_folder(ds, out)
    assert (out / "classes.txt").read_text().split() == ds.classes
    for split in ds.splits():
        assert (out / "splits" / f"{split}.txt").read_text().split() == ds.ids(split)
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "labels"]
    assert [r[0] for r in rows[1:]] == ds.ids("train") + ds.ids("val")
    for image_id, names in rows[1:]:
        s = ds.load(image_id)
        assert names.split() == [ds.classes[k - 1] for k in s.labels]
        with Image.open(out / "images" / f"{image_id}.png") as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), s.image)
        with Image.open(out / "masks" / f"{image_id}.png") as im:
            assert im.mode == "P"
            assert im.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
            assert np.array_equal(np.asarray(im), s.mask)


# --------------------------------------------------------------------------- the harder styles

from igcam_cli.data import styles  # noqa: E402
from igcam_cli.data.synthetic import _layout_mask  # noqa: E402

HARD_STYLES = [s for s in styles.STYLES if s != "heads"]


@pytest.mark.parametrize("style", HARD_STYLES)
def test_styles_are_deterministic_with_exact_masks(style):
    a, b = SyntheticDataset(style=style, seed=2), SyntheticDataset(style=style, seed=2)
    for image_id in a.ids("train")[:6] + a.ids("val")[:2]:
        first, again = a.load(image_id), b.load(image_id)
        assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
        assert first.image.shape == (128, 128, 3) and first.image.dtype == np.uint8
        assert first.mask.dtype == np.uint8 and set(np.unique(first.mask)) <= set(range(6))
        # the mask needs the layout stream alone (labels() never paints), and the labels are the mask's classes
        split_index, index = a._parse(image_id)
        assert np.array_equal(_layout_mask(2, split_index, index, 128, 5, 3, style), first.mask)
        assert np.array_equal(b.labels(image_id), first.labels)
        assert np.array_equal(first.labels, np.setdiff1d(np.unique(first.mask), [0]))
        assert len(first.labels) >= 1


@pytest.mark.parametrize("style", HARD_STYLES)
def test_each_style_has_its_own_scenes(style):
    heads = SyntheticDataset(seed=0).load("train_00003")
    other = SyntheticDataset(seed=0, style=style).load("train_00003")
    assert not np.array_equal(heads.mask, other.mask)


def test_heads_style_is_the_demo_generator_unchanged():
    import hashlib

    image = SyntheticDataset(seed=0).load("train_00004").image  # fixed before the styles existed
    assert hashlib.md5(image.tobytes()).hexdigest() == "4cf7dd3bdcd5407d97f013b2fbc570b0"


def test_shapes_style_paints_each_class_in_its_own_outline():
    """A class's objects fill the same fraction of their rotated bounding box (its shape), whatever the object."""
    from dataclasses import replace

    lay_rng = np.random.default_rng(0)
    spec = replace(styles.STYLE_SPECS["shapes"], max_objects=1)
    fill: dict[int, list[float]] = {}
    for _ in range(100):
        lay = styles.layout(spec, lay_rng, 128, 5, 1)
        if len(lay.classes) != 1:
            continue
        px = lay.owner == 0
        ys, xs = np.nonzero(px)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == 127 or xs.max() == 127:
            continue  # cut by the image border
        fill.setdefault(lay.classes[0], []).append(px.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    means = {c: np.mean(v) for c, v in fill.items() if len(v) >= 3}
    assert len(means) >= 3 and np.ptp(list(means.values())) > 0.1  # the classes' outlines differ


def test_clutter_occluders_hide_objects_and_leave_each_half_visible():
    spec = styles.STYLE_SPECS["clutter"]
    rng = np.random.default_rng(1)
    seen = 0
    for _ in range(30):
        lay = styles.layout(spec, rng, 128, 5, 3)
        for o in lay.occluders:
            bar = styles._bar(o, 128)
            assert (lay.owner[bar] == -1).all() and not lay.head[bar].any()
            seen += 1
    assert seen > 10


def test_lookalike_classes_come_in_twins():
    twins = styles._LOOKALIKE_HEADS
    for k in range(0, len(twins), 2):
        assert twins[k].color == twins[k + 1].color and twins[k].accent == twins[k + 1].accent
        assert twins[k] != twins[k + 1]


def test_unknown_style_is_a_usage_error():
    with pytest.raises(UsageError, match="style"):
        SyntheticDataset(style="nosuch")


def test_textures_come_from_the_installed_scikit_image():
    patch = styles.texture_patch(np.random.default_rng(0), 64, vivid=True)
    assert patch.shape == (64, 64, 3) and patch.dtype == np.float32
    assert patch.std() > 5  # a real texture, not a flat colour
