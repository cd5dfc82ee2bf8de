"""train-seg, predict and evaluate --artifact seg on tiny synthetic workspaces (CPU, 64 px, 1-3 epochs)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli_helpers import (
    OPTS,
    PREDICT,
    SEG,
    assert_error,
    copy_workspace,
    igcam,
    init_synthetic,
    interrupted_after_first_save,
    make_workspace,
    ok,
    tiny_seg_config,
    with_option,
)
from igcam_cli.config import TrainSegConfig, build
from igcam_cli.core.class_gate import gate_classes
from igcam_cli.core.metrics import confusion_matrix, scores
from igcam_cli.core.seg_loss import seg_loss
from igcam_cli.data.transforms import normalize, seg_train_view
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import STAGE4_LAYOUT, CamClassifier
from igcam_cli.models.segmenter import Segmenter, build_segmenter
from igcam_cli.stages import predict as predict_stage
from igcam_cli.stages import train_seg
from igcam_cli.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")


def write_pseudo(ws: Workspace, split: str = "train", oracle: bool = False) -> str:
    """Pseudo-labels = GT masks with a 255 stripe on the left, and a crf record that claims them."""
    dataset = ws.dataset()
    store = ws.pseudo(split)
    for image_id in dataset.ids(split):
        label = dataset.load(image_id).mask.copy()
        label[:, :6] = 255
        store.write(image_id, label)
    record = ws.start("crf", {"source": "test"}, split=split, shard="0/1", oracle=oracle)
    record.finish(outputs=[str(store.directory)])
    return record.id


def epoch_losses(ws: Workspace) -> list[float]:
    log = ws.log_path("train-seg").read_text()
    return [float(line.split(": loss ")[1].split(",")[0]) for line in log.splitlines() if ": loss " in line]


@pytest.fixture(scope="module")
def seg_template(tmp_path_factory) -> Path:
    """8 train / 4 val images of 64 px, a DeepLab-ResNet-18 trained 1 epoch on the GT masks. Do not modify."""
    ws = init_synthetic(tmp_path_factory.mktemp("seg") / "ws", n_train=8)
    ok("train-seg", "-w", ws, "--labels", "gt", *SEG)
    return ws


@pytest.fixture
def seg_ws(seg_template, tmp_path) -> Path:
    return copy_workspace(seg_template, tmp_path / "ws")


# ---- the model -------------------------------------------------------------------------------------


def test_synthetic_defaults_pick_the_small_model(tmp_path):
    cfg = build(TrainSegConfig, make_workspace(tmp_path / "ws").stage_table("train-seg"), {})
    assert (cfg.arch, cfg.pretrained, cfg.labels) == ("deeplabv3plus_resnet18", "cls", "pseudo")


def test_segmenter_gives_logits_at_the_input_size():
    model = Segmenter("deeplabv3_resnet18", 4).eval()
    with torch.no_grad():
        for h, w in [(32, 48), (37, 21)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
    assert model.classifier[0].convs[1][0].dilation == (6, 6)
    assert model.backbone.layer4[1].conv2.dilation == (2, 2) and model.backbone.layer4[0].conv1.stride == (1, 1)
    assert not hasattr(model, "aux_classifier")


@pytest.mark.slow
def test_deeplabv3plus_decodes_at_stride_4_and_loads_a_classifier_backbone(trained_template):
    model = Segmenter("deeplabv3plus_resnet18", 4).eval()
    with torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 96))
        assert features["low"].shape[-2:] == (16, 24) and features["out"].shape[-2:] == (4, 6)
        for h, w in [(64, 96), (37, 21)]:
            assert model(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
    model, note = build_segmenter("deeplabv3plus_resnet18", 3, str(trained_template / "cls" / "model.pt"))
    assert note.startswith("backbone from")
    classifier = torch.load(trained_template / "cls" / "model.pt", weights_only=True)["model"]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, classifier["backbone.layer1.0.conv1.weight"])


def test_pretrained_accepts_a_segmenter_checkpoint_with_another_class_count(tmp_path):
    torch.manual_seed(0)
    source = Segmenter("deeplabv3_resnet18", 6)
    path = tmp_path / "seg.pt"
    torch.save({"arch": source.arch, "num_classes": 6, "model": source.state_dict()}, path)
    model, note = build_segmenter("deeplabv3_resnet18", 3, str(path))
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    assert torch.equal(model.classifier[1].weight, source.classifier[1].weight)  # the 3x3 conv fits
    assert model.classifier[4].weight.shape[0] == 3  # the last layer has its own class count
    assert "head tensors of another shape" in note
    with pytest.raises(BadData, match="not found"):
        build_segmenter("deeplabv3_resnet18", 3, str(tmp_path / "missing.pt"))


# ---- training ----------------------------------------------------------------------------------------


def test_ignored_pixels_contribute_no_gradient():
    torch.manual_seed(0)
    model = Segmenter("deeplabv3_resnet18", 3)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 3, (2, 32, 32))
    ignored = torch.zeros(2, 32, 32, dtype=torch.bool)
    ignored[:, 5:20, 8:30] = True

    def grads(y, loss_fn=seg_loss):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout mask in the ASPP head every time
        logits = model(x)
        logits.retain_grad()
        loss_fn(logits, y).backward()
        return logits.grad.clone(), [p.grad.clone() for p in model.parameters()]

    a, b = labels.clone(), labels.clone()
    a[ignored], b[ignored] = 1, 2  # what the ignored pixels "really" are differs ...
    a[ignored] = b[ignored] = 255  # ... but they are marked 255
    logit_grad, with_ignore = grads(a)
    assert torch.equal(logit_grad.permute(0, 2, 3, 1)[ignored], torch.zeros(int(ignored.sum()), 3))

    def masked_mean(logits, _):  # the loss over the kept pixels only, from labels that fill the hole
        per_pixel = F.cross_entropy(logits, torch.where(ignored, 1, labels), reduction="none")
        return per_pixel[~ignored].mean()

    _, reference = grads(b, masked_mean)
    for g, r in zip(with_ignore, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    _, counted = grads(torch.where(ignored, 1, labels))  # the same pixels labelled: gradients change
    assert any(not torch.allclose(g, c) for g, c in zip(with_ignore, counted))
    # A crop that is all padding: loss 0, not NaN.
    assert seg_loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 255)).item() == 0.0


def test_balanced_loss_weighs_background_and_objects_half_each():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[0, :2, :3], labels[1, 4:, 4:], labels[1, 0, :] = 2, 3, 255  # 10 object pixels, 6 ignored
    per_pixel = F.cross_entropy(logits, labels, reduction="none", ignore_index=255)
    background, objects = per_pixel[labels == 0], per_pixel[(labels > 0) & (labels < 255)]
    expected = (background.mean() + objects.mean()) / 2
    torch.testing.assert_close(seg_loss(logits, labels, balanced=True), expected)
    plain = torch.cat([background, objects]).mean()  # 10 object pixels of 66: the plain mean is near background's
    torch.testing.assert_close(seg_loss(logits, labels), plain)
    # One group only: its own mean; none: 0.
    only_background = torch.where(labels == 255, 255, 0)
    torch.testing.assert_close(seg_loss(logits, only_background, balanced=True), seg_loss(logits, only_background))
    assert seg_loss(logits, torch.full_like(labels, 255), balanced=True).item() == 0.0


def test_train_seg_trains_with_the_configured_loss(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=2)
    write_pseudo(ws)
    calls = []
    real_loss = train_seg.seg_loss

    def loss(logits, labels, balanced=False):
        calls.append(balanced)
        return real_loss(logits, labels, balanced)

    monkeypatch.setattr(train_seg, "seg_loss", loss)
    train_seg.run(tiny_seg_config(ws, epochs=1, loss="balanced"), ws, OPTS, train_seg.TrainOptions())
    assert calls and all(calls)
    assert ws.latest("train-seg")["config"]["loss"] == "balanced"  # a change of loss makes train-seg stale
    assert "balanced loss" in ws.log_path("train-seg").read_text()


def test_augmentation_moves_image_and_label_together():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 5:25] = 255
    label = np.zeros((40, 60), np.uint8)
    label[10:30, 5:25] = 3
    for seed in range(8):
        x, y = seg_train_view(image, label, 48, 0.7, 1.4, np.random.default_rng(seed))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.int64
        assert torch.equal(y == 255, (x == 0).all(0))  # padding: mean colour in the image, 255 in the label
        assert set(torch.unique(y).tolist()) <= {0, 3, 255}
        white = x[0] > 1.0
        assert (white == (y == 3)).float().mean() > 0.97  # only resampled edges may disagree
        assert torch.equal(seg_train_view(image, label, 48, 0.7, 1.4, np.random.default_rng(seed))[1], y)


@pytest.mark.slow
def test_training_on_pseudo_labels_reduces_the_loss_and_inherits_oracle(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=8, n_val=4)
    crf_id = write_pseudo(ws, oracle=True)
    train_seg.run(tiny_seg_config(ws, epochs=3, lr=0.02), ws, OPTS, train_seg.TrainOptions())
    losses = epoch_losses(ws)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    record = ws.latest("train-seg")
    assert record["status"] == "done" and record["inputs"] == {"crf:train": crf_id}
    assert (record["oracle"], record["labels"], record["upper_bound"]) == (True, "pseudo", False)
    assert 0 <= record["metrics"]["val_miou"] <= 1
    ckpt = torch.load(ws.seg_dir / "model.pt", weights_only=True)
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["oracle"]) == ("deeplabv3plus_resnet18", 6, True)
    assert "val mIoU" in ws.log_path("train-seg").read_text()


def test_input_scale_draws_training_and_validation_images_larger(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=2)
    write_pseudo(ws)
    ranges = []
    real_view = train_seg.seg_train_view

    def view(image, label, crop, low, high, rng):
        ranges.append((low, high))
        return real_view(image, label, crop, low, high, rng)

    monkeypatch.setattr(train_seg, "seg_train_view", view)
    cfg = tiny_seg_config(ws, epochs=1, input_scale=2.0, scale_min=0.75, scale_max=1.25)
    model = train_seg.run(cfg, ws, OPTS, train_seg.TrainOptions())
    assert set(ranges) == {(1.5, 2.5)}
    assert "images drawn x2" in ws.log_path("train-seg").read_text()
    # the per-epoch val mIoU: each image drawn at twice its size, the logits scored at the mask's size
    dataset = ws.dataset()
    n = dataset.num_classes + 1
    conf = np.zeros((n, n), dtype=np.int64)
    model.eval()
    with torch.no_grad():
        for image_id in dataset.ids("val"):
            sample = dataset.load(image_id)
            x = normalize(sample.image)[None]
            big = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            logits = F.interpolate(model(big), size=x.shape[-2:], mode="bilinear", align_corners=False)
            conf += confusion_matrix(sample.mask, logits.argmax(1)[0].numpy(), n)
    assert train_seg.evaluate_miou(model, dataset, dataset.ids("val"), cfg, torch.device("cpu")) == pytest.approx(
        scores(conf)["miou"]
    )


@pytest.mark.slow
def test_predict_draws_at_the_segmenters_input_scale(seg_ws):
    """A checkpoint trained with input_scale 2 predicts at scale 1 as one trained at 1 does at scale 2."""
    args = ["--split", "val", "--workers", "0", "--no-crf", "--no-flip", "--no-overlays", "--quiet"]
    path = seg_ws / "seg" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    for input_scale, scale, out in ((1.0, "2.0", "twice"), (2.0, "1.0", "drawn"), (1.0, "1.0", "own")):
        ckpt["config"]["input_scale"] = input_scale
        torch.save(ckpt, path)
        ok("predict", "-w", seg_ws, *args, "--scales", scale, "--out", out)
    assert "scales [1.0] x the segmenter's input scale 2" in (seg_ws / "logs" / "predict.log").read_text()
    differ = 0
    for image_id in Workspace.open(seg_ws).dataset().ids("val"):
        twice, drawn, own = (
            np.asarray(Image.open(seg_ws / "pred" / out / f"{image_id}.png")) for out in ("twice", "drawn", "own")
        )
        np.testing.assert_array_equal(twice, drawn)
        differ += int((own != drawn).sum())
    assert differ > 0  # the scale changes the labels: the comparison above can fail


@pytest.mark.slow
def test_min_steps_raises_the_epochs_of_a_small_dataset(tmp_path):
    cfg = TrainSegConfig(epochs=8, min_steps=240)
    assert [train_seg.run_epochs(cfg, n) for n in (10, 20, 30, 100)] == [24, 12, 8, 8]
    assert train_seg.run_epochs(TrainSegConfig(epochs=8, min_steps=0), 1) == 8
    ws = make_workspace(tmp_path / "ws", n_train=8, n_val=0)
    write_pseudo(ws)
    train_seg.run(tiny_seg_config(ws, epochs=1, min_steps=5), ws, OPTS, train_seg.TrainOptions())  # 2 steps an epoch
    assert len(epoch_losses(ws)) == 3
    assert torch.load(ws.seg_dir / "last.pt", weights_only=True)["step"] == 6
    assert "3 epochs (1 raised for min_steps 5: 2 steps an epoch)" in ws.log_path("train-seg").read_text()
    with pytest.raises(UsageError, match="min-steps"):
        train_seg.run(tiny_seg_config(ws, min_steps=-1), ws, OPTS, train_seg.TrainOptions())


@pytest.mark.slow
def test_resume_after_an_interrupted_run_gives_identical_weights(tmp_path, monkeypatch):
    full_ws = make_workspace(tmp_path / "full", n_train=8, n_val=0)
    write_pseudo(full_ws)
    full = train_seg.run(tiny_seg_config(full_ws), full_ws, OPTS, train_seg.TrainOptions())

    ws = make_workspace(tmp_path / "resumed", n_train=8, n_val=0)
    write_pseudo(ws)
    with interrupted_after_first_save(monkeypatch, train_seg):
        train_seg.run(tiny_seg_config(ws), ws, OPTS, train_seg.TrainOptions())
    assert not (ws.seg_dir / "model.pt").exists()
    last = torch.load(ws.seg_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 2)
    resumed = train_seg.run(tiny_seg_config(ws), ws, OPTS, train_seg.TrainOptions(resume=True))

    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(last["model"][k], b[k]) for k in b)  # the second epoch did change them
    assert [r["status"] for r in ws.records() if r["stage"] == "train-seg"] == ["failed", "done"]
    assert epoch_losses(ws)[-1] == epoch_losses(full_ws)[-1]
    # Resuming a finished run does nothing; a changed config is refused.
    train_seg.run(tiny_seg_config(ws), ws, OPTS, train_seg.TrainOptions(resume=True))
    assert len([r for r in ws.records() if r["stage"] == "train-seg"]) == 2
    with pytest.raises(UsageError, match="epochs"):
        train_seg.run(tiny_seg_config(ws, epochs=3), ws, OPTS, train_seg.TrainOptions(resume=True))


def test_train_seg_without_pseudo_labels_names_the_crf_command(fresh_ws):
    assert_error(
        igcam("train-seg", "-w", fresh_ws, *SEG),
        3,
        "pseudo-labels for split 'train' missing",
        f"igcam crf -w {fresh_ws} --split train",
    )
    ws = Workspace.open(fresh_ws)
    write_pseudo(ws)
    next(ws.pseudo("train").directory.glob("*.png")).unlink()
    assert_error(
        igcam("train-seg", "-w", fresh_ws, *SEG),
        3,
        "missing for 1 of 12 images",
        f"igcam crf -w {fresh_ws} --split train",
    )
    assert not (fresh_ws / "seg" / "model.pt").exists()


def test_pretrained_cls_needs_the_workspace_classifier(fresh_ws):
    write_pseudo(Workspace.open(fresh_ws))
    assert_error(
        igcam("train-seg", "-w", fresh_ws, *with_option(SEG, "--pretrained", "cls")),
        3,
        f"igcam train-cls -w {fresh_ws}",
    )


def test_train_seg_usage_errors(fresh_ws):
    assert_error(igcam("train-seg", "-w", fresh_ws, "--labels", "masks", *SEG), 2, "--labels")
    assert_error(igcam("train-seg", "-w", fresh_ws, "--arch", "unet", *SEG), 2, "--arch: 'unet' is not allowed (one of")


@pytest.mark.slow
def test_train_seg_and_predict_bad_files(fresh_ws, seg_ws, tmp_path):
    ws = Workspace.open(fresh_ws)
    write_pseudo(ws)
    first = ws.dataset().ids("train")[0]
    ws.pseudo("train").write(first, np.zeros((10, 12), np.uint8))  # not the image's size
    assert_error(igcam("train-seg", "-w", fresh_ws, *SEG), 4, "is 12x10 but image", first)
    write_pseudo(ws)
    assert_error(igcam("train-seg", "-w", fresh_ws, *SEG, "--init-from", tmp_path / "none.pt"), 4, "file not found")
    # A segmenter of another class count can neither start this one nor predict for this dataset.
    checkpoint = torch.load(Path(seg_ws) / "seg" / "model.pt", weights_only=True)
    checkpoint.update(num_classes=3, model=Segmenter(checkpoint["arch"], 3).state_dict())
    torch.save(checkpoint, tmp_path / "three.pt")
    assert_error(
        igcam("train-seg", "-w", fresh_ws, *SEG, "--init-from", tmp_path / "three.pt"), 4, "--init-from", "3 outputs"
    )
    assert_error(igcam("predict", "-w", seg_ws, "--split", "val", "--out", "a/b", *PREDICT), 2, "--out 'a/b'")
    (Path(seg_ws) / "seg" / "model.pt").unlink()  # hard-linked to the shared template: replace, never overwrite
    shutil.copy(tmp_path / "three.pt", Path(seg_ws) / "seg" / "model.pt")
    assert_error(igcam("predict", "-w", seg_ws, "--split", "val", *PREDICT), 4, "predicts 3 labels")


# ---- predict and evaluate -----------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_split_writes_one_png_per_image_and_evaluate_reports_it(seg_ws):
    ok("predict", "-w", seg_ws, "--split", "val", *PREDICT)
    ws = Workspace.open(seg_ws)
    dataset = ws.dataset()
    ids = dataset.ids("val")
    for image_id in ids:
        with Image.open(seg_ws / "pred" / "val" / f"{image_id}.png") as png:
            assert png.mode == "P" and png.size == dataset.load(image_id).image.shape[1::-1]
        assert (seg_ws / "pred" / "val" / "overlays" / f"{image_id}.jpg").is_file()
    assert sorted(p.stem for p in (seg_ws / "pred" / "val").glob("*.png")) == sorted(ids)
    predict_record = ws.latest("predict", "val")
    assert predict_record["upper_bound"] is True and predict_record["labels"] == "gt"
    assert predict_record["inputs"] == {"train-seg": ws.latest("train-seg")["id"]}

    ok("evaluate", "-w", seg_ws, "--artifact", "seg", "--split", "val", "--quiet")
    report = json.loads((seg_ws / "eval" / "seg-val.json").read_text())
    assert (report["artifact"], report["split"], report["n_images"]) == ("seg", "val", 4)
    assert (report["crf"], report["upper_bound"], report["oracle"], report["labels"]) == (False, True, False, "gt")
    assert report["source_run"] == predict_record["id"]
    assert 0 <= report["miou"] <= 1
    assert "UPPER BOUND" in (seg_ws / "eval" / "seg-val.md").read_text()

    # Rerun: nothing to do; other settings are refused; --force with --crf redoes it and the report says so.
    before = {p.name: p.stat().st_mtime_ns for p in (seg_ws / "pred" / "val").glob("*.png")}
    ok("predict", "-w", seg_ws, "--split", "val", *PREDICT)
    assert before == {p.name: p.stat().st_mtime_ns for p in (seg_ws / "pred" / "val").glob("*.png")}
    assert_error(igcam("predict", "-w", seg_ws, "--split", "val", *PREDICT, "--crf"), 2, "crf", "--force")
    ok("predict", "-w", seg_ws, "--split", "val", *PREDICT, "--crf", "--force")
    ok("evaluate", "-w", seg_ws, "--artifact", "seg", "--split", "val", "--quiet")
    assert json.loads((seg_ws / "eval" / "seg-val.json").read_text())["crf"] is True

    # A later train-seg that failed wrote no model.pt: predictions still name the run that did.
    trained = ws.latest("train-seg")["id"]
    ws.start("train-seg", {}).fail("KeyboardInterrupt: ")
    ok("predict", "-w", seg_ws, "--split", "val", *PREDICT, "--crf", "--force")
    assert ws.latest("predict", "val")["inputs"] == {"train-seg": trained}
    ws.start("train-seg", {}).finish()  # a newer model: adding to the old predictions is refused
    assert_error(
        igcam("predict", "-w", seg_ws, "--split", "val", *PREDICT, "--crf"),
        2,
        "pred/val",
        "train-seg ran again",
        "--out NAME",
    )


def _write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """JPEG and PNG files of different sizes and modes; id -> (width, height)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (50, 41, 3), dtype=np.uint8)).save(folder / "upper.JPEG")
    Image.fromarray(rng.integers(0, 256, (64, 40), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 70, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    (folder / "notes.txt").write_text("not an image")
    return {"photo": (53, 37), "upper": (41, 50), "grey": (40, 64), "alpha": (70, 30)}


@pytest.mark.slow
def test_predict_a_folder_of_mixed_images(seg_ws, tmp_path):
    sizes = _write_images(tmp_path / "photos")
    ok("predict", "-w", seg_ws, "--images", tmp_path / "photos", *PREDICT, "--crf")
    out = seg_ws / "pred" / "photos"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(sizes)
    for image_id, size in sizes.items():
        with Image.open(out / f"{image_id}.png") as png:
            assert png.mode == "P" and png.size == size
            assert np.asarray(png).max() <= 5
        with Image.open(out / "overlays" / f"{image_id}.jpg") as jpg:
            assert jpg.size == size
    record = Workspace.open(seg_ws).latest("predict", "photos")
    assert record["config"]["images"] == str((tmp_path / "photos").resolve()) and record["config"]["crf"] is True

    # Shards with --out: two halves make the whole folder.
    ok("predict", "-w", seg_ws, "--images", tmp_path / "photos", "--out", "halves", "--shard", "0/2", *PREDICT)
    assert len(list((seg_ws / "pred" / "halves").glob("*.png"))) == 2
    ok("predict", "-w", seg_ws, "--images", tmp_path / "photos", "--out", "halves", "--shard", "1/2", *PREDICT)
    assert sorted(p.stem for p in (seg_ws / "pred" / "halves").glob("*.png")) == sorted(sizes)


@pytest.mark.slow
def test_predict_bad_inputs(seg_ws, fresh_ws, tmp_path):
    photos = tmp_path / "photos"
    _write_images(photos)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    assert_error(igcam("predict", "-w", seg_ws, "--images", photos, *PREDICT), 4, "broken.png")
    # --skip-bad: the broken file is left out and named; a file name that is not UTF-8 is predicted like any other
    named = os.fsencode(photos) + b"/caf\xe9.png"
    shutil.copy(next(p for p in sorted(photos.glob("*.png")) if p.name != "broken.png"), named)
    result = ok("predict", "-w", seg_ws, "--images", photos, *PREDICT[:-1], "--skip-bad", "--out", "skipping")
    assert "1 skipped as unreadable (broken)" in result.output
    out = seg_ws / "pred" / "skipping"
    assert (os.fsencode(out) + b"/caf\xe9.png") in {os.fsencode(p) for p in out.glob("*.png")}
    assert list(Workspace.open(seg_ws).latest("predict", "skipping")["skipped"]) == ["broken"]
    (photos / "broken.png").unlink()
    os.unlink(named)
    assert_error(
        igcam("predict", "-w", seg_ws, "--images", tmp_path / "nowhere", *PREDICT), 4, "no such folder", "nowhere"
    )
    (tmp_path / "empty").mkdir()
    assert_error(igcam("predict", "-w", seg_ws, "--images", tmp_path / "empty", *PREDICT), 4, "no JPEG or PNG")
    assert_error(igcam("predict", "-w", seg_ws, *PREDICT), 2, "--split", "--images")
    assert_error(igcam("predict", "-w", seg_ws, "--split", "val", "--images", photos, *PREDICT), 2, "exactly one")
    assert_error(igcam("predict", "-w", fresh_ws, "--split", "val", *PREDICT), 3, f"igcam train-seg -w {fresh_ws}")
    runs = (seg_ws / "manifest.json").read_text()
    assert_error(igcam("predict", "-w", seg_ws, "--split", "val", "--device", "tpu"), 2, "device 'tpu'")
    assert (seg_ws / "manifest.json").read_text() == runs  # no phantom "running" record for evaluate to name
    assert_error(
        igcam("evaluate", "-w", seg_ws, "--artifact", "seg", "--split", "val"),
        3,
        f"igcam predict -w {seg_ws} --split val",
    )


@pytest.mark.slow
def test_evaluate_refuses_a_folder_prediction_named_like_the_split(seg_ws, tmp_path):
    _write_images(tmp_path / "val")
    ok("predict", "-w", seg_ws, "--images", tmp_path / "val", *PREDICT)
    assert_error(
        igcam("evaluate", "-w", seg_ws, "--artifact", "seg", "--split", "val"),
        4,
        "pred/val holds predictions of",
        "--force",
    )


def test_gate_classes_zeroes_the_low_classes_and_keeps_each_images_best():
    probs = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    class_probs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.3, 0.2]])
    gated = gate_classes(probs, class_probs, 0.5)
    keep = [[True, False, True], [False, True, False]]  # image 1 has no class above 0.5: its best one stays
    for b, row in enumerate(keep):
        torch.testing.assert_close(gated[b, 0], probs[b, 0])
        for c, kept in enumerate(row):
            torch.testing.assert_close(gated[b, c + 1], probs[b, c + 1] if kept else torch.zeros(3, 3))
    with pytest.raises(ValueError, match="not B x"):
        gate_classes(probs, class_probs[:, :2], 0.5)


