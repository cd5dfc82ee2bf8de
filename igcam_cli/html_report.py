"""The workspace as one HTML page (`report/index.html`) that opens offline.

Everything is inline: pictures are PNG data URIs, charts are SVG drawn here, the style sheet is a
`<style>` element, and there is no script. Sections of stages that have not run are a short line;
a damaged eval JSON is one line in the page, not an error.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from igcam_cli import __version__, report
from igcam_cli.atomic import write_text_atomically
from igcam_cli.errors import IgcamError
from igcam_cli.stages import evaluate
from igcam_cli.stages.influence_report import fit_line
from igcam_cli.stages.status import run_state
from igcam_cli.workspace import Workspace

CELL = 160  # px: the width of every picture in the contact sheets
TOP_INFLUENCE = 10  # rows of the mislabel ranking shown
# Stores of the contact sheet, in column order: title -> how to get the split's store.
SHEET_STORES: dict[str, Callable[[Workspace, str], Any]] = {
    "CAM": lambda ws, split: ws.maps("cams", split),
    "refined": lambda ws, split: ws.maps("refined", split),
    "pseudo-label": lambda ws, split: ws.pseudo(split),
    "prediction": lambda ws, split: ws.predictions(split),
}
HEAT_MAPS = ("CAM", "refined")
EVAL_ORDER = ("cams", "refined", "crf", "seg")


@dataclass
class EvalFile:
    """One eval/*.json: its name and contents, or why it could not be read."""

    name: str
    data: Any = None
    error: str | None = None

    @property
    def kind(self) -> str:
        """'ablation', 'influence', or 'artifact' (an evaluation of cams, refined, crf or seg)."""
        prefix = Path(self.name).name.split("-", 1)[0]
        return prefix if prefix in ("ablation", "influence") else "artifact"


def write_report(ws: Workspace, out: Path | None = None, sample: int = 8, seed: int = 0) -> Path:
    """Write the page to `out` (default WS/report/index.html; any other file, or a folder to hold index.html)
    and return its path."""
    out = Path(out) if out is not None else ws.path("report", "index.html")
    if out.is_dir():
        out = out / "index.html"
    page = render(ws, sample=sample, seed=seed)
    return write_text_atomically(out, page)


def render(ws: Workspace, sample: int = 8, seed: int = 0) -> str:
    """The whole page as a string."""
    records, manifest_error = _read_records(ws)
    evals = _read_evals(ws)
    sections = [
        _header(ws),
        _banner(records, evals),
        _pictures(ws, sample, seed),
        _evaluations(ws, sorted((e for e in evals if e.kind == "artifact"), key=_chain_order)),
        _ablations(ws, [e for e in evals if e.kind == "ablation"]),
        _influence([e for e in evals if e.kind == "influence"]),
        _provenance(ws, records, manifest_error),
    ]
    return _page(f"igcam report: {ws.root}", "\n".join(s for s in sections if s))


# ---- reading -----------------------------------------------------------------------------------


def _read_records(ws: Workspace) -> tuple[list[dict], str | None]:
    try:
        return ws.records(), None
    except IgcamError as exc:
        return [], exc.message


def _read_evals(ws: Workspace) -> list[EvalFile]:
    files = []
    for path in sorted(ws.path("eval").glob("*.json")):
        name = f"eval/{path.name}"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            files.append(EvalFile(name, error=f"{type(exc).__name__}: {exc}"))
            continue
        if not isinstance(data, dict):
            files.append(EvalFile(name, error=f"expected a JSON object, found {type(data).__name__}"))
            continue
        files.append(EvalFile(name, data))
    return files


def _chain_order(file: EvalFile) -> tuple[int, str]:
    """Evaluations in the chain's order: cams, refined, crf, seg (then anything else), each by split."""
    artifact = Path(file.name).name.split("-", 1)[0]
    return (EVAL_ORDER.index(artifact) if artifact in EVAL_ORDER else len(EVAL_ORDER), file.name)


def _guarded(file: EvalFile, draw: Callable[[dict], str]) -> str:
    """`draw(file.data)`, or one line saying why the file could not be read."""
    if file.error is None:
        try:
            return draw(file.data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            file.error = f"{type(exc).__name__}: {exc}"
    return _notice(f"could not read {file.name}: {file.error}", "error")


# ---- page parts ----------------------------------------------------------------------------------


def _header(ws: Workspace) -> str:
    spec = ws.dataset_spec
    try:
        dataset = ws.dataset()
        classes = f"{', '.join(dataset.classes)} ({len(dataset.classes)}; GT masks: {dataset.gt_source})"
        splits = ", ".join(f"{s} ({len(dataset.ids(s))} images)" for s in dataset.splits())
    except IgcamError as exc:
        classes = splits = f"(dataset could not be opened: {exc.message})"
    rows = [
        ("workspace", str(ws.root.resolve())),
        ("dataset", f"{spec.get('format', '?')}" + (f", root {spec['root']}" if spec.get("root") else "")),
        ("classes", classes),
        ("splits", splits),
        ("written", f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} by igcam {__version__}"),
    ]
    return f"<header><h1>igcam report</h1>{_key_values(rows)}</header>"


def _banner(records: list[dict], evals: list[EvalFile]) -> str:
    """A red banner naming every run and evaluation that used ground-truth masks."""
    lines = []
    for record in records:
        where = f"{record['stage']}" + (f" on split '{record['split']}'" if record.get("split") else "")
        if record.get("oracle"):
            lines.append(f"ORACLE: {where} (run {record['id']}) was guided by ground-truth masks.")
        if record.get("upper_bound"):
            lines.append(f"UPPER BOUND: {where} (run {record['id']}) comes from a model trained on ground-truth masks.")
    for file in evals:
        if isinstance(file.data, dict) and file.data.get("oracle"):
            lines.append(f"ORACLE: {file.name} scores maps guided by ground-truth masks.")
        if isinstance(file.data, dict) and file.data.get("upper_bound"):
            lines.append(f"UPPER BOUND: {file.name} scores a model trained on ground-truth masks.")
    if not lines:
        return ""
    items = "".join(f"<li>{escape(line)}</li>" for line in dict.fromkeys(lines))
    return (
        '<section class="banner" id="banner"><strong>Not weakly supervised: ground-truth masks were used '
        f"below. These numbers are not comparable with weakly supervised results.</strong><ul>{items}</ul></section>"
    )


def _pictures(ws: Workspace, sample: int, seed: int) -> str:
    title = "<h2>Pictures</h2>"
    if sample <= 0:
        return _section("pictures", title + _notice("left out (--sample 0)"))
    try:
        dataset = ws.dataset()
        sheets = [_split_sheet(ws, dataset, split, sample, seed) for split in dataset.splits()]
    except IgcamError as exc:
        return _section("pictures", title + _notice(f"could not draw the pictures: {exc.message}", "error"))
    sheets = [s for s in sheets if s]
    if not sheets:
        hint = f"igcam make-cams -w {ws.root} --split train"
        return _section(
            "pictures",
            title + _notice(f"not run yet: no CAMs, refined maps, pseudo-labels or predictions (run `{hint}`)"),
        )
    return _section("pictures", title + "".join(sheets))


def _split_sheet(ws: Workspace, dataset: Any, split: str, sample: int, seed: int) -> str:
    """A table of `sample` seeded images of a split: the image, each artifact it has, and its GT."""
    stores = {title: get(ws, split) for title, get in SHEET_STORES.items()}
    have = {title: store.ids() for title, store in stores.items()}
    ids = [i for i in dataset.ids(split) if any(i in done for done in have.values())]
    if not ids:
        return ""
    picked = set(random.Random(seed).sample(ids, min(sample, len(ids))))
    chosen = [i for i in ids if i in picked]  # in the dataset's order
    with_gt = dataset.has_masks(split)
    columns = ["image", *(t for t in stores if have[t] & picked), *(["ground truth"] if with_gt else [])]
    head = "".join(f"<th>{escape(c)}</th>" for c in ["id", *columns])
    rows = "".join(_sheet_row(dataset, stores, have, image_id, columns, with_gt) for image_id in chosen)
    caption = (
        f"split '{split}': {len(chosen)} of {len(ids)} images with an artifact (seed {seed}); heat maps show "
        "the per-pixel maximum over the image's classes; overlays use the VOC palette"
    )
    return (
        f'<h3>split {escape(split)}</h3><table class="sheet" data-split="{escape(split)}">'
        f"<caption>{escape(caption)}</caption><tr>{head}</tr>{rows}</table>"
    )


def _sheet_row(dataset: Any, stores: dict, have: dict, image_id: str, columns: list[str], with_gt: bool) -> str:
    try:
        item = dataset.load(image_id, with_mask=with_gt)
    except IgcamError as exc:
        notice = _notice(exc.message, "error")
        return f'<tr class="image"><th>{escape(image_id)}</th><td colspan="{len(columns)}">{notice}</td></tr>'
    cells = []
    for column in columns:
        try:
            cells.append(_sheet_cell(item, column, stores, have, image_id))
        except IgcamError as exc:
            cells.append(f"<td>{_notice(exc.message, 'error')}</td>")
    return f'<tr class="image"><th>{escape(image_id)}</th>{"".join(cells)}</tr>'


def _sheet_cell(item: Any, column: str, stores: dict, have: dict, image_id: str) -> str:
    if column == "image":
        picture = item.image
    elif column == "ground truth":
        picture = report.overlay(item.image, _fit(item.mask, item.image.shape[:2]))
    elif image_id not in have[column]:
        return '<td class="none">-</td>'
    elif column in HEAT_MAPS:
        picture = report.heatmap(stores[column].read(image_id).maps)
    else:
        picture = report.overlay(item.image, _fit(stores[column].read(image_id), item.image.shape[:2]))
    return f"<td>{_img(picture, f'{column} of {image_id}')}</td>"


def _evaluations(ws: Workspace, files: list[EvalFile]) -> str:
    title = "<h2>Evaluation</h2>"
    if not files:
        hint = f"igcam evaluate -w {ws.root} --artifact cams --split train"
        return _section("evaluation", title + _notice(f"not run yet (run `{hint}`)"))
    return _section("evaluation", title + "".join(_guarded(f, partial(_evaluation, f.name)) for f in files))


def _evaluation(name: str, result: dict) -> str:
    """Headline, honest description, per-class IoU bars and, for maps, the threshold curve."""
    honest = evaluate.describe(result)
    parts = [
        f'<article class="eval" data-file="{escape(name)}"><h3>{escape(evaluate.headline(result))}</h3>',
        f'<p class="headline">{escape(_headline(result))}</p>',
        f'<p class="honest">{escape(honest)} <span class="source">({escape(name)})</span></p>',
        '<div class="charts">',
        _bar_chart(result["per_class"], f"IoU per class, {result['artifact']} on '{result['split']}'"),
    ]
    if result.get("fixed_tau") is not None and result.get("threshold_curve"):
        parts.append(_curve_chart(result))
    parts.append("</div></article>")
    return "".join(parts)


def _headline(result: dict) -> str:
    """The mIoU in words, saying how its threshold was chosen."""
    split, miou = result["split"], _pct(result["miou"])
    if result.get("fixed_tau") is None:
        return f"mIoU {miou} % on split '{split}', labels as they are (no threshold)."
    fixed = f"{_pct(result['miou_fixed_tau'])} % at the fixed threshold τ {result['fixed_tau']:.2f}, chosen in advance"
    if result.get("threshold_tuned_on"):
        best = (
            f"mIoU {miou} % at the best threshold τ {result['threshold']:.2f}, tuned on split "
            f"'{result['threshold_tuned_on']}' (the scored split)"
        )
    else:
        best = f"mIoU {miou} % at the given threshold τ {result['threshold']:.2f}"
    return f"{best}; {fixed}."


def _ablations(ws: Workspace, files: list[EvalFile]) -> str:
    if not files:
        return _section("ablation", "<h2>Ablation</h2>" + _notice(f"not run yet (`igcam ablate -w {ws.root}`)"))
    return _section("ablation", "<h2>Ablation</h2>" + "".join(_guarded(f, _ablation_table) for f in files))


def _ablation_table(result: dict) -> str:
    split, rows = result["split"], result["rows"]
    first = rows[0]["maps"]
    oracle = any(r["maps"].get("oracle") or r["crf"].get("oracle") for r in rows)
    caption = (
        f"mIoU % on split '{split}' ({first['n_images']} images, GT {first['gt_source']}); maps at the fixed "
        f"background threshold and at the best one tuned on '{split}'; + CRF: dense-CRF labels of every pixel; "
        + ("ORACLE guidance in some rows" if oracle else "no oracle guidance")
    )
    head = "<tr><th>variant</th><th>maps, fixed τ</th><th>maps, best τ (tuned)</th><th>+ CRF</th></tr>"
    body = "".join(
        f"<tr><td>{escape(str(r['variant']))}</td>"
        f"<td>{_pct(r['maps'].get('miou_fixed_tau'))} ({_tau(r['maps'].get('fixed_tau'))})</td>"
        f"<td>{_pct(r['maps']['miou'])} ({_tau(r['maps'].get('threshold'))})</td>"
        f"<td>{_pct(r['crf']['miou'])}</td></tr>"
        for r in rows
    )
    return f'<table class="ablation"><caption>{escape(caption)}</caption>{head}{body}</table>'


def _influence(files: list[EvalFile]) -> str:
    if not files:
        return ""  # the influence round is optional: nothing to say when it was not used
    return _section("influence", "<h2>Possibly mislabelled images</h2>" + "".join(_guarded(f, _ranking) for f in files))


def _ranking(result: dict) -> str:
    known = "auroc" in result
    lines = [
        f"split '{result['split']}' ({result['n_images']} images), ranked by {result.get('ranked_by', 'atypicality')}; "
        f"{result['n_suggested']} images with suggested labels",
        fit_line(result),
    ]
    if known:
        lines.append(
            f"AUROC {result['auroc']:.3f} (per-image loss: {result['auroc_loss']:.3f}) against "
            f"{result['n_mislabelled']} known mislabelled images"
        )
    head = "<tr><th>rank</th><th>id</th><th>labels</th><th>suggested</th><th>score (atypicality)</th>"
    head += "<th>mislabelled</th></tr>" if known else "</tr>"
    body = "".join(
        f"<tr><td>{int(r['rank'])}</td><td>{escape(str(r['id']))}</td><td>{escape(' '.join(r['labels']))}</td>"
        f"<td>{escape(' '.join(r['suggested']))}</td><td>{float(r['atypicality']):.2f}</td>"
        + (f"<td>{'yes' if r.get('mislabelled') else ''}</td>" if known else "")
        + "</tr>"
        for r in result["rows"][:TOP_INFLUENCE]
    )
    text = "".join(f"<p>{escape(line)}</p>" for line in lines)
    return f'<div class="ranking">{text}<table class="influence">{head}{body}</table></div>'


def _provenance(ws: Workspace, records: list[dict], manifest_error: str | None) -> str:
    title = "<h2>Provenance</h2>"
    if manifest_error:
        return _section("provenance", title + _notice(manifest_error, "error"))
    if not records:
        return _section("provenance", title + _notice("no stage has run yet (manifest.json has no runs)"))
    head = "".join(
        f"<th>{c}</th>"
        for c in ("stage", "split", "status", "started", "ended", "host", "seed", "versions", "config and inputs")
    )
    rows = "".join(_provenance_row(ws, record) for record in records)
    return _section("provenance", f'{title}<table class="provenance"><tr>{head}</tr>{rows}</table>')


def _provenance_row(ws: Workspace, record: dict) -> str:
    status, why = run_state(ws, record)
    seed = record.get("seed", (record.get("config") or {}).get("seed"))
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    split = record.get("split") or "-"
    if record.get("shard"):
        split += f" (shard {record['shard']})"
    stage = str(record["stage"])
    if stage == "evaluate":  # which artifact, as `igcam status` shows it
        stage += f" {(record.get('config') or {}).get('artifact', '')}"
    cells = [
        escape(stage),
        escape(split),
        f'<span class="status {escape(status)}" title="{escape(why)}">{escape(status)}</span>',
        escape(_when(record.get("started"))),
        escape(_when(record.get("ended"))),
        escape(str(record.get("host", "-"))),
        escape("-" if seed is None else str(seed)),
        escape(versions or "-"),
        _run_details(record),
    ]
    stale = " stale" if status == "stale" else ""
    return f'<tr class="run{stale}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _run_details(record: dict) -> str:
    settings = [(k, _short(v)) for k, v in (record.get("config") or {}).items()]
    inputs = [(k, str(v)) for k, v in (record.get("inputs") or {}).items()]
    flags = [
        ("run id", str(record["id"])),
        ("oracle", "yes" if record.get("oracle") else "no"),
        ("upper bound", "yes" if record.get("upper_bound") else "no"),
    ]
    if record.get("error"):
        flags.append(("error", str(record["error"])))
    skipped = record.get("skipped") or {}  # a --skip-bad run's unreadable images: id -> why
    parts = [
        f"<summary>{len(settings)} settings, {len(inputs)} inputs</summary>",
        _key_values(flags),
        "<h4>settings</h4>" + (_key_values(settings) if settings else "<p>none</p>"),
        "<h4>inputs (run ids)</h4>" + (_key_values(inputs) if inputs else "<p>none</p>"),
    ]
    if skipped:
        parts.append(f"<h4>skipped as unreadable ({len(skipped)})</h4>" + _key_values(list(skipped.items())))
    return f"<details>{''.join(parts)}</details>"


# ---- charts (inline SVG) ---------------------------------------------------------------------------


def _bar_chart(per_class: dict[str, float | None], title: str) -> str:
    """Horizontal bars of IoU % per class (a class with no pixels in GT or prediction shows '-')."""
    label_w, bar_w, row_h, top = 120, 300, 20, 24
    width, height = label_w + bar_w + 60, top + row_h * len(per_class) + 6
    parts = [_svg_open(width, height, title), f'<text x="4" y="15" class="title">{escape(title)}</text>']
    for k, (name, iou) in enumerate(per_class.items()):
        y = top + k * row_h
        length = 0.0 if iou is None else max(0.0, min(1.0, float(iou))) * bar_w
        parts += [
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(str(name))}</text>',
            f'<rect class="bar" x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 6}">'
            f"<title>{escape(str(name))}: {_pct(iou)} %</title></rect>",
            f'<text x="{label_w + length + 4:.1f}" y="{y + 14}">{_pct(iou)}</text>',
        ]
    return "".join(parts) + "</svg>"


def _curve_chart(result: dict) -> str:
    """mIoU % against the background threshold, with the fixed and the best threshold marked."""
    taus = [float(t) for t in result["threshold_curve"]["tau"]]
    mious = [float(m) * 100 for m in result["threshold_curve"]["miou"]]
    fixed, best = float(result["fixed_tau"]), float(result["threshold"])
    width, height, left, right, top, bottom = 480, 270, 48, 16, 40, 36
    x_lo, x_hi = min(taus + [fixed, best]), max(taus + [fixed, best])
    y_lo, y_hi = _nice_range(mious + [float(result["miou_fixed_tau"]) * 100])
    x_hi = x_hi if x_hi > x_lo else x_lo + 0.01

    def x(t: float) -> float:
        return left + (t - x_lo) / (x_hi - x_lo) * (width - left - right)

    def y(m: float) -> float:
        return height - bottom - (m - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    title = f"mIoU % against the background threshold τ, {result['artifact']} on '{result['split']}'"
    parts = [_svg_open(width, height, title), f'<text x="4" y="15" class="title">{escape(title)}</text>']
    parts += _axes(x, y, (x_lo, x_hi), (y_lo, y_hi), width - right, top)
    points = " ".join(f"{x(t):.1f},{y(m):.1f}" for t, m in zip(taus, mious))
    parts.append(f'<polyline class="curve" points="{points}"/>')
    tuned = result.get("threshold_tuned_on")
    marks = [
        (fixed, float(result["miou_fixed_tau"]) * 100, "fixed", f"fixed τ {fixed:.2f}"),
        (best, float(result["miou"]) * 100, "best", f"best τ {best:.2f}" + (f" (tuned on {tuned})" if tuned else "")),
    ]
    for k, (tau, miou, kind, label) in enumerate(marks):
        legend_x = left + 4 + 150 * k
        parts += [
            f'<line class="mark {kind}" x1="{x(tau):.1f}" y1="{top}" x2="{x(tau):.1f}" y2="{height - bottom}"/>',
            f'<circle class="mark {kind}" cx="{x(tau):.1f}" cy="{y(miou):.1f}" r="3"/>',
            f'<line class="mark {kind}" x1="{legend_x}" y1="{top - 8}" x2="{legend_x + 16}" y2="{top - 8}"/>',
            f'<text class="mark-label {kind}" x="{legend_x + 20}" y="{top - 4}">{escape(label)}: {miou:.1f} %</text>',
        ]
    return "".join(parts) + "</svg>"


def _axes(x: Callable, y: Callable, xs: tuple[float, float], ys: tuple[float, float], x_end: float, top: int) -> list:
    x0, y0 = x(xs[0]), y(ys[0])
    parts = [
        f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x_end:.1f}" y2="{y0:.1f}"/>',
        f'<line class="axis" x1="{x0:.1f}" y1="{y0:.1f}" x2="{x0:.1f}" y2="{top}"/>',
        f'<text x="{x_end:.1f}" y="{y0 + 30:.1f}" text-anchor="end">τ</text>',
    ]
    for t in np.arange(np.ceil(xs[0] * 10) / 10, xs[1] + 1e-9, 0.1):
        parts.append(f'<text x="{x(t):.1f}" y="{y0 + 15:.1f}" text-anchor="middle">{t:.1f}</text>')
    step = 10 if ys[1] - ys[0] >= 30 else 5
    for m in np.arange(ys[0], ys[1] + 1e-9, step):
        parts.append(f'<text x="{x0 - 4:.1f}" y="{y(m) + 4:.1f}" text-anchor="end">{m:.0f}</text>')
    return parts


def _nice_range(values: list[float]) -> tuple[float, float]:
    """A y range in whole tens of percent around the values (at least 10 points tall)."""
    low, high = np.floor(min(values) / 10) * 10, np.ceil(max(values) / 10) * 10
    return float(low), float(max(high, low + 10))


def _svg_open(width: int, height: int, title: str) -> str:
    return (
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
    )


# ---- small helpers --------------------------------------------------------------------------------


def _img(picture: np.ndarray, alt: str) -> str:
    """A picture as a PNG data URI shown CELL px wide. Larger pictures are scaled down to CELL; smaller ones
    travel at their own size (the browser scales them), and 256 colours halve the PNG again."""
    tile = Image.fromarray(np.ascontiguousarray(picture)).convert("RGB")
    if tile.width > CELL:
        tile = tile.resize((CELL, max(1, round(CELL * tile.height / tile.width))), Image.Resampling.BILINEAR)
    height = max(1, round(CELL * tile.height / tile.width))
    buffer = io.BytesIO()
    tile.quantize(256).save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" width="{CELL}" height="{height}" src="data:image/png;base64,{data}">'


def _fit(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A label map at the image's size (nearest neighbour), so it can be drawn over it."""
    if label.shape == tuple(shape):
        return label
    return np.asarray(Image.fromarray(label).resize((shape[1], shape[0]), Image.Resampling.NEAREST))


def _key_values(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _section(name: str, content: str) -> str:
    return f'<section id="{name}">{content}</section>'


def _notice(text: str, kind: str = "absent") -> str:
    return f'<p class="notice {kind}">{escape(text)}</p>'


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.1f}"


def _tau(value: Any) -> str:
    return "-" if value is None else f"τ {float(value):.2f}"


def _when(stamp: Any) -> str:
    return "-" if not stamp else str(stamp)[:19].replace("T", " ")


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { margin: 0 0 .3em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
table.kv th { background: #f4f4f4; font-weight: 600; }
table.sheet td, table.sheet th { padding: 2px; text-align: center; }
table.sheet img { display: block; image-rendering: pixelated; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 12px; padding-top: 4px; }
.banner { background: #b00020; color: #fff; padding: .8em 1em; border-radius: 4px; margin: 1em 0; }
.notice { color: #666; font-style: italic; } .notice.error { color: #b00020; font-style: normal; }
.honest { color: #444; font-size: 13px; } .source { color: #888; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
article.eval { margin-bottom: 1.5em; }
svg { font: 11px sans-serif; background: #fff; } svg .title { font-weight: 600; }
rect.bar { fill: #4878a8; } polyline.curve { fill: none; stroke: #4878a8; stroke-width: 2; }
line.axis { stroke: #333; } line.mark { stroke-width: 1.5; stroke-dasharray: 4 3; }
line.mark.fixed { stroke: #888; } line.mark.best { stroke: #d0612a; }
circle.mark.fixed { fill: #888; } circle.mark.best { fill: #d0612a; }
text.mark-label.fixed { fill: #555; } text.mark-label.best { fill: #d0612a; }
.status.done { color: #1b7a2f; } .status.stale { color: #a86b00; font-weight: 600; }
.status.failed, .status.killed, .status.running { color: #b00020; } tr.run.stale { background: #fff8e6; }
details table { font-size: 12px; } details h4 { margin: .4em 0 .1em; }
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
