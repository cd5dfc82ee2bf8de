"""The ablation: CAM, +guidance, +boundary, IG-CAM (both), IRN's random walk and IG-CAM followed by the
walk, each with and without CRF, maps at the fixed and the best threshold, in one table.

Each variant runs the real stages (refine, crf, evaluate) in its own sub-workspace under
`<ws>/ablation/<variant>/`, which shares the parent's dataset, classifier, CAMs and boundary network
(train-irn, run in the parent when the walk needs it and it is not fresh) through symbolic links and
copies of their run records; so a variant's numbers are exactly what those commands give, and an
interrupted ablation resumes where it stopped. The CRF columns label every pixel (crf's `ignore_between` band,
which marks unsure pixels for the segmenter, is off here). The table goes to eval/ablation-<split>.json
and .md.
"""

from __future__ import annotations

import json
import os
import shutil

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli.config import RunOptions, changed_settings
from igcam_cli.registry import stage_config
from igcam_cli.stages import crf, evaluate, refine, train_irn
from igcam_cli.workspace import Workspace

# name -> refine settings (None = the raw CAMs, no refine)
VARIANTS: dict[str, dict | None] = {
    "CAM": None,
    "+guidance": {"guidance": "proposals", "boundary": False},
    "+boundary": {"guidance": "none", "boundary": True},
    "+guidance +boundary": {"guidance": "proposals", "boundary": True},
    "IRN random walk": {"method": "irn"},
    "+guidance +boundary, then random walk": {"method": "both", "guidance": "proposals", "boundary": True},
}
SHARED = {"cls": "train-cls", "cams": "make-cams", "irn": "train-irn"}  # linked into every variant, with records


def run(
    ws: Workspace, split: str, opts: RunOptions, workers: int | None = None, variants: tuple[str, ...] = tuple(VARIANTS)
) -> list[dict]:
    dataset_ids = ws.dataset().ids(split)
    ws.complete_maps("cams", split, dataset_ids)  # "run make-cams first" before any work
    quiet = RunOptions(device=opts.device, seed=opts.seed, quiet=True)
    if any((VARIANTS[name] or {}).get("method", "igcam") != "igcam" for name in variants):
        _boundary_network(ws, split, opts)
    rows = []
    for name in variants:
        settings = VARIANTS[name]
        sub = _sub_workspace(ws, name)
        source = "cams" if settings is None else "refined"
        if settings is not None:
            refine_cfg = stage_config(ws, "refine", split=split, workers=workers, **settings)
            refine.run(refine_cfg, sub, opts, force=_settings_changed(sub, "refine", split, refine_cfg))
        # every variant's CRF labels whole: crf's ignore band marks a segmenter's training targets, and on raw CAMs,
        # which are unsure over most of an object, it would leave the CAM row little to score
        crf_cfg = stage_config(ws, "crf", split=split, source=source, workers=workers, ignore_between=[])
        crf.run(crf_cfg, sub, opts, force=_settings_changed(sub, "crf", split, crf_cfg))
        maps = evaluate.run(stage_config(ws, "evaluate", artifact=source, split=split), sub, quiet)
        labels = evaluate.run(stage_config(ws, "evaluate", artifact="crf", split=split), sub, quiet)
        rows.append({"variant": name, "refine": settings, "maps": _summary(maps), "crf": _summary(labels)})
    if len(rows) == len(VARIANTS):
        _write(ws, split, rows)
    print_table(rows, split)
    return rows


def _boundary_network(ws: Workspace, split: str, opts: RunOptions) -> None:
    """train-irn in the parent workspace, unless its model is there and fresh (as `igcam run` decides)."""
    cfg = stage_config(ws, "train-irn", split=split)
    record = ws.latest("train-irn")
    fresh = (
        record is not None
        and record["status"] == "done"
        and ws.model_path("irn").is_file()
        and not ws.is_stale(record)
        and not changed_settings(cfg, record["config"])
    )
    if not fresh:
        train_irn.run(cfg, ws, opts, train_irn.TrainOptions(force=True))


def _settings_changed(sub: Workspace, stage: str, split: str, cfg) -> bool:
    """A variant made with other settings (igcam.toml edited since) is redone, not refused: it is the ablation's
    own cache, and `igcam ablate` has no --force."""
    previous = sub.latest(stage, split)
    return previous is not None and bool(changed_settings(cfg, previous["config"]))


def _sub_workspace(ws: Workspace, name: str) -> Workspace:
    slug = name.replace("+", "").replace(" ", "-").strip("-").lower() or "cam"
    root = ws.path("ablation", slug)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ws.toml_path, root / "igcam.toml")
    for shared in SHARED:
        link = root / shared
        if ws.path(shared).exists() and not link.exists():
            os.symlink(os.path.relpath(ws.path(shared), root), link)
    sub = Workspace(root)
    sub.share_records([r for r in ws.records() if r["stage"] in SHARED.values()])
    return sub


def _summary(result: dict) -> dict:
    keep = ("artifact", "miou", "threshold", "threshold_tuned_on", "crf", "oracle", "gt_source", "n_images")
    fixed = ("fixed_tau", "miou_fixed_tau")  # maps only
    return {k: result[k] for k in (*keep, *fixed) if k in result}


def _write(ws: Workspace, split: str, rows: list[dict]) -> None:
    out = ws.path("eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation-{split}.json").write_text(json.dumps({"split": split, "rows": rows}, indent=1))
    (out / f"ablation-{split}.md").write_text(markdown(rows, split))


def markdown(rows: list[dict], split: str) -> str:
    first = rows[0]["maps"]
    lines = [
        f"mIoU % on split `{split}` ({first['n_images']} images, GT {first['gt_source']}); maps at a fixed "
        f"background threshold (0.15 for CAMs as IRN, 0.50 for IG-CAM's maps, 0.25 for walked maps as IRN) and at "
        f"the best threshold tuned on `{split}`; CRF = dense CRF pseudo-labels; no oracle guidance.",
        "",
        "| variant | maps, fixed threshold | maps, best threshold | + CRF |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        m, c = row["maps"], row["crf"]
        lines.append(
            f"| {row['variant']} | {m['miou_fixed_tau'] * 100:.1f} ({m['fixed_tau']:.2f}) | {m['miou'] * 100:.1f} "
            f"({m['threshold']:.2f}) | {c['miou'] * 100:.1f} |"
        )
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], split: str) -> None:
    table = Table(
        title=escape(f"ablation on '{split}' (mIoU %)"),
        caption=escape(
            f"maps: at a fixed background threshold, and at the best one tuned on '{split}'; "
            "+ CRF: dense-CRF pseudo-labels; no oracle"
        ),
    )
    for column in ("variant", "maps (fixed τ)", "maps (best τ)", "+ CRF"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        m, c = row["maps"], row["crf"]
        table.add_row(
            escape(row["variant"]),
            f"{m['miou_fixed_tau'] * 100:.1f} ({m['fixed_tau']:.2f})",
            f"{m['miou'] * 100:.1f} ({m['threshold']:.2f})",
            f"{c['miou'] * 100:.1f}",
        )
    Console().print(table)
