"""Configs are checked when they are built: every stage table of igcam.toml, every kind of bad value."""

from typing import get_args, get_type_hints

import pytest

from cli_helpers import assert_error, igcam, ok
from igcam_cli.config import (
    SYNTHETIC_DEFAULTS,
    CrfConfig,
    CrfPreset,
    TrainClsConfig,
    TrainSegConfig,
    build,
    changed_settings,
    to_dict,
)
from igcam_cli.core.densecrf import PRESETS
from igcam_cli.errors import UsageError
from igcam_cli.models.classifier import BACKBONES
from igcam_cli.models.segmenter import ARCHS
from igcam_cli.registry import BY_NAME, check_tables
from igcam_cli.validation import Range, allowed
from igcam_cli.workspace import Workspace

# One bad value per stage table: (table, key, value, what the message must say is allowed)
BAD_VALUES = [
    ("train-cls", "epochs", 0, "an integer >= 1"),
    ("make-cams", "scales", 1.0, "a non-empty list of numbers > 0"),
    ("compute-influence", "hessian", "exact", "one of ekfac, kfac, none"),
    ("influence-report", "top_k", 2.5, "an integer >= 1"),
    ("train-irn", "radius", 1, "an integer in [2, 20]"),
    ("refine", "max_area", 1.5, "a number in [0, 1]"),
    ("crf", "preset", "fast", "one of psa, irn, deeplab, toco"),
    ("train-seg", "arch", "unet", "one of deeplabv3_resnet50"),
    ("predict", "crf", "yes", "true or false"),
    ("evaluate", "tau_step", 0, "a number > 0"),
]


def test_every_stage_table_has_a_bad_value_case():
    assert {table for table, *_ in BAD_VALUES} == set(BY_NAME)


@pytest.mark.parametrize(("table", "key", "value", "says"), BAD_VALUES)
def test_a_bad_toml_value_names_table_key_value_and_what_is_allowed(table, key, value, says):
    with pytest.raises(UsageError) as error:
        check_tables({"dataset": {"format": "synthetic"}, table: {key: value}})
    message = str(error.value)
    assert message.startswith(f"igcam.toml [{table}] {key}: {value!r} is not allowed (")
    assert says in message
    assert "\n" not in message
    assert error.value.exit_code == 2


def test_an_option_names_itself():
    with pytest.raises(UsageError, match=r"^--epochs: 0 is not allowed \(an integer >= 1\)$"):
        build(TrainSegConfig, {"epochs": 3}, {"epochs": 0})


def test_rules_over_two_fields():
    with pytest.raises(UsageError, match=r"scale_min = 2.0, scale_max = 1.25; need scale_min <= scale_max"):
        build(TrainClsConfig, {"scale_min": 2.0}, {})
    with pytest.raises(UsageError, match="need 0 \\(square\\) or >= 16"):
        build(TrainClsConfig, {"crop_height": 8}, {})
    with pytest.raises(UsageError, match="round 2 or later"):
        build(TrainClsConfig, {}, {"sample_weights": "influence"})
    assert build(TrainClsConfig, {}, {"sample_weights": "influence", "round": 2}).round == 2
    with pytest.raises(UsageError, match="coarse to fine"):
        build(BY_NAME["refine"].config, {"scales": [1.0, 0.5]}, {})
    with pytest.raises(UsageError, match="need relabel_drop_below <= 1 - relabel_confidence"):
        build(BY_NAME["compute-influence"].config, {"relabel_confidence": 0.8, "relabel_drop_below": 0.3}, {})
    with pytest.raises(UsageError, match="BatchNorm cannot train on one image"):
        build(TrainSegConfig, {}, {"batch_size": 1})


def test_types_are_exact():
    with pytest.raises(UsageError, match="'two' is not allowed"):
        build(CrfConfig, {"workers": "two"}, {})
    with pytest.raises(UsageError, match="True is not allowed"):  # a bool is not an integer
        build(CrfConfig, {"workers": True}, {})
    with pytest.raises(UsageError, match=r"\[1.0, 'x'\] is not allowed"):
        build(BY_NAME["predict"].config, {"scales": [1.0, "x"]}, {})
    with pytest.raises(UsageError, match=r"\[\] is not allowed"):
        build(BY_NAME["make-cams"].config, {"scales": []}, {})
    config = build(CrfConfig, {"bg_tau": 0, "bg_alpha": None}, {})  # an integer is a number; None where allowed
    assert config.bg_tau == 0 and config.bg_alpha is None


