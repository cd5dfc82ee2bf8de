"""CAM throughput: igcam's batched multi-scale pass against a per-image, per-view loop.

Prints images/s for both, measured in the same run on the same model and inputs, and their
ratio. The baseline is how IRN-style code computes CAMs: one image, one scale, one flip at a
time. On a GPU igcam also uses bf16 autocast and channels_last.

    python benchmarks/make_cams.py [--backbone resnet50] [--size 448] [--images 64] [--batch 16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import timed  # benchmarks/, on the path when run as a script

from igcam_cli.core.cam import multiscale_cams
from igcam_cli.models.classifier import CamClassifier
from igcam_cli.runtime.devices import autocast, memory_format, resolve_device

SCALES = (1.0, 0.5, 1.5, 2.0)


def baseline(model, images: torch.Tensor) -> torch.Tensor:
    out = []
    for image in images:
        x = image[None]
        total = 0
        for scale in SCALES:
            xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1 else x
            for flipped in (False, True):
                cam = model.cams(xs.flip(-1) if flipped else xs).float()
                cam = cam.flip(-1) if flipped else cam
                total = total + F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        out.append(total)
    return torch.cat(out)


def igcam(model, images: torch.Tensor, batch: int, device) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(memory_format=memory_format(device))
        with autocast(device):
            out.append(multiscale_cams(model.cams, x, SCALES, flip=True))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = CamClassifier(args.backbone, 20).to(device, memory_format=memory_format(device)).eval()
    images = torch.randn(args.images, 3, args.size, args.size, device=device)
    with torch.no_grad():
        igcam(model, images[: args.batch], args.batch, device)  # warm-up
        baseline(model, images[:1])
        t_base = timed(lambda: baseline(model, images), device)
        t_ours = timed(lambda: igcam(model, images, args.batch, device), device)
        err = (igcam(model, images[:2], 2, device) - baseline(model, images[:2])).abs().max().item()
    print(f"device {device}, {args.backbone}, {args.images} images of {args.size} px, scales {SCALES} + flips")
    print(f"baseline (per image, per view): {args.images / t_base:8.2f} img/s")
    print(f"igcam (batched, batch {args.batch}):      {args.images / t_ours:8.2f} img/s")
    print(f"speed-up: {t_base / t_ours:.2f}x   (max abs difference of summed CAMs: {err:.3g})")


if __name__ == "__main__":
    main()
