"""influence-report: the training images most likely to carry wrong image labels.

Ranks a split's images by atypicality (robust z-score of log self-influence, from
compute-influence's scores.csv), lists the top k with their labels in a rich table,
eval/influence-<split>.md and .json, and draws a contact sheet (image | influence of each
labelled class) in eval/influence-<split>.png. When the truly mislabelled ids are known
(`--truth FILE`, or corrupted.csv in the dataset root as `igcam synth --label-noise` writes it, or
the `label_noise` of a synthetic dataset), it also reports the AUROC of the ranking (and of the
per-image loss, as a baseline). Each output says how well the classifier fits the labels
(compute-influence's fit.json) and whether compute-influence therefore withheld its label
suggestions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli import influence_io, report
from igcam_cli.config import InfluenceReportConfig, RunOptions, to_dict
from igcam_cli.core.fusion import influence_heat
from igcam_cli.core.metrics import auroc
from igcam_cli.data.noise import CORRUPTED_NAME, read_corrupted
from igcam_cli.errors import BadData
from igcam_cli.runtime.progress import StageLog
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace, input_key

SHEET_ROWS = 12
CELL = 128


def run(cfg: InfluenceReportConfig, ws: Workspace, opts: RunOptions) -> dict[str, Any]:
    log = StageLog(ws.log_path("influence-report"), quiet=opts.quiet)
    dataset = ws.dataset()
    if cfg.split not in dataset.splits():
        raise BadData(f"dataset has no split '{cfg.split}' (splits: {', '.join(dataset.splits())})")
    ids = dataset.ids(cfg.split)
    directory = ws.influence_dir(cfg.split)
    scores = influence_io.read_scores(directory, ids, ws.command("compute-influence", cfg.split), dataset.num_classes)
    ranked = sorted(ids, key=lambda i: (-scores[i].atypicality, i))
    truth, truth_path = _truth(cfg, ws, ids)
    names = dataset.classes

    def label_names(text: str) -> list[str]:
        return [names[int(k) - 1] for k in text.split()]

    source = ws.latest("compute-influence", cfg.split)
    fit = influence_io.read_fit(directory)
    rows = [
        {
            "rank": r + 1,
            "id": i,
            "labels": label_names(scores[i].labels),
            "atypicality": scores[i].atypicality,
            "self_influence": scores[i].self_influence,
            "loss": scores[i].loss,
            "weight": scores[i].weight,
            "suggested": label_names(scores[i].suggested) if scores[i].relabelled else [],
            **({"mislabelled": i in truth} if truth is not None else {}),
        }
        for r, i in enumerate(ranked[: cfg.top_k])
    ]
    result: dict[str, Any] = {
        "split": cfg.split,
        "n_images": len(ids),
        "top_k": cfg.top_k,
        "ranked_by": "atypicality",
        "n_suggested": sum(scores[i].relabelled for i in ids),
        "classifier_fit": fit,
        "rows": rows,
        "source_run": (source or {}).get("id"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if truth is not None:
        if not truth & set(ids):
            raise BadData(
                f"{truth_path} names none of the {len(ids)} images of split '{cfg.split}' "
                "(one id per line, or corrupted.csv's id column)"
            )
        result.update(_truth_metrics(ids, scores, ranked, truth, truth_path))
    out = ws.path("eval")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"influence-{cfg.split}"
    sheet = _sheet(dataset, MapStore(directory), rows[:SHEET_ROWS], out / f"{stem}.png")
    result["contact_sheet"] = str(sheet)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    ws.start(
        "influence-report",
        to_dict(cfg),
        split=cfg.split,
        inputs={input_key("compute-influence", cfg.split): source["id"]} if source else {},
    ).finish(
        outputs=[str(out / f"{stem}.json"), str(out / f"{stem}.md"), str(sheet)],
        metrics={
            **{k: result[k] for k in ("auroc", "auroc_loss") if k in result},
            **(
                {"learned_fraction": fit["learned_fraction"], "suggestions_suppressed": fit["suggestions_suppressed"]}
                if fit
                else {}
            ),
        },
    )
    if not opts.quiet:
        _print(result)
    log(f"wrote {out / stem}.md, .json and .png")
    return result


def _truth(cfg: InfluenceReportConfig, ws: Workspace, ids: list[str]) -> tuple[set[str] | None, str | None]:
    if cfg.truth:
        return read_corrupted(Path(cfg.truth)), cfg.truth
    root = ws.dataset_spec.get("root")
    if root and (Path(root) / CORRUPTED_NAME).is_file():
        path = Path(root) / CORRUPTED_NAME
        return read_corrupted(path), str(path)
    known = ws.dataset().known_mislabelled()
    if known and known & set(ids):  # label noise corrupts train images only
        return known, "the synthetic dataset's label_noise"
    return None, None


def _truth_metrics(ids: list[str], scores: dict, ranked: list[str], truth: set[str], path: str | None) -> dict:
    positive = np.array([i in truth for i in ids])
    n_bad = int(positive.sum())
    found = sum(i in truth for i in ranked[:n_bad])
    suggested = [i for i in ids if scores[i].relabelled]
    return {
        "truth": path,
        "n_mislabelled": n_bad,
        "suggested_mislabelled": sum(i in truth for i in suggested),
        "auroc": auroc(np.array([scores[i].atypicality for i in ids]), positive),
        "auroc_loss": auroc(np.array([scores[i].loss for i in ids]), positive),
        "precision_at_n_mislabelled": found / n_bad if n_bad else float("nan"),
    }


def _sheet(dataset, store: MapStore, rows: list[dict], path: Path) -> Path:
    """One row per listed image: the image with its rank and labels, then the influence heat map
    of each of its labelled classes (positive part, over the image)."""
    width = max([len(r["labels"]) for r in rows] + [1])
    sheet_rows = []
    for row in rows:
        image = dataset.load(row["id"], with_mask=False).image
        suggested = f"\n-> {' '.join(row['suggested'])}" if row["suggested"] else ""
        tiles = [report.caption(image, f"#{row['rank']} {row['id']}\n{' '.join(row['labels'])}{suggested}")]
        if row["id"] in store:
            maps, classes, _ = influence_io.read_maps(store, row["id"])
            heat = influence_heat(torch.from_numpy(maps), image.shape[:2]).numpy() if len(maps) else maps
            labelled = [(k, c) for k, c in enumerate(classes) if dataset.classes[int(c) - 1] in row["labels"]]
            for k, c in labelled:  # computed with --maps all, the store holds every class's map
                blend = (0.45 * image + 0.55 * report.heatmap(heat[k : k + 1])).astype(np.uint8)
                tiles.append(report.caption(blend, dataset.classes[int(c) - 1]))
        tiles += [np.full((CELL, CELL, 3), 255, np.uint8)] * (width + 1 - len(tiles))
        sheet_rows.append(tiles)
    titles = ["image (rank, labels)"] + [f"influence {k + 1}" for k in range(width)]
    return report.contact_sheet(sheet_rows, titles, path, cell=CELL)


def fit_line(result: dict) -> str:
    """What compute-influence measured of the classifier's fit, and what it did about it."""
    fit = result["classifier_fit"]
    if fit is None:
        return (
            "classifier fit: not recorded (scores.csv predates it): rerun compute-influence to learn whether "
            "the classifier has learned enough for this ranking to mean anything"
        )
    line = influence_io.describe_fit(fit, result["split"])
    if not fit["suggestions_suppressed"]:
        return line
    return line + ("; read this ranking as noise" if fit["trust"] <= 0 else "; the ranking is weak evidence")


