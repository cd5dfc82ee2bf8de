"""The stages, declared once: name, config, the artifacts each reads and writes, and its module.

Everything that needs to know the pipeline's shape reads it here: the config tables igcam.toml may
have, `igcam run`'s order (`CHAIN`), which stage makes an artifact (for "run `igcam X` first" and for
the inputs a run records), which artifacts are per-image maps, evaluate's artifacts. A stage's work
is `igcam_cli.stages.<module>.run`; stage modules never import each other. Where each artifact is
stored is the workspace's (`Workspace.outputs`, `model_path`). docs/ARCHITECTURE.md ("Adding a
stage") walks through a new one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from igcam_cli.config import (
    TOML_NAME,
    ChainConfig,
    ComputeInfluenceConfig,
    CrfConfig,
    EvaluateConfig,
    InfluenceReportConfig,
    MakeCamsConfig,
    PredictConfig,
    RefineConfig,
    TrainClsConfig,
    TrainIrnConfig,
    TrainSegConfig,
    build,
)
from igcam_cli.errors import UsageError

if TYPE_CHECKING:
    from igcam_cli.workspace import Workspace


@dataclass(frozen=True)
class Stage:
    name: str  # the command, the igcam.toml table and the manifest's `stage`
    config: type  # its settings (config.py)
    module: str  # igcam_cli.stages.<module>.run does the work
    writes: str | None  # the artifact it makes (ARTIFACTS), or None for reports
    reads: tuple[str, ...] = ()  # the artifacts it may read
    per_image: bool = False  # a map stage: --split, --shard, --force; resumable image by image
    in_chain: bool = True  # a step of `igcam run` (compute-influence joins it only with `--rounds 2`)


# Artifacts, by name: where they live in a workspace
ARTIFACTS = {
    "cls": "cls/model.pt (cls/round<k>/ for later rounds)",
    "cams": "cams/<split>/ HDF5 map parts",
    "influence": "influence/<split>/ statistics, HDF5 map parts, scores.csv",
    "irn": "irn/model.pt (IRN's boundary network) and irn/ir_labels/<split>/ label PNGs",
    "refined": "refined/<split>/ HDF5 map parts",
    "crf": "pseudo/<split>/ label PNGs",
    "seg": "seg/model.pt",
    "pred": "pred/<name>/ label PNGs",
    "eval": "eval/<artifact>-<split>.json and .md",
}

STAGES: tuple[Stage, ...] = (
    Stage("train-cls", TrainClsConfig, "train_cls", writes="cls", reads=("influence",)),
    Stage("make-cams", MakeCamsConfig, "make_cams", writes="cams", reads=("cls", "influence"), per_image=True),
    Stage(
        "compute-influence",
        ComputeInfluenceConfig,
        "compute_influence",
        writes="influence",
        reads=("cls",),
        per_image=True,
        in_chain=False,
    ),
    Stage(
        "influence-report", InfluenceReportConfig, "influence_report", writes=None, reads=("influence",), in_chain=False
    ),
    # in `igcam run` when [refine] method is irn or both (chain.py)
    Stage("train-irn", TrainIrnConfig, "train_irn", writes="irn", reads=("cams", "cls")),
    Stage("refine", RefineConfig, "refine", writes="refined", reads=("cams", "irn"), per_image=True),
    Stage("crf", CrfConfig, "crf", writes="crf", reads=("cams", "refined"), per_image=True),
    Stage("train-seg", TrainSegConfig, "train_seg", writes="seg", reads=("crf", "cls")),
    Stage("predict", PredictConfig, "predict", writes="pred", reads=("seg", "cls"), per_image=True),
    Stage("evaluate", EvaluateConfig, "evaluate", writes="eval", reads=("cams", "refined", "crf", "pred")),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
CHAIN: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.in_chain)  # `igcam run`, in order
# The artifacts that are a model.pt, saved atomically when their training stage finishes
TRAINED_MODELS: tuple[str, ...] = ("cls", "irn", "seg")
# The artifacts that are per-image class maps in HDF5 parts (crf and evaluate read them as maps)
MAP_KINDS: tuple[str, ...] = ("cams", "refined")
# The stage that makes each artifact: "run `igcam X` first" and the inputs a run records.
PRODUCER: dict[str, str] = {stage.writes: stage.name for stage in STAGES if stage.writes}


def module(stage: str) -> ModuleType:
    """The stage's module (its `run` does the work), imported when first needed."""
    return importlib.import_module(f"igcam_cli.stages.{BY_NAME[stage].module}")


def config_class(stage: str) -> type:
    return BY_NAME[stage].config


def stage_config(ws: Workspace, stage: str, **overrides: Any) -> Any:
    """A stage's config as a run would use it: `overrides` (None: not given) over its igcam.toml table over
    the defaults, every value checked."""
    return build(BY_NAME[stage].config, ws.stage_table(stage), overrides, table=stage)


def chain_stages(ws: Workspace) -> tuple[str, ...]:
    """`igcam run`'s stages for this workspace: train-irn only where refine walks (`method` irn or both)."""
    walks = stage_config(ws, "refine").method != "igcam"
    return tuple(stage for stage in CHAIN if stage != "train-irn" or walks)


def check_tables(toml: dict[str, Any]) -> None:
    """Build every stage's config from its table of igcam.toml (`igcam run` does this before its first
    stage starts): a table no stage reads, or a bad value in any table, is a UsageError."""
    tables = {"run": ChainConfig, **{name: stage.config for name, stage in BY_NAME.items()}}
    for table, values in toml.items():
        if table == "dataset":
            continue
        if table not in tables:
            raise UsageError(f"{TOML_NAME}: unknown table [{table}] (tables: dataset, {', '.join(tables)})")
        if not isinstance(values, dict):
            raise UsageError(f"{TOML_NAME}: [{table}] must be a table of options, got {values!r}")
        build(tables[table], values, {}, table=table)
