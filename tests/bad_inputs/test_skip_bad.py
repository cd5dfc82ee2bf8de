"""`--skip-bad` on the per-image stages (make-cams, refine, crf, predict): an unreadable image is left out,
listed in the output's skip list, the run's record and its final line; the stages after it leave it out too,
evaluate says how many it did not score; a rerun tries it again. Without the flag the first bad image stops
the stage in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import CAMS, PREDICT, SEG, TRAIN, VOC_SPLITS, assert_error, igcam, ok
from igcam_cli.store import MapStore, read_skipped, write_skipped
from igcam_cli.workspace import Workspace

pytestmark = pytest.mark.slow

TINY = {
    "train-cls": {"epochs": 1, "batch_size": 4, "crop": 64, "workers": 0, "backbone": "resnet18", "pretrained": "none"},
    "make-cams": {"workers": 0, "scales": [1.0]},
    "refine": {"workers": 0, "boundary": False},
    "crf": {"workers": 1},
}

REFINE = ["--workers", "0", "--no-boundary"]
CRF_REFINED = ["--workers", "1", "--source", "refined"]


def _break(path: Path) -> bytes:
    """Truncate an image file to a third; returns its bytes, to mend it later."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return data


def _evaluation(ws: Path, artifact: str, split: str) -> dict:
    ok("evaluate", "-w", ws, "--artifact", artifact, "--split", split, "--quiet")
    return json.loads((ws / "eval" / f"{artifact}-{split}.json").read_text())


def test_an_unreadable_image_is_skipped_by_every_stage_and_counted_by_evaluate(voc_ws):
    root, ws = voc_ws
    train = VOC_SPLITS["train"]
    bad = train[1]
    jpg = root / "JPEGImages" / f"{bad}.jpg"
    mended = _break(jpg)

    assert_error(igcam("make-cams", "-w", ws, "--split", "train", *CAMS), 4, str(jpg))
    result = ok("make-cams", "-w", ws, "--split", "train", *CAMS, "--skip-bad")
    assert f"cams/train: {len(train) - 1} of {len(train)} images; 1 skipped as unreadable ({bad})" in result.output
    record = Workspace(ws).latest("make-cams", "train")
    assert record["status"] == "done" and record["metrics"]["skipped"] == 1
    assert list(record["skipped"]) == [bad] and str(jpg) in record["skipped"][bad]
    assert set(MapStore(ws / "cams" / "train").skipped()) == {bad}
    assert "1 skipped as unreadable" in " ".join(ok("status", "-w", ws).output.split())

    # the stages after it leave it out without being told
    ok("refine", "-w", ws, "--split", "train", *REFINE)
    ok("crf", "-w", ws, "--split", "train", *CRF_REFINED)
    assert not (ws / "pseudo" / "train" / f"{bad}.png").exists()
    for artifact in ("cams", "refined", "crf"):
        scored = _evaluation(ws, artifact, "train")
        assert (scored["n_images"], scored["skipped"]) == (len(train) - 1, 1), artifact
        assert "1 unreadable images skipped and not scored" in (ws / "eval" / f"{artifact}-train.md").read_text()
    trained = ok("train-seg", "-w", ws, *SEG[:-1])
    assert "1 images of 'train' were skipped as unreadable by crf; trains without them" in trained.output

    # predict on val with a broken image, then evaluate the segmenter
    val_bad = root / "JPEGImages" / f"{VOC_SPLITS['val'][0]}.jpg"
    _break(val_bad)
    assert_error(igcam("predict", "-w", ws, "--split", "val", *PREDICT), 4, str(val_bad))
    ok("predict", "-w", ws, "--split", "val", *PREDICT, "--skip-bad")
    seg = _evaluation(ws, "seg", "val")
    assert (seg["n_images"], seg["skipped"]) == (len(VOC_SPLITS["val"]) - 1, 1)

    # mended, the image is made on the next run of the same command, and leaves the skip list
    jpg.write_bytes(mended)
    result = ok("make-cams", "-w", ws, "--split", "train", *CAMS)
    assert f"cams/train: {len(train)} of {len(train)} images" in result.output
    cams = MapStore(ws / "cams" / "train")
    assert bad in cams.ids() and cams.skipped() == {} and not list((ws / "cams" / "train").glob("skipped-*"))


