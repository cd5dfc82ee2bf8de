"""evaluate on map artifacts: the fixed-threshold mIoU beside the sweep's best, in the JSON and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import make_workspace
from igcam_cli.config import EvaluateConfig, RunOptions
from igcam_cli.stages import evaluate

OPTS = RunOptions(device="cpu", quiet=True)


def _write_maps(ws, kind: str, inside: float, outside: float) -> None:
    """Each labelled class's map: `inside` on its GT pixels, `outside` elsewhere."""
    dataset = ws.dataset()
    with ws.maps(kind, "train").writer(source="make-cams" if kind == "cams" else "refine") as writer:
        for image_id in dataset.ids("train"):
            sample = dataset.load(image_id)
            maps = np.stack([np.where(sample.mask == c, inside, outside) for c in sample.labels]).astype(np.float32)
            writer.write(image_id, maps, sample.labels.astype(np.uint8))


@pytest.mark.parametrize(
    "kind, inside, outside, fixed_tau",
    [("cams", 0.3, 0.1, 0.15), ("cams", 0.5, 0.3, 0.15), ("refined", 0.5, 0.3, 0.50), ("refined", 0.7, 0.55, 0.50)],
)
def test_fixed_threshold_beside_the_best(tmp_path, kind, inside, outside, fixed_tau):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0, size=48)
    _write_maps(ws, kind, inside, outside)
    result = evaluate.run(EvaluateConfig(artifact=kind, split="train"), ws, OPTS)
    assert result["fixed_tau"] == fixed_tau  # IRN's 0.15 for CAMs, 0.50 for refined maps
    assert result["miou"] == pytest.approx(1.0)  # the sweep finds a threshold between outside and inside
    assert result["threshold_tuned_on"] == "train" and outside <= result["threshold"] < inside
    separates = outside < fixed_tau < inside
    assert (result["miou_fixed_tau"] == pytest.approx(1.0)) is separates
    curve = dict(zip(result["threshold_curve"]["tau"], result["threshold_curve"]["miou"]))
    assert result["miou_fixed_tau"] == pytest.approx(curve[fixed_tau])
    saved = json.loads((ws.path("eval") / f"{kind}-train.json").read_text())
    assert saved["miou_fixed_tau"] == result["miou_fixed_tau"] and saved["fixed_tau"] == fixed_tau
    md = (ws.path("eval") / f"{kind}-train.md").read_text()
    assert md.startswith(f"# {kind} / train: mIoU 100.00 % (best τ), ")
    assert f"% at fixed τ {fixed_tau:.2f}" in md.splitlines()[0]


def test_fixed_threshold_off_the_sweep_grid(tmp_path):
    """--fixed-tau need not lie on the sweep's grid; it is scored on its own."""
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0, size=48)
    _write_maps(ws, "cams", 0.3, 0.1)
    off_grid = evaluate.run(EvaluateConfig(artifact="cams", split="train", fixed_tau=0.333), ws, OPTS)
    assert off_grid["fixed_tau"] == 0.333 and off_grid["miou_fixed_tau"] < 0.99  # above every object's 0.3
    assert off_grid["miou"] == pytest.approx(1.0)
    assert "0.333" not in {f"{t:.3f}" for t in off_grid["threshold_curve"]["tau"]}
    assert "at fixed τ 0.33" in evaluate.summary(off_grid)


def test_an_artifact_whose_every_image_was_skipped_is_one_line_not_a_nan():
    from igcam_cli.config import EvaluateConfig
    from igcam_cli.errors import BadData
    from igcam_cli.stages.evaluate import _scored

    cfg = EvaluateConfig(split="train")
    assert _scored(["a", "b", "c"], {"b": "cannot read image b.jpg"}, cfg) == (["a", "c"], ["b"])
    with pytest.raises(BadData, match="every image of split 'train' was skipped as unreadable"):
        _scored(["a"], {"a": "cannot read image a.jpg"}, cfg)
