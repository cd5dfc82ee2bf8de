"""igcam refine: guidance + boundary over stored CAMs, resume, oracle marking, and the ablation table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import assert_error, igcam, ok
from igcam_cli.store import LabelStore, MapStore
from igcam_cli.workspace import Workspace

REFINE = ["--split", "train", "--workers", "0", "--batch-size", "4"]

pytestmark = pytest.mark.slow  # every test here starts from a trained workspace


def maps_of(ws, kind: str = "refined") -> dict:
    store = MapStore(ws / kind / "train")
    return {image_id: record for image_id, record in store.iter_records(sorted(store.ids()))}


def test_refine_writes_one_record_per_image_with_the_cams_classes(chain_ws):
    ok("refine", "-w", chain_ws, *REFINE, "--quiet")
    cams, refined = maps_of(chain_ws, "cams"), maps_of(chain_ws)
    assert refined.keys() == cams.keys() and len(refined) == 12
    for image_id, record in refined.items():
        assert record.maps.shape == cams[image_id].maps.shape
        assert np.array_equal(record.classes, cams[image_id].classes)
        assert record.maps.min() >= 0 and record.maps.max() <= 1 + 1e-3
        assert record.attrs["oracle"] is False


def test_no_guidance_no_boundary_passes_the_cams_through(chain_ws):
    ok("refine", "-w", chain_ws, *REFINE, "--guidance", "none", "--no-boundary", "--quiet")
    cams, refined = maps_of(chain_ws, "cams"), maps_of(chain_ws)
    for image_id, record in refined.items():
        assert np.allclose(record.maps, cams[image_id].maps, atol=1e-3)


def test_boundary_changes_maps_and_batching_does_not(chain_ws, tmp_path):
    ok("refine", "-w", chain_ws, *REFINE, "--guidance", "none", "--quiet")
    batched = maps_of(chain_ws)
    ok(
        "refine",
        "-w",
        chain_ws,
        "--split",
        "train",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--guidance",
        "none",
        "--force",
        "--quiet",
    )
    single = maps_of(chain_ws)
    cams = maps_of(chain_ws, "cams")
    assert any(not np.allclose(batched[i].maps, cams[i].maps, atol=1e-2) for i in batched if len(cams[i].classes))
    for image_id in batched:
        assert np.allclose(batched[image_id].maps, single[image_id].maps, atol=2e-3)


def test_fill_gain_follows_the_cam_grid_unless_set(chain_ws):
    """Default fill gain: 1 for CAMs of 8 cells or fewer across the image, 2 from 16; the 64 px images' CAMs at
    output stride 16 have 4. The same CAMs read as those of a classifier that drew them x4 (16 cells) fill as
    --fill-gain 2 does."""
    from igcam_cli.config import RefineConfig
    from igcam_cli.stages import refine as refine_stage

    ws = Workspace.open(chain_ws)
    ids = ws.dataset().ids("train")
    cams = ws.maps("cams", "train")
    cell = refine_stage.cam_cell(ws.latest("make-cams", "train"))
    assert cell == 16  # the classifier drew the images at their own size

    def guided(cell: float, **settings) -> list[np.ndarray]:
        data = refine_stage._Guided(ws.dataset(), cams, ids, RefineConfig(**settings), cell)
        return [data[i].maps.numpy() for i in range(len(ids))]

    auto_coarse, auto_fine = guided(cell), guided(cell / 4)
    gain_1, gain_2 = guided(cell, fill_gain=1.0), guided(cell, fill_gain=2.0)
    assert all(np.array_equal(a, b) for a, b in zip(auto_coarse, gain_1))
    assert all(np.array_equal(a, b) for a, b in zip(auto_fine, gain_2))
    assert any(not np.allclose(a, b) for a, b in zip(gain_1, gain_2))  # the two gains do differ on these CAMs
    assert refine_stage.cam_cell({"classifier": {"input_scale": 2.0}}) == 8 and refine_stage.cam_cell(None) == 16

    ok("refine", "-w", chain_ws, *REFINE, "--quiet")
    assert "fill gain by the CAM grid of 16 px cells" in ws.log_path("refine").read_text()
    assert ws.latest("refine", "train")["cam_cell"] == 16


def test_refine_resumes_and_refuses_other_settings_without_force(chain_ws):
    ok("refine", "-w", chain_ws, *REFINE, "--quiet")
    store = MapStore(chain_ws / "refined" / "train")
    store.parts()[-1].unlink()  # as if killed before its last part was complete
    left = len(store.ids())
    result = ok("refine", "-w", chain_ws, *REFINE)
    assert f"{12 - left} to do, {left} already done" in result.stderr
    assert len(MapStore(chain_ws / "refined" / "train").ids()) == 12

    assert_error(igcam("refine", "-w", chain_ws, *REFINE, "--fill-gain", "3"), 2, "fill_gain", "--force")


def test_a_resume_never_mixes_two_runs_of_the_input(chain_ws):
    """Kill refine, redo make-cams with other settings: refine must not add maps from the new CAMs to
    the ones from the old (it refuses, naming --force), and `igcam run` redoes it whole. Then the same
    for crf after refine is redone."""
    ok("refine", "-w", chain_ws, *REFINE, "--shard", "1/2", "--quiet")  # half of the images, as if killed
    ok("make-cams", "-w", chain_ws, "--split", "train", "--workers", "0", "--scales", "1.0", "--force", "--quiet")
    assert_error(igcam("refine", "-w", chain_ws, *REFINE), 2, "make-cams ran again", "--force")
    assert 0 < len(MapStore(chain_ws / "refined" / "train").ids()) < 12  # refused before any work

    ok("refine", "-w", chain_ws, *REFINE, "--force", "--quiet")
    ok("crf", "-w", chain_ws, "--split", "train", "--workers", "0", "--source", "refined", "--force", "--quiet")
    labels = sorted((chain_ws / "pseudo" / "train").glob("*.png"))
    for path in labels[:5]:
        path.unlink()  # crf killed after 7 of 12 images
    ok("refine", "-w", chain_ws, *REFINE, "--fill-gain", "2", "--force", "--quiet")
    crf = igcam("crf", "-w", chain_ws, "--split", "train", "--workers", "0", "--source", "refined")
    assert_error(crf, 2, "refine ran again", "--force")
    assert len(list((chain_ws / "pseudo" / "train").glob("*.png"))) == 7


def test_crf_ignore_band_marks_exactly_the_unsure_pixels(chain_ws):
    """--ignore-between: a pseudo-label pixel is 255 exactly where the source map's largest value lies
    strictly inside the band; '' switches it off (no 255 at all, with confidence 0)."""
    crf = ["crf", "-w", chain_ws, "--split", "train", "--workers", "0", "--source", "cams", "--force", "--quiet"]
    ok(*crf, "--ignore-between", "0.15,0.45")
    cams, banded = maps_of(chain_ws, "cams"), LabelStore(chain_ws / "pseudo" / "train")
    marked = 0
    for image_id, record in cams.items():
        peak = record.maps.max(axis=0) if len(record.maps) else np.zeros(record.maps.shape[1:])
        unsure = (peak > 0.15) & (peak < 0.45)
        np.testing.assert_array_equal(banded.read(image_id) == 255, unsure)
        marked += int(unsure.sum())
    assert marked > 0
    ok(*crf, "--ignore-between", "")
    assert not any((LabelStore(chain_ws / "pseudo" / "train").read(i) == 255).any() for i in cams)
    assert_error(igcam(*crf, "--ignore-between", "0.5,0.2"), 2, "--ignore-between", "low < high")


def test_oracle_guidance_is_marked_through_crf_and_evaluate(chain_ws):
    result = ok("refine", "-w", chain_ws, *REFINE, "--guidance", "gt")
    assert "ORACLE" in result.stderr
    assert all(r.attrs["oracle"] for r in maps_of(chain_ws).values())
    ok("crf", "-w", chain_ws, "--split", "train", "--workers", "1", "--source", "refined", "--force", "--quiet")
    shown = ok("evaluate", "-w", chain_ws, "--artifact", "crf", "--split", "train")
    assert "ORACLE" in shown.stdout
    report = json.loads((chain_ws / "eval" / "crf-train.json").read_text())
    assert report["oracle"] is True
    assert "ORACLE" in (chain_ws / "eval" / "crf-train.md").read_text()
    maps_report = ok("evaluate", "-w", chain_ws, "--artifact", "refined", "--split", "train", "--quiet")
    assert maps_report.exit_code == 0
    assert json.loads((chain_ws / "eval" / "refined-train.json").read_text())["oracle"] is True


def test_crf_background_power_follows_the_maps_guidance(chain_ws):
    def crf_alpha(*args) -> float:
        ok("crf", "-w", chain_ws, "--split", "train", "--workers", "0", "--force", "--quiet", *args)
        return json.loads((chain_ws / "manifest.json").read_text())["runs"][-1]["bg_alpha"]

    assert crf_alpha("--source", "cams") == 4  # peaked CAMs: (1 - max)^4
    ok("refine", "-w", chain_ws, *REFINE, "--quiet")
    assert crf_alpha("--source", "refined") == 1  # instance guidance filled the objects: (1 - max)^1
    ok("refine", "-w", chain_ws, *REFINE, "--guidance", "none", "--force", "--quiet")
    assert crf_alpha("--source", "refined") == 4
    assert crf_alpha("--source", "refined", "--bg-alpha", "2") == 2


def test_gt_guidance_beats_the_cams(chain_ws):
    """With GT regions the refined maps must score far above the raw CAMs (a sanity bound on the wiring;
    the template's classifier has had 3 SGD steps, so its CAMs are near chance: 19 % -> 33 %). Fill gain 2:
    the default 1 fills a region with its mean CAM over the core's, which near-chance CAMs keep low)."""
    ok("refine", "-w", chain_ws, *REFINE, "--guidance", "gt", "--no-boundary", "--fill-gain", "2", "--quiet")
    ok("evaluate", "-w", chain_ws, "--artifact", "refined", "--split", "train", "--quiet")
    refined = json.loads((chain_ws / "eval" / "refined-train.json").read_text())["miou"]
    cams = json.loads((chain_ws / "eval" / "cams-train.json").read_text())["miou"]
    assert refined > cams + 0.1 and refined > 1.5 * cams


def test_refine_before_make_cams_names_the_command(trained_ws):
    assert_error(igcam("refine", "-w", trained_ws, *REFINE), 3, "igcam make-cams -w", "--split train")


def test_unknown_guidance_is_a_usage_error(chain_ws):
    assert_error(igcam("refine", "-w", chain_ws, *REFINE, "--guidance", "magic"), 2, "--guidance")


def test_ablation_table_has_every_variant_with_and_without_crf(chain_ws):
    Workspace.open(chain_ws).set_stage_options("train-irn", {"epochs": 2, "workers": 0})
    result = ok("ablate", "-w", chain_ws, "--split", "train", "--workers", "0", "--quiet")
    assert "+guidance +boundary" in result.stdout and "IRN random walk" in result.stdout
    table = json.loads((chain_ws / "eval" / "ablation-train.json").read_text())
    assert [row["variant"] for row in table["rows"]] == [
        "CAM",
        "+guidance",
        "+boundary",
        "+guidance +boundary",
        "IRN random walk",
        "+guidance +boundary, then random walk",
    ]
    fixed = [row["maps"]["fixed_tau"] for row in table["rows"]]
    assert fixed == [0.15, 0.50, 0.50, 0.50, 0.25, 0.25]  # CAMs as IRN, IG-CAM's maps, walked maps as IRN
    for row in table["rows"]:
        assert 0 <= row["maps"]["miou"] <= 1 and 0 <= row["crf"]["miou"] <= 1
        assert row["maps"]["miou_fixed_tau"] <= row["maps"]["miou"] + 1e-9  # the fixed tau lies on the sweep
        assert row["crf"]["crf"] is True and row["maps"]["crf"] is False and row["maps"]["oracle"] is False
    assert (chain_ws / "irn" / "model.pt").is_file()  # trained once, in the parent, and shared
    walked = Workspace.open(chain_ws / "ablation" / "irn-random-walk")
    assert walked.latest("refine", "train")["inputs"]["train-irn"] == Workspace.open(chain_ws).latest("train-irn")["id"]
    cam_row = table["rows"][0]
    assert cam_row["maps"]["miou"] == pytest.approx(
        json.loads((chain_ws / "eval" / "cams-train.json").read_text())["miou"]
    )
    assert "| +guidance +boundary |" in (chain_ws / "eval" / "ablation-train.md").read_text()


def test_ablation_labels_every_pixel_and_redoes_a_variant_after_the_toml_changed(chain_ws):
    from igcam_cli import ablation
    from igcam_cli.config import RunOptions

    ws = Workspace.open(chain_ws)  # a private copy
    ws.set_stage_options("crf", {"ignore_between": [0.15, 0.45]})  # the segmenter's band: not the ablation's
    opts = RunOptions(device="cpu", quiet=True)
    first = ablation.run(ws, "train", opts, workers=0, variants=("CAM",))[0]
    sub = Workspace.open(ws.path("ablation", "cam"))
    assert sub.latest("crf", "train")["config"]["ignore_between"] == []
    pseudo = LabelStore(sub.path("pseudo", "train"))
    assert pseudo.ids() and not any((pseudo.read(i) == 255).any() for i in pseudo.ids())
    ws.set_stage_options("crf", {"preset": "irn"})  # edited since: the variant is redone, not refused
    again = ablation.run(ws, "train", opts, workers=0, variants=("CAM",))[0]
    assert sub.latest("crf", "train")["config"]["preset"] == "irn" and 0 <= again["crf"]["miou"] <= 1
    assert first["maps"]["miou"] == again["maps"]["miou"]


def test_each_shard_runs_its_own_chain_and_the_union_equals_the_unsharded_run(trained_ws):
    """A job array task runs make-cams, refine and crf on its shard without waiting for the others."""
    from cli_helpers import CAMS
    from igcam_cli.store import LabelStore

    for shard in ("0/2", "1/2"):
        ok("make-cams", "-w", trained_ws, "--split", "train", *CAMS, "--shard", shard, "--quiet")
        ok("refine", "-w", trained_ws, *REFINE, "--shard", shard, "--quiet")
        ok("crf", "-w", trained_ws, "--split", "train", "--workers", "1", "--shard", shard, "--quiet")
        if shard == "0/2":  # before shard 1 ran, refine of the whole split names what is missing
            assert_error(igcam("refine", "-w", trained_ws, *REFINE), 3, "cams for split 'train' incomplete")
    sharded = maps_of(trained_ws)
    labels = LabelStore(trained_ws / "pseudo" / "train")
    sharded_labels = {i: labels.read(i) for i in labels.ids()}
    ok("refine", "-w", trained_ws, *REFINE, "--force", "--quiet")
    ok("crf", "-w", trained_ws, "--split", "train", "--workers", "1", "--force", "--quiet")
    whole = maps_of(trained_ws)
    assert sharded.keys() == whole.keys() and len(whole) == 12
    for image_id in whole:
        assert np.allclose(sharded[image_id].maps, whole[image_id].maps, atol=2e-3)
        assert np.array_equal(sharded_labels[image_id], labels.read(image_id))


def test_crf_on_a_process_pool_equals_crf_inline(chain_ws):
    from igcam_cli.store import LabelStore

    ok("crf", "-w", chain_ws, "--split", "train", "--source", "cams", "--workers", "2", "--force", "--quiet")
    pooled = LabelStore(chain_ws / "pseudo" / "train")
    pooled = {i: pooled.read(i) for i in sorted(pooled.ids())}
    ok("crf", "-w", chain_ws, "--split", "train", "--source", "cams", "--workers", "0", "--force", "--quiet")
    inline = LabelStore(chain_ws / "pseudo" / "train")
    assert len(pooled) == 12 and all(np.array_equal(inline.read(i), label) for i, label in pooled.items())


def test_worker_counts_default_to_the_cpus_this_process_may_use(chain_ws, monkeypatch):
    import os

    from igcam_cli.runtime.pool import worker_count

    assert worker_count(3) == 3 and worker_count(0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert worker_count(None) == 3
    assert "workers" not in (chain_ws / "igcam.toml").read_text()  # the default, not a workspace's setting
    ok("crf", "-w", chain_ws, "--split", "train", "--source", "cams", "--force", "--quiet")
    assert Workspace.open(chain_ws).latest("crf", "train")["workers"] == 3  # recorded: the count used