def test_run_skip_bad_finishes_the_chain_around_an_unreadable_image(voc_ws):
    from igcam_cli import chain
    from igcam_cli.config import RunOptions

    root, ws = voc_ws
    bad = VOC_SPLITS["train"][2]
    _break(root / "JPEGImages" / f"{bad}.jpg")
    workspace = Workspace.open(ws)
    for stage, values in TINY.items():
        workspace.set_stage_options(stage, values)
    assert_error(igcam("run", "-w", ws, "--until", "crf"), 4, f"{bad}.jpg")
    ok("run", "-w", ws, "--skip-bad", "--quiet", "--until", "crf")
    pseudo = {p.stem for p in (ws / "pseudo" / "train").glob("*.png")}
    assert pseudo == set(VOC_SPLITS["train"]) - {bad}
    # a second run finds every stage complete: the skipped image is accounted for
    again = chain.run(workspace, RunOptions(device="cpu", quiet=True, skip_bad=True), until="crf")
    assert {step["action"] for step in again["steps"]} == {"skipped"}
    # without the flag the chain tries the skipped image again, and stops at it
    assert_error(igcam("run", "-w", ws, "--until", "crf"), 4, f"{bad}.jpg")
    # the training stages decode every image once first, and leave the unreadable ones out
    assert_error(igcam("train-cls", "-w", ws, *TRAIN, "--force"), 4, f"{bad}.jpg")
    ok("train-cls", "-w", ws, *TRAIN, "--force", "--skip-bad")
    assert list(Workspace.open(ws).latest("train-cls")["skipped"]) == [bad]


@pytest.mark.parametrize("rank", [0, 3])
def test_the_skip_list_is_per_rank_and_forgets_images_written_since(tmp_path, rank):
    directory = tmp_path / "cams" / "train"
    write_skipped(directory, rank, {"b": "cannot read image b.jpg", "a": "cannot read image a.jpg"})
    write_skipped(directory, rank + 1, {"c": "cannot read image c.jpg"})
    assert list(read_skipped(directory, set(), rank)) == ["a", "b"]
    assert list(read_skipped(directory, {"a"})) == ["b", "c"]
    write_skipped(directory, rank, {})
    assert list(read_skipped(directory, set())) == ["c"]
    (directory / f"skipped-r{rank + 1}.json").write_text("[1, 2")
    with pytest.raises(Exception, match=f"skipped-r{rank + 1}.json"):
        read_skipped(directory, set())
    assert np.all([not p.name.endswith(".tmp") for p in directory.iterdir()])


def test_train_seg_on_gt_masks_leaves_out_an_unreadable_mask(voc_ws):
    """`--labels gt` reads the train masks, and the per-epoch val mIoU the val masks: with --skip-bad a damaged
    one leaves its image out of training or validation, without it the run stops naming the file."""
    root, ws = voc_ws
    bad_train, bad_val = VOC_SPLITS["train"][0], VOC_SPLITS["val"][1]
    for image_id in (bad_train, bad_val):
        _break(root / "SegmentationClass" / f"{image_id}.png")
    assert_error(igcam("train-seg", "-w", ws, *SEG, "--labels", "gt"), 4, f"{bad_train}.png")
    trained = ok("train-seg", "-w", ws, *SEG[:-1], "--labels", "gt", "--skip-bad", "--force")
    assert f"skipped '{bad_train}'" in trained.output and f"skipped '{bad_val}'" in trained.output
    record = Workspace.open(ws).latest("train-seg")
    assert record["status"] == "done" and {bad_train, bad_val} <= set(record["skipped"])