def _save_classifier(ws_path: Path, favoured: int, metrics: dict) -> CamClassifier:
    """A classifier that scores class `favoured` above 0.5 and every other class below it on any image (its head
    weighs the non-negative pooled features by +1 for that class, -1 for the rest), and a train-cls record."""
    ws = Workspace.open(ws_path)
    dataset = ws.dataset()
    model = CamClassifier("resnet18", dataset.num_classes).eval()
    with torch.no_grad():
        model.head.weight.fill_(-1.0)
        model.head.weight[favoured - 1] = 1.0
    path = ws.cls_dir / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"backbone": "resnet18", "stage4": STAGE4_LAYOUT, "num_classes": dataset.num_classes}
    torch.save({**state, "classes": dataset.classes, "config": {}, "model": model.state_dict()}, path)
    ws.start("train-cls", {"test": True}, round=1).finish(outputs=[str(path)], metrics=metrics)
    return model


def _predicted(ws: Path, out: str) -> dict[str, np.ndarray]:
    ids = Workspace.open(ws).dataset().ids("val")
    return {i: np.asarray(Image.open(ws / "pred" / out / f"{i}.png")) for i in ids}


GATE_ARGS = ["--split", "val", "--workers", "0", "--scales", "1.0", "--no-flip", "--no-crf", "--no-overlays", "--quiet"]


