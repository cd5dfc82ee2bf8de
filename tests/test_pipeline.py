"""End-to-end: the chain init -> train-cls -> make-cams -> crf -> evaluate through the CLI, the
workspace contract it writes, and resume / idempotence / sharding of the map stages."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import (
    CAMS,
    CRF,
    RUNNER,
    TRAIN,
    VOC_CLASSES,
    VOC_IMAGES,
    VOC_SPLITS,
    build_voc,
    copy_workspace,
    ok,
    pseudo_mtimes,
    records,
    with_option,
)
from igcam_cli.cli import app
from igcam_cli.stages import status as status_stage
from igcam_cli.store import MapStore, voc_palette
from igcam_cli.workspace import Workspace

TRAIN_IDS = [f"train_{i:05d}" for i in range(12)]


def only(ws: Path, stage: str, **fields) -> dict:
    """The one manifest record of `stage` matching `fields`."""
    found = [r for r in records(ws) if r["stage"] == stage and all(r.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, found
    return found[0]


def read_parts(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """id -> (maps, classes, attrs) straight from the HDF5 parts; an id in two parts fails."""
    out = {}
    for part in sorted(directory.glob("part-r*-*.h5")):
        with h5py.File(part, "r") as f:
            for image_id, group in f.items():
                assert image_id not in out, f"{image_id} is in two parts"
                out[image_id] = (group["maps"][()], group["classes"][()], dict(group.attrs))
    return out


def state_of(ws: Path, stage: str) -> str:
    rows = status_stage.run(Workspace.open(ws))
    (row,) = [r for r in rows if r["stage"] == stage]
    return row["state"]


# ---- the chain and the workspace contract ---------------------------------------------------------


@pytest.mark.slow
def test_chain_writes_config_manifest_logs_and_checkpoints(chain_ws):
    toml = tomllib.loads((chain_ws / "igcam.toml").read_text())
    assert toml["dataset"] == {"format": "synthetic", "n_train": 12, "n_val": 4, "size": 64}

    cls = only(chain_ws, "train-cls")
    cams = only(chain_ws, "make-cams", split="train")
    crf = only(chain_ws, "crf", split="train")
    assert [r["status"] for r in (cls, cams, crf)] == ["done"] * 3
    assert cls["config"]["backbone"] == "resnet18" and cls["config"]["epochs"] == 1
    assert cams["inputs"] == {"train-cls": cls["id"]}
    assert crf["inputs"] == {"make-cams:train": cams["id"]}
    assert cams["metrics"] == {"images": 12, "split_images": 12}
    assert crf["metrics"] == {"images": 12}
    evals = {r["config"]["artifact"]: r for r in records(chain_ws) if r["stage"] == "evaluate"}
    assert evals["cams"]["inputs"] == {"make-cams:train": cams["id"]}
    assert evals["crf"]["inputs"] == {"crf:train": crf["id"]}

    for stage in ("train-cls", "make-cams", "crf", "evaluate"):
        assert (chain_ws / "logs" / f"{stage}.log").read_text().strip()
    assert "cams/train: 12 of 12 images" in (chain_ws / "logs" / "make-cams.log").read_text()

    model = torch.load(chain_ws / "cls" / "model.pt", map_location="cpu", weights_only=True)
    assert (model["backbone"], model["num_classes"]) == ("resnet18", 5)
    assert model["classes"] == Workspace.open(chain_ws).dataset().classes
    last = torch.load(chain_ws / "cls" / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and {"model", "optimizer", "step", "config"} <= set(last)


@pytest.mark.slow
def test_cams_hold_one_normalised_record_per_train_image(chain_ws):
    directory = chain_ws / "cams" / "train"
    assert [p.name for p in directory.iterdir()] == ["part-r0-00000.h5"]  # no temporaries left
    parts = read_parts(directory)
    assert sorted(parts) == TRAIN_IDS
    dataset = Workspace.open(chain_ws).dataset()
    peak_count = 0
    for image_id, (maps, classes, attrs) in parts.items():
        assert classes.dtype == np.uint8 and classes.tolist() == dataset.labels(image_id).tolist()
        assert maps.dtype == np.float16 and maps.shape == (len(classes), 64, 64)
        assert maps.min() >= 0 and maps.max() <= 1
        peaks = maps.reshape(len(classes), -1).max(axis=1)
        # each map peaks at 1 to within IRN's + 1e-5 and float16 (all zero when the CAM is dead)
        assert all(p == 0.0 or 0.999 <= p <= 1.0 for p in peaks.tolist())
        peak_count += int((peaks >= 0.999).sum())
        assert (attrs["height"], attrs["width"], attrs["source"]) == (64, 64, "make-cams")
    assert peak_count > 0  # one epoch on 12 images leaves many class maps dead, but not all


@pytest.mark.slow
def test_pseudo_labels_are_voc_palette_pngs_of_image_size(chain_ws):
    dataset = Workspace.open(chain_ws).dataset()
    directory = chain_ws / "pseudo" / "train"
    assert sorted(p.name for p in directory.iterdir()) == [f"{i}.png" for i in TRAIN_IDS]
    for image_id in TRAIN_IDS:
        with Image.open(directory / f"{image_id}.png") as image:
            assert image.mode == "P" and image.size == (64, 64)
            assert image.getpalette()[:768] == voc_palette()
            values = set(np.unique(np.asarray(image)).tolist())
        assert values <= {0, 255, *dataset.labels(image_id).tolist()}


@pytest.mark.slow
def test_evaluate_writes_json_and_markdown(chain_ws):
    names = ["background", "ambra", "brio", "cobal", "dune", "ember"]
    assert names[1:] == Workspace.open(chain_ws).dataset().classes
    for artifact in ("cams", "crf"):
        result = json.loads((chain_ws / "eval" / f"{artifact}-train.json").read_text())
        assert 0 <= result["miou"] <= 1 and 0 <= result["pixel_accuracy"] <= 1
        assert list(result["per_class"]) == names
        scored = [v for v in result["per_class"].values() if v is not None]
        assert all(0 <= v <= 1 for v in scored)
        assert result["miou"] == pytest.approx(np.mean(scored))
        assert (result["split"], result["n_images"], result["gt_source"]) == ("train", 12, "synthetic")
        assert result["oracle"] is False and result["crf"] is (artifact == "crf")
        assert np.sum(result["confusion"]) == 12 * 64 * 64
        md = (chain_ws / "eval" / f"{artifact}-train.md").read_text()
        assert md.startswith(f"# {artifact} / train: mIoU {result['miou'] * 100:.2f} %")

    cams = json.loads((chain_ws / "eval" / "cams-train.json").read_text())
    assert isinstance(cams["threshold"], float) and 0.05 <= cams["threshold"] <= 0.60
    assert cams["threshold_tuned_on"] == "train"
    assert max(cams["threshold_curve"]["miou"]) == pytest.approx(cams["miou"])
    crf = json.loads((chain_ws / "eval" / "crf-train.json").read_text())
    assert crf["threshold"] is None and crf["threshold_tuned_on"] is None


# ---- resume and idempotence ------------------------------------------------------------------------


@pytest.mark.slow
def test_make_cams_rerun_does_nothing_and_force_redoes(chain_ws):
    directory = chain_ws / "cams" / "train"
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    maps_before = read_parts(directory)

    result = ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS)
    assert "0 to do, 12 already done" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before

    result = ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS, "--force")
    assert "12 to do, 0 already done" in result.stderr
    after = read_parts(directory)
    assert sorted(after) == TRAIN_IDS
    assert (directory / "part-r0-00000.h5").stat().st_mtime_ns != before["part-r0-00000.h5"]
    for image_id, (maps, classes, _) in maps_before.items():  # same model, same inputs: same maps
        assert np.array_equal(after[image_id][1], classes)
        assert np.allclose(after[image_id][0], maps, atol=2e-3)


@pytest.mark.slow
def test_crf_redoes_only_missing_labels(chain_ws):
    directory = chain_ws / "pseudo" / "train"
    removed = ["train_00001", "train_00004", "train_00010"]
    labels = {i: np.asarray(Image.open(directory / f"{i}.png")) for i in removed}
    for image_id in removed:
        (directory / f"{image_id}.png").unlink()
    kept = pseudo_mtimes(directory)

    result = ok("crf", "-w", chain_ws, "--split", "train", *CRF)
    assert "3 to do, 9 already done" in result.stderr
    now = pseudo_mtimes(directory)
    assert {k: now[k] for k in kept} == kept
    assert sorted(now) == [f"{i}.png" for i in TRAIN_IDS]
    for image_id, label in labels.items():
        assert np.array_equal(np.asarray(Image.open(directory / f"{image_id}.png")), label)
    latest = [r for r in records(chain_ws) if r["stage"] == "crf"][-1]
    assert (latest["status"], latest["metrics"]) == ("done", {"images": 12})


@pytest.mark.slow
def test_train_cls_resume_of_a_finished_run_does_nothing(chain_ws):
    """Resuming a finished classifier keeps model.pt and the manifest, so nothing downstream turns stale."""
    before = (chain_ws / "manifest.json").read_text()
    model_mtime = (chain_ws / "cls" / "model.pt").stat().st_mtime_ns
    result = ok("train-cls", "-w", chain_ws, *TRAIN, "--resume")
    assert "already holds all 1 epochs; nothing to do" in result.stderr
    # a setting that changes no result (workers) is no reason for a new run either
    result = ok("train-cls", "-w", chain_ws, *with_option(TRAIN, "--workers", "1"), "--resume")
    assert "nothing to do" in result.stderr
    assert (chain_ws / "manifest.json").read_text() == before
    assert (chain_ws / "cls" / "model.pt").stat().st_mtime_ns == model_mtime
    assert state_of(chain_ws, "make-cams") == "done"


@pytest.mark.slow
def test_make_cams_cleans_leftover_temporaries_and_redoes_their_images(chain_ws):
    """A killed writer leaves `.part-*.h5.tmp`: never read, removed on the next run, its images redone."""
    directory = chain_ws / "cams" / "train"
    (directory / "part-r0-00000.h5").rename(directory / ".part-r0-00000.h5.tmp")  # a whole part, unfinished
    (directory / ".part-r0-00001.h5.tmp").write_bytes(b"\x89HDF half-written")
    assert MapStore(directory).ids() == set()

    result = ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS)
    assert "12 to do, 0 already done" in result.stderr
    assert sorted(p.name for p in directory.iterdir()) == ["part-r0-00000.h5"]
    assert sorted(read_parts(directory)) == TRAIN_IDS


@pytest.mark.slow
def test_shards_cover_the_split_and_equal_the_unsharded_maps(trained_ws, chain_template):
    for shard in ("0/2", "1/2"):
        result = ok("make-cams", "-w", trained_ws, "--split", "train", *CAMS, "--shard", shard)
        assert "6 to do, 0 already done" in result.stderr
    directory = trained_ws / "cams" / "train"
    assert sorted(p.name for p in directory.iterdir()) == ["part-r0-00000.h5", "part-r1-00000.h5"]
    assert sorted(read_parts(directory)) == TRAIN_IDS
    with h5py.File(directory / "part-r1-00000.h5", "r") as f:
        assert sorted(f) == TRAIN_IDS[1::2]

    sharded, unsharded = read_parts(directory), read_parts(chain_template / "cams" / "train")
    for image_id in TRAIN_IDS:
        assert np.array_equal(sharded[image_id][1], unsharded[image_id][1])
        assert np.allclose(sharded[image_id][0], unsharded[image_id][0], atol=2e-3), image_id

    r1_part = (directory / "part-r1-00000.h5").stat().st_mtime_ns
    result = ok("make-cams", "-w", trained_ws, "--split", "train", *CAMS, "--shard", "0/2", "--force")
    assert "6 to do, 0 already done" in result.stderr  # --force with a shard redoes only that shard
    assert (directory / "part-r1-00000.h5").stat().st_mtime_ns == r1_part
    ok("crf", "-w", trained_ws, "--split", "train", *CRF, "--shard", "1/2")
    ok("crf", "-w", trained_ws, "--split", "train", *CRF, "--shard", "0/2")
    assert len(list((trained_ws / "pseudo" / "train").glob("*.png"))) == 12


@pytest.mark.slow
def test_status_lists_stages_and_marks_crf_stale_after_forced_make_cams(chain_ws):
    output = ok("status", "-w", chain_ws).stdout
    for stage in ("train-cls", "make-cams", "crf", "evaluate"):
        assert stage in output
    assert "stale" not in output
    assert state_of(chain_ws, "crf") == "done"

    ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS, "--force", "--quiet")
    (crf_line,) = [line for line in ok("status", "-w", chain_ws).stdout.splitlines() if "│ crf " in line]
    assert "stale" in crf_line
    assert state_of(chain_ws, "crf") == "stale"
    assert state_of(chain_ws, "evaluate crf") == "stale"  # staleness passes down the chain
    assert state_of(chain_ws, "make-cams") == "done"
    assert state_of(chain_ws, "train-cls") == "done"


@pytest.mark.slow
def test_status_uses_igcam_workspace_from_the_environment(chain_ws):
    result = RUNNER.invoke(app, ["status"], env={"IGCAM_WORKSPACE": str(chain_ws)})
    assert result.exit_code == 0 and "make-cams" in result.stdout


# ---- other datasets: custom-class VOC with mixed sizes, and `igcam synth` in the folder layout ----


@pytest.mark.slow
def test_voc_chain_with_custom_classes_and_mixed_image_sizes(voc_template, tmp_path):
    root, template = voc_template
    ws = copy_workspace(template, tmp_path / "ws")
    toml = tomllib.loads((ws / "igcam.toml").read_text())
    assert toml["dataset"] == {"format": "voc", "root": str(root), "classes": VOC_CLASSES}
    ok("make-cams", "-w", ws, "--split", "train", *CAMS)
    ok("crf", "-w", ws, "--split", "train", *CRF)
    ok("evaluate", "-w", ws, "--artifact", "crf", "--split", "train")

    cams = read_parts(ws / "cams" / "train")
    assert sorted(cams) == VOC_SPLITS["train"]
    for image_id in VOC_SPLITS["train"]:
        width, height, boxes = VOC_IMAGES[image_id]
        maps, classes, _ = cams[image_id]
        assert maps.shape == (len(boxes), height, width)
        assert classes.tolist() == [VOC_CLASSES.index(name) + 1 for name in sorted(boxes, key=VOC_CLASSES.index)]
        with Image.open(ws / "pseudo" / "train" / f"{image_id}.png") as label:
            assert label.mode == "P" and label.size == (width, height)
    result = json.loads((ws / "eval" / "crf-train.json").read_text())
    assert list(result["per_class"]) == ["background", "cat", "dog"]
    assert (result["n_images"], result["gt_source"], result["crf"]) == (4, "SegmentationClass", True)
    assert 0 <= result["miou"] <= 1


@pytest.mark.slow
def test_synth_folder_chain(tmp_path):
    out, ws = tmp_path / "data", tmp_path / "ws"
    assert "wrote 16 images" in ok("synth", out, "--n-train", 12, "--n-val", 4, "--image-size", 64).stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "classes.txt",
        "igcam-synth.json",
        "images",
        "labels.csv",
        "masks",
        "splits",
    ]
    assert json.loads((out / "igcam-synth.json").read_text())["image_size"] == 64
    assert "synthetic settings" in ok("init", "-w", ws, "--dataset", "folder", "--root", out).stdout
    assert Workspace.open(ws).stage_table("train-cls")["backbone"] == "resnet18"  # written by synth: its settings
    ok("train-cls", "-w", ws, *TRAIN, "--quiet")
    ok("make-cams", "-w", ws, "--split", "train", *CAMS, "--quiet")
    ok("crf", "-w", ws, "--split", "train", *CRF, "--quiet")
    said = ok("evaluate", "-w", ws, "--artifact", "crf", "--split", "train", "--quiet").stdout
    result = json.loads((ws / "eval" / "crf-train.json").read_text())
    assert (
        said == f"crf / train: mIoU {result['miou'] * 100:.2f} % (crf on split 'train' (12 images), GT masks/, "
        "with CRF, as labelled, weakly supervised, CAMs of classifier round 1)\n"
    )  # --quiet: one line
    assert (result["dataset"], result["gt_source"], result["n_images"]) == ("folder", "masks/", 12)
    assert list(result["per_class"]) == ["background", "ambra", "brio", "cobal", "dune", "ember"]
    assert len(list((ws / "pseudo" / "train").glob("*.png"))) == 12


def test_init_presets(tmp_path):
    from igcam_cli.config import SYNTHETIC_DEFAULTS

    data = tmp_path / "data"
    ok("synth", data, "--n-train", 4, "--n-val", 2, "--image-size", 32)

    def tables(name, *args) -> dict:
        result = ok("init", "-w", tmp_path / name, *args)
        return {k: v for k, v in Workspace.open(tmp_path / name).toml.items() if k != "dataset"}, result.stdout

    synthetic = {stage: dict(values) for stage, values in SYNTHETIC_DEFAULTS.items()}
    synthetic["train-cls"]["crop"] = 32  # the classifier trains on whole images of their own size
    synthetic["train-cls"]["input_scale"] = 2.0  # drawn twice as large, as small images are for the segmenter
    synthetic["train-irn"]["crop"] = 32  # and so does the boundary network
    synthetic["train-seg"].update(input_scale=2.0, crop=256)  # and the segmenter draws small images twice as large
    auto, said = tables("auto", "--dataset", "folder", "--root", data)
    assert auto == synthetic and "synthetic settings" in said
    standard, said = tables("std", "--dataset", "folder", "--root", data, "--preset", "standard")
    assert standard == {} and "standard settings" in said
    assert tables("syn", "--preset", "synthetic", "--dataset", "folder", "--root", data)[0] == synthetic
    assert tables("embedded-std", "--dataset", "synthetic", "--preset", "standard")[0] == {}
    (data / "igcam-synth.json").unlink()  # a folder dataset of one's own: the standard recipe
    assert tables("own", "--dataset", "folder", "--root", data)[0] == {}
    bad = RUNNER.invoke(app, ["init", "-w", str(tmp_path / "bad"), "--preset", "tiny"])
    assert bad.exit_code == 2 and "'tiny' is not one of" in bad.output and not (tmp_path / "bad").exists()


def test_synthetic_preset_crop_is_the_longest_image_side_rounded_up_to_the_stride(tmp_path):
    from igcam_cli.stages import init as init_stage
    from igcam_cli.stages.init import whole_image_crop

    embedded = init_stage.run(tmp_path / "embedded", "synthetic", None, None, {"n_train": 4, "n_val": 2})
    assert embedded.stage_table("train-cls")["crop"] == 128 and "crop_height" not in embedded.stage_table("train-cls")
    data = tmp_path / "data"
    ok("synth", data, "--n-train", 3, "--n-val", 2, "--image-size", 40)
    for i, name in enumerate(sorted((data / "images").glob("*.png"))):  # landscape crops, one of them narrower
        for folder in ("images", "masks"):
            path = data / folder / name.name
            Image.open(path).crop((0, 8, 40 - 4 * (i == 1), 32)).save(path)
    ok("init", "-w", tmp_path / "ws", "--dataset", "folder", "--root", data)
    table = Workspace.open(tmp_path / "ws").stage_table("train-cls")
    assert (table["crop"], table["crop_height"]) == (48, 32)  # 40 x 24 images: no padding beyond the stride

    # one portrait image among landscape ones: a square canvas of the longest side
    assert whole_image_crop([(120, 160), (170, 100)]) == (176, 176)
    assert whole_image_crop([(120, 160), (100, 150)]) == (160, 128)


def test_synthetic_preset_draws_small_images_twice_as_large_for_both_models(tmp_path):
    from igcam_cli.stages import init as init_stage
    from igcam_cli.stages.init import small_image_scale

    embedded = init_stage.run(tmp_path / "embedded", "synthetic", None, None, {"n_train": 4, "n_val": 2})
    seg, cls = embedded.stage_table("train-seg"), embedded.stage_table("train-cls")
    assert (seg["input_scale"], seg["crop"]) == (2.0, 256)  # 128 px images: crop 128 of the image, drawn x2
    assert (cls["input_scale"], cls["crop"]) == (2.0, 128)  # the classifier's canvas stays in the image's pixels
    large = init_stage.run(tmp_path / "large", "synthetic", None, None, {"n_train": 4, "n_val": 2, "size": 256})
    assert "input_scale" not in large.stage_table("train-seg") and large.stage_table("train-seg")["crop"] == 128
    assert "input_scale" not in large.stage_table("train-cls") and large.stage_table("train-cls")["crop"] == 256

    assert small_image_scale([(128, 160), (300, 400), (120, 500)]) == 2.0  # the median shorter side: 128
    assert small_image_scale([(128, 160), (300, 400), (256, 500)]) == 1.0  # 256


def test_init_on_voc_with_train_aug_trains_there_whatever_the_preset(tmp_path):
    splits = {**VOC_SPLITS, "train_aug": VOC_SPLITS["train"]}
    root = build_voc(tmp_path / "VOC2012", splits=splits, classes=VOC_CLASSES)
    for preset in ("standard", "synthetic"):
        ws = tmp_path / preset
        ok("init", "-w", ws, "--dataset", "voc", "--root", root, "--classes", ",".join(VOC_CLASSES), "--preset", preset)
        toml = Workspace.open(ws).toml
        assert toml["train-cls"]["split"] == toml["train-seg"]["split"] == "train_aug"
        assert (toml["train-cls"].get("backbone") == "resnet18") == (preset == "synthetic")
        # predict's CRF: IRN's in the synthetic preset (measured on small images), DeepLab's default otherwise
        assert toml.get("predict", {}).get("preset", "deeplab") == ("irn" if preset == "synthetic" else "deeplab")
