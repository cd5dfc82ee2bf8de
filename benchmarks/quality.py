"""Pseudo-label and segmentation quality of the whole chain on every synthetic style, beside a plain baseline.

    python benchmarks/quality.py                              # every style, the shipped defaults
    python benchmarks/quality.py --styles heads,shapes --keep /tmp/quality
    python benchmarks/quality.py --styles heads,shapes --keep /tmp/quality --resume   # after it was killed

For each style (data/styles.py) it makes a synthetic workspace with `igcam init --style S` (the
synthetic preset, as a user gets it), runs `igcam run` (train-cls, make-cams, refine, crf,
train-seg, predict, evaluate) and a CRF on the raw CAMs, then trains the **plain baseline**: an
independent 30-line recipe (the same network, full images with random flips, SGD with a one-cycle
learning rate, 15 epochs, no igcam training code) whose CAMs are made and scored by the same
make-cams and evaluate. Every number is mIoU % against the exact synthetic masks, no oracle: maps
on the train split at evaluate's fixed threshold (config.FIXED_TAU: CAMs 0.15, IRN's convention;
refined maps 0.50) and at the best threshold
of the sweep (tuned on the train split it scores), CRF pseudo-labels on train, the segmentation
model on val. The table is printed as Markdown and written, with every number, to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from style_args import add_style_options, chosen_styles  # benchmarks/, on the path when run as a script

from igcam_cli import ablation, chain
from igcam_cli.config import FIXED_TAU, EvaluateConfig, MakeCamsConfig, RunOptions, build
from igcam_cli.models.classifier import IMAGENET_MEAN, IMAGENET_STD, STAGE4_LAYOUT, CamClassifier
from igcam_cli.stages import evaluate, init, make_cams
from igcam_cli.workspace import Workspace


def plain_baseline(ws: Workspace, epochs: int = 15, lr: float = 0.05, batch: int = 16, seed: int = 0) -> Path:
    """Train the plain recipe on ws's train split and save it where make-cams reads a classifier."""
    dataset = ws.dataset()
    ids = dataset.ids("train")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    images = torch.stack(
        [(torch.from_numpy(dataset.load(i, with_mask=False).image).permute(2, 0, 1) - mean) / std for i in ids]
    )
    targets = torch.zeros(len(ids), dataset.num_classes)
    for row, image_id in enumerate(ids):
        targets[row, torch.as_tensor(dataset.labels(image_id)) - 1] = 1
    torch.manual_seed(seed)
    model = CamClassifier("resnet18", dataset.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = -(-len(ids) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(ids), batch):
            pick = order[start : start + batch]
            x = images[pick]
            flip = torch.rand(len(pick), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.multilabel_soft_margin_loss(model(x)[0], targets[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    path = ws.cls_dir / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "backbone": "resnet18",
            "stage4": STAGE4_LAYOUT,
            "num_classes": dataset.num_classes,
            "classes": dataset.classes,
            "config": {"recipe": "plain baseline"},
            "model": model.state_dict(),
        },
        path,
    )
    return path


def summary(result: dict) -> dict:
    """best (tuned on the scored split) and fixed-threshold mIoU of an evaluate result."""
    out = {"miou": result["miou"], "tau": result["threshold"]}
    curve = result.get("threshold_curve")  # label artifacts (crf, seg) and ablation rows have none
    if curve and result["artifact"] in FIXED_TAU:
        taus = np.asarray(curve["tau"])
        out["fixed_tau"] = FIXED_TAU[result["artifact"]]
        out["fixed"] = float(np.asarray(curve["miou"])[np.argmin(np.abs(taus - out["fixed_tau"]))])
    return out


def run_style(
    style: str, root: Path, n_train: int, n_val: int, opts: RunOptions, workers: int, epochs: dict[str, int]
) -> dict:
    start = time.time()
    if (root / style / "igcam.toml").exists():  # --resume: `igcam run` goes on from where the chain stopped
        ws = Workspace.open(root / style)
    else:
        ws = init.run(
            root / style,
            "synthetic",
            None,
            None,
            {"n_train": n_train, "n_val": n_val, "size": 128, **({"style": style} if style != "heads" else {})},
        )
    for stage in ("train-cls", "make-cams", "refine", "crf", "train-seg", "predict", "compute-influence"):
        ws.set_stage_options(stage, {"workers": workers})
    for stage in ("train-cls", "train-seg"):
        if stage in epochs:
            ws.set_stage_options(stage, {"epochs": epochs[stage]})
    evaluations = {r["artifact"]: summary(r) for r in chain.run(ws, opts)["evaluations"]}
    evaluations["crf_cams"] = summary(ablation.run(ws, "train", opts, workers=workers, variants=("CAM",))[0]["crf"])
    cls_record = ws.classifier_run(1)
    evaluations["val_map"] = cls_record["metrics"].get("val_map")
    evaluations["train_loss"] = cls_record["metrics"].get("train_loss")
    chain_s = time.time() - start

    shutil.rmtree(root / f"{style}-plain", ignore_errors=True)  # a few minutes: redone rather than resumed
    plain = init.run(root / f"{style}-plain", "synthetic", None, None, ws.dataset_spec)
    plain_baseline(plain, epochs=epochs.get("plain", 15), seed=opts.seed)
    make_cams.run(build(MakeCamsConfig, ws.stage_table("make-cams"), {"workers": workers}), plain, opts)
    evaluations["plain_cams"] = summary(evaluate.run(EvaluateConfig(artifact="cams", split="train"), plain, opts))
    return {"style": style, **evaluations, "chain_s": chain_s, "total_s": time.time() - start}


def pct(value) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def markdown(rows: list[dict], n_train: int, n_val: int) -> str:
    lines = [
        f"mIoU % against exact masks, {n_train} train / {n_val} val images of 128 px; maps and CRF on train, "
        f"segmentation on val; `fixed` = background threshold {FIXED_TAU['cams']:g} for CAMs and "
        f"{FIXED_TAU['refined']:g} for refined maps (evaluate's), `best` = best of the sweep, tuned on train; "
        "no oracle.",
        "",
        "| style | cls val mAP | plain CAM fixed / best | CAM fixed / best | refined fixed / best | refined / CAM "
        "| CRF(CAM) | CRF(refined) | seg val (CRF) | seg / CRF | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cams, refined, crf, seg = r["cams"], r["refined"], r["crf"], r.get("seg", {})
        lines.append(
            f"| {r['style']} | {pct(r['val_map'])} | {pct(r['plain_cams']['fixed'])} / {pct(r['plain_cams']['miou'])} "
            f"| {pct(cams['fixed'])} / {pct(cams['miou'])} | {pct(refined['fixed'])} / {pct(refined['miou'])} "
            f"| {refined['miou'] / max(cams['miou'], 1e-9):.2f} | {pct(r['crf_cams']['miou'])} | {pct(crf['miou'])} "
            f"| {pct(seg.get('miou'))} | {seg.get('miou', 0) / max(crf['miou'], 1e-9):.2f} | {r['total_s'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_style_options(parser, out="quality.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="train-cls epochs (default: the synthetic preset's)")
    parser.add_argument("--seg-epochs", type=int, help="train-seg epochs (default: the synthetic preset's)")
    parser.add_argument("--plain-epochs", type=int, default=15, help="the plain baseline's epochs")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with a killed run: keep the styles already in --out, resume the others' workspaces under --keep",
    )
    args = parser.parse_args()
    styles = chosen_styles(parser, args)
    if args.resume and args.keep is None:
        parser.error("--resume needs the --keep folder of the run it resumes")
    root = args.keep or Path(tempfile.mkdtemp(prefix="igcam-quality-"))
    opts = RunOptions(device=args.device, seed=args.seed, quiet=True)
    rows = []
    if args.resume and args.out.exists():
        earlier = json.loads(args.out.read_text())
        if (earlier["n_train"], earlier["n_val"]) != (args.n_train, args.n_val):
            parser.error(f"{args.out} holds a run on {earlier['n_train']} / {earlier['n_val']} images, not this one's")
        rows = [row for row in earlier["rows"] if row["style"] in styles]
    try:
        for style in [s for s in styles if s not in {row["style"] for row in rows}]:
            epochs = {"train-cls": args.epochs, "train-seg": args.seg_epochs, "plain": args.plain_epochs}
            rows.append(
                run_style(
                    style,
                    root,
                    args.n_train,
                    args.n_val,
                    opts,
                    args.workers,
                    {k: v for k, v in epochs.items() if v is not None},
                )
            )
            args.out.write_text(json.dumps({"n_train": args.n_train, "n_val": args.n_val, "rows": rows}, indent=1))
            print(markdown(rows[-1:], args.n_train, args.n_val).splitlines()[-1], flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(rows, args.n_train, args.n_val))


if __name__ == "__main__":
    main()
