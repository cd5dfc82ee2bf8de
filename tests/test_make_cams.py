"""make-cams on a tiny synthetic workspace: values, shapes, resume, shards, predicted labels, empty labels."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cli_helpers import OPTS, SYNTH
from igcam_cli.config import MakeCamsConfig, build
from igcam_cli.core.cam import normalize_cams, pyramid_cams
from igcam_cli.data.synthetic import SyntheticDataset, write_folder
from igcam_cli.data.transforms import normalize, normalize_on_device
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import STAGE4_LAYOUT, CamClassifier, load_checkpoint
from igcam_cli.runtime.distributed import Shard
from igcam_cli.stages import init as init_stage
from igcam_cli.stages import make_cams
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace

SIZE = 64
TOL = 2e-3  # maps are stored as float16


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_path(stage_trained_template) -> Path:
    """A classifier trained for one epoch on the synthetic images (shared by every test here)."""
    return Workspace.open(stage_trained_template).cls_dir / "model.pt"


@pytest.fixture(scope="module")
def model(model_path) -> CamClassifier:
    return load_checkpoint(model_path, "igcam train-cls").eval()


def workspace(path: Path, model_path: Path, fmt: str = "synthetic", root: Path | None = None) -> Workspace:
    ws = init_stage.run(path, fmt, root, None, SYNTH if fmt == "synthetic" else {})
    ws.cls_dir.mkdir(parents=True)
    shutil.copy(model_path, ws.cls_dir / "model.pt")
    return ws


def config(ws: Workspace, **overrides) -> MakeCamsConfig:
    values = {"workers": 0, "batch_size": 4}
    values.update(overrides)
    return build(MakeCamsConfig, ws.stage_table("make-cams"), values)


def read_all(store: MapStore) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {i: (r.maps, r.classes) for i, r in store.iter_records(sorted(store.ids()))}


def assert_same_maps(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for image_id, (maps, classes) in want.items():
        np.testing.assert_array_equal(got[image_id][1], classes, err_msg=image_id)
        np.testing.assert_allclose(got[image_id][0], maps, atol=TOL, rtol=0, err_msg=image_id)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An uninterrupted, unsharded run over the train split."""
    ws = workspace(tmp_path_factory.mktemp("reference") / "ws", model_path)
    assert make_cams.run(config(ws), ws, OPTS) == 8
    return read_all(ws.maps("cams", "train"))


def expected_maps(model: CamClassifier, image: np.ndarray, classes: np.ndarray, scales, flip=True) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
        cams = pyramid_cams(model.cams, x, scales, flip, prepare=normalize_on_device)[0]
    return normalize_cams(cams[torch.as_tensor(classes, dtype=torch.long) - 1]).numpy()


def test_maps_values_shapes_and_manifest(tmp_path, model_path, model, reference):
    ws = workspace(tmp_path / "ws", model_path)
    assert make_cams.run(config(ws), ws, OPTS) == 8
    store = ws.maps("cams", "train")
    dataset = ws.dataset()
    assert store.ids() == set(dataset.ids("train"))
    nonzero = 0
    for image_id in dataset.ids("train"):
        record = store.read(image_id)
        labels = dataset.labels(image_id)
        assert labels.size >= 1
        np.testing.assert_array_equal(record.classes, labels.astype(np.uint8))
        assert record.maps.dtype == np.float32
        assert record.maps.shape == (len(labels), SIZE, SIZE)
        assert (record.attrs["height"], record.attrs["width"]) == (SIZE, SIZE)
        assert record.maps.min() >= 0
        for k in range(len(labels)):
            peak = record.maps[k].max()
            if peak > 0:
                assert peak == 1.0, f"{image_id} class {labels[k]}: max {peak}"
                nonzero += 1
        want = expected_maps(model, dataset.load(image_id).image, labels, [1.0, 0.5, 1.5, 2.0])
        np.testing.assert_allclose(record.maps, want, atol=TOL, rtol=0, err_msg=image_id)
    assert nonzero >= 4  # real maps in at least half the images: the comparison above is not vacuous
    with h5py.File(store.parts()[0], "r") as f:
        assert f[sorted(f.keys())[0]]["maps"].dtype == np.float16
    assert_same_maps(read_all(store), reference)

    record = ws.latest("make-cams", "train")
    assert record["status"] == "done"
    assert record["metrics"] == {"images": 8, "split_images": 8}
    assert make_cams.run(config(ws), ws, OPTS) == 0  # everything done: nothing to recompute
    assert [r["status"] for r in ws.records()] == ["done", "done"]


