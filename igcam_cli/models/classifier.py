"""The CAM classifier: a torchvision ResNet at output stride 16 (IRN's strides) with a bias-free 1x1 conv head.

Global average pooling commutes with the 1x1 head, so one forward pass gives both the image
logits (the spatial mean of the class maps) and the class activation maps (their ReLU).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from igcam_cli.errors import BadData, UsageError

BACKBONES = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 20
# Written into every checkpoint: classifiers saved before igcam 0.2 had a dilated stage 4 and lack it.
STAGE4_LAYOUT = "stride1-undilated"


OUTPUT_STRIDE = 16  # input pixels per CAM cell


class CamClassifier(nn.Module):
    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        if backbone not in BACKBONES:
            raise UsageError(f"unknown backbone '{backbone}' (choose from {', '.join(BACKBONES)})")
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.backbone = _resnet_os16(backbone)
        # torch's default init (as IRN's head): Kaiming-normal gave logits of std ~1.4 on a fresh
        # ResNet-18, and from scratch the first epochs went to undoing them (loss 0.93 vs 0.63 for labels alone)
        self.head = nn.Conv2d(self.backbone.fc.in_features, num_classes, kernel_size=1, bias=False)
        self.backbone.fc = nn.Identity()
        self.bn_frozen = False
        self.frozen_stages = 0
        # how much larger than their own size images are drawn for it (train-cls input_scale; the checkpoint keeps it)
        self.input_scale = 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.trunk(x, 0), 0)

    def trunk(self, x: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """Stem and stages 1-3, then every block of stage 4 but its last `tail_blocks` (0: all of it)."""
        b = self.backbone
        grad = torch.is_grad_enabled()
        for index, stage in enumerate((self._stem, b.layer2, b.layer3, b.layer4[: len(b.layer4) - tail_blocks])):
            with torch.set_grad_enabled(grad and index >= self.frozen_stages):  # IRN detaches stage 2's output
                x = stage(x)
        return x

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """IRN's stage 1: conv1, BN, ReLU, max-pool and layer1."""
        b = self.backbone
        return b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))

    def tail(self, h: torch.Tensor, tail_blocks: int) -> torch.Tensor:
        """The last `tail_blocks` blocks of stage 4 (0: none): `tail(trunk(x, k), k) == features(x)`."""
        return self.backbone.layer4[len(self.backbone.layer4) - tail_blocks :](h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits B x C, raw class maps B x C x h x w before ReLU)."""
        maps = self.head(self.features(x))
        return maps.mean(dim=(2, 3)), maps

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.forward(x)[1])

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, list(self.head.parameters())

    def freeze_batchnorm(self) -> None:
        """Keep BN statistics fixed (IRN's FixedBatchNorm: small batches make them noisy); γ and β still
        train wherever the gradient reaches."""
        self.bn_frozen = True

    def freeze_stages(self, count: int) -> None:
        """Stages 1..`count` (IRN's stage 1 is the stem with layer1) run without gradients and keep their weights."""
        self.frozen_stages = count
        b = self.backbone
        stage_modules = [[b.conv1, b.bn1, b.layer1], [b.layer2], [b.layer3], [b.layer4]]
        for module in (m for stage in stage_modules[:count] for m in stage):
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> CamClassifier:
        super().train(mode)
        if self.bn_frozen:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


def _resnet_os16(name: str) -> torchvision.models.ResNet:
    """IRN's `resnet50(strides=(2, 2, 2, 1))` for every depth: stage 4 keeps stride 1 with no dilation.

    torchvision's `replace_stride_with_dilation` would dilate stage 4's 3x3 convs instead, a
    different network for the same weights (feature values differ by up to 27, measured on ResNet-50).
    """
    builder, _ = BACKBONES[name]
    net = builder(weights=None)
    first = net.layer4[0]
    strided = first.conv2 if isinstance(first, torchvision.models.resnet.Bottleneck) else first.conv1
    strided.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    return net


def build_classifier(backbone: str, num_classes: int, pretrained: str = "none") -> CamClassifier:
    model = CamClassifier(backbone, num_classes)
    if pretrained == "none":
        return model
    state = imagenet_state(backbone) if pretrained == "imagenet" else read_state_file(Path(pretrained))
    if any(k.startswith("backbone.") for k in state):  # igcam's own classifier checkpoint
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    load_backbone(model.backbone, state, pretrained, backbone)
    return model


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file (a bare one, or an igcam checkpoint's `model`), or BadData."""
    if not path.is_file():
        raise BadData(f"--pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise BadData(f"--pretrained: cannot load weights from {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadData(f"--pretrained: {path} does not hold a state dict")
    return state


def load_backbone(module: nn.Module, state: dict[str, torch.Tensor], pretrained: str, name: str) -> None:
    """Load a ResNet state dict (its `fc.*` ignored) into `module`, or BadData saying what does not fit."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # strict=False still refuses keys whose shapes differ
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise BadData(f"--pretrained {pretrained}: weights do not fit a {name} ({mismatch})") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise BadData(
            f"--pretrained {pretrained}: weights do not fit a {name} "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )


def imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache or a download with a timeout."""
    weights = getattr(torchvision.models, BACKBONES[backbone][1]).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:
        raise BadData(
            f"cannot download ImageNet weights for {backbone} ({type(exc).__name__}: {exc}); offline? "
            f"Fetch {weights.url} elsewhere and pass --pretrained PATH, or place it at {cached}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def load_checkpoint(path: Path, command: str, num_classes: int | None = None, otherwise: str = "") -> CamClassifier:
    """The trained classifier saved by train-cls (MissingArtifact-style hint when absent). With `num_classes`
    (the dataset's), a classifier of another class count is BadData saying to retrain it, `otherwise` after."""
    from igcam_cli.errors import MissingArtifact

    if not path.is_file():
        raise MissingArtifact(f"no trained classifier at {path}: run `{command}` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("stage4") != STAGE4_LAYOUT:
            raise BadData(
                f"{path} was trained by an older igcam whose ResNet stage 4 was dilated, so its weights mean "
                f"something else now: retrain it with `{command}`"
            )
        model = CamClassifier(ckpt["backbone"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
        model.input_scale = float((ckpt.get("config") or {}).get("input_scale", 1.0))
    except (KeyError, RuntimeError, OSError, AttributeError, TypeError, ValueError) as exc:
        raise BadData(f"cannot load classifier checkpoint {path}: {exc}") from None
    if num_classes is not None and model.num_classes != num_classes:
        raise BadData(
            f"{path} has {model.num_classes} classes but the dataset has {num_classes}: "
            f"retrain it with `{command}`{otherwise}"
        )
    return model
