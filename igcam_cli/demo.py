"""The demo: the synthetic dataset and the whole chain on it (`igcam run`), with one table of mIoU per stage.

Rerunning it resumes: fresh stages and finished images are skipped. Pictures go to report/demo.png
(pseudo-labels on train) and report/demo-val.png (the segmentation model on val).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli import chain, report
from igcam_cli.config import RunOptions
from igcam_cli.errors import UsageError
from igcam_cli.registry import STAGES
from igcam_cli.stages import init
from igcam_cli.workspace import Workspace

SHEET_IMAGES = 8


def run(
    path: Path,
    opts: RunOptions,
    n_train: int = 320,
    n_val: int = 80,
    epochs: int | None = None,
    workers: int = 2,
    force: bool = False,
) -> list[dict]:
    """Runs `igcam run` on the synthetic dataset; returns the evaluation results (pseudo-labels on
    train, the segmentation model on val)."""
    console = Console()
    synthetic = {"n_train": n_train, "n_val": n_val, "size": 128}
    ws = _workspace(path, synthetic, force)
    start = time.time()
    if epochs is not None:
        ws.set_stage_options("train-cls", {"epochs": epochs})
        ws.set_stage_options("train-seg", {"epochs": epochs, "min_steps": 0})
    else:  # a quick look: 240 segmenter steps (12 epochs of 320 images), where the preset trains 24 epochs
        ws.set_stage_options("train-seg", {"epochs": 8, "min_steps": 240})
    for stage in STAGES:
        if any(f.name == "workers" for f in fields(stage.config)):
            ws.set_stage_options(stage.name, {"workers": workers})
    results = chain.run(ws, opts, console=console)["evaluations"]
    sheets = [_pictures(ws, "train"), _predictions(ws, "val")]
    _print_table(console, results, time.time() - start)
    console.print(
        escape(
            f"pictures: {', '.join(map(str, sheets))}\n"
            f"workspace: {ws.root} (rerun any stage there, e.g. `igcam status -w {ws.root}`)"
        )
    )
    return results


def _workspace(path: Path, synthetic: dict, force: bool) -> Workspace:
    toml = path / "igcam.toml"
    if toml.exists():
        ws = Workspace.open(path)
        spec = ws.dataset_spec
        if spec.get("format") != "synthetic":
            raise UsageError(f"{path} holds a {spec.get('format')} workspace; the demo needs its own directory")
        same = all(spec.get(k) == v for k, v in synthetic.items())
        if force or not same:
            if not same and not force:
                raise UsageError(f"{path} holds a demo with other settings; pass --force to start it afresh")
            shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        raise UsageError(f"{path} exists and is not an igcam workspace; choose another -w")
    if not toml.exists():
        return init.run(path, "synthetic", None, None, synthetic)
    return Workspace.open(path)


def _pictures(ws: Workspace, split: str) -> Path:
    dataset = ws.dataset()
    ids = dataset.ids(split)[:SHEET_IMAGES]
    cams, refined, pseudo = ws.maps("cams", split), ws.maps("refined", split), ws.pseudo(split)
    rows = []
    for image_id in ids:
        sample = dataset.load(image_id)
        rows.append(
            [
                sample.image,
                report.overlay(sample.image, sample.mask),
                report.heatmap(cams.read(image_id).maps),
                report.heatmap(refined.read(image_id).maps),
                report.overlay(sample.image, pseudo.read(image_id)),
            ]
        )
    titles = ["image", "ground truth", "CAM", "refined", "CRF pseudo-label"]
    return report.contact_sheet(rows, titles, ws.path("report", "demo.png"))


def _predictions(ws: Workspace, split: str) -> Path:
    dataset = ws.dataset()
    predictions = ws.predictions(split)
    rows = []
    for image_id in dataset.ids(split)[:SHEET_IMAGES]:
        sample = dataset.load(image_id)
        rows.append(
            [
                sample.image,
                report.overlay(sample.image, sample.mask),
                report.overlay(sample.image, predictions.read(image_id)),
            ]
        )
    return report.contact_sheet(
        rows, ["image", "ground truth", "segmentation model"], ws.path("report", f"demo-{split}.png")
    )


def _print_table(console: Console, results: list[dict], seconds: float) -> None:
    table = Table(title=f"igcam demo (synthetic dataset, {seconds / 60:.1f} min)")
    for column in ("stage", "split", "GT", "CRF", "threshold", "mIoU %"):
        table.add_column(column, justify="right" if column == "mIoU %" else "left")
    for r in results:
        tau = f"{r['threshold']:.2f} (tuned on {r['threshold_tuned_on']})" if r["threshold"] is not None else "-"
        table.add_row(
            r["artifact"], r["split"], r["gt_source"], "yes" if r["crf"] else "no", tau, f"{r['miou'] * 100:.1f}"
        )
    console.print(table)
