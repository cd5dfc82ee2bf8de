"""Options the per-style benchmarks share (quality.py, mislabels.py): which styles, how many images, where to keep
the workspaces."""

from __future__ import annotations

import argparse
from pathlib import Path

from igcam_cli.data.styles import STYLES


def add_style_options(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--styles", default=",".join(STYLES), help=f"comma-separated, from {', '.join(STYLES)}")
    # half the demo's images, so that all six styles fit in about 30 minutes on 2 CPU cores
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--keep", type=Path, help="keep the workspaces here (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=Path(out))


def chosen_styles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    styles = [s for s in args.styles.split(",") if s]
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        parser.error(f"unknown style(s) {', '.join(unknown)} (choose from {', '.join(STYLES)})")
    return styles
