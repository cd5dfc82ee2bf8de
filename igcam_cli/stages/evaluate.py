"""evaluate: an artifact against GT masks (docs/METHOD.md §8), written to eval/<artifact>-<split>.json and .md.

Map artifacts (cams, refined) are scored at a fixed background threshold (`fixed_tau`: IRN's 0.15
for CAMs) and with a threshold sweep whose best threshold is reported together with the split it
was tuned on; `miou` is the sweep's best. Label artifacts (crf: pseudo/<split>/, seg:
predict's pred/<split>/) are scored as they are. Segmentation reports say whether predict used a
CRF and whether the model was trained on GT masks (`upper_bound`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from igcam_cli.config import FIXED_TAU, FIXED_TAU_WALKED, EvaluateConfig, RunOptions, to_dict
from igcam_cli.core.metrics import best_threshold, confusion_matrix, scores, threshold_confusions
from igcam_cli.errors import BadData, MissingArtifact
from igcam_cli.registry import MAP_KINDS, PRODUCER
from igcam_cli.runtime.progress import StageLog
from igcam_cli.workspace import Workspace, input_key

_ARTIFACT_STAGE = {**PRODUCER, "seg": PRODUCER["pred"]}  # `seg`: the predictions of the segmenter


def run(cfg: EvaluateConfig, ws: Workspace, opts: RunOptions) -> dict[str, Any]:
    log = StageLog(ws.log_path("evaluate"), quiet=opts.quiet)
    dataset = ws.dataset()
    ids = dataset.ids(cfg.split)
    if not dataset.has_masks(cfg.split):
        raise BadData(
            f"split '{cfg.split}' has no ground-truth masks for every image ({dataset.gt_source}): evaluate needs them"
        )
    names = ["background", *dataset.classes]
    n = len(names)
    producer = _ARTIFACT_STAGE[cfg.artifact]
    source_record = ws.latest(producer, cfg.split)

    if cfg.artifact in MAP_KINDS:
        store = ws.complete_maps(cfg.artifact, cfg.split, ids)
        ids, skipped = _scored(ids, store.skipped(), cfg)
        taus = _taus(cfg)
        fixed_tau = cfg.fixed_tau if cfg.fixed_tau is not None else _default_fixed_tau(cfg.artifact, store)
        confs = np.zeros((len(taus) + 1, n, n), dtype=np.int64)  # the sweep, then the fixed threshold
        for image_id, record in log.track(store.iter_records(ids), len(ids), f"evaluate {cfg.artifact}"):
            mask = _mask(dataset, image_id, record.maps.shape[1:], cfg.artifact)
            confs += threshold_confusions(mask, record.maps, record.classes, np.append(taus, fixed_tau), n)
        best, tau, curve = best_threshold(confs[:-1], taus)
        conf = confs[best]
        oracle = bool(store.attrs.get("oracle", False))
        fixed = scores(confs[-1], names)
        threshold: dict[str, Any] = {
            "tau": tau,
            "tuned_on": cfg.split if len(taus) > 1 else None,
            "curve": {"tau": [float(t) for t in taus], "miou": [float(m) for m in curve]},
            "fixed": {"fixed_tau": float(fixed_tau), "miou_fixed_tau": fixed["miou"]},
        }
    else:
        if cfg.artifact == "seg":
            labels = ws.predictions(cfg.split)
            _check_seg_source(ws, cfg.split, source_record, len(labels) > 0)
            what, command = "predictions", ws.command("predict", cfg.split)
        else:
            labels, what, command = ws.pseudo(cfg.split), "pseudo-labels", ws.command("crf", cfg.split)
        ids, skipped = _scored(ids, labels.skipped(), cfg)
        missing = [i for i in ids if i not in labels]
        if missing:
            raise MissingArtifact(
                f"{what} for split '{cfg.split}' missing for {len(missing)} of {len(ids)} images: run `{command}` first"
            )
        conf = np.zeros((n, n), dtype=np.int64)
        for image_id in log.track(ids, len(ids), f"evaluate {cfg.artifact}"):
            pred = labels.read(image_id)
            mask = _mask(dataset, image_id, pred.shape, cfg.artifact)
            pred = np.where(pred == 255, 0, pred)  # ignored pseudo-label pixels count as background
            if pred.max(initial=0) >= n:
                raise BadData(
                    f"{labels.path(image_id)} holds class index {int(pred.max())}, but there are only {n - 1} classes"
                )
            conf += confusion_matrix(mask, pred, n)
        oracle = bool((source_record or {}).get("oracle", False))
        threshold = {"tau": None, "tuned_on": None, "curve": None, "fixed": {}}

    result = _result(cfg, scores(conf, names), names, threshold, len(ids), dataset, oracle, source_record)
    result["skipped"] = len(skipped)
    if skipped:
        log(
            f"evaluate: {len(skipped)} images of '{cfg.split}' left out: skipped as unreadable "
            f"when {cfg.artifact} was made"
        )
    cams_record = _cams_record(ws, source_record) or {}
    result["relabelled"] = int(cams_record.get("relabelled", 0))
    result["classifier_round"] = (cams_record.get("classifier") or {}).get("round")
    result["stale"] = bool(source_record and ws.is_stale(source_record))
    if result["stale"]:
        log(
            f"note: {cfg.artifact} of '{cfg.split}' is stale: a stage it was made from ran again since "
            f"(`igcam status -w {ws.root}` shows which); this evaluates them as they are"
        )
    json_path, md_path = _write(ws, cfg, result, conf)
    seg_flags = {"upper_bound": result["upper_bound"]} if cfg.artifact == "seg" else {}
    ws.start(
        "evaluate",
        to_dict(cfg),
        split=cfg.split,
        oracle=oracle,
        **seg_flags,
        inputs={input_key(producer, cfg.split): source_record["id"]} if source_record else {},
    ).finish(outputs=[str(json_path), str(md_path)], metrics={"miou": result["miou"]})
    if not opts.quiet:
        print_result(result)
    log(f"wrote {json_path}")
    return result


def _scored(ids: list[str], skipped: dict[str, str], cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    """(the ids to score, those a --skip-bad run left out of the artifact)."""
    left_out = [i for i in ids if i in skipped]
    if left_out and len(left_out) == len(ids):
        raise BadData(f"every image of split '{cfg.split}' was skipped as unreadable: nothing to evaluate")
    return [i for i in ids if i not in skipped], left_out


def _check_seg_source(ws: Workspace, split: str, record: dict | None, has_output: bool) -> None:
    """pred/<split>/ must hold predict's output for the dataset split, not a folder's of that name."""
    if has_output and record is not None and record["config"].get("split") != split:
        source = record["config"].get("images") or f"split '{record['config'].get('split')}'"
        raise BadData(
            f"pred/{split} holds predictions of {source}, not of split '{split}': "
            f"run `{ws.command('predict', split)} --force` first"
        )


def _default_fixed_tau(artifact: str, store) -> float:
    walked = artifact == "refined" and store.attrs.get("method") in ("irn", "both")
    return FIXED_TAU_WALKED if walked else FIXED_TAU[artifact]


def _taus(cfg: EvaluateConfig) -> np.ndarray:
    if cfg.bg_tau is not None:
        return np.array([cfg.bg_tau])
    return np.round(np.arange(cfg.tau_min, cfg.tau_max + cfg.tau_step / 2, cfg.tau_step), 6)


def _mask(dataset, image_id: str, shape: tuple[int, ...], artifact: str) -> np.ndarray:
    mask = dataset.load(image_id).mask
    if mask is None:
        raise BadData(f"no ground-truth mask for image '{image_id}'")
    if mask.shape != tuple(shape):
        raise BadData(
            f"{artifact} of '{image_id}' is {shape[1]}x{shape[0]} but its GT mask is {mask.shape[1]}x{mask.shape[0]}"
        )
    return mask


def _result(
    cfg, s: dict, names: list[str], threshold: dict, n_images: int, dataset, oracle: bool, source_record: dict | None
) -> dict[str, Any]:
    per = lambda values: {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, values)}  # noqa: E731
    return {
        "artifact": cfg.artifact,
        "split": cfg.split,
        "miou": s["miou"],
        "per_class": s["per_class"],
        "pixel_accuracy": s["pixel_accuracy"],
        "precision": per(s["precision"]),
        "recall": per(s["recall"]),
        "threshold": threshold["tau"],
        "threshold_tuned_on": threshold["tuned_on"],
        "threshold_curve": threshold["curve"],
        **threshold["fixed"],
        "n_images": n_images,
        "gt_source": dataset.gt_source_for(cfg.split) if hasattr(dataset, "gt_source_for") else dataset.gt_source,
        "dataset": dataset.name,
        "crf": _used_crf(cfg.artifact, source_record),
        "oracle": oracle,
        "upper_bound": bool((source_record or {}).get("upper_bound", False)),
        **({"labels": (source_record or {}).get("labels", "pseudo")} if cfg.artifact == "seg" else {}),
        **({"class_gate": _class_gate(source_record)} if cfg.artifact == "seg" else {}),
        "ignore_index": 255,
        "miou_over": "classes present in GT or prediction",
        "source_run": (source_record or {}).get("id"),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cams_record(ws: Workspace, record: dict | None) -> dict | None:
    """The make-cams run an artifact descends from, following its inputs back. Its record says
    which classifier round drew the CAMs and for how many images it used influence-suggested
    labels (not an oracle: no GT is involved, but a reader should know the labels were changed)."""
    by_id = {r["id"]: r for r in ws.records()}
    seen = set()
    while record is not None and record["id"] not in seen:
        seen.add(record["id"])
        if record["stage"] == "make-cams":
            return record
        parents = [
            by_id.get(run)
            for key, run in record.get("inputs", {}).items()
            if key.split(":")[0] in ("make-cams", "refine", "crf", "train-seg", "predict")
        ]
        record = next((r for r in parents if r is not None), None)
    return None


def _class_gate(source_record: dict | None) -> float | None:
    """predict --class-gate's threshold where the classifier gated the predictions, else None."""
    gate = (source_record or {}).get("class_gate") or {}
    return gate.get("tau") if gate.get("applied") else None


