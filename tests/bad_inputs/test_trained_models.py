"""A finished model.pt is never replaced without --force: train-cls, train-seg and train-irn refuse, in one line."""

from __future__ import annotations

import pytest

from cli_helpers import TRAIN, assert_error, igcam, ok


@pytest.mark.parametrize(
    ("command", "options", "model"),
    [("train-cls", [], "cls/model.pt"), ("train-seg", ["--labels", "gt", "--pretrained", "none"], "seg/model.pt")],
)
def test_a_finished_model_is_not_replaced_without_force(tmp_path, command, options, model):
    """Checked once the inputs are (a bad split or device is said first), before any training or record."""
    ws = tmp_path / "ws"
    ok("init", "-w", ws, "--dataset", "synthetic", "--n-train", 4, "--n-val", 2, "--image-size", 32)
    path = ws / model
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a finished model")  # the refusal comes before anything reads it
    result = igcam(command, "-w", ws, "--epochs", "1", *options)
    assert_error(result, 2, str(path), "already holds a trained model", "--force")
    assert path.read_bytes() == b"a finished model"
    assert not (ws / "manifest.json").exists()


@pytest.mark.slow
def test_force_trains_over_it_and_resume_finds_it_done(trained_ws):
    model = trained_ws / "cls" / "model.pt"
    before = model.read_bytes()
    assert_error(igcam("train-cls", "-w", trained_ws, *TRAIN), 2, "already holds a trained model")
    result = ok("train-cls", "-w", trained_ws, *TRAIN, "--resume")
    assert "nothing to do" in result.stderr and model.read_bytes() == before
    ok("train-cls", "-w", trained_ws, *TRAIN, "--force", "--seed", "1", "--quiet")
    assert model.read_bytes() != before