def test_draws_at_the_classifiers_input_scale(tmp_path, model_path, model):
    """A classifier trained with input_scale 2 draws CAMs at scale 1 as one trained at 1 does at scale 2, and
    predicts labels from the image drawn x2."""
    ws = workspace(tmp_path / "ws", model_path)
    ckpt = torch.load(ws.cls_dir / "model.pt", weights_only=True)
    ckpt["config"]["input_scale"] = 2.0
    torch.save(ckpt, ws.cls_dir / "model.pt")
    assert make_cams.run(config(ws, scales=[1.0, 0.5], split="val"), ws, OPTS) == 4
    dataset = ws.dataset()
    for image_id in dataset.ids("val"):
        record = ws.maps("cams", "val").read(image_id)
        want = expected_maps(model, dataset.load(image_id).image, dataset.labels(image_id), [2.0, 1.0])
        np.testing.assert_allclose(record.maps, want, atol=TOL, rtol=0, err_msg=image_id)
    assert "scales [1.0, 0.5] x the classifier's input scale 2" in ws.log_path("make-cams").read_text()

    # --max-side caps the size the classifier draws: 64 px images at x2 under a 64 px cap are drawn from 32 px
    capped = workspace(tmp_path / "capped", model_path)
    assert make_cams.run(config(capped, scales=[2.0], split="val", max_side=32), capped, OPTS) == 4
    assert make_cams.run(config(ws, scales=[1.0], split="val", max_side=64), ws, OPTS, force=True) == 4
    assert_same_maps(read_all(ws.maps("cams", "val")), read_all(capped.maps("cams", "val")))

    threshold = 0.3  # the one-epoch classifier's scores lie between 0.1 and 0.5
    cfg = config(ws, scales=[1.0], split="val", label_source="predicted", predict_threshold=threshold)
    assert make_cams.run(cfg, ws, OPTS, force=True) == 4
    differs = 0
    for image_id in dataset.ids("val"):
        image = torch.from_numpy(dataset.load(image_id).image.transpose(2, 0, 1).copy())[None].float()
        with torch.no_grad():
            drawn = torch.nn.functional.interpolate(image, scale_factor=2, mode="bicubic", align_corners=False)
            probs = torch.sigmoid(model(normalize_on_device(drawn.round().clamp(0, 255)))[0][0])
            own_size = torch.sigmoid(model(normalize_on_device(image))[0][0])
        sure = (probs - threshold).abs() > 0.02  # PIL-like vs torch bicubic differ by a few grey levels
        got = {c for c in ws.maps("cams", "val").read(image_id).classes.tolist() if sure[c - 1]}
        assert got == {c for c in range(1, len(probs) + 1) if probs[c - 1] > threshold and sure[c - 1]}, image_id
        differs += got != {c for c in range(1, len(probs) + 1) if own_size[c - 1] > threshold and sure[c - 1]}
    assert differs  # drawn at its own size, some image would get other labels: the check above is not vacuous


def test_scales_and_flip_are_used(tmp_path, model_path, model):
    ws = workspace(tmp_path / "ws", model_path)
    cfg = config(ws, scales=[1.0, 0.5], flip=False, split="val")
    assert make_cams.run(cfg, ws, OPTS) == 4
    dataset = ws.dataset()
    for image_id in dataset.ids("val"):
        record = ws.maps("cams", "val").read(image_id)
        want = expected_maps(model, dataset.load(image_id).image, dataset.labels(image_id), [1.0, 0.5], flip=False)
        np.testing.assert_allclose(record.maps, want, atol=TOL, rtol=0, err_msg=image_id)
    assert ws.maps("cams", "train").ids() == set()


