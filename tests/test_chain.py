"""`igcam run`: the whole chain, skipping fresh stages and rerunning stale ones (tiny CPU settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_error, copy_workspace, igcam, init_synthetic, ok, records
from igcam_cli.errors import UsageError
from igcam_cli.workspace import Workspace

TINY = {
    "train-cls": {"epochs": 1, "batch_size": 4, "crop": 64, "workers": 0},
    "make-cams": {"workers": 0, "scales": [1.0, 0.5]},
    "refine": {"workers": 0},
    "crf": {"workers": 1},
    "train-seg": {"epochs": 1, "min_steps": 0, "batch_size": 4, "crop": 48, "workers": 0},
    "predict": {"workers": 0, "scales": [1.0], "flip": False},
}
ALL_STEPS = [
    "train-cls",
    "make-cams (train)",
    "refine (train)",
    "crf (train)",
    "train-seg",
    "predict (val)",
    "evaluate cams (train)",
    "evaluate refined (train)",
    "evaluate crf (train)",
    "evaluate seg (val)",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ran_template(tmp_path_factory) -> Path:
    """A tiny synthetic workspace after one full `igcam run`. Do not modify."""
    ws = init_synthetic(tmp_path_factory.mktemp("chain") / "ws", n_train=8)
    workspace = Workspace.open(ws)
    for stage, values in TINY.items():
        workspace.set_stage_options(stage, values)
    ok("run", "-w", ws, "--quiet")
    return ws


@pytest.fixture
def ran_ws(ran_template, tmp_path) -> Path:
    return copy_workspace(ran_template, tmp_path / "ws")


def steps(ws: Path, *args) -> dict[str, str]:
    """Run `igcam run` quietly through the chain module and return {step: action}."""
    from igcam_cli import chain
    from igcam_cli.config import RunOptions

    result = chain.run(Workspace.open(ws), RunOptions(device="cpu", quiet=True), **dict(args))
    return {s["step"]: s["action"] for s in result["steps"]}


def runs_of(ws: Path, stage: str) -> int:
    return sum(r["stage"] == stage for r in records(ws))


@pytest.mark.slow
def test_first_run_produces_every_artifact(ran_template):
    ws = Workspace.open(ran_template)
    ids = ws.dataset().ids("train")
    assert (ws.cls_dir / "model.pt").is_file() and (ws.seg_dir / "model.pt").is_file()
    assert ws.maps("refined", "train").ids() == set(ids) and ws.pseudo("train").ids() == set(ids)
    assert ws.predictions("val").ids() == set(ws.dataset().ids("val"))
    for name in ("cams-train", "refined-train", "crf-train", "seg-val"):
        result = json.loads(ws.path("eval", f"{name}.json").read_text())
        assert 0.0 <= result["miou"] <= 1.0 and result["oracle"] is False


@pytest.mark.slow
def test_second_run_skips_every_fresh_stage(ran_ws):
    before = json.loads((ran_ws / "manifest.json").read_text())["runs"]
    actions = steps(ran_ws)
    assert list(actions) == ALL_STEPS and set(actions.values()) == {"skipped"}
    assert json.loads((ran_ws / "manifest.json").read_text())["runs"] == before


@pytest.mark.slow
def test_changed_config_reruns_that_stage_and_everything_after_it(ran_ws):
    Workspace.open(ran_ws).set_stage_options("crf", {"preset": "deeplab"})
    actions = steps(ran_ws)
    assert [actions[s] for s in ALL_STEPS[:4]] == ["skipped", "skipped", "skipped", "ran"]
    assert all(
        actions[s] == "ran" for s in ("train-seg", "predict (val)", "evaluate crf (train)", "evaluate seg (val)")
    )
    assert actions["evaluate cams (train)"] == actions["evaluate refined (train)"] == "skipped"
    crf_record = [r for r in json.loads((ran_ws / "manifest.json").read_text())["runs"] if r["stage"] == "crf"][-1]
    assert crf_record["config"]["preset"] == "deeplab"
    assert set(steps(ran_ws).values()) == {"skipped"}  # and now everything is fresh again


@pytest.mark.slow
def test_workers_do_not_make_a_stage_stale(ran_ws):
    Workspace.open(ran_ws).set_stage_options("make-cams", {"workers": 1, "batch_size": 3})
    assert set(steps(ran_ws).values()) == {"skipped"}


@pytest.mark.slow
def test_a_validation_split_for_the_logs_does_not_retrain(ran_ws):
    Workspace.open(ran_ws).set_stage_options("train-cls", {"val_split": "train"})
    assert set(steps(ran_ws).values()) == {"skipped"}


@pytest.mark.slow
def test_until_and_from(ran_ws):
    cams_runs = runs_of(ran_ws, "make-cams")
    actions = steps(ran_ws, ("start", "refine"), ("until", "crf"))
    assert actions == {"refine (train)": "ran", "crf (train)": "ran"}
    assert runs_of(ran_ws, "make-cams") == cams_runs
    # train-seg read the pseudo-labels crf just rewrote: a plain run now redoes it and what follows
    actions = steps(ran_ws)
    assert actions["train-cls"] == actions["make-cams (train)"] == actions["crf (train)"] == "skipped"
    assert actions["train-seg"] == actions["predict (val)"] == "ran"


@pytest.mark.slow
def test_interrupted_stage_resumes(ran_ws):
    ws = Workspace.open(ran_ws)
    victims = sorted(ws.pseudo("train").ids())[:3]
    for image_id in victims:
        ws.pseudo("train").path(image_id).unlink()
    actions = steps(ran_ws, ("until", "crf"))
    assert actions["crf (train)"] == "resumed" and actions["refine (train)"] == "skipped"
    assert ws.pseudo("train").ids() == set(ws.dataset().ids("train"))


@pytest.mark.slow
def test_bad_stage_names_are_usage_errors(ran_ws):
    assert_error(igcam("run", "-w", ran_ws, "--until", "segment"), 2, "--until 'segment'", "train-cls")
    assert_error(igcam("run", "-w", ran_ws, "--from", "crf", "--until", "refine"), 2, "--from crf")
    assert_error(igcam("run", "-w", ran_ws, "--split", "nope"), 2, "--split 'nope'")


def test_run_on_a_fresh_workspace_names_nothing_missing(tmp_path):
    # no igcam.toml: the usual "run init first" error, not a traceback
    assert_error(igcam("run", "-w", tmp_path / "nowhere"), 3, "igcam init")


@pytest.mark.slow
def test_a_record_older_than_an_option_counts_it_as_default(ran_ws):
    manifest = ran_ws / "manifest.json"
    runs = json.loads(manifest.read_text())
    for record in runs["runs"]:
        if record["stage"] == "crf":
            del record["config"]["confidence"]  # as if written before `confidence` existed (default 0.0)
    manifest.write_text(json.dumps(runs))
    assert set(steps(ran_ws).values()) == {"skipped"}
    Workspace.open(ran_ws).set_stage_options("crf", {"confidence": 0.5})
    assert steps(ran_ws, ("until", "crf"))["crf (train)"] == "ran"


@pytest.mark.slow
def test_a_second_classifier_round_keeps_round_one_fresh_and_refreshes_what_follows(ran_ws):
    ok("train-cls", "-w", ran_ws, "--round", "2", "--epochs", "1", "--quiet")
    actions = steps(ran_ws, ("until", "crf"))
    assert actions["train-cls"] == "skipped"  # round 1 is unchanged; round 2 is not the toml's round
    assert actions["make-cams (train)"] == actions["refine (train)"] == actions["crf (train)"] == "ran"
    cams_record = [r for r in json.loads((ran_ws / "manifest.json").read_text())["runs"] if r["stage"] == "make-cams"][
        -1
    ]
    assert cams_record["classifier"]["round"] == 2


def test_plan_on_a_dataset_without_a_val_split(tmp_path):
    from igcam_cli import chain
    from igcam_cli.config import RunOptions

    data = tmp_path / "data"
    ok("synth", data, "--n-train", 4, "--n-val", 2, "--image-size", 32)
    (data / "splits" / "val.txt").unlink()
    ok("init", "-w", tmp_path / "ws", "--dataset", "folder", "--root", data)
    ws = Workspace.open(tmp_path / "ws")
    stages = [s.stage for s in chain.plan(ws, RunOptions(), None, None)]
    assert "predict" not in stages and stages[:5] == ["train-cls", "make-cams", "refine", "crf", "train-seg"]
    with pytest.raises(UsageError, match="--val-split 'val'"):
        chain.plan(ws, RunOptions(), None, "val")  # asked for, so it must exist
    steps_ = chain.plan(ws, RunOptions(), None, "train")  # --val-split reaches train-seg's validation too
    assert next(s for s in steps_ if s.stage == "train-seg").config.val_split == "train"


def test_settings_outside_results_are_real_fields_of_their_stage():
    from dataclasses import fields

    from igcam_cli.registry import STAGES

    for stage in STAGES:
        config_cls = stage.config
        names = {f.name for f in fields(config_cls)}
        assert set(config_cls.NOT_IN_RESULTS) <= names, stage.name
        assert "NOT_IN_RESULTS" not in names  # a class constant, never written to igcam.toml or the manifest


@pytest.mark.slow
def test_influence_round_runs_inside_the_chain_and_is_skipped_when_fresh(ran_ws):
    """`--rounds 2`: compute-influence and classifier round 2 after train-cls (round 1 stays fresh), then
    make-cams onward from round 2; a second run skips them all."""
    ws = Workspace.open(ran_ws)
    ws.set_stage_options("compute-influence", {"scope": "head", "workers": 0, "batch_size": 4})
    actions = steps(ran_ws, ("rounds", 2), ("until", "make-cams"))
    assert actions == {
        "train-cls": "skipped",
        "compute-influence (train)": "ran",
        "train-cls round 2": "ran",
        "make-cams (train)": "ran",
    }
    assert (ran_ws / "cls" / "round2" / "model.pt").is_file()
    assert (ws.influence_dir("train") / "scores.csv").is_file()
    cams = ws.latest("make-cams", "train")
    assert cams["classifier"]["round"] == 2 and "train-cls" in cams["inputs"]
    # [run] rounds = 2 in igcam.toml means the same; everything is fresh now
    ws.set_stage_options("run", {"rounds": 2})
    again = steps(ran_ws, ("until", "make-cams"))
    assert set(again.values()) == {"skipped"} and "train-cls round 2" in again
    # --until train-cls covers the influence round, --from make-cams leaves it alone
    assert list(steps(ran_ws, ("until", "train-cls"))) == [
        "train-cls",
        "compute-influence (train)",
        "train-cls round 2",
    ]
    assert_error(igcam("run", "-w", ran_ws, "--rounds", "3"), 2, "--rounds")
    # influence computed by hand on round 2 replaces round 1's: the chain redoes it and round 2 after it
    ok("compute-influence", "-w", ran_ws, "--force", "--quiet")
    assert Workspace.open(ran_ws).latest("compute-influence", "train")["classifier"]["round"] == 2
    redone = steps(ran_ws, ("until", "train-cls"))
    assert redone["compute-influence (train)"] == "ran" and redone["train-cls round 2"] == "ran"
    assert Workspace.open(ran_ws).latest("compute-influence", "train")["classifier"]["round"] == 1
