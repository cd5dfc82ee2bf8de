"""Records that tell the truth: a training run that failed changed no model.pt, so nothing downstream is stale."""

from __future__ import annotations

from cli_helpers import make_workspace
from igcam_cli.workspace import input_key


def test_a_failed_training_run_leaves_downstream_fresh(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    trained = ws.start("train-cls", {}, round=1)
    trained.finish()
    cams = ws.start("make-cams", {}, split="train", inputs={input_key("train-cls"): trained.id})
    cams.finish()
    record = ws.latest("make-cams", "train")
    assert not ws.is_stale(record)
    ws.start("train-cls", {}, round=1).fail("killed in epoch 3")  # model.pt is written only at the end
    assert not ws.is_stale(record)
    ws.start("train-cls", {}, round=1)  # still running: the old model.pt is what make-cams read
    assert not ws.is_stale(record)
    ws.start("train-cls", {}, round=1).finish()  # a new model.pt
    assert ws.is_stale(record)


def test_a_failed_map_stage_still_makes_its_readers_stale(tmp_path):
    """A map stage may have rewritten some of its images before failing (--force starts over)."""
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    cams = ws.start("make-cams", {}, split="train")
    cams.finish()
    refine = ws.start("refine", {}, split="train", inputs={input_key("make-cams", "train"): cams.id})
    refine.finish()
    ws.start("make-cams", {}, split="train").fail("disk full")
    assert ws.is_stale(ws.latest("refine", "train"))