def test_resume_after_partial_run_equals_full_run(tmp_path, model_path, reference, monkeypatch):
    ws = workspace(tmp_path / "ws", model_path)
    original_writer = MapStore.writer

    def small_parts(self, rank=0, part_size=32, **kwargs):
        return original_writer(self, rank=rank, part_size=3, **kwargs)

    monkeypatch.setattr(MapStore, "writer", small_parts)
    assert make_cams.run(config(ws), ws, OPTS) == 8
    store = ws.maps("cams", "train")
    parts = store.parts()
    assert [p.name for p in parts] == ["part-r0-00000.h5", "part-r0-00001.h5", "part-r0-00002.h5"]
    with h5py.File(parts[-1], "r") as f:
        lost = set(f.keys())
    assert len(lost) == 2
    parts[-1].unlink()
    # A killed writer may also leave a temporary behind; the rerun removes it.
    (store.directory / ".part-r0-00002.h5.tmp").write_bytes(b"partial")
    assert store.ids() == set(reference) - lost

    first = ws.latest("make-cams", "train")["compute"]
    assert first == "cpu, 1 thread, float32"  # the module's one_thread fixture
    torch.set_num_threads(2)  # resumed on another machine: the record and the log say so
    try:
        assert make_cams.run(config(ws), ws, OPTS) == 2
    finally:
        torch.set_num_threads(1)
    assert store.temporaries() == []
    assert_same_maps(read_all(store), reference)
    record = ws.latest("make-cams", "train")
    assert record["status"] == "done"
    assert record["compute"] == "cpu, 2 threads, float32"
    assert record["computed_on"] == sorted([first, record["compute"]])
    assert f"holds images computed on {' and on '.join(record['computed_on'])}" in ws.log_path("make-cams").read_text()


def test_force_recomputes_everything(tmp_path, model_path, reference):
    ws = workspace(tmp_path / "ws", model_path)
    make_cams.run(config(ws, split="train"), ws, OPTS)
    assert make_cams.run(config(ws), ws, OPTS, force=True) == 8
    assert [p.name for p in ws.maps("cams", "train").parts()] == ["part-r0-00000.h5"]
    assert_same_maps(read_all(ws.maps("cams", "train")), reference)


def test_two_shards_equal_unsharded_run(tmp_path, model_path, reference):
    ws = workspace(tmp_path / "ws", model_path)
    assert make_cams.run(config(ws), ws, OPTS, shard=Shard(0, 2)) == 4
    store = ws.maps("cams", "train")
    ids = ws.dataset().ids("train")
    assert store.ids() == set(ids[0::2])
    assert ws.latest("make-cams", "train")["metrics"] == {"images": 4, "split_images": 8}
    assert make_cams.run(config(ws), ws, OPTS, shard=Shard(1, 2)) == 4
    assert sorted(p.name for p in store.parts()) == ["part-r0-00000.h5", "part-r1-00000.h5"]
    with h5py.File(store.directory / "part-r1-00000.h5", "r") as f:
        assert set(f.keys()) == set(ids[1::2])
    assert_same_maps(read_all(store), reference)
    records = ws.records()
    assert [r["shard"] for r in records] == ["0/2", "1/2"]
    assert records[-1]["metrics"] == {"images": 8, "split_images": 8}


def test_force_in_another_number_of_shards_redoes_every_image_wherever_it_was(tmp_path, model_path, reference):
    """Maps made in 4 shards, forced in 2, then in 4 again: each forced shard redoes all its images, and the
    parts of the earlier run that held any of them go, so no image is left from it or held twice."""
    ws = workspace(tmp_path / "ws", model_path)
    store = ws.maps("cams", "train")
    ids = ws.dataset().ids("train")

    def run_in(count: int) -> list[int]:
        return [make_cams.run(config(ws), ws, OPTS, shard=Shard(i, count), force=True) for i in range(count)]

    assert run_in(4) == [2, 2, 2, 2]
    assert sorted(p.name for p in store.parts()) == [f"part-r{r}-00000.h5" for r in range(4)]
    (store.directory / "skipped-r3.json").write_text('{"gone": "unreadable"}')  # as a --skip-bad run leaves it
    assert run_in(2) == [4, 4]  # shard 0 of 2: ids 0, 2, 4, 6, from the parts of ranks 0 and 2 of 4
    assert sorted(p.name for p in store.parts()) == ["part-r0-00000.h5", "part-r1-00000.h5"]
    assert not (store.directory / "skipped-r3.json").exists()
    assert make_cams.run(config(ws), ws, OPTS, shard=Shard(2, 4), force=True) == 2  # ids 2 and 6: in rank 0 of 2
    assert store.ids() == set(ids[1::2]) | {ids[2], ids[6]}  # rank 0 of 2 went with them: shard 0 of 4 redoes it
    assert run_in(4) == [2, 2, 2, 2]
    held = []
    for part in store.parts():
        with h5py.File(part, "r") as f:
            held += list(f.keys())
    assert sorted(held) == sorted(ids)
    assert_same_maps(read_all(store), reference)


