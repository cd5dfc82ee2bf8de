"""IRN's class-boundary branch on the classifier's frozen ResNet backbone (net/resnet50_irn.py, edge layers).

The features after each of the backbone's five stages (stem, layer1..layer4) go through a 1x1 conv
to 32 channels, GroupNorm(4, 32) and ReLU, are upsampled to the stride-4 grid of the stem's output
(the deeper three by IRN's integer factors, then cropped), concatenated (160 channels) and mapped to
one boundary logit per pixel by a 1x1 conv with bias. The backbone only provides features: its
outputs are detached and it stays in eval mode, so training touches the boundary layers alone.

The boundary grid is ceil(H/4) x ceil(W/4) for an H x W input (the stem's conv and max-pool each give
ceil(n/2)), the grid of IRN's stride-4 CAMs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn

from igcam_cli.core.random_walk import Offset, PairLabels, boundary_loss
from igcam_cli.errors import BadData, MissingArtifact

__all__ = ["BoundaryNet", "boundary_net_loss", "load_boundary_net"]

BRANCH_CHANNELS = 32
GROUPS = 4


def _stage_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage: those of its last conv (a shortcut conv has as many)."""
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _stage_stride(layer: nn.Sequential) -> int:
    """A torchvision ResNet stage strides in its first block, as its shortcut's 1x1 conv shows."""
    downsample = getattr(layer[0], "downsample", None)
    if downsample is None:
        return 1
    shortcut = downsample[0]
    assert isinstance(shortcut, nn.Conv2d)
    return int(shortcut.stride[0])


def _branch(in_channels: int, upsample: int) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, BRANCH_CHANNELS, 1, bias=False),
        nn.GroupNorm(GROUPS, BRANCH_CHANNELS),
    ]
    if upsample > 1:  # IRN upsamples before the ReLU
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BoundaryNet(nn.Module):
    """Boundary logits B x ceil(H/4) x ceil(W/4) for images B x 3 x H x W.

    `backbone` is used, not copied: pass a CamClassifier's `.backbone` (or use `from_classifier`) and
    the boundary net reads the trained classifier's weights and saves them with its own.
    """

    def __init__(self, backbone: torchvision.models.ResNet, backbone_name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name  # e.g. "resnet50": what a checkpoint needs to rebuild the backbone
        stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
        upsample = [1, 1]  # stem and layer1 are both at stride 4
        for stage in stages[1:]:
            upsample.append(upsample[-1] * _stage_stride(stage))
        channels = [int(backbone.conv1.out_channels)] + [_stage_channels(stage) for stage in stages]
        self.branches = nn.ModuleList(_branch(c, f) for c, f in zip(channels, upsample))
        self.fuse = nn.Conv2d(BRANCH_CHANNELS * len(channels), 1, 1, bias=True)
        self.backbone.eval()

    @classmethod
    def from_classifier(cls, classifier: nn.Module) -> BoundaryNet:
        backbone = classifier.backbone
        assert isinstance(backbone, torchvision.models.ResNet)
        return cls(backbone, str(getattr(classifier, "backbone_name", "")))

    def stage_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        with torch.no_grad():  # IRN detaches every stage: the backbone is never trained here
            feats = [b.maxpool(b.relu(b.bn1(b.conv1(x))))]
            for stage in (b.layer1, b.layer2, b.layer3, b.layer4):
                feats.append(stage(feats[-1]))
        return [f.detach() for f in feats]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.stage_features(x)
        h, w = feats[0].shape[-2:]
        branches = [branch(f)[..., :h, :w] for branch, f in zip(self.branches, feats)]
        return self.fuse(torch.cat(branches, dim=1)).squeeze(1)

    @torch.no_grad()
    def boundary(self, images: torch.Tensor) -> torch.Tensor:
        """IRN's inference: sigmoid of the mean of the logits of each image and its mirror (flipped back)."""
        logits = self(torch.cat([images, images.flip(-1)]))
        plain, mirrored = logits.chunk(2)
        return torch.sigmoid(plain / 2 + mirrored.flip(-1) / 2)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.branches.parameters(), *self.fuse.parameters()]

    def train(self, mode: bool = True) -> BoundaryNet:
        super().train(mode)
        self.backbone.eval()  # as IRN: fixed BatchNorm statistics
        return self


def boundary_net_loss(
    model: BoundaryNet, images: torch.Tensor, pair_labels: PairLabels, offsets: Sequence[Offset]
) -> torch.Tensor:
    """IRN's affinity loss of `model` on a batch, pair labels from `affinity_pair_labels` on the boundary grid."""
    return boundary_loss(torch.sigmoid(model(images)), pair_labels, offsets)


def load_boundary_net(path: Path, command: str) -> BoundaryNet:
    """The boundary network train-irn saved (irn/model.pt), or MissingArtifact naming `command`."""
    from igcam_cli.models.classifier import CamClassifier

    if not path.is_file():
        raise MissingArtifact(f"no trained boundary network at {path}: run `{command}` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = BoundaryNet.from_classifier(CamClassifier(ckpt["backbone"], 1))
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, OSError, AttributeError) as exc:
        raise BadData(f"cannot load boundary network {path}: {exc}") from None
    return model
