"""The segmentation model: torchvision's DeepLabV3 (ASPP head) on a dilated ResNet (docs/METHOD.md §7).

`deeplabv3_resnet50` and `deeplabv3_resnet101` are torchvision's own models (output stride 8,
ASPP rates 12/24/36), without the auxiliary head. `deeplabv3_resnet18` is igcam's small,
CPU-friendly variant: the same DeepLabHead on a ResNet-18 whose last stage is dilated (output
stride 16, ASPP rates 6/12/18, the DeepLabV3 paper's setting for that stride); torchvision has
no such model because its BasicBlock refuses dilation, so the dilation is set on the convs here.
`deeplabv3plus_resnet18` adds DeepLabV3+'s decoder (Chen et al. 2018): the ASPP output upsampled
to stride 4 and fused with the first stage's features, so that small inputs (the synthetic
dataset's 128 px, where stride 16 leaves an 8 x 8 grid) still get sharp object boundaries.

The module keeps torchvision's attribute names (`backbone`, `classifier`), so a torchvision
DeepLabV3 state dict (its `aux_classifier.*` dropped) loads into it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from igcam_cli.errors import BadData, MissingArtifact, UsageError
from igcam_cli.models.classifier import imagenet_state, load_backbone, read_state_file

# arch -> (torchvision ResNet builder, backbone name for ImageNet weights, feature channels)
ARCHS = {
    "deeplabv3_resnet18": (torchvision.models.resnet18, "resnet18", 512),
    "deeplabv3plus_resnet18": (torchvision.models.resnet18, "resnet18", 512),
    "deeplabv3_resnet50": (torchvision.models.resnet50, "resnet50", 2048),
    "deeplabv3_resnet101": (torchvision.models.resnet101, "resnet101", 2048),
}


class Segmenter(nn.Module):
    """Logits over background + C classes at the input's resolution: forward(x) -> B x (C+1) x H x W."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        if arch not in ARCHS:
            raise UsageError(f"unknown segmentation model '{arch}' (choose from {', '.join(ARCHS)})")
        builder, _, channels = ARCHS[arch]
        self.arch = arch
        self.num_classes = num_classes  # including background
        if arch.endswith("_resnet18"):
            resnet = builder(weights=None)
            _dilate_basic_blocks(resnet.layer4, dilation=2, previous=1)
            rates = (6, 12, 18)
        else:
            resnet = builder(weights=None, replace_stride_with_dilation=[False, True, True])
            rates = (12, 24, 36)
        plus = arch.startswith("deeplabv3plus")
        layers = {"layer1": "low", "layer4": "out"} if plus else {"layer4": "out"}
        self.backbone = IntermediateLayerGetter(resnet, return_layers=layers)
        self.classifier = (
            PlusHead(channels, 64, num_classes, rates) if plus else DeepLabHead(channels, num_classes, rates)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if isinstance(self.classifier, PlusHead):
            logits = self.classifier(features["out"], features["low"])
        else:
            logits = self.classifier(features["out"])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, head): the head trains with a larger learning rate."""
        return list(self.backbone.parameters()), list(self.classifier.parameters())


class PlusHead(nn.Module):
    """DeepLabV3+'s decoder, narrowed for CPUs: ASPP (128 channels) upsampled to the stride-4
    features, concatenated with their 1x1 projection (32 channels), two 3x3 convs, a classifier."""

    def __init__(self, channels: int, low_channels: int, num_classes: int, rates: tuple[int, ...], width: int = 128):
        super().__init__()
        self.aspp = ASPP(channels, rates, out_channels=width)
        self.low = _conv_bn_relu(low_channels, 32, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(width + 32, width, 3), _conv_bn_relu(width, width, 3))
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.fuse(torch.cat([high, self.low(low)], dim=1)))


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _dilate_basic_blocks(layer: nn.Sequential, dilation: int, previous: int) -> None:
    """Turn a stride-2 stage of BasicBlocks into a stride-1 dilated one (as torchvision does for
    Bottlenecks): the first conv keeps the previous dilation, every other 3x3 conv gets `dilation`."""
    first: BasicBlock = layer[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    block: BasicBlock
    for i, block in enumerate(layer):
        for conv, d in ((block.conv1, previous if i == 0 else dilation), (block.conv2, dilation)):
            conv.dilation, conv.padding = (d, d), (d, d)


def build_segmenter(arch: str, num_classes: int, pretrained: str = "none") -> tuple[Segmenter, str]:
    """A segmenter and a note on what `pretrained` loaded into it.

    `pretrained`: `none`; `imagenet` (torchvision's ImageNet ResNet, backbone only); or a file:
    a ResNet state dict, an igcam classifier checkpoint (`cls/model.pt`: its backbone), or a full
    segmenter (igcam's `seg/model.pt`, or a torchvision DeepLabV3 state dict): its backbone and
    every head layer whose shape fits (the last one differs when the class count does).
    """
    model = Segmenter(arch, num_classes)
    if pretrained == "none":
        return model, "random init"
    resnet_name = ARCHS[arch][1]
    head: dict[str, torch.Tensor] = {}
    if pretrained == "imagenet":
        backbone = imagenet_state(resnet_name)
    else:
        backbone, head = _split_state(read_state_file(Path(pretrained)))
    load_backbone(model.backbone, backbone, pretrained, f"{arch} backbone")
    if not head:
        return model, f"backbone from {pretrained}"
    own = model.classifier.state_dict()
    unknown = sorted(set(head) - set(own))
    if unknown:
        raise BadData(
            f"--pretrained {pretrained}: its head does not fit a {arch} (unexpected keys, e.g. {unknown[:2]})"
        )
    fitting = {k: v for k, v in head.items() if v.shape == own[k].shape}
    model.classifier.load_state_dict(fitting, strict=False)
    skipped = len(own) - len(fitting)
    return model, f"backbone and head from {pretrained}" + (
        f" ({skipped} head tensors of another shape left at init)" if skipped else ""
    )


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, head) of a weights file's state dict; head is {} when it has none."""
    if not any(k.startswith("backbone.") for k in state):  # a plain torchvision ResNet
        return state, {}
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("classifier.") :]: v for k, v in state.items() if k.startswith("classifier.")}
    return backbone, head  # an igcam classifier's `head.*` is not a segmentation head: backbone only


def load_segmenter(path: Path, command: str) -> tuple[Segmenter, dict]:
    """The model saved by train-seg (`seg/model.pt`) and its checkpoint's metadata."""
    if not path.is_file():
        raise MissingArtifact(f"no trained segmentation model at {path}: run `{command}` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = Segmenter(ckpt["arch"], ckpt["num_classes"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, OSError, TypeError, UsageError) as exc:
        raise BadData(f"cannot load segmentation checkpoint {path}: {exc}") from None
    return model, {k: v for k, v in ckpt.items() if k != "model"}