def summary(result: dict) -> str:
    """One line for --quiet: what the report found."""
    line = f"influence / {result['split']}: {result['n_suggested']} images with suggested labels"
    fit = result["classifier_fit"]
    if fit is not None and fit["suggestions_suppressed"]:
        line += (
            f" (suggestions suppressed: the classifier has not learned, learned fraction "
            f"{fit['learned_fraction']:.2f} < {fit['learned_high']:g})"
        )
    if "auroc" in result:
        line += (
            f", {result['suggested_mislabelled']} of them known mislabelled; AUROC {result['auroc']:.3f} "
            f"(per-image loss: {result['auroc_loss']:.3f}) against {result['n_mislabelled']} known mislabelled"
        )
    return line


def markdown(result: dict) -> str:
    lines = [
        f"# Possibly mislabelled images of '{result['split']}' ({result['n_images']} images)",
        "",
        "Ranked by atypicality: robust z-score of log self-influence (compute-influence). "
        "High = the classifier needs this image's labels unlike the others'.",
        "",
        ("**Warning:** " if (result["classifier_fit"] or {}).get("suggestions_suppressed") else "")
        + fit_line(result)
        + ".",
        "",
    ]
    if "auroc" in result:
        lines += [
            f"Known mislabelled images: {result['n_mislabelled']} ({result['truth']}). "
            f"AUROC {result['auroc']:.3f} (per-image loss: {result['auroc_loss']:.3f}); "
            f"{result['precision_at_n_mislabelled'] * 100:.1f} % of the top {result['n_mislabelled']} are mislabelled.",
            "",
        ]
    lines += [
        f"Suggested labels (atypical images whose labels the classifier confidently contradicts; "
        f"`train-cls --round 2 --sample-weights influence` trains on them): {result['n_suggested']} images"
        + (f", {result['suggested_mislabelled']} of them known mislabelled." if "auroc" in result else "."),
        "",
    ]
    known = "auroc" in result
    lines += [
        "| rank | id | labels | suggested | atypicality | self-influence | loss | weight |"
        + (" mislabelled |" if known else ""),
        "|---:|---|---|---|---:|---:|---:|---:|" + ("---|" if known else ""),
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rank']} | {r['id']} | {' '.join(r['labels'])} | {' '.join(r['suggested'])} | "
            f"{r['atypicality']:.2f} | "
            f"{r['self_influence']:.3g} | {r['loss']:.3f} | {r['weight']:.2f} |"
            + (f" {'yes' if r['mislabelled'] else ''} |" if known else "")
        )
    lines += ["", f"Contact sheet: {result['contact_sheet']}", ""]
    return "\n".join(lines)


