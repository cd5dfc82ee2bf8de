"""The ablation: CAM, +guidance, +boundary, +both, each with and without CRF, in one table.

Each variant runs the real stages (refine, crf, evaluate) in its own sub-workspace under
`<ws>/ablation/<variant>/`, which shares the parent's dataset, classifier and CAMs through
symbolic links; so a variant's numbers are exactly what those commands give, and an interrupted
ablation resumes where it stopped. The CRF columns label every pixel (crf's `ignore_between` band,
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
from igcam_cli.stages import crf, evaluate, refine
from igcam_cli.workspace import Workspace

# name -> refine settings (None = the raw CAMs, no refine)
VARIANTS: dict[str, dict | None] = {
    "CAM": None,
    "+guidance": {"guidance": "proposals", "boundary": False},
    "+boundary": {"guidance": "none", "boundary": True},
    "+guidance +boundary": {"guidance": "proposals", "boundary": True},
}


def run(
    ws: Workspace, split: str, opts: RunOptions, workers: int | None = None, variants: tuple[str, ...] = tuple(VARIANTS)
) -> list[dict]:
    dataset_ids = ws.dataset().ids(split)
    ws.complete_maps("cams", split, dataset_ids)  # "run make-cams first" before any work
    quiet = RunOptions(device=opts.device, seed=opts.seed, quiet=True)
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
    for shared in ("cams", "cls"):
        link = root / shared
        if not link.exists():
            os.symlink(os.path.relpath(ws.path(shared), root), link)
    return Workspace(root)


def _summary(result: dict) -> dict:
    keep = ("artifact", "miou", "threshold", "threshold_tuned_on", "crf", "oracle", "gt_source", "n_images")
    return {k: result[k] for k in keep}


def _write(ws: Workspace, split: str, rows: list[dict]) -> None:
    out = ws.path("eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ablation-{split}.json").write_text(json.dumps({"split": split, "rows": rows}, indent=1))
    (out / f"ablation-{split}.md").write_text(markdown(rows, split))


def markdown(rows: list[dict], split: str) -> str:
    first = rows[0]["maps"]
    lines = [
        f"mIoU % on split `{split}` ({first['n_images']} images, GT {first['gt_source']}); maps at the best "
        f"background threshold tuned on `{split}`; CRF = dense CRF pseudo-labels; no oracle guidance.",
        "",
        "| variant | maps (threshold) | + CRF |",
        "|---|---:|---:|",
    ]
    for row in rows:
        m, c = row["maps"], row["crf"]
        lines.append(f"| {row['variant']} | {m['miou'] * 100:.1f} ({m['threshold']:.2f}) | {c['miou'] * 100:.1f} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], split: str) -> None:
    table = Table(
        title=escape(f"ablation on '{split}' (mIoU %)"),
        caption=escape(
            f"maps: best background threshold tuned on '{split}'; + CRF: dense-CRF pseudo-labels; no oracle"
        ),
    )
    for column in ("variant", "maps", "threshold", "+ CRF"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in rows:
        m, c = row["maps"], row["crf"]
        table.add_row(
            escape(row["variant"]), f"{m['miou'] * 100:.1f}", f"{m['threshold']:.2f}", f"{c['miou'] * 100:.1f}"
        )
    Console().print(table)