def test_unknown_tables_and_options():
    with pytest.raises(UsageError, match=r"unknown table \[crff\]"):
        check_tables({"crff": {"preset": "psa"}})
    with pytest.raises(UsageError, match=r"\[crf\]: unknown option 'presets'"):
        check_tables({"crf": {"presets": "psa"}})
    with pytest.raises(UsageError, match=r"\[crf\] must be a table"):
        check_tables({"crf": 3})


def test_defaults_and_the_synthetic_preset_pass():
    for stage in BY_NAME.values():
        build(stage.config, SYNTHETIC_DEFAULTS.get(stage.name, {}), {})
        build(stage.config, {}, {})


def test_declared_choices_match_what_the_code_knows():
    assert set(get_args(CrfPreset)) == set(PRESETS)
    assert set(get_args(get_type_hints(TrainSegConfig)["arch"])) == set(ARCHS)
    assert set(get_args(get_type_hints(TrainClsConfig)["backbone"])) == set(BACKBONES)


def test_range_words():
    assert str(Range(1)) == ">= 1"
    assert str(Range(0, low_open=True)) == "> 0"
    assert str(Range(0.5, 1, high_open=True)) == "in [0.5, 1)"
    assert allowed(get_type_hints(CrfConfig, include_extras=True)["bg_alpha"]) == "a number > 0 or none"


@pytest.mark.parametrize(("table", "key", "value", "says"), BAD_VALUES)
def test_run_refuses_a_bad_table_before_its_first_stage(tmp_path, table, key, value, says):
    ws_dir = tmp_path / "ws"
    ok("init", "-w", ws_dir, "--dataset", "synthetic", "--n-train", "8", "--n-val", "4", "--image-size", "64")
    ws = Workspace.open(ws_dir)
    ws.set_stage_options(table, {key: value})
    assert_error(igcam("run", "-w", ws_dir), 2, f"igcam.toml [{table}] {key}: {value!r} is not allowed", says)
    assert Workspace.open(ws_dir).records() == []
    assert not (ws_dir / "cls").exists()


def test_which_settings_count():
    """changed_settings: NOT_IN_RESULTS never counts; train-cls round 1 ignores the fine-tuning settings and
    later rounds the warm-up; a setting the record predates counts as its default."""
    round1 = TrainClsConfig(round=1)
    assert changed_settings(round1, {**to_dict(round1), "workers": 7}) == []
    assert changed_settings(round1, {**to_dict(round1), "finetune_epochs": 3, "relabel": False}) == []
    assert changed_settings(round1, {**to_dict(round1), "warmup_epochs": 2}) == ["warmup_epochs"]
    round2 = TrainClsConfig(round=2, sample_weights="influence")
    assert changed_settings(round2, {**to_dict(round2), "warmup_epochs": 2}) == []
    assert changed_settings(round2, {**to_dict(round2), "finetune_epochs": 3}) == ["finetune_epochs"]
    recorded = to_dict(round1)
    del recorded["crop_height"]  # a record from before the option
    assert changed_settings(round1, recorded) == []
    assert changed_settings(TrainClsConfig(crop_height=128), recorded) == ["crop_height"]


def test_a_rule_names_the_setting_that_was_given():
    with pytest.raises(UsageError, match=r"^igcam.toml \[train-seg\] scale_max: scale_min = 0.5, scale_max = 0.1"):
        build(TrainSegConfig, {"scale_max": 0.1}, {}, table="train-seg")


def test_standard_train_cls_is_irns_recipe():
    """The defaults (the standard preset) are IRN's train_cam: the field's CAM baseline was measured with them."""
    cfg = TrainClsConfig()
    assert (cfg.backbone, cfg.pretrained, cfg.epochs, cfg.batch_size, cfg.crop) == ("resnet50", "imagenet", 5, 16, 512)
    assert (cfg.crop * cfg.scale_min, cfg.crop * cfg.scale_max) == (320, 640)  # long side 320-640
    assert (cfg.lr, cfg.lr * cfg.head_lr_mult, cfg.weight_decay) == (0.1, 1.0, 1e-4)
    assert cfg.momentum == 1e-4  # PolyOptimizer's weight decay in SGD's momentum slot
    assert cfg.freeze_bn and cfg.frozen_stages == 2 and cfg.warmup_epochs == 0