def _print(result: dict) -> None:
    known = "auroc" in result
    caption = "ranked by atypicality (robust z of log self-influence)"
    if known:
        caption = (
            f"AUROC {result['auroc']:.3f} against {result['n_mislabelled']} known mislabelled images "
            f"(loss: {result['auroc_loss']:.3f})"
        )
    table = Table(title=escape(f"possibly mislabelled images of '{result['split']}'"), caption=caption)
    for column in ("rank", "id", "labels", "suggested", "atypicality", "self-influence", "weight") + (
        ("mislabelled",) if known else ()
    ):
        table.add_column(column, justify="right" if column not in ("id", "labels", "suggested") else "left")
    for r in result["rows"]:
        table.add_row(
            str(r["rank"]),
            escape(r["id"]),
            escape(" ".join(r["labels"])),
            escape(" ".join(r["suggested"])),
            f"{r['atypicality']:.2f}",
            f"{r['self_influence']:.3g}",
            f"{r['weight']:.2f}",
            *(("yes" if r["mislabelled"] else "",) if known else ()),
        )
    console = Console(width=max(120, Console().width))
    fit = result["classifier_fit"]
    warn = fit is not None and fit["suggestions_suppressed"]
    console.print(
        ("warning: " if warn else "") + fit_line(result),
        markup=False,
        highlight=False,
        soft_wrap=True,
        style="bold yellow" if warn else None,
    )
    console.print(table)
