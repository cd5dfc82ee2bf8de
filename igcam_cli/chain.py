"""`igcam run`: the whole chain in order, skipping stages whose outputs are complete and fresh.

A stage is fresh when its latest run for the split finished, its outputs are all there, its
settings (igcam.toml; options that cannot change results such as `workers` aside) and seed are
the ones it would run with now, and every run it read from is still the latest of its stage
(`Workspace.is_stale`). Otherwise it runs: from scratch (`--force`) when its settings or inputs
changed, resuming when it was only interrupted. `--from STAGE` reruns that stage and every later
one from scratch; `--until STAGE` stops after it.

Chain: train-cls -> make-cams -> (train-irn, when [refine] method walks) -> refine -> crf on the pseudo-label
split (train-seg's split),
then train-seg -> predict on the validation split, then evaluate every artifact whose split has
GT masks. Like the demo and the ablation it drives the stage modules; stages never import it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli import registry
from igcam_cli.config import ChainConfig, RunOptions, build, changed_settings
from igcam_cli.errors import UsageError
from igcam_cli.influence_io import SCORES_NAME
from igcam_cli.registry import CHAIN, check_tables, stage_config
from igcam_cli.stages import evaluate
from igcam_cli.workspace import Workspace

STAGES = CHAIN  # train-cls, make-cams, train-irn, refine, crf, train-seg, predict, evaluate (registry.py)


@dataclass
class Step:
    stage: str
    split: str | None
    config: Any
    complete: Callable[[], bool]
    execute: Callable[[bool], Any]  # force -> result
    artifact: str | None = None  # evaluate only: which artifact
    key: str | None = None  # a config field that tells this step's records from the stage's others
    phase: str | None = None  # the chain stage whose place it takes for --from/--until (default: its own)
    replaced: Callable[[], bool] | None = None  # True when another run has since rewritten the step's output

    @property
    def label(self) -> str:
        name = f"{self.stage} {self.artifact}" if self.artifact else self.stage
        if self.key == "round" and self.config.round > 1:
            name = f"{name} round {self.config.round}"
        return f"{name} ({self.split})" if self.split else name


def run(
    ws: Workspace,
    opts: RunOptions,
    until: str | None = None,
    start: str | None = None,
    split: str | None = None,
    val_split: str | None = None,
    console: Console | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Runs the chain; returns {"steps": [{step, action, reason}], "evaluations": [evaluate results]}.
    `rounds` (None: `[run] rounds`): 2 adds compute-influence and classifier round 2 (ChainConfig)."""
    console = console or Console()
    for name, value in (("--until", until), ("--from", start)):
        if value is not None and value not in STAGES:
            raise UsageError(f"{name} '{value}' is not a stage of the chain ({', '.join(STAGES)})")
    if until and start and STAGES.index(start) > STAGES.index(until):
        raise UsageError(f"--from {start} comes after --until {until}")
    check_tables(ws.toml)  # a bad value in any table stops the run before its first stage
    chain_cfg = build(ChainConfig, ws.toml.get("run"), {"rounds": rounds}, table="run")
    steps = plan(ws, opts, split, val_split, chain_cfg.rounds)
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    done, evaluations = [], []
    for step in steps:
        position = STAGES.index(step.phase or step.stage)
        if position < first or position > last:
            continue
        reason = "--from" if start else why_stale(ws, step, opts)
        if reason is None:
            console.print(f"[green]{escape(step.label)}: fresh, skipped[/]")
            result = _read_evaluation(ws, step) if step.stage == "evaluate" else None
            action = "skipped"
        else:
            console.print(f"[cyan]{escape(f'{step.label}: {reason}')}; running[/]")
            result = step.execute(reason != "incomplete")
            action = "resumed" if reason == "incomplete" else "ran"
        if step.stage == "evaluate":
            evaluations.append(result)
        done.append({"step": step.label, "action": action, "reason": reason or "fresh"})
    if not opts.quiet:
        _print_summary(console, done)
    return {"steps": done, "evaluations": evaluations}


