"""The stage registry is the one declaration of the pipeline: everything else agrees with it."""

import importlib
from typing import get_args, get_type_hints

import typer

from igcam_cli import chain
from igcam_cli.cli import app
from igcam_cli.config import EvaluateConfig
from igcam_cli.registry import ARTIFACTS, BY_NAME, CHAIN, MAP_KINDS, PRODUCER, STAGES


def test_every_stage_has_its_module_command_and_known_artifacts():
    commands = typer.main.get_command(app).commands
    for stage in STAGES:
        assert callable(importlib.import_module(f"igcam_cli.stages.{stage.module}").run), stage.name
        assert stage.name in commands, stage.name
        assert stage.writes is None or stage.writes in ARTIFACTS
        assert set(stage.reads) <= set(ARTIFACTS), stage.name
        for artifact in stage.reads:  # whatever a stage reads, some stage makes
            assert artifact in PRODUCER, (stage.name, artifact)


def test_derived_tables():
    assert CHAIN == ("train-cls", "make-cams", "train-irn", "refine", "crf", "train-seg", "predict", "evaluate")
    assert chain.STAGES == CHAIN
    assert PRODUCER["cams"] == "make-cams" and PRODUCER["crf"] == "crf" and PRODUCER["pred"] == "predict"
    assert all(PRODUCER[kind] in BY_NAME and BY_NAME[PRODUCER[kind]].per_image for kind in MAP_KINDS)
    evaluated = get_args(get_type_hints(EvaluateConfig)["artifact"])  # evaluate's artifacts, declared on its config
    assert set(evaluated) == {*MAP_KINDS, "crf", "seg"}
    assert all(a in PRODUCER or a == "seg" for a in evaluated)  # seg: the predictions, PRODUCER["pred"]
