"""The CLI's error contract (docs/ARCHITECTURE.md, Conventions): one `igcam: error:` line, the documented exit code
(missing upstream artifact 3 with the command to run, bad data 4 naming the file, usage 2),
no traceback, and finished artifacts left as they were."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cli_helpers import (
    CAMS,
    CRF,
    TRAIN,
    VOC_IMAGES,
    assert_error,
    assert_intact,
    build_voc,
    igcam,
    make_workspace,
    ok,
    snapshot,
    with_option,
    write_palette_png,
)
from igcam_cli.stages import status as status_stage
from igcam_cli.store import MapStore
from igcam_cli.workspace import Workspace

# ---- workspace and init --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train-cls", "make-cams", "crf", "evaluate", "status"])
def test_workspace_without_toml_names_init(tmp_path, command):
    result = igcam(command, "-w", tmp_path)
    assert_error(result, 3, f"{tmp_path} is not an igcam workspace", f"run `igcam init -w {tmp_path} ...` first")
    assert list(tmp_path.iterdir()) == []


def test_init_refuses_to_overwrite_without_force(fresh_ws):
    before = (fresh_ws / "igcam.toml").read_text()
    result = igcam("init", "-w", fresh_ws, "--dataset", "synthetic", "--n-train", 20)
    assert_error(result, 2, "igcam.toml already exists", "--force")
    assert (fresh_ws / "igcam.toml").read_text() == before


def test_init_voc_with_missing_root(tmp_path):
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "voc", "--root", "/nonexistent")
    assert_error(result, 4, "VOC dataset root not found: /nonexistent")
    assert not (tmp_path / "ws").exists()


def test_init_voc_with_a_class_missing_from_the_class_list_names_the_xml(tmp_path):
    images = {**VOC_IMAGES, "img_b": (64, 48, {"bird": (20, 6, 56, 40)})}
    root = build_voc(tmp_path / "VOC2012", images=images)
    result = igcam("init", "-w", tmp_path / "ws", "--dataset", "voc", "--root", root, "--classes", "cat,dog")
    assert_error(result, 4, f"{root / 'Annotations' / 'img_b.xml'}", "class 'bird' is not in the class list (cat, dog)")
    assert not (tmp_path / "ws" / "igcam.toml").exists()


# ---- a stage before its upstream -----------------------------------------------------------------


def test_make_cams_before_train_cls(fresh_ws):
    result = igcam("make-cams", "-w", fresh_ws, *CAMS)
    assert_error(result, 3, f"run `igcam train-cls -w {fresh_ws}` first")
    assert not (fresh_ws / "cams").exists()


@pytest.mark.slow
def test_crf_before_make_cams(trained_ws):
    before = snapshot(trained_ws)
    result = igcam("crf", "-w", trained_ws, "--split", "train", *CRF)
    assert_error(
        result, 3, "cams for split 'train' missing", f"run `igcam make-cams -w {trained_ws} --split train` first"
    )
    assert_intact(before, trained_ws)
    assert not (trained_ws / "pseudo").exists()


@pytest.mark.slow
def test_evaluate_before_make_cams(trained_ws):
    result = igcam("evaluate", "-w", trained_ws, "--artifact", "cams", "--split", "train")
    assert_error(result, 3, f"run `igcam make-cams -w {trained_ws} --split train` first")
    assert not (trained_ws / "eval").exists()


@pytest.mark.slow
def test_evaluate_crf_before_crf(chain_ws):
    shutil.rmtree(chain_ws / "pseudo")
    before = snapshot(chain_ws)
    result = igcam("evaluate", "-w", chain_ws, "--artifact", "crf", "--split", "train")
    assert_error(
        result,
        3,
        "pseudo-labels for split 'train' missing for 12 of 12 images",
        f"run `igcam crf -w {chain_ws} --split train` first",
    )
    assert_intact(before, chain_ws)


@pytest.mark.slow
def test_crf_on_partial_cams_says_how_far_make_cams_got(chain_ws):
    """crf on cams that cover only part of the split names make-cams, with the count."""
    (chain_ws / "cams" / "train" / "part-r0-00000.h5").unlink()
    ok("make-cams", "-w", chain_ws, "--split", "train", *CAMS, "--shard", "0/2", "--quiet")
    result = igcam("crf", "-w", chain_ws, "--split", "train", *CRF)
    assert_error(result, 3, "cams for split 'train' incomplete (6 of 12 images)", "igcam make-cams")


# ---- bad data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["train-cls", *TRAIN], ["make-cams", *CAMS], ["crf", *CRF], ["evaluate", "--artifact", "cams"]],
    ids=lambda a: a[0],
)
@pytest.mark.slow
def test_unknown_split(chain_ws, args):
    before = snapshot(chain_ws)
    result = igcam(args[0], "-w", chain_ws, "--split", "nope", *args[1:])
    assert_error(result, 4, "'nope'", "train, val")
    assert_intact(before, chain_ws)


@pytest.mark.slow
def test_unknown_split_of_a_voc_dataset_names_the_split_file(voc_ws):
    root, ws = voc_ws
    result = igcam("make-cams", "-w", ws, "--split", "nope", *CAMS)
    assert_error(result, 4, f"split file not found: {root / 'ImageSets' / 'Segmentation' / 'nope.txt'}")


@pytest.mark.slow
def test_truncated_jpeg_in_make_cams_keeps_the_images_before_it(voc_ws):
    """Hit in a DataLoader worker (the default): still one clean line; the images before it stay done."""
    root, ws = voc_ws
    bad = root / "JPEGImages" / "img_c.jpg"  # third of train: img_a, img_b, img_c, img_d
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])

    result = igcam("make-cams", "-w", ws, "--split", "train", "--scales", "1.0", "--batch-size", "1", "--workers", "1")
    assert_error(result, 4, f"cannot read image {bad}", "truncated")
    directory = ws / "cams" / "train"
    assert [p.name for p in directory.iterdir()] == ["part-r0-00000.h5"]  # complete part, no temporary
    assert MapStore(directory).ids() == {"img_a", "img_b"}
    runs = json.loads((ws / "manifest.json").read_text())["runs"]
    failed = [r for r in runs if r["stage"] == "make-cams"][-1]
    assert failed["status"] == "failed" and "img_c.jpg" in failed["error"] and "Traceback" not in failed["error"]

    bad.write_bytes(good)
    result = ok("make-cams", "-w", ws, "--split", "train", "--scales", "1.0", "--batch-size", "1", "--workers", "0")
    assert "2 to do, 2 already done" in result.stderr
    assert MapStore(directory).ids() == {"img_a", "img_b", "img_c", "img_d"}


@pytest.mark.slow
def test_mask_of_the_wrong_size_in_evaluate_names_the_mask(voc_ws):
    root, ws = voc_ws
    ok("make-cams", "-w", ws, "--split", "train", *CAMS, "--quiet")
    before = snapshot(ws)
    mask = root / "SegmentationClass" / "img_b.png"
    write_palette_png(mask, np.zeros((10, 12), np.uint8))
    result = igcam("evaluate", "-w", ws, "--artifact", "cams", "--split", "train")
    assert_error(result, 4, f"mask {mask} is 12x10 but its image is 64x48")
    assert_intact(before, ws)
    assert not (ws / "eval").exists()


# ---- usage errors --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command,args", [("make-cams", CAMS), ("crf", CRF)])
def test_shard_out_of_range(chain_ws, command, args):
    before = snapshot(chain_ws)
    assert_error(igcam(command, "-w", chain_ws, *args, "--shard", "3/2"), 2, "--shard 3/2: need 0 <= i < n")
    assert_error(igcam(command, "-w", chain_ws, *args, "--shard", "x"), 2, "--shard expects i/n")
    assert_intact(before, chain_ws)


@pytest.mark.slow
def test_scales_that_are_not_numbers(chain_ws):
    before = snapshot(chain_ws)
    result = igcam("make-cams", "-w", chain_ws, "--workers", "0", "--scales", "a,b")
    assert_error(result, 2, "--scales expects comma-separated numbers", "'a,b'")
    assert_error(
        igcam("make-cams", "-w", chain_ws, "--scales", "1.0,-0.5"),
        2,
        "--scales: [1.0, -0.5] is not allowed (a non-empty list of numbers > 0)",
    )
    assert_intact(before, chain_ws)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command,args", [("train-cls", TRAIN), ("make-cams", CAMS)])
def test_device_cuda_without_cuda(chain_ws, command, args):
    before = snapshot(chain_ws)
    result = igcam(command, "-w", chain_ws, *args, "--device", "cuda")
    assert_error(result, 2, "--device cuda: CUDA is not available on this machine")
    assert_intact(before, chain_ws)


@pytest.mark.slow
def test_unknown_device(chain_ws):
    assert_error(igcam("make-cams", "-w", chain_ws, *CAMS, "--device", "tpu"), 2, "unknown device 'tpu'")


@pytest.mark.slow
def test_pretrained_weights_file_missing(trained_ws):
    before = snapshot(trained_ws)
    result = igcam("train-cls", "-w", trained_ws, *with_option(TRAIN, "--pretrained", "/missing.pt"))
    assert_error(result, 4, "--pretrained: weights file not found: /missing.pt")
    assert_intact(before, trained_ws)


@pytest.mark.slow
def test_resume_with_changed_epochs_is_refused(trained_ws):
    """Documented behaviour: --resume needs the settings last.pt was trained with (the poly LR schedule
    depends on the total number of steps), so changing --epochs exits 2 and keeps the checkpoints."""
    before = snapshot(trained_ws)
    result = igcam("train-cls", "-w", trained_ws, *with_option(TRAIN, "--epochs", "2"), "--resume")
    assert_error(
        result,
        2,
        f"--resume: {trained_ws / 'cls' / 'last.pt'} was trained with different epochs",
        "rerun without --resume",
    )
    assert_intact(before, trained_ws)
    runs = json.loads((trained_ws / "manifest.json").read_text())["runs"]
    assert [r["stage"] for r in runs] == ["train-cls"]  # no record for the refused run


@pytest.mark.slow
def test_resume_checks_every_setting_of_the_results(trained_ws):
    from igcam_cli.workspace import Workspace

    Workspace.open(trained_ws).set_stage_options("train-cls", {"momentum": 0.5})
    before = snapshot(trained_ws)
    result = igcam("train-cls", "-w", trained_ws, *TRAIN, "--resume")
    assert_error(result, 2, "was trained with different momentum", "rerun without --resume")
    assert_intact(before, trained_ws)


@pytest.mark.slow
def test_unknown_evaluate_artifact(chain_ws):
    assert_error(
        igcam("evaluate", "-w", chain_ws, "--artifact", "masks"),
        2,
        "--artifact: 'masks' is not allowed (one of cams, refined, crf, seg)",
    )


# ---- the real console script -----------------------------------------------------------------------


def test_console_script_prints_one_error_line_and_exits_3(fresh_ws):
    exe = shutil.which("igcam")
    assert exe, "the igcam console script is not installed"
    proc = subprocess.run(
        [exe, "crf", "-w", str(fresh_ws), "--split", "train", "--source", "cams"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert (
        proc.stderr == f"igcam: error: cams for split 'train' missing: "
        f"run `igcam make-cams -w {fresh_ws} --split train` first\n"
    )
    assert proc.stdout == ""
    assert not (fresh_ws / "pseudo").exists()
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("igcam ")


# ---- help -------------------------------------------------------------------------------------------


def test_help_keeps_every_bracketed_default_and_table_name():
    """Rich markup would silently eat `[default: 0.2]` or `[refine]` from a help text unless escaped."""
    import re

    import typer.main

    from cli_helpers import RUNNER
    from igcam_cli.cli import app

    root = typer.main.get_command(app)
    checked = 0
    for name, command in [("", root), *root.commands.items()]:
        texts = [command.help or ""] + [param.help or "" for param in command.params if hasattr(param, "help")]
        fragments = [m.replace("\\[", "[") for text in texts for m in re.findall(r"\\?\[[^\]\n]*\]", text)]
        result = RUNNER.invoke(
            app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}
        )
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.replace("│", " ").split())
        for fragment in fragments:
            assert " ".join(fragment.split()) in shown, f"igcam {name} --help lost {fragment!r}"
            checked += 1
    assert checked >= 15


def test_status_shows_a_workspace_path_with_brackets(tmp_path):
    ws = tmp_path / "runs[lr=0.1]"
    ok("init", "-w", ws, "--dataset", "synthetic", "--n-train", 4, "--n-val", 2, "--image-size", 32)
    result = ok("status", "-w", ws)
    assert "runs[lr=0.1]" in result.output


def test_status_calls_a_running_record_whose_process_is_gone_killed(tmp_path):
    ok("init", "-w", tmp_path / "ws", "--dataset", "synthetic", "--n-train", 4)
    ws = Workspace.open(tmp_path / "ws")
    ws.start("make-cams", {}, split="train")  # this process: alive
    ws.start("refine", {}, split="train")
    gone = subprocess.Popen(["true"])
    gone.wait()
    manifest = json.loads(ws.manifest_path.read_text())
    manifest["runs"][-1]["pid"] = gone.pid
    ws.manifest_path.write_text(json.dumps(manifest))
    states = {r["stage"]: r["state"] for r in status_stage.run(ws)}
    assert states["make-cams"] == "running" and states["refine"] == "killed"
    assert f"process {gone.pid} is gone" in " ".join(ok("status", "-w", ws.root).output.split())


def test_status_lists_the_chain_stages_not_run_yet(tmp_path):
    ws = tmp_path / "ws"
    ok("init", "-w", ws, "--dataset", "synthetic", "--n-train", 4, "--n-val", 2, "--image-size", 32)
    rows = status_stage.run(Workspace.open(ws))
    assert [(r["stage"], r["state"]) for r in rows] == [
        (stage, "not run") for stage in ("train-cls", "make-cams", "refine", "crf", "train-seg", "predict")
    ]
    assert "no stage has run yet" in ok("status", "-w", ws).output


@pytest.mark.slow
def test_warmup_epochs_option_reaches_the_recorded_config(fresh_ws):
    ok("train-cls", "-w", fresh_ws, *TRAIN, "--warmup-epochs", "2", "--quiet")
    records = json.loads((fresh_ws / "manifest.json").read_text())["runs"]
    assert records[-1]["config"]["warmup_epochs"] == 2


def test_status_says_partial_stale_failed_and_what_to_run_next(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0, size=32)
    ids = ws.dataset().ids("train")
    cls = ws.start("train-cls", {}, round=1)
    cls.finish()
    cams = ws.start("make-cams", {}, split="train", shard="0/1", inputs={"train-cls": cls.id})
    with ws.maps("cams", "train").writer() as writer:
        for image_id in ids[:2]:
            writer.write(image_id, np.ones((1, 32, 32), np.float32), np.array([1]))
    cams.finish()
    refine = ws.start("refine", {}, split="train", shard="0/1", inputs={"make-cams:train": cams.id})
    refine.finish()
    ws.start("crf", {}, split="train", shard="0/1").fail("BadData: train_00001.png is truncated")
    ws.start("train-seg", {}).fail("KeyboardInterrupt: ")
    rows = {r["stage"]: r for r in status_stage.run(ws)}
    assert rows["make-cams"]["state"] == "partial" and rows["make-cams"]["detail"] == "2 of 4 images"
    assert rows["make-cams"]["next"] == f"igcam make-cams -w {ws.root} --split train"
    assert rows["refine"]["state"] == "partial"  # not stale: its input is still the latest make-cams run
    assert rows["crf"]["state"] == "failed" and "train_00001.png is truncated" in rows["crf"]["detail"]
    assert rows["train-seg"]["next"] == f"igcam train-seg -w {ws.root} --resume"
    ws.start("predict", {}, split="train", shard="1/2").fail("KeyboardInterrupt: ")
    shard_row = next(r for r in status_stage.run(ws) if r["stage"] == "predict")
    assert shard_row["next"] == f"igcam predict -w {ws.root} --split train --shard 1/2"  # the same shard again

    ws.start("make-cams", {}, split="train", shard="0/1", inputs={"train-cls": cls.id}).finish()  # ran again
    rows = {r["stage"]: r for r in status_stage.run(ws)}
    assert rows["refine"]["state"] == "stale" and rows["refine"]["detail"] == "make-cams:train ran again"
    assert rows["refine"]["next"] == f"igcam refine -w {ws.root} --split train --force"
    output = " ".join(ok("status", "-w", ws.root).output.split())
    assert "make-cams:train ran again" in output and "2 of 4 images" in output
