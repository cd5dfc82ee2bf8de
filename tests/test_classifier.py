"""models/classifier.py: output stride, head, frozen BatchNorm, loading weights (files, ImageNet offline)."""

from __future__ import annotations

import time
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from igcam_cli.errors import BadData, MissingArtifact, UsageError
from igcam_cli.models import classifier as clf
from igcam_cli.models.classifier import STAGE4_LAYOUT, CamClassifier, build_classifier, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18() -> CamClassifier:
    torch.manual_seed(0)
    return CamClassifier("resnet18", 4).eval()


@pytest.mark.parametrize("backbone, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_output_stride_16(backbone, channels):
    torch.manual_seed(0)
    model = CamClassifier(backbone, 3).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(1, 3, 64, 64))
        assert feats.shape == (1, channels, 4, 4)
        assert model.features(torch.randn(1, 3, 96, 128)).shape == (1, channels, 6, 8)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_stage4_is_irns_stride_1_without_dilation(backbone):
    """IRN's resnet50(strides=(2, 2, 2, 1)) for every depth: no conv anywhere is dilated, stage 4 keeps
    stride 1, and odd sizes give ceil(H/16) cells (each stride-2 layer pads to ceil)."""
    model = CamClassifier(backbone, 2).eval()
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.dilation == (1, 1) for m in convs)
    assert all(m.stride == (1, 1) for m in model.backbone.layer4.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 33, 47)).shape[-2:] == (3, 3)


def test_checkpoint_from_the_dilated_layout_is_refused(tmp_path):
    model = CamClassifier("resnet18", 2)
    path = tmp_path / "old.pt"
    torch.save({"backbone": "resnet18", "num_classes": 2, "classes": ["a", "b"], "model": model.state_dict()}, path)
    with pytest.raises(BadData, match=r"old\.pt was trained by an older igcam .*dilated.*`igcam train-cls -w ws`"):
        load_checkpoint(path, "igcam train-cls -w ws")


def test_checkpoint_of_another_class_count_is_refused_when_the_dataset_is_given(tmp_path):
    path = tmp_path / "model.pt"
    model = CamClassifier("resnet18", 2)
    torch.save({"backbone": "resnet18", "num_classes": 2, "stage4": STAGE4_LAYOUT, "model": model.state_dict()}, path)
    assert load_checkpoint(path, "igcam train-cls -w ws", 2).num_classes == 2
    with pytest.raises(BadData, match=r"model\.pt has 2 classes but the dataset has 3: retrain it with `igcam tr.*`$"):
        load_checkpoint(path, "igcam train-cls -w ws", 3)
    with pytest.raises(BadData, match="`igcam train-cls -w ws`, or predict without --class-gate"):
        load_checkpoint(path, "igcam train-cls -w ws", 3, ", or predict without --class-gate")


def test_logits_are_mean_of_maps_and_cams_are_relu(resnet18):
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        logits, maps = resnet18(x)
        cams = resnet18.cams(x)
        feats = resnet18.features(x)
    assert logits.shape == (2, 4) and maps.shape == (2, 4, 4, 5)
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cams, torch.relu(maps), atol=0, rtol=0)
    assert (maps < 0).any() and (maps > 0).any()  # so the ReLU check means something
    # The maps are the bias-free 1x1 head applied to the features.
    expected = torch.einsum("bchw,kc->bkhw", feats, resnet18.head.weight[:, :, 0, 0])
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)


def test_head_has_no_bias_and_fc_is_gone(resnet18):
    assert resnet18.head.bias is None
    assert resnet18.head.weight.shape == (4, 512, 1, 1)
    assert isinstance(resnet18.backbone.fc, nn.Identity)
    backbone, head = resnet18.param_groups()
    assert len(head) == 1 and head[0] is resnet18.head.weight
    assert not any(p is resnet18.head.weight for p in backbone)


def test_unknown_backbone_is_a_usage_error():
    with pytest.raises(UsageError, match="vgg16"):
        CamClassifier("vgg16", 3)


def _bn_state(model: CamClassifier) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k or "num_batches_tracked" in k
    }


def test_freeze_batchnorm_keeps_statistics_and_trains_affine_parameters():
    """IRN's FixedBatchNorm: running statistics fixed in train mode, γ and β trained."""
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 3)
    model.freeze_batchnorm()
    model.train()
    assert model.training and model.head.training
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    backbone, _ = model.param_groups()
    assert {id(p) for m in bns for p in m.parameters()} <= {id(p) for p in backbone}
    before = _bn_state(model)
    logits, _ = model(torch.randn(4, 3, 64, 64) * 3 + 1)
    logits.sum().backward()
    after = _bn_state(model)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in bns)


