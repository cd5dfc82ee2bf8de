"""How well influence finds corrupted image labels, on every synthetic style.

    python benchmarks/mislabels.py                          # every style, 10 % swapped labels
    python benchmarks/mislabels.py --styles heads,textured --noise 0.1 --kind add --keep /tmp/mislabels

For each style it runs what a user runs, as commands: `igcam synth DATA --style S --label-noise F`
(a seeded fraction F of the train labels corrupted, listed in corrupted.csv; GT masks stay true),
`igcam init --dataset folder --root DATA` (the synthetic preset), `train-cls`, `compute-influence
--split train` and `influence-report --split train`, then reads the report's JSON: the classifier's
learned fraction (the guard's input), the AUROC of the atypicality ranking and of the per-image
loss against the corrupted ids, the share of corrupted images among the n top-ranked (n = how many
were corrupted), and how many of the suggested labels are on truly corrupted images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from style_args import add_style_options, chosen_styles

from igcam_cli.data.noise import NOISE_KINDS


def igcam(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "igcam_cli", *args], check=True, stdout=subprocess.DEVNULL)


def run_style(style: str, root: Path, args: argparse.Namespace) -> dict:
    start = time.time()
    data, ws = root / f"{style}-data", root / style
    igcam(
        "synth",
        str(data),
        "--style",
        style,
        "--n-train",
        str(args.n_train),
        "--n-val",
        str(args.n_val),
        "--label-noise",
        str(args.noise),
        "--noise-kind",
        args.kind,
        "--seed",
        str(args.data_seed),
    )
    igcam("init", "-w", str(ws), "--dataset", "folder", "--root", str(data))
    igcam("train-cls", "-w", str(ws), "--seed", str(args.seed), "-q")
    igcam("compute-influence", "-w", str(ws), "--split", "train", "-q")
    igcam("influence-report", "-w", str(ws), "--split", "train", "-q")
    result = json.loads((ws / "eval" / "influence-train.json").read_text())
    fit = result.get("classifier_fit") or {}
    return {
        "style": style,
        "learned_fraction": fit.get("learned_fraction"),
        "withheld": fit.get("suggestions_withheld"),
        "n_mislabelled": result.get("n_mislabelled"),
        "auroc": result.get("auroc"),
        "auroc_loss": result.get("auroc_loss"),
        "top_n_precision": result.get("precision_at_n_mislabelled"),
        "suggested": result["n_suggested"],
        "suggested_mislabelled": result.get("suggested_mislabelled"),
        "minutes": (time.time() - start) / 60,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| style | learned fraction | AUROC (atypicality) | AUROC (loss) | top n corrupted | suggested "
        "| of them corrupted | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        withheld = f" ({r['withheld']} withheld)" if r.get("withheld") else ""
        precision = (
            f"{r['suggested_mislabelled']} ({100 * r['suggested_mislabelled'] / r['suggested']:.0f} %)"
            if r["suggested"]
            else "-"
        )
        lines.append(
            f"| {r['style']} | {r['learned_fraction']:.2f} | {r['auroc']:.3f} | {r['auroc_loss']:.3f} "
            f"| {100 * r['top_n_precision']:.0f} % | {r['suggested']}{withheld} | {precision} | {r['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_style_options(parser, out="mislabels.json")
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of the train labels corrupted")
    parser.add_argument("--kind", default="swap", choices=NOISE_KINDS)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="train-cls seed")
    args = parser.parse_args()
    styles = chosen_styles(parser, args)
    root = args.keep or Path(tempfile.mkdtemp(prefix="igcam-mislabels-"))
    rows = []
    try:
        for style in styles:
            rows.append(run_style(style, root, args))
            args.out.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
            )
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