def _used_crf(artifact: str, source_record: dict | None) -> bool:
    if artifact == "seg":  # predict --crf/--no-crf
        return bool((source_record or {}).get("config", {}).get("crf", False))
    return artifact == "crf"


def _write(ws: Workspace, cfg: EvaluateConfig, result: dict, conf: np.ndarray) -> tuple[Path, Path]:
    out = ws.path("eval")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{cfg.artifact}-{cfg.split}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps({**result, "confusion": conf.tolist()}, indent=1))
    md_path.write_text(markdown(result))
    return json_path, md_path


def describe(result: dict) -> str:
    """One honest line: what was measured, on what, with what."""
    tau = result["threshold"]
    how = (
        f"best background threshold {tau:.2f} tuned on {result['threshold_tuned_on']}"
        if result["threshold_tuned_on"]
        else (f"background threshold {tau:.2f}" if tau is not None else "as labelled")
    )
    oracle = "ORACLE (GT-guided, not weakly supervised)" if result["oracle"] else "weakly supervised"
    if result.get("upper_bound"):
        oracle = "UPPER BOUND (model trained on GT masks, fully supervised)"
    extra = ""
    if result.get("classifier_round"):
        extra += f", CAMs of classifier round {result['classifier_round']}"
    if result.get("class_gate"):
        extra += f", classes the workspace classifier scored below {result['class_gate']:g} dropped (no GT)"
    if result.get("relabelled"):
        extra += f", {result['relabelled']} images with labels suggested by compute-influence"
    if result.get("skipped"):
        extra += f", {result['skipped']} unreadable images skipped and not scored"
    if result.get("stale"):
        extra += ", STALE (a stage it was made from ran again since)"
    return (
        f"{result['artifact']} on split '{result['split']}' ({result['n_images']} images), GT {result['gt_source']}, "
        f"{'with' if result['crf'] else 'without'} CRF, {how}, {oracle}{extra}"
    )


