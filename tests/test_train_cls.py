"""train-cls on a tiny synthetic workspace (resume, manifest, checkpoints, loss), its transforms and mAP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cli_helpers import OPTS, interrupted_after_first_save, make_workspace, tiny_cls_config
from igcam_cli.core.metrics import average_precision, class_prior_loss, mean_average_precision
from igcam_cli.data.transforms import eval_view, normalize, resize_long, train_view
from igcam_cli.errors import BadData, UsageError
from igcam_cli.models.classifier import IMAGENET_MEAN, IMAGENET_STD, STAGE4_LAYOUT, CamClassifier
from igcam_cli.stages import train_cls

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_config_comes_from_the_synthetic_toml(tmp_path):
    cfg = tiny_cls_config(make_workspace(tmp_path / "ws"))
    assert (cfg.backbone, cfg.pretrained, cfg.crop, cfg.batch_size, cfg.freeze_bn) == ("resnet18", "none", 32, 4, False)


# ---------------------------------------------------------------------------- resume


class _Interrupt(KeyboardInterrupt):
    pass


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.mark.slow
def test_resume_gives_bit_identical_weights_and_manifest(tmp_path, monkeypatch):
    ws_full = make_workspace(tmp_path / "full")
    full = train_cls.run(tiny_cls_config(ws_full), ws_full, OPTS, train_cls.TrainOptions())
    full_ckpt = torch.load(ws_full.cls_dir / "model.pt", weights_only=True)

    ws = make_workspace(tmp_path / "resumed")
    saves = []
    original_save = train_cls._save

    def save_then_interrupt(path, cfg, model, optimizer, epoch, step, learned_early):
        original_save(path, cfg, model, optimizer, epoch, step, learned_early)
        saves.append(epoch)
        raise _Interrupt("stopped after the first epoch")

    monkeypatch.setattr(train_cls, "_save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_cls.run(tiny_cls_config(ws), ws, OPTS, train_cls.TrainOptions())
    assert saves == [1]
    assert (ws.cls_dir / "last.pt").is_file() and not (ws.cls_dir / "model.pt").exists()
    last = torch.load(ws.cls_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 2)  # 8 images / batch 4
    [failed] = ws.records()
    assert failed["stage"] == "train-cls" and failed["status"] == "failed"
    assert "stopped after the first epoch" in failed["error"]

    monkeypatch.setattr(train_cls, "_save", original_save)
    resumed = train_cls.run(tiny_cls_config(ws), ws, OPTS, train_cls.TrainOptions(resume=True))
    _states_equal(resumed.state_dict(), full.state_dict())
    ckpt = torch.load(ws.cls_dir / "model.pt", weights_only=True)
    _states_equal(ckpt["model"], full_ckpt["model"])
    # The interrupted run changed the weights: a resumed run that restarted from scratch would not match.
    assert any(not torch.equal(last["model"][k], ckpt["model"][k]) for k in ckpt["model"])

    records = ws.records()
    assert [r["status"] for r in records] == ["failed", "done"]
    assert records[0]["id"] != records[1]["id"]
    done = ws.latest("train-cls")
    assert done["status"] == "done" and done["metrics"]["epoch"] == 2
    assert str(ws.cls_dir / "model.pt") in done["outputs"]
    assert math.isfinite(done["metrics"]["train_loss"]) and 0 <= done["metrics"]["val_map"] <= 1
    assert ws_full.latest("train-cls")["metrics"]["train_loss"] == pytest.approx(done["metrics"]["train_loss"], abs=0)

    # model.pt: everything make-cams and --init-from need.
    assert ckpt["backbone"] == "resnet18" and ckpt["num_classes"] == 5
    assert ckpt["classes"] == ws.dataset().classes and len(ckpt["classes"]) == 5
    assert ckpt["config"]["epochs"] == 2
    assert not any(k.startswith("backbone.fc.") for k in ckpt["model"])


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions())
    with pytest.raises(UsageError, match="epochs"):
        train_cls.run(tiny_cls_config(ws, epochs=2), ws, OPTS, train_cls.TrainOptions(resume=True))
    # A round-2-only setting changed in igcam.toml does not matter to round 1.
    train_cls.run(tiny_cls_config(ws, epochs=1, finetune_lr_mult=0.5), ws, OPTS, train_cls.TrainOptions(resume=True))
    # A checkpoint from before an option existed: the option counts as its default.
    last = ws.cls_dir / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["relabel"]
    torch.save(ckpt, last)
    train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions(resume=True))
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(BadData, match="cannot read"):
        train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions(resume=True))


@pytest.mark.slow
def test_resume_without_last_checkpoint_starts_from_scratch(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions(resume=True))
    assert ws.latest("train-cls")["status"] == "done"
    assert "val_map" not in ws.latest("train-cls")["metrics"]  # n_val=0: no validation images
    assert "starting from scratch" in ws.log_path("train-cls").read_text()


# ---------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_loss_decreases_on_synthetic_data(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=16, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=4), ws, OPTS, train_cls.TrainOptions())
    log = ws.log_path("train-cls").read_text()
    per_epoch = [float(line.split(": loss ")[1].split(",")[0]) for line in log.splitlines() if ": loss " in line]
    assert len(per_epoch) == 4
    assert all(math.isfinite(v) for v in per_epoch)
    assert per_epoch[-1] < per_epoch[0], per_epoch
    metrics = ws.latest("train-cls")["metrics"]
    assert metrics["train_loss"] == pytest.approx(per_epoch[-1], abs=1e-4)
    labels = np.zeros((16, 5))
    for k, image_id in enumerate(ws.dataset().ids("train")):
        labels[k, ws.dataset().labels(image_id) - 1] = 1
    assert metrics["prior_loss"] == pytest.approx(class_prior_loss(labels), rel=1e-9)


@pytest.mark.slow
def test_no_warning_when_the_classifier_learns(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=8, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=6), ws, OPTS, train_cls.TrainOptions())
    metrics = ws.latest("train-cls")["metrics"]
    # 2 steps an epoch: only the last epoch is checked (the early check waits for 50 steps)
    assert metrics["train_loss"] <= 0.75 * metrics["prior_loss"], metrics  # clear of the 0.85 margin
    assert metrics["learned"] is True and "warning:" not in ws.log_path("train-cls").read_text()


@pytest.mark.slow
def test_warns_when_the_loss_does_not_fall_below_the_class_prior(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=1, lr=1e-9), ws, OPTS, train_cls.TrainOptions())
    metrics = ws.latest("train-cls")["metrics"]
    assert metrics["learned"] is False and metrics["train_loss"] > train_cls.LEARNED_MARGIN * metrics["prior_loss"]
    [warning] = [line for line in ws.log_path("train-cls").read_text().splitlines() if "warning:" in line]
    assert (
        f"training loss {metrics['train_loss']:.3f} after 1 epochs is not clearly below the class-prior loss "
        f"{metrics['prior_loss']:.3f}"
    ) in warning and "has not learned" in warning


@pytest.mark.slow
def test_records_the_early_verdict_predict_gates_by(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cls, "LEARNED_CHECK_EPOCHS", 1)
    monkeypatch.setattr(train_cls, "LEARNED_CHECK_STEPS", 1)
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    train_cls.run(tiny_cls_config(ws, epochs=2, lr=1e-9), ws, OPTS, train_cls.TrainOptions())
    metrics = ws.latest("train-cls")["metrics"]
    assert metrics["learned_early"] is False and metrics["learned"] is False
    warnings = [line for line in ws.log_path("train-cls").read_text().splitlines() if "warning:" in line]
    assert ["after 1 epochs" in w for w in warnings] == [True, False]

    # A run stopped after the early check and resumed records the verdict of the epoch it did not rerun.
    resumed = make_workspace(tmp_path / "resumed", n_train=4, n_val=0)
    with interrupted_after_first_save(monkeypatch, train_cls):
        train_cls.run(tiny_cls_config(resumed, epochs=2, lr=1e-9), resumed, OPTS, train_cls.TrainOptions())
    train_cls.run(tiny_cls_config(resumed, epochs=2, lr=1e-9), resumed, OPTS, train_cls.TrainOptions(resume=True))
    assert resumed.latest("train-cls")["metrics"]["learned_early"] is False


def _batchnorm_state(model: CamClassifier) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.backbone.state_dict().items()
        if k.split(".")[-1] in ("running_mean", "running_var", "weight", "bias") and "bn" in k
    }


@pytest.mark.slow
def test_freeze_bn_applies_only_to_trained_weights(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    torch.manual_seed(0)
    random_bn = _batchnorm_state(CamClassifier("resnet18", 5))
    assert random_bn and all(float(v.abs().max()) in (0.0, 1.0) for v in random_bn.values())  # the initialisation
    model = train_cls.run(
        tiny_cls_config(ws, epochs=1, pretrained="none", freeze_bn=True), ws, OPTS, train_cls.TrainOptions()
    )
    trained = _batchnorm_state(model)
    moved = [k for k in random_bn if not torch.equal(random_bn[k], trained[k])]
    assert len(moved) == len(random_bn), sorted(set(random_bn) - set(moved))  # statistics and affine parameters
    assert "BatchNorm layers are trained" in ws.log_path("train-cls").read_text()
    # From trained weights (here --init-from) freeze_bn holds the BN statistics where they were, and
    # frozen_stages 2 keeps conv1 to layer2 as they were.
    path = tmp_path / "start.pt"
    torch.save(
        {
            "backbone": "resnet18",
            "stage4": STAGE4_LAYOUT,
            "num_classes": 5,
            "classes": ws.dataset().classes,
            "model": model.state_dict(),
        },
        path,
    )
    again = train_cls.run(
        tiny_cls_config(ws, epochs=1, freeze_bn=True, frozen_stages=2),
        ws,
        OPTS,
        train_cls.TrainOptions(init_from=str(path), force=True),
    )
    start, end = model.backbone.state_dict(), again.backbone.state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith(("conv1", "bn1", "layer1", "layer2")))
    assert not torch.equal(start["layer3.0.conv1.weight"], end["layer3.0.conv1.weight"])
    stats = [k for k in trained if "running_" in k]
    assert stats and all(torch.equal(trained[k], _batchnorm_state(again)[k]) for k in stats)
    assert not torch.equal(again.head.weight, model.head.weight)


# ---------------------------------------------------------------------------- --init-from


def _save_checkpoint(path, num_classes: int, backbone: str = "resnet18") -> None:
    torch.manual_seed(0)
    model = CamClassifier(backbone, num_classes)
    torch.save(
        {
            "backbone": backbone,
            "stage4": STAGE4_LAYOUT,
            "num_classes": num_classes,
            "classes": [f"c{i}" for i in range(num_classes)],
            "model": model.state_dict(),
        },
        path,
    )


def test_init_from_with_other_class_count_is_bad_data(tmp_path):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    path = tmp_path / "three-classes.pt"
    _save_checkpoint(path, num_classes=3)
    with pytest.raises(BadData) as info:
        train_cls.run(tiny_cls_config(ws), ws, OPTS, train_cls.TrainOptions(init_from=str(path)))
    assert str(path) in info.value.message and "3 classes" in info.value.message
    assert not (ws.cls_dir / "model.pt").exists()


@pytest.mark.slow
def test_init_from_starts_from_the_given_weights(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", n_train=4, n_val=0)
    path = tmp_path / "five-classes.pt"
    _save_checkpoint(path, num_classes=5)
    start = torch.load(path, weights_only=True)["model"]
    seen = {}
    original_groups = CamClassifier.param_groups

    def capture(self):  # called once, on the model as handed to the loop, before any step
        seen.update({k: v.clone() for k, v in self.state_dict().items()})
        return original_groups(self)

    monkeypatch.setattr(CamClassifier, "param_groups", capture)
    trained = train_cls.run(tiny_cls_config(ws, epochs=1), ws, OPTS, train_cls.TrainOptions(init_from=str(path)))
    _states_equal(seen, start)
    assert not torch.equal(trained.head.weight, start["head.weight"])


# ---------------------------------------------------------------------------- transforms


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_normalize_uses_imagenet_mean_and_std():
    image = _image(5, 7)
    x = normalize(image)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("h, w, scale", [(20, 30, 1.0), (40, 25, 0.5), (200, 150, 1.5), (64, 64, 1.0), (90, 40, 2.0)])
def test_train_view_shape_and_determinism(h, w, scale):
    image = _image(h, w, seed=h)
    a = train_view(image, 48, scale, scale, np.random.default_rng([1, 2, 3]))
    b = train_view(image, 48, scale, scale, np.random.default_rng([1, 2, 3]))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    views = {train_view(image, 48, scale, scale, np.random.default_rng(s)).numpy().tobytes() for s in range(12)}
    assert len(views) > 1  # other seeds: other flips / crops


def test_train_view_pads_with_zeros_where_there_is_no_image():
    image = np.full((20, 10, 3), 255, dtype=np.uint8)  # white: normalised values are all > 0
    crop = 48
    # scale 0.5: long side 24, so the image is 24 x 12 on a 48 x 48 canvas.
    x = train_view(image, crop, 0.5, 0.5, np.random.default_rng(7))
    inside = (x != 0).all(dim=0)
    assert inside.sum().item() == 24 * 12
    rows, cols = torch.nonzero(inside, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 24 and cols.max() - cols.min() + 1 == 12
    white = normalize(np.full((1, 1, 3), 255, dtype=np.uint8))[:, 0, 0]
    torch.testing.assert_close(x[:, inside], white[:, None].expand(3, 24 * 12))
    assert (x[:, ~inside] == 0).all()


def test_crop_height_fits_a_landscape_image_without_padding():
    image = _image(24, 40, seed=5)
    x = train_view(image, 40, 1.0, 1.0, np.random.default_rng(0), crop_height=24)  # the whole image, no padding
    assert x.shape == (3, 24, 40)
    assert torch.equal(x, normalize(image)) or torch.equal(x, normalize(image).flip(-1))
    assert train_view(_image(40, 24, seed=5), 40, 1.0, 1.0, np.random.default_rng(0), 24).shape == (3, 24, 40)
    assert torch.equal(eval_view(image, 40, 24), normalize(image))
    tall = eval_view(_image(40, 20, seed=6), 40, 24)  # a portrait image: its centre rows, centred
    assert tall.shape == (3, 24, 40) and torch.equal(tall[:, :, 10:30], normalize(_image(40, 20, seed=6))[:, 8:32])


def test_train_view_larger_image_is_a_window_of_it():
    image = _image(100, 100, seed=3)
    x = train_view(image, 40, 1.0, 1.0, np.random.default_rng(0))  # long side 40: exactly the crop
    small = normalize(resize_long(image, 40))
    assert x.shape == (3, 40, 40)
    assert torch.equal(x, small) or torch.equal(x, small.flip(-1))
    # Long side 80: the view is a 40 x 40 window of the (possibly flipped) 80 x 80 image, no padding.
    y = train_view(image, 40, 2.0, 2.0, np.random.default_rng(0))
    big = normalize(resize_long(image, 80))
    windows = [b[:, i : i + 40, j : j + 40] for b in (big, big.flip(-1)) for i in range(41) for j in range(41)]
    assert any(torch.equal(y, w) for w in windows)


def test_input_scale_draws_the_training_and_validation_images_larger(tmp_path):
    """input_scale 2 with a 32 px crop: the 64 px images fill a 64 px canvas, in training and in the val view, as
    crop 64 at input_scale 1 does."""
    ws = make_workspace(tmp_path / "ws", n_train=2, n_val=0)  # 64 px images
    dataset = ws.dataset()
    ids = dataset.ids("train")
    drawn = tiny_cls_config(ws, crop=32, input_scale=2.0)
    plain = tiny_cls_config(ws, crop=64, input_scale=1.0)
    assert train_cls.drawn_canvas(drawn) == (64, 0) and train_cls.drawn_canvas(plain) == (64, 0)
    for train in (True, False):
        a = train_cls._ClassifierImages(dataset, ids, drawn, seed=0, train=train)[1][0]
        b = train_cls._ClassifierImages(dataset, ids, plain, seed=0, train=train)[1][0]
        assert a.shape == (3, 64, 64) and torch.equal(a, b)
    assert train_cls.drawn_canvas(tiny_cls_config(ws, crop=48, crop_height=32, input_scale=1.5)) == (72, 48)


def test_eval_view_centres_the_image():
    image = _image(32, 64, seed=1)
    x = eval_view(image, 64)
    assert x.shape == (3, 64, 64)
    assert (x[:, :16] == 0).all() and (x[:, 48:] == 0).all()
    torch.testing.assert_close(x[:, 16:48], normalize(image), atol=0, rtol=0)
    tall = eval_view(_image(30, 10, seed=2), 60)  # resized to 60 x 20, centred at columns 20..39
    assert tall.shape == (3, 60, 60)
    assert (tall[:, :, :20] == 0).all() and (tall[:, :, 40:] == 0).all()
    assert (tall[:, :, 20:40] != 0).any(dim=0).all()


# ---------------------------------------------------------------------------- mAP


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = np.array([1, 0, 1, 0, 0, 1])
    # Positives at ranks 1, 3, 6: precisions 1/1, 2/3, 3/6.
    expected = (1 + 2 / 3 + 3 / 6) / 3
    assert average_precision(scores, targets) == pytest.approx(0.7222222222222222, abs=1e-12)
    assert average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert average_precision(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert average_precision(np.array([0.9, 0.1]), np.array([0, 1])) == 0.5
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_mean_average_precision_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.4], [0.2, 0.6, 0.3], [0.1, 0.9, 0.2]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # class 0: positives at ranks 1, 3 -> (1 + 2/3) / 2 = 5/6; class 1: positive at rank 2 -> 1/2;
    # class 2: no positives, skipped.  mAP = (5/6 + 1/2) / 2 = 2/3.
    assert mean_average_precision(scores, targets) == pytest.approx(0.6666666666666666, abs=1e-12)
    assert math.isnan(mean_average_precision(scores, np.zeros_like(targets)))


def test_poly_lr_warms_up_linearly_then_decays():
    from igcam_cli.runtime import training

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = []
    for step in range(10):
        training.poly_lr(optimizer, [1.0], step, 10, warmup_steps=4)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.25 * (k + 1) * (1 - k / 10) ** training.POLY_POWER for k in range(4)])
    assert lrs[4:] == pytest.approx([(1 - k / 10) ** training.POLY_POWER for k in range(4, 10)])
    training.poly_lr(optimizer, [1.0], 0, 10)  # no warm-up: the poly schedule alone
    assert optimizer.param_groups[0]["lr"] == 1.0