def plan(ws: Workspace, opts: RunOptions, split: str | None, val_split: str | None, rounds: int = 1) -> list[Step]:
    """The chain's steps with the configs they would run with now."""
    dataset = ws.dataset()

    seg_defaults = stage_config(ws, "train-seg")
    split = split or seg_defaults.split
    for name, value in (("--split", split), ("--val-split", val_split)):
        if value and value not in dataset.splits():
            raise UsageError(f"{name} '{value}': the dataset has no such split ({', '.join(dataset.splits())})")
    if val_split is None:  # the configured one, when the dataset has it (train-seg skips a missing one too)
        val_split = seg_defaults.val_split if seg_defaults.val_split in dataset.splits() else None

    ids = dataset.ids(split)
    seg_cfg = stage_config(ws, "train-seg", split=split, **({"val_split": val_split} if val_split is not None else {}))
    cls_cfg = stage_config(ws, "train-cls")
    steps = [_training(ws, opts, "train-cls", cls_cfg, key="round")]
    if rounds == 2:  # influence on the classifier's own split, from round 1; round 2 fine-tunes with it
        influence_cfg = stage_config(ws, "compute-influence", split=cls_cfg.split, round=1)
        influence_cfg = registry.module("compute-influence").resolve(influence_cfg, dataset)  # as it records it
        steps.append(_influence(ws, opts, influence_cfg))
        round2 = stage_config(ws, "train-cls", round=2, sample_weights="influence")
        steps.append(replace(_training(ws, opts, "train-cls", round2, key="round"), phase="train-cls"))
    steps.append(_per_image(ws, opts, "make-cams", stage_config(ws, "make-cams", split=split), split, ids))
    refine_cfg = stage_config(ws, "refine", split=split)
    if refine_cfg.method != "igcam":  # IRN's random walk needs the boundary network, trained on these CAMs
        steps.append(_training(ws, opts, "train-irn", stage_config(ws, "train-irn", split=split)))
    steps.append(_per_image(ws, opts, "refine", refine_cfg, split, ids))
    steps.append(_per_image(ws, opts, "crf", stage_config(ws, "crf", split=split), split, ids))
    steps.append(_training(ws, opts, "train-seg", seg_cfg))
    if val_split:
        pred_cfg = stage_config(ws, "predict", split=val_split, images=None, out=val_split)
        steps.append(_per_image(ws, opts, "predict", pred_cfg, val_split, dataset.ids(val_split)))
    quiet = replace(opts, quiet=True)
    evaluations = [(artifact, split) for artifact in ("cams", "refined", "crf")]
    if val_split:
        evaluations.append(("seg", val_split))
    for artifact, eval_split in evaluations:
        if not dataset.has_masks(eval_split):
            continue
        eval_cfg = stage_config(ws, "evaluate", artifact=artifact, split=eval_split)
        steps.append(
            Step(
                "evaluate",
                eval_split,
                eval_cfg,
                _file_exists(ws, artifact, eval_split),
                _evaluate_step(eval_cfg, ws, quiet),
                artifact=artifact,
            )
        )
    return steps


def _per_image(ws: Workspace, opts: RunOptions, stage: str, cfg: Any, split: str, ids: list[str]) -> Step:
    """A map stage's step: complete when its output covers `ids`; resumed unless forced."""
    run, artifact = registry.module(stage).run, registry.BY_NAME[stage].writes or ""
    return Step(
        stage,
        split,
        cfg,
        lambda: _covers(_accounted(ws.outputs(artifact, split), opts.skip_bad), ids),
        lambda force: run(cfg, ws, opts, force=force),
    )


