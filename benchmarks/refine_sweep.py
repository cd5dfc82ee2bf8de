"""Sweep refine's settings across workspaces that already hold CAMs: the evidence behind refine's defaults.

    python benchmarks/refine_sweep.py /tmp/q/heads /tmp/q/textured ... --grid 'sigma_xy=4,8,16' 'fill_gain=1.5,2'

Each workspace needs `cams/train` (make-cams) and GT masks on train (synthetic styles have exact
ones). For every combination of the grid (RefineConfig fields, plus the CRF's `bg_alpha` and `crf_<field>` for a
field of the psa preset's CrfParams, e.g. `crf_bi_sxy=20,80`), it runs
guidance and boundary with the core functions refine uses and scores, per workspace, the refined
maps at the fixed threshold 0.15 and at the best threshold of a sweep (tuned on train), and with
`--crf` the CRF pseudo-labels (the psa preset) of the refined maps beside those of the raw CAMs.
Proposals are computed once per proposal setting and reused. Prints one Markdown row per setting
with every workspace's numbers and the mean; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from igcam_cli.config import RefineConfig
from igcam_cli.core.densecrf import PRESETS, CrfParams, crf_labels
from igcam_cli.core.guidance import instance_guidance
from igcam_cli.core.metrics import best_threshold, confusion_matrix, scores, threshold_confusions
from igcam_cli.core.proposals import propose
from igcam_cli.stages import refine as refine_stage
from igcam_cli.stages.crf import FILLED_ALPHA, PEAKED_ALPHA
from igcam_cli.stages.refine import boundary_params, guidance_params
from igcam_cli.workspace import Workspace

TAUS = np.round(np.arange(0.05, 0.951, 0.05), 6)
FIXED = 0.15
PROPOSAL_FIELDS = ("proposal_scale", "proposal_sigma", "proposal_min_size")


@dataclasses.dataclass
class Data:
    name: str
    ids: list[str]
    images: list[np.ndarray]
    masks: list[np.ndarray]
    cams: list[np.ndarray]
    classes: list[np.ndarray]
    num_labels: int
    cell: float  # image pixels per CAM cell (refine's fill gain follows the grid when fill_gain is None)


def load(path: Path) -> Data:
    ws = Workspace(path)
    dataset = ws.dataset()
    ids = dataset.ids("train")
    store = ws.complete_maps("cams", "train", ids)
    samples = [dataset.load(i, with_mask=True) for i in ids]
    records = [store.read(i) for i in ids]
    return Data(
        path.name,
        ids,
        [s.image for s in samples],
        [s.mask for s in samples],
        [r.maps.astype(np.float32) for r in records],
        [np.asarray(r.classes) for r in records],
        dataset.num_classes + 1,
        refine_stage.cam_cell(ws.latest("make-cams", "train")),
    )


def _propose(args):
    image, cfg = args
    return propose(image, scales=(cfg.proposal_scale,), sigma=cfg.proposal_sigma, min_size=cfg.proposal_min_size)


def _crf(args):
    image, maps, classes, alpha, crf = args
    return crf_labels(image, maps, classes, crf, bg_mode="power", bg_alpha=alpha)


def map_scores(data: Data, maps: list[np.ndarray]) -> dict:
    confs = sum(threshold_confusions(m, x, c, TAUS, data.num_labels) for m, x, c in zip(data.masks, maps, data.classes))
    _, tau, curve = best_threshold(confs, TAUS)
    return {"fixed": float(curve[np.argmin(np.abs(TAUS - FIXED))]), "best": float(curve.max()), "tau": tau}


def crf_score(
    data: Data, maps: list[np.ndarray], alpha: float, pool: ProcessPoolExecutor, crf: CrfParams = PRESETS["psa"]
) -> float:
    labels = pool.map(_crf, [(i, m, c, alpha, crf) for i, m, c in zip(data.images, maps, data.classes)], chunksize=8)
    conf = sum(confusion_matrix(m, lab, data.num_labels) for m, lab in zip(data.masks, labels))
    return scores(conf)["miou"]


def refine(data: Data, cfg: RefineConfig, proposals: list | None) -> list[np.ndarray]:
    maps = data.cams
    if cfg.guidance == "proposals":
        maps = [
            instance_guidance(m, p, guidance_params(cfg, min(image.shape[:2]) / data.cell))
            for m, p, image in zip(maps, proposals, data.images)
        ]
    params = boundary_params(cfg)
    out = []
    for start in range(0, len(maps), 16):  # all synthetic images of a workspace share one size
        batch = [
            refine_stage.RefineItem(
                i, torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(m), c
            )
            for i, image, m, c in zip(
                data.ids[start : start + 16],
                data.images[start : start + 16],
                maps[start : start + 16],
                data.classes[start : start + 16],
            )
        ]
        out += refine_stage.boundary_batch(batch, cfg.boundary, params, torch.device("cpu"))
    return out


def grid(specs: list[str]) -> list[dict]:
    axes = []
    for spec in specs:
        name, values = spec.split("=", 1)
        axes.append([(name, _value(name, v)) for v in values.split(";" if "[" in values else ",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def _value(name: str, text: str):
    if name in ("scales", "dilations"):
        return json.loads(text)
    if name == "boundary":
        return text.lower() in ("1", "true", "yes")
    if name in ("guidance", "crf_unary"):
        return text
    return float(text) if name not in ("iterations", "crf_iterations", "min_scale_side") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspaces", nargs="+", type=Path)
    parser.add_argument("--grid", nargs="*", default=[], help="FIELD=v1,v2 (lists: FIELD=[1,2];[1,2,4])")
    parser.add_argument("--crf", action="store_true", help="also score CRF pseudo-labels (slower)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.workers)
    datasets = [load(p) for p in args.workspaces]
    names = [d.name for d in datasets]
    rows, proposal_cache = [], {}
    with ProcessPoolExecutor(args.workers) as pool:
        base = {}
        for d in datasets:
            base[d.name] = map_scores(d, d.cams)
            if args.crf:
                base[d.name]["crf"] = crf_score(d, d.cams, PEAKED_ALPHA, pool)
        print("| setting | " + " | ".join(names) + " | mean |")
        print("|---|" + "---:|" * (len(names) + 1))
        _print("CAM", [base[n] for n in names])
        for overrides in grid(args.grid):
            start = time.time()
            alpha = overrides.get("bg_alpha", FILLED_ALPHA)
            crf = dataclasses.replace(
                PRESETS["psa"], **{k[4:]: v for k, v in overrides.items() if k.startswith("crf_")}
            )
            cfg = RefineConfig(**{k: v for k, v in overrides.items() if k != "bg_alpha" and not k.startswith("crf_")})
            results = []
            for d in datasets:
                key = (d.name,) + tuple(getattr(cfg, f) for f in PROPOSAL_FIELDS)
                if cfg.guidance == "proposals" and key not in proposal_cache:
                    proposal_cache[key] = list(pool.map(_propose, [(i, cfg) for i in d.images], chunksize=8))
                maps = refine(d, cfg, proposal_cache.get(key))
                result = map_scores(d, maps)
                if args.crf:
                    result["crf"] = crf_score(d, maps, alpha, pool, crf)
                results.append(result)
            label = ", ".join(f"{k}={v}" for k, v in overrides.items())
            _print(label or "defaults", results, base=[base[n] for n in names], seconds=time.time() - start)
            rows.append({"setting": overrides, "results": dict(zip(names, results))})
            if args.out:
                args.out.write_text(json.dumps({"cams": base, "rows": rows}, indent=1))


def _print(label: str, results: list[dict], base: list[dict] | None = None, seconds: float | None = None) -> None:
    def cell(r: dict, b: dict | None) -> str:
        text = f"{r['fixed'] * 100:.1f}/{r['best'] * 100:.1f}"
        if b is not None:
            text += f" ({r['best'] / max(b['best'], 1e-9):.2f}x)"
        if "crf" in r:
            text += f" crf {r['crf'] * 100:.1f}"
        return text

    cells = [cell(r, b) for r, b in zip(results, base or [None] * len(results))]
    mean = {k: float(np.mean([r[k] for r in results])) for k in results[0] if k != "tau"}
    mean_base = {k: float(np.mean([b[k] for b in base])) for k in base[0] if k != "tau"} if base else None
    suffix = f" ({seconds:.0f}s)" if seconds is not None else ""
    print(f"| {label}{suffix} | " + " | ".join(cells) + f" | {cell(mean, mean_base)} |", flush=True)


if __name__ == "__main__":
    main()