def test_frozen_stages_get_no_gradient_and_keep_their_weights():
    """IRN freezes conv1 to layer2 (stage 2's output is detached); layer3, layer4 and the head train."""
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 3)
    model.freeze_batchnorm()
    model.freeze_stages(2)
    model.train()
    frozen = [model.backbone.conv1, model.backbone.bn1, model.backbone.layer1, model.backbone.layer2]
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    backbone, head = model.param_groups()
    assert not frozen_ids & {id(p) for p in backbone}
    assert {id(p) for p in model.backbone.layer3.parameters()} <= {id(p) for p in backbone}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([*backbone, *head], lr=0.1)
    logits, _ = model(torch.randn(4, 3, 64, 64))
    F.multilabel_soft_margin_loss(logits, torch.tensor([[1.0, 0, 1]] * 4)).backward()
    optimizer.step()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    after = model.state_dict()
    for key, value in before.items():
        unchanged = torch.equal(value, after[key])
        if key.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")):
            assert unchanged, key
    assert not torch.equal(before["backbone.layer3.0.conv1.weight"], after["backbone.layer3.0.conv1.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    with torch.no_grad():  # the forward itself is unchanged by freezing
        x = torch.randn(1, 3, 48, 48)
        reference = CamClassifier("resnet18", 3)
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model.eval()(x)[1], reference.eval()(x)[1])


def test_without_freeze_a_train_forward_changes_statistics():
    # Guards the test above: an unfrozen model in train mode does update its BN statistics.
    torch.manual_seed(0)
    model = CamClassifier("resnet18", 3).train()
    before = _bn_state(model)
    model(torch.randn(4, 3, 64, 64) * 3 + 1)
    after = _bn_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- pretrained weights


def _assert_backbone_equals(model: CamClassifier, state: dict[str, torch.Tensor]) -> None:
    own = model.backbone.state_dict()
    checked = 0
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(own[key], value), key
        checked += 1
    assert checked == len(own) > 50


def test_pretrained_torchvision_state_dict_file(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    state = reference.state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(state, path)
    model = build_classifier("resnet18", 5, pretrained=str(path))
    _assert_backbone_equals(model, state)
    assert model.head.weight.shape == (5, 512, 1, 1)
    # A fresh model differs from the loaded one: the file really was used.
    torch.manual_seed(2)
    fresh = build_classifier("resnet18", 5)
    assert not torch.equal(fresh.backbone.conv1.weight, model.backbone.conv1.weight)


def test_pretrained_igcam_checkpoint_with_backbone_prefix(tmp_path):
    torch.manual_seed(3)
    trained = CamClassifier("resnet18", 7)
    path = tmp_path / "model.pt"
    torch.save(
        {"backbone": "resnet18", "num_classes": 7, "classes": list("abcdefg"), "model": trained.state_dict()}, path
    )
    model = build_classifier("resnet18", 3, pretrained=str(path))
    _assert_backbone_equals(model, trained.backbone.state_dict())
    # A bare {backbone.*: ...} state dict is accepted too.
    bare = tmp_path / "bare.pt"
    torch.save(trained.state_dict(), bare)
    _assert_backbone_equals(build_classifier("resnet18", 3, pretrained=str(bare)), trained.backbone.state_dict())


def test_pretrained_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(BadData, match="weights.pth") as info:
        build_classifier("resnet18", 3, pretrained=str(path))
    assert str(path) in info.value.message


def test_pretrained_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(BadData) as info:
        build_classifier("resnet18", 3, pretrained=str(path))
    assert str(path) in info.value.message


@pytest.mark.parametrize("source", ["resnet50", "resnet34"])
def test_pretrained_wrong_architecture_names_the_path(tmp_path, source):
    path = tmp_path / f"{source}.pth"
    torch.save(getattr(torchvision.models, source)(weights=None).state_dict(), path)
    with pytest.raises(BadData) as info:
        build_classifier("resnet18", 3, pretrained=str(path))
    assert str(path) in info.value.message


def test_pretrained_imagenet_offline_fails_fast(tmp_path, monkeypatch):
    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self.url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        start = time.monotonic()
        with pytest.raises(BadData) as info:
            build_classifier("resnet18", 3, pretrained="imagenet")
        elapsed = time.monotonic() - start
    finally:
        torch.hub.set_dir(previous)
    assert calls and calls[0].endswith(".pth")
    assert elapsed < 10
    message = info.value.message
    assert "--pretrained PATH" in message and calls[0] in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_pretrained_imagenet_uses_hub_cache_without_download(tmp_path, monkeypatch):
    def no_download(self, *args, **kwargs):
        raise AssertionError("must not download when the hub cache has the file")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", no_download)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(4)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, checkpoints / url.rsplit("/", 1)[-1])
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        model = build_classifier("resnet18", 3, pretrained="imagenet")
    finally:
        torch.hub.set_dir(previous)
    _assert_backbone_equals(model, state)


def test_download_timeout_is_restored(tmp_path, monkeypatch):
    import socket

    seen = []

    def offline(self, *args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    before = socket.getdefaulttimeout()
    try:
        with pytest.raises(BadData):
            build_classifier("resnet18", 3, pretrained="imagenet")
    finally:
        torch.hub.set_dir(previous)
    assert seen == [clf.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before


# ---------------------------------------------------------------------------- checkpoints


def test_load_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(5)
    model = CamClassifier("resnet18", 4)
    path = tmp_path / "model.pt"
    torch.save(
        {
            "backbone": "resnet18",
            "stage4": STAGE4_LAYOUT,
            "num_classes": 4,
            "classes": list("abcd"),
            "model": model.state_dict(),
        },
        path,
    )
    loaded = load_checkpoint(path, "igcam train-cls -w ws")
    assert loaded.num_classes == 4 and loaded.backbone_name == "resnet18"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(MissingArtifact, match="igcam train-cls -w ws"):
        load_checkpoint(tmp_path / "absent.pt", "igcam train-cls -w ws")
    torch.save({"backbone": "resnet18", "num_classes": 3, "model": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(BadData, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt", "igcam train-cls -w ws")