def _influence(ws: Workspace, opts: RunOptions, cfg: Any) -> Step:
    """compute-influence as part of the classifier's training: complete when scores.csv is written (it is,
    once every image of the split is scored)."""
    run = registry.module("compute-influence").run

    def replaced() -> bool:  # e.g. `igcam compute-influence` by hand on classifier round 2 since
        newest = ws.latest("compute-influence", cfg.split)
        return newest is not None and newest.get("classifier", {}).get("round") != cfg.round

    return Step(
        "compute-influence",
        cfg.split,
        cfg,
        lambda: (ws.influence_dir(cfg.split) / SCORES_NAME).is_file(),
        lambda force: run(cfg, ws, opts, force=force),
        key="round",
        phase="train-cls",
        replaced=replaced,
    )


def _training(ws: Workspace, opts: RunOptions, stage: str, cfg: Any, key: str | None = None) -> Step:
    """A training stage's step: complete when its model.pt exists; `--resume` unless forced."""
    module, artifact = registry.module(stage), registry.BY_NAME[stage].writes or ""
    return Step(
        stage,
        None,
        cfg,
        lambda: ws.model_path(artifact, getattr(cfg, "round", 1)).is_file(),
        lambda force: module.run(cfg, ws, opts, module.TrainOptions(resume=not force, force=force)),
        key=key,
    )


def _evaluate_step(cfg: Any, ws: Workspace, opts: RunOptions) -> Callable[[bool], Any]:
    """evaluate always scores afresh: `force` does not apply."""
    return lambda force: evaluate.run(cfg, ws, opts)


def why_stale(ws: Workspace, step: Step, opts: RunOptions) -> str | None:
    """None when the step's output is complete and fresh, else why it has to run."""
    record = _latest(ws, step)
    if record is None:
        return "not run yet"
    changed = changed_settings(step.config, record["config"])
    if changed:
        return f"settings changed ({', '.join(changed)})"
    if "seed" in record and record["seed"] != opts.seed:
        return f"seed changed ({record['seed']} -> {opts.seed})"
    if ws.is_stale(record):
        return "inputs changed"
    if step.replaced is not None and step.replaced():
        return "output replaced by another run"
    if record["status"] != "done" or not step.complete():
        return "incomplete"
    return None


def _latest(ws: Workspace, step: Step) -> dict | None:
    matches = [
        r
        for r in ws.records()
        if r["stage"] == step.stage
        and (step.split is None or r.get("split") == step.split)
        and (step.artifact is None or r["config"].get("artifact") == step.artifact)
        and (step.key is None or _value(r, step.key, step.config) == getattr(step.config, step.key))
    ]
    return matches[-1] if matches else None


def _value(record: dict, key: str, config: Any) -> Any:
    """A config value of a record; the default for records older than the option."""
    return record["config"].get(key, getattr(type(config)(), key))


def _accounted(store, skip_bad: bool) -> set[str]:
    """The images an output holds, and with --skip-bad those a --skip-bad run left out of it (without the flag
    they count as missing: the stage resumes, tries them again and stops at one still unreadable)."""
    return store.ids() | set(store.skipped()) if skip_bad else store.ids()


def _covers(have: set[str], ids: list[str]) -> bool:
    return all(i in have for i in ids)


def _file_exists(ws: Workspace, artifact: str, split: str) -> Callable[[], bool]:
    return lambda: ws.path("eval", f"{artifact}-{split}.json").is_file()


def _read_evaluation(ws: Workspace, step: Step) -> dict:
    result = json.loads(ws.path("eval", f"{step.artifact}-{step.split}.json").read_text())
    result.pop("confusion", None)
    return result


def _print_summary(console: Console, steps: list[dict]) -> None:
    table = Table(title="igcam run")
    for column in ("step", "action", "why"):
        table.add_column(column)
    style = {"skipped": "green", "ran": "cyan", "resumed": "yellow"}
    for s in steps:
        table.add_row(escape(s["step"]), f"[{style[s['action']]}]{s['action']}[/]", escape(s["reason"]))
    console.print(table)
