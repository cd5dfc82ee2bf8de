"""IRN's random-walk path through the stages: IR labels, train-irn, refine --method irn|both, the chain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import assert_error, igcam, make_workspace, ok
from igcam_cli import chain
from igcam_cli.core.densecrf import ir_labels
from igcam_cli.store import LabelStore, MapStore
from igcam_cli.workspace import Workspace

IRN = ["--epochs", "2", "--batch-size", "4", "--crop", "64", "--workers", "0", "--pretrained", "cls", "--quiet"]
WALK = ["--walk-steps", "16", "--workers", "0", "--quiet"]


def test_ir_labels_split_confident_foreground_background_and_unsure():
    """Map 0.9 on a red square, 0.2 on a ring around it, 0 elsewhere: the square is the class (above 0.30),
    the ring 255 (between 0.05 and 0.30), the rest background; flat colours leave the CRF nothing to move."""
    image = np.full((40, 40, 3), 30, np.uint8)
    image[10:30, 10:30] = (200, 40, 40)
    image[6:34, 6:34][np.pad(np.zeros((20, 20), bool), 4, constant_values=True)] = (40, 200, 40)
    maps = np.zeros((1, 40, 40), np.float32)
    maps[0, 6:34, 6:34] = 0.2
    maps[0, 10:30, 10:30] = 0.9
    labels = ir_labels(image, maps, np.array([3]))
    assert labels.dtype == np.uint8 and labels.shape == (40, 40)
    assert (labels[10:30, 10:30] == 3).all()
    ring = np.zeros((40, 40), bool)
    ring[6:34, 6:34] = True
    ring[10:30, 10:30] = False
    assert (labels[ring] == 255).all()
    outside = np.ones((40, 40), bool)
    outside[6:34, 6:34] = False
    assert (labels[outside] == 0).all()


def test_chain_trains_the_boundary_network_only_when_refine_walks(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    opts = chain.RunOptions(device="cpu", quiet=True)
    assert "train-irn" not in [step.stage for step in chain.plan(ws, opts, None, None)]
    ws.set_stage_options("refine", {"method": "irn"})
    stages = [step.stage for step in chain.plan(ws, opts, None, None)]
    assert stages.index("make-cams") < stages.index("train-irn") < stages.index("refine")


@pytest.mark.slow
def test_train_irn_then_refine_with_the_random_walk(chain_ws):
    ok("train-irn", "-w", chain_ws, *IRN)
    ws = Workspace.open(chain_ws)
    dataset = ws.dataset()
    ids = dataset.ids("train")
    assert (chain_ws / "irn" / "model.pt").is_file()
    labels = LabelStore(chain_ws / "irn" / "ir_labels" / "train")
    assert labels.ids() == set(ids)
    cams = MapStore(chain_ws / "cams" / "train")
    first = cams.read(ids[0])
    expected = ir_labels(dataset.load(ids[0]).image, first.maps.astype(np.float32), first.classes)
    np.testing.assert_array_equal(labels.read(ids[0]), expected)  # the stage's labels are IRN's
    record = [r for r in ws.records() if r["stage"] == "train-irn"][-1]
    assert record["status"] == "done" and np.isfinite(record["metrics"]["train_loss"])

    ok("refine", "-w", chain_ws, "--split", "train", "--method", "irn", *WALK)
    refined = MapStore(chain_ws / "refined" / "train")
    assert refined.attrs["method"] == "irn"
    alive = 0
    for image_id in ids:
        walked, source = refined.read(image_id), cams.read(image_id)
        np.testing.assert_array_equal(walked.classes, source.classes)
        assert walked.maps.shape == source.maps.shape and walked.maps.min() >= 0
        if source.maps.max() > 0:  # (the 1-epoch classifier leaves some CAMs dead: they walk to zero)
            assert walked.maps.max() == pytest.approx(1.0, abs=1e-3)  # IRN: divided by the image's largest value
            alive += 1
    assert alive >= 4
    result = ok("evaluate", "-w", chain_ws, "--artifact", "refined", "--split", "train", "--quiet")
    saved = json.loads((chain_ws / "eval" / "refined-train.json").read_text())
    assert saved["fixed_tau"] == 0.25  # IRN's background score for walked maps
    assert "at fixed τ 0.25" in result.stdout

    ok("refine", "-w", chain_ws, "--split", "train", "--method", "both", "--force", *WALK)
    before = (chain_ws / "irn" / "model.pt").read_bytes()
    assert_error(igcam("train-irn", "-w", chain_ws, *IRN), 2, "irn/model.pt already holds a trained model")
    assert (chain_ws / "irn" / "model.pt").read_bytes() == before
    assert MapStore(chain_ws / "refined" / "train").attrs["method"] == "both"


@pytest.mark.slow
def test_random_walk_refuses_cams_of_another_classifier(chain_ws):
    ok("train-irn", "-w", chain_ws, *IRN)
    manifest = json.loads((chain_ws / "manifest.json").read_text())
    for record in manifest["runs"]:
        if record["stage"] == "train-irn":
            record["classifier"] = {**(record.get("classifier") or {}), "run": "another-classifier-run"}
    (chain_ws / "manifest.json").write_text(json.dumps(manifest))
    result = igcam("refine", "-w", chain_ws, "--split", "train", "--method", "irn", *WALK)
    assert_error(result, 2, "another-classifier-run", "cams/train", "igcam train-irn")
    assert not (chain_ws / "refined" / "train").exists()
