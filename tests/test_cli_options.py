"""Every option of a stage command reaches its config field, and --help shows the value a run would use."""

import importlib
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin, get_type_hints

import pytest
import typer

from cli_helpers import igcam, ok
from igcam_cli.cli import app
from igcam_cli.config import build
from igcam_cli.registry import BY_NAME
from igcam_cli.validation import Range
from igcam_cli.workspace import Workspace

# Options of a stage command that are not config fields: how to run, not what to compute.
RUN_OPTIONS = {
    "workspace",
    "device",
    "seed",
    "quiet",
    "force",
    "shard",
    "resume",
    "init_from",
    "wait",
    "timeout",
    "skip_bad",
}
# Fields that go down, not up, to keep a rule over two fields (scale_min <= scale_max, ...).
LOWER = {"scale_min", "tau_min", "w_min", "learned_low", "bg_threshold"}
# Options a value needs beside it (a rule over two fields).
COMPANIONS = {("train-cls", "sample_weights"): ["--round", "2"]}


class Captured(Exception):
    def __init__(self, config):
        self.config = config


@pytest.fixture(scope="module")
def ws_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("options") / "ws"
    ok("init", "-w", path, "--dataset", "synthetic", "--n-train", "8", "--n-val", "4", "--image-size", "64")
    return path


def _capture(monkeypatch, stage: str) -> None:
    """The stage's run() raises Captured(config) instead of running."""

    def run(cfg, *args, **kwargs):
        raise Captured(cfg)

    monkeypatch.setattr(importlib.import_module(f"igcam_cli.stages.{stage.replace('-', '_')}"), "run", run)


def _another_value(hint, default):
    """A value the field allows, other than `default`."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        base, ranges = args[0], [a for a in args[1:] if isinstance(a, Range)]
        if get_origin(base) is list:
            return default[:1] if len(default) > 1 else [0.5]
        high = ranges[0].high if ranges else None
        if base is int:
            return default + 16 if high is None else (default + 1 if default + 1 <= high else default - 1)
        if high is not None:
            return (default + high) / 2 if default < high else default / 2
        return default * 2 + 0.5
    if origin is Literal:
        return next(a for a in args if a != default)
    if origin in (Union, UnionType):
        return _another_value(next(a for a in args if a is not type(None)), 1 if default is None else default)
    if origin is list:  # a plain list: ignore_between's [] (off) or [low, high]
        return [0.2, 0.4] if not default else []
    if hint is bool:
        return not default
    if hint is int:
        return (default or 0) + 16
    if hint is float:
        return (default or 0) * 2 + 0.5
    if hint is str:
        return "val" if default == "train" else "x"
    raise AssertionError(f"no test value for {hint}")


def _stage_commands():
    group = typer.main.get_command(app)
    return [(stage, group.commands[stage]) for stage in BY_NAME]


@pytest.mark.parametrize(("stage", "command"), _stage_commands(), ids=list(BY_NAME))
def test_every_option_reaches_its_field(ws_dir, monkeypatch, stage, command):
    config_cls = BY_NAME[stage].config
    hints = get_type_hints(config_cls, include_extras=True)
    shown = build(config_cls, Workspace.open(ws_dir).stage_table(stage), {}, table=stage)
    options = [p for p in command.params if p.name != "help"]
    assert not [p.name for p in options if p.name not in hints and p.name not in RUN_OPTIONS]
    _capture(monkeypatch, stage)
    tried = 0
    for param in options:
        if param.name not in hints:
            continue
        name = param.name
        default = getattr(shown, name)
        value = default / 2 if name in LOWER and default else _another_value(hints[name], default)
        if isinstance(value, bool):
            args = [param.opts[0] if value else param.secondary_opts[0]]
        else:
            args = [param.opts[0], ",".join(str(v) for v in value) if isinstance(value, list) else str(value)]
        extra = ["--split", "val"] if stage == "predict" and name != "split" else []
        result = igcam(stage, "-w", ws_dir, *args, *COMPANIONS.get((stage, name), []), *extra)
        assert isinstance(result.exception, Captured), f"{stage} {args}: {result.output}"
        assert getattr(result.exception.config, name) == value, f"{stage} {args}"
        tried += 1
    assert tried >= 2


def test_help_shows_the_workspace_value(ws_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    Workspace.open(ws_dir).set_stage_options("crf", {"preset": "irn", "confidence": 0.3})
    with_ws = igcam("crf", "-w", ws_dir, "--help").output
    assert "[default: irn]" in with_ws and "[default: 0.3]" in with_ws
    assert "one of psa, irn, deeplab, toco" in with_ws  # the choices, from the config's declaration
    without = igcam("crf", "--help").output
    assert "[default: psa]" in without and "[default: 0.0]" in without
    monkeypatch.setenv("IGCAM_WORKSPACE", str(ws_dir))
    assert "[default: irn]" in igcam("crf", "--help").output
    # --help left the command as it was: a run without the option still takes igcam.toml's value
    _capture(monkeypatch, "crf")
    result = igcam("crf", "-w", ws_dir)
    assert result.exception.config.preset == "irn"
    assert igcam("crf", "--help").output.count("one of psa") == 1
