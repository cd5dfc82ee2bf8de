"""The demo: the synthetic dataset and the whole chain on it, with one table of mIoU per stage.

Rerunning it resumes: finished stages and images are skipped. Pictures go to report/demo.png.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from igcam_cli import report
from igcam_cli.config import STAGE_CONFIGS, RunOptions, build
from igcam_cli.errors import UsageError
from igcam_cli.stages import crf, evaluate, init, make_cams, refine, train_cls
from igcam_cli.workspace import Workspace

SHEET_IMAGES = 8


def run(path: Path, opts: RunOptions, n_train: int = 320, n_val: int = 80, epochs: int | None = None,
        workers: int = 2, force: bool = False) -> list[dict]:
    console = Console()
    synthetic = {"n_train": n_train, "n_val": n_val, "size": 128}
    ws = _workspace(path, synthetic, force)
    start = time.time()
    split = "train"

    def config(stage: str, **overrides):
        return build(STAGE_CONFIGS[stage], ws.stage_table(stage), overrides)

    cls_record = ws.latest("train-cls")
    if cls_record and cls_record["status"] == "done" and (ws.cls_dir / "model.pt").is_file():
        console.print("train-cls: done already, skipping")
    else:
        train_cls.run(config("train-cls", epochs=epochs, workers=workers), ws, opts, train_cls.TrainOptions(resume=True))
    make_cams.run(config("make-cams", split=split, workers=workers), ws, opts)
    refine.run(config("refine", split=split, workers=workers), ws, opts)
    crf.run(config("crf", split=split, source="refined", workers=workers), ws, opts)
    quiet = RunOptions(device=opts.device, seed=opts.seed, quiet=True)
    results = [evaluate.run(config("evaluate", artifact=artifact, split=split), ws, quiet)
               for artifact in ("cams", "refined", "crf")]
    sheet = _pictures(ws, split)
    _print_table(console, results, time.time() - start)
    console.print(f"pictures: {sheet}\nworkspace: {ws.root} (rerun any stage there, e.g. `igcam status -w {ws.root}`)")
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
        rows.append([sample.image, report.overlay(sample.image, sample.mask), report.heatmap(cams.read(image_id).maps),
                     report.heatmap(refined.read(image_id).maps), report.overlay(sample.image, pseudo.read(image_id))])
    titles = ["image", "ground truth", "CAM", "refined", "CRF pseudo-label"]
    return report.contact_sheet(rows, titles, ws.path("report", "demo.png"))


def _print_table(console: Console, results: list[dict], seconds: float) -> None:
    table = Table(title=f"igcam demo (synthetic dataset, {seconds / 60:.1f} min)")
    for column in ("stage", "split", "GT", "CRF", "threshold", "mIoU %"):
        table.add_column(column, justify="right" if column == "mIoU %" else "left")
    for r in results:
        tau = f"{r['threshold']:.2f} (tuned on {r['threshold_tuned_on']})" if r["threshold"] is not None else "-"
        table.add_row(r["artifact"], r["split"], r["gt_source"], "yes" if r["crf"] else "no", tau, f"{r['miou'] * 100:.1f}")
    console.print(table)
