"""The real stages, from image files to their outputs, each against a baseline measured in the same run.

Writes a folder dataset of `--images` JPEG scenes (default 500 x 375, VOC's size) and a workspace under
`--out`, trains a classifier and a segmenter for one short epoch (their weights only need to exist: this
measures speed, not quality), then times, in images/s:

- make-cams (JPEG files -> HDF5 parts; scales 1.0, 0.5, 1.5, 2.0 with flips) against the classic loop:
  one image, one scale, one flip at a time, float32, no prefetch, written to the same kind of parts;
- refine with its workers (proposals in worker processes, the boundary on the device) against one process;
- crf with pydensecrf on 1 and on every core, and with the torch backend on the device;
- predict with and without the CRF;
- a train-cls step (batch `--batch`, crop `--crop`) with bf16 autocast + channels_last against float32
  (on a GPU; on the CPU the float32 figure alone).

    python benchmarks/stages.py [--device cuda] [--images 48] [--backbone resnet50] [--out /tmp/igcam-bench]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timing import timed  # benchmarks/, on the path when run as a script

from igcam_cli.config import RunOptions, to_dict
from igcam_cli.core.cam import normalize_cams, pyramid_size
from igcam_cli.data.transforms import normalize_on_device
from igcam_cli.models.classifier import CamClassifier, load_checkpoint
from igcam_cli.registry import stage_config
from igcam_cli.runtime.devices import autocast, memory_format, resolve_device
from igcam_cli.runtime.pool import available_cpus
from igcam_cli.stages import crf, init, make_cams, predict, refine, train_cls, train_seg
from igcam_cli.store import MapStore

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 210)}
SCALES = [1.0, 0.5, 1.5, 2.0]


def write_dataset(root: Path, n: int, width: int, height: int) -> None:
    (root / "images").mkdir(parents=True)
    rows = ["id,labels"]
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(60, 140, (height, width, 3)).astype(np.uint8)
        present = sorted(rng.choice(CLASSES, size=rng.integers(1, 3), replace=False))
        for name in present:
            w, h = rng.integers(width // 6, width // 2), rng.integers(height // 6, height // 2)
            x, y = rng.integers(0, width - w), rng.integers(0, height - h)
            image[y : y + h, x : x + w] = COLOURS[name]
        Image.fromarray(image).save(root / "images" / f"img{i:05d}.jpg", quality=90)
        rows.append(f"img{i:05d},{' '.join(present)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def classic_cams(ws, model: CamClassifier, device: torch.device) -> None:
    """IRN-style: each image read, each scale and each flip a separate float32 pass, no prefetch."""
    dataset = ws.dataset()
    store = MapStore(ws.root / "classic" / "train")
    store.clear()
    with store.writer(source="classic") as writer, torch.no_grad():
        for image_id in dataset.ids("train"):
            sample = dataset.load(image_id, with_mask=False)
            x = torch.from_numpy(sample.image.transpose(2, 0, 1).copy())[None].float().to(device)
            height, width = x.shape[-2:]
            total = None
            for scale in SCALES:
                size = pyramid_size((height, width), scale)
                xs = x if scale == 1.0 else F.interpolate(x, size=size, mode="bicubic", align_corners=False)
                for flipped in (False, True):
                    view = normalize_on_device(xs.flip(-1) if flipped else xs)
                    cam = model.cams(view).float()
                    cam = cam.flip(-1) if flipped else cam
                    cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
                    total = cam if total is None else total + cam
            assert total is not None
            classes = sample.labels
            maps = normalize_cams(total[0, torch.as_tensor(classes - 1, device=device)])
            writer.write(image_id, maps.cpu().numpy(), classes.astype(np.uint8))


def train_step_rate(backbone: str, batch: int, crop: int, device: torch.device, mixed: bool, steps: int) -> float:
    """Images/s of classifier training steps (SGD, multi-label loss) on random batches."""
    model = CamClassifier(backbone, 20).to(device)
    if mixed:
        model = model.to(memory_format=memory_format(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = (torch.rand(batch, 20, device=device) > 0.8).float()
    if mixed:
        x = x.contiguous(memory_format=memory_format(device))

    def step() -> None:
        with autocast(device) if mixed else torch.autocast(device.type, enabled=False):
            logits, _ = model(x)
        loss = F.multilabel_soft_margin_loss(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    return batch * steps / timed(lambda: [step() for _ in range(steps)], device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--seg-arch", default="deeplabv3_resnet101", help="deeplabv3plus_resnet18 for a CPU")
    parser.add_argument("--batch", type=int, default=16, help="train-cls step batch")
    parser.add_argument("--crop", type=int, default=512, help="train-cls step crop")
    parser.add_argument("--out", type=Path, default=Path("/tmp/igcam-bench"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    width, height = (int(v) for v in args.size.split("x"))
    shutil.rmtree(args.out, ignore_errors=True)
    write_dataset(args.out / "data", args.images, width, height)
    ws = init.run(args.out / "ws", "folder", args.out / "data", ",".join(CLASSES), {}, preset="standard")
    opts = RunOptions(device=str(device), quiet=True)
    n, cores = args.images, available_cpus()
    rows: list[tuple[str, float, str]] = []

    cls_cfg = stage_config(ws, "train-cls", backbone=args.backbone, pretrained="none", epochs=1, crop=256)
    train_cls.run(cls_cfg, ws, opts, train_cls.TrainOptions())
    model = load_checkpoint(ws.root / "cls" / "model.pt", "").to(device).eval()

    cams_cfg = stage_config(ws, "make-cams", scales=SCALES)
    ours = timed(lambda: make_cams.run(cams_cfg, ws, opts), device)
    classic = timed(lambda: classic_cams(ws, model, device), device)
    rows += [("make-cams, classic loop", n / classic, ""), ("make-cams", n / ours, f"{classic / ours:.2f}x")]

    one = timed(lambda: refine.run(stage_config(ws, "refine", workers=0), ws, opts, force=True), device)
    every = timed(lambda: refine.run(stage_config(ws, "refine"), ws, opts, force=True), device)
    rows += [("refine, one process", n / one, ""), (f"refine, {cores} workers", n / every, f"{one / every:.2f}x")]

    crf_base = stage_config(ws, "crf", source="refined")
    single = timed(lambda: crf.run(replace(crf_base, workers=1, backend="pydensecrf"), ws, opts, force=True), device)
    pooled = timed(lambda: crf.run(replace(crf_base, backend="pydensecrf"), ws, opts, force=True), device)
    on_device = timed(lambda: crf.run(replace(crf_base, backend="torch"), ws, opts, force=True), device)
    rows += [
        ("crf, pydensecrf, 1 core", n / single, ""),
        (f"crf, pydensecrf, {cores} processes", n / pooled, f"{single / pooled:.2f}x"),
        (f"crf, torch on {device}", n / on_device, f"{single / on_device:.2f}x"),
    ]

    seg_cfg = stage_config(
        ws, "train-seg", arch=args.seg_arch, epochs=1, min_steps=0, crop=256, pretrained="none", val_split=""
    )
    train_seg.run(seg_cfg, ws, opts, train_seg.TrainOptions())
    plain = timed(
        lambda: predict.run(stage_config(ws, "predict", split="train", crf=False), ws, opts, force=True), device
    )
    with_crf = timed(
        lambda: predict.run(stage_config(ws, "predict", split="train", crf=True, out="crf"), ws, opts, force=True),
        device,
    )
    rows += [("predict, no CRF", n / plain, ""), ("predict, CRF", n / with_crf, f"{plain / with_crf:.2f}x")]

    steps = 5 if device.type == "cuda" else 2
    fp32 = train_step_rate(args.backbone, args.batch, args.crop, device, mixed=False, steps=steps)
    rows.append((f"train-cls step, fp32, batch {args.batch}, crop {args.crop}", fp32, ""))
    if device.type == "cuda":
        bf16 = train_step_rate(args.backbone, args.batch, args.crop, device, mixed=True, steps=steps)
        rows.append(("train-cls step, bf16 + channels_last", bf16, f"{bf16 / fp32:.2f}x"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {cores} cores"
    print(f"{n} images of {width}x{height}, {args.backbone}, {args.seg_arch}, {name}, torch {torch.__version__}")
    print(f"settings: {to_dict(cams_cfg)['scales']} scales with flips; the standard preset's other defaults")
    for what, rate, ratio in rows:
        print(f"  {what:<46} {rate:8.2f} images/s  {ratio}")


if __name__ == "__main__":
    main()
