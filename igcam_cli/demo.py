"""The demo: the synthetic dataset and the whole chain on it (`igcam run`), with one table of mIoU per stage.

Rerunning it resumes: fresh stages and finished images are skipped. Pictures go to report/demo.png
(pseudo-labels on train) and report/demo-val.png (the segmentation model on val).

`igcam demo --influence` shows what IG-CAM's influence round adds: synthetic data with a tenth of the
train labels swapped for wrong ones, `igcam run --rounds 2 --until train-cls`, the mislabel finder
scored against the known corrupted ids, and the CAMs of classifier round 1 and round 2 side by side.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import fields, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli import chain, report
from igcam_cli.config import SYNTHETIC_DEFAULTS, RunOptions
from igcam_cli.errors import UsageError
from igcam_cli.registry import STAGES, stage_config
from igcam_cli.stages import evaluate, influence_report, init, make_cams
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
    # A quick look: the classifier and the segmenter see the images at their own size, where the preset draws
    # 128 px images twice as large (four times the compute); on the demo's `heads` style the segmenter already
    # scores above its pseudo-labels, and refine's fill gain follows the coarser CAM grid. The plain loss too: the
    # preset's balanced one, chosen across the styles, lost 3 points on `heads` alone (at the preset's x2)
    ws.set_stage_options("train-cls", {"input_scale": 1.0})
    seg = {"input_scale": 1.0, "crop": SYNTHETIC_DEFAULTS["train-seg"]["crop"], "loss": "ce"}
    ws.set_stage_options("train-seg", seg)
    if epochs is not None:
        ws.set_stage_options("train-cls", {"epochs": epochs})
        ws.set_stage_options("train-seg", {"epochs": epochs, "min_steps": 0})
    else:  # and 240 segmenter steps (12 epochs of 320 images), where the preset trains 24 epochs
        ws.set_stage_options("train-seg", {"epochs": 8, "min_steps": 240})
    _set_workers(ws, workers)
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


def run_influence(
    path: Path,
    opts: RunOptions,
    n_train: int = 160,
    n_val: int = 40,
    label_noise: float = 0.1,
    epochs: int | None = None,
    workers: int = 2,
    force: bool = False,
) -> list[dict]:
    """Influence on noisy labels: classifier round 1, compute-influence, round 2 (the influence weights
    and suggested labels), the mislabel finder against the corrupted ids, and a row of CAM mIoU per round.
    Returns the rows. The CAMs of both rounds are drawn again on every run (make-cams keeps one set)."""
    if label_noise <= 0:
        raise UsageError(
            "--influence needs --label-noise above 0: its mislabel finder is scored against the swapped labels"
        )
    console = Console()
    synthetic = {"n_train": n_train, "n_val": n_val, "size": 128, "label_noise": label_noise}
    ws = _workspace(path, synthetic, force)
    start = time.time()
    if epochs is not None:  # round 2 fine-tunes half as long
        ws.set_stage_options("train-cls", {"epochs": epochs})
    _set_workers(ws, workers)
    chain.run(ws, opts, until="train-cls", rounds=2, console=console)
    quiet = replace(opts, quiet=True)
    finder = influence_report.run(stage_config(ws, "influence-report", split="train"), ws, quiet)
    rows = []
    for round_ in (1, 2):  # the CAMs of each round, drawn for the labels that round trained on
        make_cams.run(stage_config(ws, "make-cams", split="train", round=round_), ws, opts, force=True)
        cams = evaluate.run(stage_config(ws, "evaluate", artifact="cams", split="train"), ws, quiet)
        record = ws.classifier_run(round_) or {}
        rows.append(
            {
                "round": round_,
                "val_map": record.get("metrics", {}).get("val_map"),
                "cam_miou": cams["miou"],
                "threshold": cams["threshold"],
                "cam_miou_fixed": cams["miou_fixed_tau"],
                "fixed_tau": cams["fixed_tau"],
            }
        )
    _print_influence(console, ws, finder, rows, time.time() - start)
    return rows


def _set_workers(ws: Workspace, workers: int) -> None:
    for stage in STAGES:
        if any(f.name == "workers" for f in fields(stage.config)):
            ws.set_stage_options(stage.name, {"workers": workers})


def _workspace(path: Path, synthetic: dict, force: bool) -> Workspace:
    toml = path / "igcam.toml"
    if toml.exists():
        ws = Workspace.open(path)
        spec = ws.dataset_spec
        if spec.get("format") != "synthetic":
            raise UsageError(f"{path} holds a {spec.get('format')} workspace; the demo needs its own directory")
        same = {k: v for k, v in spec.items() if k != "format"} == synthetic
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
    for column in ("stage", "split", "GT", "CRF", "threshold", "mIoU %", "at fixed τ"):
        table.add_column(column, justify="right" if column in ("mIoU %", "at fixed τ") else "left")
    for r in results:
        tau = f"{r['threshold']:.2f} (tuned on {r['threshold_tuned_on']})" if r["threshold"] is not None else "-"
        fixed = f"{r['miou_fixed_tau'] * 100:.1f} (τ {r['fixed_tau']:.2f})" if r.get("fixed_tau") is not None else "-"
        table.add_row(
            r["artifact"], r["split"], r["gt_source"], "yes" if r["crf"] else "no", tau, f"{r['miou'] * 100:.1f}", fixed
        )
    console.print(table)


def _print_influence(console: Console, ws: Workspace, finder: dict, rows: list[dict], seconds: float) -> None:
    n_bad, suggested = finder.get("n_mislabelled", 0), finder["n_suggested"]
    fit = finder.get("classifier_fit") or {}
    withheld = " (withheld: the classifier has not learned enough)" if fit.get("suggestions_suppressed") else ""
    table = Table(
        title=f"igcam demo --influence (synthetic, {n_bad} of {finder['n_images']} train labels wrong, "
        f"{seconds / 60:.1f} min)"
    )
    table.caption = "CAMs on train against the synthetic GT, no CRF; threshold tuned on train"
    for column in ("classifier", "trained on", "val mAP %", "CAM mIoU %", "threshold", "at fixed τ"):
        table.add_column(column, justify="left" if column in ("classifier", "trained on") else "right")
    trained_on = {1: "the labels as given", 2: f"influence weights, {suggested} suggested label sets{withheld}"}
    for row in rows:
        val_map = "-" if row["val_map"] is None else f"{row['val_map'] * 100:.1f}"
        table.add_row(
            f"round {row['round']}",
            trained_on[row["round"]],
            val_map,
            f"{row['cam_miou'] * 100:.1f}",
            f"{row['threshold']:.2f}",
            f"{row['cam_miou_fixed'] * 100:.1f} (τ {row['fixed_tau']:.2f})",
        )
    console.print(table)
    console.print(
        escape(
            f"mislabel finder: AUROC {finder['auroc']:.3f} (per-image loss: {finder['auroc_loss']:.3f}); "
            f"{finder['precision_at_n_mislabelled'] * 100:.0f} % of the {n_bad} top-ranked images are truly "
            f"mislabelled; {finder['suggested_mislabelled']} of the {suggested} suggested label sets are on them; "
            f"classifier fit {fit.get('learned_fraction', float('nan')):.2f} (learned fraction)\n"
            f"report: {ws.path('eval', 'influence-train.md')}\nworkspace: {ws.root}"
        )
    )