def _level_the_labels(ws: Path) -> None:
    """Zero the segmenter's output biases: the template's one epoch leaves background winning every pixel."""
    path = ws / "seg" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["classifier.classify.bias"].zero_()
    torch.save(ckpt, path)


def test_class_gate_draws_images_at_the_classifiers_input_scale():
    torch.manual_seed(0)
    classifier = CamClassifier("resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 48)
    doubled = F.interpolate(x, size=(64, 96), mode="bilinear", align_corners=False)
    want = torch.sigmoid((classifier(doubled)[0] + classifier(doubled.flip(-1))[0]) / 2)
    classifier.input_scale = 2.0
    got = predict_stage._class_probabilities(classifier, x, torch.device("cpu"))
    torch.testing.assert_close(got, want)
    classifier.input_scale = 1.0
    assert not torch.allclose(predict_stage._class_probabilities(classifier, x, torch.device("cpu")), want)


@pytest.mark.slow
def test_class_gate_drops_the_classes_the_classifier_scores_low(seg_ws):
    _level_the_labels(seg_ws)
    ok("predict", "-w", seg_ws, *GATE_ARGS, "--out", "open")
    open_labels = _predicted(seg_ws, "open")
    classes, counts = np.unique(np.concatenate([v.ravel() for v in open_labels.values()]), return_counts=True)
    assert len(classes) >= 2, classes  # a class besides background: the gate has something to drop
    dropped = int(classes[1:][counts[1:].argmax()])
    favoured = 1 if dropped != 1 else 2
    model = _save_classifier(seg_ws, favoured, {"learned": True, "learned_early": True})
    image = Workspace.open(seg_ws).dataset().load(next(iter(open_labels)), with_mask=False).image
    with torch.no_grad():
        probs = torch.sigmoid(model(normalize(image)[None])[0])[0]
    assert probs[favoured - 1] > 0.5 and (np.delete(probs.numpy(), favoured - 1) < 0.5).all(), probs

    ok("predict", "-w", seg_ws, *GATE_ARGS, "--class-gate", "0.5")  # to pred/val/, as evaluate reads it
    for image_id, gated in _predicted(seg_ws, "val").items():
        before = open_labels[image_id]
        kept = np.isin(before, (0, favoured))
        np.testing.assert_array_equal(gated[kept], before[kept])  # the arg-max among the kept labels is unchanged
        assert np.isin(gated[~kept], (0, favoured)).all()  # the dropped classes' pixels go to the kept ones
    assert not any((labels == dropped).any() for labels in _predicted(seg_ws, "val").values())
    record = Workspace.open(seg_ws).latest("predict", "val")
    assert record["class_gate"]["applied"] is True and record["inputs"]["train-cls"] == record["class_gate"]["run"]
    assert "scores below 0.5 dropped" in (seg_ws / "logs" / "predict.log").read_text()
    out = ok("evaluate", "-w", seg_ws, "--artifact", "seg", "--split", "val")
    assert json.loads((seg_ws / "eval" / "seg-val.json").read_text())["class_gate"] == 0.5
    assert "classes the workspace classifier scored below 0.5 dropped (no GT)" in " ".join(out.output.split())


@pytest.mark.slow
def test_class_gate_is_off_with_a_classifier_that_learned_late(seg_ws):
    """The guard: a classifier from scratch whose loss had not fallen clearly below the class-prior loss after its
    first epochs memorised more than it learned, and does not gate."""
    _save_classifier(seg_ws, 1, {"learned": True, "learned_early": False})
    ok("predict", "-w", seg_ws, *GATE_ARGS, "--out", "open")
    ok("predict", "-w", seg_ws, *GATE_ARGS, "--out", "gated", "--class-gate", "0.5")
    open_labels, gated = _predicted(seg_ws, "open"), _predicted(seg_ws, "gated")
    assert all(np.array_equal(open_labels[i], gated[i]) for i in open_labels)
    record = Workspace.open(seg_ws).latest("predict", "gated")
    assert record["class_gate"]["applied"] is False and "train-cls" not in record["inputs"]
    assert "class gate off" in (seg_ws / "logs" / "predict.log").read_text()


@pytest.mark.slow
def test_class_gate_without_a_fitting_classifier_names_the_file(seg_ws):
    gated = ["predict", "-w", seg_ws, *GATE_ARGS, "--class-gate"]
    assert_error(igcam(*gated, "0.5"), 3, "no trained classifier", "train-cls")
    ws = Workspace.open(seg_ws)
    path = ws.cls_dir / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    wrong = CamClassifier("resnet18", ws.dataset().num_classes + 2)
    state = {"backbone": "resnet18", "stage4": STAGE4_LAYOUT, "num_classes": wrong.num_classes}
    torch.save({**state, "classes": [], "config": {}, "model": wrong.state_dict()}, path)
    assert_error(igcam(*gated, "0.5"), 4, str(path), "classes but")
    assert_error(igcam(*gated, "1.5"), 2, "--class-gate: 1.5 is not allowed")


@pytest.mark.slow
@pytest.mark.parametrize("crf", ["--no-crf", "--crf"])
def test_predict_labels_do_not_depend_on_the_batch(seg_ws, crf):
    args = ["--split", "val", "--workers", "0", "--scales", "1.0,0.75", crf, "--no-overlays", "--quiet"]
    ok("predict", "-w", seg_ws, *args, "--batch-size", "1", "--out", "one")
    ok("predict", "-w", seg_ws, *args, "--batch-size", "4", "--out", "four")
    ids = Workspace.open(seg_ws).dataset().ids("val")
    for image_id in ids:
        one, four = (np.asarray(Image.open(seg_ws / "pred" / name / f"{image_id}.png")) for name in ("one", "four"))
        np.testing.assert_array_equal(one, four)
    assert len(ids) == 4


@pytest.mark.slow
def test_predict_with_the_torch_crf_labels_as_pydensecrf_does(seg_ws):
    args = ["--split", "val", "--workers", "0", "--scales", "1.0", "--crf", "--no-overlays", "--quiet"]
    ok("predict", "-w", seg_ws, *args, "--crf-backend", "pydensecrf", "--out", "pydensecrf")
    ok("predict", "-w", seg_ws, *args, "--crf-backend", "torch", "--out", "torch", "--batch-size", "3")
    ids = Workspace.open(seg_ws).dataset().ids("val")
    pairs = [[np.asarray(Image.open(seg_ws / "pred" / b / f"{i}.png")) for b in ("pydensecrf", "torch")] for i in ids]
    assert np.mean([(a == b).mean() for a, b in pairs]) >= 0.995