def test_predicted_labels_keep_classes_above_threshold(tmp_path, model_path, model):
    ws = workspace(tmp_path / "ws", model_path)
    dataset = ws.dataset()
    ids = dataset.ids("train")
    images = {i: dataset.load(i).image for i in ids}
    with torch.no_grad():
        probs = {i: torch.sigmoid(model(normalize(images[i])[None])[0][0]).numpy() for i in ids}
    # A threshold in the widest gap near the middle of the scores, so batching noise cannot flip a class.
    values = np.sort(np.concatenate(list(probs.values())))
    middle = len(values) // 2
    gaps = [(values[j + 1] - values[j], j) for j in range(middle - 8, middle + 8)]
    gap, j = max(gaps)
    assert gap > 1e-4
    threshold = float((values[j] + values[j + 1]) / 2)
    expected = {i: (np.nonzero(probs[i] > threshold)[0] + 1).astype(np.uint8) for i in ids}
    kept = sum(len(v) for v in expected.values())
    assert 0 < kept < len(values)

    assert make_cams.run(config(ws, label_source="predicted", predict_threshold=threshold), ws, OPTS) == 8
    store = ws.maps("cams", "train")
    differs_from_labels = 0
    for image_id in ids:
        record = store.read(image_id)
        np.testing.assert_array_equal(record.classes, expected[image_id], err_msg=image_id)
        assert record.maps.shape == (len(expected[image_id]), SIZE, SIZE)
        want = expected_maps(model, images[image_id], expected[image_id].astype(np.int64), [1.0, 0.5, 1.5, 2.0])
        np.testing.assert_allclose(record.maps, want, atol=TOL, rtol=0, err_msg=image_id)
        differs_from_labels += not np.array_equal(record.classes, dataset.labels(image_id))
    assert differs_from_labels > 0


def test_image_without_labels_is_stored_with_no_maps(tmp_path, model_path):
    root = tmp_path / "folder"
    write_folder(SyntheticDataset(n_train=3, n_val=1, size=SIZE), root)
    labels_csv = root / "labels.csv"
    rows = list(csv.reader(labels_csv.open()))
    assert rows[1][0] == "train_00000" and rows[1][1]
    rows[1][1] = ""
    with labels_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    ws = workspace(tmp_path / "ws", model_path, fmt="folder", root=root)
    assert ws.dataset().labels("train_00000").size == 0

    assert make_cams.run(config(ws), ws, OPTS) == 3
    store = ws.maps("cams", "train")
    empty = store.read("train_00000")
    assert empty.maps.shape == (0, SIZE, SIZE) and empty.classes.shape == (0,)
    assert empty.maps.dtype == np.float32 and empty.classes.dtype == np.uint8
    for image_id in ("train_00001", "train_00002"):
        record = store.read(image_id)
        assert record.maps.shape[0] == len(record.classes) >= 1
        np.testing.assert_array_equal(record.classes, ws.dataset().labels(image_id))
    assert ws.latest("make-cams", "train")["metrics"]["images"] == 3


def test_wrong_class_count_and_bad_options(tmp_path, model_path):
    ws = workspace(tmp_path / "ws", model_path)
    with pytest.raises(UsageError, match="scales"):
        make_cams.run(config(ws, scales=[1.0, -0.5]), ws, OPTS)
    with pytest.raises(UsageError, match="label-source"):
        make_cams.run(config(ws, label_source="guess"), ws, OPTS)
    torch.manual_seed(0)
    other = CamClassifier("resnet18", 3)
    torch.save(
        {
            "backbone": "resnet18",
            "stage4": STAGE4_LAYOUT,
            "num_classes": 3,
            "classes": list("abc"),
            "model": other.state_dict(),
        },
        ws.cls_dir / "model.pt",
    )
    with pytest.raises(BadData, match="3 classes"):
        make_cams.run(config(ws), ws, OPTS)
    assert ws.maps("cams", "train").ids() == set()
