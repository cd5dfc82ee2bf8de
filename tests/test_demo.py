"""`igcam demo` end to end on a tiny synthetic set: the table's rows, the pictures, and a rerun that skips."""

from __future__ import annotations

import json
import tomllib

import pytest

from cli_helpers import assert_error, igcam, ok

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_demo_runs_the_chain_draws_the_pictures_and_reruns_for_free(tmp_path):
    ws = tmp_path / "demo"
    args = ("demo", "-w", ws, "--n-train", 8, "--n-val", 4, "--epochs", 1, "--workers", 0, "--device", "cpu")
    shown = ok(*args).stdout
    for row in ("cams", "refined", "crf", "seg"):
        report = json.loads((ws / "eval" / f"{row}-{'val' if row == 'seg' else 'train'}.json").read_text())
        assert 0 <= report["miou"] <= 1 and report["crf"] == (row in ("crf", "seg"))
        assert row in shown
    for picture in ("demo.png", "demo-val.png"):
        assert (ws / "report" / picture).stat().st_size > 1000
    toml = tomllib.loads((ws / "igcam.toml").read_text())  # --epochs: both models, no step minimum
    assert toml["train-cls"]["epochs"] == toml["train-seg"]["epochs"] == 1 and toml["train-seg"]["min_steps"] == 0
    assert (toml["train-seg"]["input_scale"], toml["train-seg"]["crop"]) == (1.0, 128)  # not the preset's x2: speed
    assert toml["train-cls"]["input_scale"] == 1.0
    assert toml["train-seg"]["loss"] == "ce"  # the preset's balanced loss lost on the demo's style
    runs = len(json.loads((ws / "manifest.json").read_text())["runs"])
    again = ok(*args).stdout
    assert "fresh, skipped" in again and "running" not in again
    assert len(json.loads((ws / "manifest.json").read_text())["runs"]) == runs  # nothing ran again


def test_influence_demo_runs_both_rounds_and_scores_the_finder(tmp_path):
    ws = tmp_path / "demo"
    args = ("demo", "--influence", "-w", ws, "--n-val", 4, "--epochs", 1, "--workers", 0, "--device", "cpu")
    shown = " ".join(ok(*args, "--n-train", 20).stdout.split())
    assert "round 1" in shown and "round 2" in shown and "2 of 20 train labels wrong" in shown
    report = json.loads((ws / "eval" / "influence-train.json").read_text())
    assert report["n_mislabelled"] == 2 and report["truth"] == "the synthetic dataset's label_noise"
    assert f"AUROC {report['auroc']:.3f}" in shown
    records = json.loads((ws / "manifest.json").read_text())["runs"]
    rounds = [r["config"]["round"] for r in records if r["stage"] == "train-cls"]
    assert rounds == [1, 2]
    cams = [r for r in records if r["stage"] == "make-cams"]
    assert [r["classifier"]["round"] for r in cams] == [1, 2]
    assert_error(igcam(*args, "--n-train", 24), 2, "other settings", "--force")
    # the main demo on the same sizes is another dataset too: its labels are clean
    assert_error(igcam("demo", "-w", ws, "--n-train", 20, "--n-val", 4), 2, "other settings")
    assert_error(igcam(*args, "--label-noise", 0), 2, "--label-noise above 0")
