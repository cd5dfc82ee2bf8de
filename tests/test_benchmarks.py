"""The benchmarks' own training code: what it saves, igcam's stages must read."""

from __future__ import annotations

import sys
from pathlib import Path

from cli_helpers import make_workspace
from igcam_cli.config import MakeCamsConfig, RunOptions
from igcam_cli.stages import make_cams
from igcam_cli.store import MapStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402  (benchmarks/ is not a package)


def test_the_plain_baseline_saves_a_classifier_make_cams_reads(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=2, size=32)
    quality.plain_baseline(ws, epochs=1, batch=2)
    done = make_cams.run(
        MakeCamsConfig(split="train", scales=[1.0], workers=0), ws, RunOptions(device="cpu", quiet=True)
    )
    assert done == 4
    assert MapStore(ws.root / "cams" / "train").ids() == set(ws.dataset().ids("train"))