def headline(result: dict) -> str:
    """`cams / train: mIoU 43.50 %`, and for maps both numbers: the sweep's best, then the fixed threshold's."""
    line = f"{result['artifact']} / {result['split']}: mIoU {result['miou'] * 100:.2f} %"
    if result.get("fixed_tau") is None:
        return line
    best = "best τ" if result["threshold_tuned_on"] else f"τ {result['threshold']:.2f}"
    return f"{line} ({best}), {result['miou_fixed_tau'] * 100:.2f} % at fixed τ {result['fixed_tau']:.2f}"


def summary(result: dict) -> str:
    """One line for --quiet: the mIoU and what it was measured on."""
    return f"{headline(result)} ({describe(result)})"


def markdown(result: dict) -> str:
    lines = [f"# {headline(result)}", "", describe(result), ""]
    if result.get("fixed_tau") is not None:
        lines += [
            f"The per-class table is at the {'best' if result['threshold_tuned_on'] else 'given'} threshold "
            f"{result['threshold']:.2f}; at the fixed threshold {result['fixed_tau']:.2f} the mIoU is "
            f"{result['miou_fixed_tau'] * 100:.2f} %.",
            "",
        ]
    if result["oracle"]:
        lines += ["**ORACLE: ground-truth masks guided these maps. Not a weakly supervised result.**", ""]
    if result.get("upper_bound"):
        lines += ["**UPPER BOUND: the model was trained on ground-truth masks. Not a weakly supervised result.**", ""]
    lines += ["| class | IoU % | precision % | recall % |", "|---|---:|---:|---:|"]
    for name, iou in result["per_class"].items():
        lines.append(f"| {name} | {_pct(iou)} | {_pct(result['precision'][name])} | {_pct(result['recall'][name])} |")
    lines += ["", f"pixel accuracy {result['pixel_accuracy'] * 100:.2f} %", ""]
    return "\n".join(lines)


def print_result(result: dict) -> None:
    console = Console()
    if result["oracle"]:
        console.print("[bold white on red] ORACLE: ground-truth masks guided these maps; not weakly supervised [/]")
    if result.get("upper_bound"):
        console.print(
            "[bold white on blue] UPPER BOUND: the model was trained on ground-truth masks; not weakly supervised [/]"
        )
    table = Table(
        title=escape(headline(result)),
        caption=escape(describe(result)),
    )
    for column in ("class", "IoU %", "precision %", "recall %"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, iou in result["per_class"].items():
        table.add_row(escape(name), _pct(iou), _pct(result["precision"][name]), _pct(result["recall"][name]))
    console.print(table)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"
